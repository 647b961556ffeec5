"""The official `anthropic` SDK (AsyncAnthropic, under trio) against the gateway, in front of
fake OpenAI-compatible, Ollama and Anthropic backends; and the official `openai` SDK against
the gateway in front of a fake Anthropic backend."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pydantic
import pytest
import trio

from proxy.config import Timeouts
from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend, Script, Usage
from tests.fakes.base import Call
from tests.fakes.script import ToolCall
from tests.fakes.server import Exchange, Request
from tests.harness import backend, hang_up_once_received, refusing_port, running_gateway
from tests.test_anthropic_codec import assert_valid_anthropic_stream, sse_frames
from tests.test_transport import raw_server, read_request

KINDS = ("openai", "ollama", "anthropic")
MODELS = {"openai": "qwen3-8b", "ollama": "llama3.2", "anthropic": "claude-fake-1"}
MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
TOOLS: Any = [
    {"name": "get_weather", "description": "Weather in a city",
     "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
    {"name": "get_time", "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}}},
]
PARALLEL = Script(tool_calls=[("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})], tool_arg_fragment=5)
ANTHROPIC_KEY = "sk-ant-test-key"


class TokenizingOpenAIBackend(OpenAIBackend):
    """The OpenAI fake plus vLLM's `POST /tokenize` (at the server root)."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/tokenize" and request.method == "POST":
            body = request.json()
            if not self.model_known(body["model"]):
                await self.send_error(exchange, 404, f"The model `{body['model']}` does not exist.")
                return
            text = json.dumps(body["messages"])
            await exchange.respond_json(200, {"count": len(text) // 4, "max_model_len": 8192, "tokens": []})
            return
        await super().route(request, exchange, call)


@dataclass
class Setup:
    url: str
    client: anthropic.AsyncAnthropic
    fakes: dict[str, OpenAIBackend | OllamaBackend | AnthropicBackend]

    def fake(self, kind: str) -> Any:
        return self.fakes[kind]


@pytest.fixture
async def setup(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Setup]:
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    fakes: dict[str, Any] = {
        "openai": TokenizingOpenAIBackend(),
        "ollama": OllamaBackend(),
        "anthropic": AnthropicBackend(api_key=ANTHROPIC_KEY, require_version=True),
    }
    async with (
        fakes["openai"].serve() as s_openai,
        fakes["ollama"].serve() as s_ollama,
        fakes["anthropic"].serve() as s_anthropic,
        running_gateway(
            backend("vllm", s_openai.url, default=True),
            backend("ollama", s_ollama.url, kind="ollama", prefixes=("llama",)),
            backend("claude", s_anthropic.url, kind="anthropic", prefixes=("claude",), api_key_env="TEST_ANTHROPIC_KEY"),
        ) as url,
    ):
        client = anthropic.AsyncAnthropic(base_url=url, api_key="client-key", max_retries=0)
        yield Setup(url, client, fakes)
        await client.close()


async def raw_stream(setup: Setup, **fields: Any) -> httpx.Response:
    data = {"max_tokens": 256, "messages": MESSAGES, "stream": True, **fields}
    async with httpx.AsyncClient(base_url=setup.url) as http:
        return await http.post("/v1/messages", json=data, headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})


# -- text ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_non_streaming_message(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=["Hello", " there"], usage=Usage(11, 2)))
    raw = await setup.client.messages.with_raw_response.create(model=MODELS[kind], max_tokens=256, messages=MESSAGES)
    message = await raw.parse()
    assert raw.headers["request-id"] and raw.headers["content-type"] == "application/json"
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == MODELS[kind]
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", "Hello there")]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 2)


async def test_a_model_asked_for_by_an_alias_is_answered_in_the_clients_name() -> None:
    """Claude Code pointed at local models by aliases (`claude-sonnet-4-5` = `qwen3-8b`) is
    answered under the name it asked for, whole or streamed, as Ollama and Responses clients are."""
    vllm, ollama = OpenAIBackend(), OllamaBackend()
    async with (
        vllm.serve() as s_vllm,
        ollama.serve() as s_ollama,
        running_gateway(
            backend("vllm", s_vllm.url, default=True), backend("ollama", s_ollama.url, kind="ollama", prefixes=("llama",)),
            aliases={"claude-local-large": "qwen3-8b", "claude-local-small": "llama3.2"},
        ) as url,
    ):
        client = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
        for alias, fake, upstream in (("claude-local-large", vllm, "qwen3-8b"), ("claude-local-small", ollama, "llama3.2")):
            message = await client.messages.create(model=alias, max_tokens=20, messages=MESSAGES)
            async with client.messages.stream(model=alias, max_tokens=20, messages=MESSAGES) as stream:
                streamed = await stream.get_final_message()
            assert (message.model, streamed.model) == (alias, alias)
            assert fake.requests[-1].json["model"] == upstream
        await client.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_streaming_message(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=["Hel", "lo", " there"], usage=Usage(11, 3)))
    texts = []
    async with setup.client.messages.stream(model=MODELS[kind], max_tokens=256, messages=MESSAGES) as stream:
        async for event in stream:
            if event.type == "text":
                texts.append(event.text)
        message = await stream.get_final_message()
    assert texts == ["Hel", "lo", " there"]
    assert message.content[0].type == "text" and message.content[0].text == "Hello there"
    assert message.stop_reason == "end_turn"
    # Input tokens arrive late from OpenAI/Ollama backends: message_delta carries them and the SDK merges.
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 3)


@pytest.mark.parametrize("kind", KINDS)
async def test_message_start_says_an_input_count_whatever_the_backend(setup: Setup, kind: str) -> None:
    """LangChain (JS, and Python before 1.0) reads a stream's input tokens from `message_start`
    alone, which was 0 from vLLM and Ollama (they count at the end). It says the gateway's
    estimate until the backend's count, which `message_delta` then gives: the SDK's final
    message (and the AI SDK's) holds that count, replacing the estimate rather than adding to it."""
    prompt = [{"role": "user", "content": "Tell me about the weather in Paris in the spring " * 20}]
    setup.fake(kind).set_script(Script(tokens=["a", "b"], usage=Usage(9, 2)))
    frames = dict(frame for frame in sse_frames((await raw_stream(setup, model=MODELS[kind], messages=prompt)).content))
    start, end = frames["message_start"]["message"]["usage"]["input_tokens"], frames["message_delta"]["usage"]
    assert start > 200 if kind != "anthropic" else start == 9  # an estimate of ~1000 characters; Anthropic's own count
    assert end["output_tokens"] == 2 and end.get("input_tokens", start) == 9
    async with setup.client.messages.stream(model=MODELS[kind], max_tokens=256, messages=prompt) as stream:
        message = await stream.get_final_message()
    assert (message.usage.input_tokens, message.usage.output_tokens) == (9, 2)


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_wire_format(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=["a", "b"], usage=Usage(7, 2, cached_tokens=3 if kind == "anthropic" else 0)))
    response = await raw_stream(setup, model=MODELS[kind])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache" and response.headers["request-id"]
    assert_valid_anthropic_stream(response.content)
    # A keep-alive `ping` may come anywhere (the gateway passes the backend's on, when it reads
    # one alone): every client skips it, and so do these checks of the order.
    frames = [frame for frame in sse_frames(response.content) if frame[0] != "ping"]
    start = frames[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    assert set(start["usage"]) >= {"input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"}
    final = frames[-2][1]["usage"]
    assert final["output_tokens"] == 2
    # Input tokens are known at message_start from Anthropic backends; from the others they
    # arrive at the end, so message_start says an estimate. message_delta says them all, cumulative,
    # as Anthropic's own does: LangChain's ChatAnthropic reads a stream's usage from it alone.
    assert start["usage"]["input_tokens"] == 7 if kind == "anthropic" else start["usage"]["input_tokens"] > 0
    assert {key: final.get(key) for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")} == {
        "input_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 3 if kind == "anthropic" else 0}


async def test_a_stream_read_at_once_counts_its_answer_once_for_clients_that_add_up(setup: Setup) -> None:
    """A short answer from an OpenAI-compatible backend arrives in one read, its usage with
    it: message_start says its input tokens and no output yet, so that LangChain.js, which adds
    message_start's `output_tokens` to message_delta's, counts 3, not 6."""
    setup.fake("openai").set_script(Script(tokens=["a", "b", "c"], usage=Usage(7, 3), frames_per_write=64))
    response = await raw_stream(setup, model=MODELS["openai"])
    frames = [frame for frame in sse_frames(response.content) if frame[0] != "ping"]
    start, final = frames[0][1]["message"]["usage"], frames[-2][1]["usage"]
    assert start["output_tokens"] + final["output_tokens"] == 3
    # Input counts are cumulative in both events, as Anthropic's are (LangChain.js reads
    # message_start's, LangChain's message_delta's): each says the whole 7.
    assert start["input_tokens"] == final["input_tokens"] == 7


# -- tools -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_parallel_tool_calls_stream_their_arguments(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(PARALLEL)
    fragments: dict[int, list[str]] = {}
    async with setup.client.messages.stream(model=MODELS[kind], max_tokens=256, messages=MESSAGES, tools=TOOLS) as stream:
        async for event in stream:
            if event.type == "input_json":
                fragments.setdefault(event.index if hasattr(event, "index") else -1, []).append(event.partial_json)
        message = await stream.get_final_message()
    calls = [b for b in message.content if b.type == "tool_use"]
    assert [(c.name, c.input) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})]
    assert len({c.id for c in calls}) == 2 and all(c.id for c in calls)
    assert message.stop_reason == "tool_use"
    if kind != "ollama":  # Ollama sends whole calls; the others stream fragments, all relayed
        assert sum(len(f) for f in fragments.values()) >= 4


@pytest.mark.parametrize(("arguments", "received"), [
    ("{'tz': 'UTC'}", {}),  # a Python dict, not JSON
    ('{"tz": "UTC", oops, "more": 1}', {"tz": "UTC", "": None}),
    ('{"tz": "UTC", "note": "a\x01b"}', {"tz": "UTC", "note": "a"}),  # a raw control character
    ("ls -la", {"arguments": "ls -la"}),  # no object at all: the text, as the whole message has it
])
async def test_malformed_tool_arguments_from_an_openai_backend_do_not_break_the_sdks_stream(
    setup: Setup, arguments: str, received: dict[str, Any]
) -> None:
    """Anthropic's SDK parses a tool's input after every `input_json_delta` and raises on
    anything that cannot begin a JSON object, losing the whole response: the gateway streams
    the input while it is JSON and ends it as a whole object where the model's stopped being."""
    setup.fake("openai").set_script(Script(tokens=["Let me check."], tool_calls=[ToolCall("get_time", arguments)], tool_arg_fragment=3))
    request: Any = {"model": MODELS["openai"], "max_tokens": 100, "messages": MESSAGES, "tools": TOOLS}
    async with setup.client.messages.stream(**request) as stream:
        final = await stream.get_final_message()
    assert [(b.type, getattr(b, "text", None) or getattr(b, "input", None)) for b in final.content] == [
        ("text", "Let me check."), ("tool_use", received),
    ]
    assert final.stop_reason == "tool_use"
    assert_valid_anthropic_stream((await raw_stream(setup, **request)).content)


@pytest.mark.parametrize(("arguments", "received"), [
    ('{"city": "Paris", "unit": "cel', {"city": "Paris"}),  # cut at max_tokens inside a value
    ('{"city": "Paris", "days": [1, 2', {"city": "Paris", "days": [1, 2]}),
    ('{"city": "Paris", "unit": cel', {"city": "Paris", "unit": None}),  # broken: closed where it broke
    ('Paris, please', {"arguments": "Paris, please"}),  # no object at all: kept as text (streamed: was {})
    ('["Paris", "Rome"]', {"arguments": ["Paris", "Rome"]}),
])
async def test_a_tool_input_cut_at_max_tokens_is_the_same_object_whole_or_streamed(
    setup: Setup, arguments: str, received: dict[str, Any]
) -> None:
    """A whole message's input was `{"arguments": "<the text>"}`, while the SDK's final
    message of the same answer streamed had what of the object parsed. An input that is no
    object at all is the text in both (the stream's final message had `{}`)."""
    setup.fake("openai").set_script(
        Script(tool_calls=[ToolCall("get_weather", arguments)], finish_reason="length", tool_arg_fragment=4)
    )
    request: Any = {"model": MODELS["openai"], "max_tokens": 100, "messages": MESSAGES, "tools": TOOLS}
    whole = await setup.client.messages.create(**request)
    async with setup.client.messages.stream(**request) as stream:
        streamed = await stream.get_final_message()
    assert (whole.stop_reason, streamed.stop_reason) == ("max_tokens", "max_tokens")
    inputs = [[getattr(b, "input", None) for b in m.content if b.type == "tool_use"] for m in (whole, streamed)]
    assert inputs == [[received], [received]]



@pytest.mark.parametrize(("arguments", "received"), [
    ('{"city": "Paris", "days": NaN}', {"city": "Paris", "days": None}),  # as the stream's final message
    ('{"city": "Paris", "days": 1e999}', {}),
    ('{"city": "\\ud800"}', {}),
    ('{"city": ' + "[" * 100_000, {}),
])
async def test_a_models_tool_input_no_json_can_carry_is_a_whole_message_not_a_500(
    setup: Setup, arguments: str, received: dict[str, Any]
) -> None:
    """A model's tool arguments holding NaN, a number out of range, half a surrogate pair, or
    nested past what Python reads (a prompt can ask for any of them): the whole message
    was a 500 "Internal gateway error" (the object read could not be written as JSON)."""
    setup.fake("openai").set_script(Script(tool_calls=[ToolCall("get_weather", arguments)], tool_arg_fragment=50_000))
    request: Any = {"model": MODELS["openai"], "max_tokens": 100, "messages": MESSAGES, "tools": TOOLS}
    whole = await setup.client.messages.create(**request)
    assert [b.input for b in whole.content if b.type == "tool_use"] == [received]


async def test_interleaved_parallel_tool_calls_from_an_openai_backend(setup: Setup) -> None:
    setup.fake("openai").set_script(
        Script(tool_calls=PARALLEL.tool_calls, tool_arg_fragment=3, interleave_tool_calls=True)
    )
    response = await raw_stream(setup, model=MODELS["openai"], tools=TOOLS)
    assert_valid_anthropic_stream(response.content)
    arguments: dict[int, str] = {}
    for name, payload in sse_frames(response.content):
        if name == "content_block_delta" and payload["delta"]["type"] == "input_json_delta":
            arguments[payload["index"]] = arguments.get(payload["index"], "") + payload["delta"]["partial_json"]
    assert [json.loads(a) for a in arguments.values()] == [{"city": "Paris"}, {"tz": "Europe/Paris"}]


async def test_tool_round_trip_reaches_each_backend_in_its_own_shape(setup: Setup) -> None:
    history: Any = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "Sunny"}]},
            {"type": "text", "text": "Thanks"},
        ]},
    ]
    for kind in KINDS:
        await setup.client.messages.create(model=MODELS[kind], max_tokens=64, messages=history, tools=TOOLS, system="Be brief.")
    openai_body = setup.fake("openai").requests[-1].json
    assert openai_body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        ]},
        {"role": "tool", "content": "Sunny", "tool_call_id": "toolu_01"},
        {"role": "user", "content": "Thanks"},
    ]
    assert openai_body["tools"][0]["function"]["name"] == "get_weather"
    anthropic_request = setup.fake("anthropic").requests[-1]
    # Unchanged, except that a tool result's lone text block travels as the equivalent string.
    history[2]["content"][0]["content"] = "Sunny"
    assert anthropic_request.json["messages"] == history and anthropic_request.json["system"] == "Be brief."
    assert anthropic_request.headers["x-api-key"] == ANTHROPIC_KEY
    assert anthropic_request.headers["anthropic-version"] == "2023-06-01"
    ollama_messages = setup.fake("ollama").requests[-1].json["messages"]
    assert [m["role"] for m in ollama_messages] == ["system", "user", "assistant", "tool", "user"]


# Claude Code (2.1) sends its agent list as a system turn after the user's first message, with
# these headers, on every request of a session.
CLAUDE_CODE_HEADERS = {
    "x-api-key": "sk-test", "anthropic-version": "2023-06-01", "x-app": "cli",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,mid-conversation-system-2026-04-07",
    "user-agent": "claude-cli/2.1.197 (external, sdk-cli)",
}


async def test_a_system_turn_inside_messages_is_kept_in_place_for_every_backend(setup: Setup) -> None:
    messages: Any = [
        {"role": "user", "content": [{"type": "text", "text": "What does hello.py print?", "cache_control": {"type": "ephemeral"}}]},
        {"role": "system", "content": "Available agent types: Explore."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "Sunny"}]},
        {"role": "system", "content": [{"type": "text", "text": "Auto mode is on."}]},
    ]
    async with httpx.AsyncClient(base_url=setup.url) as http:
        for kind in KINDS:
            response = await http.post("/v1/messages", headers=CLAUDE_CODE_HEADERS, json={
                "model": MODELS[kind], "max_tokens": 64, "stream": True, "system": "You are Claude Code.",
                "messages": messages, "tools": TOOLS,
            })
            assert response.status_code == 200, response.text
            assert "message_stop" in response.text
    openai_messages = setup.fake("openai").requests[-1].json["messages"]
    assert [(m["role"], m["content"]) for m in openai_messages if m["role"] == "system"] == [
        ("system", "You are Claude Code."), ("system", "Available agent types: Explore."), ("system", "Auto mode is on."),
    ]
    assert [m["role"] for m in openai_messages] == ["system", "user", "system", "assistant", "tool", "system"]
    ollama_messages = setup.fake("ollama").requests[-1].json["messages"]
    assert [m["role"] for m in ollama_messages] == ["system", "user", "system", "assistant", "tool", "system"]
    # Claude itself gets the turns where they stood: the top-level `system` unchanged, so its
    # prompt cache still holds.
    claude = setup.fake("anthropic").requests[-1].json
    assert claude["system"] == "You are Claude Code."
    assert [m["role"] for m in claude["messages"]] == ["user", "system", "assistant", "user", "system"]
    assert claude["messages"][1] == {"role": "system", "content": "Available agent types: Explore."}
    assert claude["messages"][4] == {"role": "system", "content": "Auto mode is on."}


async def test_claude_codes_attribution_line_is_not_sent_to_other_backends(setup: Setup) -> None:
    """It changes from request to request at the very head of the prompt: sent to vLLM or
    Ollama, no request would ever hit their prefix cache."""
    system: Any = [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.7a9; cc_entrypoint=cli; cch=36ee5;"},
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
    ]
    async with httpx.AsyncClient(base_url=setup.url) as http:
        for kind in KINDS:
            response = await http.post("/v1/messages", headers=CLAUDE_CODE_HEADERS, json={
                "model": MODELS[kind], "max_tokens": 64, "system": system, "messages": MESSAGES,
            })
            assert response.status_code == 200, response.text
        # Written as one text with the prompt after it (Claude Code 2.1.3x), the line alone goes.
        one_text = "x-anthropic-billing-header: cc_version=2.1.37.0d9; cch=fa690;\nYou are Claude Code."
        response = await http.post("/v1/messages", headers=CLAUDE_CODE_HEADERS, json={
            "model": MODELS["openai"], "max_tokens": 64, "system": one_text, "messages": MESSAGES,
        })
        assert response.status_code == 200, response.text
    assert setup.fake("openai").requests[-1].json["messages"][0] == {"role": "system", "content": "You are Claude Code."}
    assert setup.fake("openai").requests[-2].json["messages"][0] == {"role": "system", "content": "You are Claude Code."}
    assert setup.fake("ollama").requests[-1].json["messages"][0] == {"role": "system", "content": "You are Claude Code."}
    # Anthropic reads it: Claude gets the system prompt as sent.
    assert setup.fake("anthropic").requests[-1].json["system"] == system


async def test_thinking_handed_back_reaches_vllm_as_reasoning_content(setup: Setup) -> None:
    """Claude Code gives back each turn's thinking (unsigned, as a vLLM model's reasoning
    reached it) with its tool calls: dropped, the model lost the thinking of its own tool loop."""
    messages: Any = [
        {"role": "user", "content": "What does hello.py print?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should read the file.", "signature": ""},
            {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "print(1)"}]},
    ]
    async with httpx.AsyncClient(base_url=setup.url) as http:
        response = await http.post("/v1/messages", headers=CLAUDE_CODE_HEADERS, json={
            "model": MODELS["openai"], "max_tokens": 64, "messages": messages, "tools": TOOLS,
            "thinking": {"type": "adaptive"},
        })
    assert response.status_code == 200, response.text
    [assistant] = [m for m in setup.fake("openai").requests[-1].json["messages"] if m["role"] == "assistant"]
    assert assistant["reasoning_content"] == "I should read the file." and assistant["tool_calls"]


async def test_documents_reach_other_backends_as_text_and_what_has_no_equivalent_is_a_400(setup: Setup) -> None:
    document: Any = {
        "type": "document", "title": "Memo", "context": "From the archive",
        "source": {"type": "text", "media_type": "text/plain", "data": "The secret code is 4711."},
    }
    question: Any = [{"role": "user", "content": [document, {"type": "text", "text": "What is the code?"}]}]
    for kind in KINDS:
        await setup.client.messages.create(model=MODELS[kind], max_tokens=20, messages=question)
    assert setup.fake("openai").requests[-1].json["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Document: Memo\nContext: From the archive\n\n"},
        {"type": "text", "text": "The secret code is 4711."},
        {"type": "text", "text": "What is the code?"},
    ]}]
    assert "4711" in setup.fake("ollama").requests[-1].json["messages"][0]["content"]
    # An Anthropic backend gets the block itself (citations and all).
    assert setup.fake("anthropic").requests[-1].json["messages"] == question
    pdf: Any = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQ="}}
    # A PDF reaches vLLM as the chat `file` part a Responses client's `input_file` is (was a 400).
    await setup.client.messages.create(model=MODELS["openai"], max_tokens=20, messages=[{"role": "user", "content": [
        {**pdf, "title": "memo.pdf", "context": "From the archive"}, {"type": "text", "text": "q"}]}])
    assert setup.fake("openai").requests[-1].json["messages"][0]["content"] == [
        {"type": "text", "text": "Context: From the archive\n\n"},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0xLjQ=", "filename": "memo.pdf"}},
        {"type": "text", "text": "q"},
    ]
    search: Any = {"type": "search_result", "source": "https://x", "title": "t", "content": [{"type": "text", "text": "body"}]}
    by_url: Any = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    for kind in ("openai", "ollama"):
        sent = len(setup.fake(kind).requests)
        refused = ((by_url, "`document` blocks with a `url` source"), (search, "`search_result` blocks"))
        if kind == "ollama":
            refused += ((pdf, "an OpenAI-compatible one a base64 PDF"),)
        for block, named in refused:
            with pytest.raises(anthropic.BadRequestError) as caught:
                await setup.client.messages.create(
                    model=MODELS[kind], max_tokens=20, messages=[{"role": "user", "content": [block, {"type": "text", "text": "q"}]}],
                )
            assert caught.value.status_code == 400 and named in caught.value.message
        assert len(setup.fake(kind).requests) == sent
    await setup.client.messages.create(model=MODELS["anthropic"], max_tokens=20, messages=[{"role": "user", "content": [pdf, search]}])


async def test_an_image_read_by_a_tool_reaches_an_openai_backend_in_the_next_user_message(setup: Setup) -> None:
    """Claude Code's Read tool returns an image inside tool_result; OpenAI tool messages are text only."""
    image: Any = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    history: Any = [
        {"role": "user", "content": "What does shot.png show?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "shot.png"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [image]},
            {"type": "text", "text": "Describe it."},
        ]},
    ]
    tools: Any = [{"name": "Read", "input_schema": {"type": "object"}}]
    await setup.client.messages.create(model=MODELS["openai"], max_tokens=20, messages=history, tools=tools)
    assert setup.fake("openai").requests[-1].json["messages"][2:] == [
        {"role": "tool", "content": "[1 image attached in the next user message]", "tool_call_id": "toolu_1"},
        {"role": "user", "content": [
            {"type": "text", "text": "Image returned by tool call toolu_1:"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "text", "text": "Describe it."},
        ]},
    ]
    await setup.client.messages.create(model=MODELS["anthropic"], max_tokens=20, messages=history, tools=tools)
    assert setup.fake("anthropic").requests[-1].json["messages"][2]["content"][0]["content"] == [image]


async def test_a_pdf_read_by_a_tool_reaches_an_openai_backend_in_the_next_user_message(setup: Setup) -> None:
    """Claude Code's Read of a PDF returns a `document` inside tool_result, which reaches an
    OpenAI-compatible backend as the chat `file` part; OpenAI's and vLLM's tool messages take
    text only, so it goes with the images a tool returned: in the next user message. It went
    in the tool message (OpenAI's 400 "tool messages only support text", or a template that
    reads the text alone: the model never saw the file)."""
    pdf: Any = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQ="}}
    history: Any = [
        {"role": "user", "content": "Summarize memo.pdf."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "memo.pdf"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [pdf]}]},
    ]
    tools: Any = [{"name": "Read", "input_schema": {"type": "object"}}]
    await setup.client.messages.create(model=MODELS["openai"], max_tokens=20, messages=history, tools=tools)
    sent = setup.fake("openai").requests[-1].json["messages"][2:]
    assert sent == [
        {"role": "tool", "content": "[1 file attached in the next user message]", "tool_call_id": "toolu_1"},
        {"role": "user", "content": [
            {"type": "text", "text": "File returned by tool call toolu_1:"},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0xLjQ="}},
        ]},
    ]


@pytest.mark.parametrize(
    ("choice", "offered"),
    [({"type": "tool", "name": "get_time"}, ["get_time"]), ({"type": "any"}, ["get_weather", "get_time"]),
     ({"type": "auto"}, ["get_weather", "get_time"]), ({"type": "none"}, None)],
)
async def test_a_forced_tool_reaches_an_ollama_backend_as_the_only_tool(
    setup: Setup, choice: Any, offered: list[str] | None
) -> None:
    """Ollama has no `tool_choice`: offering the forced tool alone is the nearest it comes."""
    await setup.client.messages.create(model=MODELS["ollama"], max_tokens=30, messages=MESSAGES, tools=TOOLS, tool_choice=choice)
    sent = setup.fake("ollama").requests[-1].json
    assert "tool_choice" not in sent
    assert ([t["function"]["name"] for t in sent["tools"]] if "tools" in sent else None) == offered


@pytest.mark.parametrize(("disable", "parallel"), [(True, False), (False, True), (None, None)])
async def test_disable_parallel_tool_use_reaches_openai_backends_as_parallel_tool_calls(
    setup: Setup, disable: bool | None, parallel: bool | None
) -> None:
    choice: Any = {"type": "auto"} if disable is None else {"type": "auto", "disable_parallel_tool_use": disable}
    for kind in ("openai", "anthropic"):
        await setup.client.messages.create(model=MODELS[kind], max_tokens=20, messages=MESSAGES, tools=TOOLS, tool_choice=choice)
    assert setup.fake("openai").requests[-1].json.get("parallel_tool_calls") == parallel
    assert setup.fake("anthropic").requests[-1].json["tool_choice"] == choice


@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_disable_parallel_tool_use_gives_one_tool_use_even_when_the_backend_makes_more(setup: Setup, kind: str) -> None:
    """Anthropic promises at most one `tool_use`; Ollama has no such option and servers may
    ignore `parallel_tool_calls`, so the calls after the first are left out."""
    setup.fake(kind).set_script(PARALLEL)
    request: Any = {"model": MODELS[kind], "max_tokens": 100, "messages": MESSAGES, "tools": TOOLS}
    for choice in ({"type": "auto", "disable_parallel_tool_use": True}, {"type": "any", "disable_parallel_tool_use": True}):
        message = await setup.client.messages.create(**request, tool_choice=choice)
        async with setup.client.messages.stream(**request, tool_choice=choice) as stream:
            streamed = await stream.get_final_message()
        for answer in (message, streamed):
            assert [(b.type, getattr(b, "input", None)) for b in answer.content if b.type != "text"] == [
                ("tool_use", {"city": "Paris"})
            ]
            assert answer.stop_reason == "tool_use"
    assert_valid_anthropic_stream((await raw_stream(setup, **request, tool_choice=choice)).content)
    # Without it, both calls, as the backend made them.
    message = await setup.client.messages.create(**request, tool_choice={"type": "auto"})
    assert [b.type for b in message.content if b.type != "text"] == ["tool_use", "tool_use"]


# -- usage -------------------------------------------------------------------------------------------------


async def test_prompt_cache_counts_are_relayed_as_the_anthropic_backend_reported_them(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fakes import anthropic_backend as fake_module

    def cached_usage(self: Any, *, output_tokens: int) -> dict[str, Any]:
        return {"input_tokens": 10, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 50, "output_tokens": output_tokens}

    monkeypatch.setattr(fake_module._MessageRendering, "_usage", cached_usage)
    setup.fake("anthropic").set_script(Script(tokens=["a", "b"], usage=Usage(10, 2)))
    message = await setup.client.messages.create(model=MODELS["anthropic"], max_tokens=50, messages=MESSAGES)
    async with setup.client.messages.stream(model=MODELS["anthropic"], max_tokens=50, messages=MESSAGES) as stream:
        streamed = await stream.get_final_message()
    for usage in (message.usage, streamed.usage):
        assert (usage.input_tokens, usage.cache_creation_input_tokens, usage.cache_read_input_tokens, usage.output_tokens) == (
            10, 100, 50, 2,
        )
    # OpenAI clients count every prompt token, cache reads and writes included.
    async with openai.AsyncOpenAI(base_url=f"{setup.url}/v1", api_key="k", max_retries=0) as client:
        completion = await client.chat.completions.create(model=MODELS["anthropic"], messages=MESSAGES)
    assert completion.usage is not None and completion.usage.prompt_tokens == 160
    assert completion.usage.prompt_tokens_details is not None and completion.usage.prompt_tokens_details.cached_tokens == 50


# -- stop reasons ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_max_tokens_stop_reason(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(n_tokens=20))
    message = await setup.client.messages.create(model=MODELS[kind], max_tokens=3, messages=MESSAGES)
    assert message.stop_reason == "max_tokens"
    async with setup.client.messages.stream(model=MODELS[kind], max_tokens=3, messages=MESSAGES) as stream:
        streamed = await stream.get_final_message()
    assert streamed.stop_reason == "max_tokens"


@pytest.mark.parametrize("stop_reason", ["pause_turn", "refusal", "model_context_window_exceeded"])
async def test_anthropic_backend_stop_reasons_reach_anthropic_clients_as_said(setup: Setup, stop_reason: str) -> None:
    setup.fake("anthropic").set_script(Script(tokens=["a"], finish_reason=stop_reason))
    message = await setup.client.messages.create(model=MODELS["anthropic"], max_tokens=30, messages=MESSAGES)
    async with setup.client.messages.stream(model=MODELS["anthropic"], max_tokens=30, messages=MESSAGES) as stream:
        streamed = await stream.get_final_message()
    assert (message.stop_reason, streamed.stop_reason) == (stop_reason, stop_reason)


async def test_refusal_from_an_openai_content_filter(setup: Setup) -> None:
    setup.fake("openai").set_script(Script(tokens=["no"], finish_reason="content_filter"))
    message = await setup.client.messages.create(model=MODELS["openai"], max_tokens=30, messages=MESSAGES)
    assert message.stop_reason == "refusal"


@pytest.mark.parametrize("finish_reason", ["stop", "something_new"])
@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_tool_calls_after_a_plain_stop_are_tool_use_whole_or_streamed(
    setup: Setup, kind: str, finish_reason: str
) -> None:
    """Local backends often say `stop` (or something of their own) after calling tools; an
    Anthropic client must see `tool_use` either way, as Claude Code runs tools only then."""
    setup.fake(kind).set_script(Script(tokens=["x"], tool_calls=[("get_weather", {"city": "Paris"})], finish_reason=finish_reason))
    message = await setup.client.messages.create(model=MODELS[kind], max_tokens=30, messages=MESSAGES, tools=TOOLS)
    async with setup.client.messages.stream(model=MODELS[kind], max_tokens=30, messages=MESSAGES, tools=TOOLS) as stream:
        streamed = await stream.get_final_message()
    for reply in (message, streamed):
        assert reply.stop_reason == "tool_use" and [b.type for b in reply.content] == ["text", "tool_use"]


async def test_a_tool_calls_finish_without_a_call_is_end_turn(setup: Setup) -> None:
    """A server may say `tool_calls` though no call came through (vLLM's, when its tool parser
    gave up on the model's output, now text); `tool_use` promises a `tool_use` block, which an
    agent loop then looks for and would not find."""
    setup.fake("openai").set_script(Script(tokens=["<tool_call>oops"], finish_reason="tool_calls"))
    request: Any = {"model": MODELS["openai"], "max_tokens": 30, "messages": MESSAGES, "tools": TOOLS}
    message = await setup.client.messages.create(**request)
    async with setup.client.messages.stream(**request) as stream:
        streamed = await stream.get_final_message()
    for reply in (message, streamed):
        assert reply.stop_reason == "end_turn" and [b.type for b in reply.content] == ["text"]


async def test_thinking_given_back_reaches_vllm_as_the_turns_reasoning_content(setup: Setup) -> None:
    """Claude Code (or LangChain's ChatAnthropic) in front of gpt-oss or Qwen3 on vLLM gives each
    tool-use turn's thinking back, as Anthropic asks: dropped, vLLM's gpt-oss lost the analysis
    behind its own tool calls, Qwen3's template the thinking of the tool loop it was in."""
    history: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should call get_weather.", "signature": ""},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ]
    await setup.client.messages.create(model=MODELS["openai"], max_tokens=256, messages=history, tools=TOOLS)
    assistant = setup.fake("openai").requests[-1].json["messages"][1]
    assert assistant["reasoning_content"] == "I should call get_weather."
    assert assistant["tool_calls"][0]["function"]["name"] == "get_weather"


async def test_stop_sequence_and_thinking_signature_from_an_anthropic_backend(setup: Setup) -> None:
    setup.fake("anthropic").set_script(Script(tokens=["x"], reasoning=["Let me", " think"], stop_sequence="###"))
    request: Any = {"model": MODELS["anthropic"], "max_tokens": 64, "messages": MESSAGES, "stop_sequences": ["###"],
                    "thinking": {"type": "enabled", "budget_tokens": 32}}
    message = await setup.client.messages.create(**request)
    async with setup.client.messages.stream(**request) as stream:
        streamed = await stream.get_final_message()
    for reply in (message, streamed):
        assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", "###")
        thinking = reply.content[0]
        assert isinstance(thinking, anthropic.types.ThinkingBlock) and thinking.thinking == "Let me think"
        assert thinking.signature.startswith("EqQB")
    sent = setup.fake("anthropic").requests[-1].json
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 32} and sent["stop_sequences"] == ["###"]


# -- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_backend_errors_before_the_stream(setup: Setup, kind: str) -> None:
    fake = setup.fake(kind)
    fake.push(Script(status=429, retry_after=3))
    with pytest.raises(anthropic.RateLimitError) as limited:
        await setup.client.messages.create(model=MODELS[kind], max_tokens=30, messages=MESSAGES, stream=True)
    assert limited.value.type == "rate_limit_error" and limited.value.response.headers["retry-after"] == "3"
    fake.push(Script(status=503))
    with pytest.raises(anthropic.InternalServerError) as unavailable:
        await setup.client.messages.create(model=MODELS[kind], max_tokens=30, messages=MESSAGES)
    assert unavailable.value.status_code == 503 and unavailable.value.type == "overloaded_error"


LIMITS = [("anthropic-ratelimit-requests-remaining", "49"), ("anthropic-ratelimit-tokens-reset", "2026-01-01T00:00:05Z")]


@pytest.mark.parametrize("stream", [False, True])
async def test_an_anthropic_backends_request_id_and_rate_limits_reach_anthropic_clients(setup: Setup, stream: bool) -> None:
    """Claude Code shows the backend's request id in errors, and clients back off by its
    rate-limit headers: both come with the answer (the gateway's `request-id` is its trace)."""
    fake = setup.fake("anthropic")
    data = {"model": MODELS["anthropic"], "max_tokens": 30, "messages": MESSAGES, "stream": stream}
    async with httpx.AsyncClient(base_url=setup.url) as http:
        fake.push(Script(headers=LIMITS))
        answer = await http.post("/v1/messages", json=data)
        assert answer.status_code == 200
        upstream = answer.headers["x-upstream-request-id"]
        assert upstream.startswith("req_") and answer.headers["request-id"] != upstream
        assert answer.headers["anthropic-ratelimit-requests-remaining"] == "49"
        assert answer.headers["anthropic-ratelimit-tokens-reset"] == "2026-01-01T00:00:05Z"

        fake.push(Script(status=429, retry_after=3, headers=[*LIMITS, ("x-should-retry", "false")]))
        limited = await http.post("/v1/messages", json=data)
        assert limited.status_code == 429 and limited.headers.get_list("retry-after") == ["3"]
        assert limited.headers["x-should-retry"] == "false"  # the SDKs then do not retry
        assert limited.headers["x-upstream-request-id"].startswith("req_")
        assert limited.headers["anthropic-ratelimit-requests-remaining"] == "49"

        # Another kind of backend answering an Anthropic client: nothing of the sort is made up.
        setup.fake("openai").push(Script(headers=[("request-id", "not-anthropic"), *LIMITS]))
        other = await http.post("/v1/messages", json={**data, "model": MODELS["openai"]})
        assert other.status_code == 200
        assert "x-upstream-request-id" not in other.headers
        assert "anthropic-ratelimit-requests-remaining" not in other.headers


async def test_anthropic_overloaded_529_is_a_503_overloaded_error(setup: Setup) -> None:
    setup.fake("anthropic").push(Script(status=529))
    with pytest.raises(anthropic.InternalServerError) as info:
        await setup.client.messages.create(model=MODELS["anthropic"], max_tokens=30, messages=MESSAGES)
    assert info.value.status_code == 503 and info.value.type == "overloaded_error"
    assert "Overloaded" in str(info.value.api_message)
    # Overloaded as the stream's very first event (after a 200): still a real status to the client.
    setup.fake("anthropic").push(Script(fail_after=0))
    with pytest.raises(anthropic.InternalServerError) as early:
        await setup.client.messages.create(model=MODELS["anthropic"], max_tokens=30, messages=MESSAGES, stream=True)
    assert early.value.status_code == 503 and early.value.type == "overloaded_error"


@pytest.mark.parametrize("kind", KINDS)
async def test_backend_failing_mid_stream_gives_one_error_event(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=list("abcdefgh"), fail_after=4, error_message="engine died"))
    response = await raw_stream(setup, model=MODELS[kind])
    assert response.status_code == 200
    assert_valid_anthropic_stream(response.content)
    name, payload = sse_frames(response.content)[-1]
    assert name == "error" and payload["error"]["type"] in ("api_error", "overloaded_error")
    with pytest.raises(anthropic.APIStatusError):
        async with setup.client.messages.stream(model=MODELS[kind], max_tokens=30, messages=MESSAGES) as stream:
            async for _ in stream:
                pass


@pytest.mark.parametrize(("kind", "frames"), [("openai", 1), ("ollama", 0)])
async def test_a_backend_failing_before_its_first_token_is_a_status_the_sdk_retries(
    setup: Setup, kind: str, frames: int
) -> None:
    """vLLM failing right after its role chunk, Ollama's model that cannot load: a 200 whose
    body only says it failed. The client has been told nothing yet, so it gets a real status,
    which the SDK retries."""
    fake = setup.fake(kind)
    failing = Script(tokens=["a"], fail_after=frames, pace=0.05, error_message="model failed to load")
    fake.push(failing)
    with pytest.raises(anthropic.InternalServerError) as info:
        await setup.client.messages.create(model=MODELS[kind], max_tokens=30, messages=MESSAGES, stream=True)
    assert info.value.status_code == 502 and "model failed to load" in str(info.value.api_message)
    fake.push(failing)
    before = len(fake.requests)
    retrying = setup.client.with_options(max_retries=1)
    async with retrying.messages.stream(model=MODELS[kind], max_tokens=30, messages=MESSAGES) as stream:
        message = await stream.get_final_message()
    assert message.content[0].type == "text" and message.content[0].text
    assert len(fake.requests) == before + 2


async def test_invalid_requests_are_anthropic_shaped_400s(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.url) as http:
        missing = await http.post("/v1/messages", json={"model": "claude-x", "messages": MESSAGES})
        malformed = await http.post("/v1/messages", content=b"{", headers={"content-type": "application/json"})
        bad_role = await http.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]})
    for response in (missing, malformed, bad_role):
        assert response.status_code == 400
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in missing.json()["error"]["message"]
    assert "messages[0].role" in bad_role.json()["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        await setup.client.messages.create(model="m", max_tokens=5, messages=MESSAGES, extra_body={"temperature": 1.5})


async def test_unknown_paths_and_methods_answer_in_anthropic_shape(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.url) as http:
        unknown = await http.post("/v1/messages/drafts", json={})
        wrong_method = await http.get("/v1/messages")
        # Message batches need the gateway's database, which this one runs without.
        batches = await http.post("/v1/messages/batches", json={"requests": []})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    assert batches.status_code == 503 and batches.json()["type"] == "error"
    assert "database" in batches.json()["error"]["message"] and batches.headers["x-should-retry"] == "false"
    assert wrong_method.status_code == 405 and wrong_method.json()["type"] == "error"


async def test_body_too_large_is_an_anthropic_413() -> None:
    async with running_gateway(backend("c", "http://127.0.0.1:9", kind="anthropic", default=True), max_body_bytes=1000) as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as info:
            await client.messages.create(model="claude-x", max_tokens=5, messages=[{"role": "user", "content": "x" * 5000}])
        assert info.value.status_code == 413 and info.value.type == "request_too_large"
        await client.close()


async def test_credentials_and_version_are_accepted_in_any_form(setup: Setup) -> None:
    setup.fake("anthropic").set_script(Script(tokens=["ok"]))
    data = {"model": MODELS["anthropic"], "max_tokens": 5, "messages": MESSAGES}
    async with httpx.AsyncClient(base_url=setup.url) as http:
        bearer = await http.post("/v1/messages", json=data, headers={"authorization": "Bearer k"})
        bare = await http.post("/v1/messages", json=data)
    assert bearer.status_code == bare.status_code == 200
    # The backend still gets its own key and a version.
    assert setup.fake("anthropic").requests[-1].headers["anthropic-version"] == "2023-06-01"


async def test_anthropic_beta_reaches_anthropic_backends_only(setup: Setup) -> None:
    beta = {"anthropic-beta": "interleaved-thinking-2025-05-14"}
    for kind in ("anthropic", "openai"):
        await setup.client.messages.create(model=MODELS[kind], max_tokens=5, messages=MESSAGES, extra_headers=beta)
    await setup.client.messages.count_tokens(model=MODELS["anthropic"], messages=MESSAGES, extra_headers=beta)
    to_anthropic = [r for r in setup.fake("anthropic").requests if r.path.startswith("/v1/messages")]
    assert [r.headers.get("anthropic-beta") for r in to_anthropic] == [beta["anthropic-beta"]] * 2
    assert all("_anthropic_beta" not in (r.json or {}) for r in to_anthropic)
    assert "anthropic-beta" not in setup.fake("openai").requests[-1].headers
    # Two header lines are one list, as RFC 9110 reads them.
    async with httpx.AsyncClient(base_url=setup.url, timeout=10) as client:
        reply = await client.post(
            "/v1/messages", json={"model": MODELS["anthropic"], "max_tokens": 5, "messages": MESSAGES},
            headers=[("anthropic-beta", "files-api-2025-04-14"), ("anthropic-beta", "interleaved-thinking-2025-05-14")],
        )
    assert reply.status_code == 200
    sent = setup.fake("anthropic").requests[-1].headers["anthropic-beta"]
    assert sent == "files-api-2025-04-14, interleaved-thinking-2025-05-14"


# -- cancellation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_disconnect_mid_stream_closes_the_backend_request(
    setup: Setup, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.backends")
    fake = setup.fake(kind)
    fake.set_script(Script(n_tokens=1000, pace=0.01))
    seen = 0
    async with setup.client.messages.stream(model=MODELS[kind], max_tokens=2000, messages=MESSAGES) as stream:
        async for event in stream:
            if event.type == "text":
                seen += 1
                if seen == 5:
                    break
    gone = await fake.wait_disconnect(2.0)
    assert 0 < gone.frames_sent < 1000
    await fake.wait_idle(2.0)
    # Our client hanging up is no backend fault.
    assert [r.getMessage() for r in caplog.records if r.name == "llm_proxy.backends"] == []


async def test_disconnect_before_first_token_closes_the_anthropic_backend_request(setup: Setup) -> None:
    fake = setup.fake("anthropic")
    fake.set_script(Script(header_delay=30))
    await hang_up_once_received(fake, lambda: setup.client.messages.create(
        model=MODELS["anthropic"], max_tokens=5, messages=MESSAGES, stream=True
    ))
    gone = await fake.wait_disconnect(2.0)
    assert not gone.headers_sent


# -- timeouts and outages of an Anthropic backend -----------------------------------------------------------

QUICK = Timeouts(connect=2, first_token=0.3, idle=0.3, total=30)


async def test_anthropic_backend_first_token_timeout_is_a_504() -> None:
    fake = AnthropicBackend(default=Script(stall_before_headers=True))
    async with fake.serve() as server, running_gateway(backend("c", server.url, kind="anthropic", default=True, timeouts=QUICK)) as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
        with pytest.raises(anthropic.InternalServerError) as info:
            await client.messages.create(model="claude-x", max_tokens=5, messages=MESSAGES, stream=True)
        assert info.value.status_code == 504 and info.value.type == "timeout_error"
        await fake.wait_disconnect(2.0)
        await client.close()


async def test_anthropic_backend_going_silent_ends_the_stream_with_an_error_event() -> None:
    fake = AnthropicBackend(default=Script(tokens=list("abcdef"), stall_after=3))
    async with fake.serve() as server, running_gateway(backend("c", server.url, kind="anthropic", default=True, timeouts=QUICK)) as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
        texts = []
        with pytest.raises(anthropic.APIStatusError) as info:
            async with client.messages.stream(model="claude-x", max_tokens=50, messages=MESSAGES) as stream:
                async for event in stream:
                    if event.type == "text":
                        texts.append(event.text)
        assert texts == ["a"] and "idle" in str(info.value.api_message)
        await fake.wait_disconnect(2.0)
        await client.close()


async def test_unreachable_anthropic_backend_is_a_503() -> None:
    async with running_gateway(backend("c", "http://127.0.0.1:9", kind="anthropic", default=True, timeouts=QUICK)) as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
        with pytest.raises(anthropic.InternalServerError) as info:
            await client.messages.create(model="claude-x", max_tokens=5, messages=MESSAGES)
        assert info.value.status_code == 503 and info.value.type == "overloaded_error"
        await client.close()


# -- count_tokens ------------------------------------------------------------------------------------------


class SmallWindowOpenAIBackend(OpenAIBackend):
    """vLLM serving a model of a 64-token window, whose prompts here are 20 tokens: a
    `max_tokens` past the 44 left is refused in vLLM's words."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        asked = request.json().get("max_tokens", 0) if request.path == "/v1/chat/completions" else 0
        if asked > 44:
            await self.send_error(exchange, 400, f"'max_tokens' or 'max_completion_tokens' is too large: {asked}. "
                                  "This model's maximum context length is 64 tokens and your request has 20 input "
                                  f"tokens ({asked} > 64 - 20). (parameter=max_tokens, value={asked})")
        else:
            await super().route(request, exchange, call)


async def test_claude_codes_output_limit_past_a_small_window_is_what_the_window_leaves() -> None:
    """Claude Code asks for 32000 tokens whatever the model; vLLM refuses a limit past what its
    window leaves (before: every request to a model of a small window was that 400, said as
    "prompt is too long", which Claude Code compacts on, for nothing). As Anthropic does, the
    answer gets the room that is left, and one cut there ends `model_context_window_exceeded`."""
    fake = SmallWindowOpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url, \
            anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as client:
        request: Any = {"model": "qwen3-8b", "max_tokens": 32000, "messages": MESSAGES}
        fake.set_script(Script(n_tokens=100))
        whole = await client.messages.create(**request, timeout=30)  # the SDK asks a stream of a limit this high
        async with client.messages.stream(**request) as stream:
            streamed = await stream.get_final_message()
        for reply in (whole, streamed):
            assert reply.stop_reason == "model_context_window_exceeded" and reply.usage.output_tokens == 44
        assert [r.json["max_tokens"] for r in fake.requests] == [32000, 44, 32000, 44]
        fake.set_script(Script(tokens=["Hi"]))
        short = await client.messages.create(**request, timeout=30)
        assert (short.stop_reason, short.content[0].type) == ("end_turn", "text")
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as other:
            with pytest.raises(openai.BadRequestError):  # vLLM's answer to an OpenAI client, as OpenAI's
                await other.chat.completions.create(model="qwen3-8b", messages=MESSAGES, max_tokens=32000)


async def test_count_tokens_where_the_backend_can(setup: Setup) -> None:
    counted = await setup.client.messages.count_tokens(model=MODELS["anthropic"], messages=MESSAGES, system="Be brief.")
    sent = setup.fake("anthropic").requests[-1]
    assert sent.path == "/v1/messages/count_tokens" and counted.input_tokens > 0
    assert "max_tokens" not in sent.json and sent.json["system"] == "Be brief."
    # Claude Code counts with its context edits: the count before them reaches it (was left out).
    edits: Any = {"edits": [{"type": "clear_tool_uses_20250919"}]}
    edited = await setup.client.beta.messages.count_tokens(
        model=MODELS["anthropic"], messages=MESSAGES, context_management=edits, betas=["context-management-2025-06-27"])
    assert setup.fake("anthropic").requests[-1].json["context_management"] == edits
    assert edited.context_management is not None and edited.context_management.original_input_tokens > 0

    vllm = await setup.client.messages.count_tokens(model=MODELS["openai"], messages=MESSAGES)
    tokenize = setup.fake("openai").requests[-1]
    assert tokenize.path == "/tokenize" and vllm.input_tokens == len(json.dumps(tokenize.json["messages"])) // 4

    # Ollama cannot count: the gateway's estimate, said to be one.
    ollama = await setup.client.messages.with_raw_response.count_tokens(model=MODELS["ollama"], messages=MESSAGES)
    assert ollama.headers["x-token-count"] == "estimate" and (await ollama.parse()).input_tokens > 0
    assert "x-token-count" not in (
        await setup.client.messages.with_raw_response.count_tokens(model=MODELS["openai"], messages=MESSAGES)
    ).headers


async def test_count_tokens_without_a_tokenize_endpoint_is_an_estimate() -> None:
    fake = OpenAIBackend()
    text = "word " * 400  # 2000 characters: about 500 tokens
    async with fake.serve() as server, running_gateway(backend("plain", server.url, default=True)) as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
        counted = await client.messages.with_raw_response.count_tokens(
            model="m", messages=[{"role": "user", "content": text}]
        )
        assert counted.headers["x-token-count"] == "estimate"
        assert (await counted.parse()).input_tokens == 500
        await client.close()
    assert [r.path for r in fake.requests] == ["/tokenize", "/v1/models/m"]  # asked first; then whether it has the model


async def test_a_model_name_cannot_leave_the_path_it_is_looked_up_at() -> None:
    # The name is one path segment: `..` would be a dot segment (the API root), `/`, `?` and
    # `#` would end it; the backend is asked about that name, nowhere else.
    fake = OpenAIBackend()
    names = ["..", "../../admin", "m?debug=1", "m#x", "a/b"]
    async with fake.serve() as server, running_gateway(backend("plain", server.url, default=True)) as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
        for name in names:
            await client.messages.count_tokens(model=name, messages=MESSAGES)
        await client.close()
    asked = [r.path for r in fake.requests if r.path != "/tokenize"]
    assert asked == [
        "/v1/models/%2E%2E", "/v1/models/..%2F..%2Fadmin", "/v1/models/m%3Fdebug%3D1",
        "/v1/models/m%23x", "/v1/models/a%2Fb",
    ]


async def test_a_model_looked_up_at_an_anthropic_backend_stays_in_its_path_segment() -> None:
    # Anthropic's Models API resolves the names a client looks up; `..` must not climb to the
    # API's root on the way (one rule for every backend kind's model path).
    fake = AnthropicBackend()
    async with fake.serve() as server, running_gateway(backend("c", server.url, kind="anthropic", default=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for name in ("%2E%2E", "a%2Fb"):
                await client.get(f"/v1/models/{name}")
    asked = [r.path for r in fake.requests if r.path.startswith("/v1/") and r.path != "/v1/models"]
    assert asked == ["/v1/models/%2E%2E", "/v1/models/a%2Fb"]


async def test_count_tokens_for_a_model_the_backend_lacks_is_a_404_as_messages_is() -> None:
    """vLLM (its `/tokenize`), a server with OpenAI's model lookup and no `/tokenize`, and
    Ollama each say which models they lack; a server that takes any name keeps the estimate."""
    vllm, plain = TokenizingOpenAIBackend(models=["qwen3-8b"]), OpenAIBackend(models=["gemma-3"])
    ollama, lenient = OllamaBackend(models=["llama3.2"]), OpenAIBackend()
    async with (
        vllm.serve() as s_vllm,
        plain.serve() as s_plain,
        ollama.serve() as s_ollama,
        lenient.serve() as s_lenient,
        running_gateway(
            backend("vllm", s_vllm.url, prefixes=("qwen",)), backend("plain", s_plain.url, prefixes=("gemma",)),
            backend("ollama", s_ollama.url, kind="ollama", prefixes=("llama",)), backend("any", s_lenient.url, default=True),
        ) as url,
    ):
        client = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
        for missing in ("qwen3-999", "gemma-9", "llama9"):
            with pytest.raises(anthropic.NotFoundError) as sent:
                await client.messages.create(model=missing, max_tokens=5, messages=MESSAGES)
            with pytest.raises(anthropic.NotFoundError) as counted:
                await client.messages.count_tokens(model=missing, messages=MESSAGES)
            assert counted.value.type == sent.value.type == "not_found_error"
            assert missing in str(counted.value.api_message)
        # Ollama lists `llama3.2` as `llama3.2:latest`; the lenient server lists only its own name.
        for served in ("qwen3-8b", "gemma-3", "llama3.2", "whatever-it-loaded"):
            assert (await client.messages.count_tokens(model=served, messages=MESSAGES)).input_tokens > 0
        await client.close()


async def test_count_tokens_goes_through_the_backends_pool_and_its_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENIZE_TEST_KEY", "sk-vllm")
    fake = TokenizingOpenAIBackend()
    dead = f"http://127.0.0.1:{refusing_port()}/v1"
    async with fake.serve() as server:
        live = backend("vllm", server.url, default=True, api_key_env="TOKENIZE_TEST_KEY")
        config = replace(live, base_url=dead, replicas=(live.base_url,))
        async with running_gateway(config) as url:
            client = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
            for _ in range(3):
                counted = await client.messages.count_tokens(model="m", messages=MESSAGES)
                assert counted.input_tokens > 0
            await client.close()
    sent = [r for r in fake.requests if r.path == "/tokenize"]
    assert len(sent) == 3 and all(r.headers["authorization"] == "Bearer sk-vllm" for r in sent)
    assert server.connections_total == 1  # pooled: no client, no connection per request


# -- blocks the domain does not model, Anthropic backend to Anthropic client ------------------------------

SERVER_TOOL_CONTENT: Any = [
    {"type": "thinking", "thinking": "plan", "signature": "SIG1"},
    {"type": "redacted_thinking", "data": "ENCRYPTED"},
    {"type": "text", "text": "Let me look."},
    {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "weather paris"}},
    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
        {"type": "web_search_result", "url": "https://w.example", "title": "W", "encrypted_content": "EC", "page_age": None},
    ]},
    {"type": "text", "text": "It is sunny.", "citations": [
        {"type": "web_search_result_location", "url": "https://w.example", "title": "W", "encrypted_index": "EI", "cited_text": "sunny"},
    ]},
    {"type": "text", "text": " Anything else?"},
    {"type": "tool_use", "id": "toolu_9", "name": "get_time", "input": {"tz": "CET"}},
]


def _server_tool_stream(content: Any = SERVER_TOOL_CONTENT) -> bytes:
    def event(payload: dict[str, Any]) -> bytes:
        return f"event: {payload['type']}\ndata: {json.dumps(payload)}\n\n".encode()

    usage = {"input_tokens": 10, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1}
    out = [event({"type": "message_start", "message": {
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-fake-1", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": usage,
    }})]
    for index, block in enumerate(content):
        def delta(body: dict[str, Any], index: int = index) -> bytes:
            return event({"type": "content_block_delta", "index": index, "delta": body})

        kind = block["type"]
        start = {**block, "text": ""} if kind == "text" else {**block, "input": {}} if "input" in block else block
        if kind == "thinking":
            start = {**block, "thinking": "", "signature": ""}
        out.append(event({"type": "content_block_start", "index": index, "content_block": {
            k: v for k, v in start.items() if k != "citations"
        }}))
        if kind == "thinking":
            out += [delta({"type": "thinking_delta", "thinking": block["thinking"]}),
                    delta({"type": "signature_delta", "signature": block["signature"]})]
        for citation in block.get("citations", []):
            out.append(delta({"type": "citations_delta", "citation": citation}))
        if kind == "text":
            out.append(delta({"type": "text_delta", "text": block["text"]}))
        if "input" in block:
            out.append(delta({"type": "input_json_delta", "partial_json": json.dumps(block["input"])}))
        out.append(event({"type": "content_block_stop", "index": index}))
    out.append(event({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                      "usage": {"output_tokens": 42, "server_tool_use": {"web_search_requests": 1}}}))
    out.append(event({"type": "message_stop"}))
    return b"".join(out)


class ServerToolAnthropicBackend(AnthropicBackend):
    """Answers every message with web-search blocks (or `content`), as Anthropic's API does."""

    content: Any = SERVER_TOOL_CONTENT

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path != "/v1/messages":
            await super().route(request, exchange, call)
        elif request.json().get("stream"):
            await exchange.start(200, content_type="text/event-stream", first_chunk=_server_tool_stream(self.content))
            await exchange.finish()
        else:
            await exchange.respond_json(200, {
                "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-fake-1",
                "content": self.content, "stop_reason": "tool_use", "stop_sequence": None,
                "usage": {"input_tokens": 10, "output_tokens": 42, "server_tool_use": {"web_search_requests": 1}},
            })


async def test_server_tool_blocks_citations_and_usage_reach_anthropic_clients_as_the_backend_sent_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    fake, openai_fake = ServerToolAnthropicBackend(), OpenAIBackend()
    async with fake.serve() as server, openai_fake.serve() as openai_server, running_gateway(
        backend("claude", server.url, kind="anthropic", prefixes=("claude",), api_key_env="TEST_ANTHROPIC_KEY"),
        backend("vllm", openai_server.url, default=True),
    ) as url:
        request: Any = {"model": "claude-fake-1", "max_tokens": 1024, "messages": MESSAGES,
                        "tools": [{"type": "web_search_20250305", "name": "web_search"}, TOOLS[1]]}
        async with httpx.AsyncClient(base_url=url) as http:
            message = (await http.post("/v1/messages", json=request)).json()
            streamed = await http.post("/v1/messages", json={**request, "stream": True})
        assert message["content"] == SERVER_TOOL_CONTENT
        assert message["usage"]["server_tool_use"] == {"web_search_requests": 1}
        assert_valid_anthropic_stream(streamed.content)
        async with anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as client:
            async with client.messages.stream(**request) as stream:
                final = await stream.get_final_message()
            assert [block.to_dict() for block in final.content] == SERVER_TOOL_CONTENT
            assert final.usage.server_tool_use is not None and final.usage.server_tool_use.web_search_requests == 1
            # The next turn gives them back: an Anthropic backend gets them all, another model
            # (offered the client's own tools: web search itself would be a 400 there) the
            # conversation without them (the text written from them stays).
            history = [*MESSAGES, {"role": "assistant", "content": SERVER_TOOL_CONTENT},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "12:00"}]}]
            await client.messages.create(**{**request, "messages": history})
            assert fake.requests[-1].json["messages"][1]["content"] == SERVER_TOOL_CONTENT
            await client.messages.create(**{**request, "model": "qwen3-8b", "messages": history, "tools": [TOOLS[1]]})
        assert openai_fake.requests[-1].json["messages"][1] == {
            "role": "assistant",
            "content": [{"type": "text", "text": t} for t in ("Let me look.", "It is sunny.", " Anything else?")],
            "tool_calls": [{"id": "toolu_9", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}],
            "reasoning_content": "plan",  # its thinking, for a thinking model's template
        }


PROGRAMMATIC_CONTENT: Any = [
    {"type": "server_tool_use", "id": "srvtoolu_2", "name": "code_execution",
     "input": {"code": "print(get_time(tz='CET'))"}},
    {"type": "tool_use", "id": "toolu_7", "name": "get_time", "input": {"tz": "CET"},
     "caller": {"type": "code_execution_20250825", "tool_id": "srvtoolu_2"}},
]


class ProgrammaticToolAnthropicBackend(ServerToolAnthropicBackend):
    """Answers with a tool call made by code execution (programmatic tool calling)."""

    content = PROGRAMMATIC_CONTENT


async def test_a_tool_call_made_by_code_execution_keeps_its_caller_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `tool_use` that Anthropic's code execution made carries its `caller`, which tells the
    client where the call came from and goes back with its result. Before, the gateway rebuilt
    the block from the call's id, name and input: the client never saw the caller (streamed or
    not), and the turn it gave back reached Anthropic without it."""
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    fake = ProgrammaticToolAnthropicBackend()
    async with fake.serve() as server, running_gateway(
        backend("claude", server.url, kind="anthropic", default=True, api_key_env="TEST_ANTHROPIC_KEY"),
    ) as url, anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as client:
        tools: Any = [{"type": "code_execution_20250825", "name": "code_execution"},
                      {**TOOLS[1], "allowed_callers": ["code_execution_20250825"]}]
        request: Any = {"model": "claude-fake-1", "max_tokens": 1024, "messages": MESSAGES, "tools": tools}
        message = await client.messages.create(**request)
        async with client.messages.stream(**request) as stream:
            streamed = await stream.get_final_message()
        for reply in (message, streamed):
            assert [block.to_dict() for block in reply.content] == PROGRAMMATIC_CONTENT
        history = [*MESSAGES, {"role": "assistant", "content": PROGRAMMATIC_CONTENT},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_7", "content": "12:00"}]}]
        await client.messages.create(**{**request, "messages": history})
        assert fake.requests[-1].json["messages"][1]["content"] == PROGRAMMATIC_CONTENT


# -- the OpenAI SDK in front of an Anthropic backend -------------------------------------------------------


@pytest.fixture
async def openai_front(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[openai.AsyncOpenAI, AnthropicBackend]]:
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    fake = AnthropicBackend(api_key=ANTHROPIC_KEY, require_version=True)
    async with fake.serve() as server, running_gateway(
        backend("claude", server.url, kind="anthropic", default=True, api_key_env="TEST_ANTHROPIC_KEY")
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        yield client, fake
        await client.close()


OPENAI_TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]


async def test_openai_client_gets_parallel_tool_calls_with_streamed_arguments(
    openai_front: tuple[openai.AsyncOpenAI, AnthropicBackend],
) -> None:
    client, fake = openai_front
    fake.set_script(Script(tokens=["On it."], tool_calls=PARALLEL.tool_calls, tool_arg_fragment=4, usage=Usage(40, 17, cached_tokens=8)))
    stream = await client.chat.completions.create(
        model="claude-x", messages=MESSAGES, tools=OPENAI_TOOLS, stream=True, stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    calls: dict[int, dict[str, Any]] = {}
    pieces = 0
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": call.function.name, "arguments": ""})  # type: ignore[union-attr]
            entry["arguments"] += call.function.arguments or ""  # type: ignore[union-attr]
            pieces += 1
    assert sorted(calls) == [0, 1]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"}),
    ]
    assert all(c["id"].startswith("toolu_") for c in calls.values()) and pieces > 4
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    # message_start's input (with cache reads) merged with message_delta's cumulative output.
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (48, 17, 65)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 8


@pytest.mark.parametrize(
    ("script", "finish_reason"),
    [
        (Script(tokens=["a"]), "stop"),
        (Script(tokens=["a"], stop_sequence="###"), "stop"),
        (Script(n_tokens=10), "length"),
        (Script(tokens=["no"], finish_reason="content_filter"), "content_filter"),
        (Script(tokens=["a"], finish_reason="pause_turn"), "stop"),
        (Script(tokens=["a"], finish_reason="model_context_window_exceeded"), "length"),
    ],
)
async def test_openai_client_finish_reasons(
    openai_front: tuple[openai.AsyncOpenAI, AnthropicBackend], script: Script, finish_reason: str
) -> None:
    client, fake = openai_front
    fake.set_script(script)
    reply = await client.chat.completions.create(model="claude-x", messages=MESSAGES, max_tokens=5)
    assert reply.choices[0].finish_reason == finish_reason
    stream = await client.chat.completions.create(model="claude-x", messages=MESSAGES, max_tokens=5, stream=True)
    assert [c.choices[0].finish_reason async for c in stream if c.choices and c.choices[0].finish_reason] == [finish_reason]


async def test_openai_client_non_streaming_and_the_request_anthropic_sees(
    openai_front: tuple[openai.AsyncOpenAI, AnthropicBackend],
) -> None:
    client, fake = openai_front
    fake.set_script(Script(tokens=["Done", "."], tool_calls=[("get_time", {"tz": "UTC"})], usage=Usage(30, 6)))
    conversation: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Sunny"},
    ]
    reply = await client.chat.completions.create(model="claude-x", messages=conversation, tools=OPENAI_TOOLS, temperature=1.5)
    choice = reply.choices[0]
    assert choice.message.content == "Done." and choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [("get_time", '{"tz": "UTC"}')]  # type: ignore[union-attr]
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (30, 6)
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert sent.json["system"] == "Be brief." and sent.json["max_tokens"] == 4096 and sent.json["temperature"] == 1.0
    assert sent.json["messages"][1:] == [
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "get_time", "input": {"tz": "CET"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "12:00"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "Sunny"},
        ]},
    ]


async def test_whitespace_stop_sequences_of_other_clients_are_left_out_for_anthropic(
    openai_front: tuple[openai.AsyncOpenAI, AnthropicBackend],
) -> None:
    """Anthropic refuses an empty or whitespace-only stop sequence with a 400 ("each stop
    sequence must contain non-whitespace"); OpenAI and Ollama clients send `"\n"` routinely."""
    client, fake = openai_front
    reply = await client.chat.completions.create(model="claude-x", messages=MESSAGES, stop=["\n", "END", " \t", ""])
    assert reply.choices[0].message.content
    assert fake.requests[-1].json["stop_sequences"] == ["END"]
    await client.chat.completions.create(model="claude-x", messages=MESSAGES, stop="\n\n")
    assert "stop_sequences" not in fake.requests[-1].json
    async with httpx.AsyncClient(base_url=str(client.base_url).removesuffix("/v1/")) as http:
        ollama = await http.post("/api/chat", json={
            "model": "claude-x", "messages": MESSAGES, "stream": False, "options": {"stop": ["\n\n", "User:"]},
        })
    assert ollama.status_code == 200, ollama.text
    assert fake.requests[-1].json["stop_sequences"] == ["User:"]


async def test_an_openai_clients_pdf_reaches_an_anthropic_backend_as_a_document(
    openai_front: tuple[openai.AsyncOpenAI, AnthropicBackend],
) -> None:
    """Anthropic reads PDFs (`document` blocks): an OpenAI `file` part carrying one inline is
    that, with its `cache_control` (LiteLLM's convention); a Files API id has no equivalent."""
    client, fake = openai_front
    pdf = "JVBERi0xLjQKJcOkw7zDtsOf"
    asked: Any = [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{pdf}", "filename": "report.pdf"},
         "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Summarise it."},
    ]}]
    reply = await client.chat.completions.create(model="claude-x", messages=asked)
    assert reply.choices[0].message.content
    assert fake.requests[-1].json["messages"] == [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf},
         "title": "report.pdf", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Summarise it."},
    ]}]
    sent = len(fake.requests)
    by_id: Any = [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc"}}, {"type": "text", "text": "?"}]}]
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="claude-x", messages=by_id)
    assert info.value.param == "messages[0].content[0]" and len(fake.requests) == sent


async def test_blank_text_of_other_clients_does_not_reach_an_anthropic_backend(
    openai_front: tuple[openai.AsyncOpenAI, AnthropicBackend],
) -> None:
    """Anthropic refuses whitespace-only text blocks ("text content blocks must contain
    non-whitespace text"): an assistant turn replayed from a model that wrote "\n\n" before
    its tool calls, a blank system prompt or turn, reach it without them."""
    client, fake = openai_front
    conversation: Any = [
        {"role": "system", "content": " "},
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "\n\n", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        {"role": "user", "content": [{"type": "text", "text": "\n"}, {"type": "text", "text": "And now?"}]},
        {"role": "assistant", "content": " "},
        {"role": "user", "content": "Well?"},
    ]
    reply = await client.chat.completions.create(model="claude-x", messages=conversation, tools=OPENAI_TOOLS)
    assert reply.choices[0].message.content
    sent = fake.requests[-1].json
    assert "system" not in sent
    assert sent["messages"] == [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "12:00"},
            {"type": "text", "text": "And now?"}, {"type": "text", "text": "Well?"},
        ]},
    ]
    # A turn of nothing but blank text stays: without it, the one before would be continued.
    await client.chat.completions.create(model="claude-x", messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": " "},
    ])
    assert fake.requests[-1].json["messages"][-1] == {"role": "user", "content": " "}


async def test_an_empty_last_message_of_another_client_is_a_400_not_a_prefill(
    openai_front: tuple[openai.AsyncOpenAI, AnthropicBackend],
) -> None:
    # Left out, the empty turn made the assistant's turn before it the last: Claude went on
    # with "Hello" instead of answering.
    client, fake = openai_front
    asked = len(fake.requests)
    for empty in ("", []):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="claude-x", messages=[
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": empty},  # type: ignore[misc]
            ])
        assert refused.value.param == "messages[2].content"
    assert len(fake.requests) == asked


async def test_an_openai_clients_end_user_id_reaches_claude_as_its_metadata_user_id(
    openai_front: tuple[openai.AsyncOpenAI, AnthropicBackend],
) -> None:
    client, fake = openai_front
    await client.chat.completions.create(model="claude-x", messages=[{"role": "user", "content": "Hi"}], user="user-42")
    assert fake.requests[-1].json["metadata"] == {"user_id": "user-42"}
    await client.chat.completions.create(model="claude-x", messages=[{"role": "user", "content": "Hi"}])
    assert "metadata" not in fake.requests[-1].json


async def test_litellms_thinking_field_from_an_openai_client_reaches_an_anthropic_backend(
    openai_front: tuple[openai.AsyncOpenAI, AnthropicBackend],
) -> None:
    """LiteLLM users ask a Claude model to think with `thinking` (the OpenAI SDK's `extra_body`)."""
    client, fake = openai_front
    thinking = {"type": "enabled", "budget_tokens": 2000}
    await client.chat.completions.create(model="claude-x", messages=MESSAGES, temperature=0.3, extra_body={"thinking": thinking})
    sent = fake.requests[-1].json
    # On top of the default answer, as for `reasoning_effort`; no temperature beside thinking.
    assert sent["thinking"] == thinking and sent["max_tokens"] == 4096 + 2000 and "temperature" not in sent
    await client.chat.completions.create(model="claude-x", messages=MESSAGES, max_tokens=3000, extra_body={"thinking": thinking})
    assert fake.requests[-1].json["thinking"] == thinking and fake.requests[-1].json["max_tokens"] == 3000


class Opus47Backend(AnthropicBackend):
    """A Claude model of the Opus 4.7 generation, which refuses sampling settings and budgeted
    thinking in Anthropic's words (its other answers are the fake's)."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        body = request.json() if request.path == "/v1/messages" else {}
        deprecated = next((name for name in ("temperature", "top_p", "top_k") if name in body), None)
        if deprecated is not None:
            await self.send_error(exchange, 400, f"`{deprecated}` is deprecated for this model.")
        elif body.get("thinking", {}).get("type") == "enabled":
            await self.send_error(exchange, 400, '"thinking.type.enabled" is not supported for this model. Use '
                                  '"thinking.type.adaptive" and "output_config.effort" to control thinking')
        elif body.get("thinking", {}).get("display") != "summarized":
            # Its thinking is omitted from the answer unless asked for.
            self.push(replace(self.default, reasoning=()))
            await super().route(request, exchange, call)
        else:
            await super().route(request, exchange, call)


async def test_other_clients_sampling_and_effort_reach_a_model_that_refuses_them_in_its_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Claude Opus 4.7 refuses `temperature`, `top_p`, `top_k` and `budget_tokens` thinking,
    which OpenAI and Ollama clients send on every request (before: each of their requests was
    that 400). The gateway chose those words for them: the request goes again without the
    sampling setting, with adaptive thinking at the effort asked (summarized: such a model
    omits its thinking otherwise, and the client got none), and the model's refusals are
    remembered, so its next requests go in its words at once. An Anthropic client's own
    settings go as sent, and it gets Anthropic's answer."""
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    fake = Opus47Backend(api_key=ANTHROPIC_KEY)
    fake.set_script(Script(tokens=["Bonjour"], reasoning=["hm"]))
    async with fake.serve() as server, running_gateway(
        backend("claude", server.url, kind="anthropic", default=True, api_key_env="TEST_ANTHROPIC_KEY"),
    ) as url, openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as client:
        asked: Any = {"model": "claude-opus-4-7", "messages": MESSAGES, "temperature": 0.7, "top_p": 0.9,
                      "reasoning_effort": "medium", "max_tokens": 8000}
        answer = await client.chat.completions.create(**asked)
        assert answer.choices[0].message.content == "Bonjour"
        assert (answer.choices[0].message.model_extra or {}).get("reasoning_content") == "hm"  # was none
        sent = fake.requests[-1].json
        assert sent["thinking"] == {"type": "adaptive", "display": "summarized"}
        assert sent["output_config"] == {"effort": "medium"}
        assert not {"temperature", "top_p", "top_k"} & set(sent) and sent["max_tokens"] == 8000
        refused = len(fake.requests) - 1
        stream = await client.chat.completions.create(**asked, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "Bonjour"
        assert len(fake.requests) == refused + 2  # remembered: sent in the model's words at once
        await client.chat.completions.create(model="claude-opus-4-7", messages=MESSAGES, temperature=0.2)
        assert "temperature" not in fake.requests[-1].json
        async with httpx.AsyncClient(base_url=url) as http:
            ollama_chat = await http.post("/api/chat", json={"model": "claude-opus-4-7", "messages": MESSAGES,
                                                             "stream": False, "options": {"top_k": 20}})
            assert ollama_chat.status_code == 200 and "top_k" not in fake.requests[-1].json
            thinking = await http.post("/api/chat", json={"model": "claude-opus-4-7", "messages": MESSAGES,
                                                          "stream": False, "think": True})
            assert thinking.json()["message"].get("thinking") == "hm"  # was none
            own = await http.post("/v1/messages", json={"model": "claude-opus-4-7", "max_tokens": 64,
                                                       "messages": MESSAGES, "temperature": 0.5})
        assert own.status_code == 400 and "`temperature` is deprecated" in own.json()["error"]["message"]


class Sonnet4Backend(AnthropicBackend):
    """A Claude model older than strict tool use, which refuses a strict tool in Anthropic's
    words; `claude-sonnet-4-6` and `claude-haiku-4-5` take one, but compile no more (Anthropic's
    grammar limits), and no type arrays (as if outside strict's subset)."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        body = request.json() if request.path == "/v1/messages" else {}
        strict = sum(1 for tool in body.get("tools", ()) if tool.get("strict"))
        if strict and body["model"] not in ("claude-sonnet-4-6", "claude-haiku-4-5"):
            await self.send_error(exchange, 400, f"'{body['model']}' does not support strict tools.")
        elif strict > 1:
            await self.send_error(exchange, 400, "The compiled grammar is too large, which would cause performance "
                                  "issues. Simplify your tool schemas or reduce the number of strict tools.")
        elif strict and '"type": [' in json.dumps(body["tools"]):
            await self.send_error(exchange, 400, "tools.0.custom.input_schema: type arrays are not supported in strict mode")
        else:
            await super().route(request, exchange, call)


async def test_an_openai_clients_strict_function_is_claudes_strict_tool_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OpenAI client's `strict: true` function was dropped on the way to Claude, so its
    arguments were not held to the schema. It is Anthropic's strict tool use now, its schema
    in the subset Anthropic takes; a model older than strict tools refuses it, and a newer one
    strict tools past what it compiles: the request goes again without it (remembered for that
    model), as for Opus 4.7's sampling settings."""
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    fake, older = AnthropicBackend(api_key=ANTHROPIC_KEY), Sonnet4Backend(api_key=ANTHROPIC_KEY)
    for one in (fake, older):
        one.set_script(Script(tool_calls=[("get_weather", {"city": "Paris"})]))
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
              "required": ["city"], "additionalProperties": False}
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": schema, "strict": True}}]
    async with fake.serve() as server, older.serve() as old_server, running_gateway(
        backend("claude", server.url, kind="anthropic", default=True, api_key_env="TEST_ANTHROPIC_KEY"),
        backend("old", old_server.url, kind="anthropic", models=["claude-sonnet-4-20250514", "claude-sonnet-4-6", "claude-haiku-4-5"],
                api_key_env="TEST_ANTHROPIC_KEY"),
    ) as url, openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as client:
        answer = await client.chat.completions.create(model="claude-sonnet-4-5", messages=MESSAGES, tools=tools)
        assert answer.choices[0].message.tool_calls
        sent = fake.requests[-1].json["tools"][0]
        assert sent["strict"] is True
        assert sent["input_schema"]["properties"]["city"] == {"type": "string", "description": "{maxLength: 40}"}

        for _ in range(2):
            answer = await client.chat.completions.create(model="claude-sonnet-4-20250514", messages=MESSAGES, tools=tools)
            assert answer.choices[0].message.tool_calls and answer.choices[0].message.tool_calls[0].function.name == "get_weather"
            assert "strict" not in older.requests[-1].json["tools"][0]
        assert len(older.requests) == 3  # refused once; the next request went without it at once
        # The OpenAI Agents SDK and Codex make every function strict: past what Claude compiles
        # (a 400 for the whole request, which went through while `strict` was dropped), without.
        many = [tools[0], {"type": "function", "function": {**tools[0]["function"], "name": "get_time"}}]
        answer = await client.chat.completions.create(model="claude-sonnet-4-6", messages=MESSAGES, tools=many)
        assert answer.choices[0].message.tool_calls and not any("strict" in t for t in older.requests[-1].json["tools"])
        # A schema outside strict's subset is taken without it.
        nullable: Any = {**schema, "properties": {"city": {"type": ["string", "null"]}}}  # OpenAI's optional field
        one: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": nullable, "strict": True}}]
        answer = await client.chat.completions.create(model="claude-haiku-4-5", messages=MESSAGES, tools=one)
        assert answer.choices[0].message.tool_calls and "strict" not in older.requests[-1].json["tools"][0]
        # That was the schema's, not the model's: another client's schema that strict takes is
        # held to it still (strict was dropped from every later request to that model).
        asked = len(older.requests)
        answer = await client.chat.completions.create(model="claude-haiku-4-5", messages=MESSAGES, tools=tools)
        assert answer.choices[0].message.tool_calls and older.requests[-1].json["tools"][0]["strict"] is True
        assert len(older.requests) == asked + 1
        async with httpx.AsyncClient(base_url=url) as http:
            own = await http.post("/v1/messages", json={
                "model": "claude-sonnet-4-20250514", "max_tokens": 64, "messages": MESSAGES,
                "tools": [{"name": "get_weather", "input_schema": schema, "strict": True}]})
        assert own.status_code == 400 and "does not support strict tools" in own.json()["error"]["message"]


async def test_openai_client_sees_anthropic_failures(openai_front: tuple[openai.AsyncOpenAI, AnthropicBackend]) -> None:
    client, fake = openai_front
    fake.push(Script(status=529))
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="claude-x", messages=MESSAGES, stream=True)
    assert info.value.status_code == 503
    fake.push(Script(tokens=list("abcdef"), fail_after=4))
    stream = await client.chat.completions.create(model="claude-x", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as failed:
        async for _ in stream:
            pass
    assert "Overloaded" in failed.value.message
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="claude-x", messages=MESSAGES, n=2)


async def test_models_of_an_anthropic_backend_are_listed(openai_front: tuple[openai.AsyncOpenAI, AnthropicBackend]) -> None:
    client, _ = openai_front
    models = [m.id async for m in client.models.list()]
    assert "claude-sonnet-4-5" in models


async def test_text_blocks_reach_an_ollama_backend_one_per_line(setup: Setup) -> None:
    """An Ollama message is one string: Claude Code's system blocks and a user turn's blocks
    keep a line between them instead of running their words together."""
    await setup.client.messages.create(
        model=MODELS["ollama"], max_tokens=30,
        system=[{"type": "text", "text": "You are Claude Code."},
                {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "<task>fix</task>"},
                                                {"type": "text", "text": "# Files"}]}],
    )
    sent = setup.fake("ollama").requests[-1].json
    assert [m["content"] for m in sent["messages"]] == ["You are Claude Code.\nBe brief.", "<task>fix</task>\n# Files"]


async def test_how_hard_to_think_reaches_every_backend_in_its_own_words(setup: Setup) -> None:
    """OpenAI's `reasoning_effort`, Anthropic's `thinking` budget and Ollama's `think` level
    are one setting: each backend gets it as it says it (LiteLLM's budgets for Anthropic)."""

    def sent(kind: str) -> dict[str, Any]:
        body: dict[str, Any] = setup.fake(kind).requests[-1].json
        return body

    async with httpx.AsyncClient(base_url=setup.url, timeout=10) as client:
        thinking = {"type": "enabled", "budget_tokens": 4096}
        for kind in ("ollama", "openai"):
            reply = await client.post("/v1/messages", json={"model": MODELS[kind], "max_tokens": 8000, "messages": MESSAGES,
                                                            "thinking": thinking})
            assert reply.status_code == 200, reply.text
        assert sent("ollama")["think"] == "high" and sent("openai")["reasoning_effort"] == "high"
        assert "thinking" not in sent("ollama") and "thinking" not in sent("openai")

        for kind in ("ollama", "anthropic"):
            reply = await client.post("/v1/chat/completions", json={"model": MODELS[kind], "messages": MESSAGES,
                                                                    "reasoning_effort": "high", "max_tokens": 8000})
            assert reply.status_code == 200, reply.text
        assert sent("ollama")["think"] == "high" and "reasoning_effort" not in sent("ollama")
        assert sent("anthropic")["thinking"] == {"type": "enabled", "budget_tokens": 4096}
        none = await client.post("/v1/chat/completions", json={"model": MODELS["ollama"], "messages": MESSAGES,
                                                               "reasoning_effort": "none"})
        assert none.status_code == 200 and sent("ollama")["think"] is False
        short = await client.post("/v1/chat/completions", json={"model": MODELS["anthropic"], "messages": MESSAGES,
                                                                "reasoning_effort": "low", "max_tokens": 500})
        assert short.status_code == 400 and short.json()["error"]["param"] == "reasoning_effort"

        reply = await client.post("/api/chat", json={"model": MODELS["anthropic"], "messages": MESSAGES, "think": "low",
                                                     "stream": False, "options": {"num_predict": 3000}})
        assert reply.status_code == 200, reply.text
        assert sent("anthropic")["thinking"] == {"type": "enabled", "budget_tokens": 1024}


@pytest.mark.parametrize(("effort", "said"), [("low", "low"), ("medium", "medium"), ("high", "high"),
                                             ("xhigh", "high"), ("max", "high"), (None, "medium")])
async def test_claude_codes_effort_setting_reaches_other_backends(setup: Setup, effort: str | None, said: str) -> None:
    """Claude Code asks newer models to think as `thinking: {"type": "adaptive"}` with its
    effort setting in `output_config.effort`: that setting is the depth another backend is
    asked for (before, every adaptive request was "medium", whatever the user chose)."""
    config = {} if effort is None else {"output_config": {"effort": effort}}
    for kind in ("openai", "ollama"):
        await setup.client.messages.create(model=MODELS[kind], max_tokens=4000, messages=MESSAGES,
                                           thinking={"type": "adaptive"}, **config)
    assert setup.fake("openai").requests[-1].json["reasoning_effort"] == said
    assert setup.fake("ollama").requests[-1].json["think"] == said
    assert "output_config" not in setup.fake("openai").requests[-1].json
    # The effort alone, without `thinking`, is the same setting (before: no effort at all).
    for kind in ("openai", "ollama"):
        await setup.client.messages.create(model=MODELS[kind], max_tokens=4000, messages=MESSAGES, **config)
    alone = {"openai": setup.fake("openai").requests[-1].json.get("reasoning_effort"),
             "ollama": setup.fake("ollama").requests[-1].json.get("think")}
    assert alone == ({"openai": None, "ollama": None} if effort is None else {"openai": said, "ollama": said})


async def test_an_effort_a_backend_cannot_say_is_a_400_naming_the_field(setup: Setup) -> None:
    # Before, an Anthropic or Ollama backend got the request without any thinking setting.
    client = openai.AsyncOpenAI(base_url=f"{setup.url}/v1", api_key="x", max_retries=0)
    for kind in ("anthropic", "ollama"):
        before = len(setup.fake(kind).requests)
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(
                    model=MODELS[kind], messages=MESSAGES, reasoning_effort="extreme", stream=stream,  # type: ignore[arg-type]
                )
            body: Any = refused.value.body
            assert (body["param"], body["code"]) == ("reasoning_effort", "invalid_value")
            assert "'extreme'" in body["message"] and "'xhigh'" in body["message"]
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(model=MODELS[kind], input="hi", reasoning={"effort": "extreme"})  # type: ignore[typeddict-item]
        body = refused.value.body
        assert body["param"] == "reasoning.effort"
        assert len(setup.fake(kind).requests) == before
    # Every value OpenAI takes reaches them; an OpenAI-compatible backend judges any value itself.
    for effort in ("none", "minimal", "low", "medium", "high", "xhigh"):
        for kind in ("anthropic", "ollama"):
            await client.chat.completions.create(
                model=MODELS[kind], messages=MESSAGES, reasoning_effort=effort, max_tokens=3000,  # type: ignore[arg-type]
            )
    await client.chat.completions.create(model=MODELS["openai"], messages=MESSAGES, reasoning_effort="extreme")  # type: ignore[arg-type]
    assert setup.fake("openai").requests[-1].json["reasoning_effort"] == "extreme"
    await client.close()


async def test_a_json_schema_response_format_is_anthropics_structured_output(setup: Setup) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    client = openai.AsyncOpenAI(base_url=f"{setup.url}/v1", api_key="x", max_retries=0)
    await client.chat.completions.create(
        model=MODELS["anthropic"], messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}},
    )
    await client.close()
    assert setup.fake("anthropic").requests[-1].json["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


_UNSUPPORTED = ("minimum", "maximum", "minLength", "maxLength", "pattern", "oneOf", "maxItems")


def _structured_output_refusal(schema: Any, at: str = "schema") -> str | None:
    """What Anthropic's structured output says of a schema it refuses (None: it takes it)."""
    if not isinstance(schema, dict):
        return None
    if (schema.get("type") == "object" or "properties" in schema) and schema.get("additionalProperties") is not False:
        return f"output_config.format.{at}: For 'object' type, 'additionalProperties' must be explicitly set to false"
    if found := next((key for key in _UNSUPPORTED if key in schema), None):
        return f"output_config.format.{at}: property '{found}' is not supported"
    inner = [*schema.get("properties", {}).values(), *schema.get("$defs", {}).values(), *schema.get("anyOf", []),
             *([schema["items"]] if isinstance(schema.get("items"), dict) else [])]
    return next((refusal for item in inner if (refusal := _structured_output_refusal(item, at + ".*"))), None)


class StructuredOutputAnthropicBackend(AnthropicBackend):
    """Refuses a structured output schema as Anthropic does (its other answers are the fake's)."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        body = request.json() if request.path == "/v1/messages" else {}
        schema = body.get("output_config", {}).get("format", {}).get("schema")
        if (refusal := _structured_output_refusal(schema)) is not None:
            await self.send_error(exchange, 400, refusal)
        else:
            await super().route(request, exchange, call)


async def test_other_clients_json_schemas_reach_anthropic_as_its_structured_output_takes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A JSON schema as OpenAI and Ollama clients send one (pydantic's: objects left open, `$defs`,
    `oneOf`, numeric and length limits) was a 400 from Anthropic, which wants every object closed
    and refuses those limits. It reaches Anthropic as its SDK would send it: closed, `anyOf`, the
    limits said in the description, where the model still reads them."""
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    fake = StructuredOutputAnthropicBackend(api_key=ANTHROPIC_KEY)
    fake.set_script(Script(tokens=['{"name": "Ada", "age": 36}']))
    schema: Any = {
        "$defs": {"Pet": {"type": "object", "properties": {"kind": {"oneOf": [{"const": "cat"}, {"const": "dog"}]}}}},
        "type": "object", "title": "Person",
        "properties": {
            "name": {"type": "string", "minLength": 1, "description": "Full name"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}, "maxItems": 3},
        },
        "required": ["name", "age"],
    }
    async with fake.serve() as server, running_gateway(
        backend("claude", server.url, kind="anthropic", default=True, api_key_env="TEST_ANTHROPIC_KEY"),
    ) as url, openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0) as client:
        answer = await client.chat.completions.create(
            model="claude-x", messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        )
        assert json.loads(answer.choices[0].message.content or "") == {"name": "Ada", "age": 36}
        sent = fake.requests[-1].json["output_config"]["format"]["schema"]
        assert sent["additionalProperties"] is False and sent["required"] == ["name", "age"]
        assert sent["properties"]["name"] == {"type": "string", "description": "Full name\n\n{minLength: 1}"}
        assert sent["properties"]["age"] == {"type": "integer", "description": "{minimum: 0, maximum: 150}"}
        assert sent["$defs"]["Pet"]["properties"]["kind"] == {"anyOf": [{"const": "cat"}, {"const": "dog"}]}
        async with httpx.AsyncClient(base_url=url) as http:
            reply = await http.post("/api/chat", json={"model": "claude-x", "messages": MESSAGES, "stream": False,
                                                       "format": schema})
        assert reply.status_code == 200, reply.text
    assert schema["properties"]["age"] == {"type": "integer", "minimum": 0, "maximum": 150}  # the client's, as sent


class Capital(pydantic.BaseModel):
    city: str


@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_an_anthropic_clients_structured_output_reaches_local_backends_as_their_schema(setup: Setup, kind: str) -> None:
    fake = setup.fake(kind)
    fake.set_script(Script(tokens=['{"city": "Paris"}']))
    parsed = await setup.client.messages.parse(
        model=MODELS[kind], max_tokens=100, messages=[{"role": "user", "content": "Capital of France?"}], output_format=Capital,
    )
    assert parsed.parsed_output == Capital(city="Paris")
    schema = Capital.model_json_schema() | {"additionalProperties": False}
    sent = fake.requests[-1].json
    if kind == "openai":
        assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}
    else:
        assert sent["format"] == schema
    # The beta's spelling, from clients that still send it.
    beta = {"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}
    await setup.client.messages.create(model=MODELS[kind], max_tokens=100, messages=MESSAGES, extra_body={"output_format": beta})
    sent = fake.requests[-1].json
    assert (sent["response_format"]["json_schema"]["schema"] if kind == "openai" else sent["format"]) == beta["schema"]


@pytest.mark.parametrize("kind", ["openai", "ollama"])
@pytest.mark.parametrize(("field", "value"), [("mcp_servers", [{"type": "url", "url": "https://mcp.example", "name": "x"}]),
                                              ("container", "container_011")])
async def test_what_anthropics_servers_run_is_a_400_for_local_backends(setup: Setup, kind: str, field: str, value: Any) -> None:
    fake = setup.fake(kind)
    before = len(fake.requests)
    with pytest.raises(anthropic.BadRequestError) as info:
        await setup.client.messages.create(model=MODELS[kind], max_tokens=30, messages=MESSAGES, extra_body={field: value})
    assert info.value.type == "invalid_request_error" and f"`{field}`" in str(info.value.api_message)
    assert len(fake.requests) == before


async def test_the_stop_string_vllm_names_reaches_an_anthropic_client(setup: Setup) -> None:
    setup.fake("openai").set_script(Script(tokens=["x"], stop_sequence="###"))
    request: Any = {"model": MODELS["openai"], "max_tokens": 64, "messages": MESSAGES, "stop_sequences": ["###"]}
    message = await setup.client.messages.create(**request)
    async with setup.client.messages.stream(**request) as stream:
        streamed = await stream.get_final_message()
    for reply in (message, streamed):
        assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", "###")


async def test_pings_while_a_server_tool_runs_keep_the_stream_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a server tool runs, Anthropic sends only `ping`s: the backend is not silent, so
    the stream is not cut by the idle timeout (0.3 s here, pinged for 1.2 s), and its client
    hears a keep-alive now and then (every 0.4 s here), in its dialect."""
    monkeypatch.setattr("proxy.infra.backends._pump.KEEPALIVE_SECONDS", 0.4)

    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    def text(piece: str) -> bytes:
        return event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": piece}})

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        usage = {"input_tokens": 3, "output_tokens": 1}
        await stream.send_all(event("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage}}))
        await stream.send_all(event("content_block_start", {"type": "content_block_start", "index": 0,
                                                            "content_block": {"type": "text", "text": ""}}) + text("a"))
        for _ in range(12):
            await trio.sleep(0.1)
            await stream.send_all(event("ping", {"type": "ping"}))
        await stream.send_all(text("b") + event("content_block_stop", {"type": "content_block_stop", "index": 0})
                              + event("message_delta", {"type": "message_delta", "usage": {"output_tokens": 2},
                                                        "delta": {"stop_reason": "end_turn", "stop_sequence": None}})
                              + event("message_stop", {"type": "message_stop"}))
        await stream.aclose()

    async with raw_server(handler) as (url, _), running_gateway(
        backend("c", url, kind="anthropic", default=True, timeouts=QUICK)
    ) as gateway:
        client = anthropic.AsyncAnthropic(base_url=gateway, api_key="k", max_retries=0)
        async with client.messages.stream(model="claude-x", max_tokens=50, messages=MESSAGES) as stream:
            final = await stream.get_final_message()
        await client.close()
        async with httpx.AsyncClient(base_url=gateway, timeout=10) as http:
            body = {"model": "claude-x", "max_tokens": 50, "messages": MESSAGES, "stream": True}
            anthropic_wire = (await http.post("/v1/messages", json=body)).text
            openai_wire = (await http.post("/v1/chat/completions", json={**body, "max_tokens": 50})).text
    assert [block.text for block in final.content if block.type == "text"] == ["ab"]
    between = anthropic_wire.split('"text":"a"', 1)[1].split('"text":"b"', 1)[0]
    assert between.count("event: ping") >= 2
    assert openai_wire.count(": keep-alive\n\n") >= 2 and openai_wire.endswith("data: [DONE]\n\n")


async def test_half_a_frame_right_after_an_event_sends_no_keep_alive() -> None:
    """A read that makes no event (here: half a frame, the rest 0.2 s later) is no reason for
    a keep-alive when the client has just heard an event: only silence is."""

    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    def text(piece: str) -> bytes:
        return event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": piece}})

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        await stream.send_all(event("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}}))
        await stream.send_all(event("content_block_start", {"type": "content_block_start", "index": 0,
                                                            "content_block": {"type": "text", "text": ""}}) + text("a"))
        await trio.sleep(0.2)
        second = text("b")
        await stream.send_all(second[:20])
        await trio.sleep(0.2)
        await stream.send_all(second[20:] + event("content_block_stop", {"type": "content_block_stop", "index": 0})
                              + event("message_delta", {"type": "message_delta", "usage": {"output_tokens": 2},
                                                        "delta": {"stop_reason": "end_turn", "stop_sequence": None}})
                              + event("message_stop", {"type": "message_stop"}))
        await stream.aclose()

    async with raw_server(handler) as (url, _), running_gateway(
        backend("c", url, kind="anthropic", default=True, timeouts=QUICK)
    ) as gateway, httpx.AsyncClient(base_url=gateway, timeout=10) as http:
        body = {"model": "claude-x", "max_tokens": 50, "messages": MESSAGES, "stream": True}
        wire = (await http.post("/v1/messages", json=body)).text
    assert_valid_anthropic_stream(wire.encode())
    assert wire.count("event: ping") == 1  # the one after message_start, as Anthropic sends it


async def test_thinking_the_gateway_switches_on_keeps_to_anthropics_rules(setup: Setup) -> None:
    """Thinking asked in another dialect's words: the sampling settings Anthropic refuses next
    to it are left out; with a forced tool, or inside a tool loop (whose last assistant turn
    would need its signed thinking block, which such a client never has), none is asked."""

    async def sent(body: dict[str, Any]) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=setup.url, timeout=10) as client:
            reply = await client.post("/v1/chat/completions", json={"model": MODELS["anthropic"], "max_tokens": 8000,
                                                                    "reasoning_effort": "medium", **body})
        assert reply.status_code == 200, reply.text
        request: dict[str, Any] = setup.fake("anthropic").requests[-1].json
        return request

    sampled = await sent({"messages": MESSAGES, "temperature": 0.7, "top_p": 0.9, "top_k": 40})
    assert sampled["thinking"]["budget_tokens"] == 2048
    assert not {"temperature", "top_p", "top_k"} & set(sampled)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    forced = await sent({"messages": MESSAGES, "tools": [tool], "tool_choice": "required", "temperature": 0.7})
    assert "thinking" not in forced and forced["tool_choice"]["type"] == "any" and forced["temperature"] == 0.7
    loop = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert "thinking" not in await sent({"messages": loop, "tools": [tool]})


async def test_an_anthropic_clients_assistant_turns_reach_an_anthropic_backend_in_their_order(setup: Setup) -> None:
    """Interleaved thinking and server tools: Anthropic wants the blocks back as they were;
    unsigned thinking (another backend's, rendered for the client) is still left out."""
    turn = [
        {"type": "thinking", "thinking": "first", "signature": "SIG-A"},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "x"}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
        {"type": "thinking", "thinking": "second", "signature": "SIG-B"},
        {"type": "text", "text": "Found it."},
        {"type": "tool_use", "id": "functions.lookup:0", "name": "lookup", "input": {"q": "y"}},
        {"type": "text", "text": "And more."},
        {"type": "thinking", "thinking": "unsigned", "signature": ""},
    ]
    messages = [{"role": "user", "content": "Search"}, {"role": "assistant", "content": turn},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "functions.lookup:0", "content": "ok"}]}]
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}]
    await setup.client.messages.create(model=MODELS["anthropic"], max_tokens=30, messages=messages, tools=tools)  # type: ignore[arg-type]
    sent = setup.fake("anthropic").requests[-1].json["messages"]
    fitted = {**turn[5], "id": "functions_lookup_0"}
    assert sent[1]["content"] == [*turn[:5], fitted, turn[6]]
    assert sent[2]["content"][0]["tool_use_id"] == "functions_lookup_0"


async def test_an_anthropic_clients_tools_reach_an_anthropic_backend_as_sent(setup: Setup) -> None:
    """In their order, server tools among them, with every field (`strict`, `input_examples`,
    `defer_loading`, cache breakpoints, …), on messages and on count_tokens."""
    tools: Any = [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
        {"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
         "strict": True, "input_examples": [{"q": "x"}], "defer_loading": True},
        {"name": "weather", "description": "Weather", "input_schema": {"type": "object"},
         "cache_control": {"type": "ephemeral"}},
    ]
    await setup.client.messages.create(model=MODELS["anthropic"], max_tokens=30, messages=MESSAGES, tools=tools)
    assert setup.fake("anthropic").requests[-1].json["tools"] == tools
    await setup.client.messages.count_tokens(model=MODELS["anthropic"], messages=MESSAGES, tools=tools)
    assert setup.fake("anthropic").requests[-1].json["tools"] == tools
    # Another backend gets the custom tools' core; a server tool is a 400 there, not dropped.
    with pytest.raises(anthropic.BadRequestError):
        await setup.client.messages.create(model=MODELS["openai"], max_tokens=30, messages=MESSAGES, tools=tools)
    await setup.client.messages.create(model=MODELS["openai"], max_tokens=30, messages=MESSAGES, tools=tools[1:])
    sent = setup.fake("openai").requests[-1].json["tools"]
    assert [tool["function"]["name"] for tool in sent] == ["lookup", "weather"]


async def test_a_messages_own_fields_reach_an_anthropic_client(setup: Setup) -> None:
    """A code execution's `container` (the client reuses it by id) and `context_management`'s
    applied edits, non-streamed and streamed, where Anthropic puts them."""
    container = {"id": "container_1", "expires_at": "2026-11-26T21:00:00Z"}
    edits = {"applied_edits": [{"type": "clear_tool_uses_20250919", "cleared_tool_uses": 2}]}

    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    async def handler(stream: trio.SocketStream, n: int) -> None:
        request = json.loads((await read_request(stream, bytearray())).split(b"\r\n\r\n", 1)[1])
        usage = {"input_tokens": 3, "output_tokens": 1}
        if request.get("stream"):
            body = (event("message_start", {"type": "message_start", "message": {
                        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
                        "stop_reason": None, "stop_sequence": None, "usage": usage}})
                    + event("content_block_start", {"type": "content_block_start", "index": 0,
                                                    "content_block": {"type": "text", "text": ""}})
                    + event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": "ok"}})
                    + event("content_block_stop", {"type": "content_block_stop", "index": 0})
                    + event("message_delta", {"type": "message_delta", "usage": {"output_tokens": 2},
                                              "delta": {"stop_reason": "end_turn", "stop_sequence": None,
                                                        "container": container},
                                              "context_management": edits})
                    + event("message_stop", {"type": "message_stop"}))
            head = b"content-type: text/event-stream"
        else:
            body = json.dumps({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                               "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
                               "stop_sequence": None, "usage": usage, "container": container,
                               "context_management": edits}).encode()
            head = b"content-type: application/json"
        await stream.send_all(b"HTTP/1.1 200 OK\r\n" + head + b"\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
                              % len(body) + body)
        await stream.aclose()

    async with raw_server(handler) as (url, _), running_gateway(backend("c", url, kind="anthropic", default=True)) as gateway, \
            httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        body = {"model": "claude-x", "max_tokens": 30, "messages": MESSAGES}
        whole = (await client.post("/v1/messages", json=body)).json()
        assert whole["container"] == container and whole["context_management"] == edits
        streamed = await client.post("/v1/messages", json={**body, "stream": True})
        [delta] = [frame for name, frame in sse_frames(streamed.content) if name == "message_delta"]
        assert delta["delta"]["container"] == container and delta["context_management"] == edits
        # Another dialect's client has no such fields.
        other = (await client.post("/v1/chat/completions", json={"model": "claude-x", "messages": MESSAGES})).json()
        assert "container" not in json.dumps(other)


async def test_a_refusals_stop_details_and_the_diagnostics_reach_a_streaming_sdk_client() -> None:
    """A streamed refusal's `stop_details` (its category, in `message_delta.delta`) and the
    message's `diagnostics` (in `message_start`) reach the SDK's accumulated message as from
    Anthropic itself. Before, both rode on the `message_delta` event, where the SDK never
    reads them: `get_final_message()` had neither."""
    details = {"type": "refusal", "category": "cyber", "explanation": "Could enable malware."}
    diagnostics = {"cache_miss_reason": None}

    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream, bytearray())
        body = (event("message_start", {"type": "message_start", "message": {
                    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
                    "stop_reason": None, "stop_sequence": None, "diagnostics": diagnostics,
                    "usage": {"input_tokens": 3, "output_tokens": 1}}})
                + event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}})
                + event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": "I can't help"}})
                + event("content_block_stop", {"type": "content_block_stop", "index": 0})
                + event("message_delta", {"type": "message_delta", "usage": {"output_tokens": 4},
                                          "delta": {"stop_reason": "refusal", "stop_sequence": None,
                                                    "stop_details": details}})
                + event("message_stop", {"type": "message_stop"}))
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
                              b"content-length: %d\r\n\r\n" % len(body) + body)
        await stream.aclose()

    async with raw_server(handler) as (url, _), running_gateway(backend("c", url, kind="anthropic", default=True)) as gateway, \
            anthropic.AsyncAnthropic(base_url=gateway, api_key="k", max_retries=0) as client:
        async with client.messages.stream(model="claude-x", max_tokens=30, messages=MESSAGES) as stream:
            final = await stream.get_final_message()
        assert final.stop_reason == "refusal" and final.content[0].type == "text"
        assert final.stop_details is not None and final.stop_details.to_dict() == details
        assert final.diagnostics is not None and final.diagnostics.to_dict() == diagnostics


async def test_json_mode_without_a_schema_is_a_forced_tool_whose_input_is_the_answer(setup: Setup) -> None:
    """Anthropic has no schemaless JSON mode: OpenAI's `json_object` and Ollama's
    `format: "json"` ask for the answer as the input of one forced tool, read back as text."""
    setup.fake("anthropic").set_script(Script(tokens=[], tool_calls=[("json_answer", {"city": "Paris", "sunny": True})],
                                              tool_arg_fragment=4))
    client = openai.AsyncOpenAI(base_url=f"{setup.url}/v1", api_key="x", max_retries=0)
    whole = await client.chat.completions.create(
        model=MODELS["anthropic"], messages=MESSAGES, response_format={"type": "json_object"}, temperature=0.2,
    )
    sent = setup.fake("anthropic").requests[-1].json
    assert sent["tool_choice"] == {"type": "tool", "name": "json_answer"} and len(sent["tools"]) == 1
    assert json.loads(whole.choices[0].message.content or "") == {"city": "Paris", "sunny": True}
    assert whole.choices[0].finish_reason == "stop" and not whole.choices[0].message.tool_calls
    chunks = [c async for c in await client.chat.completions.create(
        model=MODELS["anthropic"], messages=MESSAGES, response_format={"type": "json_object"}, stream=True)]
    assert json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)) == {"city": "Paris", "sunny": True}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    await client.close()
    async with httpx.AsyncClient(base_url=setup.url, timeout=10) as http:
        reply = await http.post("/api/chat", json={"model": MODELS["anthropic"], "messages": MESSAGES, "format": "json",
                                                  "stream": False})
    assert json.loads(reply.json()["message"]["content"]) == {"city": "Paris", "sunny": True}


async def test_a_chat_of_instructions_alone_reaches_claude_as_its_one_turn(setup: Setup) -> None:
    """OpenAI and Ollama answer a chat holding only a system message; Anthropic refuses a
    request without messages, so the instructions go as the one user turn."""
    async with openai.AsyncOpenAI(base_url=f"{setup.url}/v1", api_key="k", max_retries=0) as client:
        reply = await client.chat.completions.create(
            model=MODELS["anthropic"], messages=[{"role": "system", "content": "Write a haiku about rain."}],
        )
    assert reply.choices[0].message.content
    sent = setup.fake("anthropic").requests[-1].json
    assert "system" not in sent and sent["messages"] == [{"role": "user", "content": "Write a haiku about rain."}]
    async with ollama.AsyncClient(host=setup.url) as local:
        answer = await local.chat(model=MODELS["anthropic"], messages=[{"role": "system", "content": "Say hi."}])
    assert answer.message.content
    assert setup.fake("anthropic").requests[-1].json["messages"] == [{"role": "user", "content": "Say hi."}]


# -- request ids in error bodies ---------------------------------------------------------------------------


def assert_names_its_request(response: httpx.Response) -> None:
    """Anthropic's error shape: the id the head carries (`request-id`) is in the body too."""
    body = response.json()
    assert body["type"] == "error" and body["request_id"] == response.headers["request-id"], (response.status_code, body)


async def test_every_anthropic_error_body_names_its_request_like_the_header(setup: Setup) -> None:
    """A client that logs an error's body alone (Claude Code's transcripts, a proxy's log) can
    still give the operator the request's id, as it can with Anthropic's own errors."""
    version = {"anthropic-version": "2023-06-01"}
    data = {"model": MODELS["anthropic"], "max_tokens": 30, "messages": MESSAGES}
    async with httpx.AsyncClient(base_url=setup.url, headers=version) as http:
        malformed = await http.post("/v1/messages", content=b"{", headers={"content-type": "application/json"})
        unknown = await http.post("/v1/messages/drafts", json={})  # Quart's 404
        wrong_method = await http.get("/v1/messages")  # the front door's 405
        no_model = await http.get("/v1/models/claude-missing")  # a shared path, an Anthropic client
        setup.fake("anthropic").push(Script(status=429, retry_after=3))
        limited = await http.post("/v1/messages", json=data)  # the exchange failing before its first byte
        chosen = await http.post("/v1/messages", content=b"{", headers={"x-request-id": "req_mine"})
    for response in (malformed, unknown, wrong_method, no_model, limited):
        assert response.status_code >= 400
        assert_names_its_request(response)
    assert chosen.json()["request_id"] == "req_mine"
    # In the stream: the `error` event names it too, and the SDK's error carries it.
    setup.fake("anthropic").set_script(Script(tokens=list("abcdefgh"), fail_after=4, error_message="engine died"))
    streamed = await raw_stream(setup, model=MODELS["anthropic"])
    name, payload = sse_frames(streamed.content)[-1]
    assert name == "error" and payload["request_id"] == streamed.headers["request-id"]
    setup.fake("anthropic").set_script(Script())
    with pytest.raises(anthropic.BadRequestError) as info:
        await setup.client.messages.create(model="m", max_tokens=5, messages=MESSAGES, extra_body={"temperature": 1.5})
    assert isinstance(info.value.body, dict) and info.value.body["request_id"] == info.value.request_id


async def test_refusals_before_any_route_name_their_request_in_anthropic_bodies() -> None:
    """The guard's 401 and a refused page's 403 are Anthropic-shaped with the id, head and body."""
    async with running_gateway(backend("c", "http://127.0.0.1:9", kind="anthropic", default=True), auth="required") as url:
        async with httpx.AsyncClient(base_url=url) as http:
            unauthorised = await http.post("/v1/messages", json={})
            foreign = await http.post(
                "/v1/messages", content=b"{}", headers={"origin": "https://evil.example", "content-type": "text/plain"},
            )
            models = await http.get("/v1/models", headers={"anthropic-version": "2023-06-01"})
    assert unauthorised.status_code == 401 and foreign.status_code == 403 and models.status_code == 401
    for response in (unauthorised, foreign, models):
        assert_names_its_request(response)
        assert response.headers["x-request-id"] == response.headers["request-id"]
