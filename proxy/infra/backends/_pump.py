"""The streaming pump: a backend's streamed body read through its parser into the
exchange's channel, under the first-token, idle and (with replicas) silence clocks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import httpx
import trio

from proxy.config import Timeouts
from proxy.domain.errors import GatewayError
from proxy.infra.backends._errors import timeout_error, transport_errors
from proxy.infra.backends._types import Batch, BatchSink, StreamParser


class _Silent(Exception):
    """The replica of a stream's attempt sent no byte within its patience, and another one
    can take the request."""


class _Dropped(Exception):
    """The backend's connection failed before the first byte of its body (a worker dying
    after its response head): `error` is what the client gets if no other replica can answer."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


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
    up on); once one came (`on_heard` is told), the first-token clock alone applies. One
    whose connection fails before its first byte raises `_Dropped`: nothing was sent.

    One cancel scope serves every read: its deadline moves instead of a scope per chunk, and
    it is lifted while a batch is handed over, so a slow client is never mistaken for a
    silent backend.
    """
    chunks = cast(httpx.AsyncByteStream, response.stream).__aiter__()
    idle = timeouts.idle or math.inf
    started = finished = heard = False
    quiet = quiet_until < first_deadline
    next_keepalive = 0.0
    data: bytes | None = b""
    try:
        with trio.CancelScope(deadline=min(first_deadline, quiet_until)) as scope, transport_errors(backend):
            while data is not None:
                try:
                    data = await chunks.__anext__()
                except StopAsyncIteration:
                    data = None
                if not heard:
                    heard = True
                    if quiet:
                        # Alive, if slow to its first token: it keeps the request.
                        scope.deadline = first_deadline
                        if on_heard is not None:
                            on_heard()
                output = parser.feed(data) if data is not None else parser.close()
                # The end comes alone sometimes (Anthropic's `message_stop`, a stream closed
                # after its last event): a whole answer assembled from the stream waits for it.
                if output.events or output.raw or output.done:
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
    except GatewayError as error:
        if heard:
            raise
        raise _Dropped(error) from None
    if scope.cancelled_caught and not finished:
        if started:
            raise timeout_error(backend, "went silent for longer than the idle timeout", timeouts.idle)
        if not heard and quiet:
            raise _Silent
        raise timeout_error(backend, "sent no first token", timeouts.first_token)
