"""OpenAI chat streams, sans-IO.

`StreamRelay` reads an OpenAI-compatible backend's SSE bytes and yields both the domain
events and the bytes an OpenAI client should receive — the backend's own frames, untouched
whenever they already conform, repaired only where they do not (the seed's StreamRaw).
`StreamRenderer` turns domain events from any source into OpenAI SSE.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

from proxy.dialects._json import dumps
from proxy.dialects._utf8 import SplitText, loads_escaped, replace_invalid
from proxy.dialects.openai._response import (
    FAILED_FINISH_REASONS,
    LEGACY_FUNCTION_CALL,
    error_body,
    error_message_from_body,
    finish_event,
    finish_reason_from_wire,
    parse_usage,
    reasoning_fields,
    render_usage,
    stop_string,
)
from proxy.dialects.sse import SSEDecoder, encode_event
from proxy.domain.chat import FinishReason, Usage
from proxy.domain.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    ErrorKind,
    GatewayError,
    is_context_overflow,
)
from proxy.domain.events import (
    AnnotationsDelta,
    AudioDelta,
    EstimatedUsageReport,
    Finish,
    FunctionCallDelta,
    ReasoningDelta,
    RefusalDelta,
    StreamEvent,
    StreamFailed,
    StreamStart,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
    audio_delta,
)
from proxy.domain.tokens import estimate_tokens

DONE = b"data: [DONE]\n\n"
# An SSE comment: every SSE client skips it; proxies in between see the stream is alive.
KEEPALIVE = b": keep-alive\n\n"
# Enough of a body that is not a stream to read an error object's message from.
_HEAD_LIMIT = 65536
# Where a backend's stream carries text a character of which may come split in two.
_TEXT_FIELDS = ("content", "reasoning_content", "reasoning")


def error_frame(error: GatewayError) -> bytes:
    """The in-stream error event the OpenAI SDK raises as `APIError`."""
    return encode_event(dumps(error_body(error)))


def stream_error(data: bytes) -> GatewayError:
    """The failure an error event reports (llama.cpp's `{"code": 400, "message": ...,
    "type": ...}`, vLLM's and SGLang's the same under `error`): a refusal of the request (its
    prompt past the context size) keeps its meaning, so a client told nothing yet gets a 400
    (`context_length_exceeded`)."""
    message = error_message_from_body(data) or data.decode("utf-8", "replace")[:500] or "The backend reported an error."
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        body = None
    error = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("code") == 400:
        if is_context_overflow(message):
            return GatewayError(ErrorKind.INVALID_REQUEST, message, code=CONTEXT_LENGTH_EXCEEDED, param="messages")
        return GatewayError(ErrorKind.INVALID_REQUEST, message)
    return GatewayError(ErrorKind.BACKEND, message)


def new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(slots=True)
class RelayOutput:
    """What one `feed` produced: bytes for an OpenAI client, events for everyone else."""

    raw: bytes
    events: list[StreamEvent]
    done: bool = False


@dataclass(slots=True)
class _ToolIndexes:
    """Maps a backend's tool-call ids/indexes onto 0..n-1 per choice, in order of appearance."""

    by_id: dict[str, int] = field(default_factory=dict)
    by_upstream: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    count: int = 0


class StreamRelay:
    """Relays an OpenAI-compatible SSE stream to an OpenAI client, observing it on the way.

    `include_usage` is what the *client* asked for: the backend may have been asked for usage
    regardless (for accounting), so its usage chunk is forwarded only when the client wants it.
    `chunk_usage`: the client also asked for usage on every chunk (vLLM's
    `continuous_usage_stats`), so usage riding on content chunks stays there.
    `prompt_tokens`: the gateway's estimate of the prompt (made only if needed), for the usage
    a backend that sends none is taken to have reported (an `EstimatedUsageReport`; its
    completion tokens are estimated from what it said), and the usage chunk a client asked for.
    """

    def __init__(
        self, *, include_usage: bool | None, chunk_usage: bool = False, prompt_tokens: Callable[[], int] | None = None
    ) -> None:
        self._include_usage = bool(include_usage)
        self._chunk_usage = self._include_usage and chunk_usage
        self._prompt_tokens = prompt_tokens
        self._generated = 0  # characters of text, reasoning and tool arguments
        self._decoder = SSEDecoder()
        self._start: StreamStart | None = None
        self._role_sent = False
        self._finished: set[int] = set()
        self._tools: dict[int, _ToolIndexes] = {}
        self._usage: Usage | None = None
        self._usage_forwarded = False
        # Characters a backend split across events (llama.cpp): made at the first bytes that
        # are not UTF-8, dropped once none is held, so a valid stream tests only `is None`.
        self._split: SplitText | None = None
        # The body until its first event: a backend answering a stream request with plain
        # JSON (an error object, mostly) sends no event at all, and that JSON says why.
        self._head: bytearray | None = bytearray()
        self.done = False
        self.failed = False

    @property
    def usage(self) -> Usage | None:
        return self._usage

    @property
    def finished(self) -> bool:
        return bool(self._finished)

    def feed(self, data: bytes) -> RelayOutput:
        out: list[bytes] = []
        events: list[StreamEvent] = []
        if self._head is not None and len(self._head) < _HEAD_LIMIT:
            self._head += data[: _HEAD_LIMIT - len(self._head)]
        if not self.done:
            for frame in self._decoder.feed(data):
                if frame.is_comment or not frame.data:
                    continue
                if frame.event == "error":
                    self._fail(stream_error(frame.data), out, events)
                    break
                self._frame(frame.data, frame.raw, out, events)
                if self.done:
                    break
        return RelayOutput(b"".join(out), events, self.done)

    def close(self) -> RelayOutput:
        """The backend's body ended; finish the client's stream correctly either way."""
        out: list[bytes] = []
        events: list[StreamEvent] = []
        if not self.done:
            for frame in self._decoder.close():
                if frame.data and not self.done:
                    if frame.event == "error":
                        self._fail(stream_error(frame.data), out, events)
                    else:
                        self._frame(frame.data, frame.raw, out, events)
        if not self.done:
            if self._finished:
                self._end(out, events)
            else:
                self._fail(GatewayError(ErrorKind.BACKEND, self._unfinished_reason()), out, events)
        return RelayOutput(b"".join(out), events, True)

    def _unfinished_reason(self) -> str:
        head = bytes(self._head or b"").lstrip()
        if self._head is None or not head.startswith(b"{"):
            return "The backend closed the stream before it finished."
        message = error_message_from_body(head)
        if message:
            return message
        return "The backend answered with JSON, not a stream."

    # -- one frame ------------------------------------------------------------------------

    def _frame(self, data: bytes, raw: bytes, out: list[bytes], events: list[StreamEvent]) -> None:
        self._head = None
        if data == b"[DONE]":
            self._end(out, events)
            return
        mended = False
        try:
            chunk = json.loads(data)
        except ValueError as error:
            # Bytes that are not UTF-8: mended, at this cost only when they come.
            chunk = None
            if isinstance(error, UnicodeDecodeError):
                try:
                    chunk = loads_escaped(data)
                    mended = True
                except ValueError:
                    pass
        if not isinstance(chunk, dict):
            self._fail(GatewayError(ErrorKind.BACKEND, "The backend sent a malformed stream event."), out, events)
            return
        if chunk.get("error") or chunk.get("object") == "error":
            # vLLM's and SGLang's error event (`{"error": {...}}`; older vLLM's the error
            # object alone, which read as a chunk of nothing before `[DONE]`).
            self._fail(stream_error(data), out, events)
            return
        rewrite = False
        if mended or self._split is not None:
            chunk = self._mend(chunk)
            rewrite = True

        start = self._start
        if start is None:
            start = self._start = StreamStart(
                id=str(chunk.get("id") or "chatcmpl-" + secrets.token_hex(12)),
                model=str(chunk.get("model") or ""),
                created=int(chunk.get("created") or 0),
                system_fingerprint=fingerprint if isinstance(fingerprint := chunk.get("system_fingerprint"), str) else None,
            )
            events.append(start)
            rewrite = rewrite or "id" not in chunk or "created" not in chunk
        elif chunk.get("id") != start.id or chunk.get("created") != start.created:
            rewrite = True
        if rewrite:
            chunk["id"], chunk["created"] = start.id, start.created
            chunk.setdefault("object", "chat.completion.chunk")
            chunk.setdefault("model", start.model)

        usage_value = chunk.get("usage")
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            choices = []
        if usage_value:
            if not choices:
                self._finish_open(out, events)  # the usage chunk follows the finish
            usage = parse_usage(usage_value)
            if usage is not None:
                self._usage = usage
                events.append(UsageReport(usage))
            if not choices:
                # The usage chunk proper: only for clients that asked for it (one that counts
                # nothing gives way to the estimate at the end).
                if usage is not None and self._include_usage and not self._usage_forwarded:
                    self._usage_forwarded = True
                    out.append(raw if not rewrite else encode_event(dumps(chunk)))
                return
            if not self._chunk_usage or usage is None:
                # Usage riding on a content chunk: move it to its own chunk at the end.
                chunk["usage"] = None
                rewrite = True
        elif not choices:
            return

        if not self._role_sent:
            self._role_sent = True
            first = choices[0] if isinstance(choices[0], dict) else {}
            delta = first.get("delta") if isinstance(first.get("delta"), dict) else {}
            if not delta or "role" not in delta:
                out.append(self._role_chunk(start))

        for choice in choices:
            if isinstance(choice, dict) and self._choice(choice, events):
                rewrite = True
        if self.failed:
            out.append(error_frame(self._error_of(events)))
            self.done = True
            return
        if self._include_usage and "usage" not in chunk:
            if rewrite:
                chunk["usage"] = None
            else:
                raw = raw[:-3] + b',"usage":null}\n\n' if raw.endswith(b"}\n\n") else raw
        out.append(encode_event(dumps(chunk)) if rewrite else raw)

    def _mend(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """`chunk` (parsed by `loads_escaped`, or the next after one) with its text pieces
        joined to the bytes the last one left unfinished, and U+FFFD for any other invalid
        byte."""
        split = self._split = self._split or SplitText()
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice["delta"] = {}
            final = choice.get("finish_reason") is not None
            for name in _TEXT_FIELDS:
                text = delta.get(name)
                joined = split.join((index if isinstance(index, int) else 0, name),
                                    text if isinstance(text, str) else None, final=final)
                if joined is not None:
                    delta[name] = joined
        if not split:
            self._split = None
        return cast(dict[str, Any], replace_invalid(chunk))

    def _choice(self, choice: dict[str, Any], events: list[StreamEvent]) -> bool:
        """Emit one choice's events; True when the frame needs re-encoding."""
        rewrite = False
        index = choice.get("index", 0)
        if not isinstance(index, int):
            index = 0
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                self._generated += len(reasoning)
                events.append(ReasoningDelta(reasoning, index))
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._generated += len(content)
                logprobs = choice.get("logprobs")
                events.append(TextDelta(content, index, logprobs if isinstance(logprobs, dict) else None))
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                self._generated += len(refusal)
                events.append(RefusalDelta(refusal, index))
            annotations = delta.get("annotations")
            if isinstance(annotations, list) and annotations:
                events.append(AnnotationsDelta(tuple(a for a in annotations if isinstance(a, dict)), index))
            legacy = delta.get("function_call")
            if isinstance(legacy, dict):
                name, arguments = legacy.get("name"), legacy.get("arguments")
                arguments = arguments if isinstance(arguments, str) else ""
                self._generated += len(arguments)
                events.append(FunctionCallDelta(name if isinstance(name, str) else "", arguments, index))
            audio = delta.get("audio")
            if isinstance(audio, dict):
                spoken = audio_delta(audio, index)
                self._generated += len(spoken.transcript)
                events.append(spoken)
            calls = delta.get("tool_calls")
            if isinstance(calls, dict):
                # TGI 2.x streams each fragment as one object, not a list of them.
                calls = delta["tool_calls"] = [calls]
                rewrite = True
            if isinstance(calls, list):
                for position, call in enumerate(calls):
                    if isinstance(call, dict) and self._tool_call(call, position, index, events):
                        rewrite = True
        reason = choice.get("finish_reason")
        if reason == "":
            # LocalAI's Go structs say `""` on every chunk for "not finished yet".
            choice["finish_reason"] = None
            return True
        if isinstance(reason, str):
            if reason in FAILED_FINISH_REASONS:
                self.failed = True
                events.append(
                    StreamFailed(GatewayError(ErrorKind.BACKEND, f"The backend ended the stream with `{reason}`."))
                )
                return True
            if index not in self._finished:
                self._finished.add(index)
                mapped = finish_reason_from_wire(reason)
                if mapped is FinishReason.STOP and self._tools.get(index) and self._tools[index].count:
                    mapped = FinishReason.TOOL_CALLS
                events.append(finish_event(mapped, index, stop_string(choice)))
                if reason != mapped.value and reason != LEGACY_FUNCTION_CALL:
                    choice["finish_reason"] = mapped.value
                    rewrite = True
        return rewrite

    def _tool_call(self, call: dict[str, Any], position: int, choice: int, events: list[StreamEvent]) -> bool:
        tools = self._tools.setdefault(choice, _ToolIndexes())
        upstream_index = call.get("index")
        if not isinstance(upstream_index, int):
            upstream_index = position
        call_id = call.get("id")
        raw_function = call.get("function")
        function: dict[str, Any] = raw_function if isinstance(raw_function, dict) else {}
        rewrite = False
        ours: int | None = None
        if isinstance(call_id, str) and call_id:
            ours = tools.by_id.get(call_id)
        elif upstream_index in tools.by_upstream:
            ours = tools.by_upstream[upstream_index]
        if ours is None:
            ours = tools.count
            tools.count += 1
            if not isinstance(call_id, str) or not call_id:
                call_id = new_tool_call_id()
                call["id"] = call_id
                call["type"] = "function"
                rewrite = True
            tools.by_id[call_id] = ours
            name = function.get("name")
            tools.names[ours] = name if isinstance(name, str) else ""
            events.append(ToolCallStart(ours, call_id, tools.names[ours], choice))
        elif self._continuation(call, function, tools, ours):
            rewrite = True
        tools.by_upstream[upstream_index] = ours
        if ours != call.get("index"):
            call["index"] = ours
            rewrite = True
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, str):
            # Arguments as a JSON object (TGI, llama.cpp builds): OpenAI's are its text.
            arguments = function["arguments"] = dumps(arguments).decode()
            rewrite = True
        if isinstance(arguments, str) and arguments:
            self._generated += len(arguments)
            events.append(ToolCallDelta(ours, arguments, choice))
        return rewrite

    @staticmethod
    def _continuation(call: dict[str, Any], function: dict[str, Any], tools: _ToolIndexes, ours: int) -> bool:
        """Strip what a fragment continuing a known call repeats; True when the frame must change.

        Some servers (Fireworks, DeepSeek, Qwen) repeat `id`, `type` and `function.name` on every
        fragment, and OpenAI clients concatenate string fields across fragments (`call_acall_a`).
        A name that differs from the one known is a genuine next piece of it and stays.
        """
        call_id = call.pop("id", None)
        call.pop("type", None)
        repeated = isinstance(call_id, str) and bool(call_id)
        name = function.get("name")
        if isinstance(name, str) and name:
            known = tools.names.get(ours, "")
            if name == known:
                del function["name"]
                repeated = True
            else:
                tools.names[ours] = known + name
        elif "name" in function:
            del function["name"]
        return repeated

    # -- endings --------------------------------------------------------------------------

    def _end(self, out: list[bytes], events: list[StreamEvent]) -> None:
        self._finish_open(out, events)
        if self._usage is None and self._start is not None and self._generated:
            # A backend that reports no usage: every client is told the gateway's estimate,
            # the one its accounting charges.
            prompt = self._prompt_tokens() if self._prompt_tokens is not None else 0
            self._usage = Usage(prompt, estimate_tokens(self._generated))
            events.append(EstimatedUsageReport(self._usage))
        if self._include_usage and not self._usage_forwarded and self._start:
            usage = self._usage or Usage(self._prompt_tokens() if self._prompt_tokens is not None else 0, 0)
            self._usage_forwarded = True
            out.append(_usage_chunk(self._start, usage))
        out.append(DONE)
        self.done = True

    def _finish_open(self, out: list[bytes], events: list[StreamEvent]) -> None:
        """Choice 0's finish, for a server that ends its stream with none given (`null` to
        the last): OpenAI's streams always end their choice, and a client's final answer
        would have no `finish_reason`."""
        if not self._finished and self._role_sent and self._start is not None:
            tools = self._tools.get(0)
            reason = FinishReason.TOOL_CALLS if tools is not None and tools.count else FinishReason.STOP
            self._finished.add(0)
            events.append(Finish(reason, 0))
            chunk = _chunk_head(self._start)
            chunk["choices"] = [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason.value}]
            if self._include_usage:
                chunk["usage"] = None
            out.append(encode_event(dumps(chunk)))

    def _fail(self, error: GatewayError, out: list[bytes], events: list[StreamEvent]) -> None:
        events.append(StreamFailed(error))
        out.append(error_frame(error))
        self.failed = True
        self.done = True

    @staticmethod
    def _error_of(events: list[StreamEvent]) -> GatewayError:
        for event in reversed(events):
            if isinstance(event, StreamFailed):
                return event.error
        return GatewayError(ErrorKind.BACKEND, "The backend stream failed.")

    def _role_chunk(self, start: StreamStart) -> bytes:
        chunk: dict[str, Any] = _chunk_head(start)
        chunk["choices"] = [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ]
        if self._include_usage:
            chunk["usage"] = None
        return encode_event(dumps(chunk))


def _chunk_head(start: StreamStart) -> dict[str, Any]:
    head = {"id": start.id, "object": "chat.completion.chunk", "created": start.created, "model": start.model}
    if start.system_fingerprint is not None:
        head["system_fingerprint"] = start.system_fingerprint
    return head


def _usage_chunk(start: StreamStart, usage: Usage) -> bytes:
    chunk = _chunk_head(start)
    chunk["choices"] = []
    chunk["usage"] = render_usage(usage)
    return encode_event(dumps(chunk))


class StreamRenderer:
    """Renders domain events as an OpenAI chat stream (for non-OpenAI backends and replays)."""

    keepalive: ClassVar[bytes] = KEEPALIVE

    def __init__(self, *, include_usage: bool | None, single_tool: bool = False) -> None:
        """`single_tool`: the client set `parallel_tool_calls: false`, so each choice's calls
        after its first are left out (Ollama has no such option; servers may ignore it)."""
        self._include_usage = bool(include_usage)
        self._single_tool = single_tool
        self._start: StreamStart | None = None
        self._prefix = b""
        self._suffix = b"}\n\n"
        self._usage: Usage | None = None
        self._tool_calls: set[tuple[int, int]] = set()
        # Choices past the first that had their role chunk (the first has it with the start).
        self._roles: set[int] = set()
        # Choices that made a legacy function call, which end `function_call`, as OpenAI's do.
        self._legacy_calls: set[int] = set()
        self.done = False

    def render(self, events: list[StreamEvent]) -> bytes:
        out: list[bytes] = []
        for event in events:
            if self.done:
                break
            self._event(event, out)
        return b"".join(out)

    def close(self) -> bytes:
        """End the stream: the usage chunk if the client asked for it, then `[DONE]`."""
        if self.done:
            return b""
        self.done = True
        out = []
        if self._include_usage and self._usage is not None and self._start is not None:
            out.append(_usage_chunk(self._start, self._usage))
        out.append(DONE)
        return b"".join(out)

    def _event(self, event: StreamEvent, out: list[bytes]) -> None:
        match event:
            case TextDelta(text, choice, logprobs):
                out.append(self._delta(choice, {"content": text}, logprobs=logprobs))
            case ReasoningDelta(text, choice) if text:  # Claude's redacted thinking has none to show
                out.append(self._delta(choice, reasoning_fields(text)))
            case RefusalDelta(text, choice):
                out.append(self._delta(choice, {"refusal": text}))
            case AnnotationsDelta(annotations, choice):
                out.append(self._delta(choice, {"annotations": list(annotations)}))
            case FunctionCallDelta(name, arguments, choice):
                piece = {"arguments": arguments} if choice in self._legacy_calls else {"name": name, "arguments": arguments}
                self._legacy_calls.add(choice)
                out.append(self._delta(choice, {"function_call": piece}))
            case AudioDelta(audio_id, data, transcript, expires_at, choice):
                spoken: dict[str, Any] = {"id": audio_id, "data": data, "transcript": transcript}
                out.append(self._delta(choice, {"audio": spoken if expires_at is None else spoken | {"expires_at": expires_at}}))
            case ToolCallStart(index, call_id, name, choice):
                if self._single_tool and (choice, index) not in self._tool_calls and any(
                    seen == choice for seen, _ in self._tool_calls
                ):
                    return  # its fragments find it unstarted, and are left out too
                self._tool_calls.add((choice, index))
                call = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
                out.append(self._delta(choice, {"tool_calls": [call]}))
            case ToolCallDelta(index, arguments, choice):
                if self._single_tool and (choice, index) not in self._tool_calls:
                    return
                out.append(self._delta(choice, {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}))
            case Finish(reason, choice):
                legacy = reason is FinishReason.TOOL_CALLS and choice in self._legacy_calls
                out.append(self._delta(choice, {}, LEGACY_FUNCTION_CALL if legacy else reason.value))
            case UsageReport(usage):
                self._usage = usage
            case StreamStart():
                self._begin(event)
                out.append(self._delta(0, {"role": "assistant", "content": ""}))
            case StreamFailed(error):
                out.append(error_frame(error))
                self.done = True

    def _begin(self, start: StreamStart) -> None:
        self._start = start
        head = dumps(_chunk_head(start))
        self._prefix = b"data: " + head[:-1] + b',"choices":[{"index":'
        self._suffix = b',"usage":null}\n\n' if self._include_usage else b"}\n\n"

    def _delta(
        self, choice: int, delta: dict[str, Any], finish: str | None = None, *, logprobs: dict[str, Any] | None = None
    ) -> bytes:
        if self._start is None:
            self._begin(StreamStart(id="chatcmpl-" + secrets.token_hex(12), model="", created=0))
        reason = b"null" if finish is None else b'"' + finish.encode() + b'"'
        role = b""
        if choice and choice not in self._roles:  # n > 1: each choice opens with its role, as a backend's do
            self._roles.add(choice)
            role = self._delta(choice, {"role": "assistant", "content": ""})
        return (
            role
            + self._prefix
            + str(choice).encode()
            + b',"delta":'
            + dumps(delta)
            + b',"logprobs":'
            + (b"null" if logprobs is None else dumps(logprobs))
            + b',"finish_reason":'
            + reason
            + b"}]"
            + self._suffix
        )
