"""What every backend adapter provides, and the pieces they share."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

import httpx
import trio

from proxy.config import BackendConfig, Timeouts
from proxy.domain.chat import ChatCompletion, ChatRequest
from proxy.domain.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    ErrorKind,
    GatewayError,
    is_context_overflow,
)
from proxy.domain.events import CompletionBuilder, StreamEvent
from proxy.infra.transport import PooledTransport, current_hangup


@dataclass(slots=True)
class Batch:
    """What one read from a backend produced.

    `raw` is the same content already rendered as OpenAI SSE, present only when the backend
    speaks OpenAI and the caller asked for it (the byte-exact relay). `done` marks the batch
    after which the client's stream is complete. A non-streaming exchange yields a single
    batch carrying `completion` (and `raw` JSON when relayable). An empty batch (no event, no
    raw, not done) is a keep-alive: the backend is alive with nothing new to say.
    """

    events: list[StreamEvent]
    raw: bytes | None = None
    done: bool = False
    completion: ChatCompletion | None = None

    def whole(self) -> ChatCompletion:
        """The answer of a non-streaming exchange's batch: as the backend gave it, or folded
        from its events (a replay, a route's producer)."""
        if self.completion is not None:
            return self.completion
        builder = CompletionBuilder()
        for event in self.events:
            builder.add(event)
        return builder.build()


@dataclass(slots=True)
class BackendCall:
    request: ChatRequest
    upstream_model: str
    relay_openai: bool = False
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class ModelInfo:
    id: str
    backend: str
    created: int = 0
    owned_by: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class ParsedOutput(Protocol):
    @property
    def events(self) -> list[StreamEvent]: ...

    @property
    def raw(self) -> bytes | None: ...

    @property
    def done(self) -> bool: ...


class StreamParser(Protocol):
    """A sans-IO parser of one backend stream (e.g. `openai.StreamRelay`)."""

    failed: bool

    def feed(self, data: bytes) -> ParsedOutput: ...

    def close(self) -> ParsedOutput: ...


class BatchSink(Protocol):
    """Where a backend's batches go: the exchange's memory channel, or a wrapper around it."""

    async def send(self, value: Batch, /) -> None: ...


class Backend(Protocol):
    """A backend adapter. `stream` sends batches into `send` and returns when the stream is
    complete; both calls raise `GatewayError` for failures before their first batch."""

    config: BackendConfig

    async def stream(self, call: BackendCall, send: BatchSink) -> None: ...

    async def complete(self, call: BackendCall) -> Batch: ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def check(self) -> None: ...

    def replicas(self) -> list[ReplicaState]: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class EmbeddingCall:
    """An embeddings request for a backend: `inputs` are texts, or token-id arrays for
    backends that take them (OpenAI-compatible ones)."""

    upstream_model: str
    inputs: list[str] | list[list[int]]
    dimensions: int | None = None
    truncate: bool | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # The client's other fields when it speaks this backend's dialect (an OpenAI client's
    # `user`, vLLM's `truncate_prompt_tokens`, …; an Ollama client's `options`, `keep_alive`),
    # sent as they came.
    extra: dict[str, Any] = field(default_factory=dict)
    # Ollama's legacy `/api/embeddings` (one prompt, the model's raw vector): an Ollama backend
    # is asked there too; other backends have one embeddings API.
    legacy: bool = False


@dataclass(slots=True)
class EmbeddingOutput:
    vectors: list[list[float]]
    prompt_tokens: int | None = None


@runtime_checkable
class EmbeddingBackend(Protocol):
    """A backend with an embeddings API; raises `GatewayError` like the chat calls."""

    config: BackendConfig

    async def embed(self, call: EmbeddingCall) -> EmbeddingOutput: ...


@runtime_checkable
class RelayBackend(Protocol):
    """A backend with OpenAI-compatible APIs the gateway relays as they are, without domain
    translation: legacy text completions (`/completions`), rerank (`/rerank`).

    `relays` names the API paths it serves. `open_relay` sends `body` (the client's, its
    model already the upstream one) to `path` under the backend's OpenAI-compatible API root
    and returns the response with its body open, whatever its status; the caller must close
    it with `BackendClient.close`. A replica silent for its share of the caller's deadline is
    left for another (`BackendClient.open_heard`). Transport failures are httpx's: the
    caller maps them."""

    config: BackendConfig
    relays: frozenset[str]

    async def open_relay(self, path: str, body: bytes, headers: dict[str, str], *, stream: bool) -> httpx.Response: ...


def embedding_vectors(items: Any, backend: str, expected: int) -> list[list[float]]:
    """Validate a backend's list of vectors: `expected` of them, all numbers."""
    if not isinstance(items, list) or len(items) != expected:
        raise GatewayError(ErrorKind.BACKEND, f"Backend `{backend}` returned {len(items) if isinstance(items, list) else 'no'} embeddings for {expected} inputs.")
    for vector in items:
        if not isinstance(vector, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vector):
            raise GatewayError(ErrorKind.BACKEND, f"Backend `{backend}` returned an embedding that is not a list of numbers.")
    return items


# A replica that could not be reached is set aside this long, doubled for each failure in a
# row up to the maximum; its next request afterwards is the probe that brings it back.
SET_ASIDE_SECONDS = 5.0
SET_ASIDE_MAX_SECONDS = 60.0


@dataclass(slots=True, frozen=True)
class ReplicaState:
    """One replica as the gateway sees it now: for `/ready` and the metrics."""

    url: str
    in_flight: int
    set_aside_for: float  # seconds until it gets requests again; 0 when it does
    reason: str  # why it was set aside last ("" if never)
    failovers: int = 0  # requests moved from it to another replica, since the start


@dataclass(slots=True, eq=False)
class _Replica:
    """One base URL of a backend, with its own connection pool."""

    base: str
    transport: PooledTransport
    headers: dict[str, str]
    urls: dict[str, httpx.URL] = field(default_factory=dict)
    in_flight: int = 0
    failures: int = 0
    set_aside_until: float = -math.inf
    reason: str = ""
    failovers: int = 0
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

    def set_aside(self, now: float) -> float:
        self.failures += 1
        seconds = min(SET_ASIDE_SECONDS * 2.0 ** (self.failures - 1), SET_ASIDE_MAX_SECONDS)
        self.set_aside_until = now + seconds
        return seconds


class Served:
    """Which replica answered a request's last backend call, and the ones it left for another
    on the way (down, full or silent), for its log line (set only for backends with several)."""

    __slots__ = ("passed_over", "replica")

    def __init__(self) -> None:
        self.replica: str | None = None
        self.passed_over: list[str] = []


class _Silent(Exception):
    """The replica of a stream's attempt sent no byte within its patience, and another one
    can take the request."""


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


class BackendClient:
    """One backend's pooled HTTP client: httpx's request and response models over our
    `PooledTransport`, without httpx.AsyncClient's per-request machinery (cookies, auth
    flows, redirects, URL merging) that a gateway calling one fixed server never needs —
    it cost a fifth of the gateway's CPU per request.

    A backend with replicas (several base URLs) sends each request to the replica with the
    fewest requests in flight (streams count until they end). One that cannot be reached,
    drops the connection before its response head, or answers 503 is set aside for a while,
    and the request goes to the next one: nothing of it reached the client."""

    def __init__(self, config: BackendConfig, *, auth_header: dict[str, str]) -> None:
        timeouts = config.timeouts
        self._name = config.name
        self._replicas = [self._replica(url, config, auth_header) for url in config.urls]
        self._timeout = {"connect": timeouts.connect, "read": None, "write": timeouts.connect, "pool": timeouts.connect}
        self._failover = timeouts.failover
        self._turn = 0

    @staticmethod
    def _replica(base: str, config: BackendConfig, auth_header: dict[str, str]) -> _Replica:
        # Under uvicorn's (vLLM's) and cpp-httplib's (llama.cpp's) 5 s keep-alive: a connection
        # they may be closing right now is not taken.
        transport = PooledTransport(
            max_connections=config.max_connections, max_keepalive=config.max_connections, keepalive_expiry=4.0
        )
        host = httpx.URL(base).netloc.decode()
        headers = {"host": host, "accept-encoding": "identity", "user-agent": "llm-proxy", **auth_header}
        return _Replica(base.rstrip("/"), transport, headers)

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
        have had. A single replica waits as long as it always has."""
        if len(self._replicas) == 1:
            return math.inf
        if self._failover is not None:
            return self._failover
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
        response, replica, _ = await self._open(method, path, content, headers, params, [], patience, settle=True)
        if stream:
            # The replica's count of requests in flight drops when the stream is closed.
            response.extensions["llm_proxy.replica"] = replica
            return response
        try:
            await response.aread()
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
            try:
                with trio.move_on_at(quiet_until):
                    try:
                        first = await chunks.__anext__()
                    except StopAsyncIteration:
                        first = b""
                    heard = True
            finally:
                self._settle(replica, probing, well=heard)
                if not heard:
                    with trio.CancelScope(shield=True):
                        await self.close(response)
            if heard:
                response.stream = _Prefixed(first, chunks)
                return response
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
            request = httpx.Request(
                method, url, headers={**replica.headers, **headers} if headers else replica.headers,
                content=content, extensions={"timeout": self._timeout},
            )
            # Only while another replica could take the request is a silent one given up on.
            quiet_until = math.inf
            if patience < math.inf and self._standby_exists(tried):
                quiet_until = trio.current_time() + patience
            replica.in_flight += 1
            probing = replica.failures > 0
            replica.probes += probing
            try:
                with trio.move_on_at(quiet_until) as quiet:
                    response = await replica.transport.handle_async_request(request)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                replica.in_flight -= 1
                replica.probes -= probing
                standby = self._pick(tried)
                if standby is None:
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
                standby = None if _client_gone() else self._pick(tried)
                if standby is None:
                    raise
                self._move_off(replica, f"it closed the connection before answering ({exc or type(exc).__name__})")
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
            if response.status_code == 503 and (standby := self._pick(tried)) is not None:
                replica.in_flight -= 1
                replica.probes -= probing
                await response.aclose()
                self._move_off(replica, "it answered 503")
                replica = standby
                continue
            if settle or quiet_until == math.inf:
                self._settle(replica, probing, well=True)
            elif probing:
                response.extensions["llm_proxy.probe"] = True
            if len(self._replicas) > 1 and (served := current_served.get()) is not None:
                served.replica = replica.base
            if 300 <= response.status_code < 400:
                # Following it would re-send a POST where the configuration did not say: name it.
                replica.in_flight -= 1
                if response.extensions.pop("llm_proxy.probe", False):
                    self._settle(replica, True, well=True)
                await response.aclose()
                location = response.headers.get("location") or "nowhere"
                raise GatewayError(
                    ErrorKind.BACKEND,
                    f"Backend `{self._name}` answered {response.status_code}, a redirect to {location}; "
                    "the gateway does not follow redirects: set its `base_url` to where it points.",
                    code=f"backend_{response.status_code}",
                )
            return response, replica, quiet_until

    def replicas(self) -> list[ReplicaState]:
        now = trio.current_time()
        return [
            ReplicaState(
                replica.base, replica.in_flight, max(0.0, replica.set_aside_until - now), replica.reason,
                replica.failovers,
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
            replica.failures, replica.set_aside_until = 0, -math.inf

    def _move_off(self, replica: _Replica, why: object) -> None:
        """This request leaves `replica` for another one: counted, named in its log line,
        and the replica set aside."""
        replica.failovers += 1
        if (served := current_served.get()) is not None:
            served.passed_over.append(replica.base)
        self._set_aside(replica, why)

    def _set_aside(self, replica: _Replica, why: object) -> None:
        now = trio.current_time()
        if replica.set_aside_until > now:
            # The requests it had in flight when it failed fail too: one incident, counted once.
            return
        seconds = replica.set_aside(now)
        replica.reason = str(why)
        _log.warning(
            "backend %s: replica %s set aside for %gs (%s); trying another", self._name, replica.base, seconds, why
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
                if response.status_code >= 400 or quiet_until >= first_deadline:
                    heard()  # an answer (an error's too), or a replica never to be left
                if response.status_code >= 400:
                    with transport_errors(backend):
                        raise error(response, await read_limited(response))
                await pump_stream(
                    response, parser, send, backend=backend, timeouts=timeouts,
                    first_deadline=first_deadline, relay_raw=relay_raw,
                    quiet_until=quiet_until if unsettled else math.inf, on_heard=heard,
                )
                return
            except _Silent:
                pass
            finally:
                if unsettled:  # silent, or gone before a byte: not shown well
                    self._settle(replica, probing, well=False)
                with trio.CancelScope(shield=True):
                    await self.close(response)
            # Closed above, unread: the replica saw its client go. Nothing reached ours.
            self._move_off(replica, f"it sent no first byte within {patience:g}s")

    async def aclose(self) -> None:
        for replica in self._replicas:
            await replica.transport.aclose()


def create_client(config: BackendConfig, *, auth_header: dict[str, str]) -> BackendClient:
    """One pooled client per backend, kept for the process's life."""
    return BackendClient(config, auth_header=auth_header)


def status_error(
    backend: str, status: int, message: str | None, retry_after: str | None = None, *, param: str | None = None
) -> GatewayError:
    """Map a backend's HTTP error onto the client-facing one.

    Client mistakes the backend caught (400, 404, 413, 422) keep their meaning, and the
    field it named (`param`: a FastAPI 422's `loc`) reaches the client; a backend refusing
    the gateway's own credentials is a gateway-side fault (502), never a 401/403 to the
    client, whose auth is the gateway's business.
    """
    text = message or f"HTTP {status}"
    detail = f"Backend `{backend}` returned {status}: {text}"
    kinds = {400: ErrorKind.INVALID_REQUEST, 422: ErrorKind.INVALID_REQUEST, 404: ErrorKind.NOT_FOUND,
             413: ErrorKind.REQUEST_TOO_LARGE, 429: ErrorKind.RATE_LIMITED, 503: ErrorKind.UNAVAILABLE,
             504: ErrorKind.TIMEOUT}
    kind = kinds.get(status, ErrorKind.BACKEND)
    retry: float | None = None
    if retry_after is not None:
        try:
            retry = float(retry_after)
        except ValueError:
            retry = None
    message_out = text if kind in (ErrorKind.INVALID_REQUEST, ErrorKind.NOT_FOUND) else detail
    if kind is ErrorKind.INVALID_REQUEST and is_context_overflow(text):
        return GatewayError(kind, message_out, code=CONTEXT_LENGTH_EXCEEDED, param="messages")
    return GatewayError(
        kind, message_out, code=f"backend_{status}", retry_after=retry,
        param=param if kind is ErrorKind.INVALID_REQUEST else None,
    )


_log = logging.getLogger("llm_proxy.backends")


@contextmanager
def transport_errors(backend: str) -> Iterator[None]:
    """Turn httpx's transport failures into gateway errors (503 unreachable, 504 timeout).

    A failure met while this task is being cancelled is our own doing, not the backend's:
    the client hung up, and its `Hangup` closed the connection under a pending read
    ("another task closed this fd"). It is not logged; the error still propagates, and the
    cancellation ends the task at its next checkpoint."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise GatewayError(
            ErrorKind.TIMEOUT, f"Backend `{backend}` timed out ({type(exc).__name__}).", code="backend_timeout"
        ) from None
    except (httpx.ConnectError, httpx.ProxyError, httpx.UnsupportedProtocol) as exc:
        # The detail names the backend's host and port: for the log, never for the client.
        if not _cancelled():
            _log.warning("backend %s unreachable: %s", backend, exc)
        raise GatewayError(
            ErrorKind.UNAVAILABLE, f"Backend `{backend}` is unreachable.", code="backend_unreachable"
        ) from None
    except httpx.TransportError as exc:
        if not _cancelled():
            _log.warning("backend %s connection failed: %s", backend, exc or type(exc).__name__)
        raise GatewayError(
            ErrorKind.BACKEND, f"Backend `{backend}` connection failed ({type(exc).__name__}).",
            code="backend_connection_error",
        ) from None


def _client_gone() -> bool:
    """This request's client has left: its hang-up closed our connections, or it is being
    cancelled (a failure now is our doing, not the backend's)."""
    hangup = current_hangup.get()
    return (hangup is not None and hangup.fired) or _cancelled()


def _cancelled() -> bool:
    """This task is in a cancelled scope (its next checkpoint raises `Cancelled`)."""
    return trio.current_effective_deadline() == -math.inf


def timeout_error(backend: str, what: str, seconds: float | None) -> GatewayError:
    return GatewayError(
        ErrorKind.TIMEOUT,
        f"Backend `{backend}` {what} within {seconds:g}s." if seconds else f"Backend `{backend}` {what}.",
        code="backend_timeout",
    )


async def read_limited(response: httpx.Response, limit: int = 1 << 20) -> bytes:
    """Read an error body, bounded: a broken backend must not make us buffer gigabytes."""
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        parts.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


# While the backend sends bytes but no event, a keep-alive to the client once it has heard
# nothing for this long, and then at most this often.
KEEPALIVE_SECONDS = 5.0

# Reading what follows the end of a stream lets the connection return to the pool; a backend
# that dawdles over its last bytes costs a fresh connection, not the client's time.
DRAIN_SECONDS = 0.05


async def pump_stream(
    response: httpx.Response,
    parser: StreamParser,
    send: BatchSink,
    *,
    backend: str,
    timeouts: Timeouts,
    first_deadline: float,
    relay_raw: bool,
    quiet_until: float = math.inf,
    on_heard: Callable[[], None] | None = None,
) -> None:
    """Read a streamed body through `parser` into `send`, one batch per read that produced
    something, under the first-token and idle timeouts.

    A backend that has sent no byte by `quiet_until` raises `_Silent` (its replica is given
    up on); once one came (`on_heard` is told), the first-token clock alone applies.

    One cancel scope serves every read: its deadline moves instead of a scope per chunk, and
    it is lifted while a batch is handed over, so a slow client is never mistaken for a
    silent backend.
    """
    chunks = cast(httpx.AsyncByteStream, response.stream).__aiter__()
    idle = timeouts.idle or math.inf
    started = finished = False
    heard = quiet_until >= first_deadline
    next_keepalive = 0.0
    data: bytes | None = b""
    with trio.CancelScope(deadline=min(first_deadline, quiet_until)) as scope, transport_errors(backend):
        while data is not None:
            try:
                data = await chunks.__anext__()
            except StopAsyncIteration:
                data = None
            if not heard:
                # Alive, if slow to its first token: it keeps the request.
                heard = True
                scope.deadline = first_deadline
                if on_heard is not None:
                    on_heard()
            output = parser.feed(data) if data is not None else parser.close()
            if output.events or output.raw:
                if not started:
                    started = True
                    scope.deadline = math.inf  # the first-token clock stops here
                await send.send(Batch(output.events, output.raw if relay_raw else None, output.done))
                # The idle clock restarts once the client took the batch: a slow client is not
                # a silent backend (one deadline update per batch, not per read). The client
                # has just heard something: no keep-alive for a while.
                now = trio.current_time()
                scope.deadline = now + idle
                next_keepalive = now + KEEPALIVE_SECONDS
            elif started and data:
                # Bytes that make no event yet (Anthropic's pings while a server tool runs, an
                # SSE comment, half a frame): the backend is not silent, and the client (and
                # any proxy on its way, with its own read timeout) is told so now and then.
                now = trio.current_time()
                if now >= next_keepalive:
                    next_keepalive = now + KEEPALIVE_SECONDS
                    await send.send(Batch([]))
                scope.deadline = trio.current_time() + idle
            if output.done:
                finished = True
                break
        if data is not None and not parser.failed:
            scope.deadline = trio.current_time() + DRAIN_SECONDS
            async for _ in chunks:
                pass
            return
    if scope.cancelled_caught and not finished:
        if started:
            raise timeout_error(backend, "went silent for longer than the idle timeout", timeouts.idle)
        if not heard:
            raise _Silent
        raise timeout_error(backend, "sent no first token", timeouts.first_token)
