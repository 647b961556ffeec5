"""The workflow route end to end: gateway, NATS JetStream, a worker, PostgreSQL, fake backends,
official SDKs — all real, in one process (the worker is the same code `llm-proxy worker` runs)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import trio

from proxy.config import PipelineConfig, Timeouts
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend, running_gateway
from tests.workflow_support import (
    bus_events,
    fanout,
    pipeline_name,
    run_row,
    running_worker,
    worker_settings,
    workflow,
)

pytest_plugins = ["tests.infra_servers"]

MESSAGES: Any = [{"role": "user", "content": "Name a colour"}]


@dataclass
class Stack:
    alpha: OpenAIBackend
    beta: OpenAIBackend
    url: str
    db: str
    nats: str
    pipeline: str
    client: openai.AsyncOpenAI


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    alpha = OpenAIBackend(default=Script(tokens=["Red", " is", " warm", "."], usage=Usage(5, 4)))
    beta = OpenAIBackend(default=Script(tokens=["Blue"], usage=Usage(5, 1), header_delay=0.3))
    name = pipeline_name()
    settings = workflow({name: fanout(models=["alpha-1", "beta-1"])})
    async with alpha.serve() as a, beta.serve() as b:
        backends = [backend("alpha", a.url, prefixes=("alpha-",)), backend("beta", b.url, prefixes=("beta-",))]
        worker = worker_settings(backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings)
        async with running_gateway(*backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings) as url:
            async with running_worker(worker):
                client = openai.AsyncOpenAI(
                    base_url=f"{url}/v1", api_key="unused", max_retries=0,
                    default_headers={"x-pipeline": name},
                )
                yield Stack(alpha, beta, url, pg_database_url, nats_url, name, client)
                await client.close()


async def test_fanout_streams_the_first_finisher_through_the_openai_sdk(stack: Stack) -> None:
    with trio.fail_after(10):
        stream = await stack.client.chat.completions.with_raw_response.create(
            model="colours", messages=MESSAGES, stream=True
        )
        trace_id = stream.headers["x-trace-id"]
        assert stream.headers["x-pipeline"] == stack.pipeline
        chunks = [chunk async for chunk in stream.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Red is warm."
    assert {c.choices[0].index for c in chunks if c.choices} == {0}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len({c.id for c in chunks}) == 1

    row = await run_row(stack.db, trace_id, status="completed")
    assert (row["winner"], row["content"], row["finish_reason"], row["attempts"]) == ("alpha-1", "Red is warm.", "stop", 1)
    tasks = {t["task"]: t for t in row["data"]["tasks"]}
    assert tasks["A"]["status"] == "completed"
    assert tasks["B"]["status"] == "cancelled"  # `first` in the winner view: nobody reads the loser

    events = await bus_events(stack.nats, trace_id)
    assert [e["type"] for e in events][:2] == ["role", "tasks"]
    assert "".join(e["text"] for e in events if e["type"] == "token" and e["task"] == "A") == "Red is warm."
    assert [e for e in events if e["type"] == "winner"] == [
        {"seq": events[-2]["seq"] - 1 if events[-2]["type"] == "usage" else events[-2]["seq"],
         "type": "winner", "task": "A", "model": "alpha-1"}
    ]
    assert events[-1]["type"] == "finished" and events[-1]["winner"] == "alpha-1"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
