"""Responses behind a load balancer: two gateway instances sharing one PostgreSQL and one
NATS, each call of the official `openai` SDK landing on either of them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import openai
import pytest
import trio

from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import eventually, gateway
from tests.test_persistence import wait_for_row

pytest_plugins = ["tests.infra_servers"]

TOKENS = [f" w{i}" for i in range(40)]


@dataclass
class Pair:
    db: str
    fake: OpenAIBackend
    first: openai.AsyncOpenAI
    second: openai.AsyncOpenAI


@pytest.fixture
async def pair(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Pair]:
    # An answer that takes the backend 4 s: long enough to reach it from the other instance.
    fake = OpenAIBackend(default=Script(tokens=TOKENS, usage=Usage(6, 40), pace=0.1))
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True)
    ) as first, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as second:
        clients = [openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) for url in (first, second)]
        yield Pair(pg_database_url, fake, *clients)
        for client in clients:
            await client.close()


async def _backend_done(fake: OpenAIBackend) -> bool:
    return bool(fake.recorder.generations) and all(g.outcome != "running" for g in fake.recorder.generations)


async def test_a_background_response_is_cancelled_through_the_instance_not_running_it(pair: Pair) -> None:
    created = await pair.first.responses.create(model="m", input="Count", background=True)
    await pair.fake.wait_requests(1, 10)
    await trio.sleep(0.5)  # it has said something by now
    with trio.fail_after(10):
        cancelled = await pair.second.responses.cancel(created.id)
    assert (cancelled.id, cancelled.status) == (created.id, "cancelled")
    # Its backend stopped well before the answer's 4 s; what it said is kept.
    await eventually(lambda: _backend_done(pair.fake), within=5)
    assert [g.outcome for g in pair.fake.recorder.generations] == ["cancelled"]
    assert cancelled.output_text.startswith(TOKENS[0]) and cancelled.output_text != "".join(TOKENS)
    await wait_for_row(pair.db, created.id.removeprefix("resp_"), "cancelled")
    for client in (pair.first, pair.second):
        assert (await client.responses.retrieve(created.id)).status == "cancelled"
    # Cancelled again, on either: as it stands.
    assert (await pair.second.responses.cancel(created.id)).status == "cancelled"


async def test_a_background_stream_is_found_and_cancelled_on_the_other_instance_right_after_its_creation(
    pair: Pair,
) -> None:
    stream = await pair.first.responses.create(model="m", input="Count", background=True, stream=True)
    created = await stream.__anext__()
    assert created.type == "response.created"
    response_id = created.response.id
    # At once, through the other instance: the response its client was just told of.
    polled = await pair.second.responses.retrieve(response_id)
    assert (polled.id, polled.status) == (response_id, "in_progress")
    with trio.fail_after(10):
        assert (await pair.second.responses.cancel(response_id)).status == "cancelled"
    rest = [event async for event in stream]
    assert (rest[-1].type, rest[-1].response.status) == ("response.incomplete", "cancelled")
    assert [g.outcome for g in pair.fake.recorder.generations] == ["cancelled"]
