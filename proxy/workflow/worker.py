"""`llm-proxy worker`: resident processes that pull workflow jobs and run their pipelines.

Per pipeline, one durable pull consumer (`workflow-{pipeline}` on `jobs.{pipeline}`), shared
by every worker process: each job goes to one of them. Explicit acks; a job whose worker
stops heartbeating (`in_progress` every third of `ack_wait`) is redelivered after
`ack_wait`, run at most `max_deliver` times in all: JetStream delivers it once more, and
that delivery only tells its client the job gave up (no worker runs it again). Heartbeats are
confirmed by the server: a worker whose heartbeats have not got through for `ack_wait` (cut
off from NATS) stops the job, which JetStream has given to another worker by then. A process runs
at most `concurrency` jobs at once, each a trio task with its own nursery.

Pulling holds no job slot: a puller only opens a pull request while a slot is free, and takes
a slot for what it fetched. Were the slot taken before the long poll, idle pipelines' pullers
would hold every slot while the pipeline that has work had no request open. Pullers of
several pipelines may fetch for the same free slot; a job that finds none waits for one (its
ack deadline kept alive by heartbeats) and its pipeline pulls no more until it starts, so at
most one job per pipeline waits that way.

Cancels: one core subscription on `cancel.*` reaches the running job of that trace.
Liveness: every few seconds the worker refreshes its pipelines' keys in the workers KV
bucket; the gateway answers 503 at once for a pipeline no live worker serves. A draining
worker refreshes, instead, one key per job it still runs: it takes no new job, but the
gateway does not give up on those (a job that has published nothing yet is watched by that
liveness alone).

Shutdown (SIGINT/SIGTERM, or the `shutdown` event): stop pulling (and stop refreshing the
pipelines' keys), let running jobs finish for `drain_seconds` (keeping them alive), then interrupt the rest and nak them, so another worker takes them
over at once. A second signal skips the wait.

`run_one_job` is the systemd launch mode's worker: it runs the one job stored under its
trace id in the jobs KV bucket and exits.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from proxy.config import Settings
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import StreamFailed
from proxy.domain.tracecontext import received_trace
from proxy.gateway import build_router
from proxy.infra import otel
from proxy.infra.backends import Backend, create_backend, current_trace
from proxy.infra.nats import Bus, BusError, JobMessage, KeyConflict
from proxy.infra.resources import Resources
from proxy.infra.urls import without_credentials
from proxy.services.journal import ensure_streams
from proxy.services.models import ModelCatalog
from proxy.workflow.bus import ensure_jobs_stream, jobs_kv, workers_kv
from proxy.workflow.emitter import EventPublisher
from proxy.workflow.job import (
    JOBS_STREAM,
    WORKERS_REFRESH,
    Job,
    JobError,
    WorkerBeacon,
    cancel_subject,
    consumer_name,
    job_key,
    jobs_subject,
    peek_trace_id,
    running_key,
)
from proxy.workflow.pipelines import Pipeline, PipelineError, PipelineRegistry
from proxy.workflow.runner import Disposition, JobRun, WorkerEnv
from proxy.workflow.store import RunOutcome

log = logging.getLogger("llm_proxy.worker")

_T = TypeVar("_T")

_FETCH_EXPIRES = 2.0
# Pull requests in flight per pipeline at most: each takes one job per round trip. Puller `i`
# pulls only while more than `i` slots are free.
_PULLERS = 8
_SETTLE_SECONDS = 5.0
_BUS_WAIT_LOG = 10.0

# Exit statuses of `--one-job` (the unit restarts on failure, but not for these).
EXIT_OK = 0
EXIT_NO_JOB = 2
EXIT_RETRY = 75  # EX_TEMPFAIL: interrupted, run it again


@dataclass(slots=True)
class WorkerOptions:
    pipelines: list[str] | None = None  # None: every pipeline known to this process
    concurrency: int | None = None  # None: `workflow.concurrency`
    drain_seconds: float = 30.0


class Worker:
    def __init__(self, settings: Settings, options: WorkerOptions | None = None, *, worker_id: str | None = None) -> None:
        self.settings = settings
        self.options = options or WorkerOptions()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        registry = PipelineRegistry(settings.workflow)
        names = self.options.pipelines or registry.names()
        self.pipelines = {name: registry.load(name) for name in names}  # PipelineError: fail now
        self.options_by_pipeline = {name: registry.options(name) for name in names}
        self.concurrency = self.options.concurrency or settings.workflow.concurrency
        self.running: dict[str, JobRun] = {}
        self._slots = _Slots(self.concurrency)
        self._active = 0  # job tasks started and not yet settled
        self._changed = trio.Event()
        self.draining = False

    async def run(
        self,
        *,
        shutdown: trio.Event | None = None,
        handle_signals: bool = False,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `shutdown` is set (or a signal, with `handle_signals`); reports
        started once it pulls every pipeline."""
        stop = shutdown if shutdown is not None else trio.Event()
        hurry = trio.Event()
        pulling = False

        async def serve(env: WorkerEnv) -> None:
            nonlocal pulling
            async with trio.open_nursery() as outer:
                bus = await _wait_for_bus(env.resources)
                await ensure_jobs_stream(bus, retention=self.settings.workflow.job_retention_seconds)
                await outer.start(self._cancels, bus)
                # Beyond the pullers: while draining, it keeps the running jobs alive.
                outer.start_soon(self._beacon, bus)
                async with trio.open_nursery() as jobs:
                    async with trio.open_nursery() as pullers:
                        for name in self.pipelines:
                            for rank in range(min(_PULLERS, self.concurrency)):
                                await pullers.start(self._pull, bus, name, rank, jobs, env)
                        log.info(
                            "worker %s pulling %s (concurrency %d)",
                            self.worker_id, ", ".join(self.pipelines), self.concurrency,
                        )
                        pulling = True
                        task_status.started()
                        await stop.wait()
                        self.draining = True
                        pullers.cancel_scope.cancel()
                    await self._drain(hurry)
                outer.cancel_scope.cancel()

        async def stop_starting(starting: trio.CancelScope) -> None:
            # Told to stop before it pulls anything (NATS or PostgreSQL not answering yet):
            # there is no job to finish, so the start itself is abandoned.
            await stop.wait()
            if not pulling:
                starting.cancel()

        async with trio.open_nursery() as guard:
            if handle_signals:
                guard.start_soon(_signals, stop, hurry)
            with trio.CancelScope() as starting:
                guard.start_soon(stop_starting, starting)
                await _with_env(self.settings, self.worker_id, self.pipelines, self.options_by_pipeline, serve)
            guard.cancel_scope.cancel()

    def _count(self, delta: int) -> None:
        self._active += delta
        self._changed.set()
        self._changed = trio.Event()

    async def _drain(self, hurry: trio.Event) -> None:
        if self._active:
            log.info("stopping: waiting up to %gs for %d job(s)", self.options.drain_seconds, self._active)
            with trio.move_on_after(self.options.drain_seconds):
                async with trio.open_nursery() as nursery:

                    async def hurried() -> None:
                        await hurry.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(hurried)
                    while self._active:
                        await self._changed.wait()
                    nursery.cancel_scope.cancel()
        for run in list(self.running.values()):
            log.info("stopping: handing job %s back to the queue", run.job.trace_id)
            run.cancel("shutdown")

    # -- pulling -----------------------------------------------------------------------------

    async def _pull(
        self,
        bus: Bus,
        pipeline: str,
        rank: int,
        jobs: trio.Nursery,
        env: WorkerEnv,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        workflow = self.settings.workflow
        async with bus.pull(
            JOBS_STREAM,
            consumer_name(pipeline),
            jobs_subject(pipeline),
            max_ack_pending=10_000,
            ack_wait=workflow.ack_wait_seconds,
            # One delivery more than the runs allowed: a job whose last worker died would
            # otherwise never be delivered again, its client waiting out the silence deadline
            # for a 504 and its row `running` for ever. That delivery is refused (`JobRun`).
            max_deliver=workflow.max_deliver + 1,
        ) as consumer:
            task_status.started()
            while True:
                await self._slots.wait_free(more_than=rank)
                messages: list[JobMessage] = []
                try:
                    messages = await consumer.fetch(1, timeout=_FETCH_EXPIRES)
                except BusError as error:
                    await trio.lowlevel.checkpoint_if_cancelled()  # stopping: not worth a warning
                    log.warning("pulling %s failed: %s", pipeline, error)
                    await trio.sleep(1.0)
                for message in messages:
                    await self._start(message, jobs, env)

    async def _start(self, message: JobMessage, jobs: trio.Nursery, env: WorkerEnv) -> None:
        """Start a fetched job once it has a slot; hand it back to the queue if the worker
        stops before then."""
        started = False
        try:
            if not self._slots.try_take():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_heartbeat, message, self.settings.workflow.ack_wait_seconds / 3)
                    await self._slots.take()
                    nursery.cancel_scope.cancel()
            started = True
            self._count(+1)
            jobs.start_soon(self._job, message, env)
        finally:
            if not started:
                await _settle(message, Disposition.RETRY)

    async def _job(self, message: JobMessage, env: WorkerEnv) -> None:
        # The trace of the request that sent the job (this task's own context): the
        # pipeline's backend calls carry it on.
        trace = received_trace(message.headers.get("traceparent"), message.headers.get("tracestate"))
        if (tracing := otel.TRACING) is not None:
            trace = tracing.job_span(trace, message.subject, message.num_delivered)
        current_trace.set(trace)
        run: JobRun | None = None
        try:
            try:
                job = Job.decode(message.data)
            except JobError as error:
                await _reject(env, message, error)
                return
            run = JobRun(env, job, message.num_delivered)
            self.running[job.trace_id] = run
            disposition = Disposition.RETRY
            ack_wait = self.settings.workflow.ack_wait_seconds
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_heartbeat, message, ack_wait / 3, ack_wait, run)
                    disposition = await run.run()
                    nursery.cancel_scope.cancel()
            finally:
                if run.interrupted_by == "lost":
                    # Another worker has the job now: a nak or an ack of this stale delivery
                    # would only meddle with its attempt.
                    log.warning("job %s: given up, another worker runs it now", job.trace_id)
                else:
                    await _settle(message, disposition)
        finally:
            if tracing is not None and trace is not None:
                tracing.end_job(trace, run)
            if run is not None and self.running.get(run.job.trace_id) is run:
                del self.running[run.job.trace_id]
                if self.draining:  # handed back: its gateway learns at once if nobody serves it now
                    await _forget_running(env, run.job.trace_id)
            self._slots.give()
            self._count(-1)

    async def _cancels(self, bus: Bus, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with bus.subscribe(cancel_subject("*")) as messages:
            task_status.started()
            async for message in messages:
                trace_id = message.subject.partition(".")[2]
                run = self.running.get(trace_id)
                if run is not None:
                    log.info("job %s cancelled by its client", trace_id)
                    run.cancel("client")

    async def _beacon(self, bus: Bus) -> None:
        beacon = WorkerBeacon(self.worker_id, socket.gethostname(), os.getpid(), self.concurrency, list(self.pipelines))
        while True:
            try:
                kv = await workers_kv(bus)
                if self.draining:
                    for trace_id in list(self.running):
                        await kv.put(running_key(trace_id), beacon.encode())
                else:
                    for name in self.pipelines:
                        await kv.put(name, beacon.encode())
            except BusError as error:
                log.warning("worker beacon not written: %s", error)
            await trio.sleep(WORKERS_REFRESH)


class _Slots:
    """The worker's job slots: taken by a job when it starts, given back when it ends.
    Unlike a semaphore, it also lets a puller wait for a free slot without taking one."""

    def __init__(self, total: int) -> None:
        self.free = total
        self._freed = trio.Event()

    def try_take(self) -> bool:
        if self.free == 0:
            return False
        self.free -= 1
        return True

    async def take(self) -> None:
        while not self.try_take():
            await self._freed.wait()

    async def wait_free(self, *, more_than: int = 0) -> None:
        while self.free <= more_than:
            await self._freed.wait()

    def give(self) -> None:
        self.free += 1
        self._freed.set()
        self._freed = trio.Event()


# -- the systemd launch mode ----------------------------------------------------------------


async def run_one_job(settings: Settings, trace_id: str, *, handle_signals: bool = True) -> int:
    """Run the job stored for `trace_id` (systemd launch mode) and return the exit status."""
    registry = PipelineRegistry(settings.workflow)

    async def serve(env: WorkerEnv) -> int:
        bus = await _wait_for_bus(env.resources)
        kv = await jobs_kv(bus, retention=settings.workflow.job_retention_seconds)
        entry = await kv.get(job_key(trace_id))
        if entry is None:
            log.error("no job stored for trace %s (done already, or expired)", trace_id)
            return EXIT_NO_JOB
        try:
            job = Job.decode(entry.value)
            env.pipelines = {job.pipeline: registry.load(job.pipeline)}
        except (JobError, PipelineError) as error:
            log.error("job %s cannot run: %s", trace_id, error)
            await kv.delete(job_key(trace_id))
            await _announce_failure(env, trace_id, 1, str(error))
            return EXIT_NO_JOB
        env.options = {job.pipeline: registry.options(job.pipeline)}
        trace = received_trace(job.traceparent, job.tracestate)  # the job's model calls continue it
        if (tracing := otel.TRACING) is not None:
            trace = tracing.job_span(trace, job_key(trace_id), job.attempt + 1)
        current_trace.set(trace)
        job.attempt += 1
        run: JobRun | None = None
        try:
            try:
                await kv.update(job_key(trace_id), job.encode(), revision=entry.revision)
            except KeyConflict:
                log.warning("job %s was claimed by another process", trace_id)
                return EXIT_OK
            run = JobRun(env, job, job.attempt)
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    nursery.start_soon(_interrupt_on_signal, run)
                nursery.start_soon(_cancel_on_message, bus, run)
                disposition = await run.run()
                nursery.cancel_scope.cancel()
        finally:
            if tracing is not None and trace is not None:
                tracing.end_job(trace, run)
        if disposition is Disposition.RETRY:
            return EXIT_RETRY
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _SETTLE_SECONDS):
            try:
                await kv.delete(job_key(trace_id))
            except BusError as error:
                log.warning("job %s done but not removed: %s", trace_id, error)
        return EXIT_OK

    return await _with_env(settings, f"{socket.gethostname()}:{os.getpid()}:{trace_id}", {}, {}, serve)


async def _interrupt_on_signal(run: JobRun) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            run.cancel("shutdown")
            return


async def _cancel_on_message(bus: Bus, run: JobRun) -> None:
    async with bus.subscribe(cancel_subject(run.job.trace_id)) as messages:
        async for _ in messages:
            run.cancel("client")
            return


# -- shared pieces --------------------------------------------------------------------------


async def _with_env(
    settings: Settings,
    worker_id: str,
    pipelines: Mapping[str, Pipeline],
    options: Mapping[str, Mapping[str, Any]],
    body: Callable[[WorkerEnv], Awaitable[_T]],
) -> _T:
    """Run `body` with a worker's resources open (PostgreSQL and NATS keepers, backend
    clients); close them afterwards, also on cancellation."""

    async def prepare(bus: Bus) -> None:
        await ensure_streams(
            bus, events_retention=settings.events_retention_seconds, events_max_bytes=settings.events_max_bytes
        )

    # Its jobs' spans, with span export on (before the backends: they are made knowing it).
    tracing = otel.start(settings.tracing, service="llm-proxy-worker")
    backends: dict[str, Backend] = {config.name: create_backend(config, refuse_private_media_urls=settings.refuse_private_media_urls) for config in settings.backends}
    router = build_router(settings)
    env = WorkerEnv(
        settings=settings,
        pipelines=pipelines,
        options=options,
        router=router,
        backends=backends,
        catalog=ModelCatalog(backends, router, settings.models_cache_seconds),
        resources=Resources(settings.database_url, settings.nats_url, on_bus=prepare),
        worker_id=worker_id,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(env.resources.run)
            try:
                return await body(env)
            finally:
                env.resources.stop()
    finally:
        with trio.CancelScope(shield=True):
            for backend in backends.values():
                await backend.aclose()
            if tracing is not None:
                await otel.stop_soon(tracing)


async def _wait_for_bus(resources: Resources) -> Bus:
    waited = 0.0
    while (bus := resources.bus) is None:
        await trio.sleep(0.1)
        waited += 0.1
        if waited >= _BUS_WAIT_LOG:
            log.warning("waiting for NATS at %s", without_credentials(resources.nats_url or ""))
            waited = 0.0
    return bus


async def _heartbeat(message: JobMessage, interval: float, ack_wait: float = 0.0, run: JobRun | None = None) -> None:
    """Keep the job's ack deadline ahead. With `run`: once no heartbeat got through for
    `ack_wait` (NATS unreachable), JetStream has handed the job to another worker, so this
    one stops its run. (The server confirms a late heartbeat for a redelivered job too: only
    our own clock tells whether it came in time.)"""
    confirmed = trio.current_time()
    while True:
        await trio.sleep(interval)
        sent = trio.current_time()
        ok = False
        try:
            await message.in_progress(timeout=interval)
            ok = True
        except BusError as error:
            log.warning("job heartbeat failed: %s", error)
        if run is not None and trio.current_time() - confirmed >= ack_wait:
            log.warning(
                "job %s: no heartbeat reached NATS for %gs (its ack wait): it has been redelivered; stopping it",
                run.job.trace_id, trio.current_time() - confirmed,
            )
            run.cancel("lost")
            return
        if ok:
            confirmed = sent


async def _forget_running(env: WorkerEnv, trace_id: str) -> None:
    bus = env.resources.bus
    if bus is None:
        return
    with trio.CancelScope(shield=True, deadline=trio.current_time() + _SETTLE_SECONDS):
        try:
            await (await workers_kv(bus)).delete(running_key(trace_id))
        except BusError as error:
            log.warning("job %s: liveness key not removed (it lapses by itself): %s", trace_id, error)


async def _settle(message: JobMessage, disposition: Disposition) -> None:
    with trio.CancelScope(shield=True, deadline=trio.current_time() + _SETTLE_SECONDS):
        try:
            if disposition is Disposition.ACK:
                await message.ack()
            else:
                await message.nak()
        except BusError as error:
            log.warning("job %s not settled (%s): it will be redelivered", message.seq, error)


async def _reject(env: WorkerEnv, message: JobMessage, error: JobError) -> None:
    log.error("job message %s rejected: %s", message.seq, error)
    trace_id = peek_trace_id(message.data)
    if trace_id is not None:
        await _announce_failure(env, trace_id, message.num_delivered, f"The workflow job is malformed: {error}")
    with trio.CancelScope(shield=True, deadline=trio.current_time() + _SETTLE_SECONDS):
        try:
            await message.term()
        except BusError as exc:
            log.warning("malformed job %s not dropped: %s", message.seq, exc)


async def _announce_failure(env: WorkerEnv, trace_id: str, attempt: int, message: str) -> None:
    """Tell a job's client it failed, for a job that never got as far as a `JobRun`."""
    outcome = RunOutcome("failed", "error", error=GatewayError(ErrorKind.INTERNAL, message, code="workflow_bad_job"))
    publisher = EventPublisher(lambda: env.resources.bus, trace_id, attempt, keepalive=0)
    with trio.move_on_after(_SETTLE_SECONDS):
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            assert outcome.error is not None
            await publisher.put(StreamFailed(outcome.error))
            await publisher.finish(outcome.finished)


async def _signals(stop: trio.Event, hurry: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not stop.is_set():
                log.info("received %s: finishing running jobs, pulling no more", name)
                stop.set()
            else:
                log.info("received %s again: handing running jobs back now", name)
                hurry.set()

