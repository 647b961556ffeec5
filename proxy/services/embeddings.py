"""Embeddings: the in-process model as an app-lifetime service, and routing to backends.

The local model (all-MiniLM-L6-v2, `LOCAL_MODEL`) answers to its own names (see
`LOCAL_NAMES`, matched case-insensitively, after the gateway's `[models]` aliases); every
other model name is routed like a chat model, to an OpenAI-compatible (`/v1/embeddings`) or
Ollama (`/api/embed`; `/api/embeddings` for a legacy request) backend.

The model is loaded on first use, not at start-up: loading takes ~0.5 s of CPU, which a
gateway that never embeds (and every test that starts one) should not pay. `preload = true`
loads it in the background right after start instead. Loaded sessions are kept for the
process's life and reused by the next gateway started in the same process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np
import trio

from proxy.config import EmbeddingSettings
from proxy.domain.errors import CONTEXT_LENGTH_EXCEEDED, ErrorKind, GatewayError, invalid_request
from proxy.domain.routing import Router
from proxy.domain.tokens import estimate_tokens, requested_tokens
from proxy.infra.backends import Backend, ModelInfo
from proxy.infra.backends._base import TOKEN_ARRAYS_HINT, EmbeddingBackend, EmbeddingCall
from proxy.infra.embedder import (
    EMBEDDING_DIMENSIONS,
    LOCAL_EMBEDDING_MODEL,
    MAX_INPUT_TOKENS,
    EmbeddingResult,
    LocalEmbedder,
    Vectors,
)
from proxy.services._records import NOTHING_RESERVED, Reserved
from proxy.services.auth import check_body_models, check_model
from proxy.services.chat import ExchangeRecord, RecordSink
from proxy.services.models import ModelCatalog

log = logging.getLogger("llm_proxy.embeddings")

LOCAL_MODEL: Final = LOCAL_EMBEDDING_MODEL
LOCAL_BACKEND: Final = "local"
LOCAL_OWNER: Final = "llm-proxy"
# What clients call this model: its own id, sentence-transformers' and Ollama's names.
LOCAL_NAMES: Final = frozenset({
    LOCAL_EMBEDDING_MODEL,
    "all-minilm-l6-v2:latest",
    "sentence-transformers/all-minilm-l6-v2",
    "all-minilm",
    "all-minilm:latest",
    "all-minilm:l6-v2",
    "all-minilm:22m",
})


class TextEncoder(Protocol):
    """What retrieval and the semantic cache need from the local model (a `LocalEmbedder` or
    the gateway's `LocalModel`)."""

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult: ...

    async def embed_tokens(self, text: str) -> Vectors: ...

    async def embed_with_tokens(self, texts: Sequence[str]) -> tuple[EmbeddingResult, list[Vectors]]: ...


# -- the local model as a service ----------------------------------------------------------------

# Loaded embedders not being served, by (threads, model file): the next gateway in this
# process takes one instead of loading the model again.
_Key = tuple[int, Path | None]
_idle: dict[_Key, list[LocalEmbedder]] = {}


def _acquire(key: _Key) -> LocalEmbedder:
    pool = _idle.get(key)
    return pool.pop() if pool else LocalEmbedder(intra_op_threads=key[0], model_path=key[1])


def _release(key: _Key, embedder: LocalEmbedder) -> None:
    if embedder.loaded:
        _idle.setdefault(key, []).append(embedder)


class LocalModel:
    """The in-process embedding model, served from the gateway's nursery.

    `embed`/`embed_tokens` start the batcher on first use (loading the model in a worker
    thread); `stop()` ends it with the gateway, failing calls still waiting with 503.
    """

    def __init__(self, nursery: trio.Nursery, *, threads: int = 1, model_path: Path | None = None) -> None:
        self._nursery = nursery
        self._key: _Key = (threads, model_path)
        self._lock = trio.Lock()
        self._running: LocalEmbedder | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = False
        self.load_seconds = 0.0

    @property
    def loaded(self) -> bool:
        return self._running is not None

    async def embedder(self) -> LocalEmbedder:
        running = self._running
        if running is not None:
            return running
        async with self._lock:
            if self._running is None:
                if self._stopped:
                    raise GatewayError(ErrorKind.UNAVAILABLE, "The local embedding model is shut down.")
                try:
                    await self._nursery.start(self._serve)
                except Exception as exc:  # a missing or broken model file: say so, retry next time
                    log.exception("loading the local embedding model failed")
                    raise GatewayError(
                        ErrorKind.UNAVAILABLE, f"The local embedding model could not be loaded: {exc}"
                    ) from exc
            assert self._running is not None
            return self._running

    async def warm(self) -> None:
        """Load and start the model now (for `preload`); failures are left to the first call."""
        with contextlib.suppress(GatewayError):
            await self.embedder()

    def stop(self) -> None:
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        return await (await self.embedder()).embed(texts)

    async def embed_tokens(self, text: str) -> Vectors:
        return await (await self.embedder()).embed_tokens(text)

    async def embed_with_tokens(self, texts: Sequence[str]) -> tuple[EmbeddingResult, list[Vectors]]:
        return await (await self.embedder()).embed_with_tokens(texts)

    async def _serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        embedder = _acquire(self._key)
        started = time.perf_counter()
        try:
            with trio.CancelScope() as self._scope:
                if self._stopped:
                    return

                async def serving(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                    await embedder.serve(task_status=task_status)

                async with trio.open_nursery() as inner:
                    await inner.start(serving)
                    self.load_seconds = time.perf_counter() - started
                    self._running = embedder
                    task_status.started()
        finally:
            self._running = None
            self._scope = None
            _release(self._key, embedder)


# -- requests and results ------------------------------------------------------------------------


@dataclass(slots=True)
class EmbeddingRequest:
    """An embeddings request in any dialect. `inputs` are texts, or token-id arrays (only a
    backend that takes them can serve those). `truncate`: inputs longer than the model reads
    are cut (True) or refused (False). `extra`: the client's other fields, in its `dialect`
    ("openai" or "ollama"): passed on as sent to a backend of that kind only (an OpenAI
    server refuses Ollama's `options`; the local model has no use for either). `legacy`:
    Ollama's `/api/embeddings`, whose vector an Ollama backend computes on that endpoint too.
    `messages`: vLLM's chat form (multimodal embedding models), instead of `inputs`: one
    embedding of the whole chat, which only an OpenAI-compatible backend is sent."""

    model: str
    inputs: list[str] | list[list[int]]
    dimensions: int | None = None
    truncate: bool = True
    headers: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    dialect: str = "openai"
    legacy: bool = False
    messages: list[dict[str, Any]] | None = None
    # An Ollama client's model window (as its backend lists it): with `truncate`, what vLLM is
    # asked to cut inputs to (`truncate_prompt_tokens`), as Ollama cuts them, not refuse them.
    window: int | None = None

    def estimated_tokens(self) -> int:
        """Its input's tokens as a rate limit reserves them (a token array's exactly; a chat's
        text, its media not counted)."""
        if self.messages is not None:
            return requested_tokens(self.messages, generates=False).tokens
        ids = sum(len(item) for item in self.inputs if isinstance(item, list))
        return ids + estimate_tokens(sum(len(item) for item in self.inputs if isinstance(item, str)))


@dataclass(slots=True)
class EmbeddingResponse:
    model: str
    vectors: Vectors  # (inputs, dimensions) float32
    prompt_tokens: int
    backend: str
    truncated: int = 0  # inputs only partly embedded
    upstream_model: str = ""
    # A backend that reports no usage (Ollama's legacy endpoint, some OpenAI-compatible
    # servers): what its key is charged instead, an estimate (the client is told nothing).
    estimated_tokens: int | None = None
    load_seconds: float = 0.0  # the model's load time, when this request loaded it
    total_seconds: float = 0.0


class EmbeddingService:
    def __init__(
        self,
        settings: EmbeddingSettings,
        router: Router,
        backends: dict[str, Backend],
        local: LocalModel | None,
        record: RecordSink | None = None,
    ) -> None:
        self.settings = settings
        self._router = router
        self._backends = backends
        self.local = local if settings.local_model else None
        self._record = record

    def record(
        self, *, request_id: str, dialect: str, model: str, status: int, error: str | None, total_ms: float,
        api_key_id: int | None, response: EmbeddingResponse | None, reserved: Reserved = NOTHING_RESERVED,
    ) -> None:
        """One embeddings request, answered or refused, as the chat service records an
        exchange: its key's usage counts one request (an error at status >= 400), and the
        prompt tokens `response` reports are charged to the key's token limit."""
        if self._record is None:
            return
        self._record(ExchangeRecord(
            trace_id="", request_id=request_id, model=model,
            backend=response.backend if response is not None else "",
            upstream_model=response.upstream_model if response is not None else "",
            stream=False, dialect=dialect, status=status, total_ms=total_ms,
            prompt_tokens=_charged(response) if response is not None else None,
            completion_tokens=0 if response is not None else None,
            error=error, source="backend" if response is not None else "refused", api_key_id=api_key_id,
            kind="embeddings", reserved=reserved,
        ))

    def record_hangup(
        self, *, request_id: str, dialect: str, request: EmbeddingRequest, total_ms: float, api_key_id: int | None,
        reserved: Reserved = NOTHING_RESERVED,
    ) -> None:
        """A request its client left (or the server's shutdown cut) while it was being
        embedded: one request, an error, and its input's estimated tokens, since the work
        was asked for and may well have been done (leaving must not be a way around `--tpm`);
        the local model's, no more than it reads of each input, as its answer would be."""
        if self._record is None:
            return
        tokens = request.estimated_tokens()
        backend, upstream = LOCAL_BACKEND, LOCAL_MODEL
        if self.is_local(request.model):
            tokens = min(tokens, max(1, len(request.inputs)) * MAX_INPUT_TOKENS)
        else:
            try:  # where it was sent, as a chat's line says
                route = self._router.resolve(request.model)
                backend, upstream = route.backend, route.upstream_model
            except GatewayError:  # left while the backends' listings were read for its model
                backend = upstream = ""
        self._record(ExchangeRecord(
            trace_id="", request_id=request_id, model=request.model, backend=backend, upstream_model=upstream,
            stream=False, dialect=dialect, status=499, total_ms=total_ms,
            prompt_tokens=tokens, completion_tokens=0,
            cancelled=True, usage_estimated=True, source="backend", api_key_id=api_key_id, kind="embeddings",
            reserved=reserved,
        ))

    def is_local(self, model: str) -> bool:
        if self.local is None:
            return False
        target = self._router.aliases.get(model, model)
        return target.lower() in LOCAL_NAMES

    def local_ceiling(self, body: object) -> int | None:
        """The most tokens an embeddings request (its parsed body) can cost if the local model
        serves it, which reads the first `MAX_INPUT_TOKENS` of each input; None: another
        model's. A rate limit reserves no more than this, and refuses no long input by it."""
        if not isinstance(body, dict):
            return None
        model = body.get("model") or body.get("name")
        if not isinstance(model, str) or not self.is_local(model):
            return None
        texts = body.get("input", body.get("prompt"))
        return (len(texts) if isinstance(texts, list) else 1) * MAX_INPUT_TOKENS

    def local_models(self) -> list[ModelInfo]:
        if self.local is None:
            return []
        details = {
            "details": {
                "parent_model": "",
                "format": "onnx",
                "family": "bert",
                "families": ["bert"],
                "parameter_size": "22.7M",
                "quantization_level": "Q8_0",
            },
            "size": 22_900_000,
            "embedding_length": EMBEDDING_DIMENSIONS,
            "context_length": MAX_INPUT_TOKENS,
        }
        return [ModelInfo(id=LOCAL_MODEL, backend=LOCAL_BACKEND, owned_by=LOCAL_OWNER, details=details)]

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResponse:
        check_model(request.model)  # the in-process model is not resolved through the router
        if len(request.inputs) > self.settings.max_inputs:
            raise invalid_request(
                f"Too many inputs: {len(request.inputs)}; at most {self.settings.max_inputs} per request.",
                param="input",
            )
        started = time.perf_counter()
        if self.is_local(request.model):
            response = await self._embed_locally(request)
        else:
            response = await self._embed_on_backend(request)
        # Ollama counts the load within the total (a backend that says so is believed).
        response.total_seconds = max(time.perf_counter() - started, response.load_seconds)
        return response

    async def _embed_locally(self, request: EmbeddingRequest) -> EmbeddingResponse:
        assert self.local is not None
        if request.dimensions is not None and request.dimensions != EMBEDDING_DIMENSIONS \
                and request.dialect != "ollama":  # Ollama shortens any model's vectors (`_shortened`)
            raise invalid_request(
                f"Model `{request.model}` produces {EMBEDDING_DIMENSIONS}-dimensional embeddings; "
                f"`dimensions` = {request.dimensions} is not supported (omit it or pass {EMBEDDING_DIMENSIONS}).",
                param="dimensions",
            )
        if request.messages is not None:
            raise invalid_request(
                f"Model `{request.model}` embeds text; chat `messages` (a multimodal embedding) are only "
                "passed to OpenAI-compatible backends such as vLLM.",
                param="messages",
            )
        texts: list[str] = []
        for item in request.inputs:
            if not isinstance(item, str):
                raise invalid_request(
                    f"Model `{request.model}` embeds text; token arrays are only passed to backends that take them. "
                    + TOKEN_ARRAYS_HINT,
                    param="input",
                )
            texts.append(item)
        was_loaded = self.local.loaded
        result = await self.local.embed(texts)
        truncated = sum(result.truncated)
        if truncated and not request.truncate:
            longest = max(result.token_counts)
            raise invalid_request(
                f"The input length exceeds the context length of `{request.model}` ({MAX_INPUT_TOKENS} tokens, "
                f"input: {longest}+)",
                param="input",
            )
        return EmbeddingResponse(
            model=request.model,
            vectors=_shortened(result.vectors, request.dimensions),
            prompt_tokens=result.total_tokens,
            backend=LOCAL_BACKEND,
            truncated=truncated,
            upstream_model=LOCAL_MODEL,
            load_seconds=0.0 if was_loaded else self.local.load_seconds,
        )

    async def _embed_on_backend(self, request: EmbeddingRequest) -> EmbeddingResponse:
        route = self._router.resolve(request.model)
        backend = self._backends[route.backend]
        if not isinstance(backend, EmbeddingBackend):
            raise invalid_request(
                f"Model `{request.model}` is served by backend `{route.backend}` ({backend.config.kind}), "
                "which has no embeddings API.",
                param="model",
            )
        if request.messages is not None and backend.config.kind != "openai":
            raise invalid_request(
                f"Model `{request.model}` is served by backend `{route.backend}` ({backend.config.kind}), whose "
                "embeddings API takes text only: chat `messages` need an OpenAI-compatible backend such as vLLM.",
                param="messages",
            )
        # Ollama loads the model for a request with no input (`keep_alive: 0` unloads it): how
        # its clients preload an embedding model. Any other backend has nothing to do.
        if not request.inputs and request.messages is None and not (
            request.dialect == "ollama" and backend.config.kind == "ollama"
        ):
            return EmbeddingResponse(
                request.model, np.empty((0, 0), np.float32), 0, route.backend, upstream_model=route.upstream_model
            )
        extra = request.extra if backend.config.kind == request.dialect else {}
        check_body_models(extra)  # sent as they came: they may name other models
        # Ollama's `dimensions` shortens any model's vector; an OpenAI-compatible server refuses
        # it for a model not trained for that (vLLM: "does not support matryoshka
        # representation"): the gateway shortens the full vector as Ollama would.
        shortens_here = request.dialect == "ollama" and backend.config.kind != "ollama"
        if request.truncate and request.window is not None and backend.config.kind == "openai" \
                and backend.config.sends_template_fields:  # vLLM's field, which a hosted API would refuse
            extra = {**extra, "truncate_prompt_tokens": request.window}
        call = EmbeddingCall(
            upstream_model=route.upstream_model, inputs=request.inputs,
            dimensions=None if shortens_here else request.dimensions,
            truncate=None if request.truncate else False, headers=request.headers,
            extra=extra, legacy=request.legacy,
            messages=request.messages,
        )
        try:
            output = await backend.embed(call)
        except GatewayError as error:
            if error.code == CONTEXT_LENGTH_EXCEEDED:
                error.param = "input"  # the backends' mapping names a chat's `messages`
            raise
        vectors = output.vectors
        return EmbeddingResponse(
            model=request.model,
            vectors=_shortened(vectors, request.dimensions) if shortens_here else vectors,
            prompt_tokens=output.prompt_tokens or 0,
            backend=route.backend,
            upstream_model=route.upstream_model,
            load_seconds=output.load_seconds,
            estimated_tokens=None if output.prompt_tokens is not None else (
                _estimate(request.inputs) if request.messages is None else request.estimated_tokens()
            ),
        )


def _shortened(vectors: Vectors, dimensions: int | None) -> Vectors:
    """Ollama's `dimensions` (the only dialect that gets here with one the model lacks): each
    vector's first `dimensions` values made a unit vector again; the whole vector when it has
    no more than that (Ollama's `/api/embed`, for any model)."""
    if dimensions is None or dimensions >= vectors.shape[-1]:
        return vectors
    head = vectors[:, :dimensions]
    norms = np.linalg.norm(head, axis=-1, keepdims=True)
    return np.asarray(head / np.clip(norms, 1e-12, None), dtype=np.float32)


# About four characters a token, as OpenAI-compatible tokenizers roughly count English text.
_CHARS_PER_TOKEN = 4


def _estimate(inputs: list[str] | list[list[int]]) -> int:
    return sum(len(item) if isinstance(item, list) else -(-len(item) // _CHARS_PER_TOKEN) for item in inputs)


def _charged(response: EmbeddingResponse) -> int:
    if response.estimated_tokens is not None:
        return response.estimated_tokens
    return response.prompt_tokens


class CatalogWithLocalModels(ModelCatalog):
    """The model catalogue plus the in-process embedding model."""

    def __init__(
        self, embeddings: EmbeddingService, backends: Mapping[str, Backend], router: Router, ttl: float
    ) -> None:
        super().__init__(backends, router, ttl)
        self._embeddings = embeddings

    async def models(self) -> list[ModelInfo]:
        listed = await super().models()
        local = self._embeddings.local_models()
        names = {info.id for info in local}
        return local + [self._served_where(info) for info in listed if info.id not in names]

    def _served_where(self, info: ModelInfo) -> ModelInfo:
        """An alias of the local model is served here, not by the backend its name would
        route to (the catalogue only knows the backends)."""
        if "alias_of" in info.details and self._embeddings.is_local(info.id):
            return replace(info, backend=LOCAL_BACKEND, owned_by=LOCAL_OWNER)
        return info


__all__ = [
    "LOCAL_BACKEND",
    "LOCAL_MODEL",
    "LOCAL_NAMES",
    "CatalogWithLocalModels",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingService",
    "LocalEmbedder",
    "LocalModel",
    "TextEncoder",
]
