"""Backends that speak Ollama's native API (`/api/chat`, `/api/generate`, `/api/tags`).

`base_url` is the server root (`http://127.0.0.1:11434`). Streams are NDJSON; the first-token,
idle and drain handling mirror the OpenAI adapter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import httpx
import trio

from proxy.config import BackendConfig
from proxy.dialects import ollama
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import completion_events
from proxy.infra.backends._base import (
    TOKEN_ARRAYS_HINT,
    BackendCall,
    Batch,
    BatchSink,
    EmbeddingCall,
    EmbeddingOutput,
    ModelInfo,
    ReplicaState,
    body_text,
    create_client,
    embedding_vectors,
    json_mended,
    loads_yielding,
    not_json,
    off_loop_if_large,
    status_error,
    timeout_error,
    transport_errors,
)

_NO_TOOLS = "does not support tools"  # how Ollama refuses tools to a model without tool calling


class OllamaBackend:
    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        key = config.api_key
        self._client = create_client(config, auth_header={"authorization": f"Bearer {key}"} if key else {})
        # By model: what it said of a `think` it could not take, so that later requests are
        # sent what it takes at once rather than refused first.
        self._think_refusals: dict[str, list[str]] = {}

    async def aclose(self) -> None:
        await self._client.aclose()

    def replicas(self) -> list[ReplicaState]:
        return self._client.replicas()

    def watch_failovers(self, hook: Callable[[str], None]) -> None:
        self._client.watch_failovers(hook)

    def _error(self, response: httpx.Response, body: bytes) -> GatewayError:
        message = ollama.error_message_from_body(body) or body_text(body)
        # A model without tool calling ("… does not support tools") is refused for the field
        # that asked it, which an OpenAI client's error then names.
        param = "tools" if message and message.rstrip().endswith(_NO_TOOLS) else None
        return status_error(
            self.config.name, response.status_code, message, response.headers.get("retry-after"), param=param
        )

    def _encoded(self, call: BackendCall, *, stream: bool) -> tuple[str, bytes]:
        path, body = ollama.encode_request(call.request, call.upstream_model, stream=stream)
        for refusal in self._think_refusals.get(call.upstream_model, ()):
            body = ollama.without_refused_think(call.request, body, refusal) or body
        return path, body

    def _think_taken(self, call: BackendCall, body: bytes, error: GatewayError) -> bytes | None:
        """The request again for a model that refused the `think` the gateway made of another
        dialect's effort ("think value "high" is not supported", "does not support thinking"),
        remembered for its next requests; None for any other error."""
        if error.kind is not ErrorKind.INVALID_REQUEST or not ollama.think_refused(error.message):
            return None
        again = ollama.without_refused_think(call.request, body, error.message)
        if again is not None:
            # Once: a burst of requests all sent before the first refusal came back is refused
            # as many times, and each refusal kept is applied to every later request's body.
            refusals = self._think_refusals.setdefault(call.upstream_model, [])
            if error.message not in refusals:
                refusals.append(error.message)
        return again

    async def stream(self, call: BackendCall, send: BatchSink) -> None:
        # Ollama answers only once the model is loaded: the first-token clock covers that.
        path, body = self._encoded(call, stream=True)
        parser = ollama.StreamParser(logprobs=bool(call.request.params.logprobs))
        while True:
            try:
                await self._client.stream_into(
                    path, body, parser, send, backend=self.config.name, timeouts=self.config.timeouts,
                    headers={"content-type": "application/json", "accept": "application/x-ndjson", **call.headers},
                    error=self._error,
                )
                return
            except GatewayError as error:  # an error status: raised before anything was sent
                again = self._think_taken(call, body, error)
                if again is None:
                    raise
                body = again

    async def complete(self, call: BackendCall) -> Batch:
        name = self.config.name
        path, body = self._encoded(call, stream=False)
        while True:
            with transport_errors(name):
                response = await self._client.post(
                    path, content=body, headers={"content-type": "application/json", **call.headers}
                )
            if response.status_code < 400:
                break
            error = self._error(response, response.content)
            again = self._think_taken(call, body, error)
            if again is None:
                raise error
            body = again
        data = _json_object(response.content, name)
        if "error" in data:
            message = ollama.error_message_from_body(response.content) or "The backend reported an error."
            raise GatewayError(ErrorKind.BACKEND, f"Backend `{name}` failed: {message}")
        completion = ollama.parse_completion(data)
        events = ollama.with_closing(completion_events(completion), data)
        return Batch(events, done=True, completion=completion)

    async def embed(self, call: EmbeddingCall) -> EmbeddingOutput:
        """`POST /api/embed` (texts only: Ollama takes no token arrays); a legacy call goes to
        `/api/embeddings`, which answers with the model's raw vector where `/api/embed`
        normalises it, so a legacy client gets what it would get from Ollama directly."""
        name = self.config.name
        texts = [item for item in call.inputs if isinstance(item, str)]
        if len(texts) != len(call.inputs):
            raise GatewayError(
                ErrorKind.INVALID_REQUEST,
                f"Backend `{name}` (Ollama) embeds text only; token arrays are not supported. {TOKEN_ARRAYS_HINT}",
                param="input",
            )
        body: dict[str, Any] = {**call.extra, "model": call.upstream_model}
        if call.legacy and len(texts) <= 1:
            path = "/api/embeddings"
            body["prompt"] = texts[0] if texts else ""
        else:
            path = "/api/embed"
            body["input"] = texts
            if call.truncate is not None:
                body["truncate"] = call.truncate
            if call.dimensions is not None:
                body["dimensions"] = call.dimensions
        timeout = self.config.timeouts.total
        with trio.move_on_after(timeout if timeout is not None else math.inf) as scope, transport_errors(name):
            response = await self._client.post(
                path, content=await call.encoded(body), headers={"content-type": "application/json", **call.headers}
            )
        if scope.cancelled_caught:
            raise timeout_error(name, "did not answer", timeout)
        if response.status_code >= 400:
            raise self._error(response, response.content)
        return await off_loop_if_large(_embeddings_output, response.content, name, path, len(texts))

    # Ollama's OpenAI-compatible API has text completions (FIM with `suffix`), no rerank.
    relays = frozenset({"/completions"})

    async def open_relay(self, path: str, body: bytes, headers: dict[str, str], *, stream: bool) -> httpx.Response:
        """`POST /v1{path}`: Ollama's own OpenAI-compatible API (`base_url` is the server
        root), the response left open."""
        accept = "text/event-stream" if stream else "application/json"
        return await self._client.open_heard(
            "POST", "/v1" + path, content=body,
            headers={"content-type": "application/json", "accept": accept, **headers}, stream=stream,
        )

    async def _listing(self, path: str) -> list[Any]:
        """The `models` list of a GET listing (`/api/tags`, `/api/ps`)."""
        with transport_errors(self.config.name):
            response = await self._client.get(path)
        if response.status_code >= 400:
            raise self._error(response, response.content)
        items = _json_object(response.content, self.config.name).get("models")
        return items if isinstance(items, list) else []

    async def list_models(self) -> list[ModelInfo]:
        name = self.config.name
        items = await self._listing("/api/tags")
        models = []
        for item in items:
            tag = ollama.parse_tag(item)
            if tag is not None:
                model, created, facts = tag
                models.append(ModelInfo(id=model, backend=name, created=created, owned_by=name, details=facts))
        return models

    async def show(self, model: str, *, verbose: bool = False) -> dict[str, Any]:
        """The backend's `/api/show` for `model` (template, parameters, capabilities, …);
        `verbose` adds the tokenizer's arrays and the tensors (`ollama show --verbose`)."""
        name = self.config.name
        timeout = self.config.timeouts.total
        body: dict[str, Any] = {"model": model, "verbose": True} if verbose else {"model": model}
        with trio.move_on_after(timeout if timeout is not None else math.inf) as scope, transport_errors(name):
            response = await self._client.post(
                "/api/show", content=json.dumps(body).encode(), headers={"content-type": "application/json"}
            )
        if scope.cancelled_caught:
            raise timeout_error(name, "did not answer", timeout)
        if response.status_code >= 400:
            raise self._error(response, response.content)
        return _json_object(response.content, name)

    async def load(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[bytes, str]:
        """`POST path` (`/api/generate` or `/api/chat`) of a request without a prompt, which
        Ollama answers by loading the model (or unloading it, with `keep_alive: 0`): the
        backend's answer and its content type. A load can take as long as a model is big."""
        name = self.config.name
        timeout = self.config.timeouts.total
        with trio.move_on_after(timeout if timeout is not None else math.inf) as scope, transport_errors(name):
            response = await self._client.post(
                path, content=json.dumps(body).encode(), headers={"content-type": "application/json", **headers}
            )
        if scope.cancelled_caught:
            raise timeout_error(name, "did not answer", timeout)
        if response.status_code >= 400:
            raise self._error(response, response.content)
        return response.content, response.headers.get("content-type", "application/json")

    async def running(self) -> list[dict[str, Any]]:
        """The models the backend holds in memory (its `/api/ps`)."""
        return [item for item in await self._listing("/api/ps") if isinstance(item, dict)]

    async def check(self) -> str | None:
        name = self.config.name
        with transport_errors(name):
            response = await self._client.get("/api/version")
        if response.status_code >= 400:
            raise self._error(response, response.content)
        return None


def _json_object(content: bytes, backend: str, loads: Callable[[bytes], Any] = json.loads) -> dict[str, Any]:
    try:
        data = loads(content)
    except UnicodeDecodeError:
        data = json_mended(content)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise not_json(backend, content)
    return data


def _embeddings_output(content: bytes, name: str, path: str, expected: int) -> EmbeddingOutput:
    data = _json_object(content, name, loads_yielding)
    if path == "/api/embeddings":  # an empty prompt (a preload) has an empty vector
        return EmbeddingOutput(embedding_vectors([data.get("embedding")] if expected else [], name, expected))
    tokens, load = data.get("prompt_eval_count"), data.get("load_duration")
    return EmbeddingOutput(
        embedding_vectors(data.get("embeddings"), name, expected),
        tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0 else None,
        load / 1e9 if isinstance(load, int) and not isinstance(load, bool) and load > 0 else 0.0,
    )
