"""One attempt at one job: run the pipeline, commit its outcome, then announce it.

Order of a successful attempt on `evt.chat.{trace_id}`: role, the pipeline's events,
usage, (winner), then — after the outcome is committed to `workflow_runs` — `finished`,
once. A failed pipeline publishes an `error` event before its `finished`.

Redelivery (the worker of an earlier attempt died): the run starts again from the top,
with its own seq range. If the run's row is already final (the earlier attempt died after
its commit), the attempt only re-announces the stored outcome; JetStream keeps one
`finished` per trace (it has a per-trace msg id).

Cancellation: a cancel for the trace (the client left) cancels the pipeline — its backend
calls with it — and the run is stored and announced as cancelled. A worker shutting down
cancels it too, but stores and announces nothing: the job goes back to the queue (`RETRY`).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import trio

from proxy.config import Settings
from proxy.dialects.events import Finished
from proxy.domain.chat import ChatCompletion, ChatRequest
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import StreamFailed, UsageReport
from proxy.domain.routing import Router
from proxy.infra.backends import Backend
from proxy.infra.nats import BusError
from proxy.infra.postgres import DatabaseError
from proxy.infra.resources import Resources
from proxy.services.models import ModelCatalog
from proxy.workflow.bus import jobs_kv
from proxy.workflow.emitter import Emitter, EventPublisher
from proxy.workflow.job import OPTIONS_FIELD, Job, cancel_key
from proxy.workflow.llm import LLM
from proxy.workflow.pipelines import Pipeline, PipelineContext, PipelineResult
from proxy.workflow.store import RunOutcome, RunStore

log = logging.getLogger("llm_proxy.workflow")

# How long a finished pipeline may wait for PostgreSQL to take its outcome.
COMMIT_SECONDS = 20.0
_CHECK_SECONDS = 3.0
_ANNOUNCE_SECONDS = 10.0
_FRESH_SECONDS = 0.5


class Disposition(enum.Enum):
    ACK = "ack"  # done with (completed, failed or cancelled): never run it again
    RETRY = "retry"  # interrupted by shutdown: run it again, elsewhere


@dataclass(slots=True)
class WorkerEnv:
    """What every job of a worker process shares."""

    settings: Settings
    pipelines: Mapping[str, Pipeline]
    options: Mapping[str, Mapping[str, object]]  # per pipeline, from the config
    router: Router
    backends: Mapping[str, Backend]
    catalog: ModelCatalog
    resources: Resources
    worker_id: str


class JobRun:
    def __init__(self, env: WorkerEnv, job: Job, attempt: int) -> None:
        self.env = env
        self.job = job
        self.attempt = attempt
        self.scope = trio.CancelScope()
        self.interrupted_by: str | None = None
        self.outcome: RunOutcome | None = None  # what this attempt concluded (for its span)

    def cancel(self, why: str) -> None:
        """`why`: "client" (store and announce a cancelled run), "shutdown" (retry later) or
        "lost" (the job was redelivered to another worker while this one was cut off from
        NATS: stop, store and announce nothing, the other attempt owns the run)."""
        if self.interrupted_by is None:
            self.interrupted_by = why
        self.scope.cancel()

    async def run(self) -> Disposition:
        job = self.job
        publisher = EventPublisher(
            lambda: self.env.resources.bus, job.trace_id, self.attempt, keepalive=job.silence / 3
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            disposition = Disposition.RETRY
            try:
                disposition = await self._attempt(publisher)
            finally:
                if disposition is Disposition.RETRY and self.interrupted_by != "lost":
                    with trio.CancelScope(shield=True, deadline=trio.current_time() + _ANNOUNCE_SECONDS):
                        await publisher.flush()
                publisher.close()
        return disposition

    async def _attempt(self, publisher: EventPublisher) -> Disposition:
        job = self.job
        early = await self._refusal()
        if early is not None:
            return await self._conclude(publisher, early)
        emitter = Emitter(publisher, job.stream_start())
        if self.attempt > 1:
            stored = await self._start_row()
            if stored is not None:
                log.info("job %s already ended (%s); re-announcing it", job.trace_id, stored.status)
                await self._announce(publisher, stored)
                return Disposition.ACK
            outcome = await self._run_pipeline(emitter)
        else:
            # A first attempt cannot find its run ended: record the start beside the pipeline
            # (the outcome's UPSERT wins whichever lands first).
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._start_row)
                outcome = await self._run_pipeline(emitter)
        if outcome is None:
            return Disposition.RETRY
        return await self._conclude(publisher, outcome)

    async def _refusal(self) -> RunOutcome | None:
        """Why this attempt must not run the pipeline at all, if it must not."""
        job, env = self.job, self.env
        if self.attempt > env.settings.workflow.max_deliver:
            error = GatewayError(
                ErrorKind.UNAVAILABLE,
                f"The workflow job's worker stopped before it finished (killed, or shut down) "
                f"{self.attempt - 1} times in a row; giving up.",
                code="workflow_retries_exhausted",
            )
            return RunOutcome("failed", "error", error=error)
        waited = time.time() - job.submitted_at
        if self.attempt == 1 and time.time() > job.deadline:
            error = GatewayError(ErrorKind.TIMEOUT, "Nobody waits for this job any more.", code="workflow_expired")
            return RunOutcome("cancelled", "cancelled", error=error)
        # A cancel sent while the job waited in the queue reached no worker; it left a mark.
        # (A job picked up at once is not worth the round trip: its cancel is still to come.)
        if (self.attempt > 1 or waited > _FRESH_SECONDS) and await self._cancel_marked():
            return RunOutcome("cancelled", "cancelled")
        return None

    async def _cancel_marked(self) -> bool:
        bus = self.env.resources.bus
        if bus is None:
            return False
        with trio.move_on_after(_CHECK_SECONDS):
            try:
                kv = await jobs_kv(bus, retention=self.env.settings.workflow.job_retention_seconds)
                return await kv.get(cancel_key(self.job.trace_id)) is not None
            except BusError as error:
                log.warning("cancel mark of %s unreadable: %s", self.job.trace_id, error)
        return False

    async def _start_row(self) -> Finished | None:
        db = self.env.resources.database
        if db is None:
            return None
        with trio.move_on_after(_CHECK_SECONDS):
            try:
                return await RunStore(db).start(self.job, self.attempt, self.env.worker_id)
            except DatabaseError as error:
                log.warning("workflow run %s: start not recorded: %s", self.job.trace_id, error)
        return None

    async def _run_pipeline(self, emitter: Emitter) -> RunOutcome | None:
        """The pipeline's outcome; None when shutdown interrupted it."""
        job, env = self.job, self.env
        pipeline = env.pipelines[job.pipeline]
        options = {**env.options.get(job.pipeline, {}), **job.options}
        request = replace(job.request, extra={k: v for k, v in job.request.extra.items() if k != OPTIONS_FIELD})
        headers = {"x-request-id": job.request_id, "x-correlation-id": job.correlation_id or job.request_id}
        ctx = PipelineContext(
            job=job,
            request=request,
            options=options,
            emit=emitter,
            llm=LLM(env.router, env.backends, headers=headers, catalog=env.catalog),
            resources=env.resources,
            settings=env.settings,
        )
        outcome: RunOutcome | None = None
        timeout = env.settings.workflow.job_timeout_seconds
        with self.scope:
            try:
                with trio.fail_after(timeout):
                    result = await pipeline(ctx)
                    await _report_spent(emitter, ctx.llm, result)
                    # A pipeline that emitted nothing still answers: an empty message, whose
                    # role event every reader of the trace (resume, attach) needs.
                    await emitter.emit()
                outcome = _completed(result, emitter, job.request)
            except trio.TooSlowError:
                error = GatewayError(
                    ErrorKind.TIMEOUT, f"The pipeline `{job.pipeline}` did not finish within {timeout:g}s.",
                    code="workflow_timeout",
                )
                outcome = RunOutcome("failed", "error", error=error)
            except GatewayError as error:
                outcome = RunOutcome("failed", "error", error=error)
            except Exception as exc:  # a pipeline bug fails its job, not the worker
                outcome = RunOutcome("failed", "error", error=_grouped(exc) or _crash(job, exc))
        if outcome is not None and outcome.status == "failed":
            outcome.spent = ctx.llm.spent  # its calls' tokens were spent all the same
        if outcome is None or self.interrupted_by is not None:
            if self.interrupted_by in ("shutdown", "lost"):
                return None
            # What its calls spent until the cancel: its gateway waits a moment for it, to
            # charge the client that left (who saw nothing of a winner not chosen yet).
            return RunOutcome("cancelled", "cancelled", data={"partial": _partial(emitter)}, spent=ctx.llm.spent)
        return outcome

    async def _conclude(self, publisher: EventPublisher, outcome: RunOutcome) -> Disposition:
        """Commit, then announce. Shielded and bounded: a cancelled run is stored too."""
        self.outcome = outcome
        with trio.CancelScope(shield=True, deadline=trio.current_time() + COMMIT_SECONDS + _ANNOUNCE_SECONDS):
            finished = await self._commit(outcome)
            error = outcome.error
            if finished.status == "failed" and outcome.status != "failed":
                error = _unstored()
            if finished.status != "completed" and outcome.spent is not None:
                # Before the error: what the client is charged, whether or not its answer began.
                await publisher.put(UsageReport(outcome.spent))
            await self._announce(publisher, finished, error if finished.status != "completed" else None)
        return Disposition.ACK

    async def _commit(self, outcome: RunOutcome) -> Finished:
        if self.env.resources.database_url is None:
            return outcome.finished
        deadline = trio.current_time() + COMMIT_SECONDS
        delay = 0.2
        while True:
            db = self.env.resources.database
            if db is not None:
                try:
                    with trio.fail_after(max(0.1, deadline - trio.current_time())):
                        return await RunStore(db).finish(self.job, self.attempt, self.env.worker_id, outcome)
                except (DatabaseError, trio.TooSlowError) as error:
                    log.warning("workflow run %s: outcome not stored yet: %s", self.job.trace_id, error)
            if trio.current_time() + delay >= deadline:
                log.error("workflow run %s: outcome could not be stored; failing it", self.job.trace_id)
                return Finished("error", "failed", None)
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _announce(self, publisher: EventPublisher, finished: Finished, error: GatewayError | None = None) -> None:
        if finished.status != "completed":
            await publisher.put(StreamFailed(error or _generic(finished)))
        await publisher.finish(finished)


def _completed(result: PipelineResult | None, emitter: Emitter, request: ChatRequest) -> RunOutcome:
    built = emitter.result
    if built.error is not None:  # the pipeline emitted an in-stream failure itself
        return RunOutcome("failed", "error", error=built.error)
    completion: ChatCompletion | None = result.completion if result else None
    if completion is None:
        completion = built.build()
        if not completion.model:
            completion.model = request.model
    elif completion.usage is None:
        completion.usage = built.usage  # what its calls spent (`_report_spent`)
    winner = result.winner if result else None
    first = completion.choices[0] if completion.choices else None
    reason = first.finish_reason.value if first and first.finish_reason else "stop"
    return RunOutcome("completed", reason, winner, completion, dict(result.data) if result else {})


async def _report_spent(emitter: Emitter, llm: LLM, result: PipelineResult | None) -> None:
    """A pipeline that reports no usage of its own answers with what its model calls spent
    (the client's usage, its key's charge, the run's row), not with nothing."""
    if emitter.result.usage is not None or (result and result.completion and result.completion.usage):
        return
    spent = llm.spent
    if spent is not None:
        await emitter.usage(UsageReport(spent))


def _partial(emitter: Emitter) -> str:
    completion = emitter.result.build()
    return completion.choices[0].content if completion.choices else ""


def _grouped(exc: Exception) -> GatewayError | None:
    """The GatewayError a pipeline's own nursery wrapped in a group, if that is all it holds."""
    if isinstance(exc, ExceptionGroup):
        matched, rest = exc.split(GatewayError)
        if matched is not None and rest is None:
            leaf: BaseException = matched
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf if isinstance(leaf, GatewayError) else None
    return None


def _crash(job: Job, exc: Exception) -> GatewayError:
    """A pipeline's bug: the traceback goes to the worker's log, under the trace id the client
    has (`x-trace-id`, the error's message); the client is not shown the pipeline's internals
    (an exception's text may hold paths, queries, keys)."""
    log.error(
        "pipeline %s crashed on trace %s", job.pipeline, job.trace_id, exc_info=exc,
        extra={"trace_id": job.trace_id, "pipeline": job.pipeline},
    )
    return GatewayError(
        ErrorKind.INTERNAL,
        f"The pipeline `{job.pipeline}` failed with an internal error; the worker's log has the details "
        f"under trace {job.trace_id}.",
        code="workflow_crashed",
    )


def _unstored() -> GatewayError:
    return GatewayError(ErrorKind.UNAVAILABLE, "The workflow's result could not be stored.", code="workflow_unstored")


def _generic(finished: Finished) -> GatewayError:
    if finished.status == "cancelled":
        return GatewayError(ErrorKind.UNAVAILABLE, "The workflow job was cancelled.", code="workflow_cancelled")
    return GatewayError(ErrorKind.BACKEND, "The workflow pipeline failed.", code="workflow_failed")

