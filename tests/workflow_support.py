"""Shared pieces of the workflow tests: settings, an in-process worker, bus and row readers."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import psycopg
import trio

from proxy.config import BackendConfig, PipelineConfig, Settings, WorkflowSettings
from proxy.infra.nats import open_bus
from proxy.workflow.worker import Worker, WorkerOptions
from tests.test_auth_helpers import eventually

FANOUT = "proxy.workflow.fanout:fanout"


def pipeline_name(prefix: str = "fan") -> str:
    """A pipeline of the test's own: the NATS server (its consumers, worker keys) is shared
    by the whole session."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def workflow(pipelines: dict[str, PipelineConfig], **fields: Any) -> WorkflowSettings:
    values: dict[str, Any] = {"silence_seconds": 5.0, "ack_wait_seconds": 2.0, **fields}
    return WorkflowSettings(pipelines=pipelines, **values)


def fanout(**options: Any) -> PipelineConfig:
    return PipelineConfig(FANOUT, options)


def worker_settings(
    backends: Iterable[BackendConfig], *, database_url: str | None, nats_url: str, workflow: WorkflowSettings
) -> Settings:
    return replace(
        Settings(), backends=tuple(backends), database_url=database_url, nats_url=nats_url,
        workflow=workflow, embedded=False, access_log=False,
    )


@asynccontextmanager
async def running_worker(settings: Settings, **options: Any) -> AsyncIterator[Worker]:
    """An in-process `llm-proxy worker` (inside the test's trio-asyncio loop)."""
    worker = Worker(settings, WorkerOptions(**options))
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: worker.run(shutdown=shutdown, task_status=task_status))
        try:
            yield worker
        finally:
            shutdown.set()


def rows(db: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


async def run_row(db: str, trace_id: str, *, status: str | None = None, within: float = 10.0) -> dict[str, Any]:
    """The trace's `workflow_runs` row, once it exists (and has `status`)."""
    columns = ("status", "attempts", "winner", "finish_reason", "content", "data", "error", "pipeline", "req_id")
    with trio.fail_after(within):
        while True:
            found = await trio.to_thread.run_sync(
                rows, db, f"SELECT {', '.join(columns)} FROM workflow_runs WHERE trace_id = %s", trace_id
            )
            if found and (status is None or found[0][0] == status):
                return dict(zip(columns, found[0], strict=True))
            await trio.sleep(0.05)


async def bus_events(nats_url: str, trace_id: str, within: float = 5.0) -> list[dict[str, Any]]:
    """Every event stored for the trace, up to its `finished`."""
    received: list[dict[str, Any]] = []
    async with open_bus(nats_url) as bus, bus.subscribe(f"evt.chat.{trace_id}", from_start=True) as messages:
        with trio.fail_after(within):
            async for message in messages:
                received.append(json.loads(message.data))
                if received[-1]["type"] == "finished":
                    break
    return received


async def key_charged(db: str, key: str, within: float = 10.0) -> tuple[int, int]:
    """The key's usage (prompt + completion) and its budget's count, once it has some."""
    [(key_id,)] = await trio.to_thread.run_sync(rows, db, "SELECT id FROM api_keys WHERE prefix = %s", key[:16])

    async def written() -> tuple[int, int] | None:
        found = await trio.to_thread.run_sync(
            rows, db, "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0), coalesce(sum(requests), 0)"
            " FROM api_key_usage WHERE key_id = %s", key_id,
        )
        [(budget,)] = await trio.to_thread.run_sync(
            rows, db, "SELECT budget_used FROM api_key_limits WHERE key_id = %s", key_id
        )
        return (int(found[0][0]), int(budget)) if found[0][0] else None

    return await eventually(written, within=within)


def config_toml(backends: Iterable[BackendConfig], workflow: WorkflowSettings) -> str:
    """The TOML a worker process reads for these settings."""
    lines = ["[workflow]"]
    for key in ("launch", "silence_seconds", "ack_wait_seconds", "max_deliver", "concurrency", "job_timeout_seconds"):
        lines.append(f"{key} = {json.dumps(getattr(workflow, key))}")
    for name, pipeline in workflow.pipelines.items():
        lines.append(f'[workflow.pipelines."{name}"]')
        if pipeline.function:
            lines.append(f"function = {json.dumps(pipeline.function)}")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in pipeline.options.items())
    for config in backends:
        lines += [
            "[[backends]]", f"name = {json.dumps(config.name)}", f"kind = {json.dumps(config.kind)}",
            f"base_url = {json.dumps(config.base_url)}", f"prefixes = {json.dumps(list(config.prefixes))}",
            f"default = {json.dumps(config.default)}",
        ]
    return "\n".join(lines) + "\n"
