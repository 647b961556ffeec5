"""RAG store, ingestion and retrieval on real PostgreSQL + pgvector and the real ONNX model:
retrieval quality on labelled questions, workspace isolation, idempotent re-ingest, delete,
the HTTP API and `llm-proxy ingest`."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
import trio
import trio_asyncio

import proxy.services.rag
from proxy.cli import main
from proxy.config import RagSettings
from proxy.domain.errors import GatewayError
from proxy.infra.embedder import LocalEmbedder, maxsim
from proxy.infra.migrations import migrate
from proxy.infra.postgres import ConstraintViolation, Database, open_database
from proxy.infra.rag_store import TokenVectorCache, pack_token_vectors, unpack_token_vectors
from proxy.services.rag import (
    DocumentInput,
    RagService,
    _database_errors,
    pool_token_vectors,
    reciprocal_rank_fusion,
)
from tests.harness import running_gateway
from tests.rag_corpus import API, BREAD, CORPUS, DOCUMENTS, HANDBOOK, POSTGRES, QUESTIONS, UNRELATED

pytest_plugins = ["tests.infra_servers", "tests.rag_fixtures"]


@pytest.fixture
async def gateway_url(corpus_url: str) -> AsyncIterator[str]:
    async with running_gateway(database_url=corpus_url) as url:
        yield url


@pytest.fixture
async def db(aio_loop: trio_asyncio.TrioEventLoop, pg_database_url: str) -> AsyncIterator[Database]:
    async with open_database(pg_database_url) as database:
        await migrate(database)
        yield database


def service(db: Database, embedder: LocalEmbedder, **settings: Any) -> RagService:
    return RagService(RagSettings(**settings), lambda: db, embedder)


async def search(http: httpx.AsyncClient, url: str, workspace: str, query: str, **options: Any) -> httpx.Response:
    return await http.post(f"{url}/v1/workspaces/{workspace}/search", json={"query": query, **options})


# -- pure pieces -----------------------------------------------------------------------------------


def test_reciprocal_rank_fusion_rewards_agreement() -> None:
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 4, 1]], k=60)
    assert [item for item, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 63)


def test_token_vectors_survive_int8_packing() -> None:
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((50, 384)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    packed = pack_token_vectors(rows)
    assert len(packed) == 50 * (384 + 4)
    restored = unpack_token_vectors(packed)
    similarities = rows @ restored.T
    assert np.abs(np.diag(similarities) - 1).max() < 1e-3
    assert np.abs(similarities - rows @ rows.T).max() < 0.01


def test_token_pooling_keeps_a_third_of_the_vectors_and_their_maxsim() -> None:
    rng = np.random.default_rng(3)
    topics = rng.standard_normal((8, 384)).astype(np.float32)
    tokens = topics[rng.integers(0, 8, 120)] + 0.3 * rng.standard_normal((120, 384)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    pooled = pool_token_vectors(tokens)
    assert pooled.shape == (40, 384)
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(pooled, pool_token_vectors(tokens))  # deterministic
    query = topics[:2] / np.linalg.norm(topics[:2], axis=1, keepdims=True)
    assert maxsim(query, pooled) == pytest.approx(maxsim(query, tokens), abs=0.05)
    assert pool_token_vectors(tokens[:2]).shape == (1, 384)


def test_token_vector_cache_evicts_the_least_recently_used_by_size() -> None:
    cache = TokenVectorCache(max_bytes=300)
    for chunk_id in (1, 2, 3):
        cache.put(chunk_id, bytes(100))
    assert cache.get(1) is not None  # 1 is now the most recent
    cache.put(4, bytes(100))
    assert cache.known([1, 2, 3, 4]) == [1, 3, 4]
    cache.put(5, bytes(1000))  # larger than the whole cache: not kept, nothing evicted
    assert cache.known([1, 3, 4, 5]) == [1, 3, 4]


# -- retrieval quality -----------------------------------------------------------------------------


async def test_each_labelled_question_finds_its_chunk_in_the_top_3(gateway_url: str) -> None:
    ranks = {}
    async with httpx.AsyncClient(timeout=30) as http:
        for question, source, heading in QUESTIONS:
            response = await search(http, gateway_url, CORPUS, question, top_k=3, score_threshold=-1)
            assert response.status_code == 200, response.text
            passages = response.json()["data"]
            ranks[question] = next(
                (i for i, p in enumerate(passages) if p["source"] == source and heading in p["heading"]), None
            )
    missed = [question for question, rank in ranks.items() if rank is None]
    assert not missed, ranks
    # Not merely top 3: with this corpus every answer should rank first.
    assert sum(rank == 0 for rank in ranks.values()) >= len(QUESTIONS) - 1, ranks


async def test_passages_below_the_threshold_are_dropped(gateway_url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        unrelated = (await search(http, gateway_url, CORPUS, UNRELATED)).json()
        related = (await search(http, gateway_url, CORPUS, "What does E1147 mean?")).json()
    assert unrelated["data"] == [] and unrelated["candidates"] > 0
    top = related["data"][0]
    assert top["source"] == "docs/api.md" and "E1147" in top["content"]
    assert top["metadata"] == {"team": "platform"}
    assert all(p["score"] >= RagSettings().score_threshold for p in related["data"])
    assert len(related["data"]) <= RagSettings().top_k


async def test_unknown_and_invalid_workspaces(gateway_url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        missing = await search(http, gateway_url, "nope", "anything")
        invalid = await search(http, gateway_url, "-bad", "anything")
        documents = await http.get(f"{gateway_url}/v1/workspaces/nope/documents")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "workspace_not_found"
    assert invalid.status_code == 400
    assert documents.status_code == 404
    # The name came from the URL, not from an `x-workspace` header: no header is blamed.
    assert missing.json()["error"]["param"] is None and documents.json()["error"]["param"] is None


# -- isolation, idempotency, deletion --------------------------------------------------------------


async def test_workspaces_are_isolated(db: Database, embedder: LocalEmbedder) -> None:
    rag = service(db, embedder, score_threshold=-1.0, top_k=20)
    await rag.ingest("big", DOCUMENTS)
    await rag.ingest("small", [DocumentInput(HANDBOOK, "markdown", "handbook.md")])
    big = {row[0] for row in await db.fetch("SELECT c.id FROM rag_chunks c JOIN rag_workspaces w ON w.id = c.workspace_id WHERE w.name = 'big'")}

    # The answer lives only in `big`: `small` must still answer with its own chunks only,
    # from both the vector and the full-text side.
    for question in ("What does E1147 mean?", "How long do we keep the nightly database backups?"):
        retrieval = await rag.retrieve("small", question)
        assert retrieval.passages, question
        assert all(p.source == "handbook.md" for p in retrieval.passages)
        assert not {p.chunk_id for p in retrieval.passages} & big
    # And the small workspace is found through the HNSW index despite the bigger neighbour.
    vacation = await rag.retrieve("small", "How many days of vacation do I get?")
    assert "Vacation" in vacation.passages[0].heading
    # Asked again, the candidates' token vectors come from memory, with the same answer.
    hits = rag.token_cache.hits
    again = await rag.retrieve("small", "How many days of vacation do I get?")
    assert rag.token_cache.hits - hits == again.candidates > 0
    assert [(p.chunk_id, round(p.score, 5)) for p in again.passages] == [
        (p.chunk_id, round(p.score, 5)) for p in vacation.passages
    ]


async def test_a_word_the_model_cannot_read_matches_nothing(db: Database, embedder: LocalEmbedder) -> None:
    # An emoji, a Thai word, a base64 blob: each is [UNK] to the model, whose vector matched
    # every other [UNK] perfectly. A question with an emoji was given a chunk of base64 as
    # its best passage (score 1.0), and a question in Thai any chunk of it.
    rag = service(db, embedder)
    blob = "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" * 300
    await rag.ingest("ws", [DocumentInput("# Logo\n\nThe logo is below.\n\n" + blob, "markdown", "logo.md"),
                            DocumentInput(API, "markdown", "docs/api.md")])
    assert (await rag.retrieve("ws", "🚀🚀")).passages == []
    assert (await rag.retrieve("ws", "ต้มยำกุ้งทำอย่างไร")).passages == []
    mixed = await rag.retrieve("ws", "What does E1147 mean? 🚀")
    assert mixed.passages and mixed.passages[0].source == "docs/api.md"
    assert all(blob[-200:] not in p.content for p in mixed.passages)


async def test_common_words_are_left_out_of_full_text_queries(db: Database, embedder: LocalEmbedder) -> None:
    rag = service(db, embedder, score_threshold=-1.0)
    await rag.ingest("ws", [DocumentInput(POSTGRES, "markdown", "postgres.md")])
    # Another workspace's 3,000 chunks all mention "database": a full-text OR over that word
    # would rank them all. Statistics tell the query to leave it out.
    await db.execute(
        "WITH w AS (INSERT INTO rag_workspaces (name) VALUES ('filler') RETURNING id),"
        " d AS (INSERT INTO rag_documents (workspace_id, source, content_hash, chunker, media_type, chars, chunk_count)"
        "       SELECT id, 'filler.md', 'x', 'x', 'text/plain', 0, 3000 FROM w RETURNING id, workspace_id)"
        " INSERT INTO rag_chunks (workspace_id, document_id, ordinal, content, embedding, token_vectors)"
        " SELECT d.workspace_id, d.id, g, 'Notes on database number ' || g,"
        "        array_fill(0.05::real, ARRAY[384])::vector, ''::bytea FROM d, generate_series(1, 3000) g"
    )
    question = "How long do we keep the nightly database backups?"
    workspace = await rag.workspace("ws")
    assert "databas" in await rag.store().full_text_terms(workspace, question)  # no statistics yet
    await db.execute("ANALYZE rag_chunks")
    terms = await rag.store().full_text_terms(workspace, question)
    assert terms == ["backup", "keep", "long", "night"]
    retrieval = await rag.retrieve("ws", question)
    assert "Backups" in retrieval.passages[0].heading


async def test_reingest_is_idempotent_and_changes_replace(db: Database, embedder: LocalEmbedder) -> None:
    rag = service(db, embedder)
    first = await rag.ingest("ws", [DocumentInput(API, "markdown", "api.md", {"v": 1})])
    chunk_ids = await db.fetch("SELECT id FROM rag_chunks ORDER BY id")
    revision = await db.fetchval("SELECT revision FROM rag_workspaces WHERE name = 'ws'")

    again = await rag.ingest("ws", [DocumentInput(API, "markdown", "api.md", {"v": 1})])
    assert [r.status for r in again] == ["unchanged"]
    assert again[0].id == first[0].id
    assert await db.fetch("SELECT id FROM rag_chunks ORDER BY id") == chunk_ids
    assert await db.fetchval("SELECT revision FROM rag_workspaces WHERE name = 'ws'") == revision

    # Same text, new metadata: updated in place, nothing re-embedded.
    relabelled = await rag.ingest("ws", [DocumentInput(API, "markdown", "api.md", {"v": 2})])
    assert relabelled[0].status == "updated" and relabelled[0].id == first[0].id
    assert await db.fetch("SELECT id FROM rag_chunks ORDER BY id") == chunk_ids

    created = await db.fetchval("SELECT created_at FROM rag_documents")
    changed = API.replace("600 requests per minute", "900 requests per minute")
    updated = await rag.ingest("ws", [DocumentInput(changed, "markdown", "api.md")])
    # Changed text: still the same document, under the id its client was given (and deletes by).
    assert updated[0].status == "updated" and updated[0].id == first[0].id
    assert await db.fetchrow("SELECT id::text, created_at, updated_at > created_at FROM rag_documents") == (
        first[0].id, created, True)
    contents = [row[0] for row in await db.fetch("SELECT content FROM rag_chunks")]
    assert any("900 requests" in c for c in contents) and not any("600 requests" in c for c in contents)
    assert await db.fetchval("SELECT revision FROM rag_workspaces WHERE name = 'ws'") == revision + 1

    # Without a source the content hash names the document: posting it twice is one document.
    nameless = [await rag.ingest("ws", [DocumentInput(HANDBOOK)]) for _ in range(2)]
    assert [r[0].status for r in nameless] == ["created", "unchanged"]
    assert nameless[0][0].source.startswith("sha256:")


async def test_a_document_of_words_the_model_cannot_read_is_reindexed_once(db: Database, embedder: LocalEmbedder) -> None:
    # Its chunks were sized as if each Thai word were one token (thousands of characters a
    # chunk): indexed so, it is made again at its next ingest, though unchanged; others are not.
    rag = service(db, embedder)
    thai = "# ภาษาไทย\n\n" + "ภาษาไทยเป็นภาษาที่มีระดับเสียงของคำแน่นอนหรือวรรณยุกต์เช่นเดียวกับภาษาจีน " * 60
    documents = [DocumentInput(thai, "markdown", "thai.md"), DocumentInput(API, "markdown", "api.md")]
    await rag.ingest("ws", documents)
    await db.execute("UPDATE rag_documents SET chunker = %s", (rag.signature,))  # as indexed before
    assert [r.status for r in await rag.ingest("ws", documents)] == ["updated", "unchanged"]
    assert [r.status for r in await rag.ingest("ws", documents)] == ["unchanged", "unchanged"]
    longest = await db.fetchval("SELECT max(length(content)) FROM rag_chunks c JOIN rag_documents d"
                                " ON d.id = c.document_id WHERE d.source = 'thai.md'")
    assert longest <= 4 * 250 + 64


async def test_concurrent_ingests_of_one_source_end_as_one_document(db: Database, embedder: LocalEmbedder) -> None:
    rag = service(db, embedder)
    await rag.ingest("ws", [DocumentInput(BREAD, "html", "other.html")])  # the workspace exists

    async def ingest_all(texts: list[str]) -> list[str]:
        statuses: list[str] = []

        async def one(text: str) -> None:
            (result,) = await rag.ingest("ws", [DocumentInput(text, "markdown", "race.md")])
            statuses.append(result.status)

        async with trio.open_nursery() as nursery:
            for text in texts:
                nursery.start_soon(one, text)
        return statuses

    async def race_documents() -> list[tuple[str, int]]:
        return [(row[0], row[1]) for row in await db.fetch(
            "SELECT d.id::text, (SELECT count(*) FROM rag_chunks c WHERE c.document_id = d.id)"
            " FROM rag_documents d WHERE source = 'race.md'")]

    # Different versions at once: each replaces the one before it (no unique violation).
    statuses = await ingest_all([f"# Parking\n\nVersion {i}: park in spot {i}." for i in range(6)])
    assert sorted(statuses) == ["created"] + ["updated"] * 5
    assert len(await race_documents()) == 1
    # The same text at once: stored once, the others find it there.
    same = "# Parking\n\nPark anywhere on level 2."
    statuses = await ingest_all([same] * 6)
    assert sorted(statuses) == ["unchanged"] * 5 + ["updated"]
    ((_, chunks),) = await race_documents()
    assert chunks == 1
    revision = await db.fetchval("SELECT revision FROM rag_workspaces WHERE name = 'ws'")
    assert revision == 1 + 6 + 1  # an unchanged document leaves the semantic cache valid


def test_a_conflicting_write_is_a_409_without_the_schema_in_it() -> None:
    # A unique or foreign-key violation (a workspace deleted mid-ingest, say) is no outage:
    # a 503 would invite the client to retry at once.
    with pytest.raises(GatewayError) as caught, _database_errors():
        raise ConstraintViolation('duplicate key value violates unique constraint "rag_documents_key"', sqlstate="23505")
    assert caught.value.status == 409 and caught.value.retry_after is None
    assert "rag_documents" not in caught.value.message


async def test_deleting_documents_and_workspaces(db: Database, embedder: LocalEmbedder) -> None:
    rag = service(db, embedder, score_threshold=-1.0)
    results = await rag.ingest("ws", [DocumentInput(API, "markdown", "api.md"), DocumentInput(BREAD, "html", "bread.html")])
    store = rag.store()
    workspace = await rag.workspace("ws")
    assert await store.delete_document(workspace.id, results[0].id)
    assert not await store.delete_document(workspace.id, results[0].id)
    retrieval = await rag.retrieve("ws", "What does E1147 mean?")
    assert {p.source for p in retrieval.passages} == {"bread.html"}
    assert await db.fetchval("SELECT count(*) FROM rag_chunks WHERE document_id = %s", (results[0].id,)) == 0
    assert await store.delete_workspace("ws")
    assert await db.fetchval("SELECT count(*) FROM rag_chunks") == 0
    assert not await store.delete_workspace("ws")


# -- HTTP ------------------------------------------------------------------------------------------


async def test_http_document_lifecycle(pg_database_url: str) -> None:
    async with running_gateway(database_url=pg_database_url) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        created = await http.post("/v1/workspaces/docs/documents", json={"documents": [
            {"content": API, "source": "api.md", "metadata": {"team": "platform"}},
            {"content": BREAD, "source": "bread.html"},
        ]})
        assert created.status_code == 201, created.text
        assert [d["status"] for d in created.json()["data"]] == ["created", "created"]
        again = await http.post("/v1/workspaces/docs/documents", json={"content": API, "source": "api.md",
                                                                       "metadata": {"team": "platform"}})
        assert again.status_code == 200 and again.json()["data"][0]["status"] == "unchanged"
        # Both are in the OpenAPI document, so a client generated from it takes either.
        paths = (await http.get("/openapi.json")).json()["paths"]
        ingest = paths["/v1/workspaces/{ws}/documents"]["post"]
        assert {"200", "201"} <= set(ingest["responses"])
        # What the endpoints take, as a client generated from the document would send it.
        assert set(ingest["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
        put = paths["/v1/workspaces/{ws}"]["put"]["requestBody"]["content"]["application/json"]["schema"]
        assert {"top_k", "score_threshold", "candidates", "rerank", "settings", "language"} <= set(put["properties"])
        query = paths["/v1/workspaces/{ws}/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "minLength" not in query["properties"]["query"]
        assert (await search(http, url, "docs", "")).json()["data"] == []

        upload = await http.post(
            "/v1/workspaces/docs/documents",
            files=[("file", ("handbook.md", HANDBOOK.encode(), "text/markdown")),
                   ("file", ("notes.txt", b"Plain notes about nothing in particular.", "text/plain"))],
            data={"metadata": '{"uploaded": true}'},
        )
        assert upload.status_code == 201, upload.text
        # One document without text fails the request before anything is written.
        mixed = await http.post("/v1/workspaces/docs/documents", json={"documents": [
            {"content": "# New\n\nFresh text.", "source": "new.md"}, {"content": " ", "source": "blank.md"}]})
        assert mixed.status_code == 400 and "blank.md" in mixed.json()["error"]["message"]
        for query in ("limit=0", "limit=%C2%B2", "offset=" + "9" * 5000, "offset=-1"):
            refused = await http.get(f"/v1/workspaces/docs/documents?{query}")
            assert refused.status_code == 400, (query, refused.text)
        listed = (await http.get("/v1/workspaces/docs/documents")).json()
        assert listed["total"] == 4
        by_source = {d["source"]: d for d in listed["data"]}
        assert by_source["bread.html"]["media_type"] == "text/html"
        assert by_source["handbook.md"]["metadata"] == {"uploaded": True}
        assert by_source["api.md"]["chunks"] == 3

        pdf = await http.post("/v1/workspaces/docs/documents", files={"file": ("report.pdf", b"%PDF-1.7\n...", "application/pdf")})
        assert pdf.status_code == 400 and pdf.json()["error"]["code"] == "unsupported_document"
        bad_format = await http.post("/v1/workspaces/docs/documents", json={"content": "x", "format": "docx"})
        assert bad_format.status_code == 400 and bad_format.json()["error"]["param"] == "body.format"
        empty = await http.post("/v1/workspaces/docs/documents", json={"content": "   "})
        assert empty.status_code == 400
        # Sources the store would cut short, and so make one document, are refused.
        for long in ("https://wiki.example/" + "a" * 1100, "https://wiki.example/" + "a" * 1100 + "b"):
            refused = await http.post("/v1/workspaces/docs/documents", json={"content": "Some text.", "source": long})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "documents[0].source"
        # PostgreSQL stores no NUL: the client's mistake, named, not a 503 that invites retries.
        for document, field in (({"content": "x", "source": "a\x00.md"}, "source"),
                                ({"content": "x", "metadata": {"team": ["a\x00b"]}}, "metadata")):
            nul = await http.post("/v1/workspaces/docs/documents", json=document)
            assert nul.status_code == 400, nul.text
            assert nul.json()["error"]["param"].startswith(f"documents[0].{field}") and "NUL" in nul.text

        settings = await http.put("/v1/workspaces/docs", json={"top_k": 1, "score_threshold": 0.2})
        assert settings.status_code == 200 and settings.json()["settings"] == {"top_k": 1, "score_threshold": 0.2}
        found = await search(http, url, "docs", "How hot should the oven be?")
        assert found.json()["full_text_terms"] == ["hot", "oven"]
        assert len(found.json()["data"]) == 1 and found.json()["data"][0]["source"] == "bread.html"
        assert (await http.put("/v1/workspaces/docs", json={"top_k": 0})).status_code == 400
        # As the workspace reads back (`settings`), beside a top-level one: neither is dropped.
        both = await http.put("/v1/workspaces/docs", json={"top_k": 2, "settings": {"rerank": 10}})
        assert both.json()["settings"] == {"top_k": 2, "score_threshold": 0.2, "rerank": 10}
        assert (await http.put("/v1/workspaces/docs", json={"settings": {"top_k": 0}})).status_code == 400
        assert (await http.put("/v1/workspaces/docs", json={"settings": 3})).json()["error"]["param"] == "settings"
        await http.put("/v1/workspaces/docs", json={"settings": {"top_k": 1}})
        assert (await http.put("/v1/workspaces/docs", json={"language": "german"})).status_code == 409

        workspaces = (await http.get("/v1/workspaces")).json()["data"]
        assert [(w["name"], w["documents"]) for w in workspaces] == [("docs", 4)]

        doomed = by_source["bread.html"]["id"]
        # One document reads back as the list shows it (a GET was a 405).
        listed = {d["id"]: d for d in (await http.get("/v1/workspaces/docs/documents")).json()["data"]}
        one = await http.get(f"/v1/workspaces/docs/documents/{doomed}")
        assert one.status_code == 200 and one.json() == listed[doomed]
        assert (await http.head(f"/v1/workspaces/docs/documents/{doomed}")).status_code == 200
        assert (await http.delete(f"/v1/workspaces/docs/documents/{doomed}")).status_code == 200
        for gone in (doomed, "not-a-uuid"):
            missing = await http.get(f"/v1/workspaces/docs/documents/{gone}")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "document_not_found"
            assert missing.json()["error"]["param"] == "document_id"
        elsewhere = await http.get(f"/v1/workspaces/nowhere/documents/{doomed}")
        assert elsewhere.status_code == 404 and elsewhere.json()["error"]["param"] is None
        assert (await http.delete(f"/v1/workspaces/docs/documents/{doomed}")).status_code == 404
        assert (await http.delete("/v1/workspaces/docs/documents/not-a-uuid")).status_code == 404
        assert (await http.delete("/v1/workspaces/docs")).status_code == 200
        assert (await http.get("/v1/workspaces/docs")).status_code == 404


async def test_writes_to_a_stalled_rag_store_are_a_503_that_keeps_nothing(
    pg_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A locked or stalled PostgreSQL: an ingest, a workspace's settings, a document's or a
    # workspace's delete waited for it for as long as it lasted (reads were bounded already).
    monkeypatch.setattr(proxy.services.rag, "WRITE_TIMEOUT", 1.0)
    async with running_gateway(database_url=pg_database_url) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        made = await http.post("/v1/workspaces/docs/documents", json={"content": API, "source": "api.md"})
        assert made.status_code == 201, made.text
        document_id = made.json()["data"][0]["id"]

        async def refused_while_locked(tables: str, *requests: tuple[str, str, dict[str, Any] | None]) -> None:
            holder = await trio.to_thread.run_sync(lambda: psycopg.connect(pg_database_url))
            try:
                # Reads go on (EXCLUSIVE lets them), every write to these tables waits.
                await trio.to_thread.run_sync(holder.execute, f"LOCK TABLE {tables} IN EXCLUSIVE MODE")
                for method, path, body in requests:
                    with trio.fail_after(20):
                        answer = await http.request(method, path, json=body)
                    assert answer.status_code == 503, (path, answer.text)
                    assert answer.json()["error"]["code"] == "database_unavailable", answer.text
                    assert answer.headers["retry-after"] == "2"
            finally:
                await trio.to_thread.run_sync(holder.close)

        await refused_while_locked("rag_chunks", ("POST", "/v1/workspaces/docs/documents",
                                                  {"content": BREAD, "source": "bread.html"}))
        await refused_while_locked(
            "rag_workspaces, rag_documents, rag_chunks",
            ("PUT", "/v1/workspaces/docs", {"top_k": 2}),
            ("PUT", "/v1/workspaces/other", {}),
            ("POST", "/v1/workspaces/other/documents", {"content": BREAD}),
            ("DELETE", f"/v1/workspaces/docs/documents/{document_id}", None),
            ("DELETE", "/v1/workspaces/docs", None),
        )
        # Nothing refused was written, nothing there was lost; sent again, each is done.
        listed = (await http.get("/v1/workspaces")).json()["data"]
        assert [(w["name"], w["settings"], w["documents"]) for w in listed] == [("docs", {}, 1)]
        again = await http.post("/v1/workspaces/docs/documents", json={"content": BREAD, "source": "bread.html"})
        assert again.status_code == 201 and again.json()["data"][0]["status"] == "created"
        assert (await http.put("/v1/workspaces/docs", json={"top_k": 2})).json()["settings"] == {"top_k": 2}


async def test_a_long_document_written_slowly_but_steadily_is_not_taken_for_a_stall(
    pg_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its chunks go in batches, each of which makes progress: only a write with none for
    # `WRITE_TIMEOUT` is a stall (a big PDF's thousands of chunks take a busy server minutes).
    monkeypatch.setattr(proxy.services.rag, "WRITE_TIMEOUT", 1.5)
    text = "\n\n".join(f"Paragraph {i} tells of harbour {i}, its lighthouse and the ships it guided home." for i in range(600))
    async with running_gateway(database_url=pg_database_url, rag=RagSettings(chunk_tokens=32, chunk_overlap=0)) as url:
        with psycopg.connect(pg_database_url, autocommit=True) as conn:  # every batch of chunks takes 0.5 s
            conn.execute("CREATE FUNCTION slowly() RETURNS trigger LANGUAGE plpgsql AS"
                         " $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$")
            conn.execute("CREATE TRIGGER slowly AFTER INSERT ON rag_chunks FOR EACH STATEMENT EXECUTE FUNCTION slowly()")
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            stored = await http.post("/v1/workspaces/docs/documents", json={"content": text, "source": "harbours.md"})
    assert stored.status_code == 201, stored.text
    assert stored.json()["data"][0]["chunks"] > 4 * 64  # five batches: 2.5 s in all


async def test_a_german_workspace_stems_german(pg_database_url: str) -> None:
    async with running_gateway(database_url=pg_database_url) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        assert (await http.put("/v1/workspaces/de", json={"language": "german"})).status_code == 200
        text = "# Urlaub\n\nJeder Mitarbeiter erhält dreißig Urlaubstage im Jahr.\n\n# Kantine\n\nDie Kantine öffnet um zwölf Uhr."
        await http.post("/v1/workspaces/de/documents", json={"content": text, "source": "regeln.md"})
        found = (await search(http, url, "de", "Wann öffnet die Kantine?", score_threshold=-1)).json()["data"]
        assert found[0]["heading"] == "Kantine"
        assert (await http.put("/v1/workspaces/x", json={"language": "klingon"})).status_code == 400


async def test_an_uploads_metadata_field_is_read_as_a_json_body_is(pg_database_url: str) -> None:
    """The multipart `metadata` field is JSON text: nested past the bodies' limit, or holding
    what PostgreSQL's jsonb refuses (NaN, infinity, a lone surrogate), it is a 400 naming the
    field, not a crash or a store error without a name."""
    upload = {"file": ("notes.txt", b"Plain notes about the office plants.", "text/plain")}
    async with running_gateway(database_url=pg_database_url) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        for metadata in ("[" * 50000, '{"a":' * 2000 + "1" + "}" * 2000, '{"a": NaN}', '{"a": 1e999}',
                         '{"a": "\\ud800"}', "[1]", "not json"):
            refused = await http.post("/v1/workspaces/docs/documents", files=upload, data={"metadata": metadata})
            assert refused.status_code == 400, (metadata[:20], refused.text)
            assert refused.json()["error"]["param"] == "metadata", (metadata[:20], refused.text)
        kept = await http.post("/v1/workspaces/docs/documents", files=upload, data={"metadata": '{"team": "facilities"}'})
        assert kept.status_code == 201
        (document,) = (await http.get("/v1/workspaces/docs/documents")).json()["data"]
        assert document["metadata"] == {"team": "facilities"}


async def test_an_ingests_language_is_the_workspaces_or_refused(pg_database_url: str) -> None:
    """`language` on an ingest is not dropped without a word: a workspace without documents
    takes it (as `PUT` would), one indexed in another language is a 409 and keeps its
    documents as they were, and a `language` that is not a string is a 400."""
    german = "# Kantine\n\nDie Kantine öffnet um zwölf Uhr."
    async with running_gateway(database_url=pg_database_url) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        assert (await http.put("/v1/workspaces/de", json={"top_k": 2})).json()["language"] == "english"
        taken = await http.post("/v1/workspaces/de/documents", json={"content": german, "source": "kantine.md",
                                                                     "language": "german"})
        assert taken.status_code == 201, taken.text
        assert (await http.get("/v1/workspaces/de")).json()["language"] == "german"
        found = (await search(http, url, "de", "Wann öffnet die Kantine?", score_threshold=-1)).json()
        assert found["full_text_terms"] == ["kantin", "offnet", "wann"]  # German stems

        await http.post("/v1/workspaces/en/documents", json={"content": API, "source": "api.md"})
        for attempt in (
            http.post("/v1/workspaces/en/documents", json={"content": german, "source": "de.md", "language": "german"}),
            http.post("/v1/workspaces/en/documents", files={"file": ("de.md", german.encode(), "text/markdown")},
                      data={"language": "german"}),
        ):
            refused = await attempt
            assert refused.status_code == 409, refused.text
            error = refused.json()["error"]
            assert error["code"] == "language_locked" and error["param"] == "language" and "'english'" in error["message"]
        workspace = (await http.get("/v1/workspaces/en")).json()
        assert (workspace["language"], workspace["documents"]) == ("english", 1)

        wrong = await http.post("/v1/workspaces/en/documents", json={"content": german, "language": 5})
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "language"


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_ingest_walks_files_and_directories(
    pg_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "api.md").write_text(API)
    (docs / "sub" / "bread.html").write_text(BREAD)
    (docs / ".hidden.md").write_text("# Secret\n\nnot ingested")
    (docs / "image.png").write_bytes(b"\x89PNG\r\n")
    single = tmp_path / "handbook.txt"
    single.write_text(HANDBOOK)
    monkeypatch.setenv("DATABASE_URL", pg_database_url)

    assert main(["ingest", "team", str(docs), str(single)]) == 0
    err = capsys.readouterr().err
    assert "3 documents" in err and "created" in err

    with psycopg.connect(pg_database_url) as conn:
        rows = conn.execute("SELECT source, media_type FROM rag_documents ORDER BY source").fetchall()
    assert rows == [("docs/api.md", "text/markdown"), ("docs/sub/bread.html", "text/html"), ("handbook.txt", "text/plain")]

    assert main(["ingest", "team", str(docs)]) == 0
    assert "2 unchanged" in capsys.readouterr().err

    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.7\n")
    assert main(["ingest", "team", str(tmp_path / "report.pdf")]) == 1
    assert "corrupt" in capsys.readouterr().err
    assert main(["ingest", "bad name", str(docs)]) == 2


def test_cli_ingest_with_another_language_than_its_workspaces_fails_once(
    pg_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "api.md").write_text(API)
    (docs / "bread.html").write_text(BREAD)
    monkeypatch.setenv("DATABASE_URL", pg_database_url)
    assert main(["ingest", "team", str(docs / "api.md")]) == 0
    capsys.readouterr()

    assert main(["ingest", "team", str(docs), "--language", "german"]) == 1
    err = capsys.readouterr().err
    assert err.count("already has documents indexed in 'english'") == 1
    with psycopg.connect(pg_database_url) as conn:
        assert conn.execute("SELECT source FROM rag_documents").fetchall() == [("api.md",)]


def test_cli_ingest_of_a_missing_path_fails_naming_it_and_ingests_nothing(
    pg_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped path is a bad argument (exit 2) naming it, alone or beside paths that exist
    (whose documents are not ingested either): before, the mix exited 0 having ingested the
    rest, and a script took it for done."""
    present = tmp_path / "handbook.txt"
    present.write_text(HANDBOOK)
    missing = tmp_path / "missing" / "path.pdf"
    monkeypatch.setenv("DATABASE_URL", pg_database_url)

    for paths in ([missing], [present, missing]):
        assert main(["ingest", "typo", *map(str, paths)]) == 2
        err = capsys.readouterr().err
        assert f"{missing}: no such file or directory" in err and "nothing ingested" in err
    with psycopg.connect(pg_database_url) as conn:
        (table,) = conn.execute("SELECT to_regclass('rag_workspaces')").fetchone() or (None,)
        assert table is None or conn.execute("SELECT count(*) FROM rag_workspaces WHERE name = 'typo'").fetchone() == (0,)

    # Refused before an embedded PostgreSQL is started for nothing.
    monkeypatch.delenv("DATABASE_URL")
    data = tmp_path / "data"
    assert main(["ingest", "typo", str(missing), "--data-dir", str(data)]) == 2
    assert not data.exists()



def test_cli_ingest_of_a_directory_with_nothing_to_ingest_fails_naming_it(
    pg_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The wrong directory (empty, hidden files only, or files in formats it does not read) is
    a bad argument naming it, as a missing path is: before, it exited 0 ("nothing to do"), and
    a script took it for done."""
    present = tmp_path / "handbook.txt"
    present.write_text(HANDBOOK)
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "word"
    (other / ".git").mkdir(parents=True)
    (other / ".git" / "notes.md").write_text("# Hidden\n\nnot ingested")
    (other / "report.docx").write_bytes(b"PK\x03\x04")
    monkeypatch.setenv("DATABASE_URL", pg_database_url)

    for paths in ([empty], [other], [present, other]):
        assert main(["ingest", "wrongdir", *map(str, paths)]) == 2
        err = capsys.readouterr().err
        assert f"{paths[-1]}: no document to ingest" in err and ".md" in err and "nothing ingested" in err
    with psycopg.connect(pg_database_url) as conn:
        (table,) = conn.execute("SELECT to_regclass('rag_workspaces')").fetchone() or (None,)
        assert table is None or conn.execute("SELECT count(*) FROM rag_workspaces WHERE name = 'wrongdir'").fetchone() == (0,)


async def test_a_compressed_document_upload_is_ingested_and_held_to_the_body_limit(pg_database_url: str) -> None:
    """A multipart upload sent with `Content-Encoding: gzip` is read as the form it inflates
    to, as a JSON body is; inflated past `max_body_bytes` it is a 413, however small it was."""
    form = httpx.Request("POST", "http://x/", files={"file": ("handbook.md", HANDBOOK.encode(), "text/markdown")})
    body, content_type = form.read(), form.headers["content-type"]
    limit = 256 * 1024
    async with running_gateway(database_url=pg_database_url, max_body_bytes=limit) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        headers = {"content-type": content_type, "content-encoding": "gzip"}
        upload = await http.post("/v1/workspaces/zipped/documents", content=gzip.compress(body), headers=headers)
        assert upload.status_code == 201, upload.text
        assert [(d["source"], d["status"]) for d in upload.json()["data"]] == [("handbook.md", "created")]
        bomb = httpx.Request("POST", "http://x/", files={"file": ("big.md", b"# Big\n\n" + b"a " * limit, "text/markdown")})
        refused = await http.post(
            "/v1/workspaces/zipped/documents", content=gzip.compress(bomb.read()),
            headers={"content-type": bomb.headers["content-type"], "content-encoding": "gzip"},
        )
        assert refused.status_code == 413, refused.text
        assert (await http.get("/v1/workspaces/zipped/documents")).json()["total"] == 1
