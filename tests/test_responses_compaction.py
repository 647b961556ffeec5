"""OpenAI's `POST /v1/responses/compact` (`client.responses.compact`, what the Agents SDK's
`OpenAIResponsesCompactionSession` calls) with the official `openai` SDK: the model writes a
summary of the conversation; the answer is its user messages and a `compaction` item that
later requests take as input in place of what it summarized."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from tests.fakes import OpenAIBackend, Script, ToolCall, Usage
from tests.test_conversations import backend_saw
from tests.test_persistence import wait_for_row
from tests.test_responses_stored import Stack, journaled_stack

pytest_plugins = ["tests.infra_servers"]

TOOL: Any = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    fake = OpenAIBackend(default=Script(tokens=["The user asked", " about Paris: sunny."], usage=Usage(40, 6)))
    async with journaled_stack(pg_database_url, nats_url, fake) as built:
        yield built


HISTORY: Any = [
    {"role": "user", "content": "Weather in Paris?"},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
]


async def test_a_conversation_compacted_is_its_user_messages_and_a_summary_taken_back_as_input(stack: Stack) -> None:
    client = stack.client
    compacted = await client.responses.compact(model="m", input=HISTORY, instructions="Be brief.")
    assert compacted.object == "response.compaction" and compacted.id.startswith("resp_")
    assert compacted.usage.input_tokens == 40 and compacted.usage.output_tokens == 6
    # The model was asked for a summary of the whole conversation, with no tool to call.
    asked = stack.fake.requests[-1].json
    assert isinstance(asked, dict) and "tools" not in asked
    seen = backend_saw(stack.fake)
    assert seen[:-1] == [
        ("system", "Be brief."), ("user", "Weather in Paris?"), ("assistant", None), ("tool", "sunny"),
        ("assistant", "Sunny."),
    ]
    assert seen[-1][0] == "user" and "Summarize the conversation" in seen[-1][1]
    output = [item.model_dump(exclude_none=True, warnings=False) for item in compacted.output]
    assert [(item["type"], item.get("role")) for item in output] == [("message", "user"), ("compaction", None)]
    assert output[0]["content"] == [{"type": "input_text", "text": "Weather in Paris?"}]
    assert output[1]["id"].startswith("cmp_") and output[1]["encrypted_content"]

    # Given back (as the SDK keeps it), the compaction stands for what it summarized.
    stack.fake.set_script(Script(tokens=["Still sunny."]))
    answered = await client.responses.create(model="m", input=[*output, {"role": "user", "content": "And now?"}])
    assert answered.output_text == "Still sunny."
    assert backend_saw(stack.fake) == [
        ("user", "Weather in Paris?"),
        ("user", "Summary of the conversation so far (compacted):\nThe user asked about Paris: sunny."),
        ("user", "And now?"),
    ]
    # Compacted again, the earlier summary is summarized, not kept as a user message.
    again = await client.responses.compact(model="m", input=[*output, {"role": "user", "content": "And now?"}])
    assert [item.type for item in again.output] == ["message", "message", "compaction"]


async def test_a_response_is_compacted_by_its_id(stack: Stack) -> None:
    """The SDK's default: `previous_response_id` alone, the conversation that response had."""
    client = stack.client
    stack.fake.set_script(Script(tokens=[], tool_calls=[ToolCall("get_weather", "{}")]))
    called = await client.responses.create(model="m", input="Weather in Paris?", tools=[TOOL])
    call = called.output[-1]
    assert call.type == "function_call"
    stack.fake.set_script(Script(tokens=["Sunny."]))
    answered = await client.responses.create(
        model="m", previous_response_id=called.id, tools=[TOOL],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )
    await wait_for_row(stack.db, answered.id.removeprefix("resp_"), "completed")
    stack.fake.set_script(Script(tokens=["Paris: sunny."]))
    compacted = await client.responses.compact(model="m", previous_response_id=answered.id)
    assert backend_saw(stack.fake)[:-1] == [
        ("user", "Weather in Paris?"), ("assistant", None), ("tool", "sunny"), ("assistant", "Sunny."),
    ]
    assert [item.type for item in compacted.output] == ["message", "compaction"]


async def test_a_compaction_kept_in_a_conversation_is_listed_back_as_one(stack: Stack) -> None:
    """The Agents SDK's compaction session over a conversation session replaces the
    conversation's items with the compacted output and reads them back: the compaction is a
    `compaction` item there (and in a response's `input_items`), not a user message."""
    client = stack.client
    compacted = await client.responses.compact(model="m", input=HISTORY)
    given = [item.model_dump(exclude_none=True, warnings=False) for item in compacted.output]
    conversation = await client.conversations.create(items=given)
    listed = [item.model_dump(exclude_none=True, warnings=False) async for item in client.conversations.items.list(
        conversation.id, order="asc"
    )]
    assert [(item["type"], item.get("role")) for item in listed] == [("message", "user"), ("compaction", None)]
    assert listed[1]["id"].startswith("cmp_") and listed[1]["encrypted_content"] == given[1]["encrypted_content"]
    one = await client.conversations.items.retrieve(listed[1]["id"], conversation_id=conversation.id)
    assert one.type == "compaction"

    stack.fake.set_script(Script(tokens=["Still sunny."]))
    answered = await client.responses.create(model="m", input=[*given[1:], {"role": "user", "content": "And now?"}])
    assert backend_saw(stack.fake)[0] == (
        "user", "Summary of the conversation so far (compacted):\nThe user asked about Paris: sunny."
    )
    await wait_for_row(stack.db, answered.id.removeprefix("resp_"), "completed")
    inputs = (await client.responses.input_items.list(answered.id, order="asc")).data
    assert [item.type for item in inputs] == ["compaction", "message"]
    # Read back and given again, it still stands for its summary.
    await client.responses.create(model="m", input="Go on.", conversation=conversation.id)
    assert backend_saw(stack.fake)[:2] == [
        ("user", "Weather in Paris?"),
        ("user", "Summary of the conversation so far (compacted):\nThe user asked about Paris: sunny."),
    ]


async def test_refusals_name_their_field(stack: Stack) -> None:
    client = stack.client
    forged: Any = [{"type": "compaction", "encrypted_content": "gAAAAAB-openai-encrypted"}, {"role": "user", "content": "x"}]
    for call, param in [
        (lambda: client.responses.create(model="m", input=forged), "input[0].encrypted_content"),
        (lambda: client.responses.compact(model="m"), "input"),
        (lambda: client.responses.compact(model="m", input=HISTORY, extra_body={"stream": True}), "stream"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            await call()
        body = info.value.body
        assert isinstance(body, dict) and body["param"] == param, (param, body)
    with pytest.raises(openai.BadRequestError):
        await client.responses.compact(model="m", previous_response_id="resp_0123456789abcdef0123456789abcdef")


@pytest.mark.parametrize("stream", [True, False])
async def test_codex_compaction_trigger_is_answered_with_one_compaction_item(stack: Stack, stream: bool) -> None:
    """Codex CLI (on OpenAI) compacts by an ordinary request whose input ends with
    `{"type": "compaction_trigger"}`, streamed, `store: false`, its tools offered (it was a 400
    naming `input[i].type`, which Codex retried five times as "high demand" and then failed the
    turn): the answer is one `compaction` item, which its next request gives back as input."""
    body = {
        "model": "m", "instructions": "You are Codex.", "input": [*HISTORY, {"type": "compaction_trigger"}],
        "tools": [TOOL], "tool_choice": "auto", "parallel_tool_calls": True, "reasoning": None, "store": False,
        "stream": stream, "include": [], "prompt_cache_key": "01a2207d",
    }
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        answer = await http.post("/v1/responses", json=body)
    assert answer.status_code == 200, answer.text
    if stream:
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: ")]
        assert [e["type"] for e in events] == [
            "response.created", "response.in_progress", "response.output_item.added", "response.output_item.done",
            "response.completed",
        ]
        assert [e["sequence_number"] for e in events] == [0, 1, 2, 3, 4]
        assert events[2]["item"]["type"] == "compaction"
        done = events[-1]["response"]
        assert done["output"] == [events[3]["item"]]
    else:
        done = answer.json()
    assert done["status"] == "completed" and done["usage"]["input_tokens"] == 40
    [item] = done["output"]
    assert item["type"] == "compaction" and item["encrypted_content"]
    # The model was asked for the summary, with no tool to call.
    asked = stack.fake.requests[-1].json
    assert isinstance(asked, dict) and "tools" not in asked
    assert "Summarize the conversation" in backend_saw(stack.fake)[-1][1]

    stack.fake.set_script(Script(tokens=["Still sunny."]))
    answered = await stack.client.responses.create(
        model="m", input=[item, {"role": "user", "content": "And now?"}], tools=[TOOL], store=False,
    )
    assert answered.output_text == "Still sunny."
    seen = backend_saw(stack.fake)
    assert seen[0][0] == "user" and "Paris: sunny." in seen[0][1]


async def test_a_compaction_trigger_elsewhere_than_last_is_refused(stack: Stack) -> None:
    body = {"model": "m", "input": [{"type": "compaction_trigger"}, *HISTORY]}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        refused = await http.post("/v1/responses", json=body)
        alone = await http.post("/v1/responses", json={"model": "m", "input": [{"type": "compaction_trigger"}]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input[0].type"
    assert alone.status_code == 400 and alone.json()["error"]["param"] == "input"



@pytest.mark.parametrize("stream", [False, True])
async def test_a_compaction_triggers_response_reads_back_and_continues_as_its_compaction(stack: Stack, stream: bool) -> None:
    """A `compaction_trigger`'s response kept (`store` left on) reads back as the `compaction`
    item its client had, lists its client's items as its input, and a response continuing it by
    `previous_response_id` goes on from the summary. It read back as a message of the summary's
    text, listed the gateway's ask for the summary as the client's input, and was continued with
    the whole conversation it compacted, that ask and the summary as an assistant's answer."""
    body = {"model": "m", "input": [*HISTORY, {"type": "compaction_trigger"}], "tools": [TOOL], "stream": stream}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        answer = await http.post("/v1/responses", json=body)
    assert answer.status_code == 200, answer.text
    if stream:
        done = next(json.loads(line[6:]) for line in answer.text.splitlines() if '"response.completed"' in line)["response"]
    else:
        done = answer.json()
    [item] = done["output"]
    await wait_for_row(stack.db, done["id"].removeprefix("resp_"), "completed")

    back = await stack.client.responses.retrieve(done["id"])
    assert [i.model_dump(exclude_none=True) for i in back.output] == [item]
    streamed = [event async for event in await stack.client.responses.retrieve(done["id"], stream=True)]
    assert [e.type for e in streamed][-3:] == ["response.output_item.added", "response.output_item.done", "response.completed"]
    assert [i.model_dump(exclude_none=True) for i in streamed[-1].response.output] == [item]  # type: ignore[union-attr]
    listed = [i.model_dump(exclude_none=True) async for i in stack.client.responses.input_items.list(done["id"], order="asc")]
    assert [i["type"] for i in listed] == ["message", "function_call", "function_call_output", "message"]
    assert "Summarize" not in json.dumps(listed)

    stack.fake.set_script(Script(tokens=["Still sunny."]))
    answered = await stack.client.responses.create(model="m", input="And now?", previous_response_id=done["id"])
    assert answered.output_text == "Still sunny."
    assert backend_saw(stack.fake) == [("user", "Summary of the conversation so far (compacted):\nThe user asked about Paris: sunny."), ("user", "And now?")]
    # Its own input items: what it was given, not the summary it went on from.
    listed = [i.model_dump(exclude_none=True) async for i in stack.client.responses.input_items.list(answered.id)]
    assert [i["type"] for i in listed] == ["message"] and listed[0]["content"][0]["text"] == "And now?"


async def test_a_compaction_trigger_repeated_with_its_key_is_the_same_response(stack: Stack) -> None:
    """Replayed for its `Idempotency-Key`, a `compaction_trigger`'s answer is the response its
    run made (its id, which reads it back), as any response's replay is (it named a new id that
    no response has)."""
    body = {"model": "m", "input": [*HISTORY, {"type": "compaction_trigger"}]}
    headers = {"Idempotency-Key": "compact-once"}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        first = (await http.post("/v1/responses", json=body, headers=headers)).json()
        await wait_for_row(stack.db, first["id"].removeprefix("resp_"), "completed")
        again = await http.post("/v1/responses", json=body, headers=headers)
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json()["id"] == first["id"] and again.json()["output"] == first["output"]
    assert len(stack.fake.requests) == 1

