"""Writes a client is answered about, through a PostgreSQL stall (its processes paused), with
the official `openai` SDK: a conversation's turn keeps its items and leaves its lock free, a
batch is created once. Each waits for the database rather than being given up on while it
may still commit."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest
import trio

import proxy.http._keys
import proxy.services.batches
import proxy.services.persistence
from proxy.config import BatchSettings
from proxy.infra.batch_store import BatchStore
from proxy.infra.conversation_store import ConversationStore
from proxy.infra.embedded import EmbeddedPostgres
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import (
    bearer,
    eventually,
    gateway,
    keyed_stack,
    new_key,
    sql,
    wait_for_key,
)
from tests.test_batches import chat_line, jsonl, until_status
from tests.test_limits_outage import stalled

pytest_plugins = ["tests.infra_servers"]

STALL_SECONDS = 4.0  # past a lookup's 3 s
# Past three missed probes of the database (2 s apart, 2 s each), after which the gateway
# closes its connection pool and opens a new one.
RECONNECT_SECONDS = 14.0

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


def stalled_before(
    monkeypatch: pytest.MonkeyPatch, postgres: EmbeddedPostgres, nursery: trio.Nursery, kind: type, name: str,
    seconds: float = STALL_SECONDS,
) -> None:
    """The first call of `kind.name` finds PostgreSQL paused, for `seconds`."""
    original: Callable[..., Awaitable[Any]] = getattr(kind, name)
    calls = 0

    async def stalled_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            paused = trio.Event()

            async def pause() -> None:
                with stalled(postgres):
                    paused.set()
                    await trio.sleep(seconds)

            nursery.start_soon(pause)
            await paused.wait()
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(kind, name, stalled_call)


async def test_a_turn_whose_lock_is_taken_while_the_database_stalls_leaves_its_conversation_usable(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL pauses as a turn takes its conversation's lock. Before, the lock statement
    was given up on after 3 s (a 503) and committed once PostgreSQL resumed, for a run that
    never started: every later turn was refused `conversation_locked` for as long as the
    gateway ran. Now the turn waits for its lock and is answered."""
    assert postgres.url is not None
    fake = OpenAIBackend(default=Script(tokens=["Fine."], usage=Usage(3, 1)))
    async with fake.serve() as server, gateway(postgres.url, nats_url, backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        conversation = await client.conversations.create()
        async with trio.open_nursery() as nursery:
            stalled_before(monkeypatch, postgres, nursery, ConversationStore, "lock")
            first = await client.responses.create(model="m", input="One.", conversation=conversation.id)
        second = await client.responses.create(model="m", input="Two.", conversation=conversation.id)
        items = [item.id async for item in client.conversations.items.list(conversation.id, order="asc")]
        await client.close()
    assert (first.status, second.status) == ("completed", "completed")
    assert len(items) == 4


@pytest.mark.parametrize("stall", [STALL_SECONDS, RECONNECT_SECONDS])
async def test_a_batch_created_while_the_database_stalls_is_created_once_and_its_client_told(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str, monkeypatch: pytest.MonkeyPatch, stall: float
) -> None:
    """PostgreSQL pauses as a batch's row is inserted. Before, its client was answered 503
    after 3 s ("try again shortly"; the SDK retries it by itself) while the insert went on and
    committed: the batch ran, and so did the one its retry created, every line twice. Now the
    client waits and is given the one batch created; so too when the pause is long enough for
    the gateway to drop the connection the insert was sent on (which PostgreSQL, resumed, may
    still have committed): the insert is sent again, and finds its batch if it was."""
    assert postgres.url is not None
    fake = OpenAIBackend(default=Script(echo=True, usage=Usage(3, 1)))
    async with fake.serve() as server, gateway(postgres.url, nats_url, backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        uploaded = await client.files.create(file=("in.jsonl", jsonl(chat_line("a"), chat_line("b"))), purpose="batch")
        async with trio.open_nursery() as nursery:
            stalled_before(monkeypatch, postgres, nursery, BatchStore, "add_batch", stall)
            created = await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        done = await until_status(client, created.id, "completed", within=30)
        await client.close()
    assert done.request_counts is not None and done.request_counts.completed == 2
    assert await sql(postgres.url, "SELECT id FROM batches") == [(created.id,)]


async def test_items_added_while_the_database_stalls_are_added_once_and_their_client_told(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the client was answered 503 while its items went in once PostgreSQL resumed:
    its retry (the SDK's own) added them again, so the conversation said everything twice."""
    assert postgres.url is not None
    async with gateway(postgres.url, nats_url, backend("vllm", "http://127.0.0.1:9", default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        conversation = await client.conversations.create()
        async with trio.open_nursery() as nursery:
            stalled_before(monkeypatch, postgres, nursery, ConversationStore, "append")
            added = await client.conversations.items.create(
                conversation.id, items=[{"type": "message", "role": "user", "content": "Remember 42."}]
            )
        items = [item.id async for item in client.conversations.items.list(conversation.id, order="asc")]
        await client.close()
    assert [item.id for item in added.data] == items and len(items) == 1


@pytest.mark.parametrize("patience", ["rides it out", "stops"])
async def test_a_batch_running_while_postgresql_restarts_is_finished_each_line_once(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str, monkeypatch: pytest.MonkeyPatch, patience: str
) -> None:
    """PostgreSQL is down long enough mid-batch for the gateway to open a new connection pool:
    the batch rides it out, its lines answered meanwhile recorded once it is back, each line
    sent once. Before, a line's record failed at once and stopped the batch, and the runner kept
    a running batch on the closed pool of before: letting it go failed, so it stayed
    `in_progress`, owned by a live gateway that no longer ran it, for as long as that ran.
    An outage longer than a record's patience (made short here) stops the batch: it is let go
    once the database is back, and taken up again."""
    assert postgres.url is not None
    if patience == "stops":
        monkeypatch.setattr(proxy.services.batches, "_RECORD_PATIENCE", 1.0, raising=False)
    fake = OpenAIBackend(default=Script(echo=True, usage=Usage(3, 1), header_delay=0.2))
    custom_ids = [f"line-{i}" for i in range(30)]
    async with fake.serve() as server, gateway(
        postgres.url, nats_url, backend("vllm", server.url, default=True), batches=BatchSettings(poll_seconds=0.5)
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=2, timeout=60)
        uploaded = await client.files.create(file=("in.jsonl", jsonl(*(chat_line(c) for c in custom_ids))), purpose="batch")
        created = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        await until_status(client, created.id, "in_progress")

        async def started() -> bool:
            return sum(request.path.endswith("/chat/completions") for request in fake.requests) >= 5

        await eventually(started, within=20)
        await trio.to_thread.run_sync(postgres.stop)
        await trio.sleep(RECONNECT_SECONDS)
        await trio.to_thread.run_sync(postgres.start)
        with trio.fail_after(60):
            while True:
                with contextlib.suppress(openai.APIStatusError, openai.APIConnectionError):
                    done = await client.batches.retrieve(created.id)
                    if done.status in ("completed", "failed", "expired", "cancelled"):
                        break
                await trio.sleep(0.2)
        lines = [json.loads(line) for line in (await client.files.content(done.output_file_id or "")).text.splitlines()]
        await client.close()
    assert done.status == "completed" and done.request_counts is not None and done.request_counts.completed == 30
    assert sorted(line["custom_id"] for line in lines) == sorted(custom_ids)
    if patience == "rides it out":
        # The lines answered during the outage were recorded once it ended, not run (billed) again.
        assert sum(request.path.endswith("/chat/completions") for request in fake.requests) == 30


async def test_a_turn_whose_client_leaves_while_its_lock_waits_for_the_database_leaves_its_conversation_usable(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client gives up (its timeout) while its turn's lock waits for a paused PostgreSQL.
    Before, the lock statement was cancelled mid-flight, and PostgreSQL, resumed, ran it
    anyway: the conversation stayed locked for a run that never started."""
    assert postgres.url is not None
    fake = OpenAIBackend(default=Script(tokens=["Fine."], usage=Usage(3, 1)))
    async with fake.serve() as server, gateway(postgres.url, nats_url, backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        conversation = await client.conversations.create()
        async with trio.open_nursery() as nursery:
            stalled_before(monkeypatch, postgres, nursery, ConversationStore, "lock")
            with pytest.raises(openai.APITimeoutError):
                await client.responses.create(model="m", input="One.", conversation=conversation.id, timeout=1.5)
        await trio.sleep(1.0)  # the gateway has seen its client go, and PostgreSQL is back
        second = await client.responses.create(model="m", input="Two.", conversation=conversation.id)
        await client.close()
    assert second.status == "completed"


async def test_a_change_refused_on_a_locked_database_is_not_made_behind_its_clients_back(
    aio_loop: object, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete or an update whose table is locked (or PostgreSQL stalled) was answered 503
    after 3 s, its statement left to run on: it was made once the lock went, and the client's
    retry of a delete found nothing left, a 404. Now the change is cancelled with its 503."""
    monkeypatch.setattr(proxy.services.persistence, "CHANGE_TIMEOUT", 1.0)
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
        conversation = await client.conversations.create(metadata={"topic": "kept"})
        response = await client.responses.create(model="qwen3-8b", input="Say hello")
        await eventually(lambda: sql(pg_database_url, "SELECT 1 FROM chat_log WHERE status = 'completed'"))

        async def refused_while_locked(table: str, change: Callable[[], Awaitable[object]]) -> None:
            with contextlib.closing(await trio.to_thread.run_sync(lambda: psycopg.connect(pg_database_url))) as holder:
                await trio.to_thread.run_sync(holder.execute, f"LOCK TABLE {table} IN EXCLUSIVE MODE")  # reads go on
                with trio.fail_after(20), pytest.raises(openai.APIStatusError) as refused:
                    await change()
            assert refused.value.status_code == 503 and refused.value.code == "journal_unavailable"
            assert refused.value.response.headers["retry-after"] == "2"

        await refused_while_locked("conversations", lambda: client.conversations.delete(conversation.id))
        await refused_while_locked(
            "conversations", lambda: client.conversations.update(conversation.id, metadata={"topic": "changed"}))
        await refused_while_locked("chat_log", lambda: client.responses.delete(response.id))
        await trio.sleep(3)  # what a statement left running would have done by now, once the lock went
        assert (await client.conversations.retrieve(conversation.id)).metadata == {"topic": "kept"}
        assert (await client.responses.retrieve(response.id)).output_text == "Hello"
        # Sent again, each is made.
        await client.responses.delete(response.id)
        assert (await client.conversations.delete(conversation.id)).deleted
        await client.close()


async def test_a_key_created_while_the_database_stalls_is_a_503_in_bounded_time_and_not_made(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's processes paused (no lock to cancel: its connections answer nothing): the
    keys API waited for it for as long as it lasted."""
    monkeypatch.setattr(proxy.http._keys, "DATABASE_WAIT", 1.0)
    assert postgres.url is not None
    async with keyed_stack(postgres.url, nats_url, Usage(5, 1)) as stack:
        key = await new_key(stack.db, "root", "--admin")
        await wait_for_key(stack.url, key)
        async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=30) as admin:
            with stalled(postgres):
                started = trio.current_time()
                with trio.fail_after(STALL_SECONDS * 2):
                    refused = await admin.post("/v1/keys", json={"name": "late"})
                waited = trio.current_time() - started
            assert refused.status_code == 503 and refused.headers["retry-after"] == "2", refused.text
            assert refused.json()["error"]["code"] == "database_unavailable" and waited < STALL_SECONDS

            async def listed() -> list[str]:
                answer = await admin.get("/v1/keys")
                return [record["name"] for record in answer.json()["data"]] if answer.status_code == 200 else []

            # The cancelled creation committed nothing once the server went on.
            assert await eventually(listed, within=RECONNECT_SECONDS + 10) == ["root"]
            assert (await admin.post("/v1/keys", json={"name": "late"})).status_code == 201
