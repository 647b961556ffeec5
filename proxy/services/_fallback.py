"""The fallback walk: a model's backend that cannot answer before its client has received
anything hands the exchange's request to the model's stand-ins in turn, each sent the
request fitted to its own backend."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import trio

from proxy.config import BackendConfig
from proxy.domain import truncation
from proxy.domain.chat import ChatRequest
from proxy.domain.errors import CONTEXT_LENGTH_EXCEEDED, ErrorKind, GatewayError
from proxy.domain.events import (
    AudioDelta,
    FunctionCallDelta,
    ReasoningDelta,
    RefusalDelta,
    StreamFailed,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
)
from proxy.domain.routing import Route
from proxy.infra.backends import Backend, BackendCall, Batch, BatchSink
from proxy.services._contracts import RequestMeta
from proxy.services._records import ExchangeRecord
from proxy.services.journal import EventLog

log = logging.getLogger("llm_proxy.chat")


@dataclass(frozen=True, slots=True)
class Fallback:
    """A stand-in model for when the requested one's backend cannot answer, routed."""

    model: str
    route: Route
    backend: Backend


# A client's request made to fit one backend (`None`: a route without one): the request itself,
# a changed copy (never the request changed in place: a stand-in of another kind needs it as
# sent), or a GatewayError (a 400) for what that backend cannot be given.
Adapter = Callable[[ChatRequest, BackendConfig | None], ChatRequest]


# What makes a request go to a stand-in: the backend could not answer (down, overloaded,
# broken, silent), never the request itself (invalid, too long, unknown to the backend).
_FALLBACK_KINDS = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.BACKEND, ErrorKind.TIMEOUT, ErrorKind.RATE_LIMITED})


def stand_in_may_answer(error: GatewayError) -> bool:
    """Whether `error` is the backend's inability to answer, which a stand-in may make good."""
    return error.kind in _FALLBACK_KINDS


class _Watched:
    """The producer's channel, noting whether anything went through it: a stand-in may only
    answer a client that has received nothing yet."""

    __slots__ = ("_send", "sent")

    def __init__(self, send: BatchSink) -> None:
        self._send = send
        self.sent = False

    async def send(self, value: Batch, /) -> None:
        if not self.sent:
            # A backend that answered 200 and then failed before its first token (Ollama's
            # in-band `{"error"}` when a model cannot load) has told the client nothing yet.
            failed = next((event for event in value.events if isinstance(event, StreamFailed)), None)
            if failed is not None and not any(isinstance(event, _CONTENT) for event in value.events):
                raise failed.error
        self.sent = True
        await self._send.send(value)


_CONTENT = (TextDelta, RefusalDelta, ReasoningDelta, ToolCallStart, ToolCallDelta, FunctionCallDelta, AudioDelta)


class FallbackWalk:
    """The backend call of a `ChatExchange` (it is one), with the model's stand-ins: what
    the walk reads and changes of its exchange is declared here, set by the exchange."""

    request: ChatRequest
    meta: RequestMeta
    route: Route
    record: ExchangeRecord
    fallbacks: list[Fallback]
    response_headers: list[tuple[bytes, bytes]]
    fell_back: bool
    _adapter: Adapter | None
    hung_up: bool
    _live_log: EventLog | None
    _call: BackendCall
    _backend: Backend | None
    # `truncation: "auto"` (see `truncate`): the answering model's window, where its listing
    # says it, and how a stand-in's is found.
    _truncates: bool
    _window: truncation.Window | None
    _window_of: Callable[[Route], truncation.Window | None] | None

    def truncate(self, window_of: Callable[[Route], truncation.Window | None]) -> None:
        """Send the backend the conversation without its oldest items, as many as it takes to
        fit its model's window (`window_of` a route: None, unknown), and should the backend
        still find it too long, fewer once more; a stand-in, to its own model's window.
        `self.request` stays the client's (its journal row, the caches)."""
        self._truncates = True
        self._window_of = window_of
        self._window = window = window_of(self.route)
        if window is not None:
            sent = self._call.request
            fitted = truncation.fitted(sent, window)
            if fitted is not sent:
                log.info(
                    "%s: truncation auto: %d of %d messages fit %d tokens", self.meta.trace_id, len(fitted.messages),
                    len(sent.messages), window.tokens,
                )
                self._call = replace(self._call, request=fitted)

    def adapt_with(self, adapter: Adapter) -> None:
        """Fit the request with `adapter` to each backend it goes to: the model's (now: its
        400 is raised before any response starts) and, should that one fail, each stand-in's
        (one that cannot be given the request is passed over). `self.request` stays as the
        client sent it (its fingerprint, caches and journal row are the client's request)."""
        self._adapter = adapter
        fitted = adapter(self.request, self._backend.config if self._backend is not None else None)
        if fitted is not self.request:
            self._call = replace(self._call, request=fitted)

    def _fitted(self, request: ChatRequest, backend: Backend | None) -> ChatRequest:
        if self._adapter is None or backend is None:
            return request
        return self._adapter(request, backend.config)

    async def call_backend(self, send: trio.MemorySendChannel[Batch], request: ChatRequest | None = None) -> None:
        """The direct route: this exchange's request (or `request`, e.g. with retrieved
        context injected) to the routed backend, bounded by the backend's total timeout.
        Should that backend fail before answering, the model's stand-ins are tried in turn."""
        if request is self.request:
            request = None  # fitted already
        call = self._call if request is None else replace(self._call, request=self._fitted(request, self._backend))
        if request is not None and self._window is not None:
            call = replace(call, request=truncation.fitted(call.request, self._window))
        if not self.fallbacks:
            await self._call_trimming(send, call)
            return
        watched = _Watched(send)
        stand_ins = iter(self.fallbacks)
        # The first backend's `total` bounds the whole exchange, stand-ins included.
        assert self._backend is not None
        total = self._backend.config.timeouts.total
        deadline = trio.current_time() + total if total is not None else math.inf
        while True:
            try:
                await self._call_trimming(watched, call, deadline)
                return
            except GatewayError as error:
                if watched.sent or error.kind not in _FALLBACK_KINDS:
                    raise
                if self.hung_up or trio.current_effective_deadline() == -math.inf:
                    raise  # the client left (closing the backend is what failed it), or the server stops
                if trio.current_time() >= deadline:
                    raise  # no time left for a stand-in
                found = self._next_stand_in(stand_ins, request)
                if found is None:
                    raise
                stand_in, own, given = found
                log.warning(
                    "%s: %s; falling back to %s (backend %s)", self.meta.trace_id, error.message, stand_in.model,
                    stand_in.route.backend,
                )
                self._switch_to(stand_in, own)
                call = self._call if given is None else replace(self._call, request=given)
                if self._window_of is not None:
                    # Fitted to the stand-in's own window, not the first model's.
                    self._window = self._window_of(stand_in.route)
                    if self._window is not None:
                        call = replace(call, request=truncation.fitted(call.request, self._window))

    def _next_stand_in(
        self, stand_ins: Iterator[Fallback], request: ChatRequest | None
    ) -> tuple[Fallback, ChatRequest, ChatRequest | None] | None:
        """The next stand-in whose backend can be given the request, with the exchange's
        request (and `request`, when the route passed one) fitted to that backend."""
        for stand_in in stand_ins:
            try:
                own = self._fitted(self.request, stand_in.backend)
                given = None if request is None else self._fitted(request, stand_in.backend)
            except GatewayError as refusal:
                # Like a stand-in that cannot answer: the first backend's error stands if none can.
                log.info("%s: stand-in %s passed over: %s", self.meta.trace_id, stand_in.model, refusal.message)
                continue
            return stand_in, own, given
        return None

    def _switch_to(self, stand_in: Fallback, request: ChatRequest) -> None:
        self.fell_back = True
        if self._live_log is not None:
            self._live_log.winner = stand_in.route.upstream_model
        self.route = stand_in.route
        self._backend = stand_in.backend
        self._call = replace(self._call, request=request, upstream_model=stand_in.route.upstream_model)
        self.record.backend = stand_in.route.backend
        self.record.upstream_model = stand_in.route.upstream_model
        # In place: the sink holds this list, and sends it with the first byte.
        self.response_headers[:] = [
            *((name, value) for name, value in self.response_headers if name != b"x-fallback-model"),
            (b"x-fallback-model", stand_in.model.encode()),
        ]

    async def _call_trimming(self, send: BatchSink, call: BackendCall, deadline: float = math.inf) -> None:
        """One backend call; with `truncation: "auto"`, once more with fewer items should the
        backend refuse the conversation as too long before it said anything."""
        if not self._truncates:
            await self._call_routed(send, call, deadline)
            return
        watched = send if isinstance(send, _Watched) else _Watched(send)
        try:
            await self._call_routed(watched, call, deadline)
        except GatewayError as error:
            if watched.sent or error.code != CONTEXT_LENGTH_EXCEEDED:
                raise
            shorter = truncation.shortened(call.request, error.message)
            if shorter is None:
                raise
            log.info(
                "%s: %s; retrying with %d of %d messages", self.meta.trace_id, error.message,
                len(shorter.messages), len(call.request.messages),
            )
            await self._call_routed(watched, replace(call, request=shorter), deadline)

    async def _call_routed(self, send: BatchSink, call: BackendCall, deadline: float = math.inf) -> None:
        """One backend call, under its backend's `total` and the exchange's `deadline`."""
        backend = self._backend
        if backend is None:
            raise GatewayError(ErrorKind.INTERNAL, "This route has no backend.")
        timeout = backend.config.timeouts.total
        own = trio.current_time() + timeout if timeout is not None else math.inf
        try:
            with trio.fail_at(min(deadline, own)):
                if call.request.stream:
                    await backend.stream(call, send)
                elif self.fallbacks:
                    # A whole answer for a model with stand-ins is streamed and assembled: the
                    # first-token clock then finds a silent backend in time for a stand-in,
                    # where only `total`, which the stand-ins share, would.
                    await backend.stream(replace(call, relay_openai=False), send)
                else:
                    await send.send(await backend.complete(call))
        except trio.TooSlowError:
            if self.fell_back and deadline < own:
                message = f"Backend `{self.route.backend}` did not finish within what the first backend's `total` timeout left."
            else:
                message = f"Backend `{self.route.backend}` did not finish within {timeout:g}s."
            raise GatewayError(ErrorKind.TIMEOUT, message, code="backend_timeout") from None
