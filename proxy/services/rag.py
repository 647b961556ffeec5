"""Retrieval-augmented generation: ingestion, hybrid retrieval with rerank, and the RAG route.

Ingest: extract text, chunk it by structure (`proxy.infra.chunking`), embed every chunk with
the local model (its sentence vector for the HNSW index and its per-token vectors for the
rerank), store it all in one transaction. A document is identified by its source within its
workspace; ingesting an unchanged one again is a no-op.

Retrieve: the question's vector finds the nearest chunks (pgvector HNSW, cosine), its words
the best full-text matches (PostgreSQL, any word); the two rankings are fused by reciprocal
rank fusion, the best fused candidates reranked by late interaction (MaxSim of the
question's token vectors against each chunk's stored ones), and those at or above the score
threshold kept, best `top_k` first.

The RAG route (`x-workspace: WS`, or `x-route: rag`) retrieves inside the request's producer,
so a client that goes away cancels the retrieval (and its queries) too, then injects the
passages in front of the question and calls the routed backend. The response carries
`x-rag-sources` (compact JSON), and OpenAI clients also get `rag_sources` in the body.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
import trio

from proxy.config import RagSettings
from proxy.domain.chat import ChatRequest, Message, TextPart
from proxy.domain.errors import ErrorKind, GatewayError, database_not_configured, invalid_request
from proxy.infra.backends import Batch
from proxy.infra.chunking import (
    MEDIA_TYPES,
    UNKNOWN_CHARS,
    Chunk,
    ChunkerSettings,
    Format,
    UnsupportedDocument,
    chunk,
    chunk_sections,
    to_text,
    token_counter,
)
from proxy.infra.embedder import Vectors, maxsim
from proxy.infra.pdf import PdfLimits, extract_pdf
from proxy.infra.postgres import ConstraintViolation, Database, DatabaseError, answered_within
from proxy.infra.rag_store import (
    LanguageLocked,
    NewChunk,
    NewDocument,
    RagStore,
    TokenVectorCache,
    Workspace,
)
from proxy.services._contracts import ANSWER_HEADERS, Headers
from proxy.services.chat import ChatExchange, RequestMeta
from proxy.services.embeddings import TextEncoder
from proxy.services.persistence import Producer

log = logging.getLogger("llm_proxy.rag")

WORKSPACE_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RRF_K: Final = 60
# Stored token vectors per chunk token (see `pool_token_vectors`).
TOKEN_POOL_FACTOR: Final = 3
# Memory for cached token vectors (packed, ~26 KB a 200-token chunk: ~2,500 chunks).
TOKEN_CACHE_BYTES: Final = 64 * 1024 * 1024
SOURCES_HEADER: Final = b"x-rag-sources"
# Texts embedded per call while ingesting (progress is reported after each).
_INGEST_BATCH: Final = 16
_MAX_SOURCE: Final = 1024
# PDFs read at once: text extraction is pure Python and holds the GIL, so more threads would
# only take turns with the event loop (and slow every stream) without finishing sooner.
PDF_THREADS: Final = 2
# How long a question waits for the RAG store (a workspace's lookup; the search): a stalled or
# locked PostgreSQL keeps its connections open and answers nothing, and a chat waiting on it
# would never answer. Then a 503 its client may retry. A search is milliseconds on a healthy
# server, seconds on a cold large one.
QUERY_TIMEOUT: Final = 10.0
# How long a write waits for it (a workspace's settings, a document stored or deleted; a
# document's chunks, thousands of rows a busy server takes minutes to index, from one batch of
# them to the next). Its transaction cancelled, nothing of it is kept: the 503's client sends
# it again.
WRITE_TIMEOUT: Final = 30.0


def check_workspace_name(name: str | None, param: str = "workspace") -> str:
    if not name or not WORKSPACE_NAME.match(name):
        raise invalid_request(
            f"Invalid workspace name {name!r}: 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit.",
            param=param,
        )
    return name


def language_locked(name: str, language: str) -> GatewayError:
    return GatewayError(
        ErrorKind.CONFLICT, f"Workspace `{name}` already has documents indexed in {language!r}; "
        "its language cannot change (delete and re-create it).", param="language", code="language_locked",
    )


def workspace_not_found(name: str, param: str | None = "x-workspace") -> GatewayError:
    """`param`: where the name came from (the header on chat routes; None for a URL path)."""
    return GatewayError(ErrorKind.NOT_FOUND, f"Workspace `{name}` does not exist.", param=param,
                        code="workspace_not_found")


# -- values ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DocumentInput:
    """A document to ingest: `content` in `format` (a PDF's bytes in `data`); `source` names
    it within the workspace (default: its content hash)."""

    content: str
    format: Format = "markdown"
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class IngestResult:
    id: str
    source: str
    status: str  # created | updated | unchanged
    chunks: int
    tokens: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "status": self.status, "chunks": self.chunks,
                "tokens": self.tokens}


@dataclass(frozen=True, slots=True)
class RetrievalOptions:
    top_k: int
    score_threshold: float
    candidates: int
    rerank: int

    @classmethod
    def of(cls, settings: RagSettings, overrides: dict[str, Any] | None = None) -> RetrievalOptions:
        values = {"top_k": settings.top_k, "score_threshold": settings.score_threshold,
                  "candidates": settings.candidates, "rerank": settings.rerank}
        values.update({k: v for k, v in (overrides or {}).items() if k in values and v is not None})
        options = cls(top_k=int(values["top_k"]), score_threshold=float(values["score_threshold"]),
                      candidates=int(values["candidates"]), rerank=int(values["rerank"]))
        return replace(options, rerank=max(options.rerank, options.top_k))


def validate_overrides(data: dict[str, Any]) -> dict[str, Any]:
    """Workspace or request overrides of the retrieval options, checked (400 naming the key)."""
    checked: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("top_k", "candidates", "rerank"):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 200:
                raise invalid_request(f"Invalid `{key}`: expected an integer between 1 and 200.", param=key)
        elif key == "score_threshold":
            if not isinstance(value, int | float) or isinstance(value, bool) or not -1 <= value <= 1:
                raise invalid_request("Invalid `score_threshold`: expected a number between -1 and 1.", param=key)
            value = float(value)
        else:
            raise invalid_request(
                f"Unknown setting `{key}`; a workspace sets top_k, score_threshold, candidates and rerank.", param=key
            )
        checked[key] = value
    return checked


@dataclass(frozen=True, slots=True)
class Passage:
    chunk_id: int
    document_id: str
    source: str
    ordinal: int
    heading: str
    content: str
    score: float
    metadata: dict[str, Any]

    def source_entry(self, number: int) -> dict[str, Any]:
        return {"n": number, "document": self.document_id, "chunk": self.ordinal,
                "source": self.source[:200], "heading": self.heading[:200], "score": round(self.score, 4)}


@dataclass(slots=True)
class Retrieval:
    workspace: str
    query: str
    passages: list[Passage]
    candidates: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def sources(self) -> list[dict[str, Any]]:
        return [passage.source_entry(n) for n, passage in enumerate(self.passages, 1)]


def pool_token_vectors(vectors: Vectors, factor: int = TOKEN_POOL_FACTOR, rounds: int = 6) -> Vectors:
    """About `len(vectors) / factor` unit vectors standing for `vectors` in MaxSim: k-means
    from evenly spaced seeds (deterministic). Token pooling by 2-3 costs late-interaction
    retrieval next to nothing in quality (Clavié et al., 2024) and divides the storage."""
    count = len(vectors)
    k = -(-count // factor)
    if factor <= 1 or k >= count:
        return vectors
    centroids = vectors[np.linspace(0, count - 1, k).round().astype(int)].copy()
    for _ in range(rounds):
        assignment = np.argmax(vectors @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assignment, vectors)
        filled = np.bincount(assignment, minlength=k) > 0
        centroids[filled] = sums[filled]
        centroids /= np.clip(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12, None)
    return np.asarray(centroids, dtype=np.float32)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Ids ordered by the sum of 1 / (k + rank) over the rankings they appear in (rank from 1);
    ties keep first appearance."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: -pair[1])


# -- the service -----------------------------------------------------------------------------------

DatabaseSource = Callable[[], Database | None]
# A document ready to store: itself, its extracted text, its chunks.
Prepared = tuple[DocumentInput, str, list[Chunk]]
Progress = Callable[[int], None]


class RagService:
    def __init__(
        self, settings: RagSettings, database: DatabaseSource, encoder: TextEncoder, *, configured: bool = True,
    ) -> None:
        self.settings = settings
        self._database = database
        # False: no database at all (`embedded = false`, no DATABASE_URL), not one that is down.
        self._configured = configured
        self._encoder = encoder
        self.chunker = ChunkerSettings(target=settings.chunk_tokens, overlap=settings.chunk_overlap,
                                       maximum=max(settings.chunk_tokens, 250))
        # A document indexed with other chunking or token pooling is re-indexed on ingest.
        self.signature = f"{self.chunker.signature}/pool{TOKEN_POOL_FACTOR}"
        # Hot chunks' token vectors stay in memory: the rerank reads them on every query.
        self.token_cache = TokenVectorCache(TOKEN_CACHE_BYTES)
        self.pdf_limits = PdfLimits(max_bytes=settings.pdf_max_bytes, max_pages=settings.pdf_max_pages,
                                    timeout_seconds=settings.pdf_timeout_seconds)
        self._pdf_threads: trio.CapacityLimiter | None = None  # made in the first run that needs it

    def store(self) -> RagStore:
        db = self._database()
        if db is None and not self._configured:
            raise database_not_configured("RAG workspaces need")
        if db is None:
            raise GatewayError(ErrorKind.UNAVAILABLE, "The RAG store (PostgreSQL) is unavailable; try again shortly.",
                               code="database_unavailable", retry_after=2)
        return RagStore(db)

    # -- ingestion --

    async def ingest(
        self,
        workspace_name: str,
        documents: Sequence[DocumentInput],
        *,
        progress: Progress | None = None,
        language: str | None = None,
    ) -> list[IngestResult]:
        """Ingest `documents` one by one (each in its own transaction); `progress(n)` is
        called as chunks get embedded. Every document is extracted and chunked first, so one
        without text fails the call before anything is written."""
        check_workspace_name(workspace_name)
        prepared = []
        for index, document in enumerate(documents):
            _check_storable(document, index)  # before any work
            try:
                prepared.append(await self.prepare(document))
            except UnsupportedDocument as exc:
                raise invalid_request(str(exc), param=f"documents[{index}]", code="unsupported_document") from None
        return await self.ingest_prepared(workspace_name, prepared, progress=progress, language=language)

    async def ingest_prepared(
        self,
        workspace_name: str,
        prepared: Sequence[Prepared],
        *,
        progress: Progress | None = None,
        language: str | None = None,
    ) -> list[IngestResult]:
        """`ingest` of documents already through `prepare` (not extracted again)."""
        check_workspace_name(workspace_name)
        for index, (document, _, chunks) in enumerate(prepared):
            _check_storable(document, index)
            if not chunks:
                what = f"Document {document.source!r}" if document.source else "The document"
                raise invalid_request(f"{what} has no text to index.", param="content")
        store = self.store()
        with bounded_write():
            workspace = await store.ensure_workspace(workspace_name, language=language)
            if language is not None and workspace.language != language:
                # Asked of a workspace made before: as `PUT /v1/workspaces/{ws}` would, chosen
                # while it is empty and refused once it has chunks, rather than its documents
                # indexed in another language than the one asked without a word.
                try:
                    workspace = await store.configure_workspace(workspace_name, {}, language=language)
                except LanguageLocked as locked:
                    raise language_locked(workspace_name, locked.language) from None
        return [await self._ingest_one(store, workspace, *item, progress) for item in prepared]

    async def prepare(self, document: DocumentInput) -> Prepared:
        """The document (with a PDF's own metadata, its title, author and pages, under the
        caller's, and its bytes let go), its extracted text and chunks, worked out off the event
        loop; raises `UnsupportedDocument` for a PDF that cannot be read."""
        if document.format == "pdf":
            return await self._prepare_pdf(document)

        def work() -> tuple[str, list[Chunk]]:
            text = to_text(document.content, document.format)
            return text, chunk(text, "text" if document.format == "text" else "markdown", self.chunker)

        return (document, *await trio.to_thread.run_sync(work))

    async def _prepare_pdf(self, document: DocumentInput) -> Prepared:
        stop = threading.Event()
        name = document.source or "The PDF"

        def work() -> tuple[dict[str, Any], str, list[Chunk]]:
            pdf = extract_pdf(document.data, name, self.pdf_limits, stop)
            chunks = chunk_sections([(page.heading, page.text) for page in pdf.pages], self.chunker)
            return pdf.metadata, pdf.text(), chunks

        if self._pdf_threads is None:
            self._pdf_threads = trio.CapacityLimiter(PDF_THREADS)
        try:
            # A caller that goes away is not kept waiting; `stop` ends the thread at its next page
            # (and only then frees its place in the limiter).
            metadata, text, chunks = await trio.to_thread.run_sync(
                work, abandon_on_cancel=True, limiter=self._pdf_threads)
        finally:
            stop.set()
        return replace(document, metadata={**metadata, **document.metadata}, data=b""), text, chunks

    async def _ingest_one(
        self, store: RagStore, workspace: Workspace, document: DocumentInput, text: str, chunks: list[Chunk],
        progress: Progress | None,
    ) -> IngestResult:
        digest = hashlib.sha256(text.encode()).hexdigest()
        source = document.source or f"sha256:{digest[:16]}"
        signature = await trio.to_thread.run_sync(self._signature_of, chunks)
        with bounded_query():
            state = await store.document_state(workspace.id, source)
        if state is not None and state[1] == digest and state[2] == signature:
            if progress is not None:
                progress(len(chunks))
            if state[3] != document.metadata:
                with bounded_write():
                    await store.update_metadata(workspace.id, state[0], document.metadata)
                return IngestResult(state[0], source, "updated", len(chunks))
            return IngestResult(state[0], source, "unchanged", len(chunks))
        embedded = await self._embed_chunks([c.text for c in chunks], progress)
        new = NewDocument(
            source=source, content_hash=digest, chunker=signature,
            media_type=MEDIA_TYPES[document.format], metadata=document.metadata, chars=len(text),
            chunks=[NewChunk(c.heading, c.content, vector, tokens) for c, (vector, tokens) in zip(chunks, embedded, strict=True)],
        )
        with bounded_write() as progressed:
            document_id, status = await store.put_document(workspace, new, progressed)
        return IngestResult(document_id, source, status, len(chunks),
                            sum(c.tokens for c in chunks) if status != "unchanged" else 0)

    def _signature_of(self, chunks: Sequence[Chunk]) -> str:
        """How a document's chunks were made. One holding words the model cannot read is
        sized by their length since `UNKNOWN_CHARS` (its chunks were ten times too long before):
        such a document is re-indexed once; every other one is chunked as it was."""
        counter = token_counter()
        if any(counter.measure(c.text)[1] for c in chunks):
            return f"{self.signature}/unknown{UNKNOWN_CHARS}"
        return self.signature

    async def _embed_chunks(self, texts: list[str], progress: Progress | None) -> list[tuple[Vectors, Vectors]]:
        out: list[tuple[Vectors, Vectors]] = []
        for start in range(0, len(texts), _INGEST_BATCH):
            batch = texts[start : start + _INGEST_BATCH]
            result, tokens = await self._encoder.embed_with_tokens(batch)
            out.extend((vector, pool_token_vectors(rows)) for vector, rows in zip(result.vectors, tokens, strict=True))
            if progress is not None:
                progress(len(batch))
        return out

    # -- retrieval --

    async def workspace(self, name: str, param: str | None = "x-workspace") -> Workspace:
        """`param`: where the name came from, for errors (None: the URL path)."""
        check_workspace_name(name, param or "workspace")
        with bounded_query():
            workspace = await self.store().workspace(name)
        if workspace is None:
            raise workspace_not_found(name, param)
        return workspace

    async def retrieve(
        self, name: str, query: str, overrides: dict[str, Any] | None = None, param: str | None = "x-workspace"
    ) -> Retrieval:
        workspace = await self.workspace(name, param)
        options = RetrievalOptions.of(self.settings, {**workspace.settings, **(overrides or {})})
        retrieval = Retrieval(workspace=name, query=query, passages=[])
        if not query.strip():
            return retrieval
        started = time.perf_counter()
        query_vectors: dict[str, Any] = {}

        async def sentence() -> None:
            query_vectors["dense"] = (await self._encoder.embed([query])).vectors[0]

        async def tokens() -> None:
            query_vectors["tokens"] = await self._encoder.embed_tokens(query)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sentence)
            nursery.start_soon(tokens)
        embedded = time.perf_counter()
        store = self.store()
        with bounded_query():
            dense, lexical = await store.candidates(workspace, query_vectors["dense"], query, options.candidates)
            fused = reciprocal_rank_fusion([dense, lexical])[: options.rerank]
            rows = await store.chunks(workspace.id, [item for item, _ in fused], self.token_cache)
        searched = time.perf_counter()
        scored = sorted(
            ((maxsim(query_vectors["tokens"], row.token_vectors), row) for row in rows.values()),
            key=lambda pair: (-pair[0], pair[1].id),
        )
        retrieval.candidates = len(fused)
        retrieval.passages = [
            Passage(row.id, row.document_id, row.source, row.ordinal, row.heading, row.content, score, row.metadata)
            for score, row in scored
            if score >= options.score_threshold
        ][: options.top_k]
        retrieval.timings = {
            "embed_ms": (embedded - started) * 1000,
            "search_ms": (searched - embedded) * 1000,
            "rerank_ms": (time.perf_counter() - searched) * 1000,
        }
        return retrieval


def _check_storable(document: DocumentInput, index: int) -> None:
    """PostgreSQL stores no NUL character, in text or in JSON: a 400 naming the field, not
    a database failure. A source longer than the store keeps is refused too: cut short, two
    sources sharing their first 1024 characters would be one document, the second replacing
    the first."""
    if document.source is not None and len(document.source) > _MAX_SOURCE:
        raise invalid_request(
            f"Document {index}: `source` is {len(document.source)} characters long; at most {_MAX_SOURCE}.",
            param=f"documents[{index}].source",
        )
    fields: list[tuple[str, Any]] = [("source", document.source), ("content", document.content)]
    stack: list[tuple[str, Any]] = [("metadata", document.metadata)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                fields.append((f"{where} key", key))
                stack.append((f"{where}.{key}", item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        else:
            fields.append((where, value))
    for where, value in fields:
        if isinstance(value, str) and "\x00" in value:
            raise invalid_request(
                f"Document {index}: `{where}` contains a NUL character (\\u0000), which cannot be stored.",
                param=f"documents[{index}].{where.split(' ')[0]}",
            )


@contextmanager
def bounded_query() -> Iterator[None]:
    """`_database_errors`, and a 503 when the store has not answered within `QUERY_TIMEOUT`
    (the query is cancelled: psycopg closes a connection whose server does not confirm)."""
    with _bounded(QUERY_TIMEOUT):
        yield


@contextmanager
def bounded_write() -> Iterator[Callable[[], None]]:
    """`bounded_query` for a write, within `WRITE_TIMEOUT` of its start or of its last progress
    (the function it yields, called as a write goes on): its transaction cancelled, it commits
    nothing."""
    with _bounded(WRITE_TIMEOUT) as scope:
        def progressed() -> None:
            scope.deadline = trio.current_time() + WRITE_TIMEOUT

        yield progressed


@contextmanager
def _bounded(seconds: float) -> Iterator[trio.CancelScope]:
    with _database_errors(), answered_within(seconds, "The RAG store (PostgreSQL)") as scope:
        yield scope


@contextmanager
def _database_errors() -> Iterator[None]:
    try:
        yield
    except DatabaseError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if exc.sqlstate is not None and exc.sqlstate.startswith("22"):
            # A value PostgreSQL refuses (bad text, out of range): the request's fault.
            raise invalid_request(f"The RAG store refused a value: {reason}", code="invalid_value") from exc
        if isinstance(exc, ConstraintViolation):
            # A concurrent change got there first (the workspace deleted meanwhile, say):
            # retrying the same request at once is not what fixes it, and the constraint's
            # name is the schema's business.
            log.warning("RAG store conflict: %s", exc)
            raise GatewayError(ErrorKind.CONFLICT, "A concurrent change to the workspace conflicted with this one.",
                               code="conflict") from exc
        log.warning("RAG store error: %s", exc)
        raise GatewayError(ErrorKind.UNAVAILABLE, f"The RAG store failed: {reason}", code="database_error",
                           retry_after=2) from exc


# -- the route -------------------------------------------------------------------------------------


def query_text(messages: Sequence[Message]) -> str:
    """What to search for: the last user message; a short follow-up ("and on Linux?") gets
    the user's previous message in front of it."""
    users = [m.text.strip() for m in messages if m.role == "user" and m.text.strip()]
    if not users:
        return ""
    query = users[-1]
    if len(query.split()) < 4 and len(users) > 1:
        query = f"{users[-2]}\n{query}"
    return query[:4000]


def render_passages(passages: Sequence[Passage]) -> str:
    blocks = []
    for number, passage in enumerate(passages, 1):
        where = passage.source + (f" — {passage.heading}" if passage.heading else "")
        blocks.append(f"[{number}] {where}\n{passage.content}")
    return "\n\n".join(blocks)


def inject(request: ChatRequest, retrieval: Retrieval, template: str) -> ChatRequest:
    """`request` with the passages in front of its question: the last user message with text
    (the one the search was made for). The system prompt and the turns before stay as the
    client sent them, so a backend's prefix cache (vLLM's, SGLang's, llama.cpp's) keeps
    serving them turn after turn, and Anthropic's prompt caching too; in the first system
    message, each turn's new passages changed the prompt's first tokens and nothing was
    reused. Open WebUI puts its RAG context there by default, for the same reason."""
    context = template.format(workspace=retrieval.workspace, passages=render_passages(retrieval.passages))
    messages = list(request.messages)
    at = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user" and messages[i].text.strip()), None)
    if at is None:  # no question to put them in front of (the search found nothing to search for)
        messages.insert(0, Message(role="system", content=(TextPart(context),)))
        return replace(request, messages=messages)
    question = messages[at]
    lead = f"{context}\n\n{QUESTION_MARK}"
    if len(question.content) == 1:  # a text alone stays one (a chat template may want a string)
        messages[at] = replace(question, content=(TextPart(f"{lead}\n\n{question.text}"),))
    else:
        messages[at] = replace(question, content=(TextPart(lead), *question.content))
    return replace(request, messages=messages)


# What tells the model where the passages end and the user's own words begin.
QUESTION_MARK = "The user's message:"


def sources_header(retrieval: Retrieval) -> bytes:
    """Compact ASCII JSON of the sources; long lists lose their headings first, then entries."""
    sources = retrieval.sources()
    value = json.dumps(sources, separators=(",", ":"), ensure_ascii=True)
    if len(value) > 6000:
        sources = [{k: v for k, v in s.items() if k != "heading"} for s in sources]
        while sources and len(value := json.dumps(sources, separators=(",", ":"), ensure_ascii=True)) > 6000:
            sources.pop()
    return value.encode("ascii")


def workspace_of(meta: RequestMeta, request: ChatRequest) -> str:
    """The workspace a request on the RAG route names, or a 400."""
    name = meta.workspace
    if not name:
        raise invalid_request("The RAG route needs an `x-workspace` header naming the workspace.",
                              param="x-workspace")
    if request.dialect == "ollama" and request.extra.get("raw") is True:
        # Ollama sends a raw prompt as it is (a template the client wrote itself): passages
        # put in it would break that template, and left out, the answer would say they were given.
        raise invalid_request(
            "`raw: true` sends the prompt exactly as written, without the model's template, which leaves no "
            "place for the passages retrieved from the workspace: leave `raw` out, or `x-workspace`.", param="raw",
        )
    return name


async def as_sent(rag: RagService, name: str, request: ChatRequest) -> tuple[ChatRequest, Headers]:
    """`request` as the RAG route sends it to the model (its question's passages, if any, in
    front of it), and the headers that say so."""
    retrieval = await rag.retrieve(name, query_text(request.messages))
    headers: Headers = [(b"x-rag-workspace", name.encode("ascii")), (SOURCES_HEADER, sources_header(retrieval))]
    if not retrieval.passages:
        return request, [*headers, (b"x-rag-context", b"none")]
    return inject(request, retrieval, rag.settings.template), [*headers, (b"x-rag-context", b"injected")]


async def counted_as_sent(rag: RagService | None, meta: RequestMeta, request: ChatRequest) -> tuple[ChatRequest, Headers]:
    """A token count's request as its chat would reach the model: on the RAG route with the
    passages its question retrieves now, which a count of the client's messages alone leaves out."""
    if meta.route != "rag":
        return request, []
    name = workspace_of(meta, request)
    if rag is None:
        raise GatewayError(ErrorKind.UNAVAILABLE, "RAG is not available on this gateway.")
    return await as_sent(rag, name, request)


class RagRoute:
    """`chat.routes["rag"]`: retrieval, injection, then the routed backend."""

    needs_backend = True
    publishes_events = False

    def __init__(self, rag: RagService) -> None:
        self._rag = rag

    async def admit(self, exchange: ChatExchange) -> None:
        await self._rag.workspace(workspace_of(exchange.meta, exchange.request))

    async def cache_scope(self, exchange: ChatExchange) -> str | None:
        # Its id too: a workspace deleted and made again counts its revisions from 0 again.
        workspace = await self._rag.workspace(workspace_of(exchange.meta, exchange.request))
        return f"rag:{workspace.id}.{workspace.revision}"

    def producer(self, exchange: ChatExchange) -> Producer:
        async def produce(send: trio.MemorySendChannel[Batch]) -> None:
            name = workspace_of(exchange.meta, exchange.request)
            request, headers = await as_sent(self._rag, name, exchange.request)
            exchange.response_headers.extend(headers)
            await exchange.call_backend(send, request=request)

        return produce


def passages_json(passages: Sequence[Passage]) -> list[dict[str, Any]]:
    return [
        {**passage.source_entry(n), "content": passage.content, "metadata": passage.metadata}
        for n, passage in enumerate(passages, 1)
    ]


__all__ = [
    "ANSWER_HEADERS",
    "SOURCES_HEADER",
    "DocumentInput",
    "IngestResult",
    "Passage",
    "RagRoute",
    "RagService",
    "Retrieval",
    "RetrievalOptions",
    "as_sent",
    "bounded_query",
    "bounded_write",
    "check_workspace_name",
    "counted_as_sent",
    "inject",
    "language_locked",
    "query_text",
    "reciprocal_rank_fusion",
    "validate_overrides",
]
