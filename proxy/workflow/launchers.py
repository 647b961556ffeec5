"""How the gateway hands a job to a worker: `pull` (resident workers) or `systemd`.

- `PullLauncher`: publish the job on `jobs.{pipeline}` (work-queue stream, msg id = trace id,
  so a retried publish enqueues it once). Before that, `check` looks the pipeline up in the
  workers KV bucket, where every resident worker refreshes a key per pipeline it serves
  every few seconds: no key means no live worker, and the client gets a 503 at once instead
  of waiting out the silence deadline. The answer is cached for a second per pipeline.
- `SystemdLauncher`: store the job in the jobs KV bucket under `job.{trace_id}`, then
  `systemctl start --no-block llm-proxy-job@{trace_id}.service` (a oneshot template unit
  running `llm-proxy worker --one-job {trace_id}`). `--no-block`: `start` of a oneshot unit
  would otherwise wait for the whole job. A failing `systemctl` is a 503 with its message.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import Protocol

import trio

from proxy.config import WorkflowSettings
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.infra.backends import current_trace
from proxy.infra.nats import Bus, BusError
from proxy.workflow.bus import ensure_jobs_stream, jobs_kv, workers_kv
from proxy.workflow.job import Job, job_key, jobs_subject, running_key
from proxy.workflow.pipelines import PipelineRegistry

log = logging.getLogger("llm_proxy.workflow")

_LIVENESS_CACHE = 1.0
_SYSTEMCTL_SECONDS = 10.0


class Launcher(Protocol):
    async def check(self, bus: Bus, pipeline: str) -> None:
        """Raise GatewayError if a job for `pipeline` cannot run now (before publishing it)."""

    async def launch(self, bus: Bus, job: Job) -> None: ...

    async def serving(self, bus: Bus, pipeline: str, trace_id: str) -> bool:
        """Whether a worker may still start (or still runs) a published job (True when it
        cannot tell)."""


def no_worker(pipeline: str) -> GatewayError:
    return GatewayError(
        ErrorKind.UNAVAILABLE,
        f"No worker is running the pipeline `{pipeline}`: start one with "
        f"`llm-proxy worker --pipelines {pipeline}`.",
        code="no_worker", retry_after=5,
    )


def unknown_pipeline(name: str, registry: PipelineRegistry) -> GatewayError:
    known = ", ".join(registry.names()) or "none"
    return GatewayError(
        ErrorKind.NOT_FOUND, f"Unknown pipeline `{name}`; known pipelines: {known}.",
        param="x-pipeline", code="pipeline_not_found",
    )


class PullLauncher:
    def __init__(self, settings: WorkflowSettings, registry: PipelineRegistry) -> None:
        self._settings = settings
        self._registry = registry
        self._alive: dict[str, float] = {}  # pipeline -> until when a worker is known alive
        self._looking: dict[str, trio.Event] = {}

    async def check(self, bus: Bus, pipeline: str) -> None:
        if self._alive.get(pipeline, 0.0) > trio.current_time():
            return
        # One look-up at a time per pipeline: a burst of requests shares it.
        pending = self._looking.get(pipeline)
        if pending is not None:
            await pending.wait()
            if self._alive.get(pipeline, 0.0) > trio.current_time():
                return
        done = self._looking[pipeline] = trio.Event()
        try:
            alive = await self._look_up(bus, pipeline)
        finally:
            del self._looking[pipeline]
            done.set()
        if alive:
            self._alive[pipeline] = trio.current_time() + _LIVENESS_CACHE
            return
        if not self._registry.knows(pipeline):
            raise unknown_pipeline(pipeline, self._registry)
        raise no_worker(pipeline)

    async def serving(self, bus: Bus, pipeline: str, trace_id: str) -> bool:
        """Uncached: the last worker may have stopped since `check` (its key outlives it by
        the bucket's TTL). A draining worker that still runs this very job keeps it alive
        (it refreshes the job's own key), though it serves the pipeline no more."""
        try:
            alive = await self._look_up(bus, pipeline) or await self._look_up(bus, running_key(trace_id))
        except GatewayError:
            return True  # NATS trouble: the relay reports it
        if not alive:
            self._alive.pop(pipeline, None)
        return alive

    @staticmethod
    async def _look_up(bus: Bus, key: str) -> bool:
        try:
            return await (await workers_kv(bus)).get(key) is not None
        except BusError as error:
            raise GatewayError(
                ErrorKind.UNAVAILABLE, f"NATS did not answer: {error}", code="nats_unavailable", retry_after=5
            ) from None

    async def launch(self, bus: Bus, job: Job) -> None:
        await ensure_jobs_stream(bus, retention=self._settings.job_retention_seconds)
        # The client's trace goes with the job: its worker's backend calls carry it on.
        trace = current_trace.get()
        headers = trace.outgoing() if trace is not None else None
        await bus.publish(jobs_subject(job.pipeline), job.encode(), headers=headers, msg_id=job.trace_id)


class SystemdLauncher:
    def __init__(self, settings: WorkflowSettings, registry: PipelineRegistry) -> None:
        self._settings = settings
        self._registry = registry

    async def check(self, bus: Bus, pipeline: str) -> None:
        if not self._registry.knows(pipeline):
            raise unknown_pipeline(pipeline, self._registry)

    async def serving(self, bus: Bus, pipeline: str, trace_id: str) -> bool:
        return True  # a unit per job: nothing to watch

    async def launch(self, bus: Bus, job: Job) -> None:
        kv = await jobs_kv(bus, retention=self._settings.job_retention_seconds)
        if (trace := current_trace.get()) is not None:  # a KV entry has no headers: the job holds it
            headers = trace.outgoing()
            job = replace(job, traceparent=headers["traceparent"], tracestate=headers.get("tracestate"))
        await kv.put(job_key(job.trace_id), job.encode())
        unit = self._settings.unit.format(trace_id=job.trace_id)
        command = [self._settings.systemctl, "start", "--no-block", unit]
        failure: str | None = None
        with trio.move_on_after(_SYSTEMCTL_SECONDS) as scope:
            try:
                done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
                if done.returncode != 0:
                    detail = (done.stderr or done.stdout or b"").decode(errors="replace").strip()
                    failure = f"exit status {done.returncode}" + (f": {detail}" if detail else "")
            except OSError as error:
                failure = str(error)
        if scope.cancelled_caught:
            failure = f"no answer within {_SYSTEMCTL_SECONDS:g}s"
        if failure is not None:
            log.error("%s failed: %s", " ".join(command), failure)
            # (if this fails too, the job expires with the bucket's retention)
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2), contextlib.suppress(BusError):
                await kv.delete(job_key(job.trace_id))
            raise GatewayError(
                ErrorKind.UNAVAILABLE, f"Could not start the job unit `{unit}`: {failure}", code="launch_failed"
            )


def create_launcher(settings: WorkflowSettings, registry: PipelineRegistry) -> Launcher:
    if settings.launch == "systemd":
        return SystemdLauncher(settings, registry)
    return PullLauncher(settings, registry)

