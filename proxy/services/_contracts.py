"""What an exchange and those around it agree on: the per-request facts (`RequestMeta`),
what the HTTP layer and the routes supply (`ExchangeSink`, `RouteHandler`), the cache it asks
(`CompletionCache`), and how a run the server stops is told (`SHUTTING_DOWN`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from proxy.domain import ids
from proxy.domain.chat import ChatCompletion, ChatRequest
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.infra.backends import Batch
from proxy.services.persistence import Producer

if TYPE_CHECKING:
    from proxy.services.chat import ChatExchange


# The response headers that describe an answer rather than the call that made it (a RAG
# answer's workspace and sources, the pipeline and fan-out winner of a workflow's, the
# stand-in that gave it): kept with it, so that whatever gives it again (exact or semantic
# cache, an idempotent retry, a request attached to its run) says what its first client heard.
# Not what only a fresh call has (`x-ratelimit-*`, `x-cache`, `x-trace-id`).
ANSWER_HEADERS: Final = frozenset({
    b"x-rag-workspace", b"x-rag-sources", b"x-rag-context", b"x-pipeline", b"x-workflow-winner", b"x-fallback-model",
})


# Called with the answering trace and the whole answer of a run that completed, before its
# client has the answer's end (a Responses conversation's items appended); its own failures
# are its to handle. Never a closure over its exchange (a reference cycle).
AnswerHook = Callable[[str, ChatCompletion], Awaitable[None]]


class RunLock(Protocol):
    """What only one run at a time may answer (a Responses conversation): taken when the
    exchange's own run is to start (not by a repeat that replays or attaches to its key's run),
    given back once the run has ended and its `AnswerHook` was told, before its client has the
    end. Never a closure over its exchange (a reference cycle)."""

    async def acquire(self, trace_id: str) -> None:
        """Take it for run `trace_id`, or raise the refusal its client gets."""

    async def release(self, trace_id: str) -> None:
        """Give it back (its own failures are its to handle)."""

    def pending(self, trace_id: str) -> dict[str, Any] | None:
        """What run `trace_id`'s answer left unwritten (the database out), for its log row to
        write and give the lock back with (`LogRow.conversation`); None: nothing."""


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
    # Who asks (the API key as `key-<id>`), when auth is on: caches and resume are per tenant.
    tenant: str | None = None
    received: float = field(default_factory=time.perf_counter)


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

    async def admit(self, exchange: ChatExchange) -> None:
        """Refuse now what the producer would refuse as it starts (a workspace or pipeline
        that does not exist): a run started with nobody reading it (a background response)
        has answered `queued` by then, and its client would learn of its own mistake as the
        run's failure (`server_error`)."""
        ...

    async def cache_scope(self, exchange: ChatExchange) -> str | None:
        """What the answer draws on besides the request that can change under the same
        request (a RAG workspace's documents and settings), as a value that changes with it:
        part of the exact cache's key, so that a change makes its entries misses. None:
        nothing."""
        ...


# What a client still connected hears when the server stops before its answer is complete
# (hypercorn cancels what is still running once its graceful timeout is over).
SHUTTING_DOWN = GatewayError(
    ErrorKind.UNAVAILABLE, "The gateway is shutting down; the answer was not completed. Retry the request.",
    code="gateway_shutting_down",
)


def is_cancellation(exc: BaseException) -> bool:
    """True for trio.Cancelled, bare or grouped by nurseries."""
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(trio.Cancelled)
        return matched is not None and rest is None
    return False


def new_trace_id() -> str:
    return ids.new_trace_id()


Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    completion: ChatCompletion
    headers: Headers
    """Response headers that belong to the answer (the RAG route's sources)."""
    trace_id: str | None = None
    """The run that gave the answer (None: an entry that does not say)."""


class CompletionCache(Protocol):
    """A cache keyed by meaning rather than bytes (the semantic cache)."""

    def enabled_for(self, request: ChatRequest, meta: RequestMeta) -> bool: ...

    async def lookup(self, request: ChatRequest, meta: RequestMeta) -> CachedAnswer | None: ...

    async def store(
        self, request: ChatRequest, meta: RequestMeta, completion: ChatCompletion, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Remember `completion`; `headers` are all the exchange's response headers, of
        which the cache keeps those that belong to the answer."""
