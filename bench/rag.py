"""RAG and embeddings benchmark: embeddings/s, and retrieval latency at N chunks.

    .venv/bin/python -m bench.rag [--chunks 100000] [--queries 300] [--seconds 3]
                                  [--build-timeout 1200] [--data-dir DIR] [--skip-embeddings]

1. Embeddings/s of the in-process model (`bench/embeddings.py`): batch 1 and batch 32, short
   and ~100-token texts, one ONNX thread; and 32 concurrent one-text calls through the batcher.
2. Retrieval at `--chunks` synthetic chunks in an embedded PostgreSQL (a temp dir, or
   `--data-dir` to keep and reuse the data): unit vectors in clusters (cosine ~0.7 to one of
   2,000 random centres, as embeddings of related texts bunch together), texts of 120 words
   drawn from a Zipf-distributed vocabulary of 20,000 words, per-token vectors the size real
   200-token chunks have after pooling (67 x 388 bytes).
   Rows are loaded with binary COPY, then the HNSW and GIN indexes are built (bounded by
   `--build-timeout` seconds; the build times are reported). Then `RagService.retrieve` is
   timed end to end (query embedding with the real model, vector + full-text candidates, RRF,
   MaxSim rerank), one query at a time and 8 at once; and the vector search and the candidates
   statement (vector + full text) alone, with the HNSW recall of the 40 nearest against an
   exact scan.

Progress goes to stderr, markdown tables to stdout.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import trio
from pgvector.psycopg import register_vector

from bench.embeddings import long_sentences, measure, short_sentences
from proxy.config import RagSettings
from proxy.infra.aio import asyncio_bridge
from proxy.infra.embedded import EmbeddedPostgres
from proxy.infra.embedder import LocalEmbedder
from proxy.infra.migrations import migrate
from proxy.infra.postgres import open_database
from proxy.infra.rag_store import _CANDIDATES_SQL, LEXICAL_MAX_ROWS
from proxy.services.rag import RagService

WORKSPACE = "bench"
VOCABULARY = 20_000
WORDS_PER_CHUNK = 120
POOLED_TOKENS = 67  # a 200-token chunk after 3x token pooling
CHUNKS_PER_DOCUMENT = 100
CLUSTERS = 2000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


# -- 1. embeddings -----------------------------------------------------------------------------------


def _embed_count(embedder: LocalEmbedder, inputs: list[str]) -> int:
    return len(embedder.embed_sync(inputs).token_counts)


def embedding_rates(seconds: float) -> list[str]:
    embedder = LocalEmbedder(intra_op_threads=1)
    started = time.perf_counter()
    embedder.load()
    rows = [f"Model load: {time.perf_counter() - started:.2f} s.", "",
            "| texts | batch | embeddings/s (wall) | embeddings/s per CPU-second |", "|---|---|---|---|"]
    for name, texts in (("short (~12 tokens)", short_sentences(32)), ("~100 tokens", long_sentences(32))):
        for batch in (1, 32):
            inputs = texts[:batch]
            log(f"embeddings: {name}, batch {batch}")
            wall, cpu = measure(partial(_embed_count, embedder, inputs), seconds)
            rows.append(f"| {name} | {batch} | {wall:.1f} | {cpu:.1f} |")

    async def concurrent() -> tuple[float, float]:
        async with trio.open_nursery() as nursery:
            await nursery.start(embedder.serve)
            runs0, done, start = embedder.onnx_runs, 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                async with trio.open_nursery() as callers:
                    for text in short_sentences(32):
                        callers.start_soon(embedder.embed, [text])
                done += 32
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        return done / elapsed, (embedder.onnx_runs - runs0) / (done / 32)

    log("embeddings: 32 concurrent one-text calls")
    rate, runs = trio.run(concurrent)
    rows.append(f"| short, 32 concurrent calls of 1 text | batched | {rate:.1f} | ({runs:.1f} ONNX runs per 32 calls) |")
    return rows


# -- 2. synthetic corpus ---------------------------------------------------------------------------


def vocabulary(rng: np.random.Generator) -> list[str]:
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "del", "pi", "nex", "ga", "ru", "shi", "tal", "be", "quo"]
    words: set[str] = set()
    while len(words) < VOCABULARY:
        words.add("".join(rng.choice(syllables, size=int(rng.integers(2, 5)))))
    return sorted(words)


def zipf_words(rng: np.random.Generator, words: list[str], count: int) -> list[str]:
    ranks = np.minimum(rng.zipf(1.15, size=count), len(words)) - 1
    return [words[r] for r in ranks]


def cluster_centers() -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(1234)
    centers = rng.standard_normal((CLUSTERS, 384)).astype(np.float32)
    unit: np.ndarray[Any, Any] = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    return unit


def clustered(rng: np.random.Generator, centers: np.ndarray[Any, Any], count: int) -> np.ndarray[Any, Any]:
    """Unit vectors around random cluster centres (cosine ~0.7 to their centre), the way
    sentence embeddings of related texts bunch together; uniform random vectors have no
    meaningful nearest neighbours in 384 dimensions (every pair is at cosine 0 +- 0.05)."""
    picked = centers[rng.integers(0, len(centers), count)]
    vectors = picked + rng.standard_normal((count, 384)).astype(np.float32) / math.sqrt(384)
    return np.asarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), dtype=np.float32)


def load_corpus(url: str, chunks: int, build_timeout: float) -> list[str]:
    """Fill the `bench` workspace with `chunks` synthetic chunks; returns timing rows."""
    rng = np.random.default_rng(42)
    words = vocabulary(rng)
    centers = cluster_centers()
    rows: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        existing = conn.execute(
            "SELECT count(*) FROM rag_chunks c JOIN rag_workspaces w ON w.id = c.workspace_id WHERE w.name = %s",
            (WORKSPACE,),
        ).fetchone()
        if existing and existing[0] == chunks:
            log(f"corpus: reusing {chunks} chunks")
            return ["| (corpus reused from --data-dir) | |"]
        conn.execute("DELETE FROM rag_workspaces WHERE name = %s", (WORKSPACE,))
        workspace_id = conn.execute("INSERT INTO rag_workspaces (name) VALUES (%s) RETURNING id", (WORKSPACE,)).fetchone()[0]  # type: ignore[index]
        conn.execute("DROP INDEX IF EXISTS rag_chunks_embedding")
        conn.execute("DROP INDEX IF EXISTS rag_chunks_tsv")
        documents = [str(uuid.uuid4()) for _ in range(-(-chunks // CHUNKS_PER_DOCUMENT))]
        with conn.cursor() as cur, cur.copy(
            "COPY rag_documents (id, workspace_id, source, content_hash, chunker, media_type, chars, chunk_count)"
            " FROM STDIN"
        ) as copy:
            for i, document in enumerate(documents):
                copy.write_row((document, workspace_id, f"doc-{i}.md", f"{i:064x}", "bench", "text/markdown", 0,
                                CHUNKS_PER_DOCUMENT))
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy(
            "COPY rag_chunks (workspace_id, document_id, ordinal, heading, content, embedding, token_vectors)"
            " FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "uuid", "int4", "text", "text", "vector", "bytea"])
            for start in range(0, chunks, 1000):
                count = min(1000, chunks - start)
                vectors = clustered(rng, centers, count)
                scales = np.full(POOLED_TOKENS, 1 / 127, dtype="<f4").tobytes()
                for j in range(count):
                    n = start + j
                    text = " ".join(zipf_words(rng, words, WORDS_PER_CHUNK))
                    tokens = scales + rng.integers(-127, 128, POOLED_TOKENS * 384, dtype=np.int8).tobytes()
                    copy.write_row((workspace_id, uuid.UUID(documents[n // CHUNKS_PER_DOCUMENT]),
                                    n % CHUNKS_PER_DOCUMENT, f"Section {n % 17}", text, vectors[j], tokens))
                if (start // 1000) % 10 == 0:
                    log(f"corpus: {start + count}/{chunks} rows")
        copied = time.perf_counter() - started
        rows.append(f"| COPY {chunks:,} chunks (text, vector, tsvector computed, token vectors) | {copied:.1f} s |")
        conn.execute(f"SET statement_timeout = '{int(build_timeout)}s'")
        conn.execute("SET maintenance_work_mem = '2GB'")
        conn.execute("SET max_parallel_maintenance_workers = 1")
        for name, sql in (
            ("HNSW (m=16, ef_construction=64, cosine)", "CREATE INDEX rag_chunks_embedding ON rag_chunks"
             " USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"),
            ("GIN (tsvector)", "CREATE INDEX rag_chunks_tsv ON rag_chunks USING gin (tsv)"),
        ):
            log(f"corpus: building {name}")
            started = time.perf_counter()
            try:
                conn.execute(sql)
                rows.append(f"| build {name} index | {time.perf_counter() - started:.1f} s |")
            except psycopg.errors.QueryCanceled:
                rows.append(f"| build {name} index | not finished within {build_timeout:.0f} s |")
        conn.execute("RESET statement_timeout")
        conn.execute("VACUUM ANALYZE rag_chunks")
        size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('rag_chunks'))").fetchone()
        index = conn.execute("SELECT pg_size_pretty(pg_relation_size('rag_chunks_embedding'))").fetchone()
        rows.append(f"| table with indexes and TOAST / HNSW index alone | {size[0] if size else '?'} / {index[0] if index else '?'} |")
    return rows


# -- 3. queries ------------------------------------------------------------------------------------------


def sql_latencies(url: str, queries: int) -> list[str]:
    rng = np.random.default_rng(7)
    words = vocabulary(np.random.default_rng(42))
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        workspace_id = conn.execute("SELECT id FROM rag_workspaces WHERE name = %s", (WORKSPACE,)).fetchone()[0]  # type: ignore[index]
        conn.execute("SET hnsw.iterative_scan = relaxed_order")
        conn.execute("SET hnsw.ef_search = 40")
        vectors = clustered(rng, cluster_centers(), queries)

        def timed(run: Callable[[int], Any]) -> list[float]:
            out = []
            for i in range(queries):
                started = time.perf_counter()
                run(i)
                out.append((time.perf_counter() - started) * 1000)
            return out

        dense_sql = ("SELECT id FROM rag_chunks WHERE workspace_id = %s ORDER BY embedding <=> %s LIMIT 40")
        dense = timed(lambda i: conn.execute(dense_sql, (workspace_id, vectors[i])).fetchall())
        texts = [" ".join(zipf_words(rng, words, 8)) for _ in range(queries)]
        params = [{"ws": workspace_id, "v": vectors[i], "q": texts[i], "lang": "english", "n": 40,
                   "max_rows": LEXICAL_MAX_ROWS} for i in range(queries)]
        both = timed(lambda i: conn.execute(_CANDIDATES_SQL, params[i]).fetchall())
        recall = []
        for i in range(min(30, queries)):
            approx = {r[0] for r in conn.execute(dense_sql, (workspace_id, vectors[i]), prepare=False).fetchall()}
            with conn.transaction():
                # Unprepared, or the exact scan would reuse the cached plan (the HNSW index).
                conn.execute("SET LOCAL enable_indexscan = off")
                exact = {r[0] for r in conn.execute(dense_sql, (workspace_id, vectors[i]), prepare=False).fetchall()}
            recall.append(len(approx & exact) / max(1, len(exact)))
    return [
        f"| vector top-40 (HNSW, ef_search 40, iterative scan) | {percentile(dense, 50):.2f} | {percentile(dense, 99):.2f} |",
        f"| the candidates statement: vector top-40 + full-text top-40 (8-word question) | {percentile(both, 50):.2f} | {percentile(both, 99):.2f} |",
        f"| HNSW recall@40 against an exact scan (30 queries) | {statistics.mean(recall):.3f} | |",
    ]


async def retrieval_latencies(url: str, queries: int) -> list[str]:
    rng = np.random.default_rng(11)
    words = vocabulary(np.random.default_rng(42))
    texts = [" ".join(zipf_words(rng, words, 8)) for _ in range(queries)]
    rows: list[str] = []
    async with (
        asyncio_bridge(),
        open_database(url, max_size=10) as db,
        LocalEmbedder.open(intra_op_threads=1) as embedder,
    ):
        rag = RagService(RagSettings(score_threshold=-1.0), lambda: db, embedder)
        await rag.retrieve(WORKSPACE, texts[0])  # warm up
        hot = texts[:50] * max(1, len(texts) // 50)  # a working set that fits the token-vector cache
        runs = ((1, "1 at a time", texts), (8, "8 at a time", texts), (1, "1 at a time, 50 questions asked again", hot))
        for concurrency, label, questions in runs:
            totals: list[float] = []
            parts: dict[str, list[float]] = {"embed_ms": [], "search_ms": [], "rerank_ms": []}
            pending = iter(questions)

            async def worker(pending: Any = pending, totals: list[float] = totals,
                             parts: dict[str, list[float]] = parts) -> None:
                for text in pending:
                    started = time.perf_counter()
                    retrieval = await rag.retrieve(WORKSPACE, text)
                    totals.append((time.perf_counter() - started) * 1000)
                    for key, value in retrieval.timings.items():
                        parts[key].append(value)

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(worker)
            rate = len(totals) / (time.perf_counter() - started)
            rows.append(
                f"| retrieve(), {label} | {percentile(totals, 50):.1f} | {percentile(totals, 99):.1f} "
                f"| {rate:.0f}/s | {percentile(parts['embed_ms'], 50):.1f} / {percentile(parts['search_ms'], 50):.1f}"
                f" / {percentile(parts['rerank_ms'], 50):.1f} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--build-timeout", type=float, default=1200.0)
    parser.add_argument("--data-dir", type=Path, help="keep the database here (and reuse it next time)")
    parser.add_argument("--skip-embeddings", action="store_true")
    args = parser.parse_args()

    out: list[str] = []
    if not args.skip_embeddings:
        out += ["### Embeddings (in-process all-minilm-l6-v2, int8 ONNX, 1 thread)", ""]
        out += embedding_rates(args.seconds)
        out.append("")
    with tempfile.TemporaryDirectory(prefix="bench-rag-") as scratch:
        data_dir = args.data_dir or Path(scratch)
        with EmbeddedPostgres(data_dir / "pgdata") as server:
            assert server.url is not None
            url = server.url

            async def prepare() -> None:
                async with asyncio_bridge(), open_database(url) as db:
                    await migrate(db)

            trio.run(prepare)
            out += [f"### Retrieval at {args.chunks:,} chunks", "", "| step | time |", "|---|---|"]
            out += load_corpus(url, args.chunks, args.build_timeout)
            log("queries: SQL searches alone")
            out += ["", "| search alone | p50 ms | p99 ms |", "|---|---|---|"]
            out += sql_latencies(url, args.queries)
            log("queries: retrieve() end to end")
            out += ["", "| end to end | p50 ms | p99 ms | throughput | embed / search / rerank p50 ms |",
                    "|---|---|---|---|---|"]
            out += trio.run(retrieval_latencies, url, args.queries)
    print("\n".join(out))


if __name__ == "__main__":
    main()
