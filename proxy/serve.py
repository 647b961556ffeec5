"""Running the app: one worker in this process, or N worker processes sharing the sockets."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import gc
import logging
import multiprocessing
import os
import signal
import socket
import struct
import sys
import termios
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any
from weakref import WeakKeyDictionary

import h11
import hypercorn.protocol as hypercorn_protocol
import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio.run import worker_serve
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.utils import wrap_app

from proxy._protocols import MendedH2Protocol, MendedH11Protocol
from proxy.config import Settings
from proxy.http._hangup import ClientConnection, body_received, current_connection, nothing_to_ask
from proxy.http.app import create_app
from proxy.infra.aio import asyncio_bridge
from proxy.infra.logging import configure_logging
from proxy.infra.metrics import multiprocess_dir

log = logging.getLogger("llm_proxy.serve")


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [settings.bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = settings.shutdown_grace_seconds
    # The app's stop waits for its durable runs until the grace's end, then writes their rows.
    config.shutdown_timeout = settings.shutdown_grace_seconds + 60.0
    config.keep_alive_timeout = 75.0
    config.keep_alive_max_requests = 100_000
    config.backlog = 1024
    return config


# What a cancelled response may still say (see `_exchange._LAST_WORDS_SECONDS`), and a
# margin, before the connections still open after the graceful timeout are closed.
_CUT_AFTER_GRACE = 1.5

# The connections each server (by its `Config`) has open, while they run.
_connections: WeakKeyDictionary[Config, set[_KnownTCPServer]] = WeakKeyDictionary()

# A client that takes none of a response's bytes for this long is gone, as far as its
# connection goes (nginx's `send_timeout`). No timeout of ours can end such a write: hypercorn
# shields it from cancellation, so the connection would hold its socket and its task for as
# long as the client stays connected (a slow-read attack needs nothing more). A client
# reading slowly but reading is left alone: what counts is the bytes it acknowledged.
CLIENT_STALL_SECONDS = 120.0


class _KnownTCPServer(TCPServer):
    """hypercorn's connection, known to its server while it runs, whose end its requests
    hear the moment it is read.

    - hypercorn shields every write to the socket from cancellation, so the graceful
      timeout's cancel does not end a response whose client reads slowly (or not at all): its
      write waits for that client, and the process with it. Such connections are closed
      instead (`_cut_stragglers`).
    - The connection's `ClientConnection` (see `proxy.http._hangup`) is set in this task's
      context, which the tasks serving its requests inherit, and ended by its reads."""

    # What the last look for stalled clients saw (`_cut_stalled_readers`).
    raw_stream: trio.abc.Stream
    stalled_looks = 0
    acked = -1

    async def run(self) -> None:
        stream = self.raw_stream = self.stream
        open_here = _connections.setdefault(self.config, set())
        open_here.add(self)
        connection = ClientConnection(self._receiving_body, self._want_body)
        current_connection.set(connection)
        self.stream = _EndTellingStream(stream, connection)  # type: ignore[assignment]
        try:
            await super().run()
        except Exception:
            # A failure in hypercorn's handling of one connection (a protocol bug a client can
            # set off, as `proxy._protocols` mends two) ends that connection. Under the trio worker it
            # left this task and ended the whole server.
            log.exception("a client connection failed in the HTTP server; it is closed")
        finally:
            connection.ended()  # however the connection ended, its requests are over
            connection.receiving_body, connection.want_body = body_received, nothing_to_ask  # no cycle left through `self`
            open_here.discard(self)

    async def _want_body(self) -> None:
        protocol = getattr(getattr(self, "protocol", None), "protocol", None)
        if isinstance(protocol, MendedH11Protocol):
            await protocol.send_continue()

    def _receiving_body(self) -> bool:
        """HTTP/1.1 (h11) has yet to receive the rest of the current request's body."""
        protocol = getattr(getattr(self, "protocol", None), "protocol", None)
        state = getattr(protocol, "connection", None)
        return isinstance(state, h11.Connection) and state.their_state is h11.SEND_BODY

    async def _read_data(self) -> None:
        await super()._read_data()
        # The client closed (or broke) the connection. hypercorn's keep-alive timer, running
        # if it was idle, would hold the socket (CLOSE-WAIT) and this task for its 75 s.
        await self.idle_task.stop()


class _EndTellingStream:
    """A connection's stream whose reads end its `ClientConnection` at end-of-file. Every
    other attribute is the stream's own (hypercorn tells TLS from TCP by an AttributeError)."""

    __slots__ = ("_connection", "_stream")

    def __init__(self, stream: trio.abc.Stream, connection: ClientConnection) -> None:
        self._stream = stream
        self._connection = connection

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._connection.ended()
            raise
        if not data:
            self._connection.ended()
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


hypercorn_run.TCPServer = _KnownTCPServer  # type: ignore[attr-defined]  # worker_serve has no other hook
# What each connection's protocol is made from.
hypercorn_protocol.H2Protocol = MendedH2Protocol  # type: ignore[attr-defined]
hypercorn_protocol.H11Protocol = MendedH11Protocol  # type: ignore[attr-defined]


async def _cut_stragglers(config: Config, done: trio.CancelScope) -> None:
    """Once the graceful timeout (and the last words of what it cancelled) is over, close
    every connection still open: a socket closed under a write ends that write."""
    with done:
        await trio.sleep(config.graceful_timeout + _CUT_AFTER_GRACE)
        stragglers = list(_connections.get(config, ()))
        if stragglers:
            log.warning("closing %d connection(s) still writing to slow clients after the graceful timeout", len(stragglers))
        for connection in stragglers:
            await trio.aclose_forcefully(connection.raw_stream)


async def _cut_stalled_readers(config: Config) -> None:
    """Close (with a reset: its unread bytes are dropped) each connection whose client has
    acknowledged none of our bytes for `CLIENT_STALL_SECONDS` while some wait for it, as
    found by a look every quarter of that time (the kernel's counts: no work per write)."""
    while True:
        await trio.sleep(CLIENT_STALL_SECONDS / 4)
        for connection in list(_connections.get(config, ())):
            sock = getattr(connection.raw_stream, "socket", None)
            if sock is None or sock.fileno() < 0:
                # Closed (its client left) while its request winds down: nothing to cut, and
                # asking a closed socket is a ValueError, which ended the whole server.
                continue
            acked = _bytes_acked(sock) if _unacknowledged(sock) else None
            if acked is None or acked != connection.acked:
                connection.acked = -1 if acked is None else acked
                connection.stalled_looks = 0
                continue
            connection.stalled_looks += 1
            if connection.stalled_looks >= 4:
                log.warning("closing a connection whose client has read nothing for %gs", CLIENT_STALL_SECONDS)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await trio.aclose_forcefully(connection.raw_stream)


# Linux's `struct tcp_info`: `tcpi_bytes_acked` (since 4.1), a u64 at this offset.
_BYTES_ACKED = slice(120, 128)


def _unacknowledged(sock: trio.socket.SocketType) -> bool:
    """Bytes wait in `sock`'s send queue (sent unacknowledged, or not sent yet)."""
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # Linux's SIOCOUTQ
    except (OSError, AttributeError):
        return False
    return int.from_bytes(queued, sys.byteorder) > 0


def _bytes_acked(sock: trio.socket.SocketType) -> int | None:
    """The bytes the peer has acknowledged on `sock` so far, where the platform says."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return None
    return int.from_bytes(info[_BYTES_ACKED], sys.byteorder) if len(info) >= _BYTES_ACKED.stop else None


async def serve(
    settings: Settings,
    *,
    sockets: Sockets | None = None,
    shutdown_trigger: Callable[[], Any] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown_trigger` returns (default: SIGINT or SIGTERM), then for at
    most the graceful timeout (and the last words of what it cuts)."""
    app = create_app(settings)
    config = hypercorn_config(settings)
    trigger = shutdown_trigger or wait_for_signal
    # One asyncio loop, bridged into trio, for the asyncio-only clients (psycopg, nats-py).
    async with asyncio_bridge(), trio.open_nursery() as nursery:
        stopped = trio.CancelScope()

        async def triggered() -> None:
            await trigger()
            app.stopping_by = trio.current_time() + config.graceful_timeout
            nursery.start_soon(_cut_stragglers, config, stopped)

        watchdog = trio.CancelScope()

        async def watching() -> None:
            with watchdog:
                await _cut_stalled_readers(config)

        async def serving(task_status: trio.TaskStatus[list[str]]) -> None:
            nursery.start_soon(watching)
            try:
                await worker_serve(
                    wrap_app(app, 0, "asgi"), config, sockets=sockets, shutdown_trigger=triggered,
                    task_status=task_status,
                )
            finally:
                stopped.cancel()  # nothing left to cut: no waiting out the grace period
                watchdog.cancel()

        binds = await nursery.start(serving)
        tune_gc()
        task_status.started(binds)


def tune_gc() -> None:
    """Once the app is up: move everything alive (modules, app, pools) out of the cyclic
    collector's sight, and collect the young generation less often.

    Each request allocates thousands of objects, almost all freed by refcounting; with the
    default threshold (700) a gen-0 pass ran every few requests and a full pass walked the
    whole ~100k-object heap every few seconds: a fifth of the CPU at 400 req/s. Frozen
    objects are never collected, which is right for what lives as long as the process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 20, 20)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


async def wait_for_signal() -> None:
    """Until SIGINT or SIGTERM; from then on both are ignored. The shutdown is graceful and
    bounded, and second signals are common: Ctrl-C reaches a worker and its parent forwards
    SIGTERM; the kernel's parent-death SIGTERM comes once per exiting thread. The default
    action of a second one killed the process mid-drain, rows left `running`."""
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            # Blocked while the receiver hands the handlers back: none may land in between.
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            break
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


class ListenError(Exception):
    """The listening socket cannot be opened; the message says where and why."""


def open_sockets(settings: Settings) -> Sockets:
    """Bind and listen on `settings.bind`, before anything else starts, so that a wrong or
    taken address stops start-up with one line instead of a traceback from inside a worker."""
    config = hypercorn_config(settings)
    try:
        sockets = config.create_sockets()
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {settings.bind}: unknown host ({exc.strerror})") from None
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc)).lower()
        raise ListenError(f"cannot listen on {settings.bind}: {reason}") from None
    return sockets


def close_sockets(sockets: Sockets) -> None:
    for sock in (*sockets.secure_sockets, *sockets.insecure_sockets, *sockets.quic_sockets):
        sock.close()


def run(settings: Settings, sockets: Sockets) -> int:
    """Serve `settings` on `sockets` (from `open_sockets`) with `settings.workers` processes
    until told to stop; the exit status (1: workers kept dying as they started)."""
    if settings.workers == 1:
        trio.run(functools.partial(serve, settings, sockets=sockets))
        return 0
    with multiprocess_dir():
        return _run_workers(settings, sockets)


# A worker that dies this soon after it was started is failing to start, not crashing under
# load: after this many such deaths in a row the gateway stops with a failure status (which a
# supervisor such as systemd's Restart=on-failure acts on) instead of starting them forever.
_QUICK_DEATH_SECONDS = 10.0
_QUICK_DEATHS_ALLOWED = 5


def _run_workers(settings: Settings, sockets: Sockets) -> int:
    context = multiprocessing.get_context("spawn")
    parent = os.getpid()
    stopping = False

    def start(slot: int) -> tuple[BaseProcess, float]:
        process = context.Process(target=_worker_main, args=(settings, sockets, parent), name=f"llm-proxy-worker-{slot}")
        process.start()
        return process, time.monotonic()

    workers = [start(slot) for slot in range(settings.workers)]
    log.info("started %d workers on %s", len(workers), settings.bind)

    told: set[int] = set()  # each worker is told once

    def stop_workers() -> None:
        for process, _ in workers:
            if process.is_alive() and process.pid is not None and process.pid not in told:
                told.add(process.pid)
                process.terminate()

    woken, wake = os.pipe()  # the handler wakes the loop below at once
    pipe_open = True

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        stop_workers()
        if pipe_open:  # a second Ctrl-C may come while the embedded servers are being stopped
            os.write(wake, b"\0")

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    quick_deaths = 0
    while not stopping:
        wait([woken, *(process.sentinel for process, _ in workers)])
        for slot, (process, started) in enumerate(workers):
            if stopping or process.exitcode is None:
                continue
            # Killed (the OOM killer), crashed or ended on its own: the port keeps its capacity
            # only if another takes its place.
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < _QUICK_DEATH_SECONDS else 0
            if quick_deaths >= _QUICK_DEATHS_ALLOWED:
                log.error("worker %d (pid %s) %s: %d workers in a row died within %gs of their start; stopping",
                          slot, process.pid, _death(process.exitcode), quick_deaths, _QUICK_DEATH_SECONDS)
                stopping, status = True, 1
                break
            log.error("worker %d (pid %s) %s; starting another", slot, process.pid, _death(process.exitcode))
            workers[slot] = start(slot)
    stop_workers()  # a worker started while the signal was being forwarded, or all when giving up
    # The workers stop listening at once; this process's copy of the sockets would keep the
    # port open, connections queueing where no one accepts them until the workers are done
    # (the grace period). Refused, a load balancer or client turns to another instance at once.
    close_sockets(sockets)
    for process, _ in workers:
        process.join()
    pipe_open = False
    os.close(woken)
    os.close(wake)
    return status


def _death(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _worker_main(settings: Settings, sockets: Sockets, parent_pid: int) -> None:
    configure_logging(settings.log_level)
    # A worker outliving its parent (kill -9, OOM killer) would keep serving on the shared
    # port, unsupervised, and make a restart fail with "address already in use".
    watched_by_kernel = _terminate_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the kernel was told to watch
        log.warning("the gateway process %d is gone; worker exiting", parent_pid)
        return
    trigger = functools.partial(_until_signal_or_orphaned, parent_pid, poll=not watched_by_kernel)
    try:
        trio.run(functools.partial(serve, settings, sockets=sockets, shutdown_trigger=trigger))
    except KeyboardInterrupt:
        sys.exit(0)


_PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> bool:
    """Ask Linux to send this process SIGTERM (a graceful shutdown) when its parent dies."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


async def _until_signal_or_orphaned(parent_pid: int, *, poll: bool, poll_seconds: float = 1.0) -> None:
    """`wait_for_signal` (the kernel's SIGTERM when the parent dies included), or, where the
    kernel cannot tell us (`poll`), until the parent is seen gone."""
    async with trio.open_nursery() as nursery:

        async def watch_parent() -> None:
            while True:
                await trio.sleep(poll_seconds)
                if os.getppid() != parent_pid:
                    nursery.cancel_scope.cancel()
                    return

        if poll:
            nursery.start_soon(watch_parent)
        await wait_for_signal()
        nursery.cancel_scope.cancel()
    if os.getppid() != parent_pid:
        log.warning("the gateway process %d is gone; worker shutting down", parent_pid)
