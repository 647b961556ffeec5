"""Request shapes real clients send (Claude Code, Open WebUI and the `ollama` SDK, OpenAI-SDK
agents) through the gateway to backends of another dialect: what the backend receives and
what the client gets back."""

from __future__ import annotations

from typing import Any

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
