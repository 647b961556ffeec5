"""One backend's pooled HTTP client and its replicas: which replica takes a request, when
one is set aside, and how a request moves off one that is down, full or silent."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote

import httpx
import trio

from proxy.config import BackendConfig, Timeouts
from proxy.domain.errors import ErrorKind, GatewayError, conceal_in_errors
from proxy.domain.tracecontext import TraceContext
from proxy.infra import otel
from proxy.infra.backends._errors import (
    _client_gone,
    is_html,
    page_not_stream,
    read_limited,
    read_whole,
    timeout_error,
    transport_errors,
)
from proxy.infra.backends._pump import _Dropped, _Silent, pump_stream
from proxy.infra.backends._types import BatchSink, StreamParser
from proxy.infra.transport import PooledTransport, when_body_done
from proxy.infra.urls import without_credentials

_log = logging.getLogger("llm_proxy.backends")


# A replica that could not be reached is set aside this long, doubled for each failure in a
# row up to the maximum; its next request afterwards is the probe that brings it back.
SET_ASIDE_SECONDS = 5.0
SET_ASIDE_MAX_SECONDS = 60.0

# Answers that say the replica cannot serve now rather than that the request is wrong: the
# request goes to another replica (nothing was generated), once per replica. A replica is set
# aside at once for a gateway's or server's outage (502, 503, 504; Anthropic's 529 overloaded),
# but only after this many 429s or 500s in a row, which one odd request can cause.
_REFUSALS = frozenset({429, 500, 502, 503, 504, 529})
_REFUSALS_TOLERATED = frozenset({429, 500})
REFUSALS_IN_A_ROW = 3


@dataclass(slots=True, frozen=True)
class ReplicaState:
    """One replica as the gateway sees it now: for `/ready` and the metrics."""

    url: str
    in_flight: int
    set_aside_for: float  # seconds until it gets requests again; 0 when it does
    reason: str  # why it was set aside last ("" if never)


@dataclass(slots=True, eq=False)
class _Replica:
    """One base URL of a backend, with its own connection pool."""

    base: str
    transport: PooledTransport
    headers: dict[str, str]
    shown: str  # the base as logs and metrics name it: without credentials written into it
    urls: dict[str, httpx.URL] = field(default_factory=dict)
    in_flight: int = 0
    failures: int = 0
    set_aside_until: float = -math.inf
    reason: str = ""
    refusals: int = 0  # 429 and 500 answers in a row
    # Requests in flight that test whether it is back, its time set aside over: until one has
    # answered, the others go elsewhere (a hung replica would hold them all for its patience).
    probes: int = 0

    def resting(self, now: float) -> bool:
        """Gets no request now (but a first attempt, when every replica rests)."""
        return self.set_aside_until > now or (self.failures > 0 and self.probes > 0)

    def url(self, path: str) -> httpx.URL:
        """`path` under the base URL; one starting `/../` under the server's root instead
        (the base without its `/v1`), where vLLM serves `/tokenize`."""
        url = self.urls.get(path)
        if url is None:
            at_root = path.startswith("/../")
            url = self.urls[path] = httpx.URL(self.base.removesuffix("/v1") + path[3:] if at_root else self.base + path)
        return url

    def set_aside(self, now: float, at_least: float = 0.0) -> float:
        self.failures += 1
        seconds = min(max(SET_ASIDE_SECONDS * 2.0 ** (self.failures - 1), at_least), SET_ASIDE_MAX_SECONDS)
        self.set_aside_until = now + seconds
        return seconds


class Served:
    """Which replica answered a request's last backend call, and the ones it left for another
    on the way (down, full or silent), for its log line (set only for backends with several)."""

    __slots__ = ("passed_over", "replica")

    def __init__(self) -> None:
        self.replica: str | None = None
        self.passed_over: list[str] = []


class _Prefixed(httpx.AsyncByteStream):
    """A response body whose first chunk was read already: that chunk, then the rest."""

    def __init__(self, first: bytes, rest: AsyncIterator[bytes]) -> None:
        self._first = first
        self._rest = rest

    def __aiter__(self) -> _Prefixed:
        return self

    async def __anext__(self) -> bytes:
        if self._first:
            first, self._first = self._first, b""
            return first
        return await self._rest.__anext__()

    async def aclose(self) -> None:
        await cast(httpx.AsyncByteStream, self._rest).aclose()


# Set by whoever runs a request's backend calls (in the task that makes them).
current_served: ContextVar[Served | None] = ContextVar("current_served", default=None)
# The W3C trace of the client request whose backend calls run in this context (set per
# request by the app; None: tracing off, or a task of the gateway's own, such as the
# background listing): each attempt carries it.
current_trace: ContextVar[TraceContext | None] = ContextVar("current_trace", default=None)


class BackendClient:
    """One backend's pooled HTTP client: httpx's request and response models over our
    `PooledTransport`, without httpx.AsyncClient's per-request machinery (cookies, auth
    flows, redirects, URL merging) that a gateway calling one fixed server never needs —
    it cost a fifth of the gateway's CPU per request.

    A backend with replicas (several base URLs) sends each request to the replica with the
    fewest requests in flight (streams count until they end). One that cannot be reached,
    drops the connection before its response head (a stream's: before its first byte), or
    answers 502, 503, 504 or 529 is set aside for a while (one answering 429 or 500: once it
    did so a few times in a row), and the request goes to the next one: nothing of it
    reached the client."""

    def __init__(self, config: BackendConfig, *, auth_header: dict[str, str]) -> None:
        timeouts = config.timeouts
        self._name = config.name
        self._traced = config.trace_context
        # A backend not told the trace still gets its attempts' spans, with span export on
        # (set up before the gateway's backends are made).
        self._spans_only = not self._traced and otel.TRACING is not None
        self._replicas = [self._replica(url, config, auth_header) for url in config.urls]
        self._timeout = {"connect": timeouts.connect, "read": None, "write": timeouts.connect, "pool": timeouts.connect}
        self._failover = timeouts.failover
        # The budget a call made without a deadline of its own is shared from.
        self._budget = timeouts.total if timeouts.total is not None else timeouts.first_token
        self._turn = 0
        self._on_failover: Callable[[str], None] | None = None

    def watch_failovers(self, hook: Callable[[str], None]) -> None:
        """Call `hook(replica_url)` whenever a request leaves a replica for another (the metrics
        count them where every worker's counts add up)."""
        self._on_failover = hook

    @staticmethod
    def _replica(base: str, config: BackendConfig, auth_header: dict[str, str]) -> _Replica:
        # Under uvicorn's (vLLM's) and cpp-httplib's (llama.cpp's) 5 s keep-alive: a connection
        # they may be closing right now is not taken.
        transport = PooledTransport(
            max_connections=config.max_connections, max_keepalive=config.max_connections, keepalive_expiry=4.0
        )
        host = httpx.URL(base).netloc.decode()
        headers = {"host": host, "accept-encoding": "identity", "user-agent": "llm-proxy", **auth_header}
        base = base.rstrip("/")
        return _Replica(base, transport, headers, without_credentials(base))

    def _pick(self, tried: list[_Replica]) -> _Replica | None:
        """The replica for the next attempt: one that is not set aside, with the fewest
        requests in flight (ties go round in turn), not tried yet for this request. A first
        attempt goes to the one whose time is nearest up when every one is set aside; a
        second one only to a replica that is up (None: there is none)."""
        replicas = self._replicas
        count = len(replicas)
        if count == 1:
            return None if tried else replicas[0]
        now = trio.current_time()
        self._turn = turn = (self._turn + 1) % count
        best: _Replica | None = None
        best_rank = (True, 0, 0.0)
        for offset in range(count):
            replica = replicas[(turn + offset) % count]
            if replica in tried:
                continue
            aside = replica.resting(now)
            if aside and tried:
                continue
            rank = (aside, replica.in_flight if not aside else 0, replica.set_aside_until if aside else 0.0)
            if best is None or rank < best_rank:
                best, best_rank = replica, rank
        return best

    def _standby_exists(self, tried: list[_Replica]) -> bool:
        """Another replica, not tried yet for this request and not set aside, could take it."""
        now = trio.current_time()
        return any(replica not in tried and not replica.resting(now) for replica in self._replicas)

    def _patience(self, budget: float) -> float:
        """How long one replica may stay silent (no response head; for a stream, no byte)
        before the request goes to another: `timeouts.failover`, or else the request's
        `budget` (seconds) shared evenly among the replicas, so that a hung replica costs
        one share and trying every replica in turn still fits in the time one server would
        have had. A call without a deadline (`budget` infinite) shares the backend's `total`
        instead: a silent replica is still left for another. A single replica waits as long
        as it always has."""
        if len(self._replicas) == 1:
            return math.inf
        if self._failover is not None:
            return self._failover
        if budget == math.inf and self._budget is not None:
            budget = self._budget
        return max(budget, 0.0) / len(self._replicas)

    async def send(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """The response with its body open (`stream=True`: the caller must `aclose()` it) or read.

        A whole answer (`stream=False`) from a replica that has not sent its response head
        within its share of the caller's deadline is asked of another replica instead."""
        patience = math.inf
        if not stream and len(self._replicas) > 1:
            patience = self._patience(trio.current_effective_deadline() - trio.current_time())
        tried: list[_Replica] = []
        while True:
            response, replica, _ = await self._open(method, path, content, headers, params, tried, patience, settle=True)
            if stream:
                # The replica's count of requests in flight drops when the stream is closed.
                response.extensions["llm_proxy.replica"] = replica
                return response
            try:
                await read_whole(response, self._name)
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                # Its head, then the connection went before the body was whole (a worker that
                # died generating): nothing reached the client, so another replica may answer.
                if _client_gone():
                    raise
                why = f"it closed the connection in the middle of its answer ({exc or type(exc).__name__})"
                if not self._standby_exists(tried):
                    self._set_aside(replica, why)
                    raise
                self._move_off(replica, why)
                continue
            finally:
                replica.in_flight -= 1
                await response.aclose()
            return response

    async def open_heard(
        self, method: str, path: str, *, content: bytes, headers: dict[str, str], stream: bool
    ) -> httpx.Response:
        """The response, its body open (the caller must `close` it), of the first replica
        heard from: a whole answer's head, or a stream's first byte (read, and given back
        first by the response's stream), within the replica's share of the caller's deadline
        (its first-token clock, for a stream). One silent that long, while another could take
        the request, is left for it, as `stream_into` does for chats: the caller relays the
        bytes as they come, so nothing has reached its client yet."""
        now = trio.current_time()
        patience = self._patience(trio.current_effective_deadline() - now)
        tried: list[_Replica] = []
        while True:
            response, replica, quiet_until = await self._open(
                method, path, content, headers, None, tried, patience, settle=not stream
            )
            response.extensions["llm_proxy.replica"] = replica
            probing = bool(response.extensions.pop("llm_proxy.probe", False))
            if not stream or quiet_until == math.inf or response.status_code >= 400:
                if probing:  # an answer (an error's too): the replica is well
                    self._settle(replica, True, well=True)
                return response
            chunks = cast(httpx.AsyncByteStream, response.stream).__aiter__()
            heard = False
            dropped: httpx.TransportError | None = None
            try:
                with trio.move_on_at(quiet_until):
                    try:
                        first = await chunks.__anext__()
                    except StopAsyncIteration:
                        first = b""
                    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                        if _client_gone():
                            raise
                        dropped = exc
                    heard = dropped is None
            finally:
                self._settle(replica, probing, well=heard)
                if not heard:
                    with trio.CancelScope(shield=True):
                        await self.close(response)
            if heard:
                response.stream = _Prefixed(first, chunks)
                return response
            if dropped is not None:
                # Its head, then the connection went: as for a chat's stream, nothing reached
                # the client, and another replica may answer.
                why = "it closed the connection after its response head, before its first byte"
                if not self._standby_exists(tried):
                    self._set_aside(replica, why)
                    raise dropped
                self._move_off(replica, why)
                continue
            # Closed above, unread: the replica saw its client go. Nothing reached ours.
            self._move_off(replica, f"it sent no first byte within {patience:g}s")

    async def _open(
        self,
        method: str,
        path: str,
        content: bytes | None,
        headers: dict[str, str] | None,
        params: dict[str, Any] | None,
        tried: list[_Replica],
        patience: float = math.inf,
        *,
        settle: bool,
    ) -> tuple[httpx.Response, _Replica, float]:
        """The response head from the first replica that gives one, and until when (if
        another replica could stand in) it may stay silent after it.

        `tried` (the replicas this request has been to, extended here) lets a caller that
        gave up on a replica after its head ask again elsewhere. Its head shows the replica
        well (`settle`), unless it may still be found silent: then the caller says so
        (`_settle`) once it knows."""
        replica = self._pick(tried)
        if replica is None:  # every other replica was set aside meanwhile
            raise timeout_error(self._name, "sent nothing, and no other replica could take the request", None)
        while True:
            tried.append(replica)
            url = replica.url(path)
            if params:
                url = url.copy_merge_params(params)
            sent = {**replica.headers, **headers} if headers else replica.headers
            span = None
            if self._traced and (trace := current_trace.get()) is not None:
                if trace.span is None:
                    sent = {**sent, **trace.outgoing()}
                else:
                    span, sent = self._attempt_span(trace, method, replica, path, sent)
            elif self._spans_only and (trace := current_trace.get()) is not None and trace.span is not None:
                span, sent = self._attempt_span(trace, method, replica, path, sent)
            request = httpx.Request(method, url, headers=sent, content=content, extensions={"timeout": self._timeout})
            # Only while another replica could take the request is a silent one given up on.
            quiet_until = math.inf
            if patience < math.inf and self._standby_exists(tried):
                quiet_until = trio.current_time() + patience
            replica.in_flight += 1
            probing = replica.failures > 0
            replica.probes += probing
            try:
                with trio.move_on_at(quiet_until) as quiet:
                    if span is None:
                        response = await replica.transport.handle_async_request(request)
                    else:
                        response = await _traced_request(replica.transport, request, span)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                replica.in_flight -= 1
                replica.probes -= probing
                standby = self._pick(tried)
                if standby is None:
                    self._set_aside(replica, exc)
                    raise
                self._move_off(replica, exc)
                replica = standby
                continue
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # The connection went before a response head (a crashed worker behind a load
                # balancer, a restarting container; a stale pooled one is retried below us):
                # nothing reached the client, so another replica may answer, as nginx's
                # `proxy_next_upstream error` does. Not when our client's leaving closed it.
                replica.in_flight -= 1
                replica.probes -= probing
                if _client_gone():
                    raise
                why = f"it closed the connection before answering ({exc or type(exc).__name__})"
                standby = self._pick(tried)
                if standby is None:
                    self._set_aside(replica, why)
                    raise
                self._move_off(replica, why)
                replica = standby
                continue
            except BaseException:
                replica.in_flight -= 1
                replica.probes -= probing
                raise
            if quiet.cancelled_caught:
                # Cancelling the request closed its connection: the replica sees its client go.
                replica.in_flight -= 1
                replica.probes -= probing
                standby = self._pick(tried)
                why = f"it sent no response head within {patience:g}s"
                if standby is None:  # the others were set aside meanwhile: nowhere to go
                    self._set_aside(replica, why)
                    raise timeout_error(self._name, "sent no response head", patience)
                self._move_off(replica, why)
                replica = standby
                continue
            status = response.status_code
            if status in _REFUSALS:
                # Not well, whatever else comes: its failures are not forgotten.
                self._settle(replica, probing, well=False)
                replica.refusals += 1
                why = f"it answered {status}"
                down = probing or status not in _REFUSALS_TOLERATED or replica.refusals >= REFUSALS_IN_A_ROW
                # A 429's or 503's `Retry-After` says how long it wants to be left alone.
                wait = _seconds(response.headers.get("retry-after"))
                if (standby := self._pick(tried)) is not None:
                    replica.in_flight -= 1
                    await response.aclose()
                    self._move_off(replica, why, set_aside=down, at_least=wait)
                    replica = standby
                    continue
                if down:
                    self._set_aside(replica, why, at_least=wait)
            elif settle or quiet_until == math.inf:
                self._settle(replica, probing, well=True)
            elif probing:
                response.extensions["llm_proxy.probe"] = True
            if len(self._replicas) > 1 and (served := current_served.get()) is not None:
                served.replica = replica.shown
            if 300 <= response.status_code < 400:
                # Following it would re-send a POST where the configuration did not say: name it.
                replica.in_flight -= 1
                if response.extensions.pop("llm_proxy.probe", False):
                    self._settle(replica, True, well=True)
                await response.aclose()
                # Where it points is an address (a server's own redirect names its host):
                # for the log, never for the client.
                _log.warning(
                    "backend %s: replica %s answered %d, a redirect to %s; set its base_url to where it points",
                    self._name, replica.shown, response.status_code, response.headers.get("location") or "nowhere",
                )
                raise GatewayError(
                    ErrorKind.BACKEND,
                    f"Backend `{self._name}` answered {response.status_code}, a redirect; the gateway does not "
                    "follow redirects: set its `base_url` to where it points (the gateway's log names it).",
                    code=f"backend_{response.status_code}",
                )
            return response, replica, quiet_until

    def _attempt_span(
        self, trace: TraceContext, method: str, replica: _Replica, path: str, sent: dict[str, str]
    ) -> tuple[Any, dict[str, str]]:
        """The attempt's own span, and the headers it is sent with: the span's context is the
        traceparent the backend gets (none for a backend with `trace_context = false`)."""
        tracing = otel.TRACING
        if tracing is None:  # stopped meanwhile
            return None, {**sent, **trace.outgoing()} if self._traced else sent
        span, outgoing = tracing.attempt(trace, method, replica.shown + path, replica.headers["host"], self._traced)
        return span, {**sent, **outgoing}

    def replicas(self) -> list[ReplicaState]:
        now = trio.current_time()
        return [
            ReplicaState(
                replica.shown, replica.in_flight, max(0.0, replica.set_aside_until - now), replica.reason,
            )
            for replica in self._replicas
        ]

    @staticmethod
    def _settle(replica: _Replica, probing: bool, *, well: bool) -> None:
        """A request to `replica` has shown whether it is well (its head, or for a stream
        that could be found silent, its first byte): a probe is over, and a well replica's
        failures are forgotten."""
        replica.probes -= probing
        if well:
            replica.failures, replica.refusals, replica.set_aside_until = 0, 0, -math.inf

    def _move_off(self, replica: _Replica, why: object, *, set_aside: bool = True, at_least: float = 0.0) -> None:
        """This request leaves `replica` for another one: counted, named in its log line,
        and the replica set aside (unless `set_aside` is false)."""
        if self._on_failover is not None:
            self._on_failover(replica.shown)
        if (served := current_served.get()) is not None:
            served.passed_over.append(replica.shown)
        if set_aside:
            self._set_aside(replica, why, moved=True, at_least=at_least)
        else:
            _log.info("backend %s: replica %s: %s; trying another", self._name, replica.shown, why)

    def _set_aside(self, replica: _Replica, why: object, *, moved: bool = False, at_least: float = 0.0) -> None:
        """`replica` failed: it gets no request for a while (the last one left, too: when
        every replica is down, `/ready` and the metrics say so). A single server is never
        set aside: there is no other to send its requests to."""
        if len(self._replicas) == 1:
            return
        now = trio.current_time()
        if replica.set_aside_until > now:
            # The requests it had in flight when it failed fail too: one incident, counted once.
            return
        seconds = replica.set_aside(now, at_least)
        replica.reason = str(why)
        _log.warning(
            "backend %s: replica %s set aside for %gs (%s); %s", self._name, replica.shown, seconds, why,
            "trying another" if moved else "no other replica could take the request",
        )

    @staticmethod
    async def close(response: httpx.Response) -> None:
        """Close a response `send(stream=True)` returned."""
        replica = response.extensions.pop("llm_proxy.replica", None)
        if replica is not None:
            replica.in_flight -= 1
        await response.aclose()

    async def post(self, path: str, *, content: bytes | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.send("POST", path, content=content, headers=headers)

    async def get(self, path: str, *, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.send("GET", path, headers=headers, params=params)

    async def stream_into(
        self,
        path: str,
        body: bytes,
        parser: StreamParser,
        send: BatchSink,
        *,
        backend: str,
        timeouts: Timeouts,
        headers: dict[str, str],
        error: Callable[[httpx.Response, bytes], GatewayError],
        relay_raw: bool = False,
    ) -> None:
        """POST `body` to `path` and pump the streamed answer through `parser` into `send`.

        The first-token clock covers the wait for the response head too: a backend that
        queues the request before answering is as silent as one that stalls after it. An
        error status becomes `error(response, body)`, raised before anything was sent.

        With replicas, one that has sent no byte of its answer (head or body) within its
        patience is left, its request closed, and the stream asked of another replica,
        within the same first-token clock: the client has received nothing yet."""
        now = trio.current_time()
        first_deadline = now + (timeouts.first_token or math.inf)
        patience = self._patience(min(first_deadline, trio.current_effective_deadline()) - now)
        tried: list[_Replica] = []
        while True:
            with trio.move_on_at(first_deadline) as head_scope, transport_errors(backend):
                response, replica, quiet_until = await self._open(
                    "POST", path, body, headers, None, tried, patience, settle=False
                )
                response.extensions["llm_proxy.replica"] = replica
            if head_scope.cancelled_caught:
                raise timeout_error(backend, "sent no first token", timeouts.first_token)
            unsettled = quiet_until < math.inf
            probing = bool(response.extensions.pop("llm_proxy.probe", False))

            def heard(replica: _Replica = replica, probing: bool = probing) -> None:
                nonlocal unsettled
                unsettled = False
                self._settle(replica, probing, well=True)

            try:
                if response.status_code in _REFUSALS:
                    unsettled = False  # settled when its head came: not well
                elif response.status_code >= 400 or quiet_until >= first_deadline:
                    heard()  # an answer (a client error's too), or a replica never to be left
                if response.status_code >= 400:
                    with transport_errors(backend):
                        raise error(response, await read_limited(response))
                if is_html(response):
                    heard()
                    raise await page_not_stream(backend, response)
                await pump_stream(
                    response, parser, send, backend=backend, timeouts=timeouts,
                    first_deadline=first_deadline, relay_raw=relay_raw,
                    quiet_until=quiet_until if unsettled else math.inf, on_heard=heard,
                )
                return
            except _Silent:
                why = f"it sent no first byte within {patience:g}s"
            except _Dropped as dropped:
                # Its head, then the connection went (a worker dying in prefill): nothing
                # reached the client, so another replica may answer, as before a head.
                if _client_gone():
                    raise dropped.error from None
                why = "it closed the connection after its response head, before its first byte"
                if not self._standby_exists(tried):
                    self._set_aside(replica, why)
                    raise dropped.error from None
            finally:
                if unsettled:  # silent, or gone before a byte: not shown well
                    self._settle(replica, probing, well=False)
                with trio.CancelScope(shield=True):
                    await self.close(response)
            # Closed above, unread: the replica saw its client go. Nothing reached ours.
            self._move_off(replica, why)

    async def aclose(self) -> None:
        for replica in self._replicas:
            await replica.transport.aclose()


def _seconds(retry_after: str | None) -> float:
    """A `Retry-After` in seconds (its HTTP-date form is not worth a clock: 0)."""
    try:
        return max(float(retry_after), 0.0) if retry_after is not None else 0.0
    except ValueError:
        return 0.0


# The headers that carry a backend's API key (`Authorization: Bearer KEY`, `x-api-key: KEY`).
_CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})


def path_segment(name: str) -> str:
    """`name` (a model's) as one segment of a backend's path: `/`, `?`, `#` quoted, and a dot
    segment (`.`, `..`), which URL resolution would remove (or climb with), spelled with
    quoted dots."""
    quoted = quote(name, safe=":@")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def create_client(config: BackendConfig, *, auth_header: dict[str, str]) -> BackendClient:
    """One pooled client per backend, kept for the process's life. Its credentials never
    reach a client: a backend's error quoting them has them concealed."""
    for name, value in auth_header.items():
        if name.lower() in _CREDENTIAL_HEADERS:
            conceal_in_errors(value.removeprefix("Bearer "))
    return BackendClient(config, auth_header=auth_header)


async def _traced_request(transport: PooledTransport, request: httpx.Request, span: Any) -> httpx.Response:
    """`request`'s response head, its attempt's span ending with its body (read, closed or
    broken off), or now if no head came."""
    tracing = otel.TRACING
    try:
        response = await transport.handle_async_request(request)
    except BaseException as error:
        if tracing is not None:
            tracing.failed(span, error)
        raise
    if tracing is not None:
        tracing.answered(span, response.status_code)
    when_body_done(response, span.end)
    return response
