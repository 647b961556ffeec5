"""Chat orchestration: route a request, run its exchange with the backend, observe it.

Each exchange is one trio nursery. The backend call is a task that sends batches through a
memory channel; the client-facing writer (the `ExchangeSink`, supplied by the HTTP layer)
runs in the exchange's own task. A client disconnect cancels the caller, which cancels the
nursery, which closes the backend's HTTP stream.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import trio

from proxy.domain.chat import ChatRequest
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import CompletionBuilder, StreamFailed
from proxy.domain.routing import Route, Router
from proxy.infra.backends import Backend, BackendCall, Batch


class ExchangeSink(Protocol):
    """The client side of an exchange, in the client's dialect."""

    async def fail(self, error: GatewayError) -> None:
        """The exchange failed before its first byte: answer with the error's status."""

    async def start(self) -> None:
        """The first batch is ready: commit the success status and headers."""

    async def write(self, batch: Batch) -> None: ...

    async def finish(self) -> None:
        """The stream is complete; end the body."""


@dataclass(slots=True)
class RequestMeta:
    """Per-request facts from the transport: ids, and the headers that pick the route.

    `route` is "direct" (a backend LLM), "rag" (retrieval + context injection, with
    `workspace`) or "workflow" (a pipeline job, with `pipeline`).
    """

    trace_id: str
    request_id: str
    correlation_id: str | None = None
    route: str = "direct"
    workspace: str | None = None
    pipeline: str | None = None
    idempotency_key: str | None = None
    cache: str | None = None
    received: float = field(default_factory=time.perf_counter)


Producer = Callable[[trio.MemorySendChannel[Batch]], Awaitable[None]]


class RouteHandler(Protocol):
    """A non-direct route (RAG, workflow). `needs_backend`: whether the request's model
    must resolve to a backend before the response starts (RAG calls an LLM; a workflow's
    pipeline picks its own). `producer` returns what fills the exchange's stream: it sends
    batches (events) into the channel, may call `exchange.call_backend(send, request=...)`
    for the LLM part, and may add response headers to `exchange.response_headers` before
    its first batch. `publishes_events`: the route's own workers publish the trace's events
    (and its `finished`) on `evt.chat.{trace_id}`, so the gateway's journal must not."""

    needs_backend: bool
    publishes_events: bool

    def producer(self, exchange: ChatExchange) -> Producer: ...


@dataclass(slots=True)
class ExchangeRecord:
    """What one exchange did, for the request log (one JSON line per request)."""

    trace_id: str
    request_id: str
    model: str
    backend: str
    upstream_model: str
    stream: bool
    dialect: str
    status: int = 0
    ttft_ms: float | None = None
    total_ms: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    error: str | None = None

    def as_log(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.__slots__}


RecordSink = Callable[[ExchangeRecord], None]


def is_cancellation(exc: BaseException) -> bool:
    """True for trio.Cancelled, bare or grouped by nurseries."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(trio.Cancelled)
        return matched is not None and rest is None
    return False


def new_trace_id() -> str:
    return secrets.token_hex(16)


class ChatService:
    def __init__(
        self,
        router: Router,
        backends: Mapping[str, Backend],
        record: RecordSink,
        routes: Mapping[str, RouteHandler] | None = None,
    ) -> None:
        self._router = router
        self._backends = backends
        self._record = record
        self.routes: dict[str, RouteHandler] = dict(routes or {})

    def exchange(self, request: ChatRequest, meta: RequestMeta, *, relay_openai: bool) -> ChatExchange:
        """Resolve the route now (an unknown model or route fails before any response starts)."""
        handler: RouteHandler | None = None
        if meta.route != "direct":
            handler = self.routes.get(meta.route)
            if handler is None:
                known = ", ".join(["direct", *sorted(self.routes)])
                raise GatewayError(
                    ErrorKind.INVALID_REQUEST, f"Unknown route `{meta.route}`; this gateway serves: {known}.",
                    param="x-route",
                )
        backend: Backend | None = None
        route = Route(backend="", upstream_model=request.model)
        if handler is None or handler.needs_backend:
            route = self._router.resolve(request.model)
            backend = self._backends[route.backend]
        exchange = ChatExchange(request, route, backend, meta, relay_openai=relay_openai, record=self._record)
        if handler is not None:
            exchange.producer = handler.producer(exchange)
        return exchange


class ChatExchange:
    def __init__(
        self,
        request: ChatRequest,
        route: Route,
        backend: Backend | None,
        meta: RequestMeta,
        *,
        relay_openai: bool,
        record: RecordSink,
    ) -> None:
        self.request = request
        self.route = route
        self.meta = meta
        self._backend = backend
        self._record_sink = record
        headers = {"x-request-id": meta.request_id, "x-correlation-id": meta.correlation_id or meta.request_id}
        self._call = BackendCall(request, route.upstream_model, relay_openai=relay_openai, headers=headers)
        self.producer: Producer = self.call_backend
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.result = CompletionBuilder()
        self.record = ExchangeRecord(
            trace_id=meta.trace_id,
            request_id=meta.request_id,
            model=request.model,
            backend=route.backend,
            upstream_model=route.upstream_model,
            stream=request.stream,
            dialect=request.dialect,
        )

    async def run(self, sink: ExchangeSink) -> None:
        """Drive the exchange to the end, writing to `sink`; returns when the client has it all."""
        try:
            async with trio.open_nursery() as nursery:
                send, receive = trio.open_memory_channel[Batch | GatewayError](0)
                nursery.start_soon(self._produce, send)
                async with receive:
                    complete = await self._relay(receive, sink)
                if not complete:
                    # Nothing more will reach the client: stop the backend call now.
                    nursery.cancel_scope.cancel()
        except BaseException as exc:
            if is_cancellation(exc):
                self.record.cancelled = True
            raise
        finally:
            self._finish_record()

    async def _produce(self, send: trio.MemorySendChannel[Batch | GatewayError]) -> None:
        # BrokenResourceError: the client side finished early; there is nobody left to tell.
        with contextlib.suppress(trio.BrokenResourceError):
            await self._call_backend(send)

    async def _call_backend(self, send: trio.MemorySendChannel[Batch | GatewayError]) -> None:
        async with send:
            try:
                await self.producer(send)
            except GatewayError as error:
                await send.send(error)

    async def call_backend(self, send: trio.MemorySendChannel[Batch], request: ChatRequest | None = None) -> None:
        """The direct route: this exchange's request (or `request`, e.g. with retrieved
        context injected) to the routed backend, bounded by the backend's total timeout."""
        backend = self._backend
        if backend is None:
            raise GatewayError(ErrorKind.INTERNAL, "This route has no backend.")
        call = self._call if request is None else replace(self._call, request=request)
        timeout = backend.config.timeouts.total
        try:
            with trio.fail_after(timeout if timeout is not None else math.inf):
                if call.request.stream:
                    await backend.stream(call, send)
                else:
                    await send.send(await backend.complete(call))
        except trio.TooSlowError:
            raise GatewayError(
                ErrorKind.TIMEOUT,
                f"Backend `{self.route.backend}` did not finish within {timeout:g}s.",
                code="backend_timeout",
            ) from None

    async def _relay(self, receive: trio.MemoryReceiveChannel[Batch | GatewayError], sink: ExchangeSink) -> bool:
        """Pass batches to the sink; True when the client received a complete stream."""
        started = False
        async for item in receive:
            if isinstance(item, GatewayError):
                if not started:
                    self.record.status = item.status
                    self.record.error = item.message
                    await sink.fail(item)
                    return False
                item = Batch([StreamFailed(item)], done=True)
            if not started:
                started = True
                self.record.status = 200
                self.record.ttft_ms = (time.perf_counter() - self.meta.received) * 1000
                await sink.start()
            for event in item.events:
                self.result.add(event)
            await sink.write(item)
            if item.done:
                break
        if not started:
            error = GatewayError(ErrorKind.BACKEND, f"Backend `{self.route.backend}` returned nothing.")
            self.record.status = error.status
            self.record.error = error.message
            await sink.fail(error)
            return False
        await sink.finish()
        return True

    def _finish_record(self) -> None:
        record = self.record
        record.total_ms = (time.perf_counter() - self.meta.received) * 1000
        result = self.result
        if result.usage is not None:
            record.prompt_tokens = result.usage.prompt_tokens
            record.completion_tokens = result.usage.completion_tokens
        if result.finish_reason is not None:
            record.finish_reason = result.finish_reason.value
        if result.error is not None and record.error is None:
            record.error = result.error.message
        self._record_sink(record)
