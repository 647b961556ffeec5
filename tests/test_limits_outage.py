"""Rate limits while PostgreSQL stalls (every postgres process paused with SIGSTOP, as in a
frozen VM or a storage hang): a limited key's request is admitted from the gateway's own
buckets within the admission timeout instead of hanging on the database, the limit still
holds per process, and once the database answers again the limit is shared again."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]
import pytest
import trio

from proxy.infra.embedded import EmbeddedPostgres
from proxy.infra.keys_store import Admission
from proxy.infra.spool import Spool
from proxy.services.auth import Principal
from proxy.services.limits import _ADMIT_TIMEOUT, _LocalBuckets
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.pausing import paused
from tests.test_auth_helpers import (
    MESSAGES,
    bearer,
    eventually,
    gateway,
    new_key,
    sql,
    wait_for_key,
)

pytest_plugins = ["tests.infra_servers"]

CHAT = {"model": "qwen3-8b", "messages": MESSAGES, "max_tokens": 5}
# What a user would call "answered promptly" next to the old 13 s hang.
SLACK = 1.5


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A server of our own: pausing the session's shared one would stall other tests."""
    with EmbeddedPostgres(tmp_path / "pgdata") as started:
        yield started


@contextmanager
def stalled(server: EmbeddedPostgres) -> Iterator[None]:
    """Every process of `server` paused: connections stay open, nothing answers."""
    assert server.pid is not None
    postmaster = psutil.Process(server.pid)
    children = [child.pid for child in postmaster.children(recursive=True)]
    with paused(postmaster.pid, *children):
        yield


@dataclass
class Stack:
    url: str
    second: str
    postgres: EmbeddedPostgres
    db: str
    fake: OpenAIBackend


@pytest.fixture
async def stack(aio_loop: object, postgres: EmbeddedPostgres, nats_url: str) -> AsyncIterator[Stack]:
    """Two gateways sharing the paused-to-be database."""
    assert postgres.url is not None
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))
    async with fake.serve() as server:
        config = backend("vllm", server.url, default=True)
        async with gateway(postgres.url, nats_url, config) as url, gateway(postgres.url, nats_url, config) as second:
            yield Stack(url, second, postgres, postgres.url, fake)


async def _timed_post(client: httpx.AsyncClient) -> tuple[httpx.Response, float]:
    started = trio.current_time()
    answer = await client.post("/v1/chat/completions", json=CHAT)
    return answer, trio.current_time() - started


async def _collect(client: httpx.AsyncClient, into: list[tuple[httpx.Response, float]]) -> None:
    into.append(await _timed_post(client))


async def test_a_stalled_database_delays_a_limited_request_by_the_admit_timeout_at_most(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_proxy.limits")
    key = await new_key(stack.db, "stalled", "--rpm", "2")
    shared = await new_key(stack.db, "shared", "--rpm", "2")
    for url in (stack.url, stack.second):
        await wait_for_key(url, key)
        await wait_for_key(url, shared)

    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=30) as client:
        with stalled(stack.postgres):
            # Three at once, the key's first requests: each answered within the admission
            # timeout (it used to hang ~13 s), and the limit holds, counted by this gateway.
            first: list[tuple[httpx.Response, float]] = []
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(lambda: _collect(client, first))
            assert sorted(answer.status_code for answer, _ in first) == [200, 200, 429]
            assert max(took for _, took in first) < _ADMIT_TIMEOUT + SLACK
            # Later requests do not wait for the stuck database again.
            later, took = await _timed_post(client)
            assert later.status_code == 429
            assert later.json()["error"]["code"] == "rate_limit_exceeded"
            assert took < SLACK

    # The database answers again: the limit is shared by both gateways once more.
    def recovered() -> bool:
        return any("shared through the database again" in r.getMessage() for r in caplog.records)

    async def check() -> bool:
        return recovered()

    await eventually(check, within=15)
    async with httpx.AsyncClient(headers=bearer(shared), timeout=10) as client:
        on_first = await client.post(f"{stack.url}/v1/chat/completions", json=CHAT)
        on_second = await client.post(f"{stack.second}/v1/chat/completions", json=CHAT)
        assert on_first.status_code == on_second.status_code == 200
        assert on_second.headers["x-ratelimit-remaining-requests"] == "0"  # saw the first's request
        refused = await client.post(f"{stack.url}/v1/chat/completions", json=CHAT)
        assert refused.status_code == 429


async def test_what_a_gateway_admitted_alone_in_an_outage_is_charged_to_the_shared_bucket_after(stack: Stack) -> None:
    """PostgreSQL down: each gateway admits from its own buckets. Once it is back, those
    admissions are charged to the shared bucket, so the other gateway, which saw none of
    them, does not admit the key's whole limit again."""
    key = await new_key(stack.db, "outage", "--rpm", "3")
    for url in (stack.url, stack.second):
        await wait_for_key(url, key)
    await trio.to_thread.run_sync(stack.postgres.stop)
    try:
        async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=30) as client:
            assert [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(2)] == [200, 200]
    finally:
        await trio.to_thread.run_sync(stack.postgres.start)

    async def charged() -> bool:
        ahead = await sql(stack.db, "SELECT l.requests_at - extract(epoch FROM now()) FROM api_key_limits l"
                                    " JOIN api_keys k ON k.id = l.key_id WHERE k.name = 'outage'")
        # Two requests at 20 s each. (An admission call that outlived the outage may have
        # taken a third there; it is given back in the next write, so wait for that too.)
        return bool(ahead) and 30 < float(ahead[0][0]) <= 41

    await eventually(charged, within=30, every=0.5)
    # The second gateway's pooled connections died with the server: until it has new ones, its
    # admissions are local (and it learns no new key). Its own requests (another key's) get
    # it there first.
    async with httpx.AsyncClient(base_url=stack.second, timeout=30) as client:

        async def ready() -> bool:
            return (await client.get("/ready")).status_code == 200

        await eventually(ready, within=30, every=0.5)
    warm = await new_key(stack.db, "warm", "--rpm", "1000")
    await wait_for_key(stack.second, warm)
    async with httpx.AsyncClient(base_url=stack.second, headers=bearer(warm), timeout=30) as client:
        for _ in range(3):
            await client.post("/v1/chat/completions", json=CHAT)
    # An admission call the outage held up may land only now (and be given back at once):
    # the bucket is read again right before the second gateway is asked.
    await eventually(charged, within=15, every=0.5)
    async with httpx.AsyncClient(base_url=stack.second, headers=bearer(key), timeout=30) as client:
        assert [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(2)] == [200, 429]


async def test_usage_recorded_while_postgres_is_down_survives_a_stop_and_counts_once(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key's usage made while PostgreSQL is down, by a gateway stopped before it comes back,
    is in the key's usage once the gateway runs again (it was lost), and only once, even when
    its spool is replayed again (a gateway killed right after writing it). Once no spool
    holds its batches, the numbers that kept them from counting twice are deleted (they
    were kept forever: a row per process start)."""
    assert postgres.url is not None
    data_dir = tmp_path / "data"
    key = await new_key(postgres.url, "spooled")
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))

    async def usage() -> list[tuple[int, int, int]]:
        found = await sql(postgres.url or "", "SELECT requests, prompt_tokens, completion_tokens FROM api_key_usage u"
                                              " JOIN api_keys k ON k.id = u.key_id WHERE k.name = 'spooled'")
        return [(int(a), int(b), int(c)) for a, b, c in found]

    async with fake.serve() as server:
        config = backend("vllm", server.url, default=True)
        async with gateway(postgres.url, nats_url, config, data_dir=data_dir) as url:
            await wait_for_key(url, key)
            await trio.to_thread.run_sync(postgres.stop)
            async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=30) as client:
                assert [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(2)] == [200, 200]
        spooled = list(data_dir.glob("spool/usage/*/*.json"))
        assert len(spooled) == 1
        await trio.to_thread.run_sync(postgres.start)

        async def counted() -> bool:
            return await usage() == [(2, 10, 2)]

        real_save = Spool.save

        def killed_before_emptying(spool: Spool, items: list[dict[str, Any]]) -> None:
            if not items and spool.directory.parent.name == "usage":
                raise OSError("as if killed first")
            real_save(spool, items)

        # The gateway that writes it is killed before its own spool file (which took the
        # batches over) is emptied: the batches written are there to be sent again.
        with monkeypatch.context() as patch:
            patch.setattr(Spool, "save", killed_before_emptying)
            async with gateway(postgres.url, nats_url, config, data_dir=data_dir):
                await eventually(counted, within=30, every=0.5)
        assert not spooled[0].exists()
        assert len(list(data_dir.glob("spool/usage/*/*.json"))) == 1
        assert await sql(postgres.url, "SELECT count(*) FROM api_key_usage_writes") == [(1,)]

        async def pruned() -> bool:
            return not list(data_dir.glob("spool/usage/*/*.json")) and not await sql(
                postgres.url or "", "SELECT writer FROM api_key_usage_writes")

        async with gateway(postgres.url, nats_url, config, data_dir=data_dir):
            await eventually(pruned, within=30, every=0.2)
        assert await usage() == [(2, 10, 2)]  # sent again, counted once


async def test_a_gateway_that_stops_leaves_no_batch_number_behind(
    aio_loop: object, pg_database_url: str, nats_url: str, tmp_path: Path
) -> None:
    """Each process numbers its usage batches under a writer id of its own; its row was
    kept forever, one per start. A gateway that stops with its usage written deletes it."""
    key = await new_key(pg_database_url, "stops")
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))

    async def writers() -> int:
        return int((await sql(pg_database_url, "SELECT count(*) FROM api_key_usage_writes"))[0][0])

    async def written() -> bool:
        return await writers() == 1

    async with fake.serve() as server:
        async with gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True),
                           data_dir=tmp_path / "data") as url:
            await wait_for_key(url, key)
            async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=30) as client:
                assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            await eventually(written, within=30, every=0.2)
    assert await writers() == 0


async def test_tokens_are_reserved_from_the_gateways_own_bucket_in_an_outage(stack: Stack) -> None:
    """PostgreSQL down: a request still reserves its tokens, in the gateway's own bucket, so
    concurrent requests cannot overspend it; once it is back, only what was used is charged
    to the shared bucket (the reservations made alone were settled with their exchanges)."""
    key = await new_key(stack.db, "tokens-outage", "--tpm", "1000")
    await wait_for_key(stack.url, key)
    stack.fake.set_script(Script(tokens=["Hello"], usage=Usage(5, 1), pace=_ADMIT_TIMEOUT + 2))  # outlasts an admission
    chat = CHAT | {"max_tokens": 600}
    statuses: list[int] = []
    await trio.to_thread.run_sync(stack.postgres.stop)
    try:
        async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=30) as client:

            async def one() -> None:
                statuses.append((await client.post("/v1/chat/completions", json=chat)).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(one)
    finally:
        await trio.to_thread.run_sync(stack.postgres.start)
    assert sorted(statuses) == [200, 429, 429]  # about 606 tokens each: one fits in 1000

    async def charged() -> bool:
        ahead = await sql(stack.db, "SELECT l.tokens_at - extract(epoch FROM clock_timestamp()) FROM api_key_limits l"
                                    " JOIN api_keys k ON k.id = l.key_id WHERE k.name = 'tokens-outage'")
        # Written (the row starts at epoch 0) and settled: batches are written in turn, and an
        # admission call that outlived the outage may have reserved there too, given back in a
        # later write, so a read between two writes may see reservations not yet given back.
        return bool(ahead) and -3600 < float(ahead[0][0]) < 1

    await eventually(charged, within=30, every=0.5)
    [(ahead,)] = await sql(stack.db, "SELECT l.tokens_at - extract(epoch FROM clock_timestamp()) FROM api_key_limits l"
                                     " JOIN api_keys k ON k.id = l.key_id WHERE k.name = 'tokens-outage'")
    assert float(ahead) < 1  # 6 tokens used: 0.36 s, not the 606 reserved (36 s)


async def test_a_budget_is_counted_per_process_in_an_outage_and_shared_again_after(stack: Stack) -> None:
    """PostgreSQL down: a key's budget is enforced from what the gateway last learnt plus its
    own usage since (a request is answered, never hung on the database); once it is back, that
    usage is in the shared count, so the other gateway refuses the key too."""
    key = await new_key(stack.db, "budgeted", "--budget", "10")  # 6 tokens an exchange
    for url in (stack.url, stack.second):
        await wait_for_key(url, key)
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=30) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        await eventually(lambda: sql(stack.db, "SELECT 1 FROM api_key_usage u JOIN api_keys k ON k.id = u.key_id"
                                               " WHERE k.name = 'budgeted'"))
        await trio.to_thread.run_sync(stack.postgres.stop)
        try:
            answered, _ = await _timed_post(client)
            assert answered.status_code == 200  # 6 of 10 counted
            refused, took = await _timed_post(client)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "insufficient_quota"
            assert "(12 used)" in refused.json()["error"]["message"]
            assert took < _ADMIT_TIMEOUT + SLACK
        finally:
            await trio.to_thread.run_sync(stack.postgres.start)

    async def shared() -> bool:
        found = await sql(stack.db, "SELECT l.budget_used FROM api_key_limits l JOIN api_keys k ON k.id = l.key_id"
                                    " WHERE k.name = 'budgeted'")
        return bool(found) and int(found[0][0]) == 12

    await eventually(shared, within=30, every=0.5)
    async with httpx.AsyncClient(base_url=stack.second, timeout=30) as client:

        async def ready() -> bool:  # reconnected: its admissions ask the database again
            return (await client.get("/ready")).status_code == 200

        await eventually(ready, within=30, every=0.5)
    async with httpx.AsyncClient(base_url=stack.second, headers=bearer(key), timeout=30) as client:

        async def refused_there() -> httpx.Response | None:
            answer = await client.post("/v1/chat/completions", json=CHAT)
            return answer if answer.status_code == 429 else None

        answer = await eventually(refused_there, within=30, every=0.5)
        assert "(12 used)" in answer.json()["error"]["message"]
    assert sum(r.path == "/v1/chat/completions" for r in stack.fake.requests) == 2


async def test_in_an_outage_concurrent_requests_reserve_the_budget_in_the_process(stack: Stack) -> None:
    """PostgreSQL down before a budgeted key's first request: the process counts alone, with
    the same reservations (11 tokens each: a 6-token prompt and `max_tokens` 5; each uses 6),
    so of ten requests at once against a budget of 30, only those that fit are answered (at
    most five, 30 tokens, however their admissions and ends interleave) and the others refused
    `insufficient_quota`; before, all ten were (each saw nothing counted yet)."""
    stack.fake.set_script(Script(tokens=["Hello"], usage=Usage(5, 1), pace=0.5))
    key = await new_key(stack.db, "crowd-outage", "--budget", "30")
    await wait_for_key(stack.url, key)
    await trio.to_thread.run_sync(stack.postgres.stop)
    try:
        answers: list[tuple[httpx.Response, float]] = []
        async with httpx.AsyncClient(base_url=stack.url, headers=bearer(key), timeout=30) as client:
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(_collect, client, answers)
    finally:
        await trio.to_thread.run_sync(stack.postgres.start)
    answered = [answer for answer, _ in answers if answer.status_code == 200]
    refused = [answer for answer, _ in answers if answer.status_code != 200]
    assert 3 <= len(answered) <= 5, [answer.status_code for answer, _ in answers]
    assert {answer.status_code for answer in refused} == {429}
    assert {answer.json()["error"]["code"] for answer in refused} == {"insufficient_quota"}
    assert max(took for _, took in answers) < _ADMIT_TIMEOUT + SLACK + 0.5  # none hung on the database


async def test_usage_spooled_in_a_period_that_ended_is_not_charged_to_the_next(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str, tmp_path: Path
) -> None:
    """A budgeted key's usage made while PostgreSQL is down, spooled by a gateway stopped
    before it comes back, is written by the next gateway after the key's period ended: it is
    usage of the period it was made in, and the new period starts at 0 (it was charged 12 of
    the new period's tokens: a month's usage replayed could spend the next month's budget)."""
    assert postgres.url is not None
    data_dir = tmp_path / "data"
    key = await new_key(postgres.url, "late", "--budget", "1000", "--budget-period", "1d")
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))
    async with fake.serve() as server:
        config = backend("vllm", server.url, default=True)
        async with gateway(postgres.url, nats_url, config, data_dir=data_dir) as url:
            await wait_for_key(url, key)
            await trio.to_thread.run_sync(postgres.stop)
            async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=30) as client:
                assert [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(2)] == [200, 200]
        assert len(list(data_dir.glob("spool/usage/*/*.json"))) == 1
        await trio.to_thread.run_sync(postgres.start)
        # The day ended after the usage (the period's start set back rather than waiting).
        await sql(postgres.url, "UPDATE api_key_limits l SET budget_start = now() - interval '1 day'"
                                " FROM api_keys k WHERE k.id = l.key_id AND k.name = 'late'")

        async def written() -> bool:
            found = await sql(postgres.url or "", "SELECT sum(u.requests) FROM api_key_usage u"
                                                  " JOIN api_keys k ON k.id = u.key_id WHERE k.name = 'late'")
            return found[0][0] == 2

        async with gateway(postgres.url, nats_url, config, data_dir=data_dir):
            await eventually(written, within=30, every=0.2)
    [(used, start)] = await sql(postgres.url, "SELECT l.budget_used, l.budget_start > now() - interval '1 day'"
                                              " FROM api_key_limits l JOIN api_keys k ON k.id = l.key_id"
                                              " WHERE k.name = 'late'")
    assert start  # the new period was rolled
    assert used == 0


def test_in_an_outage_a_changed_budget_period_starts_over_as_keys_update_does() -> None:
    """The process last heard of a key under its 30-day period (40 used, 20 held); the key is
    then switched to a daily budget (`keys update` starts a new day-long period now, carrying
    the usage) and the database goes down before the key is admitted there again. The
    process's own count follows the same rule: a period of a day from now, the count kept
    (it kept the 30-day reset: a daily budget that reset only a month later)."""
    month, day = 30 * 86400.0, 86400.0
    local = _LocalBuckets()
    now = time.time()
    local.sync(7, Admission(True, now, now, now, budget_used=40, budget_reset=now + month - 3600,
                            budget_start=now - 3600, budget_held=20))
    daily = Principal(id=7, name="switched", prefix="sk-llmp-x", budget=100, budget_period=day)
    admitted = local.admit(daily, 0, 30)
    assert admitted.allowed and admitted.budget_used == 60 + 30
    assert admitted.budget_reset is not None and day - 60 <= admitted.budget_reset - time.time() <= day
    assert local.admit(daily, 0, 30).budget_reserved == 10  # the rest of 100
    assert not local.admit(daily, 0, 30).allowed


async def test_in_an_outage_a_key_this_gateway_never_admitted_keeps_its_spent_budget(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str
) -> None:
    """Another process spent the key's budget; this gateway loaded the key but never admitted
    it, then PostgreSQL goes down: the key stays refused for its period (each process gave it
    a fresh full budget of its own)."""
    assert postgres.url is not None
    key = await new_key(postgres.url, "spent-elsewhere", "--budget", "100")
    await sql(postgres.url, "UPDATE api_key_limits l SET budget_used = 100 FROM api_keys k"
                            " WHERE k.id = l.key_id AND k.name = 'spent-elsewhere'")
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))
    async with fake.serve() as server, gateway(postgres.url, nats_url, backend("vllm", server.url, default=True)) as url:
        await wait_for_key(url, key)
        await trio.to_thread.run_sync(postgres.stop)
        try:
            async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=30) as client:
                refused, _ = await _timed_post(client)
        finally:
            await trio.to_thread.run_sync(postgres.start)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert "(100 used)" in refused.json()["error"]["message"]
    assert not [r for r in fake.requests if r.path == "/v1/chat/completions"]
