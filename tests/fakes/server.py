"""A small HTTP/1.1 server on trio + h11 for the fake LLM backends.

No framework on purpose: the fakes also back benchmarks, so a chunk goes from the handler
through h11's framing straight into one ``send_all`` on the socket.

While a handler runs, a watcher task keeps reading the socket. The request body has already
been consumed by then, so EOF can only mean the client went away; the watcher records the
time and cancels the handler, which is how a real inference server stops generating.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

import h11
import trio

__all__ = [
    "AbortConnection",
    "ClientGone",
    "Exchange",
    "FakeServer",
    "Handler",
    "Request",
    "run_forever",
    "serve_fake",
]

_RECEIVE_SIZE = 65536


@dataclass(slots=True)
class Request:
    """One parsed HTTP request, body included."""

    method: str
    target: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    received_at: float
    """``time.monotonic()`` when the request head was parsed."""
    http_version: str = "1.1"
    _json: Any = field(default=None, repr=False)
    _json_parsed: bool = field(default=False, repr=False)

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first header called ``name`` (case-insensitive), else ``default``."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return default

    def json(self) -> Any:
        """The body parsed as JSON; raises ``ValueError`` when it is not JSON."""
        if not self._json_parsed:
            self._json = json.loads(self.body) if self.body else None
            self._json_parsed = True
        return self._json


class AbortConnection(Exception):
    """Raised by a handler to drop the connection without finishing the response."""

    def __init__(self, *, reset: bool = False) -> None:
        super().__init__("connection aborted by the handler")
        self.reset = reset


class ClientGone(Exception):
    """A write failed because the client closed the connection."""


class Exchange:
    """The response side of one request: a full body, or a chunked stream."""

    __slots__ = (
        "_conn",
        "_finished",
        "_stream",
        "bytes_sent",
        "disconnected_at",
        "headers_sent",
        "request",
        "status",
        "writes",
    )

    def __init__(self, stream: trio.SocketStream, conn: h11.Connection, request: Request) -> None:
        self._stream = stream
        self._conn = conn
        self._finished = False
        self.request = request
        self.headers_sent = False
        self.status: int | None = None
        self.disconnected_at: float | None = None
        """``time.monotonic()`` when the client was seen closing, if it did."""
        self.writes = 0
        self.bytes_sent = 0

    @property
    def finished(self) -> bool:
        return self._finished

    def mark_disconnected(self) -> None:
        if self.disconnected_at is None:
            self.disconnected_at = time.monotonic()

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Send a complete response with a Content-Length, in one write."""
        head = [("content-type", content_type), ("content-length", str(len(body)))]
        head.extend(headers)
        out = self._conn.send(h11.Response(status_code=status, headers=head)) or b""
        if body:
            out += self._conn.send(h11.Data(data=body)) or b""
        out += self._conn.send(h11.EndOfMessage()) or b""
        self.headers_sent = True
        self.status = status
        self._finished = True
        await self._write(out)

    async def respond_json(
        self, status: int, obj: Any, *, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        await self.respond(status, body, headers=headers)

    async def start(
        self,
        status: int,
        *,
        content_type: str,
        headers: Iterable[tuple[str, str]] = (),
        first_chunk: bytes = b"",
    ) -> None:
        """Send the response head for a chunked body (optionally with a first chunk)."""
        head = [("content-type", content_type)]
        head.extend(headers)
        out = self._conn.send(h11.Response(status_code=status, headers=head)) or b""
        if first_chunk:
            out += self._conn.send(h11.Data(data=first_chunk)) or b""
        self.headers_sent = True
        self.status = status
        await self._write(out)

    async def send(self, data: bytes) -> None:
        """Send one chunk of a streaming body."""
        if data:
            await self._write(self._conn.send(h11.Data(data=data)) or b"")

    async def finish(self, last_chunk: bytes = b"") -> None:
        """End a streaming body (optionally sending a last chunk in the same write)."""
        out = b""
        if last_chunk:
            out = self._conn.send(h11.Data(data=last_chunk)) or b""
        out += self._conn.send(h11.EndOfMessage()) or b""
        self._finished = True
        await self._write(out)

    def abort(self, *, reset: bool = False) -> NoReturn:
        """Drop the connection mid-response; ``reset=True`` sends a TCP RST."""
        raise AbortConnection(reset=reset)

    async def _write(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.mark_disconnected()
            raise ClientGone() from exc
        self.writes += 1
        self.bytes_sent += len(data)


Handler = Callable[[Request, Exchange], Awaitable[None]]


class FakeServer:
    """A running server: where it listens and what its connections did."""

    def __init__(self, handler: Handler, *, log_errors: bool = True) -> None:
        self._handler = handler
        self._log_errors = log_errors
        self._connection_scopes: set[trio.CancelScope] = set()
        self.host = ""
        self.port = 0
        self.connections_total = 0
        self.connections_open = 0
        self.requests_total = 0
        self.handler_errors: list[BaseException] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def drop_connections(self) -> int:
        """Cut every open connection, like a backend crash; returns how many were cut."""
        scopes = list(self._connection_scopes)
        for scope in scopes:
            scope.cancel()
        return len(scopes)

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        self.connections_total += 1
        self.connections_open += 1
        reset = False
        scope = trio.CancelScope()
        self._connection_scopes.add(scope)
        try:
            with scope:
                reset = await self._serve_requests(stream)
        except Exception as exc:
            # One broken connection must not take the listener down with it.
            self.handler_errors.append(exc)
            if self._log_errors:
                traceback.print_exception(exc, file=sys.stderr)
        finally:
            self._connection_scopes.discard(scope)
            self.connections_open -= 1
            if reset:
                _set_linger_zero(stream)
            await trio.aclose_forcefully(stream)

    async def _serve_requests(self, stream: trio.SocketStream) -> bool:
        """Serve requests until the connection ends; True means end it with a reset."""
        conn = h11.Connection(h11.SERVER)
        while True:
            try:
                request = await _read_request(stream, conn)
            except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                await _try_send_400(stream, conn)
                return False
            if request is None:
                return False
            self.requests_total += 1
            keep_going, reset = await self._run_handler(stream, conn, request)
            if not keep_going or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return reset
            conn.start_next_cycle()

    async def _run_handler(
        self, stream: trio.SocketStream, conn: h11.Connection, request: Request
    ) -> tuple[bool, bool]:
        """Run the handler with a disconnect watcher; returns (keep-alive, reset)."""
        exchange = Exchange(stream, conn, request)
        failure: BaseException | None = None
        aborted: AbortConnection | None = None
        with trio.CancelScope() as handler_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_disconnect, stream, conn, exchange, handler_scope)
                try:
                    await self._handler(request, exchange)
                except AbortConnection as exc:
                    aborted = exc
                except ClientGone:
                    pass
                except Exception as exc:
                    failure = exc
                finally:
                    nursery.cancel_scope.cancel()
        if exchange.disconnected_at is not None:
            return False, False
        if aborted is not None:
            return False, aborted.reset
        if failure is not None:
            self.handler_errors.append(failure)
            if self._log_errors:
                traceback.print_exception(failure, file=sys.stderr)
            if exchange.headers_sent:
                return False, False
            await _send_error_500(exchange, failure)
            return False, False
        try:
            if not exchange.headers_sent:
                await exchange.respond(500, b'{"error":"handler sent no response"}')
            elif not exchange.finished:
                await exchange.finish()
        except ClientGone:
            return False, False
        return conn.our_state is h11.DONE, False


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> Request | None:
    head: h11.Request | None = None
    received_at = 0.0
    body: list[bytes] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                await stream.send_all(
                    conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                )
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data and head is None and conn.their_state is h11.IDLE:
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            head = event
            received_at = time.monotonic()
        elif isinstance(event, h11.Data):
            body.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            target = head.target.decode("latin-1")
            path, _, query = target.partition("?")
            return Request(
                method=head.method.decode("ascii"),
                target=target,
                path=path,
                query=query,
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers],
                body=b"".join(body),
                received_at=received_at,
                http_version=head.http_version.decode("ascii"),
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None
        else:  # PAUSED cannot happen before EndOfMessage of the current request
            return None


async def _watch_disconnect(
    stream: trio.SocketStream,
    conn: h11.Connection,
    exchange: Exchange,
    handler_scope: trio.CancelScope,
) -> None:
    while True:
        try:
            data = await stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            # After the last byte of the response a close is an ordinary goodbye.
            if not exchange.finished:
                exchange.mark_disconnected()
                handler_scope.cancel()
            return
        # A pipelining client's next request: h11 keeps it for the next cycle.
        conn.receive_data(data)


async def _send_error_500(exchange: Exchange, failure: BaseException) -> None:
    body = json.dumps({"error": f"fake backend handler failed: {failure!r}"}).encode()
    with suppress(ClientGone, h11.LocalProtocolError):
        await exchange.respond(500, body, headers=[("connection", "close")])


async def _try_send_400(stream: trio.SocketStream, conn: h11.Connection) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    try:
        body = b"bad request"
        out = (
            conn.send(
                h11.Response(
                    status_code=400,
                    headers=[("content-length", str(len(body))), ("connection", "close")],
                )
            )
            or b""
        )
        out += (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(out)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _set_linger_zero(stream: trio.SocketStream) -> None:
    with suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@asynccontextmanager
async def serve_fake(
    handler: Handler, *, host: str = "127.0.0.1", port: int = 0, log_errors: bool = True
) -> AsyncIterator[FakeServer]:
    """Serve ``handler`` on ``host:port`` (0 = any free port) for the duration of the block."""
    server = FakeServer(handler, log_errors=log_errors)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, server.handle_connection, port, host=host)
        )
        sockname = listeners[0].socket.getsockname()
        server.host, server.port = sockname[0], sockname[1]
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def serve_until_cancelled(
    handler: Handler,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    on_ready: Callable[[FakeServer], None] | None = None,
) -> None:
    """Serve forever, calling ``on_ready`` once the port is bound."""
    async with serve_fake(handler, host=host, port=port) as server:
        if on_ready is not None:
            on_ready(server)
        await trio.sleep_forever()


def run_forever(
    handler: Handler,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    on_ready: Callable[[FakeServer], None] | None = None,
) -> None:
    """Blocking entry point for a process: ``trio.run`` the server until interrupted.

    Without ``on_ready`` it prints ``READY <url>`` on stdout once listening.
    """

    def announce(server: FakeServer) -> None:
        print(f"READY {server.url}", flush=True)

    trio.run(
        partial(serve_until_cancelled, handler, host=host, port=port, on_ready=on_ready or announce)
    )
