"""NATS core and JetStream for trio code: nats-py behind trio-asyncio.

Callers are trio tasks inside a `trio_asyncio.open_loop()` block (shared with the database):

    async with trio_asyncio.open_loop(), open_bus(url) as bus:
        await bus.ensure_stream("EVENTS", ["events.>"], max_age=3600)
        seq = await bus.publish("events.r1", b"...", msg_id="r1-0")
        async with bus.subscribe("events.r1", deliver_from_seq=seq) as messages:
            async for m in messages: ...            # BusMessage(subject, data, headers, seq)
        async with bus.pull("JOBS", "embedder", "jobs.embed", ack_wait=30) as jobs:
            for job in await jobs.fetch(10, timeout=5):
                ...; await job.ack()

Every public method is one trio->asyncio hop. Incoming messages cross into trio through a
bounded memory channel; a full channel pushes back on nats-py (ordered consumers then stall
on flow control, core subscriptions buffer in nats-py up to its pending limits).

Errors surface as `BusError`; `BusUnavailable` when the server cannot be reached or did not
answer in time (retryable; JetStream publishes are deduplicated by `msg_id` when retried),
`KeyConflict` for a failed KV create/update.

Shutdown: subscriptions and pull consumers unsubscribe when their `async with` exits (also on
cancellation), and `open_bus` closes the connection rather than draining it: nats-py's drain
hangs for its whole timeout after any cancelled pull `fetch`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import nats
import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from trio_asyncio import aio_as_trio, trio_as_aio

from proxy.infra.urls import without_credentials

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Bounds cleanup that runs shielded from cancellation (unsubscribe, close).
_CLEANUP_TIMEOUT = 5.0
_PING_TIMEOUT = 2.0
# JetStream API error code: stream name in use with a different configuration.
_STREAM_CONFIG_DIFFERS = 10058
# JetStream API error code: the server has not the storage a stream's `max_bytes` asks for.
_INSUFFICIENT_STORAGE = 10047


class BusError(Exception):
    """A NATS or JetStream operation failed."""


class BusUnavailable(BusError):
    """The server could not be reached or did not answer in time. Retryable."""


class KeyConflict(BusError):
    """A KV create found the key present, or an update found another revision."""


class InsufficientStorage(BusError):
    """The server cannot reserve the storage a stream's `max_bytes` asks for (its JetStream
    `max_file_store`, by default 75% of the free disk, is smaller)."""


class PayloadTooLarge(BusError):
    """The message is larger than the server's `max_payload` (1 MiB by default). Retrying
    cannot help."""


_UNAVAILABLE: tuple[type[BaseException], ...] = (
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,  # nats.errors.TimeoutError is one too
    OSError,
)
_CAUGHT: tuple[type[BaseException], ...] = (nats.errors.Error, *_UNAVAILABLE)


def _translate(exc: BaseException) -> BusError:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError):
        return KeyConflict(message)
    if isinstance(exc, nats.errors.MaxPayloadError):
        return PayloadTooLarge(message)
    if isinstance(exc, _UNAVAILABLE):
        return BusUnavailable(message)
    return BusError(message)


async def _hop(fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
    """Run one asyncio coroutine function from trio, translating nats errors."""
    try:
        result: _T = await aio_as_trio(fn)(*args, **kwargs)
    except _CAUGHT as exc:
        raise _translate(exc) from exc
    return result


async def _unsubscribe_shielded(sub: Any) -> None:
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + _CLEANUP_TIMEOUT
        with contextlib.suppress(BusError):
            await _hop(sub.unsubscribe)


# --------------------------------------------------------------------------------------------
# messages


# A message to publish: (subject, data, Nats-Msg-Id or None[, other headers]).
Outgoing = tuple[str, bytes, str | None] | tuple[str, bytes, str | None, Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class BusMessage:
    """A delivered message. `seq` is the stream sequence (JetStream), None for core NATS."""

    subject: str
    data: bytes
    headers: Mapping[str, str]
    seq: int | None


def _to_bus_message(msg: Msg, jetstream: bool) -> BusMessage:
    seq = msg.metadata.sequence.stream if jetstream else None
    return BusMessage(msg.subject, msg.data, dict(msg.headers or {}), seq)


@dataclass(frozen=True, slots=True)
class JobMessage:
    """A message from a pull consumer. Settle it with exactly one of ack/nak/term;
    `in_progress` extends the ack deadline and may be sent any number of times."""

    subject: str
    data: bytes
    headers: Mapping[str, str]
    seq: int
    num_delivered: int  # 1 on first delivery
    _msg: Msg = field(repr=False)

    async def ack(self) -> None:
        """Acknowledge and wait for the server to confirm, so it will not be redelivered."""
        await _hop(self._msg.ack_sync)

    async def nak(self, delay: float | None = None) -> None:
        """Ask for redelivery, after `delay` seconds if given."""
        await _hop(self._msg.nak, delay=delay)

    async def in_progress(self, *, timeout: float = 2.0) -> None:  # noqa: ASYNC109
        """Extend the ack deadline, and wait for the server to confirm it got that (BusError
        if it did not answer within `timeout` s: the connection is down)."""
        msg = self._msg
        await _hop(msg._client.request, msg.reply, b"+WPI", timeout=timeout)

    async def term(self) -> None:
        """Give up on the message: never redeliver it."""
        await _hop(self._msg.term)


class PullConsumer:
    """A durable pull consumer bound to this connection; see `Bus.pull`."""

    def __init__(self, sub: JetStreamContext.PullSubscription) -> None:
        self._sub = sub

    async def fetch(self, batch: int = 1, timeout: float = 5.0) -> list[JobMessage]:  # noqa: ASYNC109
        """Up to `batch` messages; waits at most `timeout` s for the first, [] if none came.

        `timeout` is the pull request's server-side expiry, so it is a parameter rather than
        a trio scope; cancelling the caller also works.
        """
        msgs = await _hop(self._aio_fetch, batch, timeout)
        return [
            JobMessage(
                m.subject,
                m.data,
                dict(m.headers or {}),
                m.metadata.sequence.stream,
                m.metadata.num_delivered or 1,
                m,
            )
            for m in msgs
        ]

    async def _aio_fetch(self, batch: int, expires: float) -> list[Msg]:
        try:
            return await self._sub.fetch(batch, timeout=expires)
        except TimeoutError:  # nats-py's own, or asyncio's when its deadline ran out mid-fetch
            return []


# --------------------------------------------------------------------------------------------
# key-value


@dataclass(frozen=True, slots=True)
class KvEntry:
    key: str
    value: bytes
    revision: int


class KeyValueStore:
    """A JetStream KV bucket: revisions make compare-and-set updates safe across processes."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def get(self, key: str) -> KvEntry | None:
        return await _hop(self._aio_get, key)

    async def _aio_get(self, key: str) -> KvEntry | None:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # also raised for deleted keys
            return None
        return KvEntry(key, entry.value or b"", entry.revision or 0)

    async def put(self, key: str, value: bytes) -> int:
        """Set unconditionally; returns the new revision."""
        return await _hop(self._kv.put, key, value)

    async def create(self, key: str, value: bytes) -> int:
        """Set only if absent (or deleted); KeyConflict otherwise."""
        return await _hop(self._kv.create, key, value)

    async def update(self, key: str, value: bytes, *, revision: int) -> int:
        """Set only if the current revision is `revision`; KeyConflict otherwise."""
        return await _hop(self._kv.update, key, value, last=revision)

    async def delete(self, key: str) -> None:
        await _hop(self._kv.delete, key)

    async def increment(self, key: str, by: int = 1) -> int:
        """Atomically add `by` to a decimal counter (absent = 0); returns the new value."""
        return await _hop(self._aio_increment, key, by)

    async def _aio_increment(self, key: str, by: int) -> int:
        while True:
            current = await self._aio_get(key)
            value = (int(current.value) if current else 0) + by
            try:
                if current is None:
                    await self._kv.create(key, str(value).encode())
                else:
                    await self._kv.update(key, str(value).encode(), last=current.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another process won the race; re-read and retry
            return value


# --------------------------------------------------------------------------------------------
# the bus


class Bus:
    """One NATS connection with JetStream. Create with `open_bus`."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        # Live subscriptions; unsubscribed before close (pull subs must go before a drain).
        self._subs: set[Subscription | JetStreamContext.PullSubscription] = set()
        self._reconnected = trio.Event()
        self.reconnects = 0  # by nats-py, in place
        # JetStream subscriptions' consumers to make again after a reconnect (`watch`), with
        # the reconnect count each was made at.
        self._renewals: dict[Callable[[], Awaitable[None]], int] = {}

    @property
    def max_payload(self) -> int:
        """The largest message the server takes, in bytes (its `max_payload`)."""
        return int(self._nc.max_payload)

    # -- streams and publishing -------------------------------------------------------------

    async def ensure_stream(
        self,
        name: str,
        subjects: Iterable[str],
        *,
        retention: Literal["limits", "workqueue", "interest"] = "limits",
        max_age: float | None = None,
        max_bytes: int | None = None,
        storage: Literal["file", "memory"] = "file",
        duplicate_window: float | None = None,
    ) -> None:
        """Create the stream, or update it to this configuration (what it holds is kept, but
        for what a new limit discards). `max_age` in seconds; past `max_bytes` the oldest
        messages are discarded.

        The retention policy of an existing stream cannot change (BusError); a `max_bytes`
        the server has no room for is InsufficientStorage.
        """
        config = StreamConfig(
            name=name,
            subjects=list(subjects),
            retention=RetentionPolicy(retention),
            max_age=max_age,
            max_bytes=max_bytes if max_bytes is not None else -1,
            discard=DiscardPolicy.OLD,
            storage=StorageType(storage),
        )
        if duplicate_window is not None:
            config.duplicate_window = duplicate_window
        await _hop(self._aio_ensure_stream, config)

    async def _aio_ensure_stream(self, config: StreamConfig) -> None:
        try:
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_CONFIG_DIFFERS:
                    raise
                await self._js.update_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code == _INSUFFICIENT_STORAGE:
                raise InsufficientStorage(str(exc)) from exc
            raise

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> int:
        """JetStream publish; returns the stream sequence once the server has stored it.

        With `msg_id`, a repeat within the stream's duplicate window is not stored again and
        returns the original sequence.
        """
        hdrs = dict(headers or {})
        if msg_id is not None:
            hdrs["Nats-Msg-Id"] = msg_id
        ack = await _hop(self._js.publish, subject, data, headers=hdrs or None)
        return ack.seq

    async def publish_core(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Core NATS publish: buffered, fire-and-forget, delivered only to live subscribers."""
        await _hop(self._nc.publish, subject, data, headers=dict(headers) if headers else None)

    async def publish_batch(self, messages: Iterable[Outgoing]) -> None:
        """Core-publish several (subject, data, msg_id[, headers]) in one trio->asyncio hop.

        Subjects captured by a JetStream stream are stored without waiting for acks (the
        stream's duplicate window still drops repeats by msg_id); follow with a JetStream
        `publish` on the same connection to know everything before it was stored, since a
        connection's messages are processed in order.
        """
        items = list(messages)
        if items:
            await _hop(self._aio_publish_batch, items)

    async def _aio_publish_batch(self, items: list[Outgoing]) -> None:
        for item in items:
            subject, data, msg_id = item[0], item[1], item[2]
            headers = dict(item[3]) if len(item) == 4 else {}
            if msg_id:
                headers["Nats-Msg-Id"] = msg_id
            await self._nc.publish(subject, data, headers=headers or None)

    async def purge(self, stream: str, subject: str) -> None:
        """Remove every message `stream` holds on `subject`."""
        await _hop(self._js.purge_stream, stream, subject=subject)

    async def last_message(self, stream: str, subject: str) -> bytes | None:
        """The last message `stream` holds on `subject` (None: it holds none)."""
        return await _hop(self._aio_last_message, stream, subject)

    async def _aio_last_message(self, stream: str, subject: str) -> bytes | None:
        try:
            message = await self._js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            return None
        return bytes(message.data or b"")

    # -- subscriptions ----------------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(
        self,
        subject: str,
        *,
        deliver_from_seq: int | None = None,
        from_start: bool = False,
        jetstream: bool | None = None,
        stream: str | None = None,
        buffer: int = 256,
    ) -> AsyncIterator[trio.MemoryReceiveChannel[BusMessage]]:
        """Receive messages on `subject` through a trio channel until the block exits.

        * `deliver_from_seq=N`: JetStream replay of the stream from sequence N (messages on
          `subject` only), then live.
        * `from_start=True`: JetStream replay of everything stored on `subject`, then live.
        * `jetstream=True` alone: JetStream, new messages only (they carry `seq`).
        * otherwise: a core NATS subscription (`seq` is None).

        JetStream modes use an ordered, ephemeral consumer (no acks; gaps are repaired by
        recreating it). `stream` skips the subject->stream lookup. The channel ends when the
        block exits.
        """
        replay = deliver_from_seq is not None or from_start
        use_js = replay if jetstream is None else jetstream
        if replay and not use_js:
            raise ValueError("deliver_from_seq/from_start need JetStream")
        send, receive = trio.open_memory_channel[BusMessage](buffer)
        # JetStream: the stream sequence delivered last. A consumer made again after a
        # reconnect starts after it; a message of the one it replaced, delivered late, that
        # is not past it is dropped (no message twice, none out of order).
        last: list[int] = [0]

        async def deliver(msg: Msg) -> None:  # asyncio side, called in order per subscription
            item = _to_bus_message(msg, use_js)
            if item.seq is not None:
                if item.seq <= last[0]:
                    return
                last[0] = item.seq
            try:
                send.send_nowait(item)
            except trio.WouldBlock:
                # Full: wait in trio, which holds up nats-py's delivery for this subscription.
                with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                    await trio_as_aio(send.send)(item)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

        if not use_js:
            # nats-py subscribes again by itself on a reconnect.
            sub = await _hop(self._nc.subscribe, subject, cb=deliver)
            self._subs.add(sub)
            try:
                yield receive
            finally:
                self._subs.discard(sub)
                await _unsubscribe_shielded(sub)
                send.close()
            return

        def config() -> ConsumerConfig:
            start = last[0] + 1 if last[0] else deliver_from_seq
            if start is not None:
                return ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
            return ConsumerConfig(deliver_policy=DeliverPolicy.ALL if from_start else DeliverPolicy.NEW)

        async def consume() -> Any:
            return await _hop(
                self._js.subscribe, subject, cb=deliver, stream=stream, config=config(),
                ordered_consumer=True, manual_ack=True,
            )

        subs: list[Any] = [await consume()]
        self._subs.add(subs[0])
        closed = False

        async def renew() -> None:
            # A restarted server (or another node) has lost the ephemeral consumer, and
            # nats-py does not notice: nothing would ever be delivered again.
            renewed = await consume()
            if closed:  # the block ended meanwhile
                await _unsubscribe_shielded(renewed)
                return
            old, subs[0] = subs[0], renewed
            self._subs.discard(old)
            self._subs.add(renewed)
            await _unsubscribe_shielded(old)

        self._renewals[renew] = self.reconnects
        try:
            yield receive
        finally:
            closed = True
            self._renewals.pop(renew, None)
            self._subs.discard(subs[0])
            await _unsubscribe_shielded(subs[0])
            send.close()

    @asynccontextmanager
    async def pull(
        self,
        stream: str,
        durable: str,
        subject_filter: str,
        *,
        max_ack_pending: int = 1000,
        ack_wait: float = 30.0,
        max_deliver: int | None = None,
    ) -> AsyncIterator[PullConsumer]:
        """A durable pull consumer (explicit acks) for job queues; created or updated to this
        configuration. Messages not acked within `ack_wait` seconds are redelivered (up to
        `max_deliver` deliveries in all, if given). Several processes may pull from the same
        durable: each message goes to one of them."""
        config = ConsumerConfig(
            name=durable,
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_ack_pending=max_ack_pending,
            max_deliver=max_deliver,
            filter_subject=subject_filter,
        )
        sub = await _hop(self._aio_pull, stream, durable, config)
        self._subs.add(sub)
        try:
            yield PullConsumer(sub)
        finally:
            self._subs.discard(sub)
            await _unsubscribe_shielded(sub)

    async def _aio_pull(
        self, stream: str, durable: str, config: ConsumerConfig
    ) -> JetStreamContext.PullSubscription:
        await self._js.add_consumer(stream, config)
        return await self._js.pull_subscribe_bind(durable=durable, stream=stream)

    # -- misc -------------------------------------------------------------------------------

    async def kv(
        self, bucket: str, *, history: int = 1, ttl: float | None = None
    ) -> KeyValueStore:
        """The KV bucket, created if missing (`ttl` in seconds applies to new buckets)."""
        return KeyValueStore(await _hop(self._aio_kv, bucket, history, ttl))

    async def _aio_kv(self, bucket: str, history: int, ttl: float | None) -> KeyValue:
        try:
            return await self._js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            return await self._js.create_key_value(
                KeyValueConfig(bucket=bucket, history=history, ttl=ttl)
            )

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (not nats-py reconnecting, its reader running):
        a JetStream publish made otherwise waits out its timeout."""
        return self._nc.is_connected and not self._reader_stopped()

    async def ping(self) -> None:
        """Round trip to the server and JetStream; BusUnavailable if that takes > 2 s or the
        connection is down (nats-py reconnecting, or its reader stopped)."""
        if not self.connected:
            raise BusUnavailable("not connected to NATS")
        with trio.move_on_after(_PING_TIMEOUT) as scope:
            # A request, not `nc.flush()`: a flush given up on leaves its cancelled future in
            # nats-py's PONG queue, and the late PONG then kills the connection's reader
            # (InvalidStateError). A request given up on just forgets its reply inbox.
            await _hop(self._js.account_info)
        if scope.cancelled_caught:
            raise BusUnavailable(f"NATS did not answer within {_PING_TIMEOUT} s")

    async def watch(self, *, interval: float = 1.0, probe_every: int = 10, misses: int = 3) -> None:
        """Keep the connection working; return once it is closed for good.

        nats-py reconnects by itself after a lost TCP connection, but not when its reader
        task has died, nor (for minutes) when the server holds the connection open without
        answering. Either way this forces nats-py's own reconnect, which keeps the `Bus` and
        re-creates its subscriptions, so holders of this `Bus` carry on. The reader is
        checked every `interval` (no I/O); the server is asked only every `probe_every`
        intervals, so an idle gateway stays idle.
        """
        failures = 0
        tick = 0
        while not self._nc.is_closed:
            await trio.sleep(interval)
            if self._nc.is_closed:
                return
            if not self._nc.is_connected:  # nats-py is reconnecting
                failures = 0
                continue
            if any(seen != self.reconnects for seen in self._renewals.values()):
                await self._renew_consumers()
            if self._reader_stopped():
                log.warning("nats: the connection's reader stopped; reconnecting")
                await self._force_reconnect()
                failures = 0
                continue
            tick += 1
            if tick % probe_every:
                continue
            try:
                await self.ping()
                failures = 0
            except BusUnavailable:
                failures += 1
            if failures >= misses:
                log.warning("nats: no answer to %d probes in a row; reconnecting", failures)
                await self._force_reconnect()
                failures = 0

    async def _renew_consumers(self) -> None:
        """Make the consumers of live JetStream subscriptions again after a reconnect; one
        that cannot be made now (its stream not made again yet) is tried at the next tick."""
        for renew, seen in list(self._renewals.items()):
            now = self.reconnects
            if seen == now:
                continue
            try:
                await renew()
            except BusError as error:
                log.debug("nats: a subscription's consumer not made again yet: %s", error)
                continue
            if renew in self._renewals:
                self._renewals[renew] = now

    async def reconnected(self, seen: int) -> int:
        """Wait until nats-py has reconnected more than `seen` times; return how often. The
        server may be another one (restarted without its store, a cluster's other node)
        holding none of the streams."""
        while self.reconnects == seen:
            await self._reconnected.wait()
        return self.reconnects

    def _on_reconnected(self) -> None:
        self.reconnects += 1
        self._reconnected.set()
        self._reconnected = trio.Event()

    def _reader_stopped(self) -> bool:
        """Connected, but nothing reads the socket: no reply or message will ever arrive."""
        reader = self._nc._reading_task
        return self._nc.is_connected and (reader is None or reader.done())

    async def _force_reconnect(self) -> None:
        with contextlib.suppress(Exception):
            await aio_as_trio(self._nc._process_op_err)(nats.errors.StaleConnectionError())

    async def _aio_close(self) -> None:
        for sub in list(self._subs):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._nc.is_closed:
            return
        with contextlib.suppress(Exception):
            await self._nc.flush(timeout=1)  # push out fire-and-forget publishes
        await self._nc.close()


async def _connect(url: str, name: str, connect_timeout: float, reconnected: Callable[[], None]) -> Client:
    shown = without_credentials(url)

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", str(exc) or type(exc).__name__)  # a timeout's text is empty

    async def on_disconnected() -> None:
        log.warning("nats: disconnected from %s", shown)

    async def on_reconnected() -> None:
        log.info("nats: reconnected to %s", shown)
        reconnected()

    nc = await nats.connect(
        url.split(","),  # a cluster's servers, comma-separated as in NATS's own tools
        name=name,
        connect_timeout=connect_timeout,
        # nats-py retries the *initial* connect until a server exceeds max_reconnect_attempts
        # (forever if <= 0). Fail fast here, then reconnect forever once we were connected.
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 1.0
    return nc


@asynccontextmanager
async def open_bus(
    url: str, *, name: str = "llm-proxy", connect_timeout: float = 2.0
) -> AsyncIterator[Bus]:
    """Connect (BusUnavailable at once if nothing answers at `url`); close on exit, also on
    cancellation. After a successful connect, lost connections are retried forever."""
    buses: list[Bus] = []  # the Bus is made once connected; reconnects come later
    nc = await _hop(_connect, url, name, connect_timeout, lambda: buses[0]._on_reconnected())
    bus = Bus(nc)
    buses.append(bus)
    try:
        yield bus
    finally:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _CLEANUP_TIMEOUT
            await aio_as_trio(bus._aio_close)()
