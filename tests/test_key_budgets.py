"""Per-key token budgets on real PostgreSQL: a key answers until its budget is spent, then
OpenAI's 429 `insufficient_quota` (not retried by the SDKs) in every dialect, shared by
gateways, reset with its period; `keys update` changes a running gateway's key in place."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import anthropic
import httpx
import ollama
import openai
import pytest
import trio

from tests.fakes import OpenAIBackend, Script, Usage
from tests.fakes.base import Call
from tests.fakes.server import Exchange, Request
from tests.harness import backend
from tests.test_auth_helpers import (
    MESSAGES,
    Stack,
    bearer,
    eventually,
    gateway,
    keyed_stack,
    keys_cli,
    new_key,
    sql,
    wait_for_key,
)

pytest_plugins = ["tests.infra_servers"]

# Each exchange costs 70 tokens (60 prompt + 10 completion): a budget of 150 answers three
# requests (0, 70 and 140 counted before each: under 150) and refuses the fourth.
USAGE = Usage(60, 10)
MONTH = 30 * 86400


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    async with keyed_stack(pg_database_url, nats_url, USAGE) as started:
        yield started


async def key_id(db: str, name: str) -> int:
    [(found,)] = await sql(db, "SELECT id FROM api_keys WHERE name = %s", name)
    return int(found)


async def counted(db: str, key: int, requests: int) -> None:
    """Until the key's usage rows say `requests` (usage is written in batches)."""

    async def done() -> bool:
        rows = await sql(db, "SELECT coalesce(sum(requests), 0) FROM api_key_usage WHERE key_id = %s", key)
        return int(rows[0][0]) >= requests

    await eventually(done)


async def chat(url: str, key: str, **extra: object) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=10) as client:
        return await client.post("/v1/chat/completions", json={"model": "qwen3-8b", "messages": MESSAGES, **extra})


def chats(fake: OpenAIBackend) -> int:
    """The chats that reached the backend (it is also asked for its models)."""
    return sum(r.path == "/v1/chat/completions" for r in fake.requests)


async def keys(db: str, *argv: str) -> tuple[int, str, str]:
    return await trio.to_thread.run_sync(lambda: keys_cli(db, *argv))


async def test_a_key_answers_until_its_budget_is_spent_then_insufficient_quota_and_the_sdk_does_not_retry(
    stack: Stack,
) -> None:
    key = await new_key(stack.db, "monthly", "--budget", "150")
    await wait_for_key(stack.url, key)
    sent: list[httpx.Request] = []

    async def count(request: httpx.Request) -> None:
        sent.append(request)

    async with httpx.AsyncClient(event_hooks={"request": [count]}, timeout=10) as http, openai.AsyncOpenAI(
        base_url=f"{stack.url}/v1", api_key=key, max_retries=2, http_client=http,
    ) as client:
        for streamed in (False, True, False):  # the third crosses the budget, and finishes whole
            if streamed:
                stream = await client.chat.completions.create(
                    model="qwen3-8b", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
                )
                text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            else:
                answer = await client.chat.completions.create(model="qwen3-8b", messages=MESSAGES)
                text = answer.choices[0].message.content or ""
            assert text == "Hello"
        sent.clear()
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="qwen3-8b", messages=MESSAGES)
    assert len(sent) == 1  # the SDK obeyed `x-should-retry: false`
    assert chats(stack.fake) == 3  # the refused request never reached the backend
    error = refused.value
    assert error.status_code == 429
    assert error.code == "insufficient_quota"
    assert error.type == "insufficient_quota"
    assert "You exceeded your current quota" in error.message
    assert "budget of 150 tokens per 30d" in error.message and "(210 used)" in error.message
    resets = datetime.now(UTC) + timedelta(days=30)
    assert f"resets at {resets:%Y-%m-%d}" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    assert MONTH - 120 <= int(error.response.headers["retry-after"]) <= MONTH


async def test_a_stream_in_flight_holds_the_budget_it_may_use_then_gives_back_what_it_did_not(
    stack: Stack,
) -> None:
    """The first stream reserves its estimate (its prompt and 4,096 max output tokens, named
    by no one), more than the budget: it holds the rest of it, so a request sent meanwhile is
    refused instead of passing the budget too, but told to retry in a moment (the budget is
    not spent: the stream may give most of it back), not that it is spent for the month. The
    stream finishes whole, uses 70, and the 30 it did not use come back: the key goes on."""
    stack.fake.set_script(Script(tokens=["tick "] * 10, pace=0.05, usage=USAGE))
    key = await new_key(stack.db, "streams", "--budget", "100")
    number = await key_id(stack.db, "streams")
    await wait_for_key(stack.url, key)
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="qwen3-8b", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        )
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="qwen3-8b", messages=MESSAGES)
        held = refused.value
        assert held.code == "rate_limit_exceeded"
        assert "budget of 100 tokens per 30d: 0 used, 100 held by requests in flight" in held.message
        assert "x-should-retry" not in held.response.headers  # a 429 the SDKs retry
        assert held.response.headers["retry-after"] == "2"
        code, out, _ = await keys(stack.db, "list", "--json")
        assert code == 0
        [listed] = [json.loads(line) for line in out.splitlines() if json.loads(line)["id"] == number]
        assert (listed["budget_used"], listed["budget_reserved"]) == (0, 100)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "tick " * 10
        again = await client.chat.completions.create(model="qwen3-8b", messages=MESSAGES)  # 70 of 100 counted
        assert again.choices[0].message.content == "tick " * 10
        with pytest.raises(openai.RateLimitError) as spent:
            await client.chat.completions.create(model="qwen3-8b", messages=MESSAGES)
    assert "(140 used)" in spent.value.message  # only the one that took the last 30 passed it
    assert chats(stack.fake) == 2


async def test_a_reservation_of_a_period_that_ended_frees_nothing_in_the_next(stack: Stack) -> None:
    """A stream reserves the whole budget (1,000) and the period ends while it runs; a request
    of the new period reserves all of it in turn. The stream's reservation went with the old
    period's count: its end must not give it back to the new period, which counts both
    requests' usage (140), not 0 (which would let the key spend its budget again)."""
    stack.fake.set_script(Script(tokens=["tick "] * 10, pace=0.05, usage=USAGE))
    key = await new_key(stack.db, "boundary", "--budget", "1000", "--budget-period", "1d")
    number = await key_id(stack.db, "boundary")
    await wait_for_key(stack.url, key)
    async with openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="qwen3-8b", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        )
        # A day and an hour later (the period's start set back rather than waiting).
        await sql(stack.db, "UPDATE api_key_limits SET budget_start = budget_start - interval '25 hours'"
                            " WHERE key_id = %s", number)
        answer = await client.chat.completions.create(model="qwen3-8b", messages=MESSAGES)
        assert answer.choices[0].message.content == "tick " * 10
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "tick " * 10
    await counted(stack.db, number, 2)

    async def settled() -> bool:
        [(used,)] = await sql(stack.db, "SELECT budget_used FROM api_key_limits WHERE key_id = %s", number)
        return int(used) == 140

    await eventually(settled)


async def test_concurrent_requests_on_two_gateways_spend_no_more_than_the_budget(stack: Stack) -> None:
    """30 requests at once, half on each of two gateways, against a budget that fits four of
    them: each reserves its estimate (a 240-character prompt, ~60 tokens, and `max_tokens`
    10); four fit, a fifth takes the last tokens left, and the rest are refused (told to retry
    in 2 s while the budget is held by those in flight, then `insufficient_quota`, which the
    SDK does not retry). Before, all 30 were admitted (each saw
    nothing counted yet) and used 2,100 tokens of a 300-token budget."""
    stack.fake.set_script(Script(tokens=["Hello"], pace=0.2, usage=USAGE))
    key = await new_key(stack.db, "crowd", "--budget", "300")
    number = await key_id(stack.db, "crowd")
    messages = [{"role": "user", "content": "word " * 48}]
    async with gateway(stack.db, stack.nats, backend("vllm", stack.server_url, default=True)) as second:
        await wait_for_key(stack.url, key)
        await wait_for_key(second, key)
        answered: list[str] = []
        refused: list[openai.RateLimitError] = []

        async def ask(url: str) -> None:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=2) as client:
                try:
                    answer = await client.chat.completions.create(model="qwen3-8b", messages=messages, max_tokens=10)
                except openai.RateLimitError as error:
                    refused.append(error)
                else:
                    answered.append(answer.choices[0].message.content or "")

        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(ask, stack.url if i % 2 else second)
    assert answered == ["Hello"] * len(answered)
    assert 4 <= len(answered) <= 5, len(answered)
    assert len(refused) == 30 - len(answered)
    assert {error.code for error in refused} == {"insufficient_quota"}
    assert chats(stack.fake) == len(answered)  # no refused request reached the backend, nor was retried
    await counted(stack.db, number, 30)

    async def settled() -> bool:
        [(used,)] = await sql(stack.db, "SELECT budget_used FROM api_key_limits WHERE key_id = %s", number)
        return int(used) == 70 * len(answered)

    await eventually(settled)  # the reservations given back: only real usage stays counted
    assert 70 * len(answered) <= 300 + 70


async def test_a_spent_budget_is_refused_in_the_anthropic_and_ollama_shapes(stack: Stack) -> None:
    key = await new_key(stack.db, "small", "--budget", "50")
    await wait_for_key(stack.url, key)
    assert (await chat(stack.url, key)).status_code == 200  # 0 of 50 counted before it
    await counted(stack.db, await key_id(stack.db, "small"), 1)
    async with anthropic.AsyncAnthropic(base_url=stack.url, api_key=key, max_retries=2) as claude:
        with pytest.raises(anthropic.RateLimitError) as refused:
            await claude.messages.create(model="qwen3-8b", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
    body = refused.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert "budget of 50 tokens per 30d is spent (70 used)" in body["error"]["message"]
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert int(refused.value.response.headers["retry-after"]) > MONTH - 120
    async with ollama.AsyncClient(host=stack.url, headers=bearer(key)) as llama:
        with pytest.raises(ollama.ResponseError) as declined:
            await llama.chat(model="qwen3-8b", messages=MESSAGES)
    assert declined.value.status_code == 429
    assert "You exceeded your current quota" in declined.value.error
    assert chats(stack.fake) == 1


async def test_two_gateways_share_a_budget(stack: Stack) -> None:
    key = await new_key(stack.db, "shared", "--budget", "150")
    number = await key_id(stack.db, "shared")
    async with gateway(stack.db, stack.nats, backend("vllm", stack.server_url, default=True)) as second:
        await wait_for_key(stack.url, key)
        await wait_for_key(second, key)
        assert (await chat(stack.url, key)).status_code == 200
        assert (await chat(stack.url, key)).status_code == 200
        await counted(stack.db, number, 2)
        assert (await chat(second, key)).status_code == 200  # 140 counted: under 150
        refused = await chat(second, key)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "insufficient_quota"
        assert (await chat(stack.url, key)).status_code == 429
    assert chats(stack.fake) == 3


async def test_requests_one_after_the_other_on_two_gateways_are_not_refused_for_what_nothing_holds(
    stack: Stack,
) -> None:
    """A client sends its requests one after the other, each once the previous one was
    answered, alternately to two gateway processes (workers, replicas) sharing a budget of
    1,000: each reserves the rest of the budget while it runs (it names no max output tokens)
    and gives back what it did not use as it ends. Before, the next request, on the other
    gateway, came before the first one's usage writer had written that, and was refused 429
    "held by requests in flight" though none was."""
    key = await new_key(stack.db, "alternating", "--budget", "1000")
    async with gateway(stack.db, stack.nats, backend("vllm", stack.server_url, default=True)) as second:
        await wait_for_key(stack.url, key)
        await wait_for_key(second, key)
        for url in (stack.url, second) * 3:
            answer = await chat(url, key)
            assert answer.status_code == 200, answer.text
    assert chats(stack.fake) == 6


async def test_an_idempotent_retry_and_a_cache_hit_do_not_spend_the_budget_again(stack: Stack) -> None:
    """A retry with the same `Idempotency-Key` replays the answer, and a cache hit replays a
    cached one: no backend generated anything, so neither spends the key's budget (nor its
    `--tpm`), as LiteLLM charges nothing for a cache hit. Before, each replay was charged as
    if generated again: an idempotent retry paid twice for one answer. They still count in the
    key's usage (requests and tokens served)."""
    key = await new_key(stack.db, "replays", "--budget", "150")
    number = await key_id(stack.db, "replays")
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=10) as client:
        chat = {"model": "qwen3-8b", "messages": MESSAGES}
        for headers in ({"Idempotency-Key": "order-1"}, {"Idempotency-Key": "order-1"}, {"x-cache": "exact"},
                        {"x-cache": "exact"}):
            answer = await client.post("/v1/chat/completions", json=chat, headers=headers)
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["total_tokens"] == 70  # the answer says what it cost once
            # The answer is kept (journalled, cached) once its client has it: replayed after that.
            trace = answer.headers["x-trace-id"]
            await eventually(functools.partial(
                sql, stack.db, "SELECT 1 FROM chat_log WHERE status = 'completed' AND trace_id = %s", trace))
            if "x-cache" in headers:
                await eventually(lambda: sql(stack.db, "SELECT 1 FROM completions_cache"))
        assert answer.headers["x-cache"] == "hit"
        await counted(stack.db, number, 4)
        [(used,)] = await sql(stack.db, "SELECT budget_used FROM api_key_limits WHERE key_id = %s", number)
        assert used == 140
        assert chats(stack.fake) == 2
        assert (await client.post("/v1/chat/completions", json={**chat, "temperature": 0.5})).status_code == 200
        refused = await client.post("/v1/chat/completions", json={**chat, "temperature": 0.7})
        assert refused.status_code == 429 and "(210 used)" in refused.json()["error"]["message"]
    await counted(stack.db, number, 6)  # the refused request counts as one too
    _, out, _ = await keys(stack.db, "list", "--json")
    [listed] = [json.loads(line) for line in out.splitlines() if json.loads(line)["id"] == number]
    assert listed["prompt_tokens"] + listed["completion_tokens"] == 350  # five answers served


async def test_the_budget_comes_back_when_its_period_resets(stack: Stack) -> None:
    key = await new_key(stack.db, "daily", "--budget", "60", "--budget-period", "1d")
    number = await key_id(stack.db, "daily")
    await wait_for_key(stack.url, key)
    assert (await chat(stack.url, key)).status_code == 200
    await counted(stack.db, number, 1)
    refused = await chat(stack.url, key)
    assert refused.status_code == 429
    assert "60 tokens per 1d" in refused.json()["error"]["message"]
    assert 86400 - 120 <= int(refused.headers["retry-after"]) <= 86400
    # A day and an hour later (the period's start set back rather than waiting): a new period.
    await sql(stack.db, "UPDATE api_key_limits SET budget_start = budget_start - interval '25 hours'"
                        " WHERE key_id = %s", number)
    assert (await chat(stack.url, key)).status_code == 200
    await counted(stack.db, number, 3)  # the refused request is counted too
    code, out, _ = await keys(stack.db, "list", "--json")
    assert code == 0
    [listed] = [json.loads(line) for line in out.splitlines() if json.loads(line)["name"] == "daily"]
    assert listed["budget"] == 60 and listed["budget_period"] == "1d"
    assert listed["budget_used"] == 70  # only the new period's request
    assert listed["prompt_tokens"] + listed["completion_tokens"] == 140  # all-time usage is kept
    # The second period began a day after the first: it ends 23 hours from now.
    ends = datetime.fromisoformat(listed["budget_resets_at"]) - datetime.now(UTC)
    assert timedelta(hours=22, minutes=58) <= ends <= timedelta(hours=23)
    assert (await chat(stack.url, key)).status_code == 429


async def test_keys_update_changes_a_running_gateways_key_at_once(stack: Stack) -> None:
    key = await new_key(stack.db, "team", "--budget", "50")
    number = await key_id(stack.db, "team")
    await wait_for_key(stack.url, key)
    assert (await chat(stack.url, key)).status_code == 200
    await counted(stack.db, number, 1)
    assert (await chat(stack.url, key)).status_code == 429

    code, out, err = await keys(stack.db, "update", str(number), "--budget", "1000", "--rpm", "2")
    assert code == 0, err
    assert "budget 1000 tokens/30d" in out and "2 requests/min" in out

    async def answered() -> httpx.Response | None:
        answer = await chat(stack.url, key)
        return answer if answer.status_code == 200 else None

    raised = await eventually(answered)  # the period's count (70) is kept, now under 1000
    assert raised.headers["x-ratelimit-limit-requests"] == "2"
    assert (await chat(stack.url, key)).status_code == 200
    limited = await chat(stack.url, key)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"

    prefix = key[:12]
    code, _, err = await keys(stack.db, "update", prefix, "--rpm", "none", "--budget", "none")
    assert code == 0, err
    await eventually(answered)
    code, out, _ = await keys(stack.db, "list", "--json")
    [listed] = [json.loads(line) for line in out.splitlines() if json.loads(line)["name"] == "team"]
    assert listed["budget"] is listed["budget_period"] is listed["budget_used"] is listed["rpm"] is None


async def test_a_budget_given_by_keys_update_starts_its_period_then(stack: Stack) -> None:
    key = await new_key(stack.db, "late")
    number = await key_id(stack.db, "late")
    await wait_for_key(stack.url, key)
    for _ in range(2):
        assert (await chat(stack.url, key)).status_code == 200
    await counted(stack.db, number, 2)
    code, _, err = await keys(stack.db, "update", str(number), "--budget", "100", "--budget-period", "7d")
    assert code == 0, err

    async def refused() -> httpx.Response | None:
        answer = await chat(stack.url, key)
        return answer if answer.status_code == 429 else None

    # The 140 tokens used before the budget are not in its period: two requests fit (and any
    # answered before the gateway had reloaded the key count in the new period too).
    answer = await eventually(refused)
    since = chats(stack.fake) - 2
    assert since >= 2
    assert f"budget of 100 tokens per 7d is spent ({70 * since} used)" in answer.json()["error"]["message"]
    code, out, _ = await keys(stack.db, "list")
    header, *rows = out.splitlines()
    assert "BUDGET" in header and "BUDGET USED" in header and "RESETS" in header
    [row] = [line for line in rows if " late " in line]
    assert "100/7d" in row and f" {70 * since} " in row
    assert f"{datetime.now(UTC) + timedelta(days=7):%Y-%m-%d}" in row


async def test_keys_update_of_an_unknown_key_is_a_clear_error(stack: Stack) -> None:
    code, out, err = await keys(stack.db, "update", "987654", "--budget", "10")
    assert code == 1 and out == ""
    assert "no key with id, prefix or value '987654'" in err
    key = await new_key(stack.db, "unchanged")
    with pytest.raises(SystemExit) as refused:  # argparse's own refusal, with the usage
        await keys(stack.db, "update", key, "--budget", "0")
    assert refused.value.code == 2
    code, _, err = await keys(stack.db, "update", key)
    assert code == 2 and "nothing to change" in err
    code, _, err = await keys(stack.db, "update", key, "--budget-period", "monthly")
    assert code == 2 and "cannot read 'monthly' as a period" in err


async def test_out_of_range_values_are_clear_errors_not_tracebacks(stack: Stack) -> None:
    """Numbers past what the columns hold, dates past year 9999 and non-ASCII digits were a
    database error, an OverflowError or a ValueError traceback from the CLI."""
    for argv, words in (
        (("--rpm", "99999999999"), "--rpm must be a positive integer up to 2,147,483,647"),
        (("--budget", str(2**63)), "--budget must be a positive integer up to"),
        (("--expires", "99999999999d"), "too far in the future"),
        (("--expires", "9999-12-31T23:00:00-05:00"), "too far in the future"),
        (("--budget", "10", "--budget-period", "999999999999999w"), "longer than ten years"),
    ):
        code, out, err = await keys(stack.db, "create", "--name", "x", *argv)
        assert code == 2 and out == "" and words in err and "Traceback" not in err, (argv, err)
    code, _, err = await keys(stack.db, "revoke", "²")
    assert code == 1 and "no key with id, prefix or value '²'" in err
    assert await sql(stack.db, "SELECT id FROM api_keys") == []


async def test_a_changed_budget_period_starts_a_new_period_now_carrying_the_count(stack: Stack) -> None:
    """Twenty days into a 30-day period with 70 used, the key is switched to a daily budget of
    100: its new period starts now and carries the 70 (it was counted from the old start,
    which put now in the twentieth daily period: the count went to 0 and the key could spend
    a whole new budget at once), so one more request passes and the next is refused."""
    key = await new_key(stack.db, "switched", "--budget", "100")
    number = await key_id(stack.db, "switched")
    await wait_for_key(stack.url, key)
    assert (await chat(stack.url, key)).status_code == 200
    await counted(stack.db, number, 1)
    await sql(stack.db, "UPDATE api_key_limits SET budget_start = budget_start - interval '20 days'"
              " WHERE key_id = %s", number)
    code, _, err = await keys(stack.db, "update", str(number), "--budget-period", "1d")
    assert code == 0, err
    code, out, _ = await keys(stack.db, "list", "--json")
    assert code == 0
    [listed] = [json.loads(line) for line in out.splitlines() if json.loads(line)["id"] == number]
    assert (listed["budget_used"], listed["budget_period"]) == (70, "1d")
    ends = datetime.fromisoformat(listed["budget_resets_at"]) - datetime.now(UTC)
    assert timedelta(hours=23, minutes=58) <= ends <= timedelta(days=1)

    async def refused() -> bool:  # the gateway reloads the key: 140 of 100 used after one more
        answer = await chat(stack.url, key)
        if answer.status_code == 200:
            await counted(stack.db, number, 2)
            return False
        return answer.status_code == 429 and "per 1d" in answer.json()["error"]["message"]

    await eventually(refused)
    assert chats(stack.fake) == 2


class _NegativeUsage(OpenAIBackend):
    """A server whose usage is not a count (a bug's negative number, a string)."""

    def __init__(self, usage: dict[str, object]) -> None:
        super().__init__()
        self.usage = usage

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.path != "/v1/chat/completions":
            await super().route(request, exchange, call)
            return
        await exchange.respond_json(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "qwen3-8b",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
            "usage": self.usage,
        })


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -1000000, "completion_tokens": 5, "total_tokens": -999995},
    {"prompt_tokens": "many", "completion_tokens": 5, "total_tokens": 5},
    {"prompt_tokens": 1e400, "completion_tokens": 5, "total_tokens": 5},
])
async def test_a_backends_usage_that_is_no_count_is_no_credit_to_the_key(
    aio_loop: object, pg_database_url: str, nats_url: str, usage: dict[str, object]
) -> None:
    """A chat's backend reporting -1000000 prompt tokens credited the key's budget a million
    tokens (a string was a 500); the key is charged the gateway's estimate instead."""
    fake = _NegativeUsage(usage)
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("oa", server.url, default=True)) as url:
        key = await new_key(pg_database_url, "credited", "--budget", "1000")
        await wait_for_key(url, key)
        answer = await chat(url, key)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "Hello"
        owner = await key_id(pg_database_url, "credited")
        await counted(pg_database_url, owner, 1)
        [(prompt, completion)] = await sql(
            pg_database_url, "SELECT sum(prompt_tokens), sum(completion_tokens) FROM api_key_usage WHERE key_id = %s", owner,
        )
    assert int(prompt) > 0 and int(completion) > 0
