"""The RAG store in PostgreSQL: workspaces, documents, chunks, and the two candidate searches.

Every query that touches chunks filters on the workspace's id, so one workspace can never
see another's documents. Vectors travel as numpy float32 arrays (pgvector adapter in
`proxy.infra.postgres`).

Per-token vectors (for the MaxSim rerank) are stored with each chunk as int8 rows with a
float32 scale per row: 388 bytes a token instead of 1,536, and dot products within 0.01 of
the float32 ones.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from proxy.infra.postgres import Database, Tx, plain_text

DIMENSIONS: Final = 384
# The chunks a full-text query may be estimated to match (see `_CANDIDATES_SQL`).
LEXICAL_MAX_ROWS: Final = 2000
Vectors = npt.NDArray[np.float32]


# -- token vectors -----------------------------------------------------------------------------


def pack_token_vectors(vectors: Vectors) -> bytes:
    """`(n, 384)` float32 rows -> n float32 scales followed by n x 384 int8 values."""
    rows = np.asarray(vectors, dtype=np.float32).reshape(-1, DIMENSIONS)
    scales = np.abs(rows).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    quantised = np.rint(rows / scales[:, None]).astype(np.int8)
    return bytes(scales.astype("<f4").tobytes() + quantised.tobytes())


def unpack_token_vectors(data: bytes) -> Vectors:
    """The inverse of `pack_token_vectors`, rows renormalised to unit length."""
    count = len(data) // (4 + DIMENSIONS)
    if count == 0:
        return np.empty((0, DIMENSIONS), np.float32)
    scales = np.frombuffer(data, dtype="<f4", count=count)
    values = np.frombuffer(data, dtype=np.int8, offset=4 * count).reshape(count, DIMENSIONS)
    rows = values.astype(np.float32) * scales[:, None]
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.asarray(rows / np.clip(norms, 1e-12, None), dtype=np.float32)


# -- rows ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workspace:
    id: int
    name: str
    language: str
    settings: dict[str, Any]
    revision: int


@dataclass(frozen=True, slots=True)
class WorkspaceSummary:
    name: str
    language: str
    settings: dict[str, Any]
    documents: int
    chunks: int
    created_at: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class DocumentRow:
    id: str
    source: str
    media_type: str
    metadata: dict[str, Any]
    content_hash: str
    chars: int
    chunks: int
    created_at: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class NewChunk:
    heading: str
    content: str
    embedding: Vectors
    token_vectors: Vectors


@dataclass(frozen=True, slots=True)
class NewDocument:
    source: str
    content_hash: str
    chunker: str
    media_type: str
    metadata: dict[str, Any]
    chars: int
    chunks: list[NewChunk] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ChunkRow:
    id: int
    document_id: str
    source: str
    ordinal: int
    heading: str
    content: str
    metadata: dict[str, Any]
    token_vectors: Vectors


# -- the store -----------------------------------------------------------------------------------

_WORKSPACE_COLUMNS = "id, name, language::text, settings, revision"


def _workspace(row: Sequence[Any]) -> Workspace:
    return Workspace(id=int(row[0]), name=str(row[1]), language=str(row[2]), settings=dict(row[3] or {}), revision=int(row[4]))


def _iso(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


class RagStore:
    """Queries over one `Database`; create per use (it holds nothing but the handle)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- workspaces --

    async def workspace(self, name: str) -> Workspace | None:
        row = await self._db.fetchrow(f"SELECT {_WORKSPACE_COLUMNS} FROM rag_workspaces WHERE name = %s", (name,))
        return None if row is None else _workspace(row)

    async def ensure_workspace(self, name: str, *, language: str | None = None) -> Workspace:
        """The workspace `name`, created (with `language`, default English) if missing."""
        row = await self._db.fetchrow(
            f"INSERT INTO rag_workspaces (name, language) VALUES (%s, COALESCE(%s::regconfig, 'english'))"
            f" ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING {_WORKSPACE_COLUMNS}",
            (name, language),
        )
        assert row is not None
        return _workspace(row)

    async def configure_workspace(self, name: str, settings: dict[str, Any], *, language: str | None) -> Workspace:
        """Create or update a workspace's retrieval settings (merged into the existing ones).
        The language can only be chosen while the workspace has no chunks. Changed settings
        bump the revision: answers retrieved with the old ones (semantic cache) are stale."""
        async with self._db.transaction() as tx:
            row = await tx.fetchrow(
                f"INSERT INTO rag_workspaces (name, language, settings) VALUES (%s, COALESCE(%s::regconfig, 'english'), %s)"
                f" ON CONFLICT (name) DO UPDATE SET settings = rag_workspaces.settings || EXCLUDED.settings,"
                f" revision = rag_workspaces.revision"
                f" + (rag_workspaces.settings <> (rag_workspaces.settings || EXCLUDED.settings))::int,"
                f" updated_at = now() RETURNING {_WORKSPACE_COLUMNS}",
                (name, language, json.dumps(settings)),
            )
            assert row is not None
            workspace = _workspace(row)
            if language is not None and workspace.language != language:
                if await tx.fetchval("SELECT EXISTS (SELECT FROM rag_chunks WHERE workspace_id = %s)", (workspace.id,)):
                    raise LanguageLocked(workspace.language)
                row = await tx.fetchrow(
                    f"UPDATE rag_workspaces SET language = %s::regconfig, revision = revision + 1 WHERE id = %s"
                    f" RETURNING {_WORKSPACE_COLUMNS}",
                    (language, workspace.id),
                )
                assert row is not None
                workspace = _workspace(row)
        return workspace

    async def language_exists(self, language: str) -> bool:
        return bool(await self._db.fetchval("SELECT EXISTS (SELECT FROM pg_ts_config WHERE cfgname = %s)", (language,)))

    async def list_workspaces(self) -> list[WorkspaceSummary]:
        rows = await self._db.fetch(
            "SELECT w.name, w.language::text, w.settings, w.created_at, w.updated_at,"
            " (SELECT count(*) FROM rag_documents d WHERE d.workspace_id = w.id),"
            " (SELECT COALESCE(sum(chunk_count), 0) FROM rag_documents d WHERE d.workspace_id = w.id)"
            " FROM rag_workspaces w ORDER BY w.name"
        )
        return [
            WorkspaceSummary(
                name=r[0], language=r[1], settings=dict(r[2] or {}), created_at=_iso(r[3]), updated_at=_iso(r[4]),
                documents=int(r[5]), chunks=int(r[6]),
            )
            for r in rows
        ]

    async def delete_workspace(self, name: str) -> bool:
        async with self._db.transaction() as tx:
            count = await tx.execute("DELETE FROM rag_workspaces WHERE name = %s", (name,))
            await tx.execute("DELETE FROM semantic_cache WHERE workspace = %s", (name,))
        return count > 0

    # -- documents --

    async def document_state(self, workspace_id: int, source: str) -> tuple[str, str, str, dict[str, Any]] | None:
        """(id, content hash, chunker signature, metadata) of the document from `source`."""
        row = await self._db.fetchrow(
            "SELECT id::text, content_hash, chunker, metadata FROM rag_documents WHERE workspace_id = %s AND source = %s",
            (workspace_id, source),
        )
        return None if row is None else (row[0], row[1], row[2], dict(row[3] or {}))

    async def update_metadata(self, workspace_id: int, document_id: str, metadata: dict[str, Any]) -> None:
        await self._db.execute(
            "UPDATE rag_documents SET metadata = %s, updated_at = now() WHERE id = %s AND workspace_id = %s",
            (json.dumps(metadata), document_id, workspace_id),
        )

    async def put_document(
        self, workspace: Workspace, document: NewDocument, progressed: Callable[[], None] | None = None
    ) -> tuple[str, str]:
        """Insert the document with its chunks, replacing an earlier one from the same source,
        in one transaction. Returns (document id, "created" | "updated" | "unchanged"):
        unchanged when the stored one already has this text, chunker and metadata.
        `progressed` is called as each batch of chunks is written."""
        async with self._db.transaction() as tx:
            # Ingests of one source queue here, so each sees the one before it committed: else
            # two would both find no row (or delete the same one) and the second insert would
            # hit the unique (workspace, source). Held until the transaction ends.
            await tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, %s))", (document.source, workspace.id)
            )
            previous = await tx.fetchrow(
                "SELECT id::text, content_hash, chunker, metadata FROM rag_documents"
                " WHERE workspace_id = %s AND source = %s",
                (workspace.id, document.source),
            )
            if previous is not None and (previous[1], previous[2], dict(previous[3] or {})) == (
                document.content_hash, document.chunker, document.metadata
            ):
                return str(previous[0]), "unchanged"  # the same document, stored meanwhile
            if previous is None:
                document_id = str(uuid.uuid4())
                await tx.execute(
                    "INSERT INTO rag_documents (id, workspace_id, source, content_hash, chunker, media_type, metadata,"
                    " chars, chunk_count) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (document_id, workspace.id, document.source, document.content_hash, document.chunker,
                     document.media_type, json.dumps(document.metadata), document.chars, len(document.chunks)),
                )
            else:
                # The same document (its source), changed: its id and creation stay what its
                # client was told (and may delete it by), only its text and chunks are new.
                document_id = str(previous[0])
                await tx.execute("DELETE FROM rag_chunks WHERE document_id = %s", (document_id,))
                await tx.execute(
                    "UPDATE rag_documents SET content_hash = %s, chunker = %s, media_type = %s, metadata = %s,"
                    " chars = %s, chunk_count = %s, updated_at = now() WHERE id = %s",
                    (document.content_hash, document.chunker, document.media_type, json.dumps(document.metadata),
                     document.chars, len(document.chunks), document_id),
                )
            await _insert_chunks(tx, workspace, document_id, document.chunks, progressed)
            await tx.execute(
                "UPDATE rag_workspaces SET revision = revision + 1, updated_at = now() WHERE id = %s", (workspace.id,)
            )
        return document_id, "created" if previous is None else "updated"

    async def list_documents(self, workspace_id: int, *, limit: int, offset: int) -> list[DocumentRow]:
        rows = await self._db.fetch(
            f"SELECT {_DOCUMENT_COLUMNS} FROM rag_documents WHERE workspace_id = %s ORDER BY source LIMIT %s OFFSET %s",
            (workspace_id, limit, offset),
        )
        return [_document_row(r) for r in rows]

    async def get_document(self, workspace_id: int, document_id: str) -> DocumentRow | None:
        """One document as the list shows it; None unless it is in the workspace (`document_id`
        a UUID)."""
        rows = await self._db.fetch(
            f"SELECT {_DOCUMENT_COLUMNS} FROM rag_documents WHERE workspace_id = %s AND id = %s",
            (workspace_id, document_id),
        )
        return _document_row(rows[0]) if rows else None

    async def count_documents(self, workspace_id: int) -> int:
        return int(await self._db.fetchval("SELECT count(*) FROM rag_documents WHERE workspace_id = %s", (workspace_id,)))

    async def delete_document(self, workspace_id: int, document_id: str) -> bool:
        async with self._db.transaction() as tx:
            count = await tx.execute(
                "DELETE FROM rag_documents WHERE workspace_id = %s AND id = %s", (workspace_id, document_id)
            )
            if count:
                await tx.execute(
                    "UPDATE rag_workspaces SET revision = revision + 1, updated_at = now() WHERE id = %s",
                    (workspace_id,),
                )
        return count > 0

    # -- retrieval --

    async def candidates(
        self, workspace: Workspace, vector: Vectors, query: str, limit: int
    ) -> tuple[list[int], list[int]]:
        """The workspace's chunk ids nearest to `vector` (HNSW, cosine) and best matching
        `query` (full text, any of its words), each best first, at most `limit` each."""
        # Iterative scans keep walking the HNSW graph until `limit` chunks of this
        # workspace are found, however many other workspaces' chunks lie in between.
        settings = {"hnsw.iterative_scan": "relaxed_order", "hnsw.ef_search": str(max(40, int(limit)))}
        rows = await self._db.fetch_with_settings(
            settings, _CANDIDATES_SQL, {"ws": workspace.id, "v": vector, "q": _query(query), "lang": workspace.language,
                                        "n": limit, "max_rows": LEXICAL_MAX_ROWS},
        )
        dense = [int(r[1]) for r in rows if r[0] == "v"]
        lexical = [int(r[1]) for r in rows if r[0] == "t"]
        return dense, lexical

    async def full_text_terms(self, workspace: Workspace, query: str) -> list[str]:
        """The lexemes of `query` a full-text search uses (see `_CANDIDATES_SQL`)."""
        rows = await self._db.fetch(
            _TERMS_SQL, {"q": _query(query), "lang": workspace.language, "max_rows": LEXICAL_MAX_ROWS}
        )
        return [str(row[0]) for row in rows]

    async def chunks(
        self, workspace_id: int, ids: Sequence[int], cache: TokenVectorCache | None = None
    ) -> dict[int, ChunkRow]:
        """The chunks `ids` of the workspace, with their token vectors (from `cache` when it
        has them: then the database does not even read them)."""
        cached = cache.known(ids) if cache is not None else []
        rows = await self._db.fetch(
            "SELECT c.id, c.document_id::text, d.source, c.ordinal, c.heading, c.content, d.metadata,"
            " CASE WHEN c.id = ANY(%s) THEN NULL ELSE c.token_vectors END"
            " FROM rag_chunks c JOIN rag_documents d ON d.id = c.document_id"
            " WHERE c.workspace_id = %s AND c.id = ANY(%s)",
            (cached, workspace_id, list(ids)),
        )
        out = {}
        for r in rows:
            chunk_id = int(r[0])
            packed = bytes(r[7]) if r[7] is not None else cache.get(chunk_id) if cache is not None else None
            if packed is None:  # evicted between `known` and now: rare, and cheap to fetch alone
                packed = bytes(await self._db.fetchval("SELECT token_vectors FROM rag_chunks WHERE id = %s", (chunk_id,)))
            if cache is not None and r[7] is not None:
                cache.put(chunk_id, packed)
            out[chunk_id] = ChunkRow(
                id=chunk_id, document_id=r[1], source=r[2], ordinal=int(r[3]), heading=r[4], content=r[5],
                metadata=dict(r[6] or {}), token_vectors=unpack_token_vectors(packed),
            )
        return out


class TokenVectorCache:
    """Packed token vectors by chunk id, least recently used out beyond `max_bytes`. Never
    stale: a chunk's id is never reused and its content never changes (a changed document
    gets new chunks), so a cached entry is right for as long as it is asked for."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[int, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def known(self, ids: Sequence[int]) -> list[int]:
        found = [i for i in ids if i in self._entries]
        self.hits += len(found)
        self.misses += len(ids) - len(found)
        return found

    def get(self, chunk_id: int) -> bytes | None:
        packed = self._entries.get(chunk_id)
        if packed is not None:
            self._entries.move_to_end(chunk_id)
        return packed

    def put(self, chunk_id: int, packed: bytes) -> None:
        if len(packed) > self._max_bytes:
            return
        previous = self._entries.pop(chunk_id, None)
        if previous is not None:
            self._bytes -= len(previous)
        self._entries[chunk_id] = packed
        self._bytes += len(packed)
        while self._bytes > self._max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted)


class LanguageLocked(Exception):
    """A workspace's full-text language cannot change once it has chunks."""

    def __init__(self, language: str) -> None:
        super().__init__(language)
        self.language = language


# Dense candidates are re-sorted after the relaxed-order index scan. The full-text query ORs
# the question's lexemes (normalised by the workspace's language, stop words dropped) — but
# ranking every match is what makes full-text search slow, and an OR of common words matches
# most of a big table (while adding little: the vector side covers what common words say). So
# lexemes are taken rarest first, by the planner's statistics, while together they are
# estimated to match at most `max_rows` chunks; a lexeme the statistics do not list as common
# counts as rare, and a table without statistics (small, or just loaded) keeps them all.
_LEXEMES = """common AS (
    SELECT e.elem, e.freq
    FROM pg_stats s, unnest(s.most_common_elems::text::text[], s.most_common_elem_freqs) AS e(elem, freq)
    WHERE s.schemaname = current_schema() AND s.tablename = 'rag_chunks' AND s.attname = 'tsv'
), terms AS (
    SELECT t.lexeme, COALESCE(c.freq, 0) AS freq
    FROM unnest(to_tsvector(%(lang)s::regconfig, %(q)s)) AS t LEFT JOIN common c ON c.elem = t.lexeme
), kept AS (
    SELECT lexeme FROM (
        SELECT lexeme, sum(freq) OVER (ORDER BY freq, lexeme)
                       * (SELECT GREATEST(reltuples, 0) FROM pg_class WHERE oid = 'rag_chunks'::regclass) AS reach
        FROM terms
    ) ranked
    WHERE reach <= %(max_rows)s ORDER BY reach LIMIT 16
)"""

_CANDIDATES_SQL = f"""
WITH dense AS MATERIALIZED (
    SELECT id, embedding <=> %(v)s AS distance FROM rag_chunks
    WHERE workspace_id = %(ws)s ORDER BY distance LIMIT %(n)s
), {_LEXEMES}, q AS (
    SELECT string_agg(quote_literal(lexeme), ' | ')::tsquery AS query FROM kept
), lexical AS (
    SELECT c.id, ts_rank(c.tsv, q.query, 1) AS rank FROM rag_chunks c, q
    WHERE q.query IS NOT NULL AND c.workspace_id = %(ws)s AND c.tsv @@ q.query
    ORDER BY rank DESC, c.id LIMIT %(n)s
)
(SELECT 'v', id FROM dense ORDER BY distance, id)
UNION ALL
(SELECT 't', id FROM lexical ORDER BY rank DESC, id)
"""

_TERMS_SQL = f"WITH {_LEXEMES} SELECT lexeme FROM kept ORDER BY lexeme"


def _query(text: str) -> str:
    """A question as full-text search takes it: PostgreSQL refuses a NUL in any text (a
    client's stray `\u0000` would fail the search), and the replacement separates words as
    the NUL did."""
    return plain_text(text[:4000])


async def _insert_chunks(
    tx: Tx, workspace: Workspace, document_id: str, chunks: list[NewChunk], progressed: Callable[[], None] | None
) -> None:
    for start in range(0, len(chunks), _INSERT_BATCH):
        batch = chunks[start : start + _INSERT_BATCH]
        values = ", ".join(["(%s, %s, %s, %s, %s, %s, %s::regconfig, %s)"] * len(batch))
        params: list[Any] = []
        for ordinal, item in enumerate(batch, start):
            params += [workspace.id, document_id, ordinal, item.heading, item.content, item.embedding,
                       workspace.language, pack_token_vectors(item.token_vectors)]
        await tx.execute(
            "INSERT INTO rag_chunks (workspace_id, document_id, ordinal, heading, content, embedding, language,"
            f" token_vectors) VALUES {values}",
            params,
        )
        if progressed is not None:
            progressed()


_INSERT_BATCH = 64


__all__ = [
    "ChunkRow",
    "DocumentRow",
    "LanguageLocked",
    "NewChunk",
    "NewDocument",
    "RagStore",
    "TokenVectorCache",
    "Workspace",
    "WorkspaceSummary",
    "pack_token_vectors",
    "unpack_token_vectors",
]


_DOCUMENT_COLUMNS = "id::text, source, media_type, metadata, content_hash, chars, chunk_count, created_at, updated_at"


def _document_row(r: Sequence[Any]) -> DocumentRow:
    return DocumentRow(
        id=r[0], source=r[1], media_type=r[2], metadata=dict(r[3] or {}), content_hash=r[4], chars=int(r[5]),
        chunks=int(r[6]), created_at=_iso(r[7]), updated_at=_iso(r[8]),
    )
