"""The shapes every backend adapter shares: what a call asks, what a read yields, and the
protocols an adapter implements (chat, embeddings, relayed APIs)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import httpx
import numpy as np
import numpy.typing as npt
import trio

from proxy.config import BackendConfig
from proxy.domain.chat import ChatCompletion, ChatRequest
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import CompletionBuilder, StreamEvent

if TYPE_CHECKING:
    from proxy.infra.backends._replicas import ReplicaState


@dataclass(slots=True)
class Batch:
    """What one read from a backend produced.

    `raw` is the same content already rendered as OpenAI SSE, present only when the backend
    speaks OpenAI and the caller asked for it (the byte-exact relay). `done` marks the batch
    after which the client's stream is complete. A non-streaming exchange yields a single
    batch carrying `completion` (and `raw` JSON when relayable). An empty batch (no event, no
    raw, not done) is a keep-alive: the backend is alive with nothing new to say.
    """

    events: list[StreamEvent]
    raw: bytes | None = None
    done: bool = False
    completion: ChatCompletion | None = None

    def whole(self) -> ChatCompletion:
        """The answer of a non-streaming exchange's batch: as the backend gave it, or folded
        from its events (a replay, a route's producer)."""
        if self.completion is not None:
            return self.completion
        builder = CompletionBuilder()
        for event in self.events:
            builder.add(event)
        return builder.build()


@dataclass(slots=True)
class BackendCall:
    request: ChatRequest
    upstream_model: str
    relay_openai: bool = False
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class ModelInfo:
    id: str
    backend: str
    created: int = 0
    owned_by: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class ParsedOutput(Protocol):
    @property
    def events(self) -> list[StreamEvent]: ...

    @property
    def raw(self) -> bytes | None: ...

    @property
    def done(self) -> bool: ...


class StreamParser(Protocol):
    """A sans-IO parser of one backend stream (e.g. `openai.StreamRelay`)."""

    failed: bool

    def feed(self, data: bytes) -> ParsedOutput: ...

    def close(self) -> ParsedOutput: ...


class BatchSink(Protocol):
    """Where a backend's batches go: the exchange's memory channel, or a wrapper around it."""

    async def send(self, value: Batch, /) -> None: ...


class Backend(Protocol):
    """A backend adapter. `stream` sends batches into `send` and returns when the stream is
    complete; both calls raise `GatewayError` for failures before their first batch."""

    config: BackendConfig

    async def stream(self, call: BackendCall, send: BatchSink) -> None: ...

    async def complete(self, call: BackendCall) -> Batch: ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def check(self) -> str | None:
        """Raise when the backend cannot serve; a note when it serves with one (no model listing)."""
        ...

    def replicas(self) -> list[ReplicaState]: ...

    def watch_failovers(self, hook: Callable[[str], None]) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class EmbeddingCall:
    """An embeddings request for a backend: `inputs` are texts, or token-id arrays for
    backends that take them (OpenAI-compatible ones)."""

    upstream_model: str
    inputs: list[str] | list[list[int]]
    dimensions: int | None = None
    truncate: bool | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # The client's other fields when it speaks this backend's dialect (an OpenAI client's
    # `user`, vLLM's `truncate_prompt_tokens`, …; an Ollama client's `options`, `keep_alive`),
    # sent as they came.
    extra: dict[str, Any] = field(default_factory=dict)
    # Ollama's legacy `/api/embeddings` (one prompt, the model's raw vector): an Ollama backend
    # is asked there too; other backends have one embeddings API.
    legacy: bool = False
    # vLLM's chat form instead of `inputs` (an OpenAI-compatible backend only): one embedding.
    messages: list[dict[str, Any]] | None = None

    @property
    def expected(self) -> int:
        """How many embeddings the backend answers with."""
        return 1 if self.messages is not None else len(self.inputs)

    async def encoded(self, body: dict[str, Any]) -> bytes:
        """`body`, this call's request to its backend, as JSON: in a worker thread when its
        inputs are large (a million token ids take a twentieth of a second)."""
        # Roughly the JSON's bytes: a token id takes about seven.
        size = sum(len(item) * (7 if isinstance(item, list) else 1) for item in self.inputs)
        if size <= _OFF_LOOP_BYTES:
            return json.dumps(body).encode()
        return await trio.to_thread.run_sync(_encoded_in_pieces, body)


def _encoded_in_pieces(body: dict[str, Any]) -> bytes:
    """`body` as JSON, its `input` a few items at a time: one `json.dumps` call never lets go
    of the GIL, so a worker thread encoding a million token ids at once held the event loop."""
    inputs = body.get("input")
    rest = json.dumps({key: value for key, value in body.items() if key != "input"})
    if not isinstance(inputs, list) or rest == "{}":
        return json.dumps(body).encode()
    pieces = ",".join(json.dumps(inputs[start : start + 8])[1:-1] for start in range(0, len(inputs), 8))
    return f'{rest[:-1]},"input":[{pieces}]}}'.encode()


@dataclass(slots=True)
class EmbeddingOutput:
    vectors: npt.NDArray[np.float32]  # (inputs, dimensions), every value finite
    prompt_tokens: int | None = None
    load_seconds: float = 0.0  # the time the backend took to load the model for this call (Ollama's)


@runtime_checkable
class EmbeddingBackend(Protocol):
    """A backend with an embeddings API; raises `GatewayError` like the chat calls."""

    config: BackendConfig

    async def embed(self, call: EmbeddingCall) -> EmbeddingOutput: ...


@runtime_checkable
class RelayBackend(Protocol):
    """A backend with OpenAI-compatible APIs the gateway relays as they are, without domain
    translation: legacy text completions (`/completions`), rerank (`/rerank`), vLLM's tokenizer,
    score, classification and pooling APIs (`/../tokenize`, ...: at the server's root).

    `relays` names the API paths it serves. `open_relay` sends `body` (the client's, its
    model already the upstream one) to `path` under the backend's OpenAI-compatible API root
    and returns the response with its body open, whatever its status; the caller must close
    it with `BackendClient.close`. A replica silent for its share of the caller's deadline is
    left for another (`BackendClient.open_heard`). Transport failures are httpx's: the
    caller maps them."""

    config: BackendConfig
    relays: frozenset[str]

    async def open_relay(self, path: str, body: bytes, headers: dict[str, str], *, stream: bool) -> httpx.Response: ...


# Who sends token arrays to a text-only model without meaning to: LangChain's OpenAIEmbeddings
# tokenises its input with tiktoken first (ids of OpenAI's vocabulary, no other model's).
TOKEN_ARRAYS_HINT = (
    "LangChain's OpenAIEmbeddings sends them unless created with `check_embedding_ctx_length=False`; "
    "send the text instead."
)


# Response bytes past which a backend's embeddings are read in a worker thread: 2048 vectors
# as JSON take a quarter of a second of CPU to parse and check, a stall of every stream if
# done on the event loop.
_OFF_LOOP_BYTES = 512 * 1024
_T = TypeVar("_T")


async def off_loop_if_large(parse: Callable[..., _T], content: bytes, *args: Any) -> _T:
    """`parse(content, *args)`, in a worker thread when `content` is large."""
    if len(content) <= _OFF_LOOP_BYTES:
        return parse(content, *args)
    return await trio.to_thread.run_sync(parse, content, *args)


def loads_yielding(content: bytes | str) -> Any:
    """`json.loads` whose floats go through Python code, where a worker thread parsing a large
    answer lets the event loop have the GIL: one plain `json.loads` call holds it throughout
    (a fifth of a second for 2048 vectors, every stream stalled)."""
    return json.loads(content, parse_float=_float)


def _float(text: str) -> float:
    return float(text)


def embedding_vectors(items: Any, backend: str, expected: int) -> npt.NDArray[np.float32]:
    """A backend's list of vectors as float32 rows: `expected` of them, all of one length,
    all numbers a float32 holds. NaN or infinity (which Python's JSON reader takes) would be
    a 500 when written as JSON, and silently decoded by a client reading base64."""
    if not isinstance(items, list) or len(items) != expected:
        raise GatewayError(ErrorKind.BACKEND, f"Backend `{backend}` returned {len(items) if isinstance(items, list) else 'no'} embeddings for {expected} inputs.")
    # `map(type, …)` keeps this check in C: a Python loop over 2048 vectors took a quarter second.
    if not all(isinstance(vector, list) and set(map(type, vector)) <= _NUMBERS for vector in items):
        raise GatewayError(ErrorKind.BACKEND, f"Backend `{backend}` returned an embedding that is not a list of numbers.")
    if not items:
        return np.empty((0, 0), np.float32)
    width = len(items[0])
    if any(len(vector) != width for vector in items):
        raise GatewayError(ErrorKind.BACKEND, f"Backend `{backend}` returned embeddings of different lengths.")
    vectors = np.empty((len(items), width), np.float32)
    rows = max(1, 16_384 // max(1, width))  # a piece at a time, letting the GIL go between
    try:
        with np.errstate(over="ignore"):  # past float32's range: infinity, refused below
            for start in range(0, len(items), rows):
                vectors[start : start + rows] = items[start : start + rows]
    except OverflowError:  # an integer no float holds
        vectors[:] = np.inf
    if vectors.shape[1] == 0:
        raise GatewayError(ErrorKind.BACKEND, f"Backend `{backend}` returned an empty embedding.")
    if not np.isfinite(vectors).all():
        raise GatewayError(
            ErrorKind.BACKEND,
            f"Backend `{backend}` returned an embedding with a value that is not a finite number (NaN, infinity, or "
            "beyond float32's range); the model's output is broken.",
        )
    return vectors


_NUMBERS = frozenset({float, int})  # not bool, JSON's true and false
