"""Medians over rounds, differences to direct within each round, and the markdown tables."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from .load import percentile
from .scenarios import SCENARIOS, Measure, Scenario, StormRun

__all__ = ["Results", "Targets", "dump", "load", "markdown"]

DIRECT = "direct"
GATEWAY = "gateway"
GATEWAY_W2 = "gateway w2"
LITELLM = "litellm"

# What the issue quotes for LiteLLM on these machines, used when it was not run alongside.
QUOTED_LITELLM_RPS = 35.0
QUOTED_LITELLM_CHUNKS = 580.0

Round = dict[tuple[str, str], Measure]
"""(scenario key, target name) -> what one round measured."""


@dataclass(slots=True)
class Results:
    scenarios: list[Scenario]
    targets: list[str]
    rounds: list[Round]
    storms: dict[str, StormRun]


@dataclass(frozen=True, slots=True)
class Targets:
    """The issue's targets, as numbers."""

    factor_over_litellm: float = 10.0
    added_p50_ms: float = 3.0
    cancel_p99_ms: float = 50.0
    rss_growth: float = 0.05


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else float("nan")


def median_measure(results: Results, scenario: str, target: str) -> Measure | None:
    measures = [r[(scenario, target)] for r in results.rounds if (scenario, target) in r]
    if not measures:
        return None
    return Measure(
        **{f.name: _median([getattr(m, f.name) for m in measures]) for f in fields(Measure)}
    )


def added(results: Results, scenario: str, target: str, value: Callable[[Measure], float]) -> float:
    """Median over rounds of (target - direct), each difference taken within one round."""
    diffs = [
        value(r[(scenario, target)]) - value(r[(scenario, DIRECT)])
        for r in results.rounds
        if (scenario, target) in r and (scenario, DIRECT) in r
    ]
    return _median(diffs)


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is zero or either is NaN (a starved run must not end the report)."""
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def _f(value: float, digits: int = 1) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _signed(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:+,.{digits}f}"


def _request_table(results: Results) -> list[str]:
    lines = [
        "| scenario | target | req/s | p50 ms | p99 ms | added p50 | added p99 "
        "| server CPU | CPU ms/req | client CPU | other CPU | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario in results.scenarios:
        if scenario.stream:
            continue
        for target in results.targets:
            m = median_measure(results, scenario.key, target)
            if m is None:
                continue
            is_direct = target == DIRECT
            add50 = "" if is_direct else _signed(added(results, scenario.key, target, _p50), 2)
            add99 = "" if is_direct else _signed(added(results, scenario.key, target, _p99), 2)
            per_req = ratio(m.server_cpu, m.rps) * 1000
            lines.append(
                f"| {scenario.title} | {target} | {_f(m.rps, 0)} | {_f(m.p50_ms, 2)} "
                f"| {_f(m.p99_ms, 2)} | {add50} | {add99} | {m.server_cpu:.0%} "
                f"| {_f(per_req, 2)} | {m.client_cpu:.0%} | {m.other_cpu:.0%} | {m.errors:.0f} |"
            )
    return lines


def _stream_table(results: Results) -> list[str]:
    lines = [
        "| scenario | target | chunks/s | TTFT p50 ms | TTFT p99 ms | added TTFT p50 "
        "| added TTFT p99 | streams/s | server CPU | CPU µs/chunk | client CPU | other CPU "
        "| errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scenario in results.scenarios:
        if not scenario.stream:
            continue
        for target in results.targets:
            m = median_measure(results, scenario.key, target)
            if m is None:
                continue
            is_direct = target == DIRECT
            add50 = "" if is_direct else _signed(added(results, scenario.key, target, _p50), 2)
            add99 = "" if is_direct else _signed(added(results, scenario.key, target, _p99), 2)
            per_chunk = ratio(m.server_cpu, m.chunks_per_s) * 1e6
            lines.append(
                f"| {scenario.title} | {target} | {_f(m.chunks_per_s, 0)} | {_f(m.p50_ms, 2)} "
                f"| {_f(m.p99_ms, 2)} | {add50} | {add99} | {_f(m.rps, 1)} "
                f"| {m.server_cpu:.0%} | {_f(per_chunk, 0)} | {m.client_cpu:.0%} "
                f"| {m.other_cpu:.0%} | {m.errors:.0f} |"
            )
    return lines


def _storm_table(results: Results) -> list[str]:
    lines = [
        "| target | storms x streams | flowing at drop | upstream cancelled | ≤ 50 ms "
        "| delay p50 / p99 / max ms | ran to the end | RSS MiB before → after 1st → after last "
        "| fds before → after last | closing took ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in results.targets:
        run = results.storms.get(target)
        if run is None:
            continue
        delays = [d * 1000 for d in run.delays]
        mib = [r / 2**20 for r in run.rss]
        rss = (
            f"{mib[0]:.1f} → {mib[1]:.1f} → {mib[-1]:.1f} ({_growth(run):+.1%})"
            if len(mib) > 1
            else "-"
        )
        fds = f"{run.fds[0]} → {run.fds[-1]}" if len(run.fds) > 1 else "-"
        lines.append(
            f"| {target} | {run.storms} x {run.streams} | {run.opened} | {run.cancelled} "
            f"| {run.within(0.05)} | {_f(percentile(delays, 50))} / {_f(percentile(delays, 99))}"
            f" / {_f(max(delays) if delays else float('nan'))} | {run.completed} | {rss} "
            f"| {fds} | {run.drop_seconds * 1000:.1f} |"
        )
    return lines


def _growth(run: StormRun) -> float:
    return ratio(run.rss[-1] - run.rss[0], run.rss[0]) if run.rss else float("nan")


def _peak(results: Results, target: str, stream: bool, value: Callable[[Measure], float]) -> float:
    best = float("nan")
    for scenario in results.scenarios:
        if scenario.stream != stream:
            continue
        m = median_measure(results, scenario.key, target)
        if m is not None and not math.isnan(value(m)):
            best = value(m) if math.isnan(best) else max(best, value(m))
    return best


def _targets_table(results: Results, goals: Targets) -> list[str]:
    def rps(m: Measure) -> float:
        return m.rps

    have_peer = LITELLM in results.targets
    source = "same run" if have_peer else "quoted in the issue"
    peer_rps = _peak(results, LITELLM, False, rps) if have_peer else QUOTED_LITELLM_RPS
    gw_rps = _peak(results, GATEWAY, False, rps)
    add50 = added(results, "rr-c1", GATEWAY, _p50)
    factor = goals.factor_over_litellm
    lines = [
        "| target | measured | met? |",
        "|---|---|---|",
        _row(
            f"peak req/s on one core >= {factor:.0f}x LiteLLM's ({source}: {_f(peer_rps, 0)})",
            f"{_f(gw_rps, 0)} req/s = {_f(ratio(gw_rps, peer_rps))}x"
            + _per_cpu(results, False, rps, have_peer),
            gw_rps >= factor * peer_rps,
        ),
    ]
    # Paced streams send one frame per upstream read, the relay's hard case; unpaced ones
    # let a relay coalesce frames. Each is compared with LiteLLM in the same scenario.
    for key, label in (("paced-256", "paced x256"), ("burst-256", "unpaced x256")):
        gw = median_measure(results, key, GATEWAY)
        peer = median_measure(results, key, LITELLM) if have_peer else None
        peer_chunks = peer.chunks_per_s if peer is not None else QUOTED_LITELLM_CHUNKS
        if gw is None:
            continue
        lines.append(
            _row(
                f"chunks/s on one core, {label}, >= {factor:.0f}x LiteLLM's "
                f"({source if peer is not None else 'quoted in the issue'}: "
                f"{_f(peer_chunks, 0)})",
                f"{_f(gw.chunks_per_s, 0)} chunks/s = "
                + (
                    f"{_f(ratio(gw.chunks_per_s, peer_chunks))}x"
                    if peer_chunks
                    else "LiteLLM relayed none in the window"
                )
                + _per_cpu(results, True, _chunks, have_peer, key),
                gw.chunks_per_s >= factor * peer_chunks,
            )
        )
    lines.append(
        _row(
            f"added p50 at c=1 < {goals.added_p50_ms:g} ms",
            f"{_signed(add50, 2)} ms",
            add50 < goals.added_p50_ms,
        )
    )
    storm = results.storms.get(GATEWAY)
    if storm is not None and storm.delays:
        p99 = percentile(storm.delays, 99) * 1000
        all_cancelled = storm.cancelled >= storm.storms * storm.streams and storm.completed == 0
        lines.append(
            _row(
                f"100 % of upstreams cancelled, p99 ≤ {goals.cancel_p99_ms:g} ms "
                f"(storms of {storm.streams})",
                f"{storm.cancelled}/{storm.storms * storm.streams} cancelled, p99 {p99:.1f} ms",
                all_cancelled and p99 <= goals.cancel_p99_ms,
            )
        )
        growth = _growth(storm)
        lines.append(
            _row(
                f"RSS growth < {goals.rss_growth:.0%} across {storm.storms} storms",
                f"{growth:+.1%}",
                growth < goals.rss_growth,
            )
        )
    if GATEWAY_W2 in results.targets:
        w1 = median_measure(results, "rr-c64", GATEWAY)
        w2 = median_measure(results, "rr-c64", GATEWAY_W2)
        w1c = _peak(results, GATEWAY, True, _chunks)
        w2c = _peak(results, GATEWAY_W2, True, _chunks)
        if w1 is not None and w2 is not None:
            lines.append(
                f"| `--workers 2` scales across cores | req/s at c=64 "
                f"x{_f(ratio(w2.rps, w1.rps), 2)}, peak chunks/s x{_f(ratio(w2c, w1c), 2)} "
                "(the load shares the second core) | see ratio |"
            )
    return lines


def _per_cpu(
    results: Results,
    stream: bool,
    value: Callable[[Measure], float],
    have_peer: bool,
    scenario: str | None = None,
) -> str:
    """The same figure per CPU-second the proxy used: what one whole core would give, which
    holds up better than the raw rate when other work shares the proxy's core."""

    def per_cpu(m: Measure) -> float:
        return ratio(value(m), m.server_cpu)

    def best(target: str) -> float:
        if scenario is None:
            return _peak(results, target, stream, per_cpu)
        m = median_measure(results, scenario, target)
        return per_cpu(m) if m is not None else float("nan")

    gw = best(GATEWAY)
    if not have_peer:
        return f" (per CPU-second of the gateway: {_f(gw, 0)})"
    peer = best(LITELLM)
    return f" (per CPU-second: {_f(gw, 0)} vs {_f(peer, 0)} = {_f(ratio(gw, peer))}x)"


def _row(goal: str, measured: str, met: bool) -> str:
    return f"| {goal} | {measured} | {'yes' if met else '**no**'} |"


def _chunks(m: Measure) -> float:
    return m.chunks_per_s


def _p50(m: Measure) -> float:
    return m.p50_ms


def _p99(m: Measure) -> float:
    return m.p99_ms


def _ceiling(results: Results) -> list[str]:
    """The load generator's own limit, estimated from the direct runs."""
    out = []
    for scenario in results.scenarios:
        m = median_measure(results, scenario.key, DIRECT)
        if m is None or not m.client_cpu:
            continue
        if scenario.stream:
            out.append(
                f"{scenario.title}: {_f(m.chunks_per_s, 0)} chunks/s direct with the load "
                f"generator at {m.client_cpu:.0%} of a core (≈ "
                f"{_f(ratio(m.chunks_per_s, m.client_cpu), 0)} chunks/s alone)"
            )
        else:
            out.append(
                f"{scenario.title}: {_f(m.rps, 0)} req/s direct with the load generator at "
                f"{m.client_cpu:.0%} of a core (≈ {_f(ratio(m.rps, m.client_cpu), 0)} req/s alone)"
            )
    return out


def markdown(results: Results, header: list[str], goals: Targets | None = None) -> str:
    goals = goals or Targets()
    parts = [
        *header,
        "",
        f"Medians of {len(results.rounds)} rounds; *added* = target - direct, taken within each "
        "round, then the median. Latency for non-streaming requests is the whole response; for "
        "streams it is time to first chunk (TTFT). CPU columns are shares of one core: *server* "
        "is the target (all its processes), *client* the load generator, *other* everything "
        "else on the machine during the window (other people's work: a row with much of it "
        "is skewed).",
        "",
        "**Requests (instant fake, non-streaming)**",
        "",
        *_request_table(results),
        "",
        "**Streams** (paced: 64 chunks 20 ms apart; unpaced: 256 chunks as fast as the fake "
        "writes)",
        "",
        *_stream_table(results),
    ]
    if results.storms:
        parts += [
            "",
            "**Disconnect storms** (12 s streams of 600 chunks 20 ms apart, all dropped at once "
            "0.3 s after the last one started flowing; delay = the load generator starts "
            "closing its sockets → the fake sees its upstream connection close)",
            "",
            *_storm_table(results),
        ]
    parts += ["", "**Targets from the issue**", "", *_targets_table(results, goals)]
    ceiling = _ceiling(results)
    if ceiling:
        parts += ["", "**Load generator ceiling** (direct runs; the fake shares its core):", ""]
        parts += [f"- {line}" for line in ceiling]
    return "\n".join(parts) + "\n"


def dump(results: Results, header: list[str]) -> str:
    """Every measure of a run as JSON (``load`` turns it back into a report)."""
    return json.dumps(
        {
            "header": header,
            "scenarios": [s.key for s in results.scenarios],
            "targets": results.targets,
            "rounds": [
                [
                    {"scenario": scenario, "target": target, **dataclasses.asdict(measure)}
                    for (scenario, target), measure in round_.items()
                ]
                for round_ in results.rounds
            ],
            "storms": {name: dataclasses.asdict(run) for name, run in results.storms.items()},
        },
        indent=1,
    )


def load(text: str) -> tuple[Results, list[str]]:
    data = json.loads(text)
    by_key = {s.key: s for s in SCENARIOS}
    measure_fields = {f.name for f in dataclasses.fields(Measure)}
    rounds: list[Round] = []
    for entries in data["rounds"]:
        round_: Round = {}
        for entry in entries:
            values = {k: v for k, v in entry.items() if k in measure_fields}
            round_[(entry["scenario"], entry["target"])] = Measure(**values)
        rounds.append(round_)
    storms = {name: StormRun(**run) for name, run in data["storms"].items()}
    scenarios = [by_key[key] for key in data["scenarios"]]
    return Results(scenarios, data["targets"], rounds, storms), data["header"]
