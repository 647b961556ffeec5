"""Embeddings in an API key's usage and token limit, as chats are: through the `openai` and
`ollama` SDKs against a gateway on real PostgreSQL, checked with `llm-proxy keys list`."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import ollama
import openai
import pytest
import trio

from proxy.config import EmbeddingSettings
from proxy.domain.routing import Router
from proxy.services.chat import ExchangeRecord
from proxy.services.embeddings import EmbeddingRequest, EmbeddingService, LocalModel
from tests.fakes import OllamaBackend, OpenAIBackend
from tests.fakes.base import Call
from tests.fakes.server import Exchange, Request
from tests.harness import backend
from tests.test_auth_helpers import (
    bearer,
    eventually,
    gateway,
    keys_cli,
    new_key,
    sql,
    wait_for_key,
)
from tests.test_embeddings_event_loop import MAX_WAIT_SECONDS, ROWS, CannedVLLM, longest_wait

pytest_plugins = ["tests.infra_servers"]

SHORT_WORDS = "a " * 60  # 120 characters, 60 tokens


@dataclass
class Stack:
    url: str
    db: str


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    oa, ol = OpenAIBackend(), OllamaBackend()
    async with oa.serve() as oa_server, ol.serve() as ol_server, gateway(
        pg_database_url, nats_url,
        backend("oa", oa_server.url, prefixes=("text-embedding-",)),
        backend("ol", ol_server.url, kind="ollama", prefixes=("nomic-",)),
    ) as url:
        yield Stack(url, pg_database_url)


async def listed(db: str, name: str) -> dict[str, int]:
    """The key's line of `llm-proxy keys list --json`."""
    code, out, err = await trio.to_thread.run_sync(lambda: keys_cli(db, "list", "--json"))
    assert code == 0, err
    entry = next(json.loads(line) for line in out.splitlines() if json.loads(line)["name"] == name)
    return {k: entry[k] for k in ("requests", "errors", "prompt_tokens", "completion_tokens")}


async def test_every_embeddings_request_is_in_its_keys_usage(stack: Stack) -> None:
    key = await new_key(stack.db, "embedder")
    await wait_for_key(stack.url, key)
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)
    async with ollama.AsyncClient(host=stack.url, headers=bearer(key)) as ollama_client:
        local = await client.embeddings.create(model="all-minilm-l6-v2", input=["hello world", "foo"])
        remote = await client.embeddings.create(model="text-embedding-3-small", input=["hello world", "foo"])
        embed = await ollama_client.embed(model="nomic-embed-text", input=["hello world"])
        legacy = await ollama_client.embeddings(model="nomic-embed-text", prompt="hello world")
        # An Ollama backend's legacy answer reports no tokens: the key is charged an estimate
        # (about four characters a token: 11 characters, 3 tokens).
        assert len(legacy.embedding) == 384
        with pytest.raises(openai.BadRequestError):
            await client.embeddings.create(model="all-minilm-l6-v2", input="")
        with pytest.raises(ollama.ResponseError) as unknown:
            await ollama_client.embed(model="no-such-model", input=["hello"])
        assert unknown.value.status_code == 404
    await client.close()
    tokens = local.usage.prompt_tokens + remote.usage.prompt_tokens + (embed.prompt_eval_count or 0) + 3
    assert local.usage.prompt_tokens > 0 and remote.usage.prompt_tokens > 0 and embed.prompt_eval_count
    expected = {"requests": 6, "errors": 2, "prompt_tokens": tokens, "completion_tokens": 0}

    async def recorded() -> bool:
        return await listed(stack.db, "embedder") == expected

    await eventually(recorded)


async def test_embeddings_tokens_are_charged_to_the_keys_token_limit(stack: Stack) -> None:
    key = await new_key(stack.db, "bulk", "--tpm", "100")
    await wait_for_key(stack.url, key)
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)
    async with ollama.AsyncClient(host=stack.url, headers=bearer(key)) as ollama_client:
        # Estimated at 90 tokens (four characters a token), it fits in 100 a minute; the model
        # reads a token a letter (62 each, its two markers included): its real count is charged.
        # (A request estimated past the whole 100 is refused at once, as OpenAI does.)
        first = await client.embeddings.create(model="all-minilm-l6-v2", input=[SHORT_WORDS] * 3)
        assert first.usage.prompt_tokens == 3 * 62  # past the 100 a minute
        await eventually(lambda: sql(stack.db, "SELECT 1 FROM api_key_usage u JOIN api_keys k ON k.id = u.key_id"
                                               " WHERE k.name = 'bulk' AND u.prompt_tokens > 0"))
        with pytest.raises(openai.RateLimitError) as refused:
            await client.embeddings.create(model="all-minilm-l6-v2", input="hello")
        assert "tokens" in refused.value.message
        assert refused.value.response.headers["x-ratelimit-remaining-tokens"] == "0"
        with pytest.raises(ollama.ResponseError) as ollama_refused:
            await ollama_client.embed(model="all-minilm", input=["hello"])
        assert ollama_refused.value.status_code == 429
    await client.close()


async def test_a_long_input_to_the_local_model_is_limited_by_what_the_model_reads(stack: Stack) -> None:
    # 20,000 characters (5,000 tokens estimated) are past a 1,000 a minute key, but the local
    # model reads 256 tokens of an input: that is all it can cost, and all it is charged.
    key = await new_key(stack.db, "long-docs", "--tpm", "1000")
    await wait_for_key(stack.url, key)
    document = "word " * 4000
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)
    response = await client.embeddings.with_raw_response.create(model="all-minilm-l6-v2", input=document)
    assert response.headers["x-embeddings-truncated"] == "1"
    assert response.parse().usage.prompt_tokens == 256
    async with ollama.AsyncClient(host=stack.url, headers=bearer(key)) as ollama_client:
        assert len((await ollama_client.embed(model="all-minilm", input=[document])).embeddings) == 1
    # A backend's model reads it all: refused at once, as OpenAI refuses a request past the limit.
    with pytest.raises(openai.RateLimitError):
        await client.embeddings.create(model="text-embedding-3-large", input=document)
    await client.close()

    async def charged() -> bool:
        return (await listed(stack.db, "long-docs"))["prompt_tokens"] == 2 * 256

    await eventually(charged, within=15)


async def test_a_local_request_left_by_its_client_is_charged_what_the_model_reads_at_most() -> None:
    """As its answer would have been (256 tokens an input): a client that left during a long
    local request was charged the whole text's estimate, 5,000 tokens an input here."""
    records: list[ExchangeRecord] = []
    async with trio.open_nursery() as nursery:
        service = EmbeddingService(EmbeddingSettings(), Router([]), {}, LocalModel(nursery), record=records.append)
        for model in ("all-minilm", "text-embedding-3-large"):  # the local model; a backend's
            service.record_hangup(request_id="r", dialect="openai", total_ms=1.0, api_key_id=1,
                                  request=EmbeddingRequest(model=model, inputs=["word " * 4000] * 2))
    assert [record.prompt_tokens for record in records] == [2 * 256, 2 * 5000]


class SlowEmbeddings(OpenAIBackend):
    """Embeds nothing before the client gives up."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/v1/embeddings":
            await trio.sleep(30)
        await super().route(request, exchange, call)


@pytest.mark.parametrize(
    ("body", "tokens"),
    [
        ({"input": ["x" * 400]}, 100),
        # vLLM's chat form: its text (the role's four characters too), its media not counted.
        ({"messages": [{"role": "user", "content": "x" * 400}]}, 101),
    ],
)
async def test_an_embeddings_request_left_by_its_client_is_charged_its_estimate(
    aio_loop: object, pg_database_url: str, nats_url: str, body: dict[str, object], tokens: int
) -> None:
    """Hanging up while the backend embeds is no way around the key's usage and `--tpm`."""
    slow = SlowEmbeddings()
    async with slow.serve() as server, gateway(pg_database_url, nats_url, backend("oa", server.url, default=True)) as url:
        key = await new_key(pg_database_url, "leaver")
        await wait_for_key(url, key)
        async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=30) as client:

            async def ask() -> None:
                await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", **body})

            async def embedding() -> bool:
                return any(r.path == "/v1/embeddings" for r in slow.requests)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await eventually(embedding)  # the backend has it: the client hangs up now
                nursery.cancel_scope.cancel()

        async def recorded() -> bool:
            return await listed(pg_database_url, "leaver") == {
                "requests": 1, "errors": 1, "prompt_tokens": tokens, "completion_tokens": 0
            }

        await eventually(recorded)


class NegativeUsage(OpenAIBackend):
    """A server whose usage is not a count (a bug's negative number)."""

    async def _embeddings(self, request: Request, exchange: Exchange) -> None:
        await exchange.respond_json(200, {"object": "list", "model": "m", "usage": {"prompt_tokens": -1000000},
                                          "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}]})


async def test_a_negative_token_count_from_a_backend_is_no_credit_to_the_key(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A backend's -1000000 tokens were charged as is: the key's usage went negative, and its
    `--tpm` bucket was credited a million tokens. It is charged the input's estimate instead."""
    fake = NegativeUsage()
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("oa", server.url, default=True)) as url:
        key = await new_key(pg_database_url, "credited")
        await wait_for_key(url, key)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        answer = await client.embeddings.create(model="text-embedding-3-small", input="x" * 400)
        await client.close()
    assert answer.usage.prompt_tokens == 0  # not a count the gateway can pass on

    async def recorded() -> bool:
        return await listed(pg_database_url, "credited") == {
            "requests": 1, "errors": 0, "prompt_tokens": 100, "completion_tokens": 0
        }

    await eventually(recorded)


async def test_a_keys_large_request_is_reserved_without_holding_the_event_loop(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A key with `--tpm` has its request's tokens counted before it runs: a LangChain batch of
    token arrays (14 MB) was parsed and counted on the event loop, every stream stalled."""
    arrays = random.Random(3)
    body = json.dumps({"model": "bge-m3", "input": [[arrays.randrange(100_000) for _ in range(1000)] for _ in range(ROWS)]})
    canned = CannedVLLM()
    async with canned.serve() as server, gateway(pg_database_url, nats_url, backend("oa", server.url, default=True)) as url:
        key = await new_key(pg_database_url, "langchain", "--tpm", "100000000")
        await wait_for_key(url, key)
        async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=60) as client:
            waits = []
            for _ in range(3):  # a busy machine can make the loop wait now and then; this never would
                answer, wait = await longest_wait(
                    lambda: client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
                )
                assert answer.status_code == 200, answer.text
                waits.append(wait)
                if wait < MAX_WAIT_SECONDS:
                    break
    assert min(waits) < MAX_WAIT_SECONDS, waits


class PacedEmbeddings(OpenAIBackend):
    """Embeds after a second: concurrent requests overlap."""

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path == "/v1/embeddings":
            await trio.sleep(1)
        await super().route(request, exchange, call)


async def test_concurrent_embeddings_reserve_their_input_against_the_token_limit(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """Six at once, about 400 tokens of input each, against 1000 a minute: two run, as they
    would one after the other; before, all six ran (the bucket was charged only after)."""
    paced = PacedEmbeddings()
    async with paced.serve() as server, gateway(pg_database_url, nats_url, backend("oa", server.url, default=True)) as url:
        key = await new_key(pg_database_url, "concurrent-embedder", "--tpm", "1000")
        await wait_for_key(url, key)
        statuses: list[int] = []
        async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=30) as client:

            async def one() -> None:
                answer = await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x" * 1600})
                statuses.append(answer.status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(6):
                    nursery.start_soon(one)
    assert sorted(statuses) == [200, 200, 429, 429, 429, 429]


async def test_a_chat_embedding_is_charged_the_backends_usage(stack: Stack) -> None:
    """vLLM's chat form (`messages`, no `input`): one request, and the tokens vLLM counted
    (its image's included, which no estimate of the body knows) charged to the key."""
    key = await new_key(stack.db, "vlm-user")
    await wait_for_key(stack.url, key)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "text", "text": "Represent the given image."},
    ]}]
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0) as client:
        answer = await client.post(
            "/embeddings", cast_to=openai.types.CreateEmbeddingResponse,
            body={"model": "text-embedding-vlm2vec", "messages": messages, "encoding_format": "float"},
        )
    assert len(answer.data) == 1 and answer.usage.prompt_tokens > 0
    expected = {"requests": 1, "errors": 0, "prompt_tokens": answer.usage.prompt_tokens, "completion_tokens": 0}

    async def recorded() -> bool:
        return await listed(stack.db, "vlm-user") == expected

    await eventually(recorded)
