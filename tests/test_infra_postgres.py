"""proxy.infra.postgres and proxy.infra.migrations against a real embedded PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
import trio
import trio_asyncio

from proxy.infra import keys_store
from proxy.infra.keys_store import NOTIFY_CHANNEL, key_changes
from proxy.infra.migrations import MigrationError, load_migrations, migrate
from proxy.infra.postgres import (
    ConstraintViolation,
    Database,
    DatabaseError,
    DatabaseUnavailable,
    InvalidValue,
    open_database,
)

pytest_plugins = ["tests.infra_servers"]


@pytest.fixture
async def db(aio_loop: trio_asyncio.TrioEventLoop, pg_url: str) -> AsyncIterator[Database]:
    async with open_database(pg_url, max_size=4) as database:
        yield database


@pytest.fixture
async def table(db: Database) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    await db.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, body text NOT NULL)")
    yield name
    await db.execute(f"DROP TABLE {name}")


async def test_query_methods_return_tuples(db: Database, table: str) -> None:
    inserted = await db.execute(
        f"INSERT INTO {table} (id, body) VALUES (%s, %s), (%s, %s)", (1, "one", 2, "two")
    )
    assert inserted == 2
    assert await db.fetch(f"SELECT id, body FROM {table} ORDER BY id") == [(1, "one"), (2, "two")]
    assert await db.fetchrow(f"SELECT body, id FROM {table} WHERE id = %(id)s", {"id": 2}) == (
        "two",
        2,
    )
    assert await db.fetchrow(f"SELECT * FROM {table} WHERE id = 99") is None
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 2
    assert await db.fetchval(f"SELECT body FROM {table} WHERE id = 99") is None


async def test_vectors_go_in_and_come_out_as_numpy(db: Database) -> None:
    name = f"v_{uuid.uuid4().hex[:10]}"
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((5, 384)).astype(np.float32)
    async with db.transaction() as tx:  # temp tables live on one connection
        await tx.execute(f"CREATE TEMP TABLE {name} (id int, emb vector(384))")
        for i, v in enumerate(vectors):
            await tx.execute(f"INSERT INTO {name} VALUES (%s, %s)", (i, v))
        query = vectors[3] + np.float32(0.01)
        nearest = await tx.fetchrow(
            f"SELECT id, emb FROM {name} ORDER BY emb <=> %s LIMIT 1", (query,)
        )
    assert nearest is not None
    assert nearest[0] == 3
    assert isinstance(nearest[1], np.ndarray)
    assert nearest[1].dtype == np.float32
    np.testing.assert_array_equal(nearest[1], vectors[3])


async def test_transaction_commits_or_rolls_back(db: Database, table: str) -> None:
    async with db.transaction() as tx:
        await tx.execute(f"INSERT INTO {table} VALUES (1, 'kept')")
    with pytest.raises(RuntimeError):
        async with db.transaction() as tx:
            await tx.execute(f"INSERT INTO {table} VALUES (2, 'dropped')")
            raise RuntimeError("boom")
    with trio.move_on_after(0.2):
        async with db.transaction() as tx:
            await tx.execute(f"INSERT INTO {table} VALUES (3, 'cancelled')")
            await trio.sleep_forever()
    assert await db.fetch(f"SELECT id FROM {table}") == [(1,)]


async def test_settings_hold_for_their_query_alone(db: Database) -> None:
    default = await db.fetchval("SHOW work_mem")
    rows = await db.fetch_with_settings(
        {"work_mem": "7MB", "hnsw.ef_search": "123"},
        "SELECT current_setting('work_mem'), current_setting('hnsw.ef_search'), %s::int",
        (5,),
    )
    assert rows == [("7MB", "123", 5)]
    assert default != "7MB"
    # The pool may hand the same connection out next: nothing of the settings stays on it.
    for _ in range(3):
        assert await db.fetchval("SHOW work_mem") == default
    with pytest.raises(DatabaseError):
        await db.fetch_with_settings({"work_mem": "7MB"}, "SELECT no_such_column")
    assert await db.fetchval("SELECT 1") == 1


async def test_cancelled_query_is_cancelled_on_the_server(db: Database, pg_url: str) -> None:
    marker = f"cancel_me_{uuid.uuid4().hex[:8]}"
    start = trio.current_time()
    with trio.move_on_after(0.3) as scope:
        await db.execute(f"SELECT pg_sleep(30) /* {marker} */")
    assert scope.cancelled_caught
    assert trio.current_time() - start < 2.0
    # Checked from outside the pool: nothing is still running the query.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        running = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
            (f"%{marker}%",),
        ).fetchone()
    assert running == (0,)
    assert await db.fetchval("SELECT 42") == 42  # the pool is healthy afterwards


async def test_errors_are_ours(db: Database, table: str) -> None:
    with pytest.raises(DatabaseError) as syntax:
        await db.execute("SELEC 1")
    assert syntax.value.sqlstate == "42601"
    assert not isinstance(syntax.value, DatabaseUnavailable)
    await db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    with pytest.raises(ConstraintViolation) as dup:
        await db.execute(f"INSERT INTO {table} VALUES (1, 'b')")
    assert dup.value.sqlstate == "23505"
    # psycopg refuses a NUL before sending it: a data exception (the value's fault), not an outage.
    with pytest.raises(InvalidValue) as nul:
        await db.fetchval("SELECT %s::text", ("a\x00b",))
    assert nul.value.sqlstate == "22000" and not isinstance(nul.value, DatabaseUnavailable)
    # The server's own refusal of a NUL (in jsonb) is the value's fault too.
    with pytest.raises(InvalidValue) as escaped:
        await db.fetchval("SELECT %s::jsonb ->> 0", ('["a\\u0000b"]',))
    assert escaped.value.sqlstate == "22P05"


async def test_wrong_url_is_database_unavailable(aio_loop: trio_asyncio.TrioEventLoop) -> None:
    with trio.fail_after(5), pytest.raises(DatabaseUnavailable):
        async with open_database("postgresql://postgres@/postgres?host=/nonexistent-dir"):
            pass


async def test_ping(db: Database) -> None:
    await db.ping()


# --------------------------------------------------------------------------------------------
# migrations


async def test_migrate_applies_once(
    aio_loop: trio_asyncio.TrioEventLoop, pg_database_url: str
) -> None:
    shipped = [m.name for m in load_migrations()]
    async with open_database(pg_database_url) as fresh:
        assert await migrate(fresh) == shipped
        assert shipped[0] == "0001_init"
        assert await migrate(fresh) == []
        rows = await fresh.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [name for _, name in rows] == shipped
        assert await fresh.fetchval("SELECT extname FROM pg_extension WHERE extname = 'vector'")


def _write_migrations(directory: Path, extra: dict[str, str]) -> Path:
    directory.mkdir()
    (directory / "0001_init.sql").write_text(load_migrations()[0].sql)
    for name, sql in extra.items():
        (directory / name).write_text(sql)
    return directory


async def test_concurrent_migrations_apply_each_exactly_once(
    aio_loop: trio_asyncio.TrioEventLoop, pg_database_url: str, tmp_path: Path
) -> None:
    directory = _write_migrations(
        tmp_path / "sql",
        {
            "0002_items.sql": "CREATE TABLE items (id int PRIMARY KEY); SELECT pg_sleep(0.2);",
            "0003_seed.sql": "INSERT INTO items VALUES (1);",
        },
    )
    results: list[list[str]] = []

    async def run_one() -> None:
        # separate pools: separate sessions, like separate processes
        async with open_database(pg_database_url, max_size=1) as own:
            results.append(await migrate(own, directory=directory))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(run_one)

    applied = sorted(name for names in results for name in names)
    assert applied == ["0001_init", "0002_items", "0003_seed"]
    async with open_database(pg_database_url) as check:
        assert await check.fetchval("SELECT count(*) FROM items") == 1


async def test_failed_migration_leaves_nothing_behind(
    aio_loop: trio_asyncio.TrioEventLoop, pg_database_url: str, tmp_path: Path
) -> None:
    directory = _write_migrations(
        tmp_path / "sql",
        {"0002_broken.sql": "CREATE TABLE half (id int); SELECT * FROM no_such_table;"},
    )
    async with open_database(pg_database_url) as fresh:
        with pytest.raises(MigrationError, match="0002_broken"):
            await migrate(fresh, directory=directory)
        assert await fresh.fetch("SELECT name FROM schema_migrations") == [("0001_init",)]
        assert await fresh.fetchval("SELECT to_regclass('half')") is None


def test_misnamed_migration_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "2_oops.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"2_oops\.sql"):
        load_migrations(tmp_path)


async def test_key_changes_wake_on_a_notification_and_notice_a_dropped_link(
    aio_loop: trio_asyncio.TrioEventLoop, pg_database_url: str
) -> None:
    def run(sql: str) -> None:
        with psycopg.connect(pg_database_url, autocommit=True) as conn:
            conn.execute(sql)

    async with key_changes(pg_database_url) as changes:
        assert await changes.wait(0.2) is False  # quiet, and the link answers

        async def notify_soon() -> None:
            await trio.sleep(0.2)
            await trio.to_thread.run_sync(run, f"NOTIFY {NOTIFY_CHANNEL}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(notify_soon)
            with trio.fail_after(5):  # the wait allows 30 s: only the notification ends it sooner
                assert await changes.wait(30.0) is True

        # The server drops the listening connection: the wait says so at once.
        await trio.to_thread.run_sync(
            run,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        with trio.fail_after(5), pytest.raises(DatabaseUnavailable):
            await changes.wait(30.0)
        with trio.fail_after(5), pytest.raises(DatabaseUnavailable):  # and again, not a driver error
            await changes.wait(30.0)


async def test_a_notification_the_liveness_query_read_still_wakes_the_wait(
    aio_loop: trio_asyncio.TrioEventLoop, pg_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a busy loop the short read after the socket turned readable can give up before it
    # has read the notification; the liveness query then reads it. It used to be kept
    # unseen until the next message (30 s later): a key change took effect that late.
    monkeypatch.setattr(keys_store, "_READ_TIMEOUT", 0.0)  # the read gives up at once

    def notify() -> None:
        with psycopg.connect(pg_database_url, autocommit=True) as conn:
            conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")

    async with key_changes(pg_database_url) as changes:
        for _ in range(5):
            await trio.to_thread.run_sync(notify)
            with trio.fail_after(5):
                assert await changes.wait(30.0) is True
