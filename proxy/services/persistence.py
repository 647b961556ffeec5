"""Never lose a completion; run a keyed (or cacheable) request once while PostgreSQL is up.

Before an exchange produces anything, `Persistence.plan` decides where its answer comes from:

- **run here** — the common case: the backend call runs in the request's own nursery (a
  client disconnect cancels it), journalled (log row + events) when PostgreSQL/NATS exist;
- **durable** — the request carries an `Idempotency-Key` (or is cacheable): the run is
  claimed in PostgreSQL and started in the app's `Runs` nursery, so it completes and is
  stored even if the client leaves; the client (and every duplicate arriving meanwhile on
  this instance) reads its `EventLog`;
- **follow** — the key is held by a run on another instance: read its events from JetStream
  (`evt.chat.{trace_id}`) until `finished`;
- **replay** — the key's run (or the cache entry for this `req_id`) is complete: replay the
  stored completion, as a stream or as JSON.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import outcome
import trio

from proxy.dialects.events import RUN_CANCELLED, Finished, WireEvent, decode_event, error_from_row
from proxy.domain.chat import ChatCompletion
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import CompletionBuilder, StreamEvent, StreamFailed, completion_events
from proxy.domain.ids import is_trace_id, maker_tag, process_tag
from proxy.domain.retention import duration
from proxy.infra.backends import Batch, _pump
from proxy.infra.batch_store import BatchStore
from proxy.infra.chat_store import INTERRUPTED_MESSAGE, ChatStore, StoredRun
from proxy.infra.conversation_store import ConversationStore
from proxy.infra.nats import Bus, BusError
from proxy.infra.postgres import Database, DatabaseError, DatabaseUnavailable, InvalidValue
from proxy.infra.resources import Resources
from proxy.infra.stored_completions import StoredCompletions
from proxy.services.journal import (
    ANSWER_HEADERS_NATS,
    EVENTS_STREAM,
    EventLog,
    EventPublisher,
    LogWriter,
    Outbox,
    events_subject,
)
from proxy.workflow.job import ATTEMPT_SPAN
from proxy.workflow.view import ClientView

log = logging.getLogger("llm_proxy.persistence")

Producer = Callable[[trio.MemorySendChannel[Batch]], Awaitable[None]]
_T = TypeVar("_T")
_S = TypeVar("_S")

# A request waits this long for the database to claim its key or look up its cache entry; a
# stalled server (not down: its connections stay open, nothing answers) then counts as down.
# The statement goes on in the background (a cancelled psycopg query can take ten seconds more
# to give up on a stalled server) for at most `_CALL_TIMEOUT`; while one is overdue, requests
# do not start another.
_LOOKUP_TIMEOUT = 3.0
# Longest wait for the row of a run known to exist (its key claimed, its events on NATS); for
# any other trace, how long a run's row may be held back while it is young
# (`LogWriter.START_DELAY`), with room for its group commit.
_ROW_WAIT_SECONDS = 5.0
_YOUNG_ROW_SECONDS = LogWriter.START_DELAY + 0.75
_CALL_TIMEOUT = 30.0
# A write a completed answer stands on (its turn appended to its conversation) outlasts a
# database outage of this long: its client waits for its end rather than the turn being lost.
_WRITE_PATIENCE = 30.0
_WRITE_RETRY_MAX = 2.0
# A change a client asks and waits on (a delete, a cancel, new metadata) waits this long for the
# database, then is cancelled (its transaction commits nothing) and answered 503: not left to
# commit in the background after its client was told to try again (a retried delete found
# nothing left to delete, a 404).
CHANGE_TIMEOUT = 10.0

# A run's cancel asked of the instance running it, over core NATS: every instance listens, the
# one with the run stops it; the asker learns it from the run's row.
_CANCEL_PREFIX = "gateway.cancel."
# How long the asker waits for the row to end, asking again now and then (core NATS drops
# what is sent while a connection is re-established).
_CANCEL_WAIT = 10.0
_CANCEL_REPEAT = 2.0
# How often the listener checks that its connection is still the gateway's.
_BUS_CHECK = 2.0
# How long a resumed stream with neither row nor events waits for its first event, when
# another gateway process may be running it (its row is held back a moment after its start).
_UNSEEN_WAIT = 2.0


def cancel_subject(trace_id: str) -> str:
    return _CANCEL_PREFIX + trace_id


@dataclass(slots=True)
class PersistenceSettings:
    cache_ttl: float = 3600.0
    # A `running` key older than this is presumed dead (its instance crashed) and taken over.
    stale_after: float = 1800.0
    # Longest wait for the next event of a run followed on another instance.
    follow_silence: float = 300.0
    # Each instance's heartbeat period, and the silence after which it is presumed dead (its
    # running chats and keys are then failed, see `ChatStore.sweep_dead_instances`).
    heartbeat: float = 5.0
    dead_after: float = 30.0
    # Where log rows wait while PostgreSQL and NATS are both down (see `Outbox`); None: memory.
    spool: Path | None = None
    # How long a key is kept once its run has ended (see `ChatStore`).
    key_retention: float = 86400.0
    # How long a run's row is kept once it has ended, from when it was made (see `ChatStore`).
    log_retention: float = 30 * 86400.0

    @property
    def late(self) -> float:
        """A beat this long after the previous one means a stall (well under `dead_after`)."""
        return 2 * self.heartbeat


class Runs:
    """Runs that outlive their request (durable runs), in one app-lifetime nursery.

    Stopping the gateway lets them finish within its graceful stop (`wind_down`), then
    cancels those still going; their journals still record them (as failed, to retry)."""

    def __init__(self) -> None:
        self.live: dict[str, EventLog] = {}
        self.stopped = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self._winding_down = False
        self._one_ended = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.stopped.set()

    def stop(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def wind_down(self, deadline: float) -> None:
        """The gateway stops: no run starts any more, those going on may finish until
        `deadline` (the end of the graceful stop that requests in flight have too), and
        those still going then are cancelled. Returns once every run has ended (a cut run
        only writes its row and its record: bounded), so that the limiter takes their usage."""
        self._winding_down = True
        await self._all_ended(deadline)
        self.stop()
        await self._all_ended(trio.current_time() + 10)

    async def _all_ended(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            while self._scopes:
                self._one_ended = trio.Event()
                await self._one_ended.wait()

    @property
    def available(self) -> bool:
        return self._nursery is not None and not self._winding_down and not self._nursery.cancel_scope.cancel_called

    def spawn(self, body: Callable[[], Awaitable[None]]) -> bool:
        """Run `body` in this nursery (a task the gateway's stop cancels); False when stopped."""
        if not self.available:
            return False
        assert self._nursery is not None
        self._nursery.start_soon(body)
        return True

    def start(self, log: EventLog, body: Callable[[], Awaitable[None]]) -> None:
        assert self._nursery is not None
        trace_id = log.trace_id
        scope, ended = self._scopes[trace_id] = (trio.CancelScope(), trio.Event())
        self.live[trace_id] = log

        async def supervised() -> None:
            try:
                with scope:
                    await body()
            finally:
                self.live.pop(trace_id, None)
                self._scopes.pop(trace_id, None)
                ended.set()
                self._one_ended.set()

        self._nursery.start_soon(supervised)

    async def cancel(self, trace_id: str) -> bool:
        """Stop a run of this instance on its client's request and return once it has ended
        (its row written: `cancelled`); False when no such run is going on here."""
        found = self._scopes.get(trace_id)
        if found is None:
            return False
        scope, ended = found
        scope.cancel()
        await ended.wait()  # bounded: a cancelled run only writes its row (shielded, with a deadline)
        return True

    def stop_run(self, trace_id: str) -> None:
        """`cancel` without waiting: asked by another instance, which waits for the row."""
        found = self._scopes.get(trace_id)
        if found is not None:
            found[0].cancel()

    def cancelled(self, trace_id: str) -> bool:
        """Whether the run was stopped by `cancel` (not by the gateway stopping)."""
        found = self._scopes.get(trace_id)
        return found is not None and found[0].cancel_called


@dataclass(slots=True)
class Plan:
    """Where an exchange's answer comes from (see the module docstring)."""

    kind: str  # "here" | "durable" | "follow" | "replay"
    producer: Producer | None = None
    req_id: str | None = None
    key: str | None = None
    cache: bool = False
    cache_id: str | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    # The trace whose run answers (replay, follow): the response's `x-trace-id`.
    answered_by: str | None = None
    # The upstream model whose answer a replay (or a run here that is followed) gives: a
    # stand-in's, when one answered. None: not known (a run on another instance).
    winner: str | None = None
    # The run here that a follower reads (None: a run on another instance, or no follow): its
    # `headers` are what the run's client is told, of which the follower is told the answer's.
    live: EventLog | None = None
    # A run on another instance that a follower reads: what that run's client was told of the
    # answer, filled in (from its first event, or its row) before the follower's first batch.
    told: list[tuple[bytes, bytes]] | None = None


class Persistence:
    def __init__(self, resources: Resources, settings: PersistenceSettings) -> None:
        self.resources = resources
        self.settings = settings
        self.runs = Runs()
        self.outbox = Outbox(store=self.store, bus=self.bus, spool=settings.spool)
        self.writer = LogWriter(store=self.store, outbox=self.outbox, retention=settings.log_retention)
        self.publisher = EventPublisher(bus=self.bus)
        # This process, as the owner of its running rows and keys; it begins with the tag its
        # trace ids begin with (see `maker_alive`).
        self.instance_id = process_tag() + secrets.token_hex(4)
        self._beaten = False  # whether this instance's row was written once (a row gone since: swept)
        self._swept = False  # declared dead by another, its runs not yet said running again
        self._overdue = 0  # lookups whose request stopped waiting and that have not returned

    async def _bounded(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """`call`'s result if the database gives it within `_LOOKUP_TIMEOUT`; else (or while
        an earlier call is still overdue) `DatabaseUnavailable`, the request going on without."""
        if self._overdue:
            raise DatabaseUnavailable("an earlier statement still waits for the database")
        done = trio.Event()
        result: list[outcome.Outcome[_T]] = []
        abandoned = False

        async def run() -> None:
            nonlocal abandoned
            try:
                with trio.fail_after(_CALL_TIMEOUT):
                    result.append(outcome.Value(await call()))
            except trio.TooSlowError:
                result.append(outcome.Error(DatabaseUnavailable(f"no answer within {_CALL_TIMEOUT:g} s")))
            except Exception as error:  # the request's to handle (or to surface, if a bug)
                result.append(outcome.Error(error))
            finally:
                done.set()
                if abandoned:
                    self._overdue -= 1

        if not self.runs.spawn(run):
            with trio.move_on_after(_LOOKUP_TIMEOUT):
                return await call()
            raise DatabaseUnavailable(f"the database did not answer within {_LOOKUP_TIMEOUT:g} s")
        with trio.move_on_after(_LOOKUP_TIMEOUT):
            await done.wait()
        if not done.is_set():
            abandoned = True
            self._overdue += 1
            raise DatabaseUnavailable(f"the database did not answer within {_LOOKUP_TIMEOUT:g} s")
        return result[0].unwrap()

    async def keep_alive(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Beat this instance's heartbeat, and sweep instances whose heartbeat stopped.

        A stall of PostgreSQL (or of this process) silences every instance alike: a beat late
        by two periods waits a whole `dead_after` of prompt beats before judging any other
        instance dead, so live ones have beaten again by then. One declared dead all the same
        (its heartbeat stuck behind a busy pool) says its runs still going on run again."""
        task_status.started()
        late = self.settings.late
        while True:
            store = self.store()
            if store is not None:
                try:
                    self._swept |= not await store.heartbeat(self.instance_id, late=late, first=not self._beaten)
                    self._beaten = True
                    if self._swept:
                        back = await store.reassert(self.instance_id, list(self.runs.live))
                        self._swept = False
                        log.warning("this gateway process was presumed dead by another (its heartbeat was late): "
                                    "%d of its running chats failed meanwhile now say running again", back)
                    swept = await store.sweep_dead_instances(self.settings.dead_after, judge=self.instance_id, late=late)
                    settled = await store.settle_orphaned_workflows(self.settings.dead_after)
                except DatabaseError as error:
                    log.debug("heartbeat failed: %s", error)
                else:
                    if swept:
                        log.warning("%d chats of gateway processes gone silent were still running: now failed", swept)
                    if settled:
                        log.warning("%d workflow chats whose gateway stopped relaying them: given their workers' outcomes",
                                    settled)
            await trio.sleep(self.settings.heartbeat)

    async def register(self) -> bool:
        """This instance's row in `gateway_instances` now, unless a heartbeat wrote it: its
        budget holds are made in its name only once a sweep could find it dead (the first
        heartbeat comes when the database is first seen, up to a period after it is up).
        False: no database to write it to."""
        if self._beaten:
            return True
        store = self.store()
        if store is None:
            return False
        await store.heartbeat(self.instance_id, late=self.settings.late, first=True)
        self._beaten = True
        return True

    async def take_cancels(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stop this instance's runs whose cancel a client sent to another instance (which
        then reads the run's row, written `cancelled` as for a cancel sent here)."""
        task_status.started()
        while True:
            bus = self.bus()
            if bus is None:
                await trio.sleep(_BUS_CHECK / 2)
                continue
            try:
                async with bus.subscribe(cancel_subject("*")) as messages:
                    # A connection closed for good is replaced by a new `Bus`: listen there.
                    while self.bus() is bus:
                        with trio.move_on_after(_BUS_CHECK):
                            message = await messages.receive()
                            self.runs.stop_run(message.subject.removeprefix(_CANCEL_PREFIX))
            except BusError as error:
                log.warning("listening for cancels failed (%s); retrying", error)
                await trio.sleep(_BUS_CHECK / 2)

    async def maker_alive(self, trace_id: str) -> bool:
        """Whether the gateway process that made `trace_id` is another one (an instance, a
        `--workers` sibling) still alive, which may be running it with its row not written
        yet. This process's own runs are known here; a process gone writes nothing more; an id
        of a shape no gateway makes was made by none. True when the database cannot say."""
        tag = maker_tag(trace_id)
        return tag is not None and await self.others_alive(tag)

    async def others_alive(self, tag: str = "") -> bool:
        """Whether another gateway process (of those whose ids begin with `tag`) is alive,
        which may have answered what this one cannot find yet. True when the database cannot say."""
        store = self.store()
        if store is None:
            return False
        try:
            return await self._bounded(lambda: store.others_alive(self.instance_id, tag, self.settings.dead_after))
        except DatabaseError:
            return True

    async def has_events(self, trace_id: str) -> bool:
        """Whether the trace has published events (False without NATS)."""
        bus = self.bus()
        if bus is None:
            return False
        try:
            return await bus.last_message(EVENTS_STREAM, events_subject(trace_id)) is not None
        except BusError:
            return False

    async def said_so_far(self, trace_id: str) -> ChatCompletion | None:
        """What a run of another instance has said so far, from its events on JetStream (its
        row holds its answer only once it has ended); None without NATS or events."""
        bus = self.bus()
        if bus is None:
            return None
        said = CompletionBuilder()
        subject = events_subject(trace_id)
        try:
            last = await bus.last_message(EVENTS_STREAM, subject)
            if last is None:
                return None
            end = decode_event(last)[0]
            # Bounded: a poll is answered with what arrived in time.
            with trio.move_on_after(_LOOKUP_TIMEOUT):
                async with bus.subscribe(subject, from_start=True, stream=EVENTS_STREAM) as messages:
                    async for message in messages:
                        seq, event = decode_event(message.data)
                        if event is not None and not isinstance(event, Finished):
                            said.add(event)
                        if seq >= end:
                            break
        except BusError as error:
            log.warning("reading %s's events from NATS failed: %s", trace_id, error)
        return said.build() if said.start is not None else None

    async def cancel_elsewhere(self, trace_id: str) -> StoredRun | None:
        """Ask whichever instance runs `trace_id` to stop it; its row once no longer
        `running` (None: no instance ended it within `_CANCEL_WAIT`, or no NATS/PostgreSQL)."""
        bus, store = self.bus(), self.store()
        if bus is None or store is None:
            return None
        with trio.move_on_after(_CANCEL_WAIT):
            while True:
                try:
                    await bus.publish_core(cancel_subject(trace_id), b"")
                except BusError as error:
                    log.warning("asking for %s's cancel failed: %s", trace_id, error)
                    return None
                with trio.move_on_after(_CANCEL_REPEAT):
                    while True:
                        await trio.sleep(0.1)
                        try:
                            stored = await store.stored_run(trace_id)
                        except DatabaseError:
                            continue
                        if stored is not None and stored.status != "running":
                            return stored
        return None

    async def delete(self, trace_id: str, carried: int = 0) -> bool:
        """Delete an ended run's answer and request from the journal, and its events from
        JetStream (by which its stream is read again); False when it has no row. A 503 when
        the journal cannot be written: a client deleting its data must know it is not gone.
        `carried`: see `ChatStore.delete`."""
        deleted = await self.journal_read(lambda store: store.delete(trace_id, carried), f"the deletion of {trace_id}",
                                          change=True)
        bus = self.bus()
        if bus is not None:
            try:
                await bus.purge(EVENTS_STREAM, events_subject(trace_id))
            except BusError as error:
                # Its row says it is deleted, which every reader of its events checks first;
                # the events themselves go with the stream's retention.
                log.warning("purging %s's events failed: %s", trace_id, error)
        return deleted

    @property
    def kept(self) -> str:
        """How long the journal keeps a run, as a client is told it (see `ChatStore`)."""
        return f"for {duration(self.settings.log_retention)} after it was made"

    def store(self) -> ChatStore | None:
        db = self.resources.database
        return ChatStore(db, key_retention=self.settings.key_retention) if db is not None else None

    def bus(self) -> Bus | None:
        return self.resources.bus

    async def claim(
        self, key: str, req_id: str, trace_id: str, *, cache_id: str | None = None, runs_here: bool = True
    ) -> Plan | None:
        """Claim `key`; None when this trace owns it (or no store is reachable: degraded,
        the request runs unguarded rather than not at all). `runs_here`: the run lives and
        dies with this process (a workflow's job lives in its worker: its key has no owner).

        With `cache_id`, `key` guards that exact-cache entry (identical cacheable requests
        at once make one backend call) and holds no longer than the entry lives."""
        owner = self.instance_id if runs_here else None
        store = self.store()
        if store is None:
            log.warning("PostgreSQL unavailable: key %s is not deduplicated", key)
            return None
        try:
            claim = await self._claiming(key, trace_id, lambda: store.claim(
                key, req_id, trace_id, stale_after=self.settings.stale_after, cache_id=cache_id, owner=owner,
                owner_silence=self.settings.dead_after, judge=self.instance_id, late=self.settings.late,
            ), lambda claim: claim.outcome == "owner")
        except DatabaseError as error:
            log.warning("claiming %s failed (%s): not deduplicated", key, error)
            return None
        if claim.outcome == "owner":
            return None
        if claim.outcome == "conflict":
            raise GatewayError(
                ErrorKind.CONFLICT,
                "This Idempotency-Key was already used for a different request.",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        if claim.outcome == "completed":
            try:
                run = await self._bounded(lambda: self._completed_run(store, claim.trace_id))
            except DatabaseError:
                run = None
            if run is not None and run.completion is not None:
                # A cache entry that appeared since the lookup missed is a cache hit.
                label = (b"x-cache", b"hit") if cache_id is not None else (b"idempotent-replayed", b"true")
                return Plan("replay", producer=replayer(run.completion), req_id=req_id, key=key,
                            headers=[label, (b"x-replay-of", claim.trace_id.encode()), *run.headers],
                            answered_by=claim.trace_id,
                            winner=run.upstream_model)
            # Completed but its result is gone (e.g. expired): run again.
            if await self._took_over(store, key, claim.trace_id, trace_id, owner):
                return None
        local = self.runs.live.get(claim.trace_id)
        if local is not None and _failed(local) and await self._took_over(store, key, claim.trace_id, trace_id, owner):
            # Its outcome is not committed yet, but the run is over and failed: a retry runs
            # again, as it would a moment later.
            return None
        told: list[tuple[bytes, bytes]] | None = None if local is not None else []
        producer = log_reader(local) if local is not None else self.remote_reader(claim.trace_id, told)
        headers = [(b"x-attached-to", claim.trace_id.encode())]
        if cache_id is not None:  # answered by its twin's call, not a call of its own: a hit
            headers.append((b"x-cache", b"hit"))
        # A run here says which model answers once a stand-in took over (before its first byte).
        return Plan("follow", producer=producer, req_id=req_id, key=key, winner=local.winner if local is not None else None,
                    headers=headers, answered_by=claim.trace_id, live=local, told=told)

    async def _claiming(
        self, key: str, trace_id: str, call: Callable[[], Awaitable[_T]], won: Callable[[_T], bool]
    ) -> _T:
        """`call` (a claim of `key` for `trace_id`), bounded as a lookup. Its request cancelled
        meanwhile (its client gone) never runs, yet the claim goes on in the background: a key
        it wins, then or once the database answers, is let go, or a retry with the key would
        follow a run that never comes (for `follow_silence`, and again until `stale_after`)."""
        gone = held = False

        async def claim() -> _T:
            nonlocal held
            result = await call()
            held = won(result)
            if held and gone:
                self.let_go(key, trace_id)
            return result

        try:
            return await self._bounded(claim)
        except trio.Cancelled:
            gone = True
            if held:  # won as the cancellation came
                self.let_go(key, trace_id)
            raise

    def let_go(self, key: str, trace_id: str) -> None:
        """A key `trace_id` claimed for a request cancelled before its run started (its client
        gone): said `cancelled`, so that a retry with it runs again. In the background: the
        request's own task is being cancelled."""
        store = self.store()
        if store is None:
            return

        async def release() -> None:
            try:
                with trio.fail_after(_CALL_TIMEOUT):
                    await store.release(key, trace_id, "cancelled")
            except (DatabaseError, trio.TooSlowError) as error:
                log.warning("letting key %s go failed (%s): a retry with it waits for the instance sweep", key, error)

        self.runs.spawn(release)  # stopped: the instance's keys are failed by the sweep

    async def give_up(self, key: str, trace_id: str) -> None:
        """A key `trace_id` claimed and will not run (refused before it started): failed, so
        that a retry with it runs again rather than waiting on a run that never comes."""
        store = self.store()
        if store is None:
            return
        try:
            await self._bounded(lambda: store.release(key, trace_id, "failed"))
        except DatabaseError as error:
            log.warning("giving up key %s failed (%s): a retry with it waits for the instance sweep", key, error)

    async def _took_over(self, store: ChatStore, key: str, previous_trace: str, trace_id: str, owner: str | None) -> bool:
        try:
            return await self._claiming(
                key, trace_id, lambda: _take_over(store, key, previous_trace, trace_id, owner), lambda taken: taken
            )
        except DatabaseError:
            return False

    @staticmethod
    async def _completed_run(store: ChatStore, trace_id: str) -> StoredRun | None:
        """The trace's stored run if it completed (its answer, and which model gave it)."""
        try:
            run = await store.stored_run(trace_id)
        except DatabaseError:
            return None
        return run if run is not None and run.status == "completed" else None

    async def stored_run(self, trace_id: str) -> StoredRun | None:
        """A trace's row, read within `_LOOKUP_TIMEOUT`; None when it has none, or when the
        gateway has no database. A 503 when its database cannot be read (down, or stalled):
        a trace not found then may well exist."""
        if self.resources.database_url is None:
            return None
        return await self.journal_read(lambda store: store.stored_run(trace_id), f"the row of {trace_id}")

    async def row_coming(self, trace_id: str) -> StoredRun | None:
        """The row of a run that has not written it yet, waited for: a row is held back while a
        run is young, and written a moment after its client had the whole answer (a group
        commit, on whichever instance ran it), so a client may ask for it (read it, continue
        it, resume its stream) before. Longest for a run known to be one: its key claimed (a
        background response, claimed before it starts) or its events on NATS; a trace nobody
        made is not found after `_YOUNG_ROW_SECONDS` while the process its id names is another one
        alive, else at once (see `maker_alive`). A 503 when the journal cannot be read."""
        if self.store() is None:
            return None
        claimed = await self.journal_read(lambda store: store.trace_claimed(trace_id), f"the key of {trace_id}")
        known = claimed or await self.has_events(trace_id)
        if not known and not await self.maker_alive(trace_id):
            return None
        with trio.move_on_after(_ROW_WAIT_SECONDS if known else _YOUNG_ROW_SECONDS):
            while True:
                try:
                    stored = await self.stored_run(trace_id)
                except GatewayError:
                    if trace_id in self.runs.live:
                        return None  # the run itself answers
                    raise
                if stored is not None:
                    return stored
                await trio.sleep(0.05)  # its writer's group commit: a few milliseconds
        return None

    async def journal_read(
        self, call: Callable[[ChatStore], Awaitable[_T]], what: str, *, change: bool = False
    ) -> _T:
        """A read of the journal a client waits on, within `_LOOKUP_TIMEOUT`; a 503 to retry
        when its database cannot be read (not connected, down, stalled or failing). A `change`
        (a write) waits `CHANGE_TIMEOUT`, then is cancelled: a 503 says it was not made."""
        return await self._waited_on(self.store(), call, what, change=change)

    async def conversations(
        self, call: Callable[[ConversationStore], Awaitable[_T]], what: str, *, change: bool = False
    ) -> _T:
        """A statement on the stored conversations a client waits on, as `journal_read`."""
        db = self.resources.database
        return await self._waited_on(ConversationStore(db) if db is not None else None, call, what, change=change)

    async def conversation_write(self, call: Callable[[ConversationStore], Awaitable[_T]], what: str) -> _T:
        """A write to a conversation that a run depends on (its lock, its answer's items),
        `call` idempotent: see `_settled`."""
        return await self._settled(ConversationStore, call, what)

    async def batch_write(self, call: Callable[[BatchStore], Awaitable[_T]], what: str) -> _T:
        """A write creating a batch, `call` idempotent (its id chosen once): see `_settled`."""
        return await self._settled(BatchStore, call, what)

    async def _settled(
        self, make: Callable[[Database], _S], call: Callable[[_S], Awaitable[_T]], what: str
    ) -> _T:
        """A write whose outcome its client is told: unlike a lookup's (`_bounded`), it is not
        given up on while it may still commit (a 503 for a batch that then runs, a lock taken
        for a run that never starts): it waits out a stalled database, and is tried again
        (`call` must be idempotent) while the database is unreachable, for up to `_WRITE_PATIENCE`; then `GatewayError`.
        Its caller cancelled (a client gone), the write under way ends first all the same."""
        deadline = trio.current_time() + _WRITE_PATIENCE
        delay = 0.25
        while True:
            db = self.resources.database
            try:
                if db is None:
                    raise DatabaseUnavailable("not connected")
                # Shielded: a statement cancelled mid-flight (its client gone) may still commit
                # once a stalled server reads it, its caller none the wiser.
                with trio.CancelScope(shield=True), trio.fail_after(max(deadline - trio.current_time(), 0.0)):
                    return await call(make(db))
            except InvalidValue as error:
                raise error.refusal() from error
            except (DatabaseError, trio.TooSlowError) as error:
                if trio.current_time() + delay >= deadline:
                    log.error("writing %s failed: %s", what, error or "no answer")
                    raise GatewayError(
                        ErrorKind.UNAVAILABLE, "The gateway's journal (PostgreSQL) cannot be written now; try again shortly.",
                        code="journal_unavailable", retry_after=2,
                    ) from error
                log.info("writing %s failed (%s); trying again", what, error)
            await trio.sleep(delay)
            delay = min(delay * 2, _WRITE_RETRY_MAX)

    async def batches(self, call: Callable[[BatchStore], Awaitable[_T]], what: str, *, change: bool = False) -> _T:
        """A statement on the stored files and batches a client waits on, as `journal_read`."""
        db = self.resources.database
        return await self._waited_on(BatchStore(db) if db is not None else None, call, what, change=change)

    async def stored_completions(
        self, call: Callable[[StoredCompletions], Awaitable[_T]], what: str, *, change: bool = False
    ) -> _T:
        """A statement on OpenAI's stored chat completions a client waits on, as `journal_read`."""
        db = self.resources.database
        return await self._waited_on(StoredCompletions(db) if db is not None else None, call, what, change=change)

    async def _waited_on(
        self, store: _S | None, call: Callable[[_S], Awaitable[_T]], what: str, *, change: bool = False
    ) -> _T:
        try:
            if store is None:
                raise DatabaseUnavailable("not connected")
            if not change:
                return await self._bounded(lambda: call(store))
            with trio.move_on_after(CHANGE_TIMEOUT):
                return await call(store)
            raise DatabaseUnavailable(f"no answer within {CHANGE_TIMEOUT:g} s")
        except InvalidValue as error:
            raise error.refusal() from error  # the request's value is at fault, not the journal
        except DatabaseError as error:
            log.warning("%s %s failed: %s", "changing" if change else "reading", what, error)
            if change:
                raise GatewayError(
                    ErrorKind.UNAVAILABLE, "The gateway's journal (PostgreSQL) cannot be written now; try again shortly.",
                    code="journal_unavailable", retry_after=2,
                ) from error
            raise _unreadable() from error

    def database_now(self, what: str) -> Database:
        """The database a read streamed after its lookup goes on with (a download); a 503 to
        retry when the gateway lost it since (its pool closed in an outage)."""
        db = self.resources.database
        if db is None:
            log.warning("reading %s failed: the database was lost after its lookup", what)
            raise _unreadable()
        return db

    async def cached(self, req_id: str) -> tuple[str, ChatCompletion, list[tuple[bytes, bytes]]] | None:
        store = self.store()
        if store is None:
            return None
        try:
            return await self._bounded(lambda: store.cached(req_id))
        except DatabaseError as error:
            log.warning("exact cache lookup failed (%s): skipped", error)
            return None

    def remote_reader(self, trace_id: str, told: list[tuple[bytes, bytes]] | None = None) -> Producer:
        """Follow a run on another instance through JetStream; with NATS down, wait for its
        stored outcome in PostgreSQL instead. `told` gets what the run's client was told of
        the answer (`ANSWER_HEADERS_NATS`, or the row's) before the first batch is sent."""
        said = told if told is not None else []

        async def read(send: trio.MemorySendChannel[Batch]) -> None:
            bus = self.bus()
            if bus is not None:
                try:
                    if await self._follow_bus(bus, trace_id, send, said):
                        return
                except BusError as error:
                    log.warning("following %s on NATS failed: %s", trace_id, error)
            await self._wait_stored(trace_id, send, said)

        return read

    async def _follow_bus(
        self, bus: Bus, trace_id: str, send: trio.MemorySendChannel[Batch], told: list[tuple[bytes, bytes]]
    ) -> bool:
        """Relay the trace's events; True once its `finished` was seen (False: nothing stored).

        While the run is silent, its row is looked at every heartbeat: a run whose process
        died never publishes `finished`, but its row is failed once that process is swept."""
        silence = self.settings.follow_silence
        relayed = failed = heard_any = False
        async with bus.subscribe(events_subject(trace_id), from_start=True) as messages:
            heard = trio.current_time()
            while True:
                with trio.move_on_after(self.settings.heartbeat) as quiet:
                    try:
                        message = await messages.receive()
                    except trio.EndOfChannel:
                        break
                if quiet.cancelled_caught:
                    if trio.current_time() - heard >= silence:
                        break
                    error = await self._stored_failure(trace_id)
                    if error is None:
                        continue
                    if not relayed:
                        raise error
                    await send.send(Batch([StreamFailed(error)], done=True))
                    return True
                heard = trio.current_time()
                seq, event = decode_event(message.data)
                if not heard_any:
                    heard_any = True
                    if seq > 1:
                        # Its first events were discarded (past the events stream's size or age
                        # limit): relayed, they would be an answer without its beginning. Its
                        # stored outcome is the whole answer.
                        return False
                    told.extend(_answer_headers(message.headers))
                if isinstance(event, Finished):
                    if not relayed and event.status != "completed":
                        raise await self._stored_error(trace_id)  # it failed before it started
                    end: list[StreamEvent] = []
                    if event.status != "completed" and not failed:  # stopped, not an answer
                        end.append(StreamFailed(
                            RUN_CANCELLED if event.status == "cancelled" else await self._stored_error(trace_id)
                        ))
                    await send.send(Batch(end, done=True))
                    return True
                if event is not None:
                    relayed = True
                    failed = isinstance(event, StreamFailed)
                    await send.send(Batch([event]))
        raise GatewayError(
            ErrorKind.TIMEOUT, f"The run {trace_id} went silent for {silence:g}s.", code="run_silent"
        )

    async def _stored_error(self, trace_id: str) -> GatewayError:
        """The error a finished, failed run stored (committed before its `finished`)."""
        return await self._stored_failure(trace_id) or GatewayError(ErrorKind.UNAVAILABLE, "The run was interrupted.")

    async def _stored_failure(self, trace_id: str) -> GatewayError | None:
        """The error of a run whose row (or, with no row yet, whose key) says it failed or
        was cancelled; None otherwise, or when the database does not say within
        `_LOOKUP_TIMEOUT` (a follower keeps following the run's events)."""
        store = self.store()
        if store is None:
            return None
        try:
            found = await self._bounded(lambda: store.stored_run(trace_id))
            if found is None and await self._bounded(lambda: store.trace_failed(trace_id)):
                return GatewayError(ErrorKind.UNAVAILABLE, INTERRUPTED_MESSAGE)
        except DatabaseError:
            return None
        return None if found is None else _row_failure(found)

    async def _wait_stored(
        self, trace_id: str, send: trio.MemorySendChannel[Batch], told: list[tuple[bytes, bytes]]
    ) -> None:
        """Wait for a run of another instance to store its outcome (NATS cannot tell it):
        replay its answer, or raise its error; a 503 when the database cannot be read."""
        deadline = trio.current_time() + self.settings.follow_silence
        while trio.current_time() < deadline:
            found = await self.journal_read(lambda store: store.stored_run(trace_id), f"the row of {trace_id}")
            if found is not None and found.status == "completed" and found.completion is not None:
                told[:] = found.headers
                await replayer(found.completion)(send)
                return
            failure = _row_failure(found) if found is not None else None
            if failure is not None:
                raise failure
            await trio.sleep(0.5)
        raise GatewayError(ErrorKind.TIMEOUT, f"The run {trace_id} did not complete in time.", code="run_silent")


def _answer_headers(nats_headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """What a run's first event says its client was told of the answer (`ANSWER_HEADERS_NATS`)."""
    raw = nats_headers.get(ANSWER_HEADERS_NATS)
    try:
        said = json.loads(raw) if raw else {}
    except ValueError:
        return []
    if not isinstance(said, dict):
        return []
    try:  # header bytes, as HTTP has them (latin-1 each way)
        return [(str(name).encode("latin-1"), value.encode("latin-1")) for name, value in said.items() if isinstance(value, str)]
    except UnicodeEncodeError:
        return []


def _row_failure(found: StoredRun) -> GatewayError | None:
    """The error a row that ended failed or cancelled stored; None for any other row."""
    if found.status not in ("failed", "cancelled"):
        return None
    return error_from_row(found.error or {}, kind=ErrorKind.UNAVAILABLE, message="The run was interrupted.")


def _ends_failed(events: list[StreamEvent]) -> bool:
    return bool(events) and isinstance(events[-1], StreamFailed)


def _failed(event_log: EventLog) -> bool:
    outcome = event_log.outcome
    return event_log.head_error is not None or (outcome is not None and outcome.status != "completed")


def _unreadable() -> GatewayError:
    return GatewayError(
        ErrorKind.UNAVAILABLE, "The gateway's journal (PostgreSQL) cannot be read now; try again shortly.",
        code="journal_unavailable", retry_after=2,
    )


async def _take_over(store: ChatStore, key: str, previous_trace: str, trace_id: str, owner: str | None) -> bool:
    try:
        return await store.take_over(key, previous_trace, trace_id, owner=owner)
    except DatabaseError:
        return False


def replayer(completion: ChatCompletion) -> Producer:
    async def replay(send: trio.MemorySendChannel[Batch]) -> None:
        await send.send(Batch(completion_events(completion), done=True, completion=completion))

    return replay


def log_reader(event_log: EventLog, start: int = 0) -> Producer:
    """Read a local run's events from `start`, live, until it ends."""

    async def read(send: trio.MemorySendChannel[Batch]) -> None:
        position = start
        while True:
            # The run's backend keep-alives stay with the run: once its client has had an
            # event, a silence of KEEPALIVE_SECONDS is a keep-alive (its head is not sent
            # early), as it is for a client that reads its backend itself.
            with trio.move_on_after(_pump.KEEPALIVE_SECONDS if position else math.inf) as silence:
                await event_log.wait_beyond(position)
            if silence.cancelled_caught:
                await send.send(Batch([]))
                continue
            if event_log.head_error is not None and not event_log.events:
                raise event_log.head_error
            events = event_log.events[position:]
            position += len(events)
            if event_log.closed and position >= len(event_log.events):
                outcome = event_log.outcome
                if not event_log.events and outcome is not None and outcome.status != "completed":
                    raise outcome.error or GatewayError(ErrorKind.UNAVAILABLE, "The run was interrupted.")
                if outcome is not None and outcome.status != "completed" and not _ends_failed(event_log.events):
                    # Stopped (its client's cancel, the server stopping): its readers must not
                    # render what it said as a complete answer.
                    events = [*events, StreamFailed(outcome.error or RUN_CANCELLED)]
                await send.send(Batch(events, done=True))
                return
            if events:
                await send.send(Batch(events))

    return read


async def trace_events(
    persistence: Persistence,
    trace_id: str,
    after: int,
    send: trio.MemorySendChannel[tuple[int, WireEvent]],
    tenant: str | None = None,
    *,
    resumed: str | None = None,
) -> None:
    """A trace's events with their sequence numbers, from `after + 1` to `finished`: from the
    run itself when it is on this instance, else from JetStream, else rebuilt from its row.

    With `tenant` (auth on), only that tenant's traces are found; one whose owner cannot be
    checked (no row, not on this instance) is not found either. `resumed` (how to read it
    whole instead): the caller resumes a stream by its own numbering of these events, which
    events rebuilt otherwise than they streamed cannot serve (a 409 then)."""
    unknown = GatewayError(ErrorKind.NOT_FOUND, f"No stream `{trace_id}` is known here.", param="trace_id")
    if not is_trace_id(trace_id):
        raise unknown  # no store is asked: a NUL is no outage, nor `*` every trace's subject
    local = persistence.runs.live.get(trace_id)
    if local is not None:
        if tenant is not None and local.tenant != tenant:
            raise unknown
        await _local_events(local, after, send)
        return
    stored: StoredRun | None = None
    readable = persistence.resources.database_url is not None
    try:
        stored = await persistence.stored_run(trace_id)
    except GatewayError:
        if tenant is not None:
            raise  # whose trace it is cannot be told: not "not found"
        readable = False
    if stored is None and tenant is not None:
        # Whose trace it is needs its row: one that ran on another instance a moment ago
        # (ended before its client reconnected here, or younger than its row) has it shortly.
        stored = await persistence.row_coming(trace_id)
    if (tenant is not None and (stored is None or stored.tenant != tenant)) or (stored is not None and stored.deleted):
        raise unknown
    if (
        stored is None and readable and not await persistence.maker_alive(trace_id)
        and not await persistence.has_events(trace_id)
    ):
        raise unknown  # not live here, and no other process could be running it: nothing will come
    running = stored is not None and stored.status == "running"
    bus = persistence.bus()
    if bus is not None:
        # A running trace may be slow to its next event; anything else is stored already.
        first_wait = persistence.settings.follow_silence if running or (stored is None and not readable) else _UNSEEN_WAIT
        # A workflow's bus events are its workers' (every task, every attempt): its client
        # reads them through the view the workflow route gave it. A client that waited for
        # the whole answer got the retry's after a dead worker: so does its reader.
        view = None
        if stored is not None and stored.route == "workflow":
            view = ClientView(from_attempt=stored.answer_attempt)
        async def row(since_first_event: float) -> StoredRun | None:
            current = persistence.store()
            if current is None:
                return None
            try:
                found = await persistence._bounded(lambda: current.stored_run(trace_id))
                if found is None and await persistence._bounded(lambda: current.trace_failed(trace_id)):
                    return StoredRun(status="failed", completion=None, error=None, tenant=None, route="direct")
            except DatabaseError:
                return None  # PostgreSQL down: a live run's row may be held back, so keep waiting
            if found is None and since_first_event >= persistence.settings.dead_after:
                # A live run has its row within a second of its start; a keyless run killed
                # before its row was written has nothing the heartbeat sweep could fail.
                return StoredRun(status="failed", completion=None, error=None, tenant=None, route="direct")
            return found

        try:
            if await _bus_events(bus, trace_id, after, send, persistence.settings.follow_silence, first_wait, view,
                                 row=row, check_every=persistence.settings.heartbeat):
                return
        except BusError as error:
            log.warning("reading %s from NATS failed: %s", trace_id, error)
        except _EventsDiscarded:
            if stored is None or running:
                # Nothing else holds what it said so far: an error saying so, not a stream
                # that starts in the middle of its answer.
                raise GatewayError(
                    ErrorKind.CONFLICT,
                    f"The first events of `{trace_id}` were discarded (the events stream keeps "
                    "`events_max_bytes` and `events_retention_seconds` of them), so its stream cannot "
                    "be read while it runs; read it again once it has finished.",
                    param="starting_after" if resumed is not None else "after", code="resume_unavailable",
                ) from None
    if stored is None or running:
        raise unknown
    await _rebuilt_events(trace_id, stored, after, send, resumed)


async def _rebuilt_events(
    trace_id: str, stored: StoredRun, after: int, send: trio.MemorySendChannel[tuple[int, WireEvent]],
    resumed: str | None = None,
) -> None:
    """A finished trace's events rebuilt from its row: the answer whole, not piece by piece
    as it streamed, so numbered like the live stream only when there are as many. A client
    that saw part of a stream numbered otherwise cannot be given just the rest."""
    completion = stored.completion
    events: list[WireEvent] = list(completion_events(completion)) if completion else []
    if stored.status == "failed":
        events.append(StreamFailed(_error_of(stored)))
    finished = Finished(reason=_reason_of(stored), status=stored.status, winner=stored.upstream_model)
    events.append(finished)
    live_end = stored.finished_seq
    if after > 0 and live_end and live_end != len(events):
        if after >= live_end - 1:  # it saw every event; maybe not the end
            if after < live_end:
                await send.send((live_end, finished))
            return
        raise GatewayError(
            ErrorKind.CONFLICT,
            f"The events of `{trace_id}` are not available (NATS is down, or they are past its retention "
            f"limits), so its stream cannot resume after event {after}; read it whole with `after=0`.",
            param="after", code="resume_unavailable",
        )
    if resumed is not None and live_end and live_end != len(events):
        raise GatewayError(
            ErrorKind.CONFLICT,
            f"The events of `{trace_id}` are not available (NATS is down, or they are older than its "
            f"retention), so its stream cannot resume where its client stopped; {resumed}.",
            param="starting_after", code="resume_unavailable",
        )
    for seq, event in enumerate(events, start=1):
        if seq > after:
            await send.send((seq, event))


async def _local_events(event_log: EventLog, after: int, send: trio.MemorySendChannel[tuple[int, WireEvent]]) -> None:
    position = after
    while True:
        await event_log.wait_beyond(position)
        events = event_log.events[position:]
        for offset, event in enumerate(events, start=position + 1):
            await send.send((offset, event))
        # What the run appended while a send waited for the reader is read next time round.
        position += len(events)
        outcome = event_log.outcome
        if outcome is not None and position >= len(event_log.events):
            end = len(event_log.events) + 1
            if end > after:  # a client that saw the end already just gets the stream closed
                await send.send((end, Finished(outcome.reason, outcome.status, event_log.winner)))
            return


class _EventsDiscarded(Exception):
    """A trace's events on the bus begin after what its reader needs: the stream's limits
    discarded the oldest."""


async def _bus_events(
    bus: Bus,
    trace_id: str,
    after: int,
    send: trio.MemorySendChannel[tuple[int, WireEvent]],
    silence: float,
    first_wait: float,
    view: ClientView | None = None,
    *,
    row: Callable[[float], Awaitable[StoredRun | None]] | None = None,
    check_every: float = 5.0,
) -> bool:
    """True once `finished` was relayed; False when nothing arrived within `first_wait`.

    Through a `view`, the events are numbered as the client saw them (1, 2, ...), the same
    numbers the trace's `EventLog` gives them while it runs. `row` reads the trace's row
    again while the events are quiet (given the seconds since the first event was heard): a
    run whose process died never publishes `finished`, but once its row is no longer running
    the stream ends with the row's outcome."""
    seen = False
    first_heard = math.inf
    shown = 0
    failed = False  # the last event relayed was the run's error
    async with bus.subscribe(events_subject(trace_id), from_start=True) as messages:
        heard = trio.current_time()
        while True:
            with trio.move_on_after(min(check_every, first_wait if not seen else silence)) as quiet:
                try:
                    message = await messages.receive()
                except trio.EndOfChannel:
                    break
            if quiet.cancelled_caught:
                waited = trio.current_time() - heard
                if not seen:
                    if waited >= first_wait:
                        return False
                    continue
                stored = await row(trio.current_time() - first_heard) if row is not None else None
                if stored is not None and stored.status != "running":
                    # Its process died (no `finished` will come): end as a run failing live does.
                    ending: list[WireEvent] = []
                    if stored.status == "failed" and not failed:
                        ending.append(StreamFailed(_error_of(stored)))
                    ending.append(Finished(reason=_reason_of(stored), status=stored.status, winner=stored.upstream_model))
                    for last in ending:
                        shown += 1
                        if shown > after:
                            await send.send((shown, last))
                    return True
                if waited >= silence:
                    break
                continue
            if not seen:
                first_heard = trio.current_time()
                first, _ = decode_event(message.data)
                # A direct run numbers its events from 1; a workflow's attempts from a
                # multiple of ATTEMPT_SPAN, and its client's numbering needs its beginning.
                if (first > after + 1) if view is None else (first - 1) % ATTEMPT_SPAN:
                    raise _EventsDiscarded
            seen = True
            heard = trio.current_time()
            if view is None:
                seq, event = decode_event(message.data)
                if event is None:
                    continue
                shown = max(shown, seq)
                failed = isinstance(event, StreamFailed)
                if seq > after:
                    await send.send((seq, event))
                if isinstance(event, Finished):  # the end, even for a client that saw it
                    return True
                continue
            visible: list[WireEvent] = list(view.feed_bytes(message.data))
            if view.done and view.error is not None and not view.visible:
                # Failed before its answer began: its client had the error as a status; a
                # reader has only this stream to learn why.
                visible.append(StreamFailed(view.error))
            if view.done:
                visible.append(view.finished or Finished(reason="error", status="failed"))
            for event in visible:
                shown += 1
                failed = isinstance(event, StreamFailed)
                if shown > after:
                    await send.send((shown, event))
            if view.done:
                return True
    if seen:
        raise GatewayError(ErrorKind.TIMEOUT, f"The stream {trace_id} went silent for {silence:g}s.", code="run_silent")
    return False


def _reason_of(stored: StoredRun) -> str:
    """A stored run's `finished.reason`, as its live run gave it (see `_records._outcome`)."""
    if stored.status == "failed":
        return "error"
    if stored.status == "cancelled":
        return "cancelled"
    completion = stored.completion
    if completion is None or not completion.choices or completion.choices[0].finish_reason is None:
        return "stop"
    return completion.choices[0].finish_reason.value


def _error_of(stored: StoredRun) -> GatewayError:
    """The error a failed run stored; its process's death when it could store none."""
    return error_from_row(stored.error or {}, kind=ErrorKind.UNAVAILABLE, message=INTERRUPTED_MESSAGE)
