"""`refuse_private_media_urls`: an image URL a vLLM backend would fetch from inside the network
(the cloud metadata service, a loopback or private address, a name resolving to one) is a 400
naming the field, in the client's dialect, before the backend is called; public and inline
(`data:`) images still reach it; without the setting, URLs pass as before."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import trio

from proxy.config import load_settings
from tests.fakes import AnthropicBackend, OpenAIBackend
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
    # The field as the client wrote it (before, OpenAI's `messages[0].content[0].image_url.url`).
    assert "`messages[0].content[0].source.url`" in body["error"]["message"]
    assert "refuse_private_media_urls" in body["error"]["message"]
    assert fake.requests == []


async def test_the_field_is_named_where_the_client_put_it() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), refuse_private_media_urls=True
    ) as gateway:
        async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0) as client:
            # A cached text part before the image (its cache mark is a part of its own inside).
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": [
                    {"type": "text", "text": "Look", "cache_control": {"type": "ephemeral"}},  # type: ignore[typeddict-unknown-key]
                    {"type": "image_url", "image_url": {"url": INSIDE[1]}},
                ]}])
            body: Any = refused.value.body
            assert body["param"] == "messages[0].content[1].image_url.url"
            # A Responses client's image: its `image_url` is the URL itself.
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(model="qwen", input=[{"role": "user", "content": [
                    {"type": "input_text", "text": "Look"},
                    {"type": "input_image", "image_url": INSIDE[0], "detail": "auto"},
                ]}])
            body = refused.value.body
            assert body["param"] == "input[0].content[1].image_url" and body["code"] == "media_url_not_allowed"
    assert fake.requests == []


def rerank_with(url: str) -> dict[str, Any]:
    # vLLM's multimodal rerank: a document (or the query) as `{"content": [parts]}`.
    return {"model": "jina-reranker-m0", "query": "a cat", "documents": [
        "A dog on a beach.",
        {"content": [{"type": "text", "text": "A photo"}, {"type": "image_url", "image_url": {"url": url}}]},
    ]}


async def test_a_multimodal_rerank_is_checked_like_a_chat() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), refuse_private_media_urls=True
    ) as gateway, httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        for url in INSIDE[:2]:
            refused = await client.post("/v1/rerank", json=rerank_with(url))
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["param"] == "documents[1].content[1].image_url.url"
            assert error["code"] == "media_url_not_allowed"
        video = {"model": "qwen3-vl-reranker", "query": {"content": [{"type": "video_url", "video_url": INSIDE[0]}]},
                 "documents": ["A dog"]}
        refused = await client.post("/v1/rerank", json=video)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "query.content[0].video_url"
        assert [r for r in fake.requests if r.path == "/v1/rerank"] == []
        for url in (PUBLIC, INLINE):
            answer = await client.post("/v1/rerank", json=rerank_with(url))
            assert answer.status_code == 200, answer.text
    sent = [r.json["documents"][1]["content"][1]["image_url"]["url"] for r in fake.requests if r.path == "/v1/rerank"]
    assert sent == [PUBLIC, INLINE]


async def test_an_anthropic_kind_backend_is_checked_like_an_openai_one() -> None:
    """A `kind = "anthropic"` backend (vLLM's `/v1/messages`, inside the network) fetches an
    image's `source.url` (and a document's) as vLLM's OpenAI API fetches `image_url`: before,
    such URLs reached it unchecked, whichever dialect the client spoke, chats and token
    counts alike."""
    fake = AnthropicBackend()
    async with fake.serve() as server, running_gateway(
        backend("claude-in-house", server.url, kind="anthropic", default=True), refuse_private_media_urls=True
    ) as gateway:
        async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0) as client:
            for stream in (False, True):
                with pytest.raises(openai.BadRequestError) as refused:
                    await client.chat.completions.create(model="qwen", messages=chat_with_image(INSIDE[0]), stream=stream)
                body: Any = refused.value.body
                assert body["param"] == "messages[0].content[1].image_url.url"
                assert body["code"] == "media_url_not_allowed"
        async with anthropic.AsyncAnthropic(base_url=gateway, api_key="unused", max_retries=0) as claude:
            image = {"type": "image", "source": {"type": "url", "url": INSIDE[1]}}
            document = {"type": "document", "source": {"type": "url", "url": INSIDE[0]}}
            for content, field in (([image], "messages[0].content[0].source.url"),
                                   ([{"type": "text", "text": "Read"}, document], "messages[0].content[1].source.url")):
                messages: Any = [{"role": "user", "content": content}]
                with pytest.raises(anthropic.BadRequestError) as denied:
                    await claude.messages.create(model="qwen", max_tokens=20, messages=messages)
                assert f"`{field}`" in denied.value.body["error"]["message"]  # type: ignore[index]
                with pytest.raises(anthropic.BadRequestError) as denied:
                    await claude.messages.count_tokens(model="qwen", messages=messages)
                assert f"`{field}`" in denied.value.body["error"]["message"]  # type: ignore[index]
            assert fake.requests == []
            await claude.messages.create(model="qwen", max_tokens=20, messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "url", "url": PUBLIC}}, {"type": "text", "text": "Describe it"},
            ]}])
    assert [r.json["messages"][0]["content"][0]["source"]["url"] for r in fake.requests] == [PUBLIC]


async def test_a_multimodal_embedding_and_a_token_count_are_checked_like_a_chat() -> None:
    """vLLM's multimodal embeddings take chat `messages` (VLM2Vec, DSE), and its `/tokenize`
    (counting an Anthropic or Responses client's input) loads a chat's images: both fetch
    their URLs as a chat does, and both passed them unchecked."""
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), refuse_private_media_urls=True
    ) as gateway, httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        def embedding(url: str) -> dict[str, Any]:
            # vLLM's chat form: `messages` instead of `input` (beside an `input`, vLLM embeds that).
            return {"model": "vlm2vec", "messages": chat_with_image(url), "encoding_format": "float"}

        refused = await client.post("/v1/embeddings", json=embedding(INSIDE[0]))
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("messages[0].content[1].image_url.url", "media_url_not_allowed")
        async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0) as sdk:
            with pytest.raises(openai.BadRequestError) as denied:
                await sdk.responses.input_tokens.count(model="qwen", input=[{"role": "user", "content": [
                    {"type": "input_image", "image_url": INSIDE[1], "detail": "auto"},
                ]}])
            assert denied.value.body["param"] == "input[0].content[0].image_url"  # type: ignore[index]
        assert fake.requests == []
        assert (await client.post("/v1/embeddings", json=embedding(PUBLIC))).status_code == 200
    sent = [r.json["messages"][0]["content"][1]["image_url"]["url"] for r in fake.requests if r.path == "/v1/embeddings"]
    assert sent == [PUBLIC]


async def test_without_the_setting_a_reranks_urls_pass() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as gateway, \
            httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        answer = await client.post("/v1/rerank", json=rerank_with(INSIDE[0]))
        assert answer.status_code == 200, answer.text


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


async def test_a_url_vllm_reads_whatever_the_parts_type_is_refused() -> None:
    """vLLM fetches more than `image_url`-typed parts: a chat's `input_image` part (Responses'
    shape, its `image_url` the URL itself), and a part with a `uuid` or no `type` by which of
    `image_url`/`video_url`/`audio_url` it holds (even a `text` part's). Such URLs reached vLLM
    unchecked, in chats (whose unmodelled parts go as sent) and in the relayed APIs alike."""
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), refuse_private_media_urls=True
    ) as gateway, httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        parts: list[tuple[dict[str, Any], str]] = [
            ({"type": "input_image", "image_url": INSIDE[1]}, "messages[0].content[1].image_url"),
            ({"type": "text", "text": "hi", "uuid": "a", "image_url": INSIDE[0]}, "messages[0].content[1].image_url"),
            ({"type": "image_embeds", "uuid": "b", "video_url": {"url": INSIDE[1]}}, "messages[0].content[1].video_url.url"),
        ]
        for part, field in parts:
            chat = {"model": "qwen", "messages": [{"role": "user", "content": [{"type": "text", "text": "Look"}, part]}]}
            refused = await client.post("/v1/chat/completions", json=chat)
            assert refused.status_code == 400, (part, refused.text)
            assert (refused.json()["error"]["param"], refused.json()["error"]["code"]) == (field, "media_url_not_allowed")
        untyped = [{"role": "user", "content": [{"audio_url": INSIDE[0]}]}]
        for path in ("/tokenize", "/pooling"):
            refused = await client.post(path, json={"model": "qwen", "messages": untyped})
            assert refused.status_code == 400, (path, refused.text)
            assert refused.json()["error"]["param"] == "messages[0].content[0].audio_url"
        refused = await client.post("/v1/rerank", json={"model": "m0", "query": "a cat", "documents": [
            {"content": [{"image_url": {"url": INSIDE[1]}}]}]})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "documents[0].content[0].image_url.url"
        assert fake.requests == []
        # A part with a public URL still reaches vLLM as sent.
        chat = {"model": "qwen", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi", "uuid": "a", "image_url": PUBLIC}]}]}
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
    assert fake.requests[0].json["messages"][0]["content"][0]["image_url"] == PUBLIC


async def test_a_private_ipv4_address_inside_an_ipv6_one_is_refused() -> None:
    """An IPv6 address that carries an IPv4 one is a way to it: NAT64 (`64:ff9b::/96`, which an
    IPv6-only cluster's gateway translates, private destinations too; `64:ff9b:1::/48`, for
    local use), 6to4, IPv4-compatible and IPv4-translated addresses. They passed as global
    however private the address inside; a public one inside still reaches the backend."""
    carried = [
        "http://[64:ff9b::a00:5]:9200/_cat/indices",  # 10.0.0.5 through NAT64
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # 169.254.169.254 through NAT64
        "http://[64:ff9b:1::a00:5]/",  # local-use translation prefix
        "http://[2002:a00:5::1]/",  # 6to4 of 10.0.0.5
        "http://[::a9fe:a9fe]/",  # IPv4-compatible
        "http://[::ffff:0:a00:5]/",  # IPv4-translated
    ]
    public = "https://[64:ff9b::5db8:d822]/cat.png"  # 93.184.216.34 through NAT64
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), refuse_private_media_urls=True
    ) as gateway:
        async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0) as client:
            for url in carried:
                with pytest.raises(openai.BadRequestError) as refused:
                    await client.chat.completions.create(model="qwen", messages=chat_with_image(url))
                assert refused.value.body["code"] == "media_url_not_allowed", url  # type: ignore[index]
            assert fake.requests == []
            await client.chat.completions.create(model="qwen", messages=chat_with_image(public))
    assert [r.json["messages"][0]["content"][1]["image_url"]["url"] for r in fake.requests] == [public]


async def test_a_url_nested_in_an_anthropic_block_is_checked_for_an_anthropic_kind_backend() -> None:
    """A `document` whose source is `content` holds blocks of its own, an image by URL among
    them: only a block's own `source.url` was checked, so the nested one reached the backend
    inside the network unchecked."""
    fake = AnthropicBackend()
    async with fake.serve() as server, running_gateway(
        backend("claude-in-house", server.url, kind="anthropic", default=True), refuse_private_media_urls=True
    ) as gateway:
        async with anthropic.AsyncAnthropic(base_url=gateway, api_key="unused", max_retries=0) as claude:
            image = {"type": "image", "source": {"type": "url", "url": INSIDE[0]}}
            document = {"type": "document", "source": {"type": "content", "content": [
                {"type": "text", "text": "Page one"}, image,
            ]}}
            messages: Any = [{"role": "user", "content": [{"type": "text", "text": "Read"}, document]}]
            with pytest.raises(anthropic.BadRequestError) as denied:
                await claude.messages.create(model="qwen", max_tokens=20, messages=messages)
            assert "`messages[0].content[1].source.content[1].source.url`" in denied.value.body["error"]["message"]  # type: ignore[index]
            assert fake.requests == []
            image["source"] = {"type": "url", "url": PUBLIC}
            await claude.messages.create(model="qwen", max_tokens=20, messages=messages)
    assert len(fake.requests) == 1


async def test_names_whose_dns_never_answers_leave_the_gateways_own_lookups_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A media URL's name is looked up in a thread, which a name whose DNS never answers holds
    long after its check has given up (and refused it). Those lookups took the threads the
    whole gateway shares: a client naming such hosts stalled every chat to a backend the gateway
    reaches by name, until the lookups died."""
    release = threading.Event()
    entered: list[str] = []
    looking_up = trio.Event()
    real = socket.getaddrinfo

    def resolver(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.endswith(".unanswered.test") and not flags & socket.AI_NUMERICHOST:
            entered.append(name)
            if len(entered) == 4:
                trio.from_thread.run_sync(looking_up.set)
            release.wait(30)  # a DNS server that does not answer
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    fake = OpenAIBackend()
    try:
        async with fake.serve() as server, running_gateway(
            backend("vllm", server.url.replace("127.0.0.1", "localhost"), default=True), refuse_private_media_urls=True
        ) as gateway:
            async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0) as client:
                async def stalled(n: int) -> None:
                    with pytest.raises(openai.BadRequestError):
                        await client.chat.completions.create(
                            model="qwen", messages=chat_with_image(f"http://cat{n}.unanswered.test/cat.png"),
                        )

                async with trio.open_nursery() as nursery:
                    for n in range(48):
                        nursery.start_soon(stalled, n)
                    with trio.fail_after(10):
                        await looking_up.wait()
                    await trio.sleep(0.3)
                    with trio.fail_after(4):  # before those checks give up
                        answer = await client.chat.completions.create(
                            model="qwen", messages=[{"role": "user", "content": "Hi"}],
                        )
                    assert answer.choices[0].message.content
    finally:
        release.set()
