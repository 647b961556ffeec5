"""Request shapes real clients send (Claude Code, Open WebUI and the `ollama` SDK, OpenAI-SDK
agents) through the gateway to backends of another dialect: what the backend receives and
what the client gets back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pytest

from proxy.config import load_settings
from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend, Script
from tests.fakes.base import Call
from tests.fakes.server import Exchange, Request
from tests.harness import backend, running_gateway

WAV = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAIA+AAACABAAZGF0YQAAAAA="


# -- OpenAI-SDK agents -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ollama", "anthropic"])
async def test_audio_and_file_parts_for_a_backend_without_them_are_a_400_not_dropped(kind: str) -> None:
    fake = OllamaBackend() if kind == "ollama" else AnthropicBackend()
    # (An inline PDF is an Anthropic document: a Files API id is what Anthropic cannot be given.)
    file = {"file_id": "file-abc"} if kind == "anthropic" else {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQK"}
    parts: list[Any] = [
        {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}},
        {"type": "file", "file": file},
    ]
    async with fake.serve() as server, running_gateway(backend("local", server.url, kind=kind, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for part in parts:
            messages: Any = [
                {"role": "system", "content": "Transcribe."},
                {"role": "user", "content": [{"type": "text", "text": "What is said here?"}, part]},
            ]
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(model="m", messages=messages)
            assert info.value.param == "messages[1].content[1]"
            assert f"`{part['type']}`" in info.value.message and "OpenAI-compatible" in info.value.message
        # The assistant's own refusal parts carry nothing the model must read: still accepted.
        history: Any = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
            {"role": "user", "content": "hi again"},
        ]
        answer = await client.chat.completions.create(model="m", messages=history)
        assert answer.choices[0].message.content
        await client.close()
    assert len(fake.requests) == 1


async def test_audio_parts_still_reach_an_openai_backend_as_sent() -> None:
    fake = OpenAIBackend()
    part: Any = {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}}
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": [part]}])
        await client.close()
    assert fake.requests[-1].json["messages"][0]["content"] == [part]


# -- thinking asked of Claude in another dialect's words --------------------------------------------


async def test_thinking_without_a_limit_leaves_the_answer_its_default_room_on_an_anthropic_backend() -> None:
    """Open WebUI's `think: "high"` or an agent's `reasoning_effort` with no token limit: the
    thinking budget comes on top of the default limit (4096), not out of it, where a full
    budget of 4095 would leave the answer one token."""
    fake = AnthropicBackend()
    async with fake.serve() as server, running_gateway(backend("claude", server.url, kind="anthropic", default=True)) as url:
        async with ollama.AsyncClient(host=url) as client:
            await client.chat(model="claude-x", messages=[{"role": "user", "content": "hi"}], think="high")
        high = fake.requests[-1].json
        agent = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await agent.chat.completions.create(model="claude-x", messages=[{"role": "user", "content": "hi"}], reasoning_effort="low")
        low = fake.requests[-1].json
        await agent.chat.completions.create(
            model="claude-x", messages=[{"role": "user", "content": "hi"}], reasoning_effort="high", max_completion_tokens=3000
        )
        capped = fake.requests[-1].json
        await agent.close()
    assert (high["thinking"]["budget_tokens"], high["max_tokens"]) == (4096, 4096 + 4096)
    assert (low["thinking"]["budget_tokens"], low["max_tokens"]) == (1024, 4096 + 1024)
    # A limit the client set is kept, and the thinking fits within it.
    assert (capped["thinking"]["budget_tokens"], capped["max_tokens"]) == (2999, 3000)


# -- a tool choice with no tools to choose from -----------------------------------------------------


async def test_a_tool_choice_left_without_tools_is_not_sent() -> None:
    """vLLM refuses `tool_choice` without `tools` ("When using `tool_choice`, `tools` must be
    set"), Anthropic any `tool_choice` without tools. An OpenAI client's `tools: []` (which the
    gateway does not forward) or an Anthropic client's `tools: []` must not leave the backend
    such a choice."""
    fakes = {"openai": OpenAIBackend(), "anthropic": AnthropicBackend()}
    async with (
        fakes["openai"].serve() as vllm,
        fakes["anthropic"].serve() as claude,
        running_gateway(
            backend("vllm", vllm.url, default=True), backend("claude", claude.url, kind="anthropic", prefixes=("claude",))
        ) as url,
    ):
        agent = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for model, kind in (("qwen3-8b", "openai"), ("claude-x", "anthropic")):
            await agent.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], tools=[], tool_choice="auto"
            )
            assert not {"tools", "tool_choice"} & set(fakes[kind].requests[-1].json), kind
        await agent.close()
        claude_client = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
        await claude_client.messages.create(
            model="qwen3-8b", max_tokens=100, messages=[{"role": "user", "content": "news?"}],
            tools=[], tool_choice={"type": "auto"},
        )
        await claude_client.close()
    assert not {"tools", "tool_choice"} & set(fakes["openai"].requests[-1].json)


# -- Ollama clients' model names ---------------------------------------------------------------------


async def test_an_ollama_clients_latest_tag_reaches_a_prefix_routed_backend_as_that_backend_lists_the_model() -> None:
    """Open WebUI lists models from `/api/tags`, then chats with every untagged name as
    `name:latest` (Ollama takes both as one model; only Ollama does). A model routed by prefix
    to an Anthropic or OpenAI-compatible backend that lists it goes there under the listed
    name, not as an unknown `…:latest` (a 404)."""
    claude = AnthropicBackend(models=["claude-sonnet-4-5"])
    vllm = OpenAIBackend(models=["qwen3-8b"])
    async with (
        claude.serve() as an,
        vllm.serve() as oa,
        running_gateway(
            backend("claude", an.url, kind="anthropic", prefixes=("claude",)), backend("vllm", oa.url, prefixes=("qwen",))
        ) as url,
    ):
        async with ollama.AsyncClient(host=url) as client:
            assert {"claude-sonnet-4-5", "qwen3-8b"} <= {m.model for m in (await client.list()).models}
            for name, fake in (("claude-sonnet-4-5:latest", claude), ("qwen3-8b:latest", vllm)):
                reply = await client.chat(model=name, messages=[{"role": "user", "content": "hi"}])
                assert reply.model == name and reply.message.content
                assert fake.requests[-1].json["model"] == name.removesuffix(":latest")


class VLLMBackend(OpenAIBackend):
    """The OpenAI fake whose `/v1/models` entries carry vLLM's `max_model_len`."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/v1/models" and request.method == "GET":
            data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "vllm", "root": f"/models/{m}",
                     "parent": None, "max_model_len": 32768} for m in self.listed_models()]
            await exchange.respond_json(200, {"object": "list", "data": data})
            return
        await super().route(request, exchange, call)


class ModelsAPIBackend(AnthropicBackend):
    """The Anthropic fake whose `/v1/models` says each model's window and capabilities, as
    Anthropic's Models API does: `claude-old` reads no images and does not think."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/v1/models" and request.method == "GET":
            def entry(model: str, window: int, images: bool, thinking: bool) -> dict[str, Any]:
                return {"type": "model", "id": model, "display_name": model, "created_at": "2026-01-01T00:00:00Z",
                        "max_input_tokens": window, "max_tokens": 64000,
                        "capabilities": {"image_input": {"supported": images},
                                         "thinking": {"supported": thinking, "types": {}}}}
            data = [entry("claude-new", 1_000_000, True, True), entry("claude-old", 100_000, False, False)]
            await exchange.respond_json(200, {"data": data, "has_more": False, "first_id": "claude-new",
                                              "last_id": "claude-old"})
            return
        await super().route(request, exchange, call)


async def test_show_says_what_anthropics_models_api_says_a_model_can_do() -> None:
    """Clients offer images and thinking only where `/api/show` says `vision` and `thinking`,
    and size prompts by `<architecture>.context_length`: for Claude, what the Models API says."""
    claude = ModelsAPIBackend()
    async with (
        claude.serve() as an,
        running_gateway(backend("claude", an.url, kind="anthropic", prefixes=("claude",))) as url,
        ollama.AsyncClient(host=url) as client,
    ):
        new, old = await client.show("claude-new"), await client.show("claude-old")
    assert new.capabilities == ["completion", "tools", "vision", "thinking"]
    assert old.capabilities == ["completion", "tools"]
    assert (new.modelinfo or {})["claude.context_length"] == 1_000_000
    assert (old.modelinfo or {})["claude.context_length"] == 100_000


async def test_show_gives_the_context_window_where_clients_read_it() -> None:
    """Copilot's Ollama provider reads `<architecture>.context_length` from `/api/show` and,
    without it, budgets 4096 tokens, all of them for output: no room for any prompt. A vLLM
    model's `max_model_len` and a Claude model's 200k window are where it looks."""
    # A server that lists `qwen3-8b` and takes any name (one it lacks is not shown at all).
    claude, vllm = AnthropicBackend(), VLLMBackend(scripts={"qwen3-8b": Script()})
    async with (
        claude.serve() as an,
        vllm.serve() as oa,
        running_gateway(backend("vllm", oa.url, prefixes=("qwen",)), backend("claude", an.url, kind="anthropic", prefixes=("claude",))) as url,
        ollama.AsyncClient(host=url) as client,
    ):
        for name, window in (("qwen3-8b", 32768), ("claude-sonnet-4-5", 200_000)):
            info: Any = (await client.show(name)).modelinfo
            assert info[f"{info['general.architecture']}.context_length"] == window, name
        unlisted: Any = (await client.show("qwen-unlisted")).modelinfo
        assert "qwen.context_length" not in unlisted  # a window nobody said is not made up


async def test_model_objects_keep_what_vllm_and_ollama_names_say() -> None:
    """Clients size their prompts by a vLLM model's `max_model_len` (and tell a LoRA adapter
    by its `parent`); and Ollama's untagged name is its `:latest` tag, for retrieval too."""
    vllm, ol = VLLMBackend(models=["qwen3-8b"]), OllamaBackend(models=["llama3.2:latest"])
    async with (
        vllm.serve() as oa,
        ol.serve() as ls,
        running_gateway(backend("vllm", oa.url, prefixes=("qwen",)), backend("ollama", ls.url, kind="ollama", prefixes=("llama",))) as url,
    ):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        listed: Any = {m.id: m async for m in client.models.list()}
        qwen = listed["qwen3-8b"]
        assert (qwen.max_model_len, qwen.root, qwen.parent) == (32768, "/models/qwen3-8b", None)
        assert (await client.models.retrieve("qwen3-8b")).model_dump() == qwen.model_dump()
        assert not hasattr(listed["llama3.2:latest"], "max_model_len")  # nothing made up
        assert (await client.models.retrieve("llama3.2")).id == "llama3.2:latest"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("llama3")
        await client.close()


async def test_show_says_a_claude_model_reads_images() -> None:
    """Copilot's and Zed's Ollama providers offer image input only when `/api/show` lists
    `vision`; every Claude model reads images and the gateway sends them on, so a model on an
    Anthropic backend says so. An OpenAI-compatible backend's model may or may not: unsaid."""
    claude, vllm = AnthropicBackend(), OpenAIBackend()
    async with (
        claude.serve() as an,
        vllm.serve() as oa,
        running_gateway(backend("vllm", oa.url, default=True), backend("claude", an.url, kind="anthropic", prefixes=("claude",))) as url,
        ollama.AsyncClient(host=url) as client,
    ):
        assert (await client.show("claude-sonnet-4-5")).capabilities == ["completion", "tools", "vision"]
        assert (await client.show("qwen3-8b")).capabilities == ["completion", "tools"]
        png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAghs7GQAAAABJRU5ErkJggg=="
        await client.chat(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "what is this?", "images": [png]}])
    assert claude.requests[-1].json["messages"][0]["content"][1]["source"]["data"] == png


# -- an OpenAI-compatible backend's own error words -------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_an_openai_backends_error_code_and_param_reach_an_openai_client(stream: bool) -> None:
    """SDK users tell a prompt too long for the model by `code: "context_length_exceeded"`
    (LangChain, Codex, the Agents SDK); the backend said it, so the client hears it, with its
    `param`, not the gateway's generic `backend_400`."""
    error = {"error": {"message": "This model's maximum context length is 128000 tokens. However, your messages "
                                  "resulted in 130000 tokens.", "type": "invalid_request_error", "param": "messages",
                       "code": "context_length_exceeded"}}
    fake = OpenAIBackend(default=Script(status=400, error_body=error))
    async with fake.serve() as server, running_gateway(backend("openai", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "long"}], stream=stream)
        await client.close()
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "messages")
    assert "maximum context length is 128000 tokens" in info.value.message


# -- prompt caching asked in OpenAI's shape ---------------------------------------------------------


async def test_cache_control_on_openai_content_parts_is_an_anthropic_backends_cache_breakpoint() -> None:
    """aider (through LiteLLM) and Cline mark what Claude should cache with `cache_control` on
    OpenAI content parts, as LiteLLM and OpenRouter take it. An Anthropic backend gets the
    breakpoints on the blocks they mark (else nothing is cached, at full price every turn);
    an OpenAI-compatible backend still gets the parts as sent."""
    ephemeral = {"type": "ephemeral"}
    messages: Any = [
        {"role": "system", "content": [{"type": "text", "text": "You are aider.", "cache_control": ephemeral}]},
        {"role": "user", "content": [{"type": "text", "text": "repo map", "cache_control": ephemeral},
                                     {"type": "text", "text": "fix the bug"}]},
    ]
    claude, vllm = AnthropicBackend(), OpenAIBackend()
    async with (
        claude.serve() as an,
        vllm.serve() as oa,
        running_gateway(backend("vllm", oa.url, default=True), backend("claude", an.url, kind="anthropic", prefixes=("claude",))) as url,
    ):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await client.chat.completions.create(model="claude-x", messages=messages)
        await client.chat.completions.create(model="qwen3-8b", messages=messages)
        await client.close()
    sent = claude.requests[-1].json
    assert sent["system"] == [{"type": "text", "text": "You are aider.", "cache_control": ephemeral}]
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "repo map", "cache_control": ephemeral},
                                                             {"type": "text", "text": "fix the bug"}]}]
    assert vllm.requests[-1].json["messages"] == messages


# -- sampling settings Claude takes one at a time ----------------------------------------------------


async def test_temperature_and_top_p_from_other_dialects_reach_an_anthropic_backend_one_at_a_time() -> None:
    """Claude 4.5 models answer 400 "`temperature` and `top_p` cannot both be specified for this
    model" (Anthropic asks for one or the other on every model); OpenAI clients (LangChain4j,
    ragas) and Open WebUI presets often send both. The temperature is kept; top_p alone is
    kept too; an Anthropic client's own request is its business and goes as sent."""
    claude = AnthropicBackend()
    async with (
        claude.serve() as an,
        running_gateway(backend("claude", an.url, kind="anthropic", default=True)) as url,
    ):
        agent = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await agent.chat.completions.create(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}],
                                            temperature=0.7, top_p=0.9)
        both = claude.requests[-1].json
        await agent.chat.completions.create(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}], top_p=0.9)
        alone = claude.requests[-1].json
        await agent.close()
        async with ollama.AsyncClient(host=url) as client:
            await client.chat(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}],
                              options={"temperature": 0.2, "top_p": 0.8})
        preset = claude.requests[-1].json
        native = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
        await native.messages.create(model="claude-3-haiku", max_tokens=10, messages=[{"role": "user", "content": "hi"}],
                                     extra_body={"temperature": 0.5, "top_p": 0.9})  # this SDK no longer types them
        await native.close()
        as_sent = claude.requests[-1].json
    assert (both["temperature"], "top_p" in both) == (0.7, False)
    assert alone["top_p"] == 0.9 and "temperature" not in alone
    assert (preset["temperature"], "top_p" in preset) == (0.2, False)
    assert (as_sent["temperature"], as_sent["top_p"]) == (0.5, 0.9)


# -- a prompt longer than the model's window, in each client's words ------------------------------------

VLLM_TOO_LONG = (
    "This model's maximum context length is 4096 tokens. However, you requested 5120 tokens "
    "(5000 in the messages, 120 in the completion). Please reduce the length of the messages or completion."
)
LLAMA_CPP_TOO_LONG = "the request exceeds the available context size, try increasing it"
ANTHROPIC_TOO_LONG = "prompt is too long: 210345 tokens > 200000 maximum"
OLLAMA_TOO_LONG = "prompt too long; exceeded max context length by 17 tokens"


@pytest.mark.parametrize(("kind", "message"), [
    ("openai", VLLM_TOO_LONG), ("openai", LLAMA_CPP_TOO_LONG), ("anthropic", ANTHROPIC_TOO_LONG),
    ("ollama", OLLAMA_TOO_LONG),
])
async def test_a_prompt_too_long_for_the_model_is_said_the_way_each_client_acts_on(kind: str, message: str) -> None:
    fake = {"openai": OpenAIBackend, "anthropic": AnthropicBackend, "ollama": OllamaBackend}[kind]()
    fake.set_script(Script(status=400, error_message=message))
    history: Any = [{"role": "user", "content": "a very long history"}]
    async with fake.serve() as server, running_gateway(backend("b", server.url, kind=kind, default=True)) as url:
        # OpenAI SDK users (LangChain, Codex, the Agents SDK) branch on the code.
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(model="m", messages=history, stream=stream)
            assert info.value.code == "context_length_exceeded" and message in info.value.message
        await client.close()
        # Claude Code compacts its conversation when Anthropic says the prompt is too long.
        claude = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
        with pytest.raises(anthropic.BadRequestError) as refused:
            await claude.messages.create(model="m", max_tokens=100, messages=history)
        said = refused.value.body["error"]["message"]  # type: ignore[index]
        assert said.startswith("prompt is too long") and message in said
        await claude.close()


@pytest.mark.parametrize(("said", "code"), [
    (None, None),  # OpenAI's own bad requests often have no code
    (400, None),  # vLLM's: the status again, not a code
    ("invalid_value", "invalid_value"),
])
async def test_another_bad_request_keeps_its_own_code(said: Any, code: str | None) -> None:
    """Not a code the gateway made up (`backend_400`): the backend's own, or none, as OpenAI sends."""
    error = {"error": {"message": "temperature must be at most 2", "type": "BadRequestError", "param": None, "code": said}}
    fake = OpenAIBackend(default=Script(status=400, error_body=error))
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=stream)
            assert info.value.code == code and info.value.message.endswith("temperature must be at most 2")
        await client.close()


async def test_a_backend_refusing_the_gateways_key_is_not_retried_by_the_sdks() -> None:
    # A 502 the SDKs would retry twice, each time refused again: the key must be mended first.
    fake = OpenAIBackend(default=Script(status=401, error_message="Incorrect API key provided"))
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2)
        with pytest.raises(openai.InternalServerError) as refused:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await client.close()
    assert refused.value.status_code == 502 and refused.value.response.headers["x-should-retry"] == "false"
    assert len(fake.requests) == 1


async def test_a_backends_quota_refusal_keeps_its_code() -> None:
    # OpenAI's `insufficient_quota` is a 429 that will not pass by retrying: clients branch on it.
    error = {"error": {"message": "You exceeded your current quota.", "type": "insufficient_quota", "param": None,
                       "code": "insufficient_quota"}}
    fake = OpenAIBackend(default=Script(status=429, error_body=error))
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as info:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=stream)
            assert info.value.code == "insufficient_quota"
        await client.close()


# -- a prefill: the answer's beginning, for the model to go on with ----------------------------------

PREFILL: Any = [{"role": "user", "content": "The capital of France, as JSON."}, {"role": "assistant", "content": '{"capital": "'}]


async def test_a_prefill_is_continued_by_an_openai_compatible_backend_not_answered_anew() -> None:
    """Anthropic clients end `messages` with an assistant turn to have the model go on from it
    (Claude Code opens JSON answers so); an Ollama client's chat may end the same way. vLLM
    continues a last message only when asked (`continue_final_message` without a generation
    prompt): otherwise it closes the prefill and the model starts a new turn. A backend that
    refuses unknown fields (`chat_template_fields = false`) gets the turn as before, and an
    Ollama backend, which continues a last assistant message by itself, gets it last."""
    vllm, hosted, local = OpenAIBackend(), OpenAIBackend(), OllamaBackend()
    async with (
        vllm.serve() as v,
        hosted.serve() as h,
        local.serve() as o,
        running_gateway(
            backend("vllm", v.url, default=True),
            backend("hosted", h.url, prefixes=("gpt-",), chat_template_fields=False),
            backend("ollama", o.url, kind="ollama", prefixes=("llama",)),
        ) as url,
    ):
        claude = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
        for model in ("qwen3-8b", "gpt-4o", "llama3.2"):
            await claude.messages.create(model=model, max_tokens=50, messages=PREFILL)
        continued = vllm.requests[-1].json
        await claude.messages.create(model="qwen3-8b", max_tokens=50, messages=PREFILL[:1])
        asked = vllm.requests[-1].json
        await claude.close()
        async with ollama.AsyncClient(host=url) as client:
            await client.chat(model="qwen3-8b", messages=PREFILL)
        from_ollama = vllm.requests[-1].json
        agent = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await agent.chat.completions.create(model="qwen3-8b", messages=PREFILL)
        await agent.close()
    # An OpenAI client says what it means in vLLM's own fields (its request goes as sent).
    assert not {"continue_final_message", "add_generation_prompt"} & set(vllm.requests[-1].json)
    assert continued["messages"][-1] == {"role": "assistant", "content": '{"capital": "'}
    assert (continued["continue_final_message"], continued["add_generation_prompt"]) == (True, False)
    assert (from_ollama["continue_final_message"], from_ollama["add_generation_prompt"]) == (True, False)
    assert not {"continue_final_message", "add_generation_prompt"} & set(asked)
    assert not {"continue_final_message", "add_generation_prompt"} & set(hosted.requests[-1].json)
    assert hosted.requests[-1].json["messages"][-1]["role"] == "assistant"
    assert local.requests[-1].json["messages"][-1] == {"role": "assistant", "content": '{"capital": "'}


def test_chat_template_fields_are_off_by_default_for_hosted_apis_that_refuse_unknown_fields(tmp_path: Path) -> None:
    config = tmp_path / "llm-proxy.toml"
    config.write_text(
        '[[backends]]\nname = "openai"\nbase_url = "https://api.openai.com/v1"\nprefixes = ["gpt-"]\n'
        '[[backends]]\nname = "vllm"\nbase_url = "http://127.0.0.1:8000/v1"\ndefault = true\n'
        '[[backends]]\nname = "azure"\nbase_url = "https://me.openai.azure.com/openai/v1"\nprefixes = ["az-"]\n'
        '[[backends]]\nname = "proxied"\nbase_url = "https://api.openai.com/v1"\nprefixes = ["o-"]\n'
        "chat_template_fields = true\n"
    )
    backends = {b.name: b.sends_template_fields for b in load_settings(config, {}).backends}
    assert backends == {"openai": False, "vllm": True, "azure": False, "proxied": True}


# -- a failed tool call ----------------------------------------------------------------------------------


async def test_a_failed_tool_call_says_so_to_a_model_on_another_backend() -> None:
    """Claude Code marks a tool call that failed (a command that exited non-zero, a file not
    found) `is_error: true`; an OpenAI or Ollama tool message has no such flag, so the text
    says it, else the model takes the error message for the tool's output."""
    vllm, local = OpenAIBackend(), OllamaBackend()
    history: Any = [
        {"role": "user", "content": "Run the tests."},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "pytest"}},
            {"type": "tool_use", "id": "toolu_2", "name": "Read", "input": {"file_path": "/nope"}},
            {"type": "tool_use", "id": "toolu_3", "name": "Bash", "input": {"command": "ls"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True, "content": "exit code 2: 3 tests failed"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True},
            {"type": "tool_result", "tool_use_id": "toolu_3", "content": [{"type": "text", "text": "README.md"}]},
        ]},
    ]
    tools: Any = [{"name": "Bash", "input_schema": {"type": "object"}}, {"name": "Read", "input_schema": {"type": "object"}}]
    async with (
        vllm.serve() as v,
        local.serve() as o,
        running_gateway(backend("vllm", v.url, default=True), backend("ollama", o.url, kind="ollama", prefixes=("llama",))) as url,
    ):
        claude = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
        for model in ("qwen3-8b", "llama3.2"):
            await claude.messages.create(model=model, max_tokens=50, messages=history, tools=tools)
        await claude.close()
    expected = ["Error: exit code 2: 3 tests failed", "Error: the tool call failed.", "README.md"]
    for fake in (vllm, local):
        assert [m["content"] for m in fake.requests[-1].json["messages"] if m["role"] == "tool"] == expected


# -- thinking switched off ---------------------------------------------------------------------------


async def test_thinking_switched_off_reaches_ollama_and_vllm_as_their_switch() -> None:
    """Qwen3 and other models think unless told not to, on Ollama (`think: false`) as on vLLM
    (the chat template's `enable_thinking: false`). Anthropic's `thinking: {type: "disabled"}`,
    OpenAI's `reasoning_effort` "none" or "minimal" and Ollama's `think: false` are that: said
    in the backend's words, not lost (and no effort "none", which vLLM refuses). A backend
    without chat-template fields gets neither; `think: true` is the templates' default."""
    vllm, hosted, local = OpenAIBackend(), OpenAIBackend(), OllamaBackend()
    async with (
        vllm.serve() as v,
        hosted.serve() as h,
        local.serve() as o,
        running_gateway(
            backend("vllm", v.url, default=True),
            backend("hosted", h.url, prefixes=("gpt-",), chat_template_fields=False),
            backend("ollama", o.url, kind="ollama", prefixes=("llama",)),
        ) as url,
    ):
        hi: Any = [{"role": "user", "content": "hi"}]
        claude = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
        for model in ("llama3.2", "qwen3-8b", "gpt-4o"):
            await claude.messages.create(model=model, max_tokens=50, messages=hi, thinking={"type": "disabled"})
        await claude.close()
        assert local.requests[-1].json["think"] is False
        assert vllm.requests[-1].json["chat_template_kwargs"] == {"enable_thinking": False}
        assert not {"chat_template_kwargs", "reasoning_effort"} & set(hosted.requests[-1].json)
        assert "reasoning_effort" not in vllm.requests[-1].json
        agent = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for effort in ("minimal", "none"):
            await agent.chat.completions.create(model="llama3.2", messages=hi, reasoning_effort=effort)  # type: ignore[arg-type]
            assert local.requests[-1].json["think"] is False, effort
        await agent.close()
        async with ollama.AsyncClient(host=url) as client:
            await client.chat(model="qwen3-8b", messages=hi, think=False)
            off = vllm.requests[-1].json
            await client.chat(model="qwen3-8b", messages=hi, think=True)
            on = vllm.requests[-1].json
    assert off["chat_template_kwargs"] == {"enable_thinking": False} and "reasoning_effort" not in off
    assert not {"chat_template_kwargs", "reasoning_effort"} & set(on)


# -- Anthropic-defined tools -------------------------------------------------------------------------

BASH: Any = {"type": "bash_20250124", "name": "bash"}
EDITOR: Any = {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool", "max_characters": 10000}


@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_anthropics_bash_and_text_editor_tools_reach_a_local_model_as_function_tools(kind: str) -> None:
    """An agent built on Anthropic's bash and text editor tools, pointed at a local model: the
    model gets them as function tools of their published schemas, in the client's order, and
    its calls come back as `tool_use` blocks of the same names, which the client runs."""
    fake = OpenAIBackend() if kind == "openai" else OllamaBackend()
    fake.set_script(Script(tool_calls=[("bash", {"command": "ls -la"}),
                                       ("str_replace_based_edit_tool", {"command": "view", "path": "/repo/README.md"})]))
    lookup: Any = {"name": "lookup", "description": "Find a symbol", "input_schema": {"type": "object"}}
    old_editor: Any = {"type": "text_editor_20250124", "name": "str_replace_editor"}
    async with fake.serve() as server, running_gateway(backend("local", server.url, kind=kind, default=True)) as url:
        claude = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
        reply = await claude.messages.create(model="qwen3-coder", max_tokens=200, tools=[BASH, lookup, EDITOR],
                                             messages=[{"role": "user", "content": "What is in this repo?"}])
        streamed = await claude.messages.create(model="qwen3-coder", max_tokens=200, tools=[old_editor], stream=True,
                                                tool_choice={"type": "tool", "name": "str_replace_editor"},
                                                messages=[{"role": "user", "content": "Undo that."}])
        events = [event async for event in streamed]
        await claude.close()
    sent = [tool["function"] for tool in fake.requests[0].json["tools"]]
    assert [f["name"] for f in sent] == ["bash", "lookup", "str_replace_based_edit_tool"]
    assert set(sent[0]["parameters"]["properties"]) == {"command", "restart"}
    editor = sent[2]["parameters"]
    assert set(editor["properties"]) == {"command", "path", "file_text", "old_str", "new_str", "insert_line", "view_range"}
    assert editor["properties"]["command"]["enum"] == ["view", "create", "str_replace", "insert"]
    assert editor["required"] == ["command", "path"]
    assert [(b.type, getattr(b, "name", None), getattr(b, "input", None)) for b in reply.content] == [
        ("text", None, None), ("tool_use", "bash", {"command": "ls -la"}),
        ("tool_use", "str_replace_based_edit_tool", {"command": "view", "path": "/repo/README.md"}),
    ]
    assert reply.stop_reason == "tool_use"
    older = fake.requests[1].json["tools"][0]["function"]
    assert older["name"] == "str_replace_editor" and "undo_edit" in older["parameters"]["properties"]["command"]["enum"]
    if kind == "openai":
        assert fake.requests[1].json["tool_choice"] == {"type": "function", "function": {"name": "str_replace_editor"}}
    names = [e.content_block.name for e in events if e.type == "content_block_start" and e.content_block.type == "tool_use"]
    assert names == ["bash", "str_replace_based_edit_tool"]


@pytest.mark.parametrize("tool", [
    {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
    {"type": "code_execution_20250825", "name": "code_execution"},
    {"type": "computer_20250124", "name": "computer", "display_width_px": 1024, "display_height_px": 768},
])
async def test_anthropic_tools_a_local_model_cannot_have_are_a_400_naming_the_tool(tool: Any) -> None:
    """Server tools run on Anthropic's servers, and computer use needs a model trained for it:
    offered to a model on another backend they would be dropped, and the model would answer
    as if it had searched or run nothing. The client hears which tool cannot go, before any
    backend call; on an Anthropic backend they go as sent."""
    vllm, claude_backend = OpenAIBackend(), AnthropicBackend()
    async with (
        vllm.serve() as v,
        claude_backend.serve() as c,
        running_gateway(backend("vllm", v.url, default=True), backend("claude", c.url, kind="anthropic", prefixes=("claude",))) as url,
    ):
        client = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
        for stream in (False, True):
            with pytest.raises(anthropic.BadRequestError) as info:
                await client.messages.create(model="qwen3-8b", max_tokens=100, tools=[BASH, tool], stream=stream,
                                             messages=[{"role": "user", "content": "go"}])
            error: Any = info.value.body
            assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
            assert f"`{tool['name']}` (`{tool['type']}`)" in error["error"]["message"]
        await client.messages.create(model="claude-x", max_tokens=100, tools=[BASH, tool],
                                     messages=[{"role": "user", "content": "go"}])
        await client.close()
    assert vllm.requests == []
    assert claude_backend.requests[-1].json["tools"] == [BASH, tool]
