"""Versioned SQL migrations, applied in order at start-up.

Migrations are the files `proxy/infra/sql/NNNN_name.sql` (four-digit version, lower-case
name). Each pending one runs in its own transaction, together with its row in
`schema_migrations`, so a failing migration leaves nothing half-applied and the next start
retries it. Do not put BEGIN/COMMIT or statements that cannot run inside a transaction (e.g.
CREATE INDEX CONCURRENTLY) in a migration file.

Several processes may call `migrate()` at once: a transaction-scoped advisory lock serialises
them, and each re-checks under the lock whether its migration is still pending. Once every
migration is applied, `migrate()` is a single read without locking.

Never edit an applied migration; add a new one. A changed file is reported in the log
(its checksum no longer matches the recorded one) but not re-run.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from proxy.infra.postgres import SCHEMA_LOCK_KEY, Database, DatabaseError

log = logging.getLogger(__name__)

_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_TABLE_EXISTS = (
    "SELECT EXISTS (SELECT FROM pg_catalog.pg_tables"
    " WHERE schemaname = current_schema() AND tablename = 'schema_migrations')"
)


class MigrationError(DatabaseError):
    """The migration files are inconsistent (bad name, duplicate version)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # file stem, e.g. "0001_init"
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Traversable | Path | None = None) -> list[Migration]:
    """The migrations in `directory` (default: the packaged `proxy/infra/sql`), by version."""
    source = directory if directory is not None else resources.files("proxy.infra") / "sql"
    found: dict[int, Migration] = {}
    for entry in source.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_RE.match(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations with version {version:04d}")
        found[version] = Migration(version, entry.name.removesuffix(".sql"), entry.read_text())
    return [found[v] for v in sorted(found)]


async def _applied(db: Database) -> dict[int, str]:
    """version -> checksum of the applied migrations (none before 0001 made the table)."""
    if not await db.fetchval(_TABLE_EXISTS):
        return {}
    rows = await db.fetch("SELECT version, checksum FROM schema_migrations")
    return {int(version): str(checksum) for version, checksum in rows}


async def migrate(db: Database, *, directory: Traversable | Path | None = None) -> list[str]:
    """Apply pending migrations in version order; return the names this call applied."""
    migrations = load_migrations(directory)
    applied = await _applied(db)
    for m in migrations:
        if m.version in applied and applied[m.version] != m.checksum:
            log.warning("migration %s changed after it was applied; not re-running it", m.name)
    pending = [m for m in migrations if m.version not in applied]
    done: list[str] = []
    for m in pending:
        async with db.transaction() as tx:
            await tx.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
            # Another process may have applied it while we waited for the lock. Not
            # to_regclass() here: taking an advisory lock does not process catalog
            # invalidations, so it can miss a table another session just committed.
            if await tx.fetchval(_TABLE_EXISTS) and await tx.fetchval(
                "SELECT 1 FROM schema_migrations WHERE version = %s", (m.version,)
            ):
                continue
            try:
                await tx.execute(m.sql)
            except DatabaseError as exc:
                raise MigrationError(
                    f"migration {m.name} failed: {exc}", sqlstate=exc.sqlstate
                ) from exc
            await tx.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (m.version, m.name, m.checksum),
            )
        log.info("applied migration %s", m.name)
        done.append(m.name)
    return done
