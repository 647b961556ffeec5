"""Workflow workers as real processes: killed mid-job, stopped with SIGTERM, and started per
job by a (stand-in) `systemctl` as the shipped oneshot unit would run them."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import openai
import pytest
import trio

import proxy.gateway
from proxy.config import BackendConfig, PipelineConfig, WorkflowSettings
from proxy.infra.nats import open_bus
from proxy.services.persistence import PersistenceSettings
from proxy.workflow.bus import jobs_kv, workers_kv
from proxy.workflow.job import ATTEMPT_SPAN, job_key
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend, running_gateway
from tests.test_auth_helpers import bearer, eventually, new_key, wait_for_key
from tests.test_budget_holds import gateway_process
from tests.test_persistence import wait_for_row
from tests.workflow_support import (
    bus_events,
    config_toml,
    fanout,
    key_charged,
    pipeline_name,
    rows,
    run_row,
    running_worker,
    worker_settings,
    workflow,
)

pytest_plugins = ["tests.infra_servers"]

ROOT = Path(__file__).resolve().parent.parent
MESSAGES: Any = [{"role": "user", "content": "Count slowly"}]
LONG = [f" w{i}" for i in range(40)]  # 40 tokens at 0.05 s: a job that takes 2 s
SHORT = [" short"]


def worker_env(db: str, nats: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": db, "NATS_URL": nats, "PYTHONPATH": str(ROOT), "LLM_PROXY_LOG_LEVEL": "info"}


@asynccontextmanager
async def spawned_worker(
    tmp_path: Path, db: str, nats: str, backends: list[BackendConfig], settings: WorkflowSettings, *extra: str
) -> AsyncIterator[tuple[trio.Process, Path]]:
    """`llm-proxy worker` in a process of its own, and its log file; killed on exit if alive."""
    config = tmp_path / f"worker-{time.monotonic_ns()}.toml"
    config.write_text(config_toml(backends, settings))
    log_path = tmp_path / f"{config.stem}.log"
    log = _log_file(log_path)
    command = [sys.executable, "-m", "proxy", "worker", "--config", str(config),
               "--pipelines", *settings.pipelines, *extra]
    process = await trio.lowlevel.open_process(command, env=worker_env(db, nats), stdout=log, stderr=log)
    try:
        yield process, log_path
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        log.close()


@asynccontextmanager
async def worker_process(
    tmp_path: Path, db: str, nats: str, backends: list[BackendConfig], settings: WorkflowSettings, *extra: str
) -> AsyncIterator[trio.Process]:
    """`llm-proxy worker` in a process of its own; yields once it serves its pipelines."""
    async with spawned_worker(tmp_path, db, nats, backends, settings, *extra) as (process, _log):
        async with open_bus(nats) as bus:
            kv = await workers_kv(bus)
            with trio.fail_after(20):
                for name in settings.pipelines:
                    while True:
                        if await kv.get(name) is not None:
                            break
                        await trio.sleep(0.05)
        yield process


@asynccontextmanager
async def two_fakes() -> AsyncIterator[tuple[OpenAIBackend, OpenAIBackend, list[BackendConfig]]]:
    alpha = OpenAIBackend(default=Script(tokens=LONG, pace=0.05))
    beta = OpenAIBackend(default=Script(tokens=SHORT, pace=0.05))
    async with alpha.serve() as a, beta.serve() as b:
        yield alpha, beta, [backend("alpha", a.url, prefixes=("alpha-",)), backend("beta", b.url, prefixes=("beta-",))]


def client(url: str, pipeline: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                              default_headers={"x-pipeline": pipeline})


async def test_a_killed_workers_job_is_redelivered_and_the_client_gets_the_whole_answer(
    aio_loop: object, tmp_path: Path, pg_database_url: str, nats_url: str
) -> None:
    name = pipeline_name()
    settings = workflow({name: fanout(models=["alpha-1", "beta-1"], rule="longest")},
                        silence_seconds=10.0, ack_wait_seconds=1.0)
    async with two_fakes() as (alpha, _beta, backends):
        async with running_gateway(*backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings) as url:
            openai_client = client(url, name)
            async with worker_process(tmp_path, pg_database_url, nats_url, backends, settings) as doomed:
                async with trio.open_nursery() as nursery:
                    result: dict[str, Any] = {}

                    async def ask() -> None:
                        response = await openai_client.chat.completions.with_raw_response.create(
                            model="m", messages=MESSAGES, stream=True
                        )
                        result["trace_id"] = response.headers["x-trace-id"]
                        chunks = [c async for c in response.parse()]
                        result["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                        result["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]

                    nursery.start_soon(ask)
                    await alpha.wait_active_streams(1)  # the worker is mid-job
                    # The other worker is up before the kill: on a loaded machine its start
                    # alone could use up much of the pipeline's 10 s silence deadline.
                    worker = worker_settings(backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings)
                    async with running_worker(worker, pipelines=[name]):
                        doomed.send_signal(signal.SIGKILL)
                        await alpha.wait_disconnect(5.0)
                        killed_at = time.monotonic()
                        with trio.fail_after(15):
                            await run_row(pg_database_url, await _trace(result), status="completed")
                            await _done(result)
            await openai_client.close()
    # Nothing of the answer had reached the client (the winner is chosen at the end), so the
    # second attempt's answer is the client's, whole.
    assert result["text"] == "".join(LONG) and result["finish"] == "stop"
    assert time.monotonic() - killed_at < 8
    row = await run_row(pg_database_url, result["trace_id"], status="completed")
    assert (row["attempts"], row["winner"]) == (2, "alpha-1")
    assert len([r for r in alpha.requests if r.model == "alpha-1"]) == 2
    events = await bus_events(nats_url, result["trace_id"])
    roles = [e["seq"] for e in events if e["type"] == "role"]
    assert len(roles) == 2 and roles[1] == ATTEMPT_SPAN + 1  # the retry has its own seqs
    assert [e["type"] for e in events].count("finished") == 1


async def test_a_killed_worker_mid_answer_leaves_a_non_streaming_client_the_retrys_whole_answer(
    aio_loop: object, tmp_path: Path, pg_database_url: str, nats_url: str
) -> None:
    name = pipeline_name()
    # `all`: the first attempt's tokens are relayed as they come, but this client waits for
    # the whole answer and has seen none of them when the worker dies.
    settings = workflow({name: fanout(models=["alpha-1"], view="all")}, silence_seconds=10.0, ack_wait_seconds=1.0)
    async with two_fakes() as (alpha, _beta, backends):
        async with running_gateway(*backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings) as url:
            openai_client = client(url, name)
            async with worker_process(tmp_path, pg_database_url, nats_url, backends, settings) as doomed:
                async with trio.open_nursery() as nursery:
                    result: dict[str, Any] = {}

                    async def ask() -> None:
                        response = await openai_client.chat.completions.with_raw_response.create(
                            model="m", messages=MESSAGES
                        )
                        result["trace_id"] = response.headers["x-trace-id"]
                        result["text"] = response.parse().choices[0].message.content

                    nursery.start_soon(ask)
                    await alpha.wait_active_streams(1)
                    await trio.sleep(0.5)  # some of the answer is on the bus
                    worker = worker_settings(backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings)
                    async with running_worker(worker, pipelines=[name]):
                        doomed.send_signal(signal.SIGKILL)
                        with trio.fail_after(15):
                            await _done(result)
                    # Its stream read back (from NATS, once the run has left this instance) is
                    # that answer too, not the dead attempt's part of one ended by an error.
                    await wait_for_row(pg_database_url, result["trace_id"], "completed")
                    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
                        events = sse_events((await http.get(f"/v1/streams/{result['trace_id']}")).text)
            await openai_client.close()
    assert result["text"] == "".join(LONG)
    row = await run_row(pg_database_url, result["trace_id"], status="completed")
    assert row["attempts"] == 2
    assert "".join(e["text"] for e in events if e["type"] == "token") == "".join(LONG)
    assert [e["type"] for e in events if e["type"] not in ("token", "usage")] == ["role", "finish", "finished"]
    assert events[-1]["status"] == "completed" and [e["seq"] for e in events] == list(range(1, len(events) + 1))


def sse_events(text: str) -> list[dict[str, Any]]:
    """The events of a `/v1/streams` reply."""
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


async def test_a_killed_worker_after_the_answer_started_is_a_clear_error(
    aio_loop: object, tmp_path: Path, pg_database_url: str, nats_url: str
) -> None:
    name = pipeline_name()
    settings = workflow({name: fanout(models=["alpha-1", "beta-1"], view="all")},
                        silence_seconds=10.0, ack_wait_seconds=1.0)
    async with two_fakes() as (_alpha, _beta, backends):
        async with running_gateway(*backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings) as url:
            openai_client = client(url, name)
            async with worker_process(tmp_path, pg_database_url, nats_url, backends, settings) as doomed:
                stream = await openai_client.chat.completions.with_raw_response.create(
                    model="m", messages=MESSAGES, stream=True
                )
                trace_id = stream.headers["x-trace-id"]
                chunks = stream.parse().__aiter__()
                seen = ""
                while len(seen) < 10:  # some of the answer is on the client's screen
                    chunk = await chunks.__anext__()
                    seen += "".join(c.delta.content or "" for c in chunk.choices)
                doomed.send_signal(signal.SIGKILL)
                worker = worker_settings(backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings)
                async with running_worker(worker, pipelines=[name]):
                    with trio.fail_after(10), pytest.raises(openai.APIError, match="stopped mid-stream"):
                        async for _ in chunks:
                            pass
                    # The gateway cancelled the retry: its client cannot use it.
                    row = await run_row(pg_database_url, trace_id, status="cancelled")
                    assert row["attempts"] == 2
            await openai_client.close()


async def test_a_job_that_kills_every_worker_fails_after_max_deliver_runs_without_a_silent_wait(
    aio_loop: object, tmp_path: Path, pg_database_url: str, nats_url: str
) -> None:
    name = pipeline_name("die")
    # The silence deadline is far longer than a redelivery (ack_wait): only a clear failure
    # can end the request before it.
    settings = workflow({name: PipelineConfig("tests.workflow_pipelines:die")},
                        silence_seconds=25.0, ack_wait_seconds=1.0, max_deliver=2)
    async with two_fakes() as (_alpha, _beta, backends):
        async with running_gateway(*backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings) as url:
            async with (
                worker_process(tmp_path, pg_database_url, nats_url, backends, settings) as first,
                worker_process(tmp_path, pg_database_url, nats_url, backends, settings) as second,
                httpx.AsyncClient(base_url=url, timeout=60) as http,
                trio.open_nursery() as nursery,
            ):
                result: dict[str, Any] = {}
                answered = trio.Event()

                async def ask() -> None:
                    response = await http.post(
                        "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, headers={"x-pipeline": name}
                    )
                    result["response"] = response
                    answered.set()

                nursery.start_soon(ask)
                with trio.fail_after(15):  # each ran the job (max_deliver = 2) and died of it
                    assert await first.wait() == -signal.SIGKILL
                    assert await second.wait() == -signal.SIGKILL
                died = time.monotonic()
                # A live worker: JetStream gives it the job once more, and it only gives up.
                worker = worker_settings(backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings)
                async with running_worker(worker, pipelines=[name]):
                    with trio.fail_after(15):
                        await answered.wait()
    response: httpx.Response = result["response"]
    assert time.monotonic() - died < 15  # not the 25 s silence deadline
    assert response.status_code == 503, response.text
    assert response.headers["x-should-retry"] == "false"  # the SDKs would send it again otherwise
    error = response.json()["error"]
    assert error["code"] == "workflow_retries_exhausted" and "2 times in a row" in error["message"]
    row = await run_row(pg_database_url, response.headers["x-trace-id"], status="failed")
    assert row["attempts"] == 3 and row["error"]["code"] == "workflow_retries_exhausted"


async def test_sigterm_hands_a_running_job_to_another_worker_at_once(
    aio_loop: object, tmp_path: Path, pg_database_url: str, nats_url: str
) -> None:
    name = pipeline_name()
    # ack_wait is long: only a nak (not a timeout) can bring the job back this fast. (The
    # silence deadline is longer still: a config with ack_wait >= silence is refused.)
    settings = workflow({name: fanout(models=["alpha-1", "beta-1"], rule="longest")},
                        silence_seconds=40.0, ack_wait_seconds=30.0)
    async with two_fakes() as (alpha, _beta, backends):
        async with running_gateway(*backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings) as url:
            openai_client = client(url, name)
            async with worker_process(tmp_path, pg_database_url, nats_url, backends, settings, "--drain-seconds", "0.2") as leaving:
                async with trio.open_nursery() as nursery:
                    result: dict[str, Any] = {}

                    async def ask() -> None:
                        reply = await openai_client.chat.completions.create(model="m", messages=MESSAGES)
                        result["text"] = reply.choices[0].message.content

                    nursery.start_soon(ask)
                    await alpha.wait_active_streams(1)
                    # The other worker is up before the SIGTERM: on a loaded machine the first
                    # one's exit and this one's start could take long.
                    worker = worker_settings(backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings)
                    async with running_worker(worker, pipelines=[name]):
                        leaving.send_signal(signal.SIGTERM)
                        with trio.fail_after(10):
                            assert await leaving.wait() == 0  # drained, handed the job back, exited cleanly
                        started = time.monotonic()
                        with trio.fail_after(10):
                            await _done(result)
                    assert time.monotonic() - started < 8
            await openai_client.close()
    assert result["text"] == "".join(LONG)


async def test_a_workflow_whose_gateway_was_killed_mid_job_is_read_back_with_its_workers_answer(
    aio_loop: object, tmp_path: Path, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway relaying a job is killed (-9); its worker goes on and stores the answer.
    The client polling its background response on another gateway got `in_progress` for
    ever (a workflow's row has no owner to be swept by); it gets the worker's answer."""
    monkeypatch.setattr(proxy.gateway, "PersistenceSettings",
                        functools.partial(PersistenceSettings, heartbeat=0.5, dead_after=2.0))
    name = pipeline_name("ponder")
    settings = workflow({name: PipelineConfig("tests.workflow_pipelines:ponder", {"wait": 4})}, silence_seconds=10.0)
    config = tmp_path / "gateway.toml"
    config.write_text(config_toml([], settings))
    fake = OpenAIBackend(default=Script(tokens=SHORT))
    async with fake.serve() as server:
        worker = worker_settings([], database_url=pg_database_url, nats_url=nats_url, workflow=settings)
        async with running_worker(worker, pipelines=[name]):
            async with gateway_process(server.url, pg_database_url, nats_url, config=config) as (doomed, process):
                async with httpx.AsyncClient(base_url=doomed, timeout=10) as http:
                    created = await http.post("/v1/responses", headers={"x-pipeline": name},
                                              json={"model": "m", "input": "Think it over", "background": True})
                assert created.status_code == 200, created.text
                response_id = created.json()["id"]
                trace_id = response_id.removeprefix("resp_")
                await run_row(pg_database_url, trace_id, status="running")  # the worker has it
                await wait_for_row(pg_database_url, trace_id, "running")  # and the gateway its row
                process.kill()
                await process.wait()
            await run_row(pg_database_url, trace_id, status="completed", within=15)
        async with running_gateway(backend("fake", server.url, default=True), database_url=pg_database_url,
                                   nats_url=nats_url, workflow=settings) as url:
            polled = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

            async def ended() -> Any:
                response = await polled.responses.retrieve(response_id)
                return response if response.status != "in_progress" else None

            response = await eventually(ended, within=15, every=0.2)
            await polled.close()
    assert response.status == "completed" and response.output_text == "Pondered."


async def test_a_workflow_whose_gateway_was_killed_mid_job_is_charged_to_its_key_once(
    aio_loop: object, tmp_path: Path, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway relaying a job that has spent its model's tokens is killed (-9); its worker
    stores the answer and the live gateways give the request's row its outcome. Its key was
    charged none of it (usage, budget): its gateway, which would have, was dead. Two gateways
    sweeping charge it once."""
    monkeypatch.setattr(proxy.gateway, "PersistenceSettings",
                        functools.partial(PersistenceSettings, heartbeat=0.5, dead_after=2.0))
    db = pg_database_url
    name = pipeline_name("ponder")
    settings = workflow({name: PipelineConfig("tests.workflow_pipelines:spend_then_ponder", {"wait": 4})},
                        silence_seconds=10.0)
    config = tmp_path / "gateway.toml"
    config.write_text(config_toml([], settings))
    key = await new_key(db, "bg", "--budget", "100000")
    fake = OpenAIBackend(default=Script(tokens=SHORT, usage=Usage(5, 1)))
    async with fake.serve() as server:
        fake_backend = backend("fake", server.url, default=True)
        worker = worker_settings([fake_backend], database_url=db, nats_url=nats_url, workflow=settings)
        async with running_worker(worker, pipelines=[name]):
            async with gateway_process(server.url, db, nats_url, config=config) as (doomed, process):
                await wait_for_key(doomed, key)
                async with httpx.AsyncClient(base_url=doomed, timeout=10, headers=bearer(key)) as http:
                    created = await http.post("/v1/responses", headers={"x-pipeline": name},
                                              json={"model": "m", "input": "Think it over", "background": True})
                assert created.status_code == 200, created.text
                trace_id = created.json()["id"].removeprefix("resp_")
                await wait_for_row(db, trace_id, "running")
                await fake.wait_requests(1, 10)  # its tokens are spent
                process.kill()
                await process.wait()
            await run_row(db, trace_id, status="completed", within=15)
        gateways = [running_gateway(fake_backend, database_url=db, nats_url=nats_url, workflow=settings) for _ in "ab"]
        async with gateways[0], gateways[1]:
            await wait_for_row(db, trace_id, "completed", within=15)
            assert await key_charged(db, key) == (6, 6)
            await trio.sleep(2.0)  # more sweeps, on both gateways
    [(requests, tokens)] = await trio.to_thread.run_sync(
        rows, db, "SELECT sum(requests), sum(prompt_tokens + completion_tokens) FROM api_key_usage"
    )
    assert (requests, tokens) == (1, 6)


# -- systemd ----------------------------------------------------------------------------------

TRACED_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACED = {"traceparent": f"00-{TRACED_ID}-00f067aa0ba902b7-01"}

STANDIN = r'''#!{python}
"""A stand-in `systemctl`: records its arguments, then runs what the unit would run."""
import json, os, shlex, subprocess, sys

record = os.environ["STANDIN_RECORD"]
with open(record, "a") as handle:
    handle.write(json.dumps(sys.argv[1:]) + "\n")
if os.environ.get("STANDIN_FAIL"):
    print("Failed to start llm-proxy-job@x.service: Access denied", file=sys.stderr)
    sys.exit(4)
args = [a for a in sys.argv[1:] if not a.startswith("--")]
assert args[0] == "start" and "--no-block" in sys.argv, sys.argv
template, _, instance = args[1].removesuffix(".service").partition("@")
unit = open(os.path.join(os.environ["STANDIN_UNITS"], template + "@.service")).read()
assert "Type=oneshot" in unit
command = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart="))
log = open(record + "." + instance + ".log", "wb")
child = subprocess.Popen(shlex.split(command.replace("%i", instance)), stdout=log, stderr=log, start_new_session=True)
with open(record + ".pids", "a") as handle:
    handle.write(f"{{child.pid}}\n")
'''


async def test_systemd_launch_mode_runs_each_job_as_the_shipped_oneshot_unit(
    aio_loop: object, tmp_path: Path, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = pipeline_name()
    settings = workflow({name: fanout(models=["alpha-1", "beta-1"])}, launch="systemd", silence_seconds=15.0)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    standin = bin_dir / "systemctl"
    standin.write_text(STANDIN.format(python=sys.executable))
    standin.chmod(0o755)
    record = tmp_path / "systemctl.jsonl"
    async with two_fakes() as (alpha, beta, backends):
        config = tmp_path / "llm-proxy.toml"
        config.write_text(config_toml(backends, settings))
        for key, value in worker_env(pg_database_url, nats_url).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}")
        monkeypatch.setenv("LLM_PROXY_CONFIG", str(config))  # what /etc/llm-proxy/worker.env sets
        monkeypatch.setenv("STANDIN_RECORD", str(record))
        monkeypatch.setenv("STANDIN_UNITS", str(ROOT / "deploy"))
        try:
            async with running_gateway(*backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings) as url:
                openai_client = client(url, name)
                with trio.fail_after(20):
                    reply = await openai_client.chat.completions.with_raw_response.create(
                        model="m", messages=MESSAGES, extra_headers=TRACED
                    )
                trace_id = reply.headers["x-trace-id"]
                assert reply.parse().choices[0].message.content == "".join(SHORT)  # first to finish
                calls = [json.loads(line) for line in record.read_text().splitlines()]
                assert calls == [["start", "--no-block", f"llm-proxy-job@{trace_id}.service"]]
                row = await run_row(pg_database_url, trace_id, status="completed")
                assert (row["attempts"], row["winner"]) == (1, "beta-1")
                with trio.fail_after(10):
                    await _exited(record)
                # The unit's process continued the client's trace (its job entry held it).
                sent = [r.headers.get("traceparent", "") for fake in (alpha, beta) for r in fake.requests if r.method == "POST"]
                assert len(sent) == 2 and all(header.startswith(f"00-{TRACED_ID}-") for header in sent), sent
                async with open_bus(nats_url) as bus:
                    assert await (await jobs_kv(bus, retention=3600)).get(job_key(trace_id)) is None

                monkeypatch.setenv("STANDIN_FAIL", "1")
                with pytest.raises(openai.APIStatusError) as failed:
                    await openai_client.chat.completions.create(model="m", messages=MESSAGES)
                assert failed.value.status_code == 503
                assert "Could not start the job unit" in failed.value.message and "Access denied" in failed.value.message
                await openai_client.close()
        finally:
            _kill_children(record)


async def _trace(result: dict[str, Any]) -> str:
    while True:
        if "trace_id" in result:
            return str(result["trace_id"])
        await trio.sleep(0.02)


async def _done(result: dict[str, Any]) -> None:
    while True:
        if "text" in result:
            return
        await trio.sleep(0.02)


async def _exited(record: Path) -> None:
    """Wait for the unit's process (started detached, like systemd's) to exit."""
    while True:
        pids = _pids(record)
        if pids and not any(map(_alive, pids)):
            return
        await trio.sleep(0.05)


def _log_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # the caller closes it


def _pids(record: Path) -> list[int]:
    pids_file = Path(f"{record}.pids")
    return [int(pid) for pid in pids_file.read_text().split()] if pids_file.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours (the stand-in exited without reaping) counts as gone.
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False


def _kill_children(record: Path) -> None:
    for pid in _pids(record):
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


async def test_sigterm_stops_a_worker_still_waiting_for_nats(tmp_path: Path) -> None:
    # It logged "finishing running jobs" and went on waiting for NATS, forever: only SIGKILL
    # could stop it (systemd's stop timeout, every time NATS was down).
    settings = workflow({pipeline_name(): fanout()})
    backends = [backend("alpha", "http://127.0.0.1:9")]
    async with spawned_worker(tmp_path, "", "nats://127.0.0.1:9", backends, settings) as (process, log):
        with trio.fail_after(20):
            while True:  # a log file, not an event: polled
                if "NATS unavailable" in log.read_text():
                    break
                await trio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            await process.wait()
        assert process.returncode == 0
