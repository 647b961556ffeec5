"""Anthropic Messages streams, sans-IO.

`StreamRenderer` turns domain events (from any backend) into the SSE an Anthropic client
expects; `StreamParser` reads an Anthropic backend's SSE into domain events.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from proxy.dialects._json import dumps
from proxy.dialects._json_prefix import JsonObjectPrefix
from proxy.dialects._utf8 import SplitText, loads_escaped, replace_invalid
from proxy.dialects.anthropic._request import input_object
from proxy.dialects.anthropic._vocabulary import (
    MESSAGE_DELTA_FIELDS,
    BlockDelta,
    BlockStart,
    SignedReasoningDelta,
    WireToolCallStart,
    WireUsage,
    WireUsageReport,
    error_frame,
    error_from_wire,
    finish_from_wire,
    message_id,
    new_tool_use_id,
    redacted_block,
    redacted_thinking,
    stop_reason_to_wire,
    tool_call_start,
    usage_to_wire,
)
from proxy.dialects.sse import SSEDecoder
from proxy.domain.chat import Usage
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import (
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

PING = b'event: ping\ndata: {"type":"ping"}\n\n'
_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_TEXT = b',"delta":{"type":"text_delta","text":'
_THINKING = b',"delta":{"type":"thinking_delta","thinking":'
_SIGNATURE = b',"delta":{"type":"signature_delta","signature":'
_JSON = b',"delta":{"type":"input_json_delta","partial_json":'
_DELTA_TAIL = b"}}\n\n"
_MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_INPUT_COUNTS = frozenset({"input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"})
# Decoding str skips json.loads's per-call encoding detection (a third of its cost here).
_decode = json.JSONDecoder().decode
# A delta's text field, a character of which may come split in two, and its delta's type.
_TEXT_FIELDS = (("text", "text_delta"), ("thinking", "thinking_delta"), ("partial_json", "input_json_delta"))


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dumps(payload) + b"\n\n"


def _json_complete(parts: list[str]) -> bool:
    text = "".join(parts)
    if not text.strip():
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@dataclass(slots=True)
class _PendingTool:
    start: ToolCallStart
    arguments: list[str] = field(default_factory=list)


class StreamRenderer:
    """Renders domain events as an Anthropic Messages stream.

    Anthropic content blocks are strictly sequential — one closes before the next opens —
    while OpenAI backends may interleave parallel tool calls' argument fragments. A tool
    call that starts while another is still open is therefore held back (its fragments
    kept, never dropped) until the open call's arguments form complete JSON or a non-tool
    event arrives, and then streamed as its own block. Only choice 0 is rendered: an
    Anthropic message has one.
    """

    # Said while the backend is alive but has nothing new (its own pings, a server tool running).
    keepalive: ClassVar[bytes] = PING

    def __init__(
        self, *, model: str = "", as_asked: bool = False, single_tool: bool = False, request_id: str | None = None,
        prompt_tokens: Callable[[], int] | None = None,
    ) -> None:
        """`model` names the message when the backend does not; with `as_asked`, whatever it
        says (the client asked by an alias, and is answered in its name). `single_tool`: the
        client set `disable_parallel_tool_use`, so calls after the first are left out (a
        backend of another kind may make them anyway). `prompt_tokens`: the gateway's estimate
        of the input, made only for a backend that counts it at the end (vLLM, Ollama)."""
        self._model = model
        self._prompt_tokens = prompt_tokens
        self._start_estimated = False
        self._request_id = request_id  # what an `error` event names, as an error body does
        self._single_tool = single_tool
        self._as_asked = as_asked and bool(model)
        self._start: StreamStart | None = None
        self._announced = False
        self._announced_usage: dict[str, Any] | None = None
        self._start_output_final = False
        self._usage: Usage | None = None
        self._unmodelled_usage: dict[str, Any] | None = None
        self._message_fields: dict[str, Any] = {}
        self._announced_fields: dict[str, Any] = {}
        self._finish: Finish | None = None
        self._next_index = 0
        # "text", "thinking", "signed" (closed to more thinking), "tool", "relayed" (a BlockStart's)
        self._open: str | None = None
        self._open_index = -1
        self._open_tool = -1
        self._open_arguments: list[str] = []
        self._tool_json = JsonObjectPrefix()
        self._tools_seen: set[int] = set()
        self._pending: dict[int, _PendingTool] = {}
        self._index_bytes = b"0"
        self.done = False

    def render(self, events: list[StreamEvent]) -> bytes:
        out: list[bytes] = []
        for position, event in enumerate(events):
            if self.done:
                break
            if isinstance(event, StreamStart):
                self._start = event
                # Usage that arrives with the start (Anthropic backends, replays) belongs in
                # message_start; look ahead in this batch for it.
                for offset, later in enumerate(events[position + 1 :]):
                    if isinstance(later, UsageReport):
                        self._take_usage(later)
                        # Past the answer's content it is the final count (a replay, a short
                        # answer read at once): message_start says its input but no output yet,
                        # since clients that add message_delta's output to it (LangChain) would
                        # count the answer twice.
                        self._start_output_final = offset > 0
                        break
                continue
            if isinstance(event, UsageReport):
                self._take_usage(event)
                continue
            if isinstance(event, StreamFailed) and not self._announced:
                # Nothing was said yet: the error alone is the clearest answer.
                out.append(error_frame(event.error, self._request_id))
                self.done = True
                break
            if not self._announced:
                if getattr(event, "choice", 0) != 0:
                    continue
                self._announce(out)
            self._event(event, out)
        if self._start is not None and not self._announced and not self.done:
            self._announce(out)
        return b"".join(out)

    def close(self) -> bytes:
        """End the stream: close open blocks, then `message_delta` and `message_stop`."""
        if self.done:
            return b""
        out: list[bytes] = []
        if not self._announced:
            self._announce(out)
        self._close_block(out)
        self._flush_pending(out)
        stop_reason, stop_sequence = stop_reason_to_wire(self._finish)
        if stop_reason == "tool_use" and not self._tools_seen:
            stop_reason = "end_turn"  # a backend's `tool_calls` without a call: clients look for one
        usage = usage_to_wire(self._usage, self._unmodelled_usage)
        fields = self._message_fields
        delta: dict[str, Any] = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        delta.update((k, v) for k, v in fields.items() if k in MESSAGE_DELTA_FIELDS)
        delta_usage: dict[str, Any] = {"output_tokens": usage.pop("output_tokens")}
        said = self._announced_fields
        announced = self._announced_usage or {}
        if self._start_estimated and self._usage is None:
            usage = {}  # no count came: message_start's estimate stands
        # The input counts are cumulative, as Anthropic's own `message_delta` says them: its SDK and
        # the AI SDK replace message_start's (an estimate from vLLM and Ollama) with them, and
        # LangChain's ChatAnthropic reads a stream's usage from this event alone. Other counts come
        # only when message_start could not know them yet (the SDK merges them in).
        for key, value in usage.items():
            if key in _INPUT_COUNTS or value != announced.get(key) or key == "output_tokens_details":
                delta_usage[key] = value
        out.append(
            _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": delta,
                    "usage": delta_usage,
                    **{k: v for k, v in fields.items() if k not in MESSAGE_DELTA_FIELDS and said.get(k) != v},
                },
            )
        )
        out.append(_MESSAGE_STOP)
        self.done = True
        return b"".join(out)

    # -- events ---------------------------------------------------------------------------

    def _take_usage(self, report: UsageReport) -> None:
        self._usage = report.usage
        if isinstance(report, WireUsageReport):
            self._unmodelled_usage = report.unmodelled
            self._message_fields = report.message

    def _announce(self, out: list[bytes]) -> None:
        self._announced = True
        start = self._start
        usage = usage_to_wire(self._usage, self._unmodelled_usage)
        usage.pop("output_tokens_details", None)
        if self._start_output_final:
            usage["output_tokens"] = 0
        if self._usage is None and self._prompt_tokens is not None:
            # Anthropic's message_start holds the input's count, which LangChain reads there
            # only; a backend that counts at the end gets the estimate said until then.
            usage["input_tokens"] = self._prompt_tokens()
            self._start_estimated = True
        self._announced_usage = usage
        message: dict[str, Any] = {
            "id": message_id(start.id if start else ""),
            "type": "message",
            "role": "assistant",
            "model": self._model if self._as_asked else (start.model if start else "") or self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        # What the backend's `message_start` said of the message beyond these (`diagnostics`).
        self._announced_fields = {k: v for k, v in self._message_fields.items() if k not in MESSAGE_DELTA_FIELDS}
        message.update(self._announced_fields)
        out.append(_event("message_start", {"type": "message_start", "message": message}))
        out.append(PING)

    def _event(self, event: StreamEvent, out: list[bytes]) -> None:
        match event:
            case TextDelta(text, choice):
                if text and choice == 0:
                    self._ensure_block("text", out)
                    out.append(self._delta(_TEXT, text))
            case BlockStart(_, choice, block):
                if choice == 0:
                    self._close_block(out)
                    self._flush_pending(out)
                    self._open_block("text" if block.get("type") == "text" else "relayed", block, out)
            case BlockDelta(_, choice, delta, on_text):
                if choice == 0:
                    self._relayed_delta(delta, on_text, out)
            case ReasoningDelta(text, choice):
                if choice == 0:
                    self._reasoning(event, out)
            case ToolCallStart(index, _, _, choice):
                if choice == 0 and index not in self._tools_seen:
                    if self._single_tool and self._tools_seen:
                        return  # its fragments find no block of theirs, and are left out too
                    self._tools_seen.add(index)
                    self._tool_start(event, out)
            case ToolCallDelta(index, arguments, choice):
                if arguments and choice == 0:
                    self._tool_delta(index, arguments, out)
            case Finish(_, choice):
                if choice == 0 and self._finish is None:
                    self._finish = event
                    self._close_block(out)
                    self._flush_pending(out)
            case StreamFailed(error):
                out.append(error_frame(error, self._request_id))
                self.done = True

    def _reasoning(self, event: ReasoningDelta, out: list[bytes]) -> None:
        if (redacted := redacted_block(event)) is not None:
            self._close_block(out)
            self._flush_pending(out)
            self._open_block("relayed", redacted, out)  # Claude's block as it sent it
            return
        signature = event.signature if isinstance(event, SignedReasoningDelta) else ""
        if not event.text and not signature:
            return
        self._ensure_block("thinking", out)
        if event.text:
            out.append(self._delta(_THINKING, event.text))
        if signature:
            out.append(self._delta(_SIGNATURE, signature))
            # A signature seals its block; more reasoning starts a new one.
            self._open = "signed"

    def _relayed_delta(self, delta: dict[str, Any], on_text: bool, out: list[bytes]) -> None:
        if on_text:
            self._ensure_block("text", out)
        elif self._open != "relayed":
            return  # its block is closed: nowhere to put it
        out.append(
            _event("content_block_delta", {"type": "content_block_delta", "index": self._open_index, "delta": delta})
        )

    def _tool_start(self, start: ToolCallStart, out: list[bytes]) -> None:
        if self._open == "tool" and (self._pending or not _json_complete(self._open_arguments)):
            self._pending[start.index] = _PendingTool(start)
            return
        self._close_block(out)
        self._open_tool_block(start, out)

    def _tool_delta(self, index: int, arguments: str, out: list[bytes]) -> None:
        if self._open == "tool" and index == self._open_tool:
            self._json_delta(arguments, out)
            self._open_arguments.append(arguments)
            if self._pending and _json_complete(self._open_arguments):
                self._promote_pending(out)
        elif index in self._pending:
            self._pending[index].arguments.append(arguments)
        # Fragments of a call whose block is closed cannot be placed any more; a producer
        # that keeps the event invariants never sends them.

    def _promote_pending(self, out: list[bytes]) -> None:
        """The open call is complete: stream held-back calls until one is still incomplete."""
        while self._pending:
            self._close_block(out)
            index = next(iter(self._pending))
            held = self._pending.pop(index)
            self._open_tool_block(held.start, out)
            for fragment in held.arguments:
                self._json_delta(fragment, out)
            self._open_arguments.extend(held.arguments)
            if not _json_complete(self._open_arguments):
                return

    def _flush_pending(self, out: list[bytes]) -> None:
        while self._pending:
            self._close_block(out)
            index = next(iter(self._pending))
            held = self._pending.pop(index)
            self._open_tool_block(held.start, out)
            for fragment in held.arguments:
                self._json_delta(fragment, out)
        self._close_block(out)

    # -- blocks ---------------------------------------------------------------------------

    def _ensure_block(self, kind: str, out: list[bytes]) -> None:
        if self._open == kind:
            return
        self._close_block(out)
        self._flush_pending(out)
        block: dict[str, Any] = (
            {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "", "signature": ""}
        )
        self._open_block(kind, block, out)

    def _open_tool_block(self, start: ToolCallStart, out: list[bytes]) -> None:
        block = {"type": "tool_use", "id": start.id or new_tool_use_id(), "name": start.name, "input": {}}
        if isinstance(start, WireToolCallStart):
            block.update(start.fields)
        self._open_block("tool", block, out)
        self._open_tool = start.index
        self._open_arguments = []
        self._tool_json = JsonObjectPrefix()

    def _json_delta(self, fragment: str, out: list[bytes]) -> None:
        """The open tool block's input so far, as long as it is the start of a JSON object:
        Anthropic's SDKs parse it after every delta, and anything else fails the whole
        response there (a model's malformed arguments, from a backend of another kind).
        What follows the first wrong character is left out; the block's end closes the rest."""
        checker = self._tool_json
        taken = checker.feed(fragment)
        if taken == len(fragment):
            out.append(self._delta(_JSON, fragment))
        elif taken:
            out.append(self._delta(_JSON, fragment[:taken]))

    def _open_block(self, kind: str, block: dict[str, Any], out: list[bytes]) -> None:
        index = self._next_index
        self._next_index += 1
        self._open, self._open_index = kind, index
        self._index_bytes = str(index).encode()
        out.append(
            _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
        )

    def _close_block(self, out: list[bytes]) -> None:
        if self._open is None:
            return
        if self._open == "tool" and self._tool_json.broken:
            # Still a valid prefix (a truncated input, as Anthropic's own at `max_tokens`) is
            # left as it is; a broken one is made whole.
            closing = self._tool_json.closing()
            if closing == "{}":
                # Nothing of it was an object: kept as text, as the whole message keeps it.
                closing = json.dumps(input_object("".join(self._open_arguments)), ensure_ascii=False)
            if closing:
                out.append(self._delta(_JSON, closing))
        out.append(
            b'event: content_block_stop\ndata: {"type":"content_block_stop","index":'
            + self._index_bytes
            + b"}\n\n"
        )
        self._open = None
        self._open_tool = -1

    def _delta(self, kind: bytes, value: str) -> bytes:
        return _DELTA_HEAD + self._index_bytes + kind + dumps(value) + _DELTA_TAIL


_INPUT_COUNTS = frozenset({"input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"})


@dataclass(slots=True)
class ParseOutput:
    events: list[StreamEvent]
    done: bool = False
    raw: bytes | None = None  # never: Anthropic streams are not relayed byte for byte


class StreamParser:
    """Reads an Anthropic backend's SSE stream into domain events.

    Tool calls are numbered 0..n-1 in order of appearance, independent of Anthropic's block
    indexes. Usage is merged: `message_start` gives the input counts, each `message_delta`
    the cumulative output (and any input counts it repeats). The last piece of a thinking
    block is held until its signature or its end, so the signature can ride on it.
    `relay_blocks` (the client speaks Anthropic too): blocks the domain does not model,
    their deltas, text block boundaries and citations come along as `BlockStart` and
    `BlockDelta`, so the client gets the blocks the backend sent.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.time, relay_blocks: bool = False, json_tool: str | None = None
    ) -> None:
        self._clock = clock
        self._relay = relay_blocks
        self._json_tool = json_tool  # a tool whose input is the answer's text (see `json_mode`)
        self._json_answer = False
        self._decoder = SSEDecoder()
        self._started = False
        self._blocks: dict[int, int] = {}  # Anthropic block index -> tool index, or a *_BLOCK kind
        self._tools = 0
        self._held: str | None = None
        self._usage = WireUsage()
        self._finished = False
        # Characters a backend split across events (bytes that are not UTF-8): made at the
        # first such bytes, dropped once none is held, so a valid stream tests only `is None`.
        self._split: SplitText | None = None
        self.done = False
        self.failed = False

    @property
    def started(self) -> bool:
        return self._started

    def feed(self, data: bytes) -> ParseOutput:
        events: list[StreamEvent] = []
        if not self.done:
            for frame in self._decoder.feed(data):
                if frame.data:
                    self._frame(frame.event, frame.data, events)
                if self.done:
                    break
        return ParseOutput(events, self.done)

    def close(self) -> ParseOutput:
        """The backend's body ended; a stream that never finished is a failure."""
        events: list[StreamEvent] = []
        if not self.done:
            for frame in self._decoder.close():
                if frame.data and not self.done:
                    self._frame(frame.event, frame.data, events)
        if not self.done:
            self._release_held(events)
            if not self._finished:
                self._fail(GatewayError(ErrorKind.BACKEND, "The backend closed the stream before it finished."), events)
            self.done = True
        return ParseOutput(events, True)

    def _fail(self, error: GatewayError, events: list[StreamEvent]) -> None:
        events.append(StreamFailed(error))
        self.failed = True
        self.done = True

    def _frame(self, name: str | None, data: bytes, events: list[StreamEvent]) -> None:
        if name == "ping":
            return
        mended = False
        try:
            payload = _decode(data.decode())
        except UnicodeDecodeError:
            # Bytes that are not UTF-8: mended, at this cost only when they come.
            try:
                payload = loads_escaped(data)
                mended = True
            except ValueError:
                payload = None
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            self._fail(GatewayError(ErrorKind.BACKEND, "The backend sent a malformed stream event."), events)
            return
        if mended or self._split is not None:
            payload = self._mend(payload, events)
        kind = payload.get("type") or name
        if kind == "content_block_delta":
            self._block_delta(payload, events)
        elif kind == "content_block_start":
            self._block_start(payload, events)
        elif kind == "content_block_stop":
            self._release_held(events)
        elif kind == "message_start":
            self._message_start(payload, events)
        elif kind == "message_delta":
            self._message_delta(payload, events)
        elif kind == "message_stop":
            self._release_held(events)
            self.done = True
        elif kind == "error":
            self._release_held(events)
            self._fail(error_from_wire(payload), events)
        # `ping` and event types added after this was written are ignored, as Anthropic asks.

    def _mend(self, payload: dict[str, Any], events: list[StreamEvent]) -> dict[str, Any]:
        """`payload` (parsed by `loads_escaped`, or one after it) with a delta's text joined to
        the bytes the block's last delta left unfinished, and U+FFFD for any other invalid
        byte. A block that stops with bytes held gets them as U+FFFD first."""
        split = self._split = self._split or SplitText()
        kind = payload.get("type")
        index = payload.get("index")
        delta = payload.get("delta")
        if isinstance(index, int) and kind == "content_block_delta" and isinstance(delta, dict):
            for name, _ in _TEXT_FIELDS:
                if name in delta:
                    text = delta[name]
                    joined = split.join((index, name), text if isinstance(text, str) else None, final=False)
                    if joined is not None:
                        delta[name] = joined
        elif isinstance(index, int) and kind == "content_block_stop":
            for name, delta_type in _TEXT_FIELDS:
                rest = split.join((index, name), None, final=True)
                if rest:
                    self._block_delta({"index": index, "delta": {"type": delta_type, name: rest}}, events)
        if not split:
            self._split = None
        mended: dict[str, Any] = replace_invalid(payload)
        return mended

    def _message_start(self, payload: dict[str, Any], events: list[StreamEvent]) -> None:
        if self._started:
            return
        self._started = True
        message = payload.get("message")
        if not isinstance(message, dict):
            message = {}
        events.append(
            StreamStart(
                id=str(message.get("id") or message_id("")),
                model=str(message.get("model") or ""),
                created=int(self._clock()),
            )
        )
        self._usage.take_message_fields(message)
        if isinstance(message.get("usage"), dict):
            self._usage.update(message["usage"])
            events.append(self._usage.report(relay=self._relay))

    def _block_start(self, payload: dict[str, Any], events: list[StreamEvent]) -> None:
        index = payload.get("index")
        block = payload.get("content_block")
        if not isinstance(index, int) or not isinstance(block, dict):
            return
        self._release_held(events)
        kind = block.get("type")
        if kind == "text":
            self._blocks[index] = _TEXT_BLOCK
            if self._relay:
                events.append(BlockStart("", 0, {**block, "text": ""}))
            text = block.get("text")
            if isinstance(text, str) and text:
                events.append(TextDelta(text))
        elif kind == "thinking":
            self._blocks[index] = _THINKING_BLOCK
            thinking = block.get("thinking")
            if isinstance(thinking, str) and thinking:
                self._held = thinking
        elif kind == "tool_use" and self._json_tool is not None and block.get("name") == self._json_tool:
            self._blocks[index] = _JSON_BLOCK
            self._json_answer = True
            initial = block.get("input")
            if isinstance(initial, dict) and initial:
                events.append(TextDelta(json.dumps(initial, ensure_ascii=False)))
        elif kind == "tool_use":
            tool = self._tools
            self._tools += 1
            self._blocks[index] = tool
            events.append(tool_call_start(block, tool, relay=self._relay))
            initial = block.get("input")
            if isinstance(initial, dict) and initial:
                events.append(ToolCallDelta(tool, json.dumps(initial, ensure_ascii=False)))
        else:
            # redacted_thinking, server tools and their results: nothing the domain carries,
            # so only an Anthropic client gets them.
            self._blocks[index] = _OTHER_BLOCK
            if kind == "redacted_thinking" and (redacted := redacted_thinking(block)) is not None:
                # Signed reasoning for every client, so the answer keeps it (its journal, a keyed
                # replay); an Anthropic client is given the block again (see `redacted_block`).
                self._release_held(events)
                events.append(redacted)
            elif self._relay:
                events.append(BlockStart("", 0, block))

    def _block_delta(self, payload: dict[str, Any], events: list[StreamEvent]) -> None:
        index = payload.get("index")
        delta = payload.get("delta")
        block = self._blocks.get(index) if isinstance(index, int) else None
        if block is None or not isinstance(delta, dict):
            return
        if block == _OTHER_BLOCK:
            if self._relay:
                events.append(BlockDelta("", 0, delta))
            return
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            if block == _TEXT_BLOCK and isinstance(text, str) and text:
                events.append(TextDelta(text))
        elif kind == "input_json_delta":
            fragment = delta.get("partial_json")
            if block >= 0 and isinstance(fragment, str) and fragment:
                events.append(ToolCallDelta(block, fragment))
            elif block == _JSON_BLOCK and isinstance(fragment, str) and fragment:
                events.append(TextDelta(fragment))
        elif kind == "thinking_delta":
            thinking = delta.get("thinking")
            if block == _THINKING_BLOCK and isinstance(thinking, str) and thinking:
                self._release_held(events)
                self._held = thinking
        elif kind == "signature_delta":
            signature = delta.get("signature")
            if block == _THINKING_BLOCK and isinstance(signature, str) and signature:
                events.append(SignedReasoningDelta(self._held or "", 0, signature))
                self._held = None
        elif kind == "citations_delta" and block == _TEXT_BLOCK and self._relay:
            events.append(BlockDelta("", 0, delta, on_text=True))

    def _release_held(self, events: list[StreamEvent]) -> None:
        if self._held is not None:
            events.append(ReasoningDelta(self._held))
            self._held = None

    def _message_delta(self, payload: dict[str, Any], events: list[StreamEvent]) -> None:
        self._release_held(events)
        delta = payload.get("delta")
        if isinstance(delta, dict) and not self._finished:
            reason = delta.get("stop_reason")
            if isinstance(reason, str):
                self._finished = True
                if reason == "tool_use" and self._json_answer:
                    reason = "end_turn"  # the forced JSON tool was the answer, not a call
                events.append(finish_from_wire(reason, delta.get("stop_sequence")))
        # A code execution's `container` (in the delta), `context_management` (on the event).
        self._usage.take_message_fields({k: v for k, v in payload.items() if k not in ("type", "delta")})
        if isinstance(delta, dict):
            self._usage.take_message_fields(delta)
        if isinstance(payload.get("usage"), dict):
            self._usage.update(payload["usage"])
            events.append(self._usage.report(relay=self._relay))


_TEXT_BLOCK = -1
_THINKING_BLOCK = -2
_OTHER_BLOCK = -3
_JSON_BLOCK = -4
