"""Ollama replies: errors, whole completions, the closing statistics, timestamps.

Ollama's statistics are Go `omitempty` fields: a zero duration or count is left out, never
sent as 0, and clients treat a missing one as unknown. An Ollama backend's own figures are
relayed; for other backends the gateway fills them from its own clock and the backend's
usage (it never loads models, so `load_duration` is then absent).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from proxy.dialects._json import dumps
from proxy.dialects.ollama._common import (
    arguments_object,
    arguments_text,
    logprobs_list,
    logprobs_of,
)
from proxy.domain.chat import ChatCompletion, Choice, FinishReason, ToolCall, Usage
from proxy.domain.errors import GatewayError
from proxy.domain.events import ContinuedFinish, Finish, StreamEvent


@dataclass(slots=True, frozen=True)
class OllamaFinish(ContinuedFinish):
    """An Ollama backend's finish with what only Ollama clients use from its closing line:
    the `context` of an `/api/generate` reply (the conversation's tokens, which a client sends
    back to continue it; a keyed replay has it too) and the backend's own timing figures
    (`load_duration`, …, in nanoseconds, as sent: only live). Any renderer sees a `Finish`; the
    Ollama one relays these on the closing line."""

    timings: tuple[tuple[str, int], ...] = ()


def context_of(data: dict[str, Any]) -> tuple[int, ...] | None:
    """The `context` of a backend's closing line, if it sent one."""
    context = data.get("context")
    if isinstance(context, list) and context:
        return tuple(context)
    return None


_DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


def timings_of(data: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """The durations a backend's closing line reports (Ollama leaves zero ones out)."""
    return tuple(
        (name, value) for name in _DURATIONS
        if isinstance(value := data.get(name), int) and not isinstance(value, bool) and value > 0
    )


def closing_finish(reason: FinishReason, data: dict[str, Any]) -> Finish:
    """The finish of an Ollama backend's closing line `data`."""
    context = context_of(data) or ()
    timings = timings_of(data)
    return OllamaFinish(reason, 0, context, timings) if context or timings else Finish(reason)


def with_closing(events: list[StreamEvent], data: dict[str, Any]) -> list[StreamEvent]:
    """`events` whose first choice's `Finish` carries what the backend's closing line `data`
    holds for Ollama clients (see `OllamaFinish`)."""
    return [
        closing_finish(event.reason, data) if type(event) is Finish and event.choice == 0 else event
        for event in events
    ]


def backend_finish(events: list[StreamEvent]) -> ContinuedFinish | None:
    """The finish carrying an Ollama backend's context (and, live, its timings), if any."""
    return next((event for event in events if isinstance(event, ContinuedFinish)), None)


def timings_in(finish: ContinuedFinish | None) -> tuple[tuple[str, int], ...]:
    return finish.timings if isinstance(finish, OllamaFinish) else ()


def render_error(error: GatewayError) -> bytes:
    """Ollama's error body, before a stream and as its in-stream line alike."""
    return dumps({"error": error.message})


def error_message_from_body(body: bytes) -> str | None:
    """The message of an Ollama error body (`{"error": "..."}`), if that is what it is."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    return error_message(data.get("error"))


def error_message(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict):
        message = value.get("message")
        if isinstance(message, str) and message:
            return message
    return None


def done_reason(reason: FinishReason | None) -> str:
    """Ollama knows only stop and length; a turn that called tools ends with `stop`."""
    return "length" if reason is FinishReason.LENGTH else "stop"


def finish_reason(done_reason: Any, *, called_tools: bool) -> FinishReason:
    if done_reason == "length":
        return FinishReason.LENGTH
    return FinishReason.TOOL_CALLS if called_tools else FinishReason.STOP


def timestamp(seconds: float | None = None) -> str:
    """`created_at` as Ollama writes it (RFC 3339, UTC)."""
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_second: int = -1
_second_text = b""


def timestamp_bytes() -> bytes:
    """`timestamp()` for now, as bytes, cheaply: the date and time are formatted once a second."""
    global _second, _second_text
    now = time.time()
    second = int(now)
    if second != _second:
        _second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.").encode()
        _second = second
    return _second_text + b"%06dZ" % int((now - second) * 1_000_000)


_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$")


def parse_timestamp(value: Any) -> int:
    """Unix seconds of an Ollama timestamp (nanosecond fractions, any offset); 0 if unreadable."""
    if not isinstance(value, str):
        return 0
    match = _TIMESTAMP.match(value.strip())
    if match is None:
        return 0
    zone = match.group(3) or "Z"
    try:
        moment = datetime.fromisoformat(match.group(1) + ("+00:00" if zone == "Z" else zone))
    except ValueError:
        return 0
    return int(moment.timestamp())


def new_completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


@dataclass(slots=True, frozen=True)
class Timing:
    """Seconds on one monotonic clock: request received, first output, end."""

    started: float
    first: float | None
    ended: float


def statistics(
    usage: Usage | None, timing: Timing, *, eval_count: int = 0, backend: tuple[tuple[str, int], ...] = ()
) -> dict[str, Any]:
    """The closing line's statistics in Ollama's order, zero fields left out.

    `eval_count` is the fallback when the backend reported no usage (the output pieces seen).
    An Ollama backend's own durations (`backend`) are its figures, relayed as they are; the
    gateway's clock stands in for backends that report none."""
    if backend:
        return _backend_statistics(usage, dict(backend), eval_count)
    ns = 1_000_000_000
    total = max(1, int((timing.ended - timing.started) * ns))
    if timing.first is None:
        prompt_duration, eval_duration = 0, total
    else:
        prompt_duration = max(1, int((timing.first - timing.started) * ns))
        eval_duration = max(1, int((timing.ended - timing.first) * ns))
    stats: dict[str, Any] = {"total_duration": total}
    prompt_count = usage.prompt_tokens if usage is not None else 0
    completion_count = usage.completion_tokens if usage is not None else eval_count
    if prompt_count:
        stats["prompt_eval_count"] = prompt_count
    if prompt_duration:
        stats["prompt_eval_duration"] = prompt_duration
    if completion_count:
        stats["eval_count"] = completion_count
    stats["eval_duration"] = eval_duration
    return stats


_STATISTICS = (
    "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration",
)


def _backend_statistics(usage: Usage | None, durations: dict[str, int], eval_count: int) -> dict[str, Any]:
    counts = {
        "prompt_eval_count": usage.prompt_tokens if usage is not None else 0,
        "eval_count": usage.completion_tokens if usage is not None else eval_count,
    }
    figures = {**durations, **counts}
    return {name: figures[name] for name in _STATISTICS if figures.get(name)}


def whole_calls(calls: list[ToolCall], reason: FinishReason | None) -> list[ToolCall]:
    """The calls an Ollama client may get: a turn cut short (`length`) can end inside a call's
    arguments, and Ollama never sends a call whose arguments do not parse, so that one is
    dropped (a client would run it with half its arguments). Complete turns keep every call."""
    if reason is not FinishReason.LENGTH:
        return calls
    return [call for call in calls if _parses(call.arguments)]


def _parses(text: str) -> bool:
    if not text or text.isspace():
        return True  # no arguments at all, which Ollama sends as {}
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def tool_calls_body(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Tool calls as current Ollama sends them: whole, object arguments, with id and index."""
    return [
        {"id": call.id, "function": {"index": index, "name": call.name, "arguments": arguments_object(call.arguments)}}
        for index, call in enumerate(calls)
    ]


def render_completion(
    completion: ChatCompletion,
    *,
    model: str,
    generate: bool,
    timing: Timing,
    created_at: str | None = None,
    thinking: bool = True,
    context: tuple[int, ...] | None = None,
    backend_timings: tuple[tuple[str, int], ...] = (),
) -> bytes:
    """A non-streamed reply (`stream: false`) in Ollama's shape, from the first choice;
    without `thinking` (the client said `think: false`) the reasoning is left out. A generate
    reply carries the backend's `context` when it sent one; an Ollama backend's durations
    (`backend_timings`) replace the gateway's clock."""
    choice = completion.choices[0] if completion.choices else Choice()
    reasoning = choice.reasoning if thinking else ""
    body: dict[str, Any] = {"model": model, "created_at": created_at or timestamp()}
    reason = done_reason(choice.finish_reason)
    if generate:
        body["response"] = choice.content
        if reasoning:
            body["thinking"] = reasoning
        body["done"] = True
        body["done_reason"] = reason
        if context:
            body["context"] = list(context)
    else:
        message: dict[str, Any] = {"role": "assistant", "content": choice.content}
        if reasoning:
            message["thinking"] = reasoning
        calls = whole_calls(choice.tool_calls, choice.finish_reason)
        if calls:
            message["tool_calls"] = tool_calls_body(calls)
        body["message"] = message
        body["done_reason"] = reason
        body["done"] = True
    entries = logprobs_list(choice.logprobs)
    if entries is not None:
        body["logprobs"] = entries
    pieces = int(bool(choice.content)) + int(bool(choice.reasoning)) + len(choice.tool_calls)
    body.update(statistics(completion.usage, timing, eval_count=pieces, backend=backend_timings))
    return dumps(body)


def load_reply(model: str, *, generate: bool, unload: bool) -> bytes:
    """What Ollama answers a request without a prompt: the model is (un)loaded, nothing said."""
    body: dict[str, Any] = {"model": model, "created_at": timestamp()}
    reason = "unload" if unload else "load"
    if generate:
        body.update(response="", done=True, done_reason=reason)
    else:
        body.update(message={"role": "assistant", "content": ""}, done_reason=reason, done=True)
    return dumps(body)


def usage_of(data: dict[str, Any]) -> Usage | None:
    """Usage from a closing line's counts, if it has any."""
    prompt = data.get("prompt_eval_count")
    completion = data.get("eval_count")
    if not isinstance(prompt, int) and not isinstance(completion, int):
        return None
    return Usage(
        prompt_tokens=prompt if isinstance(prompt, int) else 0,
        completion_tokens=completion if isinstance(completion, int) else 0,
    )


def parse_completion(data: dict[str, Any]) -> ChatCompletion:
    """An Ollama backend's non-streamed reply (chat or generate) in domain form."""
    message = data.get("message")
    calls: list[ToolCall] = []
    if isinstance(message, dict):
        content = message.get("content")
        reasoning = message.get("thinking")
        seen: set[str] = set()
        for raw in message.get("tool_calls") or []:
            call = tool_call_of(raw, seen)
            if call is not None:
                calls.append(call)
    else:
        content = data.get("response")
        reasoning = data.get("thinking")
    choice = Choice(
        index=0,
        content=content if isinstance(content, str) else "",
        reasoning=reasoning if isinstance(reasoning, str) else "",
        tool_calls=calls,
        finish_reason=finish_reason(data.get("done_reason"), called_tools=bool(calls)),
        logprobs=logprobs_of(data),
    )
    model = data.get("model")
    return ChatCompletion(
        id=new_completion_id(),
        model=model if isinstance(model, str) else "",
        created=parse_timestamp(data.get("created_at")),
        choices=[choice],
        usage=usage_of(data),
    )


def tool_call_of(raw: Any, seen: set[str]) -> ToolCall | None:
    """One of Ollama's tool calls; ids are synthesized when absent, a repeated id is dropped."""
    if not isinstance(raw, dict):
        return None
    function = raw.get("function")
    if not isinstance(function, dict):
        return None
    call_id = raw.get("id")
    if isinstance(call_id, str) and call_id:
        if call_id in seen:
            return None
    else:
        call_id = "call_" + secrets.token_hex(12)
    seen.add(call_id)
    name = function.get("name")
    return ToolCall(id=call_id, name=name if isinstance(name, str) else "", arguments=arguments_text(function.get("arguments")))
