"""The exchange's journalled runs: its journal, the durable run started in the app's Runs
nursery (its client reads the run's log) and the detached one nobody reads (a background
response)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import CompletionBuilder, StreamFailed, UsageReport
from proxy.infra.backends import BackendCall, Batch
from proxy.infra.transport import Hangup
from proxy.services._contracts import (
    ANSWER_HEADERS,
    SHUTTING_DOWN,
    AnswerHook,
    RunLock,
    is_cancellation,
)
from proxy.services._records import Recording, _outcome
from proxy.services.journal import EventLog, Journal
from proxy.services.persistence import Plan, Producer, log_reader

# Longest wait for a run lock's release (one UPDATE) when its run is cancelled.
_UNLOCK_SECONDS = 5.0


class DurableRun(Recording):
    """The journalled runs of a `ChatExchange` (it is one): what they use of the exchange is
    declared here, set or defined by the exchange."""

    publishes_events: bool
    response_headers: list[tuple[bytes, bytes]]
    _call: BackendCall
    _live_log: EventLog | None
    _detached: bool
    on_answer: AnswerHook | None
    run_lock: RunLock | None
    _locked: bool
    _recorded_by_run: bool
    _run_ended: bool
    spent_unshown: UsageReport | None

    if TYPE_CHECKING:  # the exchange's own
        async def _plan(self) -> Plan: ...

        async def _admit(self) -> None: ...

        def _producer(self) -> Producer: ...

        async def _feed(
            self, producer: Producer, send: trio.MemorySendChannel[Batch | GatewayError], hangup: Hangup | None
        ) -> None: ...

        def _failed_before_start(self, error: GatewayError) -> None: ...

    async def detach(self) -> bool:
        """Start this exchange's run with nobody reading it (a background response): return
        True once it runs, in the app's Runs nursery, journalled like any durable run. Its
        record (log line, usage, the key's charge) is written when the run ends, from what it
        made.

        False, with nothing started, for a repeat of a keyed request whose run goes on or has
        completed: that run answers it (`x-trace-id` names it, as for any request attached
        to or replaying a run).

        Refused (the record written, the error raised) when the request cannot run durably:
        no journal, or the gateway is stopping."""
        try:
            await self._admit()
            plan = await self._plan()
            if plan.kind in ("follow", "replay") and self._answering_trace() != self.meta.trace_id:
                self.response_headers.extend(plan.headers)
                self.record.status = 200
                self._finish_record()
                return False
            if plan.kind != "durable":
                raise GatewayError(
                    ErrorKind.UNAVAILABLE, "A background run needs the gateway's journal (PostgreSQL), which is "
                    "not available now.", code="journal_unavailable", retry_after=2,
                )
            await self._lock(plan)  # refused: its creation is, at once
        except GatewayError as error:
            self._failed_before_start(error)
            self._finish_record()
            raise
        self.response_headers.extend(plan.headers)
        self._detached = True
        self._start_durable(plan)
        return True

    async def _lock(self, plan: Plan) -> None:
        """Take the run lock (`run_lock`) for this exchange's own run, about to start (`here`,
        `durable`); a repeat that replays or attaches to its key's run takes none. Refused, the
        key this request claimed is given up, so that a retry with it runs again."""
        if self.run_lock is None or plan.kind not in ("here", "durable"):
            return
        try:
            await self.run_lock.acquire(self.meta.trace_id)
        except GatewayError:
            if plan.key is not None and self._persistence is not None:
                await self._persistence.give_up(plan.key, self.meta.trace_id)
            raise
        self._locked = True

    async def _unlock(self) -> None:
        """Give the run lock back: once the run has ended (its answer appended), before its
        client has the end, so that the client's next request finds it free."""
        if not self._locked:
            return
        self._locked = False
        assert self.run_lock is not None
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _UNLOCK_SECONDS):
            await self.run_lock.release(self.meta.trace_id)

    def _answering_trace(self) -> str:
        trace = next((value for name, value in self.response_headers if name == b"x-trace-id"), None)
        return trace.decode("latin-1") if trace is not None else self.meta.trace_id

    def _journal(self, plan: Plan) -> Journal | None:
        persistence = self._persistence
        if persistence is None or (persistence.resources.database_url is None and persistence.resources.nats_url is None):
            return None
        row = self._new_row(plan)
        self._live_log = EventLog(self.meta.trace_id, self.meta.tenant)
        self._live_log.settings = self.settings
        # The very list its client is told (changed in place only): readers attached to the run
        # learn from it what the route said of the answer (a RAG answer's sources) before its
        # first event, and what it says once the answer is whole (a workflow's winner).
        self._live_log.headers = self.response_headers
        return Journal(
            row, self._live_log, writer=persistence.writer, publisher=persistence.publisher,
            publish_events=self.publishes_events, answer_headers=ANSWER_HEADERS,
        )

    def _start_durable(self, plan: Plan) -> Producer:
        """Start this exchange's run in the app's Runs nursery; the client reads its log."""
        persistence = self._persistence
        assert persistence is not None
        journal = self._journal(plan)
        assert journal is not None
        self._call.relay_openai = False  # readers render events; raw bytes would be wasted
        persistence.runs.start(journal.log, lambda: self._run_detached(journal))
        return log_reader(journal.log)

    async def _run_detached(self, journal: Journal) -> None:
        # Its own result: the attached client's relay folds the same events into self.result.
        event_log, result = journal.log, CompletionBuilder()
        complete = False
        try:
            async with trio.open_nursery() as nursery:
                # A background run is polled for (or cancelled, on any instance) from the moment
                # its creation is answered: its `response.created` too.
                journal.begin(at_once=self._detached or bool((self.settings or {}).get("background")))
                send, receive = trio.open_memory_channel[Batch | GatewayError](0)
                nursery.start_soon(self._feed, self._producer(), send, None)  # not the client's
                async with receive:
                    async for item in receive:
                        if isinstance(item, GatewayError):
                            if not event_log.events:
                                result.error = item
                                await self._unlock()  # before its readers learn it failed
                                event_log.fail_before_start(item)
                                break
                            item = Batch([StreamFailed(item)], done=True)
                        for event in item.events:
                            result.add(event)
                        if item.done and result.error is not None:
                            await self._unlock()
                        event_log.extend(item.events)
                        if item.done:
                            complete = True
                            break
                if complete:
                    if self.on_answer is not None and result.error is None:
                        await self.on_answer(self.meta.trace_id, result.build())
                    await self._unlock()
                    event_log.close(_outcome(result, complete=True))
                nursery.cancel_scope.cancel()
        except BaseException as exc:
            # A durable run is cancelled by the server's shutdown at its grace's end (its row: failed, retry) or
            # by its client's explicit cancel (its row: cancelled).
            if is_cancellation(exc) and result.error is None and not self._cancelled_by_client():
                result.error = SHUTTING_DOWN
            raise
        finally:
            await self._unlock()  # cancelled, or the server stopping
            if self.spent_unshown is not None:  # told this exchange's builder, not the run's
                result.add(self.spent_unshown)
            await journal.finish(_outcome(result, complete), self._log_row(journal.row, result))
            self._run_ended = True
            if self._detached:  # no client relay folded the run into this exchange's result
                self.result = result
                if result.error is not None and not event_log.events:
                    self._failed_before_start(result.error)
                else:
                    self.record.status = 200
                    self.record.cancelled = not complete and result.error is None
                self._finish_record()
            elif self._recorded_by_run:
                # Its client left before the end: its record says what the client saw (its
                # status, that it left) and is charged what the run spent, once.
                self.result = result
                self._finish_record()

    def _cancelled_by_client(self) -> bool:
        return self._persistence is not None and self._persistence.runs.cancelled(self.meta.trace_id)
