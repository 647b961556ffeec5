"""Backends that speak the OpenAI API: vLLM, llama.cpp, SGLang, LM Studio, OpenAI itself."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import replace

import httpx
import trio

from proxy.config import BackendConfig
from proxy.dialects import anthropic, openai
from proxy.domain.chat import ChatRequest
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import CompletionBuilder, EstimatedUsageReport, StreamEvent
from proxy.domain.tokens import estimated_prompt_tokens, estimated_usage
from proxy.infra.backends._base import (
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
    listing_refused,
    loads_yielding,
    not_json,
    off_loop_if_large,
    path_segment,
    status_error,
    timeout_error,
    transport_errors,
)
from proxy.infra.media_urls import check_media_urls, check_relayed_media_urls
from proxy.infra.transport import heads_heard

_CLIENT_MISTAKES = frozenset(
    {ErrorKind.INVALID_REQUEST, ErrorKind.REQUEST_TOO_LARGE, ErrorKind.CONFLICT, ErrorKind.UNSUPPORTED_MEDIA_TYPE}
)
# The fields of a relayed call that may hold media parts vLLM fetches: a multimodal rerank's
# or score's (`text_1`/`text_2`; newer versions also take `data_1`/`data_2`, `queries` with
# `documents` or `items`), or the chat `messages` a pooling model or the tokenizer reads.
_RELAYED_MEDIA: dict[str, tuple[str, ...]] = {
    "/rerank": ("query", "documents"),
    "/../score": ("text_1", "text_2", "data_1", "data_2", "queries", "documents", "items"),
    "/../classify": ("messages",),
    "/../pooling": ("messages",),
    "/../tokenize": ("messages",),
}


def _model_details(item: dict[str, object]) -> dict[str, object]:
    """What vLLM says of a model beyond OpenAI's fields, passed on to clients: its context
    window (Ollama clients' `/api/show` too), the weights it serves (`root`) and, for a LoRA
    adapter, its base model (`parent`)."""
    details: dict[str, object] = {}
    if isinstance(item.get("max_model_len"), int):
        details["max_model_len"] = item["max_model_len"]
    for key in ("root", "parent"):
        if key in item and (item[key] is None or isinstance(item[key], str)):
            details[key] = item[key]
    return details


class OpenAIBackend:
    def __init__(self, config: BackendConfig, *, refuse_private_media_urls: bool = False) -> None:
        self.config = config
        self._check_media = refuse_private_media_urls
        key = config.api_key
        self._client = create_client(config, auth_header={"authorization": f"Bearer {key}"} if key else {})

    async def aclose(self) -> None:
        await self._client.aclose()

    def replicas(self) -> list[ReplicaState]:
        return self._client.replicas()

    def watch_failovers(self, hook: Callable[[str], None]) -> None:
        self._client.watch_failovers(hook)

    async def check_media_urls(self, request: ChatRequest) -> None:
        """With `refuse_private_media_urls`: a 400 for a media URL of `request` that vLLM
        would fetch from inside the network (a chat's, a token count's)."""
        if self._check_media:
            await check_media_urls(request)

    def _body(self, call: BackendCall, *, stream: bool) -> bytes:
        include_usage = self.config.request_usage or bool(call.request.include_usage)
        return openai.encode_chat_request(
            call.request, call.upstream_model, stream=stream, include_usage=include_usage,
            template_fields=self.config.sends_template_fields,
        )

    async def stream(self, call: BackendCall, send: BatchSink) -> None:
        await self.check_media_urls(call.request)
        while True:
            try:
                with heads_heard():
                    await self._client.stream_into(
                        "/chat/completions", self._body(call, stream=True),
                        openai.StreamRelay(
                            include_usage=call.request.include_usage, chunk_usage=openai.wants_chunk_usage(call.request),
                            prompt_tokens=functools.partial(estimated_prompt_tokens, call.request),
                        ),
                        send,
                        backend=self.config.name, timeouts=self.config.timeouts, relay_raw=call.relay_openai,
                        headers={"content-type": "application/json", "accept": "text/event-stream", **call.headers},
                        error=self._error,
                    )
                return
            except GatewayError as error:  # an error status: raised before anything was sent
                fitted = anthropic.output_fitted(call.request, error)
                if fitted is None:
                    raise
                call, send = replace(call, request=fitted), _WindowFilled(fitted, send)

    def _error(self, response: httpx.Response, body: bytes) -> GatewayError:
        message = openai.error_message_from_body(body) or body_text(body)
        error = status_error(self.config.name, response.status_code, message, response.headers.get("retry-after"))
        if error.kind in _CLIENT_MISTAKES:
            # The backend's own words for the client's mistake reach the client: SDK users
            # branch on them (`context_length_exceeded` is how LangChain, Codex and the
            # Agents SDK tell a prompt too long for the model).
            code, param = openai.error_code_and_param_from_body(body)
            error.code = code or error.code
            error.param = param or error.param
        elif error.kind is ErrorKind.RATE_LIMITED:
            # OpenAI's `insufficient_quota` is a 429 that retrying will not cure: clients tell
            # it from a passing limit by its code.
            code, _ = openai.error_code_and_param_from_body(body)
            error.code = code or error.code
            error.exhausted = openai.exhausted_of_body(body)
        return error

    async def complete(self, call: BackendCall) -> Batch:
        name = self.config.name
        await self.check_media_urls(call.request)
        with transport_errors(name), heads_heard():
            response = await self._client.post(
                "/chat/completions",
                content=self._body(call, stream=False),
                headers={"content-type": "application/json", **call.headers},
            )
        if response.status_code >= 400:
            error = self._error(response, response.content)
            fitted = anthropic.output_fitted(call.request, error)
            if fitted is None:
                raise error
            batch = await self.complete(replace(call, request=fitted))
            return replace(batch, events=anthropic.window_filled(fitted, batch.events))
        content = response.content
        try:
            data = json.loads(content)
        except UnicodeDecodeError:
            # Bytes that are not UTF-8 (llama.cpp's): the answer with U+FFFD for them.
            content = content.decode("utf-8", "replace").encode()
            try:
                data = json.loads(content)
            except ValueError:
                raise not_json(name, response.content) from None
        except ValueError:
            raise not_json(name, response.content) from None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            # Some servers report a failure as an error object under a 200.
            message = openai.error_message_from_body(content)
            if message:
                raise GatewayError(ErrorKind.BACKEND, f"Backend `{name}` reported an error: {message}")
            raise GatewayError(ErrorKind.BACKEND, f"Backend `{name}` returned no choices.")
        failed = openai.failed_finish_reason(data)
        if failed is not None:  # as in a stream: a failure, not an answer cut short
            raise GatewayError(ErrorKind.BACKEND, f"Backend `{name}` ended the answer with `{failed}`.")
        completion = openai.parse_completion(data)
        events = openai.completion_events_of(data, completion)
        if completion.usage is None:
            events = with_estimated_usage(call.request, events)
            if isinstance(estimate := events[-1], EstimatedUsageReport):
                completion = replace(completion, usage=estimate.usage)
                # An OpenAI client is told it too, in the backend's own answer otherwise.
                data["usage"] = openai.render_usage(estimate.usage)
                content = b""
        raw = None
        if call.relay_openai:
            raw = openai.relay_completion(data, content)
        return Batch(events, raw=raw, done=True, completion=completion)

    async def embed(self, call: EmbeddingCall) -> EmbeddingOutput:
        """`POST /embeddings`, floats requested (every OpenAI-compatible server has them).
        The client's other fields go as sent. vLLM's multimodal embeddings take chat `messages`
        instead of `input` (its `EmbeddingChatRequest`), whose media URLs it fetches as a
        chat's (checked alike)."""
        name = self.config.name
        body: dict[str, object] = {**call.extra, "model": call.upstream_model}
        if call.messages is not None:
            body["messages"] = call.messages
        else:
            body["input"] = call.inputs
        if self._check_media:
            await check_relayed_media_urls(body, [key for key in body if key != "input"])
        body["encoding_format"] = "float"
        if call.dimensions is not None:
            body["dimensions"] = call.dimensions
        timeout = self.config.timeouts.total
        with trio.move_on_after(timeout if timeout is not None else math.inf) as scope, transport_errors(name):
            response = await self._client.post(
                "/embeddings", content=await call.encoded(body),
                headers={"content-type": "application/json", **call.headers},
            )
        if scope.cancelled_caught:
            raise timeout_error(name, "did not answer", timeout)
        if response.status_code >= 400:
            raise status_error(
                name, response.status_code,
                openai.error_message_from_body(response.content) or response.text[:500],
                response.headers.get("retry-after"),
                param=openai.error_code_and_param_from_body(response.content)[1],
            )
        return await off_loop_if_large(_embeddings_output, response.content, name, call.expected)

    # vLLM's tokenizer, score, classification and pooling APIs are at the server root.
    relays = frozenset({
        "/completions", "/rerank", "/audio/transcriptions", "/audio/translations", "/audio/speech",
        "/../tokenize", "/../detokenize", "/../score", "/../classify", "/../pooling",
    })

    async def open_relay(self, path: str, body: bytes, headers: dict[str, str], *, stream: bool) -> httpx.Response:
        """`POST {path}` (legacy text completions, rerank, audio, vLLM's extra APIs) under `base_url`
        (`/../` paths under the server's root), the response left open.

        A multimodal call's media URLs are fetched by vLLM as a chat's are: checked alike.
        (vLLM's text completions take no media: `prompt_embeds` are inline tensors.)"""
        media = _RELAYED_MEDIA.get(path) if self._check_media else None
        if media is not None:
            await check_relayed_media_urls(json.loads(body), media)
        accept = "text/event-stream" if stream else "application/json"
        return await self._client.open_heard(
            "POST", path, content=body,
            headers={"content-type": "application/json", "accept": accept, **headers}, stream=stream,
        )

    async def tokenize(self, body: bytes) -> httpx.Response:
        """vLLM's `POST /tokenize` (at the server root, beside `/v1`), read whole within the
        first-token timeout."""
        timeouts = self.config.timeouts
        with trio.move_on_after(timeouts.first_token or math.inf) as scope, transport_errors(self.config.name):
            response = await self._client.send(
                "POST", "/../tokenize", content=body, headers={"content-type": "application/json"}
            )
        if scope.cancelled_caught:
            raise timeout_error(self.config.name, "did not answer", timeouts.first_token)
        return response

    async def retrieve_model(self, model: str) -> httpx.Response:
        """OpenAI's `GET /v1/models/{model}` (OpenAI, Ollama, LiteLLM have it; vLLM does not)."""
        with transport_errors(self.config.name):
            return await self._client.get("/models/" + path_segment(model))

    async def lacks(self, model: str) -> bool:
        """Whether the server says it does not serve `model`: vLLM's `/tokenize`, or OpenAI's
        `GET /v1/models/{model}` (OpenAI, Ollama, LiteLLM), answered 404 naming it. A server
        that takes any name (llama.cpp), lacks both routes or does not answer cannot say."""
        if model in self.config.models:
            return False
        try:
            tokenized = await self.tokenize(json.dumps({"model": model, "prompt": ""}).encode())
            return says_unknown(tokenized, model) or says_unknown(await self.retrieve_model(model), model)
        except GatewayError:
            return False

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
                details=_model_details(item),
            )
            for item in items
            if isinstance(item, dict) and item.get("id")
        ]

    async def check(self) -> str | None:
        try:
            await self.list_models()
        except GatewayError as error:
            return listing_refused(self.config.name, self.config.base_url, "/models", error)
        return None


class _WindowFilled:
    """The stream of a request sent again with the answer's limit the model's window leaves:
    an Anthropic client's answer cut there ends as Anthropic's own would (see
    `anthropic.output_fitted`)."""

    def __init__(self, request: ChatRequest, send: BatchSink) -> None:
        self._request = request
        self._send = send

    async def send(self, value: Batch, /) -> None:
        await self._send.send(replace(value, events=anthropic.window_filled(self._request, value.events)))


def with_estimated_usage(request: ChatRequest, events: list[StreamEvent]) -> list[StreamEvent]:
    """`events` of an answer whose backend reported no usage (or only zeros), with the
    gateway's estimate told in its stead, as a stream's is."""
    answer = CompletionBuilder()
    for event in events:
        answer.add(event)
    estimate = estimated_usage(request, answer)
    return events if estimate is None else [*events, EstimatedUsageReport(estimate)]


def says_unknown(response: httpx.Response, model: str) -> bool:
    """Whether `response` is a 404 naming `model` (not one for a route the server lacks)."""
    if response.status_code != 404:
        return False
    message = openai.error_message_from_body(response.content)  # Anthropic's shape too
    return message is not None and model in message


def _embeddings_output(content: bytes, name: str, expected: int) -> EmbeddingOutput:
    invalid = GatewayError(ErrorKind.BACKEND, f"Backend `{name}` returned an invalid embeddings response.")
    try:
        data = loads_yielding(content)
        items = data["data"]
        indexes = [item.get("index") for item in items]
        if any(index is not None for index in indexes):
            # Each input's vector at its index; a repeated or missing index would pair
            # vectors with the wrong inputs without a word.
            order = sorted(range(len(items)), key=lambda i: indexes[i])
            if [indexes[i] for i in order] != list(range(len(items))):
                raise invalid
            items = [items[i] for i in order]
        vectors = [item["embedding"] for item in items]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise invalid from None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    tokens = usage.get("prompt_tokens")
    return EmbeddingOutput(
        embedding_vectors(vectors, name, expected),
        tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0 else None,
    )
