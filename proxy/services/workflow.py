"""The workflow route (`x-pipeline: NAME`, or `x-route: workflow`): the request becomes a
pipeline job, a worker runs it, and the worker's events are the client's stream.

One producer per request, in the exchange's nursery:

1. subscribe to `evt.chat.{trace_id}` (JetStream, from the start of the subject) *before*
   the job exists, so no event can be missed;
2. hand the job to a worker (`proxy.workflow.launchers`: resident workers pulling
   `jobs.{pipeline}`, or a systemd unit per job) — 503 at once when no worker serves the
   pipeline, 404 for a pipeline nobody knows;
3. relay the events, through a `ClientView` (winner selection, redelivered attempts), as
   batches until `finished`;
4. a deadline on silence: nothing for `workflow.silence_seconds` is a 504 before the answer
   starts, an in-stream error after (workers send `progress` while they think);
5. if the relay ends before `finished` (client gone, deadline, stream lost), cancel the job:
   a cancel mark in the jobs KV bucket and a core message on `cancel.{trace_id}`, shielded
   and bounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from proxy.config import Settings
from proxy.dialects.events import Finished
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.domain.events import StreamEvent, StreamFailed, UsageReport
from proxy.domain.fingerprint import request_fingerprint
from proxy.domain.routing import Router
from proxy.domain.tokens import fanned_out_tokens
from proxy.infra.backends import Batch, _pump
from proxy.infra.nats import Bus, BusError, BusMessage, PayloadTooLarge
from proxy.infra.resources import Resources
from proxy.services.auth import check_model
from proxy.services.journal import EVENTS_STREAM, events_subject
from proxy.services.models import ModelCatalog
from proxy.services.persistence import Producer
from proxy.workflow.bus import jobs_kv
from proxy.workflow.fanout import JUDGE_MAX_TOKENS
from proxy.workflow.job import (
    OPTIONS_FIELD,
    WORKERS_REFRESH,
    Job,
    cancel_key,
    cancel_subject,
    valid_pipeline,
)
from proxy.workflow.launchers import Launcher, create_launcher, no_worker
from proxy.workflow.pipelines import PipelineRegistry
from proxy.workflow.view import ClientView, Continuity, decode

if TYPE_CHECKING:
    from proxy.services.chat import ChatExchange

log = logging.getLogger("llm_proxy.workflow")

_CANCEL_SECONDS = 2.0
# After the silence deadline, how long JetStream may take to show what the live feed missed.
_REPLAY_GRACE = 0.5
_BATCH = 64


class WorkflowRoute:
    """`chat.routes["workflow"]`."""

    needs_backend = False
    publishes_events = True

    def __init__(self, settings: Settings, resources: Resources, router: Router, catalog: ModelCatalog) -> None:
        self._settings = settings.workflow
        self._resources = resources
        self._router = router
        self._catalog = catalog
        self.registry = PipelineRegistry(settings.workflow)
        self.launcher: Launcher = create_launcher(settings.workflow, self.registry)

    def _pipeline(self, exchange: ChatExchange) -> str:
        pipeline = exchange.meta.pipeline  # the default's name when the request gave none
        if pipeline is None:
            raise invalid_request(
                "A workflow request names its pipeline in the `x-pipeline` header.", param="x-pipeline"
            )
        if not valid_pipeline(pipeline):
            raise invalid_request(
                f"`x-pipeline` must be 1-64 of A-Z a-z 0-9 _ -, got {pipeline!r}.", param="x-pipeline"
            )
        return pipeline

    async def admit(self, exchange: ChatExchange) -> None:
        pipeline = self._pipeline(exchange)
        await self._check_models(exchange, pipeline)
        bus = self._resources.bus
        if bus is not None:  # without NATS the run reports it, as a run that lost it would
            await self.launcher.check(bus, pipeline)

    async def cache_scope(self, exchange: ChatExchange) -> str | None:
        return None  # the pipeline is in the request's `req_id` already

    def producer(self, exchange: ChatExchange) -> Producer:
        pipeline = self._pipeline(exchange)

        async def produce(send: trio.MemorySendChannel[Batch]) -> None:
            await self._check_models(exchange, pipeline)
            await self._produce(exchange, pipeline, send)

        return produce

    async def _check_models(self, exchange: ChatExchange, pipeline: str) -> None:
        """Models the client names in its `workflow` options go through the gateway's router
        now: an unknown one is a 404 before anything starts, and an API key's model scope
        applies to them as it does to the request's own model. The models the pipeline's
        config names (those the client's options do not replace) are called for this key
        too: outside its scope, they are a 403 as well. (Options named `model`, `models` or
        `*_model` are model names, by convention.)"""
        options = exchange.request.extra.get(OPTIONS_FIELD)
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise invalid_request(f"`{OPTIONS_FIELD}` must be an object.", param=OPTIONS_FIELD)
        for key, value in options.items():
            if _names_models(key):
                for model in _names(value):
                    await self._resolve(model)
        for key, value in self.registry.options(pipeline).items():
            if _names_models(key) and key not in options:
                for model in _names(value):
                    check_model(model)

    async def _resolve(self, model: str) -> None:
        try:
            self._router.resolve(model)
            return
        except GatewayError as error:
            if error.code != "model_not_found":
                raise
        # A name only a backend's listing has: the catalogue teaches the router (see `_front`).
        await self._catalog.models()
        self._router.resolve(model)

    async def _produce(self, exchange: ChatExchange, pipeline: str, send: trio.MemorySendChannel[Batch]) -> None:
        bus = self._resources.bus
        if bus is None:
            raise GatewayError(
                ErrorKind.UNAVAILABLE, "The workflow route needs NATS, which is unreachable right now.",
                code="nats_unavailable", retry_after=5,
            )
        meta, request = exchange.meta, exchange.request
        await self.launcher.check(bus, pipeline)
        exchange.response_headers.append((b"x-pipeline", pipeline.encode()))
        now = time.time()
        silence = self._settings.silence_seconds
        job = Job(
            trace_id=meta.trace_id,
            req_id=request_fingerprint(request),
            request_id=meta.request_id,
            pipeline=pipeline,
            request=request,
            submitted_at=now,
            deadline=now + silence,
            silence=silence,
            correlation_id=meta.correlation_id,
        )
        launched = ended = False
        follow = _Follow(ClientView(job.stream_start(), live=request.stream), Continuity())
        subject = events_subject(job.trace_id)
        try:
            async with bus.subscribe(subject) as live:
                try:
                    await self.launcher.launch(bus, job)
                except PayloadTooLarge:
                    raise _too_large(bus) from None
                launched = True
                ended = await self._first_relay(bus, live, follow, exchange, job, send)
            if follow.needs_replay:
                async with bus.subscribe(subject, from_start=True, stream=EVENTS_STREAM) as replay:
                    follow.replaying = True
                    ended = await self._relay(replay, follow, exchange, job, send)
        except BusError as error:
            if follow.view.visible and request.stream:
                await send.send(Batch([StreamFailed(_lost(error))], done=True))
                return
            raise _lost(error) from None
        finally:
            if launched and not ended:
                await self._cancel(exchange, job.trace_id)

    async def _first_relay(
        self,
        bus: Bus,
        events: trio.MemoryReceiveChannel[BusMessage],
        follow: _Follow,
        exchange: ChatExchange,
        job: Job,
        send: trio.MemorySendChannel[Batch],
    ) -> bool:
        """`_relay`, and until a worker is heard from, a look every few seconds at whether any
        still serves the pipeline: when the last one stopped just before (its key outlives
        it by the bucket's TTL), the client gets the 503 `check` would now give, not a 504
        after `silence_seconds`."""
        orphaned = False
        ended = False
        failure: GatewayError | BusError | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal orphaned
                while not follow.heard:
                    await trio.sleep(WORKERS_REFRESH)
                    if not follow.heard and not await self.launcher.serving(bus, job.pipeline, job.trace_id):
                        orphaned = True
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch)
            try:
                ended = await self._relay(events, follow, exchange, job, send)
            except (GatewayError, BusError) as error:  # raised below, not in the nursery's group
                failure = error
            nursery.cancel_scope.cancel()
        if orphaned:
            raise no_worker(job.pipeline)
        if failure is not None:
            raise failure
        return ended

    async def _relay(
        self,
        events: trio.MemoryReceiveChannel[BusMessage],
        follow: _Follow,
        exchange: ChatExchange,
        job: Job,
        send: trio.MemorySendChannel[Batch],
    ) -> bool:
        """Relay until the job's end; True when the job ended by itself (nothing to cancel).
        Returns early with `follow.needs_replay` set when the live feed missed something."""
        view = follow.view
        if follow.quiet_until is None:
            follow.quiet_until = trio.current_time() + self._settings.silence_seconds
        deadline = follow.quiet_until
        if follow.replaying:  # time to read what JetStream holds, even at the deadline
            deadline = max(deadline, trio.current_time() + _REPLAY_GRACE)
        while not view.done:
            first: BusMessage | None = None
            with trio.move_on_at(deadline) as timer:
                try:
                    first = await events.receive()
                except trio.EndOfChannel:
                    first = None
            if first is None:
                if not follow.replaying:
                    follow.needs_replay = True  # a lost `finished`, a dropped subscription: look it up
                    return False
                error = self._silence_error(job.pipeline, follow.heard, lost=not timer.cancelled_caught)
                if not view.visible or not exchange.request.stream:  # nothing reached the client yet
                    raise error
                await send.send(Batch([StreamFailed(error)], done=True))
                return False
            out: list[StreamEvent] = []
            message: BusMessage = first
            gap = False
            for _ in range(_BATCH):
                if not follow.take(message.data, out):
                    gap = True
                    break
                if view.done:
                    break
                try:
                    message = events.receive_nowait()
                except trio.WouldBlock:
                    break
            if follow.fresh:  # duplicates (a replay re-reading what it had) do not count
                follow.fresh = False
                deadline = follow.quiet_until = trio.current_time() + self._settings.silence_seconds
            if view.error is not None and (not view.visible or not exchange.request.stream):
                # Its status goes to the client; what the job's model calls spent, to its key.
                spent = view.usage_unshown or _last_usage([*follow.held, *out])
                if spent is not None:
                    exchange.charge_unshown(spent)
                raise view.error
            if view.done and view.winner and not exchange.request.stream:
                exchange.response_headers.append((b"x-workflow-winner", view.winner.encode()))
            if not exchange.request.stream:
                # The whole answer at once: a retry after a dead worker may still replace it.
                follow.held.extend(out)
                out = follow.held if view.done else []
            if out or view.done:
                await send.send(Batch(out, done=view.done))
                follow.told = trio.current_time()
            elif exchange.request.stream and trio.current_time() - follow.told >= _pump.KEEPALIVE_SECONDS:
                # The job is alive (its tasks streaming to a winner not chosen yet, a worker's
                # `progress`) with nothing to show: as for a backend that sends bytes but no
                # event, the client gets its head and keep-alives, not a silence a proxy on
                # its way (nginx: 60 s) would cut.
                await send.send(Batch([]))
                follow.told = trio.current_time()
            if gap:
                return False  # re-read from JetStream
        return view.finished is not None and not view.abandoned

    def _silence_error(self, pipeline: str, heard: bool, *, lost: bool) -> GatewayError:
        silence = self._settings.silence_seconds
        if lost:
            return GatewayError(ErrorKind.UNAVAILABLE, "The workflow's event stream was lost.", code="events_lost")
        if not heard:
            return GatewayError(
                ErrorKind.TIMEOUT,
                f"No worker started the `{pipeline}` job within {silence:g}s (all workers busy?).",
                code="workflow_not_started",
            )
        return GatewayError(
            ErrorKind.TIMEOUT, f"The `{pipeline}` pipeline sent nothing for {silence:g}s.", code="workflow_silent"
        )

    async def _cancel(self, exchange: ChatExchange, trace_id: str) -> None:
        """Tell the job's worker to stop (also a worker that has not picked it up yet), and
        charge what its model calls spent until then: a client that leaves before a winner is
        chosen has seen nothing of what every model generated. The worker says it (`usage`)
        before the run's `finished`, waited for within the same bound; only once the client
        is gone (or cancelled its background run): an error on its way to a client still
        there is not held back for it."""
        spent: UsageReport | None = None
        with trio.CancelScope(shield=True, deadline=trio.current_time() + _CANCEL_SECONDS):
            bus: Bus | None = self._resources.bus
            if bus is None:
                return
            try:
                async with bus.subscribe(events_subject(trace_id)) as events:
                    kv = await jobs_kv(bus, retention=self._settings.job_retention_seconds)
                    await kv.put(cancel_key(trace_id), b"1")
                    await bus.publish_core(cancel_subject(trace_id), b"")
                    if not exchange.stopped_by_client:
                        return
                    async for message in events:
                        _, event = decode(message.data)
                        if isinstance(event, UsageReport):
                            spent = event
                        elif isinstance(event, Finished):
                            break
            except BusError as error:
                log.warning("cancel for workflow job %s not sent: %s", trace_id, error)
        if spent is not None:
            exchange.charge_unshown(spent)


def pipeline_tokens(body: object, configured: Mapping[str, Any], tokens: int) -> int:
    """What a workflow request reserves rather than one model's estimate (`tokens`): its
    pipeline asks each model its options name (`models`: the request's `workflow` object's,
    else the pipeline's configured ones) and, with `rule = "judge"`, a judge reads them all.
    A pipeline that names no models is reckoned as one call."""
    given = body.get(OPTIONS_FIELD) if isinstance(body, dict) else None
    options = {**configured, **(given if isinstance(given, dict) else {})}
    models = options.get("models")
    calls = len(models) if isinstance(models, list | tuple) and models else 1
    judged = options.get("rule") == "judge"
    if calls == 1 and not judged:
        return tokens
    return max(tokens, fanned_out_tokens(body, calls, judged, judge_output=JUDGE_MAX_TOKENS))


class _Follow:
    """A relay's reading position: the client's view, and which seqs it has had. A gap on
    the live (core NATS) feed switches the relay to a JetStream replay of the trace."""

    def __init__(self, view: ClientView, continuity: Continuity) -> None:
        self.view = view
        self.continuity = continuity
        self.heard = False
        self.needs_replay = False
        self.replaying = False
        self.quiet_until: float | None = None  # the silence deadline
        self.fresh = False  # something new since the deadline was last moved
        self.held: list[StreamEvent] = []  # a non-streamed answer, until its end
        self.told = trio.current_time()  # when the client was last sent something

    def take(self, data: bytes, out: list[StreamEvent]) -> bool:
        """Feed one message to the view; False on a gap in the live feed."""
        seq, event = decode(data)
        verdict = self.continuity.check(seq)
        if verdict == "seen":
            return True
        if verdict == "gap":
            if not self.replaying:
                self.needs_replay = True
                return False
            self.continuity.accept(seq)  # JetStream has nothing better: go on
        self.heard = self.fresh = True
        if event is not None:
            restarts = self.view.restarts
            shown = self.view.feed(seq, event)
            if self.view.restarts != restarts:  # a retry's answer replaces the one held so far
                out.clear()
                self.held.clear()
            out.extend(shown)
        return True


def _last_usage(events: list[StreamEvent]) -> UsageReport | None:
    return next((e for e in reversed(events) if isinstance(e, UsageReport)), None)


def _lost(error: BusError) -> GatewayError:
    return GatewayError(
        ErrorKind.UNAVAILABLE, f"The workflow job's events could not be followed: {error}",
        code="nats_unavailable", retry_after=5,
    )


def _too_large(bus: Bus) -> GatewayError:
    """A job travels as one NATS message: past the server's `max_payload`, no retry helps."""
    limit = bus.max_payload
    return GatewayError(
        ErrorKind.REQUEST_TOO_LARGE,
        f"The request is too large for a workflow job: a job travels as one NATS message, and this "
        f"NATS server takes at most {limit} bytes (its `max_payload`).",
        code="request_too_large",
    )


def _names_models(option: str) -> bool:
    return option == "models" or option == "model" or option.endswith("_model")


def _names(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [item for item in value if isinstance(item, str)]
    return []
