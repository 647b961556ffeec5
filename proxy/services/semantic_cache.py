"""The semantic cache: an earlier answer reused for a conversation that means the same.

Opt-in: `[semantic_cache] enabled = true` (every model), `models = [...]`, or the request
header `x-cache: semantic`; `x-cache: off`/`no-cache`/`no-store`/`exact` keep it out.

What has to match, and how:

- Exactly (the entry's `scope`): the routed model, every generation parameter, the tools and
  tool choice (and whether parallel tool calls are allowed), the dialect-specific extras, the workflow pipeline that made the answer (one
  pipeline's answer is neither another's nor the model's own), the RAG workspace and its revision (ingesting or
  deleting a document, or changing its settings, makes the workspace's entries stale; an
  answer is stored under the revision its lookup saw, from before its retrieval), and the
  conversation's *shape*: the roles in order, how many segments each message has, the names of the tools called,
  each message's own extras, any image or opaque part (by content), every number in the
  text and every negation word.
  Embeddings are poor at exactly those ("2+2" vs "2+3", "safe" vs "not safe" score 0.89
  and 0.99 with this model), so they are compared literally.
- By meaning: every message, role included, is embedded (a message longer than the model
  reads is cut into segments, each embedded), and an entry matches only if *each* segment's
  cosine similarity with its counterpart reaches the threshold (0.95 by default). Embedding
  the conversation as one text would not do: the model reads 256 tokens, so two long
  conversations that differ at the end would embed the same; and matching the last message
  alone serves one conversation's answer to another (the peers' documented failure).

The mean of the segment vectors is indexed (HNSW) to find candidates within a scope; the
per-segment check decides. Entries expire after `ttl_seconds`; expired ones are purged as
new ones are stored. Deleting a response (`DELETE /v1/responses/{id}`) deletes the entry
holding its answer, on every instance. The cache is best effort: a database or model failure is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

import numpy as np
import trio

from proxy.config import SemanticCacheSettings
from proxy.domain.chat import (
    ChatCompletion,
    ChatRequest,
    FinishReason,
    ImagePart,
    Message,
    OpaquePart,
)
from proxy.domain.errors import GatewayError
from proxy.domain.routing import Router
from proxy.infra.chat_store import completion_from_json, completion_to_json, stored_headers
from proxy.infra.chunking import MODEL_TOKENS, TokenCounter, token_counter
from proxy.infra.embedder import EMBEDDING_DIMENSIONS, Vectors
from proxy.infra.postgres import Database, DatabaseError, json_text
from proxy.services._contracts import ANSWER_HEADERS
from proxy.services.chat import CachedAnswer, RequestMeta
from proxy.services.embeddings import TextEncoder

log = logging.getLogger("llm_proxy.semantic_cache")

_OFF: Final = frozenset({"off", "no-cache", "no-store", "exact", "none", "bypass"})
_IGNORED_EXTRA: Final = frozenset({"user", "safety_identifier", "metadata", "store", "keep_alive", "service_tier"})
_NUMBER: Final = re.compile(r"\d+(?:[.,]\d+)*")
_NEGATION: Final = re.compile(
    r"\b(?:not|no|never|none|nor|neither|nothing|nobody|nowhere|without|cannot|can't|won't|don't|doesn't|"
    r"didn't|isn't|aren't|wasn't|weren't|shouldn't|wouldn't|couldn't|mustn't|n't)\b",
    re.IGNORECASE,
)
_CANDIDATES: Final = 5
_ID_PREFIX: Final = re.compile(r"^[A-Za-z]+[-_]")
_SEGMENT_CACHE: Final = 4096
_PURGE_BATCH: Final = 200
_CACHEABLE_FINISH: Final = frozenset({FinishReason.STOP, FinishReason.LENGTH, FinishReason.TOOL_CALLS})
# How long a request waits for the cache's database, per lookup: a stalled or locked PostgreSQL
# answers nothing, and a cache is no reason for a chat to wait for it. Past it: a miss.
LOOKUP_TIMEOUT: Final = 3.0
# An entry names its run (`trace_id`), whose deletion deletes it (`ChatStore.delete`). Not
# stored for a run deleted already (its client may delete it as soon as it has the answer,
# before this store): the run's row is locked (FOR SHARE), so a delete committing meanwhile
# is seen, and a delete after this commits sees the entry.
_STORE: Final = (
    "WITH run AS (SELECT deleted_at FROM chat_log WHERE trace_id = %s FOR SHARE)"
    " INSERT INTO semantic_cache (scope, model, workspace, embedding, segments, conversation, completion,"
    " expires_at, trace_id) SELECT %s, %s, %s, %s, %s, %s, %s::jsonb, now() + make_interval(secs => %s), %s"
    " WHERE NOT EXISTS (SELECT 1 FROM run WHERE deleted_at IS NOT NULL)"
    " ON CONFLICT (scope, conversation) DO UPDATE SET embedding = EXCLUDED.embedding,"
    " segments = EXCLUDED.segments, completion = EXCLUDED.completion, expires_at = EXCLUDED.expires_at,"
    " created_at = now(), trace_id = EXCLUDED.trace_id"
)


@dataclass(frozen=True, slots=True)
class Conversation:
    """A request's cache key: the exact `scope`, the text `segments`, and `digest` (the
    segments' exact hash, one entry per conversation and scope)."""

    scope: str
    segments: list[str]
    digest: str
    model: str
    workspace: str | None


def _message_text(message: Message) -> str:
    parts = [message.text]
    for call in message.tool_calls:
        parts.append(f"\n[tool call {call.name}] {call.arguments}")
    return "".join(parts)


def _opaque(message: Message) -> list[str]:
    """Digests of the parts that are compared exactly (images, unmodelled parts)."""
    out = []
    for part in message.content:
        if isinstance(part, ImagePart):
            out.append(hashlib.sha256(f"{part.url}|{part.detail}".encode()).hexdigest()[:32])
        elif isinstance(part, OpaquePart):
            blob = json.dumps(part.data, sort_keys=True, default=str)
            out.append(hashlib.sha256(f"{part.dialect}|{blob}".encode()).hexdigest()[:32])
    return out


def conversation_key(
    request: ChatRequest, *, model: str, workspace: str | None, revision: str | None,
    tenant: str | None = None, counter: TokenCounter | None = None, pipeline: str | None = None,
) -> Conversation:
    """Split `request` into what is compared exactly and what by meaning (module docstring)."""
    counter = counter or token_counter()
    segments: list[str] = []
    shape: list[Any] = []
    literal: list[str] = []
    for message in request.messages:
        text = f"{message.role}: {_message_text(message)}"
        tokens, unknown = counter.measure(text)
        pieces = counter.split(text, MODEL_TOKENS) if tokens > MODEL_TOKENS else [text]
        segments.extend(pieces)
        # A message's own extra fields (DeepSeek's `prefix`, a legacy `function` role, …) may
        # change the answer; its raw `content` is already compared as text and opaque parts.
        extra = {k: v for k, v in message.extra.items() if k != "content"}
        shape.append([message.role, len(pieces), [call.name for call in message.tool_calls], _opaque(message),
                      message.name, extra])
        # What the model reads as [UNK] (a Thai or Amharic word, an emoji) embeds as every
        # other such run does: two questions in Thai scored as one. Compared literally instead
        # (only when there is some, so that other entries keep their scope).
        literal.append(" ".join(_NUMBER.findall(text)) + "|" + " ".join(m.lower() for m in _NEGATION.findall(text))
                       + ("|" + "\x1f".join(unknown) if unknown else ""))
    params = {k: v for k, v in asdict(request.params).items() if v not in (None, (), [])}
    exact = {
        "model": model,
        "params": params,
        "tools": [asdict(tool) for tool in request.tools],
        "tool_choice": asdict(request.tool_choice) if request.tool_choice else None,
        "extra": {k: v for k, v in request.extra.items() if k not in _IGNORED_EXTRA},
        # `false` asks for one call a turn: an answer making several is not its answer (a
        # Responses request has no `extra` that would say so). Only when said, as for the
        # pipeline below.
        **({"parallel_tool_calls": request.parallel_tool_calls} if request.parallel_tool_calls is not None else {}),
        "workspace": workspace,
        "revision": revision,
        "tenant": tenant,  # one key's answers are never another's (as with the exact cache)
        "shape": shape,
        "literal": literal,
        # Only when set, so that the entries of the direct and RAG routes keep their scope.
        **({"pipeline": pipeline} if pipeline is not None else {}),
    }
    scope = hashlib.sha256(
        json.dumps(exact, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    ).hexdigest()
    digest = hashlib.sha256("\x1e".join(segments).encode()).hexdigest()
    return Conversation(scope=scope, segments=segments, digest=digest, model=model, workspace=workspace)


def _answer_json(completion: ChatCompletion, headers: Sequence[tuple[bytes, bytes]]) -> dict[str, Any]:
    return completion_to_json(completion, [header for header in headers if header[0] in ANSWER_HEADERS])


def pack_segments(vectors: Vectors) -> bytes:
    return np.asarray(vectors, dtype="<f2").tobytes()


def unpack_segments(data: bytes) -> Vectors:
    rows = np.frombuffer(data, dtype="<f2").reshape(-1, EMBEDDING_DIMENSIONS).astype(np.float32)
    return np.asarray(rows / np.clip(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12, None), dtype=np.float32)


def _mean_vector(vectors: Vectors) -> Vectors:
    mean = vectors.mean(axis=0)
    return np.asarray(mean / max(float(np.linalg.norm(mean)), 1e-12), dtype=np.float32)


class SemanticCache:
    """`lookup` before calling the backend, `store` after a complete answer (see the module
    docstring for what makes two conversations the same)."""

    def __init__(
        self,
        settings: SemanticCacheSettings,
        database: Callable[[], Database | None],
        encoder: TextEncoder,
        router: Router | None = None,
    ) -> None:
        self.settings = settings
        self._database = database
        self._encoder = encoder
        self._router = router
        self._vectors: OrderedDict[str, Vectors] = OrderedDict()
        # The workspace revision each RAG request's lookup saw, by trace id, for its store:
        # read again after the answer, it could be a revision the answer's passages predate.
        self._revisions: OrderedDict[str, str | None] = OrderedDict()

    def enabled_for(self, request: ChatRequest, meta: RequestMeta) -> bool:
        if meta.cache in _OFF:
            return False
        if meta.cache == "semantic" or self.settings.enabled:
            return True
        models = self.settings.models
        if not models:
            return False
        listed = set().union(*(self._names(model) for model in models))
        return not listed.isdisjoint(self._names(request.model))

    async def lookup(self, request: ChatRequest, meta: RequestMeta) -> CachedAnswer | None:
        """The cached answer to a conversation that means the same, or None."""
        if not self.enabled_for(request, meta) or not request.messages:
            return None
        db = self._database()
        if db is None:
            return None
        try:
            with trio.fail_after(LOOKUP_TIMEOUT):
                revision = await self._revision(db, meta)
            if meta.route == "rag":
                self._revisions[meta.trace_id] = revision
                while len(self._revisions) > _SEGMENT_CACHE:
                    self._revisions.popitem(last=False)
            key = await self._key(request, meta, revision)
            vectors = await self._embed(key.segments)
            with trio.fail_after(LOOKUP_TIMEOUT):
                async with db.transaction() as tx:
                    await tx.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                    rows = await tx.fetch(
                        "SELECT id, segments, completion, trace_id FROM semantic_cache"
                        " WHERE scope = %s AND expires_at > now() ORDER BY embedding <=> %s LIMIT %s",
                        (key.scope, _mean_vector(vectors), _CANDIDATES),
                    )
            best: tuple[float, Any] | None = None
            for row_id, segments, completion, trace_id in rows:
                stored = unpack_segments(bytes(segments))
                if stored.shape != vectors.shape:
                    continue
                similarity = float(np.min(np.sum(stored * vectors, axis=1)))
                if similarity >= self.settings.threshold and (best is None or similarity > best[0]):
                    best = (similarity, (row_id, completion, trace_id))
            if best is None:
                return None
            row_id, completion, trace_id = best[1]
            self._revisions.pop(meta.trace_id, None)  # a hit stores nothing
            with trio.move_on_after(LOOKUP_TIMEOUT):  # only a counter: the hit stands without it
                await db.execute("UPDATE semantic_cache SET hits = hits + 1 WHERE id = %s", (row_id,))
            answer = completion if isinstance(completion, dict) else json.loads(completion)
            return CachedAnswer(_as_new(completion_from_json(answer)), stored_headers(answer), trace_id)
        except (DatabaseError, GatewayError) as exc:
            log.warning("semantic cache lookup failed (a miss): %s", exc)
            return None
        except trio.TooSlowError:
            log.warning("semantic cache lookup: no answer from the database within %g s (a miss)", LOOKUP_TIMEOUT)
            return None

    async def store(
        self, request: ChatRequest, meta: RequestMeta, completion: ChatCompletion, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Remember `completion` (and those of `headers` that belong to it) as the answer to
        `request` (complete answers only)."""
        if not self.enabled_for(request, meta) or not request.messages or not completion.choices:
            return
        if any(choice.finish_reason not in _CACHEABLE_FINISH for choice in completion.choices):
            return
        db = self._database()
        if db is None:
            return
        try:
            if meta.trace_id in self._revisions:
                revision = self._revisions.pop(meta.trace_id)
            else:  # stored without a lookup first
                revision = await self._revision(db, meta)
            key = await self._key(request, meta, revision)
            vectors = await self._embed(key.segments)
            await db.execute(_STORE, (
                meta.trace_id, key.scope, key.model, key.workspace, _mean_vector(vectors), pack_segments(vectors),
                key.digest, json_text(_answer_json(completion, headers)), self.settings.ttl_seconds, meta.trace_id,
            ))
            await db.execute(
                "DELETE FROM semantic_cache WHERE id IN"
                " (SELECT id FROM semantic_cache WHERE expires_at <= now() LIMIT %s)",
                (_PURGE_BATCH,),
            )
        except (DatabaseError, GatewayError) as exc:
            log.warning("semantic cache store failed: %s", exc)

    # -- internals --

    def _model(self, request: ChatRequest) -> str:
        return self._routed(request.model) or request.model

    def _routed(self, model: str) -> str | None:
        """`backend/model` as `model` is routed (aliases applied), or None if it is not."""
        if self._router is None:
            return None
        try:
            route = self._router.resolve(model)
        except GatewayError:
            return None
        return f"{route.backend}/{_untagged(route.upstream_model)}"

    def _names(self, model: str) -> set[str]:
        """What `model` is known as to `[semantic_cache] models`: its name and the model it
        is routed to, so a listed alias, its target, and an Ollama client's `:latest` spelling
        of either all match one another."""
        routed = self._routed(model)
        return {_untagged(model)} if routed is None else {_untagged(model), routed}

    async def _revision(self, db: Database, meta: RequestMeta) -> str | None:
        """The RAG workspace's revision (None off the RAG route, or for no such workspace),
        as `<id>.<revision>`: a workspace deleted and made again under its name counts its
        revisions from 0 again, and an answer stored for the old one (by a request that was
        running as it was deleted) must not pass for the new one's when the counts meet."""
        if meta.route != "rag" or meta.workspace is None:
            return None
        row = await db.fetchrow("SELECT id, revision FROM rag_workspaces WHERE name = %s", (meta.workspace,))
        return None if row is None else f"{row[0]}.{row[1]}"

    async def _key(self, request: ChatRequest, meta: RequestMeta, revision: str | None) -> Conversation:
        workspace = meta.workspace if meta.route == "rag" else None
        # A workflow's answer is its pipeline's (fan-out, judge, ...), not the model's: as in
        # the exact cache's `req_id`, the pipeline (named, the default's too) is part of the key.
        pipeline = (meta.pipeline or "") if meta.route == "workflow" else None
        counter = token_counter()
        return await trio.to_thread.run_sync(
            lambda: conversation_key(request, model=self._model(request), workspace=workspace,
                                     revision=revision, tenant=meta.tenant, counter=counter, pipeline=pipeline)
        )

    async def _embed(self, segments: Sequence[str]) -> Vectors:
        """Segment vectors, each computed once per process while it stays in the LRU (a
        multi-turn conversation resends its history every turn)."""
        keys = [hashlib.sha1(segment.encode()).hexdigest() for segment in segments]
        unique = {k: segment for k, segment in zip(keys, segments, strict=True) if k not in self._vectors}
        if unique:
            result = await self._encoder.embed(list(unique.values()))
            for k, vector in zip(unique, result.vectors, strict=True):
                self._vectors[k] = vector
        out = np.empty((len(segments), EMBEDDING_DIMENSIONS), np.float32)
        for i, k in enumerate(keys):
            self._vectors.move_to_end(k)
            out[i] = self._vectors[k]
        while len(self._vectors) > _SEGMENT_CACHE:
            self._vectors.popitem(last=False)
        return out


def _as_new(completion: ChatCompletion) -> ChatCompletion:
    """Another request's answer, given to one that is a request of its own (its own trace id and
    log line): its own id (the backend's kind, `chatcmpl-`, `msg_`, …) and time, or whatever
    counts answers by their id (a gateway in front, the client's logs or tracing) counts the
    earlier one twice and this one never."""
    prefix = _ID_PREFIX.match(completion.id)
    fresh = (prefix.group(0) if prefix else "chatcmpl-") + secrets.token_hex(12)
    return replace(completion, id=fresh, created=int(time.time()))


def _untagged(model: str) -> str:
    """Ollama's `name:latest` is `name`, as the router takes it."""
    return model.removesuffix(":latest")


__all__ = ["Conversation", "SemanticCache", "conversation_key"]
