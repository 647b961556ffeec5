"""Anthropic's Message Batches API with the official `anthropic` SDK
(`client.messages.batches`), on a gateway with PostgreSQL and NATS in front of a fake backend:
each request runs as a `/v1/messages` call of the batch's key, the results match the
requests' custom_ids, a malformed batch is refused naming its request, a cancel stops the
rest, and each batch is its key's alone."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
import trio
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse

from proxy.config import BatchSettings
from proxy.dialects.anthropic import batches as wire
from proxy.dialects.openai.batches import new_file_id
from proxy.infra.batch_store import BatchStore
from proxy.infra.migrations import load_migrations, migrate
from proxy.infra.postgres import open_database
from tests.fakes import AnthropicBackend, OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import eventually, gateway, new_key, sql, wait_for_key
from tests.test_batches import ECHO, chats, status_of, trio_value
from tests.test_responses_stored import Stack, journaled_stack

pytest_plugins = ["tests.infra_servers", "tests.rag_fixtures"]


def request(custom_id: str, text: str | None = None, model: str = "m") -> Any:  # the SDK's `Request`
    return {"custom_id": custom_id, "params": {
        "model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text or f"answer {custom_id}"}],
    }}


async def until_ended(client: anthropic.AsyncAnthropic, batch_id: str, within: float = 20.0) -> MessageBatch:
    with trio.fail_after(within):
        while True:
            batch = await client.messages.batches.retrieve(batch_id)
            if batch.processing_status == "ended":
                return batch
            await trio.sleep(0.05)


async def results_of(client: anthropic.AsyncAnthropic, batch_id: str) -> dict[str, MessageBatchIndividualResponse]:
    return {line.custom_id: line async for line in await client.messages.batches.results(batch_id)}


def sdk(url: str, key: str = "x") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0)


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    async with journaled_stack(pg_database_url, nats_url, OpenAIBackend(default=ECHO)) as built:
        yield built


async def test_a_message_batch_runs_each_request_and_its_results_match_the_custom_ids(stack: Stack) -> None:
    client = sdk(stack.url)
    created = await client.messages.batches.create(requests=[request(name) for name in ("first", "second", "third")])
    assert created.id.startswith("msgbatch_") and created.type == "message_batch"
    assert created.processing_status == "in_progress" and created.results_url is None
    assert created.request_counts.processing == 3 and created.request_counts.succeeded == 0
    assert (created.expires_at - created.created_at).total_seconds() == pytest.approx(86400, abs=2)
    done = await until_ended(client, created.id)
    counts = done.request_counts
    assert (counts.processing, counts.succeeded, counts.errored, counts.canceled, counts.expired) == (0, 3, 0, 0, 0)
    assert done.ended_at is not None and done.cancel_initiated_at is None and done.archived_at is None
    assert done.results_url == f"{stack.url}/v1/messages/batches/{done.id}/results"
    results = await results_of(client, done.id)
    assert set(results) == {"first", "second", "third"}
    for custom_id, line in results.items():
        assert line.result.type == "succeeded"
        message = line.result.message
        assert message.type == "message" and message.role == "assistant"
        assert message.content[0].type == "text" and message.content[0].text == f"answer {custom_id}"
        # the fake's 7 prompt tokens, 2 of them cached: Anthropic counts cache reads apart
        usage = message.usage
        assert (usage.input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (5, 2, 3)
    async with httpx.AsyncClient(base_url=stack.url) as http:
        raw = await http.get(f"/v1/messages/batches/{done.id}/results", headers={"x-api-key": "x"})
        proxied = await http.get(f"/v1/messages/batches/{done.id}", headers={
            "x-api-key": "x", "x-forwarded-proto": "https", "x-forwarded-host": "llm.example.com", "x-forwarded-prefix": "/gw",
        })
    assert raw.headers["content-type"] == "application/x-jsonl" and len(raw.text.splitlines()) == 3
    # Behind a proxy, the URL the client reached the gateway by.
    assert proxied.json()["results_url"] == f"https://llm.example.com/gw/v1/messages/batches/{done.id}/results"
    assert chats(stack.fake) == 3  # one backend call each, through the gateway's own routing
    # Anthropic's batches are not OpenAI's: neither their batch nor their requests show there.
    assert [batch.id for batch in (await stack.client.batches.list()).data] == []
    assert (await stack.client.files.list()).data == []
    with pytest.raises(openai.NotFoundError):
        await stack.client.batches.retrieve(done.id)
    deleted = await client.messages.batches.delete(done.id)
    assert (deleted.id, deleted.type) == (done.id, "message_batch_deleted")
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.batches.retrieve(done.id)
    await client.close()


async def test_a_batch_asked_of_a_pipeline_is_a_400_not_the_models_plain_answers(stack: Stack) -> None:
    # A batch's lines carry no headers: `x-pipeline` on the request creating it was dropped,
    # and its lines answered by the model alone, taken by the client for the pipeline's.
    claude = anthropic.AsyncAnthropic(base_url=stack.url, api_key="x", max_retries=0,
                                      default_headers={"x-pipeline": "fanout"})
    with pytest.raises(anthropic.BadRequestError, match="`x-pipeline` routes chats") as refused:
        await claude.messages.batches.create(requests=[request("a")])
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    await claude.close()
    uploaded = await stack.client.files.create(file=("input.jsonl", b'{"custom_id": "a"}\n'), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="`x-workspace` routes chats") as rejected:
        await stack.client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
            extra_headers={"x-workspace": "docs"},
        )
    assert rejected.value.param == "x-workspace"
    assert (await stack.client.batches.list()).data == [] and chats(stack.fake) == 0
    client = sdk(stack.url)
    assert [batch async for batch in client.messages.batches.list()] == []
    await client.close()


async def test_a_malformed_batch_is_refused_naming_its_request(stack: Stack) -> None:
    client = sdk(stack.url)
    missing_tokens = request("b")
    del missing_tokens["params"]["max_tokens"]
    faults: list[tuple[list[dict[str, Any]], str]] = [
        ([request("a"), request("a")], "requests.1.custom_id"),
        ([request("a"), request("b"), request("bad id!")], "requests.2.custom_id"),
        ([request("x" * 65)], "requests.0.custom_id"),
        ([request("a"), missing_tokens], "requests.1.params"),
        ([request("a"), {"custom_id": "b", "params": {**request("b")["params"], "messages": []}}], "requests.1.params"),
        ([], "requests"),
    ]
    for requests, named in faults:
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        body = refused.value.body
        assert isinstance(body, dict) and body["type"] == "error", body
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"].startswith(named + ":"), body
    assert "max_tokens" in str(await _refusal(client, [request("a"), missing_tokens]))
    assert (await client.messages.batches.list()).data == []  # nothing was created
    with pytest.raises(anthropic.NotFoundError) as unknown:
        await client.messages.batches.retrieve("msgbatch_nope")
    assert isinstance(unknown.value.body, dict) and unknown.value.body["error"]["type"] == "not_found_error"
    await client.close()


async def _refusal(client: anthropic.AsyncAnthropic, requests: list[dict[str, Any]]) -> object:
    with pytest.raises(anthropic.BadRequestError) as refused:
        await client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
    return refused.value.body


async def test_cancelling_a_message_batch_cancels_the_requests_not_yet_run(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    slow = OpenAIBackend(default=Script(tokens=["slow"], usage=Usage(2, 1), header_delay=0.5))
    async with journaled_stack(pg_database_url, nats_url, slow) as stack:
        client = sdk(stack.url)
        batch = await client.messages.batches.create(requests=[request(f"r-{i}") for i in range(20)])
        await eventually(lambda: trio_value(chats(stack.fake) >= 1), within=10)
        with pytest.raises(anthropic.BadRequestError):  # still processing: neither deleted nor read
            await client.messages.batches.delete(batch.id)
        async with httpx.AsyncClient(base_url=stack.url) as http:
            early = await http.get(f"/v1/messages/batches/{batch.id}/results", headers={"x-api-key": "x"})
        assert early.status_code == 400 and early.json()["error"]["type"] == "invalid_request_error"
        canceling = await client.messages.batches.cancel(batch.id)
        assert canceling.processing_status in ("canceling", "ended") and canceling.cancel_initiated_at is not None
        ended = await until_ended(client, batch.id)
        counts = ended.request_counts
        assert 1 <= counts.succeeded < 20 and counts.errored == 0 and counts.succeeded + counts.canceled == 20
        results = await results_of(client, batch.id)
        assert set(results) == {f"r-{i}" for i in range(20)}
        kinds = [line.result.type for line in results.values()]
        assert kinds.count("succeeded") == counts.succeeded == chats(stack.fake)
        assert kinds.count("canceled") == counts.canceled
        await trio.sleep(0.6)  # nothing more starts
        assert chats(stack.fake) == counts.succeeded
        with pytest.raises(anthropic.BadRequestError):  # ended: nothing left to cancel
            await client.messages.batches.cancel(batch.id)
        await client.close()


async def test_a_message_batch_is_its_keys_own_and_keeps_to_its_scope(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    async with OpenAIBackend(default=ECHO).serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True)
    ) as url:
        owner, other = await new_key(pg_database_url, "msgbatch-owner", "--models", "m"), await new_key(pg_database_url, "msgbatch-other")
        await wait_for_key(url, owner)
        mine, theirs = sdk(url, owner), sdk(url, other)
        with pytest.raises(anthropic.AuthenticationError) as anonymous:
            await sdk(url, "sk-wrong").messages.batches.list()
        assert isinstance(anonymous.value.body, dict) and anonymous.value.body["type"] == "error"
        batch = await mine.messages.batches.create(requests=[request("ok"), request("outside", model="other")])
        done = await until_ended(mine, batch.id)
        assert (done.request_counts.succeeded, done.request_counts.errored) == (1, 1)
        results = await results_of(mine, batch.id)
        assert results["ok"].result.type == "succeeded"
        refused = results["outside"].result
        assert refused.type == "errored" and refused.error.type == "error"
        assert refused.error.error.type == "permission_error", refused
        # Another key finds none of it.
        assert (await theirs.messages.batches.list()).data == []
        for call in (theirs.messages.batches.retrieve, theirs.messages.batches.cancel, theirs.messages.batches.delete):
            with pytest.raises(anthropic.NotFoundError):
                await call(batch.id)
        async with httpx.AsyncClient(base_url=url) as http:
            peek = await http.get(f"/v1/messages/batches/{batch.id}/results", headers={"x-api-key": other})
        assert peek.status_code == 404 and peek.json()["type"] == "error"
        assert [listed.id for listed in (await mine.messages.batches.list()).data] == [batch.id]
        await mine.close()
        await theirs.close()


async def test_message_batches_page_newest_first_both_ways(stack: Stack) -> None:
    client = sdk(stack.url)
    made = [(await client.messages.batches.create(requests=[request(f"p{i}")])).id for i in range(5)]
    newest_first = made[::-1]
    first = await client.messages.batches.list(limit=2)
    assert [batch.id for batch in first.data] == newest_first[:2] and first.has_more
    assert (first.first_id, first.last_id) == (newest_first[0], newest_first[1])
    assert [batch.id async for batch in await client.messages.batches.list(limit=2)] == newest_first
    older = await client.messages.batches.list(after_id=newest_first[1], limit=2)
    assert [batch.id for batch in older.data] == newest_first[2:4] and older.has_more
    newer = await client.messages.batches.list(before_id=newest_first[3], limit=2)
    assert [batch.id for batch in newer.data] == newest_first[1:3] and newer.has_more
    top = await client.messages.batches.list(before_id=newest_first[1], limit=2)
    assert [batch.id for batch in top.data] == newest_first[:1] and not top.has_more
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.batches.list(limit=1001)
    await client.close()


async def test_a_message_batch_past_its_window_ends_with_its_unrun_requests_expired(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(echo=True, usage=Usage(1, 1), header_delay=0.3))
    custom_ids = [f"r-{i}" for i in range(12)]
    async with fake.serve() as server:
        config = backend("vllm", server.url, default=True)
        async with gateway(pg_database_url, nats_url, config, shutdown_grace_seconds=0.1) as url:
            client = sdk(url)
            batch = await client.messages.batches.create(requests=[request(custom_id) for custom_id in custom_ids])
            await eventually(lambda: status_of(pg_database_url, batch.id, "in_progress"), within=10)
            await client.close()
        # Resumed with less than a second of its 24 h left.
        await sql(pg_database_url, "UPDATE batches SET expires_at = now() + interval '800 milliseconds' WHERE id = %s", batch.id)
        async with gateway(pg_database_url, nats_url, config, batches=BatchSettings(concurrency=1)) as url:
            client = sdk(url)
            ended = await until_ended(client, batch.id)
            results = await results_of(client, batch.id)
            await client.close()
    counts = ended.request_counts
    assert counts.expired >= 1 and counts.errored == 0 and counts.canceled == 0
    assert counts.succeeded + counts.expired == len(custom_ids) and ended.ended_at is not None
    assert set(results) == set(custom_ids)
    kinds = [line.result.type for line in results.values()]
    assert (kinds.count("succeeded"), kinds.count("expired")) == (counts.succeeded, counts.expired)


async def test_a_message_batch_keeps_to_the_gateways_batch_limits(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    async with OpenAIBackend(default=ECHO).serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True),
        batches=BatchSettings(file_max_bytes=4000, max_lines=3),
    ) as url:
        client = sdk(url)
        with pytest.raises(anthropic.BadRequestError) as many:
            await client.messages.batches.create(requests=[request(f"r{i}") for i in range(4)])
        assert isinstance(many.value.body, dict) and "at most 3 requests" in many.value.body["error"]["message"]
        with pytest.raises(anthropic.APIStatusError) as large:
            await client.messages.batches.create(requests=[request("big", "x" * 5000)])
        assert large.value.status_code == 413
        assert isinstance(large.value.body, dict) and large.value.body["error"]["type"] == "request_too_large"
        fits = await client.messages.batches.create(requests=[request(f"r{i}") for i in range(3)])
        assert (await until_ended(client, fits.id)).request_counts.succeeded == 3
        await client.close()


async def test_a_big_batchs_results_are_streamed_a_page_at_a_time_each_request_in_its_order(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """Tens of thousands of answers are not built whole in memory: the results come as a
    stream (no Content-Length), read a page of requests at a time, every request once and in
    order across the pages, those its cancel stopped `canceled`."""
    total = 2345  # pages of 1000: the last one short
    names = [f"req-{n}" for n in range(1, total + 1)]
    batch_id = wire.new_batch_id()
    async with open_database(pg_database_url) as db:
        await migrate(db)
        content = wire.input_lines([(name, request(name)["params"]) for name in names])
        await BatchStore(db).add_message_batch(batch_id, new_file_id(), None, None, content, names)
        # Ended before any gateway looks: each request answered but every seventh.
        await db.execute("UPDATE batches SET status = 'cancelled', cancelled_at = now() WHERE id = %s", (batch_id,))
        await db.execute(
            "INSERT INTO batch_lines (batch_id, line, ok, output) SELECT %s, n, true, json_build_object('custom_id', "
            "'req-' || n, 'response', json_build_object('status_code', 200, 'request_id', 'r', 'body', "
            "json_build_object('type', 'message', 'id', 'msg_' || n)), 'error', null) "
            "FROM generate_series(1, %s) n WHERE n %% 7 <> 0", (batch_id, total),
        )
    async with gateway(pg_database_url, nats_url, backend("vllm", "http://127.0.0.1:9", default=True)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http, http.stream(
            "GET", f"/v1/messages/batches/{batch_id}/results", headers={"x-api-key": "x"}
        ) as streamed:
            assert streamed.status_code == 200 and streamed.headers["content-type"] == "application/x-jsonl"
            assert "content-length" not in streamed.headers
            await streamed.aread()
        client = sdk(url)
        lines = [line async for line in await client.messages.batches.results(batch_id)]
        await client.close()
    assert [line.custom_id for line in lines] == names
    for number, line in enumerate(lines, start=1):
        if number % 7 == 0:
            assert line.result.type == "canceled"
        else:
            assert line.result.type == "succeeded" and line.result.message.id == f"msg_{number}"


async def test_results_are_read_without_the_requests_again_and_of_a_batch_made_before_0023(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A read of the results reads each page's own `custom_id`s and answers, not the batch's
    requests (megabytes of bodies, parsed again at every read); a batch made before migration
    0023, or by an instance not yet upgraded, has its `custom_id`s taken from its requests."""
    names = [f"id-{n}" for n in range(1, 1201)]
    made, old = wire.new_batch_id(), wire.new_batch_id()
    async with open_database(pg_database_url) as db:
        await migrate(db)
        store = BatchStore(db)
        for batch_id in (made, old):
            content = wire.input_lines([(name, request(name)["params"]) for name in names])
            await store.add_message_batch(batch_id, new_file_id(), None, None, content, names)
            await db.execute("UPDATE batches SET status = 'cancelled', cancelled_at = now() WHERE id = %s", (batch_id,))
            await db.execute(
                "INSERT INTO batch_lines (batch_id, line, ok, output) SELECT %s, n, true, json_build_object("
                "'response', json_build_object('status_code', 200, 'body', json_build_object('type', 'message', "
                "'id', 'msg_' || n))) FROM generate_series(2, %s, 2) n", (batch_id, len(names)),
            )
        await db.execute(
            "UPDATE files f SET content = ''::bytea FROM batches b WHERE b.id = %s AND f.id = b.input_file_id", (made,)
        )
        await db.execute("DELETE FROM message_batch_requests WHERE batch_id = %s", (old,))
        [filling] = [migration for migration in load_migrations() if migration.version == 23]
        await db.execute(filling.sql)
        assert await db.fetchval("SELECT count(*) FROM message_batch_requests WHERE batch_id = %s", (old,)) == len(names)
        await db.execute("DELETE FROM message_batch_requests WHERE batch_id = %s", (old,))
    async with gateway(pg_database_url, nats_url, backend("vllm", "http://127.0.0.1:9", default=True)) as url:
        client = sdk(url)
        for batch_id in (made, old, old):
            lines = [line async for line in await client.messages.batches.results(batch_id)]
            assert [line.custom_id for line in lines] == names
            assert [line.result.type for line in lines] == ["canceled", "succeeded"] * (len(names) // 2)
            assert lines[-1].result.type == "succeeded" and lines[-1].result.message.id == f"msg_{len(names)}"
        await client.close()


def test_each_recorded_answer_is_rendered_as_anthropics_result() -> None:
    names = ("ok", "refused", "bug", "late", "never")
    recorded = {
        1: {"custom_id": "ok", "response": {"status_code": 200, "request_id": "r1", "body": {"type": "message"}}},
        2: {"custom_id": "refused", "response": {"status_code": 403, "request_id": "r2", "body": {
            "type": "error", "error": {"type": "permission_error", "message": "not yours"}}}},
        # The engine's own 500 for a line it could not answer: OpenAI-shaped, not Anthropic's.
        3: {"custom_id": "bug", "response": {"status_code": 500, "request_id": "r3", "body": {
            "error": {"message": "Internal gateway error", "type": "server_error"}}}},
        4: {"custom_id": "late", "response": None, "error": {"code": "batch_expired", "message": "too late"}},
    }
    requests = [(name, recorded.get(number)) for number, name in enumerate(names, start=1)]
    lines = [json.loads(line) for line in wire.results(requests).splitlines()]
    assert [line["custom_id"] for line in lines] == ["ok", "refused", "bug", "late", "never"]
    results = [line["result"] for line in lines]
    assert results[0] == {"type": "succeeded", "message": {"type": "message"}}
    assert results[1]["error"] == {"type": "error", "error": {"type": "permission_error", "message": "not yours"}, "request_id": "r2"}
    assert results[2]["error"]["error"] == {"type": "api_error", "message": "Internal gateway error"}
    assert (results[3], results[4]) == ({"type": "expired"}, {"type": "canceled"})


async def test_a_beta_message_batch_passes_its_betas_to_an_anthropic_backend(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = AnthropicBackend(default=Script(tokens=["ok"], usage=Usage(3, 1)))
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("claude", server.url, kind="anthropic", default=True)
    ) as url:
        client = sdk(url)
        batch = await client.beta.messages.batches.create(
            requests=[request("beta", model="claude-x")], betas=["context-1m-2025-08-07", "message-batches-2024-09-24"],
        )
        ended = await until_ended(client, batch.id)
        assert ended.request_counts.succeeded == 1
        [line] = [line async for line in await client.beta.messages.batches.results(batch.id)]
        assert line.custom_id == "beta" and line.result.type == "succeeded"
        await client.close()
    [sent] = [r for r in fake.requests if r.path.startswith("/v1/messages")]
    assert sent.headers["anthropic-beta"] == "context-1m-2025-08-07"
    assert isinstance(sent.json, dict) and "_anthropic_beta" not in sent.json


async def test_a_message_batch_whose_gateway_stops_is_finished_by_the_next_each_request_once(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(echo=True, usage=Usage(1, 1), header_delay=0.3))
    custom_ids = [f"r-{i}" for i in range(10)]
    async with fake.serve() as server:
        config = backend("vllm", server.url, default=True)
        async with gateway(pg_database_url, nats_url, config, shutdown_grace_seconds=0.2) as url:
            client = sdk(url)
            batch = await client.messages.batches.create(requests=[request(custom_id) for custom_id in custom_ids])
            await eventually(lambda: trio_value(chats(fake) >= 2), within=10)
            await client.close()
        answered = (await sql(pg_database_url, "SELECT count(*) FROM batch_lines WHERE batch_id = %s", batch.id))[0][0]
        assert answered < len(custom_ids)
        async with gateway(pg_database_url, nats_url, config) as url:
            client = sdk(url)
            ended = await until_ended(client, batch.id, within=30)
            results = await results_of(client, batch.id)
            await client.close()
    assert ended.request_counts.succeeded == len(custom_ids) == len(results)
    for custom_id, line in results.items():
        assert line.result.type == "succeeded"
        assert line.result.message.content[0].type == "text"
        assert line.result.message.content[0].text == f"answer {custom_id}"


async def test_creating_and_polling_a_message_batch_spend_none_of_its_keys_rate_limit(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    async with OpenAIBackend(default=ECHO).serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True)
    ) as url:
        key = await new_key(pg_database_url, "msgbatch-rpm", "--rpm", "2")
        await wait_for_key(url, key)
        client = sdk(url, key)
        # Its two requests are the key's two requests of the minute; the API calls around them are not metered.
        batch = await client.messages.batches.create(requests=[request("a"), request("b")])
        ended = await until_ended(client, batch.id)
        assert ended.request_counts.succeeded == 2
        assert {line.result.type for line in (await results_of(client, batch.id)).values()} == {"succeeded"}
        with pytest.raises(anthropic.RateLimitError):  # the minute's requests are spent
            await client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        await client.close()


async def test_a_message_batchs_results_are_archived_29_days_after_it_was_created(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """As Anthropic's: past 29 days a batch is archived (`archived_at`), its results a 404 and
    its requests and answers deleted, while the batch and its counts stay until deleted; a
    younger batch's results are read as before."""
    fake = OpenAIBackend(default=ECHO)
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True), batches=BatchSettings(poll_seconds=0.2)
    ) as url:
        client = sdk(url)
        old = await until_ended(client, (await client.messages.batches.create(requests=[request("a"), request("b")])).id)
        young = await until_ended(client, (await client.messages.batches.create(requests=[request("c")])).id)
        await sql(pg_database_url, "UPDATE batches SET created_at = now() - interval '30 days' WHERE id = %s", old.id)
        await sql(pg_database_url, "UPDATE batches SET created_at = now() - interval '28 days' WHERE id = %s", young.id)

        async def archived() -> MessageBatch | None:
            found = await client.messages.batches.retrieve(old.id)
            return found if found.archived_at is not None else None

        found = await eventually(archived, within=10)
        assert found.request_counts.succeeded == 2 and found.processing_status == "ended"
        with pytest.raises(anthropic.NotFoundError) as gone:
            await client.messages.batches.results(old.id)
        assert "29 days" in gone.value.message
        [(input_file,)] = await sql(pg_database_url, "SELECT input_file_id FROM batches WHERE id = %s", old.id)
        left = await sql(
            pg_database_url, "SELECT (SELECT count(*) FROM batch_lines WHERE batch_id = %s), "
            "(SELECT count(*) FROM message_batch_requests WHERE batch_id = %s), (SELECT count(*) FROM files WHERE id = %s)",
            old.id, old.id, input_file,
        )
        assert left == [(0, 0, 0)]
        assert (await client.messages.batches.retrieve(young.id)).archived_at is None
        assert set(await results_of(client, young.id)) == {"c"}
        assert [batch.id for batch in (await client.messages.batches.list()).data] == [young.id, old.id]
        assert (await client.messages.batches.delete(old.id)).type == "message_batch_deleted"
        await client.close()
