"""Budget reservations that outlive their gateway: a process killed with requests in flight
held their reservations (`budget_reserved`) until the period ended (up to 30 days), so the
key was refused "held by requests in flight" all that time. Each reservation is now held in
the name of the gateway process that made it, and the sweep of a dead process (or a clean
stop) gives its reservations back."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

import proxy.gateway
from proxy.infra.chat_store import ChatStore
from proxy.infra.keys_store import KeysStore, UsageDelta
from proxy.infra.migrations import migrate
from proxy.infra.postgres import open_database
from proxy.services.persistence import PersistenceSettings
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import (
    MESSAGES,
    bearer,
    eventually,
    gateway,
    new_key,
    sql,
    wait_for_key,
)
from tests.test_cli import free_port

pytest_plugins = ["tests.infra_servers"]

USAGE = Usage(60, 10)


async def reserved(db: str, name: str) -> int:
    [(held,)] = await sql(db, "SELECT l.budget_reserved FROM api_key_limits l JOIN api_keys k ON k.id = l.key_id"
                              " WHERE k.name = %s", name)
    return int(held)


@contextlib.asynccontextmanager
async def gateway_process(
    server_url: str, db: str, nats: str, *, preamble: str = "", config: Path | None = None
) -> AsyncIterator[tuple[str, trio.Process]]:
    """A gateway in a process of its own (to be killed), its base URL once it is healthy;
    `preamble`: Python run in that process before the gateway starts; `config`: its TOML file."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "DATABASE_URL", "NATS_URL"))}
    env |= {"LLM_BASE_URL": f"{server_url}/v1", "DATABASE_URL": db, "NATS_URL": nats}
    start = ["-c", f"{preamble}\nimport sys\nfrom proxy.cli import main\nsys.exit(main(sys.argv[1:]))"]
    process = await trio.lowlevel.open_process(
        [sys.executable, *(start if preamble else ["-m", "proxy"]), "serve", "--bind", f"127.0.0.1:{port}",
         *(["--config", str(config)] if config is not None else [])], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            with trio.fail_after(30):
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get(f"{url}/health")).status_code == 200:
                            break
                    await trio.sleep(0.1)
        yield url, process
    finally:
        process.kill()
        await process.wait()


async def test_a_budget_held_by_a_killed_gateway_comes_back_when_its_process_is_swept(
    aio_loop: object, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream on a gateway process reserves the whole budget (100 of 100) and the process is
    killed (-9) before it ends. Another gateway refuses the key while the dead process could
    still be alive (429 "held by requests in flight", to retry), then, once the dead one is
    swept (silent for `dead_after`, 3 s here), answers it: before, it refused it for the rest
    of the 30-day period."""
    monkeypatch.setattr(proxy.gateway, "PersistenceSettings",
                        functools.partial(PersistenceSettings, heartbeat=0.5, dead_after=3.0))
    db = pg_database_url
    fake = OpenAIBackend(default=Script(tokens=["tick "] * 200, pace=0.05, usage=USAGE))
    async with fake.serve() as server:
        key = await new_key(db, "orphaned", "--budget", "100")
        async with gateway_process(server.url, db, nats_url) as (doomed, process):
            await wait_for_key(doomed, key)
            async with httpx.AsyncClient(timeout=30, headers=bearer(key)) as client, client.stream(
                "POST", f"{doomed}/v1/chat/completions",
                json={"model": "qwen3-8b", "messages": MESSAGES, "stream": True},
            ) as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()
                for _ in range(3):
                    await lines.__anext__()
                assert await reserved(db, "orphaned") == 100
                process.kill()
                await process.wait()
        async with gateway(db, nats_url, backend("vllm", server.url, default=True)) as url:
            await wait_for_key(url, key)
            async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=10) as client:
                chat = {"model": "qwen3-8b", "messages": MESSAGES, "max_tokens": 10}
                held = await client.post("/v1/chat/completions", json=chat)
                assert held.status_code == 429, held.text
                assert "100 held by requests in flight" in held.json()["error"]["message"]

                async def answered() -> httpx.Response | None:
                    answer = await client.post("/v1/chat/completions", json=chat)
                    return answer if answer.status_code == 200 else None

                # `dead_after` (3 s) and a heartbeat or two, not 30 days.
                await eventually(answered, within=10, every=0.25)


# The process's heartbeat never comes: as when its database came up just after the heartbeat's
# first look (the next one is a heartbeat period later), and the process was killed meanwhile.
_NO_HEARTBEAT = """
import trio
from proxy.services.persistence import Persistence

async def keep_alive(self, *, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    await trio.sleep_forever()

Persistence.keep_alive = keep_alive
"""


async def test_a_budget_held_by_a_gateway_killed_before_its_first_heartbeat_comes_back(
    aio_loop: object, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway process that reserved a budget before it ever beat its heartbeat, then was
    killed (-9): it had no row in `gateway_instances`, so no sweep ever took it for dead and
    its reservation stayed until the period's end (30 days of 429). It is registered before
    it holds anything now (and a sweep gives back what an owner with no row holds), so
    another gateway gives the budget back once its silence is long enough."""
    monkeypatch.setattr(proxy.gateway, "PersistenceSettings",
                        functools.partial(PersistenceSettings, heartbeat=0.5, dead_after=3.0))
    db = pg_database_url
    fake = OpenAIBackend(default=Script(tokens=["tick "] * 200, pace=0.05, usage=USAGE))
    async with fake.serve() as server:
        key = await new_key(db, "unregistered", "--budget", "100")
        async with gateway_process(server.url, db, nats_url, preamble=_NO_HEARTBEAT) as (doomed, process):
            await wait_for_key(doomed, key)
            async with httpx.AsyncClient(timeout=30, headers=bearer(key)) as client, client.stream(
                "POST", f"{doomed}/v1/chat/completions",
                json={"model": "qwen3-8b", "messages": MESSAGES, "stream": True},
            ) as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()
                for _ in range(3):
                    await lines.__anext__()
                assert await reserved(db, "unregistered") == 100
                process.kill()
                await process.wait()
        async with gateway(db, nats_url, backend("vllm", server.url, default=True)) as url:
            await wait_for_key(url, key)
            async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=10) as client:
                chat = {"model": "qwen3-8b", "messages": MESSAGES, "max_tokens": 10}

                async def answered() -> httpx.Response | None:
                    answer = await client.post("/v1/chat/completions", json=chat)
                    return answer if answer.status_code == 200 else None

                await eventually(answered, within=10, every=0.25)


async def test_a_gateway_stopped_with_a_stream_in_flight_leaves_no_budget_held(
    aio_loop: object, pg_database_url: str, nats_url: str, tmp_path: Path
) -> None:
    """SIGTERM while a stream holds part of the budget, longer than the graceful stop (1 s here):
    the stream is cut and its record gives its reservation back; and what the process holds
    with no request to give it back (an admission the database applied whose answer the
    stopping process never read: made here in SQL) is given back as it stops, not 30 s later
    by a sweep, nor never without another gateway to sweep it."""
    db = pg_database_url
    fake = OpenAIBackend(default=Script(tokens=["tick "] * 400, pace=0.05, usage=USAGE))
    async with fake.serve() as server:
        key = await new_key(db, "stopped", "--budget", "1000")
        config = tmp_path / "gateway.toml"
        config.write_text("shutdown_grace_seconds = 1\n")
        async with gateway_process(server.url, db, nats_url, config=config) as (url, process):
            await wait_for_key(url, key)
            async with httpx.AsyncClient(timeout=30, headers=bearer(key)) as client, client.stream(
                "POST", f"{url}/v1/chat/completions",
                json={"model": "qwen3-8b", "messages": MESSAGES, "stream": True, "max_tokens": 100},
            ) as stream:
                lines = stream.aiter_lines()
                for _ in range(3):
                    await lines.__anext__()
                stream_holds = await reserved(db, "stopped")
                assert 100 < stream_holds < 120  # its prompt and max_tokens
                await sql(db, "UPDATE api_key_limits l SET budget_reserved = budget_reserved + 300, budget_holds = ("
                              " SELECT api_key_holds_after(l.budget_holds, h.key, (h.value ->> 0)::float8, 300)"
                              " FROM jsonb_each(l.budget_holds) AS h) WHERE l.budget_holds IS NOT NULL RETURNING 1")
                assert await reserved(db, "stopped") == stream_holds + 300
                process.terminate()
                with contextlib.suppress(httpx.HTTPError):
                    async for _ in lines:
                        pass
                with trio.fail_after(20):
                    assert await process.wait() == 0
        assert await reserved(db, "stopped") == 0
        [(holds,)] = await sql(db, "SELECT budget_holds FROM api_key_limits l JOIN api_keys k ON k.id = l.key_id"
                                   " WHERE k.name = 'stopped'")
        assert holds is None


async def test_a_release_after_its_process_was_swept_frees_nothing_twice(aio_loop: object, pg_database_url: str) -> None:
    """Two gateway processes each hold 100 of a 300-token budget; one is swept as dead (its
    100 come back), and its usage batch is written after all (its spool replayed by another
    process, or it was alive after all): it gives back nothing more, so the other process's
    100 stay held. Before, the sweep gave nothing back; and a release given back twice would
    have freed the live process's reservation, letting the key overspend its budget."""
    async with open_database(pg_database_url) as db:
        await migrate(db)
        keys, chats = KeysStore(db), ChatStore(db)
        key = await keys.create(name="k", prefix="sk-llmp-test", digest=b"d" * 32, models=None, workspaces=None,
                                rpm=None, tpm=None, admin=False, expires_at=None, budget=300)
        for owner in ("alive", "dead"):
            await chats.heartbeat(owner, first=True)
        admitted = {
            owner: await keys.admit(key.id, None, None, budget=300, budget_reserve=100, owner=owner)
            for owner in ("alive", "dead")
        }
        assert [a.budget_held for a in admitted.values()] == [100, 200]
        await db.execute("UPDATE gateway_instances SET seen_at = now() - interval '40 seconds' WHERE id = 'dead'")
        await chats.sweep_dead_instances(30, judge="alive")

        async def held() -> tuple[int, dict[str, Any] | None]:
            row = await db.fetchrow("SELECT budget_reserved, budget_holds FROM api_key_limits WHERE key_id = %s", (key.id,))
            assert row is not None
            return int(row[0]), row[1]

        assert (await held())[0] == 100
        late = UsageDelta(requests=1, prompt_tokens=60, completion_tokens=10)
        late.use(70, time.time())
        late.release(100, admitted["dead"].budget_start)
        await keys.record_usage({key.id: late}, "dead", 1)
        used, holds = await held()
        assert used == 100 and holds is not None and set(holds) == {"alive"}
        # The live process gives back what it holds, once.
        done = UsageDelta()
        done.release(100, admitted["alive"].budget_start)
        await keys.record_usage({key.id: done}, "alive", 1)
        await keys.record_usage({key.id: done}, "alive", 2)
        assert await held() == (0, None)
        [(counted,)] = await db.fetch("SELECT budget_used FROM api_key_limits WHERE key_id = %s", (key.id,))
        assert counted == 70


async def test_a_sweep_gives_back_what_an_owner_with_no_instance_row_holds(aio_loop: object, pg_database_url: str) -> None:
    """Holds in the name of a process that never wrote its `gateway_instances` row (one killed
    before its first heartbeat, by a gateway older than registration before the first hold)
    were found by no sweep: held until the period's end. A sweep gives them back now, and
    leaves alone what a registered live process holds."""
    async with open_database(pg_database_url) as db:
        await migrate(db)
        keys, chats = KeysStore(db), ChatStore(db)
        key = await keys.create(name="k", prefix="sk-llmp-ghost", digest=b"g" * 32, models=None, workspaces=None,
                                rpm=None, tpm=None, admin=False, expires_at=None, budget=300)
        await chats.heartbeat("alive", first=True)
        for owner in ("alive", "never-beat"):
            await keys.admit(key.id, None, None, budget=300, budget_reserve=100, owner=owner)
        await chats.sweep_dead_instances(30, judge="alive")
        row = await db.fetchrow("SELECT budget_reserved, budget_holds FROM api_key_limits WHERE key_id = %s", (key.id,))
        assert row is not None and row[0] == 100 and set(row[1]) == {"alive"}


async def test_an_embeddings_request_whose_client_leaves_while_it_is_admitted_holds_no_budget(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A client that leaves an embeddings request (a route its disconnect cancels) while the
    admission waits for PostgreSQL (a slow or locked database: when clients time out): the
    admission lands a moment later, holding the request's tokens in the key's budget, and
    nothing gave them back: held by this live gateway until the period ended (30 days by
    default), they kept the key's next requests out ("held by requests in flight") as soon as
    they no longer fitted beside them. They are given back as the admission lands."""
    db = pg_database_url
    fake = OpenAIBackend()
    async with fake.serve() as server, gateway(db, nats_url, backend("vllm", server.url, default=True)) as url:
        key = await new_key(db, "left-while-admitted", "--budget", "1000")
        await wait_for_key(url, key)
        body = {"model": "e5", "input": "word " * 480}  # 600 tokens
        locker = await trio.to_thread.run_sync(lambda: psycopg.connect(db))
        try:
            # Every admission now waits (a real lock, as a long transaction or a stalled server makes).
            await trio.to_thread.run_sync(lambda: locker.execute("LOCK TABLE api_key_limits IN EXCLUSIVE MODE"))
            async with httpx.AsyncClient(base_url=url, headers=bearer(key), timeout=20) as client:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: client.post("/v1/embeddings", json=body))

                    async def admission_waits() -> bool:
                        waiting = await sql(db, "SELECT count(*) FROM pg_stat_activity"
                                                " WHERE %s = ANY(pg_blocking_pids(pid))", locker.info.backend_pid)
                        return waiting[0][0] > 0

                    await eventually(admission_waits)
                    nursery.cancel_scope.cancel()  # the client gives up
            await trio.to_thread.run_sync(locker.commit)  # the admission lands now
        finally:
            await trio.to_thread.run_sync(locker.close)
        assert not [r for r in fake.requests if r.path.endswith("/embeddings")]  # it never reached the backend

        async def landed() -> bool:
            [(at,)] = await sql(db, "SELECT l.requests_at FROM api_key_limits l JOIN api_keys k ON k.id = l.key_id"
                                    " WHERE k.name = %s", "left-while-admitted")
            return float(at) > 0

        await eventually(landed)

        async def given_back() -> bool:
            return await reserved(db, "left-while-admitted") == 0

        await eventually(given_back)
