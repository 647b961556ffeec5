"""vLLM's chat-style embeddings (`EmbeddingChatRequest`, for multimodal embedding models such as
VLM2Vec or gme-Qwen2-VL): `POST /v1/embeddings` with chat `messages` instead of `input`, sent
through the official `openai` SDK as vLLM's documentation does, to a loopback fake vLLM that
records the body the gateway forwards."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import openai
import pytest
from openai.types import CreateEmbeddingResponse

from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend
from tests.fakes.script import embed_text, estimate_tokens
from tests.harness import backend, running_gateway

IMAGE = "https://93.184.216.34/cat.png"
INSIDE = "http://169.254.169.254/latest/meta-data/"
INLINE = "data:image/png;base64,iVBORw0KGgo="


def image_chat(url: str = IMAGE, text: str = "Represent the given image.") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": text},
    ]}]


def embedded_text(messages: list[dict[str, Any]]) -> str:
    """What the fake vLLM embeds of `messages` (`tests/fakes/openai_backend.py: _chat_text`)."""
    words = []
    for message in messages:
        words.append(message["role"])
        for part in message["content"]:
            inner = part[part["type"]]
            words.append(inner["url"] if isinstance(inner, dict) else inner)
    return " ".join(words)


@dataclass
class Setup:
    url: str
    client: openai.AsyncOpenAI
    vllm: OpenAIBackend
    ollama: OllamaBackend


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    vllm, ol, an = OpenAIBackend(), OllamaBackend(), AnthropicBackend()
    async with vllm.serve() as vllm_server, ol.serve() as ol_server, an.serve() as an_server, running_gateway(
        backend("vllm", vllm_server.url, default=True),
        backend("ol", ol_server.url, kind="ollama", prefixes=("nomic-",)),
        backend("an", an_server.url, kind="anthropic", prefixes=("claude",)),
        aliases={"vlm": "TIGER-Lab/VLM2Vec-Full"},
        refuse_private_media_urls=True,
    ) as url:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            yield Setup(url, client, vllm, ol)


async def chat_embedding(client: openai.AsyncOpenAI, body: dict[str, Any]) -> CreateEmbeddingResponse:
    """vLLM's documented client call for a chat embedding (`embeddings.create` requires `input`)."""
    return await client.post("/embeddings", cast_to=CreateEmbeddingResponse, body=body)


async def test_a_chat_embedding_is_routed_forwarded_with_its_fields_and_answered(setup: Setup) -> None:
    messages = image_chat()
    fields = {
        "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
        "chat_template_kwargs": {"enable_thinking": False},
        "add_generation_prompt": True,
        "continue_final_message": False,
        "add_special_tokens": True,
        "truncate_prompt_tokens": 512,
        "user": "user-7",
    }
    answer = await chat_embedding(setup.client, {
        "model": "vlm", "messages": messages, "encoding_format": "base64", "dimensions": 8, **fields,
    })
    # The alias routed to the default (vLLM) backend, which got vLLM's chat form: `messages`
    # and its chat fields as sent, no `input`, floats asked for (the gateway encodes base64).
    (sent,) = [r for r in setup.vllm.requests if r.path == "/v1/embeddings"]
    assert sent.json == {
        "model": "TIGER-Lab/VLM2Vec-Full", "messages": messages, "encoding_format": "float", "dimensions": 8, **fields,
    }
    text = embedded_text(messages)
    assert len(answer.data) == 1 and answer.data[0].index == 0 and answer.model == "vlm"
    raw: Any = answer.data[0].embedding  # base64: the SDK leaves it as sent when asked for it
    vector = np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str) else np.array(raw)
    np.testing.assert_allclose(vector, embed_text(text, 8), atol=1e-6)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == estimate_tokens(text)  # the backend's count

    # Never served from a cache: the same chat embeds again (its image may have changed).
    again = await chat_embedding(setup.client, {"model": "vlm", "messages": messages, "encoding_format": "float"})
    assert np.allclose(again.data[0].embedding, embed_text(text, 384), atol=1e-6)
    assert len([r for r in setup.vllm.requests if r.path == "/v1/embeddings"]) == 2


async def test_input_and_messages_together_are_what_vllm_makes_of_them(setup: Setup) -> None:
    """vLLM's request is a union of its text and chat forms: given both `input` and `messages`,
    it takes the one with more of its own fields set, the text form on a tie. The gateway sends
    the form vLLM would take, alone, so no server's reading of the union can differ."""
    messages = image_chat()
    text_form = await setup.client.embeddings.create(
        model="vlm", input="a photo of a cat", encoding_format="float", extra_body={"messages": messages}
    )
    assert setup.vllm.requests[-1].json == {
        "model": "TIGER-Lab/VLM2Vec-Full", "input": ["a photo of a cat"], "encoding_format": "float",
    }
    np.testing.assert_allclose(text_form.data[0].embedding, embed_text("a photo of a cat", 384), atol=1e-6)

    chat_form = await setup.client.embeddings.create(
        model="vlm", input="a photo of a cat", encoding_format="float",
        extra_body={"messages": messages, "chat_template_kwargs": {"enable_thinking": False}},
    )
    assert setup.vllm.requests[-1].json == {
        "model": "TIGER-Lab/VLM2Vec-Full", "messages": messages, "chat_template_kwargs": {"enable_thinking": False},
        "encoding_format": "float",
    }
    assert len(chat_form.data) == 1
    np.testing.assert_allclose(chat_form.data[0].embedding, embed_text(embedded_text(messages), 384), atol=1e-6)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "vlm"}, "input"),  # neither: OpenAI's required field is named
        ({"model": "vlm", "messages": None}, "input"),
        ({"model": "vlm", "messages": []}, "messages"),
        ({"model": "vlm", "messages": "Represent the given image."}, "messages"),
        ({"model": "vlm", "messages": [{"role": "user", "content": "hi"}, "hi"]}, "messages[1]"),
        ({"model": "vlm", "messages": image_chat(), "encoding_format": "int8"}, "encoding_format"),
        # Backends whose embeddings API takes text only, and the in-process text model.
        ({"model": "nomic-embed-text", "messages": image_chat(INLINE)}, "messages"),
        ({"model": "all-minilm-l6-v2", "messages": image_chat(INLINE)}, "messages"),
        ({"model": "claude-3", "messages": image_chat(INLINE)}, "model"),
        # A URL the backend would fetch from inside its network (`refuse_private_media_urls`).
        ({"model": "vlm", "messages": image_chat(INSIDE)}, "messages[0].content[0].image_url.url"),
    ],
)
async def test_a_chat_embedding_it_cannot_serve_is_a_400_naming_the_field(
    setup: Setup, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await chat_embedding(setup.client, body)
    error: Any = refused.value.body
    assert refused.value.status_code == 400
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    if param == "messages" and body["model"] != "vlm":
        assert "messages" in error["message"] and "text" in error["message"]
    assert setup.vllm.requests == [] and setup.ollama.requests == []

