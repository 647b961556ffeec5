"""The benchmark's scenarios: what the fake does for each, and how each is measured.

One fake process serves every scenario; each scenario asks for its own model name, and the
fake has a script per model (``FAKE_SCRIPTS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .load import Endpoint, LoadResult, closed_loop, percentile, storm
from .procs import Family, http_json, machine_busy

__all__ = [
    "FAKE_SCRIPTS",
    "SCENARIOS",
    "Measure",
    "Scenario",
    "StormRun",
    "Target",
    "run_scenario",
    "run_storms",
    "wait_fake_idle",
    "wait_quiet",
]

INSTANT, PACED, BURST, LONG = "bench-instant", "bench-paced", "bench-burst", "bench-long"

FAKE_SCRIPTS: dict[str, dict[str, Any]] = {
    INSTANT: {"n_tokens": 16},
    # Busbar's paced mock: 64 chunks 20 ms apart, so a stream takes ~1.3 s.
    PACED: {"n_tokens": 64, "pace": 0.02},
    # As fast as the fake can write: the relay's own ceiling.
    BURST: {"n_tokens": 256},
    # Storm streams: 12 s long, so that even a slow proxy has every stream flowing when the
    # storm breaks, and one that cancels nothing is caught with its generations still running.
    LONG: {"n_tokens": 600, "pace": 0.02},
}


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    title: str
    model: str
    stream: bool
    concurrency: int
    warmup: float
    duration: float
    stagger: float = 0.0
    """Spread the first requests over this many seconds (see ``closed_loop``)."""


SCENARIOS: list[Scenario] = [
    Scenario("rr-c1", "non-stream c=1", INSTANT, False, 1, 0.5, 2.5),
    Scenario("rr-c16", "non-stream c=16", INSTANT, False, 16, 0.5, 2.5),
    Scenario("rr-c64", "non-stream c=64", INSTANT, False, 64, 0.5, 2.5),
    # Paced streams start spread over one stream's length, as independent clients would;
    # started together they would all finish and restart together, a burst every 1.3 s.
    Scenario("paced-64", "paced stream x64", PACED, True, 64, 1.5, 3.0, stagger=1.3),
    Scenario("paced-256", "paced stream x256", PACED, True, 256, 1.5, 3.0, stagger=1.3),
    Scenario("burst-64", "unpaced stream x64", BURST, True, 64, 0.5, 2.5),
    Scenario("burst-256", "unpaced stream x256", BURST, True, 256, 1.0, 2.5),
]


@dataclass(frozen=True, slots=True)
class Target:
    """Something to load: the fake itself (``direct``), the gateway, or a peer."""

    name: str
    endpoint: Endpoint
    family: Family
    """The processes that serve it, for CPU, memory and descriptor readings."""


@dataclass(frozen=True, slots=True)
class Measure:
    """One scenario on one target in one round."""

    rps: float
    p50_ms: float
    p99_ms: float
    """Whole response (non-streaming) or time to first chunk (streaming)."""
    chunks_per_s: float
    errors: float
    """Failed requests (a float so that medians over rounds stay one type)."""
    client_cpu: float
    """Share of one core the load generator used."""
    server_cpu: float
    """Share of one core the server under test used (all its processes together)."""
    other_cpu: float
    """Share of one core used by everything else on the machine (neither the target, nor
    the fake, nor the load generator): other people's work skewing the numbers."""

    @classmethod
    def of(cls, result: LoadResult, *, direct: bool) -> Measure:
        cpu = result.clocks
        ours = cpu["server"] + result.client_cpu + (0.0 if direct else cpu["fake"])
        return cls(
            rps=result.rps,
            p50_ms=percentile(result.latencies, 50) * 1000,
            p99_ms=percentile(result.latencies, 99) * 1000,
            chunks_per_s=result.frames_per_s,
            errors=result.errors,
            client_cpu=result.client_cpu / result.seconds,
            server_cpu=cpu["server"] / result.seconds,
            other_cpu=max(0.0, cpu["machine"] - ours) / result.seconds,
        )


async def run_scenario(scenario: Scenario, target: Target, fake: Family) -> Measure:
    """One scenario against one target; ``fake`` is the fake backend's processes."""
    result = await closed_loop(
        target.endpoint,
        scenario.model,
        concurrency=scenario.concurrency,
        stream=scenario.stream,
        warmup=scenario.warmup,
        duration=scenario.duration,
        stagger=scenario.stagger,
        clocks={"server": target.family.cpu, "fake": fake.cpu, "machine": machine_busy},
    )
    return Measure.of(result, direct=target.family == fake)


@dataclass(slots=True)
class StormRun:
    """Repeated disconnect storms against one target."""

    streams: int
    storms: int = 0
    opened: int = 0
    """Streams that were flowing when their storm broke (summed over storms)."""
    cancelled: int = 0
    """Upstream generations the fake saw cancelled (summed over storms)."""
    completed: int = 0
    """Upstream generations that ran to their end although their client had left."""
    delays: list[float] = field(default_factory=list)
    """Seconds from the client's drop to the fake seeing its connection close."""
    drop_seconds: float = 0.0
    """The longest time the load generator took to close all of one storm's sockets."""
    rss: list[int] = field(default_factory=list)
    """Bytes resident before the first storm, then after each storm."""
    fds: list[int] = field(default_factory=list)

    def within(self, seconds: float) -> int:
        return sum(1 for d in self.delays if d <= seconds)


async def run_storms(
    target: Target,
    fake_url: str,
    *,
    storms: int,
    streams: int,
    hold: float = 0.3,
) -> StormRun:
    """``storms`` times: open ``streams`` long streams, drop them all at once, and see
    what the fake saw: which upstream generations were cancelled, and how late."""
    run = StormRun(streams=streams)
    # A storm's stream is 12 s long; a generation nobody cancels is let run to its end
    # (and counted as such) before the next storm, so storms never overlap.
    settle = FAKE_SCRIPTS[LONG]["n_tokens"] * FAKE_SCRIPTS[LONG]["pace"] + 5.0
    await wait_fake_idle(fake_url, settle)
    await wait_quiet(target.family.cpu)
    run.rss.append(target.family.rss())
    run.fds.append(target.family.fds())
    for _ in range(storms):
        await _fake(f"{fake_url}/_bench/reset", {})
        outcome = await storm(target.endpoint, LONG, streams=streams, hold=hold)
        await wait_fake_idle(fake_url, settle, model=LONG)
        await wait_quiet(target.family.cpu)
        stats = await _fake(f"{fake_url}/_bench/stats")
        counts = stats["models"].get(LONG, {})
        run.storms += 1
        run.opened += outcome.opened
        run.drop_seconds = max(run.drop_seconds, outcome.drop_seconds)
        run.cancelled += counts.get("cancelled", 0)
        run.completed += counts.get("completed", 0)
        run.delays.extend(
            at - outcome.dropped_at for at, model in stats["disconnects"] if model == LONG
        )
        run.rss.append(target.family.rss())
        run.fds.append(target.family.fds())
    return run


async def wait_fake_idle(fake_url: str, within: float, *, model: str | None = None) -> float:
    """Wait until the fake runs no generation (of ``model``, or at all); returns how long
    that took, or ``within`` when it gave up."""
    started = trio.current_time()
    with trio.move_on_after(within):
        while True:
            stats = await _fake(f"{fake_url}/_bench/stats")
            if model is None:
                active = stats["active"]
            else:
                active = stats["models"].get(model, {}).get("active", 0)
            if active == 0:
                break
            await trio.sleep(0.1)
    return trio.current_time() - started


async def wait_quiet(
    cpu_clock: Callable[[], float], *, within: float = 60.0, interval: float = 0.5
) -> float:
    """Wait until a process (tree) uses under 5 % of a core over ``interval``; returns how
    long that took (``within`` when it gave up). A proxy still working off a backlog after
    its clients left would otherwise slow down whatever is measured next on its core."""
    started = trio.current_time()
    with trio.move_on_after(within):
        while True:
            before = cpu_clock()
            await trio.sleep(interval)
            if cpu_clock() - before < 0.05 * interval:
                break
    return trio.current_time() - started


async def _fake(url: str, body: Any = None) -> Any:
    """The fake's admin API (urllib, in a thread: it is a handful of calls)."""
    return await trio.to_thread.run_sync(http_json, url, body)
