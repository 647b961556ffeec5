"""Exchanges as responses: the status waits for the backend's first byte.

A gateway cannot know its status until the backend answers (a 404, a 503 or a timeout must
reach the client as such), so an exchange's response is a `DirectBody` that the front door
(`_front`) hands the raw ASGI `send`: the exchange's sink sends the status itself once it
knows it, then the body as the exchange produces it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar, Protocol

import trio
from hypercorn.typing import ASGISendCallable, HTTPResponseStartEvent

from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import StreamEvent, StreamFailed
from proxy.http._errors import error_reply
from proxy.infra.backends import Batch
from proxy.services.chat import SHUTTING_DOWN, ChatExchange, ExchangeSink, is_cancellation

Headers = list[tuple[bytes, bytes]]

log = logging.getLogger("llm_proxy.http")


class DirectBody:
    """A response that writes itself (status included) to the raw ASGI `send`."""

    async def run(self, send: ASGISendCallable) -> None:
        raise NotImplementedError

    def hang_up(self) -> None:
        """The client disconnected mid-response (the request is being cancelled too)."""


class ExchangeBody(DirectBody):
    def __init__(self, exchange: ChatExchange, sink: Callable[[ASGISendCallable], ExchangeSink]) -> None:
        self.exchange = exchange
        self._sink = sink

    def sink(self, send: ASGISendCallable) -> ExchangeSink:
        return self._sink(send)

    async def run(self, send: ASGISendCallable) -> None:
        sink = self.sink(send)
        if isinstance(sink, AsgiSink):
            sink.extra_headers = self.exchange.response_headers
        try:
            await self.exchange.run(sink)
        except Exception:
            # A bug must cost this request only: escaping, it would reach hypercorn, which
            # answers a 500 even mid-response.
            log.exception("exchange %s failed", self.exchange.meta.trace_id)
            if isinstance(sink, AsgiSink) and not sink.started:
                await sink.fail(GatewayError(ErrorKind.INTERNAL, "Internal gateway error; see the gateway's log."))
        except BaseException as exc:
            if is_cancellation(exc) and not self.exchange.hung_up and isinstance(sink, AsgiSink) and not sink.ended:
                # The server is stopping: a client still there is told, not just cut off.
                with trio.CancelScope(shield=True, deadline=trio.current_time() + _LAST_WORDS_SECONDS):
                    await _tell_shutdown(sink, started=sink.started, stream=self.exchange.request.stream)
            raise

    def hang_up(self) -> None:
        self.exchange.hang_up()


_LAST_WORDS_SECONDS = 1.0


async def _tell_shutdown(sink: ExchangeSink, *, started: bool, stream: bool) -> None:
    if not started:
        await sink.fail(SHUTTING_DOWN)
    elif stream:
        await sink.write(Batch([StreamFailed(SHUTTING_DOWN)], done=True))
        await sink.finish()


class AsgiSink:
    """Writes an exchange's response straight to ASGI; subclasses render their dialect."""

    dialect = "openai"  # whose error shape `fail` answers in

    def __init__(self, send: ASGISendCallable, headers: Headers) -> None:
        self._send = send
        self._headers = headers
        self.started = False
        self.ended = False
        # Headers the exchange adds (trace id, cache status, RAG sources); read at start.
        self.extra_headers: Headers = []
        # What the surface passes on of the backend's response head, given the head so far;
        # asked once, at start (by then the backend's head, if any, has been heard).
        self.upstream: Callable[[Headers], Headers] | None = None

    async def _start(self, status: int, headers: Headers) -> None:
        self.started = True
        head = headers + self._headers + self.extra_headers
        if self.upstream is not None:
            head += self.upstream(head)
        message: HTTPResponseStartEvent = {
            "type": "http.response.start", "status": status, "headers": head, "trailers": False,
        }
        # Shielded: cancelled between hypercorn's h11 state change and its own bookkeeping,
        # hypercorn would later answer a 500 on a response already begun, and that error
        # escapes into its server nursery — one client's hang-up would stop the gateway.
        with trio.CancelScope(shield=True):
            await self._send(message)

    async def _body(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def _end(self, data: bytes = b"") -> None:
        self.ended = True
        await self._send({"type": "http.response.body", "body": data, "more_body": False})

    async def _whole(self, status: int, headers: Headers, body: bytes) -> None:
        """A response known in full: one body message and a Content-Length, so the server
        writes headers and body and no chunked framing (one send fewer per response)."""
        await self._start(status, [*headers, (b"content-length", b"%d" % len(body))])
        await self._end(body)

    async def fail(self, error: GatewayError) -> None:
        """The exchange failed before its first byte: the error in the sink's dialect."""
        # The id the response's head carries (a failure only pays for finding it).
        request_id = next((value for name, value in self._headers if name == b"x-request-id"), None)
        reply = error_reply(error, self.dialect, None if request_id is None else request_id.decode("latin-1"))
        await self._whole(reply.status, [(b"content-type", reply.content_type), *reply.headers], reply.body)


class JsonSink(AsgiSink):
    """A non-streaming answer: the whole body is sent by `write` (the relay calls it once,
    with the completed batch), head included, since its length is known only then."""

    async def start(self) -> None:
        pass

    async def finish(self) -> None:
        pass

    async def _json(self, body: bytes, content_type: bytes = b"application/json") -> None:
        await self._whole(200, [(b"content-type", content_type)], body)


class StreamRenderer(Protocol):
    keepalive: ClassVar[bytes]  # what the dialect's client skips, sent for a keep-alive batch

    def render(self, events: list[StreamEvent]) -> bytes: ...

    def close(self) -> bytes: ...


class RenderedStreamSink(AsgiSink):
    """A stream rendered from domain events by a dialect's renderer, whatever the backend
    spoke (Ollama NDJSON, Anthropic SSE); errors before the first byte in that dialect."""

    def __init__(
        self,
        send: ASGISendCallable,
        headers: Headers,
        renderer: StreamRenderer,
        *,
        content_headers: Headers,
        dialect: str,
    ) -> None:
        super().__init__(send, headers)
        self._renderer = renderer
        self._content_headers = content_headers
        self.dialect = dialect

    async def start(self) -> None:
        await self._start(200, self._content_headers)

    async def write(self, batch: Batch) -> None:
        data = self._renderer.render(batch.events) if batch.events or batch.done else self._renderer.keepalive
        if data:
            await self._body(data)

    async def finish(self) -> None:
        await self._end(self._renderer.close())


SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
