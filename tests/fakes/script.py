"""How a fake backend behaves for one request, shared by every dialect.

A test writes a ``Script`` (what to say, how fast, how to fail); each dialect turns the
script plus the request into a ``Plan`` (the exact pieces and counts) and renders it in its
own wire format. The field names use OpenAI terms; the Anthropic and Ollama fakes map them
(``finish_reason="length"`` becomes ``max_tokens`` / ``done_reason: "length"``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Literal

__all__ = [
    "DEFAULT_TOKENS",
    "FailMode",
    "Plan",
    "Script",
    "ToolCall",
    "Usage",
    "embed_text",
    "estimate_tokens",
    "flatten_text",
    "last_user_text",
    "make_plan",
    "split_fragments",
]

DEFAULT_TOKENS: tuple[str, ...] = ("Hello", " from", " the", " fake", " backend", ".")

FailMode = Literal["error", "close", "reset"]
"""``error``: an in-band error frame, then the body ends cleanly; ``close``: the connection is
closed mid-body (FIN); ``reset``: the same with a TCP RST."""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call the model makes; ``arguments`` is JSON text."""

    name: str
    arguments: str = "{}"
    id: str | None = None

    @classmethod
    def of(cls, spec: ToolCall | tuple[str, str | Mapping[str, Any]]) -> ToolCall:
        if isinstance(spec, ToolCall):
            return spec
        name, arguments = spec
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, separators=(",", ":"))
        return cls(name=name, arguments=arguments)

    def arguments_object(self) -> Any:
        return json.loads(self.arguments) if self.arguments.strip() else {}


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


ToolCallSpec = ToolCall | tuple[str, str | Mapping[str, Any]]


@dataclass(frozen=True)
class Script:
    """Scripted behaviour for one request. Every field has a harmless default.

    Frame counts (``fail_after``, ``stall_after``) count protocol messages written: SSE
    ``data:`` chunks (OpenAI, role chunk included), SSE events (Anthropic, pings excluded)
    or NDJSON lines (Ollama). Keep-alive comments and pings never count.
    """

    # What the model says.
    tokens: Sequence[str] | None = None
    """Content pieces, one per chunk. Default: ``n_tokens`` generated words, or DEFAULT_TOKENS."""
    n_tokens: int | None = None
    echo: bool = False
    """Reply with the last user message, word by word (overrides ``tokens``)."""
    reasoning: Sequence[str] = ()
    """Reasoning pieces sent before the content (``reasoning_content`` / ``thinking``)."""
    tool_calls: Sequence[ToolCallSpec] = ()
    """Calls made after the content: ``ToolCall`` or ``(name, arguments)`` pairs."""
    tool_arg_fragment: int = 8
    """Characters of arguments JSON per streamed fragment."""
    interleave_tool_calls: bool = False
    """Stream fragments of parallel calls round-robin instead of one call after another."""
    finish_reason: str | None = None
    """Override the finish reason (OpenAI terms). Default: stop / length / tool_calls."""
    stop_sequence: str | None = None
    """Anthropic: end with ``stop_reason: "stop_sequence"`` and this sequence. OpenAI: end with
    vLLM's ``stop_reason``: this sequence."""
    usage: Usage | None = None
    """Override token counts. Default: estimated from the prompt and the pieces sent."""

    # Timing.
    pace: float = 0.0
    """Seconds between socket writes of the body (non-stream: the total it would take)."""
    header_delay: float = 0.0
    """Seconds before the response head (time to first byte)."""

    # Failures.
    status: int | None = None
    """Fail before any body with this HTTP status and the dialect's error JSON."""
    error_body: Any = None
    """Exact error JSON to send with ``status`` instead of the dialect's default."""
    error_message: str | None = None
    retry_after: float | None = None
    fail_after: int | None = None
    """Stream this many frames, then fail as ``fail_mode`` says."""
    fail_mode: FailMode = "error"
    fail_body: Any = None
    """Exact in-band error object for ``fail_mode="error"``."""
    stall_before_headers: bool = False
    stall_after: int | None = None
    """Stream this many frames, then go silent until the client leaves."""
    keepalive_interval: float | None = None
    """While stalled mid-stream, send a keep-alive (SSE comment / Anthropic ping) this often."""

    # Wire-shape variations.
    keepalive_comments: bool = False
    """OpenAI: a ``: ping`` comment before every chunk; Anthropic: a ``ping`` event."""
    no_role_chunk: bool = False
    """OpenAI: leave out the opening role-only chunk."""
    finish_on_last_token: bool = False
    """OpenAI: put finish_reason on the last content chunk (vLLM) instead of an empty delta."""
    frames_per_write: int = 1
    """Frames coalesced into one socket write."""
    system_fingerprint: str | None = None
    headers: Sequence[tuple[str, str]] = ()
    """Extra response headers."""
    model_name: str | None = None
    """Model name reported in responses (default: the requested model)."""
    omit_usage: bool = False
    """Rerank: answer without ``usage`` (servers differ)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Script:
        """Build a script from JSON-ish data (the CLI and the admin endpoint use this)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown script fields: {sorted(unknown)}")
        kwargs = dict(data)
        if "usage" in kwargs and isinstance(kwargs["usage"], Mapping):
            kwargs["usage"] = Usage(**kwargs["usage"])
        if "tool_calls" in kwargs:
            kwargs["tool_calls"] = [_tool_call_from_json(t) for t in kwargs["tool_calls"]]
        if "headers" in kwargs and isinstance(kwargs["headers"], Mapping):
            kwargs["headers"] = list(kwargs["headers"].items())
        return cls(**kwargs)


def _tool_call_from_json(spec: Any) -> ToolCall:
    if isinstance(spec, Mapping):
        return ToolCall.of((spec["name"], spec.get("arguments", "{}")))
    name, arguments = spec
    return ToolCall.of((str(name), arguments))


@dataclass(slots=True)
class Plan:
    """What one response will contain, already resolved from script and request."""

    model: str
    content: list[str]
    reasoning: list[str]
    tool_calls: list[ToolCall]
    finish_reason: str
    truncated: bool
    usage: Usage
    tool_arg_fragment: int = 8

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    @property
    def piece_count(self) -> int:
        """Pieces a stream would send; a non-stream reply takes ``pace`` per piece."""
        fragments = sum(
            len(split_fragments(t.arguments, self.tool_arg_fragment)) for t in self.tool_calls
        )
        return len(self.reasoning) + len(self.content) + fragments


def make_plan(
    script: Script,
    *,
    model: str,
    prompt_text: str,
    last_user_text: str,
    max_tokens: int | None,
    tool_id_prefix: str = "call_",
) -> Plan:
    content = _content_pieces(script, last_user_text)
    truncated = False
    if max_tokens is not None and max_tokens >= 0 and len(content) > max_tokens:
        content = content[:max_tokens]
        truncated = True
    tool_calls = (
        [] if truncated else [_with_id(ToolCall.of(t), tool_id_prefix) for t in script.tool_calls]
    )
    if script.finish_reason is not None:
        finish = script.finish_reason
    elif truncated:
        finish = "length"
    elif tool_calls:
        finish = "tool_calls"
    else:
        finish = "stop"
    reasoning = list(script.reasoning)
    if script.usage is not None:
        usage = script.usage
    else:
        completion = (
            len(content)
            + len(reasoning)
            + sum(estimate_tokens(t.name + t.arguments) for t in tool_calls)
        )
        usage = Usage(
            prompt_tokens=estimate_tokens(prompt_text),
            completion_tokens=completion,
            reasoning_tokens=len(reasoning),
        )
    return Plan(
        model=script.model_name or model,
        content=content,
        reasoning=reasoning,
        tool_calls=tool_calls,
        finish_reason=finish,
        truncated=truncated,
        usage=usage,
        tool_arg_fragment=script.tool_arg_fragment,
    )


def _content_pieces(script: Script, last_user_text: str) -> list[str]:
    if script.echo:
        words = re.findall(r"\s*\S+", last_user_text)
        return words or [""]
    if script.tokens is not None:
        return list(script.tokens)
    if script.n_tokens is not None:
        return [f"w{i} " for i in range(script.n_tokens)]
    return list(DEFAULT_TOKENS)


def _with_id(call: ToolCall, prefix: str) -> ToolCall:
    if call.id is not None:
        return call
    return ToolCall(name=call.name, arguments=call.arguments, id=prefix + secrets.token_hex(12))


def split_fragments(text: str, size: int) -> list[str]:
    """Split ``text`` into pieces of ``size`` characters (at least one piece)."""
    size = max(1, size)
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def estimate_tokens(text: str) -> int:
    """A stable stand-in for a tokenizer: about four characters per token."""
    return max(1, (len(text) + 3) // 4)


def flatten_text(value: Any) -> str:
    """All the text in a message structure (strings, content parts, tool results)."""
    parts: list[str] = []
    _collect_text(value, parts)
    return "\n".join(parts)


def _collect_text(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, Mapping):
        for key in ("content", "text", "thinking", "input", "arguments", "prompt", "system"):
            if key in value:
                _collect_text(value[key], out)
    elif isinstance(value, Iterable) and not isinstance(value, bytes | bytearray):
        for item in value:
            _collect_text(item, out)


def last_user_text(messages: Any) -> str:
    """The text of the last ``user`` message, or empty."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return flatten_text(message.get("content"))
    return ""


@lru_cache(maxsize=8192)
def _word_vector(word: str, dim: int) -> tuple[float, ...]:
    seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    rng = random.Random(seed)
    return tuple(rng.gauss(0.0, 1.0) for _ in range(dim))


def embed_text(text: str, dim: int) -> list[float]:
    """A deterministic unit vector; texts sharing words point in similar directions."""
    words = re.findall(r"\w+", text.lower()) or [text]
    total = [0.0] * dim
    for word in words:
        for i, x in enumerate(_word_vector(word, dim)):
            total[i] += x
    norm = math.sqrt(sum(x * x for x in total)) or 1.0
    return [x / norm for x in total]


def token_logprob(token: str, position: int, top: int) -> dict[str, Any]:
    """A content piece's log probability as vLLM's chat API and Ollama give it (the same entry:
    `token`, `logprob`, `bytes`, `top_logprobs`), deterministic: the piece at `position` has
    -0.1 per position, and `top` alternatives, the piece itself first, then `alt1`… each 1 lower."""
    logprob = -round(0.1 * (position + 1), 4)
    top = min(top, 20)  # vLLM's and Ollama's bound: a fuzzed huge count must not exhaust memory
    alternatives = [(token, logprob)] + [(f"alt{k}", logprob - k) for k in range(1, top)]
    return {
        "token": token, "logprob": logprob, "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives[:top]],
    }


def logprobs_asked(body: Mapping[str, Any]) -> int | None:
    """A chat body's `logprobs: true` as how many alternatives per token (`top_logprobs`, 0
    by default); None: not asked."""
    if body.get("logprobs") is not True:
        return None
    top = body.get("top_logprobs")
    return top if isinstance(top, int) and top > 0 else 0
