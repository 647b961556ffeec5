"""Per-key rate limits on real PostgreSQL: exact under concurrency, shared by gateways,
tokens charged after the exchange, OpenAI's headers, 429s in every dialect, usage rows."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import ollama
import openai
import psycopg
import pytest
import trio

from tests.fakes import AnthropicBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import (
    MESSAGES,
    Stack,
    bearer,
    eventually,
    gateway,
    keyed_stack,
    new_key,
    sql,
    wait_for_key,
)

pytest_plugins = ["tests.infra_servers"]

CHAT = {"model": "qwen3-8b", "messages": MESSAGES}


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    async with keyed_stack(pg_database_url, nats_url, Usage(60, 10)) as started:
        yield started


async def burst(url: str, key: str, count: int, path: str = "/v1/chat/completions") -> list[httpx.Response]:
    answers: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=20,
                                 limits=httpx.Limits(max_connections=count)) as client:

        async def one() -> None:
            answers.append(await client.post(path, json=CHAT | {"max_tokens": 5}))

        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return answers


async def test_thirty_concurrent_requests_with_rpm_10_admit_exactly_10(stack: Stack) -> None:
    key = await new_key(stack.db, "burst", "--rpm", "10")
    await wait_for_key(stack.url, key)
    answers = await burst(stack.url, key, 30)
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 10 + [429] * 20
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    # OpenAI's type and words, which LangChain and retry helpers parse for the wait.
    assert refused.json()["error"]["type"] == "requests"
    said = re.fullmatch(
        r"Rate limit reached for qwen3-8b with this API key on requests per min \(RPM\): Limit 10, Used 10, "
        r"Requested 1\. Please try again in (\d+(?:\.\d+)?)(ms|s)\.",
        refused.json()["error"]["message"],
    )
    assert said is not None, refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 6  # one request refills every 6 s
    assert float(said[1]) / (1000 if said[2] == "ms" else 1) <= int(refused.headers["retry-after"])
    assert refused.headers["x-ratelimit-limit-requests"] == "10"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    remaining = sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in answers if a.status_code == 200)
    assert remaining == list(range(10))  # each admitted request saw the bucket one lower


async def test_an_admission_queued_behind_another_gateways_sees_the_bucket_after_it(stack: Stack) -> None:
    # Another gateway holds the key's bucket row while this one's admission queues for it,
    # then takes one request. This one must report 8 of 10 left, not 7: its clock is read
    # once it holds the row, never before the other's took its request.
    key = await new_key(stack.db, "queued", "--rpm", "10")
    await wait_for_key(stack.url, key)
    [(key_id,)] = await sql(stack.db, "SELECT id FROM api_keys WHERE name = 'queued'")
    await sql(stack.db, "INSERT INTO api_key_limits (key_id) VALUES (%s) ON CONFLICT DO NOTHING", key_id)
    other = await trio.to_thread.run_sync(lambda: psycopg.connect(stack.db))
    try:
        await trio.to_thread.run_sync(
            lambda: other.execute("SELECT 1 FROM api_key_limits WHERE key_id = %s FOR UPDATE", (key_id,))
        )
        async with trio.open_nursery() as nursery:
            answers: list[httpx.Response] = []

            async def ask() -> None:
                answers.extend(await burst(stack.url, key, 1))

            nursery.start_soon(ask)

            async def queued() -> bool:
                waiting = await sql(stack.db, "SELECT count(*) FROM pg_stat_activity"
                                    " WHERE wait_event_type = 'Lock' AND query LIKE '%%api_key_admit%%'")
                return bool(waiting[0][0])

            await eventually(queued)
            await trio.sleep(0.3)  # the queued admission's old clock falls 0.3 s behind
            await trio.to_thread.run_sync(
                lambda: other.execute("SELECT * FROM api_key_admit(%s, 10, NULL)", (key_id,))
            )
            await trio.to_thread.run_sync(other.commit)
    finally:
        await trio.to_thread.run_sync(other.close)
    [answer] = answers
    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-remaining-requests"] == "8"


async def test_a_keys_own_limits_are_the_headers_not_the_backends(stack: Stack) -> None:
    # The backend's limits are the gateway's account's; a limited key's client backs off by its own.
    key = await new_key(stack.db, "own", "--rpm", "10")
    await wait_for_key(stack.url, key)
    stack.fake.push(Script(tokens=["Hello"], headers=[("x-request-id", "req_hosted"), ("x-ratelimit-remaining-requests", "4999"),
                                                      ("x-ratelimit-limit-tokens", "800000")]))
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key)) as client:
        answer = await client.post("/v1/chat/completions", json=CHAT)
    assert answer.status_code == 200
    assert answer.headers.get_list("x-ratelimit-remaining-requests") == ["9"]
    assert "x-ratelimit-limit-tokens" not in answer.headers  # no token limit, and not the backend's either
    assert answer.headers["x-upstream-request-id"] == "req_hosted"


async def test_a_keys_own_limits_are_the_headers_not_an_anthropic_backends(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    # An Anthropic backend's limits, said to OpenAI clients in OpenAI's names, are the operator's
    # account's: a limited key's client backs off by its own, unmixed with them.
    claude = [("anthropic-ratelimit-requests-remaining", "4999"), ("anthropic-ratelimit-tokens-limit", "800000")]
    fake = AnthropicBackend(default=Script(tokens=["Hello"], headers=claude))
    limited, free = await new_key(pg_database_url, "own", "--rpm", "10"), await new_key(pg_database_url, "free")
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("claude", server.url, kind="anthropic", default=True)
    ) as url:
        await wait_for_key(url, limited)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            own = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(limited))
            theirs = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(free))
    assert own.status_code == 200 and own.headers.get_list("x-ratelimit-remaining-requests") == ["9"]
    assert "x-ratelimit-limit-tokens" not in own.headers
    assert theirs.status_code == 200 and theirs.headers.get_list("x-ratelimit-remaining-requests") == ["4999"]
    assert theirs.headers["x-ratelimit-limit-tokens"] == "800000"


async def test_two_gateways_sharing_the_database_share_the_limit(stack: Stack) -> None:
    key = await new_key(stack.db, "shared", "--rpm", "10")
    async with gateway(stack.db, stack.nats, backend("vllm", stack.server_url, default=True)) as second:
        await wait_for_key(stack.url, key)
        await wait_for_key(second, key)
        both: list[httpx.Response] = []

        async def run(url: str) -> None:
            both.extend(await burst(url, key, 15))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, stack.url)
            nursery.start_soon(run, second)
    assert sum(a.status_code == 200 for a in both) == 10
    assert sum(a.status_code == 429 for a in both) == 20


async def test_headers_count_down_and_the_bucket_refills_continuously(stack: Stack) -> None:
    key = await new_key(stack.db, "steady", "--rpm", "120", "--tpm", "100000")
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        first = await client.post("/v1/chat/completions", json=CHAT)
        second = await client.post("/v1/chat/completions", json=CHAT | {"stream": True})
        assert first.status_code == second.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "120"
        assert int(first.headers["x-ratelimit-remaining-requests"]) == 119
        assert int(second.headers["x-ratelimit-remaining-requests"]) in (118, 119)  # 0.5 s refills one
        assert first.headers["x-ratelimit-reset-requests"].endswith("ms")  # one slot: 500 ms to refill
        assert first.headers["x-ratelimit-limit-tokens"] == "100000"
        assert first.headers["x-ratelimit-reset-tokens"] is not None
        # Listing models is not a request against the limit (and carries no headers).
        listing = await client.get("/v1/models")
        assert "x-ratelimit-remaining-requests" not in listing.headers


async def test_tokens_are_charged_when_the_exchange_ends(stack: Stack) -> None:
    # 70 tokens per exchange (60 prompt + 10 completion) against 100 a minute; each request
    # reserves 11 at admission (6 of prompt, 5 of max_tokens), given back as the 70 are charged.
    key = await new_key(stack.db, "tokens", "--tpm", "100")
    await wait_for_key(stack.url, key)
    chat = CHAT | {"max_tokens": 5}
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        first = await client.post("/v1/chat/completions", json=chat)
        assert first.status_code == 200
        assert 88 <= int(first.headers["x-ratelimit-remaining-tokens"]) <= 90
        await eventually(lambda: sql(stack.db, "SELECT 1 FROM api_key_usage"))  # charged
        second = await client.post("/v1/chat/completions", json=chat)
        assert second.status_code == 200  # 30 tokens were left: 11 fit
        assert 18 <= int(second.headers["x-ratelimit-remaining-tokens"]) <= 20

        await eventually(lambda: sql(stack.db, "SELECT 1 FROM api_key_usage WHERE requests = 2"))
        answer = await client.post("/v1/chat/completions", json=chat)
        assert answer.status_code == 429
        assert answer.json()["error"]["type"] == "tokens"
        assert re.search(
            r"^Rate limit reached for qwen3-8b with this API key on tokens per min \(TPM\): Limit 100, Used 1[234]\d, "
            r"Requested 11\. Please try again in (2[89]|3[01])(\.\d+)?s\.$",
            answer.json()["error"]["message"],
        ), answer.json()["error"]["message"]
        assert answer.headers["x-ratelimit-remaining-tokens"] == "0"
        # 140 tokens spent of 100: the bucket is 40 tokens in debt, and 11 more must fit (31 s).
        assert 28 <= int(answer.headers["retry-after"]) <= 31


async def test_429s_come_in_the_callers_dialect(stack: Stack) -> None:
    key = await new_key(stack.db, "dialects", "--rpm", "1")
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, headers={"x-api-key": key}, timeout=10) as client:
        assert (await client.post("/api/chat", json=CHAT | {"stream": False})).status_code == 200
        anthropic_429 = await client.post("/v1/messages", json=CHAT | {"max_tokens": 5})
        assert anthropic_429.status_code == 429
        assert anthropic_429.json()["error"]["type"] == "rate_limit_error"
        assert int(anthropic_429.headers["retry-after"]) >= 1
        ollama_429 = await client.post("/api/generate", json={"model": "qwen3-8b", "prompt": "hi"})
        assert ollama_429.status_code == 429
        assert ollama_429.json()["error"].startswith("Rate limit reached for qwen3-8b with this API key on requests per min")
        responses_429 = await client.post("/v1/responses", json={"model": "qwen3-8b", "input": "hi"})
        assert responses_429.status_code == 429
        assert responses_429.json()["error"]["type"] == "requests"
        assert responses_429.json()["error"]["code"] == "rate_limit_exceeded"


async def test_usage_is_recorded_per_key(stack: Stack) -> None:
    key = await new_key(stack.db, "counted")
    other = await new_key(stack.db, "idle")
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        stack.fake.set_script(Script(status=500, error_message="boom"))
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 502

    async def recorded() -> list[tuple[object, ...]]:
        found = await sql(
            stack.db,
            "SELECT k.name, sum(u.requests), sum(u.errors), sum(u.prompt_tokens), sum(u.completion_tokens)"
            " FROM api_key_usage u JOIN api_keys k ON k.id = u.key_id GROUP BY k.name",
        )
        return found if found and found[0][1] == 4 else []

    assert await eventually(recorded) == [("counted", 4, 1, 180, 30)]
    assert other  # a key that made no request has no usage rows


async def test_a_stream_the_client_leaves_early_is_still_charged(stack: Stack) -> None:
    # Leaving before the backend's usage chunk used to charge nothing: a key with a token
    # limit could read whole answers for free. The gateway charges its estimate instead.
    key = await new_key(stack.db, "leaver")
    await wait_for_key(stack.url, key)
    stack.fake.set_script(Script(tokens=["Hello there "] * 40, usage=Usage(60, 40), pace=0.01))
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        async with client.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}) as response:
            seen = 0
            async for line in response.aiter_lines():
                seen += "Hello" in line
                if seen == 10:
                    break  # and hang up
        stack.fake.set_script(Script(tokens=["Hi"], usage=Usage(60, 10)))
        after = await client.post("/v1/chat/completions", json=CHAT)

    async def recorded() -> list[tuple[object, ...]]:
        found = await sql(
            stack.db,
            "SELECT sum(u.requests), sum(u.prompt_tokens), sum(u.completion_tokens)"
            " FROM api_key_usage u JOIN api_keys k ON k.id = u.key_id WHERE k.name = 'leaver'",
        )
        return found if found and found[0][0] == 2 else []

    [(_requests, prompt, completion)] = await eventually(recorded)
    # The finished request's own 60 + 10, and for the one left early: its prompt and at least
    # the ten pieces it read ("Hello there " is 12 characters, about 3 tokens).
    assert int(str(prompt)) > 60 and int(str(completion)) >= 10 + 10 * 3
    assert after.status_code == 200


async def test_a_chat_left_before_its_first_token_is_charged_its_prompt_once(stack: Stack) -> None:
    """A chat whose client hung up before the first token was charged nothing, though its
    backend had read the prompt by then: huge prompts were free to anyone hanging up early.
    It is charged its prompt's estimate now (as an early-left relay is), in every dialect."""
    key = await new_key(stack.db, "early-leaver", "--budget", "1000000")
    await wait_for_key(stack.url, key)
    stack.fake.set_script(Script(tokens=["Hi"], usage=Usage(60, 1), header_delay=3))
    prompt = [{"role": "user", "content": "word " * 800}]  # 4,000 characters: 1,000 tokens
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        with trio.move_on_after(1):
            await client.post("/v1/chat/completions", json={"model": "qwen3-8b", "messages": prompt, "stream": True})
        with trio.move_on_after(1):
            await client.post("/v1/messages", json={"model": "qwen3-8b", "messages": prompt, "max_tokens": 5})

    async def charged() -> list[tuple[object, ...]]:
        found = await sql(
            stack.db,
            "SELECT u.requests, u.prompt_tokens, u.completion_tokens, l.budget_used FROM api_key_usage u"
            " JOIN api_keys k ON k.id = u.key_id JOIN api_key_limits l ON l.key_id = k.id WHERE k.name = 'early-leaver'",
        )
        return found if found and found[0][0] == 2 else []

    assert await eventually(charged) == [(2, 2000, 0, 2000)]


async def test_a_keyed_stream_left_early_is_charged_what_its_run_generated_once(stack: Stack) -> None:
    """A request with an `Idempotency-Key` runs on when its client leaves, and a retry with
    the key replays the whole answer without charge. The request was charged only what its
    client had read (an estimate of a few pieces): a key could read whole answers for a few
    tokens each, by leaving at once and retrying. Its run's usage is charged now, once."""
    key = await new_key(stack.db, "keyed-leaver", "--budget", "100000")
    await wait_for_key(stack.url, key)
    stack.fake.set_script(Script(tokens=["Hello there "] * 40, usage=Usage(60, 40), pace=0.02))
    headers = {**bearer(key), "Idempotency-Key": "left-early"}
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=10) as client:
        async with client.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}) as response:
            seen = 0
            async for line in response.aiter_lines():
                seen += "Hello" in line
                if seen == 3:
                    break  # and hang up

        async def charged() -> list[tuple[object, ...]]:
            found = await sql(
                stack.db,
                "SELECT u.requests, u.prompt_tokens, u.completion_tokens, l.budget_used FROM api_key_usage u"
                " JOIN api_keys k ON k.id = u.key_id JOIN api_key_limits l ON l.key_id = k.id WHERE k.name = 'keyed-leaver'",
            )
            return found if found and found[0][0] == 1 else []

        assert await eventually(charged) == [(1, 60, 40, 100)]
        replayed = await client.post("/v1/chat/completions", json=CHAT)
        assert replayed.headers.get("idempotent-replayed") == "true"
        assert replayed.json()["choices"][0]["message"]["content"] == "Hello there " * 40
    await trio.sleep(0.5)  # the replay's record: charged to no budget
    [(budget_used,)] = await sql(
        stack.db, "SELECT l.budget_used FROM api_key_limits l JOIN api_keys k ON k.id = l.key_id WHERE k.name = 'keyed-leaver'"
    )
    assert budget_used == 100
    assert [g.outcome for g in stack.fake.recorder.generations] == ["completed"]


async def test_a_stream_from_an_anthropic_backend_left_early_is_charged_more_than_its_opening_usage(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    # Anthropic's stream opens with `output_tokens: 1`; left before its end, that placeholder
    # was charged as the whole answer.
    fake = AnthropicBackend(default=Script(tokens=["Hello there "] * 40, usage=Usage(60, 40), pace=0.01))
    key = await new_key(pg_database_url, "anthropic-leaver")
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("claude", server.url, kind="anthropic", default=True)
    ) as url:
        await wait_for_key(url, key)
        async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=10) as client:
            async with client.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}) as response:
                seen = 0
                async for line in response.aiter_lines():
                    seen += "Hello" in line
                    if seen == 10:
                        break

        async def recorded() -> list[tuple[object, ...]]:
            found = await sql(
                pg_database_url,
                "SELECT sum(u.prompt_tokens), sum(u.completion_tokens)"
                " FROM api_key_usage u JOIN api_keys k ON k.id = u.key_id WHERE k.name = 'anthropic-leaver'",
            )
            return found if found and found[0][0] is not None else []  # sum() of no rows is NULL

        [(prompt, completion)] = await eventually(recorded)
    assert int(str(prompt)) == 60  # the prompt's count the stream opened with is real
    assert int(str(completion)) >= 10 * 3  # at least the ten pieces read, not the placeholder 1


async def test_a_request_right_after_refused_ones_finds_their_admissions_given_back(stack: Stack) -> None:
    # The usage writer is slow (its table locked for a moment): the admissions that 403s
    # gave back must count for the requests that follow at once all the same.
    key = await new_key(stack.db, "eager", "--rpm", "2", "--models", "qwen3-*")
    await wait_for_key(stack.url, key)
    blocker = await trio.to_thread.run_sync(lambda: psycopg.connect(stack.db))
    try:
        await trio.to_thread.run_sync(lambda: blocker.execute("LOCK TABLE api_key_usage IN EXCLUSIVE MODE"))
        async with trio.open_nursery() as nursery:

            async def release_soon() -> None:
                await trio.sleep(0.5)
                await trio.to_thread.run_sync(blocker.commit)

            nursery.start_soon(release_soon)
            async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=20) as client:
                refused = [await client.post("/v1/chat/completions", json=CHAT | {"model": "llama-3"}) for _ in range(3)]
                answers = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(3)]
    finally:
        await trio.to_thread.run_sync(blocker.close)
    assert [answer.status_code for answer in refused] == [403, 403, 403]
    assert [answer.status_code for answer in answers] == [200, 200, 429]


async def test_a_request_refused_for_its_keys_scope_takes_nothing_from_its_rpm(stack: Stack) -> None:
    """The scope is checked once the body is read, after admission: a 403 gives the
    admission back, so refused requests never exhaust the key's requests (in any process)."""
    key = await new_key(stack.db, "scoped", "--rpm", "2", "--models", "qwen3-*", "--workspaces", "docs")
    await wait_for_key(stack.url, key)
    def given_back() -> Any:
        return sql(stack.db, "SELECT 1 FROM api_key_limits l JOIN api_keys k ON k.id = l.key_id"
                             " WHERE k.name = 'scoped' AND l.requests_at < extract(epoch FROM now())")

    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=20) as client:
        for _ in range(4):
            refused = await client.post("/v1/chat/completions", json=CHAT | {"model": "llama-3"})
            assert refused.status_code == 403, refused.text
            embed = await client.post("/v1/embeddings", json={"model": "llama-embed", "input": "x"})
            assert embed.status_code == 403, embed.text
            # The admissions come back through the usage writer, a moment after the refusals.
            await eventually(given_back)
        answers = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 429]


async def test_a_key_whose_budget_is_spent_may_still_cancel_delete_and_tidy_what_it_stored(stack: Stack) -> None:
    """A spent budget is refused for a month: stopping a run, deleting a stored response
    and managing conversations are no model calls, and must not wait for the reset."""
    key = await new_key(stack.db, "spent", "--budget", "50")
    await wait_for_key(stack.url, key)
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0) as client:
        response = await client.responses.create(model="qwen3-8b", input="Say hello", background=True)

        async def spent() -> bool:
            try:
                await client.chat.completions.create(model="qwen3-8b", messages=MESSAGES, max_tokens=5)  # type: ignore[arg-type]
            except openai.RateLimitError as error:
                return error.code == "insufficient_quota"
            return False

        await eventually(spent, within=15)
        assert (await client.responses.cancel(response.id)).id == response.id
        conversation = await client.conversations.create(items=[{"type": "message", "role": "user", "content": "Keep"}])
        await client.conversations.items.create(
            conversation.id, items=[{"type": "message", "role": "user", "content": "this too"}]
        )
        await client.conversations.update(conversation.id, metadata={"topic": "tidy"})
        assert (await client.conversations.delete(conversation.id)).deleted
        await client.responses.delete(response.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(response.id)


async def test_a_key_whose_limits_are_spent_may_still_change_and_delete_its_stored_chat_completions(
    stack: Stack,
) -> None:
    """A stored chat completion is tidied as a stored response is: neither call runs a model,
    so neither waits for the key's next minute or budget period."""
    key = await new_key(stack.db, "tidy", "--budget", "50", "--rpm", "1")
    await wait_for_key(stack.url, key)
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0) as client:
        stored = await client.chat.completions.create(model="qwen3-8b", messages=MESSAGES, store=True)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError):  # its minute's request and its budget (70 tokens) spent
            await client.chat.completions.create(model="qwen3-8b", messages=MESSAGES)  # type: ignore[arg-type]
        updated = await client.chat.completions.update(stored.id, metadata={"topic": "tidy"})
        assert updated.metadata == {"topic": "tidy"}
        assert (await client.chat.completions.delete(stored.id)).deleted
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.retrieve(stored.id)


async def test_showing_models_as_ollama_clients_do_takes_nothing_from_the_keys_rpm(stack: Stack) -> None:
    """Open WebUI and VS Code ask `/api/show` (a POST) of every model they list: those reads
    must leave a key's requests per minute to its chats."""
    key = await new_key(stack.db, "shows", "--rpm", "2")
    await wait_for_key(stack.url, key)
    async with ollama.AsyncClient(host=stack.url, headers=bearer(key)) as llama:
        for _ in range(4):
            shown = await llama.show("qwen3-8b")
            assert shown.capabilities is not None
        for _ in range(2):
            answer = await llama.chat(model="qwen3-8b", messages=MESSAGES)
            assert answer.message.content == "Hello"
        with pytest.raises(ollama.ResponseError) as refused:
            await llama.chat(model="qwen3-8b", messages=MESSAGES)
    assert refused.value.status_code == 429


async def test_counting_tokens_takes_nothing_from_the_keys_rpm(stack: Stack) -> None:
    """Counting is free at Anthropic and OpenAI, and Claude Code's VS Code extension counts
    dozens of times as it starts: the counts must leave a key's requests to its messages."""
    key = await new_key(stack.db, "counts", "--rpm", "2")
    await wait_for_key(stack.url, key)
    async with (
        anthropic.AsyncAnthropic(base_url=stack.url, api_key=key, max_retries=0) as claude,
        openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0) as client,
    ):
        for _ in range(3):
            counted = await claude.messages.count_tokens(model="qwen3-8b", messages=MESSAGES)  # type: ignore[arg-type]
            assert counted.input_tokens > 0
            assert (await client.responses.input_tokens.count(model="qwen3-8b", input="Say hello")).input_tokens > 0
        for _ in range(2):
            answer = await claude.messages.create(model="qwen3-8b", max_tokens=5, messages=MESSAGES)  # type: ignore[arg-type]
            assert answer.content[0].text == "Hello"  # type: ignore[union-attr]
        with pytest.raises(anthropic.RateLimitError):
            await claude.messages.create(model="qwen3-8b", max_tokens=5, messages=MESSAGES)  # type: ignore[arg-type]


async def test_a_burst_of_one_keys_requests_waits_on_the_database_with_one_query_and_each_gets_its_own_answer(
    stack: Stack,
) -> None:
    # While another gateway holds the key's bucket row, a burst of its requests must not take
    # one database connection each (the pool, which every other key and the usage log share):
    # those that arrive while the key's admission waits go together in its next call, and
    # each still gets its own verdict.
    key = await new_key(stack.db, "burst-one-query", "--rpm", "100", "--tpm", "1000000")
    await wait_for_key(stack.url, key)
    [(key_id,)] = await sql(stack.db, "SELECT id FROM api_keys WHERE name = 'burst-one-query'")
    await sql(stack.db, "INSERT INTO api_key_limits (key_id) VALUES (%s) ON CONFLICT DO NOTHING", key_id)
    other = await trio.to_thread.run_sync(lambda: psycopg.connect(stack.db))

    async def waiting() -> int:
        found = await sql(stack.db, "SELECT count(*) FROM pg_stat_activity"
                          " WHERE wait_event_type = 'Lock' AND query LIKE '%%api_key_admit%%'")
        return int(found[0][0])

    answers: list[httpx.Response] = []
    try:
        await trio.to_thread.run_sync(
            lambda: other.execute("SELECT 1 FROM api_key_limits WHERE key_id = %s FOR UPDATE", (key_id,))
        )
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                answers.extend(await burst(stack.url, key, 20))

            nursery.start_soon(ask)
            await eventually(waiting)
            await trio.sleep(0.5)  # the rest of the burst arrives meanwhile (well within the 3 s wait)
            assert await waiting() == 1
            await trio.to_thread.run_sync(other.rollback)
    finally:
        await trio.to_thread.run_sync(other.close)
    assert [a.status_code for a in answers] == [200] * 20
    remaining = sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in answers)
    assert remaining == list(range(80, 100))  # one after the other, each its own admission
