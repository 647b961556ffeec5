"""The Batch API's rerank and score lines (`/v1/rerank`, `/v1/score`: what vLLM's own
`vllm run-batch` takes besides chat and embeddings), with the official `openai` SDK against a
gateway with PostgreSQL and NATS in front of a fake vLLM: each line answered through the
front door as the batch's key, in OpenAI's output shape, its usage summed and charged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.fakes import Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import eventually, gateway, new_key, sql, wait_for_key
from tests.test_batches import jsonl, output_lines, submit, until_status
from tests.test_vllm_apis import VllmBackend

pytest_plugins = ["tests.infra_servers"]

# Each answer reports 21 input tokens: rerank as vLLM counts it (`total_tokens` only), score
# as `prompt_tokens`.
TOKENS = 21


@dataclass
class Keyed:
    fake: VllmBackend
    client: openai.AsyncOpenAI
    db: str
    url: str
    key: str


@pytest.fixture
async def keyed(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Keyed]:
    fake = VllmBackend(default=Script(usage=Usage(TOKENS, 0)))
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        key = await new_key(pg_database_url, "reranker", "--models", "bge-*")
        await wait_for_key(url, key)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        yield Keyed(fake, client, pg_database_url, url, key)
        await client.close()


def rerank_line(custom_id: str, query: str, model: str = "bge-reranker-v2-m3", url: str = "/v1/rerank") -> dict[str, Any]:
    return {
        "custom_id": custom_id, "method": "POST", "url": url,
        "body": {"model": model, "query": query, "documents": ["Paris is in France.", "Bananas are yellow."]},
    }


def score_line(custom_id: str, text: str, model: str = "bge-reranker-v2-m3", url: str = "/v1/score") -> dict[str, Any]:
    return {
        "custom_id": custom_id, "method": "POST", "url": url,
        "body": {"model": model, "text_1": text, "text_2": ["Paris is.", "Bananas."]},
    }


def backend_calls(fake: VllmBackend, path: str) -> int:
    return sum(request.path == path for request in fake.requests)


async def test_rerank_and_score_batches_complete_with_each_lines_answer_and_their_usage(keyed: Keyed) -> None:
    reranks = await submit(keyed.client, jsonl(rerank_line("r1", "bananas"), rerank_line("r2", "paris")), "/v1/rerank")
    scores = await submit(keyed.client, jsonl(score_line("s1", "capital"), score_line("s2", "fruit")), "/v1/score")
    assert (reranks.endpoint, scores.endpoint) == ("/v1/rerank", "/v1/score")

    done = await until_status(keyed.client, reranks.id, "completed", "failed")
    assert done.status == "completed" and done.error_file_id is None, done
    assert done.model == "bge-reranker-v2-m3"
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (2, 0)
    assert done.usage is not None and (done.usage.input_tokens, done.usage.output_tokens) == (2 * TOKENS, 0)
    lines = await output_lines(keyed.client, done.output_file_id)
    assert [line["custom_id"] for line in lines] == ["r1", "r2"]
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in lines)
    # Each line's own answer: its query's best document first.
    best = [line["response"]["body"]["results"][0]["document"]["text"] for line in lines]
    assert best == ["Bananas are yellow.", "Paris is in France."]

    done = await until_status(keyed.client, scores.id, "completed", "failed")
    assert done.status == "completed" and done.error_file_id is None, done
    assert done.usage is not None and (done.usage.input_tokens, done.usage.output_tokens) == (2 * TOKENS, 0)
    lines = await output_lines(keyed.client, done.output_file_id)
    assert [line["custom_id"] for line in lines] == ["s1", "s2"]
    for line in lines:
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and body["object"] == "list"
        assert [item["score"] for item in body["data"]] == [0.75, 0.75]
    # Each line was one request of the key's, relayed to the backend and charged to the key.
    assert (backend_calls(keyed.fake, "/v1/rerank"), backend_calls(keyed.fake, "/score")) == (2, 2)

    async def charged() -> tuple[Any, ...] | None:
        found = await sql(
            keyed.db, "SELECT sum(requests), sum(prompt_tokens) FROM api_key_usage u JOIN api_keys k ON k.id = u.key_id "
            "WHERE k.name = 'reranker'",
        )
        return found[0] if found and found[0][0] == 4 else None

    assert (await eventually(charged, within=15))[1] == 4 * TOKENS


async def test_lines_naming_a_model_outside_the_keys_scope_are_403s_in_the_error_file(keyed: Keyed) -> None:
    batch = await submit(
        keyed.client, jsonl(rerank_line("a", "x", model="qwen3-8b"), rerank_line("b", "y", model="qwen3-8b")), "/v1/rerank"
    )
    done = await until_status(keyed.client, batch.id, "completed", "failed")
    assert done.status == "completed" and done.output_file_id is None
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (0, 2)
    refusals = await output_lines(keyed.client, done.error_file_id)
    assert [line["custom_id"] for line in refusals] == ["a", "b"]
    for line in refusals:
        assert line["response"]["status_code"] == 403
        assert line["response"]["body"]["error"]["code"] == "model_not_allowed"
    assert backend_calls(keyed.fake, "/v1/rerank") == 0


async def test_a_line_whose_url_or_model_is_not_the_batchs_fails_it_as_for_other_endpoints(keyed: Keyed) -> None:
    batch = await submit(
        keyed.client,
        jsonl(score_line("a", "x"), rerank_line("b", "y", url="/v1/rerank"), score_line("c", "z", model="bge-m3")),
        "/v1/score",
    )
    failed = await until_status(keyed.client, batch.id, "failed", "completed")
    assert failed.status == "failed" and failed.errors is not None and failed.errors.data is not None
    assert [(error.line, error.code, error.param) for error in failed.errors.data] == [
        (2, "url_mismatch", "url"), (3, "model_mismatch", "body.model"),
    ]
    assert backend_calls(keyed.fake, "/score") == 0


async def test_the_openapi_document_offers_both_endpoints(keyed: Keyed) -> None:
    async with httpx.AsyncClient(base_url=keyed.url, headers={"authorization": f"Bearer {keyed.key}"}) as client:
        document = (await client.get("/openapi.json")).json()
    schema = document["paths"]["/v1/batches"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"/v1/rerank", "/v1/score"} <= set(schema["properties"]["endpoint"]["enum"])
