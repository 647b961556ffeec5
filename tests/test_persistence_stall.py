"""Idempotency keys and the exact cache while PostgreSQL stalls (every postgres process paused
with SIGSTOP: connections stay open, nothing answers): a keyed or cached chat runs, not
deduplicated, after the lookup timeout, as it does with PostgreSQL down, instead of hanging."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import trio

from proxy.infra.embedded import EmbeddedNats, EmbeddedPostgres
from proxy.infra.postgres import DatabaseUnavailable, open_database
from proxy.services.persistence import _LOOKUP_TIMEOUT
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend, running_gateway
from tests.test_auth_helpers import (
    MESSAGES,
    bearer,
    eventually,
    gateway,
    new_key,
    sql,
    wait_for_key,
)
from tests.test_limits_outage import stalled

pytest_plugins = ["tests.infra_servers"]

SLACK = 1.5


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A server of our own: pausing the session's shared one would stall other tests."""
    with EmbeddedPostgres(tmp_path / "pgdata") as started:
        yield started


@pytest.fixture
async def stack(aio_loop: object, postgres: EmbeddedPostgres, nats_url: str) -> AsyncIterator[tuple[str, OpenAIBackend]]:
    assert postgres.url is not None
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))
    async with fake.serve() as server, gateway(postgres.url, nats_url, backend("vllm", server.url, default=True)) as url:
        yield url, fake


def _chat(text: str) -> dict[str, object]:
    return {"model": "qwen3-8b", "messages": [*MESSAGES, {"role": "user", "content": text}], "stream": True}


async def test_a_keyed_or_cached_chat_runs_unguarded_while_postgres_stalls(
    stack: tuple[str, OpenAIBackend], postgres: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    url, _fake = stack
    caplog.set_level(logging.WARNING, logger="llm_proxy.persistence")
    timings: dict[str, tuple[int, float]] = {}

    async def post(label: str, headers: dict[str, str]) -> None:
        started = trio.current_time()
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            answer = await client.post("/v1/chat/completions", json=_chat(label + str(uuid.uuid4())), headers=headers)
        timings[label] = (answer.status_code, trio.current_time() - started)
        assert "Hello" in answer.text

    with stalled(postgres):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(post, "keyed", {"Idempotency-Key": str(uuid.uuid4())})
            nursery.start_soon(post, "cached", {"x-cache": "exact"})
        # Later ones do not wait for the stuck database again.
        await post("keyed later", {"Idempotency-Key": str(uuid.uuid4())})
    assert {label: status for label, (status, _) in timings.items()} == {"keyed": 200, "cached": 200, "keyed later": 200}
    assert max(took for _, took in timings.values()) < _LOOKUP_TIMEOUT + SLACK
    assert timings["keyed later"][1] < SLACK
    assert any("not deduplicated" in r.getMessage() for r in caplog.records)

    # The database answers again: keys are deduplicated again (the connections the stall held
    # are usable, or replaced).
    key = str(uuid.uuid4())
    body = _chat("after " + key)

    async def replayed() -> bool:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            first = await client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
            again = await client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
        return first.status_code == 200 and again.headers.get("idempotent-replayed") == "true"

    await eventually(replayed, within=60, every=1)


async def test_a_keyed_answer_given_while_postgres_stalls_is_replayed_after_the_gateway_stopped(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str
) -> None:
    """The gateway stops before the stalled database answers again: the answer's row was
    waiting for it in memory, and was lost (the key's retry called the backend again). Its
    row is written as soon as the next gateway starts."""
    assert postgres.url is not None
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))
    key = str(uuid.uuid4())
    body = {**_chat("stalled " + key), "stream": False}
    api_key = await new_key(postgres.url, "stalled", "--tpm", "100000")
    async with fake.serve() as server:
        config = backend("vllm", server.url, default=True)
        with ExitStack() as paused:
            async with gateway(postgres.url, nats_url, config) as url:
                await wait_for_key(url, api_key)
                paused.enter_context(stalled(postgres))
                async with httpx.AsyncClient(base_url=url, timeout=60, headers=bearer(api_key)) as client:
                    first = await client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
                assert first.status_code == 200
            # Stopped while the database is still paused; it answers again only now.
        trace = first.headers["x-trace-id"]

        async def stored() -> bool:
            found = await sql(postgres.url, "SELECT status FROM chat_log WHERE trace_id = %s", trace)
            return found == [("completed",)]

        async with gateway(postgres.url, nats_url, config) as url:
            # At once: the stopped gateway gave back the row its outbox drain held, rather than
            # leave it to NATS's redelivery 30 s later (a retry meanwhile would run again).
            await eventually(stored, within=6, every=0.2)
            async with httpx.AsyncClient(base_url=url, timeout=60, headers=bearer(api_key)) as client:
                again = await client.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 200
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.headers["x-trace-id"] == trace
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert [r.path for r in fake.requests if r.path.endswith("/chat/completions")] == ["/v1/chat/completions"]


async def test_a_gateway_stopped_while_postgres_stalls_stops_within_seconds_and_keeps_what_it_could_not_write(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str, tmp_path: Path
) -> None:
    """`systemctl stop` during a PostgreSQL stall (and a NATS outage) took about 20 s: each
    query in flight waited for psycopg to give up cancelling it (5 s, then 5 s more), the
    usage flush and the batches let go for their own timeouts, the pool for its workers. It
    stops within seconds, and nothing it could not write is lost: the chats' rows and the
    key's usage are spooled in its data directory and written by the next gateway."""
    assert postgres.url is not None
    dead_nats = EmbeddedNats(tmp_path / "nats")
    dead_nats_url = dead_nats.start()
    dead_nats.stop()
    data_dir = tmp_path / "data"
    api_key = await new_key(postgres.url, "stopped-in-a-stall")
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))
    async with fake.serve() as server:
        config = backend("vllm", server.url, default=True)
        with ExitStack() as paused:
            async with gateway(postgres.url, dead_nats_url, config, data_dir=data_dir) as url:
                await wait_for_key(url, api_key)
                paused.enter_context(stalled(postgres))
                async with httpx.AsyncClient(base_url=url, timeout=60, headers=bearer(api_key)) as client:
                    answers = [await client.post("/v1/chat/completions", json={**_chat("stalled"), "stream": False})
                               for _ in range(2)]
                assert [answer.status_code for answer in answers] == [200, 200]

                async def rows_spooled() -> bool:  # the writer has given up on the database
                    return bool(list(data_dir.glob("spool/outbox/*/*.json")))

                await eventually(rows_spooled, within=30, every=0.1)
                stopping = trio.current_time()
            took = trio.current_time() - stopping
            assert took < 5, f"the gateway took {took:.1f} s to stop"
        # PostgreSQL answers again only now. Both spools are in the data directory...
        assert len(list(data_dir.glob("spool/usage/*/*.json"))) == 1
        traces = [answer.headers["x-trace-id"] for answer in answers]

        async def written() -> bool:
            statuses = await sql(postgres.url or "", "SELECT status FROM chat_log WHERE trace_id = ANY(%s)", traces)
            usage = await sql(postgres.url or "", "SELECT requests, prompt_tokens, completion_tokens FROM api_key_usage u"
                                                  " JOIN api_keys k ON k.id = u.key_id WHERE k.name = 'stopped-in-a-stall'")
            return statuses == [("completed",), ("completed",)] and usage == [(2, 10, 2)]

        # ...and the next gateway started on it writes them.
        async with gateway(postgres.url, nats_url, config, data_dir=data_dir):
            await eventually(written, within=30, every=0.2)


async def test_reading_a_trace_back_while_postgres_stalls_is_a_prompt_503(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str
) -> None:
    """With API keys, whose trace it is can only be told from its row: while PostgreSQL
    stalls, `GET /v1/streams/{trace}` and `GET /v1/responses/{id}` hung until it answered
    again (or said 404, for a trace that exists, while it was down). Now a 503 to retry."""
    assert postgres.url is not None
    api_key = await new_key(postgres.url, "reader")
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))
    async with fake.serve() as server, gateway(postgres.url, nats_url, backend("vllm", server.url, default=True)) as url:
        await wait_for_key(url, api_key)
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=bearer(api_key)) as client:
            chat = await client.post("/v1/chat/completions", json={**_chat("read back"), "stream": False})
            response = await client.post("/v1/responses", json={"model": "qwen3-8b", "input": "read back"})
            for trace in (chat.headers["x-trace-id"], response.headers["x-trace-id"]):

                async def stored(trace: str = trace) -> bool:
                    found = await sql(postgres.url or "", "SELECT status FROM chat_log WHERE trace_id = %s", trace)
                    return found == [("completed",)]

                await eventually(stored, within=10)
            with stalled(postgres):
                for path in (f"/v1/streams/{chat.headers['x-trace-id']}", f"/v1/responses/{response.json()['id']}"):
                    started = trio.current_time()
                    with trio.fail_after(_LOOKUP_TIMEOUT + 10):
                        answer = await client.get(path)
                    assert answer.status_code == 503, (path, answer.text)
                    assert answer.json()["error"]["code"] == "journal_unavailable"
                    assert answer.headers["retry-after"] == "2"
                    assert trio.current_time() - started < _LOOKUP_TIMEOUT + SLACK

            # Answering again, the database gives them back.
            async def back() -> bool:
                again = await client.get(f"/v1/responses/{response.json()['id']}")
                return again.status_code == 200 and again.json()["status"] == "completed"

            await eventually(back, within=40, every=0.5)


async def test_a_follower_waiting_in_postgres_for_another_instances_run_is_a_prompt_503_when_it_stalls(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str
) -> None:
    """A keyed request repeated on an instance without NATS waits for the run's stored
    answer in PostgreSQL; when PostgreSQL stalled, it hung until it answered again."""
    assert postgres.url is not None
    # 6 s: still running when the follower asks (1 s in) and through the stall (3.5 s at most).
    fake = OpenAIBackend(default=Script(tokens=[f" w{i}" for i in range(30)], usage=Usage(5, 30), pace=0.2))
    body = {**_chat("followed"), "stream": False}
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    answers: dict[str, httpx.Response] = {}
    followed = trio.Event()
    async with fake.serve() as server, gateway(
        postgres.url, nats_url, backend("vllm", server.url, default=True)
    ) as running, running_gateway(
        backend("vllm", server.url, default=True), database_url=postgres.url
    ) as without_nats, httpx.AsyncClient(timeout=60) as client, trio.open_nursery() as nursery:

        async def ask(name: str, url: str) -> None:
            answers[name] = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            if name == "follower":
                followed.set()

        nursery.start_soon(ask, "owner", running)
        await fake.wait_requests(1, 10)
        with trio.fail_after(_LOOKUP_TIMEOUT + 10):
            nursery.start_soon(ask, "follower", without_nats)
            await trio.sleep(1.0)  # it follows: the key is held by the run on the other instance
            assert "follower" not in answers
            with stalled(postgres):
                started = trio.current_time()
                await followed.wait()
                took = trio.current_time() - started
        follower = answers["follower"]
        assert follower.status_code == 503, follower.text
        assert follower.json()["error"]["code"] == "journal_unavailable"
        assert follower.headers["retry-after"] == "2"
        assert took < _LOOKUP_TIMEOUT + 0.5 + SLACK
    assert answers["owner"].status_code == 200
    assert len(fake.requests) == 1


async def test_listing_a_running_background_responses_input_while_postgres_stalls_is_a_prompt_503(
    stack: tuple[str, OpenAIBackend], postgres: EmbeddedPostgres
) -> None:
    """Its run is here, so the response is found; its input is only in its row: the listing
    waited for the stalled database, then said 404 for a response that exists."""
    url, fake = stack
    assert postgres.url is not None
    fake.push(Script(tokens=[f" w{i}" for i in range(60)], usage=Usage(5, 60), pace=0.2))
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        created = await client.post("/v1/responses", json={"model": "qwen3-8b", "input": "Count", "background": True})
        assert created.status_code == 200, created.text
        response = created.json()["id"]

        async def row_written() -> bool:
            found = await sql(postgres.url or "", "SELECT status FROM chat_log WHERE trace_id = %s",
                              response.removeprefix("resp_"))
            return found == [("running",)]

        await eventually(row_written, within=10)
        with stalled(postgres):
            started = trio.current_time()
            with trio.fail_after(_LOOKUP_TIMEOUT + 10):
                listed = await client.get(f"/v1/responses/{response}/input_items")
            took = trio.current_time() - started
        assert listed.status_code == 503, listed.text
        assert listed.json()["error"]["code"] == "journal_unavailable"
        assert listed.headers["retry-after"] == "2"
        assert took < _LOOKUP_TIMEOUT + SLACK
        # The database answers again: so does the listing.
        async def listed_again() -> bool:
            again = await client.get(f"/v1/responses/{response}/input_items")
            return again.status_code == 200 and again.json()["data"][0]["content"][0]["text"] == "Count"

        await eventually(listed_again, within=40, every=0.5)
        await client.post(f"/v1/responses/{response}/cancel")


async def test_a_follower_on_nats_relays_the_run_while_postgres_stalls(
    aio_loop: object, postgres: EmbeddedPostgres, nats_url: str
) -> None:
    """A duplicate following a run of another instance over NATS looks at the run's row when
    the run is silent for a heartbeat (5 s): while PostgreSQL stalled, that look hung, and the
    run's events, arriving meanwhile, waited with it."""
    assert postgres.url is not None
    fake = OpenAIBackend(default=Script(tokens=[f" w{i}" for i in range(10)], usage=Usage(5, 10), header_delay=7.0))
    body = {**_chat("followed on nats"), "stream": True}
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    relayed = trio.Event()
    async with fake.serve() as server, gateway(
        postgres.url, nats_url, backend("vllm", server.url, default=True)
    ) as first, gateway(
        postgres.url, nats_url, backend("vllm", server.url, default=True)
    ) as second, httpx.AsyncClient(timeout=60) as client, trio.open_nursery() as nursery:

        async def ask(url: str, follower: bool) -> None:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as answer:
                async for line in answer.aiter_lines():
                    if follower and '"content":" w0"' in line:
                        relayed.set()

        nursery.start_soon(ask, first, False)
        await fake.wait_requests(1, 10)
        nursery.start_soon(ask, second, True)
        await trio.sleep(0.5)
        with stalled(postgres):
            # The backend answers 7 s after it was called; the follower's look at the row
            # (at 5 s of silence) gives up within 3 s.
            with trio.move_on_after(7.0 + _LOOKUP_TIMEOUT + SLACK):
                await relayed.wait()
            assert relayed.is_set()


async def test_a_copy_into_a_stalled_database_gives_up_at_the_stops_deadline(
    aio_loop: object, postgres: EmbeddedPostgres
) -> None:
    """A file upload's `COPY` is a database call like any other: once the gateway stops, a
    stalled server is not waited for past the stop's deadline (it held the stop for good)."""
    assert postgres.url is not None
    async with open_database(postgres.url, min_size=1, max_size=2) as db:
        await db.execute("CREATE TABLE copy_probe (b bytea)")
        started = trio.current_time()
        with trio.fail_after(10), pytest.raises(DatabaseUnavailable):
            async with db.transaction() as tx:
                with stalled(postgres):
                    db.answer_by(trio.current_time() + 0.5)
                    await tx.copy_in("COPY copy_probe (b) FROM STDIN", iter([b"\\x00\n"]))
        assert trio.current_time() - started < 0.5 + _LOOKUP_TIMEOUT + SLACK
