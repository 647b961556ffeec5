"""OpenAI's conversations in PostgreSQL (`0018_conversations.sql`): a conversation's row and
its items, one row each, in the order they were added.

A conversation is its tenant's (`key-<id>`): another's is not found. With auth off (no
tenant asked), every conversation is found, as every stored response is.

A deleted item keeps its row, its `item` a JSON null (`_GONE`): a listing page whose last
item was deleted since is still the cursor of the next (`after` finds its place), and a
response's items appended again (its answer replayed) do not bring it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.infra.postgres import Database, Tx, json_text

# The caller's own conversation, or any without a tenant asked.
_MINE = "id = %(id)s AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)"
_ROW = f"SELECT id, extract(epoch FROM created_at)::bigint, metadata FROM conversations WHERE {_MINE}"
# Locked, so that two appends to one conversation are numbered one after the other.
_LOCKED = f"SELECT 1 FROM conversations WHERE {_MINE} FOR UPDATE"
_APPEND = (
    "INSERT INTO conversation_items (conversation_id, id, item) "
    "SELECT %(id)s, v.item->>'id', v.item FROM jsonb_array_elements(%(items)s::jsonb) WITH ORDINALITY AS v(item, n) "
    "ORDER BY v.n ON CONFLICT (conversation_id, id) DO NOTHING"
)
_ALL_ITEMS = (
    "SELECT i.item, i.seq FROM conversations c LEFT JOIN conversation_items i ON i.conversation_id = c.id "
    "WHERE c.id = %(id)s AND (%(tenant)s::text IS NULL OR c.tenant = %(tenant)s) ORDER BY i.seq"
)
_GONE = "'null'::jsonb"
# The conversation's lock taken for run `trace` of instance `owner` (0020), if it is free: nobody
# holds it, this run does, its holder's instance is gone (judged as a key's owner is, by an
# instance beating steadily: see `chat_store._HOLDER`) or its holder's row says it ended. And
# only while the conversation is as `seen` (its last item's `seq`): a run appended since the
# items were read would be answered from a conversation that no longer is. Says whether the
# conversation is there, and whether the lock was taken.
_LOCK = """
WITH target AS (
    SELECT id, lock_trace, lock_owner FROM conversations WHERE id = %(id)s
        AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s) FOR UPDATE
), taken AS (
    UPDATE conversations c SET lock_trace = %(trace)s, lock_owner = %(owner)s FROM target t
    WHERE c.id = t.id
    AND (t.lock_trace IS NULL OR t.lock_trace = %(trace)s
        OR EXISTS (SELECT 1 FROM chat_log l WHERE l.trace_id = t.lock_trace AND l.status <> 'running')
        OR (NOT EXISTS (SELECT 1 FROM gateway_instances g WHERE g.id = t.lock_owner
                AND g.seen_at > now() - make_interval(secs => %(silent)s))
            AND EXISTS (SELECT 1 FROM gateway_instances me WHERE me.id = %(owner)s
                AND me.seen_at > now() - make_interval(secs => %(late)s)
                AND me.steady_since <= now() - make_interval(secs => %(silent)s))))
    AND coalesce((SELECT max(seq) FROM conversation_items WHERE conversation_id = t.id), 0) = %(seen)s
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM target), EXISTS (SELECT 1 FROM taken)
"""
_UNLOCK = "UPDATE conversations SET lock_trace = NULL, lock_owner = NULL WHERE id = %s AND lock_trace = %s"
# A turn's items written late, with its run's log row (`LogRow.conversation`): nothing when the
# conversation was deleted meanwhile.
_APPEND_PENDING = (
    "WITH c AS (SELECT id FROM conversations WHERE id = %s AND (%s::text IS NULL OR tenant = %s) FOR UPDATE) "
    "INSERT INTO conversation_items (conversation_id, id, item) "
    "SELECT c.id, v.item->>'id', v.item FROM c, jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS v(item, n) "
    "ORDER BY v.n ON CONFLICT (conversation_id, id) DO NOTHING"
)
_KEPT = f"item <> {_GONE}"
_SEQ_OF = "SELECT seq FROM conversation_items WHERE conversation_id = %s AND id = %s"
_PAGE = {
    "asc": f"SELECT item FROM conversation_items WHERE conversation_id = %s AND seq > %s AND {_KEPT} ORDER BY seq LIMIT %s",
    "desc": f"SELECT item FROM conversation_items WHERE conversation_id = %s AND seq < %s AND {_KEPT} "
    "ORDER BY seq DESC LIMIT %s",
}
_NO_CURSOR = {"asc": 0, "desc": 2**63 - 1}


@dataclass(frozen=True, slots=True)
class ConversationRow:
    id: str
    created_at: int  # Unix seconds
    metadata: dict[str, Any]


def _row(found: Any) -> ConversationRow | None:
    return None if found is None else ConversationRow(str(found[0]), int(found[1]), dict(found[2] or {}))


class ConversationStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self, conversation_id: str, tenant: str | None, metadata: dict[str, str], items: list[dict[str, Any]]
    ) -> ConversationRow:
        """Creating one again (its id) finds it as it is: a write that may have committed
        unseen is tried again as it was."""
        async with self._db.transaction() as tx:
            await tx.execute(
                "INSERT INTO conversations (id, tenant, metadata) VALUES (%s, %s, %s::jsonb) ON CONFLICT (id) DO NOTHING",
                (conversation_id, tenant, json_text(metadata)),
            )
            if items:
                await tx.execute(_APPEND, {"id": conversation_id, "items": json_text(items)})
            found = await tx.fetchrow(_ROW, {"id": conversation_id, "tenant": tenant})
        row = _row(found)
        assert row is not None
        return row

    async def get(self, conversation_id: str, tenant: str | None) -> ConversationRow | None:
        return _row(await self._db.fetchrow(_ROW, {"id": conversation_id, "tenant": tenant}))

    async def update(self, conversation_id: str, tenant: str | None, metadata: dict[str, str]) -> ConversationRow | None:
        return _row(await self._db.fetchrow(
            f"UPDATE conversations SET metadata = %(metadata)s::jsonb WHERE {_MINE} "
            "RETURNING id, extract(epoch FROM created_at)::bigint, metadata",
            {"id": conversation_id, "tenant": tenant, "metadata": json_text(metadata)},
        ))

    async def delete(self, conversation_id: str, tenant: str | None) -> bool:
        """The conversation and its items (the responses made in it stay, as on OpenAI)."""
        return bool(await self._db.execute(f"DELETE FROM conversations WHERE {_MINE}", {"id": conversation_id, "tenant": tenant}))

    async def append(self, conversation_id: str, tenant: str | None, items: list[dict[str, Any]]) -> bool:
        """Add `items` (each with its `id`) after the conversation's last; an item whose id it
        holds already is left as it is. False: no such conversation (deleted meanwhile)."""
        async with self._db.transaction() as tx:
            return await _append(tx, conversation_id, tenant, items)

    async def all_items(self, conversation_id: str, tenant: str | None) -> tuple[list[dict[str, Any]], int] | None:
        """Every item, oldest first, and the last one's `seq` (0: none ever); None: no such
        conversation."""
        rows = await self._db.fetch(_ALL_ITEMS, {"id": conversation_id, "tenant": tenant})
        if not rows:
            return None
        # An item None: no items (the join found none), or a deleted one.
        return [row[0] for row in rows if row[0] is not None], int(rows[-1][1] or 0)

    async def lock(
        self, conversation_id: str, tenant: str | None, *, trace: str, owner: str, seen: int, silent: float, late: float
    ) -> tuple[bool, bool]:
        """Take the conversation's lock for run `trace` (see `_LOCK`): whether the conversation
        is there, and whether the lock was taken."""
        found = await self._db.fetchrow(_LOCK, {
            "id": conversation_id, "tenant": tenant, "trace": trace, "owner": owner, "seen": seen,
            "silent": silent, "late": late,
        })
        assert found is not None
        return bool(found[0]), bool(found[1])

    async def unlock(self, conversation_id: str, trace: str) -> None:
        """Give the conversation's lock back, if run `trace` holds it."""
        await self._db.execute(_UNLOCK, (conversation_id, trace))

    async def page(
        self, conversation_id: str, *, after: str | None, limit: int, order: str
    ) -> list[dict[str, Any]] | None:
        """Up to `limit` items after the item `after` (None: from the first) in `order`
        (`asc`: oldest first); None: `after` is no item of the conversation."""
        cursor: int = _NO_CURSOR[order]
        if after is not None:
            seq = await self._db.fetchval(_SEQ_OF, (conversation_id, after))
            if seq is None:
                return None
            cursor = int(seq)
        rows = await self._db.fetch(_PAGE[order], (conversation_id, cursor, limit))
        return [row[0] for row in rows]

    async def item(self, conversation_id: str, item_id: str) -> dict[str, Any] | None:
        found = await self._db.fetchval(
            "SELECT item FROM conversation_items WHERE conversation_id = %s AND id = %s", (conversation_id, item_id)
        )
        return found if isinstance(found, dict) else None

    async def find_item(self, item_id: str, tenant: str | None) -> dict[str, Any] | None:
        """An item of any of the tenant's conversations, by its id (the newest, should two
        conversations hold it: a response's items appended to each)."""
        found = await self._db.fetchval(
            "SELECT i.item FROM conversation_items i JOIN conversations c ON c.id = i.conversation_id "
            f"WHERE i.id = %(item)s AND i.{_KEPT} AND (%(tenant)s::text IS NULL OR c.tenant = %(tenant)s) "
            "ORDER BY i.seq DESC LIMIT 1",
            {"item": item_id, "tenant": tenant},
        )
        return found if isinstance(found, dict) else None

    async def delete_item(self, conversation_id: str, item_id: str) -> bool:
        """Whether the item was there to delete (its row stays: see `_GONE`)."""
        return bool(await self._db.execute(
            f"UPDATE conversation_items SET item = {_GONE} WHERE conversation_id = %s AND id = %s AND {_KEPT}",
            (conversation_id, item_id),
        ))


def pending_turns(turns: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """The statements writing the turns that log rows carry (their trace, their
    `LogRow.conversation`), for the rows' transaction: each turn's items appended, then its
    conversation's lock, which its run kept until now, given back."""
    if not turns:
        return []
    appends = [(turn["id"], turn["tenant"], turn["tenant"], json_text(turn["items"])) for _, turn in turns]
    unlocks = [(turn["id"], trace) for trace, turn in turns]
    return [(_APPEND_PENDING, appends), (_UNLOCK, unlocks)]


async def _append(tx: Tx, conversation_id: str, tenant: str | None, items: list[dict[str, Any]]) -> bool:
    if await tx.fetchval(_LOCKED, {"id": conversation_id, "tenant": tenant}) is None:
        return False
    if items:
        await tx.execute(_APPEND, {"id": conversation_id, "items": json_text(items)})
    return True
