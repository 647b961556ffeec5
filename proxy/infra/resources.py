"""PostgreSQL and NATS as resources that come and go.

The gateway must serve chats with either dependency down, so neither is opened once at
start-up and assumed: each has a keeper task that (re)connects with backoff, runs the
migrations once connected, and publishes the live handle (`database`, `bus`) — None while
unreachable. Callers read the handle at the moment they need it and treat None as "down".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import trio

from proxy.infra.migrations import migrate
from proxy.infra.nats import Bus, BusError, open_bus
from proxy.infra.postgres import Database, DatabaseError, open_database

log = logging.getLogger("llm_proxy.resources")

_BACKOFF_START = 0.5
_BACKOFF_MAX = 10.0
_PROBE_SECONDS = 2.0
# What a stopping gateway still writes (its usage, its last rows, its batches let go) waits
# this long for PostgreSQL at most, all together: a stalled database must not hold the stop
# (`systemctl stop`, Kubernetes' 30 s) when all of it has a place to go without it.
STOP_WRITES_SECONDS = 1.5


class Resources:
    def __init__(
        self,
        database_url: str | None,
        nats_url: str | None,
        *,
        pool_size: int = 10,
        on_bus: Callable[[Bus], Awaitable[None]] | None = None,
    ) -> None:
        self.database_url = database_url
        self.nats_url = nats_url
        self.database: Database | None = None
        self.bus: Bus | None = None
        self.database_changed = trio.Event()
        self._pool_size = pool_size
        self._on_bus = on_bus
        self._scope: trio.CancelScope | None = None
        self._answer_by = math.inf

    async def run(self, *, startup_wait: float = 5.0, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep both connections until cancelled. Reports started once both are up, or after
        `startup_wait` seconds (a gateway with its database down still serves chats)."""
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                ready = {"db": self.database_url is None, "bus": self.nats_url is None}
                started = trio.Event()

                def mark(name: str) -> None:
                    ready[name] = True
                    if all(ready.values()):
                        started.set()

                if self.database_url is not None:
                    nursery.start_soon(self._keep_database, self.database_url, lambda: mark("db"))
                if self.nats_url is not None:
                    nursery.start_soon(self._keep_bus, self.nats_url, lambda: mark("bus"))
                if all(ready.values()):
                    started.set()
                with trio.move_on_after(startup_wait if self.database_url or self.nats_url else 0):
                    await started.wait()
                task_status.started()

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    def stopping(self) -> None:
        """The gateway stops: database calls from now on fail once `STOP_WRITES_SECONDS`
        have passed without an answer (the callers' fallbacks: the spool, the outbox)."""
        self._answer_by = min(self._answer_by, trio.current_time() + STOP_WRITES_SECONDS)
        if self.database is not None:
            self.database.answer_by(self._answer_by)

    async def _keep_database(self, url: str, on_ready: Callable[[], None]) -> None:
        delay = _BACKOFF_START
        while True:
            try:
                async with open_database(url, min_size=1, max_size=self._pool_size) as db:
                    applied = await migrate(db)
                    if applied:
                        log.info("applied migrations: %s", ", ".join(applied))
                    self._set_database(db)
                    on_ready()
                    delay = _BACKOFF_START
                    await self._watch(db)
            except DatabaseError as error:
                log.warning("database unavailable (%s); retrying in %.1fs", error, delay)
            finally:
                self._set_database(None)
            await trio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _watch(self, db: Database) -> None:
        """Return when the database stops answering, so the keeper reopens the pool."""
        failures = 0
        while failures < 3:
            await trio.sleep(2.0)
            try:
                with trio.fail_after(_PROBE_SECONDS):
                    await db.ping()
                failures = 0
            except (DatabaseError, trio.TooSlowError):
                # A busy pool can miss a probe; queries fail over to the outbox on their own
                # anyway. Three misses in a row mean the server is gone: reopen the pool.
                failures += 1
        log.warning("database stopped answering; reconnecting")

    def _set_database(self, db: Database | None) -> None:
        if db is not self.database:
            if db is not None:
                db.answer_by(self._answer_by)
            self.database = db
            self.database_changed.set()
            self.database_changed = trio.Event()

    async def _keep_bus(self, url: str, on_ready: Callable[[], None]) -> None:
        delay = _BACKOFF_START
        while True:
            try:
                async with open_bus(url) as bus:
                    if self._on_bus is not None:
                        await self._on_bus(bus)
                    self.bus = bus
                    on_ready()
                    delay = _BACKOFF_START
                    async with trio.open_nursery() as watching:
                        watching.start_soon(self._prepare_on_reconnect, bus)
                        # Repairs a connected-but-stuck connection in place; returns only once
                        # the connection is closed for good, so it is reopened below.
                        await bus.watch()
                        watching.cancel_scope.cancel()
                    log.warning("NATS connection closed; reconnecting")
            except BusError as error:
                log.warning("NATS unavailable (%s); retrying in %.1fs", error, delay)
            finally:
                self.bus = None
            await trio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _prepare_on_reconnect(self, bus: Bus) -> None:
        """nats-py reconnects in place, perhaps to a server that kept nothing (restarted
        without its store, a new pod): its streams are made again (kept as they are where
        they exist), or every run's events would go nowhere, unnoticed, until the gateway
        restarts."""
        if self._on_bus is None:
            return
        seen = bus.reconnects
        while True:
            seen = await bus.reconnected(seen)
            delay = _BACKOFF_START
            while True:
                try:
                    await self._on_bus(bus)
                    break
                except BusError as error:
                    log.warning("NATS streams not made again (%s); retrying in %.1fs", error, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    async def readiness(self) -> dict[str, str]:
        states: dict[str, str] = {}
        if self.database_url is not None:
            db = self.database
            states["postgres"] = "unreachable"
            if db is not None:
                with trio.move_on_after(_PROBE_SECONDS):
                    try:
                        await db.ping()
                        states["postgres"] = "ok"
                    except DatabaseError as error:
                        # The detail (hosts, ports) is for the log, not for a public probe.
                        log.warning("readiness: PostgreSQL unreachable: %s", error)
        if self.nats_url is not None:
            bus = self.bus
            states["nats"] = "unreachable"
            if bus is not None:
                with trio.move_on_after(_PROBE_SECONDS):
                    try:
                        await bus.ping()
                        states["nats"] = "ok"
                    except BusError as error:
                        log.warning("readiness: NATS unreachable: %s", error)
        return states
