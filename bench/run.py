"""The gateway's benchmark: one command, markdown tables on stdout.

    .venv/bin/python -m bench.run [--rounds 3] [--storms 5] [--peer litellm]

Starts the fake OpenAI backend (core 1), the gateway with one worker (core 0), the gateway
with ``--workers 2`` (unpinned), optionally LiteLLM's proxy (core 0), and runs every scenario
against each of them and against the fake directly, from this process pinned to core 1.
Progress goes to stderr; the tables (paste them into docs/benchmarks.md) to stdout.
Everything it starts is stopped when it ends, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import trio

from .load import Endpoint
from .procs import Family, Processes, free_port
from .report import DIRECT, GATEWAY, GATEWAY_W2, LITELLM, Results, Round, dump, load, markdown
from .scenarios import (
    FAKE_SCRIPTS,
    SCENARIOS,
    Scenario,
    Target,
    run_scenario,
    run_storms,
    wait_fake_idle,
    wait_quiet,
)

REPO = Path(__file__).resolve().parent.parent
PEER_VENV = REPO / "bench" / ".peer-venv"
HOST = "127.0.0.1"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--storms", type=int, default=5, help="disconnect storms per target")
    parser.add_argument("--storm-streams", type=int, default=100)
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated scenario keys: " + ", ".join(s.key for s in SCENARIOS),
    )
    parser.add_argument("--no-w2", action="store_true", help="skip the --workers 2 gateway")
    parser.add_argument(
        "--peer",
        choices=["litellm"],
        default=None,
        help=f"also run LiteLLM's proxy (installed in {PEER_VENV.relative_to(REPO)})",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="the gateway's upstream pool size (must cover 256 streams)",
    )
    parser.add_argument(
        "--persistence",
        choices=["embedded", "off"],
        default="embedded",
        help="embedded: the gateway's default (its own PostgreSQL and NATS, on its core); "
        "off: `embedded = false`, no database or bus (the bare relay)",
    )
    parser.add_argument(
        "--keys",
        choices=["none", "plain", "limited"],
        default="none",
        help="none: no API key (the default); plain: one key with no limits, created with "
        "`llm-proxy keys create` in each gateway's database and sent as `Authorization: Bearer`; "
        "limited: the same with rpm, tpm and a budget too high ever to refuse (every request "
        "then makes its admission call to PostgreSQL). Needs persistence",
    )
    parser.add_argument(
        "--commit",
        default=None,
        help="run the gateway as committed at this revision (a `git archive` export), not "
        "the working tree, which others may be editing",
    )
    parser.add_argument(
        "--raw",
        type=Path,
        default=None,
        help="where to save every measure as JSON (default: bench/results/<time>.json)",
    )
    parser.add_argument(
        "--report", type=Path, default=None, help="print the tables of a saved run; run nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.keys != "none" and args.persistence == "off":
        raise SystemExit("--keys needs the gateway's database: drop --persistence off")
    if args.report is not None:
        print(markdown(*load(args.report.read_text())))
        return 0
    scenarios = _pick(args.only)
    # Ctrl-C, SIGTERM and SIGHUP all unwind through the `with` blocks that stop the children
    # (inside trio.run, `_until_signal` turns the latter two into KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    cpus = sorted(os.sched_getaffinity(0))
    pinned = len(cpus) >= 2
    server_core, load_core = (str(cpus[0]), str(cpus[1])) if pinned else (None, None)
    both = ",".join(map(str, cpus)) if pinned else None
    if pinned:
        os.sched_setaffinity(0, {cpus[1]})
    else:
        print("fewer than 2 CPUs: nothing is pinned", file=sys.stderr)
    load_before = os.getloadavg()

    with (
        tempfile.TemporaryDirectory(prefix="llm-proxy-bench-") as tmp,
        Processes(Path(tmp), REPO) as procs,
    ):
        fake_url, targets = _start(procs, Path(tmp), args, server_core, load_core, both)
        results = Results(scenarios, [t.name for t in targets], [], {})
        try:
            trio.run(_until_signal, results, targets, args, fake_url)
        except BaseException:
            # What was measured before a failure (or Ctrl-C) is kept: a run takes minutes.
            if results.rounds:
                header = _header(argv, pinned, server_core, load_core, load_before, args)
                _save(results, header, args.raw, suffix="-partial")
            raise

    header = _header(argv, pinned, server_core, load_core, load_before, args)
    # Saved before anything can go wrong in the report.
    _save(results, header, args.raw)
    print(markdown(results, header))
    return 0


def _save(results: Results, header: list[str], raw: Path | None, *, suffix: str = "") -> None:
    path = raw or REPO / "bench" / "results" / time.strftime(f"%Y%m%dT%H%M%S{suffix}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump(results, header))
    print(f"every measure saved in {path}", file=sys.stderr)


def _start(
    procs: Processes,
    work: Path,
    args: argparse.Namespace,
    server_core: str | None,
    load_core: str | None,
    both: str | None,
) -> tuple[str, list[Target]]:
    """Start the fake, the gateways and the peer; returns the fake's URL and the targets."""
    python = str(REPO / ".venv" / "bin" / "python")
    source = _export(args.commit, work) if args.commit else REPO
    fake = procs.start(
        "fake",
        [
            python,
            "-m",
            "bench.fake",
            "--host",
            HOST,
            "--port",
            "0",
            "--scripts",
            json.dumps(FAKE_SCRIPTS),
        ],
        cpus=load_core,
    )
    fake_url = procs.wait_line(fake, "READY ")
    targets = [_target(DIRECT, int(fake_url.rsplit(":", 1)[1]), Family(fake.pid))]

    gateways = [(GATEWAY, 1, server_core)] + ([] if args.no_w2 else [(GATEWAY_W2, 2, both)])
    for name, workers, cores in gateways:
        slug = name.replace(" ", "-")
        # Each gateway gets its own data directory, so its embedded servers (started on
        # its core, as its children or daemons) are told apart by their command lines.
        data_dir = work / f"{slug}-data"
        config = work / f"{slug}.toml"
        config.write_text(_gateway_config(fake_url, args, data_dir))
        port = free_port()
        proc = procs.start(
            slug,
            [
                python,
                "-m",
                "proxy",
                "serve",
                "--config",
                str(config),
                "--bind",
                f"{HOST}:{port}",
                "--workers",
                str(workers),
            ],
            cpus=cores,
            env={"LLM_PROXY_LOG_LEVEL": "warning", "PYTHONPATH": str(source)},
            cwd=source,
        )
        procs.wait_http(proc, f"http://{HOST}:{port}/health", timeout=120)
        key = _create_key(python, source, config, port, args.keys) if args.keys != "none" else None
        targets.append(_target(name, port, Family(proc.pid, f"{data_dir}/"), key))

    if args.peer == "litellm":
        litellm = PEER_VENV / "bin" / "litellm"
        if not litellm.exists():
            raise SystemExit(
                f"LiteLLM is not installed: python3 -m venv {PEER_VENV} && "
                f"{PEER_VENV}/bin/pip install 'litellm[proxy]'"
            )
        config = work / "litellm.yaml"
        config.write_text(_litellm_config(fake_url))
        port = free_port()
        proc = procs.start(
            "litellm",
            [
                str(litellm),
                "--config",
                str(config),
                "--host",
                HOST,
                "--port",
                str(port),
                "--num_workers",
                "1",
            ],
            cpus=server_core,
            env={
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_LOG": "ERROR",
                "LITELLM_MODE": "PRODUCTION",
            },
        )
        procs.wait_http(proc, f"http://{HOST}:{port}/health/liveliness", timeout=120)
        targets.append(_target(LITELLM, port, Family(proc.pid)))
    return fake_url, targets


def _export(commit: str, work: Path) -> Path:
    """The gateway's source at ``commit``, exported into ``work`` (git state untouched)."""
    target = work / "source"
    target.mkdir()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit, "proxy"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def _pick(only: str | None) -> list[Scenario]:
    if not only:
        return SCENARIOS
    keys = set(only.split(","))
    unknown = keys - {s.key for s in SCENARIOS}
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return [s for s in SCENARIOS if s.key in keys]


def _target(name: str, port: int, family: Family, key: str | None = None) -> Target:
    return Target(name, Endpoint(HOST, port, key=key), family)


# Limits no run can reach (rpm and tpm are 32-bit in the database): every request is admitted,
# but each one makes its admission call and reserves its tokens, as under real limits.
_NEVER_REFUSING = ["--rpm", "1000000000", "--tpm", "2000000000", "--budget", str(10**15)]


def _create_key(python: str, source: Path, config: Path, port: int, kind: str) -> str:
    """A key made with the CLI in the running gateway's own database; returned once the
    gateway asks for it (it loads keys on PostgreSQL's notification)."""
    limits = _NEVER_REFUSING if kind == "limited" else []
    created = subprocess.run(
        [python, "-m", "proxy", "keys", "create", "--config", str(config), "--name", f"bench-{kind}", *limits],
        env={**os.environ, "PYTHONPATH": str(source), "LLM_PROXY_LOG_LEVEL": "warning"},
        cwd=source,
        capture_output=True,
        text=True,
        check=False,
    )
    if created.returncode != 0:
        raise SystemExit(f"keys create failed: {created.stderr.strip()}")
    key = created.stdout.strip()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://{HOST}:{port}/v1/models", timeout=5).close()
        except urllib.error.HTTPError as error:
            if error.code == 401:  # keys are asked for: the gateway has loaded ours
                return key
        time.sleep(0.1)
    raise SystemExit("the gateway did not start asking for its key within 30 s")


async def _until_signal(
    results: Results, targets: list[Target], args: argparse.Namespace, fake_url: str
) -> None:
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                async for _ in signals:
                    raise KeyboardInterrupt

        nursery.start_soon(on_signal)
        await _measure(results, targets, args, fake_url)
        nursery.cancel_scope.cancel()


async def _measure(results: Results, targets: list[Target], args: argparse.Namespace, fake_url: str) -> None:
    """Every scenario against every target, round after round, then the storms, into
    `results` as they are measured."""
    for number in range(1, args.rounds + 1):
        round_: Round = {}
        results.rounds.append(round_)
        for scenario in results.scenarios:
            for target in targets:
                measure = await run_scenario(scenario, target, targets[0].family)
                round_[(scenario.key, target.name)] = measure
                # A proxy that does not cancel upstream leaves the fake generating after its
                # clients left; the next run must not pay for that.
                drain = await wait_fake_idle(fake_url, 60.0)
                quiet = await wait_quiet(target.family.cpu)
                if drain > 1.0:
                    _progress(f"  {target.name}: upstream ran on {drain:.1f} s after the run")
                if quiet > 1.0:
                    _progress(f"  {target.name}: busy {quiet:.1f} s after the run")
                _progress(
                    f"round {number} {scenario.key:<10} {target.name:<11} "
                    f"{measure.rps:8.1f} req/s  p50 {measure.p50_ms:8.2f} ms  "
                    f"p99 {measure.p99_ms:8.2f} ms  {measure.chunks_per_s:8.0f} chunks/s  "
                    f"server {measure.server_cpu:4.0%}  client {measure.client_cpu:4.0%}  "
                    f"other {measure.other_cpu:4.0%}  "
                    f"errors {measure.errors:.0f}"
                )
    if args.storms > 0:
        for target in targets:
            run = await run_storms(
                target,
                fake_url,
                storms=args.storms,
                streams=args.storm_streams,
            )
            results.storms[target.name] = run
            _progress(
                f"storms {target.name:<11} cancelled {run.cancelled}/{run.opened} "
                f"ran to end {run.completed}  max delay "
                f"{max(run.delays, default=float('nan')) * 1000:.1f} ms  "
                f"rss {[r // 2**20 for r in run.rss]} MiB  fds {run.fds}"
            )


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _gateway_config(fake_url: str, args: argparse.Namespace, data_dir: Path) -> str:
    persistence = (
        f'data_dir = "{data_dir}"\n' if args.persistence == "embedded" else "embedded = false\n"
    )
    return (
        f'log_level = "warning"\naccess_log = false\n{persistence}\n'
        f'[[backends]]\nname = "fake"\nkind = "openai"\nbase_url = "{fake_url}/v1"\n'
        f"default = true\nmax_connections = {args.max_connections}\n"
    )


def _litellm_config(fake_url: str) -> str:
    lines = ["model_list:"]
    for model in FAKE_SCRIPTS:
        lines += [
            f"  - model_name: {model}",
            "    litellm_params:",
            f"      model: openai/{model}",
            f"      api_base: {fake_url}/v1",
            "      api_key: sk-bench",
        ]
    # No key, like the gateway (which has no auth): the same work on both sides.
    lines += [
        "litellm_settings:",
        "  telemetry: false",
        "  drop_params: true",
        "general_settings:",
        "  dangerously_permit_weak_or_unset_master_key: true",
    ]
    return "\n".join(lines) + "\n"


_KEYS_NOTE = {
    "none": "",
    "plain": "; requests carry an API key with no limits (`--keys plain`)",
    "limited": "; requests carry an API key with rpm, tpm and a budget never reached (`--keys limited`): "
    "each request admitted by PostgreSQL",
}


def _header(
    argv: list[str] | None,
    pinned: bool,
    server_core: str | None,
    load_core: str | None,
    load_before: tuple[float, float, float],
    args: argparse.Namespace,
) -> list[str]:
    command = ".venv/bin/python -m bench.run " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    try:
        describe = ["git", "describe", "--always"] + ([args.commit] if args.commit else ["--dirty"])
        commit = subprocess.run(
            describe,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = "?"
    source_note = (
        f"commit `{commit}` (`git archive` export)"
        if args.commit
        else f"working tree at `{commit}`"
    )
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    pinning = (
        f"gateway (1 worker) and peer pinned to core {server_core}; fake backend and "
        f"load generator on core {load_core}; `--workers 2` unpinned"
        if pinned
        else "nothing pinned (fewer than 2 CPUs)"
    )
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_after = os.getloadavg()
    return [
        f"`{command.strip()}` — {when}, gateway source: {source_note}",
        "",
        f"Machine: {os.cpu_count()} x {model}, Linux {platform.release()}, Python "
        f"{platform.python_version()}. {pinning}. Load average before / after: "
        f"{load_before[0]:.2f} / {load_after[0]:.2f}. Gateway: upstream pool of "
        f"{args.max_connections} connections, access log off, persistence "
        f"{'on (embedded PostgreSQL + NATS, started by the gateway on its core)' if args.persistence == 'embedded' else 'off'}"
        f"{_KEYS_NOTE[args.keys]}.",
    ]


def _interrupted(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(KeyboardInterrupt)[1] is None
    return isinstance(exc, KeyboardInterrupt)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        print("interrupted: every process it started has been stopped", file=sys.stderr)
        sys.exit(130)
