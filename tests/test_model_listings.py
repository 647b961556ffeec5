"""Model listings as clients see them while backends come and go, and what the Ollama model
endpoints say of models the gateway does (not) serve."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend
from tests.fakes.base import Call
from tests.fakes.server import Exchange, Request
from tests.harness import backend, running_gateway
from tests.test_auth_helpers import bearer, new_key, wait_for_key
from tests.test_auth_helpers import gateway as auth_gateway

HI = [{"role": "user", "content": "hi"}]

pytest_plugins = ["tests.infra_servers"]


class FlakyTagsOllama(OllamaBackend):
    """An Ollama whose `/api/tags` fails (500) while `tags_fail` is set; chat still works."""

    tags_fail = False

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/api/tags" and self.tags_fail:
            await exchange.respond_json(500, {"error": "listing failed"})
            return
        await super().route(request, exchange, call)


class FlakyListOpenAI(OpenAIBackend):
    """An OpenAI-compatible server whose `/v1/models` fails (503) while `list_fails` is set."""

    list_fails = False

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/v1/models" and self.list_fails:
            await exchange.respond_json(503, {"error": {"message": "loading"}})
            return
        await super().route(request, exchange, call)


class VLLMBackend(OpenAIBackend):
    """The OpenAI fake whose `/v1/models` entries carry vLLM's `max_model_len`."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/v1/models" and request.method == "GET":
            data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "vllm", "root": m,
                     "parent": None, "max_model_len": 32768} for m in self.listed_models()]
            await exchange.respond_json(200, {"object": "list", "data": data})
            return
        await super().route(request, exchange, call)


CLAUDE_MODELS = [
    {"type": "model", "id": "claude-new", "display_name": "Claude New", "created_at": "2026-01-01T00:00:00Z",
     "lifecycle": "active", "max_input_tokens": 1_000_000, "max_tokens": 64000,
     "capabilities": {"image_input": {"supported": True}, "thinking": {"supported": True, "types": {}}}},
    {"type": "model", "id": "claude-old", "display_name": "Claude Old", "created_at": "2024-01-01T00:00:00Z",
     "lifecycle": "deprecated", "deprecated_at": "2026-06-01T00:00:00Z", "retires_at": "2027-01-01T00:00:00Z",
     "max_input_tokens": 200_000, "max_tokens": 8192,
     "capabilities": {"image_input": {"supported": False}, "thinking": {"supported": False, "types": {}}}},
]


class ModelsAPIBackend(AnthropicBackend):
    """The Anthropic fake whose `/v1/models` says what Anthropic's Models API says of each model."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/v1/models" and request.method == "GET":
            await exchange.respond_json(200, {"data": CLAUDE_MODELS, "has_more": False, "first_id": "claude-new",
                                              "last_id": "claude-old"})
            return
        await super().route(request, exchange, call)


CLAUDE_ALIASES = {"claude-new-latest": "claude-new"}


class AliasingAnthropic(ModelsAPIBackend):
    """Anthropic's Models API, which resolves an alias to the model it stands for."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path.startswith("/v1/models/") and request.method == "GET":
            asked = request.path.removeprefix("/v1/models/")
            found = next((m for m in CLAUDE_MODELS if m["id"] == CLAUDE_ALIASES.get(asked, asked)), None)
            if found is None:
                await self.send_error(exchange, 404, f"model: {asked}")
            else:
                await exchange.respond_json(200, found)
            return
        await super().route(request, exchange, call)


async def test_a_failed_listing_does_not_send_a_backends_models_elsewhere() -> None:
    """An Ollama backend's models reach it by its listing only (no prefix). One failed
    `/api/tags` (a restart, a slow answer) used to make the gateway forget them: the next
    chat went to the default backend, a 404 ("try pulling it first") or another model's answer."""
    ollama_fake = FlakyTagsOllama(models=["qwen2.5:7b"])
    default = OpenAIBackend(models=["qwen3-32b"])
    async with (
        ollama_fake.serve() as ol, default.serve() as oa,
        running_gateway(
            backend("vllm", oa.url, default=True), backend("ol", ol.url, kind="ollama"), models_cache_seconds=0
        ) as url,
        ollama.AsyncClient(host=url) as client,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as oc,
    ):
        assert "qwen2.5:7b" in [m.id async for m in oc.models.list()]
        ollama_fake.tags_fail = True
        listed = {m.id: m.model_extra["backend"] async for m in oc.models.list()}
        assert listed["qwen2.5:7b"] == "ol" and listed["qwen3-32b"] == "vllm"
        answer = await client.chat(model="qwen2.5:7b", messages=HI)
        assert answer.message.content
        ollama_fake.tags_fail = False
        assert (await client.chat(model="qwen2.5:7b", messages=HI)).message.content
    assert [r.model for r in ollama_fake.requests if r.path == "/api/chat"] == ["qwen2.5:7b"] * 2
    assert not [r for r in default.requests if r.path == "/v1/chat/completions"]


async def test_a_listing_names_the_backends_it_could_not_list() -> None:
    """A backend that cannot be listed leaves its models out of the list (when it never
    listed) or shows what it listed before: `x-unavailable-backends` tells a partial list
    from a whole one, in every dialect's listing."""
    ollama_fake = FlakyTagsOllama(models=["llama3.2"])
    vllm = FlakyListOpenAI(models=["qwen3-32b"])
    ollama_fake.tags_fail = vllm.list_fails = True
    async with (
        ollama_fake.serve() as ol, vllm.serve() as oa,
        running_gateway(backend("vllm", oa.url), backend("ol", ol.url, kind="ollama"), models_cache_seconds=0) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        for path, headers in (("/v1/models", {}), ("/v1/models", {"anthropic-version": "2023-06-01"}), ("/api/tags", {})):
            listed = await http.get(path, headers=headers)
            assert listed.status_code == 200 and listed.headers["x-unavailable-backends"] == "vllm, ol"
        vllm.list_fails = False
        listed = await http.get("/api/tags")
        assert listed.headers["x-unavailable-backends"] == "ol"
        assert [m["name"] for m in listed.json()["models"] if m["name"] != "all-minilm-l6-v2"] == ["qwen3-32b"]
        ollama_fake.tags_fail = False
        assert "x-unavailable-backends" not in (await http.get("/v1/models")).headers


async def test_a_model_two_backends_serve_goes_to_the_one_that_just_listed_it() -> None:
    """While one of two backends serving a model fails to list, the model goes to the other."""
    first, second = FlakyListOpenAI(models=["shared"]), OpenAIBackend(models=["shared"])
    async with (
        first.serve() as one, second.serve() as two,
        running_gateway(backend("one", one.url), backend("two", two.url), models_cache_seconds=0) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as oc,
    ):
        assert {m.id: m.model_extra["backend"] async for m in oc.models.list()}["shared"] == "one"
        first.list_fails = True
        assert {m.id: m.model_extra["backend"] async for m in oc.models.list()}["shared"] == "two"
        reply = await oc.chat.completions.create(model="shared", messages=HI)
        assert reply.choices[0].message.content
    assert [r.path for r in second.requests] == ["/v1/models", "/v1/models", "/v1/chat/completions"]


async def test_pull_says_which_models_no_backend_has() -> None:
    """Chat tells an Ollama client that a model its backend lacks is "not found, try pulling it
    first"; a pull then answered "success", so the client went round that loop for good. A
    pull is a 404 for a model the backend a prefix or the default sends it to says it lacks."""
    ollama_fake = OllamaBackend(models=["llama3.2"])
    default = OpenAIBackend(models=["qwen3-32b"])
    async with (
        ollama_fake.serve() as ol, default.serve() as oa,
        running_gateway(
            backend("vllm", oa.url, default=True), backend("ol", ol.url, kind="ollama", prefixes=("llama",)),
            aliases={"fast": "llama3.2"},
        ) as url,
        ollama.AsyncClient(host=url) as client,
    ):
        for missing in ("llama9", "mistral-nope"):  # the Ollama backend's prefix; the default backend
            with pytest.raises(ollama.ResponseError) as chat:
                await client.chat(model=missing, messages=HI)
            assert chat.value.status_code == 404 and "try pulling it first" in chat.value.error
            with pytest.raises(ollama.ResponseError) as pulled:
                await client.pull(missing)
            assert pulled.value.status_code == 404 and "file does not exist" in pulled.value.error
        for served in ("llama3.2", "llama3.2:latest", "qwen3-32b", "fast"):
            assert (await client.pull(served)).status == "success"
        ollama_fake.models = ["llama3.2", "llama9"]  # pulled on the Ollama server behind the gateway
        assert (await client.pull("llama9")).status == "success"


async def test_an_alias_is_listed_with_what_its_backend_says_of_its_target() -> None:
    """Clients size prompts by a vLLM model's `max_model_len`, Ollama ones show its size and
    family: under an alias they saw none of it (an epoch date, size 0, family `gpt` from
    `gpt-4o`, and for `fast` → `llama3.2` none of the `llama3.2:latest` the backend lists)."""
    vllm, ollama_fake = VLLMBackend(models=["qwen3-32b"]), OllamaBackend(models=["llama3.2"])
    async with (
        vllm.serve() as oa, ollama_fake.serve() as ol,
        running_gateway(
            backend("vllm", oa.url, default=True), backend("ol", ol.url, kind="ollama"),
            aliases={"gpt-4o": "qwen3-32b", "fast": "llama3.2"},
        ) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as oc,
        anthropic.AsyncAnthropic(base_url=url, api_key="unused") as ac,
        ollama.AsyncClient(host=url) as client,
    ):
        alias = await oc.models.retrieve("gpt-4o")
        assert (alias.created, alias.model_extra["max_model_len"], alias.model_extra["alias_of"]) == (
            1700000000, 32768, "qwen3-32b"
        )
        tags = {m.model: m for m in (await client.list()).models}
        fast, target = tags["fast"], tags["llama3.2:latest"]
        assert (fast.size, fast.digest, fast.details, fast.modified_at) == (
            target.size, target.digest, target.details, target.modified_at
        )
        assert fast.size and fast.details and fast.details.parameter_size
        assert tags["gpt-4o"].details and tags["gpt-4o"].details.family == "qwen"
        claude_view = await ac.models.retrieve("fast")
        assert claude_view.created_at == (await ac.models.retrieve("llama3.2:latest")).created_at
        assert claude_view.created_at.year > 1970
        assert (await client.show("gpt-4o")).modelinfo == (await client.show("qwen3-32b")).modelinfo


@asynccontextmanager
async def _claude_and_vllm(aliases: dict[str, str]) -> AsyncIterator[tuple[str, VLLMBackend]]:
    """A gateway in front of a Claude backend (its Models API) and a vLLM one serving `qwen3-32b`."""
    claude, vllm = ModelsAPIBackend(), VLLMBackend(models=["qwen3-32b"])
    async with (
        claude.serve() as an, vllm.serve() as oa,
        running_gateway(
            backend("claude", an.url, kind="anthropic", prefixes=("claude-",)), backend("vllm", oa.url), aliases=aliases,
        ) as url,
    ):
        yield url, vllm


async def test_anthropic_clients_see_each_models_limits_and_lifecycle() -> None:
    """Anthropic's Models API gives each model's window (`max_input_tokens`), output limit
    (`max_tokens`), capabilities and retirement; clients budget and pick models by them. The
    gateway listed a Claude backend's models without them (and a deprecated one as active),
    and a vLLM model without the window its `max_model_len` gives."""
    async with (
        _claude_and_vllm({"old": "claude-old"}) as (url, _),
        anthropic.AsyncAnthropic(base_url=url, api_key="unused") as ac,
    ):
        listed = {m.id: m async for m in ac.models.list()}
        for said in CLAUDE_MODELS:
            model = listed[str(said["id"])]
            assert model.model_dump(mode="json", exclude_none=True) == said
            assert (await ac.models.retrieve(model.id)) == model
        assert listed["claude-old"].lifecycle == "deprecated"
        assert (listed["old"].max_input_tokens, listed["old"].lifecycle) == (200_000, "deprecated")
        qwen = await ac.models.retrieve("qwen3-32b")
        assert (qwen.max_input_tokens, qwen.max_tokens, qwen.capabilities) == (32768, None, None)


async def test_an_alias_named_like_a_backends_own_model_is_listed_as_the_alias() -> None:
    """Claude Code users send its background calls (`claude-haiku-…`) to a local model by an
    alias of that name, with Claude itself behind the gateway too: the listing said the name
    was Claude's (its window, its backend), while every chat for it went to the alias's target."""
    async with (
        _claude_and_vllm({"claude-old": "qwen3-32b"}) as (url, vllm),
        anthropic.AsyncAnthropic(base_url=url, api_key="unused") as ac,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as oc,
    ):
        listed = {m.id: m async for m in ac.models.list()}
        assert listed["claude-old"].max_input_tokens == 32768  # the local model's window
        assert (await ac.models.retrieve("claude-old")).max_input_tokens == 32768
        entry = await oc.models.retrieve("claude-old")
        assert (entry.model_extra["alias_of"], entry.model_extra["backend"]) == ("qwen3-32b", "vllm")
        await ac.messages.create(model="claude-old", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
        assert vllm.requests[-1].path == "/v1/chat/completions"


async def test_ollama_clients_see_the_size_a_models_name_states() -> None:
    """Ollama clients show (and pick by) each model's parameter count and quantization; for
    a vLLM model the gateway said `""` even where its name states them — and no more where
    it does not (`A3B` is Qwen3-30B-A3B's active parameters, not its size)."""
    names = {
        "meta-llama/Llama-3.1-8B-Instruct": ("8B", ""),
        "Qwen/Qwen3-30B-A3B": ("30B", ""),
        "Qwen/Qwen2.5-VL-72B-Instruct-AWQ": ("72B", "AWQ"),
        "mistralai/Mixtral-8x7B-Instruct-v0.1": ("8x7B", ""),
        "microsoft/phi-4": ("", ""),
    }
    vllm = VLLMBackend(models=list(names))
    async with (
        vllm.serve() as oa,
        running_gateway(backend("vllm", oa.url, default=True)) as url,
        ollama.AsyncClient(host=url) as client,
    ):
        listed = {m.model: m.details for m in (await client.list()).models}
        for name, (size, quantization) in names.items():
            details = listed[name]
            assert details is not None and (details.parameter_size, details.quantization_level) == (size, quantization)
            shown = (await client.show(name)).details
            assert shown is not None and (shown.parameter_size, shown.quantization_level) == (size, quantization)


async def test_ollama_run_of_a_model_the_default_backend_lacks_is_not_found_up_front() -> None:
    """`ollama run` asks `/api/show` first and pulls a model it says is not there. For a name
    the default vLLM lacks, show described it, and only the chat failed; now show says "not
    found" (and the pull the CLI then tries says no backend has it)."""
    default = OpenAIBackend(models=["qwen3-32b"])
    async with (
        default.serve() as oa,
        running_gateway(backend("vllm", oa.url, default=True)) as url,
        ollama.AsyncClient(host=url) as client,
    ):
        with pytest.raises(ollama.ResponseError) as missing:
            await client.show("mistral-nope")
        assert missing.value.status_code == 404 and "not found" in missing.value.error
        assert (await client.show("qwen3-32b")).capabilities
    anything = OpenAIBackend()  # a server that takes any name (llama.cpp): it says nothing is missing
    async with (
        anything.serve() as oa,
        running_gateway(backend("llama.cpp", oa.url, default=True)) as url,
        ollama.AsyncClient(host=url) as client,
    ):
        assert (await client.show("whatever")).capabilities


async def test_each_model_is_listed_once_under_the_backend_its_chats_go_to() -> None:
    """A configured name its backend lists as Ollama spells it (`llama3.2`, listed as
    `llama3.2:latest`) was listed twice, one of them with no size or details; a name configured
    for one backend and listed by another was shown under the other, where no chat went."""
    ollama_fake = OllamaBackend(models=["llama3.2"])
    first, second = OpenAIBackend(models=["shared"]), VLLMBackend(models=["shared"])
    async with (
        ollama_fake.serve() as ol, first.serve() as one, second.serve() as two,
        running_gateway(
            backend("ol", ol.url, kind="ollama", models=("llama3.2",)), backend("one", one.url),
            backend("two", two.url, models=("shared",)),
        ) as url,
        ollama.AsyncClient(host=url) as client,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as oc,
    ):
        tags = [m for m in (await client.list()).models if m.model != "all-minilm-l6-v2"]
        assert [m.model for m in tags] == ["llama3.2:latest", "shared"]
        assert tags[0].size and tags[0].details and tags[0].details.parameter_size
        listed = {m.id: m async for m in oc.models.list()}
        assert sorted(listed) == ["all-minilm-l6-v2", "llama3.2:latest", "shared"]
        assert (listed["shared"].model_extra or {})["backend"] == "two"
        assert (listed["shared"].model_extra or {})["max_model_len"] == 32768  # what `two` says of it
        assert (await oc.chat.completions.create(model="shared", messages=HI)).choices[0].message.content
        assert (await client.chat(model="llama3.2", messages=HI)).message.content
    assert [r.path for r in second.requests if r.method == "POST"] == ["/v1/chat/completions"]
    assert [r.model for r in ollama_fake.requests if r.path == "/api/chat"] == ["llama3.2"]


async def test_a_model_is_found_by_the_alias_its_anthropic_backend_takes() -> None:
    """Chats take Anthropic's aliases (`claude-sonnet-4-0`), which the Models API does not
    list but resolves: a client that looks a model up by the name it chats with got a 404."""
    claude = AliasingAnthropic()
    async with (
        claude.serve() as an,
        running_gateway(backend("claude", an.url, kind="anthropic", prefixes=("claude-",))) as url,
        anthropic.AsyncAnthropic(base_url=url, api_key="unused") as ac,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused") as oc,
    ):
        assert "claude-new-latest" not in [m.id async for m in ac.models.list()]
        resolved = await ac.models.retrieve("claude-new-latest")
        assert (resolved.id, resolved.max_input_tokens) == ("claude-new", 1_000_000)
        assert (await oc.models.retrieve("claude-new-latest")).id == "claude-new"
        with pytest.raises(anthropic.NotFoundError):
            await ac.models.retrieve("claude-nope")
        with pytest.raises(openai.NotFoundError):
            await oc.models.retrieve("claude-nope")
        async with ollama.AsyncClient(host=url) as client:  # and `ollama run` stops up front
            with pytest.raises(ollama.ResponseError) as missing:
                await client.show("claude-nope")
            assert missing.value.status_code == 404
            assert (await client.show("claude-new-latest")).capabilities


async def test_a_model_pulled_on_an_ollama_backend_since_the_last_listing_is_found() -> None:
    """With a default backend, a name no backend was known to list went there: a model pulled
    on the Ollama backend after the last listing was a 404 until some client listed models
    again. Once the list has expired, such a name has the backends listed again first."""
    ollama_fake = OllamaBackend(models=["llama3.2"])
    default = OpenAIBackend(models=["qwen3-32b"])
    async with (
        ollama_fake.serve() as ol, default.serve() as oa,
        running_gateway(
            backend("vllm", oa.url, default=True), backend("ol", ol.url, kind="ollama"), models_cache_seconds=0
        ) as url,
        ollama.AsyncClient(host=url) as client,
    ):
        assert [m.model for m in (await client.list()).models][-1] == "llama3.2:latest"
        ollama_fake.models = ["llama3.2", "phi4"]  # `ollama pull phi4` on the server behind
        assert (await client.chat(model="phi4", messages=HI)).message.content
        listings = len([r for r in default.requests if r.path == "/v1/models"])
        assert (await client.chat(model="qwen3-32b", messages=HI)).message.content
        assert len([r for r in default.requests if r.path == "/v1/models"]) == listings  # a listed name: no listing
    assert [r.model for r in ollama_fake.requests if r.path == "/api/chat"] == ["phi4:latest"]


async def test_a_key_limited_to_some_models_is_not_told_of_other_backends(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """`x-unavailable-backends` names backends: a key that may use only some models sees a
    list without the rest, and does not learn the other backends' names from the header."""
    vllm, ollama_fake = OpenAIBackend(models=["qwen3-32b"]), FlakyTagsOllama(models=["llama3.2"])
    ollama_fake.tags_fail = True
    async with (
        vllm.serve() as oa, ollama_fake.serve() as ol,
        auth_gateway(pg_database_url, nats_url, backend("vllm", oa.url), backend("ol", ol.url, kind="ollama")) as url,
    ):
        admin, scoped = await new_key(pg_database_url, "all"), await new_key(pg_database_url, "qwen", "--models", "qwen3-*")
        await wait_for_key(url, scoped)
        async with httpx.AsyncClient(base_url=url) as http:
            everything = await http.get("/v1/models", headers=bearer(admin))
            assert everything.headers["x-unavailable-backends"] == "ol"
            limited = await http.get("/v1/models", headers=bearer(scoped))
            assert [m["id"] for m in limited.json()["data"]] == ["qwen3-32b"]
            assert "x-unavailable-backends" not in limited.headers
