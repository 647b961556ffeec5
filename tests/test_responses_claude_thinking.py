"""Claude's signed thinking through a Responses tool loop the gateway continues from its journal
(`previous_response_id`, `conversation`), with the official `openai` SDK, a gateway with its
journal (PostgreSQL, NATS) and a loopback Claude that refuses, as Anthropic does, a thinking
request whose tool loop's last turn lacks its signed thinking."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from tests.fakes import AnthropicBackend, Script
from tests.fakes.anthropic_backend import thinking_signature
from tests.harness import backend
from tests.test_auth_helpers import gateway
from tests.test_persistence import wait_for_row

pytest_plugins = ["tests.infra_servers"]

MODEL = "claude-sonnet-4-5"
TOOLS: Any = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
ASKED: Any = {"model": MODEL, "tools": TOOLS, "reasoning": {"effort": "medium"}}


@pytest.fixture
async def claude(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[tuple[AnthropicBackend, openai.AsyncOpenAI]]:
    fake = AnthropicBackend()
    fake.strict_thinking = True
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("claude", server.url, kind="anthropic", default=True)
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        yield fake, client
        await client.close()


async def _asked(client: openai.AsyncOpenAI, stream: bool, **fields: Any) -> Any:
    if stream:
        async with client.responses.stream(**ASKED, **fields) as events:
            return await events.get_final_response()
    return await client.responses.create(**ASKED, **fields)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("how", ["previous_response_id", "conversation"])
async def test_claude_thinks_on_in_a_tool_loop_the_journal_continues(
    claude: tuple[AnthropicBackend, openai.AsyncOpenAI], pg_database_url: str, stream: bool, how: str,
) -> None:
    """The Agents SDK's server-side loop (`previous_response_id`), or a conversation: the turn
    that called the tool goes back to Claude with its signed thinking, so it thinks on (the
    gateway used to switch thinking off there, Claude refusing it without that block)."""
    fake, client = claude
    fake.set_script(Script(reasoning=["Weather ", "first."], tokens=[], tool_calls=[("get_weather", {"city": "Paris"})]))
    where: dict[str, Any] = {}
    if how == "conversation":
        where["conversation"] = (await client.conversations.create()).id
    first = await _asked(client, stream, input="Weather in Paris?", **where)
    call = next(item for item in first.output if item.type == "function_call")
    live = next(item for item in first.output if item.type == "reasoning")
    assert live.encrypted_content
    await wait_for_row(pg_database_url, first.id.removeprefix("resp_"), "completed")

    fake.set_script(Script(tokens=["Sunny."]))
    where = where or {"previous_response_id": first.id}
    answer = await _asked(
        client, stream, input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}], **where,
    )
    assert answer.output_text == "Sunny."
    sent = fake.requests[-1].json
    assert sent["thinking"]["type"] == "enabled"
    turn = sent["messages"][1]
    assert turn["role"] == "assistant"
    assert turn["content"][0] == {"type": "thinking", "thinking": "Weather first.", "signature": thinking_signature("Weather first.")}
    assert turn["content"][1]["type"] == "tool_use"

    # Read back, the answer's reasoning is as its client had it live: the signature opaque.
    kept = next(item for item in (await client.responses.retrieve(first.id)).output if item.type == "reasoning")
    assert kept.encrypted_content == live.encrypted_content and "EqQB" not in kept.model_dump_json().replace(
        kept.encrypted_content or "", ""
    )
    if stream:  # its stream read again (a client resuming it): the same opaque signature
        replayed = [event async for event in await client.responses.retrieve(first.id, stream=True)]
        done = next(event for event in replayed if event.type == "response.completed").response
        again = next(item for item in done.output if item.type == "reasoning")
        assert again.encrypted_content == live.encrypted_content
    if how == "conversation":
        items = [item async for item in client.conversations.items.list(where["conversation"], order="asc")]
        listed = next(item for item in items if item.type == "reasoning")
        assert listed.encrypted_content == live.encrypted_content  # type: ignore[union-attr]


async def test_the_strict_claude_fake_refuses_as_anthropic_does() -> None:
    """The fake this file relies on: a tool loop's last turn without its signed thinking, or with
    a signature not made for its text, is Anthropic's 400 while thinking is on."""
    fake = AnthropicBackend()
    fake.strict_thinking = True
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}

    def body(*blocks: Any, thinking: bool = True) -> dict[str, Any]:
        return {
            "model": MODEL, "max_tokens": 2048, **({"thinking": {"type": "enabled", "budget_tokens": 1024}} if thinking else {}),
            "messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": [*blocks, call]}, result],
        }

    signed = {"type": "thinking", "thinking": "Call it.", "signature": thinking_signature("Call it.")}
    async with fake.serve() as server, httpx.AsyncClient(base_url=server.url) as http:
        unsigned = await http.post("/v1/messages", json=body())
        assert unsigned.status_code == 400 and "must start with a thinking block" in unsigned.json()["error"]["message"]
        forged = await http.post("/v1/messages", json=body({**signed, "thinking": "Something else."}))
        assert forged.status_code == 400 and "Invalid `signature`" in forged.json()["error"]["message"]
        assert (await http.post("/v1/messages", json=body(signed))).status_code == 200
        assert (await http.post("/v1/messages", json=body(thinking=False))).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_claudes_redacted_thinking_goes_back_in_the_tool_loop(
    claude: tuple[AnthropicBackend, openai.AsyncOpenAI], pg_database_url: str, stream: bool,
) -> None:
    """Claude's `redacted_thinking` (thinking encrypted whole) reaches a Responses client as a
    reasoning item with `encrypted_content`, and goes back to Claude as that block, given back by
    the client or continued from the journal (it was dropped: the loop's next turn went without
    its thinking, so the gateway switched thinking off)."""
    fake, client = claude
    fake.redacted_thinking = "EmwKAhgBEgy3va3pzix"
    fake.set_script(Script(tokens=[], tool_calls=[("get_weather", {"city": "Paris"})]))
    first = await _asked(client, stream, input="Weather in Paris?")
    fake.redacted_thinking = None
    [reasoning] = [item for item in first.output if item.type == "reasoning"]
    assert reasoning.encrypted_content and "EmwK" not in reasoning.encrypted_content and not reasoning.content
    call = next(item for item in first.output if item.type == "function_call")
    await wait_for_row(pg_database_url, first.id.removeprefix("resp_"), "completed")
    redacted = {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"}
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}

    fake.set_script(Script(tokens=["Sunny."]))
    given = [{"role": "user", "content": "Weather in Paris?"}, *(i.model_dump(exclude_none=True) for i in first.output), output]
    conversation = (await client.conversations.create()).id
    for fields in ({"input": given, "conversation": conversation}, {"input": [output], "previous_response_id": first.id}):
        answer = await _asked(client, stream, **fields)
        assert answer.output_text == "Sunny."
        sent = fake.requests[-1].json
        assert sent["thinking"]["type"] == "enabled"
        turn = sent["messages"][1]
        assert turn["content"][0] == redacted and turn["content"][1]["type"] == "tool_use"
    # The conversation keeps the item given back as it was given (it was left out).
    items = [item async for item in client.conversations.items.list(conversation, order="asc")]
    assert [item.encrypted_content for item in items if item.type == "reasoning"] == [reasoning.encrypted_content]  # type: ignore[union-attr]


async def test_a_tool_loop_compacted_before_its_calls_were_answered_reaches_claude(
    claude: tuple[AnthropicBackend, openai.AsyncOpenAI], pg_database_url: str,
) -> None:
    """`responses.compact(previous_response_id=...)` of a turn that ended calling tools (a run
    interrupted for a tool's approval, or out of turns): the conversation went to Claude with
    its calls unanswered and the summary's request after them, which Anthropic refuses (400
    `tool_use` ids without `tool_result`). Each turn's signed thinking goes with it."""
    fake, client = claude
    fake.set_script(Script(reasoning=["Both ", "cities."], tokens=[],
                           tool_calls=[("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]))
    first = await client.responses.create(**ASKED, input="Weather in Paris and Rome?")
    await wait_for_row(pg_database_url, first.id.removeprefix("resp_"), "completed")
    calls = [item for item in first.output if item.type == "function_call"]
    fake.set_script(Script(reasoning=["Then ", "Oslo."], tokens=[],
                           tool_calls=[("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Nice"})]))
    second = await client.responses.create(**ASKED, previous_response_id=first.id, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"} for call in calls])
    await wait_for_row(pg_database_url, second.id.removeprefix("resp_"), "completed")

    fake.set_script(Script(tokens=["Paris and Rome sunny; Oslo and Nice asked."]))
    compacted = await client.responses.compact(model=MODEL, previous_response_id=second.id)
    assert compacted.output[-1].type == "compaction"
    sent = fake.requests[-1].json["messages"]
    turns = [message for message in sent if message["role"] == "assistant"]
    assert [turn["content"][0] for turn in turns] == [
        {"type": "thinking", "thinking": text, "signature": thinking_signature(text)} for text in ("Both cities.", "Then Oslo.")
    ]
    # Every call has its result next, the calls never run said to be so.
    results = [block for message in sent if isinstance(message["content"], list) for block in message["content"]
               if block["type"] == "tool_result"]
    assert len(results) == 4 and all("sunny" in str(result["content"]) for result in results[:2])
    assert all("not run" in str(result["content"]) for result in results[2:])


def _opening_blocks(sent: dict[str, Any]) -> list[Any]:
    """Each assistant turn's first block, as Claude was sent it."""
    return [message["content"][0] for message in sent["messages"] if message["role"] == "assistant"]


def _signed(*texts: str) -> list[Any]:
    return [{"type": "thinking", "thinking": text, "signature": thinking_signature(text)} for text in texts]


@pytest.mark.parametrize("stream", [False, True])
async def test_every_turn_of_a_long_tool_loop_reaches_claude_with_its_own_signed_thinking(
    claude: tuple[AnthropicBackend, openai.AsyncOpenAI], pg_database_url: str, stream: bool,
) -> None:
    """Three turns of parallel calls continued by `previous_response_id`, then the first turn's
    items given again by `item_reference`: each assistant turn opens with the thinking Claude
    signed for it, never another turn's."""
    fake, client = claude
    answer: Any = None
    thoughts = ["Both cities.", "Then Oslo.", "Last Nice."]
    for turn, thought in enumerate(thoughts):
        fake.set_script(Script(reasoning=[thought], tokens=[],
                               tool_calls=[("get_weather", {"city": f"A{turn}"}), ("get_weather", {"city": f"B{turn}"})]))
        where: dict[str, Any] = {"input": "Weather?"} if answer is None else {"previous_response_id": answer.id, "input": [
            {"type": "function_call_output", "call_id": item.call_id, "output": "sunny"}
            for item in answer.output if item.type == "function_call"]}
        answer = await _asked(client, stream, **where)
        assert _opening_blocks(fake.requests[-1].json) == _signed(*thoughts[:turn])
        await wait_for_row(pg_database_url, answer.id.removeprefix("resp_"), "completed")
        if turn == 0:
            first = answer
    fake.set_script(Script(tokens=["Sunny everywhere."]))
    done = await _asked(client, stream, previous_response_id=answer.id, input=[
        {"type": "function_call_output", "call_id": item.call_id, "output": "rain"} for item in answer.output if item.type == "function_call"])
    assert done.output_text == "Sunny everywhere." and _opening_blocks(fake.requests[-1].json) == _signed(*thoughts)

    # The first turn's reasoning and calls by reference (an item kept with its response).
    fake.set_script(Script(tokens=["Sunny."]))
    referenced = await _asked(client, stream, input=[
        {"role": "user", "content": "Weather?"},
        *({"type": "item_reference", "id": item.id} for item in first.output),
        *({"type": "function_call_output", "call_id": item.call_id, "output": "sunny"} for item in first.output if item.type == "function_call"),
    ])
    assert referenced.output_text == "Sunny." and _opening_blocks(fake.requests[-1].json) == _signed(thoughts[0])
    assert fake.requests[-1].json["thinking"]["type"] == "enabled"


async def test_a_keyed_replay_of_a_streamed_answer_keeps_claudes_signed_thinking(
    claude: tuple[AnthropicBackend, openai.AsyncOpenAI], pg_database_url: str,
) -> None:
    """A streamed request repeated with its `Idempotency-Key` (replayed from the journal) has
    each reasoning item its client had live, with its `encrypted_content` (the replay gave the
    reasoning as one item without it, so the loop's next turn went without its thinking)."""
    fake, client = claude
    fake.redacted_thinking = "EmwKAhgBEgy3va3pzix"
    fake.set_script(Script(reasoning=["Weather ", "first."], tokens=[], tool_calls=[("get_weather", {"city": "Paris"})]))
    key = {"Idempotency-Key": "claude-replay"}
    first = await _asked(client, True, input="Weather in Paris?", extra_headers=key)
    await wait_for_row(pg_database_url, first.id.removeprefix("resp_"), "completed")
    asked = len(fake.requests)
    again = await _asked(client, True, input="Weather in Paris?", extra_headers=key)
    assert len(fake.requests) == asked and again.id == first.id

    def reasoning(response: Any) -> list[tuple[str | None, list[Any]]]:
        return [(item.encrypted_content, item.content or []) for item in response.output if item.type == "reasoning"]

    assert len(reasoning(first)) == 2 and all(encrypted for encrypted, _ in reasoning(first))
    assert reasoning(again) == reasoning(first)
