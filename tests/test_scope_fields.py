"""A key limited to some models cannot reach others through the body fields an OpenRouter or
LiteLLM backend honours (`models`, `fallbacks`, `user_config`, …), on any endpoint, with the
official SDKs through a real gateway and a real PostgreSQL; models in its scope pass."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.fakes import Usage
from tests.test_auth_helpers import MESSAGES, Stack, bearer, keyed_stack, new_key, wait_for_key

pytest_plugins = ["tests.infra_servers"]

AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(32)
# Each names a model outside `qwen3-*` for the backend to answer with, as OpenRouter and
# LiteLLM read them; the field the refusal names.
OUTSIDE: list[tuple[dict[str, Any], str]] = [
    ({"models": ["qwen3-8b", "gpt-4o"]}, "models"),
    ({"models": ["gpt-4o"], "route": "fallback"}, "models"),
    ({"fallbacks": ["gpt-4o"]}, "fallbacks"),
    ({"fallbacks": [{"model": "gpt-4o", "messages": MESSAGES}]}, "fallbacks"),
    ({"fallbacks": [{"qwen3-8b": ["qwen3-32b", "gpt-4o"]}]}, "fallbacks"),
    ({"context_window_fallbacks": [{"qwen3-8b": ["gpt-4o"]}]}, "context_window_fallbacks"),
    ({"content_policy_fallbacks": [{"qwen3-8b": ["gpt-4o"]}]}, "content_policy_fallbacks"),
    ({"context_window_fallback_dict": {"qwen3-8b": "gpt-4o"}}, "context_window_fallback_dict"),
    ({"metadata": {"fallbacks": ["gpt-4o"]}}, "metadata.fallbacks"),
    # Fields with which the backend chooses models itself: refused whatever they hold.
    ({"route": "fallback"}, "route"),
    ({"user_config": {"model_list": [{"model_name": "qwen3-8b", "litellm_params": {"model": "openai/gpt-4o"}}]}},
     "user_config"),
    ({"model_list": [{"model_name": "qwen3-8b", "litellm_params": {"model": "openai/gpt-4o"}}]}, "model_list"),
]
INSIDE: dict[str, Any] = {
    "models": ["qwen3-8b", "qwen3-32b"], "route": "fallback", "fallbacks": [{"model": "qwen3-32b"}],
    "context_window_fallback_dict": {"qwen3-8b": "qwen3-32b"},
}


@dataclass
class Keys:
    stack: Stack
    scoped: str
    unscoped: str

    def sent(self, path: str) -> list[dict[str, Any]]:
        return [r.json for r in self.stack.fake.requests if r.path == path]


@pytest.fixture
async def keys(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Keys]:
    async with keyed_stack(pg_database_url, nats_url, Usage(10, 1)) as stack:
        scoped = await new_key(stack.db, "scoped", "--models", "qwen3-*")
        unscoped = await new_key(stack.db, "unscoped")
        await wait_for_key(stack.url, scoped)
        await wait_for_key(stack.url, unscoped)
        yield Keys(stack, scoped, unscoped)


def _refused(error: openai.APIStatusError | anthropic.APIStatusError, param: str) -> str:
    assert error.status_code == 403
    body = error.body
    assert isinstance(body, dict)
    found = body.get("error", body)
    assert found.get("param", param) == param, body
    return str(found["message"])


async def test_a_scoped_keys_chat_may_not_name_other_models_for_the_backend(keys: Keys) -> None:
    async with openai.AsyncOpenAI(base_url=f"{keys.stack.url}/v1", api_key=keys.scoped, max_retries=0) as client:
        for fields, param in OUTSIDE:
            for stream in (False, True):
                with pytest.raises(openai.PermissionDeniedError) as refused:
                    await client.chat.completions.create(
                        model="qwen3-8b", messages=MESSAGES, stream=stream, extra_body=fields,  # type: ignore[arg-type]
                    )
                assert refused.value.code == "model_not_allowed", fields
                message = _refused(refused.value, param)
                assert ("gpt-4o" in message) if param in ("models", "fallbacks") else (f"`{param}`" in message)
        assert keys.sent("/v1/chat/completions") == []  # none reached the backend

        # Every model named in its scope: relayed as sent, for the backend to honour.
        answer = await client.chat.completions.create(model="qwen3-8b", messages=MESSAGES, extra_body=INSIDE)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "Hello"
    (sent,) = keys.sent("/v1/chat/completions")
    assert {name: sent[name] for name in INSIDE} == INSIDE

    # A key without a model scope sends them as it likes.
    async with openai.AsyncOpenAI(base_url=f"{keys.stack.url}/v1", api_key=keys.unscoped, max_retries=0) as client:
        answer = await client.chat.completions.create(
            model="qwen3-8b", messages=MESSAGES, extra_body={"models": ["gpt-4o"], "user_config": {}},  # type: ignore[arg-type]
        )
        assert answer.choices[0].message.content == "Hello"
    assert keys.sent("/v1/chat/completions")[-1]["models"] == ["gpt-4o"]


async def test_anthropic_and_ollama_clients_are_refused_in_their_own_shape(keys: Keys) -> None:
    # OpenRouter's Anthropic Messages endpoint takes `fallbacks`.
    async with anthropic.AsyncAnthropic(base_url=keys.stack.url, api_key=keys.scoped, max_retries=0) as claude:
        with pytest.raises(anthropic.PermissionDeniedError) as refused:
            await claude.messages.create(
                model="qwen3-8b", max_tokens=5, messages=MESSAGES,  # type: ignore[arg-type]
                extra_body={"fallbacks": [{"model": "claude-opus-4-8"}]},
            )
        assert refused.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
        assert "claude-opus-4-8" in refused.value.message
    async with httpx.AsyncClient(base_url=keys.stack.url, headers=bearer(keys.scoped), timeout=10) as client:
        # The Python `ollama` client sends no fields beyond Ollama's: a raw request, as a script would.
        answer = await client.post("/api/chat", json={
            "model": "qwen3-8b", "messages": MESSAGES, "stream": False, "models": ["gpt-4o"],
        })
    assert answer.status_code == 403 and "gpt-4o" in answer.json()["error"], answer.text
    assert keys.sent("/v1/chat/completions") == []


async def test_every_relayed_api_checks_the_fields_it_passes_on(keys: Keys) -> None:
    url = keys.stack.url
    async with (
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=keys.scoped, max_retries=0) as client,
        httpx.AsyncClient(base_url=url, headers=bearer(keys.scoped), timeout=10) as http,
    ):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.completions.create(model="qwen3-8b", prompt="def f():", extra_body={"models": ["gpt-4o"]})
        _refused(refused.value, "models")
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.embeddings.create(model="qwen3-embed", input="x", extra_body={"fallbacks": ["text-embedding-3-large"]})
        _refused(refused.value, "fallbacks")
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.audio.speech.create(
                model="qwen3-tts", input="Hello", voice="alloy", extra_body={"fallbacks": [{"model": "tts-1-hd"}]},
            )
        _refused(refused.value, "fallbacks")
        # In a form: a list as the SDK sends it (`models[]`, once per name) and as JSON text.
        for extra, param in (({"models": ["qwen3-asr", "whisper-1"]}, "models"),
                             ({"fallbacks": '["whisper-1"]'}, "fallbacks"),
                             ({"user_config": "{}"}, "user_config")):
            with pytest.raises(openai.PermissionDeniedError) as refused:
                await client.audio.transcriptions.create(model="qwen3-asr", file=("a.wav", AUDIO), extra_body=extra)
            _refused(refused.value, param)
        for path, body in (
            ("/v1/rerank", {"model": "qwen3-rerank", "query": "q", "documents": ["d"], "fallbacks": ["bge-reranker"]}),
            ("/score", {"model": "qwen3-rerank", "text_1": "a", "text_2": "b", "models": ["bge-reranker"]}),
        ):
            answer = await http.post(path, json=body)
            assert answer.status_code == 403 and answer.json()["error"]["code"] == "model_not_allowed", answer.text
        assert [r.path for r in keys.stack.fake.requests if r.path != "/v1/models"] == []

        # Models in its scope pass, as sent.
        completed = await client.completions.create(model="qwen3-8b", prompt="def f():", extra_body={"models": ["qwen3-32b"]})
        assert completed.choices
        heard = await client.audio.transcriptions.create(
            model="qwen3-asr", file=("a.wav", AUDIO), extra_body={"models": ["qwen3-asr", "qwen3-asr-large"]},
        )
        assert heard.text
    assert keys.sent("/v1/completions")[0]["models"] == ["qwen3-32b"]
    (upload,) = [r for r in keys.stack.fake.requests if r.path == "/v1/audio/transcriptions"]
    assert b'name="models[]"\r\n\r\nqwen3-asr-large' in upload.body


async def test_the_responses_api_never_passes_them_on(keys: Keys) -> None:
    """`/v1/responses` is translated into a chat, not relayed: what it does not model reaches
    no backend, so there is nothing to refuse."""
    async with openai.AsyncOpenAI(base_url=f"{keys.stack.url}/v1", api_key=keys.scoped, max_retries=0) as client:
        answer = await client.responses.create(model="qwen3-8b", input="Say hello", extra_body={"models": ["gpt-4o"]})
        assert answer.output_text == "Hello"
    (sent,) = keys.sent("/v1/chat/completions")
    assert "models" not in sent
