"""Reading a judge model's verdict: which task's answer (a letter) it names as the best.

The judge is asked for a structured answer (`{"best": "B"}`, constrained by a JSON schema,
where the backend takes one) and told to end with `Answer: B` otherwise. What it says is read
in that order of trust: the JSON; a reply that is the letter alone; the last explicit
`answer: B` / `the best is B` / `B is better`; else the last standalone letter of a task. What a thinking model
thinks inline (`<think>…</think>`) is not its verdict and is skipped: it weighs every answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

_THINK = re.compile(r"<(think|thinking|reasoning)>.*?(</\1>|$)", re.DOTALL | re.IGNORECASE)
_ALONE = re.compile(r"^[\W_]*([A-Z])[\W_]*$")
_EXPLICIT = (
    re.compile(r"\b(?i:answer|verdict|best|winner|choice|pick)\b\W{0,4}(?:(?i:is)\W{1,4})?\b([A-Z])\b"),
    re.compile(r"\b([A-Z])\b\W{0,3}(?i:is|was|wins)\s+(?i:the\s+)?(?i:better|best|stronger|winner)\b"),
)
_LETTER = re.compile(r"\b([A-Z])\b")
# "A" opening a phrase ("A better answer is B") is the article, not task A.
_ARTICLE = re.compile(r"A\s+(?!is\b|was\b|wins\b|has\b|gives\b|seems\b|looks\b|answers\b)[a-z]")


def schema(letters: Sequence[str]) -> dict[str, Any]:
    """The structured verdict: one of `letters`."""
    return {
        "type": "object",
        "properties": {"best": {"type": "string", "enum": list(letters)}},
        "required": ["best"],
        "additionalProperties": False,
    }


def parse_verdict(reply: str, letters: Sequence[str]) -> str | None:
    """The task letter `reply` names as the best, or None when it names none."""
    text = _THINK.sub(" ", reply).strip()
    structured = _structured(text, letters)
    if structured is not None:
        return structured
    alone = _ALONE.match(text)
    if alone and alone.group(1) in letters:
        return alone.group(1)
    explicit = sorted(
        (m.start(1), m.group(1)) for pattern in _EXPLICIT for m in pattern.finditer(text) if m.group(1) in letters
    )
    if explicit:
        return explicit[-1][1]
    standalone = [
        m.group(1) for m in _LETTER.finditer(text)
        if m.group(1) in letters and not (m.group(1) == "A" and _ARTICLE.match(text, m.start()))
    ]
    return standalone[-1] if standalone else None


def _structured(text: str, letters: Sequence[str]) -> str | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        value = json.loads(text[start : end + 1])
    except (ValueError, RecursionError):  # nested past what Python reads: no structured verdict
        return None
    best = value.get("best") if isinstance(value, dict) else None
    if isinstance(best, str) and best.strip().upper() in letters:
        return best.strip().upper()
    return None
