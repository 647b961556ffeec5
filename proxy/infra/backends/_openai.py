"""Backends that speak the OpenAI API: vLLM, llama.cpp, SGLang, LM Studio, OpenAI itself."""

from __future__ import annotations

import json
import math

import trio

from proxy.config import BackendConfig
from proxy.dialects import openai
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import completion_events
from proxy.infra.backends._base import (
    BackendCall,
    Batch,
    EmbeddingCall,
    EmbeddingOutput,
    ModelInfo,
    create_client,
    embedding_vectors,
    pump_stream,
    read_limited,
    status_error,
    timeout_error,
    transport_errors,
)


class OpenAIBackend:
    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        key = config.api_key
        self._client = create_client(config, auth_header={"authorization": f"Bearer {key}"} if key else {})

    async def aclose(self) -> None:
        await self._client.aclose()

    def _body(self, call: BackendCall, *, stream: bool) -> bytes:
        include_usage = self.config.request_usage or bool(call.request.include_usage)
        return openai.encode_chat_request(
            call.request, call.upstream_model, stream=stream, include_usage=include_usage
        )

    async def stream(self, call: BackendCall, send: trio.MemorySendChannel[Batch]) -> None:
        timeouts = self.config.timeouts
        name = self.config.name
        request = self._client.build_request(
            "POST",
            "/chat/completions",
            content=self._body(call, stream=True),
            headers={"content-type": "application/json", "accept": "text/event-stream", **call.headers},
        )
        # The first-token clock covers the wait for the response head too: a backend that
        # queues the request before answering is as silent as one that stalls after.
        first_deadline = trio.current_time() + (timeouts.first_token or math.inf)
        with trio.move_on_at(first_deadline) as head_scope, transport_errors(name):
            response = await self._client.send(request, stream=True)
        if head_scope.cancelled_caught:
            raise timeout_error(name, "sent no first token", timeouts.first_token)
        try:
            if response.status_code >= 400:
                with transport_errors(name):
                    body = await read_limited(response)
                raise status_error(
                    name, response.status_code, openai.error_message_from_body(body) or body[:500].decode("utf-8", "replace"),
                    response.headers.get("retry-after"),
                )
            relay = openai.StreamRelay(include_usage=call.request.include_usage)
            await pump_stream(
                response, relay, send, backend=name, timeouts=timeouts,
                first_deadline=first_deadline, relay_raw=call.relay_openai,
            )
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()

    async def complete(self, call: BackendCall) -> Batch:
        name = self.config.name
        with transport_errors(name):
            response = await self._client.post(
                "/chat/completions",
                content=self._body(call, stream=False),
                headers={"content-type": "application/json", **call.headers},
            )
        if response.status_code >= 400:
            raise status_error(
                name, response.status_code,
                openai.error_message_from_body(response.content) or response.text[:500],
                response.headers.get("retry-after"),
            )
        try:
            data = json.loads(response.content)
        except ValueError:
            raise GatewayError(ErrorKind.BACKEND, f"Backend `{name}` returned invalid JSON.") from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise GatewayError(ErrorKind.BACKEND, f"Backend `{name}` returned no choices.")
        completion = openai.parse_completion(data)
        raw = None
        if call.relay_openai:
            raw = response.content if openai.completion_is_conformant(data) else openai.render_completion(completion)
        return Batch(completion_events(completion), raw=raw, done=True, completion=completion)

    async def embed(self, call: EmbeddingCall) -> EmbeddingOutput:
        """`POST /embeddings`, floats requested (every OpenAI-compatible server has them)."""
        name = self.config.name
        body: dict[str, object] = {"model": call.upstream_model, "input": call.inputs, "encoding_format": "float"}
        if call.dimensions is not None:
            body["dimensions"] = call.dimensions
        timeout = self.config.timeouts.total
        with trio.move_on_after(timeout if timeout is not None else math.inf) as scope, transport_errors(name):
            response = await self._client.post(
                "/embeddings", content=json.dumps(body).encode(),
                headers={"content-type": "application/json", **call.headers},
            )
        if scope.cancelled_caught:
            raise timeout_error(name, "did not answer", timeout)
        if response.status_code >= 400:
            raise status_error(
                name, response.status_code,
                openai.error_message_from_body(response.content) or response.text[:500],
                response.headers.get("retry-after"),
            )
        try:
            data = json.loads(response.content)
            items = sorted(data["data"], key=lambda item: int(item.get("index", 0)))
            vectors = [item["embedding"] for item in items]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise GatewayError(ErrorKind.BACKEND, f"Backend `{name}` returned an invalid embeddings response.") from None
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        tokens = usage.get("prompt_tokens")
        return EmbeddingOutput(
            embedding_vectors(vectors, name, len(call.inputs)),
            tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else None,
        )

    async def list_models(self) -> list[ModelInfo]:
        name = self.config.name
        with transport_errors(name):
            response = await self._client.get("/models")
        if response.status_code >= 400:
            raise status_error(name, response.status_code, openai.error_message_from_body(response.content))
        try:
            items = response.json().get("data") or []
        except (ValueError, AttributeError):
            raise GatewayError(ErrorKind.BACKEND, f"Backend `{name}` returned an invalid model list.") from None
        return [
            ModelInfo(
                id=str(item["id"]),
                backend=name,
                created=int(item.get("created") or 0),
                owned_by=str(item.get("owned_by") or name),
            )
            for item in items
            if isinstance(item, dict) and item.get("id")
        ]

    async def check(self) -> None:
        await self.list_models()
