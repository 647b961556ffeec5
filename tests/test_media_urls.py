"""`refuse_private_media_urls`: an image URL a vLLM backend would fetch from inside the network
(the cloud metadata service, a loopback or private address, a name resolving to one) is a 400
naming the field, in the client's dialect, before the backend is called; public and inline
(`data:`) images still reach it; without the setting, URLs pass as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from proxy.config import load_settings
from tests.fakes import OpenAIBackend
from tests.harness import backend, running_gateway

INSIDE = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",  # link-local: cloud metadata
    "http://10.0.0.5:9200/_cat/indices",
    "http://localhost:8000/v1/models",  # a name that resolves to loopback
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped IPv6
    "http://2130706433/",  # 127.0.0.1 as one number, as resolvers read it
    "http://user@100.64.1.1/",  # shared (carrier-grade NAT) space
    "file:///etc/passwd",
]
PUBLIC = "https://93.184.216.34/cat.png"
INLINE = "data:image/png;base64,iVBORw0KGgo="


def chat_with_image(url: str) -> list[Any]:
    return [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]}]


@pytest.mark.parametrize("url", INSIDE)
async def test_a_url_inside_the_network_is_refused_naming_the_field(url: str) -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), refuse_private_media_urls=True
    ) as gateway:
        async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0) as client:
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as refused:
                    await client.chat.completions.create(model="qwen", messages=chat_with_image(url), stream=stream)
                body: Any = refused.value.body
                assert body["param"] == "messages[0].content[1].image_url.url"
                assert body["code"] == "media_url_not_allowed"
    assert fake.requests == []


async def test_an_anthropic_clients_url_image_is_refused_in_its_dialect() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), refuse_private_media_urls=True
    ) as gateway:
        async with anthropic.AsyncAnthropic(base_url=gateway, api_key="unused", max_retries=0) as client:
            with pytest.raises(anthropic.BadRequestError) as refused:
                await client.messages.create(model="qwen", max_tokens=20, messages=[{"role": "user", "content": [
                    {"type": "image", "source": {"type": "url", "url": INSIDE[0]}},
                    {"type": "text", "text": "Describe it"},
                ]}])
    body: Any = refused.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "image_url.url" in body["error"]["message"] and "refuse_private_media_urls" in body["error"]["message"]
    assert fake.requests == []


async def test_public_and_inline_images_reach_the_backend() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), refuse_private_media_urls=True
    ) as gateway:
        async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0) as client:
            for url in (PUBLIC, INLINE):
                await client.chat.completions.create(model="qwen", messages=chat_with_image(url))
    sent = [request.json["messages"][0]["content"][1]["image_url"]["url"] for request in fake.requests]
    assert sent == [PUBLIC, INLINE]


async def test_without_the_setting_urls_pass_as_before() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as gateway:
        async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0) as client:
            await client.chat.completions.create(model="qwen", messages=chat_with_image(INSIDE[0]))
    assert len(fake.requests) == 1


def test_the_setting_is_read_from_the_file_and_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("refuse_private_media_urls = true\n")
    assert load_settings(None, {}).refuse_private_media_urls is False
    assert load_settings(config, {}).refuse_private_media_urls is True
    assert load_settings(None, {"LLM_PROXY_REFUSE_PRIVATE_MEDIA_URLS": "1"}).refuse_private_media_urls is True
    assert load_settings(config, {"LLM_PROXY_REFUSE_PRIVATE_MEDIA_URLS": "no"}).refuse_private_media_urls is False
