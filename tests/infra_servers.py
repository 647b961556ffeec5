"""Real PostgreSQL and NATS servers for the test session, plus a trio-asyncio loop fixture.

Register it once in tests/conftest.py, either way:

    pytest_plugins = ["tests.infra_servers"]
    from tests.infra_servers import aio_loop, nats_url, pg_database_url, pg_url  # noqa: F401

(In a test module, prefer the `pytest_plugins` line: importing the fixtures there makes ruff
report F811 on every test that takes them as parameters.)

* `pg_url`, `nats_url` (sync, session scope): one embedded server each per test session, in
  a pytest temp dir (as root, one other pytest sessions leave alone: tests/session_tmp.py),
  stopped at the end of the session (no orphan processes). The PostgreSQL
  runs without fsync: a commit is as durable as a killed postgres needs, not an OS crash.
* `pg_database_url` (sync, function scope): a fresh, empty database on that server, dropped
  afterwards; use it for tests that change the schema (migrations) so they cannot leak.
* `aio_loop` (async, function scope): a `trio_asyncio.open_loop()` around the test, needed by
  everything in `proxy.infra.postgres` / `proxy.infra.nats`. Async fixtures that use the
  database or the bus must depend on it too, so that they run inside the loop.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
import trio_asyncio
from psycopg.conninfo import make_conninfo

from proxy.infra.embedded import EmbeddedNats, EmbeddedPostgres


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "pgdata") as server:
        assert server.url is not None
        with psycopg.connect(server.url, autocommit=True) as conn:
            # Nothing here outlives the session or survives an OS crash, so a commit need
            # not wait for the disk: ~5 ms less per transaction, and the suite makes many.
            # (Every commit still reaches the OS, so a killed postgres loses none of them.)
            conn.execute("ALTER SYSTEM SET fsync = off")
            conn.execute("ALTER SYSTEM SET full_page_writes = off")
            conn.execute("SELECT pg_reload_conf()")
        yield server.url


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with EmbeddedNats(tmp_path_factory.mktemp("nats")) as server:
        assert server.url is not None
        yield server.url


@pytest.fixture
def pg_database_url(pg_url: str) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(pg_url, dbname=name)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def aio_loop() -> AsyncIterator[trio_asyncio.TrioEventLoop]:
    async with trio_asyncio.open_loop() as loop:
        yield loop
