"""A lean HTTP/1.1 transport for httpx on trio, with an O(1) connection pool.

httpcore's pool re-scans every connection for every request and polls each idle socket
(encode/httpcore#1035, #928): with a few dozen warm connections that bookkeeping costs more
than the request itself (stack-ceiling.md measured 12-15 ms of CPU per request at 256). Here
an idle connection is a deque entry: taking one is a pop and a single readability check.

Two more things a gateway needs from its transport:
- Body reads return everything already received (several SSE frames arrive in one read and
  leave in one write), never one chunk-encoding chunk at a time.
- Closing a response before its end closes the socket at once, synchronously, even inside a
  cancelled scope — that FIN is how the backend learns its client has gone.
- A `Hangup` (set in `current_hangup` by whoever runs the request) closes the request's
  connection the moment the client hangs up, before any cancelled task has unwound.
- `ResponseHeads` (in `current_heads`) keeps the latest response head of a client request's
  backend calls, for a surface that passes some of its headers on.
"""

from __future__ import annotations

import ssl
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import h11
import httpx
import trio

from proxy.infra.content_coding import Decoded, decoding, identity_headers

_RECEIVE_SIZE = 65536
_EARLY_ANSWER_SECONDS = 1.0
Origin = tuple[bytes, bytes, int]


class SchemeMismatch:
    """A transport error that most likely means the backend and its base URL's scheme
    disagree on TLS; `hint` says so without the URL (it may carry credentials)."""

    hint: str


class NotTls(SchemeMismatch, httpx.ConnectError):
    hint = "it does not speak TLS, but its base URL says https://"


class SpeaksTls(SchemeMismatch, httpx.RemoteProtocolError):
    hint = "it answered in TLS, but its base URL says http://"


class ClosedUnanswered(SchemeMismatch, httpx.RemoteProtocolError):
    hint = (
        "it closed the connection without answering, as a server speaking TLS does to plain HTTP; "
        "if it speaks TLS, its base URL must say https://"
    )


# OpenSSL's reasons for a handshake answered by something that is not TLS (a plain HTTP
# server's `400 Bad Request`): 3.0 says the first, later versions the others.
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"})


@dataclass(slots=True, eq=False)
class _Connection:
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0
    reused: bool = False
    closed: bool = False
    reusable: bool = True  # False once the request could not be sent whole

    @property
    def socket(self) -> trio.socket.SocketType:
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            return stream.transport_stream.socket
        return stream.socket

    def close(self) -> None:
        """Close now, without a checkpoint: it must happen even when we are cancelled."""
        self.closed = True
        self.socket.close()


class Hangup:
    """The upstream connections one client's request holds, closed at once by `fire()`.

    Cancellation alone closes them too, but only once each cancelled task runs again and
    unwinds; when a hundred clients leave at once, the last of those waits behind the
    others' teardown. `fire()` sends every FIN from the disconnect handler itself."""

    __slots__ = ("_held", "fired")

    def __init__(self) -> None:
        self._held: set[_Connection] = set()
        # A read that fails from now on failed because of the client, not the backend.
        self.fired = False

    def hold(self, conn: _Connection) -> None:
        self._held.add(conn)

    def release(self, conn: _Connection) -> None:
        """`conn` is no longer the request's: closed, or back in the pool for others."""
        self._held.discard(conn)

    def fire(self) -> None:
        self.fired = True
        held, self._held = self._held, set()
        for conn in held:
            conn.close()


current_hangup: ContextVar[Hangup | None] = ContextVar("current_hangup", default=None)


class ResponseHeads:
    """The response head of the latest backend request heard for one client request (set in
    `current_heads` by a surface that passes some of it on). Only requests made under
    `listening()` are heard: the backend calls whose headers mean something to that client,
    not an embedding lookup on the way."""

    __slots__ = ("_listening", "headers")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self._listening = False

    def heard(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        if self._listening:  # copied only then: most backend calls are not listened to
            self.headers = list(headers)

    @contextmanager
    def listening(self) -> Iterator[None]:
        """Hear the heads of the requests made inside; what an earlier call heard is forgotten."""
        self.headers = []
        self._listening = True
        try:
            yield
        finally:
            self._listening = False


current_heads: ContextVar[ResponseHeads | None] = ContextVar("current_heads", default=None)


@contextmanager
def heads_heard() -> Iterator[None]:
    """Around a backend call whose response head the client's surface may pass on."""
    heads = current_heads.get()
    if heads is None:
        yield
        return
    with heads.listening():
        yield


class _StaleConnection(Exception):
    """A reused keep-alive connection turned out closed before the backend saw our request."""


class PooledTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        max_connections: int = 100,
        max_keepalive: int = 32,
        keepalive_expiry: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._slots = trio.Semaphore(max_connections)
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._max_keepalive = max_keepalive
        self._expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._closed = False

    # -- pool ---------------------------------------------------------------------------

    def _checkout(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = trio.current_time()
        while idle:
            conn = idle.pop()
            # A readable idle socket means the server closed it (or sent garbage).
            if conn.closed or now - conn.idle_since > self._expiry or conn.socket.is_readable():
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    def _release(self, origin: Origin, conn: _Connection) -> None:
        # A connection a hang-up closed may still have parsed its whole response from
        # what it had buffered: it is closed all the same, and never pooled.
        # Bytes past the response's end (a stray CRLF, a miscounted Content-Length) would be
        # read as the next request's answer.
        if (
            self._closed or conn.closed or not conn.reusable
            or conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE
            or conn.h11.trailing_data[0]
        ):
            conn.close()
            return
        try:
            conn.h11.start_next_cycle()
        except h11.LocalProtocolError:
            conn.close()
            return
        idle = self._idle.setdefault(origin, deque())
        if len(idle) >= self._max_keepalive:
            idle.popleft().close()
        conn.idle_since = trio.current_time()
        idle.append(conn)

    async def _connect(self, origin: Origin, connect_seconds: float | None) -> _Connection:
        scheme, host, port = origin
        try:
            with trio.fail_after(_seconds(connect_seconds)):
                tcp = await trio.open_tcp_stream(host.decode(), port)
                if scheme != b"https":
                    return _Connection(tcp)
                context = self._ssl_context or _default_ssl_context()
                tls = trio.SSLStream(tcp, context, server_hostname=host.decode())
                await tls.do_handshake()
                return _Connection(tls)
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"connecting to {host.decode()}:{port} timed out") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            cause = exc if isinstance(exc, ssl.SSLError) else exc.__cause__  # trio wraps a handshake's
            where = f"cannot connect to {host.decode()}:{port}"
            if isinstance(cause, ssl.SSLError) and cause.reason in _NOT_TLS:
                raise NotTls(f"{where}: {NotTls.hint} ({cause})") from None
            raise httpx.ConnectError(f"{where}: {exc or cause or type(exc).__name__}") from None

    # -- requests -------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin: Origin = (url.raw_scheme, url.raw_host, url.port or (443 if url.raw_scheme == b"https" else 80))
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        body = await request.aread()
        head = h11.Request(method=request.method, target=url.raw_path, headers=request.headers.raw)
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            try:
                with trio.fail_after(_seconds(timeouts.get("pool"))):
                    await self._slots.acquire()
            except trio.TooSlowError:
                raise httpx.PoolTimeout("no connection to the backend became free in time") from None
        hangup = current_hangup.get()
        try:
            for _attempt in range(2):
                conn = self._checkout(origin) or await self._connect(origin, timeouts.get("connect"))
                if hangup is not None:
                    hangup.hold(conn)
                try:
                    answer = await self._exchange(conn, head, body, timeouts)
                except _StaleConnection:
                    _let_go(hangup, conn)
                    conn.close()
                    continue
                except BaseException:
                    _let_go(hangup, conn)
                    conn.close()
                    raise
                if (heads := current_heads.get()) is not None:
                    heads.heard(answer.headers)  # names in lower case
                headers = answer.headers.raw_items()
                stream: httpx.AsyncByteStream = _Body(self, origin, conn, hangup)
                if (coding := decoding(headers)) is not None:
                    headers, stream = identity_headers(headers), Decoded(stream, coding)
                return httpx.Response(
                    answer.status_code,
                    headers=headers,
                    stream=stream,
                    request=request,
                    extensions={"http_version": b"HTTP/1.1", "reason_phrase": answer.reason},
                )
            raise httpx.RemoteProtocolError("the backend closed the connection without answering")
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(
        self, conn: _Connection, head: h11.Request, body: bytes, timeouts: dict[str, float | None]
    ) -> h11.Response:
        data = conn.h11.send(head) or b""
        if body:
            data += conn.h11.send(h11.Data(data=body)) or b""
        data += conn.h11.send(h11.EndOfMessage()) or b""
        try:
            with trio.fail_after(_seconds(timeouts.get("write"))):
                await conn.stream.send_all(data)
        except trio.TooSlowError:
            raise httpx.WriteTimeout("sending the request timed out") from None
        except (trio.BrokenResourceError, OSError) as exc:
            if conn.reused:
                raise _StaleConnection from None
            # A server may answer early and close without reading the rest (a 413 for a
            # large body): its answer, when there is one, says more than our write error.
            conn.reusable = False
            try:
                with trio.fail_after(_EARLY_ANSWER_SECONDS):
                    return await self._read_head(conn)
            except (trio.TooSlowError, httpx.TransportError):
                raise httpx.WriteError(str(exc) or type(exc).__name__) from None
        read_timeout = timeouts.get("read")
        if read_timeout is None:  # the common case: callers time their reads themselves
            return await self._read_head(conn)
        try:
            with trio.fail_after(read_timeout):
                return await self._read_head(conn)
        except trio.TooSlowError:
            raise httpx.ReadTimeout("waiting for the response timed out") from None

    async def _read_head(self, conn: _Connection) -> h11.Response:
        received_any = False
        first = b""  # the answer's first bytes: a TLS record's, when http:// meets TLS
        try:
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    try:
                        chunk = await _receive(conn)
                    except httpx.ReadError:
                        # A reset before any answer on a reused connection: the server closed
                        # it idle with our request unread (uvicorn does, under load).
                        if conn.reused and not received_any and not conn.closed:
                            raise _StaleConnection from None
                        raise
                    if not chunk and conn.reused and not received_any:
                        raise _StaleConnection
                    if not received_any:
                        first = chunk[:2]
                    received_any = True
                    conn.h11.receive_data(chunk)
                    continue
                if isinstance(event, h11.Response):
                    return event
                if isinstance(event, h11.ConnectionClosed):
                    raise _unanswered(conn)
        except h11.RemoteProtocolError as exc:
            if isinstance(conn.stream, trio.SSLStream):
                raise httpx.RemoteProtocolError(str(exc)) from None
            if first[:1] in (b"\x15", b"\x16") and first[1:2] == b"\x03":  # a TLS alert or handshake
                raise SpeaksTls(f"{_peer(conn)}: {SpeaksTls.hint}") from None
            if not first:
                raise _unanswered(conn) from None
            raise httpx.RemoteProtocolError(str(exc)) from None

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


class _Body(httpx.AsyncByteStream):
    """The response body: each step returns all the data already received."""

    def __init__(self, transport: PooledTransport, origin: Origin, conn: _Connection, hangup: Hangup | None) -> None:
        self._transport = transport
        self._origin = origin
        self._conn: _Connection | None = conn
        self._hangup = hangup

    done: Callable[[], None] | None = None  # see `when_body_done`; a class default: no cost per response

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        parts: list[bytes] = []
        try:
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    if parts:
                        return b"".join(parts)
                    conn.h11.receive_data(await _receive(conn))
                elif type(event) is h11.Data:
                    parts.append(event.data)
                elif type(event) is h11.EndOfMessage:
                    self._finish(reuse=True)
                    if parts:
                        return b"".join(parts)
                    raise StopAsyncIteration
                elif isinstance(event, h11.ConnectionClosed):
                    self._finish(reuse=False)
                    if parts:
                        return b"".join(parts)
                    raise StopAsyncIteration
        except h11.RemoteProtocolError as exc:
            self._finish(reuse=False)
            raise httpx.RemoteProtocolError(f"the backend broke off the response: {exc}") from None
        except BaseException:
            self._finish(reuse=False)
            raise

    def _finish(self, *, reuse: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.done is not None:
            self.done()
        _let_go(self._hangup, conn)
        if reuse:
            self._transport._release(self._origin, conn)
        else:
            conn.close()
        self._transport._slots.release()

    async def aclose(self) -> None:
        # Unread body left: the connection cannot be reused; closing it tells the backend.
        self._finish(reuse=False)


def when_body_done(response: httpx.Response, done: Callable[[], None]) -> None:
    """Call `done` once `response`'s body is over: read to its end, closed, or broken off
    (at once if it is over already)."""
    body = response.stream
    if isinstance(body, _Body) and body._conn is not None:
        body.done = done
    else:
        done()


def _unanswered(conn: _Connection) -> httpx.RemoteProtocolError:
    """A fresh connection closed before a byte of answer."""
    if isinstance(conn.stream, trio.SSLStream):
        return httpx.RemoteProtocolError("the backend closed the connection without answering")
    return ClosedUnanswered(f"{_peer(conn)}: {ClosedUnanswered.hint}")


def _peer(conn: _Connection) -> str:
    """The backend's address, for the log."""
    try:
        host, port, *_ = conn.socket.getpeername()
    except OSError:
        return "the backend"
    return f"{host}:{port}"


def _let_go(hangup: Hangup | None, conn: _Connection) -> None:
    if hangup is not None:
        hangup.release(conn)


async def _receive(conn: _Connection) -> bytes:
    try:
        return bytes(await conn.stream.receive_some(_RECEIVE_SIZE))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__) from None


def _seconds(value: Any) -> float:
    return float(value) if value is not None else float("inf")


_SSL_CONTEXT: ssl.SSLContext | None = None


def _default_ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
        _SSL_CONTEXT.set_alpn_protocols(["http/1.1"])
    return _SSL_CONTEXT
