"""OpenAI client to OpenAI backend: what the client sent reaches the backend as sent, and what
the backend answered reaches the client, repaired only where it does not conform."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from proxy.dialects import anthropic, ollama
from proxy.dialects import openai as openai_codec
from tests.fakes import AnthropicBackend, Exchange, OllamaBackend, OpenAIBackend, Request, Script
from tests.fakes.base import Call
from tests.harness import backend, running_gateway

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


@dataclass
class Setup:
    fake: OpenAIBackend
    url: str
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient

    def sent(self) -> dict[str, Any]:
        """The body the backend received last."""
        body = self.fake.requests[-1].json
        assert isinstance(body, dict)
        return body


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            yield Setup(fake, url, client, http)
        await client.close()


# -- the token limit ---------------------------------------------------------------------------------


async def test_max_completion_tokens_reaches_the_backend_under_its_own_name(setup: Setup) -> None:
    # OpenAI's o-series and gpt-5 refuse `max_tokens`; a client using the new name must not
    # have it renamed on the way.
    await setup.client.chat.completions.create(model="m", messages=MESSAGES, max_completion_tokens=7)
    sent = setup.sent()
    assert sent["max_completion_tokens"] == 7 and "max_tokens" not in sent

    await setup.client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5)
    sent = setup.sent()
    assert sent["max_tokens"] == 5 and "max_completion_tokens" not in sent

    await setup.client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=9, max_completion_tokens=7)
    sent = setup.sent()
    assert (sent["max_completion_tokens"], sent["max_tokens"]) == (7, 9)


def test_other_dialects_limits_reach_an_openai_backend_as_max_tokens() -> None:
    from_anthropic = anthropic.parse_messages_request(
        json.dumps({"model": "m", "max_tokens": 11, "messages": MESSAGES}).encode()
    )
    from_ollama = ollama.parse_chat_request(
        json.dumps({"model": "m", "messages": MESSAGES, "options": {"num_predict": 12}}).encode()
    )
    for request, limit in ((from_anthropic, 11), (from_ollama, 12)):
        body = json.loads(openai_codec.encode_chat_request(request, "m", stream=False, include_usage=False))
        assert body["max_tokens"] == limit and "max_completion_tokens" not in body


# -- tools and structured output -----------------------------------------------------------------------


async def test_strict_tools_and_schema_descriptions_arrive_as_sent(setup: Setup) -> None:
    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather by city", "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                       "additionalProperties": False},
    }}
    response_format = {"type": "json_schema", "json_schema": {
        "name": "weather", "description": "A forecast", "strict": True,
        "schema": {"type": "object", "properties": {"sky": {"type": "string"}}},
    }}
    await setup.client.chat.completions.create(
        model="m", messages=MESSAGES, tools=[tool], response_format=response_format  # type: ignore[list-item, arg-type]
    )
    sent = setup.sent()
    assert sent["tools"] == [tool]
    assert sent["response_format"] == response_format


async def test_a_json_schema_format_without_a_schema_gets_none_invented(setup: Setup) -> None:
    response = await setup.http.post("/v1/chat/completions", json={
        "model": "m", "messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
    })
    assert response.status_code == 200
    assert setup.sent()["response_format"] == {"type": "json_schema", "json_schema": {"name": "x"}}


def test_an_ollama_schema_still_reaches_an_openai_backend_with_a_name() -> None:
    request = ollama.parse_chat_request(json.dumps({"model": "m", "messages": MESSAGES, "format": {"type": "object"}}).encode())
    body = json.loads(openai_codec.encode_chat_request(request, "m", stream=False, include_usage=False))
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "response", "schema": {"type": "object"}}}


CUSTOM_TOOL: Any = {"type": "custom", "custom": {"name": "run_sql", "description": "Runs one SQL query",
                                                  "format": {"type": "text"}}}
WEATHER_TOOL: Any = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
ALLOWED: Any = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
    {"type": "function", "function": {"name": "get_weather"}}]}}


async def test_custom_tools_and_allowed_tools_choice_arrive_as_sent(setup: Setup) -> None:
    # GPT-5's free-form tools and its restricted choice: an OpenAI backend knows them.
    await setup.client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER_TOOL, CUSTOM_TOOL])
    assert setup.sent()["tools"] == [WEATHER_TOOL, CUSTOM_TOOL]
    await setup.client.chat.completions.create(
        model="m", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice=ALLOWED, parallel_tool_calls=False
    )
    sent = setup.sent()
    assert (sent["tools"], sent["tool_choice"], sent["parallel_tool_calls"]) == ([WEATHER_TOOL], ALLOWED, False)
    choice: Any = {"type": "custom", "custom": {"name": "run_sql"}}
    await setup.client.chat.completions.create(model="m", messages=MESSAGES, tools=[CUSTOM_TOOL], tool_choice=choice)
    assert setup.sent()["tool_choice"] == choice
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.chat.completions.create(
            model="m", messages=MESSAGES, tools=[{"type": "custom", "custom": {}}]  # type: ignore[typeddict-item]
        )
    assert info.value.param == "tools[0].custom.name"


@pytest.mark.parametrize("kind", ["ollama", "anthropic"])
async def test_custom_tools_for_a_backend_without_them_are_a_400_naming_the_field(kind: str) -> None:
    fake = OllamaBackend() if kind == "ollama" else AnthropicBackend()
    async with fake.serve() as server, running_gateway(backend("local", server.url, kind=kind, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER_TOOL, CUSTOM_TOOL])
        assert info.value.param == "tools[1]" and "custom" in info.value.message
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice=ALLOWED)
        assert info.value.param == "tool_choice" and "allowed_tools" in info.value.message
        await client.close()
    assert fake.requests == []


# -- messages ---------------------------------------------------------------------------------------------


async def test_legacy_function_calling_messages_arrive_as_sent(setup: Setup) -> None:
    call = {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    result = {"role": "function", "name": "get_weather", "content": '{"sky":"grey"}'}
    functions = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    response = await setup.http.post("/v1/chat/completions", json={
        "model": "m", "messages": [MESSAGES[0], call, result], "functions": functions, "function_call": "auto",
    })
    assert response.status_code == 200, response.text
    sent = setup.sent()
    assert sent["messages"][1:] == [call, result]
    assert sent["functions"] == functions and sent["function_call"] == "auto"


class LegacyFunctionCaller(OpenAIBackend):
    """OpenAI's answer to legacy function calling: a `function_call` message (or deltas) that
    ends `finish_reason: "function_call"`."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if not request.path.endswith("/chat/completions"):
            await super().route(request, exchange, call)
            return
        head = {"id": "chatcmpl-legacy", "created": 1, "model": "gpt-4o"}
        if not request.json().get("stream"):
            message = {"role": "assistant", "content": None, "function_call": LEGACY_CALL}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "function_call"}
            await exchange.respond_json(200, {**head, "object": "chat.completion", "choices": [choice]})
            return
        await exchange.start(200, content_type="text/event-stream")
        deltas = [({"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": ""}}, None),
                  ({"function_call": {"arguments": LEGACY_CALL["arguments"]}}, None), ({}, "function_call")]
        for delta, reason in deltas:
            chunk = {**head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
            await exchange.send(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await exchange.finish(b"data: [DONE]\n\n")


LEGACY_CALL = {"name": "get_weather", "arguments": '{"city":"Oslo"}'}


async def test_a_legacy_function_call_ends_function_call_as_openai_says(setup: Setup) -> None:
    """Legacy function-calling clients run the function when `finish_reason` is
    `function_call`; it was rewritten to `tool_calls`, which their answer has none of."""
    functions: Any = [{"name": "get_weather", "parameters": {"type": "object"}}]
    fake = LegacyFunctionCaller()
    async with fake.serve() as server, running_gateway(backend("openai", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, functions=functions)
        assert answer.choices[0].finish_reason == "function_call"
        assert answer.choices[0].message.function_call is not None
        assert answer.choices[0].message.function_call.arguments == LEGACY_CALL["arguments"]

        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, functions=functions, stream=True)
        reasons, arguments = [], ""
        async for chunk in stream:
            for choice in chunk.choices:
                reasons += [choice.finish_reason] if choice.finish_reason else []
                arguments += (choice.delta.function_call and choice.delta.function_call.arguments) or ""
        assert reasons == ["function_call"] and json.loads(arguments) == {"city": "Oslo"}
        await client.close()


@pytest.mark.parametrize("kind", ["ollama", "anthropic"])
async def test_legacy_functions_for_a_backend_without_them_are_a_400_naming_the_field(kind: str) -> None:
    # Dropped on the way, they would leave the model answering as if it had no functions.
    fake = OllamaBackend() if kind == "ollama" else AnthropicBackend()
    functions = [{"name": "get_weather", "parameters": {"type": "object", "properties": {}}}]
    async with fake.serve() as server, running_gateway(backend("local", server.url, kind=kind, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES, functions=functions)  # type: ignore[arg-type]
        await client.close()
    assert info.value.status_code == 400
    assert info.value.param == "functions" and "tools" in info.value.message
    assert fake.requests == []


async def test_logprobs_for_a_backend_without_them_are_a_400_naming_the_field() -> None:
    # Anthropic has no log probabilities (Ollama has: tests/test_logprobs.py).
    fake = AnthropicBackend()
    async with fake.serve() as server, running_gateway(backend("local", server.url, kind="anthropic", default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for asked in ({"logprobs": True}, {"logprobs": True, "top_logprobs": 3}):
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(model="m", messages=MESSAGES, **asked)  # type: ignore[call-overload]
            assert info.value.param == "logprobs" and "OpenAI-compatible or Ollama backend" in info.value.message
        # Alternatives without `logprobs: true` are refused before any backend is chosen, as OpenAI does.
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES, top_logprobs=2)  # type: ignore[call-overload]
        assert info.value.param == "top_logprobs" and "needs `logprobs: true`" in info.value.message
        unasked = await client.chat.completions.create(model="m", messages=MESSAGES, logprobs=False)  # type: ignore[arg-type]
        assert unasked.choices[0].message.content
        await client.close()
    assert len(fake.requests) == 1


def test_legacy_function_messages_stay_tool_results_for_other_backends() -> None:
    request = openai_codec.parse_chat_request(json.dumps({"model": "m", "messages": [
        MESSAGES[0],
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f", "content": "42"},
    ]}).encode())
    assert request.messages[2].role == "tool" and request.messages[2].text == "42"
    # Rendered for another dialect's client (no `as_sent`), nothing OpenAI-only leaks.
    assert openai_codec.render_message(request.messages[2]) == {"role": "tool", "content": "42", "name": "f"}


# -- answers ----------------------------------------------------------------------------------------------


async def test_a_non_conformant_answer_is_repaired_and_keeps_everything_else(setup: Setup) -> None:
    # TGI ends with `eos_token`: the gateway maps it onto OpenAI's enum but must not rebuild
    # the answer from what it understands, losing what it does not.
    setup.fake.set_script(Script(tokens=["Hi"], finish_reason="eos_token", system_fingerprint="3.0.0-native"))
    response = await setup.http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert response.status_code == 200
    answer = response.json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": "Hi", "refusal": None}
    assert answer["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] == 0
    assert answer["usage"]["prompt_tokens_details"]["audio_tokens"] == 0
    assert answer["system_fingerprint"] == "3.0.0-native"


def test_repair_touches_only_what_does_not_conform() -> None:
    logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}], "refusal": None}
    backend_answer = {
        "object": "text_completion", "id": "", "created": 1, "model": "tgi", "service_tier": "default",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi", "annotations": []},
             "logprobs": logprobs, "finish_reason": "eos_token"},
            {"index": 1, "message": {"role": "assistant", "content": "Yo"}, "logprobs": None, "finish_reason": "length"},
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 0}},
    }
    raw = json.dumps(backend_answer).encode()
    relayed = json.loads(openai_codec.relay_completion(json.loads(raw), raw))
    expected = json.loads(raw)
    expected["object"] = "chat.completion"
    expected["choices"][0]["finish_reason"] = "stop"
    assert relayed == expected

    conformant = json.dumps({**expected, "choices": expected["choices"][1:]}, indent=1).encode()
    assert openai_codec.relay_completion(json.loads(conformant), conformant) is conformant


# -- backend errors in unexpected places ----------------------------------------------------------------------


async def test_an_error_object_under_200_is_a_502_with_its_message(setup: Setup) -> None:
    setup.fake.set_script(Script(status=200, error_message="model overloaded"))
    with pytest.raises(openai.InternalServerError) as info:
        await setup.client.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == 502
    assert "model overloaded" in info.value.message


async def test_a_plain_json_answer_to_a_stream_request_says_why(setup: Setup) -> None:
    setup.fake.set_script(Script(status=200, error_message="model overloaded"))
    with pytest.raises(openai.APIError) as info:
        stream = await setup.client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        [chunk async for chunk in stream]
    assert "model overloaded" in info.value.message


def test_a_json_answer_without_an_error_to_a_stream_request_is_named() -> None:
    completion = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
    relay = openai_codec.StreamRelay(include_usage=None)
    body = json.dumps(completion, indent=2).encode()
    assert relay.feed(body[:10]).raw == b""
    assert relay.feed(body[10:]).raw == b""
    closed = relay.close()
    error = json.loads(closed.raw.removeprefix(b"data: "))["error"]
    assert error["message"] == "The backend answered with JSON, not a stream."


# -- fields below the top level ---------------------------------------------------------------------------------


async def test_message_level_fields_arrive_as_sent(setup: Setup) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": "Say hello"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "They want a greeting.", "refusal": None},
        {"role": "user", "content": "Again, in French"},
        {"role": "assistant", "content": "Bon", "prefix": True},
    ]
    response = await setup.http.post("/v1/chat/completions", json={"model": "m", "messages": messages})
    assert response.status_code == 200, response.text
    assert setup.sent()["messages"] == messages


def test_content_the_gateway_changed_is_sent_as_changed() -> None:
    from dataclasses import replace

    from proxy.domain.chat import TextPart

    request = openai_codec.parse_chat_request(json.dumps({"model": "m", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]},
        MESSAGES[0],
    ]}).encode())
    request.messages[0] = replace(request.messages[0], content=(TextPart("Be brief.\n\nContext: …"),))
    body = json.loads(openai_codec.encode_chat_request(request, "m", stream=False, include_usage=False))
    assert body["messages"][0] == {"role": "system", "content": "Be brief.\n\nContext: …"}


async def test_stream_options_beyond_include_usage_arrive_as_sent(setup: Setup) -> None:
    response = await setup.http.post("/v1/chat/completions", json={
        "model": "m", "messages": MESSAGES, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    })
    assert response.status_code == 200
    assert setup.sent()["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    # Asked without usage, the gateway still asks for it (its accounting) and keeps the rest.
    await setup.http.post("/v1/chat/completions", json={
        "model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"continuous_usage_stats": True},
    })
    assert setup.sent()["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}


def test_continuous_usage_stays_on_every_chunk_when_asked() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    frames = [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}], "usage": usage},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage},
        {**head, "choices": [], "usage": usage},
    ]
    upstream = b"".join(b"data: " + json.dumps(f).encode() + b"\n\n" for f in frames) + b"data: [DONE]\n\n"
    kept = openai_codec.StreamRelay(include_usage=True, chunk_usage=True).feed(upstream).raw
    assert kept == upstream
    moved = openai_codec.StreamRelay(include_usage=True).feed(upstream).raw
    assert moved.count(b'"usage":null') == 2


async def test_a_backend_without_usage_still_gives_the_client_its_usage_chunk() -> None:
    # Some servers never report usage in a stream; a client that asked for it (to count its
    # spending) gets the gateway's estimate, the same numbers its key is charged.
    from tests.fakes import serve_fake
    from tests.test_auth_helpers import eventually
    from tests.test_metrics import total

    def frame(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    async def no_usage(request: Request, exchange: Exchange) -> None:
        if not request.path.endswith("/chat/completions"):
            await exchange.respond_json(200, {"object": "list", "data": []})
            return
        await exchange.start(200, content_type="text/event-stream")
        body = frame({"role": "assistant", "content": ""}) + frame({"content": "Hello there, friend"}) + frame({}, "stop")
        await exchange.finish(body + b"data: [DONE]\n\n")

    async with serve_fake(no_usage) as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:

            async def charged() -> str | None:
                text = (await http.get("/metrics")).text
                return text if total(text, "llm_proxy_prompt_tokens_total") else None

            text = await eventually(charged)
    usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert len(usage) == 1 and chunks[-1].choices == [] and chunks[-1].usage is usage[0]
    assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (3, 5)  # "Say hello"; 19 characters
    assert total(text, "llm_proxy_prompt_tokens_total") == usage[0].prompt_tokens
    assert total(text, "llm_proxy_completion_tokens_total") == usage[0].completion_tokens


# -- images for an Anthropic backend ----------------------------------------------------------------------


async def test_image_data_urls_reach_an_anthropic_backend_as_images_or_are_a_400_naming_the_part() -> None:
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    jpeg = "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHRofHh0aHBwgJC4nICIsIxwcKDcpLDAxNDQ0Hyc5"

    def asking(url: str) -> Any:
        return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}]

    fake = AnthropicBackend()
    async with fake.serve() as server, running_gateway(backend("claude", server.url, kind="anthropic", default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        # A data URL with parameters (browsers' FileReader, some SDKs) is still a base64 image, of
        # the type its bytes say: Anthropic refuses a label that does not match them, and `image/jpg`.
        for label, data, media_type in (
            ("image/gif;charset=utf-8", png, "image/png"), ("image/jpg", jpeg, "image/jpeg"),
            ("image/jpg", "AAAA", "image/jpeg"), ("image/webp", "UklGRg==", "image/webp"),
        ):
            await client.chat.completions.create(model="claude-x", messages=asking(f"data:{label};base64,{data}"))
            source = fake.requests[-1].json["messages"][0]["content"][1]["source"]
            assert source == {"type": "base64", "media_type": media_type, "data": data}
        sent = len(fake.requests)
        for refused, said in (
            (f"data:application/octet-stream;base64,{png}", "application/octet-stream"),
            ("data:image/jpeg,abc", ";base64"),
            (png, "data:image/...;base64,"),
            ("data:image/bmp;base64,Qk0eAAAAAAAAABoAAAAMAAAAAQABAAEAGAAAAP8A", "`image/bmp`, which Anthropic does not take"),
            ("data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=", "`image/svg+xml`"),
        ):
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(model="claude-x", messages=asking(refused))
            assert info.value.param == "messages[0].content[1].image_url.url" and said in info.value.message
        await client.close()
    assert len(fake.requests) == sent  # refused by the gateway, not by Anthropic in words about its own request
