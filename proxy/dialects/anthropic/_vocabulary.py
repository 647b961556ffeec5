"""What the Anthropic dialect shares between its parts: stop reasons, usage, errors, ids,
and event refinements the domain does not model.

`StopReasonFinish`, `BlockStart` and `BlockDelta` subclass domain events (as the domain's
`SignedReasoningDelta` does), so every other consumer (OpenAI renderer, `CompletionBuilder`,
…) treats them as the plain event; only the Anthropic renderer reads the extra fields. They exist because Anthropic
clients need a thinking block's signature back to continue a tool-use turn, the backend's own
`stop_reason` (`pause_turn`: continue the server tool loop), and the blocks of server tools
and citations as the backend sent them. (Which stop sequence matched is the domain's
`StopSequenceFinish`: vLLM reports it too.)
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, ClassVar

from proxy.dialects._json import dumps
from proxy.domain.chat import FinishReason, Usage
from proxy.domain.errors import CONTEXT_LENGTH_EXCEEDED, ErrorKind, GatewayError
from proxy.domain.events import (
    Finish,
    ReasoningDelta,
    StopSequenceFinish,
    ToolCallStart,
    UsageReport,
)
from proxy.domain.events import (
    SignedReasoningDelta as SignedReasoningDelta,  # the domain's, named here still
)

DIALECT = "anthropic"
API_VERSION = "2023-06-01"


# Claude's `redacted_thinking` (its thinking encrypted whole) for a client that is not Anthropic's:
# an empty signed block whose "signature" is its data so marked, so it is carried (the journal, a
# Responses reasoning item's `encrypted_content`) and goes back to Claude as that block again.
REDACTED_THINKING = "redacted_thinking:"


def redacted_thinking(block: dict[str, Any]) -> SignedReasoningDelta | None:
    data = block.get("data")
    return SignedReasoningDelta("", 0, REDACTED_THINKING + data) if isinstance(data, str) and data else None


def redacted_block(event: ReasoningDelta) -> dict[str, Any] | None:
    """The `redacted_thinking` block `event` carries (see `REDACTED_THINKING`), if it is one."""
    if isinstance(event, SignedReasoningDelta) and not event.text and event.signature.startswith(REDACTED_THINKING):
        return {"type": "redacted_thinking", "data": event.signature.removeprefix(REDACTED_THINKING)}
    return None


@dataclass(slots=True, frozen=True)
class StopReasonFinish(Finish):
    """A finish whose Anthropic `stop_reason` its domain reason does not give back
    (`pause_turn` reads as a stop, `model_context_window_exceeded` as a length)."""

    stop_reason: str = ""

    replayable: ClassVar[bool] = False


@dataclass(slots=True, frozen=True)
class BlockStart(ReasoningDelta):
    """A content block as an Anthropic backend opened it, for an Anthropic client only.

    Blocks the domain does not model (`redacted_thinking`, server tool uses and their
    results, …) travel whole in `block`; a text block's start (carrying nothing but its
    boundary, its text follows as `TextDelta`s) keeps consecutive text blocks apart, so
    each keeps its own citations. Everyone else reads an empty reasoning piece: nothing.
    The parser emits these only when the client speaks Anthropic.
    """

    block: dict[str, Any] = field(default_factory=dict)

    @property
    def replayable(self) -> bool:  # type: ignore[override]
        # A plain text block's start marks only a boundary; anything else is lost on replay.
        return self.block.get("type") == "text" and not self.block.get("citations")


@dataclass(slots=True, frozen=True)
class WireToolCallStart(ToolCallStart):
    """A `tool_use` block's start with what an Anthropic backend said of it beyond its id,
    name and input (`caller`: a call made by code execution, which the client answers and
    gives back; `toolset_name`), for an Anthropic client only. Everyone else reads the call."""

    fields: dict[str, Any] = field(default_factory=dict)

    replayable: ClassVar[bool] = False


# A `tool_use` block's keys the domain carries; any other is the backend's to pass on.
TOOL_USE_MODELLED = frozenset({"type", "id", "name", "input"})


def tool_call_start(block: dict[str, Any], index: int, *, relay: bool) -> ToolCallStart:
    """The start of a backend's `tool_use` block as the `index`th call; `relay` (an Anthropic
    client) keeps what the domain does not (see `WireToolCallStart`)."""
    call_id = block.get("id")
    call_id = call_id if isinstance(call_id, str) and call_id else new_tool_use_id()
    name = str(block.get("name") or "")
    fields = {k: v for k, v in block.items() if k not in TOOL_USE_MODELLED and v is not None} if relay else None
    return WireToolCallStart(index, call_id, name, 0, fields) if fields else ToolCallStart(index, call_id, name)


@dataclass(slots=True, frozen=True)
class BlockDelta(ReasoningDelta):
    """A delta the domain does not model, for the block open last: a server tool use's
    `input_json_delta`, or (`on_text`) a text block's `citations_delta`."""

    delta: dict[str, Any] = field(default_factory=dict)
    on_text: bool = False

    replayable: ClassVar[bool] = False


# -- stop reasons (peers-and-protocols §4.4) -----------------------------------------------

_FROM_WIRE: dict[str, FinishReason] = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "pause_turn": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
}
# Known reasons the domain maps onto a coarser one; Anthropic clients get them back as said.
# (Unknown ones stay `end_turn`: an older client could not tell what they mean.)
_KEPT_AS_SAID = frozenset({"pause_turn", "model_context_window_exceeded"})
_TO_WIRE: dict[FinishReason, str] = {
    FinishReason.STOP: "end_turn",
    FinishReason.LENGTH: "max_tokens",
    FinishReason.TOOL_CALLS: "tool_use",
    FinishReason.CONTENT_FILTER: "refusal",
}


def finish_from_wire(stop_reason: str, stop_sequence: Any = None) -> Finish:
    """The domain finish for an Anthropic `stop_reason` (unknown ones read as a stop)."""
    if stop_reason == "stop_sequence" and isinstance(stop_sequence, str):
        return StopSequenceFinish(FinishReason.STOP, 0, stop_sequence)
    reason = _FROM_WIRE.get(stop_reason, FinishReason.STOP)
    if stop_reason in _KEPT_AS_SAID:
        return StopReasonFinish(reason, 0, stop_reason)
    return Finish(reason)


def stop_reason_to_wire(finish: Finish | None) -> tuple[str, str | None]:
    """`(stop_reason, stop_sequence)` for a domain finish; no finish reads as `end_turn`."""
    if isinstance(finish, StopSequenceFinish):
        return "stop_sequence", finish.stop_sequence
    if isinstance(finish, StopReasonFinish):
        return finish.stop_reason, None
    if finish is None:
        return "end_turn", None
    return _TO_WIRE[finish.reason], None


# -- usage ----------------------------------------------------------------------------------
# Anthropic counts cache reads and writes apart from `input_tokens`; the domain (OpenAI)
# counts them inside `prompt_tokens`, with `cached_tokens` the part read from cache and
# `cache_write_tokens` the part written to it.


def usage_to_wire(usage: Usage | None, unmodelled: dict[str, Any] | None = None) -> dict[str, Any]:
    """Anthropic's `usage`; `unmodelled` (a `WireUsageReport`'s) adds what the domain lacks."""
    if usage is None:
        return {"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0}
    cached = usage.cached_tokens or 0
    written = usage.cache_write_tokens or 0
    out: dict[str, Any] = {
        "input_tokens": max(0, usage.prompt_tokens - cached - written),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": cached,
        "output_tokens": usage.completion_tokens,
    }
    if usage.reasoning_tokens is not None:
        out["output_tokens_details"] = {"thinking_tokens": usage.reasoning_tokens}
    if unmodelled:
        out.update(unmodelled)
    return out


@dataclass(slots=True, frozen=True)
class WireUsageReport(UsageReport):
    """Usage with what an Anthropic backend counts beyond the domain (`server_tool_use`,
    `service_tier`, the cache-write breakdown, …), for Anthropic clients only; and the
    message's own fields the domain has no place for (`container`, `context_management`)."""

    unmodelled: dict[str, Any] = field(default_factory=dict)
    message: dict[str, Any] = field(default_factory=dict)


# A message's fields the gateway renders itself; any other is the backend's to pass on.
MESSAGE_MODELLED = frozenset(
    {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"}
)
# Of those others, the ones a stream carries inside `message_delta.delta` (a code execution's
# `container`, a refusal's `stop_details`); the rest ride on `message_start`'s message when
# the backend said them there (`diagnostics`), else on the `message_delta` event itself
# (`context_management`): where the SDK's stream accumulator reads each.
MESSAGE_DELTA_FIELDS = frozenset({"container", "stop_details"})


_USAGE_MODELLED = frozenset(
    {"input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens", "output_tokens_details"}
)


@dataclass(slots=True)
class WireUsage:
    """Anthropic's counters as they arrive; `message_delta` overwrites what it carries."""

    input_tokens: int = 0
    cache_read: int | None = None
    cache_creation: int = 0
    output_tokens: int = 0
    thinking_tokens: int | None = None
    unmodelled: dict[str, Any] = field(default_factory=dict)
    message: dict[str, Any] = field(default_factory=dict)  # see `WireUsageReport.message`

    def take_message_fields(self, data: dict[str, Any]) -> None:
        for key, item in data.items():
            if key not in MESSAGE_MODELLED and item is not None:
                self.message[key] = item

    def update(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        for key, item in data.items():
            if key not in _USAGE_MODELLED and item is not None:
                self.unmodelled[key] = item
        value = data.get("input_tokens")
        if isinstance(value, int):
            self.input_tokens = value
        value = data.get("cache_read_input_tokens")
        if isinstance(value, int):
            self.cache_read = value
        value = data.get("cache_creation_input_tokens")
        if isinstance(value, int):
            self.cache_creation = value
        value = data.get("output_tokens")
        if isinstance(value, int):
            self.output_tokens = value
        details = data.get("output_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("thinking_tokens"), int):
            self.thinking_tokens = details["thinking_tokens"]

    def domain(self) -> Usage:
        return Usage(
            prompt_tokens=self.input_tokens + (self.cache_read or 0) + self.cache_creation,
            completion_tokens=self.output_tokens,
            cached_tokens=self.cache_read,
            reasoning_tokens=self.thinking_tokens,
            cache_write_tokens=self.cache_creation or None,
        )

    def report(self, *, relay: bool) -> UsageReport:
        """The usage event; `relay` (an Anthropic client) keeps the unmodelled counters."""
        if relay and (self.unmodelled or self.message):
            return WireUsageReport(self.domain(), dict(self.unmodelled), dict(self.message))
        return UsageReport(self.domain())


# -- errors ---------------------------------------------------------------------------------
# Statuses stay the gateway's own (a 503 is a 503: load balancers and the SDK's
# ServiceUnavailableError/GatewayTimeoutError classes read it correctly, and the SDK retries
# all 5xx); the error `type` tells Anthropic clients what kind of failure it is.

_ERROR_TYPES: dict[ErrorKind, str] = {
    ErrorKind.INVALID_REQUEST: "invalid_request_error",
    ErrorKind.AUTHENTICATION: "authentication_error",
    ErrorKind.PERMISSION: "permission_error",
    ErrorKind.NOT_FOUND: "not_found_error",
    ErrorKind.METHOD_NOT_ALLOWED: "invalid_request_error",
    ErrorKind.REQUEST_TIMEOUT: "invalid_request_error",
    ErrorKind.CONFLICT: "invalid_request_error",
    ErrorKind.REQUEST_TOO_LARGE: "request_too_large",
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: "invalid_request_error",
    ErrorKind.RATE_LIMITED: "rate_limit_error",
    ErrorKind.INTERNAL: "api_error",
    ErrorKind.BACKEND: "api_error",
    ErrorKind.UNAVAILABLE: "overloaded_error",
    ErrorKind.TIMEOUT: "timeout_error",
}
_KINDS_OF_TYPES: dict[str, ErrorKind] = {
    "invalid_request_error": ErrorKind.INVALID_REQUEST,
    "not_found_error": ErrorKind.NOT_FOUND,
    "request_too_large": ErrorKind.REQUEST_TOO_LARGE,
    "rate_limit_error": ErrorKind.RATE_LIMITED,
    "overloaded_error": ErrorKind.UNAVAILABLE,
    "timeout_error": ErrorKind.TIMEOUT,
}


def error_body(error: GatewayError, request_id: str | None = None) -> dict[str, Any]:
    """Anthropic's error shape; `request_id` (the response's `request-id`) as Anthropic
    writes it, so a client that logs the body alone can still name the request."""
    message = error.message
    if error.code == CONTEXT_LENGTH_EXCEEDED and not message.lower().startswith(_TOO_LONG):
        # Anthropic's words, which clients act on (Claude Code compacts the conversation).
        message = f"{_TOO_LONG}: {message}"
    body: dict[str, Any] = {"type": "error", "error": {"type": _ERROR_TYPES.get(error.kind, "api_error"), "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


_TOO_LONG = "prompt is too long"


def render_error(error: GatewayError, request_id: str | None = None) -> bytes:
    return dumps(error_body(error, request_id))


def error_frame(error: GatewayError, request_id: str | None = None) -> bytes:
    """The in-stream `error` event; the SDK raises it as an `APIStatusError`."""
    return b"event: error\ndata: " + render_error(error, request_id) + b"\n\n"


def error_from_wire(data: Any, fallback: str = "The backend reported an error.") -> GatewayError:
    """A backend's Anthropic error object (from a body or an `error` event) as a gateway error.

    Only a backend's transient or size conditions keep their meaning; anything else it
    reports mid-stream is a backend failure (502), not the client's fault.
    """
    error = data.get("error") if isinstance(data, dict) else None
    kind_name = error.get("type") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    kind = _KINDS_OF_TYPES.get(kind_name or "", ErrorKind.BACKEND)
    if kind in (ErrorKind.INVALID_REQUEST, ErrorKind.NOT_FOUND):
        kind = ErrorKind.BACKEND
    text = message if isinstance(message, str) and message else fallback
    return GatewayError(kind, text, code=kind_name if isinstance(kind_name, str) else None)


def error_message_from_body(body: bytes) -> str | None:
    """The message of an error body in Anthropic's shape (or a close cousin's)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    message = data.get("message") or data.get("detail")
    return message if isinstance(message, str) else None


# -- ids ------------------------------------------------------------------------------------


def message_id(domain_id: str) -> str:
    """Anthropic message ids start with `msg_`; other backends' ids keep their text after it."""
    if domain_id.startswith("msg_"):
        return domain_id
    return "msg_" + (domain_id or secrets.token_hex(12))


def new_tool_use_id() -> str:
    return "toolu_" + secrets.token_hex(12)
