"""Request shapes real clients send (Claude Code, Open WebUI and the `ollama` SDK, OpenAI-SDK
agents) through the gateway to backends of another dialect: what the backend receives and
what the client gets back."""

from __future__ import annotations

from typing import Any

import ollama
import openai
import pytest

from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend
from tests.harness import backend, running_gateway

WAV = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAIA+AAACABAAZGF0YQAAAAA="


# -- OpenAI-SDK agents -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ollama", "anthropic"])
async def test_audio_and_file_parts_for_a_backend_without_them_are_a_400_not_dropped(kind: str) -> None:
    fake = OllamaBackend() if kind == "ollama" else AnthropicBackend()
    parts: list[Any] = [
        {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}},
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQK"}},
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
    part = {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}}
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": [part]}])  # type: ignore[list-item]
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
