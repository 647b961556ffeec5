"""PostgreSQL for trio code: psycopg 3's AsyncConnectionPool behind trio-asyncio.

Callers are trio tasks inside a `trio_asyncio.open_loop()` block (the app opens one around
the server; tests do the same):

    async with trio_asyncio.open_loop():
        async with open_database(url) as db:
            await db.execute("INSERT INTO t (a) VALUES (%s)", (1,))
            rows = await db.fetch("SELECT a, b FROM t WHERE a > %(min)s", {"min": 0})
            async with db.transaction() as tx:
                n = await tx.fetchval("SELECT count(*) FROM t")

Rows are plain tuples in column order (`fetch` -> list of tuples, `fetchrow` -> tuple or
None, `fetchval` -> first column of the first row or None). Placeholders are psycopg's
`%s` / `%(name)s`. Each call is a single trio->asyncio hop. Connections run in autocommit
mode; `transaction()` pins one connection between BEGIN and COMMIT/ROLLBACK.

Cancelling a trio scope around a query cancels it on the server too: psycopg turns the
asyncio cancellation into a PostgreSQL cancel request and waits for it, so the call returns
only once the server has stopped and the connection is back in the pool, idle; a server that
has not confirmed within `aio.CANCEL_GRACE` (stalled) has the connection closed instead.

pgvector's adapter is registered on every connection: pass numpy float32 arrays as `vector`
parameters; `vector` values come back as 1-D `numpy.float32` arrays. `open_database` creates the `vector`
extension if it is missing, because the adapter can only be registered once the type exists.

Errors: every psycopg/pool failure surfaces as `DatabaseError` (with `.sqlstate`);
`DatabaseUnavailable` when the server cannot be reached or the connection broke (retryable),
`ConstraintViolation` for SQLSTATE class 23 (unique, foreign key, check, not null); `InvalidValue`
for a value psycopg refuses to send (a NUL in text: SQLSTATE 22000, like the server's data
exceptions) or the server cannot take as text (22021, 22P05).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import psycopg
import psycopg.errors
import psycopg.waiting
import trio
import trio_asyncio
from pgvector.psycopg import register_vector_async
from psycopg.abc import Buffer
from psycopg.adapt import Loader
from psycopg.pq import Format
from psycopg.types import TypeInfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from trio_asyncio import aio_as_trio

from proxy.domain.errors import ErrorKind, GatewayError
from proxy.infra.aio import aio_call

log = logging.getLogger(__name__)

# psycopg.waiting binds `asyncio.get_running_loop` at import time. Imported before trio_asyncio
# (which patches asyncio to find its loop from trio tasks), it keeps the unpatched function and
# every query fails with "no running event loop". Rebind it whatever the import order was.
assert trio_asyncio  # imported for the patch above
psycopg.waiting.get_running_loop = asyncio.get_running_loop  # type: ignore[attr-defined]

Row = tuple[Any, ...]
Params = Sequence[Any] | Mapping[str, Any] | None
_Conn = psycopg.AsyncConnection[Row]
_Mode = Literal["execute", "all", "one", "value"]
_T = TypeVar("_T")

# Key for pg_advisory_(xact_)lock: serialises schema changes across processes
# (extension creation here, migrations in proxy.infra.migrations).
SCHEMA_LOCK_KEY = 0x11_0F_C0DE

# Bounds cleanup that runs shielded from cancellation (rollback, pool close).
_CLEANUP_TIMEOUT = 5.0
_PING_TIMEOUT = 2.0
_POOL_CLOSE_TIMEOUT = 0.5


class DatabaseError(Exception):
    """A database operation failed. `sqlstate` is PostgreSQL's error code when it sent one."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class DatabaseUnavailable(DatabaseError):
    """The server could not be reached, refused us, or the connection broke. Retryable."""


class ConstraintViolation(DatabaseError):
    """An integrity constraint rejected the statement (SQLSTATE class 23)."""


class InvalidValue(DatabaseError):
    """A value of the statement cannot be text at all (a NUL, which psycopg refuses to send;
    bytes not in the database's encoding): the value's fault, never an outage."""

    def refusal(self) -> GatewayError:
        """What the client that sent the value is told: a 400 no retry helps. Ids and fields
        are checked before they reach a store; this is what one left unchecked gets."""
        return GatewayError(
            ErrorKind.INVALID_REQUEST,
            "A value in this request cannot be stored or looked up: it holds a character PostgreSQL cannot "
            "take as text (NUL).", code="invalid_value",
        )


@contextmanager
def answered_within(seconds: float, what: str = "The database (PostgreSQL)") -> Iterator[trio.CancelScope]:
    """The statements inside, given up on (cancelled: a transaction left unfinished commits
    nothing; psycopg closes a connection whose server does not confirm) when `what` has not
    answered them within `seconds` (stalled, locked): then a 503 `database_unavailable` with
    `Retry-After`, a client's answer rather than a request that never ends. The scope it
    yields may have its deadline moved (a long write that makes progress)."""
    with trio.move_on_after(seconds) as waited:
        yield waited
    if waited.cancelled_caught:
        shown = f"{seconds:.2g}" if seconds < 10 else f"{seconds:.0f}"  # a deadline sized to a file: 130, not 130.0003
        log.warning("%s: no answer within %s s", what, shown)
        raise GatewayError(ErrorKind.UNAVAILABLE, f"{what} did not answer within {shown} s; try again shortly.",
                           code="database_unavailable", retry_after=2)


# Data exceptions (class 22) a value the caller passed causes whatever the statement.
_INVALID_VALUE_STATES = {"22021", "22P05"}


# SQLSTATEs that mean "the server is not there for us right now", not "your SQL is wrong".
_UNAVAILABLE_STATES = {"57P01", "57P02", "57P03", "53300", "53000"}


def _translate(exc: Exception) -> DatabaseError:
    sqlstate = getattr(exc, "sqlstate", None)
    message = str(exc).strip() or type(exc).__name__
    if isinstance(exc, PoolTimeout | OSError):
        return DatabaseUnavailable(message)
    if isinstance(exc, psycopg.Error):
        if sqlstate is None and isinstance(exc, psycopg.OperationalError):
            return DatabaseUnavailable(message)  # client-side: connect failed or link broken
        if sqlstate is not None and (sqlstate.startswith("08") or sqlstate in _UNAVAILABLE_STATES):
            return DatabaseUnavailable(message, sqlstate=sqlstate)
        if sqlstate is not None and sqlstate.startswith("23"):
            return ConstraintViolation(message, sqlstate=sqlstate)
        if sqlstate is None and isinstance(exc, psycopg.DataError):
            # Refused before it was sent (a NUL in text): a data exception as the server's own
            # would be, class 22, so callers treat it as the value's fault, not an outage.
            return InvalidValue(message, sqlstate="22000")
        if sqlstate in _INVALID_VALUE_STATES:
            return InvalidValue(message, sqlstate=sqlstate)
    return DatabaseError(message, sqlstate=sqlstate)


# PostgreSQL's text and jsonb cannot hold U+0000: one such character from a client or a
# backend would make its whole row unwritable. Text bound for them is passed through these,
# which store U+FFFD instead. In JSON, an escape is one preceded by an even number of
# backslashes (`\\u0000` is text, and stays).
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def json_text(value: Any) -> str:
    """`value` as JSON text PostgreSQL's jsonb accepts."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return _NUL_ESCAPE.sub(r"\1\\ufffd", text) if "\\u0000" in text else text


def plain_text(value: str) -> str:
    """`value` as text PostgreSQL accepts."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


async def _hop(fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
    """Run one asyncio coroutine function from trio, translating psycopg errors."""
    try:
        result: _T = await aio_call(fn, *args)
    except (psycopg.Error, PoolTimeout, OSError) as exc:
        raise _translate(exc) from exc
    return result


async def _run_on(conn: _Conn, sql: str, params: Params, mode: _Mode) -> Any:
    cur = await conn.execute(sql, params)
    if mode == "execute":
        return cur.rowcount
    if mode == "all":
        return await cur.fetchall() if cur.description is not None else []
    row = await cur.fetchone() if cur.description is not None else None
    if mode == "one":
        return row
    return None if row is None else row[0]


async def _copy_on(conn: _Conn, sql: str, pieces: Iterable[Buffer]) -> None:
    async with conn.cursor() as cur, cur.copy(sql) as copy:
        for piece in pieces:
            await copy.write(piece)


class _Queries:
    """The query methods shared by `Database` (any pooled connection) and `Tx` (one)."""

    async def _run(self, sql: str, params: Params, mode: _Mode) -> Any:
        raise NotImplementedError

    async def execute(self, sql: str, params: Params = None) -> int:
        """Run a statement; returns the affected row count (-1 when not applicable).

        Without params, `sql` may hold several `;`-separated statements.
        """
        count: int = await self._run(sql, params, "execute")
        return count

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        rows: list[Row] = await self._run(sql, params, "all")
        return rows

    async def fetchrow(self, sql: str, params: Params = None) -> Row | None:
        row: Row | None = await self._run(sql, params, "one")
        return row

    async def fetchval(self, sql: str, params: Params = None) -> Any:
        return await self._run(sql, params, "value")


class Tx(_Queries):
    """One connection inside BEGIN ... COMMIT; only valid inside `Database.transaction()`."""

    def __init__(self, conn: _Conn, db: Database) -> None:
        self._conn: _Conn | None = conn
        self._db = db

    async def _run(self, sql: str, params: Params, mode: _Mode) -> Any:
        if self._conn is None:
            raise DatabaseError("transaction already finished")
        return await self._db._call(_run_on, self._conn, sql, params, mode)

    async def copy_in(self, sql: str, pieces: Iterable[Buffer]) -> None:
        """`COPY ... FROM STDIN` fed `pieces` (the COPY's data as they are) one at a time, as
        they are drawn: a value of hundreds of megabytes is never whole in memory here."""
        if self._conn is None:
            raise DatabaseError("transaction already finished")
        await self._db._call(_copy_on, self._conn, sql, pieces)


class Database(_Queries):
    """A pool of connections to one database. Create with `open_database`."""

    def __init__(self, pool: AsyncConnectionPool[_Conn]) -> None:
        self._pool = pool
        self._answer_by = math.inf

    def answer_by(self, deadline: float) -> None:
        """Every call, from now on, fails with DatabaseUnavailable at `deadline` (trio's clock)
        if the server has not answered by then: the gateway stops, and a stalled database is
        not waited for (what it cannot take goes where it goes when the database is down)."""
        self._answer_by = min(self._answer_by, deadline)

    async def _call(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        if self._answer_by == math.inf:
            return await _hop(fn, *args)
        with trio.move_on_at(self._answer_by):
            return await _hop(fn, *args)
        raise DatabaseUnavailable("the gateway is stopping, and the database did not answer in time")

    async def _run(self, sql: str, params: Params, mode: _Mode) -> Any:
        return await self._call(self._aio_run, sql, params, mode)

    async def _aio_run(self, sql: str, params: Params, mode: _Mode) -> Any:
        async with self._pool.connection() as conn:
            return await _run_on(conn, sql, params, mode)

    async def execute_batch(self, steps: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        """Run each statement once per parameter set, all in one transaction and one
        trio->asyncio hop (psycopg pipelines `executemany`): group commit for many rows."""
        await self._call(self._aio_execute_batch, steps)

    async def _aio_execute_batch(self, steps: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            for sql, params in steps:
                if params:
                    await cur.executemany(sql, params)

    async def fetch_with_settings(self, settings: Mapping[str, str], sql: str, params: Params = None) -> list[Row]:
        """`sql`'s rows, run with `settings` (name -> value) in force for it alone: one
        transaction with the settings made local to it, in one trio->asyncio hop, pipelined
        (a round trip for BEGIN, the settings and the query, one for COMMIT)."""
        rows: list[Row] = await self._call(self._aio_fetch_with_settings, settings, sql, params)
        return rows

    async def _aio_fetch_with_settings(self, settings: Mapping[str, str], sql: str, params: Params) -> list[Row]:
        names = list(settings)
        set_local = "SELECT " + ", ".join("set_config(%s, %s, true)" for _ in names)
        async with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
            await conn.execute(set_local, [item for name in names for item in (name, settings[name])])
            cur = await conn.execute(sql, params)
            return await cur.fetchall()

    async def ping(self) -> None:
        """Round-trip `SELECT 1`; raise DatabaseUnavailable if that fails or takes > 2 s."""
        with trio.move_on_after(_PING_TIMEOUT) as scope:
            await self.fetchval("SELECT 1")
        if scope.cancelled_caught:
            raise DatabaseUnavailable(f"database did not answer within {_PING_TIMEOUT} s")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """BEGIN on a dedicated connection; COMMIT on success, ROLLBACK on any exception
        (cancellation included)."""
        conn = await self._call(self._aio_begin)
        tx = Tx(conn, self)
        try:
            yield tx
        except BaseException:
            tx._conn = None
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + _CLEANUP_TIMEOUT
                try:
                    await self._call(self._aio_finish, conn, False)
                except DatabaseError as exc:  # the original exception matters more
                    log.warning("rollback failed: %s", exc)
            if scope.cancelled_caught:
                log.warning("rollback timed out; the pool will discard the connection")
            raise
        tx._conn = None
        await self._call(self._aio_finish, conn, True)

    async def _aio_begin(self) -> _Conn:
        conn = await self._pool.getconn()
        try:
            await conn.execute("BEGIN")
        except BaseException:
            await self._pool.putconn(conn)
            raise
        return conn

    async def _aio_finish(self, conn: _Conn, commit: bool) -> None:
        try:
            await conn.execute("COMMIT" if commit else "ROLLBACK")
        finally:
            # A connection left mid-transaction or broken is rolled back or discarded here.
            await self._pool.putconn(conn)


class _VectorTextLoader(Loader):
    def load(self, data: Buffer) -> npt.NDArray[np.float32]:
        text = bytes(data).decode()
        return np.array(text.strip("[]").split(","), dtype=np.float32)


class _VectorBinaryLoader(Loader):
    format = Format.BINARY

    def load(self, data: Buffer) -> npt.NDArray[np.float32]:
        dim = int.from_bytes(bytes(data[:2]), "big")
        # wire format: uint16 dim, uint16 unused, dim big-endian float4
        return np.frombuffer(data, dtype=">f4", count=dim, offset=4).astype(np.float32)


async def _configure(conn: _Conn) -> None:
    """Per new connection: pgvector dumpers (numpy/Vector -> vector), numpy loaders."""
    try:
        await register_vector_async(conn)
    except psycopg.ProgrammingError:
        log.warning("pgvector type missing in this database; vector adapter not registered")
        return
    # pgvector's own loaders return pgvector.Vector; services work with numpy.
    oid = conn.adapters.types["vector"].oid
    conn.adapters.register_loader(oid, _VectorTextLoader)
    conn.adapters.register_loader(oid, _VectorBinaryLoader)


async def _probe(url: str, connect_timeout: float) -> None:
    """Connect once for a quick, specific failure, and make sure `vector` exists."""
    conn = await psycopg.AsyncConnection.connect(
        url, autocommit=True, connect_timeout=max(1, round(connect_timeout))
    )
    try:
        if await TypeInfo.fetch(conn, "vector") is None:
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
                    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.errors.UniqueViolation:
                pass  # created concurrently by another process: what we wanted
            except psycopg.errors.InsufficientPrivilege as exc:
                log.warning("cannot create extension vector (%s); vectors unavailable", exc)
    finally:
        await conn.close()


async def _open_pool(
    url: str, min_size: int, max_size: int, connect_timeout: float, acquire_timeout: float
) -> AsyncConnectionPool[_Conn]:
    await _probe(url, connect_timeout)
    pool: AsyncConnectionPool[_Conn] = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        configure=_configure,
        kwargs={"autocommit": True},
        timeout=acquire_timeout,
        name="llm-proxy",
    )
    try:
        await pool.open(wait=True, timeout=connect_timeout)
    except BaseException:
        await pool.close(timeout=1.0)
        raise
    return pool


@asynccontextmanager
async def open_database(
    url: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    connect_timeout: float = 10.0,
    acquire_timeout: float = 10.0,
) -> AsyncIterator[Database]:
    """Open a connection pool; raise DatabaseUnavailable at once if `url` does not connect.

    `acquire_timeout` bounds the wait for a free pooled connection. The pool is closed on
    exit, also on cancellation (shielded, bounded).
    """
    pool = await _hop(_open_pool, url, min_size, max_size, connect_timeout, acquire_timeout)
    try:
        yield Database(pool)
    finally:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _CLEANUP_TIMEOUT + 1
            # A pool worker still setting up a connection (to a stalled server) is cancelled
            # when the asyncio loop closes, not waited for here; idle ones stop at once.
            await aio_as_trio(pool.close)(timeout=_POOL_CLOSE_TIMEOUT)
