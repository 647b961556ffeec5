"""OpenAI's Conversations API with the official `openai` SDK (`client.conversations`), on a
gateway with its journal (PostgreSQL, NATS) and a loopback backend: a conversation's items go
before a response's input, and a completed response's input and output are appended to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import trio

from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import eventually, gateway, new_key, sql, wait_for_key
from tests.test_persistence import wait_for_row
from tests.test_responses_stored import QUICK, Stack, journaled_stack
from tests.test_responses_truncation import WindowedVLLM, assert_trimmed
from tests.test_responses_truncation import conversation as agent_history

pytest_plugins = ["tests.infra_servers"]

@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    async with journaled_stack(pg_database_url, nats_url, OpenAIBackend(default=QUICK)) as built:
        yield built


def backend_saw(fake: OpenAIBackend) -> list[Any]:
    """The messages of the backend's last request, as (role, content)."""
    body = fake.requests[-1].json
    assert isinstance(body, dict)
    return [(m["role"], m.get("content")) for m in body["messages"]]


async def listed(client: openai.AsyncOpenAI, conversation: str) -> list[tuple[str, str, str]]:
    """Every item, oldest first, as (type, role or name, text)."""
    out: list[tuple[str, str, str]] = []
    async for item in client.conversations.items.list(conversation, order="asc", limit=100):
        data = item.model_dump()
        if data["type"] == "message":
            out.append(("message", data["role"], "".join(part.get("text") or "" for part in data["content"])))
        elif data["type"] == "function_call":
            out.append(("function_call", data["name"], data["arguments"]))
        else:
            out.append((data["type"], data.get("call_id") or "", str(data.get("output") or "")))
    return out


async def test_a_response_in_a_conversation_sees_its_items_and_adds_its_own(stack: Stack) -> None:
    client = stack.client
    conversation = await client.conversations.create(
        items=[
            {"type": "message", "role": "user", "content": "Remember: the secret is 42."},
            {"type": "message", "role": "assistant", "content": "Noted."},
        ],
        metadata={"topic": "secrets"},
    )
    assert conversation.id.startswith("conv_") and conversation.object == "conversation"
    assert conversation.metadata == {"topic": "secrets"}
    assert (await client.conversations.retrieve(conversation.id)).metadata == {"topic": "secrets"}

    first = await client.responses.create(
        model="m", input="What is the secret?", instructions="Be brief.", conversation=conversation.id
    )
    assert first.output_text == "The secret is 42."
    assert first.conversation is not None and first.conversation.id == conversation.id
    assert backend_saw(stack.fake) == [
        ("system", "Be brief."),
        ("user", "Remember: the secret is 42."),
        ("assistant", "Noted."),
        ("user", "What is the secret?"),
    ]
    # Its input and its answer, after the items the conversation had, with the ids its own
    # listing and output give them (the instructions are not an item).
    assert await listed(client, conversation.id) == [
        ("message", "user", "Remember: the secret is 42."),
        ("message", "assistant", "Noted."),
        ("message", "user", "What is the secret?"),
        ("message", "assistant", "The secret is 42."),
    ]
    page = await client.conversations.items.list(conversation.id, order="asc")
    own_inputs = await client.responses.input_items.list(first.id)
    assert [item.id for item in own_inputs.data] == [page.data[2].id]  # its input: not the conversation's
    assert page.data[3].id == first.output[0].id

    # The next turn sees the previous one, by the object form too.
    stack.fake.set_script(Script(tokens=["Still 42."]))
    second = await client.responses.create(model="m", input="And now?", conversation={"id": conversation.id})
    assert second.output_text == "Still 42."
    assert backend_saw(stack.fake)[-3:] == [
        ("user", "What is the secret?"), ("assistant", "The secret is 42."), ("user", "And now?"),
    ]
    # Read back, it still says which conversation it belongs to.
    await wait_for_row(stack.db, second.id.removeprefix("resp_"), "completed")
    again = await client.responses.retrieve(second.id)
    assert again.conversation is not None and again.conversation.id == conversation.id
    assert "_conversation_prefix" not in again.model_dump()

    updated = await client.conversations.update(conversation.id, metadata={"topic": "done"})
    assert updated.metadata == {"topic": "done"}


async def test_a_streamed_response_is_appended_too(stack: Stack) -> None:
    conversation = await stack.client.conversations.create()
    stream = await stack.client.responses.create(
        model="m", input="Tell me.", conversation=conversation.id, stream=True
    )
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "response.completed"
    assert await listed(stack.client, conversation.id) == [
        ("message", "user", "Tell me."), ("message", "assistant", "The secret is 42."),
    ]


async def test_a_reasoning_summary_is_kept_as_the_response_gave_it(stack: Stack) -> None:
    """The reasoning item a conversation keeps is the one its response gave: asked as a
    summary, the summary (not another shape of the same item under the same id)."""
    stack.fake.set_script(Script(reasoning=["Think", " twice."], tokens=["Done."]))
    conversation = await stack.client.conversations.create()
    answered = await stack.client.responses.create(
        model="m", input="x", conversation=conversation.id, reasoning={"summary": "auto"}
    )
    kept = [item.model_dump() async for item in stack.client.conversations.items.list(conversation.id, order="asc")]
    reasoning = [item for item in kept if item["type"] == "reasoning"]
    assert [r["id"] for r in reasoning] == [answered.output[0].id]
    assert reasoning[0]["summary"] == [{"type": "summary_text", "text": "Think twice."}] and not reasoning[0].get("content")


async def test_a_response_repeated_with_its_idempotency_key_is_its_first_answer_added_once(stack: Stack) -> None:
    """Asked again with its key (a retry whose first answer was lost), the request is the same
    although the conversation now holds that answer: the first response answers it again."""
    conversation = await stack.client.conversations.create(items=[{"role": "user", "content": "Hello"}])
    key = {"Idempotency-Key": "once-1"}
    first = await stack.client.responses.create(model="m", input="Once.", conversation=conversation.id, extra_headers=key)
    again = await stack.client.responses.create(model="m", input="Once.", conversation=conversation.id, extra_headers=key)
    assert again.id == first.id and again.output_text == first.output_text
    assert len(stack.fake.requests) == 1
    assert await listed(stack.client, conversation.id) == [
        ("message", "user", "Hello"), ("message", "user", "Once."), ("message", "assistant", "The secret is 42."),
    ]


async def test_a_background_response_is_appended_when_it_completes(stack: Stack) -> None:
    conversation = await stack.client.conversations.create()
    queued = await stack.client.responses.create(
        model="m", input="Tell me later.", conversation=conversation.id, background=True
    )
    assert queued.status == "queued"
    await wait_for_row(stack.db, queued.id.removeprefix("resp_"), "completed")
    assert await listed(stack.client, conversation.id) == [
        ("message", "user", "Tell me later."), ("message", "assistant", "The secret is 42."),
    ]


async def test_a_failed_response_adds_nothing(stack: Stack) -> None:
    conversation = await stack.client.conversations.create(items=[{"role": "user", "content": "Hello"}])
    stack.fake.set_script(Script(status=500))
    with pytest.raises(openai.InternalServerError):
        await stack.client.responses.create(model="m", input="Fail now.", conversation=conversation.id)
    stack.fake.set_script(Script(tokens=["Half"], fail_after=2))
    stream = await stack.client.responses.create(model="m", input="Fail later.", conversation=conversation.id, stream=True)
    assert [event.type async for event in stream][-1] == "response.failed"
    assert await listed(stack.client, conversation.id) == [("message", "user", "Hello")]


async def test_items_are_paged_in_either_order(stack: Stack) -> None:
    client = stack.client
    texts = [f"item {i}" for i in range(7)]
    conversation = await client.conversations.create(items=[{"role": "user", "content": t} for t in texts[:3]])
    added = await client.conversations.items.create(
        conversation.id, items=[{"type": "message", "role": "user", "content": t} for t in texts[3:]]
    )
    assert len(added.data) == 4 and added.first_id == added.data[0].id and not added.has_more

    for order, expected in (("asc", texts), ("desc", texts[::-1])):
        seen: list[str] = []
        after: str | None = None
        pages = 0
        while True:
            page = await client.conversations.items.list(
                conversation.id, order=order, limit=3, **({"after": after} if after else {})  # type: ignore[arg-type]
            )
            pages += 1
            seen += [item.model_dump()["content"][0]["text"] for item in page.data]
            if not page.has_more:
                break
            after = page.last_id
        assert seen == expected and pages == 3
    # Newest first by default; the SDK's own paging goes through every page.
    newest = await client.conversations.items.list(conversation.id, limit=2)
    assert newest.data[0].model_dump()["content"][0]["text"] == "item 6"
    assert len([item async for item in client.conversations.items.list(conversation.id, limit=2)]) == 7

    one = await client.conversations.items.retrieve(added.data[0].id, conversation_id=conversation.id)
    assert one.model_dump(exclude_none=True)["content"] == [{"type": "input_text", "text": "item 3"}]


async def test_paging_goes_on_after_the_last_item_seen_is_deleted(stack: Stack) -> None:
    """A client pages through a conversation while another (the Agents SDK's `pop_item`)
    deletes items: the next page starts after the deleted item's place, as it would have."""
    client = stack.client
    texts = [f"item {i}" for i in range(5)]
    conversation = await client.conversations.create(items=[{"role": "user", "content": t} for t in texts])
    first = await client.conversations.items.list(conversation.id, order="asc", limit=2)
    assert first.has_more and first.last_id is not None
    await client.conversations.items.delete(first.last_id, conversation_id=conversation.id)
    for order, expected in (("asc", ["item 2", "item 3", "item 4"]), ("desc", ["item 0"])):
        rest = await client.conversations.items.list(conversation.id, order=order, after=first.last_id)
        assert [item.model_dump()["content"][0]["text"] for item in rest.data] == expected
    # Deleted, it is gone from every other view.
    with pytest.raises(openai.NotFoundError):
        await client.conversations.items.retrieve(first.last_id, conversation_id=conversation.id)
    with pytest.raises(openai.NotFoundError):
        await client.conversations.items.delete(first.last_id, conversation_id=conversation.id)
    assert [text for _, _, text in await listed(client, conversation.id)] == ["item 0", "item 2", "item 3", "item 4"]
    await client.responses.create(model="m", input="Go.", conversation=conversation.id)
    assert [content for _, content in backend_saw(stack.fake)] == ["item 0", "item 2", "item 3", "item 4", "Go."]
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(
            model="m", input=[{"type": "item_reference", "id": first.last_id}], conversation=conversation.id
        )


async def test_deleting_an_item_or_the_conversation(stack: Stack) -> None:
    client = stack.client
    conversation = await client.conversations.create(items=[
        {"role": "user", "content": "Forget this."}, {"role": "user", "content": "Keep this."},
    ])
    forgotten = (await client.conversations.items.list(conversation.id, order="asc")).data[0].id
    answered = await client.conversations.items.delete(forgotten, conversation_id=conversation.id)
    assert answered.id == conversation.id and answered.object == "conversation"
    with pytest.raises(openai.NotFoundError):
        await client.conversations.items.retrieve(forgotten, conversation_id=conversation.id)
    await client.responses.create(model="m", input="Go.", conversation=conversation.id)
    assert backend_saw(stack.fake) == [("user", "Keep this."), ("user", "Go.")]

    deleted = await client.conversations.delete(conversation.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (conversation.id, "conversation.deleted", True)
    with pytest.raises(openai.NotFoundError):
        await client.conversations.retrieve(conversation.id)
    with pytest.raises(openai.NotFoundError):
        await client.conversations.items.list(conversation.id)
    asked = len(stack.fake.requests)
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(model="m", input="Again.", conversation=conversation.id)
    body = info.value.body
    assert isinstance(body, dict) and body["param"] is None and conversation.id in body["message"]
    assert len(stack.fake.requests) == asked


async def test_a_keys_conversations_are_its_own(stack: Stack) -> None:
    owner, other = await new_key(stack.db, "owner"), await new_key(stack.db, "other")
    await wait_for_key(stack.url, owner)
    await wait_for_key(stack.url, other)
    mine = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=owner, max_retries=0)
    theirs = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=other, max_retries=0)
    conversation = await mine.conversations.create(items=[{"role": "user", "content": "My secret is 42."}])
    item = (await mine.conversations.items.list(conversation.id)).data[0].id
    for attempt in (
        lambda: theirs.conversations.retrieve(conversation.id),
        lambda: theirs.conversations.update(conversation.id, metadata={"x": "y"}),
        lambda: theirs.conversations.items.list(conversation.id),
        lambda: theirs.conversations.items.retrieve(item, conversation_id=conversation.id),
        lambda: theirs.conversations.items.delete(item, conversation_id=conversation.id),
        lambda: theirs.conversations.items.create(conversation.id, items=[{"role": "user", "content": "Mine now."}]),
        lambda: theirs.responses.create(model="m", input="What is the secret?", conversation=conversation.id),
        lambda: theirs.conversations.delete(conversation.id),
    ):
        with pytest.raises(openai.NotFoundError):
            await attempt()
    assert await listed(mine, conversation.id) == [("message", "user", "My secret is 42.")]
    assert (await mine.conversations.retrieve(conversation.id)).metadata == {}
    await mine.close()
    await theirs.close()


async def test_refusals_name_their_field(stack: Stack) -> None:
    client = stack.client
    conversation = await client.conversations.create()
    earlier = await client.responses.create(model="m", input="Hi")
    refusals: list[tuple[Any, str]] = [
        (lambda: client.responses.create(
            model="m", input="x", conversation=conversation.id, previous_response_id=earlier.id
        ), "conversation"),
        (lambda: client.conversations.create(items=[{"role": "user", "content": "x"}] * 21), "items"),
        (lambda: client.conversations.create(items=[{"role": "robot", "content": "x"}]), "items[0].role"),
        (lambda: client.conversations.items.create(conversation.id, items=[]), "items"),
        (lambda: client.conversations.items.create(
            conversation.id, items=[{"role": "user", "content": "x"}, {"type": "function_call", "name": "f"}]
        ), "items[1].call_id"),
        (lambda: client.conversations.create(metadata={str(i): "v" for i in range(17)}), "metadata"),
        (lambda: client.conversations.update(conversation.id, metadata={"k": "v" * 513}), "metadata"),
        (lambda: client.conversations.create(metadata={"k" * 65: "v"}), "metadata"),
        # PostgreSQL keeps a NUL as U+FFFD: it would be read back other than it was sent.
        (lambda: client.conversations.create(metadata={"k": "a\x00b"}), "metadata"),
        (lambda: client.conversations.update(conversation.id, metadata={"a\x00": "v"}), "metadata"),
        (lambda: client.conversations.items.list(conversation.id, order="sideways"), "order"),  # type: ignore[arg-type]
        (lambda: client.conversations.items.list(conversation.id, limit=101), "limit"),
        (lambda: client.conversations.items.list(conversation.id, after="msg_nope"), "after"),
    ]
    for call, param in refusals:
        with pytest.raises(openai.BadRequestError) as info:
            await call()
        body = info.value.body
        assert isinstance(body, dict) and body["param"] == param, (param, body)
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        missing = await http.get("/v1/conversations/conv_nope")
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "Conversation with id 'conv_nope' not found."
        # An id PostgreSQL could not even hold (a NUL) is one that does not exist, not an outage.
        assert (await http.get("/v1/conversations/conv_%00")).status_code == 404
        assert (await http.get(f"/v1/conversations/{conversation.id}/items/msg_%00")).status_code == 404
        assert (await http.delete(f"/v1/conversations/{conversation.id}/items/msg_%00")).status_code == 404
        nul_after = await http.get(f"/v1/conversations/{conversation.id}/items", params={"after": "msg_\x00"})
        assert nul_after.status_code == 400 and nul_after.json()["error"]["param"] == "after"


async def test_auto_truncation_trims_the_conversation_sent_not_the_conversation_kept(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """`truncation: "auto"` applies to the conversation's items and the input together: the
    oldest turns are not sent, but the conversation keeps them."""
    fake = WindowedVLLM()
    fake.set_script(Script(tokens=["fits"]))
    history = agent_history(20)[:-1]  # ~5000 tokens, for a window of 2000
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, prefixes=("qwen",))
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await client.models.list()  # the gateway knows the window
        conversation = await client.conversations.create(items=history[:20])
        for start in range(20, len(history), 20):
            await client.conversations.items.create(conversation.id, items=history[start : start + 20])
        response = await client.responses.create(
            model="qwen3-8b", instructions="Be brief.", input="and now the last question", truncation="auto",
            max_output_tokens=300, conversation=conversation.id,
        )
        assert response.output_text == "fits"
        kept = await listed(client, conversation.id)
        await client.close()
    assert_trimmed(fake.chats()[-1])
    assert len(kept) == len(history) + 2
    assert kept[0] == ("message", "user", history[0]["content"])
    assert kept[-2:] == [("message", "user", "and now the last question"), ("message", "assistant", "fits")]


async def test_items_read_back_by_the_sdk_are_input_again(stack: Stack) -> None:
    """What the Agents SDK's `OpenAIConversationsSession` does: items listed (`model_dump()`,
    every field the SDK knows, null or not) are sent back as a response's input and as new
    conversation items."""
    client = stack.client
    conversation = await client.conversations.create(items=[
        {"role": "developer", "content": "Use the tools."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny.", "annotations": []}]},
    ])
    dumped: Any = [item.model_dump() async for item in client.conversations.items.list(conversation.id, order="asc")]
    answered = await client.responses.create(model="m", input=[*dumped, {"role": "user", "content": "Tomorrow?"}])
    assert answered.status == "completed"
    body = stack.fake.requests[-1].json
    assert isinstance(body, dict)
    assert [(m["role"], m.get("content") or m.get("tool_calls")[0]["function"]["name"]) for m in body["messages"]] == [
        ("system", "Use the tools."), ("user", "Weather in Paris?"), ("assistant", "weather"), ("tool", "sunny"),
        ("assistant", "Sunny."), ("user", "Tomorrow?"),
    ]
    copy = await client.conversations.create(items=dumped)
    assert await listed(client, copy.id) == await listed(client, conversation.id)


async def test_an_agent_loop_in_a_conversation_sends_only_the_tools_output(stack: Stack) -> None:
    """The model calls a function; the client sends just its output, in the conversation: the
    backend sees the call (kept by the conversation) answered by it."""
    client = stack.client
    tool: Any = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}
    conversation = await client.conversations.create()
    stack.fake.set_script(Script(tokens=[], tool_calls=[("get_weather", {"city": "Paris"})]))
    called = await client.responses.create(model="m", input="Weather?", tools=[tool], conversation=conversation.id)
    assert [item.type for item in called.output] == ["function_call"]
    call = called.output[-1]
    assert call.type == "function_call"
    stack.fake.set_script(Script(tokens=["Sunny in Paris."]))
    answered = await client.responses.create(
        model="m", tools=[tool], conversation=conversation.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )
    assert answered.output_text == "Sunny in Paris."
    messages = stack.fake.requests[-1].json["messages"]  # type: ignore[index]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["id"] == call.call_id and messages[2]["tool_call_id"] == call.call_id
    assert [kind for kind, *_ in await listed(client, conversation.id)] == [
        "message", "function_call", "function_call_output", "message",
    ]


async def test_an_item_reference_finds_a_conversations_item(stack: Stack) -> None:
    owner, other = await new_key(stack.db, "owner"), await new_key(stack.db, "other")
    await wait_for_key(stack.url, owner)
    await wait_for_key(stack.url, other)
    mine = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=owner, max_retries=0)
    theirs = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=other, max_retries=0)
    conversation = await mine.conversations.create(items=[{"role": "user", "content": "The code is 7."}])
    item = (await mine.conversations.items.list(conversation.id)).data[0].id
    reference: Any = [{"type": "item_reference", "id": item}, {"role": "user", "content": "What is the code?"}]
    assert (await mine.responses.create(model="m", input=reference)).status == "completed"
    assert backend_saw(stack.fake) == [("user", "The code is 7."), ("user", "What is the code?")]
    with pytest.raises(openai.NotFoundError) as info:
        await theirs.responses.create(model="m", input=reference)  # another key's
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "input[0]"
    await mine.conversations.items.delete(item, conversation_id=conversation.id)
    with pytest.raises(openai.NotFoundError):
        await mine.responses.create(model="m", input=reference)
    await mine.close()
    await theirs.close()


async def test_a_response_in_a_conversation_is_not_answered_from_the_semantic_cache(stack: Stack) -> None:
    """A conversation's turn alike an answer the semantic cache keeps is answered by the model,
    under its own id (a hit would name the response that made the cached answer, and the
    conversation would get this turn's items under that response's ids)."""
    headers = {"x-cache": "semantic"}
    before = (await sql(stack.db, "SELECT count(*) FROM semantic_cache"))[0][0]
    stack.fake.set_script(Script(tokens=["Water it monthly."]))
    one = await stack.client.responses.create(model="m", input="How often do I water a cactus?", extra_headers=headers)
    await wait_for_row(stack.db, one.id.removeprefix("resp_"), "completed")

    async def cached() -> bool:
        return bool((await sql(stack.db, "SELECT count(*) FROM semantic_cache"))[0][0] > before)

    await eventually(cached, within=10)
    asked = len(stack.fake.requests)
    stack.fake.set_script(Script(tokens=["Every few weeks."]))
    conversation = await stack.client.conversations.create()
    two = await stack.client.responses.with_raw_response.create(
        model="m", input="How often should I water a cactus?", conversation=conversation.id, extra_headers=headers
    )
    answered = two.parse()
    assert two.headers.get("x-cache") != "semantic" and len(stack.fake.requests) == asked + 1
    assert answered.id != one.id and answered.output_text == "Every few weeks."
    items = [item.id async for item in stack.client.conversations.items.list(conversation.id)]
    assert items and all(answered.id.removeprefix("resp_") in item for item in items)


async def test_item_references_add_the_items_they_name(stack: Stack) -> None:
    """`item_reference`s among the items given to `conversations.create` and `items.create`
    (OpenAI resolves them): a kept response's input and output items, another conversation's
    items, each added as a copy under its own new id."""
    client = stack.client
    answered = await client.responses.create(model="m", input="What is the secret?")
    question = (await client.responses.input_items.list(answered.id)).data[0].id
    answer = answered.output[0].id
    assert answer is not None
    conversation = await client.conversations.create(items=[
        {"type": "item_reference", "id": question}, {"type": "item_reference", "id": answer},
    ])
    assert await listed(client, conversation.id) == [
        ("message", "user", "What is the secret?"), ("message", "assistant", "The secret is 42."),
    ]
    other = await client.conversations.create(items=[{"role": "user", "content": "Earlier."}])
    earlier = (await client.conversations.items.list(other.id)).data[0].id
    added = await client.conversations.items.create(conversation.id, items=[
        {"type": "item_reference", "id": earlier}, {"role": "user", "content": "Now."},
    ])
    assert [item.type for item in added.data] == ["message", "message"]
    assert earlier not in {item.id for item in added.data} and answer not in {
        item.id async for item in client.conversations.items.list(conversation.id)
    }
    await client.responses.create(model="m", input="And?", conversation=conversation.id)
    assert backend_saw(stack.fake) == [
        ("user", "What is the secret?"), ("assistant", "The secret is 42."), ("user", "Earlier."),
        ("user", "Now."), ("user", "And?"),
    ]
    # One that names nothing kept is OpenAI's 404, naming the reference; nothing is added.
    before = await listed(client, conversation.id)
    with pytest.raises(openai.NotFoundError) as info:
        await client.conversations.items.create(conversation.id, items=[
            {"role": "user", "content": "x"}, {"type": "item_reference", "id": "msg_nope"},
        ])
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "items[1]"
    with pytest.raises(openai.NotFoundError):
        await client.conversations.create(items=[{"type": "item_reference", "id": "msg_nope"}])
    assert await listed(client, conversation.id) == before


# -- one response at a time (OpenAI's `conversation_locked`) ------------------------------------------

SLOW = Script(tokens=["The secret", " is 42."], usage=Usage(5, 2), header_delay=1.0)


def assert_locked(error: openai.BadRequestError) -> None:
    body = error.body
    assert error.status_code == 400 and isinstance(body, dict), body
    assert body["code"] == "conversation_locked" and body["param"] == "conversation", body
    assert body["message"] == "Another process is currently operating on this conversation. Please retry in a few seconds."


async def test_a_second_response_while_one_answers_in_the_conversation_is_refused(stack: Stack) -> None:
    """OpenAI answers one response at a time in a conversation: a second one meanwhile is a
    400 `conversation_locked` (not a second answer to the conversation as it stood, both
    appended); the client's next request, once it has its answer, is not."""
    client = stack.client
    conversation = await client.conversations.create(items=[{"role": "user", "content": "Hello"}])
    stack.fake.push(SLOW)
    async with trio.open_nursery() as nursery:
        first: list[Any] = []

        async def answer() -> None:
            first.append(await client.responses.create(model="m", input="First.", conversation=conversation.id))

        nursery.start_soon(answer)
        await stack.fake.wait_requests(1)
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(model="m", input="Second.", conversation=conversation.id, stream=stream)
            assert_locked(refused.value)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(model="m", input="Later.", conversation=conversation.id, background=True)
        assert_locked(refused.value)
    assert first[0].output_text == "The secret is 42."
    # At once: its lock was given back before its client had the answer.
    third = await client.responses.create(model="m", input="Third.", conversation=conversation.id, stream=True)
    assert [event.type async for event in third][-1] == "response.completed"
    assert len(stack.fake.requests) == 2
    assert await listed(client, conversation.id) == [
        ("message", "user", "Hello"),
        ("message", "user", "First."), ("message", "assistant", "The secret is 42."),
        ("message", "user", "Third."), ("message", "assistant", "The secret is 42."),
    ]


async def test_a_retry_with_its_idempotency_key_attaches_to_the_run_holding_the_lock(stack: Stack) -> None:
    client = stack.client
    conversation = await client.conversations.create()
    key = {"Idempotency-Key": "locked-retry-1"}
    stack.fake.push(SLOW)
    async with trio.open_nursery() as nursery:
        answers: list[Any] = []

        async def answer() -> None:
            answers.append(await client.responses.create(
                model="m", input="Once.", conversation=conversation.id, extra_headers=key
            ))

        nursery.start_soon(answer)
        await stack.fake.wait_requests(1)
        retried = await client.responses.create(model="m", input="Once.", conversation=conversation.id, extra_headers=key)
    assert retried.id == answers[0].id and retried.output_text == "The secret is 42."
    assert len(stack.fake.requests) == 1
    # A background response's repeat (its key) reads the run as it stands: not refused either.
    stack.fake.push(SLOW)
    queued = await client.responses.create(
        model="m", input="Later.", conversation=conversation.id, background=True, extra_headers={"Idempotency-Key": "bg-1"}
    )
    again = await client.responses.create(
        model="m", input="Later.", conversation=conversation.id, background=True, extra_headers={"Idempotency-Key": "bg-1"}
    )
    assert again.id == queued.id
    await wait_for_row(stack.db, queued.id.removeprefix("resp_"), "completed")
    assert await listed(client, conversation.id) == [
        ("message", "user", "Once."), ("message", "assistant", "The secret is 42."),
        ("message", "user", "Later."), ("message", "assistant", "The secret is 42."),
    ]


async def test_the_lock_is_given_back_however_the_run_ends(stack: Stack) -> None:
    """Failed, cancelled, or its client gone: the next response in the conversation runs."""
    client = stack.client
    conversation = await client.conversations.create()
    stack.fake.push(Script(status=500))
    with pytest.raises(openai.InternalServerError):
        await client.responses.create(model="m", input="Fail.", conversation=conversation.id)
    stack.fake.push(Script(tokens=["Half"], fail_after=2))
    stream = await client.responses.create(model="m", input="Fail later.", conversation=conversation.id, stream=True)
    assert [event.type async for event in stream][-1] == "response.failed"
    # A background response cancelled while its backend is silent.
    stack.fake.push(Script(tokens=["Never"], header_delay=30))
    queued = await client.responses.create(model="m", input="Cancel me.", conversation=conversation.id, background=True)
    await stack.fake.wait_requests(3)
    assert (await client.responses.cancel(queued.id)).status == "cancelled"
    # A streaming client that leaves.
    stack.fake.push(Script(tokens=["Slow"] * 50, pace=0.2))
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        async with http.stream(
            "POST", "/v1/responses", json={"model": "m", "input": "Leave.", "conversation": conversation.id, "stream": True}
        ) as left:
            async for line in left.aiter_lines():
                if "output_text.delta" in line:
                    break

    async def runs() -> bool:
        try:
            await client.responses.create(model="m", input="After.", conversation=conversation.id)
        except openai.BadRequestError as error:
            assert_locked(error)
            return False
        return True

    await eventually(runs, within=5)
    assert await listed(client, conversation.id) == [("message", "user", "After."), ("message", "assistant", "The secret is 42.")]
    assert await sql(stack.db, "SELECT lock_trace FROM conversations WHERE id = %s", conversation.id) == [(None,)]


async def test_a_response_with_store_false_still_joins_its_conversation(stack: Stack) -> None:
    """As on OpenAI (`store: false` with `conversation` is answered, `store: false` echoed):
    `store` is about the response, read back by its id, which stays a 404; the conversation
    still gains its turn, as `conversation` says ("input items and output items from this
    response are automatically added to this conversation")."""
    client = stack.client
    conversation = await client.conversations.create(items=[{"role": "user", "content": "Remember: 42."}])
    answered = await client.responses.create(model="m", input="Noted?", conversation=conversation.id, store=False)
    assert (answered.model_extra or {}).get("store") is False
    assert answered.conversation is not None and answered.conversation.id == conversation.id
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(answered.id)
    assert await listed(client, conversation.id) == [
        ("message", "user", "Remember: 42."), ("message", "user", "Noted?"), ("message", "assistant", "The secret is 42."),
    ]
    await client.responses.create(model="m", input="And now?", conversation=conversation.id)
    assert backend_saw(stack.fake)[-3:] == [
        ("user", "Noted?"), ("assistant", "The secret is 42."), ("user", "And now?"),
    ]


async def test_a_lock_whose_run_is_gone_is_free(stack: Stack) -> None:
    """A lock outlives its run only if its release was lost: its instance killed (gone from
    the heartbeats, as once swept), or the release failing (its run's row says it ended).
    Either is free to the next response; a lock of a live instance's run still going is not."""
    client = stack.client
    conversation = await client.conversations.create()
    answered = await client.responses.create(model="m", input="Done.", conversation=conversation.id)
    ended = answered.id.removeprefix("resp_")
    await wait_for_row(stack.db, ended, "completed")
    await sql(stack.db, "INSERT INTO gateway_instances (id) VALUES ('alive-elsewhere') ON CONFLICT (id) DO UPDATE SET seen_at = now()")
    left = "UPDATE conversations SET lock_trace = %s, lock_owner = %s WHERE id = %s"
    await sql(stack.db, left, "0123456789abcdef0123456789abcdef", "alive-elsewhere", conversation.id)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(model="m", input="Held.", conversation=conversation.id)
    assert_locked(refused.value)
    for trace_id, owner in ((ended, "alive-elsewhere"), ("0123456789abcdef0123456789abcdef", "killed")):
        await sql(stack.db, left, trace_id, owner, conversation.id)
        assert (await client.responses.create(model="m", input="Free.", conversation=conversation.id)).status == "completed"


async def test_of_responses_sent_at_once_in_a_conversation_one_answers(stack: Stack) -> None:
    """Sent together (no one first), one runs and the rest are refused; a refused request's
    `Idempotency-Key` is not spent: retried once the conversation is free, it runs."""
    client = stack.client
    conversation = await client.conversations.create()
    stack.fake.set_script(SLOW)
    outcomes: list[str] = []

    async def send(n: int) -> None:
        try:
            await client.responses.create(
                model="m", input=f"Turn {n}.", conversation=conversation.id, extra_headers={"Idempotency-Key": f"at-once-{n}"}
            )
        except openai.BadRequestError as error:
            assert_locked(error)
            outcomes.append(f"refused {n}")
        else:
            outcomes.append(f"answered {n}")

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(send, n)
    answered = [outcome for outcome in outcomes if outcome.startswith("answered")]
    assert len(answered) == 1 and len(outcomes) == 5, outcomes
    assert len(stack.fake.requests) == 1
    stack.fake.set_script(QUICK)
    retried = next(int(outcome.split()[1]) for outcome in outcomes if outcome.startswith("refused"))
    await send(retried)
    assert outcomes[-1] == f"answered {retried}"
    assert [text for _, _, text in await listed(client, conversation.id)] == [
        answered[0].replace("answered ", "Turn ") + ".", "The secret is 42.", f"Turn {retried}.", "The secret is 42.",
    ]
