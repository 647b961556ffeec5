"""Rerank (`/v1/rerank`, `/v2/rerank`, `/rerank`) relayed to a fake vLLM-style backend:
routing, the fields the gateway checks, errors, hang-ups, metering and a key's charge."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from proxy.config import Timeouts
from proxy.infra.logging import REQUEST_LOGGER
from tests.fakes import OllamaBackend, OpenAIBackend, Script, Usage
from tests.harness import backend, relay_gateway, running_gateway
from tests.test_auth_helpers import bearer, eventually, gateway, keys_cli, new_key, wait_for_key
from tests.test_metrics import total

pytest_plugins = ["tests.infra_servers"]

DOCUMENTS = [
    "Paris is the capital of France.",
    "The Eiffel Tower is in Paris, the capital city.",
    "Bananas are rich in potassium.",
]
RERANK = {"model": "bge-reranker", "query": "capital of France", "documents": DOCUMENTS}


@dataclass
class Setup:
    fake: OpenAIBackend
    ollama: OllamaBackend
    client: httpx.AsyncClient


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    fake = OpenAIBackend()
    async with (
        relay_gateway(fake, {"reranker": "bge-reranker-v2-m3"}) as (url, ollama),
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        yield Setup(fake, ollama, client)


def reranks(fake: OpenAIBackend) -> list[Any]:
    return [r for r in fake.requests if r.path == "/v1/rerank"]


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
async def test_documents_come_back_ranked_from_the_backend(setup: Setup, path: str) -> None:
    response = await setup.client.post(path, json={**RERANK, "top_n": 2, "return_documents": True})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [r["index"] for r in answer["results"]] == [0, 1]  # bananas ranked out
    assert answer["results"][0]["relevance_score"] == 1.0
    assert answer["results"][0]["document"] == {"text": DOCUMENTS[0]}
    assert answer["usage"]["total_tokens"] > 0
    [sent] = reranks(setup.fake)
    assert sent.json == {**RERANK, "top_n": 2, "return_documents": True}
    assert response.headers["x-request-id"] == sent.headers["x-request-id"]


async def test_the_request_log_line_says_it_was_a_rerank(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    fake = OpenAIBackend()
    async with (
        fake.serve() as server,
        running_gateway(backend("vllm", server.url, default=True), aliases={"reranker": "bge-m3"}, access_log=True) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        assert (await client.post("/v1/rerank", json={**RERANK, "model": "reranker"})).status_code == 200
    [line] = [r for r in caplog.records if r.name == REQUEST_LOGGER]
    logged = {name: getattr(line, name, None) for name in ("kind", "model", "upstream_model", "backend", "status")}
    assert logged == {"kind": "rerank", "model": "reranker", "upstream_model": "bge-m3", "backend": "vllm", "status": 200}
    assert line.prompt_tokens > 0 and line.completion_tokens is None  # type: ignore[attr-defined]


async def test_the_answer_is_the_backends_bytes(setup: Setup) -> None:
    response = await setup.client.post("/v1/rerank", json={**RERANK, "documents": [{"text": d} for d in DOCUMENTS]})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    # The fake writes compact JSON: a re-encoding gateway would add spaces.
    assert response.content.startswith(b'{"id":"rerank-') and b'", "' not in response.content


async def test_an_alias_reaches_the_backend_as_its_upstream_model(setup: Setup) -> None:
    response = await setup.client.post("/v1/rerank", json={**RERANK, "model": "reranker"})
    assert response.status_code == 200
    assert reranks(setup.fake)[-1].json["model"] == "bge-reranker-v2-m3"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": "q", "documents": ["a"]}, "model"),
        ({"model": "m", "documents": ["a"]}, "query"),
        ({"model": "m", "query": 3, "documents": ["a"]}, "query"),
        ({"model": "m", "query": "q"}, "documents"),
        ({"model": "m", "query": "q", "documents": []}, "documents"),
        ({"model": "m", "query": "q", "documents": "a"}, "documents"),
        ({"model": "m", "query": "q", "documents": ["a", 7]}, "documents[1]"),
        ({"model": "m", "query": "q", "documents": ["a"], "top_n": -1}, "top_n"),
        ({"model": "m", "query": "q", "documents": ["a"], "top_n": "2"}, "top_n"),
        ({"model": "m", "query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents"),
    ],
)
async def test_an_invalid_body_is_a_400_naming_the_field(setup: Setup, body: dict[str, object], param: str) -> None:
    response = await setup.client.post("/v1/rerank", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert not reranks(setup.fake)


async def test_a_body_that_is_not_json_is_a_400(setup: Setup) -> None:
    response = await setup.client.post("/rerank", content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("model", "kind"), [("llama3.2", "ollama"), ("claude-sonnet-4", "anthropic")])
async def test_a_model_whose_backend_has_no_rerank_is_a_400(setup: Setup, model: str, kind: str) -> None:
    response = await setup.client.post("/v1/rerank", json={**RERANK, "model": model})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "model" and f"({kind})" in error["message"] and "/rerank" in error["message"]
    assert not [r for r in setup.ollama.requests if "rerank" in r.path]


async def test_a_refused_rerank_is_counted_as_a_rerank_not_a_chat(setup: Setup) -> None:
    assert (await setup.client.post("/v1/rerank", json={**RERANK, "top_n": -1})).status_code == 400
    text = (await setup.client.get("/metrics")).text
    assert total(text, "llm_proxy_requests_total", kind="rerank", source="refused", status="400") == 1
    assert total(text, "llm_proxy_requests_total", kind="chat") == 0


async def test_an_unknown_model_is_a_404() -> None:
    fake = OpenAIBackend(models=("bge-reranker",))
    async with (
        fake.serve() as server,
        running_gateway(backend("vllm", server.url, models=("bge-reranker",))) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        response = await client.post("/v1/rerank", json={**RERANK, "model": "no-such-model"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert not reranks(fake)


async def test_backend_errors_keep_their_status(setup: Setup) -> None:
    setup.fake.set_script(Script(status=400, error_message="query is too long for this model"))
    refused = await setup.client.post("/v1/rerank", json=RERANK)
    assert refused.status_code == 400 and refused.json()["error"]["message"] == "query is too long for this model"
    setup.fake.set_script(Script(status=503, error_body=b"<html>overloaded</html>"))
    down = await setup.client.post("/v1/rerank", json=RERANK)
    assert down.status_code == 503 and "overloaded" in down.json()["error"]["message"]


async def test_a_rerank_servers_validation_error_is_said_with_its_field(setup: Setup) -> None:
    # Infinity and TEI's FastAPI cousins: pydantic's 422, a field deep in the body.
    detail = [
        {"loc": ["body", "documents", 1], "msg": "String should have at most 512 characters", "type": "string_too_long"},
        {"loc": ["body", "query"], "msg": "Field required", "type": "missing"},
    ]
    setup.fake.set_script(Script(status=422, error_body={"detail": detail}))
    refused = await setup.client.post("/v1/rerank", json=RERANK)
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == (
        "documents[1]: String should have at most 512 characters; query: Field required"
    )
    assert refused.json()["error"]["param"] == "documents[1]"
    # vLLM's newer shape: OpenAI's error object, pydantic's errors printed in its message.
    printed = "[{'type': 'missing', 'loc': ('body', 'query'), 'msg': 'Field required', 'input': {}}]"
    vllm = {"error": {"message": printed, "type": "BadRequestError", "param": None, "code": 400}}
    setup.fake.set_script(Script(status=400, error_body=vllm))
    refused = await setup.client.post("/v1/rerank", json=RERANK)
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "query: Field required"
    assert refused.json()["error"]["param"] == "query"


async def test_a_backend_slower_than_its_total_timeout_is_a_504() -> None:
    fake = OpenAIBackend(default=Script(header_delay=5))
    quick = Timeouts(connect=2, first_token=5, idle=5, total=0.3)
    async with (
        fake.serve() as server,
        running_gateway(backend("slow", server.url, default=True, timeouts=quick)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        response = await client.post("/v1/rerank", json=RERANK)
        assert response.status_code == 504 and "did not finish" in response.json()["error"]["message"]
        await fake.wait_disconnect(2.0)


async def test_a_client_that_hangs_up_closes_the_backend_request_and_is_charged(setup: Setup) -> None:
    setup.fake.set_script(Script(header_delay=20))
    with trio.move_on_after(0.3):
        await setup.client.post("/v1/rerank", json={**RERANK, "query": "q" * 8, "documents": ["d" * 12]})
    await setup.fake.wait_disconnect(2.0)
    await setup.fake.wait_idle(2.0)

    async def counted() -> str | None:
        text = (await setup.client.get("/metrics")).text
        return text if total(text, "llm_proxy_requests_total", outcome="cancelled") else None

    text = await eventually(counted)
    # Leaving is no way around a key's token limit: the reranker's input is charged.
    assert total(text, "llm_proxy_prompt_tokens_total", kind="rerank") == 5


async def test_metrics_count_reranks_with_the_backends_tokens_or_an_estimate(setup: Setup) -> None:
    setup.fake.set_script(Script(usage=Usage(40, 0)))
    assert (await setup.client.post("/v1/rerank", json=RERANK)).status_code == 200
    # A server that counts nothing: charged what the reranker read, the query with each document.
    setup.fake.set_script(Script(omit_usage=True))
    quiet = await setup.client.post("/v1/rerank", json={**RERANK, "query": "q" * 8, "documents": ["d" * 12] * 2})
    assert quiet.status_code == 200 and "usage" not in quiet.json()

    async def counted() -> str | None:
        text = (await setup.client.get("/metrics")).text
        return text if total(text, "llm_proxy_requests_total", status="200") == 2 else None

    text = await eventually(counted)
    assert total(text, "llm_proxy_requests_total", kind="rerank", status="200", outcome="ok") == 2
    assert total(text, "llm_proxy_prompt_tokens_total") == 40 + 2 * 5  # 20 characters a pair
    assert total(text, "llm_proxy_completion_tokens_total") == 0


async def test_the_guard_applies_and_a_key_is_charged(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    fake = OpenAIBackend(default=Script(usage=Usage(21, 0)))
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        key = await new_key(pg_database_url, "rerank", "--models", "bge-*")
        await wait_for_key(url, key)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.post("/v1/rerank", json=RERANK)).status_code == 401
            outside = await client.post("/v1/rerank", json={**RERANK, "model": "jina-reranker"}, headers=bearer(key))
            assert outside.status_code == 403, outside.text  # the key's model scope
            answer = await client.post("/rerank", json=RERANK, headers=bearer(key))
            assert answer.status_code == 200, answer.text

        async def listed() -> dict[str, object] | None:
            code, out, _ = await trio.to_thread.run_sync(lambda: keys_cli(pg_database_url, "list", "--json"))
            assert code == 0
            entry: dict[str, object] = json.loads(out.splitlines()[0])
            return entry if entry["prompt_tokens"] == 21 else None

        entry = await eventually(listed, within=10.0)
    assert entry["completion_tokens"] == 0 and entry["requests"] == 2  # the 403 counts, unanswered
