"""OpenAI's stored chat completions with the official `openai` SDK: a chat asked with
`store: true` is read back (`client.chat.completions.retrieve`, `.list`, `.messages.list`),
its metadata changed (`.update`) and deleted (`.delete`), on a gateway with its journal
(PostgreSQL, NATS) in front of a loopback fake backend, each key reading its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import trio

from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import eventually, gateway, keys_cli, new_key, sql, wait_for_key
from tests.test_responses_stored import QUICK, Stack, journaled_stack

pytest_plugins = ["tests.infra_servers"]

MESSAGES: Any = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "the secret?"}]},
]
TOOLS: Any = [{
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}]


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    async with journaled_stack(pg_database_url, nats_url, OpenAIBackend(default=QUICK)) as built:
        yield built


async def listed(client: openai.AsyncOpenAI, **params: Any) -> list[str]:
    """The ids of every stored completion the SDK's pages give, following them to the end."""
    return [completion.id async for completion in client.chat.completions.list(**params)]


async def test_a_stored_completion_reads_back_as_its_client_had_it(stack: Stack) -> None:
    client = stack.client
    made = await client.chat.completions.create(
        model="qwen3-8b", messages=MESSAGES, store=True, metadata={"team": "blue"}
    )
    assert made.choices[0].message.content == "The secret is 42."
    # Read back at once: its row is written a moment after its client had the answer.
    got = await client.chat.completions.retrieve(made.id)
    assert got.id == made.id and got.object == "chat.completion" and got.model == made.model
    assert got.created == made.created
    assert got.choices[0].message.content == "The secret is 42." and got.choices[0].finish_reason == "stop"
    assert got.usage is not None and (got.usage.prompt_tokens, got.usage.completion_tokens) == (5, 2)
    assert got.model_dump()["metadata"] == {"team": "blue"}
    assert "request_id" not in got.model_dump()

    messages = await client.chat.completions.messages.list(made.id)
    assert [(m.id, m.role, m.content) for m in messages.data] == [
        (f"{made.id}-0", "system", "Be brief."),
        (f"{made.id}-1", "user", "What is\nthe secret?"),
    ]
    assert messages.data[0].content_parts is None
    assert [part.model_dump(exclude_none=True) for part in messages.data[1].content_parts or []] == [
        {"type": "text", "text": "What is"}, {"type": "text", "text": "the secret?"},
    ]
    newest = await client.chat.completions.messages.list(made.id, order="desc", limit=1)
    assert [m.id for m in newest.data] == [f"{made.id}-1"] and newest.has_more
    rest = await client.chat.completions.messages.list(made.id, order="desc", after=f"{made.id}-1")
    assert [m.id for m in rest.data] == [f"{made.id}-0"] and not rest.has_more


async def test_a_stored_completion_reads_back_at_once_on_another_instance(stack: Stack) -> None:
    """Behind a load balancer the read right after the answer lands on the other instance:
    it was a 404 (19 times in 20 by hand), the answering instance's group commit coming a few
    milliseconds after its client had the answer. Each SDK call here goes to the other one."""
    assert stack.fake.server is not None
    async with gateway(stack.db, stack.nats, backend("vllm", stack.fake.server.url, default=True)) as url, \
            openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as other:
        for turn in range(5):
            made = await stack.client.chat.completions.create(
                model="qwen3-8b", messages=MESSAGES, store=True, metadata={"turn": str(turn)}, stream=turn % 2 == 1,
            )
            chunks = [chunk async for chunk in made] if isinstance(made, openai.AsyncStream) else [made]
            made_id = chunks[0].id
            got = await other.chat.completions.retrieve(made_id)
            assert (got.id, got.choices[0].message.content) == (made_id, "The secret is 42.")
            made = await other.chat.completions.create(model="qwen3-8b", messages=MESSAGES, store=True)
            assert (await stack.client.chat.completions.messages.list(made.id)).data[-1].role == "user"
    # An id nobody made is still a 404, once the moment a group commit takes has passed.
    with pytest.raises(openai.NotFoundError):
        await stack.client.chat.completions.retrieve("chatcmpl-nobody-made-this")


async def test_a_streamed_completion_is_stored_assembled_with_its_tool_calls(stack: Stack) -> None:
    stack.fake.set_script(Script(tokens=["Let me look."], tool_calls=[("get_weather", {"city": "Paris"})], usage=Usage(9, 4)))
    stream = await stack.client.chat.completions.create(
        model="qwen3-8b", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, stream=True,
        store=True,
    )
    [completion_id] = {chunk.id async for chunk in stream}
    got = await stack.client.chat.completions.retrieve(completion_id)
    message = got.choices[0].message
    assert got.id == completion_id and message.content == "Let me look."
    assert got.choices[0].finish_reason == "tool_calls"
    [call] = message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.function.arguments.replace(" ", "") == '{"city":"Paris"}'
    # Usage the stream's client did not ask for is the stored completion's all the same.
    assert got.usage is not None and (got.usage.prompt_tokens, got.usage.completion_tokens) == (9, 4)
    assert got.model_dump()["metadata"] == {}

    # The tool's answer, sent back, is among the next completion's messages.
    follow_up = await stack.client.chat.completions.create(
        model="qwen3-8b", store=True, tools=TOOLS, messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny"},
        ],
    )
    said = (await stack.client.chat.completions.messages.list(follow_up.id)).data
    assert said[1].role == "assistant" and [c.id for c in said[1].tool_calls or []] == [call.id]
    assert said[2].model_dump()["tool_call_id"] == call.id and said[2].content == "Sunny"


async def test_only_completions_made_with_store_true_are_kept(stack: Stack) -> None:
    client = stack.client
    plain = await client.chat.completions.create(model="qwen3-8b", messages=[{"role": "user", "content": "Hi"}])
    unstored = await client.chat.completions.create(
        model="qwen3-8b", messages=[{"role": "user", "content": "Hi"}], store=False, metadata={"k": "v"}
    )
    kept = await client.chat.completions.create(model="qwen3-8b", messages=[{"role": "user", "content": "Hi"}], store=True)
    for completion_id in (plain.id, unstored.id, "chatcmpl-nobody-made-this"):
        for attempt in (
            lambda c=completion_id: client.chat.completions.retrieve(c),
            lambda c=completion_id: client.chat.completions.messages.list(c),
            lambda c=completion_id: client.chat.completions.update(c, metadata={"x": "y"}),
            lambda c=completion_id: client.chat.completions.delete(c),
        ):
            with pytest.raises(openai.NotFoundError) as info:
                await attempt()
            body = info.value.body
            assert isinstance(body, dict) and completion_id in body["message"], body
    assert await listed(client) == [kept.id]


async def test_listing_filters_pages_and_orders(stack: Stack) -> None:
    client = stack.client
    made = []
    for i in range(5):
        completion = await client.chat.completions.create(
            model="qwen3-8b" if i % 2 == 0 else "qwen3-32b", messages=[{"role": "user", "content": f"Question {i}"}],
            store=True, metadata={"run": "a" if i < 3 else "b", "n": str(i)},
        )
        made.append(completion.id)
    assert await listed(client) == made  # oldest first, as on OpenAI
    assert await listed(client, order="desc") == made[::-1]
    assert await listed(client, limit=2) == made  # the SDK follows `after` page by page
    first = await client.chat.completions.list(limit=2)
    assert [c.id for c in first.data] == made[:2] and first.has_more
    raw = (await client.chat.completions.with_raw_response.list(limit=2, after=made[1])).http_response.json()
    assert raw["object"] == "list" and raw["first_id"] == made[2] and raw["last_id"] == made[3] and raw["has_more"]
    assert [c["metadata"]["n"] for c in raw["data"]] == ["2", "3"]
    last = await client.chat.completions.list(after=made[3])
    assert [c.id for c in last.data] == [made[4]] and not last.has_more
    assert await listed(client, model="qwen3-32b") == [made[1], made[3]]
    assert await listed(client, metadata={"run": "a"}) == made[:3]
    assert await listed(client, metadata={"run": "a", "n": "1"}) == [made[1]]
    assert await listed(client, metadata={"run": "c"}) == []
    empty = await client.chat.completions.list(model="nobody")
    assert empty.data == [] and not empty.has_more


async def test_update_changes_the_metadata_only(stack: Stack) -> None:
    client = stack.client
    made = await client.chat.completions.create(
        model="qwen3-8b", messages=[{"role": "user", "content": "Hi"}], store=True, metadata={"a": "1", "b": "2"}
    )
    updated = await client.chat.completions.update(made.id, metadata={"c": "3"})
    assert updated.id == made.id and updated.model_dump()["metadata"] == {"c": "3"}
    again = await client.chat.completions.retrieve(made.id)
    assert again.model_dump()["metadata"] == {"c": "3"}
    assert again.choices[0].message.content == made.choices[0].message.content
    assert again.usage is not None and made.usage is not None
    assert again.usage.total_tokens == made.usage.total_tokens == 7
    assert await listed(client, metadata={"c": "3"}) == [made.id] and await listed(client, metadata={"a": "1"}) == []
    cleared = await client.chat.completions.update(made.id, metadata=None)
    assert cleared.model_dump()["metadata"] == {}


async def test_a_deleted_completion_is_gone_for_every_reader(stack: Stack) -> None:
    client = stack.client
    raw = await client.chat.completions.with_raw_response.create(
        model="qwen3-8b", messages=[{"role": "user", "content": "Remember: the secret is 42."}], store=True,
        metadata={"keep": "no"},
    )
    made, trace = raw.parse(), raw.headers["x-trace-id"]
    deleted = await client.chat.completions.delete(made.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (made.id, "chat.completion.deleted", True)
    for attempt in (
        lambda: client.chat.completions.retrieve(made.id),
        lambda: client.chat.completions.messages.list(made.id),
        lambda: client.chat.completions.update(made.id, metadata={"x": "y"}),
        lambda: client.chat.completions.delete(made.id),
    ):
        with pytest.raises(openai.NotFoundError):
            await attempt()
    assert await listed(client) == [] and await listed(client, metadata={"keep": "no"}) == []
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        # Nor is it read by its trace: as a Response, or its events again.
        assert (await http.get(f"/v1/responses/resp_{trace}")).status_code == 404
        assert (await http.get(f"/v1/streams/{trace}")).status_code == 404
    # What it said and was asked is gone from the journal (its row stays for the accounts).
    [(request, result, settings)] = await sql(stack.db, "SELECT request::text, result, settings FROM chat_log WHERE trace_id = %s", trace)
    assert result is None and settings is None and "secret" not in request


async def test_metadata_and_store_are_checked_as_openai_does(stack: Stack) -> None:
    client = stack.client
    made = await client.chat.completions.create(model="qwen3-8b", messages=[{"role": "user", "content": "Hi"}], store=True)
    asked = len(stack.fake.requests)
    hi: Any = [{"role": "user", "content": "Hi"}]
    refusals: list[tuple[Any, str]] = [
        (lambda: client.chat.completions.create(
            model="m", messages=hi, store=True, metadata={str(i): "v" for i in range(17)}
        ), "metadata"),
        (lambda: client.chat.completions.create(model="m", messages=hi, store=True, metadata={"k" * 65: "v"}), "metadata"),
        (lambda: client.chat.completions.create(model="m", messages=hi, store=True, metadata={"k": "v" * 513}), "metadata"),
        (lambda: client.chat.completions.create(model="m", messages=hi, store=True, metadata={"k": 1}), "metadata"),  # type: ignore[dict-item]
        (lambda: client.chat.completions.create(model="m", messages=hi, store=True, metadata=["k"]), "metadata"),  # type: ignore[arg-type]
        (lambda: client.chat.completions.create(model="m", messages=hi, store="yes"), "store"),  # type: ignore[arg-type]
        (lambda: client.chat.completions.update(made.id, metadata={"k" * 65: "v"}), "metadata"),
        (lambda: client.chat.completions.list(limit=101), "limit"),
        (lambda: client.chat.completions.list(order="sideways"), "order"),  # type: ignore[arg-type]
        (lambda: client.chat.completions.list(after="chatcmpl-nobody"), "after"),
        (lambda: client.chat.completions.messages.list(made.id, after="nope"), "after"),
    ]
    for call, param in refusals:
        with pytest.raises(openai.BadRequestError) as info:
            await call()
        body = info.value.body
        assert isinstance(body, dict) and body["param"] == param, (param, body)
    assert len(stack.fake.requests) == asked  # refused before any backend call
    # A chat not stored keeps whatever metadata its client sends (LiteLLM's own, as before).
    litellm: Any = {"tags": ["prod"], "trace_user_id": 7}
    await client.chat.completions.create(model="m", messages=hi, extra_body={"metadata": litellm})
    assert stack.fake.requests[-1].json["metadata"] == litellm
    assert (await client.chat.completions.retrieve(made.id)).model_dump()["metadata"] == {}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        # An id PostgreSQL could not even hold (a NUL) is one that does not exist, not an outage.
        nul = await http.get("/v1/chat/completions/chatcmpl-%00")
        assert nul.status_code == 404 and nul.json()["error"]["type"] == "invalid_request_error"
        # Not a chat: a read of the chat path is not counted as one.
        assert (await http.put("/v1/chat/completions/x")).status_code == 405


async def test_metadata_with_a_nul_is_refused_as_its_list_filter_is(stack: Stack) -> None:
    # PostgreSQL keeps no NUL: an update answered 200 echoing it while U+FFFD was stored (and a
    # chat stored so read back other than sent), though the same metadata as a filter is a 400.
    client = stack.client
    made = await client.chat.completions.create(
        model="qwen3-8b", messages=[{"role": "user", "content": "Hi"}], store=True, metadata={"team": "blue"}
    )
    asked = len(stack.fake.requests)
    hi: Any = [{"role": "user", "content": "Hi"}]
    for metadata in ({"team": "bl\x00ue"}, {"te\x00am": "blue"}):
        for call in (
            lambda m=metadata: client.chat.completions.update(made.id, metadata=m),
            lambda m=metadata: client.chat.completions.create(model="qwen3-8b", messages=hi, store=True, metadata=m),
            lambda m=metadata: listed(client, metadata=m),
        ):
            with pytest.raises(openai.BadRequestError) as info:
                await call()
            body = info.value.body
            assert isinstance(body, dict) and body["param"] == "metadata" and "NUL" in body["message"], body
    assert len(stack.fake.requests) == asked  # no chat was asked to be stored with it
    assert (await client.chat.completions.retrieve(made.id)).model_dump()["metadata"] == {"team": "blue"}


async def test_a_keys_completions_are_its_own_and_its_models_only(stack: Stack) -> None:
    owner, other = await new_key(stack.db, "owner"), await new_key(stack.db, "other")
    await wait_for_key(stack.url, owner)
    await wait_for_key(stack.url, other)
    mine = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=owner, max_retries=0)
    theirs = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=other, max_retries=0)
    try:
        small = await mine.chat.completions.create(
            model="qwen3-8b", messages=[{"role": "user", "content": "Hi"}], store=True, metadata={"who": "me"}
        )
        large = await mine.chat.completions.create(
            model="qwen3-32b", messages=[{"role": "user", "content": "Hi"}], store=True, metadata={"who": "me"}
        )
        for attempt in (
            lambda: theirs.chat.completions.retrieve(small.id),
            lambda: theirs.chat.completions.messages.list(small.id),
            lambda: theirs.chat.completions.update(small.id, metadata={"who": "them"}),
            lambda: theirs.chat.completions.delete(small.id),
        ):
            with pytest.raises(openai.NotFoundError):
                await attempt()
        assert await listed(theirs) == [] and await listed(theirs, metadata={"who": "me"}) == []
        assert await listed(mine) == [small.id, large.id]
        assert (await mine.chat.completions.retrieve(small.id)).model_dump()["metadata"] == {"who": "me"}

        # Limited to the small model since, the key reads only that model's completions.
        code, _, err = await trio.to_thread.run_sync(lambda: keys_cli(stack.db, "update", owner, "--models", "qwen3-8b"))
        assert code == 0, err

        async def limited() -> bool:
            try:
                await mine.chat.completions.create(model="qwen3-32b", messages=[{"role": "user", "content": "Hi"}])
            except openai.PermissionDeniedError:
                return True
            return False

        await eventually(limited, within=15)
        assert await listed(mine) == [small.id]
        assert await listed(mine, limit=1) == [small.id]
        with pytest.raises(openai.NotFoundError):
            await mine.chat.completions.retrieve(large.id)
    finally:
        await mine.close()
        await theirs.close()


async def test_the_routes_are_in_the_openapi_document(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        paths = (await http.get("/openapi.json")).json()["paths"]
    assert {"get", "post"} <= set(paths["/v1/chat/completions"])
    assert {"get", "post", "delete"} <= set(paths["/v1/chat/completions/{completion_id}"])
    assert "get" in paths["/v1/chat/completions/{completion_id}/messages"]


async def test_a_stored_chat_read_as_a_response_echoes_the_defaults(stack: Stack) -> None:
    """Its trace read back by the Responses route is a Response still: the defaults echoed,
    not the chat's own settings."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        made = await http.post("/v1/chat/completions", json={
            "model": "qwen3-8b", "messages": [{"role": "user", "content": "Hi"}], "store": True, "metadata": {"k": "v"},
        })
        assert made.status_code == 200
        trace = made.headers["x-trace-id"]
        read = await http.get(f"/v1/responses/resp_{trace}")
    assert read.status_code == 200, read.text
    body = read.json()
    assert body["tools"] == [] and "truncation" in body and "chat_completion_stored" not in body


async def test_a_stored_completion_is_never_another_requests_cached_answer(stack: Stack) -> None:
    """The semantic cache would answer a stored request with a similar request's answer, under
    an id no row holds: it asks the backend, and reads back by its own id."""
    client, headers = stack.client, {"x-cache": "semantic"}
    stack.fake.set_script(Script(tokens=["Click 'Forgot password'."]))
    first = await client.chat.completions.create(
        model="qwen3-8b", messages=[{"role": "user", "content": "How do I reset my password?"}], temperature=0,
        extra_headers=headers,
    )

    async def cached() -> bool:
        return bool((await sql(stack.db, "SELECT count(*) FROM semantic_cache"))[0][0])

    await eventually(cached, within=10)
    alike: Any = [{"role": "user", "content": "How can I reset my password?"}]
    hit = await client.chat.completions.with_raw_response.create(
        model="qwen3-8b", messages=alike, temperature=0, extra_headers=headers
    )
    assert hit.headers["x-cache"] == "semantic"  # the cache answers it, under an id of its own
    assert hit.parse().choices[0].message.content == first.choices[0].message.content and hit.parse().id != first.id
    asked = len(stack.fake.requests)
    kept = await client.chat.completions.with_raw_response.create(
        model="qwen3-8b", messages=alike, temperature=0, extra_headers=headers, store=True
    )
    assert kept.headers.get("x-cache") != "semantic" and len(stack.fake.requests) == asked + 1
    got = await client.chat.completions.retrieve(kept.parse().id)
    assert got.id != first.id and got.choices[0].message.content == "Click 'Forgot password'."
    assert await listed(client) == [got.id]


@pytest.mark.parametrize("kind", ["ollama", "anthropic"])
async def test_a_completion_another_kind_of_backend_answered_is_stored_by_the_id_its_client_had(
    aio_loop: object, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-test")
    fake = OllamaBackend() if kind == "ollama" else AnthropicBackend(api_key="sk-ant-test")
    fake.set_script(Script(tokens=["Stored", " here."], usage=Usage(6, 2)))
    extra: Any = {"api_key_env": "TEST_ANTHROPIC_KEY"} if kind == "anthropic" else {}
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("b", server.url, kind=kind, default=True, **extra)
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        hi: Any = [{"role": "user", "content": "Hi"}]
        whole = await client.chat.completions.create(model="some-model", messages=hi, store=True, metadata={"n": "1"})
        stream = await client.chat.completions.create(model="some-model", messages=hi, store=True, stream=True)
        [streamed_id] = {chunk.id async for chunk in stream}  # one id, every chunk's
        for made, text in ((whole.id, whole.choices[0].message.content), (streamed_id, "Stored here.")):
            got = await client.chat.completions.retrieve(made)
            assert got.id == made and got.choices[0].message.content == text == "Stored here."
            assert got.usage is not None and got.usage.total_tokens == 8
        assert await listed(client) == [whole.id, streamed_id]
        assert await listed(client, metadata={"n": "1"}) == [whole.id]
        await client.close()


async def test_a_keyed_request_repeated_is_one_stored_completion(stack: Stack) -> None:
    """Asked again with its `Idempotency-Key` (a retry whose answer was lost), a stored chat is
    answered by its first run: the same completion, kept once."""
    client, key = stack.client, {"Idempotency-Key": "order-66"}
    hi: Any = [{"role": "user", "content": "Hi"}]
    first = await client.chat.completions.create(model="qwen3-8b", messages=hi, store=True, extra_headers=key)
    again = await client.chat.completions.create(model="qwen3-8b", messages=hi, store=True, extra_headers=key)
    assert again.id == first.id and len(stack.fake.requests) == 1
    assert await listed(client) == [first.id]
    assert (await client.chat.completions.retrieve(first.id)).choices[0].message.content == "The secret is 42."
