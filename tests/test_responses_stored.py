"""What the Responses API keeps, with the official `openai` SDK: deleting a response
(`client.responses.delete`) and referring to the items of kept ones (`item_reference`), on a
gateway with its journal (PostgreSQL, NATS)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import trio

from proxy.config import SemanticCacheSettings
from proxy.dialects import openai as openai_dialect
from proxy.infra.chat_store import ChatStore, LogRow, completion_from_json
from proxy.infra.embedder import LocalEmbedder
from proxy.infra.migrations import migrate
from proxy.infra.nats import open_bus
from proxy.infra.postgres import open_database
from proxy.services.chat import RequestMeta
from proxy.services.semantic_cache import SemanticCache
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import eventually, gateway, keys_cli, new_key, sql, wait_for_key
from tests.test_persistence import wait_for_row

pytest_plugins = ["tests.infra_servers", "tests.rag_fixtures"]

TOKENS = [f" w{i}" for i in range(20)]
QUICK = Script(tokens=["The secret", " is 42."], usage=Usage(5, 2))


@dataclass
class Stack:
    url: str
    db: str
    nats: str
    fake: OpenAIBackend
    client: openai.AsyncOpenAI


@asynccontextmanager
async def journaled_stack(pg_database_url: str, nats_url: str, fake: OpenAIBackend) -> AsyncIterator[Stack]:
    """A gateway with its journal (PostgreSQL and NATS) in front of `fake`, the default
    backend, and an SDK client for it: the stack of every stored-Responses test file."""
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        yield Stack(url, pg_database_url, nats_url, fake, client)
        await client.close()


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    async with journaled_stack(pg_database_url, nats_url, OpenAIBackend(default=QUICK)) as built:
        yield built


def trace(response_id: str) -> str:
    return response_id.removeprefix("resp_")


def backend_saw(fake: OpenAIBackend) -> list[Any]:
    """The messages of the backend's last request, as (role, content)."""
    body = fake.requests[-1].json
    assert isinstance(body, dict)
    return [(m["role"], m.get("content")) for m in body["messages"]]


async def test_a_response_read_back_gives_its_reasoning_as_it_was_asked_for(stack: Stack) -> None:
    """A response asked with `reasoning.summary` read back (whole, or its stream again) has
    its reasoning as the summary its client was given, not as another shape of item."""
    stack.fake.set_script(Script(reasoning=["Think", " twice."], tokens=["Done."]))
    asked = await stack.client.responses.create(model="m", input="x", reasoning={"summary": "concise"})
    plain = await stack.client.responses.create(model="m", input="x")
    for made in (asked, plain):
        await wait_for_row(stack.db, trace(made.id), "completed")
    whole = await stack.client.responses.retrieve(asked.id)
    assert [part.text for part in whole.output[0].summary] == ["Think twice."] and not whole.output[0].content
    again = [event async for event in await stack.client.responses.retrieve(asked.id, stream=True)]
    assert "".join(e.delta for e in again if e.type == "response.reasoning_summary_text.delta") == "Think twice."
    unasked = (await stack.client.responses.retrieve(plain.id)).output[0]
    assert unasked.summary == [] and unasked.content and unasked.content[0].text == "Think twice."


# -- delete --------------------------------------------------------------------------------------


async def test_a_deleted_response_is_gone_for_every_read(stack: Stack) -> None:
    answered = await stack.client.responses.create(model="m", input="Remember: the secret is 42.")
    await wait_for_row(stack.db, trace(answered.id), "completed")
    events = f"evt.chat.{trace(answered.id)}"
    async with open_bus(stack.nats) as bus:
        assert await bus.last_message("EVENTS", events) is not None
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        deleted = await http.delete(f"/v1/responses/{answered.id}")
        assert deleted.status_code == 200
        assert deleted.json() == {"id": answered.id, "object": "response.deleted", "deleted": True}
        # Its stream, read again by the Responses route or the gateway's own: gone too.
        again = await http.get(f"/v1/responses/{answered.id}", params={"stream": "true"})
        assert again.status_code == 404
        assert (await http.get(f"/v1/streams/{trace(answered.id)}")).status_code == 404
    with pytest.raises(openai.NotFoundError):
        await stack.client.responses.retrieve(answered.id)
    with pytest.raises(openai.NotFoundError):
        await stack.client.responses.input_items.list(answered.id)
    with pytest.raises(openai.BadRequestError) as continued:
        await stack.client.responses.create(model="m", input="What is the secret?", previous_response_id=answered.id)
    assert isinstance(continued.value.body, dict) and continued.value.body["code"] == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        await stack.client.responses.delete(answered.id)  # deleted already
    # What it said and was asked is no longer in the journal (but how many messages a response
    # continuing it carried over: its question and its answer).
    assert await sql(stack.db, "SELECT result, request, settings FROM chat_log WHERE trace_id = %s", trace(answered.id)) == [
        (None, {"carried": 2}, None)
    ]
    assert len(stack.fake.requests) == 1
    async with open_bus(stack.nats) as bus:  # nor are its events on NATS
        assert await bus.last_message("EVENTS", events) is None


async def test_a_deleted_responses_answer_is_not_served_from_either_cache(stack: Stack) -> None:
    """Asked again, alike (the semantic cache) or exactly (the exact cache), after its delete:
    the backend answers anew, not with the deleted text."""
    for cache, question, again in (
        ("semantic", "How do I reset my password?", "How can I reset my password?"),
        ("exact", "What is the secret?", "What is the secret?"),
    ):
        headers = {"x-cache": cache}
        stack.fake.set_script(Script(tokens=[f"Deleted {cache} answer."]))
        table = "semantic_cache" if cache == "semantic" else "completions_cache"
        before = (await sql(stack.db, f"SELECT count(*) FROM {table}"))[0][0]
        answered = await stack.client.responses.create(model="m", input=question, temperature=0, extra_headers=headers)
        await wait_for_row(stack.db, trace(answered.id), "completed")

        async def cached(table: str = table, before: int = before) -> bool:
            return bool((await sql(stack.db, f"SELECT count(*) FROM {table}"))[0][0] > before)

        await eventually(cached, within=10)  # the semantic one: stored once the client has its answer
        hit = await stack.client.responses.with_raw_response.create(
            model="m", input=again, temperature=0, extra_headers=headers
        )
        assert hit.headers["x-cache"] in ("semantic", "hit")  # cached, before the delete
        await stack.client.responses.delete(answered.id)

        stack.fake.set_script(Script(tokens=["A fresh answer."]))
        asked = len(stack.fake.requests)
        fresh = await stack.client.responses.with_raw_response.create(
            model="m", input=again, temperature=0, extra_headers=headers
        )
        assert fresh.headers.get("x-cache") not in ("semantic", "hit")
        assert fresh.parse().output_text == "A fresh answer."
        assert len(stack.fake.requests) == asked + 1


async def test_a_response_answered_from_a_cache_is_read_back_and_continued_by_its_id(stack: Stack) -> None:
    """A cache hit is answered under the id of the response the cache kept (as an idempotent
    replay is), which reads back and continues; a `store: false` response, kept for nobody,
    is not cached, so no later response is given an id that cannot be read."""
    for cache, question, again in (
        ("semantic", "How do I renew my library card?", "How can I renew my library card?"),
        ("exact", "What is the launch code?", "What is the launch code?"),
    ):
        headers = {"x-cache": cache}
        stack.fake.set_script(Script(tokens=[f"The {cache} answer."]))
        table = "semantic_cache" if cache == "semantic" else "completions_cache"
        before = (await sql(stack.db, f"SELECT count(*) FROM {table}"))[0][0]
        unstored = await stack.client.responses.create(
            model="m", input=question, temperature=0, store=False, extra_headers=headers
        )
        answered = await stack.client.responses.create(model="m", input=question, temperature=0, extra_headers=headers)
        assert answered.id != unstored.id  # not a hit of the unstored one: answered anew
        await wait_for_row(stack.db, trace(answered.id), "completed")

        async def cached(table: str = table, before: int = before) -> bool:
            return bool((await sql(stack.db, f"SELECT count(*) FROM {table}"))[0][0] > before)

        await eventually(cached, within=10)  # the semantic one: stored once the client has its answer
        asked = len(stack.fake.requests)
        hit = await stack.client.responses.with_raw_response.create(
            model="m", input=again, temperature=0, extra_headers=headers
        )
        assert hit.headers["x-cache"] in ("semantic", "hit") and len(stack.fake.requests) == asked
        given = hit.parse()
        assert (await stack.client.responses.retrieve(given.id)).output_text == f"The {cache} answer."
        stack.fake.set_script(Script(tokens=["You are welcome."]))
        follow = await stack.client.responses.create(model="m", input="Thanks!", previous_response_id=given.id)
        assert follow.output_text == "You are welcome."
        assert backend_saw(stack.fake) == [("user", question), ("assistant", f"The {cache} answer."), ("user", "Thanks!")]
        # In the background too: the cached response as it stands (not a 503 for the journal).
        queued = await stack.client.responses.create(
            model="m", input=again, temperature=0, background=True, extra_headers=headers
        )
        assert (queued.id, queued.status, queued.output_text) == (given.id, "completed", f"The {cache} answer.")


async def test_a_tool_loops_reasoning_reaches_vllm_when_continued_by_id_and_is_listed_as_input(stack: Stack) -> None:
    """A tool loop continued by `previous_response_id` (LangChain's `use_previous_response_id`,
    the Agents SDK's `auto_previous_response_id`): the reasoning behind the calls of the
    response it continues, and of the turns that response was given, reached vLLM's thinking
    models' templates no more (`reasoning_content`); the reasoning items given are listed among
    the response's input, as OpenAI lists them."""
    tools: Any = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}]
    stack.fake.set_script(Script(reasoning=["Paris first."], tokens=[], tool_calls=[("get_weather", {"city": "Paris"})]))
    given: Any = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "reasoning", "id": "rs_a", "summary": [], "content": [{"type": "reasoning_text", "text": "Rome first."}]},
        {"type": "function_call", "call_id": "call_rome", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_rome", "output": "rainy"},
    ]
    first = await stack.client.responses.create(model="m", input=given, tools=tools)
    call = next(item for item in first.output if item.type == "function_call")
    stack.fake.set_script(QUICK)
    await stack.client.responses.create(
        model="m", previous_response_id=first.id, tools=tools,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )
    turns = [(m["role"], m.get("reasoning_content")) for m in stack.fake.requests[-1].json["messages"]]
    assert turns == [("user", None), ("assistant", "Rome first."), ("tool", None), ("assistant", "Paris first."), ("tool", None)]
    listed = await stack.client.responses.input_items.list(first.id, order="asc")
    assert [item.type for item in listed.data] == ["message", "reasoning", "function_call", "function_call_output"]
    reasoning = listed.data[1].model_dump()
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Rome first."}]


async def test_a_response_that_continued_a_deleted_one_still_lists_only_its_own_input(stack: Stack) -> None:
    first = await stack.client.responses.create(model="m", input="Remember: the secret is 42.", instructions="Be brief.")
    second = await stack.client.responses.create(model="m", input="What is the secret?", previous_response_id=first.id)
    await wait_for_row(stack.db, trace(second.id), "completed")
    before = await stack.client.responses.input_items.list(second.id)
    await stack.client.responses.delete(first.id)
    after = await stack.client.responses.input_items.list(second.id)
    assert [item.model_dump() for item in after.data] == [item.model_dump() for item in before.data]
    assert [(item.type, item.content[0].text) for item in after.data] == [("message", "What is the secret?")]  # type: ignore[union-attr]
    assert (await stack.client.responses.retrieve(second.id)).output_text == "The secret is 42."


async def test_a_request_repeated_with_the_key_of_a_deleted_response_runs_again(stack: Stack) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = await stack.client.responses.create(model="m", input="A story", extra_headers=key)
    await wait_for_row(stack.db, trace(first.id), "completed")
    await stack.client.responses.delete(first.id)
    # Its answer is gone: not replayed, the request is answered anew, as a response of its own.
    again = await stack.client.responses.create(model="m", input="A story", extra_headers=key)
    assert again.id != first.id and again.output_text == "The secret is 42."
    assert (await stack.client.responses.retrieve(again.id)).output_text == "The secret is 42."
    assert len(stack.fake.requests) == 2


async def test_deleting_a_running_background_response_cancels_it(stack: Stack) -> None:
    stack.fake.default = Script(tokens=TOKENS, usage=Usage(6, 20), pace=0.1)
    created = await stack.client.responses.create(model="m", input="Count", background=True)
    await stack.fake.wait_requests(1, 10)
    with trio.fail_after(10):
        await stack.client.responses.delete(created.id)
    # Its backend was stopped well before its 2 s answer, and nothing of it is read back.
    assert [g.outcome for g in stack.fake.recorder.generations] == ["cancelled"]
    with pytest.raises(openai.NotFoundError):
        await stack.client.responses.retrieve(created.id)
    await trio.sleep(0.5)  # a late write of its outcome would bring nothing back
    with pytest.raises(openai.NotFoundError):
        await stack.client.responses.retrieve(created.id)


async def test_a_response_still_streaming_to_its_client_is_not_deleted(stack: Stack) -> None:
    stack.fake.default = Script(tokens=TOKENS, usage=Usage(6, 20), pace=0.1)
    stream = await stack.client.responses.create(model="m", input="Count", stream=True)
    created = await stream.__anext__()
    with pytest.raises(openai.BadRequestError) as info:
        await stack.client.responses.delete(created.response.id)
    assert "still in progress" in info.value.message
    events = [event async for event in stream]
    assert events[-1].type == "response.completed"
    await stack.client.responses.delete(created.response.id)  # once it has ended


async def test_a_key_cannot_delete_another_keys_response(stack: Stack) -> None:
    owner, other = await new_key(stack.db, "owner"), await new_key(stack.db, "other")
    await wait_for_key(stack.url, owner)
    mine = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=owner, max_retries=0)
    theirs = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=other, max_retries=0)
    await wait_for_key(stack.url, other)
    answered = await mine.responses.create(model="m", input="My secret")
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.delete(answered.id)
    assert (await mine.responses.retrieve(answered.id)).output_text == "The secret is 42."
    await mine.responses.delete(answered.id)
    with pytest.raises(openai.NotFoundError):
        await mine.responses.retrieve(answered.id)
    await mine.close()
    await theirs.close()
    # What it cost stays charged to its key.
    entry = await eventually(lambda: _usage(stack.db, "owner"), within=10)
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (5, 2)


async def test_reading_or_deleting_responses_is_not_counted_in_the_keys_usage(stack: Stack) -> None:
    """`requests` and `errors` count a key's model calls (`keys list`); reading the journal back
    is none, answered (as it always was) or not: a poll of a missing response is no failed call."""
    reader = await new_key(stack.db, "reader")
    await wait_for_key(stack.url, reader)
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=reader, max_retries=0)
    missing = f"resp_{uuid.uuid4().hex}"
    for read in (
        lambda: client.responses.retrieve(missing),
        lambda: client.responses.input_items.list(missing),
        lambda: client.responses.cancel(missing),
        lambda: client.responses.delete(missing),
    ):
        with pytest.raises(openai.NotFoundError):
            await read()
    async with httpx.AsyncClient(base_url=stack.url, timeout=10, headers={"authorization": f"Bearer {reader}"}) as http:
        assert (await http.get(f"/v1/streams/{trace(missing)}")).status_code == 404
    answered = await client.responses.create(model="m", input="Hi")  # the one model call
    assert (await client.responses.retrieve(answered.id)).output_text == "The secret is 42."
    await client.responses.delete(answered.id)
    await client.close()
    entry = await eventually(lambda: _usage(stack.db, "reader"), within=10)
    assert (entry["requests"], entry["errors"]) == (1, 0)


async def _usage(db: str, name: str) -> dict[str, Any] | None:
    code, out, err = await trio.to_thread.run_sync(lambda: keys_cli(db, "list", "--json"))
    assert code == 0, err
    entry: dict[str, Any] = next(json.loads(line) for line in out.splitlines() if json.loads(line)["name"] == name)
    return entry if entry["completion_tokens"] else None


# -- item_reference ------------------------------------------------------------------------------


async def test_an_item_reference_brings_the_kept_item_to_the_backend(stack: Stack) -> None:
    asked = await stack.client.responses.create(model="m", input="Remember: the secret is 42.")
    said = asked.output[0].id
    inputs = await stack.client.responses.input_items.list(asked.id)
    question = inputs.data[0].id
    # `type` is optional on a reference (OpenAI's `ItemReference`): the second has none.
    follow = await stack.client.responses.create(model="m", input=[
        {"type": "item_reference", "id": question},
        {"id": said},
        {"role": "user", "content": "What is the secret?"},
    ])
    assert follow.status == "completed"
    assert backend_saw(stack.fake) == [
        ("user", "Remember: the secret is 42."),
        ("assistant", "The secret is 42."),
        ("user", "What is the secret?"),
    ]
    # Its own input items list what the references stood for.
    listed = await stack.client.responses.input_items.list(follow.id, order="asc")
    assert [item.type for item in listed.data] == ["message", "message", "message"]


async def test_an_unknown_item_reference_is_a_404_naming_its_path(stack: Stack) -> None:
    """OpenAI's answer to an item it does not keep: 404, "Item with id '…' not found."."""
    answered = await stack.client.responses.create(model="m", input="Hi")
    for missing in ("msg_unknown", f"msg_{trace(answered.id)}_7", "fc_00000000000000000000000000000000_0"):
        with pytest.raises(openai.NotFoundError) as info:
            await stack.client.responses.create(model="m", input=[
                {"role": "user", "content": "x"}, {"type": "item_reference", "id": missing},
            ])
        body = info.value.body
        assert isinstance(body, dict) and body["param"] == "input[1]"
        assert body["message"] == f"Item with id '{missing}' not found."
    assert len(stack.fake.requests) == 1


async def test_a_deleted_or_another_keys_item_is_not_referenced(stack: Stack) -> None:
    owner, other = await new_key(stack.db, "owner"), await new_key(stack.db, "other")
    await wait_for_key(stack.url, owner)
    await wait_for_key(stack.url, other)
    mine = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=owner, max_retries=0)
    theirs = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=other, max_retries=0)
    answered = await mine.responses.create(model="m", input="My secret")
    reference: Any = [{"type": "item_reference", "id": answered.output[0].id}]
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.create(model="m", input=reference)
    assert (await mine.responses.create(model="m", input=reference)).status == "completed"
    await mine.responses.delete(answered.id)
    with pytest.raises(openai.NotFoundError):
        await mine.responses.create(model="m", input=reference)
    await mine.close()
    await theirs.close()



async def test_a_referenced_function_call_is_answered_by_its_output(stack: Stack) -> None:
    """The agent loop with stored items: the call is referred to, its output sent inline."""
    stack.fake.default = Script(tool_calls=[("get_weather", {"city": "Paris"})])
    tool: Any = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    called = await stack.client.responses.create(model="m", input="Weather in Paris?", tools=[tool])
    call = next(item for item in called.output if item.type == "function_call")
    stack.fake.default = QUICK
    await stack.client.responses.create(model="m", tools=[tool], input=[
        {"type": "item_reference", "id": (await stack.client.responses.input_items.list(called.id)).data[0].id},
        {"type": "item_reference", "id": call.id},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"},
    ])
    body = stack.fake.requests[-1].json
    assert isinstance(body, dict)
    user, assistant, result = body["messages"]
    assert (user["role"], user["content"]) == ("user", "Weather in Paris?")
    assert [(c["id"], c["function"]["name"]) for c in assistant["tool_calls"]] == [(call.call_id, "get_weather")]
    assert (result["role"], result["tool_call_id"], result["content"]) == ("tool", call.call_id, "Sunny")


# -- store: false --------------------------------------------------------------------------------


async def test_a_response_made_with_store_false_is_not_read_back(stack: Stack) -> None:
    """OpenAI keeps it for nobody: by its id it is a 404 everywhere (continued, its 400
    `previous_response_not_found`), as one it never had."""
    answered = await stack.client.responses.create(model="m", input="Remember: the secret is 42.", store=False)
    assert answered.output_text == "The secret is 42." and (answered.model_extra or {}).get("store") is False
    await wait_for_row(stack.db, trace(answered.id), "completed")
    with pytest.raises(openai.NotFoundError):
        await stack.client.responses.retrieve(answered.id)
    with pytest.raises(openai.NotFoundError):
        await stack.client.responses.input_items.list(answered.id)
    with pytest.raises(openai.BadRequestError) as continued:
        await stack.client.responses.create(model="m", input="What is it?", previous_response_id=answered.id)
    assert isinstance(continued.value.body, dict) and continued.value.body["code"] == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        await stack.client.responses.create(model="m", input=[{"type": "item_reference", "id": answered.output[0].id}])
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        assert (await http.get(f"/v1/responses/{answered.id}", params={"stream": "true"})).status_code == 404
    # A stored one (the default) says so, and is read back.
    kept = await stack.client.responses.create(model="m", input="Hi")
    assert (kept.model_extra or {}).get("store") is True
    assert (await stack.client.responses.retrieve(kept.id)).output_text == "The secret is 42."


async def test_a_late_outcome_does_not_bring_a_deleted_response_back(aio_loop: object, pg_database_url: str) -> None:
    """An outcome written after the delete (the outbox replaying one queued while PostgreSQL
    was down, say) leaves the row deleted: a client was told its data is gone."""
    async with open_database(pg_database_url) as db:
        await migrate(db)
        store = ChatStore(db)
        trace_id = uuid.uuid4().hex
        row = LogRow(
            trace_id=trace_id, req_id="r", idempotency_key=None, route="direct", dialect="responses", model="m",
            backend="b", upstream_model="m", stream=False, request={"messages": [{"role": "user", "content": ["hi"]}]},
            status="completed", result={"id": "x", "model": "m", "created": 1, "choices": []},
        )
        await store.finish(row)
        assert await store.delete(trace_id, 0)
        await store.finish(row)
        await store.write_batch([row], [row])
        found = await store.stored_run(trace_id)
        assert found is not None and found.deleted and found.completion is None
        assert await store.stored_messages(trace_id) is None


async def test_a_late_outcome_or_cache_store_does_not_cache_a_deleted_response(
    aio_loop: object, pg_database_url: str, embedder: LocalEmbedder
) -> None:
    """The outbox replaying a cached outcome, or the semantic cache storing an answer whose
    client deleted it the moment it had it, after the delete: neither cache holds it again."""
    async with open_database(pg_database_url) as db:
        await migrate(db)
        store = ChatStore(db)
        trace_id = uuid.uuid4().hex
        result = {"id": "x", "model": "m", "created": 1, "choices": [
            {"index": 0, "content": "The secret is 42.", "finish_reason": "stop"}]}
        row = LogRow(
            trace_id=trace_id, req_id=f"r-{trace_id}", idempotency_key=None, route="direct", dialect="responses",
            model="m", backend="b", upstream_model="m", stream=False,
            request={"messages": [{"role": "user", "content": ["hi"]}]}, status="completed", result=result,
            cache_ttl=60.0,
        )
        await store.finish(row)
        assert await store.cached(row.req_id) is not None
        semantic = SemanticCache(SemanticCacheSettings(enabled=True), lambda: db, embedder)
        question = openai_dialect.parse_chat_request(
            json.dumps({"model": "m", "messages": [{"role": "user", "content": f"What is secret {trace_id}?"}]}).encode()
        )
        meta = RequestMeta(trace_id=trace_id, request_id="r")
        await semantic.store(question, meta, completion_from_json(result))
        assert await semantic.lookup(question, meta) is not None

        assert await store.delete(trace_id, 0)
        assert await store.cached(row.req_id) is None
        assert await semantic.lookup(question, meta) is None
        await store.finish(row)  # late
        await semantic.store(question, meta, completion_from_json(result))
        assert await store.cached(row.req_id) is None
        assert await semantic.lookup(question, meta) is None


async def test_a_kept_responses_namespaced_call_is_read_back_and_continued_as_given(stack: Stack) -> None:
    """A call of a namespace's tool (Codex's sub-agent tools) names its namespace read back by
    id as it did when answered, and `previous_response_id` gives it to the backend again."""
    from tests.test_responses_api import CODEX_TOOLS

    stack.fake.set_script(Script(tokens=[], tool_calls=[("multi_agent_v1__close_agent", {"target": "a1"})]))
    answered = await stack.client.responses.create(model="m", input="Close a1.", tools=CODEX_TOOLS)
    await wait_for_row(stack.db, trace(answered.id), "completed")
    async with httpx.AsyncClient(base_url=stack.url) as http:
        read = (await http.get(f"/v1/responses/{answered.id}")).json()
    [call] = [item for item in read["output"] if item["type"] == "function_call"]
    assert (call["namespace"], call["name"]) == ("multi_agent_v1", "close_agent")
    stack.fake.set_script(QUICK)
    await stack.client.responses.create(
        model="m", previous_response_id=answered.id, tools=CODEX_TOOLS,
        input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "closed"}],
    )
    [assistant] = [m for m in stack.fake.requests[-1].json["messages"] if m["role"] == "assistant"]
    assert assistant["tool_calls"][0]["function"]["name"] == "multi_agent_v1__close_agent"


async def test_a_namespaced_call_is_listed_with_its_namespace_in_input_items_and_conversations(stack: Stack) -> None:
    """A call of a namespace's tool (Codex's sub-agent tools), given back as input or kept in a
    conversation, is listed as it was given and answered: its `namespace` and `name` apart. The
    input items and a conversation's items named it `multi_agent_v1__close_agent`, no namespace,
    a tool the client never declared."""
    from tests.test_responses_api import CODEX_TOOLS

    given = {"type": "function_call", "call_id": "call_1", "namespace": "multi_agent_v1", "name": "close_agent",
             "arguments": '{"target": "a1"}'}
    answered = await stack.client.responses.create(
        model="m", tools=CODEX_TOOLS,
        input=[{"role": "user", "content": "Close a1."}, given,  # type: ignore[list-item]
               {"type": "function_call_output", "call_id": "call_1", "output": "closed"}],
    )
    await wait_for_row(stack.db, trace(answered.id), "completed")
    listed = [item async for item in stack.client.responses.input_items.list(answered.id, order="asc")]
    [call] = [item.model_dump() for item in listed if item.type == "function_call"]
    assert (call.get("namespace"), call["name"]) == ("multi_agent_v1", "close_agent")

    conversation = await stack.client.conversations.create()
    stack.fake.set_script(Script(tokens=[], tool_calls=[("multi_agent_v1__spawn_agent", {"task": "t"})]))
    made = await stack.client.responses.create(
        model="m", input="Spawn one.", tools=CODEX_TOOLS, conversation=conversation.id,
    )
    [output] = [item.model_dump() for item in made.output if item.type == "function_call"]
    assert (output.get("namespace"), output["name"]) == ("multi_agent_v1", "spawn_agent")
    kept = [item.model_dump() async for item in stack.client.conversations.items.list(conversation.id, order="asc")]
    [kept_call] = [item for item in kept if item["type"] == "function_call"]
    assert (kept_call.get("namespace"), kept_call["name"]) == ("multi_agent_v1", "spawn_agent")


async def test_every_read_of_a_namespaced_call_names_its_namespace_as_the_answer_did(stack: Stack) -> None:
    """Codex's sub-agent call read back as a conversation's item, as a later response's input
    item (Codex gives it back with `namespace`), or in a failed response's partial output has
    `namespace` and `name` apart, as the live answer gave it (each gave `multi_agent_v1__close_agent`)."""
    from tests.test_responses_api import CODEX_TOOLS

    call = ("multi_agent_v1__close_agent", {"target": "a1"})
    stack.fake.set_script(Script(tokens=[], tool_calls=[call]))
    conversation = await stack.client.conversations.create()
    answered = await stack.client.responses.create(
        model="m", input="Close a1.", tools=CODEX_TOOLS, conversation=conversation.id
    )
    [live] = [item for item in answered.output if item.type == "function_call"]
    stack.fake.set_script(QUICK)
    given = [
        {"type": "function_call", "call_id": live.call_id, "namespace": "multi_agent_v1", "name": "close_agent",
         "arguments": live.arguments},
        {"type": "function_call_output", "call_id": live.call_id, "output": "closed"},
    ]
    followed = await stack.client.responses.create(model="m", input=given, tools=CODEX_TOOLS)
    # Streamed: the call's name and its first argument fragment, then the backend dies.
    stack.fake.set_script(Script(tokens=[], tool_calls=[call], fail_after=3))
    events = [e async for e in await stack.client.responses.create(model="m", input="Again.", tools=CODEX_TOOLS, stream=True)]
    assert events[-1].type == "response.failed"
    failed = events[-1].response.id
    await wait_for_row(stack.db, trace(followed.id), "completed")
    await wait_for_row(stack.db, trace(failed), "failed")

    def named(items: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
        return [(item.get("namespace"), item["name"]) for item in items if item["type"] == "function_call"]

    expected = [("multi_agent_v1", "close_agent")]
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        kept = (await http.get(f"/v1/conversations/{conversation.id}/items", params={"order": "asc"})).json()["data"]
        assert named(kept) == expected
        inputs = (await http.get(f"/v1/responses/{followed.id}/input_items")).json()["data"]
        assert named(inputs) == expected
        read = (await http.get(f"/v1/responses/{failed}")).json()
        assert read["status"] == "failed" and named(read["output"]) == expected
