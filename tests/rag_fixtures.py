"""Fixtures for the RAG tests: a database holding the labelled corpus (ingested once per
session; tests must not change it), and a loaded local embedder served per test.

    pytest_plugins = ["tests.infra_servers", "tests.rag_fixtures"]
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
import trio
import trio_asyncio
from psycopg.conninfo import make_conninfo

from proxy.config import RagSettings
from proxy.infra.embedder import LocalEmbedder
from proxy.infra.migrations import migrate
from proxy.infra.postgres import open_database
from proxy.services.rag import RagService
from tests.rag_corpus import CORPUS, DOCUMENTS


async def ingest_corpus(url: str, embedder: LocalEmbedder) -> None:
    async with trio_asyncio.open_loop(), open_database(url) as db, trio.open_nursery() as nursery:
        await migrate(db)
        await nursery.start(embedder.serve)
        await RagService(RagSettings(), lambda: db, embedder).ingest(CORPUS, DOCUMENTS)
        nursery.cancel_scope.cancel()


@pytest.fixture(scope="session")
def loaded_embedder() -> Iterator[LocalEmbedder]:
    embedder = LocalEmbedder()
    embedder.load()
    yield embedder


@pytest.fixture(scope="session")
def corpus_url(pg_url: str, loaded_embedder: LocalEmbedder) -> Iterator[str]:
    """A database with workspace `corpus` holding `tests.rag_corpus.DOCUMENTS` (read-only)."""
    name = f"corpus_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(pg_url, dbname=name)
    try:
        trio.run(ingest_corpus, url, loaded_embedder)
        yield url
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def embedder(loaded_embedder: LocalEmbedder) -> AsyncIterator[LocalEmbedder]:
    async with trio.open_nursery() as nursery:
        await nursery.start(loaded_embedder.serve)
        yield loaded_embedder
        nursery.cancel_scope.cancel()
