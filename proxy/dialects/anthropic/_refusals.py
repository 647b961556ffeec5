"""What a Claude model refuses of the words the gateway chose for another dialect's client,
and that client's request said again in the model's words.

Claude Opus 4.7 and later refuse sampling settings ("`temperature` is deprecated for this
model.") and budgeted thinking ("\"thinking.type.enabled\" is not supported for this model.
Use \"thinking.type.adaptive\" and \"output_config.effort\" to control thinking"); models older
than strict tool use (Claude Sonnet 4, Opus 4 and before) refuse a strict tool ("'claude-
sonnet-4-20250514' does not support strict tools."), and newer ones strict tools past what
they compile (more than 20, more than 24 optional parameters: "The compiled grammar is too
large"). OpenAI and Ollama clients send all three (chat UIs and coding agents set a
temperature; `reasoning_effort` and `think` become a budget; the OpenAI Agents SDK and Codex
make every function strict), so every such request to such a model was a 400. The gateway
translated those settings itself: the request goes again without the refused sampling setting
(as a `top_p` next to a `temperature` is already left out) or the tools' `strict`, or with
adaptive thinking at the budget's effort, its thinking summarized (these models omit it by
default, and the client asked to read it). An Anthropic client's own request goes as sent and
gets Anthropic's answer.
"""

from __future__ import annotations

import re

from proxy.dialects._json import dumps, loads_object
from proxy.dialects.anthropic._vocabulary import DIALECT
from proxy.domain.chat import ChatRequest

_DEPRECATED = re.compile(r"`?(temperature|top_p|top_k)`? is deprecated for this model")
_BUDGET_REFUSED = re.compile(r"thinking\.type\.enabled\W*is not supported")
# A model older than strict tools, a request past what Anthropic compiles strict tools into
# ("The compiled grammar is too large…", "…too many optional parameters…grammar compilation"),
# or a schema outside strict's subset (`tools.0.custom.input_schema: …`; without `strict`,
# Anthropic takes any JSON schema).
_STRICT_REFUSED = re.compile(r"strict tools|grammar|compil|input_schema", re.IGNORECASE)


def refused(message: str) -> bool:
    """Whether a backend's 400 says its model refuses a setting `without_refused` can leave out."""
    return any(pattern.search(message) is not None for pattern in (_DEPRECATED, _BUDGET_REFUSED, _STRICT_REFUSED))


# Of strict refusals, those about the model (older than strict tools) or its limits (how many
# strict tools it compiles), not about one request's schema.
_STRICT_MODEL = re.compile(r"strict tools|grammar|compil", re.IGNORECASE)


def remembered(refusal: str) -> frozenset[str]:
    """What `refusal` says of the model's later requests too, in words `without_refused` reads
    (a few, whatever the backend's words: its messages name tools and fields); a schema outside
    strict's subset is that request's alone, not another client's with a schema strict takes."""
    said = {f"`{match[1]}` is deprecated for this model" for match in _DEPRECATED.finditer(refusal)}
    if _BUDGET_REFUSED.search(refusal):
        said.add("thinking.type.enabled is not supported")
    if _STRICT_MODEL.search(refusal):
        said.add("strict tools")
    return frozenset(said)


def without_refused(request: ChatRequest, body: bytes, refusal: str) -> bytes | None:
    """`body` (the Anthropic request made of another dialect's `request`) again without what
    `refusal` says the model refuses; None when it is an Anthropic client's, or nothing changes."""
    if request.dialect == DIALECT:
        return None
    data = loads_object(body)
    changed = False
    for match in _DEPRECATED.finditer(refusal):
        changed = data.pop(match[1], None) is not None or changed
    thinking = data.get("thinking")
    if _BUDGET_REFUSED.search(refusal) and isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        config = data.get("output_config")
        # These models leave thinking out of the answer unless asked to summarize it; the
        # client asked for reasoning to read (`reasoning_effort`, `think`).
        data["thinking"] = {"type": "adaptive", "display": "summarized"}
        data["output_config"] = {**(config if isinstance(config, dict) else {}), "effort": _effort(budget)}
        changed = True
    if _STRICT_REFUSED.search(refusal) and isinstance(tools := data.get("tools"), list):
        for tool in tools:
            if isinstance(tool, dict):
                changed = tool.pop("strict", None) is not None or changed
    return dumps(data) if changed else None


def _effort(budget: object) -> str:
    """The effort of a thinking budget, as the gateway makes budgets of efforts (1024 low,
    2048 medium, more high)."""
    if not isinstance(budget, int) or budget <= 1024:
        return "low"
    return "medium" if budget <= 2048 else "high"
