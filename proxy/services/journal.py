"""What becomes of a chat besides its answer: the completion log and the event stream.

- `EventLog`: everything a run has produced so far, in memory. The run appends; the NATS
  publisher and any attached readers (duplicate requests, reconnecting clients) follow it.
  Memory is bounded by the run itself (its events are its answer).
- `Journal`: one run's persistence. A row `running` at the start, the outcome at the end
  (shielded, bounded), events published on `evt.chat.{trace_id}` as they come — batched per
  wake-up, so a slow NATS never slows the client — and `finished` exactly once, after the
  outcome is committed.
- `Outbox`: outcomes that could not be written because PostgreSQL was down, kept in a
  JetStream work queue (or, with NATS down too, in memory) and written when it is back.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import secrets
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from proxy.dialects.events import Finished, encode_event
from proxy.domain.errors import GatewayError
from proxy.domain.events import StreamEvent
from proxy.infra.chat_store import ChatStore, LogRow, Status
from proxy.infra.nats import Bus, BusError, InsufficientStorage, JobMessage, Outgoing
from proxy.infra.postgres import DatabaseError, DatabaseUnavailable
from proxy.infra.spool import Spool, open_spool

log = logging.getLogger("llm_proxy.journal")

EVENTS_STREAM = "EVENTS"
EVENTS_SUBJECTS = ["evt.chat.>"]
OUTBOX_STREAM = "OUTBOX"
OUTBOX_SUBJECT = "outbox.chat_log"
_FINISH_SECONDS = 5.0
_MEMORY_OUTBOX = 10_000
_CALL_TIMEOUT = 30.0  # the longest a write given up on may wait for a stalled database


# The NATS header of a run's first event that says what the run's client was told of the
# answer (`_contracts.ANSWER_HEADERS`: its sources, its stand-in), as JSON: a stream attached
# on another instance sends its head once that event is in, and says the same.
ANSWER_HEADERS_NATS = "Llm-Proxy-Answer-Headers"


def events_subject(trace_id: str) -> str:
    return f"evt.chat.{trace_id}"


@dataclass(slots=True, frozen=True)
class Outcome:
    status: Status
    reason: str
    error: GatewayError | None = None


class EventLog:
    def __init__(self, trace_id: str, tenant: str | None = None) -> None:
        self.trace_id = trace_id
        self.tenant = tenant
        self.events: list[StreamEvent] = []
        self.head_error: GatewayError | None = None
        self.outcome: Outcome | None = None
        # The model that answered: the `finished` event's `winner`, however it is read.
        self.winner: str | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        # What its answer echoes of the request (`LogRow.settings`), for readers of a run
        # whose row is not written yet.
        self.settings: dict[str, Any] | None = None
        # Called with (first sequence number, new events) as they are appended.
        self.listeners: list[Callable[[int, list[StreamEvent]], None]] = []
        # Created by the first reader to wait: most runs have none, and appends are per chunk.
        self._changed: trio.Event | None = None
        # Set once its outcome's row is committed (or in the outbox): what a reader of the
        # row right after the run waits for.
        self.written = trio.Event()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def extend(self, events: list[StreamEvent]) -> None:
        if events:
            first = len(self.events) + 1
            self.events.extend(events)
            for listener in self.listeners:
                listener(first, events)
            self._wake()

    def fail_before_start(self, error: GatewayError) -> None:
        self.head_error = error
        self._wake()

    def close(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self._wake()

    @property
    def closed(self) -> bool:
        return self.outcome is not None

    async def wait_beyond(self, position: int) -> None:
        """Return once there are more than `position` events, a head error, or an outcome."""
        while len(self.events) <= position and self.head_error is None and self.outcome is None:
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()


StoreGetter = Callable[[], ChatStore | None]
BusGetter = Callable[[], Bus | None]


class Journal:
    """One run's persistence: its log row (through the `LogWriter`) and its events (through
    the `EventPublisher`, enqueued as the run appends them — no task of its own)."""

    def __init__(
        self, row: LogRow, log: EventLog, *, writer: LogWriter, publisher: EventPublisher, publish_events: bool,
        answer_headers: frozenset[bytes] = frozenset(),
    ) -> None:
        self.row = row
        self.log = log
        self._writer = writer
        self._publisher = publisher
        self._publish_events = publish_events
        self._subject = events_subject(row.trace_id)
        log.winner = row.upstream_model
        if publish_events:
            # Not a bound method: log -> listener -> journal -> log would be a reference
            # cycle, leaving every request's objects to the cyclic GC instead of refcounting.
            # The header list, not the log: what the run's client is told, changed in place
            # until its head goes out (a stand-in's name), read as the first event goes.
            log.listeners.append(functools.partial(_enqueue, publisher, self._subject, log.headers, answer_headers))

    def begin(self, *, at_once: bool = False) -> None:
        """Write the `running` row: `at_once` when readers may look for it right away (else it
        waits, and is never written for a run that ends first). A trace whose events others
        publish (a workflow's workers) is always written at once: readers on other instances
        need its row to read those events as its client does."""
        self._writer.start(self.row, at_once=at_once or not self._publish_events)

    async def finish(self, outcome: Outcome, row: LogRow) -> None:
        """Commit the outcome, then publish `finished`. Shielded and bounded: it runs after a
        client disconnect too."""
        self.log.close(outcome)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _FINISH_SECONDS):
            seq = len(self.log.events) + 1
            row.last_seq = seq  # `finished` as every client numbers it (a rebuilt stream needs it)
            try:
                await self._writer.commit(row)
            finally:
                self.log.written.set()
            if self._publish_events:
                event = Finished(reason=outcome.reason, status=outcome.status, winner=row.upstream_model)
                self._publisher.publish([(self._subject, encode_event(seq, event), f"{row.trace_id}:{seq}")])


def _enqueue(
    publisher: EventPublisher, subject: str, told: list[tuple[bytes, bytes]], answer_headers: frozenset[bytes],
    first: int, events: list[StreamEvent],
) -> None:
    # No Nats-Msg-Id on events: nothing retries them, and the header costs on every token.
    messages: list[Outgoing] = [(subject, encode_event(seq, event), None) for seq, event in enumerate(events, start=first)]
    if first == 1 and (said := {name.decode("latin-1"): value.decode("latin-1") for name, value in told if name in answer_headers}):
        messages[0] = (subject, messages[0][1], None, {ANSWER_HEADERS_NATS: json.dumps(said)})
    publisher.publish(messages)


class EventPublisher:
    """Every run's events onto NATS from one task: whatever is queued when it wakes goes out
    in one hop into nats-py, in order (a connection's messages are stored in order, so a
    trace's `finished` always lands after its events). With NATS down, events are dropped —
    the completion log still has every answer — and `/ready` says so."""

    LINGER = 0.01

    def __init__(self, *, bus: BusGetter) -> None:
        self._bus = bus
        self._pending: list[Outgoing] = []
        self._wake = trio.Event()
        self._scope: trio.CancelScope | None = None

    def publish(self, messages: list[Outgoing]) -> None:
        self._pending.extend(messages)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope:
            task_status.started()
            try:
                while True:
                    await self._wake.wait()
                    await trio.sleep(self.LINGER)  # one hop for many runs' events
                    self._wake = trio.Event()
                    await self._flush()
            finally:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + _FINISH_SECONDS):
                    await self._flush()

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        bus = self._bus()
        if not batch or bus is None:
            return
        try:
            await bus.publish_batch(batch)
        except BusError as error:
            log.warning("%d events not published: %s", len(batch), error)


class BoundedWrites:
    """Database writes a caller waits for at most `TIMEOUT`: then (or while an earlier one is
    still overdue) `DatabaseUnavailable`, at once, instead of hanging on a stalled database
    (its connections open, nothing answering). A write given up on goes on in the background
    (a cancelled psycopg query waits for the stalled server anyway) for at most
    `_CALL_TIMEOUT`: what is written here is upserts, so the late write and the caller's
    fallback (the outbox, a retry) agree."""

    TIMEOUT = 3.0

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._overdue = 0  # writes given up on that have not returned

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[None]:
        try:
            async with trio.open_nursery() as self._nursery:
                yield
        finally:
            self._nursery = None

    async def write(self, call: Callable[[], Awaitable[None]]) -> None:
        if self._overdue:
            raise DatabaseUnavailable("an earlier write still waits for the database")
        nursery = self._nursery
        if nursery is None:  # stopping: no background left to finish a late write in
            with trio.move_on_after(self.TIMEOUT):
                await call()
                return
            raise DatabaseUnavailable(f"the database did not answer within {self.TIMEOUT:g} s")
        done = trio.Event()
        failure: list[DatabaseError] = []
        abandoned = False

        async def run() -> None:
            try:
                with trio.fail_after(_CALL_TIMEOUT):  # then the next write tries again
                    await call()
            except trio.TooSlowError:
                failure.append(DatabaseUnavailable(f"no answer within {_CALL_TIMEOUT:g} s"))
            except DatabaseError as error:
                failure.append(error)
            finally:
                done.set()
                if abandoned:
                    self._overdue -= 1

        nursery.start_soon(run)
        with trio.move_on_after(self.TIMEOUT):
            await done.wait()
        if not done.is_set():
            abandoned = True
            self._overdue += 1
            raise DatabaseUnavailable(f"the database did not answer within {self.TIMEOUT:g} s")
        if failure:
            raise failure[0]


class LogWriter:
    """Group commit for the completion log: every row waiting when the writer wakes up goes
    into one transaction, however many requests wrote them — a database round trip per
    batch, not two per request. Outcomes that cannot be written go to the outbox, and so do
    those the database has not taken within `BoundedWrites.TIMEOUT` (within a run's
    `_FINISH_SECONDS`, so its `finished` is still published): held in memory for a stalled
    database, they would be lost if the gateway stopped first.

    A `running` row waits `START_DELAY` before it is written, and is dropped if its outcome
    comes first: most chats finish sooner, and then one row write serves both — the
    database work stays off the request's critical path and is halved."""

    START_DELAY = 0.25
    LINGER = 0.02
    # The log's purge (see `_purge_after`): at least a batch of rows, at most this many at once.
    PURGE_BATCH = 200
    PURGE_MOST = 1000
    # After a purge that found less than it could (nothing is waiting): an idle table costs a
    # round trip a second at most, however many group commits a busy gateway makes. After a
    # full one (a backlog, e.g. months of rows on the first start with a retention): a short
    # breath, so a backlog drains at up to `PURGE_MOST` rows a `PURGE_GAP` beside the traffic.
    PURGE_PAUSE = 1.0
    PURGE_GAP = 0.1

    def __init__(self, *, store: StoreGetter, outbox: Outbox, retention: float = 30 * 86400.0) -> None:
        self._store = store
        self._outbox = outbox
        self._starts: dict[str, tuple[LogRow, float]] = {}
        self._outcomes: list[tuple[LogRow, trio.Event]] = []
        self._wake = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._writes = BoundedWrites()
        self._done = trio.Event()
        # Where the log's purge runs after a commit (one at a time): beside the writes, so a
        # long one neither delays the next commit nor counts against its time limit.
        self._purges: trio.Nursery | None = None
        self._purging = False
        self._retention = retention  # seconds a run's row is kept, from when it was made
        self._unpurged = 0  # rows committed since the last purge started
        self._purge_due = 0.0  # trio time

    def start(self, row: LogRow, *, at_once: bool = False) -> None:
        self._starts[row.trace_id] = (row, trio.current_time() + (0.0 if at_once else self.START_DELAY))
        if at_once or len(self._starts) == 1:
            self._wake.set()  # the writer may be sleeping without a timer, or until a later one

    async def commit(self, row: LogRow) -> None:
        """Return once `row` is committed (or safely in the outbox)."""
        self._starts.pop(row.trace_id, None)
        done = trio.Event()
        self._outcomes.append((row, done))
        self._wake.set()
        await done.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self._scope:
            try:
                async with self._writes.open(), trio.open_nursery() as self._purges:
                    task_status.started()
                    while True:
                        due = min((deadline for _, deadline in self._starts.values()), default=math.inf)
                        with trio.move_on_at(due):
                            await self._wake.wait()
                        # Linger: let the next requests' rows join this transaction. Per-flush
                        # costs (a round trip, trio->asyncio hops) dominate at low concurrency.
                        await trio.sleep(self.LINGER)
                        self._wake = trio.Event()
                        await self._flush(trio.current_time())
            finally:
                self._purges = None  # closed: stopping, nothing is purged
                with trio.CancelScope(shield=True, deadline=trio.current_time() + _FINISH_SECONDS):
                    await self._flush(math.inf)  # what arrived before shutdown is written too
                self._done.set()

    def _purge_after(self, store: ChatStore, written: int) -> None:
        """Start a purge of the log's expired rows after a commit of `written` outcomes, unless
        one runs or it is not due: as many rows as were committed since the last one (the
        table shrinks back to the retention's worth as it is written), within bounds."""
        self._unpurged += written
        now = trio.current_time()
        if self._purges is None or self._purging or not self._unpurged or now < self._purge_due:
            return
        limit = min(max(self.PURGE_BATCH, self._unpurged), self.PURGE_MOST)
        self._unpurged = 0
        self._purging = True
        self._purge_due = now + self.PURGE_PAUSE
        self._purges.start_soon(self._purge, store, limit)

    async def _purge(self, store: ChatStore, limit: int) -> None:
        try:
            with trio.move_on_after(_CALL_TIMEOUT):
                if await store.purge_log(self._retention, limit) >= limit:
                    self._purge_due = trio.current_time() + self.PURGE_GAP  # more are waiting
        except DatabaseError as error:
            log.debug("purging expired log rows failed: %s", error)  # a later commit's purge takes them
        finally:
            self._purging = False

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def aclose(self) -> None:
        """Stop, once what it holds is written or in the outbox (bounded): the outbox must
        not be closed before."""
        self.stop()
        if self._scope is not None:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + _FINISH_SECONDS + 1):
                await self._done.wait()

    async def _flush(self, now: float) -> None:
        starts = [row for row, deadline in self._starts.values() if deadline <= now]
        for row in starts:
            del self._starts[row.trace_id]
        outcomes, self._outcomes = self._outcomes, []
        if not starts and not outcomes:
            return
        try:
            store = self._store()
            if store is not None:
                try:
                    rows = [row for row, _ in outcomes]
                    await self._writes.write(lambda: store.write_batch(starts, rows))
                    self._purge_after(store, len(rows))
                    return
                except DatabaseError as error:
                    if outcomes:  # a batch of `running` rows only is dropped: their outcomes follow
                        log.warning("%d chat_log outcomes queued in the outbox: %s", len(outcomes), error)
            for row, _ in outcomes:
                await self._outbox.put(row)
        finally:
            for _, done in outcomes:
                done.set()


class Outbox:
    """Log rows waiting for PostgreSQL. Nothing accepted is lost while either store is up.

    It drains when it has reason to: at start (rows left by an earlier run), after a `put`,
    and every `RETRY_SECONDS` while rows are still waiting. Rows another instance left on
    the shared NATS queue (it may have died) are swept every `SWEEP_SECONDS`; an idle
    gateway makes no round trips in between."""

    RETRY_SECONDS = 2.0
    SWEEP_SECONDS = 30.0

    def __init__(self, *, store: StoreGetter, bus: BusGetter, spool: Path | None = None) -> None:
        self._store = store
        self._bus = bus
        self._memory: deque[LogRow] = deque()
        # With NATS down too, the rows in memory are also kept in a spool file of the data
        # directory (`spool`), so a stop or a crash loses none; the next start writes them.
        self._spool = Spool(spool, secrets.token_hex(8)) if spool is not None else None
        self._spool_stale = False  # the memory changed since the spool file was written
        self._wake = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._pending = True  # until a drain has found the queue empty
        # Rows fetched from the NATS queue and not yet written: given back when the gateway
        # stops, so the next drain (this gateway's next start, another instance) has them at
        # once rather than after the consumer's ack_wait.
        self._held: list[JobMessage] = []
        # A stalled database makes a drain give its rows back within a few seconds too.
        self._writes = BoundedWrites()

    @property
    def pending_in_memory(self) -> int:
        return len(self._memory)

    async def put(self, row: LogRow) -> None:
        self._pending = True
        bus = self._bus()
        # A bus reconnecting would hold each row for its publish timeout (5 s), one after
        # another, and a stop could cut them off before memory had them.
        if bus is not None and bus.connected:
            try:
                await bus.publish(
                    OUTBOX_SUBJECT, json.dumps(row.to_json(), default=str).encode(), msg_id=f"{row.trace_id}:{row.status}"
                )
                self._wake.set()
                return
            except BusError as error:
                log.warning("outbox on NATS unavailable (%s); keeping %s in memory", error, row.trace_id)
            except trio.Cancelled:
                # Stored on NATS or not: kept here too (rows are upserts, written twice alike).
                self._keep(row)
                raise
        elif bus is not None:
            log.warning("outbox on NATS unavailable (not connected); keeping %s in memory", row.trace_id)
        self._keep(row)

    def _keep(self, row: LogRow) -> None:
        if len(self._memory) >= _MEMORY_OUTBOX:
            lost = self._memory.popleft()
            log.error("in-memory outbox full: dropped the log row of %s", lost.trace_id)
        self._memory.append(row)
        self._spool_stale = True
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drain the outbox whenever PostgreSQL is reachable. Runs for the app's lifetime."""
        with trio.CancelScope() as self._scope:
            await self._adopt_spools()
            async with self._writes.open():
                task_status.started()
                await self._drain_forever()

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def aclose(self) -> None:
        """Stop, giving back the rows a drain holds (a write of theirs may hang on a stalled
        database; the bus is still there now, and may not be once the drain has unwound)."""
        held, self._held = self._held, []
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 2.0):
            await _give_back(held)
        self.stop()
        with trio.CancelScope(shield=True):
            await self._save_spool()
            if self._memory:
                spooled = self._spool is not None and self._spool.saved and not self._spool_stale
                where = "spooled for the next start" if spooled else "lost"
                log.error("%d chat_log rows not written (PostgreSQL and NATS unavailable): %s", len(self._memory), where)
            if self._spool is not None:
                await trio.to_thread.run_sync(self._spool.close)

    async def _save_spool(self) -> None:
        spool = self._spool
        if spool is None or not self._spool_stale:
            return
        self._spool_stale = False
        rows = [row.to_json() for row in self._memory]
        try:
            await trio.to_thread.run_sync(spool.save, rows)
        except OSError as error:  # a full disk: tried again at the next drain, not only on a new row
            self._spool_stale = True
            log.error("outbox spool %s not written: %s", spool.directory, error)

    async def _adopt_spools(self) -> None:
        """Open this process's spool, and take over the rows of processes gone."""
        spool = self._spool
        if spool is None:
            return
        adopted = await open_spool(spool, "outbox")
        if adopted is None:
            self._spool = None
            return
        taken: list[Path] = []
        for items, path in adopted:
            try:
                rows = [LogRow.from_json(item) for item in items]
            except (TypeError, KeyError) as error:
                log.error("unreadable outbox spool %s left as it is: %s", path, error)
                continue
            self._memory.extendleft(reversed(rows))
            taken.append(path)
        if not taken:
            return
        self._spool_stale = True
        await self._save_spool()
        if not spool.saved:
            return  # not in this process's file: the others stay where they are
        for path in taken:
            await trio.to_thread.run_sync(spool.release, path)
        log.info("%d chat_log rows spooled by stopped gateway processes taken over", len(self._memory))
        self._pending = True

    async def _drain_forever(self) -> None:
        first = True  # rows an earlier run left are written at start, before requests ask for them
        while True:
            if not first:
                with trio.move_on_after(self.RETRY_SECONDS if self._pending else self.SWEEP_SECONDS):
                    await self._wake.wait()
            first = False
            self._wake = trio.Event()
            await self._save_spool()
            store = self._store()
            if store is None:
                self._pending = True
                continue
            try:
                await self._drain_memory(store)
                self._pending = not await self._drain_bus(store)
            except DatabaseError as error:
                self._pending = True
                log.warning("outbox drain paused: %s", error)

    async def _drain_memory(self, store: ChatStore) -> None:
        while self._memory:
            await _write_or_refuse(store, self._memory[0], self._writes)
            self._memory.popleft()
            self._spool_stale = True
        await self._save_spool()  # written: the spool file goes

    async def _drain_bus(self, store: ChatStore) -> bool:
        """Write what the NATS queue holds; True once it was found empty (without NATS,
        what it holds is unknown: rows queued before it went away wait for its return)."""
        bus = self._bus()
        if bus is None:
            return False
        try:
            async with bus.pull(OUTBOX_STREAM, "outbox-writer", OUTBOX_SUBJECT, max_ack_pending=100, ack_wait=30) as consumer:
                while True:
                    jobs = await consumer.fetch(50, timeout=0.5)
                    if not jobs:
                        return True
                    for index, job in enumerate(jobs):
                        self._held = jobs[index:]
                        try:
                            row = LogRow.from_json(json.loads(job.data))
                        except (ValueError, TypeError):
                            log.error("dropping an unreadable outbox message")
                            await job.term()
                            continue
                        try:
                            written = await _write_or_refuse(store, row, self._writes)
                        except DatabaseError:
                            # Left unsettled, the fetched rows would come back only after
                            # the consumer's ack_wait (30 s): a drain after PostgreSQL's
                            # return would find the queue empty and sleep for a sweep.
                            self._held = []
                            await _give_back(jobs[index:])
                            raise
                        if written:
                            await job.ack()
                        else:
                            await job.term()
                    self._held = []
        except BusError as error:
            log.warning("outbox on NATS not drained: %s", error)
            return False
        finally:
            held, self._held = self._held, []
            if held:  # cancelled (the gateway stops) with rows in hand
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 2.0):
                    await _give_back(held)


async def _give_back(jobs: list[JobMessage]) -> None:
    """Make fetched outbox rows available to the next drain at once."""
    for job in jobs:
        try:
            await job.nak()
        except BusError as error:  # they come back after ack_wait instead
            log.warning("outbox row not given back: %s", error)
            return


async def _write_or_refuse(store: ChatStore, row: LogRow, writes: BoundedWrites) -> bool:
    """Write an outbox row; False when PostgreSQL refuses the row itself (a data or integrity
    error: retrying cannot help, and it must not hold up the rows behind it). Any other
    failure raises, and the drain pauses until PostgreSQL is back."""
    try:
        await writes.write(lambda: store.finish(row))
    except DatabaseError as error:
        if error.sqlstate is None or error.sqlstate[:2] not in ("22", "23"):
            raise
        log.error("dropping the log row of %s: PostgreSQL refuses it (%s)", row.trace_id, error)
        return False
    return True


# The smallest size limit the events stream is given when the server has no room for the
# configured one: still hours of a busy gateway's resume window.
_EVENTS_MIN_BYTES = 64 * 1024**2


async def ensure_streams(bus: Bus, *, events_retention: float, events_max_bytes: int | None = None) -> None:
    """The events stream, bounded by age and size (an existing one is updated in place), and
    the outbox. A size the server cannot reserve (a small disk) is halved until it can: the
    events are a resume window, and without them no chat could be followed at all."""
    max_bytes = events_max_bytes
    while True:
        try:
            await bus.ensure_stream(EVENTS_STREAM, EVENTS_SUBJECTS, max_age=events_retention, max_bytes=max_bytes)
            break
        except InsufficientStorage:
            if max_bytes is None or max_bytes <= _EVENTS_MIN_BYTES:
                raise
            smaller = max(max_bytes // 2, _EVENTS_MIN_BYTES)
            log.warning("NATS has no room for %d bytes of chat events; keeping %d", max_bytes, smaller)
            max_bytes = smaller
    await bus.ensure_stream(OUTBOX_STREAM, [OUTBOX_SUBJECT], retention="workqueue", max_age=None)


