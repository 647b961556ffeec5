"""A small HTTP/1.1 load generator on raw trio sockets.

httpx costs more CPU per request than the gateway is meant to spend, so the client that
measures it must be cheaper still: requests are pre-encoded bytes sent on keep-alive
connections, and a response is parsed only as far as its framing (Content-Length or chunked)
and, for SSE, a count of ``data: `` frames.

Times are ``time.monotonic()``, which on Linux is CLOCK_MONOTONIC and so comparable with the
times another process on the same machine records (the fake backend's disconnect times).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio

__all__ = [
    "Endpoint",
    "LoadResult",
    "StormResult",
    "closed_loop",
    "percentile",
    "storm",
]

_RECV = 65536
_DATA = b"data: "
_DONE = b"data: [DONE]"


class ConnectionLost(Exception):
    """The server closed the connection before the response ended."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to send chat requests: the fake directly, the gateway, or a peer."""

    host: str
    port: int
    path: str = "/v1/chat/completions"
    key: str | None = None
    """An API key to send as `Authorization: Bearer` (the gateway run with `--keys`)."""

    def chat_request(self, model: str, *, stream: bool, request_id: str | None = None) -> bytes:
        body = json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": "Say something."}],
                "stream": stream,
            },
            separators=(",", ":"),
        ).encode()
        extra = f"x-request-id: {request_id}\r\n" if request_id else ""
        if self.key:
            extra += f"authorization: Bearer {self.key}\r\n"
        head = (
            f"POST {self.path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
        )
        return head.encode() + body


class Tally:
    """SSE frames received, across every stream of a run (read at window edges)."""

    __slots__ = ("frames",)

    def __init__(self) -> None:
        self.frames = 0


class _SSECounter:
    """Counts ``data: `` frames in a body that arrives in arbitrary pieces."""

    __slots__ = ("_tail", "_tally", "done", "first_at", "frames")

    def __init__(self, tally: Tally) -> None:
        self._tally = tally
        self._tail = b""
        self.frames = 0
        self.first_at: float | None = None
        self.done = False

    def feed(self, data: bytes) -> None:
        # The tail is shorter than "data: [DONE]" plus one, so a frame marker split across
        # two pieces is counted once: in the joined text, minus what the tail held alone.
        joined = self._tail + data
        n = joined.count(_DATA) - self._tail.count(_DATA)
        if n:
            if self.first_at is None:
                self.first_at = time.monotonic()
            if not self.done and _DONE in joined:
                self.done = True
                n -= 1  # the terminator is not a chunk
            self.frames += n
            self._tally.frames += n
        self._tail = joined[-12:]


class _Connection:
    """One keep-alive client connection."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.sock: trio.socket.SocketType | None = None
        self._buf = bytearray()

    async def connect(self) -> None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect((self.endpoint.host, self.endpoint.port))
        self.sock = sock
        self._buf.clear()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def _fill(self) -> None:
        assert self.sock is not None
        data = await self.sock.recv(_RECV)
        if not data:
            raise ConnectionLost()
        self._buf += data

    async def exchange(self, raw: bytes, counter: _SSECounter | None) -> int:
        """Send one request, read its whole response; returns the status."""
        if self.sock is None:
            await self.connect()
        assert self.sock is not None
        view = memoryview(raw)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head = bytes(buf[:end]).lower()
        del buf[: end + 4]
        status = int(head[9:12])
        if b"transfer-encoding: chunked" in head:
            await self._read_chunked(counter)
        else:
            length = 0
            if (at := head.find(b"content-length:")) >= 0:
                line_end = head.find(b"\r\n", at)
                length = int(head[at + 15 : line_end if line_end >= 0 else len(head)])
            await self._read_exact(length, counter)
        if b"connection: close" in head:
            self.close()
        return status

    async def _read_exact(self, length: int, counter: _SSECounter | None) -> None:
        buf = self._buf
        while len(buf) < length:
            await self._fill()
        if counter is not None:
            counter.feed(bytes(buf[:length]))
        del buf[:length]

    async def _read_chunked(self, counter: _SSECounter | None) -> None:
        buf = self._buf
        while True:
            while (eol := buf.find(b"\r\n")) < 0:
                await self._fill()
            size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
            del buf[: eol + 2]
            if size == 0:
                while True:  # trailer lines, then the empty line that ends the message
                    while (eol := buf.find(b"\r\n")) < 0:
                        await self._fill()
                    del buf[: eol + 2]
                    if eol == 0:
                        return
            while len(buf) < size + 2:
                await self._fill()
            if counter is not None:
                counter.feed(bytes(buf[:size]))
            del buf[: size + 2]


async def _connect_quietly(conn: _Connection) -> None:
    """Connect ahead of time; a failure is retried (and counted) by the first request."""
    with contextlib.suppress(OSError):
        await conn.connect()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[min(len(ordered), int(rank)) - 1]


@dataclass(slots=True)
class LoadResult:
    """One closed-loop run: what completed inside the measurement window."""

    seconds: float
    completed: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    """Whole-response seconds (non-streaming) or time to first frame (streaming)."""
    frames: int = 0
    client_cpu: float = 0.0
    """CPU seconds this process spent during the window (the load generator's own cost)."""
    clocks: dict[str, float] = field(default_factory=dict)
    """How far each of the ``clocks`` given to ``closed_loop`` advanced during the window."""

    @property
    def rps(self) -> float:
        return self.completed / self.seconds

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds


async def closed_loop(
    endpoint: Endpoint,
    model: str,
    *,
    concurrency: int,
    stream: bool,
    warmup: float,
    duration: float,
    stagger: float = 0.0,
    grace: float = 2.0,
    clocks: Mapping[str, Callable[[], float]] | None = None,
) -> LoadResult:
    """``concurrency`` connections each sending requests back to back.

    Only requests that start and end inside ``[warmup, warmup + duration]`` give latency
    samples; completions and SSE frames are counted inside the same window. A request in
    flight at the end is let finish (up to ``grace`` seconds) so connections close cleanly.
    ``stagger``: the connections' first requests are spread evenly over this many seconds,
    so that streams of equal length do not all start (and end) in the same instant.
    ``clocks`` (CPU-second counters, say) are read at the window's edges.
    """
    raw = endpoint.chat_request(model, stream=stream)
    tally = Tally()
    result = LoadResult(seconds=duration)
    conns = [_Connection(endpoint) for _ in range(concurrency)]
    async with trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(_connect_quietly, conn)
    now = trio.current_time()
    start, end = now + warmup, now + warmup + duration
    wall_start = time.monotonic() + warmup
    wall_end = wall_start + duration

    async def worker(conn: _Connection, delay: float) -> None:
        await trio.sleep(delay)
        while trio.current_time() < end:
            counter = _SSECounter(tally) if stream else None
            t0 = time.monotonic()
            try:
                status = await conn.exchange(raw, counter)
            except (ConnectionLost, OSError, ValueError, trio.BrokenResourceError):
                conn.close()
                result.errors += 1
                await trio.sleep(0.01)
                continue
            finally:
                # A stream's first chunk counts even if the stream is still running when
                # the run ends (a slow relay would otherwise leave no samples at all).
                first = counter.first_at if counter is not None else None
                if first is not None and wall_start <= t0 < wall_end:
                    result.latencies.append(first - t0)
            t1 = time.monotonic()
            if status != 200:
                result.errors += 1
                continue
            if wall_start <= t1 <= wall_end:
                result.completed += 1
                if not stream and t0 >= wall_start:
                    result.latencies.append(t1 - t0)

    async def window() -> None:
        await trio.sleep_until(start)
        frames0, cpu0 = tally.frames, time.process_time()
        starts = {name: clock() for name, clock in (clocks or {}).items()}
        await trio.sleep_until(end)
        result.frames = tally.frames - frames0
        result.client_cpu = time.process_time() - cpu0
        result.clocks = {name: clock() - starts[name] for name, clock in (clocks or {}).items()}

    try:
        with trio.move_on_at(end + grace):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(window)
                for i, conn in enumerate(conns):
                    nursery.start_soon(worker, conn, stagger * i / concurrency)
    finally:
        for conn in conns:
            conn.close()
    return result


@dataclass(slots=True)
class StormResult:
    opened: int
    """Streams that had received their first frame when the storm broke."""
    dropped_at: float
    """``time.monotonic()`` just before the first socket was closed."""
    drop_seconds: float
    """How long closing every socket took (they close one after another)."""


async def storm(
    endpoint: Endpoint, model: str, *, streams: int, hold: float, within: float = 10.0
) -> StormResult:
    """Open ``streams`` streams, read them for ``hold`` seconds after the last one started
    streaming, then close every socket at once, without reading another byte."""
    raw = endpoint.chat_request(model, stream=True)
    tally = Tally()
    conns = [_Connection(endpoint) for _ in range(streams)]
    started = 0
    all_started = trio.Event()

    async def reader(conn: _Connection) -> None:
        nonlocal started
        counter = _SSECounter(tally)
        try:
            await conn.connect()
            # Its own reference: the storm may close the connection (and drop `conn.sock`)
            # while this stream has yet to start, as with a peer that queues new streams.
            sock = conn.sock
            assert sock is not None
            await sock.send(raw)
            while True:
                data = await sock.recv(_RECV)
                if not data:
                    return
                was = counter.frames
                counter.feed(data)
                if was == 0 and counter.frames:
                    started += 1
                    if started == streams:
                        all_started.set()
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
            return

    async with trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(reader, conn)
        with trio.move_on_after(within):
            await all_started.wait()
        await trio.sleep(hold)
        opened = started
        dropped_at = time.monotonic()
        for conn in conns:
            conn.close()
        drop_seconds = time.monotonic() - dropped_at
        nursery.cancel_scope.cancel()
    return StormResult(opened=opened, dropped_at=dropped_at, drop_seconds=drop_seconds)
