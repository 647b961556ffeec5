"""Stream resume: `GET /v1/streams/{trace_id}?after=SEQ` — a trace's events as SSE.

Each frame is `id: SEQ`, `event: TYPE`, `data: {event JSON}` in the seed's schema
(`proxy/dialects/events.py`); the stream ends after `finished`. A client that lost its
connection reads the rest from its last seen `id` (`Last-Event-ID`, which a browser's
EventSource sends, wins over `after`), from any gateway instance sharing the same NATS and
PostgreSQL; one that saw `finished` already gets 204 (which ends an EventSource).
"""

from __future__ import annotations

import json
from typing import Protocol
from urllib.parse import parse_qs

import trio
from hypercorn.typing import ASGISendCallable

from proxy.dialects import openai
from proxy.dialects._json import is_decimal
from proxy.dialects.events import WireEvent, encode_event
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.http._exchange import DirectBody
from proxy.http._front import FrontDoor, Incoming
from proxy.http._head import current_tenant
from proxy.services.persistence import Persistence, trace_events

exchanges = FrontDoor()


class Framer(Protocol):
    """How a trace's events are written to the client reading them back."""

    def frame(self, seq: int, event: WireEvent) -> bytes: ...

    def error(self, error: GatewayError) -> bytes:
        """The stream broke after it began: its last frame."""
        ...


class SeedFramer:
    """The seed's schema: `id: SEQ`, `event: TYPE`, `data: {event JSON}` per event."""

    def frame(self, seq: int, event: WireEvent) -> bytes:
        data = encode_event(seq, event)
        kind = json.loads(data)["type"]
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, kind.encode(), data)

    def error(self, error: GatewayError) -> bytes:
        return b"event: error\ndata: " + openai.render_error(error) + b"\n\n"


class EventsBody(DirectBody):
    """A trace's events after `after`, as SSE written by `framer`; an error before the first
    one is a status and OpenAI's error JSON."""

    def __init__(
        self, persistence: Persistence, trace_id: str, after: int, tenant: str | None, framer: Framer,
        *, resumed: str | None = None, not_found: GatewayError | None = None, hold_head: bool = False,
    ) -> None:
        self._persistence = persistence
        self._trace_id = trace_id
        self._after = after
        self._tenant = tenant
        self._framer = framer
        self._resumed = resumed  # see `trace_events`
        self._not_found = not_found  # a trace not known, in the words of the path that asked
        # The head waits for the first frame the framer writes (not its first event): a
        # client that has them all is answered 204 rather than an empty stream.
        self._hold_head = hold_head

    async def _produce(self, send: trio.MemorySendChannel[tuple[int, WireEvent] | GatewayError]) -> None:
        async with send:
            try:
                await trace_events(
                    self._persistence, self._trace_id, self._after, send, self._tenant, resumed=self._resumed,
                )
            except GatewayError as error:
                if error.kind is ErrorKind.NOT_FOUND and self._not_found is not None:
                    error = self._not_found
                await send.send(error)

    async def run(self, send: ASGISendCallable) -> None:
        started = False
        async with trio.open_nursery() as nursery:
            events_send, events = trio.open_memory_channel[tuple[int, WireEvent] | GatewayError](64)
            nursery.start_soon(self._produce, events_send)
            async with events:
                async for item in events:
                    if isinstance(item, GatewayError):
                        if not started:
                            retry = [] if item.retry_after is None else [
                                (b"retry-after", str(max(1, round(item.retry_after))).encode())
                            ]
                            await _head(send, item.status, b"application/json", retry)
                            await send({"type": "http.response.body", "body": openai.render_error(item), "more_body": False})
                            return
                        await send({"type": "http.response.body", "body": self._framer.error(item), "more_body": True})
                        break
                    frame = self._framer.frame(*item)
                    if not started and (frame or not self._hold_head):
                        started = True
                        await _head(send, 200, b"text/event-stream; charset=utf-8")
                    if frame:
                        await send({"type": "http.response.body", "body": frame, "more_body": True})
        if not started:
            # Nothing after where the client was: it saw the end already. 204 is what tells a
            # browser's EventSource to stop (an empty 200 stream has it reconnect every few
            # seconds, for as long as its page is open).
            await send({"type": "http.response.start", "status": 204, "headers": [(b"cache-control", b"no-cache")]})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _head(
    send: ASGISendCallable, status: int, content_type: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
            *(extra or []),
        ],
    })


@exchanges.route("/v1/streams/<trace_id>", method="GET", kind=None)
async def stream_events(incoming: Incoming) -> DirectBody:
    persistence = incoming.gateway.persistence
    if persistence is None:
        raise GatewayError(ErrorKind.NOT_FOUND, "Stream resume needs NATS or PostgreSQL; this gateway has neither.")
    query = parse_qs(incoming.head.query.decode("latin-1"))
    # A browser's EventSource reconnects to the URL it was opened with (its `after`, if any),
    # saying in `Last-Event-ID` how far it got: that wins, or it would get again what it had.
    raw_after = incoming.head.header("last-event-id") or (query.get("after") or [""])[0] or "0"
    if not is_decimal(raw_after):
        raise invalid_request("`after` must be a non-negative integer (the last sequence number seen).", param="after")
    return EventsBody(persistence, incoming.params["trace_id"], int(raw_after), current_tenant(), SeedFramer())
