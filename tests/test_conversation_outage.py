"""A conversation's turn through a database stall, with the official `openai` SDK: the
response's items are appended once PostgreSQL answers again, not dropped while the client is
told the response completed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import trio

from proxy.infra.embedded import EmbeddedPostgres
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import gateway
from tests.test_limits_outage import stalled

pytest_plugins = ["tests.infra_servers"]

# Long enough for a lookup made as the stall starts to be given up (3 s) before the answer ends.
SLOW = Script(tokens=[f"w{i} " for i in range(45)], pace=0.1, usage=Usage(5, 45))


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A server of our own: pausing the session's shared one would stall other tests."""
    with EmbeddedPostgres(tmp_path / "pgdata") as started:
        yield started


async def test_a_turn_ending_while_the_database_stalls_is_kept_in_its_conversation(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str
) -> None:
    """The turn ends while PostgreSQL is paused and another request's lookup has been given up
    on: its items wait for the database. Before, they were dropped at once ("an earlier
    statement still waits"): the client read `completed`, the conversation never held the turn,
    and its next response was answered without it."""
    assert postgres.url is not None
    fake = OpenAIBackend(default=SLOW)
    async with fake.serve() as server, gateway(postgres.url, nats_url, backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        conversation = await client.conversations.create()
        answered: list[str] = []

        async def turn() -> None:
            response = await client.responses.create(model="m", input="Count.", conversation=conversation.id)
            answered.append(response.status or "")

        async def lookup() -> None:  # a poll the gateway gives up on, leaving its statement overdue
            async with httpx.AsyncClient(timeout=30) as http:
                await http.get(f"{url}/v1/responses/resp_{'0' * 32}")

        seen = fake.recorder.requests_total
        async with trio.open_nursery() as nursery:
            nursery.start_soon(turn)
            await fake.wait_requests(seen + 1, within=10)
            with stalled(postgres):
                nursery.start_soon(lookup)
                await fake.wait_idle(within=15)  # the answer has ended, PostgreSQL still paused
                await trio.sleep(1.0)
        items = [item.id async for item in client.conversations.items.list(conversation.id, order="asc")]
        await client.close()
    assert answered == ["completed"]
    assert len(items) == 2 and items[0].endswith("_in0") and items[1].endswith("_0"), items
