"""The official `openai` SDK's chat requests answered by backends of other kinds (Ollama,
Anthropic): the promises and refusals an OpenAI client expects whichever backend answers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.fakes import AnthropicBackend, FakeBackend, OllamaBackend, Script, ToolCall
from tests.harness import backend, running_gateway

MESSAGES = [{"role": "user", "content": "Weather in Paris and Rome?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TWO_CALLS = [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_weather", '{"city": "Rome"}')]


@pytest.fixture(params=["ollama", "anthropic"])
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[FakeBackend, openai.AsyncOpenAI]]:
    fake: FakeBackend = OllamaBackend() if request.param == "ollama" else AnthropicBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, kind=request.param, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        yield fake, client
        await client.close()


async def test_parallel_tool_calls_false_gets_one_call_at_most(served: tuple[FakeBackend, openai.AsyncOpenAI]) -> None:
    # The model makes two calls anyway (Ollama has no such option; servers may ignore it).
    fake, client = served
    fake.set_script(Script(tokens=[], tool_calls=TWO_CALLS, tool_arg_fragment=5))
    answer = await client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, parallel_tool_calls=False,  # type: ignore[arg-type]
    )
    calls = answer.choices[0].message.tool_calls or []
    assert [json.loads(call.function.arguments) for call in calls] == [{"city": "Paris"}]  # type: ignore[union-attr]
    assert answer.choices[0].finish_reason == "tool_calls"

    stream = await client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, parallel_tool_calls=False, stream=True,  # type: ignore[arg-type]
    )
    arguments: dict[int, str] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                arguments[call.index] = arguments.get(call.index, "") + ((call.function and call.function.arguments) or "")
    assert {i: json.loads(a) for i, a in arguments.items()} == {0: {"city": "Paris"}}

    # Unasked, both calls come back.
    answer = await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)  # type: ignore[arg-type]
    assert len(answer.choices[0].message.tool_calls or []) == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("logit_bias", {"50256": -100}),
        ("web_search_options", {}),
    ],
)
async def test_what_only_openai_backends_do_is_a_400_naming_the_field(
    served: tuple[FakeBackend, openai.AsyncOpenAI], field: str, value: object
) -> None:
    # Dropped, the answer would be text without the audio, tokens not banned, no search.
    fake, client = served
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="m", messages=MESSAGES, extra_body={field: value})  # type: ignore[arg-type]
    assert info.value.param == field and "OpenAI-compatible backend" in info.value.message
    assert info.value.code == "unsupported_parameter"  # OpenAI's, which clients retry without the field on
    assert fake.requests == []
    # What asks nothing another backend would not do goes through.
    for harmless in ({"modalities": ["text"]}, {"logit_bias": {}}):
        await client.chat.completions.create(model="m", messages=MESSAGES, extra_body=harmless)  # type: ignore[arg-type]


async def test_a_forced_tool_the_request_does_not_give_is_a_400(served: tuple[FakeBackend, openai.AsyncOpenAI]) -> None:
    # As OpenAI and vLLM answer it; an Ollama backend, which forces nothing, would answer in text.
    fake, client = served
    for tools, choice in (
        (TOOLS, {"type": "function", "function": {"name": "get_time"}}),
        ([], "required"),
        (None, {"type": "function", "function": {"name": "get_weather"}}),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model="m", messages=MESSAGES, tool_choice=choice, **({"tools": tools} if tools is not None else {}),  # type: ignore[arg-type, call-overload]
            )
        assert info.value.param == "tool_choice"
    assert fake.requests == []
    # Choices that force nothing need no tools.
    for choice in ("auto", "none"):
        await client.chat.completions.create(model="m", messages=MESSAGES, tool_choice=choice)  # type: ignore[arg-type, call-overload]


async def test_an_image_url_an_ollama_backend_cannot_fetch_is_a_400_naming_the_part() -> None:
    fake = OllamaBackend()
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    messages = [{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}]
    async with fake.serve() as server, running_gateway(backend("b", server.url, kind="ollama", default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
        await client.close()
    assert info.value.param == "messages[1].content[1].image_url.url" and info.value.code == "unsupported_image"
    assert fake.requests == []


@pytest.mark.parametrize("stream", [False, True])
async def test_an_ollama_model_without_tool_calling_is_a_400_naming_tools(stream: bool) -> None:
    fake = OllamaBackend(default=Script(status=400, error_message="registry.ollama.ai/library/gemma3:latest does not support tools"))
    async with fake.serve() as server, running_gateway(backend("b", server.url, kind="ollama", default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, stream=stream)  # type: ignore[arg-type, call-overload]
        await client.close()
    assert info.value.param == "tools" and "does not support tools" in info.value.message


async def test_an_anthropic_backends_request_id_reaches_an_openai_client(served: tuple[FakeBackend, openai.AsyncOpenAI]) -> None:
    # The id Anthropic's support asks for, beside the gateway's own; Ollama gives none to pass on.
    fake, client = served
    anthropic_backend = isinstance(fake, AnthropicBackend)
    for stream in (False, True):
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, stream=stream)  # type: ignore[arg-type]
        if stream:
            async for _ in raw.parse():  # type: ignore[union-attr]
                pass
        upstream = raw.headers.get("x-upstream-request-id")
        assert (upstream is not None and upstream.startswith("req_")) is anthropic_backend
        assert raw.headers["x-request-id"] != upstream
    fake.set_script(Script(status=429, retry_after=2))
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert ("x-upstream-request-id" in info.value.response.headers) is anthropic_backend


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"n": 2}, "n", "unsupported_value"),
        ({"tools": [{"type": "custom", "custom": {"name": "grammar"}}]}, "tools[0]", "unsupported_parameter"),
        ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
          "tools": TOOLS}, "tool_choice", "unsupported_parameter"),
    ],
)
async def test_what_a_backend_cannot_take_is_openais_unsupported_code(
    served: tuple[FakeBackend, openai.AsyncOpenAI], fields: dict[str, object], param: str, code: str
) -> None:
    fake, client = served
    with pytest.raises(openai.BadRequestError) as info:
        await client.post("/chat/completions", body={"model": "m", "messages": MESSAGES, **fields}, cast_to=object)
    assert (info.value.param, info.value.code) == (param, code)
    assert fake.requests == []
    if isinstance(fake, AnthropicBackend):  # Ollama gives logprobs
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES, logprobs=True)  # type: ignore[arg-type]
        assert (info.value.param, info.value.code) == ("logprobs", "unsupported_parameter")


async def test_reasoning_comes_under_both_names_clients_read(served: tuple[FakeBackend, openai.AsyncOpenAI]) -> None:
    """A Claude or Ollama model's thinking, given to an OpenAI client, is `reasoning` (vLLM's
    name today, OpenRouter's: what the OpenAI Agents SDK for JS reads, which showed nothing) and
    `reasoning_content` (DeepSeek's and older vLLM's: what LangChain reads), whole or streamed."""
    fake, client = served
    fake.set_script(Script(reasoning=["Think", " first."], tokens=["Done."]))
    answer = await client.chat.completions.create(model="m", messages=MESSAGES, reasoning_effort="low")
    extra = answer.choices[0].message.model_extra or {}
    assert (extra.get("reasoning"), extra.get("reasoning_content")) == ("Think first.", "Think first.")
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, reasoning_effort="low", stream=True)
    said: dict[str, str] = {"reasoning": "", "reasoning_content": ""}
    async for chunk in stream:
        for choice in chunk.choices:
            for name in said:
                said[name] += (choice.delta.model_extra or {}).get(name) or ""
    assert said == {"reasoning": "Think first.", "reasoning_content": "Think first."}


@pytest.mark.parametrize("arguments", ["[" * 100_000, '{"city": "\\ud800"}', '{"city": NaN}', '{"days": 1e999}'])
async def test_tool_call_arguments_no_backend_request_could_carry_are_passed_as_text(
    served: tuple[FakeBackend, openai.AsyncOpenAI], arguments: str
) -> None:
    """A tool call in a chat's history whose arguments are JSON nested past what Python reads,
    or spell what JSON written out may not hold (half a surrogate pair, NaN, a number out of
    range): its arguments reach Claude or Ollama as text, as arguments that are no JSON object
    do. Each was a 502 "returned nothing" (the gateway could not write its own request) with a
    traceback logged, at a client's will."""
    fake, client = served
    fake.set_script(Script(tokens=["Sunny."]))
    history: Any = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    answer = await client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=10)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "Sunny."
    sent = fake.requests[-1].json
    assert json.dumps(arguments)[1:-1] in json.dumps(sent)  # the text itself, whole
