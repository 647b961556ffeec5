"""Conversation writes through a PostgreSQL outage longer than a client waits, with the official
`openai` SDK and a real embedded PostgreSQL (stopped, then started again) and NATS: a turn's
items go through the outbox with its log row, and its conversation stays locked to it until
they are in; a conversation is created once; a download whose database goes away is a 503."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anthropic
import openai
import pytest
import trio

import proxy.http._batches
import proxy.http._message_batches
import proxy.services.persistence
from proxy.http._context import gateway as current_gateway
from proxy.infra.conversation_store import ConversationStore
from proxy.infra.embedded import EmbeddedPostgres
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import gateway, sql
from tests.test_batches import ECHO, chat_line, jsonl
from tests.test_journal_writes_outage import stalled_before
from tests.test_message_batches import request, until_ended

pytest_plugins = ["tests.infra_servers"]

# No NATS listens here (this helper's port range): the outbox keeps rows in memory.
_NO_NATS = "nats://127.0.0.1:23151"


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A server of our own: stopping the session's shared one would fail other tests."""
    with EmbeddedPostgres(tmp_path / "pgdata") as started:
        yield started


def stopped_before(monkeypatch: pytest.MonkeyPatch, postgres: EmbeddedPostgres, kind: type, name: str) -> trio.Event:
    """The first call of `kind.name` finds PostgreSQL stopped; the event is set once it is."""
    original: Callable[..., Awaitable[Any]] = getattr(kind, name)
    stopped = trio.Event()

    async def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not stopped.is_set():
            await trio.to_thread.run_sync(postgres.stop)
            stopped.set()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(kind, name, call)
    return stopped


@pytest.mark.parametrize("bus", ["nats", "nats down too"])
async def test_a_turn_ending_in_an_outage_longer_than_its_client_waits_is_added_before_the_next_turn(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str, monkeypatch: pytest.MonkeyPatch, bus: str
) -> None:
    """PostgreSQL stops as a turn's items are appended and stays down past the client's wait
    (made short here). Before, the items were dropped (an error logged) while the client read
    `completed`: the conversation lacked the turn for good and the next turn was answered
    without it. Now they wait in the outbox with the turn's row; the next turn is refused
    `conversation_locked` (or 503 while PostgreSQL is down) until they are in, then answered
    with them."""
    assert postgres.url is not None
    monkeypatch.setattr(proxy.services.persistence, "_WRITE_PATIENCE", 2.0)
    fake = OpenAIBackend(default=Script(tokens=["Fine."], usage=Usage(3, 1)))
    async with fake.serve() as server, gateway(
        postgres.url, nats_url if bus == "nats" else _NO_NATS, backend("vllm", server.url, default=True)
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        conversation = await client.conversations.create()
        stopped_before(monkeypatch, postgres, ConversationStore, "append")
        first = await client.responses.create(model="m", input="One.", conversation=conversation.id)
        await trio.sleep(4.0)  # its row given up on too: in the outbox
        await trio.to_thread.run_sync(postgres.start)
        refusals: set[str] = set()
        with trio.fail_after(60):
            while True:
                try:
                    second = await client.responses.create(model="m", input="Two.", conversation=conversation.id)
                    break
                except openai.APIStatusError as error:
                    body = error.body if isinstance(error.body, dict) else {}
                    refusals.add(f"{error.status_code} {body.get('code')}")
                await trio.sleep(0.3)
        items = [item.id async for item in client.conversations.items.list(conversation.id, order="asc")]
        await client.close()
    assert (first.status, second.status) == ("completed", "completed")
    assert refusals <= {"400 conversation_locked", "503 journal_unavailable"}, refusals
    assert [item.split("_", 2)[1] for item in items] == [first.id.split("_")[1]] * 2 + [second.id.split("_")[1]] * 2
    # The second turn was answered with the first in its conversation.
    last = fake.recorder.requests[-1].json
    assert [message["content"] for message in last["messages"]][:2] == ["One.", "Fine."], last["messages"]


async def test_a_conversation_created_while_the_database_stalls_is_created_once(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL pauses as a conversation's row is inserted. Before, its client was answered
    503 after 3 s while the insert went on and committed: an orphan conversation, and a second
    one made by the retry. Now the client waits and is given the one created."""
    assert postgres.url is not None
    async with gateway(postgres.url, nats_url) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        async with trio.open_nursery() as nursery:
            stalled_before(monkeypatch, postgres, nursery, ConversationStore, "create")
            created = await client.conversations.create(items=[{"type": "message", "role": "user", "content": "Hi."}])
        items = [item.id async for item in client.conversations.items.list(created.id)]
        await client.close()
    assert await sql(postgres.url, "SELECT id FROM conversations") == [(created.id,)]
    assert len(items) == 1


def lost_after(
    monkeypatch: pytest.MonkeyPatch, postgres: EmbeddedPostgres, module: ModuleType, name: str, nth: int = 1
) -> None:
    """Once the `nth` call of a route's lookup `module.name` has answered, PostgreSQL stops
    and the gateway drops its connection pool (its probes missed) before the route goes on."""
    original: Callable[..., Awaitable[Any]] = getattr(module, name)
    calls = 0

    async def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        found = await original(*args, **kwargs)
        calls += 1
        if calls == nth:
            await trio.to_thread.run_sync(postgres.stop)
            resources = current_gateway().resources
            with trio.fail_after(30):
                while resources.database is not None:
                    await resources.database_changed.wait()
        return found

    monkeypatch.setattr(module, name, call)


async def test_a_download_whose_database_is_lost_after_its_lookup_is_a_503_in_the_callers_dialect(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file's content (OpenAI) and a message batch's results (Anthropic) are found, then
    PostgreSQL goes away before they are read. Before, an `assert` gave a 500 (an internal
    error, not to retry); now it is a 503 to retry, in each caller's own error shape."""
    assert postgres.url is not None
    fake = OpenAIBackend(default=ECHO)
    async with fake.serve() as server, gateway(postgres.url, nats_url, backend("vllm", server.url, default=True)) as url:
        openai_client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        anthropic_client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0, timeout=60)
        # Past a slice (1 MiB): streamed from the database after its lookup.
        big = jsonl(*(chat_line(f"line-{i}") for i in range(15_000)))
        assert len(big) > 1 << 20
        uploaded = await openai_client.files.create(file=("in.jsonl", big), purpose="batch")
        batch = await anthropic_client.messages.batches.create(requests=[request("only")])
        await until_ended(anthropic_client, batch.id)
        # The SDK reads the batch (its `results_url`), then its results.
        lost_after(monkeypatch, postgres, proxy.http._message_batches, "_owned", nth=2)
        with pytest.raises(anthropic.APIStatusError) as anthropic_refusal:
            await anthropic_client.messages.batches.results(batch.id)
        await trio.to_thread.run_sync(postgres.start)
        with trio.fail_after(60):  # until the gateway has its database again
            while True:
                try:
                    await openai_client.files.retrieve(uploaded.id)
                    break
                except openai.APIStatusError:
                    await trio.sleep(0.2)
        lost_after(monkeypatch, postgres, proxy.http._batches, "_stored")
        with pytest.raises(openai.APIStatusError) as openai_refusal:
            await openai_client.files.content(uploaded.id)
        await openai_client.close()
        await anthropic_client.close()
    assert anthropic_refusal.value.status_code == 503
    assert anthropic_refusal.value.body["error"]["type"] == "overloaded_error", anthropic_refusal.value.body
    assert openai_refusal.value.status_code == 503
    assert openai_refusal.value.body["code"] == "journal_unavailable", openai_refusal.value.body
