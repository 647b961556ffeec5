"""OpenAI's files and batches in PostgreSQL (`0019_batches.sql`).

Files and batches are their tenant's (`key-<id>`): another's is not found; with auth off (no
tenant asked) every one is. A batch is run by one gateway instance at a time (`owner`): any
instance takes one without an owner, or whose owner has stopped beating its heartbeat (see
`ChatStore.sweep_dead_instances`). Each line's answer is a row of its own, written once
(`ON CONFLICT DO NOTHING`): a batch resumed elsewhere runs only the lines without one, and
its output holds each line once even should two instances have run it.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from proxy.infra.chat_store import _STEADY
from proxy.infra.postgres import Database, Tx, json_text

_MINE = "(%(tenant)s::text IS NULL OR tenant = %(tenant)s)"
# An Anthropic message batch's requests, kept as its input file: not a file of the Files API.
MESSAGE_INPUT = "message_batch"
MESSAGES = "/v1/messages"
_FILES_MINE = f"{_MINE} AND purpose <> '{MESSAGE_INPUT}'"
_FILE_COLUMNS = (
    "id, purpose, filename, bytes, extract(epoch FROM created_at)::bigint, extract(epoch FROM expires_at)::bigint"
)
_FILE_NAMES = ("id", "purpose", "filename", "bytes", "created_at", "expires_at")
_EPOCHS = (
    "created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelling_at",
    "cancelled_at", "expired_at",
)
_BATCH_NAMES = (
    "id", "endpoint", "input_file_id", "completion_window", "status", "errors", "total", "output_file_id",
    "error_file_id", "metadata", *_EPOCHS, "completed", "failed", "input_tokens", "output_tokens", "model",
    "cached_tokens", "reasoning_tokens",
)
_BATCH_COLUMNS = (
    "b.id, b.endpoint, b.input_file_id, b.completion_window, b.status, b.errors, b.total, b.output_file_id, "
    "b.error_file_id, b.metadata, "
    + ", ".join(f"extract(epoch FROM b.{name})::bigint" for name in _EPOCHS)
    + ", b.completed, b.failed, b.input_tokens, b.output_tokens, b.model, b.cached_tokens, b.reasoning_tokens"
)
_BATCH_FROM = "FROM batches b"
_ACTIVE = "b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')"
# A line's answer, and its counts and tokens added to its batch's in the same statement: only
# when the line was not recorded already (by another process that ran it too), and only while
# the batch has not ended (its files written, an OpenAI batch's lines deleted: a line recorded
# late would be counted twice). The batch's row is locked before the line's is written, as
# `finalize` does: a line recorded by a process presumed dead while another finalizes the batch
# waits, rather than deadlocks, then finds it ended.
_RECORD = f"""
WITH locked AS (SELECT b.id FROM batches b WHERE b.id = %(batch)s AND {_ACTIVE} FOR UPDATE), added AS (
    INSERT INTO batch_lines (batch_id, line, ok, output, input_tokens, output_tokens, cached_tokens, reasoning_tokens)
    SELECT id, %(line)s, %(ok)s, %(output)s::json, %(input)s, %(output_tokens)s, %(cached)s, %(reasoning)s FROM locked
    ON CONFLICT DO NOTHING
    RETURNING ok, coalesce(NOT ok AND output->'error'->>'code' = 'batch_expired', false) AS expired
)
UPDATE batches b SET completed = b.completed + a.ok::int, failed = b.failed + (NOT a.ok)::int,
    expired = b.expired + a.expired::int, input_tokens = b.input_tokens + %(input)s,
    output_tokens = b.output_tokens + %(output_tokens)s, cached_tokens = b.cached_tokens + %(cached)s,
    reasoning_tokens = b.reasoning_tokens + %(reasoning)s
FROM added a WHERE b.id = %(batch)s
"""
# A batch nobody runs: no owner (created, or let go by a process that stopped), or an owner
# silent for `silent` seconds, as judged by a steadily beating instance.
_CLAIM = f"""
UPDATE batches SET owner = %(judge)s WHERE id = (
    SELECT b.id FROM batches b WHERE {_ACTIVE} AND (
        b.owner IS NULL OR (b.owner <> %(judge)s AND NOT EXISTS (
            SELECT 1 FROM gateway_instances g WHERE g.id = b.owner AND g.seen_at > now() - make_interval(secs => %(silent)s)
        ) AND {_STEADY})
    ) ORDER BY b.seq LIMIT 1 FOR UPDATE SKIP LOCKED
) RETURNING id, tenant, key_id, endpoint, input_file_id, status, extract(epoch FROM expires_at - now())::float8
"""
# A batch's output (or error) file, its lines joined by PostgreSQL: tens of thousands of
# answers never pass through the gateway's memory. None written when it has no such line.
_OUTPUT_FILE = """
INSERT INTO files (id, tenant, purpose, filename, bytes, content, expires_at)
SELECT %(id)s, %(tenant)s, 'batch_output', %(name)s, octet_length(t.content), t.content,
    now() + make_interval(secs => (SELECT output_expires_seconds FROM batches WHERE id = %(batch)s))
FROM (SELECT convert_to(string_agg(output::text, E'\\n' ORDER BY line) || E'\\n', 'UTF8') AS content
      FROM batch_lines WHERE batch_id = %(batch)s AND ok = %(ok)s) t
WHERE t.content IS NOT NULL
"""
_PAGE = {
    "asc": "AND seq > %(cursor)s ORDER BY seq LIMIT %(limit)s",
    "desc": "AND seq < %(cursor)s ORDER BY seq DESC LIMIT %(limit)s",
}
_NO_CURSOR = {"asc": 0, "desc": 2**63 - 1}


# A file's row in COPY's binary format: its bytes written as they are read, no escaping.
_COPY_FILE = "COPY files (id, tenant, purpose, filename, bytes, content) FROM STDIN (FORMAT binary)"
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_SLICE = 1 << 20


def _file_row(
    file_id: str, tenant: str | None, purpose: str, filename: str, content: IO[bytes], size: int
) -> Iterator[bytes]:
    """A file's row for `_COPY_FILE`: its fields, then its `size` bytes a slice at a time."""
    head = bytearray(_COPY_SIGNATURE + struct.pack(">h", 6))
    for text in (file_id, tenant, purpose, filename):
        if text is None:
            head += struct.pack(">i", -1)
        else:
            encoded = text.encode()
            head += struct.pack(">i", len(encoded)) + encoded
    head += struct.pack(">iq", 8, size) + struct.pack(">i", size)
    yield bytes(head)
    left = size
    while left > 0:
        piece = content.read(min(_COPY_SLICE, left))
        if not piece:
            raise OSError(f"the file ended {left} bytes short of its {size}")
        left -= len(piece)
        yield piece
    yield struct.pack(">h", -1)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A batch this instance now runs."""

    id: str
    tenant: str | None
    key_id: int | None
    endpoint: str
    input_file_id: str
    status: str
    expires_in: float  # seconds


def _file(row: Any) -> dict[str, Any] | None:
    return None if row is None else dict(zip(_FILE_NAMES, row, strict=True))


def _batch(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    found = dict(zip(_BATCH_NAMES, row, strict=True))
    for name in ("completed", "failed", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens"):
        found[name] = int(found[name])
    return found


class BatchStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # -- files -----------------------------------------------------------------------------

    async def add_file(
        self, file_id: str, tenant: str | None, purpose: str, filename: str, content: bytes | IO[bytes],
        expires_seconds: int | None = None, *, size: int | None = None,
    ) -> dict[str, Any]:
        """Store a file; `content` a file object is read a slice at a time from where it is
        (`size` bytes of it) and streamed to PostgreSQL (`COPY`), never whole in memory."""
        if isinstance(content, bytes):
            size, content = len(content), io.BytesIO(content)
        assert size is not None
        async with self._db.transaction() as tx:
            await tx.copy_in(_COPY_FILE, _file_row(file_id, tenant, purpose, filename, content, size))
            row = await tx.fetchrow(
                f"UPDATE files SET expires_at = now() + make_interval(secs => %s) WHERE id = %s RETURNING {_FILE_COLUMNS}",
                (expires_seconds, file_id),
            )
        found = _file(row)
        assert found is not None
        return found

    async def file(self, file_id: str, tenant: str | None) -> dict[str, Any] | None:
        return _file(await self._db.fetchrow(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE id = %(id)s AND {_FILES_MINE}", {"id": file_id, "tenant": tenant}
        ))

    async def content(self, file_id: str, tenant: str | None) -> bytes | None:
        found = await self._db.fetchval(
            f"SELECT content FROM files WHERE id = %(id)s AND {_FILES_MINE}", {"id": file_id, "tenant": tenant}
        )
        return None if found is None else bytes(found)

    async def content_size(self, file_id: str, tenant: str | None) -> tuple[int, bool] | None:
        """The file's size, and whether it is stored compressed (a file stored before 0022:
        read whole, as a slice of it costs decompressing all before it)."""
        row = await self._db.fetchrow(
            f"SELECT octet_length(content), pg_column_compression(content) IS NOT NULL FROM files WHERE id = %(id)s "
            f"AND {_FILES_MINE}", {"id": file_id, "tenant": tenant},
        )
        return None if row is None else (int(row[0]), bool(row[1]))

    async def content_slice(self, file_id: str, start: int, size: int) -> bytes | None:
        """`size` bytes of the file from `start` (0-based); None: it was deleted."""
        found = await self._db.fetchval(
            "SELECT substring(content FROM %s FOR %s) FROM files WHERE id = %s", (start + 1, size, file_id)
        )
        return None if found is None else bytes(found)

    async def delete_file(self, file_id: str, tenant: str | None) -> str | bool:
        """Whether the file was there to delete; the id of a batch still running on it (it is
        kept: a batch resumed elsewhere reads its input again)."""
        row = await self._db.fetchrow(
            "WITH running AS (SELECT b.id FROM batches b WHERE b.input_file_id = %(id)s AND "
            f"{_ACTIVE} LIMIT 1), gone AS (DELETE FROM files WHERE id = %(id)s AND {_FILES_MINE} "
            "AND NOT EXISTS (SELECT 1 FROM running) RETURNING 1) "
            "SELECT (SELECT id FROM running), EXISTS (SELECT 1 FROM gone)",
            {"id": file_id, "tenant": tenant},
        )
        assert row is not None
        running, deleted = row
        return bool(deleted) if running is None else str(running)

    async def files(
        self, tenant: str | None, *, purpose: str | None, after: str | None, limit: int, order: str
    ) -> tuple[list[dict[str, Any]], bool] | None:
        """A page of the tenant's files (and whether more follow); None: `after` is none of them."""
        params: dict[str, Any] = {"tenant": tenant, "purpose": purpose, "limit": limit + 1, "cursor": _NO_CURSOR[order]}
        if after is not None:
            seq = await self._db.fetchval(f"SELECT seq FROM files WHERE id = %(id)s AND {_MINE}", {"id": after, "tenant": tenant})
            if seq is None:
                return None
            params["cursor"] = int(seq)
        rows = await self._db.fetch(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE {_FILES_MINE} AND (%(purpose)s::text IS NULL OR purpose = %(purpose)s) "
            + _PAGE[order], params,
        )
        found = [_file(row) for row in rows[:limit]]
        return [row for row in found if row is not None], len(rows) > limit

    # -- batches ---------------------------------------------------------------------------

    async def add_batch(
        self, batch_id: str, tenant: str | None, key_id: int | None, endpoint: str, input_file_id: str,
        window: str, metadata: dict[str, str] | None, output_expires_seconds: int | None = None,
    ) -> dict[str, Any]:
        """Adding one again (its id) finds it as it is: a write that may have committed unseen
        is tried again as it was."""
        await self._db.execute(
            "INSERT INTO batches (id, tenant, key_id, endpoint, input_file_id, completion_window, metadata, status, "
            "expires_at, output_expires_seconds) VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, 'validating', "
            "now() + interval '24 hours', %s) ON CONFLICT (id) DO NOTHING",
            (batch_id, tenant, key_id, endpoint, input_file_id, window, json_text(metadata) if metadata is not None else None,
             output_expires_seconds),
        )
        found = await self.batch(batch_id, tenant)
        assert found is not None
        return found

    async def batch(self, batch_id: str, tenant: str | None) -> dict[str, Any] | None:
        return _batch(await self._db.fetchrow(
            f"SELECT {_BATCH_COLUMNS} {_BATCH_FROM} WHERE b.id = %(id)s AND (%(tenant)s::text IS NULL OR b.tenant = %(tenant)s)",
            {"id": batch_id, "tenant": tenant},
        ))

    async def batches(self, tenant: str | None, *, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool] | None:
        """A page of the tenant's batches, newest first (and whether more follow)."""
        cursor = _NO_CURSOR["desc"]
        if after is not None:
            seq = await self._db.fetchval(f"SELECT seq FROM batches WHERE id = %(id)s AND {_MINE}", {"id": after, "tenant": tenant})
            if seq is None:
                return None
            cursor = int(seq)
        rows = await self._db.fetch(
            f"SELECT {_BATCH_COLUMNS} {_BATCH_FROM} WHERE (%(tenant)s::text IS NULL OR b.tenant = %(tenant)s) "
            "AND b.seq < %(cursor)s AND b.endpoint <> %(messages)s ORDER BY b.seq DESC LIMIT %(limit)s",
            {"tenant": tenant, "cursor": cursor, "limit": limit + 1, "messages": MESSAGES},
        )
        found = [_batch(row) for row in rows[:limit]]
        return [row for row in found if row is not None], len(rows) > limit

    async def cancel(self, batch_id: str, tenant: str | None) -> bool:
        """Ask the batch to stop (its runner, on any instance, sees `cancelling`); False when
        it is not found or has ended already."""
        return bool(await self._db.execute(
            "UPDATE batches SET status = 'cancelling', cancelling_at = now() WHERE id = %(id)s AND "
            f"{_MINE} AND status IN ('validating', 'in_progress')", {"id": batch_id, "tenant": tenant},
        ))

    # -- the runner ------------------------------------------------------------------------

    async def claim(self, instance: str, *, silent: float, late: float) -> Claimed | None:
        row = await self._db.fetchrow(_CLAIM, {"judge": instance, "silent": silent, "late": late})
        if row is None:
            return None
        batch_id, tenant, key_id, endpoint, input_file_id, status, expires_in = row
        return Claimed(batch_id, tenant, key_id, endpoint, input_file_id, status, float(expires_in))

    async def input_content(self, file_id: str) -> bytes | None:
        found = await self._db.fetchval("SELECT content FROM files WHERE id = %s", (file_id,))
        return None if found is None else bytes(found)

    async def state(self, batch_id: str) -> tuple[str, str | None] | None:
        """The batch's status and owner."""
        row = await self._db.fetchrow("SELECT status, owner FROM batches WHERE id = %s", (batch_id,))
        return None if row is None else (str(row[0]), row[1])

    async def fail(self, batch_id: str, owner: str, errors: list[dict[str, Any]]) -> None:
        await self._db.execute(
            "UPDATE batches SET status = 'failed', failed_at = now(), errors = %s::jsonb, owner = NULL "
            "WHERE id = %s AND owner = %s",
            (json_text(errors), batch_id, owner),
        )

    async def start(self, batch_id: str, owner: str, total: int, model: str | None = None) -> bool:
        """False: it was cancelled while it was validated."""
        return bool(await self._db.execute(
            "UPDATE batches SET status = 'in_progress', in_progress_at = now(), total = %s, model = %s "
            "WHERE id = %s AND owner = %s AND status = 'validating'",
            (total, model, batch_id, owner),
        ))

    async def answered(self, batch_id: str) -> set[int]:
        rows = await self._db.fetch("SELECT line FROM batch_lines WHERE batch_id = %s", (batch_id,))
        return {int(row[0]) for row in rows}

    async def record(
        self, batch_id: str, line: int, ok: bool, output: dict[str, Any], tokens: tuple[int, int, int, int]
    ) -> None:
        """`tokens`: input, output, cached input and reasoning output tokens."""
        await _record(self._db, batch_id, line, ok, output, tokens)

    async def finalizing(self, batch_id: str, owner: str) -> bool:
        """Its lines have ended: it is `finalizing` while its files are written. False: it
        was cancelled meanwhile."""
        return bool(await self._db.execute(
            "UPDATE batches SET status = 'finalizing', finalizing_at = now() WHERE id = %s AND owner = %s "
            "AND status = 'in_progress'", (batch_id, owner),
        ))

    async def drop_expired_files(self) -> int:
        """Delete the files past their `expires_at` (a running batch's input stays until it ends)."""
        return await self._db.execute(
            "DELETE FROM files f WHERE f.expires_at < now() AND NOT EXISTS "
            f"(SELECT 1 FROM batches b WHERE b.input_file_id = f.id AND {_ACTIVE})"
        )

    async def let_go(self, batch_id: str, owner: str) -> None:
        """This instance stops running the batch (the gateway stops): any may take it on."""
        await self._db.execute("UPDATE batches SET owner = NULL WHERE id = %s AND owner = %s", (batch_id, owner))

    async def let_go_all(self, owner: str) -> int:
        """The instance stops: every batch it owns may be taken at once by any other."""
        return await self._db.execute(f"UPDATE batches b SET owner = NULL WHERE b.owner = %s AND {_ACTIVE}", (owner,))

    async def finalize(
        self, batch_id: str, owner: str, outcome: str, unrun: list[tuple[int, dict[str, Any]]], files: tuple[str, str]
    ) -> bool:
        """End the batch as `outcome` (completed, cancelled or expired): `unrun` lines recorded
        as failed, its output and error files written from its lines, in one transaction (a
        process dying before it commits leaves the batch as it was, finalized again by whoever
        takes it). False: it is no longer this instance's."""
        async with self._db.transaction() as tx:
            row = await tx.fetchrow("SELECT tenant, endpoint FROM batches WHERE id = %s AND owner = %s FOR UPDATE", (batch_id, owner))
            if row is None:
                return False
            tenant, endpoint = row
            for line, output in unrun:
                await _record(tx, batch_id, line, False, output, (0, 0, 0, 0))
            made: list[str | None] = []
            for kind, file_id in zip((True, False), files, strict=True):
                written = endpoint != MESSAGES and await tx.execute(_OUTPUT_FILE, {  # a message batch's results are its lines
                    "id": file_id, "tenant": tenant, "batch": batch_id, "ok": kind,
                    "name": f"batch_{batch_id.removeprefix('batch_')}_{'output' if kind else 'error'}.jsonl",
                })
                made.append(file_id if written else None)
            if endpoint != MESSAGES:
                # Its lines are now those files' lines: kept twice, every batch's answers would
                # stay in `batch_lines` for good (a batch is never deleted). Its counts are its row's.
                await tx.execute("DELETE FROM batch_lines WHERE batch_id = %s", (batch_id,))
            stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[outcome]
            await tx.execute(
                f"UPDATE batches SET status = %s, {stamp} = now(), output_file_id = %s, error_file_id = %s, owner = NULL "
                "WHERE id = %s",
                (outcome, made[0], made[1], batch_id),
            )
        return True

    # -- Anthropic's message batches (`/v1/messages/batches`): batches of endpoint /v1/messages --

    async def add_message_batch(
        self, batch_id: str, file_id: str, tenant: str | None, key_id: int | None, content: bytes,
        custom_ids: list[str],
    ) -> dict[str, Any]:
        """The batch and its requests (an input file the Files API does not show; their
        `custom_ids` in its order, for its results), in one go."""
        async with self._db.transaction() as tx:
            await tx.execute(
                "INSERT INTO files (id, tenant, purpose, filename, bytes, content) VALUES (%s, %s, %s, %s, %s, %s)",
                (file_id, tenant, MESSAGE_INPUT, f"{batch_id}.jsonl", len(content), content),
            )
            await tx.execute(
                "INSERT INTO batches (id, tenant, key_id, endpoint, input_file_id, completion_window, status, total, "
                "expires_at) VALUES (%s, %s, %s, %s, %s, '24h', 'validating', %s, now() + interval '24 hours')",
                (batch_id, tenant, key_id, MESSAGES, file_id, len(custom_ids)),
            )
            await tx.execute(
                "INSERT INTO message_batch_requests (batch_id, line, custom_id) "
                "SELECT %s, t.n, t.id FROM unnest(%s::text[]) WITH ORDINALITY AS t(id, n)",
                (batch_id, custom_ids),
            )
        found = await self.message_batch(batch_id, tenant)
        assert found is not None
        return found

    async def message_batch(self, batch_id: str, tenant: str | None) -> dict[str, Any] | None:
        return _message_batch(await self._db.fetchrow(
            f"SELECT {_MESSAGE_COLUMNS} {_MESSAGE_FROM} WHERE b.id = %(id)s AND b.endpoint = %(messages)s "
            "AND (%(tenant)s::text IS NULL OR b.tenant = %(tenant)s)",
            {"id": batch_id, "tenant": tenant, "messages": MESSAGES},
        ))

    async def message_batches(
        self, tenant: str | None, *, before: str | None, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool] | None:
        """A page of the tenant's message batches, newest first: those just older than `after`,
        or just newer than `before` (and whether more follow that way); None: the cursor is
        none of them."""
        cursor_id = before or after
        order = "asc" if before is not None else "desc"
        params: dict[str, Any] = {"tenant": tenant, "messages": MESSAGES, "limit": limit + 1, "cursor": _NO_CURSOR[order]}
        if cursor_id is not None:
            seq = await self._db.fetchval(
                f"SELECT seq FROM batches WHERE id = %(id)s AND endpoint = %(messages)s AND {_MINE}",
                {"id": cursor_id, "tenant": tenant, "messages": MESSAGES},
            )
            if seq is None:
                return None
            params["cursor"] = int(seq)
        rows = await self._db.fetch(
            f"SELECT {_MESSAGE_COLUMNS} {_MESSAGE_FROM} WHERE (%(tenant)s::text IS NULL OR b.tenant = %(tenant)s) "
            "AND b.endpoint = %(messages)s " + _PAGE[order].replace("seq", "b.seq"), params,
        )
        found = [row for row in (_message_batch(row) for row in rows[:limit]) if row is not None]
        if order == "asc":
            found.reverse()
        return found, len(rows) > limit

    async def results(self, batch_id: str, after: int, limit: int) -> list[tuple[int, str, Any]]:
        """The line, `custom_id` and recorded answer (None: none) of the batch's next `limit`
        requests after line `after`, in order."""
        rows = await self._db.fetch(_RESULTS, (batch_id, after, limit))
        if not rows and after == 0 and await self._db.execute(_REQUESTS_OF_INPUT, (batch_id,)):
            rows = await self._db.fetch(_RESULTS, (batch_id, after, limit))
        return [(int(line), str(custom_id), output) for line, custom_id, output in rows]

    async def archive_message_batches(self, limit: int = 100) -> int:
        """Archive the message batches whose results are past their time (see `_ARCHIVE`);
        how many were."""
        found = await self._db.fetchval(
            _ARCHIVE, {"age": MESSAGE_RESULTS_SECONDS, "limit": limit, "input": MESSAGE_INPUT}
        )
        return int(found or 0)

    async def delete_message_batch(self, batch_id: str, tenant: str | None) -> str | None:
        """Delete an ended batch, its requests and results: its status before (an active one
        stays); None: not found."""
        async with self._db.transaction() as tx:
            row = await tx.fetchrow(
                f"SELECT status, input_file_id FROM batches b WHERE id = %(id)s AND endpoint = %(messages)s AND {_MINE} "
                "FOR UPDATE", {"id": batch_id, "tenant": tenant, "messages": MESSAGES},
            )
            if row is None:
                return None
            status, file_id = row
            if status not in _ACTIVE_STATUSES:
                await tx.execute("DELETE FROM batches WHERE id = %s", (batch_id,))
                await tx.execute("DELETE FROM files WHERE id = %s AND purpose = %s", (file_id, MESSAGE_INPUT))
            return str(status)


_RESULTS = (
    "SELECT r.line, r.custom_id, l.output FROM message_batch_requests r LEFT JOIN batch_lines l "
    "ON l.batch_id = r.batch_id AND l.line = r.line WHERE r.batch_id = %s AND r.line > %s ORDER BY r.line LIMIT %s"
)
# A batch's requests' rows from its input file, as migration 0023 filled in those of the
# batches before it: one created since by an instance not yet upgraded has none.
_REQUESTS_OF_INPUT = r"""
INSERT INTO message_batch_requests (batch_id, line, custom_id)
SELECT b.id, t.n, t.line::json->>'custom_id'
FROM batches b JOIN files f ON f.id = b.input_file_id,
    LATERAL regexp_split_to_table(convert_from(f.content, 'UTF8'), E'\n') WITH ORDINALITY AS t(line, n)
WHERE b.id = %s AND b.endpoint = '/v1/messages' AND t.line ~ '\S'
ON CONFLICT DO NOTHING
"""
_ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
_MESSAGE_COLUMNS = _BATCH_COLUMNS + ", b.expired, extract(epoch FROM b.archived_at)::bigint"
# How long a message batch's results are kept, from its creation (Anthropic's 29 days).
MESSAGE_RESULTS_SECONDS = 29 * 86400
# Message batches created longer ago than that, a few at a time (`batches_to_archive`, 0027):
# archived, their requests and answers deleted (rows held by another process skipped).
_ARCHIVE = f"""
WITH due AS (
    SELECT b.id, b.input_file_id FROM batches b
    WHERE b.endpoint = '{MESSAGES}' AND b.archived_at IS NULL AND b.created_at < now() - make_interval(secs => %(age)s)
        AND NOT {_ACTIVE}
    ORDER BY b.created_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), marked AS (
    UPDATE batches b SET archived_at = now() FROM due WHERE b.id = due.id
), answers AS (
    DELETE FROM batch_lines WHERE batch_id IN (SELECT id FROM due)
), requests AS (
    DELETE FROM message_batch_requests WHERE batch_id IN (SELECT id FROM due)
), inputs AS (
    DELETE FROM files WHERE id IN (SELECT input_file_id FROM due) AND purpose = %(input)s
)
SELECT count(*) FROM due
"""
_MESSAGE_FROM = _BATCH_FROM


async def _record(
    db: Database | Tx, batch_id: str, line: int, ok: bool, output: dict[str, Any], tokens: tuple[int, int, int, int]
) -> None:
    await db.execute(_RECORD, {
        "batch": batch_id, "line": line, "ok": ok, "output": json_text(output), "input": tokens[0],
        "output_tokens": tokens[1], "cached": tokens[2], "reasoning": tokens[3],
    })


def _message_batch(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    found = _batch(row[:-2])
    assert found is not None
    found["expired"] = int(row[-2])
    found["archived_at"] = row[-1]
    return found
