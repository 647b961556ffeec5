"""Clients that leave a request whose gateway calls its backend before the response begins —
counting tokens (`/v1/messages/count_tokens`, `/v1/responses/input_tokens`), loading an
Ollama model (a prompt-less `/api/generate`) — with the official SDKs, on real servers: the
backend connection closes at once (as for a chat), the request is logged as the client's
leaving (499), and no task stays behind."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
import trio

from proxy.infra.logging import REQUEST_LOGGER
from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend, Script
from tests.fakes.base import Call, FakeBackend
from tests.fakes.server import Exchange, Request
from tests.harness import backend, hang_up_once_received, running_gateway
from tests.test_auth_helpers import eventually

# Longer than any test waits: the backend answers only if the gateway waits for it.
SLOW = 30.0


class SlowCountingAnthropic(AnthropicBackend):
    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/v1/messages/count_tokens":
            await trio.sleep(SLOW)
        await super().route(request, exchange, call)


class SlowTokenizingOpenAI(OpenAIBackend):
    """vLLM's `POST /tokenize`, taking its time (a server busy generating)."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/tokenize":
            await trio.sleep(SLOW)
            await exchange.respond_json(200, {"count": 1, "max_model_len": 8192, "tokens": [1]})
            return
        await super().route(request, exchange, call)


class SlowLoadingOllama(OllamaBackend):
    """A big model: loading it takes a while."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/api/generate" and not (request.json() or {}).get("prompt"):
            await trio.sleep(SLOW)
        await super().route(request, exchange, call)


@dataclass
class Setup:
    url: str
    fakes: dict[str, FakeBackend]


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    fakes: dict[str, Any] = {"openai": SlowTokenizingOpenAI(), "ollama": SlowLoadingOllama(), "anthropic": SlowCountingAnthropic()}
    async with (
        fakes["openai"].serve() as s_openai,
        fakes["ollama"].serve() as s_ollama,
        fakes["anthropic"].serve() as s_anthropic,
        running_gateway(
            backend("vllm", s_openai.url, default=True),
            backend("ollama", s_ollama.url, kind="ollama", prefixes=("llama",)),
            backend("claude", s_anthropic.url, kind="anthropic", prefixes=("claude",)),
            access_log=True,
        ) as url,
    ):
        yield Setup(url, fakes)


def task_count() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return count(trio.lowlevel.current_root_task())


async def _count_messages(url: str) -> object:
    async with anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0, default_headers={"x-request-id": "gone"}) as client:
        return await client.messages.count_tokens(model="claude-fake-1", messages=[{"role": "user", "content": "Hi"}])


async def _count_input(url: str) -> object:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, default_headers={"x-request-id": "gone"}) as client:
        return await client.responses.input_tokens.count(model="qwen3-8b", input="Hi")


async def _preload(url: str) -> object:
    client = ollama.AsyncClient(host=url, headers={"x-request-id": "gone"})
    return await client.generate(model="llama3.2")


@pytest.mark.parametrize(("kind", "ask", "logged_as"), [
    ("anthropic", _count_messages, "count_tokens"),
    ("openai", _count_input, "count_tokens"),
    ("ollama", _preload, None),  # its route's kind (chat): a load is told from a chat only once answered
], ids=["messages-count-tokens", "responses-input-tokens", "ollama-preload"])
async def test_a_client_that_leaves_while_its_backend_is_called_before_the_response_closes_that_call(
    setup: Setup, kind: str, ask: Callable[[str], Awaitable[object]], logged_as: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before, the backend call went on until the backend answered or its timeout (the first
    # token's 10 s for a count, the total 60 s for a load), holding its connection: Claude
    # Code counts tokens constantly, and a model's load is as long as the model is big.
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    fake = setup.fakes[kind]
    baseline = task_count()
    await hang_up_once_received(fake, lambda: ask(setup.url))
    gone = await fake.wait_disconnect(2.0)
    assert not gone.headers_sent

    async def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "request_id", None) == "gone"]

    [line] = await eventually(logged)
    assert (line.status, line.cancelled) == (499, True)  # type: ignore[attr-defined]
    assert logged_as is None or line.kind == logged_as  # type: ignore[attr-defined]

    async def wound_down() -> bool:
        return task_count() <= baseline

    await eventually(wound_down)


async def test_a_client_that_gives_up_its_upload_midway_is_logged_and_calls_no_backend(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    # A phone uploading a recording over a weak link, given up: before, no line said so.
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    boundary = "a1b2c3"
    head = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="model"\r\n\r\nwhisper\r\n--{boundary}\r\n'
        f'content-disposition: form-data; name="file"; filename="talk.wav"\r\ncontent-type: audio/wav\r\n\r\n'
    ).encode()
    halfway = trio.Event()

    async def upload() -> AsyncIterator[bytes]:
        yield head
        yield b"\x00" * 64_000
        halfway.set()
        await trio.sleep_forever()  # the rest never comes

    baseline = task_count()
    async with httpx.AsyncClient(base_url=setup.url, timeout=30) as http, trio.open_nursery() as nursery:
        nursery.start_soon(lambda: http.post(
            "/v1/audio/transcriptions", content=upload(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}", "x-request-id": "gone"},
        ))
        await halfway.wait()
        await trio.sleep(0.1)  # its bytes are read
        nursery.cancel_scope.cancel()

    async def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "request_id", None) == "gone"]

    [line] = await eventually(logged)
    assert (line.status, line.cancelled, line.kind) == (499, True, "transcription")  # type: ignore[attr-defined]
    assert not [r for r in setup.fakes["openai"].requests if r.path.startswith("/v1/audio")]

    async def wound_down() -> bool:
        return task_count() <= baseline

    await eventually(wound_down)


PROMPT = [{"role": "user", "content": "word " * 40}]  # 200 characters: 50 tokens


async def _openai_stream(url: str) -> object:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, default_headers={"x-request-id": "gone"}) as client:
        return await client.chat.completions.create(model="qwen3-8b", messages=PROMPT, stream=True)  # type: ignore[arg-type]


async def _anthropic_message(url: str) -> object:
    async with anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0, default_headers={"x-request-id": "gone"}) as client:
        return await client.messages.create(model="claude-fake-1", max_tokens=20, messages=PROMPT)  # type: ignore[arg-type]


async def _ollama_chat(url: str) -> object:
    client = ollama.AsyncClient(host=url, headers={"x-request-id": "gone"})
    return await client.chat(model="llama3.2", messages=PROMPT)


@pytest.mark.parametrize(("kind", "ask"), [
    ("openai", _openai_stream), ("anthropic", _anthropic_message), ("ollama", _ollama_chat),
])
async def test_a_chat_left_before_its_first_token_is_logged_with_its_prompts_estimate(
    setup: Setup, kind: str, ask: Callable[[str], Awaitable[object]], caplog: pytest.LogCaptureFixture,
) -> None:
    # Its line said no tokens and its key was charged none, though the backend had read the
    # prompt: a client could send huge prompts and hang up before the first token for free.
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    fake = setup.fakes[kind]
    fake.set_script(Script(tokens=["Hi"], header_delay=SLOW))
    await hang_up_once_received(fake, lambda: ask(setup.url))

    async def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "request_id", None) == "gone"]

    [line] = await eventually(logged)
    told = {name: getattr(line, name) for name in ("status", "cancelled", "prompt_tokens", "completion_tokens", "usage_estimated")}
    assert told == {"status": 499, "cancelled": True, "prompt_tokens": 50, "completion_tokens": 0, "usage_estimated": True}
