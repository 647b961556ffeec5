"""Backends that speak Anthropic's Messages API (`kind = "anthropic"`), and token counting
for the Anthropic `count_tokens` endpoint whatever the backend.

`base_url` is the server root (`https://api.anthropic.com`); requests go to
`{base_url}/v1/messages` with `x-api-key` (from `api_key_env`) and
`anthropic-version: 2023-06-01`. Anthropic requires `max_tokens`: a request that gives
none is sent with `DEFAULT_MAX_TOKENS`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import httpx
import trio

from proxy.config import BackendConfig
from proxy.dialects import anthropic, openai
from proxy.dialects.anthropic._models import MODEL_FACTS
from proxy.domain.chat import ChatRequest, Message, OpaquePart, TextPart
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import CompletionBuilder, StreamFailed
from proxy.domain.tokens import estimated_prompt_tokens
from proxy.infra.backends._base import (
    Backend,
    BackendCall,
    Batch,
    BatchSink,
    ModelInfo,
    ReplicaState,
    body_text,
    create_client,
    json_mended,
    listing_refused,
    not_json,
    path_segment,
    status_error,
    timeout_error,
    transport_errors,
)
from proxy.infra.backends._ollama import OllamaBackend
from proxy.infra.backends._openai import OpenAIBackend, says_unknown
from proxy.infra.media_urls import check_media_urls
from proxy.infra.transport import heads_heard

DEFAULT_MAX_TOKENS = 4096
_MODEL_PAGES = 20


def backend_error(name: str, status: int, body: bytes, retry_after: str | None) -> GatewayError:
    """A backend's HTTP error; Anthropic's 529 (overloaded) is a 503 to our clients."""
    message = anthropic.error_message_from_body(body) or body_text(body)
    param = None
    if (validation := openai.validation_error_from_body(body)) is not None:
        # An Anthropic-compatible FastAPI server's (vLLM's Messages API) 422: its words, its field.
        message, param = validation
    if status == 529:
        error = status_error(name, 503, message, retry_after)
        return GatewayError(
            ErrorKind.UNAVAILABLE, f"Backend `{name}` returned 529: {message}", code="backend_529",
            retry_after=error.retry_after,
        )
    return status_error(name, status, message, retry_after, param=param)


def prefill_trimmed(request: ChatRequest) -> ChatRequest:
    """`request` without the trailing whitespace of its final assistant turn (a prefill).

    Anthropic refuses one that ends in whitespace ("final assistant content cannot end with
    trailing whitespace"), and OpenAI and Ollama clients send such prefills ("The answer
    is "): its last text loses it, and text left empty goes (Anthropic refuses empty text
    blocks too), then the text before it is looked at. Any other request is returned as is."""
    messages = request.messages
    at = len(messages) - 1
    while at >= 0 and messages[at].role == "system":  # hoisted into `system`: not a turn
        at -= 1
    if at < 0 or messages[at].role != "assistant":
        return request
    as_sent = request.dialect == anthropic.DIALECT
    kept = list(messages)
    while at >= 0 and kept[at].role in ("assistant", "system"):
        message = kept[at]
        trimmed = message if message.role == "system" else _trimmed_turn(message, as_sent=as_sent)
        if trimmed is None:  # nothing left of it: the turn before it ends the conversation
            del kept[at]
        elif trimmed is not message:
            kept[at] = trimmed
            break
        elif message.role == "assistant":
            break
        at -= 1
    return request if len(kept) == len(messages) and all(a is b for a, b in zip(kept, messages, strict=True)) \
        else replace(request, messages=kept)


def _trimmed_turn(message: Message, *, as_sent: bool) -> Message | None:
    """`message` (an assistant turn) without the whitespace its content ends with: the same
    message when it has none, None when nothing is left of it. `as_sent`: an Anthropic
    client's, whose blocks go back as it sent them."""
    if message.tool_calls:  # it ends with a tool_use block
        return message
    raw = message.extra.get("content") if as_sent else None
    if isinstance(raw, list):
        blocks = list(raw)
        while blocks and isinstance(last := blocks[-1], dict) and last.get("type") == "text":
            text = last.get("text")
            if not isinstance(text, str) or text == text.rstrip():
                break
            if text.rstrip():
                blocks[-1] = {**last, "text": text.rstrip()}
                break
            blocks.pop()
        if blocks == raw:
            return message
        return replace(message, extra={**message.extra, "content": blocks}) if blocks else None
    parts = list(message.content)
    end = len(parts)
    # A cache marker (no block of its own) belongs to the part before it.
    while end > 0 and isinstance(marker := parts[end - 1], OpaquePart) and "type" not in marker.data:
        end -= 1
    changed = False
    while end > 0 and isinstance(part := parts[end - 1], TextPart) and part.text != part.text.rstrip():
        changed = True
        if part.text.rstrip():
            parts[end - 1] = TextPart(part.text.rstrip())
            break
        del parts[end - 1]
        end -= 1
    if not changed:
        return message
    return replace(message, content=tuple(parts)) if parts else None


class AnthropicBackend:
    def __init__(
        self, config: BackendConfig, *, default_max_tokens: int = DEFAULT_MAX_TOKENS, refuse_private_media_urls: bool = False
    ) -> None:
        self.config = config
        self.default_max_tokens = default_max_tokens
        self._check_media = refuse_private_media_urls
        key = config.api_key
        auth = {"x-api-key": key} if key else {}
        self._client = create_client(config, auth_header={**auth, "anthropic-version": anthropic.API_VERSION})
        # By model: what it said of a setting it refuses (Opus 4.7's sampling settings, budgeted
        # thinking), so that later requests are sent what it takes at once rather than refused first.
        self._refusals: dict[str, set[str]] = {}

    async def aclose(self) -> None:
        await self._client.aclose()

    def replicas(self) -> list[ReplicaState]:
        return self._client.replicas()

    def watch_failovers(self, hook: Callable[[str], None]) -> None:
        self._client.watch_failovers(hook)

    async def check_media_urls(self, request: ChatRequest) -> None:
        """With `refuse_private_media_urls`: a 400 for an image's or document's `source.url`
        the backend would fetch, for an Anthropic-compatible server inside the network (vLLM's
        `/v1/messages`) fetches it from there as it does an OpenAI client's `image_url`."""
        if self._check_media:
            await check_media_urls(request, "anthropic")

    def _body(self, call: BackendCall, *, stream: bool) -> bytes:
        body = anthropic.encode_messages_request(
            prefill_trimmed(call.request), call.upstream_model, stream=stream,
            default_max_tokens=self.default_max_tokens,
        )
        refused = self._refusals.get(call.upstream_model)
        if refused:  # read once, whatever was refused: a request's body is parsed again for it
            body = anthropic.without_refused(call.request, body, "\n".join(sorted(refused))) or body
        return body

    def _said_again(self, call: BackendCall, body: bytes, error: GatewayError) -> bytes | None:
        """The request again for a model that refused a setting the gateway chose for another
        dialect's client (see `anthropic.without_refused`), remembered for its next requests;
        None for any other error."""
        if error.kind is not ErrorKind.INVALID_REQUEST or not anthropic.refused(error.message):
            return None
        again = anthropic.without_refused(call.request, body, error.message)
        if again is not None:
            # What holds for the model, in a few set words: never one entry per message (they
            # name a request's tools and fields), each a parse of every later request's body.
            self._refusals.setdefault(call.upstream_model, set()).update(anthropic.remembered(error.message))
        return again

    async def stream(self, call: BackendCall, send: BatchSink) -> None:
        name = self.config.name
        await self.check_media_urls(call.request)
        body = self._body(call, stream=True)
        while True:
            parser = _EarlyErrors(anthropic.StreamParser(relay_blocks=_relays(call), json_tool=_json_tool(call)))
            try:
                with heads_heard():
                    await self._client.stream_into(
                        "/v1/messages", body, parser, send, backend=name, timeouts=self.config.timeouts,
                        headers={"content-type": "application/json", "accept": "text/event-stream", **_headers(call)},
                        error=lambda response, data: backend_error(
                            name, response.status_code, data, response.headers.get("retry-after")
                        ),
                    )
                return
            except GatewayError as error:  # an error status: raised before anything was sent
                again = self._said_again(call, body, error)
                if again is None:
                    raise
                body = again

    async def complete(self, call: BackendCall) -> Batch:
        name = self.config.name
        await self.check_media_urls(call.request)
        body = self._body(call, stream=False)
        while True:
            with transport_errors(name), heads_heard():
                response = await self._client.post(
                    "/v1/messages", content=body, headers={"content-type": "application/json", **_headers(call)},
                )
            if response.status_code < 400:
                break
            error = backend_error(name, response.status_code, response.content, response.headers.get("retry-after"))
            again = self._said_again(call, body, error)
            if again is None:
                raise error
            body = again
        data = _json_object(response, name)
        if data.get("type") == "error":
            raise anthropic.error_from_wire(data)
        events = anthropic.message_events(data, relay_blocks=_relays(call), json_tool=_json_tool(call))
        builder = CompletionBuilder()
        for event in events:
            builder.add(event)
        return Batch(events, done=True, completion=builder.build())

    async def count_tokens(self, request: ChatRequest, upstream_model: str) -> TokenCount:
        name = self.config.name
        body = anthropic.encode_messages_request(
            prefill_trimmed(request), upstream_model, stream=False, default_max_tokens=self.default_max_tokens,
            count_only=True,
        )
        # As vLLM's `/tokenize` for other backends: within the first-token timeout.
        timeout = self.config.timeouts.first_token
        with trio.move_on_after(timeout or math.inf) as scope, transport_errors(name):
            response = await self._client.post(
                "/v1/messages/count_tokens", content=body, headers=_beta({"content-type": "application/json"}, request)
            )
        if scope.cancelled_caught:
            raise timeout_error(name, "did not answer", timeout)
        if response.status_code >= 400:
            raise backend_error(name, response.status_code, response.content, response.headers.get("retry-after"))
        answer = _json_object(response, name)
        count = answer.pop("input_tokens", None)
        if not isinstance(count, int):
            raise GatewayError(ErrorKind.BACKEND, f"Backend `{name}` returned no token count.")
        return TokenCount(count, estimated=False, fields=answer)

    async def list_models(self) -> list[ModelInfo]:
        name = self.config.name
        models: list[ModelInfo] = []
        params: dict[str, Any] = {"limit": 1000}
        for _ in range(_MODEL_PAGES):
            with transport_errors(name):
                response = await self._client.get("/v1/models", params=params)
            if response.status_code >= 400:
                raise backend_error(name, response.status_code, response.content, None)
            page = _json_object(response, name)
            items = page.get("data")
            if not isinstance(items, list):
                raise GatewayError(ErrorKind.BACKEND, f"Backend `{name}` returned an invalid model list.")
            models.extend(self._model_info(item) for item in items if isinstance(item, dict) and item.get("id"))
            last = page.get("last_id")
            if not page.get("has_more") or not isinstance(last, str):
                break
            params = {"limit": 1000, "after_id": last}
        return models

    async def lacks(self, model: str) -> bool:
        """Whether the Models API says it has no `model`: a 404 naming it (a server without
        that API, or one that does not answer, cannot say)."""
        if model in self.config.models:
            return False
        try:
            response = await self._get_model(model)
        except GatewayError:
            return False
        return says_unknown(response, model)

    async def retrieve_model(self, model: str) -> ModelInfo | None:
        """The Models API's `GET /v1/models/{model}`, which resolves an alias to the model it
        stands for (`claude-sonnet-4-0` → `claude-sonnet-4-20250514`); None for a 404."""
        name = self.config.name
        response = await self._get_model(model)
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise backend_error(name, response.status_code, response.content, None)
        item = _json_object(response, name)
        return self._model_info(item) if item.get("id") else None

    async def _get_model(self, model: str) -> httpx.Response:
        with transport_errors(self.config.name):
            return await self._client.get("/v1/models/" + path_segment(model))

    def _model_info(self, item: dict[str, Any]) -> ModelInfo:
        name = self.config.name
        # What the Models API says of the model (its limits, what it can do, when it retires):
        # for Anthropic clients' listings and Ollama clients' `/api/show`.
        details = {key: item[key] for key in MODEL_FACTS if item.get(key) is not None}
        return ModelInfo(
            id=str(item["id"]), backend=name, created=_epoch(item.get("created_at")), owned_by=name, details=details
        )

    async def check(self) -> str | None:
        try:
            await self.list_models()
        except GatewayError as error:
            return listing_refused(self.config.name, self.config.base_url, "/v1/models", error)
        return None


def _relays(call: BackendCall) -> bool:
    """Blocks the domain does not model can reach the client as they came: it speaks Anthropic."""
    return call.request.dialect == anthropic.DIALECT


def _json_tool(call: BackendCall) -> str | None:
    """The tool whose input is the answer, when JSON mode is asked through one."""
    return anthropic.JSON_TOOL if anthropic.json_mode(call.request) else None


def _beta(headers: dict[str, str], request: ChatRequest) -> dict[str, str]:
    beta = anthropic.beta_header(request)
    if beta:
        headers["anthropic-beta"] = beta
    return headers


def _headers(call: BackendCall) -> dict[str, str]:
    return _beta(dict(call.headers), call.request)


class _EarlyErrors:
    """Raises an `error` event that comes before anything else (Anthropic's overloaded
    answer, sent with a 200), so the client gets a real status instead of a stream that
    starts and fails at once."""

    def __init__(self, parser: anthropic.StreamParser) -> None:
        self._parser = parser
        self._started = False
        self.failed = False

    def feed(self, data: bytes) -> anthropic.ParseOutput:
        return self._checked(self._parser.feed(data))

    def close(self) -> anthropic.ParseOutput:
        return self._checked(self._parser.close())

    def _checked(self, output: anthropic.ParseOutput) -> anthropic.ParseOutput:
        self.failed = self._parser.failed
        if not self._started and output.events:
            first = output.events[0]
            if isinstance(first, StreamFailed):
                raise first.error
            self._started = True
        return output


def _json_object(response: httpx.Response, name: str) -> dict[str, Any]:
    try:
        data = json.loads(response.content)
    except UnicodeDecodeError:
        data = json_mended(response.content)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise not_json(name, response.content)
    return data


def _epoch(value: Any) -> int:
    if not isinstance(value, str):
        return 0
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


# -- token counting for /v1/messages/count_tokens ------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenCount:
    input_tokens: int
    estimated: bool  # the backend cannot count: the gateway's estimate (about 4 characters a token)
    # What an Anthropic backend said beside the count (`context_management`'s
    # `original_input_tokens`, the count before the client's context edits).
    fields: dict[str, Any] | None = None


async def count_tokens(backend: Backend, request: ChatRequest, upstream_model: str) -> TokenCount:
    """Count a request's input tokens where the backend can: Anthropic backends natively,
    OpenAI-compatible ones through vLLM's `POST /tokenize` (at the server root, beside
    `/v1`). For any other backend, or one without that endpoint, the gateway's estimate:
    clients call this to budget their context (Claude Code), and an error would stop them.
    A model the backend says it does not serve is a 404, as `/v1/messages` would be."""
    if isinstance(backend, AnthropicBackend | OpenAIBackend):
        await backend.check_media_urls(request)  # counting, the backend fetches them too
    if isinstance(backend, AnthropicBackend):
        return await backend.count_tokens(request, upstream_model)
    estimate = TokenCount(estimated_prompt_tokens(request), estimated=True)
    if isinstance(backend, OllamaBackend):
        await _check_served_by_ollama(backend, upstream_model)
        return estimate
    if not isinstance(backend, OpenAIBackend):
        return estimate
    config = backend.config
    chat = json.loads(openai.encode_chat_request(
        request, upstream_model, stream=False, include_usage=False, template_fields=config.sends_template_fields
    ))
    body: dict[str, Any] = {"model": upstream_model, "messages": chat["messages"]}
    # The prompt as the chat would render it (a prefill without the generation prompt, …).
    for key in ("tools", "continue_final_message", "add_generation_prompt", "chat_template_kwargs"):
        if key in chat:
            body[key] = chat[key]
    response = await backend.tokenize(json.dumps(body).encode())
    if response.status_code in (404, 405):  # not vLLM (no `/tokenize`), or a model vLLM lacks
        await _check_known(backend, upstream_model, response)
        return estimate
    if response.status_code == 422:
        # A `/tokenize` of another shape refusing vLLM's body (TGI's wants `inputs`); vLLM
        # says its own refusals with a 400.
        return estimate
    if response.status_code >= 400:
        raise status_error(
            config.name, response.status_code,
            openai.error_message_from_body(response.content) or response.text[:500],
            response.headers.get("retry-after"),
        )
    try:
        count = response.json().get("count")
    except (ValueError, AttributeError):
        count = None
    return TokenCount(count, estimated=False) if isinstance(count, int) else estimate


async def _check_served_by_ollama(backend: OllamaBackend, model: str) -> None:
    """Raise Ollama's own 404 for a model it does not have (`/api/show` resolves names as
    `/api/chat` does); a backend that cannot say leaves the estimate standing."""
    try:
        await backend.show(model)
    except GatewayError as error:
        if error.kind is ErrorKind.NOT_FOUND:
            raise


async def _check_known(backend: OpenAIBackend, model: str, tokenized: httpx.Response) -> None:
    """Raise the backend's 404 for a model it says it does not have: vLLM's `/tokenize` says so
    for a model it lacks, and servers with OpenAI's `GET /v1/models/{model}` say so there. Only
    an error naming the model counts (a 404 for a route the server lacks does not), so a server
    that answers any name (llama.cpp) or cannot say keeps the estimate."""
    if model in backend.config.models:
        return
    if says_unknown(tokenized, model):
        raise status_error(backend.config.name, 404, openai.error_message_from_body(tokenized.content))
    try:
        retrieved = await backend.retrieve_model(model)
    except GatewayError:
        return
    if says_unknown(retrieved, model):
        raise status_error(backend.config.name, 404, openai.error_message_from_body(retrieved.content))


__all__ = ["DEFAULT_MAX_TOKENS", "AnthropicBackend", "TokenCount", "count_tokens"]
