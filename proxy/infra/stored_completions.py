"""OpenAI's stored chat completions, read from the journal (`chat_log`): a chat asked with
`store: true` is its row, its settings saying so (`0024_stored_completions.sql`), found by
the id its client was given (its answer's). Ended and completed only; a deleted one's row
has lost its settings, and with them its place here.

A completion is its tenant's (`key-<id>`): another's is not found. With auth off (no tenant
asked), every one is found, as every stored response is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from proxy.dialects.openai.stored import MADE_AT, STORED
from proxy.infra.postgres import Database, json_text

# The index's predicate (`dialect`, `settings`), then what a reader may see.
_READABLE = (
    "dialect = 'openai' AND settings IS NOT NULL AND settings ? '" + STORED + "' "
    "AND status = 'completed' AND deleted_at IS NULL AND result IS NOT NULL"
)
_COLUMNS = (
    "trace_id, tenant, model, result, coalesce(settings->'metadata', '{}'::jsonb), "
    "coalesce(request->'parallel_tool_calls' = 'false'::jsonb, false)"
)
# The order they are listed in (the index's), with the trace to break ties.
_MADE = "((settings->>'" + MADE_AT + "')::bigint)"
# Rows that share an id (a backend that reuses ids, or two tenants' backends that happen to)
# are read newest first; the caller takes the first its key may read.
_BY_ID = f"SELECT {_COLUMNS} FROM chat_log WHERE (result->>'id') = %(id)s AND {_READABLE}"
_SET_METADATA = (
    "UPDATE chat_log SET settings = jsonb_set(settings, '{metadata}', %s::jsonb), updated_at = now() "
    f"WHERE trace_id = %s AND {_READABLE} RETURNING 1"
)


@dataclass(frozen=True, slots=True)
class StoredCompletion:
    trace_id: str
    tenant: str | None
    model: str  # as its client named it
    result: dict[str, Any]  # the answer (`completion_to_json`)
    metadata: dict[str, Any]
    single_tool: bool  # asked with `parallel_tool_calls: false`

    @property
    def id(self) -> str:
        return str(self.result.get("id") or "")


def _stored(row: tuple[Any, ...]) -> StoredCompletion:
    trace_id, tenant, model, result, metadata, single_tool = row
    return StoredCompletion(trace_id, tenant, model or "", result, metadata or {}, bool(single_tool))


def _tenant_clause(tenant: str | None) -> str:
    return "" if tenant is None else " AND tenant = %(tenant)s"


class StoredCompletions:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def by_id(self, completion_id: str, tenant: str | None) -> list[StoredCompletion]:
        """The tenant's stored completions of that id (one, but for a backend reusing ids)."""
        rows = await self._db.fetch(
            f"{_BY_ID}{_tenant_clause(tenant)} ORDER BY {_MADE} DESC, trace_id DESC LIMIT 10",
            {"id": completion_id, "tenant": tenant},
        )
        return [_stored(row) for row in rows]

    async def page(
        self, tenant: str | None, *, order: Literal["asc", "desc"], limit: int, after: str | None = None,
        model: str | None = None, metadata: dict[str, str] | None = None,
    ) -> list[StoredCompletion]:
        """Up to `limit` of the tenant's stored completions in the order they were made,
        after the one of trace `after`; only those of `model` (as its client named it, or as
        its answer did) and holding every pair of `metadata`."""
        sql = f"SELECT {_COLUMNS} FROM chat_log WHERE {_READABLE}{_tenant_clause(tenant)}"
        if model is not None:
            sql += " AND (model = %(model)s OR upstream_model = %(model)s OR result->>'model' = %(model)s)"
        if metadata:
            sql += " AND settings->'metadata' @> %(metadata)s::jsonb"
        beyond = ">" if order == "asc" else "<"
        if after is not None:
            sql += (
                f" AND ({_MADE}, trace_id) {beyond} (SELECT {_MADE}, trace_id FROM chat_log WHERE trace_id = %(after)s)"
            )
        direction = "ASC" if order == "asc" else "DESC"
        sql += f" ORDER BY {_MADE} {direction}, trace_id {direction} LIMIT %(limit)s"
        rows = await self._db.fetch(sql, {
            "tenant": tenant, "model": model, "metadata": json_text(metadata or {}), "after": after, "limit": limit,
        })
        return [_stored(row) for row in rows]

    async def set_metadata(self, trace_id: str, metadata: dict[str, str]) -> bool:
        """Replace a stored completion's metadata; False when it is no longer stored."""
        return await self._db.fetchval(_SET_METADATA, (json_text(metadata), trace_id)) is not None
