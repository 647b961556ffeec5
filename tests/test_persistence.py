"""The completion log, idempotency, the exact cache, events and resume — on real servers."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import psycopg
import pytest
import trio

import proxy.gateway
from proxy.dialects.events import Finished, decode_event
from proxy.domain.chat import ChatCompletion, Choice, FinishReason, ToolCall
from proxy.domain.chat import Usage as DomainUsage
from proxy.domain.events import StreamFailed, TextDelta
from proxy.infra.chat_store import (
    ChatStore,
    Claim,
    LogRow,
    StoredRun,
    completion_from_json,
    completion_to_json,
)
from proxy.infra.embedded import EmbeddedNats, EmbeddedPostgres
from proxy.infra.migrations import load_migrations, migrate
from proxy.infra.nats import open_bus
from proxy.infra.postgres import open_database
from proxy.services.journal import (
    OUTBOX_SUBJECT,
    EventLog,
    EventPublisher,
    Journal,
    LogWriter,
    Outbox,
    ensure_streams,
)
from proxy.services.persistence import PersistenceSettings, _rebuilt_events
from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend, Script, Usage
from tests.harness import backend, running_gateway
from tests.test_auth_helpers import eventually
from tests.test_cli import free_port

pytest_plugins = ["tests.infra_servers"]

MESSAGES = [{"role": "user", "content": "Tell me a story"}]


@dataclass
class Stack:
    fake: OpenAIBackend
    url: str
    db: str
    nats: str


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    fake = OpenAIBackend(default=Script(tokens=["Once", " upon", " a", " time"], usage=Usage(7, 4)))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        yield Stack(fake, url, pg_database_url, nats_url)


def rows(db: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


async def wait_for_row(db: str, trace_id: str, status: str, within: float = 5.0) -> tuple[object, ...]:
    with trio.fail_after(within):
        while True:
            found = await trio.to_thread.run_sync(
                rows, db, "SELECT status, finish_reason, prompt_tokens, completion_tokens, result, error, last_seq "
                "FROM chat_log WHERE trace_id = %s", trace_id,
            )
            if found and found[0][0] == status:
                return found[0]
            await trio.sleep(0.05)


def sse_payloads(text: str) -> list[str]:
    return [block[6:] for block in text.split("\n\n") if block.startswith("data: ")]


def resumed_payloads(text: str) -> list[str]:
    """The `data` of each frame of `/v1/streams` (frames there start with `id:`)."""
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


async def test_log_rows_for_completed_failed_and_cancelled_requests(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        done = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True})
        _status, reason, prompt, completion, result, error, last_seq = await wait_for_row(
            stack.db, done.headers["x-trace-id"], "completed"
        )
        assert (reason, prompt, completion, error) == ("stop", 7, 4, None)
        assert result["choices"][0]["content"] == "Once upon a time"  # type: ignore[index]
        assert last_seq and int(last_seq) > 4  # type: ignore[call-overload]

        stack.fake.set_script(Script(status=500, error_message="model crashed"))
        failed = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
        assert failed.status_code == 502
        row = await wait_for_row(stack.db, failed.headers["x-trace-id"], "failed")
        assert "model crashed" in row[5]["message"]  # type: ignore[index]

        stack.fake.set_script(Script(n_tokens=500, pace=0.01))
        async with client.stream("POST", "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True}) as response:
            trace_id = response.headers["x-trace-id"]
            lines = response.aiter_lines()
            for _ in range(4):
                await lines.__anext__()
            await wait_for_row(stack.db, trace_id, "running")  # a long chat is visible while it runs
        await stack.fake.wait_disconnect(2.0)
        row = await wait_for_row(stack.db, trace_id, "cancelled")
        assert row[4]["choices"][0]["content"]  # type: ignore[index]  # the partial answer is kept


async def test_a_nul_character_in_a_chat_does_not_make_its_row_unwritable(stack: Stack) -> None:
    # PostgreSQL text/jsonb cannot hold U+0000: the row stores U+FFFD; `\\u0000` stays text.
    stack.fake.set_script(Script(tokens=["a\u0000b"]))
    question = [{"role": "user", "content": "x\u0000y \\u0000"}]
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        done = await client.post("/v1/chat/completions", json={"model": "m", "messages": question})
        assert done.json()["choices"][0]["message"]["content"] == "a\u0000b"  # the client gets it as sent
        trace_id = done.headers["x-trace-id"]
        row = await wait_for_row(stack.db, trace_id, "completed")
    assert row[4]["choices"][0]["content"] == "a\ufffdb"  # type: ignore[index]
    [(request,)] = await trio.to_thread.run_sync(rows, stack.db, "SELECT request FROM chat_log WHERE trace_id = %s", trace_id)
    assert request["messages"][0]["content"] == ["x\ufffdy \\u0000"]  # type: ignore[index]


async def test_events_are_published_in_the_seed_schema_with_sequence_numbers(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
    trace_id = response.headers["x-trace-id"]
    await wait_for_row(stack.db, trace_id, "completed")
    received = []
    async with open_bus(stack.nats) as bus, bus.subscribe(f"evt.chat.{trace_id}", from_start=True) as messages:
        with trio.fail_after(5):
            async for message in messages:
                received.append(json.loads(message.data))
                if received[-1]["type"] == "finished":
                    break
    assert [e["seq"] for e in received] == list(range(1, len(received) + 1))
    assert received[0]["type"] == "role"
    assert "".join(e["text"] for e in received if e["type"] == "token") == "Once upon a time"
    assert [e["type"] for e in received].count("finished") == 1
    assert received[-1] == {"seq": len(received), "type": "finished", "reason": "stop", "status": "completed", "winner": "m"}


async def test_twenty_concurrent_duplicates_make_one_backend_call(stack: Stack) -> None:
    stack.fake.set_script(Script(tokens=["a", "b", "c", "d"], pace=0.05))
    key = str(uuid.uuid4())
    bodies: list[str] = []

    async def one(client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True},
            headers={"Idempotency-Key": key},
        )
        assert response.status_code == 200
        bodies.append("".join(
            json.loads(p)["choices"][0]["delta"].get("content") or ""
            for p in sse_payloads(response.text) if p != "[DONE]" and json.loads(p)["choices"]
        ))

    async with httpx.AsyncClient(base_url=stack.url, timeout=20) as client, trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one, client)
    assert bodies == ["abcd"] * 20
    assert len(stack.fake.requests) == 1
    assert rows(stack.db, "SELECT count(*) FROM chat_log WHERE idempotency_key = %s", key) == [(1,)]


async def test_key_replay_after_completion_and_key_reuse_conflict(stack: Stack) -> None:
    key = str(uuid.uuid4())
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
    answered = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, extra_headers={"Idempotency-Key": key})  # type: ignore[arg-type]
    first = answered.parse()
    await wait_for_row(stack.db, answered.headers["x-trace-id"], "completed")
    again = await client.chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, stream=True, extra_headers={"Idempotency-Key": key}  # type: ignore[arg-type]
    )
    assert again.headers.get("idempotent-replayed") == "true"
    chunks = [chunk async for chunk in again.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    assert len(stack.fake.requests) == 1
    with pytest.raises(openai.ConflictError):
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "something else"}], extra_headers={"Idempotency-Key": key}
        )
    await client.close()


async def test_exact_cache_replays_as_sse_and_json(stack: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
    headers = {"x-cache": "exact"}
    miss = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, extra_headers=headers)  # type: ignore[arg-type]
    assert miss.headers["x-cache"] == "miss"
    await wait_for_row(stack.db, miss.headers["x-trace-id"], "completed")
    hit = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, extra_headers=headers)  # type: ignore[arg-type]
    assert hit.headers["x-cache"] == "hit"
    assert hit.parse().choices[0].message.content == "Once upon a time"
    streamed = await client.chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, extra_headers=headers  # type: ignore[arg-type]
    )
    assert streamed.headers["x-cache"] == "hit"
    chunks = [chunk async for chunk in streamed.parse()]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Once upon a time"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 11
    # Without the header (and temperature unset) the same request is not served from cache.
    plain = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert "x-cache" not in plain.headers
    assert len(stack.fake.requests) == 2
    await client.close()


async def test_an_expired_cache_entry_is_a_miss_that_calls_the_backend_again(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(tokens=["fresh"], pace=0.05))
    body = {"model": "m", "messages": [{"role": "user", "content": uuid.uuid4().hex}]}
    headers = {"x-cache": "exact"}
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url,
        cache_ttl_seconds=1.0,
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def ask() -> httpx.Response:
            response = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "fresh"
            return response

        first = await ask()
        assert first.headers["x-cache"] == "miss"
        await wait_for_row(pg_database_url, first.headers["x-trace-id"], "completed")
        assert (await ask()).headers["x-cache"] == "hit"
        assert len(fake.requests) == 1
        await trio.sleep(1.2)  # past the TTL
        again = await ask()
        assert again.headers.get("x-cache") == "miss" and "idempotent-replayed" not in again.headers
        assert len(fake.requests) == 2
        await wait_for_row(pg_database_url, again.headers["x-trace-id"], "completed")
        assert (await ask()).headers["x-cache"] == "hit"  # cached again
        await trio.sleep(1.2)
        # Two identical requests at once after expiry still make one backend call.
        answers: list[httpx.Response] = []

        async def collect() -> None:
            answers.append(await ask())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            nursery.start_soon(collect)
        assert len(fake.requests) == 3
        ran, attached = sorted(answers, key=lambda r: "x-attached-to" in r.headers)
        assert ran.headers["x-cache"] == "miss" and attached.headers["x-attached-to"] == ran.headers["x-trace-id"]
        assert attached.headers["x-cache"] == "hit"  # its answer cost no backend call of its own


async def test_expired_cache_entries_and_their_keys_do_not_pile_up(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A gateway running for weeks with the exact cache on: every distinct cached request
    leaves an entry (its whole answer) and a `cache:` key; once expired they must go, not
    stay in PostgreSQL for good."""
    fake = OpenAIBackend(default=Script(tokens=["fresh"]))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url,
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def cached_once() -> str:
            body = {"model": "m", "messages": [{"role": "user", "content": uuid.uuid4().hex}]}
            response = await client.post("/v1/chat/completions", json=body, headers={"x-cache": "exact"})
            assert response.status_code == 200 and response.headers["x-cache"] == "miss"
            await wait_for_row(pg_database_url, response.headers["x-trace-id"], "completed")
            return response.headers["x-trace-id"]

        old = [await cached_once() for _ in range(30)]

        def kept() -> tuple[int, int]:
            [(entries,)] = rows(pg_database_url, "SELECT count(*) FROM completions_cache WHERE trace_id = ANY(%s)", old)
            [(keys,)] = rows(pg_database_url, "SELECT count(*) FROM idempotency_keys WHERE trace_id = ANY(%s)", old)
            return int(entries), int(keys)  # type: ignore[call-overload]

        assert kept() == (30, 30)
        with psycopg.connect(pg_database_url) as conn:  # their TTL has passed
            conn.execute("UPDATE completions_cache SET expires_at = now() - interval '1 second'")
        new = await cached_once()

        async def purged() -> bool:
            return await trio.to_thread.run_sync(kept) == (0, 0)

        await eventually(purged)
        # The live entry stays, and answers.
        assert rows(pg_database_url, "SELECT count(*) FROM completions_cache WHERE trace_id = %s", new) == [(1,)]


async def test_a_replayed_attached_or_cached_answer_names_the_trace_that_made_it(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:

        async def resumable(trace_id: str) -> None:
            resumed = await client.get(f"/v1/streams/{trace_id}")
            assert resumed.status_code == 200
            assert isinstance(stream_frames(resumed.text)[-1][1], Finished)
            assert rows(stack.db, "SELECT count(*) FROM chat_log WHERE trace_id = %s", trace_id) == [(1,)]

        cached_body = {"model": "m", "messages": [{"role": "user", "content": uuid.uuid4().hex}]}
        miss = await client.post("/v1/chat/completions", json=cached_body, headers={"x-cache": "exact"})
        await wait_for_row(stack.db, miss.headers["x-trace-id"], "completed")
        hit = await client.post("/v1/chat/completions", json=cached_body, headers={"x-cache": "exact"})
        assert hit.headers["x-cache"] == "hit" and hit.headers["x-trace-id"] == miss.headers["x-trace-id"]
        await resumable(hit.headers["x-trace-id"])

        key = {"Idempotency-Key": str(uuid.uuid4())}
        first = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, headers=key)
        await wait_for_row(stack.db, first.headers["x-trace-id"], "completed")
        replayed = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, headers=key)
        assert replayed.headers["idempotent-replayed"] == "true"
        assert replayed.headers["x-trace-id"] == first.headers["x-trace-id"]
        await resumable(replayed.headers["x-trace-id"])

        stack.fake.set_script(Script(tokens=["a", "b", "c"], pace=0.2))
        key = {"Idempotency-Key": str(uuid.uuid4())}
        answers: list[httpx.Response] = []
        seen = stack.fake.recorder.requests_total

        async def ask() -> None:
            answers.append(await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, headers=key))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            # The second comes while the first is at its backend (0.6 s), not after a fixed
            # 0.1 s that a loaded machine may spend before the first has even claimed the key.
            await stack.fake.wait_requests(seen + 1)
            nursery.start_soon(ask)
        # Both end together, in either order: the attached one is the one that says so.
        attached, ran = sorted(answers, key=lambda answer: "x-attached-to" not in answer.headers)
        assert attached.headers["x-attached-to"] == ran.headers["x-trace-id"] == attached.headers["x-trace-id"]
        await resumable(attached.headers["x-trace-id"])


async def test_resume_on_a_second_instance(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    fake = OpenAIBackend(default=Script(n_tokens=40, pace=0.02))
    key = str(uuid.uuid4())
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as first, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as second, httpx.AsyncClient(timeout=20) as client:
        async with client.stream("POST", f"{first}/v1/chat/completions", json=body, headers={"Idempotency-Key": key}) as response:
            trace_id = response.headers["x-trace-id"]
            lines = response.aiter_lines()
            for _ in range(6):
                await lines.__anext__()
        # The connection dropped; the keyed run goes on. Reconnect to the other instance.
        again = await client.post(f"{second}/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
        assert again.headers["x-attached-to"] == trace_id
        payloads = [json.loads(p) for p in sse_payloads(again.text) if p != "[DONE]"]
        text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p["choices"])
        assert len(text.split()) == 40
        assert payloads[-1]["choices"][0]["finish_reason"] == "stop"
        assert len(fake.requests) == 1  # the generation was never restarted

        # The event-level resume API, from the middle.
        resumed = await client.get(f"{second}/v1/streams/{trace_id}", params={"after": 10})
        frames = [block for block in resumed.text.split("\n\n") if block]
        seqs = [int(block.split("\n")[0][4:]) for block in frames]
        assert seqs[0] == 11 and seqs == list(range(11, 11 + len(seqs)))
        last = decode_event(frames[-1].split("data: ", 1)[1].encode())[1]
        assert isinstance(last, Finished) and last.status == "completed"
        assert any(isinstance(decode_event(f.split("data: ", 1)[1].encode())[1], TextDelta) for f in frames)
        unknown = await client.get(f"{second}/v1/streams/{uuid.uuid4().hex}")
        assert unknown.status_code == 404


async def test_a_stream_read_on_another_instance_right_after_its_answer_is_found_with_keys(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """With API keys, whose trace it is is told by its row, written by the instance that ran
    it a moment after its client had the answer: a client reconnecting to `/v1/streams` through
    a load balancer got `No stream ... is known here` (404) every time in that moment."""
    from tests.test_auth_helpers import bearer, new_key, wait_for_key

    fake = OpenAIBackend(default=Script(n_tokens=5))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as first, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as second:
        key, stranger = await new_key(pg_database_url, "reader"), await new_key(pg_database_url, "stranger")
        for url in (first, second):
            await wait_for_key(url, key)
            await wait_for_key(url, stranger)
        async with httpx.AsyncClient(timeout=20, headers=bearer(key)) as client:
            for stream in (False, True, False):
                answer = await client.post(f"{first}/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": stream})
                trace_id = answer.headers["x-trace-id"]
                read = await client.get(f"{second}/v1/streams/{trace_id}")
                assert read.status_code == 200, read.text
                frames = [block for block in read.text.split("\n\n") if block]
                last = decode_event(frames[-1].split("data: ", 1)[1].encode())[1]
                assert isinstance(last, Finished) and last.status == "completed"
            # Another key's reader is still told of no such stream.
            refused = await client.get(f"{second}/v1/streams/{trace_id}", headers=bearer(stranger))
            assert refused.status_code == 404


async def test_a_keyed_run_that_failed_before_it_started_fails_its_followers_on_any_instance(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A duplicate following the run from another instance gets the run's error, not an
    empty 200 (the run published nothing but its `finished`)."""
    fake = OpenAIBackend(default=Script(status=500, header_delay=0.5))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as first, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as second, httpx.AsyncClient(timeout=20) as client:
        for stream in (False, True):
            headers = {"Idempotency-Key": str(uuid.uuid4())}
            body = {"model": "m", "messages": MESSAGES, "stream": stream}
            answers: dict[str, httpx.Response] = {}

            async def ask(name: str, url: str, delay: float) -> None:
                await trio.sleep(delay)
                answers[name] = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)  # noqa: B023

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "owner", first, 0.0)
                nursery.start_soon(ask, "follower", second, 0.2)
            assert answers["owner"].status_code == 502
            follower = answers["follower"]
            assert follower.headers["x-attached-to"] == answers["owner"].headers["x-trace-id"]
            assert follower.status_code == 502 and "500" in follower.json()["error"]["message"], follower.text
        assert len(fake.requests) == 2


async def test_a_follower_on_another_instance_gets_the_runs_error_code_and_param(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """The run's error as its row keeps it: a follower on another instance was told
    `code: null, param: null` for the backend's `context_length_exceeded` on `messages`, which
    its own client got (and LangChain and LiteLLM act on)."""
    refusal = {"error": {"message": "This model's maximum context length is 10 tokens.", "type": "invalid_request_error",
                         "param": "messages", "code": "context_length_exceeded"}}
    fake = OpenAIBackend(default=Script(status=400, error_body=refusal, header_delay=1.0))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as first, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as second:
        clients = [openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) for url in (first, second)]
        for stream in (False, True):
            key = str(uuid.uuid4())
            errors: dict[int, openai.BadRequestError] = {}

            async def ask(which: int) -> None:
                with pytest.raises(openai.BadRequestError) as refused:
                    await clients[which].chat.completions.create(
                        model="m", messages=MESSAGES, stream=stream, extra_headers={"Idempotency-Key": key},  # type: ignore[arg-type]  # noqa: B023
                    )
                errors[which] = refused.value  # noqa: B023

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, 0)
                await fake.wait_requests(len(fake.requests) + 1, 10)
                nursery.start_soon(ask, 1)
            owner, follower = errors[0], errors[1]
            assert follower.response.headers["x-attached-to"] == owner.response.headers["x-trace-id"]
            assert (owner.code, owner.param) == ("context_length_exceeded", "messages")
            assert (follower.code, follower.param, follower.message) == (owner.code, owner.param, owner.message)
        for client in clients:
            await client.close()
    assert len(fake.requests) == 2


async def test_a_duplicate_on_an_instance_without_nats_gets_the_failed_runs_error_at_once(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """Without NATS, the duplicate waits for the run's row: one that said `failed` was waited
    past, for minutes, as if the run were still going."""
    fake = OpenAIBackend(default=Script(status=500, header_delay=1.0))
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"model": "m", "messages": MESSAGES}
    answers: dict[str, httpx.Response] = {}
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as first, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url
    ) as without_nats, httpx.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:

        async def ask(name: str, url: str) -> None:
            answers[name] = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)

        nursery.start_soon(ask, "owner", first)
        await fake.wait_requests(1, 10)
        with trio.fail_after(10):
            await ask("follower", without_nats)
    assert answers["owner"].status_code == 502
    follower = answers["follower"]
    assert follower.headers["x-attached-to"] == answers["owner"].headers["x-trace-id"]
    assert follower.status_code == 502 and "500" in follower.json()["error"]["message"], follower.text
    assert len(fake.requests) == 1


async def test_a_keyed_run_that_failed_may_be_retried_at_once(stack: Stack) -> None:
    stack.fake.push(Script(status=500))
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    async with httpx.AsyncClient(base_url=stack.url, timeout=20) as client:
        failed = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, headers=headers)
        assert failed.status_code == 502
        retried = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, headers=headers)
        assert retried.status_code == 200, retried.text
        assert retried.json()["choices"][0]["message"]["content"] == "Once upon a time"
    assert len(stack.fake.requests) == 2


async def test_answers_the_shutdown_cut_are_stored_failed_with_its_error(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """`cancelled` means the client left; a run the server stopped is `failed`, with why
    (and its key may be retried)."""
    fake = OpenAIBackend(default=Script(tokens=[f" w{i}" for i in range(400)], pace=0.05))  # 20 s: past any grace
    traces: dict[str, str] = {}
    async with fake.serve() as server, httpx.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:
        async with running_gateway(
            backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url,
            shutdown_grace_seconds=1.0,
        ) as url:
            for name, headers in (("plain", {}), ("keyed", {"Idempotency-Key": str(uuid.uuid4())})):
                started = trio.Event()

                async def read(name: str, headers: dict[str, str], started: trio.Event) -> None:
                    body = {"model": "m", "messages": MESSAGES, "stream": True}
                    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
                        traces[name] = response.headers["x-trace-id"]
                        async for _ in response.aiter_lines():
                            started.set()

                nursery.start_soon(read, name, headers, started)
                await started.wait()
    for name, trace_id in traces.items():
        [(status, error)] = rows(pg_database_url, "SELECT status, error FROM chat_log WHERE trace_id = %s", trace_id)
        assert status == "failed" and "shutting down" in error["message"], (name, status, error)  # type: ignore[index]


def stream_frames(text: str) -> list[tuple[int, object]]:
    """`/v1/streams` SSE frames as (seq, event)."""
    found = []
    for block in text.split("\n\n"):
        if block:
            seq, event = decode_event(block.split("data: ", 1)[1].encode())
            found.append((seq, event))
    return found


async def test_a_client_that_saw_the_end_reconnects_and_the_stream_closes_at_once(stack: Stack) -> None:
    stack.fake.set_script(Script(n_tokens=30, pace=0.02))
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    async with httpx.AsyncClient(base_url=stack.url, timeout=20) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            trace_id = response.headers["x-trace-id"]
            with trio.fail_after(5):
                # Read from the run itself while it is live on this instance.
                async with trio.open_nursery() as nursery:
                    results: dict[str, httpx.Response] = {}

                    async def get(name: str, **headers: str) -> None:
                        results[name] = await client.get(f"/v1/streams/{trace_id}", headers=headers)

                    nursery.start_soon(get, "live")
                    nursery.start_soon(functools.partial(get, "live-past-end", **{"Last-Event-ID": "1000"}))
            await response.aread()
        live = stream_frames(results["live"].text)
        end_seq, finished = live[-1]
        assert isinstance(finished, Finished) and finished.winner == "m"
        assert results["live-past-end"].status_code == 204 and results["live-past-end"].text == ""
        await wait_for_row(stack.db, trace_id, "completed")
        with trio.fail_after(5):
            stored = stream_frames((await client.get(f"/v1/streams/{trace_id}")).text)
            assert stored[-1] == (end_seq, finished)  # the same end, live or stored
            for after in (end_seq, end_seq + 7):
                again = await client.get(f"/v1/streams/{trace_id}", headers={"Last-Event-ID": str(after)})
                assert again.status_code == 204 and again.text == ""  # which ends an EventSource
            just_end = await client.get(f"/v1/streams/{trace_id}", params={"after": end_seq - 1})
            assert stream_frames(just_end.text) == [(end_seq, finished)]


async def test_postgres_outage_loses_no_row(
    aio_loop: object, tmp_path: Path, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def drain_failed() -> bool:
        return any("outbox drain paused" in record.getMessage() for record in caplog.records)

    fake = OpenAIBackend(default=Script(tokens=["x", "y"]))
    with EmbeddedPostgres(tmp_path / "pg") as postgres:
        assert postgres.url is not None
        url = postgres.url
        async with fake.serve() as server, running_gateway(
            backend("vllm", server.url, default=True), database_url=url, nats_url=nats_url
        ) as gateway, httpx.AsyncClient(base_url=gateway, timeout=10) as client:
            before = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
            # A fresh gateway may still be connecting its pool: the row can come by the outbox.
            await wait_for_row(url, before.headers["x-trace-id"], "completed", within=30)
            await trio.to_thread.run_sync(postgres.stop)
            during = []
            for _ in range(5):
                response = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True})
                assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
                during.append(response.headers["x-trace-id"])
            ready = await client.get("/ready")
            assert ready.status_code == 503 and "postgres" in ready.json()["reason"]
            assert ready.json()["checks"]["postgres"] == "unreachable"  # no host, port or driver text
            # The outbox took the rows off the NATS queue and failed to write them: they must
            # be back for its next drain, not in 30 s (the consumer's ack_wait) or later.
            await eventually(drain_failed, within=20)
            await trio.to_thread.run_sync(postgres.start)
            with trio.fail_after(20):
                for trace_id in during:
                    await wait_for_row(url, trace_id, "completed", within=20)


@pytest.mark.parametrize("nats_lost", ["before", "mid-run"])
async def test_rows_waiting_in_memory_while_postgres_and_nats_are_down_survive_a_stop(
    aio_loop: object, tmp_path: Path, nats_url: str, nats_lost: str
) -> None:
    """With both stores down the outbox holds rows in memory: a gateway stopped then lost
    them. They are kept in a spool file of its data directory, and the next gateway started
    on it writes them. A NATS lost while the gateway ran (nats-py reconnecting) made each row
    wait for its JetStream publish to time out (5 s), one after another, and the stop cut off
    the rows still waiting: in neither store nor the spool, never written."""
    fake = OpenAIBackend(default=Script(tokens=["x", "y"]))
    lost_nats = EmbeddedNats(tmp_path / "nats")
    lost_nats_url = lost_nats.start()
    if nats_lost == "before":
        lost_nats.stop()
    data_dir = tmp_path / "data"
    with EmbeddedPostgres(tmp_path / "pg") as postgres:
        assert postgres.url is not None
        url = postgres.url
        async with fake.serve() as server:
            config = backend("vllm", server.url, default=True)
            async with running_gateway(config, database_url=url, nats_url=lost_nats_url, data_dir=data_dir) as gateway:
                if nats_lost == "mid-run":
                    await trio.to_thread.run_sync(lost_nats.stop)
                await trio.to_thread.run_sync(postgres.stop)
                async with httpx.AsyncClient(base_url=gateway, timeout=30) as client:
                    during = []
                    for _ in range(3):
                        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
                        assert response.status_code == 200
                        during.append(response.headers["x-trace-id"])
            assert len(list(data_dir.glob("spool/outbox/*/*.json"))) == 1
            await trio.to_thread.run_sync(postgres.start)
            async with running_gateway(config, database_url=url, nats_url=nats_url, data_dir=data_dir):
                for trace_id in during:
                    await wait_for_row(url, trace_id, "completed", within=20)

                async def spool_gone() -> bool:
                    return not list(data_dir.glob("spool/outbox/*/*.json"))

                await eventually(spool_gone, within=10)


async def test_an_outbox_spool_that_could_not_be_written_is_written_once_it_can(aio_loop: object, tmp_path: Path) -> None:
    """PostgreSQL and NATS down, and the spool's disk refusing the write (full): the row waits
    in memory. Once the disk takes writes again, the next drain spools it. Before, a failed
    write was not tried again until another row came, so a process killed meanwhile lost it."""
    directory = tmp_path / "spool"
    outbox = Outbox(store=lambda: None, bus=lambda: None, spool=directory)
    row = LogRow(trace_id="spooled", req_id="r", idempotency_key=None, route="direct", dialect="openai",
                 model="m", backend="b", upstream_model="m", stream=False, request={}, status="completed")
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        [lock] = directory.glob("*.lock")
        blocker = lock.with_suffix(".tmp")
        blocker.mkdir()  # where the spool's new text is written first: every write fails
        await outbox.put(row)
        await trio.sleep(0.5)  # the drain woken by the row tried, and failed
        assert not lock.with_suffix(".json").exists()
        blocker.rmdir()

        async def spooled() -> bool:
            saved = lock.with_suffix(".json")
            return saved.exists() and [item["trace_id"] for item in json.loads(saved.read_text())] == ["spooled"]

        await eventually(spooled, within=3 * Outbox.RETRY_SECONDS)
        nursery.cancel_scope.cancel()


async def test_a_key_served_during_a_postgres_outage_is_replayed_after_it(
    aio_loop: object, tmp_path: Path, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(tokens=["only", " once"]))
    key = str(uuid.uuid4())
    body = {"model": "m", "messages": MESSAGES}
    with EmbeddedPostgres(tmp_path / "pg") as postgres:
        assert postgres.url is not None
        url = postgres.url
        async with fake.serve() as server, running_gateway(
            backend("vllm", server.url, default=True), database_url=url, nats_url=nats_url
        ) as gateway, httpx.AsyncClient(base_url=gateway, timeout=10) as client:
            await trio.to_thread.run_sync(postgres.stop)
            during = await client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
            assert during.status_code == 200  # not deduplicated, but served
            await trio.to_thread.run_sync(postgres.start)
            await wait_for_row(url, during.headers["x-trace-id"], "completed", within=30)
            retry = await client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
            assert retry.headers.get("idempotent-replayed") == "true"
            assert retry.headers["x-replay-of"] == during.headers["x-trace-id"]
            assert retry.json()["choices"][0]["message"]["content"] == "only once"
            assert len(fake.requests) == 1


async def test_a_row_postgres_refuses_does_not_stall_the_outbox(aio_loop: object, pg_database_url: str) -> None:
    async with open_database(pg_database_url) as db:
        await migrate(db)
        store = ChatStore(db)
        outbox = Outbox(store=lambda: store, bus=lambda: None)

        def row(trace_id: str, status: str) -> LogRow:
            return LogRow(trace_id=trace_id, req_id="r", idempotency_key=None, route="direct", dialect="openai",
                          model="m", backend="b", upstream_model="m", stream=False, request={}, status=status)  # type: ignore[arg-type]

        await outbox.put(row("refused", "no-such-status"))  # the CHECK constraint rejects it, forever
        await outbox.put(row("fine", "completed"))
        async with trio.open_nursery() as nursery:
            await nursery.start(outbox.run)
            await wait_for_row(pg_database_url, "fine", "completed")
            nursery.cancel_scope.cancel()
    assert outbox.pending_in_memory == 0
    assert await trio.to_thread.run_sync(rows, pg_database_url, "SELECT 1 FROM chat_log WHERE trace_id = 'refused'") == []


async def test_an_idle_outbox_does_not_poll_yet_sweeps_what_another_instance_left(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    async with open_database(pg_database_url) as db, open_bus(nats_url) as bus:
        await migrate(db)
        await ensure_streams(bus, events_retention=60)
        store = ChatStore(db)
        pulls = 0
        pulled = trio.Event()
        pull = bus.pull

        def counted_pull(*args: Any, **kwargs: Any) -> Any:
            nonlocal pulls
            pulls += 1
            pulled.set()
            return pull(*args, **kwargs)

        bus.pull = counted_pull  # type: ignore[method-assign]
        outbox = Outbox(store=lambda: store, bus=lambda: bus)
        outbox.SWEEP_SECONDS = 5.0
        async with trio.open_nursery() as nursery:
            await nursery.start(outbox.run)
            with trio.fail_after(outbox.RETRY_SECONDS + 5):
                await pulled.wait()  # the start-up drain
            await trio.sleep(outbox.RETRY_SECONDS + 1.0)
            assert pulls == 1  # it found the queue empty, and nothing asked since

            # A row another instance queued while its PostgreSQL was down, and then died.
            trace_id = f"left-{uuid.uuid4().hex[:8]}"
            left = LogRow(trace_id=trace_id, req_id="r", idempotency_key=None, route="direct", dialect="openai",
                          model="m", backend="b", upstream_model="m", stream=False, request={}, status="completed")
            await bus.publish(OUTBOX_SUBJECT, json.dumps(left.to_json()).encode(), msg_id=f"{trace_id}:completed")
            await wait_for_row(pg_database_url, trace_id, "completed", within=outbox.SWEEP_SECONDS + 3)
            nursery.cancel_scope.cancel()


async def test_a_trace_whose_events_workers_publish_is_logged_as_running_at_once(aio_loop: object, pg_database_url: str) -> None:
    # Other instances tell a workflow trace by its row (to read its workers' events through
    # the client's view): that row cannot wait for the running-row delay.
    async with open_database(pg_database_url) as db:
        await migrate(db)
        store = ChatStore(db)
        writer = LogWriter(store=lambda: store, outbox=Outbox(store=lambda: store, bus=lambda: None))
        writer.START_DELAY = 3600.0
        publisher = EventPublisher(bus=lambda: None)

        def journal(trace_id: str, *, publish_events: bool) -> Journal:
            row = LogRow(trace_id=trace_id, req_id="r", idempotency_key=None, route="workflow", dialect="openai",
                         model="m", backend=None, upstream_model="m", stream=True, request={})
            return Journal(row, EventLog(trace_id), writer=writer, publisher=publisher, publish_events=publish_events)

        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            journal("ours", publish_events=True).begin()
            journal("workers", publish_events=False).begin()
            await wait_for_row(pg_database_url, "workers", "running")
            # Written in the same flush, had it been due.
            assert await trio.to_thread.run_sync(rows, pg_database_url, "SELECT 1 FROM chat_log WHERE trace_id = 'ours'") == []
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def gateway_without_nats(script: Script, db: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A gateway on PostgreSQL whose NATS has stopped (it was there once: its URL is real)."""
    fake = OpenAIBackend(default=script)
    nats = EmbeddedNats(tmp_path / "nats")
    nats_url = nats.start()
    nats.stop()
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=db, nats_url=nats_url
    ) as gateway, httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        yield client


async def test_nats_down_direct_chat_still_works(aio_loop: object, pg_database_url: str, tmp_path: Path) -> None:
    async with gateway_without_nats(Script(tokens=["ok"]), pg_database_url, tmp_path) as client:
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True})
        assert response.status_code == 200 and "ok" in response.text
        await wait_for_row(pg_database_url, response.headers["x-trace-id"], "completed")
        ready = await client.get("/ready")
        assert ready.status_code == 503 and "nats" in ready.json()["reason"]


async def test_resume_while_nats_is_down_never_skips_part_of_the_answer(
    aio_loop: object, pg_database_url: str, tmp_path: Path
) -> None:
    # The row holds the answer whole; the live stream had it token by token, so the two are
    # numbered differently, and a position in one is not the same place in the other.
    async with gateway_without_nats(Script(tokens=["a", "b", "c", "d"]), pg_database_url, tmp_path) as client:
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True})
        trace_id = response.headers["x-trace-id"]
        await wait_for_row(pg_database_url, trace_id, "completed")
        [(live_end,)] = rows(pg_database_url, "SELECT last_seq FROM chat_log WHERE trace_id = %s", trace_id)
        assert isinstance(live_end, int) and live_end > 5

        whole = await client.get(f"/v1/streams/{trace_id}?after=0")
        assert whole.status_code == 200, whole.text
        assert "".join(json.loads(p).get("text", "") for p in resumed_payloads(whole.text)) == "abcd"

        midway = await client.get(f"/v1/streams/{trace_id}?after=2")
        assert midway.status_code == 409
        assert midway.json()["error"]["param"] == "after" and "after=0" in midway.json()["error"]["message"]

        # A client that saw every event but the end gets the end, numbered as it was live.
        last = await client.get(f"/v1/streams/{trace_id}", headers={"last-event-id": str(live_end - 1)})
        assert last.status_code == 200
        assert [decode_event(p.encode())[0] for p in resumed_payloads(last.text)] == [live_end]
        assert isinstance(decode_event(resumed_payloads(last.text)[0].encode())[1], Finished)
        done = await client.get(f"/v1/streams/{trace_id}?after={live_end}")
        assert done.status_code == 204 and resumed_payloads(done.text) == []  # nothing left: no content


async def test_a_keyed_anthropic_answer_keeps_its_signature_and_stop_sequence(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A keyed run's events reach its client in several batches; the whole answer's
    signature and stop sequence are in the message, not only the last batch's."""
    fake = AnthropicBackend(default=Script(tokens=["a", "b", "c"], reasoning=["Let", " me", " think"], stop_sequence="###"))
    async with fake.serve() as server, running_gateway(
        backend("claude", server.url, kind="anthropic", default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
        for attempt in range(5):
            message = await client.messages.create(
                model="claude-x", max_tokens=64, messages=[{"role": "user", "content": "Think"}],
                stop_sequences=["###"], thinking={"type": "enabled", "budget_tokens": 32},
                extra_headers={"Idempotency-Key": f"key-{attempt}"},
            )
            thinking = message.content[0]
            assert isinstance(thinking, anthropic.types.ThinkingBlock) and thinking.signature.startswith("EqQB")
            assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "###")
        await client.close()


async def test_caches_never_replay_an_answer_without_what_it_carried(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A thinking block's signature (which Anthropic wants back with the block on the next
    turn) or a stop sequence is not in a cached `ChatCompletion`: such answers are not cached,
    by either cache; a plain answer from the same backend is."""
    fake = AnthropicBackend()
    async with fake.serve() as server, running_gateway(
        backend("claude", server.url, kind="anthropic", default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def ask(cache: str, **extra: Any) -> tuple[httpx.Response, dict[str, Any]]:
            body = {"model": "claude-x", "max_tokens": 64, "messages": [{"role": "user", "content": f"{cache} please"}], **extra}
            reply = await client.post("/v1/messages", json=body, headers={"x-cache": cache})
            assert reply.status_code == 200, reply.text
            return reply, reply.json()

        async def more_cached(before: list[tuple[object, ...]]) -> bool:
            return await trio.to_thread.run_sync(rows, pg_database_url, "SELECT count(*) FROM semantic_cache") > before

        for cache in ("exact", "semantic"):
            fake.set_script(Script(tokens=["ok"], reasoning=["Let me", " think"]))
            thinking = {"thinking": {"type": "enabled", "budget_tokens": 32}}
            _, first = await ask(cache, **thinking)
            assert first["content"][0]["signature"]
            await trio.sleep(0.5)
            again, second = await ask(cache, **thinking)
            assert again.headers.get("x-cache") not in ("hit", "semantic")
            assert second["content"][0]["signature"]

            fake.set_script(Script(tokens=["x"], stop_sequence="###"))
            await ask(cache, stop_sequences=["###"])
            await trio.sleep(0.5)
            again, second = await ask(cache, stop_sequences=["###"])
            assert again.headers.get("x-cache") not in ("hit", "semantic")
            assert (second["stop_reason"], second["stop_sequence"]) == ("stop_sequence", "###")

            fake.set_script(Script(tokens=["plain"]))
            stored_before = await trio.to_thread.run_sync(rows, pg_database_url, "SELECT count(*) FROM semantic_cache")
            plain, _ = await ask(cache, temperature=0)
            await wait_for_row(pg_database_url, plain.headers["x-trace-id"], "completed")  # the exact cache's commit
            if cache == "semantic":  # stored once the client has its answer
                await eventually(functools.partial(more_cached, stored_before), within=10)
            again, second = await ask(cache, temperature=0)
            assert again.headers["x-cache"] in ("hit", "semantic") and second["content"][0]["text"] == "plain"
        assert len(fake.requests) == 10


async def test_caches_never_replay_a_generate_answer_without_its_context(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """An Ollama `/api/generate` answer carries `context`, the tokens a client sends back to
    go on with the conversation; a cached answer has none, so it is not cached. An Ollama
    chat (no `context`) from the same backend is."""
    fake = OllamaBackend(default=Script(tokens=["4"], usage=Usage(3, 1)))
    async with fake.serve() as server, running_gateway(
        backend("ol", server.url, kind="ollama", default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        for cache in ("exact", "semantic"):
            async with ollama.AsyncClient(host=url, headers={"x-cache": cache}) as client:
                replies = []
                for _ in range(2):
                    replies.append(await client.generate(model="llama3.2", prompt=f"2+2? ({cache})", options={"temperature": 0}))
                    await trio.sleep(0.5)  # the first answer's cache writes
                assert [reply.context for reply in replies] == [[1, 2, 3, 4]] * 2
                before = len(fake.requests)
                for _ in range(2):
                    chat = await client.chat(
                        model="llama3.2", messages=[{"role": "user", "content": f"2+2? ({cache})"}], options={"temperature": 0}
                    )
                    assert chat.message.content == "4"
                    await trio.sleep(0.5)
                assert len(fake.requests) == before + 1  # the chat's second ask was a hit


async def test_semantic_cache_replays_a_paraphrase_but_not_a_different_conversation(stack: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="x", max_retries=0)
    headers = {"x-cache": "semantic"}
    ask = [{"role": "user", "content": "How do I reset my password?"}]
    stored_before = rows(stack.db, "SELECT count(*) FROM semantic_cache")
    first = await client.chat.completions.with_raw_response.create(model="m", messages=ask, extra_headers=headers)  # type: ignore[arg-type]
    assert first.headers.get("x-cache") != "semantic"

    async def stored() -> bool:  # the answer is stored once the client has it
        return await trio.to_thread.run_sync(rows, stack.db, "SELECT count(*) FROM semantic_cache") > stored_before

    await eventually(stored, within=10)
    again = await client.chat.completions.with_raw_response.create(model="m", messages=ask, stream=True, extra_headers=headers)  # type: ignore[arg-type]
    assert again.headers["x-cache"] == "semantic"
    chunks = [chunk async for chunk in again.parse()]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Once upon a time"
    # Same last message, different earlier turn: a different conversation, so a miss.
    other = [{"role": "user", "content": "Tell me about bananas."}, {"role": "assistant", "content": "They are yellow."},
             {"role": "user", "content": "How do I reset my password?"}]
    third = await client.chat.completions.with_raw_response.create(model="m", messages=other, extra_headers=headers)  # type: ignore[arg-type]
    assert third.headers.get("x-cache") != "semantic"
    assert len(stack.fake.requests) == 2
    await client.close()


async def test_streams_and_the_exact_cache_are_per_api_key(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    from tests.test_auth_helpers import bearer, new_key, wait_for_key

    fake = OpenAIBackend(default=Script(tokens=["secret", " answer"]))
    alice = await new_key(pg_database_url, "alice")
    bob = await new_key(pg_database_url, "bob")
    body = {"model": "m", "messages": MESSAGES, "temperature": 0}
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        await wait_for_key(url, alice)
        mine = await client.post("/v1/chat/completions", json=body, headers={**bearer(alice), "x-cache": "exact"})
        trace_id = mine.headers["x-trace-id"]
        await wait_for_row(pg_database_url, trace_id, "completed")
        theirs = await client.post("/v1/chat/completions", json=body, headers={**bearer(bob), "x-cache": "exact"})
        assert theirs.headers["x-cache"] == "miss"  # bob does not get alice's cached answer
        again = await client.post("/v1/chat/completions", json=body, headers={**bearer(alice), "x-cache": "exact"})
        assert again.headers["x-cache"] == "hit"
        assert (await client.get(f"/v1/streams/{trace_id}", headers=bearer(bob))).status_code == 404
        own = await client.get(f"/v1/streams/{trace_id}", headers=bearer(alice))
        assert own.status_code == 200 and "secret" in own.text


def test_a_stored_completion_reads_back_whole_usage_included() -> None:
    """What a cache hit or a resumed stream replays is what the backend answered: the
    prompt cache's reads and writes too (an Anthropic client is billed by them)."""
    completion = ChatCompletion(
        id="chatcmpl-1", model="m", created=7,
        choices=[Choice(index=0, content="hi", reasoning="r", tool_calls=[ToolCall("c1", "f", "{}")],
                        finish_reason=FinishReason.TOOL_CALLS)],
        usage=DomainUsage(prompt_tokens=160, completion_tokens=5, cached_tokens=50, cache_write_tokens=100,
                          reasoning_tokens=2),
    )
    assert completion_from_json(json.loads(json.dumps(completion_to_json(completion)))) == completion


async def test_a_keyed_run_whose_gateway_was_killed_is_failed_and_may_run_again(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """SIGKILL leaves a keyed run `running` with nobody to finish it. Once its process is
    silent past `dead_after` (aged here in the database rather than waited for), a live
    gateway fails its row and key: a follower learns it within a heartbeat, and a retry with
    the key runs again, instead of waiting 300 s then 1800 s."""
    fake = OpenAIBackend(default=Script(n_tokens=400, pace=0.05))
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "DATABASE_URL", "NATS_URL"))}
    async with fake.serve() as server, httpx.AsyncClient(timeout=30) as client:
        env |= {"LLM_BASE_URL": f"{server.url}/v1", "DATABASE_URL": pg_database_url, "NATS_URL": nats_url}
        doomed = await trio.lowlevel.open_process(
            [sys.executable, "-m", "proxy", "serve", "--bind", f"127.0.0.1:{port}"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            with trio.fail_after(30):
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                            break
                    await trio.sleep(0.1)
            async with client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=key) as first:
                trace_id = first.headers["x-trace-id"]
                lines = first.aiter_lines()
                for _ in range(4):
                    await lines.__anext__()
                doomed.kill()
        finally:
            doomed.kill()
            await doomed.wait()

        async with running_gateway(
            backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
        ) as url:
            followed: list[str] = []

            async def follow() -> None:
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=key) as response:
                    assert response.headers["x-attached-to"] == trace_id
                    if response.status_code == 503:  # none of its content was journalled: a real status
                        followed.append("data: " + (await response.aread()).decode())
                        return
                    followed.extend([line async for line in response.aiter_lines() if line.startswith("data: ")])

            with trio.fail_after(20):  # a heartbeat or two, not `follow_silence` (300 s)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(follow)
                    await trio.sleep(1)
                    aged = await trio.to_thread.run_sync(
                        rows, pg_database_url, "UPDATE gateway_instances SET seen_at = now() - interval '1 hour'"
                        " WHERE id = (SELECT owner FROM idempotency_keys WHERE trace_id = %s) RETURNING id", trace_id,
                    )
                    assert len(aged) == 1
            # The key is failed (and the row, if the run lived long enough to write one).
            assert rows(pg_database_url, "SELECT status FROM idempotency_keys WHERE trace_id = %s", trace_id) == [("failed",)]
            assert rows(pg_database_url, "SELECT status FROM chat_log WHERE trace_id = %s", trace_id) in ([], [("failed",)])
            assert "stopped (killed or crashed)" in json.loads(followed[-1][6:])["error"]["message"]
            # Its events can be read, and end (within a heartbeat, not `follow_silence`) with
            # what its row says, though its process never published `finished`.
            with trio.fail_after(15):
                resumed = await client.get(f"{url}/v1/streams/{trace_id}")
            frames = stream_frames(resumed.text)
            assert [seq for seq, _ in frames] == list(range(1, len(frames) + 1)) and len(frames) >= 2
            assert isinstance(frames[-1][1], Finished) and frames[-1][1].status == "failed"

            fake.push(Script(n_tokens=400))
            again = await client.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, headers=key)
            assert again.status_code == 200 and "x-attached-to" not in again.headers
            assert len(again.json()["choices"][0]["message"]["content"].split()) == 400
    assert len(fake.requests) == 2


async def test_only_instances_gone_silent_have_their_running_chats_failed(aio_loop: object, pg_database_url: str) -> None:
    async with open_database(pg_database_url) as db:
        await migrate(db)
        store = ChatStore(db)
        for instance in ("alive", "dead"):
            await store.heartbeat(instance, first=True)
            for n in range(2):
                trace_id = f"{instance}-{n}"
                await store.start(LogRow(trace_id=trace_id, req_id="r", idempotency_key=f"k-{trace_id}", route="direct",
                                         dialect="openai", model="m", backend="b", upstream_model="m", stream=True,
                                         request={}, owner=instance))
                claim = await store.claim(f"k-{trace_id}", "r", trace_id, stale_after=1800, owner=instance)
                assert claim.outcome == "owner"
        await db.execute("UPDATE gateway_instances SET seen_at = now() - interval '40 seconds' WHERE id = 'dead'")
        assert await store.sweep_dead_instances(30, judge="alive") == 2
        assert await store.sweep_dead_instances(30, judge="alive") == 0  # swept once, and forgotten
        found = await db.fetch("SELECT trace_id, status, error->>'message' FROM chat_log ORDER BY trace_id")
        keys = await db.fetch("SELECT trace_id, status FROM idempotency_keys ORDER BY trace_id")
    assert [(t, s) for t, s, _ in found] == [("alive-0", "running"), ("alive-1", "running"),
                                              ("dead-0", "failed"), ("dead-1", "failed")]
    assert all("killed or crashed" in message for t, _, message in found if t.startswith("dead"))
    assert keys == [("alive-0", "running"), ("alive-1", "running"), ("dead-0", "failed"), ("dead-1", "failed")]


async def test_after_a_postgres_stall_no_live_instance_is_declared_dead(aio_loop: object, pg_database_url: str) -> None:
    """A stall of PostgreSQL past `dead_after` silences every instance alike. The first to
    beat after it (aged here in the database) declared the others dead: it failed their live
    runs and a retry took their keys over, calling the backend again. Now an instance judges
    others only once it has beaten promptly for `dead_after` since; and one declared dead all
    the same says its runs still going on run again at its next beat."""
    async with open_database(pg_database_url) as db:
        await migrate(db)
        store = ChatStore(db)
        a, b = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
        traces = {name: f"{name}-run" for name in (a, b)}
        for instance, trace_id in traces.items():
            assert await store.heartbeat(instance, late=1, first=True)
            await store.start(LogRow(trace_id=trace_id, req_id="r", idempotency_key=f"k-{trace_id}", route="direct",
                                     dialect="openai", model="m", backend="b", upstream_model="m", stream=True,
                                     request={}, owner=instance))
            assert (await store.claim(f"k-{trace_id}", "r", trace_id, stale_after=1800, owner=instance)).outcome == "owner"

        async def statuses() -> list[tuple[str, str]]:
            found = await db.fetch("SELECT status FROM chat_log WHERE trace_id = ANY(%s) ORDER BY trace_id",
                                   (list(traces.values()),))
            keys = await db.fetch("SELECT status FROM idempotency_keys WHERE trace_id = ANY(%s) ORDER BY trace_id",
                                  (list(traces.values()),))
            return [*found, *keys]

        # The stall: nobody beat for 40 s; `a` beats first once it is over.
        await db.execute("UPDATE gateway_instances SET seen_at = seen_at - interval '40 seconds' WHERE id = ANY(%s)",
                         ([a, b],))
        assert await store.heartbeat(a, late=1)
        assert await store.sweep_dead_instances(3, judge=a, late=1) == 0
        retry = await store.claim(f"k-{traces[b]}", "r", "retry", stale_after=1800, owner=a, owner_silence=3,
                                  judge=a, late=1)
        assert retry == Claim("running", traces[b])  # followed, not run again
        assert await statuses() == [("running",)] * 4

        # `b` stays silent while `a` beats promptly for `dead_after` (aged): now `b` is dead.
        await db.execute("UPDATE gateway_instances SET steady_since = now() - interval '5 seconds' WHERE id = %s", (a,))
        assert await store.sweep_dead_instances(3, judge=a, late=1) == 1
        assert (await statuses())[1::2] == [("failed",), ("failed",)]

        # `b` was alive after all (its heartbeat stuck behind a busy pool): its next beat learns
        # it was declared dead, and its run still going on says running again.
        assert not await store.heartbeat(b, late=1)
        assert await store.reassert(b, [traces[b]]) == 1
        assert await statuses() == [("running",)] * 4
        # Back after a stall of its own, it does not judge others for `dead_after` either.
        await db.execute("UPDATE gateway_instances SET seen_at = now() - interval '40 seconds' WHERE id = %s", (a,))
        assert await store.sweep_dead_instances(3, judge=b, late=1) == 0


async def test_a_gateway_out_of_a_postgres_stall_declares_no_live_instance_dead(
    aio_loop: object, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stall of PostgreSQL past `dead_after` (aged here in the database: every instance's
    last beat 40 s old) ends with a gateway beating a moment before another live instance
    (whose heartbeat waits for a busy pool). The gateway declared it dead: it failed its
    live run, and a retry with the run's key took it over and called the backend again. Now
    the run stays `running` and the retry attaches to it."""
    monkeypatch.setattr(proxy.gateway, "PersistenceSettings",
                        functools.partial(PersistenceSettings, heartbeat=0.5, dead_after=3.0))
    db = pg_database_url
    other = f"other-{uuid.uuid4().hex}"
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"model": "m", "messages": MESSAGES, "stream": False}
    fake = OpenAIBackend(default=Script(tokens=["Hi"]))
    beating = True

    async def beat() -> None:  # the other instance's heartbeat
        while True:
            if beating:
                await trio.to_thread.run_sync(rows, db, "INSERT INTO gateway_instances (id) VALUES (%s)"
                                              " ON CONFLICT (id) DO UPDATE SET seen_at = now() RETURNING 1", other)
            await trio.sleep(0.5)

    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=db, nats_url=nats_url
    ) as url, httpx.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:
        first = await client.post(f"{url}/v1/chat/completions", json=body, headers=key)
        trace = first.headers["x-trace-id"]
        await eventually(lambda: trio.to_thread.run_sync(
            rows, db, "SELECT 1 FROM chat_log WHERE trace_id = %s AND status = 'completed'", trace))
        # The run, made the other instance's and still going on (its events say it ended, so
        # a retry attached to it has its answer at once).
        nursery.start_soon(beat)
        rows(db, "UPDATE chat_log SET status = 'running', owner = %s WHERE trace_id = %s RETURNING 1", other, trace)
        rows(db, "UPDATE idempotency_keys SET status = 'running', owner = %s WHERE trace_id = %s RETURNING 1", other, trace)
        await trio.sleep(3.5)  # the key is older than `dead_after`; the gateway has beaten steadily
        # The stall ends: every instance silent for 40 s; the other beats again 2 s later.
        beating = False
        rows(db, "UPDATE gateway_instances SET seen_at = seen_at - interval '40 seconds' RETURNING 1")
        retried = await client.post(f"{url}/v1/chat/completions", json=body, headers=key)
        await trio.sleep(2.0)
        beating = True
        await trio.sleep(2.0)
        assert rows(db, "SELECT status FROM chat_log WHERE trace_id = %s", trace) == [("running",)]
        assert rows(db, "SELECT status, trace_id FROM idempotency_keys WHERE trace_id = %s", trace) == [("running", trace)]
        nursery.cancel_scope.cancel()
    assert retried.status_code == 200, retried.text
    assert retried.headers.get("x-attached-to") == trace
    assert len(fake.requests) == 1


async def test_a_live_gateway_declared_dead_says_its_runs_are_running_again(
    aio_loop: object, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another instance declared this gateway dead (its heartbeat late past `dead_after`,
    stuck behind a busy pool) and failed its live keyed run: the row said `failed` (and
    followers ended with that error) while its client was still served, until its outcome
    was written. Now the gateway's next beat learns it, and the run's row and key say
    `running` again: a retry attaches to it."""
    monkeypatch.setattr(proxy.gateway, "PersistenceSettings",
                        functools.partial(PersistenceSettings, heartbeat=0.5, dead_after=3.0))
    db = pg_database_url
    fake = OpenAIBackend(default=Script(n_tokens=120, pace=0.05))
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=db, nats_url=nats_url
    ) as url, httpx.AsyncClient(timeout=30) as client, open_database(db) as judge_db:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=key) as answer:
            trace = answer.headers["x-trace-id"]
            lines = answer.aiter_lines()
            await eventually(lambda: trio.to_thread.run_sync(
                rows, db, "SELECT 1 FROM chat_log WHERE trace_id = %s AND status = 'running'", trace))
            # A steady instance finds the gateway's last beat 40 s old, and sweeps it.
            async with judge_db.transaction() as tx:
                judge = ChatStore(tx)  # type: ignore[arg-type]
                await judge.heartbeat("judge", first=True)
                await tx.execute("UPDATE gateway_instances SET seen_at = now() - interval '40 seconds'"
                                 " WHERE id = (SELECT owner FROM chat_log WHERE trace_id = %s)", (trace,))
                assert await judge.sweep_dead_instances(3, judge="judge") == 1
            assert rows(db, "SELECT status FROM chat_log WHERE trace_id = %s", trace) == [("failed",)]

            def running_again() -> bool:
                found = rows(db, "SELECT c.status, k.status FROM chat_log c JOIN idempotency_keys k USING (trace_id)"
                                 " WHERE trace_id = %s", trace)
                return found == [("running", "running")]

            await eventually(lambda: trio.to_thread.run_sync(running_again), within=3)
            retried = await client.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, headers=key)
            text = "".join([line async for line in lines])
    assert retried.status_code == 200 and retried.headers.get("x-attached-to") == trace
    assert "[DONE]" in text and '"error"' not in text
    assert rows(db, "SELECT status FROM chat_log WHERE trace_id = %s", trace) == [("completed",)]
    assert len(fake.requests) == 1


async def test_an_upgrade_fails_what_the_previous_version_left_running(
    aio_loop: object, pg_database_url: str, tmp_path: Path
) -> None:
    """Rows and keys a gateway from before the instance heartbeat left running have no owner
    to be swept by: the migration that brings owners fails them (not a workflow's, whose job
    lives on in its worker)."""
    shipped = load_migrations()
    before = tmp_path / "sql"
    before.mkdir()
    for migration in shipped:
        if migration.name < "0007":
            (before / f"{migration.name}.sql").write_text(migration.sql)
    async with open_database(pg_database_url) as db:
        await migrate(db, directory=before)
        for trace_id, route in (("direct-1", "direct"), ("flow-1", "workflow"), ("done-1", "direct")):
            await db.execute(
                "INSERT INTO chat_log (trace_id, req_id, route, dialect, model, stream, status, request)"
                " VALUES (%s, 'r', %s, 'openai', 'm', true, %s, '{}')",
                (trace_id, route, "completed" if trace_id == "done-1" else "running"),
            )
            await db.execute("INSERT INTO idempotency_keys (key, req_id, trace_id, status) VALUES (%s, 'r', %s, %s)",
                             (f"k-{trace_id}", trace_id, "completed" if trace_id == "done-1" else "running"))
        await migrate(db)
        found = await db.fetch("SELECT trace_id, status FROM chat_log ORDER BY trace_id")
        keys = await db.fetch("SELECT trace_id, status FROM idempotency_keys ORDER BY trace_id")
    assert found == [("direct-1", "failed"), ("done-1", "completed"), ("flow-1", "running")]
    assert keys == [("direct-1", "failed"), ("done-1", "completed"), ("flow-1", "running")]


async def test_a_keyless_run_killed_before_its_row_ends_its_readers_soon(
    aio_loop: object, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keyless run killed within its first quarter second published events but never its
    `running` row, and nothing holds a key the heartbeat sweep could fail. With PostgreSQL
    up, a reader on another instance ends the stream `failed` once the trace is still
    rowless `dead_after` past its first event, instead of waiting `follow_silence` (300 s)."""
    monkeypatch.setattr(proxy.gateway, "PersistenceSettings",
                        functools.partial(PersistenceSettings, heartbeat=0.5, dead_after=3.0))
    trace_id = uuid.uuid4().hex
    fake = OpenAIBackend(default=Script(tokens=["hi"]))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url, httpx.AsyncClient(timeout=30) as client:
        async with open_bus(nats_url) as bus:
            await bus.publish(f"evt.chat.{trace_id}", b'{"seq":1,"type":"role","role":"assistant"}')
            await bus.publish(f"evt.chat.{trace_id}", b'{"seq":2,"type":"token","text":"Once","task":"main"}')
        with trio.fail_after(15):
            resumed = await client.get(f"{url}/v1/streams/{trace_id}")
    frames = stream_frames(resumed.text)
    # As a run failing live ends: its error, then `finished` with reason `error`.
    assert [seq for seq, _ in frames] == [1, 2, 3, 4]
    assert isinstance(frames[-2][1], StreamFailed) and "killed or crashed" in frames[-2][1].error.message
    assert isinstance(frames[-1][1], Finished) and frames[-1][1].status == "failed" and frames[-1][1].reason == "error"


async def test_a_failed_run_rebuilt_from_its_row_ends_with_its_error() -> None:
    """Without its events (NATS down, past retention), a failed run read from its row ends as
    it did live: its error, then `finished` with reason `error` (not `stop`)."""
    stored = StoredRun(status="failed", completion=completion_from_json({"choices": [{"content": "Once"}]}),
                       error={"kind": "BACKEND", "message": "The backend broke."}, tenant=None, route="direct")
    send, receive = trio.open_memory_channel[tuple[int, object]](10)
    async with send:
        await _rebuilt_events("t", stored, 0, send)
    frames = [frame async for frame in receive]
    assert [seq for seq, _ in frames] == [1, 2, 3, 4]
    error, finished = frames[-2][1], frames[-1][1]
    assert isinstance(error, StreamFailed) and error.error.message == "The backend broke."
    assert isinstance(finished, Finished) and (finished.reason, finished.status) == ("error", "failed")
