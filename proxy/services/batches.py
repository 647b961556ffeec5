"""OpenAI's Batch API run by the gateway itself: each line of a batch is a request through the
gateway's own front door (`Dispatch`, given by the HTTP layer: the same routing, fallbacks,
key scope, limits, budget and usage accounting as the key's own requests), a few at a time.

An accepted batch is never lost: it lives in PostgreSQL (`BatchStore`), any instance runs one
that nobody runs (created, let go by a gateway that stopped, or whose instance went silent),
each line's answer is recorded as it ends, and a batch resumed runs only the lines without
one. A line cut short (the gateway stopping past its grace, the batch taken over) records
nothing and runs again where the batch resumes.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from proxy.dialects.openai import batches as wire
from proxy.infra.batch_store import BatchStore, Claimed
from proxy.infra.postgres import Database, DatabaseError, DatabaseUnavailable
from proxy.infra.resources import Resources

log = logging.getLogger("llm_proxy.batches")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]  # lower-case names


# (the batch's key id or None, the endpoint's path, the line's body, its request id) → answer
Dispatch = Callable[[int | None, str, bytes, str], Awaitable[Answer]]

# A line refused by a per-minute limit (the key's, or the backend's) waits and is sent again,
# at most this long at a time; one refused for a spent budget is answered with that refusal.
# Meanwhile its batch starts no line and holds no slot: other batches run in the slots.
_LONGEST_WAIT = 60.0
# A line answered 503 (its backend unreachable or overloaded: a restart, an outage; or the
# gateway's database) is sent again the same way, after 1, 2, 4… s (or its Retry-After), until
# it has waited this long in all; then that answer is its own. A blip does not fail a whole
# batch. Not a 502 or 504: those may be the line's own (a crash, a generation too long), and
# waiting on them would stall its batch.
_OUTAGE_SECONDS = 600.0
# How often a batch's runner looks for a cancel (asked of any instance) and that it still owns it.
_WATCH_SECONDS = 1.0
# A recorded line, a let-go batch: bounded even once the gateway is stopping.
_WRITE_SECONDS = 10.0
# A line's answer, once in, is recorded through a database outage this long (tried again every
# few seconds): past it the batch stops and the line runs again (billed again) when it resumes.
_RECORD_PATIENCE = 60.0


_INTERNAL = json.dumps({"error": {
    "message": "Internal gateway error; see the gateway's log.", "type": "server_error", "param": None, "code": None,
}}).encode()


class _Lost(Exception):
    """Another instance took the batch over (this one was presumed dead)."""


class _CurrentStore(BatchStore):
    """The store on the database the gateway holds at each call: after an outage the gateway
    opens a new connection pool and closes the old one, which a running batch must not keep."""

    def __init__(self, resources: Resources) -> None:
        self._resources = resources

    @property
    def _db(self) -> Database:
        db = self._resources.database
        if db is None:
            raise DatabaseUnavailable("not connected")
        return db

    @_db.setter
    def _db(self, db: Database) -> None:
        raise AttributeError("the current store follows the gateway's database")


class _Pace:
    """When a batch may start lines again, once a line of it was refused by a per-minute limit
    or its backend was out of reach."""

    __slots__ = ("until",)

    def __init__(self) -> None:
        self.until = 0.0

    def hold(self, seconds: float) -> None:
        self.until = max(self.until, trio.current_time() + seconds)

    def left(self) -> float:
        return self.until - trio.current_time()


class BatchRunner:
    """Runs this instance's share of the batches, in the gateway's nursery."""

    def __init__(
        self, resources: Resources, instance_id: str, *, concurrency: int, max_lines: int,
        poll: float, silent: float, late: float,
    ) -> None:
        self._resources = resources
        self._me = instance_id
        self._limiter = trio.CapacityLimiter(concurrency)
        self._max_batches = concurrency  # a batch running holds at least one line's slot...
        self._paused: set[str] = set()  # ...but not while it waits (a rate limit, an outage)
        self._max_held = 2 * concurrency  # paused ones too: each holds its lines in memory
        self._max_lines = max_lines
        self._poll, self._silent, self._late = poll, silent, late
        self.dispatch: Dispatch | None = None
        self.stopped = trio.Event()
        self._wake = trio.Event()
        self._running: set[str] = set()
        self._ended = trio.Event()
        self._stopping = False
        self._halts: dict[str, trio.Event] = {}  # of the batches running here
        self._nursery: trio.Nursery | None = None
        self._next_sweep = 0.0

    def _store(self) -> BatchStore | None:
        return None if self._resources.database is None else _CurrentStore(self._resources)

    def serve(self, dispatch: Dispatch) -> None:
        """Start taking batches, their lines sent to `dispatch`."""
        self.dispatch = dispatch
        self.wake()

    def wake(self) -> None:
        """A batch was created here: look for work now rather than at the next poll."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    self._wake = trio.Event()  # before looking: a wake meanwhile looks again
                    if self.dispatch is not None and not self._stopping:
                        await self._take(nursery)
                        await self._drop_expired()
                    with trio.move_on_after(self._poll):
                        await self._wake.wait()
        finally:
            # Every batch this instance owns goes, not only those it runs: a claim cut short by
            # `stop()` after PostgreSQL committed it owns a batch no task here knows of.
            await self._let_go_all()
            self.stopped.set()

    async def _take(self, nursery: trio.Nursery) -> None:
        store = self._store()
        while (
            store is not None and len(self._running) - len(self._paused) < self._max_batches
            and len(self._running) < self._max_held and not self._stopping
        ):
            try:
                claimed = await store.claim(self._me, silent=self._silent, late=self._late)
            except DatabaseError as error:
                log.debug("looking for batches failed: %s", error)
                return
            if claimed is None:
                return
            self._running.add(claimed.id)
            nursery.start_soon(self._run_batch, store, claimed)

    async def _drop_expired(self) -> None:
        """Files past their `expires_after` go, within a poll of their time, and message
        batches past their results' 29 days are archived."""
        store = self._store()
        if store is None or trio.current_time() < self._next_sweep:
            return
        self._next_sweep = trio.current_time() + self._poll
        try:
            await store.drop_expired_files()
            await store.archive_message_batches()
        except DatabaseError as error:
            log.debug("deleting expired files failed: %s", error)

    def cancelled(self, batch_id: str) -> None:
        """The batch was cancelled through this instance: if it runs here, it stops starting
        lines now (elsewhere, its runner sees it within `_WATCH_SECONDS`)."""
        halt = self._halts.get(batch_id)
        if halt is not None:
            halt.set()

    def stop(self) -> None:
        self._stopping = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def wind_down(self, deadline: float) -> None:
        """The gateway stops: no line starts any more; those in flight may finish until
        `deadline` (the graceful stop's end). Then `stop()` cuts the rest and lets every batch
        it ran go, for the next gateway (or another one) to resume."""
        self._stopping = True
        for halt in self._halts.values():
            halt.set()
        with trio.move_on_at(deadline):
            while self._running:
                self._ended = trio.Event()
                await self._ended.wait()

    async def _run_batch(self, store: BatchStore, claimed: Claimed) -> None:
        try:
            await self._drive(store, claimed)
        except Exception as error:  # raised by a line or the watcher: in an exception group
            if _holds(error, _Lost):
                log.warning("batch %s was taken over by another gateway process", claimed.id)
            elif _holds(error, DatabaseError):
                # Its lines recorded so far stay; it is let go for a later look (here or elsewhere).
                log.warning("batch %s stopped: the database failed (%s); it resumes later", claimed.id, error)
                await self._let_go(store, claimed.id)
            else:
                log.exception("batch %s stopped on an unexpected error; it resumes later", claimed.id)
                await self._let_go(store, claimed.id)
        finally:  # stopping: let go with the others once every batch has stopped (`run`)
            self._running.discard(claimed.id)
            self._ended.set()
            self.wake()  # a slot is free: another batch may be waiting

    async def _let_go(self, store: BatchStore, batch_id: str) -> None:
        """Until it is let go: its owner alive, no instance would take it up again (stopping,
        `run` lets every batch of this instance go once its tasks have ended)."""
        delay = 1.0
        while True:
            with trio.CancelScope(shield=True), trio.move_on_after(_WRITE_SECONDS):
                try:
                    await store.let_go(batch_id, self._me)
                    return
                except DatabaseError as error:
                    log.debug("letting batch %s go failed: %s", batch_id, error)
            if self._stopping:
                return
            await trio.sleep(delay)
            delay = min(delay * 2, self._poll)

    async def _let_go_all(self) -> None:
        store = self._store()
        if store is None or self.dispatch is None:  # never served: it took none
            return
        with trio.CancelScope(shield=True), trio.move_on_after(_WRITE_SECONDS):
            try:
                await store.let_go_all(self._me)
            except DatabaseError as error:  # they are taken once this instance's heartbeat stops
                log.warning("letting this instance's batches go failed: %s", error)

    async def _drive(self, store: BatchStore, claimed: Claimed) -> None:
        content = await store.input_content(claimed.input_file_id)
        missing = content is None
        # Tens of thousands of lines parsed and checked: not on the event loop. Only the lines
        # are kept: the file's bytes go once they are read.
        lines, faults = await trio.to_thread.run_sync(wire.parse_lines, content or b"", claimed.endpoint, self._max_lines)
        del content
        status = claimed.status
        if status == "validating":
            if missing:
                faults = [{"code": "file_not_found", "line": None, "param": "input_file_id",
                           "message": f"The input file {claimed.input_file_id} was deleted before the batch started."}]
            if faults:
                await store.fail(claimed.id, self._me, faults)
                return
            # Not started: cancelled meanwhile.
            started = await store.start(claimed.id, self._me, len(lines), wire.model_of(lines, claimed.endpoint))
            status = "in_progress" if started else "cancelling"
        done = await store.answered(claimed.id)
        pending = [line for line in lines if line.number not in done]
        # Taken while finalizing: its lines had ended, all answered unless its window had.
        outcome = {"cancelling": "cancelled", "finalizing": "expired" if pending else "completed"}.get(status, "")
        if status == "in_progress":
            outcome = await self._run_lines(store, claimed, pending)
            if outcome == "stopped":
                return
            done = await store.answered(claimed.id)
            if outcome != "cancelled" and not await store.finalizing(claimed.id, self._me):
                outcome = "cancelled"  # asked as its last lines ended
        unrun: list[tuple[int, dict[str, Any]]] = []
        if outcome == "expired":
            unrun = [
                (line.number, wire.unrun_line(line.custom_id, "batch_expired",
                                              "This request could not be executed before the completion window expired."))
                for line in lines if line.number not in done
            ]
        if not await store.finalize(claimed.id, self._me, outcome, unrun, (wire.new_file_id(), wire.new_file_id())):
            raise _Lost()

    async def _run_lines(self, store: BatchStore, claimed: Claimed, pending: list[wire.Line]) -> str:
        """Run `pending` a few at a time; how the batch ends: completed, cancelled (asked on
        any instance: the lines in flight finish, those waiting for a rate limit and the rest
        do not start), expired (its window's end: the lines in flight are cut), or stopped (the
        gateway stops: let go, to be resumed)."""
        halt = trio.Event()  # cancelled, or the gateway stops
        self._halts[claimed.id] = halt
        pace = _Pace()
        try:
            async with trio.open_nursery() as watching:
                watching.start_soon(self._watch, store, claimed.id, halt)
                with trio.move_on_after(max(claimed.expires_in, 0.0)) as window:
                    async with trio.open_nursery() as running:
                        for line in pending:
                            slot = object()  # the line's hold on one of the runner's slots
                            while True:
                                await self._limiter.acquire_on_behalf_of(slot)
                                if halt.is_set() or self._stopping or pace.left() <= 0:
                                    break
                                self._limiter.release_on_behalf_of(slot)
                                await self._pause(claimed.id, pace, halt)
                            if halt.is_set() or self._stopping:
                                self._limiter.release_on_behalf_of(slot)
                                break
                            running.start_soon(self._line, store, claimed, line, halt, slot, pace)
                watching.cancel_scope.cancel()
        finally:
            self._halts.pop(claimed.id, None)
            self._paused.discard(claimed.id)
        if window.cancelled_caught:
            return "expired"
        if self._stopping:
            # Every line answered (none was left to start, none halted): it can end here.
            answered = await store.answered(claimed.id)
            return "completed" if all(line.number in answered for line in pending) else "stopped"
        return "cancelled" if halt.is_set() else "completed"

    async def _pause(self, batch_id: str, pace: _Pace, halt: trio.Event) -> None:
        """The batch waits (its rate limit, its backend's outage): another batch may be taken meanwhile."""
        self._paused.add(batch_id)
        self.wake()
        try:
            while pace.left() > 0 and not halt.is_set():
                with trio.move_on_after(pace.left()):
                    await halt.wait()
        finally:
            self._paused.discard(batch_id)

    async def _watch(self, store: BatchStore, batch_id: str, halt: trio.Event) -> None:
        while True:
            await trio.sleep(_WATCH_SECONDS)
            try:
                state = await store.state(batch_id)
            except DatabaseError as error:
                log.debug("batch %s: its state could not be read: %s", batch_id, error)
                continue
            if state is None or state[1] != self._me:
                raise _Lost()
            if state[0] == "cancelling":
                halt.set()

    async def _line(
        self, store: BatchStore, claimed: Claimed, line: wire.Line, halt: trio.Event, slot: object, pace: _Pace
    ) -> None:
        held = True
        try:
            dispatch = self.dispatch
            assert dispatch is not None
            payload = line.payload
            request_id = "req_" + secrets.token_hex(16)
            attempts, waited = 0, 0.0
            while True:
                try:
                    answer = await dispatch(claimed.key_id, claimed.endpoint, payload, request_id)
                except Exception:  # a bug answering this line: its answer, not the batch's end
                    log.exception("batch %s: line %d failed", claimed.id, line.number)
                    answer = Answer(500, _INTERNAL, {})
                wait = _wait_for(answer, attempts, waited)
                if wait is None:
                    break
                attempts, waited = attempts + 1, waited + wait
                pace.hold(wait)
                self._limiter.release_on_behalf_of(slot)
                held = False
                await self._pause(claimed.id, pace, halt)
                if halt.is_set():  # it has not run: a resumed batch runs it, a cancelled one does not
                    return
                await self._limiter.acquire_on_behalf_of(slot)
                held = True
            try:
                parsed: Any = json.loads(answer.body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                parsed = answer.body.decode("utf-8", "replace")
            ok = 200 <= answer.status < 300
            output = wire.output_line(line.custom_id, answer.status, answer.headers.get("x-request-id", request_id), parsed)
            tokens = wire.usage_of(parsed) if ok else (0, 0, 0, 0)
            await self._record(store, claimed.id, line.number, ok, output, tokens)
        finally:
            if held:
                self._limiter.release_on_behalf_of(slot)


    async def _record(
        self, store: BatchStore, batch_id: str, number: int, ok: bool, output: dict[str, Any],
        tokens: tuple[int, int, int, int],
    ) -> None:
        """Once the answer is in, its record is written whole even if the gateway is stopping,
        and through an outage of up to `_RECORD_PATIENCE` (recording it twice counts it once)."""
        deadline = trio.current_time() + _RECORD_PATIENCE
        delay = 0.5
        while True:
            try:
                with trio.CancelScope(shield=True), trio.fail_after(_WRITE_SECONDS):
                    await store.record(batch_id, number, ok, output, tokens)
                return
            except (DatabaseError, trio.TooSlowError) as error:
                if self._stopping or trio.current_time() + delay > deadline:
                    raise
                log.info("batch %s: recording line %d failed (%s); trying again", batch_id, number, error)
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _holds(error: BaseException, kind: type[Exception]) -> bool:
    if isinstance(error, BaseExceptionGroup):
        return any(_holds(inner, kind) for inner in error.exceptions)
    return isinstance(error, kind)


def _wait_for(answer: Answer, attempts: int, waited: float) -> float | None:
    """How long to wait before sending a line again (None: its answer is final): a 429 of a
    per-minute limit (not a spent budget, which no wait within the batch's window is sure to
    mend), or its backend out of reach for less than `_OUTAGE_SECONDS` so far."""
    if answer.status == 503:
        backoff = _retry_after(answer, min(2.0**attempts, _LONGEST_WAIT))
        return backoff if waited + backoff <= _OUTAGE_SECONDS else None
    if answer.status != 429:
        return None
    try:
        error = json.loads(answer.body).get("error") or {}
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        error = {}
    if isinstance(error, dict) and error.get("code") == "insufficient_quota":
        return None
    return _retry_after(answer, 1.0)


def _retry_after(answer: Answer, default: float) -> float:
    try:
        after = float(answer.headers.get("retry-after", default))
    except ValueError:
        after = default
    return min(max(after, 0.1), _LONGEST_WAIT)
