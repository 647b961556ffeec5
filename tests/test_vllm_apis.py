"""vLLM's APIs beside OpenAI's (`/tokenize`, `/detokenize`, `/score`, `/v1/score`, `/classify`,
`/v1/classify`, `/pooling`) relayed to a fake vLLM that serves them at its root: routing,
aliases, refusals, metering, a key's scope, limits and charge, and a client that leaves."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from proxy.infra.logging import REQUEST_LOGGER
from tests.fakes import OllamaBackend, OpenAIBackend, Script, Usage
from tests.fakes.base import Call, json_bytes
from tests.fakes.server import Exchange, Request
from tests.harness import (
    backend,
    hang_up_once_received,
    refusing_port,
    relay_gateway,
    running_gateway,
)
from tests.test_auth_helpers import bearer, eventually, gateway, keys_cli, new_key, wait_for_key
from tests.test_metrics import total

pytest_plugins = ["tests.infra_servers"]

_ROOT = ("/tokenize", "/detokenize", "/score", "/classify", "/pooling")


class VllmBackend(OpenAIBackend):
    """The OpenAI fake plus vLLM's tokenizer, score, classification and pooling APIs at its
    root, answering with compact JSON (a gateway that re-encoded it would be seen)."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path not in _ROOT or request.method != "POST":
            await super().route(request, exchange, call)
            return
        body = request.json()
        model = body.get("model")
        if model is not None and not self.model_known(model):
            await self.send_error(exchange, 404, f"The model `{model}` does not exist.")
            return
        script = self.script_for(model or self.default_model)
        await trio.sleep(script.header_delay)
        texts = [t for key in ("prompt", "input", "text_1", "text_2") for t in _texts(body.get(key))]
        tokens = sum(max(1, len(t) // 4) for t in texts)
        served = model or "the-one-model"
        answer: dict[str, Any]
        if request.path == "/tokenize":
            answer = {"count": tokens, "max_model_len": 8192, "tokens": list(range(tokens))}
        elif request.path == "/detokenize":
            answer = {"prompt": " ".join(f"t{t}" for t in body["tokens"])}
        else:
            item = {"/score": {"object": "score", "score": 0.75}, "/classify": {"label": "positive", "probs": [0.9, 0.1]},
                    "/pooling": {"object": "pooling", "data": [0.5, 0.25]}}[request.path]
            answer = {"id": "score-1", "object": "list", "created": 1, "model": served,
                      "data": [{"index": i, **item} for i in range(max(1, len(texts) - 1))]}
            if not script.omit_usage:
                prompt = script.usage.prompt_tokens if script.usage is not None else tokens
                answer["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt, "completion_tokens": 0}
        await exchange.respond(200, json_bytes(answer))


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


@dataclass
class Setup:
    fake: VllmBackend
    ollama: OllamaBackend
    client: httpx.AsyncClient


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    fake = VllmBackend()
    async with (
        relay_gateway(fake, {"scorer": "bge-reranker-v2-m3"}) as (url, ollama),
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        yield Setup(fake, ollama, client)


CALLS = [
    ("/tokenize", "/tokenize", {"prompt": "Hello there, tokenizer"}),
    ("/detokenize", "/detokenize", {"tokens": [1, 2, 3]}),
    ("/score", "/score", {"text_1": "What is the capital of France?", "text_2": ["Paris is.", "Bananas."]}),
    ("/v1/score", "/score", {"text_1": "query", "text_2": "document"}),
    ("/classify", "/classify", {"input": ["I loved it", "Dreadful"]}),
    ("/v1/classify", "/classify", {"input": "I loved it"}),
    ("/pooling", "/pooling", {"input": "pool me"}),
]


@pytest.mark.parametrize(("path", "backend_path", "body"), CALLS)
async def test_each_api_reaches_the_backends_root_with_the_upstream_model(
    setup: Setup, path: str, backend_path: str, body: dict[str, Any]
) -> None:
    response = await setup.client.post(path, json={"model": "scorer", **body})
    assert response.status_code == 200, response.text
    [sent] = setup.fake.requests
    assert sent.path == backend_path  # beside `/v1`, where vLLM serves it
    assert sent.json == {"model": "bge-reranker-v2-m3", **body}  # the alias resolved, the rest as sent
    assert response.headers["x-request-id"] == sent.headers["x-request-id"]
    # The backend's bytes: compact JSON, which a re-encoding gateway would space out.
    assert b", " not in response.content and b": " not in response.content
    assert response.headers["content-type"].startswith("application/json")


async def test_the_answer_is_the_backends_bytes(setup: Setup) -> None:
    response = await setup.client.post("/score", json={"model": "m", "text_1": "a", "text_2": "b"})
    assert response.content.startswith(b'{"id":"score-1","object":"list"')
    assert response.json()["data"] == [{"index": 0, "object": "score", "score": 0.75}]


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
async def test_the_tokenizer_without_a_model_asks_the_default_backend(setup: Setup, path: str) -> None:
    body = {"prompt": "Hello"} if path == "/tokenize" else {"tokens": [7, 8]}
    response = await setup.client.post(path, json=body)
    assert response.status_code == 200, response.text
    [sent] = setup.fake.requests
    assert sent.path == path and sent.json == body  # no `model` made up: vLLM uses its one model
    expected = {"count": 1, "max_model_len": 8192, "tokens": [0]} if path == "/tokenize" else {"prompt": "t7 t8"}
    assert response.json() == expected


async def test_the_tokenizer_without_a_model_and_no_default_backend_is_a_400() -> None:
    fake = VllmBackend()
    async with (
        fake.serve() as server,
        running_gateway(backend("vllm", server.url, prefixes=("qwen",))) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        response = await client.post("/tokenize", json={"prompt": "Hello"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "model" and "default backend" in error["message"]
    assert not fake.requests


@pytest.mark.parametrize("path", ["/score", "/v1/score", "/classify", "/v1/classify", "/pooling"])
async def test_a_model_is_required_for_scores_classifications_and_pooling(setup: Setup, path: str) -> None:
    response = await setup.client.post(path, json={"input": "x", "text_1": "a", "text_2": "b"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "model" and error["type"] == "invalid_request_error"
    assert not setup.fake.requests


@pytest.mark.parametrize(("body", "status"), [(b"{", 400), (b"[1]", 400), (b'{"model": 3, "input": "x"}', 400)])
async def test_a_body_the_gateway_cannot_read_is_a_400(setup: Setup, body: bytes, status: int) -> None:
    response = await setup.client.post("/pooling", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status and response.json()["error"]["type"] == "invalid_request_error"
    assert not setup.fake.requests


@pytest.mark.parametrize("path", ["/tokenize", "/score", "/classify", "/pooling"])
@pytest.mark.parametrize(("model", "kind"), [("llama3.2", "ollama"), ("claude-sonnet-4", "anthropic")])
async def test_a_model_whose_backend_is_not_vllm_is_a_400_saying_why(setup: Setup, path: str, model: str, kind: str) -> None:
    response = await setup.client.post(path, json={"model": model, "input": "x", "prompt": "x", "text_1": "a", "text_2": "b"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "model" and f"({kind})" in error["message"] and path in error["message"]
    assert not setup.ollama.requests and not setup.fake.requests


async def test_an_unknown_model_is_a_404() -> None:
    fake = VllmBackend(models=("bge-reranker",))
    async with (
        fake.serve() as server,
        running_gateway(backend("vllm", server.url, models=("bge-reranker",))) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        scored = await client.post("/score", json={"model": "no-such-model", "text_1": "a", "text_2": "b"})
        tokenized = await client.post("/tokenize", json={"model": "no-such-model", "prompt": "a"})
    for response in (scored, tokenized):
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert not [r for r in fake.requests if r.path in _ROOT]


async def test_the_backends_own_404_for_a_model_it_lacks_is_relayed() -> None:
    fake = VllmBackend(models=("qwen3-8b",))
    async with (
        fake.serve() as server,
        running_gateway(backend("vllm", server.url, default=True)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        response = await client.post("/tokenize", json={"model": "qwen3-32b", "prompt": "a"})
    assert response.status_code == 404 and "qwen3-32b" in response.json()["error"]["message"]


async def test_scores_are_metered_as_embeddings_and_tokenizing_is_not(setup: Setup) -> None:
    setup.fake.set_script(Script(usage=Usage(40, 0)))
    assert (await setup.client.post("/score", json={"model": "m", "text_1": "a", "text_2": "b"})).status_code == 200
    # A server that reports no usage: charged an estimate of the input, 20 characters here.
    setup.fake.set_script(Script(omit_usage=True))
    quiet = await setup.client.post("/classify", json={"model": "m", "input": ["c" * 12, "d" * 8]})
    assert quiet.status_code == 200 and "usage" not in quiet.json()
    assert (await setup.client.post("/tokenize", json={"model": "m", "prompt": "t" * 400})).status_code == 200
    assert (await setup.client.post("/detokenize", json={"model": "m", "tokens": list(range(50))})).status_code == 200

    async def counted() -> str | None:
        text = (await setup.client.get("/metrics")).text
        return text if total(text, "llm_proxy_requests_total", status="200") == 4 else None

    text = await eventually(counted)
    for kind in ("score", "classify", "tokenize", "detokenize"):
        assert total(text, "llm_proxy_requests_total", kind=kind, status="200", outcome="ok") == 1
    assert total(text, "llm_proxy_prompt_tokens_total", kind="score") == 40
    assert total(text, "llm_proxy_prompt_tokens_total", kind="classify") == 5
    assert total(text, "llm_proxy_prompt_tokens_total", kind="tokenize") == 0
    assert total(text, "llm_proxy_prompt_tokens_total", kind="detokenize") == 0
    assert total(text, "llm_proxy_requests_total", kind="chat") == 0


async def test_the_request_log_names_the_api_and_its_model(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    fake = VllmBackend()
    async with (
        fake.serve() as server,
        running_gateway(backend("vllm", server.url, default=True), aliases={"scorer": "bge-m3"}, access_log=True) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        assert (await client.post("/pooling", json={"model": "scorer", "input": "x"})).status_code == 200
        assert (await client.post("/tokenize", json={"prompt": "hello"})).status_code == 200
        assert (await client.post("/v1/score", json={"input": "x"})).status_code == 400
    lines = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    names = ("kind", "model", "upstream_model", "backend", "status", "prompt_tokens", "usage_estimated")
    logged = [{name: getattr(line, name, None) for name in names} for line in lines]
    assert logged == [
        {"kind": "pooling", "model": "scorer", "upstream_model": "bge-m3", "backend": "vllm", "status": 200,
         "prompt_tokens": 1, "usage_estimated": False},
        {"kind": "tokenize", "model": "", "upstream_model": "", "backend": "vllm", "status": 200,
         "prompt_tokens": None, "usage_estimated": False},
        {"kind": "score", "model": "", "upstream_model": "", "backend": "", "status": 400,
         "prompt_tokens": None, "usage_estimated": False},
    ]


async def test_a_client_that_hangs_up_closes_the_backend_request_and_is_charged(setup: Setup) -> None:
    setup.fake.set_script(Script(header_delay=20))
    await hang_up_once_received(
        setup.fake, lambda: setup.client.post("/score", json={"model": "m", "text_1": "q" * 8, "text_2": "d" * 12})
    )
    await setup.fake.wait_disconnect(2.0)

    async def counted() -> str | None:
        text = (await setup.client.get("/metrics")).text
        return text if total(text, "llm_proxy_requests_total", outcome="cancelled") else None

    text = await eventually(counted)
    assert total(text, "llm_proxy_requests_total", kind="score", outcome="cancelled") == 1
    # Leaving is no way around a key's token limit: the input is charged.
    assert total(text, "llm_proxy_prompt_tokens_total", kind="score") == 5


async def test_the_guard_scope_limits_and_charge_apply(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    fake = VllmBackend(default=Script(usage=Usage(21, 0)))
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        scoped = await new_key(pg_database_url, "scorer", "--models", "bge-*")
        await wait_for_key(url, scoped)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.post("/score", json={"model": "bge-m3", "text_1": "a", "text_2": "b"})).status_code == 401
            outside = await client.post("/classify", json={"model": "qwen3-8b", "input": "a"}, headers=bearer(scoped))
            assert outside.status_code == 403 and outside.json()["error"]["code"] == "model_not_allowed"
            # Which model the default backend serves is unknown: a scoped key must name one.
            unnamed = await client.post("/tokenize", json={"prompt": "a"}, headers=bearer(scoped))
            assert unnamed.status_code == 400 and unnamed.json()["error"]["param"] == "model"
            answer = await client.post("/v1/score", json={"model": "bge-m3", "text_1": "a", "text_2": "b"}, headers=bearer(scoped))
            assert answer.status_code == 200, answer.text
            assert [r.path for r in fake.requests if r.path in _ROOT] == ["/score"]

            # Tokenizing is free, as counting tokens is: it leaves the key's requests to its scores.
            limited = await new_key(pg_database_url, "tokenizer", "--rpm", "2")
            await wait_for_key(url, limited)
            statuses = [
                (await client.post(path, json={"model": "m", **body}, headers=bearer(limited))).status_code
                for path, body in [("/tokenize", {"prompt": "a"})] * 3 + [("/detokenize", {"tokens": [1]})] * 2
            ]
            statuses += [
                (await client.post("/score", json={"model": "m", "text_1": "a", "text_2": "b"}, headers=bearer(limited))).status_code
                for _ in range(3)
            ]
            assert statuses == [200] * 7 + [429]

            # A score's input is reserved at admission, as a rerank's: one larger than the key's
            # whole bucket never reaches the backend. Tokenizing the same text reserves nothing.
            small = await new_key(pg_database_url, "small", "--tpm", "100")
            await wait_for_key(url, small)
            text = "word " * 200
            scored = await client.post("/score", json={"model": "m", "text_1": text, "text_2": "b"}, headers=bearer(small))
            assert scored.status_code == 429 and "Request too large" in scored.json()["error"]["message"], scored.text
            tokenized = await client.post("/tokenize", json={"model": "m", "prompt": text}, headers=bearer(small))
            assert tokenized.status_code == 200, tokenized.text
            assert [r.path for r in fake.requests if r.path in _ROOT] == (
                ["/score"] + ["/tokenize"] * 3 + ["/detokenize"] * 2 + ["/score"] * 2 + ["/tokenize"]
            )

        async def listed() -> dict[str, dict[str, object]] | None:
            code, out, _ = await trio.to_thread.run_sync(lambda: keys_cli(pg_database_url, "list", "--json"))
            assert code == 0
            entries = {entry["name"]: entry for entry in map(json.loads, out.splitlines())}
            return entries if entries["scorer"]["prompt_tokens"] == 21 and entries["tokenizer"]["requests"] == 8 else None

        entries = await eventually(listed, within=10.0)
    assert entries["scorer"]["completion_tokens"] == 0
    assert entries["tokenizer"]["prompt_tokens"] == 42  # its two scores; tokenizing charged nothing


async def test_a_multimodal_score_or_pooling_is_checked_like_a_chat() -> None:
    fake = VllmBackend()
    image = {"type": "image_url", "image_url": {"url": "http://10.0.0.5/cat.png"}}
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), refuse_private_media_urls=True
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        scored = await client.post("/score", json={"model": "m", "text_1": "a cat", "text_2": {"content": [image]}})
        items = await client.post("/v1/score", json={"model": "m", "queries": "a cat", "items": [{"content": [image]}]})
        pooled = await client.post("/pooling", json={"model": "m", "messages": [{"role": "user", "content": [image]}]})
        tokenized = await client.post("/tokenize", json={"messages": [{"role": "user", "content": [image]}]})
    for response, param in (
        (scored, "text_2.content[0].image_url.url"), (items, "items[0].content[0].image_url.url"),
        (pooled, "messages[0].content[0].image_url.url"),
        (tokenized, "messages[0].content[0].image_url.url"),
    ):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "media_url_not_allowed"
        assert response.json()["error"]["param"] == param
    assert not [r for r in fake.requests if r.path in _ROOT]


async def test_the_body_limit_applies_and_the_trace_reaches_the_backend() -> None:
    fake = VllmBackend()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), max_body_bytes=1024
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        too_large = await client.post("/classify", json={"model": "m", "input": "x" * 2000})
        assert too_large.status_code == 413 and too_large.json()["error"]["type"] == "invalid_request_error"
        traced = await client.post("/tokenize", json={"model": "m", "prompt": "a"}, headers={"traceparent": traceparent})
        assert traced.status_code == 200
    [sent] = [r for r in fake.requests if r.path in _ROOT]
    assert sent.path == "/tokenize" and sent.headers["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")


async def test_the_tokenizer_without_a_model_and_an_ollama_default_backend_is_a_400_saying_why() -> None:
    ollama = OllamaBackend()
    async with (
        ollama.serve() as server,
        running_gateway(backend("ollama", server.url, kind="ollama", default=True)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        response = await client.post("/tokenize", json={"prompt": "Hello"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "model" and "without `model` goes to the default backend `ollama` (ollama)" in error["message"]
    assert not ollama.requests


async def test_a_score_whose_backend_is_down_goes_to_a_stand_in_but_tokenizing_does_not() -> None:
    port = refusing_port()
    spare = VllmBackend(models=("scorer-b",))
    async with spare.serve() as server, running_gateway(
        backend("dead", f"http://127.0.0.1:{port}", models=("scorer-a",)),
        backend("spare", server.url, models=("scorer-b",)),
        fallbacks={"scorer-a": ("scorer-b",)},
    ) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        scored = await client.post("/score", json={"model": "scorer-a", "text_1": "q", "text_2": ["a", "b"]})
        assert scored.status_code == 200 and scored.headers["x-fallback-model"] == "scorer-b"
        # Another model's tokenizer would give other counts: the model's own backend or nothing.
        tokenized = await client.post("/tokenize", json={"model": "scorer-a", "prompt": "hello"})
        assert tokenized.status_code == 503 and "x-fallback-model" not in tokenized.headers
    assert [(r.path, r.json["model"]) for r in spare.requests if r.method == "POST"] == [("/score", "scorer-b")]
