"""`--tpm` under concurrency, on real PostgreSQL: an admission reserves the request's estimated
tokens (prompt and max output tokens), refuses what does not fit, and the end of the exchange
charges its real usage and gives back the rest, as OpenAI's limits do."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import anthropic
import httpx
import openai
import pytest
import trio

from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import (
    MESSAGES,
    Stack,
    bearer,
    gateway,
    keyed_stack,
    new_key,
    sql,
    wait_for_key,
)

pytest_plugins = ["tests.infra_servers"]


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    # Each answer uses 500 tokens; the backend is slow enough that requests overlap.
    async with keyed_stack(pg_database_url, nats_url, Usage(10, 490), pace=0.2) as started:
        yield started


async def burst(url: str, key: str, count: int, max_tokens: int) -> list[int | openai.RateLimitError]:
    """`count` concurrent chats with the official SDK: 200, or the SDK's 429 error."""
    answers: list[int | openai.RateLimitError] = []
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30) as client:

        async def one() -> None:
            try:
                await client.chat.completions.create(model="qwen3-8b", messages=MESSAGES, max_tokens=max_tokens)
            except openai.RateLimitError as error:
                answers.append(error)
            else:
                answers.append(200)

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return answers


async def test_thirty_concurrent_requests_of_500_tokens_against_tpm_1000_admit_two(stack: Stack) -> None:
    # Each asks for 490 output tokens and a few of prompt: two fit in 1000, the third does not,
    # whichever of the two gateways sharing the database it reaches. Before, all 30 were
    # admitted (15,000 tokens) and the key was then locked out for minutes.
    key = await new_key(stack.db, "audit", "--tpm", "1000")
    async with gateway(stack.db, stack.nats, backend("vllm", stack.server_url, default=True)) as second:
        await wait_for_key(stack.url, key)
        await wait_for_key(second, key)
        answers: list[int | openai.RateLimitError] = []

        async def run(url: str) -> None:
            answers.extend(await burst(url, key, 15, max_tokens=490))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, stack.url)
            nursery.start_soon(run, second)
    assert answers.count(200) == 2
    refused = [a for a in answers if isinstance(a, openai.RateLimitError)]
    assert len(refused) == 28
    error = refused[0]
    assert error.type == "tokens"
    assert re.search(r"on tokens per min \(TPM\): Limit 1000, Used \d+, Requested 49\d\. Please try again in \d", error.message)
    assert error.response.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(error.response.headers["x-ratelimit-remaining-tokens"]) < 496
    # About 496 tokens must refill: 30 s at 1000 a minute, less what refilled meanwhile.
    assert 20 <= int(error.response.headers["retry-after"]) <= 30
    # What was used is charged (1000 tokens): the key is not locked out beyond a minute.
    [(ahead,)] = await sql(stack.db, "SELECT l.tokens_at - extract(epoch FROM clock_timestamp()) FROM api_key_limits l"
                                     " JOIN api_keys k ON k.id = l.key_id WHERE k.name = 'audit'")
    assert float(ahead) <= 60


async def test_an_exchange_gives_back_what_it_reserved_but_did_not_use(stack: Stack) -> None:
    # Each reserves about 906 of 1000 tokens and uses 70: the next one, sent as soon as the
    # previous answer is read (before any batch of usage is written), must find the rest back.
    stack.fake.set_script(Script(tokens=["Hello"], usage=Usage(60, 10)))
    key = await new_key(stack.db, "thrifty", "--tpm", "1000")
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        chat = {"model": "qwen3-8b", "messages": MESSAGES, "max_tokens": 900}
        first = await client.post("/v1/chat/completions", json=chat)
        assert first.status_code == 200
        assert 90 <= int(first.headers["x-ratelimit-remaining-tokens"]) <= 100  # 906 reserved
        second = await client.post("/v1/chat/completions", json=chat)
        assert second.status_code == 200, second.text
        # 70 charged for the first, 906 reserved for the second (and a little refilled).
        assert 20 <= int(second.headers["x-ratelimit-remaining-tokens"]) <= 40


async def test_requests_one_after_the_other_on_two_gateways_find_what_the_previous_one_gave_back(
    stack: Stack,
) -> None:
    """A client sends its requests one after the other, alternately to two gateway processes
    (workers, replicas): each reserves about 806 of 1000 tokens and uses 70 (three use 210:
    the third's 806 still fit). Before, the next request, on the other gateway, came before the
    previous one's usage writer had given its rest back, and was refused with `Retry-After` of
    about 40 s (the SDKs wait that long)."""
    stack.fake.set_script(Script(tokens=["Hello"], usage=Usage(60, 10)))
    key = await new_key(stack.db, "alternating", "--tpm", "1000")
    async with gateway(stack.db, stack.nats, backend("vllm", stack.server_url, default=True)) as second:
        await wait_for_key(stack.url, key)
        await wait_for_key(second, key)
        for url in (stack.url, second, stack.url):
            async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=10) as client:
                answer = await client.post(
                    "/v1/chat/completions", json={"model": "qwen3-8b", "messages": MESSAGES, "max_tokens": 800}
                )
            assert answer.status_code == 200, answer.text


async def test_token_refusals_come_in_the_callers_dialect_with_what_the_request_needs(stack: Stack) -> None:
    stack.fake.set_script(Script(tokens=["Hello"], usage=Usage(60, 10)))
    key = await new_key(stack.db, "dialects", "--tpm", "1000")
    await wait_for_key(stack.url, key)
    async with anthropic.AsyncAnthropic(base_url=stack.url, api_key=key, max_retries=0) as claude:
        # Nearly the whole bucket: it fits a full one, not the ~930 tokens its use leaves.
        await claude.messages.create(model="qwen3-8b", max_tokens=990, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.RateLimitError) as refused:
            await claude.messages.create(model="qwen3-8b", max_tokens=990, messages=[{"role": "user", "content": "hi"}])
    assert "tokens" in refused.value.message
    assert int(refused.value.response.headers["retry-after"]) >= 1
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        # Ollama's num_predict is its max output tokens: 950 do not fit in the ~930 left.
        ollama = await client.post("/api/chat", json={
            "model": "qwen3-8b", "messages": MESSAGES, "stream": False, "options": {"num_predict": 950},
        })
        assert ollama.status_code == 429
        assert ollama.json()["error"].startswith("Rate limit reached for qwen3-8b with this API key on tokens per min (TPM)")
        assert ollama.headers["x-ratelimit-remaining-tokens"] != "0"  # tokens are left, not enough


async def test_a_request_larger_than_the_whole_bucket_is_refused_at_once_and_not_retried(stack: Stack) -> None:
    # As OpenAI does ("Request too large ... Limit N, Requested M"): no wait would let it in,
    # so the answer says not to retry and takes nothing from the key's buckets. Before, it was
    # capped to the whole bucket, admitted, and emptied the bucket for a minute.
    stack.fake.set_script(Script(tokens=["Hello"], usage=Usage(60, 10)))
    key = await new_key(stack.db, "greedy", "--tpm", "1000", "--rpm", "100")
    await wait_for_key(stack.url, key)
    sent: list[httpx.Request] = []

    async def count(request: httpx.Request) -> None:
        sent.append(request)

    async with httpx.AsyncClient(event_hooks={"request": [count]}, timeout=10) as http, openai.AsyncOpenAI(
        base_url=f"{stack.url}/v1", api_key=key, max_retries=2, http_client=http,
    ) as client:
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="qwen3-8b", messages=MESSAGES, max_tokens=5000)
    assert len(sent) == 1  # the SDK obeyed `x-should-retry: false`
    error = refused.value
    assert error.code == "rate_limit_exceeded" and error.type == "tokens"
    assert "Request too large for qwen3-8b with this API key on tokens per min (TPM)" in error.message
    assert "Limit 1000, Requested 50" in error.message
    assert "retry-after" not in error.response.headers
    assert error.response.headers["x-should-retry"] == "false"
    # Like every other limit answer, it says where the key's buckets stand (they were missing).
    assert error.response.headers["x-ratelimit-limit-tokens"] == "1000"
    assert error.response.headers["x-ratelimit-remaining-tokens"] == "1000"
    assert error.response.headers["x-ratelimit-limit-requests"] == "100"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "100"
    assert error.response.headers["x-ratelimit-reset-tokens"] == "0ms"
    async with anthropic.AsyncAnthropic(base_url=stack.url, api_key=key, max_retries=2) as claude:
        with pytest.raises(anthropic.RateLimitError) as too_large:
            await claude.messages.create(model="qwen3-8b", max_tokens=1200, messages=[{"role": "user", "content": "hi"}])
    assert too_large.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index, call-overload]
    assert "Request too large" in too_large.value.message
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as http:
        ollama = await http.post("/api/chat", json={
            "model": "qwen3-8b", "messages": MESSAGES, "stream": False, "options": {"num_predict": 1001},
        })
        assert ollama.status_code == 429
        assert "Request too large" in ollama.json()["error"]
        assert ollama.headers["x-should-retry"] == "false"
        # None of them took anything: the whole bucket is there for a request that fits.
        fits = await http.post("/v1/chat/completions", json={"model": "qwen3-8b", "messages": MESSAGES, "max_tokens": 900})
        assert fits.status_code == 200, fits.text
        assert 85 <= int(fits.headers["x-ratelimit-remaining-tokens"]) <= 97
        assert fits.headers["x-ratelimit-remaining-requests"] == "99"
        # A request naming no max output tokens is given a default (a guess, capped to the
        # bucket): it fits a full bucket, so it is only told to wait for one.
        later = await http.post("/v1/chat/completions", json={"model": "qwen3-8b", "messages": MESSAGES})
        assert later.status_code == 429
        assert later.json()["error"]["type"] == "tokens"
        assert "Please try again in " in later.json()["error"]["message"]
        assert int(later.headers["retry-after"]) >= 1
        assert "x-should-retry" not in later.headers


async def test_a_reservation_never_settled_refills_with_the_bucket(stack: Stack) -> None:
    # A gateway reserved the whole bucket and was killed before its exchange ended: its
    # reservation is charged like usage, and refills like it (6000 a minute: 100 a second).
    key = await new_key(stack.db, "orphan", "--tpm", "6000")
    [(key_id,)] = await sql(stack.db, "SELECT id FROM api_keys WHERE name = 'orphan'")
    await sql(stack.db, "SELECT * FROM api_key_admit(%s, NULL, 6000, 0, 0, 6000)", key_id)
    await wait_for_key(stack.url, key)
    stack.fake.set_script(Script(tokens=["Hello"], usage=Usage(60, 10)))
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        chat = {"model": "qwen3-8b", "messages": MESSAGES, "max_tokens": 200}
        refused = await client.post("/v1/chat/completions", json=chat)
        assert refused.status_code == 429
        wait = int(refused.headers["retry-after"])
        assert 1 <= wait <= 3  # about 206 tokens to refill
        await trio.sleep(wait)
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200


async def test_an_image_counts_as_an_image_not_as_its_base64_text(stack: Stack) -> None:
    # 200 KB of base64 is not 50,000 tokens of prompt: two such requests asking for 100 tokens
    # each run together under 1000 a minute.
    key = await new_key(stack.db, "pictures", "--tpm", "1000")
    await wait_for_key(stack.url, key)
    image = "data:image/png;base64," + "iVBORw0KGgo" * 20_000
    chat = {"model": "qwen3-8b", "max_tokens": 100, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": image}},
    ]}]}
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=20) as client:

        async def one() -> None:
            statuses.append((await client.post("/v1/chat/completions", json=chat)).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(one)
    assert statuses == [200, 200]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": 900}),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 300, "n": 3}),
    ("/v1/messages", {"messages": MESSAGES, "max_tokens": 900}),
    ("/v1/responses", {"input": "Say hello", "max_output_tokens": 900}),
    ("/api/chat", {"messages": MESSAGES, "stream": False, "options": {"num_predict": 900}}),
    ("/api/generate", {"prompt": "Say hello", "stream": False, "options": {"num_predict": 900}}),
    ("/v1/completions", {"prompt": "Say hello", "max_tokens": 900}),
])
async def test_each_dialect_reserves_its_own_max_output_tokens(stack: Stack, path: str, body: dict[str, object]) -> None:
    stack.fake.set_script(Script(tokens=["Hello"], usage=Usage(60, 10)))
    key = await new_key(stack.db, "dialect", "--tpm", "1000")
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        answer = await client.post(path, json={"model": "qwen3-8b", **body})
    assert answer.status_code == 200, answer.text
    # 900 and a few tokens of prompt reserved, not the 4,096 (the whole bucket) of a request
    # that names no limit.
    assert 85 <= int(answer.headers["x-ratelimit-remaining-tokens"]) <= 97


async def test_the_request_log_names_what_the_admission_reserved(
    aio_loop: object, pg_database_url: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The line had `"reserved": [906, 0, null]`, a bare array, where the README promises
    # `reserved_tokens`: a log pipeline reading that field found nothing.
    caplog.set_level("INFO", logger="llm_proxy.request")
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(60, 10)))
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True), access_log=True
    ) as url:
        key = await new_key(pg_database_url, "logged", "--tpm", "1000")
        await wait_for_key(url, key)
        async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=10) as client:
            chat = {"model": "qwen3-8b", "messages": MESSAGES, "max_tokens": 900}
            answer = await client.post("/v1/chat/completions", json=chat, headers={"x-request-id": "reserving"})
            assert answer.status_code == 200, answer.text
    [line] = [r for r in caplog.records if r.name == "llm_proxy.request" and r.request_id == "reserving"]  # type: ignore[attr-defined]
    assert 900 < line.reserved_tokens < 1000 and line.reserved_budget == 0  # type: ignore[attr-defined]
    assert not hasattr(line, "reserved")
