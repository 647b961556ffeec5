"""The composition root: settings in, wired services out, resources closed on exit."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from proxy.config import Settings
from proxy.domain.errors import GatewayError
from proxy.domain.hosts import HostPolicy
from proxy.domain.routing import BackendRoute, Router
from proxy.infra import otel
from proxy.infra.backends import Backend, create_backend
from proxy.infra.embedded import EmbeddedNats, EmbeddedPostgres, Revivable, keep_running
from proxy.infra.logging import RequestLog
from proxy.infra.metrics import Metrics
from proxy.infra.nats import Bus
from proxy.infra.resources import Resources
from proxy.infra.spool import spool_directory
from proxy.services.auth import Authenticator, KeyRing, ScopedCatalog, ScopedRouter
from proxy.services.batches import BatchRunner
from proxy.services.chat import ChatService, ExchangeRecord, RecordSink
from proxy.services.embeddings import CatalogWithLocalModels, EmbeddingService, LocalModel
from proxy.services.journal import ensure_streams
from proxy.services.limits import RateLimiter
from proxy.services.models import ModelCatalog
from proxy.services.persistence import Persistence, PersistenceSettings
from proxy.services.rag import RagRoute, RagService
from proxy.services.semantic_cache import SemanticCache
from proxy.services.workflow import WorkflowRoute

log = logging.getLogger("llm_proxy.gateway")

_PROBE_SECONDS = 3.0
# Under any orchestrator's probe period (Kubernetes: 10 s by default, 1 s at least).
_READY_REUSE_SECONDS = 1.0


@dataclass(slots=True)
class Gateway:
    settings: Settings
    router: Router
    backends: dict[str, Backend]
    chat: ChatService
    catalog: ModelCatalog
    resources: Resources
    persistence: Persistence | None
    embeddings: EmbeddingService | None = None
    rag: RagService | None = None
    semantic_cache: SemanticCache | None = None
    auth: Authenticator | None = None
    limits: RateLimiter | None = None
    metrics: Metrics | None = None
    hosts: HostPolicy | None = None  # the Host names answered while no key is asked
    batches: BatchRunner | None = None  # with a database: OpenAI's Batch API runs here
    _readiness: tuple[float, dict[str, str]] | None = None  # the last probe's end and answer
    _probing: trio.Event | None = None  # set when the probe in flight ends

    async def wind_down(self, deadline: float) -> None:
        """The gateway stops: its durable runs (background responses, keyed chats whose
        client left) go on until `deadline`, the graceful stop's end, as requests in flight do."""
        async with trio.open_nursery() as nursery:
            if self.batches is not None:
                nursery.start_soon(self.batches.wind_down, deadline)
            if self.persistence is not None:
                nursery.start_soon(self.persistence.runs.wind_down, deadline)

    async def readiness(self) -> dict[str, str]:
        """Each dependency's state: "ok" (or "ok (a note)": serving, with something to say) or why not.

        `/ready` is public: however many ask, the dependencies are probed at most once per
        `_READY_REUSE_SECONDS` (one probe in flight, its answer shared), so callers without a
        key cannot make the gateway flood its backends and database (an Anthropic backend's
        model listing counts against the gateway's own rate limit there)."""
        while True:
            last = self._readiness
            if last is not None and trio.current_time() - last[0] < _READY_REUSE_SECONDS:
                return dict(last[1])
            probing = self._probing
            if probing is None:
                break
            await probing.wait()  # its answer, or (its caller gone) a probe of our own
        self._probing = done = trio.Event()
        try:
            states = await self._probe()
            self._readiness = (trio.current_time(), states)
        finally:
            self._probing = None
            done.set()
        return dict(states)

    async def _probe(self) -> dict[str, str]:
        states: dict[str, str] = {}

        async def probe(name: str, backend: Backend) -> None:
            states[name] = "timed out"
            with trio.move_on_after(_PROBE_SECONDS):
                try:
                    note = await backend.check()
                    states[name] = "ok" if note is None else f"ok ({note})"
                except GatewayError as error:
                    states[name] = error.message

        async def dependencies() -> None:
            states.update(await self.resources.readiness())

        async with trio.open_nursery() as nursery:
            for name, backend in self.backends.items():
                nursery.start_soon(probe, f"backend:{name}", backend)
            nursery.start_soon(dependencies)
        return states


def build_router(settings: Settings, cls: type[Router] = Router) -> Router:
    routes = [
        BackendRoute(name=b.name, prefixes=b.prefixes, models=b.models, default=b.default)
        for b in settings.backends
    ]
    return cls(routes, settings.aliases)


def record_to(*sinks: RecordSink) -> RecordSink:
    if otel.TRACING is not None:  # set up before the gateway (`create_app`'s startup)
        sinks = (*sinks, otel.TRACING.recorded)

    def record(entry: ExchangeRecord) -> None:
        for sink in sinks:
            sink(entry)

    return record


@asynccontextmanager
async def open_gateway(settings: Settings, nursery: trio.Nursery) -> AsyncIterator[Gateway]:
    """Wire the gateway; its long-lived tasks (connection keepers) run in `nursery`, which
    the caller owns (the app's lifespan) and which outlives this context."""
    # Requests resolve models through the scoped router (a key's model scope is checked
    # there); the catalogue lists every model and is filtered per key on the way out.
    router = build_router(settings, ScopedRouter)
    backends = {config.name: create_backend(config, refuse_private_media_urls=settings.refuse_private_media_urls) for config in settings.backends}

    # A run's events are never kept past its row: a stream read again after its row expired
    # would give back what every other reader says is gone.
    events_retention = (
        min(settings.events_retention_seconds, settings.log_retention_seconds)
        if settings.database_url else settings.events_retention_seconds
    )

    async def on_bus(bus: Bus) -> None:
        await ensure_streams(bus, events_retention=events_retention, events_max_bytes=settings.events_max_bytes)

    watchdog = trio.CancelScope()
    embedded: list[tuple[Revivable, str]] = []
    if settings.embedded_pgdata is not None:
        embedded.append((EmbeddedPostgres(settings.embedded_pgdata), f"embedded PostgreSQL on {settings.embedded_pgdata}"))
    if settings.embedded_nats is not None:
        embedded.append((EmbeddedNats(settings.embedded_nats), f"embedded NATS on {settings.embedded_nats}"))

    async def keep_servers_running() -> None:
        with watchdog:
            async with trio.open_nursery() as keepers:
                for server, what in embedded:
                    keepers.start_soon(keep_running, server, what)

    if embedded:
        nursery.start_soon(keep_servers_running)
    resources = Resources(settings.database_url, settings.nats_url, on_bus=on_bus)
    await nursery.start(resources.run)
    persistence: Persistence | None = None
    if settings.database_url or settings.nats_url:
        outbox_spool = (
            spool_directory(settings.data_dir, settings.database_url, "outbox")
            if settings.data_dir is not None and settings.database_url else None
        )
        persistence = Persistence(
            resources, PersistenceSettings(
                cache_ttl=settings.cache_ttl_seconds, spool=outbox_spool,
                key_retention=settings.idempotency_retention_seconds, log_retention=settings.log_retention_seconds,
            )
        )
        await nursery.start(persistence.runs.run)
        await nursery.start(persistence.outbox.run)
        await nursery.start(persistence.writer.run)
        await nursery.start(persistence.publisher.run)
        if settings.nats_url:
            await nursery.start(persistence.take_cancels)
        if settings.database_url:
            await nursery.start(persistence.keep_alive)
    keys = KeyRing(resources)
    # Usage the database could not take is spooled in the data directory (per database).
    spool = (
        spool_directory(settings.data_dir, settings.database_url)
        if settings.data_dir is not None and settings.database_url else None
    )
    limits = RateLimiter(
        resources, keys, spool=spool, owner=persistence.instance_id if persistence is not None else None,
        register=persistence.register if persistence is not None and settings.database_url else None,
    )
    if settings.database_url and settings.auth != "off":
        await nursery.start(keys.run)
        await nursery.start(limits.run)
    auth = Authenticator(settings.auth, keys, has_database=settings.database_url is not None)
    # The local embedding model: loaded on first use (or now, in the background, with
    # `preload`), its batcher a task of `nursery`.
    local_model = LocalModel(nursery, threads=settings.embeddings.threads)
    if settings.embeddings.preload and settings.embeddings.local_model:
        nursery.start_soon(local_model.warm)

    async def learn_listed_names() -> None:
        # The metrics' records held until the backends are listed (see `Metrics`).
        try:
            await catalog.models()
        except Exception:  # the gateway goes on; the held records are counted unlabelled
            log.exception("listing the backends' models failed")
        finally:
            metrics.learnt()

    # Embeddings count in their key's usage and token limit as chats do, in the metrics and in
    # the request log (never their input).
    metrics = Metrics(
        backends, known=lambda model: router.knows(model) or embeddings.is_local(model),
        listed=lambda: catalog.listed, learn=lambda: nursery.start_soon(learn_listed_names),
    )
    request_log = RequestLog(settings.access_log)
    embeddings = EmbeddingService(
        settings.embeddings, router, backends, local_model, record=record_to(request_log, limits.record, metrics.sink())
    )
    rag = RagService(settings.rag, lambda: resources.database, local_model, configured=settings.database_url is not None)
    semantic_cache = SemanticCache(settings.semantic_cache, lambda: resources.database, local_model, router)
    # The catalogue teaches the router the names backends list (see `_front.serve`).
    catalog = CatalogWithLocalModels(embeddings, backends, router, settings.models_cache_seconds)
    batches: BatchRunner | None = None
    if persistence is not None and settings.database_url:
        # It takes batches once the HTTP layer gives it the front door to send their lines to.
        batches = BatchRunner(
            resources, persistence.instance_id, concurrency=settings.batches.concurrency,
            max_lines=settings.batches.max_lines, poll=settings.batches.poll_seconds,
            silent=persistence.settings.dead_after, late=persistence.settings.late,
        )
        await nursery.start(batches.run)
    try:
        yield Gateway(
            settings=settings,
            router=router,
            backends=backends,
            chat=ChatService(router, backends, record_to(request_log, limits.record, metrics.sink()), observe=record_to(request_log, metrics.sink()), persistence=persistence, semantic_cache=semantic_cache, fallbacks=settings.fallbacks,
                             default_pipeline=settings.workflow.default_pipeline,
                             routes={"rag": RagRoute(rag), "workflow": WorkflowRoute(settings, resources, router, catalog)}),
            catalog=ScopedCatalog(catalog),
            resources=resources,
            persistence=persistence,
            embeddings=embeddings,
            rag=rag,
            semantic_cache=semantic_cache,
            auth=auth,
            limits=limits,
            metrics=metrics,
            hosts=HostPolicy(settings.allowed_hosts, settings.host),
            batches=batches,
        )
    finally:
        # Runs and lines have had their graceful stop: what is written from now on has a
        # fallback, and waits for a stalled database no longer.
        resources.stopping()
        if batches is not None:  # its lines still need the limiter, the writer, the database
            batches.stop()
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 12):
                await batches.stopped.wait()
        await limits.aclose()  # writes pending usage while the database is still open
        keys.stop()
        if persistence is not None:
            # Durable runs first: their outcomes still go through the writer.
            persistence.runs.stop()
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 10):
                await persistence.runs.stopped.wait()
            await persistence.writer.aclose()  # its last rows may go to the outbox
            persistence.publisher.stop()
            await persistence.outbox.aclose()
        local_model.stop()
        resources.stop()
        watchdog.cancel()
        with trio.CancelScope(shield=True):
            for backend in backends.values():
                await backend.aclose()
