"""Ollama NDJSON streams, sans-IO.

`StreamParser` reads an Ollama backend's `/api/chat` or `/api/generate` lines and yields domain
events. `StreamRenderer` turns domain events from any backend into the lines an Ollama client
expects; tool calls are held back until they are complete, because Ollama clients get each call
whole, with its arguments as an object.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from proxy.dialects._json import dumps
from proxy.dialects._utf8 import SplitText, loads_escaped, replace_invalid
from proxy.dialects.ollama._common import json_string, logprobs_list, logprobs_of
from proxy.dialects.ollama._response import (
    Timing,
    closing_finish,
    done_reason,
    error_message,
    finish_reason,
    new_completion_id,
    parse_timestamp,
    statistics,
    timestamp_bytes,
    timings_in,
    tool_call_of,
    tool_calls_body,
    usage_of,
    whole_calls,
)
from proxy.dialects.sse import MAX_FRAME_BYTES, frame_too_large
from proxy.domain.chat import FinishReason, ToolCall, Usage
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import (
    ContinuedFinish,
    Finish,
    ReasoningDelta,
    StreamEvent,
    StreamFailed,
    StreamStart,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
)


class NdjsonDecoder:
    """Splits a byte stream into lines; a partial line waits for the next `feed`, kept as
    its parts (joined once, when its end comes: see `SSEDecoder`)."""

    __slots__ = ("_parts", "_pending")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pending = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        end = chunk.rfind(b"\n")
        if end < 0:
            if chunk:
                self._pending += len(chunk)
                if self._pending > MAX_FRAME_BYTES:
                    self._parts, self._pending = [], 0
                    raise frame_too_large()
                self._parts.append(chunk)
            return []
        lines = chunk[:end]
        if self._parts:
            lines = b"".join(self._parts) + lines
        rest = chunk[end + 1 :]
        self._parts, self._pending = ([rest], len(rest)) if rest else ([], 0)
        return [line for line in lines.split(b"\n") if line and not line.isspace()]

    def close(self) -> list[bytes]:
        """The last line, if the peer did not end it with a newline."""
        line = b"".join(self._parts)
        self._parts, self._pending = [], 0
        return [line] if line.strip() else []


_PIECES = (TextDelta, ReasoningDelta)
# Where a line carries text a character of which may come split in two (`/api/chat` in
# `message`, `/api/generate` at the top).
_TEXT_FIELDS = ("content", "thinking", "response")


def _malformed() -> GatewayError:
    return GatewayError(ErrorKind.BACKEND, "The backend sent a malformed stream line.")


@dataclass(slots=True)
class ParsedOutput:
    """What one `feed` produced. `raw` is always None: only OpenAI streams are relayed as bytes."""

    events: list[StreamEvent]
    done: bool = False
    raw: bytes | None = None


class StreamParser:
    """An Ollama backend's stream as domain events.

    Ollama sends no ids and no usable tool-call indexes: the stream gets a generated id, each
    tool call a `call_…` id (unless the backend sent one) and an index counting from 0 in order
    of appearance, and `done_reason: "stop"` after tool calls becomes `tool_calls`.
    """

    def __init__(self, *, logprobs: bool = False) -> None:
        """`logprobs`: they were asked for, so lines carrying text are looked at for them."""
        self._decoder = NdjsonDecoder()
        self._logprobs = logprobs
        self._started = False
        self._tool_count = 0
        self._tool_ids: set[str] = set()
        # Characters a backend split across lines (bytes that are not UTF-8): made at the
        # first such bytes, dropped once none is held, so a valid stream tests only `is None`.
        self._split: SplitText | None = None
        self.usage: Usage | None = None
        self.done = False
        self.failed = False

    def feed(self, data: bytes) -> ParsedOutput:
        events: list[StreamEvent] = []
        if not self.done:
            for line in self._decoder.feed(data):
                self._line(line, events)
                if self.done:
                    break
        return ParsedOutput(events, self.done)

    def close(self) -> ParsedOutput:
        """The backend's body ended; a stream without its `done` line has failed."""
        events: list[StreamEvent] = []
        if not self.done:
            for line in self._decoder.close():
                try:
                    loads_escaped(line)
                except ValueError:
                    break  # cut off mid-line: reported as the early end it is
                self._line(line, events)
        if not self.done:
            self._fail(GatewayError(ErrorKind.BACKEND, "The backend closed the stream before it finished."), events)
        return ParsedOutput(events, True)

    def _fail(self, error: GatewayError, events: list[StreamEvent]) -> None:
        events.append(StreamFailed(error))
        self.failed = True
        self.done = True

    def _line(self, line: bytes, events: list[StreamEvent]) -> None:
        mended = False
        try:
            data = json.loads(line)
        except UnicodeDecodeError:
            # Bytes that are not UTF-8: mended, at this cost only when they come.
            try:
                data = loads_escaped(line)
                mended = True
            except ValueError:
                data = None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self._fail(_malformed(), events)
            return
        if mended or self._split is not None:
            data = self._mend(data)
        if "error" in data:
            text = error_message(data["error"]) or "The backend reported an error."
            self._fail(GatewayError(ErrorKind.BACKEND, text), events)
            return
        if not self._started:
            self._started = True
            model = data.get("model")
            events.append(
                StreamStart(
                    id=new_completion_id(),
                    model=model if isinstance(model, str) else "",
                    created=parse_timestamp(data.get("created_at")),
                )
            )
        message = data.get("message")
        chat = isinstance(message, dict)
        holder: dict[str, Any] = message if isinstance(message, dict) else data
        thinking = holder.get("thinking")
        if thinking and isinstance(thinking, str):
            events.append(ReasoningDelta(thinking))
        content = holder.get("content" if chat else "response")
        if content and isinstance(content, str):
            events.append(TextDelta(content, 0, logprobs_of(data)) if self._logprobs else TextDelta(content))
        calls = holder.get("tool_calls") if chat else None
        if calls and isinstance(calls, list):
            for raw in calls:
                call = tool_call_of(raw, self._tool_ids)
                if call is not None:
                    index = self._tool_count
                    self._tool_count += 1
                    events.append(ToolCallStart(index, call.id, call.name))
                    events.append(ToolCallDelta(index, call.arguments))
        if data.get("done") is True:
            self.usage = usage_of(data)
            if self.usage is not None:
                events.append(UsageReport(self.usage))
            reason = finish_reason(data.get("done_reason"), called_tools=self._tool_count > 0)
            events.append(closing_finish(reason, data))
            self.done = True

    def _mend(self, data: dict[str, Any]) -> dict[str, Any]:
        """`data` (parsed by `loads_escaped`, or a line after one) with its text joined to the
        bytes the last line left unfinished (U+FFFD on the `done` line), and U+FFFD for any
        other invalid byte."""
        split = self._split = self._split or SplitText()
        message = data.get("message")
        holder: dict[str, Any] = message if isinstance(message, dict) else data
        final = data.get("done") is True
        for name in _TEXT_FIELDS:
            text = holder.get(name)
            joined = split.join((0, name), text if isinstance(text, str) else None, final=final)
            if joined is not None:
                holder[name] = joined
        if not split:
            self._split = None
        mended: dict[str, Any] = replace_invalid(data)
        return mended


class StreamRenderer:
    """Domain events as an Ollama `/api/chat` (or, with `generate`, `/api/generate`) stream.

    `model` is the name the client asked for, echoed on every line as Ollama does. `started`
    is when the request arrived, on `clock`; the closing line's durations are measured from it.
    Without `thinking` (the client said `think: false`) reasoning is dropped. Only choice 0
    is rendered (an Ollama request cannot ask for more).
    """

    keepalive: ClassVar[bytes] = b""  # NDJSON has no line a client would skip

    def __init__(
        self,
        *,
        model: str,
        generate: bool = False,
        started: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
        thinking: bool = True,
    ) -> None:
        self._generate = generate
        # Reasoning not wanted is simply not a piece: it falls through the event dispatch.
        self._pieces_rendered: tuple[type[TextDelta | ReasoningDelta], ...] = _PIECES if thinking else (TextDelta,)
        self._clock = clock
        self._started = clock() if started is None else started
        self._first: float | None = None
        self._prefix = b'{"model":' + json_string(model) + b',"created_at":"'
        if generate:
            self._text_open = b'","response":'
            self._thinking_open = b'","response":"","thinking":'
            self._close = b',"done":false}\n'
        else:
            self._text_open = b'","message":{"role":"assistant","content":'
            self._thinking_open = b'","message":{"role":"assistant","content":"","thinking":'
            self._close = b'},"done":false}\n'
        self._calls: dict[int, list[str]] = {}
        self._call_heads: dict[int, tuple[str, str]] = {}
        self._usage: Usage | None = None
        self._reason: FinishReason | None = None
        self._context: tuple[int, ...] | None = None
        self._backend_timings: tuple[tuple[str, int], ...] = ()
        self._pieces = 0
        self.done = False

    def render(self, events: list[StreamEvent]) -> bytes:
        out: list[bytes] = []
        stamp = b""
        for event in events:
            if self.done:
                break
            if isinstance(event, self._pieces_rendered):
                if event.choice or not event.text:
                    continue
                if not stamp:
                    stamp = timestamp_bytes()
                if self._first is None:
                    self._first = self._clock()
                self._pieces += 1
                if isinstance(event, TextDelta):
                    head = self._text_open
                    close = self._close if event.logprobs is None else self._close_with(event.logprobs)
                else:
                    head, close = self._thinking_open, self._close
                out.append(self._prefix + stamp + head + json_string(event.text) + close)
            elif isinstance(event, ToolCallStart):
                if event.choice == 0:
                    self._call_heads[event.index] = (event.id, event.name)
                    self._calls.setdefault(event.index, [])
                    if self._first is None:
                        self._first = self._clock()
            elif isinstance(event, ToolCallDelta):
                if event.choice == 0:
                    self._calls.setdefault(event.index, []).append(event.arguments)
            elif isinstance(event, UsageReport):
                self._usage = event.usage
            elif isinstance(event, Finish):
                if event.choice == 0 and self._reason is None:
                    self._reason = event.reason
                    if isinstance(event, ContinuedFinish):
                        self._context = event.context
                        self._backend_timings = timings_in(event)
                    out.append(self._flush_calls())
            elif isinstance(event, StreamFailed):
                # Calls not yet finished are cut short: sent whole, a client would run one
                # with truncated arguments. Ollama only ever sends finished calls.
                self._calls.clear()
                self._call_heads.clear()
                out.append(dumps({"error": event.error.message}) + b"\n")
                self.done = True
        return b"".join(out)

    def _close_with(self, logprobs: dict[str, Any]) -> bytes:
        """A text line's end carrying its log probabilities (Ollama's list, at the top level)."""
        entries = logprobs_list(logprobs)
        if entries is None:
            return self._close
        end = b'},"logprobs":' if not self._generate else b',"logprobs":'
        return end + dumps(entries) + b',"done":false}\n'

    def close(self) -> bytes:
        """The closing `done: true` line (unless the stream already ended with an error)."""
        if self.done:
            return b""
        self.done = True
        calls = self._flush_calls()
        timing = Timing(self._started, self._first, self._clock())
        stats = statistics(self._usage, timing, eval_count=self._pieces, backend=self._backend_timings)
        reason = done_reason(self._reason)
        head = self._prefix + timestamp_bytes()
        if self._generate:
            body = b'","response":"","done":true,"done_reason":"' + reason.encode() + b'",'
            if self._context:
                body += b'"context":' + dumps(list(self._context)) + b","
        else:
            body = b'","message":{"role":"assistant","content":""},"done_reason":"' + reason.encode() + b'","done":true,'
        return calls + head + body + dumps(stats)[1:] + b"\n"

    def _flush_calls(self) -> bytes:
        """All tool calls seen so far, whole, on one line (as Ollama sends them)."""
        if not self._calls or self._generate:
            self._calls.clear()
            return b""
        calls = []
        for index in sorted(self._calls):
            call_id, name = self._call_heads.get(index, ("", ""))
            calls.append(ToolCall(id=call_id, name=name, arguments="".join(self._calls[index])))
        self._calls.clear()
        self._call_heads.clear()
        calls = whole_calls(calls, self._reason)
        if not calls:
            return b""
        self._pieces += len(calls)
        return (
            self._prefix
            + timestamp_bytes()
            + b'","message":{"role":"assistant","content":"","tool_calls":'
            + dumps(tool_calls_body(calls))
            + b'},"done":false}\n'
        )
