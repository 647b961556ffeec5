"""Which `Idempotency-Key`s the gateway honours, and when two requests are the same one."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anthropic
import httpx
import ollama
import openai
import psycopg
import pytest
import trio

from tests.fakes import OllamaBackend, OpenAIBackend, Script, Usage
from tests.harness import backend, running_gateway
from tests.test_auth_helpers import eventually
from tests.test_persistence import rows, wait_for_row

pytest_plugins = ["tests.infra_servers"]


@dataclass
class Stack:
    fake: OpenAIBackend
    url: str
    db: str


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    fake = OpenAIBackend(default=Script(tokens=["Hi", " there"], usage=Usage(5, 2)))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        yield Stack(fake, url, pg_database_url)


def _messages() -> list[dict[str, str]]:
    return [{"role": "user", "content": f"hello {uuid.uuid4()}"}]


async def test_a_key_of_255_printable_ascii_characters_is_honoured(stack: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
    key = "k" * 219 + str(uuid.uuid4())
    assert len(key) == 255
    messages = _messages()
    first = await client.chat.completions.with_raw_response.create(
        model="m", messages=messages, extra_headers={"Idempotency-Key": key}  # type: ignore[arg-type]
    )
    await wait_for_row(stack.db, first.headers["x-trace-id"], "completed")
    again = await client.chat.completions.with_raw_response.create(
        model="m", messages=messages, extra_headers={"Idempotency-Key": key}  # type: ignore[arg-type]
    )
    assert again.headers.get("idempotent-replayed") == "true"
    assert len(stack.fake.requests) == 1
    await client.close()


@pytest.mark.parametrize("key", ["k" * 256, "clé-" + "x" * 10], ids=["too long", "not ascii"])
async def test_a_key_the_gateway_cannot_honour_is_a_400_in_the_callers_dialect(stack: Stack, key: str) -> None:
    raw = [(b"Idempotency-Key", key.encode())]
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        answer = await http.post("/v1/chat/completions", json={"model": "m", "messages": _messages()}, headers=raw)
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert error["param"] == "Idempotency-Key" and "Idempotency-Key" in error["message"]
        answer = await http.post(
            "/v1/messages", json={"model": "m", "max_tokens": 5, "messages": _messages()}, headers=raw
        )
        assert answer.status_code == 400
        assert answer.json()["type"] == "error"
        assert "Idempotency-Key" in answer.json()["error"]["message"]
        answer = await http.post("/api/chat", json={"model": "m", "messages": _messages(), "stream": False}, headers=raw)
        assert answer.status_code == 400 and "Idempotency-Key" in answer.json()["error"]
    if key.isascii():  # what an SDK user sees (httpx sends only ASCII header values from str)
        client = anthropic.AsyncAnthropic(base_url=stack.url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.BadRequestError, match="Idempotency-Key"):
            await client.messages.create(
                model="m", max_tokens=5, messages=_messages(), extra_headers={"Idempotency-Key": key}  # type: ignore[arg-type]
            )
        await client.close()
    assert stack.fake.requests == []


def _tokens(metrics: str) -> tuple[float, float]:
    """The prompt and completion tokens counted for the fake's model."""
    counts = [0.0, 0.0]
    for line in metrics.splitlines():
        for position, name in enumerate(("llm_proxy_prompt_tokens_total{", "llm_proxy_completion_tokens_total{")):
            if line.startswith(name):
                counts[position] += float(line.rsplit(" ", 1)[1])
    return counts[0], counts[1]


async def test_replays_and_cache_hits_add_no_backend_tokens_to_the_metrics(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        key, messages = str(uuid.uuid4()), _messages()
        first = await http.post("/v1/chat/completions", json={"model": "m", "messages": messages},
                                headers={"Idempotency-Key": key})
        await wait_for_row(stack.db, first.headers["x-trace-id"], "completed")
        cache_body = {"model": "m", "messages": _messages()}
        cached = await http.post("/v1/chat/completions", json=cache_body, headers={"x-cache": "exact"})
        await wait_for_row(stack.db, cached.headers["x-trace-id"], "completed")
        assert _tokens((await http.get("/metrics")).text) == (10, 4)  # the two backend calls
        for _ in range(3):
            again = await http.post("/v1/chat/completions", json={"model": "m", "messages": messages},
                                    headers={"Idempotency-Key": key})
            assert again.headers.get("idempotent-replayed") == "true"
        hit = await http.post("/v1/chat/completions", json=cache_body, headers={"x-cache": "exact"})
        assert hit.headers.get("x-cache") == "hit"
        assert _tokens((await http.get("/metrics")).text) == (10, 4)
    assert [r.path for r in stack.fake.requests if r.method == "POST"] == ["/v1/chat/completions"] * 2


async def test_a_key_still_running_after_its_run_failed_may_be_retried(stack: Stack) -> None:
    """A claim or take-over PostgreSQL applies only after its request stopped waiting (it
    stalled) can land after the run's outcome: the key says running though its run has
    failed. A retry runs again, as for any failed run, instead of following the failure."""
    stack.fake.push(Script(status=500))
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"model": "m", "messages": _messages()}
    async with httpx.AsyncClient(base_url=stack.url, timeout=20) as client:
        failed = await client.post("/v1/chat/completions", json=body, headers=key)
        assert failed.status_code == 502, failed.text
        trace = failed.headers["x-trace-id"]
        await wait_for_row(stack.db, trace, "failed")
        assert rows(stack.db, "UPDATE idempotency_keys SET status = 'running', updated_at = now() WHERE trace_id = %s"
                              " RETURNING 1", trace) == [(1,)]
        retried = await client.post("/v1/chat/completions", json=body, headers=key)
        assert retried.status_code == 200, retried.text
        assert "x-attached-to" not in retried.headers
        assert retried.json()["choices"][0]["message"]["content"] == "Hi there"
        # And the same key replays that answer from now on.
        await wait_for_row(stack.db, retried.headers["x-trace-id"], "completed")
        again = await client.post("/v1/chat/completions", json=body, headers=key)
        assert again.headers.get("idempotent-replayed") == "true"
    assert len(stack.fake.requests) == 2


async def test_a_key_whose_owner_is_silent_is_taken_over(stack: Stack) -> None:
    """A key held by a gateway process that has beaten no heartbeat for `dead_after` (gone
    before it ever wrote one, so no sweep fails it) is taken over by a retry, which runs at
    once instead of following a run nobody will finish (300 s, then a timeout)."""
    key = str(uuid.uuid4())
    body = {"model": "m", "messages": _messages()}
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        first = await client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
        trace = first.headers["x-trace-id"]
        await wait_for_row(stack.db, trace, "completed")
        # What a process that died right after its claim leaves: a running key, no row.
        rows(stack.db, "DELETE FROM chat_log WHERE trace_id = %s RETURNING 1", trace)
        rows(stack.db, "UPDATE idempotency_keys SET status = 'running', owner = 'gone', "
                       "updated_at = now() - interval '1 minute' WHERE trace_id = %s RETURNING 1", trace)
        with trio.fail_after(10):
            retried = await client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
        assert retried.status_code == 200, retried.text
        assert "x-attached-to" not in retried.headers and retried.headers["x-trace-id"] != trace
    assert len(stack.fake.requests) == 2


async def test_a_key_claimed_after_its_client_left_is_let_go_so_that_a_retry_runs(stack: Stack) -> None:
    """A client that times out while its key's claim waits for PostgreSQL (a slow or locked
    database: when clients time out) leaves; the claim lands a moment later, for a run that
    never starts. Its retry with the same key followed that run: 300 s of silence, then a
    504, and the same again for every retry until the key went stale (30 min). The key is
    let go now: the retry runs at once."""
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"model": "m", "messages": _messages()}
    locker = await trio.to_thread.run_sync(lambda: psycopg.connect(stack.db))
    try:
        # Every claim now waits (a real lock, as a long transaction or a stalled server makes).
        await trio.to_thread.run_sync(lambda: locker.execute("LOCK TABLE idempotency_keys IN EXCLUSIVE MODE"))
        async with httpx.AsyncClient(base_url=stack.url, timeout=20) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: client.post("/v1/chat/completions", json=body, headers=key))

                async def claim_waits() -> bool:
                    waiting = rows(stack.db, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                             " AND query LIKE 'INSERT INTO idempotency_keys %%'")
                    return waiting[0][0] > 0

                await eventually(claim_waits)
                nursery.cancel_scope.cancel()  # the client gives up
        await trio.to_thread.run_sync(locker.commit)  # the claim lands now
    finally:
        await trio.to_thread.run_sync(locker.close)

    async def claimed() -> list[tuple[object, ...]]:
        return rows(stack.db, "SELECT status FROM idempotency_keys WHERE key LIKE %s", f"%{key['Idempotency-Key']}")

    assert await eventually(claimed) in ([("running",)], [("cancelled",)])
    async with httpx.AsyncClient(base_url=stack.url, timeout=20) as client:
        with trio.fail_after(10):
            retried = await client.post("/v1/chat/completions", json=body, headers=key)
    assert retried.status_code == 200, retried.text
    assert "x-attached-to" not in retried.headers
    assert retried.json()["choices"][0]["message"]["content"] == "Hi there"
    assert len(stack.fake.requests) == 1  # the first never reached the backend


async def test_keys_older_than_their_retention_are_purged_but_running_and_cached_ones_stay(stack: Stack) -> None:
    """A gateway running for weeks: every keyed request leaves its key. Once its run ended a
    day ago (OpenAI's and Stripe's retention) the key goes, a retry that late runs again,
    and a key whose run is still going, or whose cached answer still serves, stays."""
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)

    async def keyed(key: str, messages: list[dict[str, str]]) -> str:
        answer = await client.chat.completions.with_raw_response.create(
            model="m", messages=messages, extra_headers={"Idempotency-Key": key}  # type: ignore[arg-type]
        )
        await wait_for_row(stack.db, answer.headers["x-trace-id"], "completed")
        return answer.headers.get("idempotent-replayed", "false")

    old = {f"old-{uuid.uuid4()}": _messages() for _ in range(30)}
    recent = {f"recent-{uuid.uuid4()}": _messages() for _ in range(5)}
    for key, messages in {**old, **recent}.items():
        await keyed(key, messages)
    running, cached, failed = f"running-{uuid.uuid4()}", f"cache:{uuid.uuid4().hex}", f"cache:{uuid.uuid4().hex}"
    with psycopg.connect(stack.db) as conn:
        # Their runs ended 25 h ago, the recent ones' an hour ago; a run going on for 25 h
        # (a long background response), a cached answer still live, a cached attempt that failed.
        conn.execute("UPDATE idempotency_keys SET updated_at = now() - interval '25 hours' WHERE key = ANY(%s)", (list(old),))
        conn.execute("UPDATE idempotency_keys SET updated_at = now() - interval '1 hour' WHERE key = ANY(%s)", (list(recent),))
        conn.execute(
            "INSERT INTO idempotency_keys (key, req_id, trace_id, status, updated_at) VALUES "
            "(%s, 'r', 't-running', 'running', now() - interval '25 hours'), "
            "(%s, 'r', 't-cached', 'completed', now() - interval '25 hours'), "
            "(%s, 'r', 't-failed', 'failed', now() - interval '25 hours')",
            (running, cached, failed),
        )
        conn.execute(
            "INSERT INTO completions_cache (req_id, model, trace_id, result, expires_at) "
            "VALUES (%s, 'm', 't-cached', '{}'::jsonb, now() + interval '1 hour')",
            (cached.removeprefix("cache:"),),
        )

    def kept(keys: list[str]) -> int:
        [(count,)] = rows(stack.db, "SELECT count(*) FROM idempotency_keys WHERE key = ANY(%s)", keys)
        return int(count)  # type: ignore[call-overload]

    assert await keyed(f"new-{uuid.uuid4()}", _messages()) == "false"  # its group commit purges

    async def purged() -> bool:
        return await trio.to_thread.run_sync(kept, [*old, failed]) == 0

    await eventually(purged)
    assert kept(list(recent)) == len(recent)
    assert kept([running, cached]) == 2
    calls = len(stack.fake.requests)
    key, messages = next(iter(old.items()))
    assert await keyed(key, messages) == "false"  # forgotten: it runs again
    assert len(stack.fake.requests) == calls + 1
    key, messages = next(iter(recent.items()))
    assert await keyed(key, messages) == "true"  # within the retention: still replayed
    await client.close()


async def test_a_key_past_its_retention_runs_again_before_any_purge(stack: Stack) -> None:
    """No keyed request has committed since the key expired, so no purge has run: a retry a
    day late still runs again (not a replay of yesterday's answer), and the key may now be
    used for a different request (not refused as a reuse)."""
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
    key, messages = f"late-{uuid.uuid4()}", _messages()
    first = await client.chat.completions.with_raw_response.create(
        model="m", messages=messages, extra_headers={"Idempotency-Key": key}  # type: ignore[arg-type]
    )
    await wait_for_row(stack.db, first.headers["x-trace-id"], "completed")
    assert rows(stack.db, "UPDATE idempotency_keys SET updated_at = now() - interval '25 hours' "
                          "WHERE key = %s RETURNING 1", key) == [(1,)]
    calls = len(stack.fake.requests)
    again = await client.chat.completions.with_raw_response.create(
        model="m", messages=messages, extra_headers={"Idempotency-Key": key}  # type: ignore[arg-type]
    )
    assert again.headers.get("idempotent-replayed") != "true"
    assert again.headers["x-trace-id"] != first.headers["x-trace-id"]
    assert len(stack.fake.requests) == calls + 1
    await wait_for_row(stack.db, again.headers["x-trace-id"], "completed")
    assert rows(stack.db, "UPDATE idempotency_keys SET updated_at = now() - interval '25 hours' "
                          "WHERE key = %s RETURNING 1", key) == [(1,)]
    other = await client.chat.completions.with_raw_response.create(
        model="m", messages=_messages(), extra_headers={"Idempotency-Key": key}  # type: ignore[arg-type]
    )
    assert other.http_response.status_code == 200
    assert len(stack.fake.requests) == calls + 2
    await client.close()


async def test_an_ollama_generate_replayed_by_its_key_keeps_its_context(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    # The `context` is how an Ollama client goes on from the answer: a replay came without it,
    # and the client's next turn lost the conversation.
    fake = OllamaBackend(default=Script(tokens=["4"], usage=Usage(3, 1)))
    async with fake.serve() as server, running_gateway(
        backend("ollama", server.url, kind="ollama", default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        for done, stream in enumerate((False, True), start=1):
            headers = {"Idempotency-Key": str(uuid.uuid4())}
            client = ollama.AsyncClient(host=url, headers=headers)
            first = await client.generate(model="llama3.2", prompt=f"2+2? {uuid.uuid4()}", stream=False)
            assert first.context == [1, 2, 3, 4]
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                await eventually(functools.partial(_completed, pg_database_url, done), within=10)
                body = {"model": "llama3.2", "prompt": (fake.requests[-1].json or {})["prompt"], "stream": stream}
                again = await http.post("/api/generate", json=body, headers=headers)
            assert again.status_code == 200 and "x-replay-of" in again.headers, (stream, again.text)
            assert len(fake.requests) == 1 + (1 if stream else 0), stream
            last = json.loads(again.text.splitlines()[-1])
            assert last["done"] and last["context"] == [1, 2, 3, 4], (stream, last)


async def _completed(db: str, count: int) -> bool:
    """Whether `count` chats are stored completed (a replay, not an attachment to a run)."""
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM chat_log WHERE status = 'completed'").fetchone()
    return row is not None and row[0] == count
