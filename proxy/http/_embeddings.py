"""Embeddings endpoints: OpenAI's `/v1/embeddings`, Ollama's `/api/embed` and legacy
`/api/embeddings`. Errors come in each caller's dialect (`/api/*` paths are Ollama's).

Every request of these routes, answered or refused (the guard's refusals too), is recorded
in its API key's usage as a chat exchange is: one request, an error at status >= 400, and
the prompt tokens the answer reports, charged to the key's token limit."""

from __future__ import annotations

import base64
import contextvars
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import trio
from quart import Blueprint, Response

from proxy.dialects._json import Fields, dumps, loads_object
from proxy.domain.errors import CONTEXT_LENGTH_EXCEEDED, ErrorKind, GatewayError, invalid_request
from proxy.http._auth import take_reservation
from proxy.http._context import gateway, request_body, request_head, request_meta
from proxy.services.auth import current_principal
from proxy.services.chat import is_cancellation
from proxy.services.embeddings import EmbeddingRequest, EmbeddingResponse, EmbeddingService

# No embedding model has more; a client must not make a backend allocate at will.
MAX_DIMENSIONS = 16384

blueprint = Blueprint("embeddings", __name__)

_OLLAMA_JSON = "application/json; charset=utf-8"
_Read = TypeVar("_Read")


@dataclass(slots=True)
class _Attempt:
    """What the current request got to, for its record."""

    started: float = field(default_factory=time.perf_counter)
    model: str = ""
    result: EmbeddingResponse | None = None


_attempt: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar("llm_proxy_embedding", default=None)


@blueprint.before_request
async def _begin() -> None:
    # Runs once the app's guard admitted the request (a refused one never gets here).
    _attempt.set(_Attempt())


@blueprint.after_request
async def _account(response: Response) -> Response:
    """Every response of these routes, errors and the guard's refusals included."""
    service = gateway().embeddings
    if service is None:
        return response
    attempt = _attempt.get() or _Attempt()
    principal = current_principal.get()
    status = response.status_code
    head = request_head()
    service.record(
        request_id=head.request_id(),
        dialect="ollama" if head.path.startswith("/api/") else "openai",
        model=attempt.model, status=status, error=await _error_message(response) if status >= 400 else None,
        total_ms=(time.perf_counter() - attempt.started) * 1000,
        api_key_id=principal.id if principal is not None else None,
        response=attempt.result if status < 400 else None, reserved=take_reservation(),
    )
    return response


async def _error_message(response: Response) -> str:
    """The message of an error body, in either dialect's shape."""
    try:
        data = json.loads(await response.get_data(as_text=False))
    except (ValueError, RecursionError):
        return f"HTTP {response.status_code}"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) else f"HTTP {response.status_code}"


def _note_model(model: str) -> None:
    attempt = _attempt.get()
    if attempt is not None:
        attempt.model = model


def _service() -> EmbeddingService:
    service = gateway().embeddings
    if service is None:
        raise GatewayError(ErrorKind.UNAVAILABLE, "Embeddings are not available on this gateway.")
    return service


def _backend_headers() -> tuple[dict[str, str], str]:
    meta = request_meta()
    return {"x-request-id": meta.request_id, "x-correlation-id": meta.correlation_id or meta.request_id}, meta.request_id


def _openai_inputs(value: Any) -> list[str] | list[list[int]]:
    """OpenAI's `input`: a string, an array of strings, a token array or an array of them.
    An empty string is refused, as OpenAI does (it has no embedding)."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            empty = next((index for index, item in enumerate(value) if not item), None)
            if empty is not None:
                raise invalid_request(
                    f"Invalid `input[{empty}]`: expected a non-empty string.", param=f"input[{empty}]"
                )
            return list(value)
        if all(_token_ids(item) for item in value):
            return [list(item) for item in value]
        if _token_ids(value):
            return [list(value)]
    if value is None:
        raise invalid_request("Missing required parameter `input`.", param="input")
    raise invalid_request(
        "Invalid `input`: expected a non-empty string, an array of strings, an array of token ids "
        "or an array of token-id arrays.",
        param="input",
    )


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in value
    )


# The rest of an OpenAI client's fields (`user`, vLLM's `truncate_prompt_tokens`, its chat
# embeddings' `chat_template`, …) go to an OpenAI-compatible backend as sent.
_OPENAI_MODELLED = frozenset({"model", "input", "messages", "encoding_format", "dimensions"})
# The fields only vLLM's chat form of an embeddings request has. Given both `input` and
# `messages`, vLLM's request union takes the form with more of its own fields set, the text
# form on a tie: `messages` are embedded only beside one of these.
_CHAT_ONLY = frozenset({
    "chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message", "media_io_kwargs",
})


def _chat_messages(value: Any) -> list[dict[str, Any]]:
    """vLLM's chat-style embeddings request (VLM2Vec, gme-Qwen2-VL): its `messages`, one
    embedding for the whole chat; the backend reads the messages themselves."""
    if not isinstance(value, list) or not value:
        raise invalid_request("Invalid `messages`: expected a non-empty array of messages.", param="messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise invalid_request(f"Invalid `messages[{index}]`: expected an object.", param=f"messages[{index}]")
    return value


# Bodies past which a request is parsed and checked in a worker thread: LangChain's default
# batch, 1000 texts as token arrays, is 7 MB that took a quarter second of CPU on the event
# loop, a stall of every stream it serves.
_OFF_LOOP_BODY = 512 * 1024


async def _parsed(read: Callable[[bytes], _Read]) -> _Read:
    body = await request_body()
    if len(body) <= _OFF_LOOP_BODY:
        return read(body)
    return await trio.to_thread.run_sync(read, body)


@blueprint.post("/v1/embeddings")
async def openai_embeddings() -> Response:
    request, encoding = await _parsed(_openai_request)
    request.headers, request_id = _backend_headers()
    result = await _embed(request)
    body = await _serialised(_openai_body, result, encoding)
    return _json(body, result, request_id, "application/json")


def _openai_request(body: bytes) -> tuple[EmbeddingRequest, str]:
    """An OpenAI client's request and its `encoding_format`."""
    fields = Fields(loads_object(body, yielding=len(body) > _OFF_LOOP_BODY))
    model = fields.text("model", required=True, nonempty=True)
    assert model is not None
    _note_model(model)
    sent = fields.data
    messages: list[dict[str, Any]] | None = None
    if sent.get("messages") is not None and (sent.get("input") is None or not _CHAT_ONLY.isdisjoint(sent)):
        messages = _chat_messages(sent["messages"])
        inputs: list[str] | list[list[int]] = []
    else:
        inputs = _openai_inputs(sent.get("input"))
    encoding = fields.text("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid_request(
            f"Invalid `encoding_format`: {encoding!r}; expected 'float' or 'base64'.", param="encoding_format"
        )
    dimensions = fields.integer("dimensions", minimum=1, maximum=MAX_DIMENSIONS)
    fields.text("user")
    extra = {k: v for k, v in sent.items() if k not in _OPENAI_MODELLED}
    return EmbeddingRequest(model=model, inputs=inputs, dimensions=dimensions, extra=extra, messages=messages), encoding


def _openai_body(result: EmbeddingResponse, encoding: str) -> bytes:
    data = b",".join(
        dumps([
            {"object": "embedding", "index": start + offset, "embedding": _encode(vector, encoding)}
            for offset, vector in enumerate(piece)
        ])[1:-1]
        for start, piece in _pieces(result.vectors)
    )
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return b'{"object":"list","data":[%b],"model":%b,"usage":%b}' % (data, dumps(result.model), dumps(usage))


def _encode(vector: np.ndarray[Any, Any], encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


# Vector values past which a response is written in a worker thread: 2048 vectors as JSON
# floats take a third of a second of CPU, which on the event loop would stall every stream.
_OFF_LOOP_VALUES = 65_536
# ... and written a piece of this many values at a time: one `json` call never lets go of the
# GIL, so a thread writing the whole answer at once held the event loop just the same.
_PIECE_VALUES = 16_384


def _pieces(vectors: np.ndarray[Any, Any]) -> Iterator[tuple[int, np.ndarray[Any, Any]]]:
    """`vectors` in runs of rows of about `_PIECE_VALUES` values, each with its first row's index."""
    rows = max(1, _PIECE_VALUES // max(1, vectors.shape[-1]))
    for start in range(0, len(vectors), rows):
        yield start, vectors[start : start + rows]


async def _serialised(write: Callable[[EmbeddingResponse, str], bytes], result: EmbeddingResponse, arg: str) -> bytes:
    if result.vectors.size <= _OFF_LOOP_VALUES:
        return write(result, arg)  # a thread hop costs more than a few vectors take
    return await trio.to_thread.run_sync(write, result, arg)


def _json(body: bytes, result: EmbeddingResponse, request_id: str, content_type: str) -> Response:
    response = Response(body, content_type=content_type)
    response.headers["x-request-id"] = request_id
    response.headers["x-embedding-backend"] = result.backend
    if result.truncated:
        # The local model reads 256 tokens; longer inputs were embedded by their beginning.
        response.headers["x-embeddings-truncated"] = str(result.truncated)
    return response


# -- Ollama ----------------------------------------------------------------------------------------


# The rest of an Ollama client's fields (`options` such as `num_ctx`, `keep_alive`, …) go to an
# Ollama backend as sent; the local model and OpenAI-compatible backends have no use for them.
_OLLAMA_EMBED_MODELLED = frozenset({"model", "name", "input", "truncate", "dimensions"})
_OLLAMA_LEGACY_MODELLED = frozenset({"model", "name", "prompt"})


def _ollama_extra(fields: Fields, modelled: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in fields.data.items() if k not in modelled}


def _ollama_model(fields: Fields) -> str:
    model = fields.data.get("model") or fields.data.get("name")
    if not isinstance(model, str) or not model:
        raise invalid_request("model is required", param="model")
    _note_model(model)
    return model


async def _embed(request: EmbeddingRequest) -> EmbeddingResponse:
    attempt = _attempt.get()
    try:
        result = await _embed_or_relist(request)
    except BaseException as exc:
        # A cancelled handler never reaches `_account`: the hang-up is recorded here.
        service = gateway().embeddings
        if attempt is not None and service is not None and is_cancellation(exc):
            principal = current_principal.get()
            head = request_head()
            service.record_hangup(
                request_id=head.request_id(), dialect=request.dialect, request=request,
                total_ms=(time.perf_counter() - attempt.started) * 1000,
                api_key_id=principal.id if principal is not None else None, reserved=take_reservation(),
            )
        raise
    if attempt is not None:
        attempt.result = result
    return result


async def _embed_or_relist(request: EmbeddingRequest) -> EmbeddingResponse:
    try:
        return await _service().embed(request)
    except GatewayError as error:
        if error.code != "model_not_found":
            raise
    # As for chat: a name no backend was known to list may be one a backend lists now (the
    # catalogue, listed afresh unless its list is recent, teaches the router).
    await gateway().catalog.models()
    return await _service().embed(request)


async def _ollama_embed(request: EmbeddingRequest) -> EmbeddingResponse:
    try:
        return await _embed(request)
    except GatewayError as error:
        # A model no backend serves, or a backend's 404 in its own words ("The model `x` does
        # not exist"): Ollama's, which Ollama clients recognise (as /api/chat says it).
        if error.code == "model_not_found" or (error.kind is ErrorKind.NOT_FOUND and error.code == "backend_404"):
            raise GatewayError(
                ErrorKind.NOT_FOUND, f'model "{request.model}" not found, try pulling it first',
                param="model", code="model_not_found",
            ) from None
        raise


@blueprint.post("/api/embed")
async def ollama_embed() -> Response:
    request = await _parsed(_ollama_embed_request)
    request.headers, request_id = _backend_headers()
    request.window = _listed_window(request.model)
    try:
        result = await _ollama_embed(request)
    except GatewayError as error:
        if error.code != CONTEXT_LENGTH_EXCEEDED or not request.truncate or request.window is not None:
            raise
        # Refused for its length before the gateway had listed the backend's models, where
        # vLLM says its window: listed now, the input is cut to it as on any later call.
        await gateway().catalog.models()
        request.window = _listed_window(request.model)
        if request.window is None:
            raise
        result = await _ollama_embed(request)
    body = await _serialised(_ollama_body, result, request.model)
    return _json(body, result, request_id, _OLLAMA_JSON)


def _ollama_embed_request(body: bytes) -> EmbeddingRequest:
    fields = Fields(loads_object(body, yielding=len(body) > _OFF_LOOP_BODY))
    model = _ollama_model(fields)
    raw = fields.data.get("input")
    if raw is None or raw == "":
        inputs: list[str] = []
    elif isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        inputs = list(raw)
    else:
        raise invalid_request("invalid input type", param="input")
    truncate = fields.boolean("truncate")
    # 0 is Go's unset integer, which Ollama's clients may send: the whole vector.
    dimensions = fields.integer("dimensions", minimum=0, maximum=MAX_DIMENSIONS) or None
    return EmbeddingRequest(model=model, inputs=inputs, dimensions=dimensions, truncate=truncate is not False,
                            dialect="ollama", extra=_ollama_extra(fields, _OLLAMA_EMBED_MODELLED))


def _ollama_body(result: EmbeddingResponse, model: str) -> bytes:
    embeddings = b",".join(dumps(piece.tolist())[1:-1] for _, piece in _pieces(result.vectors))
    rest = dumps({
        "total_duration": int(result.total_seconds * 1e9),
        "load_duration": int(result.load_seconds * 1e9),
        "prompt_eval_count": result.prompt_tokens,
    })
    return b'{"model":%b,"embeddings":[%b],%b' % (dumps(model), embeddings, rest[1:])


def _listed_window(model: str) -> int | None:
    """The model's window where its backend's listing said it (vLLM's `max_model_len`)."""
    gw = gateway()
    if gw.embeddings is None or gw.embeddings.is_local(model):
        return None
    try:
        route = gw.router.resolve(model)
    except GatewayError:
        return None  # the service says why
    window = gw.catalog.window(route.backend, route.upstream_model)
    return window.tokens if window is not None else None


@blueprint.post("/api/embeddings")
async def ollama_embeddings_legacy() -> Response:
    fields = Fields(loads_object(await request_body()))
    model = _ollama_model(fields)
    prompt = fields.text("prompt") or ""
    headers, request_id = _backend_headers()
    result = await _ollama_embed(
        EmbeddingRequest(model=model, inputs=[prompt] if prompt else [], headers=headers, dialect="ollama",
                         extra=_ollama_extra(fields, _OLLAMA_LEGACY_MODELLED), legacy=True)
    )
    embedding = result.vectors[0].tolist() if prompt else []
    return _json(dumps({"embedding": embedding}), result, request_id, _OLLAMA_JSON)
