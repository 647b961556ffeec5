"""The official `ollama` SDK (its AsyncClient, under trio) against the gateway's Ollama surface,
in front of fake OpenAI, Ollama and Anthropic backends."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
import trio

from proxy.config import Timeouts
from proxy.dialects.anthropic import parse_messages_request
from proxy.dialects.ollama import OLLAMA_VERSION
from proxy.infra.backends import BackendCall
from proxy.infra.backends._ollama import OllamaBackend as OllamaClient
from tests.fakes import (
    AnthropicBackend,
    FakeBackend,
    OllamaBackend,
    OpenAIBackend,
    Script,
    ToolCall,
    Usage,
)
from tests.fakes.base import Call
from tests.fakes.server import Exchange, Request
from tests.harness import backend, hang_up_once_received, refusing_port, running_gateway

MODELS = {"openai": "qwen3-8b", "ollama": "llama3.2", "anthropic": "claude-test"}
KINDS = ["openai", "ollama", "anthropic"]
MESSAGES = [{"role": "user", "content": "Say hello"}]
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAghs7GQAAAABJRU5ErkJggg=="
)
TOOLS = [
    {"type": "function", "function": {"name": name, "description": "d",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    for name in ("get_weather", "get_time")
]


@dataclass
class Setup:
    url: str
    client: ollama.AsyncClient
    fakes: dict[str, FakeBackend]

    def fake(self, kind: str) -> FakeBackend:
        return self.fakes[kind]

    def sent(self, kind: str) -> dict[str, Any]:
        """The JSON body the backend of `kind` last received."""
        body = self.fakes[kind].requests[-1].json
        assert isinstance(body, dict)
        return body


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    fakes: dict[str, FakeBackend] = {"openai": OpenAIBackend(), "ollama": OllamaBackend(), "anthropic": AnthropicBackend()}
    async with fakes["openai"].serve() as oa, fakes["ollama"].serve() as ol, fakes["anthropic"].serve() as an:
        async with running_gateway(
            backend("oa", oa.url, default=True),
            backend("ol", ol.url, kind="ollama", prefixes=("llama",)),
            backend("an", an.url, kind="anthropic", prefixes=("claude",)),
            aliases={"my-alias": "llama3.2:latest"},
        ) as url:
            async with ollama.AsyncClient(host=url) as client:
                yield Setup(url, client, fakes)


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [part async for part in stream]


# -- chat -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_streaming_chat(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=["Hel", "lo", " world"], usage=Usage(11, 3)))
    model = MODELS[kind]
    parts = await collect(await setup.client.chat(model=model, messages=MESSAGES, stream=True))
    assert "".join(p.message.content for p in parts) == "Hello world"
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert all(p.model == model and p.message.role == "assistant" for p in parts)
    final = parts[-1]
    assert final.done_reason == "stop"
    assert (final.prompt_eval_count, final.eval_count) == (11, 3)
    assert final.total_duration > 0 and final.eval_duration > 0
    assert final.total_duration >= final.prompt_eval_duration
    # An Ollama backend's own figures are relayed (its model load too); elsewhere nothing loads.
    assert final.load_duration == (2_151_625 if kind == "ollama" else None)


@pytest.mark.parametrize("kind", KINDS)
async def test_non_streaming_chat_with_thinking(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=["Hi", " there"], reasoning=["Let me ", "think."], usage=Usage(7, 4)))
    reply = await setup.client.chat(model=MODELS[kind], messages=MESSAGES, think=True)
    assert reply.message.content == "Hi there"
    assert reply.message.thinking == "Let me think."
    assert reply.done is True and reply.done_reason == "stop"
    assert (reply.prompt_eval_count, reply.eval_count) == (7, 4)
    assert reply.load_duration == (2_151_625 if kind == "ollama" else None)  # the Ollama backend's own figure
    assert setup.sent(kind)["stream"] is False
    if kind == "ollama":
        assert setup.sent(kind)["think"] is True
    else:
        assert "think" not in setup.sent(kind)  # Ollama-only fields stay with Ollama backends


@pytest.mark.parametrize("think", [True, "low", "high"])
async def test_think_switches_thinking_on_for_claude(setup: Setup, think: bool | str) -> None:
    # `ollama run claude-… --think`: Claude thinks only when asked to (a budget), so `true`
    # must ask too, not only the levels.
    setup.fake("anthropic").set_script(Script(tokens=["Hi"], reasoning=["hmm"]))
    reply = await setup.client.chat(model=MODELS["anthropic"], messages=MESSAGES, think=think)  # type: ignore[arg-type]
    assert reply.message.thinking == "hmm"
    thinking = setup.sent("anthropic")["thinking"]
    assert thinking["type"] == "enabled" and thinking["budget_tokens"] >= 1024
    await setup.client.chat(model=MODELS["anthropic"], messages=MESSAGES, think=False)
    assert "thinking" not in setup.sent("anthropic")


async def test_think_with_too_small_a_limit_for_claude_names_think(setup: Setup) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        await setup.client.chat(model=MODELS["anthropic"], messages=MESSAGES, think=True, options={"num_predict": 500})
    assert info.value.status_code == 400
    assert "`think` True needs a token limit above 1024" in info.value.error


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [True, False])
async def test_think_false_leaves_thinking_out(setup: Setup, kind: str, stream: bool) -> None:
    # The backend reasons anyway (an OpenAI backend's model is not told not to think).
    setup.fake(kind).set_script(Script(tokens=["Hi"], reasoning=["secret ", "chain"]))
    model = MODELS[kind]
    if stream:
        parts = await collect(await setup.client.chat(model=model, messages=MESSAGES, think=False, stream=True))
        assert "".join(p.message.content for p in parts) == "Hi"
        assert all(not p.message.thinking for p in parts)
        generated = await collect(await setup.client.generate(model=model, prompt="p", think=False, stream=True))
        assert "".join(p.response for p in generated) == "Hi" and all(not p.thinking for p in generated)
    else:
        reply = await setup.client.chat(model=model, messages=MESSAGES, think=False)
        assert (reply.message.content, reply.message.thinking) == ("Hi", None)
        answer = await setup.client.generate(model=model, prompt="p", think=False)
        assert (answer.response, answer.thinking) == ("Hi", None)


@pytest.mark.parametrize("level", ["low", "medium", "high"])
async def test_think_levels_reach_openai_backends_as_reasoning_effort(setup: Setup, level: str) -> None:
    setup.fake("openai").set_script(Script(tokens=["Hi"], reasoning=["hmm"]))
    reply = await setup.client.chat(model=MODELS["openai"], messages=MESSAGES, think=level)  # type: ignore[arg-type]
    assert reply.message.thinking == "hmm"
    assert setup.sent("openai")["reasoning_effort"] == level
    await setup.client.chat(model=MODELS["openai"], messages=MESSAGES, think=True)
    assert "reasoning_effort" not in setup.sent("openai")
    await setup.client.chat(model=MODELS["ollama"], messages=MESSAGES, think=level)  # type: ignore[arg-type]
    assert setup.sent("ollama")["think"] == level and "reasoning_effort" not in setup.sent("ollama")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [True, False])
async def test_parallel_tool_calls_arrive_whole_with_object_arguments(setup: Setup, kind: str, stream: bool) -> None:
    calls = [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_time", '{"city": "Rome", "utc": true}')]
    setup.fake(kind).set_script(Script(tokens=["Checking."], tool_calls=calls, tool_arg_fragment=3, interleave_tool_calls=True))
    if stream:
        parts = await collect(await setup.client.chat(model=MODELS[kind], messages=MESSAGES, tools=TOOLS, stream=True))
        with_calls = [p for p in parts if p.message.tool_calls]
        assert len(with_calls) == 1 and not with_calls[0].done
        got = with_calls[0].message.tool_calls
        final = parts[-1]
        assert "".join(p.message.content for p in parts) == "Checking."
    else:
        final = await setup.client.chat(model=MODELS[kind], messages=MESSAGES, tools=TOOLS)
        got = final.message.tool_calls
        assert final.message.content == "Checking."
    assert [(c.function.name, dict(c.function.arguments)) for c in got] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"city": "Rome", "utc": True}),
    ]
    assert final.done_reason == "stop"  # Ollama's way of ending a turn that called tools
    tools_sent = setup.sent(kind)["tools"]
    assert [t.get("name") or t["function"]["name"] for t in tools_sent] == ["get_weather", "get_time"]


# (An Anthropic reply not streamed carries `input` as an object: it cannot be cut inside one.)
@pytest.mark.parametrize(("kind", "stream"), [("openai", True), ("openai", False), ("anthropic", True)])
async def test_a_call_cut_off_by_the_token_limit_is_dropped(setup: Setup, kind: str, stream: bool) -> None:
    """A backend stopping on `length` inside a call's arguments: the client used to get that call
    as if complete (`arguments: {"__raw_arguments": "{\\"city\\": \\"Ro"}`)."""
    calls = [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_time", '{"city": "Ro')]
    setup.fake(kind).set_script(Script(tokens=["Checking."], tool_calls=calls, finish_reason="length"))
    if stream:
        parts = await collect(await setup.client.chat(model=MODELS[kind], messages=MESSAGES, tools=TOOLS, stream=True))
        got = [call for part in parts for call in part.message.tool_calls or ()]
        content, final = "".join(p.message.content for p in parts), parts[-1]
    else:
        final = await setup.client.chat(model=MODELS[kind], messages=MESSAGES, tools=TOOLS)
        got, content = list(final.message.tool_calls or ()), final.message.content
    assert [(c.function.name, dict(c.function.arguments)) for c in got] == [("get_weather", {"city": "Paris"})]
    assert (content, final.done_reason) == ("Checking.", "length")


async def test_tool_call_ids_and_indexes_on_the_wire(setup: Setup) -> None:
    calls = [ToolCall("get_weather", '{"city": "Paris"}', id="call_one"), ToolCall("get_weather", '{"city": "Rome"}', id="call_two")]
    setup.fake("openai").set_script(Script(tokens=[], tool_calls=calls, tool_arg_fragment=4, interleave_tool_calls=True))
    async with httpx.AsyncClient(base_url=setup.url) as http:
        response = await http.post("/api/chat", json={"model": "gpt", "messages": MESSAGES, "tools": TOOLS})
    lines = [json.loads(line) for line in response.text.splitlines()]
    (call_line,) = [line for line in lines if line["message"].get("tool_calls")]
    assert call_line["message"]["tool_calls"] == [
        {"id": "call_one", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "call_two", "function": {"index": 1, "name": "get_weather", "arguments": {"city": "Rome"}}},
    ]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"


# A tool loop as the SDK sends it back: the calls without ids, the results named by tool.
WEATHER_TOOL_LOOP: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
        ]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
        {"role": "tool", "tool_name": "get_weather", "content": "rainy"},
]


@pytest.mark.parametrize("kind", KINDS)
async def test_tool_results_reach_the_backend_paired_with_their_calls(setup: Setup, kind: str) -> None:
    reply = await setup.client.chat(model=MODELS[kind], messages=WEATHER_TOOL_LOOP, tools=TOOLS)
    assert reply.message.content
    sent = setup.sent(kind)["messages"]
    if kind == "openai":
        ids = [c["id"] for c in sent[1]["tool_calls"]]
        assert [json.loads(c["function"]["arguments"]) for c in sent[1]["tool_calls"]] == [{"city": "Paris"}, {"city": "Rome"}]
        assert len(set(ids)) == 2
        assert [(m["role"], m["tool_call_id"], m["content"]) for m in sent[2:]] == [
            ("tool", ids[0], "sunny"), ("tool", ids[1], "rainy"),
        ]
    elif kind == "ollama":
        assert sent[1]["tool_calls"][1]["function"]["arguments"] == {"city": "Rome"}
        assert [(m["role"], m["tool_name"], m["content"]) for m in sent[2:]] == [
            ("tool", "get_weather", "sunny"), ("tool", "get_weather", "rainy"),
        ]
    else:
        uses = [b for b in sent[1]["content"] if b["type"] == "tool_use"]
        results = [b for m in sent[2:] for b in m["content"] if b["type"] == "tool_result"]
        assert [u["input"] for u in uses] == [{"city": "Paris"}, {"city": "Rome"}]
        assert [r["tool_use_id"] for r in results] == [u["id"] for u in uses]


async def test_tool_call_ids_made_for_a_client_that_sends_none_are_ones_mistral_takes(setup: Setup) -> None:
    """The SDK's messages carry no tool-call ids; the gateway made `call_1_0`, which Mistral's
    models refuse (vLLM and Mistral's API: "must be a-z, A-Z, 0-9, with a length of 9"), so a
    tool loop with one failed on its second turn."""
    history: list[dict[str, Any]] = [
        *WEATHER_TOOL_LOOP,
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "tool_name": "get_time", "content": "noon"},
    ]
    await setup.client.chat(model="mistral-small", messages=history, tools=TOOLS)
    sent = setup.sent("openai")["messages"]
    ids = [call["id"] for message in sent for call in message.get("tool_calls") or ()]
    assert [m["tool_call_id"] for m in sent if m["role"] == "tool"] == ids
    assert len(set(ids)) == 3 and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids), ids


@pytest.mark.parametrize("kind", KINDS)
async def test_options_and_format_reach_the_backend(setup: Setup, kind: str) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    await setup.client.chat(
        model=MODELS[kind], messages=MESSAGES, format=schema, keep_alive="10m",
        options={"temperature": 0.3, "top_p": 0.8, "num_predict": 64, "stop": ["END"], "seed": 42, "num_ctx": 8192},
    )
    sent = setup.sent(kind)
    if kind == "openai":
        assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["stop"], sent["seed"]) == (0.3, 0.8, 64, ["END"], 42)
        assert sent["response_format"]["type"] == "json_schema"
        assert sent["response_format"]["json_schema"]["schema"] == schema
        assert "num_ctx" not in sent and "keep_alive" not in sent and "options" not in sent
    elif kind == "ollama":
        assert sent["options"] == {"temperature": 0.3, "top_p": 0.8, "num_predict": 64, "stop": ["END"], "seed": 42, "num_ctx": 8192}
        assert sent["format"] == schema and sent["keep_alive"] == "10m"
    else:
        # Claude takes temperature or top_p, not both: the temperature is kept.
        assert (sent["temperature"], "top_p" in sent, sent["max_tokens"], sent["stop_sequences"]) == (0.3, False, 64, ["END"])


@pytest.mark.parametrize(("title", "name"), [("Answer", "Answer"), ("Weather report", "Weather_report"),
                                           ("Page[Item]", "Page_Item"), ("Ünïcode", "n_code"), ("!!", "response")])
async def test_a_schema_title_is_a_name_openai_takes(setup: Setup, title: str, name: str) -> None:
    """`format`'s `title` became `json_schema.name` as it was: OpenAI's API answers 400 to one
    that is not letters, digits, `_` and `-` (a title with a space, pydantic's `Page[Item]`)."""
    schema = {"title": title, "type": "object", "properties": {"n": {"type": "integer"}}}
    await setup.client.chat(model="gpt-4o", messages=MESSAGES, format=schema)
    sent = setup.sent("openai")["response_format"]["json_schema"]
    assert (sent["name"], sent["schema"]) == (name, schema)


@pytest.mark.parametrize("kind", KINDS)
async def test_ollamas_no_value_numbers_are_not_sent_as_values(setup: Setup, kind: str) -> None:
    # `seed: -1` is Ollama's "random seed" (its default): as vLLM's seed -1 every retry would
    # give the same answer. `top_k: 0` is "no top-k" (vLLM refuses 0); `num_predict: -1` no limit.
    options = {"seed": -1, "top_k": 0, "num_predict": -1}
    await setup.client.chat(model=MODELS[kind], messages=MESSAGES, options=options)
    sent = setup.sent(kind)
    if kind == "ollama":
        assert sent["options"] == options
    else:
        assert "seed" not in sent and "top_k" not in sent
        assert sent.get("max_tokens") in (None, 4096)  # Anthropic's default limit, not -1
    await setup.client.chat(model=MODELS[kind], messages=MESSAGES, options={"seed": 0, "top_k": 40})
    sent = setup.sent(kind)
    if kind == "openai":
        assert (sent["seed"], sent["top_k"]) == (0, 40)
    elif kind == "ollama":
        assert sent["options"] == {"seed": 0, "top_k": 40}
    else:
        assert sent["top_k"] == 40


@asynccontextmanager
async def vllm_and_hosted(vllm: OpenAIBackend, hosted: OpenAIBackend) -> AsyncIterator[ollama.AsyncClient]:
    """An Ollama client of a gateway with `qwen3-8b` on vLLM (which takes vLLM's own fields)
    and `gpt-…` on a strict hosted OpenAI-compatible API (which refuses them)."""
    async with vllm.serve() as v, hosted.serve() as h, running_gateway(
        backend("vllm", v.url, default=True),
        backend("hosted", h.url, prefixes=("gpt-",), chat_template_fields=False),
    ) as url, ollama.AsyncClient(host=url) as client:
        yield client


async def test_min_p_and_repeat_penalty_reach_vllm_but_not_a_strict_hosted_api() -> None:
    # Open WebUI's "Min P" and "Repeat Penalty" on a model vLLM serves: its sampler has both.
    options = {"min_p": 0.05, "repeat_penalty": 1.15, "num_ctx": 8192, "temperature": 0.2}
    vllm, hosted = OpenAIBackend(), OpenAIBackend()
    async with vllm_and_hosted(vllm, hosted) as client:
        await client.chat(model="qwen3-8b", messages=MESSAGES, options=options)
        await client.generate(model="qwen3-8b", prompt="p", options=options)
        await client.chat(model="gpt-4o", messages=MESSAGES, options=options)
    for request in vllm.requests:
        sent = request.json
        assert (sent["min_p"], sent["repetition_penalty"], sent["temperature"]) == (0.05, 1.15, 0.2)
        assert "repeat_penalty" not in sent and "num_ctx" not in sent
    sent = hosted.requests[-1].json
    assert "min_p" not in sent and "repetition_penalty" not in sent and sent["temperature"] == 0.2


async def test_thinking_given_back_reaches_vllm_as_reasoning_content() -> None:
    """An assistant turn's `thinking` (which Ollama renders into the model's template) used to
    be dropped for an OpenAI-compatible backend: vLLM's gpt-oss lost the reasoning behind its
    own tool calls, Qwen3's template the thinking of the tool loop it was in."""
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "thinking": "I should call get_weather.",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
    ]
    vllm, hosted = OpenAIBackend(), OpenAIBackend()
    async with vllm_and_hosted(vllm, hosted) as client:
        await client.chat(model="qwen3-8b", messages=history, tools=TOOLS)
        await client.chat(model="gpt-4o", messages=history, tools=TOOLS)
    assistant = vllm.requests[-1].json["messages"][1]
    assert assistant["reasoning_content"] == "I should call get_weather."
    assert assistant["tool_calls"][0]["function"]["name"] == "get_weather"
    assert all("reasoning_content" not in m for m in hosted.requests[-1].json["messages"])  # it would refuse the field


@pytest.mark.parametrize("kind", KINDS)
async def test_num_predict_limit_ends_with_length(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=["a", "b", "c", "d", "e"]))
    parts = await collect(await setup.client.chat(model=MODELS[kind], messages=MESSAGES, options={"num_predict": 2}, stream=True))
    assert "".join(p.message.content for p in parts) == "ab"
    assert parts[-1].done_reason == "length"


@pytest.mark.parametrize("kind", KINDS)
async def test_images_become_the_backends_image_parts(setup: Setup, kind: str) -> None:
    await setup.client.chat(model=MODELS[kind], messages=[{"role": "user", "content": "What is this?", "images": [PNG]}])
    user = setup.sent(kind)["messages"][-1]
    encoded = base64.b64encode(PNG).decode()
    if kind == "openai":
        assert user["content"] == [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}},
        ]
    elif kind == "ollama":
        assert user == {"role": "user", "content": "What is this?", "images": [encoded]}
    else:
        image = next(b for b in user["content"] if b["type"] == "image")
        assert image["source"] == {"type": "base64", "media_type": "image/png", "data": encoded}


@pytest.mark.parametrize("kind", KINDS)
async def test_images_that_are_not_base64_are_ollamas_400_and_data_urls_are_read(setup: Setup, kind: str) -> None:
    async with httpx.AsyncClient(base_url=setup.url) as http:
        chat = await http.post("/api/chat", json={
            "model": MODELS[kind], "messages": [{"role": "user", "content": "x", "images": ["not base64!!"]}],
        })
        generate = await http.post("/api/generate", json={"model": MODELS[kind], "prompt": "x", "images": ["abc"]})
    assert chat.status_code == 400 and "`messages[0].images[0]`" in chat.json()["error"]
    assert generate.status_code == 400 and "`images[0]`" in generate.json()["error"]
    assert setup.fake(kind).requests == []
    encoded = base64.b64encode(PNG).decode()
    for image in (f"data:image/png;base64,{encoded}", base64.encodebytes(PNG * 3).decode()):  # line-wrapped
        async with httpx.AsyncClient(base_url=setup.url) as http:  # curl-like: the SDK refuses both
            reply = await http.post("/api/chat", json={
                "model": MODELS[kind], "messages": [{"role": "user", "content": "x", "images": [image]}], "stream": False,
            })
        assert reply.status_code == 200
        user = setup.sent(kind)["messages"][-1]
        sent = (user["images"][0] if kind == "ollama" else
                user["content"][1]["image_url"]["url"].partition(",")[2] if kind == "openai" else
                user["content"][1]["source"]["data"])
        assert base64.b64decode(sent, validate=True) == base64.b64decode(image.rpartition(",")[2])


async def test_alias_is_echoed_and_resolved(setup: Setup) -> None:
    reply = await setup.client.chat(model="my-alias", messages=MESSAGES)
    assert reply.model == "my-alias"
    assert setup.sent("ollama")["model"] == "llama3.2:latest"


# -- generate --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_generate_streams_responses(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=["Once", " upon"], usage=Usage(5, 2)))
    parts = await collect(await setup.client.generate(model=MODELS[kind], prompt="Tell a story", system="Be brief", stream=True))
    assert "".join(p.response for p in parts) == "Once upon"
    final = parts[-1]
    assert final.done and final.done_reason == "stop" and final.eval_count == 2
    # An Ollama backend's context is relayed (the fake's: one number per token); others have none.
    assert final.context == (list(range(1, 8)) if kind == "ollama" else None)
    sent = setup.sent(kind)
    if kind == "openai":
        assert sent["messages"] == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Tell a story"}]
    elif kind == "ollama":
        assert setup.fake(kind).requests[-1].path == "/api/generate"
        assert (sent["prompt"], sent["system"]) == ("Tell a story", "Be brief")


async def test_generate_non_streaming(setup: Setup) -> None:
    setup.fake("openai").set_script(Script(tokens=["4"]))
    reply = await setup.client.generate(model="gpt", prompt="2+2?")
    assert reply.response == "4" and reply.done and reply.done_reason == "stop"


async def test_generate_context_from_an_ollama_backend_continues_the_conversation(setup: Setup) -> None:
    setup.fake("ollama").set_script(Script(tokens=["4"], usage=Usage(3, 1)))
    reply = await setup.client.generate(model="llama3.2", prompt="2+2?")
    assert reply.context == [1, 2, 3, 4]
    await setup.client.generate(model="llama3.2", prompt="and 3+3?", context=reply.context)
    assert setup.sent("ollama")["context"] == [1, 2, 3, 4]
    async with httpx.AsyncClient(base_url=setup.url) as http:
        streamed = await http.post("/api/generate", json={"model": "llama3.2", "prompt": "hi"})
        lines = [json.loads(item) for item in streamed.text.splitlines()]
        assert [item.get("context") for item in lines] == [None] * (len(lines) - 1) + [[1, 2, 3, 4]]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_generate_context_is_refused_where_it_cannot_be_honoured(setup: Setup, kind: str) -> None:
    # A `context` names an earlier conversation in an Ollama server's tokens; another backend
    # answering without it would answer "and 3+3?" as if nothing came before.
    with pytest.raises(ollama.ResponseError) as info:
        await setup.client.generate(model=MODELS[kind], prompt="and 3+3?", context=[1, 2, 3, 4])
    assert info.value.status_code == 400 and "`context`" in info.value.error
    assert setup.fake(kind).requests == []
    reply = await setup.client.generate(model=MODELS[kind], prompt="hi", context=[])  # nothing to honour
    assert reply.done


async def test_generate_suffix_is_native_on_ollama_and_refused_elsewhere(setup: Setup) -> None:
    reply = await setup.client.generate(model="llama3.2", prompt="def add(a, b):", suffix="\n", raw=True)
    assert reply.response
    sent = setup.sent("ollama")
    assert (sent["suffix"], sent["raw"]) == ("\n", True)
    with pytest.raises(ollama.ResponseError) as info:
        await setup.client.generate(model="gpt", prompt="def add(a, b):", suffix="\n")
    assert info.value.status_code == 400 and "suffix" in info.value.error


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_generate_raw_and_template_are_refused_off_ollama(setup: Setup, kind: str) -> None:
    # Silently wrapping a raw prompt in a chat message would answer a different question.
    for field, value in (("raw", True), ("template", "{{ .Prompt }}")):
        for stream in (True, False):
            with pytest.raises(ollama.ResponseError) as info:
                reply = await setup.client.generate(model=MODELS[kind], prompt="<s>[INST] hi", stream=stream, **{field: value})
                if stream:
                    await collect(reply)  # type: ignore[arg-type]
            assert info.value.status_code == 400 and f"`{field}`" in info.value.error
            assert "Ollama backend" in info.value.error
    assert [r for r in setup.fake(kind).requests if r.method == "POST"] == []
    reply = await setup.client.generate(model=MODELS[kind], prompt="hi", raw=False)  # says nothing special
    assert reply.done
    native = await setup.client.generate(model="llama3.2", prompt="hi", raw=True, template="{{ .Prompt }}")
    assert native.done and (setup.sent("ollama")["raw"], setup.sent("ollama")["template"]) == (True, "{{ .Prompt }}")


async def test_load_and_unload_reach_an_ollama_backend_and_are_answered_for_others(setup: Setup) -> None:
    """A request without a prompt loads the model (`ollama run`), one with `keep_alive: 0`
    unloads it (`ollama stop`). They used to be answered by the gateway, never reaching the
    Ollama backend: `ollama stop` freed nothing and `/api/ps` listed nothing."""
    generated = await setup.client.generate(model="llama3.2", prompt="")
    assert (generated.done, generated.done_reason, generated.response) == (True, "load", "")
    assert [r.json for r in setup.fake("ollama").requests if r.method == "POST"] == [{"model": "llama3.2", "prompt": "", "stream": False}]
    assert [m.model for m in (await setup.client.ps()).models] == ["llama3.2:latest"]
    chatted = await setup.client.chat(model="my-alias", messages=[])  # the alias is echoed, as for chats
    assert (chatted.model, chatted.done_reason) == ("my-alias", "load")
    streamed = await collect(await setup.client.generate(model="llama3.2", prompt="", stream=True))
    assert [p.done_reason for p in streamed] == ["load"]
    unloaded = await setup.client.generate(model="llama3.2", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert (await setup.client.ps()).models == []
    # An OpenAI-compatible backend loads nothing on request: the gateway answers for it.
    chatted = await setup.client.chat(model="qwen3-8b", messages=[])
    assert (chatted.done, chatted.done_reason) == (True, "load")
    assert (await setup.client.generate(model="qwen3-8b", keep_alive=0)).done_reason == "unload"
    assert setup.fake("openai").requests == []


@pytest.mark.parametrize("keep_alive", ["0m", "0h", "0.0s", "0ms", "0.0"])
async def test_a_zero_keep_alive_in_any_unit_unloads(setup: Setup, keep_alive: str) -> None:
    """Ollama reads `keep_alive` as a Go duration: "0m" unloads as "0s" does. The gateway
    answered a model on another backend with `done_reason: "load"`, as if it were kept."""
    chatted = await setup.client.chat(model="qwen3-8b", messages=[], keep_alive=keep_alive)
    generated = await setup.client.generate(model="claude-test", keep_alive=keep_alive)
    assert (chatted.done_reason, generated.done_reason) == ("unload", "unload")
    kept = await setup.client.generate(model="qwen3-8b", keep_alive="5m")
    assert kept.done_reason == "load"


async def test_loading_a_model_the_ollama_backend_lacks_is_its_404() -> None:
    fake = OllamaBackend(models=["llama3.2"])
    async with fake.serve() as server, running_gateway(backend("ol", server.url, kind="ollama", default=True)) as url:
        async with ollama.AsyncClient(host=url) as client:
            for call in (client.generate(model="llama9", prompt=""), client.chat(model="llama9", messages=[], keep_alive=0)):
                with pytest.raises(ollama.ResponseError) as info:
                    await call
                assert info.value.status_code == 404
                assert info.value.error == 'model "llama9" not found, try pulling it first'


async def test_ps_lists_what_every_ollama_backend_holds() -> None:
    first, second = OllamaBackend(models=["llama3.2"]), OllamaBackend(models=["mistral"])
    async with first.serve() as one, second.serve() as two, OpenAIBackend().serve() as oa, running_gateway(
        backend("one", one.url, kind="ollama", prefixes=("llama",)),
        backend("two", two.url, kind="ollama", prefixes=("mistral",)),
        backend("oa", oa.url, default=True),
    ) as url:
        async with ollama.AsyncClient(host=url) as client:
            assert (await client.ps()).models == []
            await client.chat(model="llama3.2", messages=MESSAGES)
            await client.generate(model="mistral", prompt="")
            await client.generate(model="qwen3-8b", prompt="")
            running = (await client.ps()).models
            assert sorted(m.model for m in running) == ["llama3.2:latest", "mistral:latest"]
            assert all(m.expires_at is not None and m.size_vram for m in running)


# -- errors ------------------------------------------------------------------------------------


async def test_unknown_model_is_ollamas_404() -> None:
    fake = OllamaBackend()
    async with fake.serve() as server, running_gateway(backend("ol", server.url, kind="ollama", prefixes=("llama",))) as url:
        async with ollama.AsyncClient(host=url) as client:
            for call in (
                client.chat(model="mistral", messages=MESSAGES),
                client.generate(model="mistral", prompt="x"),
                client.generate(model="mistral", prompt=""),
            ):
                with pytest.raises(ollama.ResponseError) as info:
                    await call
                assert info.value.status_code == 404
                assert info.value.error == 'model "mistral" not found, try pulling it first'
            with pytest.raises(ollama.ResponseError) as info:
                await client.show("mistral")
            assert info.value.status_code == 404 and info.value.error == "model 'mistral' not found"


async def test_model_missing_on_the_ollama_backend_keeps_its_message() -> None:
    fake = OllamaBackend(models=["llama3.2"])
    async with fake.serve() as server, running_gateway(backend("ol", server.url, kind="ollama", default=True)) as url:
        async with ollama.AsyncClient(host=url) as client:
            with pytest.raises(ollama.ResponseError) as info:
                await collect(await client.chat(model="llama9", messages=MESSAGES, stream=True))
            assert info.value.status_code == 404
            assert info.value.error == 'model "llama9" not found, try pulling it first'


async def test_model_unknown_to_an_openai_backend_is_ollamas_404() -> None:
    fake = OpenAIBackend(models=["qwen3-8b"])
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as url:
        async with ollama.AsyncClient(host=url) as client:

            async def streamed() -> list[Any]:
                return await collect(await client.chat(model="qwen9", messages=MESSAGES, stream=True))

            for call in (
                client.chat(model="qwen9", messages=MESSAGES),
                streamed(),
                client.generate(model="qwen9", prompt="x"),
            ):
                with pytest.raises(ollama.ResponseError) as info:
                    await call
                assert info.value.status_code == 404
                assert info.value.error == 'model "qwen9" not found, try pulling it first'
            assert (await client.chat(model="qwen3-8b", messages=MESSAGES)).done


async def test_embedding_model_unknown_to_an_openai_backend_is_ollamas_404() -> None:
    """It used to read `The model \\`qwen9\\` does not exist.` (the backend's words) where
    /api/chat says Ollama's."""
    fake = OpenAIBackend(models=["qwen3-8b"])
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as url:
        async with ollama.AsyncClient(host=url) as client:
            for call in (client.embed(model="qwen9", input="x"), client.embeddings(model="qwen9", prompt="x")):
                with pytest.raises(ollama.ResponseError) as info:
                    await call
                assert info.value.status_code == 404
                assert info.value.error == 'model "qwen9" not found, try pulling it first'
            assert len((await client.embed(model="qwen3-8b", input="x")).embeddings) == 1


async def test_bad_requests_are_400s_in_ollamas_shape(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.url) as http:
        for path, content in (
            ("/api/chat", b"{not json"),
            ("/api/chat", json.dumps({"model": "m", "messages": [{"role": "robot", "content": "x"}]}).encode()),
            ("/api/chat", json.dumps({"messages": MESSAGES}).encode()),
            ("/api/generate", json.dumps({"model": "m", "prompt": 5}).encode()),
            ("/api/show", b"[]"),
        ):
            response = await http.post(path, content=content)
            assert response.status_code == 400, (path, content)
            assert response.headers["content-type"].startswith("application/json")
            assert set(response.json()) == {"error"} and response.json()["error"]
        wrong_method = await http.get("/api/chat")
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()
        unknown = await http.post("/api/no-such-endpoint", json={"model": "x"})
        assert unknown.status_code == 404 and "error" in unknown.json()
    with pytest.raises(ollama.ResponseError) as info:
        await setup.client.chat(model="gpt", messages=MESSAGES, options={"temperature": "hot"})
    assert info.value.status_code == 400 and "options.temperature" in info.value.error
    assert setup.fake("openai").requests == []


async def test_a_number_too_big_for_a_float_is_a_400_naming_its_field(setup: Setup) -> None:
    """`1e400` used to reach the backend call as infinity and fail there: a 502 and a traceback."""
    chat = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], %s}'
    tool = '"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "maximum": 1e400}}}]'
    async with httpx.AsyncClient(base_url=setup.url) as http:
        for path, body, field in (
            ("/api/chat", chat % ("qwen3-8b", '"options": {"temperature": 1e400}'), "options.temperature"),
            ("/api/chat", chat % ("llama3.2", '"keep_alive": -1e400, "stream": false'), "keep_alive"),
            ("/api/chat", chat % ("qwen3-8b", tool), "tools[0].function.parameters.maximum"),
            ("/api/chat", chat % ("qwen3-8b", '"format": {"type": "number", "maximum": 1e400}'), "format.maximum"),
            ("/api/generate", '{"model": "llama3.2", "prompt": "hi", "options": {"top_p": 1.5e999}}', "options.top_p"),
        ):
            response = await http.post(path, content=body)
            assert response.status_code == 400, (body, response.text)
            assert field in response.json()["error"] and "out of range" in response.json()["error"]
        openai_style = await http.post("/v1/chat/completions", content=chat % ("qwen3-8b", tool))
        assert openai_style.status_code == 400, openai_style.text
        error = openai_style.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "tools[0].function.parameters.maximum"
    assert all(not fake.requests for fake in setup.fakes.values())


async def test_a_null_body_must_be_a_json_object_in_every_dialect(setup: Setup) -> None:
    """`null` used to be told it was "nested more than 128 levels deep"."""
    async with httpx.AsyncClient(base_url=setup.url) as http:
        for path in ("/api/chat", "/api/generate", "/api/show", "/api/embed", "/v1/chat/completions",
                     "/v1/messages", "/v1/responses", "/v1/embeddings"):
            response = await http.post(path, content=b"null", headers={"content-type": "application/json"})
            assert response.status_code == 400, path
            error = response.json()["error"]
            message = error if isinstance(error, str) else error["message"]
            assert message == "The request body must be a JSON object.", (path, message)


@pytest.mark.parametrize(("status", "expected"), [(500, 502), (503, 503), (429, 429), (400, 400)])
@pytest.mark.parametrize("kind", KINDS)
async def test_backend_errors_before_the_stream(setup: Setup, kind: str, status: int, expected: int) -> None:
    setup.fake(kind).set_script(Script(status=status, error_message="backend says no"))
    for stream in (True, False):
        with pytest.raises(ollama.ResponseError) as info:
            reply = await setup.client.chat(model=MODELS[kind], messages=MESSAGES, stream=stream)
            if stream:
                await collect(reply)  # type: ignore[arg-type]
        assert info.value.status_code == expected
        assert "backend says no" in info.value.error


async def test_unreachable_backend_is_a_503() -> None:
    port = refusing_port()
    async with running_gateway(backend("dead", f"http://127.0.0.1:{port}", kind="ollama", default=True)) as url:
        async with ollama.AsyncClient(host=url) as client:
            with pytest.raises(ollama.ResponseError) as info:
                await collect(await client.chat(model="m", messages=MESSAGES, stream=True))
            assert info.value.status_code == 503 and "unreachable" in info.value.error


@pytest.mark.parametrize("kind", KINDS)
async def test_backend_failing_mid_stream_ends_with_an_error_line(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=["a", "b", "c", "d", "e", "f"], fail_after=4, error_message="engine died"))
    seen: list[Any] = []
    with pytest.raises(ollama.ResponseError) as info:
        async for part in await setup.client.chat(model=MODELS[kind], messages=MESSAGES, stream=True):
            seen.append(part)
    assert seen and not any(p.done for p in seen)
    assert "engine died" in info.value.error
    async with httpx.AsyncClient(base_url=setup.url) as http:
        streamed = await http.post("/api/chat", json={"model": MODELS[kind], "messages": MESSAGES, "stream": True})
    lines = streamed.text.splitlines()
    assert streamed.status_code == 200 and streamed.text.endswith("\n")
    assert json.loads(lines[-1]).keys() == {"error"}
    assert all("error" not in json.loads(line) for line in lines[:-1])


async def test_idle_timeout_mid_stream_is_an_error_line_and_closes_the_backend() -> None:
    fake = OllamaBackend(default=Script(tokens=["a", "b", "c", "d"], stall_after=2))
    quick = Timeouts(connect=2, first_token=5, idle=0.3, total=30)
    async with fake.serve() as server, running_gateway(backend("ol", server.url, kind="ollama", default=True, timeouts=quick)) as url:
        async with ollama.AsyncClient(host=url) as client:
            seen: list[Any] = []
            with pytest.raises(ollama.ResponseError) as info:
                async for part in await client.chat(model="m", messages=MESSAGES, stream=True):
                    seen.append(part)
            assert [p.message.content for p in seen] == ["a", "b"]
            assert "idle" in info.value.error
            await fake.wait_disconnect(2.0)


async def test_first_token_timeout_is_a_504_and_closes_the_backend() -> None:
    fake = OllamaBackend(default=Script(stall_before_headers=True))
    quick = Timeouts(connect=2, first_token=0.3, idle=5, total=30)
    async with fake.serve() as server, running_gateway(backend("ol", server.url, kind="ollama", default=True, timeouts=quick)) as url:
        async with ollama.AsyncClient(host=url) as client:
            with pytest.raises(ollama.ResponseError) as info:
                await collect(await client.chat(model="m", messages=MESSAGES, stream=True))
            assert info.value.status_code == 504
            await fake.wait_disconnect(2.0)


# -- cancellation ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_disconnect_mid_stream_closes_the_backend_request(setup: Setup, kind: str) -> None:
    fake = setup.fake(kind)
    fake.set_script(Script(n_tokens=1000, pace=0.01))
    stream = await setup.client.chat(model=MODELS[kind], messages=MESSAGES, stream=True)
    for _ in range(3):
        await stream.__anext__()
    await stream.aclose()  # type: ignore[attr-defined]
    gone = await fake.wait_disconnect(2.0)
    assert 0 < gone.frames_sent < 1000
    await fake.wait_idle(2.0)


@pytest.mark.parametrize("kind", KINDS)
async def test_disconnect_while_waiting_for_a_non_streamed_reply(setup: Setup, kind: str) -> None:
    fake = setup.fake(kind)
    fake.set_script(Script(n_tokens=100, pace=0.2))  # a 20 s generation
    await hang_up_once_received(fake, lambda: setup.client.chat(model=MODELS[kind], messages=MESSAGES))
    await fake.wait_disconnect(2.0)
    await fake.wait_idle(2.0)


# -- models and probes ---------------------------------------------------------------------------


async def test_tags_show_version_and_root(setup: Setup) -> None:
    listed = {m.model: m for m in (await setup.client.list()).models}
    assert {"llama3.2:latest", "fake-model", "my-alias"} <= set(listed)
    local = listed["llama3.2:latest"]
    assert local.details is not None and (local.details.format, local.details.quantization_level) == ("gguf", "Q4_K_M")
    assert local.size == 2019393189 and local.modified_at is not None and local.modified_at.year == 2025
    remote = listed["fake-model"]
    assert remote.details is not None and remote.details.family == "fake" and remote.size == 0
    assert remote.digest is not None and len(remote.digest) == 64
    assert listed["my-alias"].details == local.details

    shown = await setup.client.show("llama3.2")  # the backend's own answer, tag or no tag
    assert shown.template == "{{ .Prompt }}" and shown.capabilities == ["completion", "tools"]
    assert (await setup.client.show("my-alias")).modelinfo["general.architecture"] == "llama"  # type: ignore[index]
    other = await setup.client.show("fake-model")
    assert other.details is not None and other.details.family == "fake" and "tools" in (other.capabilities or [])

    async with httpx.AsyncClient(base_url=setup.url) as http:
        version = await http.get("/api/version")
        assert version.json() == {"version": OLLAMA_VERSION}
        root = await http.get("/")
        assert (root.status_code, root.text) == (200, "Ollama is running")
        head = await http.head("/")
        assert head.status_code == 200 and head.text == ""
        raw = (await http.get("/api/tags")).json()["models"]
        assert set(raw[0]) == {"name", "model", "modified_at", "size", "digest", "details"}


async def test_show_verbose_reaches_the_ollama_backend(setup: Setup) -> None:
    """`ollama show --verbose` (`"verbose": true`) got the short answer: no tensors, no
    tokenizer metadata, as the flag never reached the backend."""
    async with httpx.AsyncClient(base_url=setup.url) as http:
        verbose = (await http.post("/api/show", json={"model": "my-alias", "verbose": True})).json()
        short = (await http.post("/api/show", json={"model": "llama3.2"})).json()
    assert verbose["tensors"][0]["name"] == "token_embd.weight"
    assert "tensors" not in short and short["template"] == verbose["template"]


async def test_show_answers_for_every_model_chat_accepts(setup: Setup) -> None:
    # Clients (the CLI, Continue) call show before chatting: a model served by prefix or by
    # the default backend, unlisted, must be shown as well as chatted with.
    for model in ("qwen3-8b", "claude-test", "gpt-4o:latest"):
        shown = await setup.client.show(model)
        vision = ["vision"] if model.startswith("claude") else []  # every Claude model reads images
        assert shown.capabilities == ["completion", "tools", *vision], model
        assert shown.details is not None and shown.modified_at is not None
        await setup.client.chat(model=model, messages=MESSAGES)
    assert (await setup.client.show("qwen3-8b")).details.family == "qwen"  # type: ignore[union-attr]


async def test_local_embedding_model_is_shown_as_one_and_refuses_chat(setup: Setup) -> None:
    assert "all-minilm-l6-v2" in {m.model for m in (await setup.client.list()).models}
    for name in ("all-minilm-l6-v2", "all-minilm"):
        shown = await setup.client.show(name)
        assert shown.capabilities == ["embedding"]
        assert shown.modelinfo is not None and shown.modelinfo["bert.embedding_length"] == 384
    async def streamed_chat() -> list[Any]:
        return await collect(await setup.client.chat(model="all-minilm-l6-v2", messages=MESSAGES, stream=True))

    for call, verb in (
        (setup.client.chat(model="all-minilm-l6-v2", messages=MESSAGES), "chat"),
        (streamed_chat(), "chat"),
        (setup.client.generate(model="all-minilm", prompt="hi"), "generate"),
        (setup.client.generate(model="all-minilm", prompt=""), "generate"),
    ):
        with pytest.raises(ollama.ResponseError) as info:
            await call
        assert info.value.status_code == 400
        assert info.value.error == f'"{"all-minilm-l6-v2" if verb == "chat" else "all-minilm"}" does not support {verb}'
    assert [r.path for r in setup.fake("openai").requests if r.method == "POST"] == []  # not routed to the default backend


async def test_ps_and_pull_answer_as_ollama_does(setup: Setup) -> None:
    assert (await setup.client.ps()).models == []
    for model in ("llama3.2", "qwen3-8b", "all-minilm"):  # an Ollama backend's, a default backend's, the local one
        assert (await setup.client.pull(model)).status == "success"
        progress = await collect(await setup.client.pull(model, stream=True))
        assert progress[-1].status == "success"
    async with httpx.AsyncClient(base_url=setup.url) as http:
        streamed = await http.post("/api/pull", json={"model": "llama3.2"})
        assert streamed.headers["content-type"] == "application/x-ndjson"
        assert json.loads(streamed.text.splitlines()[-1]) == {"status": "success"}
    fake = OllamaBackend()
    async with fake.serve() as server, running_gateway(backend("ol", server.url, kind="ollama", prefixes=("llama",))) as url:
        async with ollama.AsyncClient(host=url) as client:
            with pytest.raises(ollama.ResponseError) as info:
                await client.pull("mistral")
            assert info.value.status_code == 404 and "file does not exist" in info.value.error


async def test_model_management_is_refused_in_ollamas_shape(setup: Setup) -> None:
    async def pushed() -> list[Any]:
        return await collect(await setup.client.push("llama3.2", stream=True))

    for call in (
        setup.client.delete("llama3.2"),
        setup.client.copy("llama3.2", "mine"),
        setup.client.create("mine", from_="llama3.2"),
        setup.client.push("llama3.2"),
        pushed(),
    ):
        with pytest.raises(ollama.ResponseError) as info:
            await call
        assert info.value.status_code == 403
        assert "not available through the gateway" in info.value.error
    assert [r for r in setup.fake("ollama").requests if r.method != "GET"] == []


async def test_stream_and_json_content_types(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.url) as http:
        streamed = await http.post("/api/chat", json={"model": "gpt", "messages": MESSAGES}, headers={"x-request-id": "r-1"})
        whole = await http.post("/api/chat", json={"model": "gpt", "messages": MESSAGES, "stream": False})
    assert streamed.headers["content-type"] == "application/x-ndjson"
    assert streamed.headers["x-request-id"] == "r-1" and "content-length" not in streamed.headers
    assert whole.headers["content-type"].startswith("application/json")
    assert whole.json()["done"] is True and "\n" not in whole.text.strip()


# -- other dialects' clients in front of an Ollama backend (the egress half) --------------------------


def _ollama_tool_script() -> Script:
    calls = [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_weather", '{"city": "Rome"}')]
    return Script(tokens=["Let me check."], tool_calls=calls, usage=Usage(9, 4))


async def test_openai_clients_get_whole_ollama_tool_calls_as_indexed_deltas(setup: Setup) -> None:
    setup.fake("ollama").set_script(_ollama_tool_script())
    client = openai.AsyncOpenAI(base_url=f"{setup.url}/v1", api_key="x", max_retries=0)
    tools: Any = TOOLS
    messages: Any = MESSAGES
    stream = await client.chat.completions.create(
        model="llama3.2", messages=messages, tools=tools, stream=True, stream_options={"include_usage": True}
    )
    text, finish, usage = "", None, None
    ids: dict[int, str] = {}
    arguments: dict[int, str] = {}
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                if call.id:
                    ids[call.index] = call.id
                arguments[call.index] = arguments.get(call.index, "") + ((call.function and call.function.arguments) or "")
            finish = choice.finish_reason or finish
    assert text == "Let me check."
    assert sorted(ids) == [0, 1] and len(set(ids.values())) == 2
    assert all(i.startswith("call_") for i in ids.values())
    assert {i: json.loads(a) for i, a in arguments.items()} == {0: {"city": "Paris"}, 1: {"city": "Rome"}}
    assert finish == "tool_calls"  # Ollama said "stop"
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (9, 4)
    sent = setup.sent("ollama")
    assert setup.fake("ollama").requests[-1].path == "/api/chat"
    assert sent["tools"][0]["function"]["name"] == "get_weather" and sent["stream"] is True

    reply = await client.chat.completions.create(model="llama3.2", messages=messages, tools=tools)
    assert reply.choices[0].finish_reason == "tool_calls"
    calls = reply.choices[0].message.tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]  # type: ignore[union-attr]
    assert reply.usage is not None and reply.usage.total_tokens == 13
    await client.close()


async def test_anthropic_clients_get_ollama_tool_calls_as_tool_use(setup: Setup) -> None:
    setup.fake("ollama").set_script(_ollama_tool_script())
    client = anthropic.AsyncAnthropic(base_url=setup.url, api_key="x", max_retries=0)
    tools: Any = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    messages: Any = MESSAGES
    async with client.messages.stream(model="llama3.2", max_tokens=100, messages=messages, tools=tools) as stream:
        final = await stream.get_final_message()
    reply = await client.messages.create(model="llama3.2", max_tokens=100, messages=messages, tools=tools)
    for message in (final, reply):
        assert message.stop_reason == "tool_use"
        uses = [block for block in message.content if block.type == "tool_use"]
        assert [block.input for block in uses] == [{"city": "Paris"}, {"city": "Rome"}]
        assert len({block.id for block in uses}) == 2
        assert (message.usage.input_tokens, message.usage.output_tokens) == (9, 4)
    assert setup.sent("ollama")["options"]["num_predict"] == 100
    await client.close()


async def test_readiness_probes_ollama_backends(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.url) as http:
        ready = await http.get("/ready")
    assert ready.status_code == 200 and ready.json()["checks"]["backend:ol"] == "ok"
    assert [r.path for r in setup.fake("ollama").requests] == ["/api/version"]


# -- a chat longer than the model's window -------------------------------------------------


def _long_chat(turns: int) -> list[dict[str, Any]]:
    """Open WebUI's history after `turns` turns (~200 tokens each), then the new question."""
    history: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}]
    for turn in range(turns):
        history += [{"role": "user", "content": f"question {turn} " + "x" * 400},
                    {"role": "assistant", "content": f"answer {turn} " + "z" * 400}]
    return [*history, {"role": "user", "content": "and now the last question"}]


@pytest.mark.parametrize("listed", [True, False])
async def test_a_chat_longer_than_a_vllm_window_loses_its_oldest_turns_as_on_ollama(listed: bool) -> None:
    # Ollama fits a chat to its context (oldest messages first); vLLM would refuse it (a 400).
    from tests.test_responses_truncation import WINDOW, WindowedVLLM

    fake = WindowedVLLM(listed=listed)
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, prefixes=("qwen",))) as url:
        async with ollama.AsyncClient(host=url) as client:
            await client.list()  # the gateway has listed the backend (and its window, where it says it)
            messages = _long_chat(30)
            reply = await client.chat(model="qwen3-8b", messages=messages)
            assert reply.message.content and reply.done_reason == "stop"
            sent = fake.chats()[-1]["messages"]
            assert sent[0] == {"role": "system", "content": "Be brief."}
            assert sent[-1] == {"role": "user", "content": "and now the last question"}
            assert 3 < len(sent) < len(messages)
            assert sum(len(m["content"]) for m in sent) // fake.chars_per_token <= WINDOW
            async with httpx.AsyncClient(base_url=url) as http:  # `truncate: false`: Ollama's error instead
                refused = await http.post("/api/chat", json={
                    "model": "qwen3-8b", "messages": messages, "stream": False, "truncate": False,
                })
            assert refused.status_code == 400 and "context length" in refused.json()["error"]


async def test_embed_asks_vllm_to_cut_long_inputs_as_ollama_does() -> None:
    # Ollama's `truncate` (on by default) cuts an input to the model's window; vLLM refuses a
    # longer one unless told to cut it (`truncate_prompt_tokens`), which hosted APIs would refuse.
    from tests.test_responses_truncation import WINDOW, WindowedVLLM

    for strict in (False, True):
        fake = WindowedVLLM()
        async with fake.serve() as server, running_gateway(
            backend("vllm", server.url, prefixes=("qwen",), chat_template_fields=not strict),
        ) as url:
            async with ollama.AsyncClient(host=url) as client:
                await client.list()  # the gateway has listed vLLM's window
                await client.embed(model="qwen3-8b", input="a long text")
                sent = fake.requests[-1].json
                assert sent.get("truncate_prompt_tokens") == (None if strict else WINDOW)
                await client.embed(model="qwen3-8b", input="a long text", truncate=False)  # refused if too long
                assert "truncate_prompt_tokens" not in fake.requests[-1].json


class _ThinkingPickyOllama(OllamaBackend):
    """Ollama's refusals of a `think` its model cannot take: levels for a model without them
    (qwen3), thinking at all for a model without it (llama3.1)."""

    def chats(self) -> list[dict[str, Any]]:
        return [r.json for r in self.requests if r.path == "/api/chat"]

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/api/chat" and request.method == "POST":
            body = request.json()
            model, think = body.get("model"), body.get("think")
            if model == "qwen3:8b" and isinstance(think, str):
                await exchange.respond_json(400, {"error": f'think value "{think}" is not supported for this model'})
                return
            if model == "llama3.1:8b" and think is not None:
                await exchange.respond_json(400, {"error": f'"{model}" does not support thinking'})
                return
        await super().route(request, exchange, call)


class _BurstRefusingOllama(_ThinkingPickyOllama):
    """Refuses nothing until `burst` chats have arrived: all of them are in flight before the
    gateway hears the first refusal."""

    def __init__(self, burst: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._burst = burst
        self._all_in = trio.Event()

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/api/chat" and isinstance(request.json().get("think"), str):
            if len(self.chats()) >= self._burst:
                self._all_in.set()
            await self._all_in.wait()
        await super().route(request, exchange, call)


async def test_a_think_refused_to_a_burst_is_remembered_once() -> None:
    """Sixteen Claude Code requests at once to a model without think levels are all refused
    before the gateway learns it: the model's memory keeps the refusal once, not sixteen
    times (each kept refusal re-encodes every later request's body)."""
    fake = _BurstRefusingOllama(16, models=("qwen3:8b",))
    async with fake.serve() as server:
        client = OllamaClient(backend("ollama", server.url, kind="ollama"))
        request = parse_messages_request(json.dumps({
            "model": "qwen3:8b", "max_tokens": 8000, "messages": MESSAGES,
            "thinking": {"type": "enabled", "budget_tokens": 4096},
        }).encode())
        answers: list[Any] = []

        async def ask() -> None:
            answers.append(await client.complete(BackendCall(request, "qwen3:8b")))

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(ask)
        assert len(answers) == 16 and len(fake.chats()) == 32  # each refused once, then asked with think on
        assert client._think_refusals == {"qwen3:8b": ['think value "high" is not supported for this model']}
        await client.aclose()


async def test_thinking_asked_in_another_dialect_is_what_the_ollama_model_can_take() -> None:
    """Claude Code's `thinking` (an OpenAI client's `reasoning_effort`) reaches Ollama as a
    `think` level, which only some models take: the others refused the whole request
    ("think value "high" is not supported for this model", "does not support thinking"), so
    the client got a 400 for a model that answers. The gateway now asks again with what the
    model takes (thinking on, or none) and remembers it for the model's next requests; an
    Ollama client's own `think` still gets Ollama's answer."""
    fake = _ThinkingPickyOllama(models=("qwen3:8b", "llama3.1:8b"))
    async with fake.serve() as server, running_gateway(backend("ollama", server.url, kind="ollama", default=True)) as url:
        claude = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
        thinking = {"type": "enabled", "budget_tokens": 4096}
        for model in ("qwen3:8b", "llama3.1:8b"):
            reply = await claude.messages.create(model=model, max_tokens=8000, messages=MESSAGES, thinking=thinking)  # type: ignore[arg-type]
            assert reply.stop_reason == "end_turn"
        sent = [(c["model"], c.get("think", "absent")) for c in fake.chats()]
        assert sent == [("qwen3:8b", "high"), ("qwen3:8b", True), ("llama3.1:8b", "high"), ("llama3.1:8b", "absent")]
        stream = await openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).chat.completions.create(
            model="qwen3:8b", messages=MESSAGES, reasoning_effort="high", stream=True,  # type: ignore[arg-type]
        )
        assert [chunk async for chunk in stream]
        assert fake.chats()[-1].get("think") is True and len(fake.chats()) == 5  # asked once: remembered
        await claude.close()
        async with httpx.AsyncClient(base_url=url) as http:
            own = await http.post("/api/chat", json={"model": "qwen3:8b", "messages": MESSAGES, "think": "high", "stream": False})
        assert own.status_code == 400 and "not supported" in own.json()["error"]


async def test_num_predict_past_a_small_window_is_what_the_window_leaves() -> None:
    """Ollama never refuses a `num_predict` past the window (the answer stops when the
    window is full); vLLM does, so the request goes again with the room the refusal says is
    left, and the answer ends `length` there."""
    from tests.test_anthropic_api import SmallWindowOpenAIBackend

    fake = SmallWindowOpenAIBackend()
    fake.set_script(Script(n_tokens=100))
    messages = [{"role": "user", "content": "Tell me a long story"}]
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url, \
            ollama.AsyncClient(host=url) as client:
        whole = await client.chat(model="qwen3-8b", messages=messages, options={"num_predict": 32000})
        parts = await collect(await client.chat(
            model="qwen3-8b", messages=messages, options={"num_predict": 32000}, stream=True,
        ))
        for last in (whole, parts[-1]):
            assert (last.done_reason, last.eval_count) == ("length", 44)
        assert [r.json["max_tokens"] for r in fake.requests] == [32000, 44, 32000, 44]
