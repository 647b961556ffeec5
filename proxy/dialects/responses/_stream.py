"""Responses API streams, sans-IO: domain events in, `event: <type>` SSE frames out.

The stream opens with `response.created` and `response.in_progress` (a background one's with
`response.created` and `response.queued`, both `queued`, first); each output item is
announced (`response.output_item.added`), filled (its part and deltas) and closed
(`response.output_item.done`); it ends with `response.completed` (or `response.incomplete`)
carrying the whole Response. A failure after the head is `response.failed` with the
Response's `error`, and nothing after it (no `[DONE]` in this API). Every event has its
`sequence_number`, from 0. Only choice 0 is rendered: a Response has one answer.

Per delta the renderer only joins bytes: each item's frame prefix (its ids and indexes) is
built once, when the item opens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from proxy.dialects._json import dumps
from proxy.dialects.anthropic import SignedReasoningDelta
from proxy.dialects.events import RUN_CANCELLED
from proxy.dialects.openai import KEEPALIVE
from proxy.dialects.responses._request import namespaces_of, split_name
from proxy.dialects.responses._response import (
    call_item,
    error_to_wire,
    item_id,
    message_item,
    output_text,
    reasoning_item,
    response_object,
    status_of,
    summarized,
    usage_to_wire,
)
from proxy.domain.chat import FinishReason, Usage
from proxy.domain.errors import GatewayError
from proxy.domain.events import (
    Finish,
    ReasoningDelta,
    StreamEvent,
    StreamFailed,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
)

_SEQ = b',"sequence_number":'
_TAIL = b"}\n\n"


def _frame(kind: str, seq: int, payload: dict[str, Any]) -> bytes:
    body = dumps({"type": kind, **payload})
    return b"event: " + kind.encode() + b"\ndata: " + body[:-1] + _SEQ + str(seq).encode() + _TAIL


def _delta_prefix(kind: str, item: str, output_index: int, index: str | None) -> bytes:
    """`index`: the part's index field (`content_index`, a summary's `summary_index`), if any."""
    head = dumps({"type": kind, "item_id": item, "output_index": output_index} | ({index: 0} if index else {}))
    return b"event: " + kind.encode() + b"\ndata: " + head[:-1] + b',"delta":'


@dataclass(slots=True)
class _Item:
    kind: str  # "reasoning", "message", "function_call"
    id: str
    output_index: int
    prefix: bytes  # the delta frame up to the delta's JSON string
    suffix: bytes = _SEQ
    pieces: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""
    done: bool = False
    logprobs: list[Any] | None = None  # a message's tokens', when they were asked for
    signature: str = ""  # a Claude backend's, of the reasoning (see `_signed`)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


_TEXT_SUFFIX = b',"logprobs":[]' + _SEQ


class StreamRenderer:
    """Renders domain events as a Responses API stream for one request."""

    keepalive: ClassVar[bytes] = KEEPALIVE  # an SSE comment: the SDK skips it

    def __init__(
        self, *, response: str, model: str, settings: dict[str, Any], clock: Callable[[], float] = time.time,
        created_at: int | None = None, completed_at: int | None = None,
    ) -> None:
        """`created_at`, `completed_at`: a Response's own, for its stream rendered again (by
        default, now)."""
        self._response = response
        self._model = model
        self._settings = settings
        self._summary = summarized(settings)
        self._namespaces = namespaces_of(settings)
        self._clock = clock
        self._created_at = int(clock()) if created_at is None else created_at
        self._completed_at = completed_at
        self._seq = 0
        self._announced = False
        self._items: list[_Item] = []
        self._message: _Item | None = None
        self._reasoning: _Item | None = None
        self._calls: dict[int, _Item] = {}
        self._usage: Usage | None = None
        self._finish: FinishReason | None = None
        self.done = False

    def render(self, events: list[StreamEvent]) -> bytes:
        out: list[bytes] = []
        if not self._announced:
            self._announce(out)
        for event in events:
            if self.done:
                break
            self._event(event, out)
        return b"".join(out)

    def close(self) -> bytes:
        """End the stream: close what is open, then `response.completed` or `.incomplete`."""
        if self.done:
            return b""
        out: list[bytes] = []
        if not self._announced:
            self._announce(out)
        if not any(item.kind != "reasoning" for item in self._items):
            # An answer that said nothing (reasoning aside) still has its (empty) message, as
            # a whole Response does.
            self._open_message(out)
        self._close_all(out)
        status, incomplete = status_of(self._finish)
        final = self._object(status, incomplete_details=incomplete)
        if status == "completed":
            final["completed_at"] = int(self._clock()) if self._completed_at is None else self._completed_at
        out.append(self._event_frame("response.completed" if status == "completed" else "response.incomplete", {"response": final}))
        self.done = True
        return b"".join(out)

    # -- events ---------------------------------------------------------------------------

    def _event(self, event: StreamEvent, out: list[bytes]) -> None:
        match event:
            case TextDelta(text, 0, logprobs):
                if text:
                    item = self._message or self._open_message(out)
                    item.pieces.append(text)
                    if logprobs is None:
                        out.append(self._delta(item, text))
                    else:
                        out.append(self._delta_with(item, text, logprobs))
            case ReasoningDelta(text, 0):
                if text:
                    item = self._reasoning or self._open_reasoning(out)
                    item.pieces.append(text)
                    out.append(self._delta(item, text))
                if isinstance(event, SignedReasoningDelta) and event.signature:
                    item = self._reasoning or self._open_reasoning(out)
                    item.signature = event.signature
                    self._close_reasoning(out)  # signed whole: a later thinking block is an item of its own
            case ToolCallStart(index, call_id, name, 0):
                if index not in self._calls:
                    self._open_call(index, call_id, name, out)
            case ToolCallDelta(index, arguments, 0):
                call = self._calls.get(index)
                if call is not None and arguments and not call.done:
                    call.pieces.append(arguments)
                    out.append(self._delta(call, arguments))
            case Finish(reason, 0):
                if self._finish is None:
                    self._finish = reason
            case UsageReport(usage):
                self._usage = usage
            case StreamFailed(error):
                self._fail(error, out)

    def _fail(self, error: GatewayError, out: list[bytes]) -> None:
        # What was said stays said: the failed Response holds it, its open items incomplete.
        if error.code == RUN_CANCELLED.code:
            # The API has no `response.cancelled` stream event: the Response that ends the
            # stream says it (`status: cancelled`), under the event for an answer cut short.
            cancelled = self._object("cancelled")
            out.append(self._event_frame("response.incomplete", {"response": cancelled}))
        else:
            failed = self._object("failed", error=error_to_wire(error))
            out.append(self._event_frame("response.failed", {"response": failed}))
        self.done = True

    # -- items ----------------------------------------------------------------------------

    def _open(self, kind: str, prefix: str, out: list[bytes], added: Callable[[str], dict[str, Any]]) -> _Item:
        index = len(self._items)
        ident = item_id(self._response, prefix, index)
        part_index: str | None
        if kind == "reasoning" and self._summary:
            delta_kind, part_index = "response.reasoning_summary_text.delta", "summary_index"
        else:
            delta_kind = {
                "message": "response.output_text.delta",
                "reasoning": "response.reasoning_text.delta",
                "function_call": "response.function_call_arguments.delta",
            }[kind]
            part_index = None if kind == "function_call" else "content_index"
        item = _Item(
            kind, ident, index, _delta_prefix(delta_kind, ident, index, part_index),
            suffix=_TEXT_SUFFIX if kind == "message" else _SEQ,
        )
        self._items.append(item)
        out.append(self._event_frame("response.output_item.added", {"output_index": index, "item": added(ident)}))
        return item

    def _open_message(self, out: list[bytes]) -> _Item:
        self._close_reasoning(out)
        item = self._open("message", "msg", out, lambda ident: message_item(ident, None, "in_progress"))
        out.append(self._part_event("response.content_part.added", item, ""))
        self._message = item
        return item

    def _open_reasoning(self, out: list[bytes]) -> _Item:
        self._close_message(out)
        item = self._open("reasoning", "rs", out, lambda ident: reasoning_item(ident, "", "in_progress", self._summary))
        out.append(self._part_event("response.content_part.added", item, ""))
        self._reasoning = item
        return item

    def _open_call(self, index: int, call_id: str, name: str, out: list[bytes]) -> None:
        self._close_message(out)
        self._close_reasoning(out)
        item = self._open(
            "function_call", "fc", out, lambda ident: call_item(ident, call_id, name, "", "in_progress", self._namespaces)
        )
        item.call_id, item.name = call_id, name
        self._calls[index] = item

    def _close_message(self, out: list[bytes]) -> None:
        item = self._message
        if item is None:
            return
        self._message = None
        text = item.text
        ids = {"item_id": item.id, "output_index": item.output_index, "content_index": 0}
        out.append(self._event_frame("response.output_text.done", {**ids, "text": text, "logprobs": item.logprobs or []}))
        out.append(self._part_event("response.content_part.done", item, text))
        self._item_done(item, out)

    def _close_reasoning(self, out: list[bytes]) -> None:
        item = self._reasoning
        if item is None:
            return
        self._reasoning = None
        text = item.text
        if self._summary:
            ids = {"item_id": item.id, "output_index": item.output_index, "summary_index": 0}
            out.append(self._event_frame("response.reasoning_summary_text.done", {**ids, "text": text}))
        else:
            ids = {"item_id": item.id, "output_index": item.output_index, "content_index": 0}
            out.append(self._event_frame("response.reasoning_text.done", {**ids, "text": text}))
        out.append(self._part_event("response.content_part.done", item, text))
        self._item_done(item, out)

    def _close_call(self, item: _Item, out: list[bytes]) -> None:
        out.append(
            self._event_frame(
                "response.function_call_arguments.done",
                {"item_id": item.id, "output_index": item.output_index, "name": split_name(item.name, self._namespaces)[1], "arguments": item.text},
            )
        )
        self._item_done(item, out)

    def _close_all(self, out: list[bytes]) -> None:
        self._close_reasoning(out)
        self._close_message(out)
        for item in self._calls.values():
            if not item.done:
                self._close_call(item, out)

    def _item_done(self, item: _Item, out: list[bytes]) -> None:
        item.done = True
        out.append(
            self._event_frame(
                "response.output_item.done", {"output_index": item.output_index, "item": self._wire(item)}
            )
        )

    def _wire(self, item: _Item) -> dict[str, Any]:
        """The item as the Response holds it: finished, or cut short (`incomplete`: by a
        failure, or a message by the answer's limit)."""
        if not item.done:
            status = "incomplete"
        elif item.kind == "message":
            status = status_of(self._finish)[0]
        else:
            status = "completed"
        if item.kind == "message":
            return message_item(item.id, item.text, status, item.logprobs)
        if item.kind == "reasoning":
            return reasoning_item(item.id, item.text, status, self._summary, item.signature)
        return call_item(item.id, item.call_id, item.name, item.text, status, self._namespaces)

    # -- frames ---------------------------------------------------------------------------

    def _announce(self, out: list[bytes]) -> None:
        self._announced = True
        if self._settings.get("background"):
            # OpenAI's background stream: created and `response.queued` (both `queued`), then
            # `in_progress`. Its own settings say so, so a resume numbers its events alike.
            queued = self._object("queued")
            out.append(self._event_frame("response.created", {"response": queued}))
            out.append(self._event_frame("response.queued", {"response": queued}))
        else:
            out.append(self._event_frame("response.created", {"response": self._object("in_progress")}))
        out.append(self._event_frame("response.in_progress", {"response": self._object("in_progress")}))

    def _object(
        self, status: str, *, incomplete_details: dict[str, str] | None = None, error: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        output = [self._wire(item) for item in self._items] if status not in ("in_progress", "queued") else []
        usage = usage_to_wire(self._usage) if status not in ("in_progress", "queued") else None
        return response_object(
            response=self._response, created_at=self._created_at, model=self._model, settings=self._settings,
            status=status, output=output, usage=usage, incomplete_details=incomplete_details, error=error,
        )

    def _part_event(self, kind: str, item: _Item, text: str) -> bytes:
        """`response.content_part.added`/`.done`; for a summary, its `reasoning_summary_part`'s."""
        if item.kind == "reasoning" and self._summary:
            kind = kind.replace("content_part", "reasoning_summary_part")
            part: dict[str, Any] = {"type": "summary_text", "text": text}
            return self._event_frame(
                kind, {"item_id": item.id, "output_index": item.output_index, "summary_index": 0, "part": part}
            )
        part = output_text(text, item.logprobs) if item.kind == "message" else {"type": "reasoning_text", "text": text}
        return self._event_frame(
            kind, {"item_id": item.id, "output_index": item.output_index, "content_index": 0, "part": part}
        )

    def _event_frame(self, kind: str, payload: dict[str, Any]) -> bytes:
        seq = self._seq
        self._seq += 1
        return _frame(kind, seq, payload)

    def _delta_with(self, item: _Item, text: str, logprobs: dict[str, Any]) -> bytes:
        """A text delta carrying its tokens' log probabilities (kept for the finished part)."""
        entries = logprobs.get("content")
        if not isinstance(entries, list):
            return self._delta(item, text)
        if item.logprobs is None:
            item.logprobs = []
        item.logprobs.extend(entries)
        seq = self._seq
        self._seq += 1
        return item.prefix + dumps(text) + b',"logprobs":' + dumps(entries) + _SEQ + str(seq).encode() + _TAIL

    def _delta(self, item: _Item, text: str) -> bytes:
        seq = self._seq
        self._seq += 1
        return item.prefix + dumps(text) + item.suffix + str(seq).encode() + _TAIL


def whole_stream(body: dict[str, Any]) -> bytes:
    """The stream of a Response known whole, its output items done (a `compaction_trigger`'s
    answer: one `compaction` item), as OpenAI streams it."""
    opened = {**body, "status": "in_progress", "output": [], "usage": None, "completed_at": None}
    frames: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": opened}), ("response.in_progress", {"response": opened}),
    ]
    for index, item in enumerate(body["output"]):
        added = {key: value for key, value in item.items() if key != "encrypted_content"}
        frames += [
            ("response.output_item.added", {"output_index": index, "item": added}),
            ("response.output_item.done", {"output_index": index, "item": item}),
        ]
    frames.append(("response.completed", {"response": body}))
    return b"".join(_frame(kind, seq, payload) for seq, (kind, payload) in enumerate(frames))
