"""The official `openai` SDK's Responses API (`client.responses`, under trio) against the
gateway, in front of fake OpenAI-compatible, Ollama and Anthropic backends."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import trio

from proxy.config import Timeouts
from proxy.services.journal import LogWriter
from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend, Script, Usage
from tests.harness import backend, running_gateway
from tests.rag_corpus import CORPUS
from tests.test_persistence import rows, wait_for_row
from tests.test_responses_codec import assert_items_nest, frames

pytest_plugins = ["tests.infra_servers", "tests.rag_fixtures"]

KINDS = ("openai", "ollama", "anthropic")
MODELS = {"openai": "qwen3-8b", "ollama": "llama3.2", "anthropic": "claude-fake-1"}
TOOLS: Any = [
    {"type": "function", "name": "get_weather", "description": "Weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}},
]
PARALLEL = Script(tool_calls=[("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})], tool_arg_fragment=5)
ANTHROPIC_KEY = "sk-ant-test-key"


@dataclass
class Setup:
    url: str
    client: openai.AsyncOpenAI
    fakes: dict[str, Any]

    def fake(self, kind: str) -> Any:
        return self.fakes[kind]


@asynccontextmanager
async def three_backends(monkeypatch: pytest.MonkeyPatch, openai_fake: OpenAIBackend) -> AsyncIterator[Setup]:
    """The gateway in front of `openai_fake` (a vLLM), an Ollama and an Anthropic fake, each
    routed by the prefix of its model in MODELS, and an SDK client for it."""
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    fakes: dict[str, Any] = {
        "openai": openai_fake,
        "ollama": OllamaBackend(),
        "anthropic": AnthropicBackend(api_key=ANTHROPIC_KEY, require_version=True),
    }
    async with (
        fakes["openai"].serve() as s_openai,
        fakes["ollama"].serve() as s_ollama,
        fakes["anthropic"].serve() as s_anthropic,
        running_gateway(
            backend("vllm", s_openai.url, prefixes=("qwen",)),
            backend("ollama", s_ollama.url, kind="ollama", prefixes=("llama",)),
            backend("claude", s_anthropic.url, kind="anthropic", prefixes=("claude",), api_key_env="TEST_ANTHROPIC_KEY"),
        ) as url,
    ):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="client-key", max_retries=0)
        yield Setup(url, client, fakes)
        await client.close()


@pytest.fixture
async def setup(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Setup]:
    async with three_backends(monkeypatch, OpenAIBackend()) as stack:
        yield stack


async def raw_post(setup: Setup, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=setup.url, timeout=10) as http:
        return await http.post("/v1/responses", json=body)


def sent(setup: Setup, kind: str) -> dict[str, Any]:
    """The body the backend of `kind` received last."""
    body = setup.fake(kind).requests[-1].json
    assert isinstance(body, dict)
    return body


# -- text ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_non_streaming_response(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=["Hello", " there"], usage=Usage(11, 2)))
    raw = await setup.client.responses.with_raw_response.create(
        model=MODELS[kind], input="Say hello", instructions="Be brief.", metadata={"team": "a"},
    )
    response = raw.parse()
    assert raw.headers["content-type"] == "application/json" and raw.headers["x-request-id"]
    assert response.id == "resp_" + raw.headers["x-trace-id"] and response.object == "response"
    assert response.status == "completed" and response.model == MODELS[kind]
    assert response.output_text == "Hello there"
    assert [item.type for item in response.output] == ["message"]
    assert response.instructions == "Be brief." and response.metadata == {"team": "a"}
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (11, 2, 13)
    # Instructions reach every backend as its system prompt, before the input.
    body = sent(setup, kind)
    if kind == "anthropic":
        assert body["system"] == "Be brief." and body["messages"] == [{"role": "user", "content": "Say hello"}]
    else:
        assert body["messages"][0] == {"role": "system", "content": "Be brief."}
        assert body["messages"][1]["role"] == "user" and body["messages"][1]["content"] == "Say hello"


@pytest.mark.parametrize("kind", KINDS)
async def test_streamed_response_through_the_sdk_accumulator(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=["Hel", "lo", " there"], usage=Usage(11, 3)))
    deltas = []
    async with setup.client.responses.stream(model=MODELS[kind], input="Say hello") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        response = await stream.get_final_response()
    assert deltas == ["Hel", "lo", " there"]
    assert response.output_text == "Hello there" and response.status == "completed"
    assert response.usage is not None and (response.usage.input_tokens, response.usage.output_tokens) == (11, 3)
    assert sent(setup, kind)["stream"] is True


@pytest.mark.parametrize("kind", KINDS)
async def test_create_with_stream_true_yields_every_event_in_order(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=["a", "b"], usage=Usage(5, 2)))
    events = [event async for event in await setup.client.responses.create(model=MODELS[kind], input="x", stream=True)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == "ab" and final.usage.total_tokens == 7  # type: ignore[union-attr]


async def test_the_stream_on_the_wire(setup: Setup) -> None:
    setup.fake("openai").set_script(Script(tokens=["a", "b"], usage=Usage(5, 2)))
    response = await raw_post(setup, {"model": MODELS["openai"], "input": "x", "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert b"[DONE]" not in response.content
    payloads = frames(response.content)  # `event: TYPE` naming each payload's type
    assert_items_nest(payloads)
    assert payloads[-1]["type"] == "response.completed"


# -- tools -----------------------------------------------------------------------------------------------


async def test_reasoning_items_given_back_reach_a_vllm_backend_as_the_turns_reasoning_content() -> None:
    """The OpenAI Agents SDK's tool loop sends each turn's reasoning item back before its calls:
    dropped, vLLM's gpt-oss lost the analysis behind its own tool calls (which vLLM's own
    Responses API keeps), Qwen3's template the thinking of the tool loop it was in. A hosted
    API, which refuses the field, is not sent it."""
    loop: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "I should call get_weather."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        # A summary is the text of one that has no content (OpenAI's own, when it gave one).
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "Now the time."}]},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": '{"tz": "CET"}'},
        {"type": "function_call_output", "call_id": "call_2", "output": "noon"},
        {"type": "reasoning", "id": "rs_3", "summary": [], "encrypted_content": "gAAAA"},  # nothing to read
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny at noon."}]},
        {"role": "user", "content": "And tomorrow?"},
    ]
    vllm, hosted = OpenAIBackend(), OpenAIBackend()
    async with vllm.serve() as v, hosted.serve() as h, running_gateway(
        backend("vllm", v.url, default=True), backend("hosted", h.url, prefixes=("gpt-",), chat_template_fields=False),
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        await client.responses.create(model="qwen3-8b", input=loop, tools=TOOLS)
        await client.responses.create(model="gpt-4o", input=loop, tools=TOOLS)
        await client.close()
    turns = [(m["role"], m.get("reasoning_content")) for m in vllm.requests[-1].json["messages"]]
    assert turns == [
        ("user", None), ("assistant", "I should call get_weather."), ("tool", None), ("assistant", "Now the time."),
        ("tool", None), ("assistant", None), ("user", None),
    ]
    assert vllm.requests[-1].json["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert all("reasoning_content" not in m for m in hosted.requests[-1].json["messages"])  # it would refuse the field


@pytest.mark.parametrize("stream", [False, True])
async def test_claudes_signed_thinking_goes_back_to_it_in_a_tool_loop(setup: Setup, stream: bool) -> None:
    """The Agents SDK in front of Claude, reasoning on: each turn's reasoning item, given back
    before its call, brings Claude its signed thinking (in `encrypted_content`, opaque to the
    client as OpenAI's is), so the loop goes on thinking; without it the gateway had to switch
    thinking off after the first tool call (Claude wants the last turn's signed thinking back)."""
    claude = setup.fake("anthropic")
    claude.strict_thinking = True  # refuses, as Anthropic does, a loop's turn without its signed thinking
    claude.set_script(Script(reasoning=["Weather ", "first."], tokens=[], tool_calls=[("get_weather", {"city": "Paris"})]))
    asked: Any = {"model": MODELS["anthropic"], "tools": TOOLS, "reasoning": {"effort": "medium"}}
    if stream:
        async with setup.client.responses.stream(input="Weather in Paris?", **asked) as events:
            first = await events.get_final_response()
    else:
        first = await setup.client.responses.create(input="Weather in Paris?", **asked)
    assert claude.requests[-1].json["thinking"]["type"] == "enabled"
    reasoning = next(item for item in first.output if item.type == "reasoning")
    call = next(item for item in first.output if item.type == "function_call")
    assert reasoning.encrypted_content and [part.text for part in reasoning.content or []] == ["Weather first."]
    claude.set_script(Script(tokens=["Sunny."]))
    given = reasoning.model_dump(exclude_none=True)
    if stream:  # LangChain gives back a streamed reasoning item as its `encrypted_content` alone, as OpenAI's suffices
        given = {key: given[key] for key in ("type", "id", "summary", "encrypted_content")}
    loop: Any = [
        {"role": "user", "content": "Weather in Paris?"}, given,
        call.model_dump(exclude_none=True), {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    assert (await setup.client.responses.create(input=loop, **asked)).output_text == "Sunny."
    sent = claude.requests[-1].json
    assert sent["thinking"]["type"] == "enabled"
    signature = "EqQBCkYIBxgCKkB" + hashlib.sha256(b"Weather first.").hexdigest()  # the fake's, for its thinking
    assert sent["messages"][1]["content"][0] == {"type": "thinking", "thinking": "Weather first.", "signature": signature}
    assert sent["messages"][1]["content"][1]["type"] == "tool_use"


UPSTREAM = {
    "openai": [("x-request-id", "req_hosted"), ("x-ratelimit-remaining-requests", "4999"), ("openai-processing-ms", "321")],
    "anthropic": [("anthropic-ratelimit-requests-remaining", "4999")],
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_the_backends_request_id_limits_and_retry_advice_reach_a_responses_client(
    setup: Setup, kind: str, stream: bool,
) -> None:
    """What an OpenAI client reads off `with_raw_response` (and backs off by) comes from the
    backend that answered, on `/v1/responses` as on `/v1/chat/completions`."""
    fake = setup.fake(kind)
    fake.push(Script(headers=UPSTREAM[kind]))
    raw = await setup.client.responses.with_raw_response.create(model=MODELS[kind], input="hi", stream=stream)
    if stream:
        async for _ in raw.parse():  # type: ignore[union-attr]
            pass
    upstream = raw.headers["x-upstream-request-id"]
    assert upstream == "req_hosted" if kind == "openai" else upstream.startswith("req_")
    assert upstream != raw.headers["x-request-id"]
    assert raw.headers["x-ratelimit-remaining-requests"] == "4999"

    fake.push(Script(status=429, retry_after=2, headers=[("retry-after-ms", "1500"), *UPSTREAM[kind]]))
    with pytest.raises(openai.RateLimitError) as info:
        await setup.client.responses.create(model=MODELS[kind], input="hi", stream=stream)
    headers = info.value.response.headers
    assert headers["retry-after-ms"] == "1500" and headers.get_list("retry-after") == ["2"]
    assert headers["x-upstream-request-id"] and headers["x-ratelimit-remaining-requests"] == "4999"


async def test_stream_options_without_stream_is_refused_as_openai_does(setup: Setup) -> None:
    """OpenAI's rule ("only set this when you set stream: true"): a client that set them but
    forgot `stream` meant to stream, and hears so rather than getting a whole answer."""
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.responses.create(model=MODELS["openai"], input="hi", stream_options={"include_obfuscation": False})
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "stream_options"
    assert error["message"] == "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    async with setup.client.responses.stream(
        model=MODELS["openai"], input="hi", stream_options={"include_obfuscation": False},
    ) as events:
        assert (await events.get_final_response()).status == "completed"


@pytest.mark.parametrize("kind", KINDS)
async def test_a_function_call_not_streamed(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=[], tool_calls=[("get_weather", {"city": "Paris"})]))
    response = await setup.client.responses.create(model=MODELS[kind], input="Weather?", tools=TOOLS)
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].call_id and calls[0].status == "completed" and response.status == "completed"
    body = sent(setup, kind)
    names = [t["name"] if kind == "anthropic" else t["function"]["name"] for t in body["tools"]]
    assert names == ["get_weather", "get_time"]


@pytest.mark.parametrize("kind", KINDS)
async def test_parallel_calls_streamed(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(PARALLEL)
    argument_deltas = 0
    async with setup.client.responses.stream(model=MODELS[kind], input="Weather and time?", tools=TOOLS) as stream:
        async for event in stream:
            if event.type == "response.function_call_arguments.delta":
                argument_deltas += 1
        response = await stream.get_final_response()
    calls = [(item.name, json.loads(item.arguments)) for item in response.output if item.type == "function_call"]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})]
    assert argument_deltas >= 2
    ids = [item.call_id for item in response.output if item.type == "function_call"]
    assert len(set(ids)) == 2 and all(ids)


# Codex CLI (0.171, `wire_api = "responses"`, its only wire API) sends its sub-agent tools as a
# namespace on every request.
CODEX_TOOLS: Any = [
    {"type": "function", "name": "exec_command", "description": "Runs a command.", "strict": False,
     "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}},
    {"type": "namespace", "name": "multi_agent_v1", "description": "Tools for spawning and managing sub-agents.",
     "tools": [
         {"type": "function", "name": "close_agent", "description": "Close an agent.", "strict": False,
          "parameters": {"type": "object", "properties": {"target": {"type": "string"}}, "required": ["target"]}},
         {"type": "function", "name": "spawn_agent", "strict": False,
          "parameters": {"type": "object", "properties": {"task": {"type": "string"}}}},
     ]},
]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_namespaces_tools_are_offered_and_their_calls_name_the_namespace(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=[], tool_calls=[("multi_agent_v1__close_agent", {"target": "a1"})]))
    body = {"model": MODELS[kind], "input": "Close agent a1.", "tools": CODEX_TOOLS, "store": False,
            "include": ["reasoning.encrypted_content"], "parallel_tool_calls": True, "tool_choice": "auto"}
    whole = await raw_post(setup, body)
    assert whole.status_code == 200, whole.text
    backend_body = sent(setup, kind)
    names = [t["name"] if kind == "anthropic" else t["function"]["name"] for t in backend_body["tools"]]
    assert names == ["exec_command", "multi_agent_v1__close_agent", "multi_agent_v1__spawn_agent"]
    [call] = [item for item in whole.json()["output"] if item["type"] == "function_call"]
    assert (call["namespace"], call["name"], json.loads(call["arguments"])) == ("multi_agent_v1", "close_agent", {"target": "a1"})
    assert [t["type"] for t in whole.json()["tools"]] == ["function", "namespace"]
    assert [t["name"] for t in whole.json()["tools"][1]["tools"]] == ["close_agent", "spawn_agent"]
    async with httpx.AsyncClient(base_url=setup.url, timeout=10) as http:
        streamed = await http.post("/v1/responses", json={**body, "stream": True})
    events = [json.loads(frame.split("data: ", 1)[1]) for frame in streamed.text.split("\n\n") if "data: " in frame]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call"]
    assert [(item["namespace"], item["name"]) for item in done] == [("multi_agent_v1", "close_agent")]
    added = [e["item"] for e in events if e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call"]
    assert [(item["namespace"], item["name"]) for item in added] == [("multi_agent_v1", "close_agent")]
    # The call handed back, as Codex does, reaches the backend under the name it was offered.
    setup.fake(kind).set_script(Script(tokens=["Closed."]))
    follow_up = await raw_post(setup, {**body, "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Close agent a1."}]},
        {"type": "function_call", "call_id": call["call_id"], "namespace": "multi_agent_v1", "name": "close_agent",
         "arguments": call["arguments"]},
        {"type": "function_call_output", "call_id": call["call_id"], "output": "closed"},
    ]})
    assert follow_up.status_code == 200, follow_up.text
    history = json.dumps(sent(setup, kind)["messages"])
    assert "multi_agent_v1__close_agent" in history


async def test_codexs_web_search_tool_is_a_400_that_says_how_to_switch_it_off(setup: Setup) -> None:
    """Codex offers OpenAI's hosted web search on every request by default; no backend here can
    run it, and the refusal alone left its users guessing."""
    response = await raw_post(setup, {"model": MODELS["openai"], "input": "Hi", "stream": True,
                                      "tools": [*CODEX_TOOLS, {"type": "web_search", "external_web_access": True}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tools[2].type" and error["code"] == "unsupported_tool"
    assert 'web_search = "disabled"' in error["message"]


async def test_an_mcp_servers_calls_name_its_namespace_whole(setup: Setup) -> None:
    """Codex names an MCP server's namespace `mcp__<server>`: a call of `mcp__github__create_issue`
    is that namespace's `create_issue`, whole and streamed. It came back as a plain function of
    that flat name (the first `__` taken for the end of the namespace), which Codex does not offer."""
    tools = [*CODEX_TOOLS, {"type": "namespace", "name": "mcp__github", "description": "GitHub.", "tools": [
        {"type": "function", "name": "create_issue", "strict": False, "parameters": {"type": "object", "properties": {}}},
    ]}]
    setup.fake("openai").set_script(Script(tokens=[], tool_calls=[("mcp__github__create_issue", {})]))
    body = {"model": MODELS["openai"], "input": "File it.", "tools": tools, "store": False}
    whole = await raw_post(setup, body)
    assert whole.status_code == 200, whole.text
    assert [t["function"]["name"] for t in sent(setup, "openai")["tools"]][-1] == "mcp__github__create_issue"
    [call] = [item for item in whole.json()["output"] if item["type"] == "function_call"]
    assert (call.get("namespace"), call["name"]) == ("mcp__github", "create_issue")
    async with httpx.AsyncClient(base_url=setup.url, timeout=10) as http:
        streamed = await http.post("/v1/responses", json={**body, "stream": True})
    events = [json.loads(frame.split("data: ", 1)[1]) for frame in streamed.text.split("\n\n") if "data: " in frame]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call"]
    assert [(item.get("namespace"), item["name"]) for item in done] == [("mcp__github", "create_issue")]


async def test_an_image_a_tool_returned_reaches_an_openai_backend_in_a_user_message(setup: Setup) -> None:
    """Codex's `view_image` answers with the image in `function_call_output`; vLLM refuses an
    image in a tool message ("tool message content only supports text"), as OpenAI does."""
    image = "data:image/png;base64,iVBORw0KGgo="
    response = await raw_post(setup, {"model": MODELS["openai"], "stream": True, "tools": CODEX_TOOLS, "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What does shot.png show?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "view_image", "arguments": '{"path": "shot.png"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_image", "image_url": image}]},
    ]})
    assert response.status_code == 200, response.text
    assert sent(setup, "openai")["messages"][2:] == [
        {"role": "tool", "content": "[1 image attached in the next user message]", "tool_call_id": "call_1"},
        {"role": "user", "content": [
            {"type": "text", "text": "Image returned by tool call call_1:"},
            {"type": "image_url", "image_url": {"url": image}},
        ]},
    ]


async def test_a_file_a_tool_returned_reaches_an_openai_backend_in_a_user_message(setup: Setup) -> None:
    """A `function_call_output` may hold an `input_file` (a PDF) beside its images: OpenAI's and
    vLLM's tool messages take text only, so the file goes with the images (it stayed in the tool
    message: OpenAI's 400 "tool messages only support text")."""
    image, pdf = "data:image/png;base64,iVBORw0KGgo=", "data:application/pdf;base64,JVBERi0xLjQ="
    response = await raw_post(setup, {"model": MODELS["openai"], "tools": CODEX_TOOLS, "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Summarize the memo."}]},
        {"type": "function_call", "call_id": "call_1", "name": "fetch", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": [
            {"type": "input_text", "text": "Fetched."}, {"type": "input_image", "image_url": image},
            {"type": "input_file", "file_data": pdf, "filename": "memo.pdf"},
        ]},
    ]})
    assert response.status_code == 200, response.text
    assert sent(setup, "openai")["messages"][2:] == [
        {"role": "tool", "content": [
            {"type": "text", "text": "Fetched."},
            {"type": "text", "text": "[1 image and 1 file attached in the next user message]"},
        ], "tool_call_id": "call_1"},
        {"role": "user", "content": [
            {"type": "text", "text": "Image and file returned by tool call call_1:"},
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "file", "file": {"file_data": pdf, "filename": "memo.pdf"}},
        ]},
    ]


async def test_reasoning_items_handed_back_reach_vllm_with_their_turn(setup: Setup) -> None:
    """Codex and opencode give each turn's reasoning item back (as this gateway gave it) ahead
    of its calls: dropped, Qwen3's template lost the tool loop's thinking and vLLM's gpt-oss
    the analysis behind its own calls."""
    body = {"model": MODELS["openai"], "tools": CODEX_TOOLS, "store": False, "stream": True,
            "include": ["reasoning.encrypted_content"], "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What does hello.py print?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None,
         "content": [{"type": "reasoning_text", "text": "I should list the files."}]},
        {"type": "function_call", "call_id": "call_1", "name": "exec_command", "arguments": '{"cmd": "ls"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "hello.py"},
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "Read it."}]},
        {"type": "function_call", "call_id": "call_2", "name": "exec_command", "arguments": '{"cmd": "cat hello.py"}'},
        {"type": "function_call", "call_id": "call_3", "name": "exec_command", "arguments": '{"cmd": "pwd"}'},
        {"type": "function_call_output", "call_id": "call_2", "output": "print(1)"},
        {"type": "function_call_output", "call_id": "call_3", "output": "/src"},
        # OpenAI's own reasoning, encrypted: nothing a template could read.
        {"type": "reasoning", "id": "rs_3", "summary": [], "encrypted_content": "gAAAA..."},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It prints 1."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Thanks"}]},
    ]}
    response = await raw_post(setup, body)
    assert response.status_code == 200, response.text
    assistants = [m for m in sent(setup, "openai")["messages"] if m["role"] == "assistant"]
    assert [m.get("reasoning_content") for m in assistants] == ["I should list the files.", "Read it.", None]
    assert [len(m.get("tool_calls") or []) for m in assistants] == [1, 2, 0]


async def test_interleaved_parallel_calls_from_an_openai_backend(setup: Setup) -> None:
    setup.fake("openai").set_script(
        Script(tool_calls=PARALLEL.tool_calls, tool_arg_fragment=3, interleave_tool_calls=True)
    )
    async with setup.client.responses.stream(model=MODELS["openai"], input="both", tools=TOOLS) as stream:
        response = await stream.get_final_response()
    calls = [(item.name, json.loads(item.arguments)) for item in response.output if item.type == "function_call"]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})]


def follow_up_input() -> Any:
    return [
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "call_w", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_t", "name": "get_time", "arguments": '{"tz":"Europe/Paris"}'},
        {"type": "function_call_output", "call_id": "call_w", "output": "Sunny"},
        {"type": "function_call_output", "call_id": "call_t", "output": "12:00"},
    ]


@pytest.mark.parametrize("kind", KINDS)
async def test_the_follow_up_turn_reaches_each_backend_in_its_own_shape(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=["Sunny", " at noon"]))
    response = await setup.client.responses.create(
        model=MODELS[kind], input=follow_up_input(), tools=TOOLS, instructions="Be brief.",
    )
    assert response.output_text == "Sunny at noon"
    body = sent(setup, kind)
    if kind == "openai":
        assert body["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and the time?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_w", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_t", "type": "function", "function": {"name": "get_time", "arguments": '{"tz":"Europe/Paris"}'}},
            ]},
            {"role": "tool", "content": "Sunny", "tool_call_id": "call_w"},
            {"role": "tool", "content": "12:00", "tool_call_id": "call_t"},
        ]
    elif kind == "anthropic":
        assert body["system"] == "Be brief."
        assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
        uses = body["messages"][1]["content"]
        assert [(b["type"], b["id"], b["input"]) for b in uses] == [
            ("tool_use", "call_w", {"city": "Paris"}), ("tool_use", "call_t", {"tz": "Europe/Paris"}),
        ]
        results = body["messages"][2]["content"]
        assert [(b["type"], b["tool_use_id"]) for b in results] == [("tool_result", "call_w"), ("tool_result", "call_t")]
    else:
        messages = body["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]
        assert [c["function"]["name"] for c in messages[2]["tool_calls"]] == ["get_weather", "get_time"]
        assert [m["content"] for m in messages[3:]] == ["Sunny", "12:00"]


async def test_tool_choice_and_parallel_setting_reach_the_backend(setup: Setup) -> None:
    await setup.client.responses.create(
        model=MODELS["openai"], input="x", tools=TOOLS, tool_choice={"type": "function", "name": "get_time"},
        parallel_tool_calls=False,
    )
    body = sent(setup, "openai")
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert body["parallel_tool_calls"] is False


def offered_tools(body: dict[str, Any], kind: str) -> list[str]:
    """The names of the tools a backend of `kind` was given."""
    tools = body.get("tools") or []
    return [tool["name"] if kind == "anthropic" else tool["function"]["name"] for tool in tools]


@pytest.mark.parametrize("kind", KINDS)
async def test_allowed_tools_limit_the_tools_each_backend_may_call(setup: Setup, kind: str) -> None:
    """OpenAI's `allowed_tools` choice (all tools sent, a few allowed): the backend is offered
    those few, `required` forcing a call among them; the Response echoes the tools and the
    choice as sent, and the SDK parses both."""
    script_call = Script(tool_calls=[("get_time", {"tz": "UTC"})])
    setup.fake(kind).push(script_call)
    choice: Any = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]}
    response = await setup.client.responses.create(model=MODELS[kind], input="x", tools=TOOLS, tool_choice=choice)
    body = sent(setup, kind)
    assert offered_tools(body, kind) == ["get_time"]
    if kind != "ollama":  # Ollama forces nothing: offering the allowed tools alone is what it can do
        assert body["tool_choice"] == ({"type": "any"} if kind == "anthropic" else "required")
    assert [tool.name for tool in response.tools if tool.type == "function"] == ["get_weather", "get_time"]
    assert response.tool_choice.type == "allowed_tools" and response.tool_choice.mode == "required"
    assert [item.name for item in response.output if item.type == "function_call"] == ["get_time"]

    await setup.client.responses.create(
        model=MODELS[kind], input="x", tools=TOOLS, tool_choice={**choice, "mode": "auto"},
    )
    assert offered_tools(sent(setup, kind), kind) == ["get_time"]


@pytest.mark.parametrize(("choice", "param"), [
    ({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "get_stock"}]},
     "tool_choice.tools[0]"),
    ({"type": "allowed_tools", "mode": "auto", "tools": [{"type": "web_search"}]}, "tool_choice.tools[0].type"),
    ({"type": "allowed_tools", "mode": "any", "tools": [{"type": "function", "name": "get_time"}]}, "tool_choice.mode"),
    ({"type": "allowed_tools", "mode": "auto", "tools": []}, "tool_choice.tools"),
])
async def test_an_allowed_tools_choice_the_model_cannot_follow_is_a_400(
    setup: Setup, choice: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.responses.create(model=MODELS["openai"], input="x", tools=TOOLS, tool_choice=choice)
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param
    assert setup.fake("openai").requests == []


PDF = "data:application/pdf;base64,JVBERi0xLjQgZmFrZQ=="


def with_file(file_data: str = PDF, **part: Any) -> Any:
    return [{"role": "user", "content": [
        {"type": "input_file", "file_data": file_data, "filename": "report.pdf", **part},
        {"type": "input_text", "text": "Summarize it."},
    ]}]


async def test_an_inline_file_reaches_the_backends_that_read_it(setup: Setup) -> None:
    """`input_file` with `file_data`: an OpenAI-compatible backend gets the chat `file` part,
    an Anthropic one the PDF as a `document`, as an OpenAI chat client's `file` part does."""
    await setup.client.responses.create(model=MODELS["openai"], input=with_file())
    part = sent(setup, "openai")["messages"][0]["content"][0]
    assert part == {"type": "file", "file": {"file_data": PDF, "filename": "report.pdf"}}
    await setup.client.responses.create(model=MODELS["anthropic"], input=with_file(), stream=True)
    block = sent(setup, "anthropic")["messages"][0]["content"][0]
    assert block == {
        "type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQgZmFrZQ=="},
        "title": "report.pdf",
    }


@pytest.mark.parametrize(("kind", "fields", "param"), [
    ("ollama", {}, "input[0].content[0]"),  # Ollama reads no files
    ("anthropic", {"file_data": "data:text/plain;base64,aGk="}, "input[0].content[0]"),  # Anthropic: PDFs only
    ("openai", {"file_id": "file-abc"}, "input[0].content[0].file_id"),  # no Files API behind it
])
async def test_a_file_the_backend_cannot_read_is_a_400_not_an_answer_without_it(
    setup: Setup, kind: str, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.responses.create(model=MODELS[kind], input=with_file(**fields))
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param
    assert setup.fake(kind).requests == []


# -- settings, reasoning, limits ---------------------------------------------------------------------------


async def test_settings_reach_an_openai_backend(setup: Setup) -> None:
    response = await setup.client.responses.create(
        model=MODELS["openai"], input="x", temperature=0.3, top_p=0.8, max_output_tokens=64,
        reasoning={"effort": "low"},
        text={"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True}},
    )
    body = sent(setup, "openai")
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["reasoning_effort"]) == (0.3, 0.8, 64, "low")
    assert body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    }
    # The Response echoes what was asked.
    assert (response.temperature, response.top_p, response.max_output_tokens) == (0.3, 0.8, 64)
    assert response.text is not None and response.text.format is not None and response.text.format.type == "json_schema"


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_reasoning_is_a_reasoning_item(setup: Setup, kind: str) -> None:
    script = Script(reasoning=["Let me ", "think."], tokens=["42"], usage=Usage(9, 6, reasoning_tokens=3))
    setup.fake(kind).set_script(script)
    response = await setup.client.responses.create(model=MODELS[kind], input="Answer?", reasoning={"effort": "high"})
    assert [item.type for item in response.output] == ["reasoning", "message"]
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "Let me think." and response.output_text == "42"
    setup.fake(kind).set_script(script)
    deltas = []
    async with setup.client.responses.stream(model=MODELS[kind], input="Answer?") as stream:
        async for event in stream:
            if event.type == "response.reasoning_text.delta":
                deltas.append(event.delta)
        streamed = await stream.get_final_response()
    assert "".join(deltas) == "Let me think." and streamed.output_text == "42"
    if kind == "openai":
        assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens == 3


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_reasoning_asked_with_a_summary_is_given_as_the_summary(setup: Setup, kind: str) -> None:
    """The AI SDK's `openai(...)`, Codex CLI and LangChain.js show a model's reasoning only
    from summaries, which they ask for (`reasoning.summary`). The gateway makes none: the
    reasoning itself is the summary, as OpenAI gives one (`summary_text` parts, the
    `response.reasoning_summary_*` events), so that they show it rather than nothing."""
    setup.fake(kind).set_script(Script(reasoning=["Let me ", "think."], tokens=["42"]))
    asked: Any = {"effort": "high", "summary": "auto"}
    response = await setup.client.responses.create(model=MODELS[kind], input="Answer?", reasoning=asked)
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and not reasoning.content
    assert [(part.type, part.text) for part in reasoning.summary] == [("summary_text", "Let me think.")]
    events: list[Any] = []
    async with setup.client.responses.stream(model=MODELS[kind], input="Answer?", reasoning=asked) as stream:
        async for event in stream:
            events.append(event)
        streamed = await stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.reasoning_summary_text.delta"]
    assert "".join(deltas) == "Let me think." and all(e.summary_index == 0 for e in events if "summary" in e.type)
    kinds = [e.type for e in events if "reasoning" in e.type]
    assert kinds == [
        "response.reasoning_summary_part.added", *["response.reasoning_summary_text.delta"] * len(deltas),
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done",
    ]
    done = next(e.item for e in events if e.type == "response.output_item.done" and e.item.type == "reasoning")
    assert [part.text for part in done.summary] == ["Let me think."] and not done.content
    assert streamed.output[0].type == "reasoning" and streamed.output[0].summary[0].text == "Let me think."
    assert streamed.output_text == "42"


async def test_cached_and_reasoning_token_counts(setup: Setup) -> None:
    setup.fake("openai").set_script(Script(tokens=["x"], usage=Usage(100, 20, cached_tokens=64, reasoning_tokens=12)))
    response = await setup.client.responses.create(model=MODELS["openai"], input="x")
    usage = response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (100, 20, 120)
    assert (usage.input_tokens_details.cached_tokens, usage.output_tokens_details.reasoning_tokens) == (64, 12)


@pytest.mark.parametrize("kind", KINDS)
async def test_max_output_tokens_cuts_the_answer_into_an_incomplete_response(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(n_tokens=10))
    response = await setup.client.responses.create(model=MODELS[kind], input="Go on", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "w0 w1 w2 "
    events = [e async for e in await setup.client.responses.create(
        model=MODELS[kind], input="Go on", max_output_tokens=3, stream=True,
    )]
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]
    assert events[-1].response.output_text == "w0 w1 w2 "


# -- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "param"), [
    ({"input": 5}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"conversation": 5}, "conversation"),
    ({"conversation": {"id": ""}}, "conversation.id"),
    ({"background": True, "store": False}, "store"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    # A forced call the model cannot make (a chat backend, an Ollama one most of all, would
    # answer in text): OpenAI's 400, as on `/v1/chat/completions`.
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "get_stock"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    # A misspelt `include` would otherwise quietly leave out what was asked for.
    ({"include": ["reasoning.encrypted_content", "message.output_text.logprob"]}, "include[1]"),
])
async def test_bad_input_is_a_400_in_openais_shape(setup: Setup, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.responses.create(**{"model": MODELS["openai"], "input": "x", **fields})
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param and body["type"] == "invalid_request_error"
    assert setup.fake("openai").requests == []  # refused before any backend heard of it


async def test_stateful_requests_say_what_to_do_instead(setup: Setup) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.responses.create(model=MODELS["openai"], input="more", prompt={"id": "pmpt_1"})
    assert "send the prompt's text in `instructions` and `input`" in info.value.message
    # Conversations are kept in PostgreSQL, which this gateway runs without: no retry helps.
    with pytest.raises(openai.InternalServerError) as stored:
        await setup.client.responses.create(model=MODELS["openai"], input="more", conversation="conv_1")
    assert stored.value.status_code == 503
    assert isinstance(stored.value.body, dict) and stored.value.body["code"] == "database_not_configured"
    assert stored.value.response.headers.get("x-should-retry") == "false"
    # A response the journal does not keep cannot be continued.
    with pytest.raises(openai.BadRequestError) as unknown:
        await setup.client.responses.create(model=MODELS["openai"], input="more", previous_response_id="resp_1")
    assert isinstance(unknown.value.body, dict) and unknown.value.body["code"] == "previous_response_not_found"
    with pytest.raises(openai.BadRequestError) as tools:
        await setup.client.responses.create(model=MODELS["openai"], input="x", tools=[{"type": "file_search", "vector_store_ids": ["vs"]}])
    assert "function tools only" in tools.value.message


async def test_responses_outside_the_journal_are_404s(setup: Setup) -> None:
    for missing in ("resp_123", "not-a-response-id"):
        with pytest.raises(openai.NotFoundError) as info:
            await setup.client.responses.retrieve(missing)
        assert "This gateway keeps no responses (it has no database)" in info.value.message
    for call in (
        setup.client.responses.cancel("resp_123"), setup.client.responses.input_items.list("resp_123"),
        setup.client.responses.delete("resp_123"),
    ):
        with pytest.raises(openai.NotFoundError):
            await call


async def test_background_needs_a_journal(setup: Setup) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.responses.create(model=MODELS["openai"], input="x", background=True, stream=True)
    assert info.value.param == "background" and "journal" in info.value.message


async def test_unknown_model_is_a_404(setup: Setup) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await setup.client.responses.create(model="gpt-9", input="x")
    assert "gpt-9" in info.value.message
    with pytest.raises(openai.NotFoundError):
        await setup.client.responses.create(model="gpt-9", input="x", stream=True)


@pytest.mark.parametrize("stream", [False, True])
async def test_backend_error_before_the_answer_is_a_502_with_its_message(setup: Setup, stream: bool) -> None:
    setup.fake("openai").set_script(Script(status=500, error_message="CUDA out of memory"))
    with pytest.raises(openai.InternalServerError) as info:
        await setup.client.responses.create(model=MODELS["openai"], input="x", stream=stream)
    assert info.value.status_code == 502 and "CUDA out of memory" in info.value.message


async def test_first_token_timeout_is_a_504_and_closes_the_backend() -> None:
    fake = OpenAIBackend(default=Script(stall_before_headers=True))
    quick = Timeouts(connect=2, first_token=0.3, idle=5, total=30)
    async with fake.serve() as server, running_gateway(backend("slow", server.url, default=True, timeouts=quick)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            await client.responses.create(model="m", input="x", stream=True)
        assert info.value.status_code == 504
        await fake.wait_disconnect(2.0)
        await client.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_failure_mid_stream_is_response_failed(setup: Setup, kind: str) -> None:
    setup.fake(kind).set_script(Script(tokens=list("abcdefgh"), fail_after=4, error_message="engine died"))
    events = []
    async with setup.client.responses.stream(model=MODELS[kind], input="x") as stream:
        async for event in stream:
            events.append(event)
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            await stream.get_final_response()
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.status == "failed" and failed.response.error is not None
    assert failed.response.error.code == "server_error"
    assert "engine died" in failed.response.error.message
    said = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert said and failed.response.output[0].content[0].text == "".join(said)  # type: ignore[union-attr,index]


async def test_idle_timeout_mid_stream_is_response_failed_and_closes_the_backend() -> None:
    fake = OpenAIBackend(default=Script(tokens=["a", "b", "c", "d"], stall_after=3))
    quick = Timeouts(connect=2, first_token=5, idle=0.3, total=30)
    async with fake.serve() as server, running_gateway(backend("slow", server.url, default=True, timeouts=quick)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        events = [e async for e in await client.responses.create(model="m", input="x", stream=True)]
        assert events[-1].type == "response.failed"
        assert "idle" in events[-1].response.error.message  # type: ignore[union-attr]
        await fake.wait_disconnect(2.0)
        await client.close()


# -- cancellation ------------------------------------------------------------------------------------------


async def test_disconnect_mid_stream_closes_the_backend_request(setup: Setup) -> None:
    fake = setup.fake("openai")
    fake.set_script(Script(n_tokens=1000, pace=0.01))
    body = {"model": MODELS["openai"], "input": "x", "stream": True}
    async with httpx.AsyncClient(base_url=setup.url) as client:
        async with client.stream("POST", "/v1/responses", json=body) as response:
            lines = response.aiter_lines()
            for _ in range(12):
                await lines.__anext__()
    gone = await fake.wait_disconnect(2.0)
    assert 0 < gone.frames_sent < 1000
    await fake.wait_idle(2.0)


async def test_disconnect_while_a_whole_response_waits_closes_the_backend_request(setup: Setup) -> None:
    fake = setup.fake("anthropic")
    fake.set_script(Script(n_tokens=100, pace=0.2))  # a 20 s generation
    async with httpx.AsyncClient(base_url=setup.url) as client:
        with trio.move_on_after(0.3):
            await client.post("/v1/responses", json={"model": MODELS["anthropic"], "input": "x"})
    await fake.wait_disconnect(2.0)
    await fake.wait_idle(2.0)


# -- what an exchange brings -------------------------------------------------------------------------------


async def test_an_idempotency_key_replays_the_answer_and_the_log_names_the_dialect(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(tokens=["Once", " upon", " a", " time"], usage=Usage(7, 4)))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        key = {"Idempotency-Key": str(uuid.uuid4())}
        answered = await client.responses.with_raw_response.create(model="m", input="A story", extra_headers=key)
        first = answered.parse()
        trace = answered.headers["x-trace-id"]
        await wait_for_row(pg_database_url, trace, "completed")
        assert rows(pg_database_url, "SELECT dialect, model FROM chat_log WHERE trace_id = %s", trace) == [("responses", "m")]
        again = await client.responses.with_raw_response.create(model="m", input="A story", stream=True, extra_headers=key)
        assert again.headers.get("idempotent-replayed") == "true"
        events = [event async for event in again.parse()]
        assert events[-1].type == "response.completed"
        assert events[-1].response.output_text == first.output_text == "Once upon a time"
        # The replay is the first run's Response, by its id too: the id reads it back.
        assert {event.response.id for event in events if hasattr(event, "response")} == {first.id}
        assert events[-1].response.output[0].id == first.output[0].id
        whole = await client.responses.create(model="m", input="A story", extra_headers=key)
        assert whole.id == first.id and whole.output_text == first.output_text
        assert (await client.responses.retrieve(whole.id)).output_text == first.output_text
        assert len(fake.requests) == 1
        await client.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_response_is_read_back_the_moment_its_client_has_it(
    aio_loop: object, pg_database_url: str, nats_url: str, stream: bool
) -> None:
    """Its row is written once the client has the answer: a read right after waits for it."""
    fake = OpenAIBackend(default=Script(tokens=["Once", " upon"], usage=Usage(7, 2)))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        for _ in range(3):
            if stream:
                events = [event async for event in await client.responses.create(model="m", input="A story", stream=True)]
                first = events[-1].response
            else:
                first = await client.responses.create(model="m", input="A story")
            again = await client.responses.retrieve(first.id)
            assert (again.id, again.status, again.model, again.output_text) == (first.id, "completed", "m", "Once upon")
        await client.close()


async def test_a_response_is_read_back_whole_from_the_journal(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(tokens=["Once", " upon", " a", " time"], usage=Usage(7, 4)))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        first = await client.responses.create(model="m", input="A story")
        await wait_for_row(pg_database_url, first.id.removeprefix("resp_"), "completed")
        again = await client.responses.retrieve(first.id)
        await client.close()
    assert (again.id, again.status, again.model) == (first.id, "completed", "m")
    assert again.output_text == first.output_text == "Once upon a time"
    assert again.usage is not None and (again.usage.input_tokens, again.usage.output_tokens) == (7, 4)


async def test_a_background_stream_goes_on_without_its_client_and_resumes_after_its_last_event(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    tokens = [f" w{i}" for i in range(40)]
    fake = OpenAIBackend(default=Script(tokens=tokens, usage=Usage(5, 40), pace=0.02))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        seen: list[Any] = []
        stream = await client.responses.create(model="m", input="Count", stream=True, background=True)
        async for event in stream:
            seen.append(event)
            if event.type == "response.output_text.delta" and len(seen) >= 10:
                break
        await stream.close()  # the connection drops mid-answer
        response_id = seen[0].response.id
        assert seen[0].response.background is True
        rest = await client.responses.retrieve(response_id, stream=True, starting_after=seen[-1].sequence_number)
        resumed = [event async for event in rest]
        await client.close()
    assert resumed[0].sequence_number == seen[-1].sequence_number + 1
    events = seen + resumed
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[-1].type == "response.completed" and events[-1].response.id == response_id
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == "".join(tokens) == events[-1].response.output_text
    # The backend was never told to stop: the run outlived its first client.
    assert [generation.outcome for generation in fake.recorder.generations] == ["completed"]


async def test_a_failed_response_read_back_holds_what_was_said_before_the_failure(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(tokens=["Once", " upon", " a", " time"], fail_after=3))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        events = [event async for event in await client.responses.create(model="m", input="A story", stream=True)]
        failed = events[-1].response
        again = await client.responses.retrieve(failed.id)
        await client.close()
    assert events[-1].type == "response.failed" and failed.output_text == "Once upon"
    assert (again.status, again.output_text) == ("failed", "Once upon")
    assert again.error is not None and again.error.code == "server_error"


async def test_a_running_response_read_back_says_when_it_was_created(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(tokens=[f" w{i}" for i in range(40)], pace=0.05))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        stream = await client.responses.create(model="m", input="Count", stream=True, background=True)
        async for event in stream:
            created = event.response
            break
        await stream.close()
        await wait_for_row(pg_database_url, created.id.removeprefix("resp_"), "running")
        polled = await client.responses.retrieve(created.id)
        await client.close()
    assert polled.status == "in_progress" and abs(polled.created_at - created.created_at) <= 2


async def test_a_background_response_read_back_at_once_is_in_progress(
    aio_loop: object, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The log writer holds a run's `running` row back for a moment; here, for the whole run.
    monkeypatch.setattr(LogWriter, "START_DELAY", 60.0)
    fake = OpenAIBackend(default=Script(tokens=[f" w{i}" for i in range(20)], pace=0.05))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        stream = await client.responses.create(model="m", input="Count", stream=True, background=True)
        async for event in stream:
            response_id = event.response.id
            break
        await stream.close()
        polled = await client.responses.retrieve(response_id)
        assert (polled.id, polled.status) == (response_id, "in_progress")
        # What it has said so far, if anything: a run on this instance is read live.
        assert "".join(f" w{i}" for i in range(20)).startswith(polled.output_text)
        await wait_for_row(pg_database_url, response_id.removeprefix("resp_"), "completed")
        done = await client.responses.retrieve(response_id)
        await client.close()
    assert done.status == "completed" and done.output_text == "".join(f" w{i}" for i in range(20))


async def test_a_resume_the_journal_cannot_number_as_the_stream_was_is_a_409_not_a_cut_answer(
    aio_loop: object, pg_database_url: str
) -> None:
    """Without NATS (or past its retention) a finished run's events are rebuilt from its row,
    the answer whole: numbered otherwise than the stream its client saw part of."""
    tokens = [f" w{i}" for i in range(30)]
    fake = OpenAIBackend(default=Script(tokens=tokens, usage=Usage(5, 30), pace=0.02))
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        seen: list[Any] = []
        stream = await client.responses.create(model="m", input="Count", stream=True, background=True)
        async for event in stream:
            seen.append(event)
            if event.type == "response.output_text.delta" and len(seen) >= 10:
                break
        await stream.close()
        response_id = seen[0].response.id
        await wait_for_row(pg_database_url, response_id.removeprefix("resp_"), "completed")
        with pytest.raises(openai.ConflictError) as refused:
            rest = await client.responses.retrieve(response_id, stream=True, starting_after=seen[-1].sequence_number)
            [event async for event in rest]
        assert refused.value.code == "resume_unavailable" and f"GET /v1/responses/{response_id}" in refused.value.message
        # Read whole, or from the start, it is all there.
        whole = await client.responses.retrieve(response_id)
        replayed = [event async for event in await client.responses.retrieve(response_id, stream=True)]
        await client.close()
    assert whole.output_text == replayed[-1].response.output_text == "".join(tokens)


async def test_an_unknown_response_is_the_same_404_whole_or_streamed(aio_loop: object, pg_database_url: str) -> None:
    async with running_gateway(backend("vllm", "http://127.0.0.1:9", default=True), database_url=pg_database_url) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.NotFoundError) as missing:
                if stream:
                    [event async for event in await client.responses.retrieve("resp_0123456789abcdef", stream=True)]
                else:
                    await client.responses.retrieve("resp_0123456789abcdef")
            assert (missing.value.code, missing.value.param) == ("response_not_found", "response_id")
            assert "'resp_0123456789abcdef' not found" in missing.value.message
        await client.close()


@pytest.mark.parametrize("background", [False, True])
async def test_a_stream_whose_backend_is_alive_but_says_nothing_hears_keep_alives(
    aio_loop: object, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch, background: bool
) -> None:
    """A background run's client reads the run's journal, not the backend: it hears the
    keep-alives all the same (every 0.4 s here) while the backend sends only comments."""
    monkeypatch.setattr("proxy.infra.backends._pump.KEEPALIVE_SECONDS", 0.4)
    fake = OpenAIBackend(default=Script(tokens=["a", "b", "c", "d"], stall_after=3, keepalive_interval=0.1))
    # The backend never ends: stopping, the gateway cuts the run (a background one goes on
    # without its client) once its grace is over, which need not be long here.
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url,
        shutdown_grace_seconds=0.2,
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        body = {"model": "m", "input": "x", "stream": True, "background": background}
        wire = b""
        with trio.move_on_after(3):
            async with http.stream("POST", "/v1/responses", json=body) as response:
                async for chunk in response.aiter_bytes():
                    wire += chunk
                    if wire.count(b": keep-alive\n\n") >= 2:
                        break
    assert b"response.output_text.delta" in wire and wire.count(b": keep-alive\n\n") >= 2


@pytest.mark.parametrize("stream", [False, True])
async def test_the_rag_route_answers_a_responses_client(corpus_url: str, stream: bool) -> None:
    fake = OpenAIBackend(default=Script(tokens=["Backups are kept ", "for 14 days [1]."]))
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True), database_url=corpus_url) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        question = "How long do we keep the nightly database backups?"
        raw = await client.responses.with_raw_response.create(
            model="m", input=question, instructions="You are terse.", stream=stream, extra_headers={"x-workspace": CORPUS},
        )
        parsed: Any = raw.parse()
        text = [event async for event in parsed][-1].response.output_text if stream else parsed.output_text
        assert text == "Backups are kept for 14 days [1]."
        assert json.loads(raw.headers["x-rag-sources"])[0]["source"] == "runbooks/postgres.md"
        system, asked = fake.requests[-1].json["messages"]
        # The client's instructions as they are (a prefix the backend's cache keeps); the
        # retrieved passages in front of the question.
        assert system == {"role": "system", "content": "You are terse."}
        assert "Backups are retained for 14 days" in asked["content"] and asked["content"].endswith(question)
        await client.close()


def echoed(response: Any) -> tuple[Any, ...]:
    """What a Response echoes of the request that made it."""
    return (
        response.instructions, [tool.name for tool in response.tools], response.metadata, response.temperature,
        response.max_output_tokens, response.background, response.safety_identifier, response.prompt_cache_key,
        response.prompt_cache_retention, response.max_tool_calls, response.reasoning and response.reasoning.summary,
    )


async def test_a_response_read_back_echoes_the_settings_it_was_asked_with(
    aio_loop: object, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No `running` row while it runs: the first reads find the live run, the later ones its row.
    monkeypatch.setattr(LogWriter, "START_DELAY", 60.0)
    tokens = [f" w{i}" for i in range(20)]
    fake = OpenAIBackend(default=Script(tokens=tokens, pace=0.05))
    asked: dict[str, Any] = {
        "instructions": "Count slowly.", "tools": TOOLS, "metadata": {"ticket": "T-1"}, "temperature": 0.3,
        "max_output_tokens": 500, "safety_identifier": "user-7f3a", "prompt_cache_key": "tenant-42",
        "prompt_cache_retention": "24h", "max_tool_calls": 3, "reasoning": {"summary": "auto"},
    }
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        seen: list[Any] = []
        stream = await client.responses.create(model="m", input="Count", stream=True, background=True, **asked)
        async for event in stream:
            seen.append(event)
            if event.type == "response.output_text.delta":
                break
        await stream.close()
        response_id = seen[0].response.id
        polled = await client.responses.retrieve(response_id)
        rest = [e async for e in await client.responses.retrieve(response_id, stream=True, starting_after=seen[-1].sequence_number)]
        await wait_for_row(pg_database_url, response_id.removeprefix("resp_"), "completed")
        whole = await client.responses.retrieve(response_id)
        replayed = [event async for event in await client.responses.retrieve(response_id, stream=True)]
        await client.close()
    live = echoed(seen[0].response)
    assert live == (
        "Count slowly.", ["get_weather", "get_time"], {"ticket": "T-1"}, 0.3, 500, True, "user-7f3a", "tenant-42",
        "24h", 3, "auto",
    )
    assert polled.status == "in_progress" and echoed(polled) == live
    assert rest[-1].type == "response.completed" and echoed(rest[-1].response) == live
    assert whole.output_text == "".join(tokens) and echoed(whole) == live
    assert replayed[0].type == "response.created" and echoed(replayed[0].response) == live
    assert echoed(replayed[-1].response) == live


async def test_the_end_user_reaches_an_anthropic_backend(setup: Setup) -> None:
    """`safety_identifier` (or the older `user`) is Anthropic's `metadata.user_id`, as an OpenAI
    chat client's is: what its abuse detection tells one end user from another by."""
    for asked in ({"safety_identifier": "user-7f3a"}, {"user": "user-7f3a"}):
        await setup.client.responses.create(model=MODELS["anthropic"], input="x", **asked)
        assert sent(setup, "anthropic")["metadata"] == {"user_id": "user-7f3a"}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_prompt_too_long_names_the_responses_field_input(setup: Setup, stream: bool) -> None:
    """The backend refused the translated chat's `messages`; the client sent `input`."""
    setup.fake("openai").set_script(Script(status=400, error_message=(
        "This model's maximum context length is 4096 tokens. However, you requested 5120 tokens "
        "(5000 in the messages, 120 in the completion). Please reduce the length of the messages or completion."
    )))
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.responses.create(model=MODELS["openai"], input="a very long history", stream=stream)
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "input")


async def test_without_a_database_a_reference_says_what_to_send_instead(setup: Setup) -> None:
    """The Vercel AI SDK's `openai(...)` (`store` on by default) gives its earlier answers back
    by their ids from its second turn; a gateway without a database keeps none, so the 404
    says to send the items themselves, and how to tell that SDK so."""
    first = await setup.client.responses.create(model=MODELS["openai"], input="Hi")
    with pytest.raises(openai.NotFoundError) as info:
        await setup.client.responses.create(
            model=MODELS["openai"],
            input=[{"role": "user", "content": "Hi"}, {"type": "item_reference", "id": first.output[0].id},
                   {"role": "user", "content": "Again"}],
        )
    error: Any = info.value.body
    assert error["param"] == "input[1]" and error["message"].startswith(f"Item with id '{first.output[0].id}' not found.")
    assert "store: false" in error["message"]


@pytest.mark.parametrize("packed", [b"[" * 100_000, b'{"thinking": "x", "signature": ' + b"[" * 100_000])
async def test_a_forged_signed_thinking_nested_too_deep_is_an_item_without_thinking(setup: Setup, packed: bytes) -> None:
    """A client's `encrypted_content` made to look like Claude's signed thinking holds JSON nested
    past what Python decodes: the item is one whose content the gateway cannot read (as a
    damaged one), not a 500."""
    import base64

    setup.fake("anthropic").set_script(Script(tokens=["Sunny."]))
    forged = "claude-thinking:" + base64.urlsafe_b64encode(packed).decode()
    loop: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": forged},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    answer = await setup.client.responses.create(model=MODELS["anthropic"], input=loop, tools=TOOLS)
    assert answer.output_text == "Sunny."
    assert all(part["type"] != "thinking" for m in sent(setup, "anthropic")["messages"] for part in m["content"]
               if isinstance(m["content"], list))


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
async def test_a_forged_signed_thinking_with_a_lone_surrogate_is_an_item_without_thinking(setup: Setup, kind: str) -> None:
    """A forged `encrypted_content` whose thinking spells half a surrogate pair (`\\ud800`,
    which the request body itself may not): it was taken as Claude's thinking, which no
    backend request could then be written with (a 502 "returned nothing", a traceback logged)."""
    import base64

    setup.fake(kind).set_script(Script(tokens=["Sunny."]))
    forged = "claude-thinking:" + base64.urlsafe_b64encode(b'{"thinking": "a\\ud800b", "signature": "sig"}').decode()
    loop: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": forged},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    answer = await setup.client.responses.create(model=MODELS[kind], input=loop, tools=TOOLS)
    assert answer.output_text == "Sunny."
    assert "\\ud800" not in setup.fake(kind).requests[-1].body.decode()


async def test_codex_websocket_try_is_refused_in_openai_shape_and_logs_no_error(
    aio_loop: object, caplog: pytest.LogCaptureFixture
) -> None:
    """Codex CLI on its `openai` provider first opens a WebSocket to `/v1/responses` (five
    tries a turn) before it falls back to HTTP: each is a 404 in OpenAI's error shape (it was
    a 500 with two tracebacks logged per try)."""
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        host, port = httpx.URL(url).host, httpx.URL(url).port
        assert port is not None
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(
            f"GET /v1/responses HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        tried = b""
        with trio.fail_after(10):
            while (piece := await stream.receive_some()):
                tried += piece
                if b"}}" in tried:
                    break
        await stream.aclose()
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            answered = await http.post("/v1/responses", json={"model": "m", "input": "hi"})
    head, _, body = tried.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404"), tried
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and "WebSocket" in error["message"]
    assert answered.status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
