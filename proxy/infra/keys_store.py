"""API keys, their rate-limit state, budgets and usage in PostgreSQL (migrations 0004, 0014).

The store never sees a key in the clear: callers pass its sha256 digest. Everything a
gateway needs per request is held in memory by `proxy.services.auth.KeyRing`; the store is
read when keys change (`fingerprint` + `all_keys`, woken by `KeyChanges`), and written by
the rate limiter (`admit`, one round trip) and the usage recorder (`record_usage`, batched).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
import trio
from trio_asyncio import aio_as_trio

from proxy.infra.postgres import Database, DatabaseUnavailable, Row, Tx

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "llm_proxy_api_keys"
_CLOSE_TIMEOUT = 5.0
# How long to read once the socket is readable (or the wait timed out): what arrived is
# there at once; longer would only delay the health check.
_READ_TIMEOUT = 0.1

_COLUMNS = (
    "id, name, prefix, digest, models, workspaces, rpm, tpm, admin, created_at, expires_at, revoked_at,"
    " budget, budget_period"
)
# What `update` may change, by column name.
UPDATABLE = frozenset({"name", "models", "workspaces", "rpm", "tpm", "budget", "budget_period", "admin", "expires_at"})
DEFAULT_BUDGET_PERIOD = timedelta(days=30)
# A key that may manage keys over HTTP (`/v1/keys`): an admin key limited to no models or
# workspaces, neither revoked nor expired.
_MANAGER = (
    "admin AND models IS NULL AND workspaces IS NULL AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
)
# Changes that keep a manager serialize on this lock (any 64-bit number no other lock uses),
# so that two admins revoking each other at once cannot both see the other remain.
_MANAGERS_LOCK = 0x6C6C6D2D6B657973  # "llm-keys"
# Usage is folded by one process at a time (see `roll_up_usage`).
_USAGE_ROLLUP_LOCK = 0x6C6C6D2D75736564  # "llm-used"
# An hour row that is not a day's (00:00 UTC): the predicate of migration 0028's index.
_NOT_A_DAY = "hour <> date_trunc('day', hour AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"


class LastManager(Exception):
    """The change would leave no key able to manage keys over HTTP: `key`, as it is (unchanged)."""

    def __init__(self, key: StoredKey) -> None:
        super().__init__(f"API key {key.id} is the last admin key that can manage keys")
        self.key = key


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One row of `api_keys`. `models`/`workspaces` None: unrestricted."""

    id: int
    name: str
    prefix: str
    digest: bytes
    models: tuple[str, ...] | None
    workspaces: tuple[str, ...] | None
    rpm: int | None
    tpm: int | None
    admin: bool
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    # Tokens (prompt + completion) per `budget_period`; None: unlimited.
    budget: int | None = None
    budget_period: timedelta = DEFAULT_BUDGET_PERIOD


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A budgeted key's current period: tokens used in it (settled), tokens reserved by
    requests in flight, and when it ends."""

    used: int
    resets_at: datetime
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class KeyUsage:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_used_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    """The rate limiter's answer: `allowed`, and the key's buckets after it (GCRA times,
    epoch seconds by the database's clock `now`)."""

    allowed: bool
    now: float
    requests_at: float
    tokens_at: float
    # The key's budget: tokens used (settled) in the current period, and its end (epoch seconds).
    budget_used: int = 0
    budget_reset: float | None = None
    # What the admission reserved in that count (the request's estimate, or the rest of the
    # budget if less), given back as its real usage is counted, and the start of the period
    # it was reserved in (epoch seconds).
    budget_reserved: int = 0
    budget_start: float | None = None
    # Tokens the period's requests in flight hold (this admission's included).
    budget_held: int = 0


@dataclass(slots=True)
class UsageDelta:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Admissions the shared request bucket has not counted: + taken while it could not be
    # asked (a database outage), - given back (requests refused 403 after admission).
    admissions: int = 0
    # Tokens the shared token bucket has not counted: the usage of ended exchanges, minus what
    # they reserved at admission (so negative: given back), plus what was reserved while the
    # database could not be asked.
    tokens: int = 0
    # Tokens the shared budget count has not counted (keys with a budget: their usage), and
    # when the last of them was used (epoch seconds): usage counts only in the period it was
    # used in, however late it is written. None: unknown (counted in the current period).
    budget: int = 0
    # Budget reservations to give back, and the start of the period they were made in (epoch
    # seconds): given back only while that period lasts, since its end dropped them with its
    # count (a reservation of the period before must not free the new period's budget).
    released: int = 0
    released_from: float | None = None
    budget_at: float | None = None

    def use(self, tokens: int, at: float) -> None:
        """Count `tokens` used at `at` in the key's budget."""
        self.budget += tokens
        self.budget_at = at if self.budget_at is None else max(self.budget_at, at)

    def release(self, tokens: int, period: float | None) -> None:
        """Give back `tokens` reserved in the budget period that started at `period`."""
        if tokens <= 0 or period is None:
            return
        if self.released and self.released_from is not None and period != self.released_from:
            if period < self.released_from:
                return  # of a period that has ended: nothing to give back
            self.released = 0  # those were
        self.released, self.released_from = self.released + tokens, period

    def add(self, other: UsageDelta) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.admissions += other.admissions
        self.tokens += other.tokens
        if other.budget_at is not None:
            self.use(other.budget, other.budget_at)
        else:
            self.budget += other.budget
        self.release(other.released, other.released_from)


def _key(row: tuple[Any, ...]) -> StoredKey:
    (id_, name, prefix, digest, models, workspaces, rpm, tpm, admin, created, expires, revoked, budget, period) = row
    return StoredKey(
        id=int(id_),
        name=str(name),
        prefix=str(prefix),
        digest=bytes(digest),
        models=tuple(models) if models is not None else None,
        workspaces=tuple(workspaces) if workspaces is not None else None,
        rpm=rpm,
        tpm=tpm,
        admin=bool(admin),
        created_at=created,
        expires_at=expires,
        revoked_at=revoked,
        budget=budget,
        budget_period=period,
    )


async def _keep_a_manager(tx: Tx, before: StoredKey) -> None:
    """LastManager (the transaction then rolls back) if no key can manage keys any more."""
    if await tx.fetchval(f"SELECT count(*) FROM api_keys WHERE {_MANAGER}") == 0:
        raise LastManager(before)


class KeysStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # -- management (the CLI) -------------------------------------------------------------

    async def create(
        self,
        *,
        name: str,
        prefix: str,
        digest: bytes,
        models: Sequence[str] | None,
        workspaces: Sequence[str] | None,
        rpm: int | None,
        tpm: int | None,
        admin: bool,
        expires_at: datetime | None,
        budget: int | None = None,
        budget_period: timedelta = DEFAULT_BUDGET_PERIOD,
    ) -> StoredKey:
        """Insert a key (and its rate-limit row; a budget's first period starts now);
        ConstraintViolation if the prefix or digest is taken (the caller draws a new key)."""
        async with self._db.transaction() as tx:
            row = await tx.fetchrow(
                "INSERT INTO api_keys (name, prefix, digest, models, workspaces, rpm, tpm, admin, expires_at,"
                f" budget, budget_period) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
                (
                    name, prefix, digest,
                    list(models) if models is not None else None,
                    list(workspaces) if workspaces is not None else None,
                    rpm, tpm, admin, expires_at, budget, budget_period,
                ),
            )
            assert row is not None
            key = _key(row)
            await tx.execute(
                "INSERT INTO api_key_limits (key_id, budget_start) VALUES (%s, CASE WHEN %s THEN now() END)",
                (key.id, budget is not None),
            )
        return key

    async def update(
        self, key_id: int, changes: Mapping[str, Any], *, keep_manager: bool = False
    ) -> StoredKey | None:
        """Set the columns `changes` names (see `UPDATABLE`; values as `create` takes them,
        None clears a limit) on key `key_id`; None: no such key. A budget given to a key
        that had none starts its first period now; a changed budget keeps the current
        period's count; a changed period starts a new period now, of the new length, carrying the
        current period's usage (reservations in flight go, as at a period's end). Running gateways reload
        the key at once (the table's trigger notifies them). `keep_manager`: LastManager,
        nothing changed, when the change would leave no key able to manage keys."""
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise ValueError(f"cannot change {', '.join(sorted(unknown))}")
        if not changes:
            found = await self.find(str(key_id))
            return found[0] if found else None
        values = {
            column: list(value) if column in ("models", "workspaces") and value is not None else value
            for column, value in changes.items()
        }
        assignments = ", ".join(f"{column} = %s" for column in values)
        async with self._db.transaction() as tx:
            if keep_manager:
                await tx.execute("SELECT pg_advisory_xact_lock(%s)", (_MANAGERS_LOCK,))
            before = await tx.fetchrow(
                f"SELECT budget, budget_period, {_MANAGER}, {_COLUMNS} FROM api_keys WHERE id = %s FOR UPDATE", (key_id,)
            )
            if before is None:
                return None
            row = await tx.fetchrow(
                f"UPDATE api_keys SET {assignments} WHERE id = %s RETURNING {_COLUMNS}", (*values.values(), key_id)
            )
            assert row is not None
            key = _key(row)
            if keep_manager and before[2]:
                await _keep_a_manager(tx, _key(before[3:]))
            if before[0] is None and key.budget is not None:
                await tx.execute(
                    "INSERT INTO api_key_limits AS l (key_id, budget_start) VALUES (%s, now())"
                    " ON CONFLICT (key_id) DO UPDATE SET budget_start = now(), budget_used = 0, budget_reserved = 0,"
                    " budget_holds = NULL",
                    (key_id,),
                )
            elif key.budget is not None and key.budget_period != before[1]:
                # A new length starts a new period now, carrying the current period's count (as
                # the old length rolls it): counted from the old start, a shorter period would
                # land in a later window and drop the count; a longer one could reach back. The
                # reservations of requests in flight go, as at any period's end (they are given
                # back to the period they were made in); their usage is counted when they end.
                await tx.execute(
                    "UPDATE api_key_limits l SET budget_start = now(), budget_reserved = 0, budget_holds = NULL,"
                    " budget_used = api_key_budget_settled(l.budget_start, l.budget_used, %s, now(), 0, NULL)"
                    " WHERE l.key_id = %s",
                    (before[1], key_id),
                )
        return key

    async def find_all(self) -> list[StoredKey]:
        return [_key(row) for row in await self._db.fetch(f"SELECT {_COLUMNS} FROM api_keys ORDER BY id")]

    async def page(self, after: int | None, limit: int) -> list[StoredKey]:
        """At most `limit` keys by id, after key `after` (None: from the first)."""
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM api_keys WHERE id > %s ORDER BY id LIMIT %s", (after or 0, limit)
        )
        return [_key(row) for row in rows]

    async def find(self, ref: str) -> list[StoredKey]:
        """Keys whose id is `ref`, or whose prefix starts with `ref` (at least 6 characters)."""
        if ref.isascii() and ref.isdigit():  # not `²`, which int() refuses
            rows = await self._db.fetch(f"SELECT {_COLUMNS} FROM api_keys WHERE id = %s", (int(ref),))
        elif len(ref) >= 6:
            pattern = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = await self._db.fetch(
                f"SELECT {_COLUMNS} FROM api_keys WHERE prefix LIKE %s ORDER BY id", (pattern,)
            )
        else:
            rows = []
        return [_key(row) for row in rows]

    async def find_by_digest(self, digest: bytes) -> StoredKey | None:
        """The key whose sha256 digest is `digest` (a whole key, as a client presents it)."""
        row = await self._db.fetchrow(f"SELECT {_COLUMNS} FROM api_keys WHERE digest = %s", (digest,))
        return _key(row) if row is not None else None

    async def revoke(self, key_id: int, *, keep_manager: bool = False) -> StoredKey | None:
        """Revoke (idempotent: an already revoked key keeps its time). None: no such key.
        `keep_manager`: LastManager, nothing revoked, when no other key could manage keys."""
        if not keep_manager:
            row = await self._db.fetchrow(
                f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s RETURNING {_COLUMNS}",
                (key_id,),
            )
            return _key(row) if row is not None else None
        async with self._db.transaction() as tx:
            await tx.execute("SELECT pg_advisory_xact_lock(%s)", (_MANAGERS_LOCK,))
            before = await tx.fetchrow(f"SELECT {_MANAGER}, {_COLUMNS} FROM api_keys WHERE id = %s FOR UPDATE", (key_id,))
            if before is None:
                return None
            row = await tx.fetchrow(
                f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s RETURNING {_COLUMNS}",
                (key_id,),
            )
            assert row is not None
            if before[0]:
                await _keep_a_manager(tx, _key(before[1:]))
            return _key(row)

    async def usage(self, ids: Sequence[int] | None = None) -> dict[int, KeyUsage]:
        """Every key's usage, or only that of keys `ids`."""
        # Two statements, not one with an optional filter: a plan made for both reads every row.
        columns = "key_id, sum(requests), sum(errors), sum(prompt_tokens), sum(completion_tokens), max(last_used_at)"
        rows = await (
            self._db.fetch(f"SELECT {columns} FROM api_key_usage GROUP BY key_id") if ids is None
            else self._db.fetch(f"SELECT {columns} FROM api_key_usage WHERE key_id = ANY(%s) GROUP BY key_id", (list(ids),))
        )
        return {
            int(r[0]): KeyUsage(int(r[1]), int(r[2]), int(r[3]), int(r[4]), r[5])
            for r in rows
        }

    async def budgets(self, ids: Sequence[int] | None = None) -> dict[int, BudgetState]:
        """The current period of every key with a budget, or of keys `ids` (as admissions
        will roll it)."""
        query = """
            SELECT k.id, CASE WHEN s.start IS NOT DISTINCT FROM l.budget_start THEN coalesce(l.budget_used, 0) ELSE 0 END,
                   s.start + k.budget_period,
                   CASE WHEN s.start IS NOT DISTINCT FROM l.budget_start THEN coalesce(l.budget_reserved, 0) ELSE 0 END
            FROM api_keys k LEFT JOIN api_key_limits l ON l.key_id = k.id,
                 LATERAL (SELECT api_key_budget_start(l.budget_start, k.budget_period, now()) AS start) s
            WHERE k.budget IS NOT NULL"""
        rows = await (
            self._db.fetch(query) if ids is None else self._db.fetch(query + " AND k.id = ANY(%s)", (list(ids),))
        )
        return {int(r[0]): BudgetState(int(r[1]), r[2], int(r[3])) for r in rows}

    # -- the gateway's copy -----------------------------------------------------------------

    async def fingerprint(self) -> tuple[int, int]:
        """Changes whenever any key is created or changed (revisions only grow, so their sum
        moves even when an older transaction commits after a newer one)."""
        row = await self._db.fetchrow("SELECT count(*), coalesce(sum(revision), 0) FROM api_keys")
        assert row is not None
        return int(row[0]), int(row[1])

    async def all_keys(self) -> tuple[tuple[int, int], list[StoredKey]]:
        """Every key with the fingerprint it was read at (one consistent snapshot)."""
        async with self._db.transaction() as tx:
            await tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            row = await tx.fetchrow("SELECT count(*), coalesce(sum(revision), 0) FROM api_keys")
            rows = await tx.fetch(f"SELECT {_COLUMNS} FROM api_keys")
        assert row is not None
        return (int(row[0]), int(row[1])), [_key(r) for r in rows]

    # -- limits and usage -------------------------------------------------------------------

    async def admit(
        self, key_id: int, rpm: int | None, tpm: int | None, settle: int = 0, settle_tokens: int = 0, reserve: int = 0,
        *, budget: int | None = None, budget_period: timedelta = DEFAULT_BUDGET_PERIOD, settle_budget: int = 0,
        settled_at: float | None = None, budget_reserve: int = 0, release_budget: int = 0, released_from: float | None = None,
        owner: str | None = None,
    ) -> Admission:
        """Take one request from the key's request bucket and reserve `reserve` tokens in its
        token bucket, after settling `settle` admissions and `settle_tokens` tokens the buckets
        have not counted (negative: given back), in one round trip. With a `budget`, refused
        once the period's count (its usage, after `settle_budget` more used at `settled_at`, plus
        its reservations, after `release_budget` reserved in
        the period that started at `released_from` given back) has reached it; admitted, it
        reserves `budget_reserve` tokens there, or what is left of the budget if less. Budget
        reservations are made and given back in the name of `owner` (the calling gateway
        process: see `release_holds`), which gives back no more than it holds."""
        row = await self._db.fetchrow(
            "SELECT * FROM api_key_admit(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                key_id, rpm, tpm, settle, settle_tokens, reserve, budget, budget_period, settle_budget, settled_at,
                budget_reserve, release_budget, released_from, owner,
            ),
        )
        assert row is not None
        return _admission(row)

    async def admit_many(
        self, key_id: int, rpm: int | None, tpm: int | None, reserves: Sequence[tuple[int, int]], settle: int = 0,
        settle_tokens: int = 0, *, budget: int | None = None, budget_period: timedelta = DEFAULT_BUDGET_PERIOD,
        settle_budget: int = 0, settled_at: float | None = None, release_budget: int = 0,
        released_from: float | None = None, owner: str | None = None,
    ) -> list[Admission]:
        """`admit` for several requests of one key in one round trip, one after the other in
        `reserves`' order (each a request's `reserve` and `budget_reserve`), each with its own
        answer: the first settles what `admit` would, the others see the buckets it left."""
        if len(reserves) == 1:
            reserve, budget_reserve = reserves[0]
            return [await self.admit(
                key_id, rpm, tpm, settle, settle_tokens, reserve, budget=budget, budget_period=budget_period,
                settle_budget=settle_budget, settled_at=settled_at, budget_reserve=budget_reserve,
                release_budget=release_budget, released_from=released_from, owner=owner,
            )]
        # A volatile function called once per row of a lateral join runs row after row, each
        # call seeing the key's row as the one before left it (its lock is already held).
        rows = await self._db.fetch(
            """
            SELECT a.* FROM unnest(%s::integer[], %s::bigint[]) WITH ORDINALITY AS q(reserve, budget_reserve, n)
            CROSS JOIN LATERAL api_key_admit(
                %s::bigint, %s::integer, %s::integer,
                CASE WHEN q.n = 1 THEN %s::integer ELSE 0 END, CASE WHEN q.n = 1 THEN %s::bigint ELSE 0 END,
                q.reserve, %s::bigint, %s::interval,
                CASE WHEN q.n = 1 THEN %s::bigint ELSE 0 END, %s::double precision, q.budget_reserve,
                CASE WHEN q.n = 1 THEN %s::bigint ELSE 0 END, %s::double precision, %s::text
            ) AS a
            ORDER BY q.n
            """,
            (
                [r for r, _ in reserves], [b for _, b in reserves], key_id, rpm, tpm, settle, settle_tokens,
                budget, budget_period, settle_budget, settled_at, release_budget, released_from, owner,
            ),
        )
        return [_admission(row) for row in rows]

    async def release_holds(self, owner: str) -> int:
        """Give back every budget reservation gateway process `owner` still holds (it stops:
        its requests have ended); how many keys held some. The sweep of a dead process does the
        same (`ChatStore.sweep_dead_instances`)."""
        released = await self._db.execute(
            """
            UPDATE api_key_limits l
            SET budget_reserved = greatest(0, l.budget_reserved - api_key_holds_of(l.budget_holds, ARRAY[%(owner)s::text], l.budget_start)),
                budget_holds = nullif(l.budget_holds - %(owner)s::text, '{}'::jsonb)
            WHERE l.budget_holds ? %(owner)s::text
            """,
            {"owner": owner},
        )
        return int(released or 0)

    async def forget_writers(self, writers: list[str]) -> None:
        """Drop the batch numbers of `writers`, none of whose batches can be sent again."""
        await self._db.execute("DELETE FROM api_key_usage_writes WHERE writer = ANY(%s)", (writers,))

    async def roll_up_usage(self, limit: int) -> int | None:
        """Fold up to `limit` hour rows of days before yesterday (UTC) into their day's row
        (its 00:00 hour), every sum and the last use kept; how many were folded, or None when
        another process is folding (one at a time: no two wait on each other's day rows)."""
        async with self._db.transaction() as tx:
            if not await tx.fetchval("SELECT pg_try_advisory_xact_lock(%s)", (_USAGE_ROLLUP_LOCK,)):
                return None
            folded = await tx.fetchval(
                f"""
                WITH gone AS (
                    DELETE FROM api_key_usage u WHERE (u.key_id, u.hour) IN (
                        SELECT key_id, hour FROM api_key_usage
                        WHERE hour < date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' - interval '1 day'
                            AND {_NOT_A_DAY}
                        ORDER BY hour LIMIT %s)
                    RETURNING u.*
                ), folded AS (
                    INSERT INTO api_key_usage AS u (key_id, hour, requests, errors, prompt_tokens, completion_tokens,
                                                    last_used_at)
                    SELECT key_id, date_trunc('day', hour AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', sum(requests),
                           sum(errors), sum(prompt_tokens), sum(completion_tokens), max(last_used_at)
                    FROM gone GROUP BY 1, 2
                    ON CONFLICT (key_id, hour) DO UPDATE SET
                        requests = u.requests + EXCLUDED.requests,
                        errors = u.errors + EXCLUDED.errors,
                        prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens,
                        completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens,
                        last_used_at = greatest(u.last_used_at, EXCLUDED.last_used_at)
                )
                SELECT count(*) FROM gone
                """,
                (limit,),
            )
        return int(folded)

    async def record_usage(self, deltas: Mapping[int, UsageDelta], writer: str, seq: int) -> None:
        """Add usage to the current hour, settle each key's token bucket (keys with a `tpm`;
        `tokens`, negative: given back), settle admissions the request bucket has not
        counted (keys with an `rpm`) and count `budget` tokens in the key's budget period
        (keys with a budget, only if used in its current period) and give back `released`
        reservations (of those `writer`, the gateway process that made them, still holds), in
        one statement: batch `seq` of `writer`, applied unless that writer's batches up to
        `seq` were applied already (a retry, a replayed spool)."""
        if not deltas:
            return
        ids = list(deltas)
        await self._db.execute(
            """
            WITH fresh AS (
                INSERT INTO api_key_usage_writes AS w (writer, seq) VALUES (%s, %s)
                ON CONFLICT (writer) DO UPDATE SET seq = EXCLUDED.seq, written_at = now() WHERE w.seq < EXCLUDED.seq
                RETURNING 1
            ), d AS (
                SELECT d.*, %s::text AS owner FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[],
                              %s::bigint[], %s::bigint[], %s::bigint[], %s::float8[], %s::float8[])
                    AS d(key_id, requests, errors, prompt, completion, admissions, tokens, budget, released, released_from,
                         budget_at)
                WHERE EXISTS (SELECT 1 FROM fresh)
            ), usage AS (
                INSERT INTO api_key_usage AS u (key_id, hour, requests, errors, prompt_tokens, completion_tokens)
                SELECT key_id, date_trunc('hour', now()), requests, errors, prompt, completion FROM d
                ON CONFLICT (key_id, hour) DO UPDATE SET
                    requests = u.requests + EXCLUDED.requests,
                    errors = u.errors + EXCLUDED.errors,
                    prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens,
                    completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens,
                    last_used_at = now()
            )
            UPDATE api_key_limits l
            SET tokens_at = CASE
                    WHEN k.tpm IS NULL OR d.tokens = 0 THEN l.tokens_at
                    WHEN d.tokens > 0 THEN greatest(l.tokens_at, extract(epoch FROM clock_timestamp()))
                        + d.tokens * 60.0 / k.tpm
                    ELSE l.tokens_at + d.tokens * 60.0 / k.tpm END,
                requests_at = CASE
                    WHEN k.rpm IS NULL OR d.admissions = 0 THEN l.requests_at
                    WHEN d.admissions > 0 THEN greatest(l.requests_at, extract(epoch FROM clock_timestamp()))
                        + d.admissions * 60.0 / k.rpm
                    ELSE l.requests_at + d.admissions * 60.0 / k.rpm END,
                budget_start = CASE
                    WHEN k.budget IS NULL OR (d.budget = 0 AND d.released = 0) THEN l.budget_start
                    ELSE api_key_budget_start(l.budget_start, k.budget_period, now()) END,
                budget_used = CASE
                    WHEN k.budget IS NULL OR (d.budget = 0 AND d.released = 0) THEN l.budget_used
                    ELSE api_key_budget_settled(l.budget_start, l.budget_used, k.budget_period, now(),
                                                d.budget, d.budget_at) END,
                budget_reserved = CASE
                    WHEN k.budget IS NULL OR (d.budget = 0 AND d.released = 0) THEN l.budget_reserved
                    ELSE api_key_budget_held(l.budget_start, l.budget_reserved, k.budget_period, now(),
                                             api_key_hold_released(l.budget_holds, d.owner, d.released, d.released_from),
                                             d.released_from) END,
                budget_holds = CASE
                    WHEN k.budget IS NULL OR (d.budget = 0 AND d.released = 0) THEN l.budget_holds
                    WHEN api_key_budget_start(l.budget_start, k.budget_period, now()) IS DISTINCT FROM l.budget_start
                        THEN NULL
                    ELSE api_key_holds_after(l.budget_holds, d.owner, d.released_from,
                        -api_key_hold_released(l.budget_holds, d.owner, d.released, d.released_from)) END
            FROM d JOIN api_keys k ON k.id = d.key_id
            WHERE l.key_id = d.key_id
                AND ((k.tpm IS NOT NULL AND d.tokens <> 0) OR (k.rpm IS NOT NULL AND d.admissions <> 0)
                     OR (k.budget IS NOT NULL AND (d.budget <> 0 OR d.released <> 0)))
            """,
            (
                writer,
                seq,
                writer,
                ids,
                [deltas[i].requests for i in ids],
                [deltas[i].errors for i in ids],
                [deltas[i].prompt_tokens for i in ids],
                [deltas[i].completion_tokens for i in ids],
                [deltas[i].admissions for i in ids],
                [deltas[i].tokens for i in ids],
                [deltas[i].budget for i in ids],
                [deltas[i].released for i in ids],
                [deltas[i].released_from for i in ids],
                [deltas[i].budget_at for i in ids],
            ),
        )


# -- change notifications -----------------------------------------------------------------------


class KeyChanges:
    """A dedicated connection LISTENing on the keys channel (the pool's connections are
    shared, so they cannot hold a LISTEN)."""

    def __init__(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        self._conn = conn

    async def wait(self, seconds: float) -> bool:
        """True once a key changed (notifications that arrive together count once); False
        after `seconds` without one. DatabaseUnavailable if the connection broke."""
        try:
            # The socket is watched by trio, not by psycopg's wait, which wakes every 100 ms:
            # ten wake-ups a second, through the asyncio bridge, on a channel quiet for hours.
            with trio.move_on_after(seconds):
                await trio.lowlevel.wait_readable(self._conn.fileno())  # a closed one raises
            count: int = await aio_as_trio(self._aio_read)()
        except (psycopg.Error, OSError) as exc:
            raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
        return count > 0

    async def _aio_read(self) -> int:
        count = 0
        async for _ in self._conn.notifies(timeout=_READ_TIMEOUT, stop_after=1):
            count += 1
        if count == 0:
            # A quiet channel (or a message that was not a notification) says nothing about
            # the link: ask the server.
            await self._conn.execute("SELECT 1")
            # On a busy loop the read above can give up before it has read a notification
            # that was already on the socket; the query then reads it and psycopg keeps it
            # for the next `notifies()`. Take it now: the socket is drained, so the next
            # wait would sleep on it until some later message (30 s, or another change).
            async for _ in self._conn.notifies(timeout=0):
                count += 1
        return count


@asynccontextmanager
async def key_changes(url: str, *, connect_timeout: float = 10.0) -> AsyncIterator[KeyChanges]:
    """LISTEN for key changes on a connection of its own; DatabaseUnavailable if it cannot."""

    async def connect() -> psycopg.AsyncConnection[tuple[Any, ...]]:
        conn = await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=max(1, round(connect_timeout))
        )
        await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        return conn

    try:
        conn = await aio_as_trio(connect)()
    except (psycopg.Error, OSError) as exc:
        raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
    try:
        yield KeyChanges(conn)
    finally:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _CLOSE_TIMEOUT
            with contextlib.suppress(psycopg.Error, OSError):
                await aio_as_trio(conn.close)()


def _admission(row: Row) -> Admission:
    return Admission(
        bool(row[0]), float(row[1]), float(row[2]), float(row[3]), int(row[4] or 0),
        float(row[5]) if row[5] is not None else None, int(row[6] or 0),
        float(row[7]) if row[7] is not None else None, int(row[8] or 0),
    )
