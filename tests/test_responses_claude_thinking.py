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
