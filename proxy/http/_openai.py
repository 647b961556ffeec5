"""The OpenAI surface: /v1/chat/completions, /v1/models and /v1/models/{id} (the model
endpoints in Anthropic's shapes for Anthropic's clients, which share their paths)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from hypercorn.typing import ASGISendCallable
from quart import Blueprint, Response, request

from proxy.config import BackendConfig
from proxy.dialects import anthropic, openai
from proxy.dialects._json import Fields, dumps
from proxy.dialects.anthropic import _models as anthropic_models
from proxy.dialects.openai import stored
from proxy.domain.chat import ChatRequest, ImagePart, OpaquePart
from proxy.domain.errors import UNSUPPORTED_PARAMETER, ErrorKind, GatewayError, invalid_request
from proxy.http._context import gateway, listing_headers
from proxy.http._exchange import SSE_HEADERS, AsgiSink, ExchangeBody, Headers, JsonSink
from proxy.http._front import FrontDoor, Incoming
from proxy.http._head import request_meta
from proxy.http._logprobs import refuse_logprobs_without_backend
from proxy.http._upstream_limits import openai_limits_of_anthropic
from proxy.infra.backends import AnthropicBackend, Backend, Batch, ModelInfo
from proxy.infra.transport import ResponseHeads, current_heads
from proxy.services.chat import ChatExchange, ExchangeSink
from proxy.services.embeddings import LOCAL_BACKEND

exchanges = FrontDoor()
blueprint = Blueprint("openai", __name__)

# The RAG route's sources (a response header) also travel in the body, as `rag_sources`: a
# field OpenAI clients ignore unless they look for it.
_SOURCES_HEADER = b"x-rag-sources"


def _body_extras(headers: Headers) -> bytes | None:
    for name, value in headers:
        if name == _SOURCES_HEADER:
            return b',"rag_sources":' + value
    return None


def _add_to_object(data: bytes, extras: bytes, end: int | None = None) -> bytes:
    """`extras` added as the last members of the JSON object ending before `end`."""
    close = data.rfind(b"}", 0, len(data) if end is None else end)
    return data if close < 0 else data[:close] + extras + data[close:]


def _add_to_first_event(data: bytes, extras: bytes) -> bytes | None:
    """`data` with `extras` in its first SSE event's JSON object; None if it has no event."""
    start = data.find(b"data:")
    if start < 0:
        return None
    ends = [i for i in (data.find(b"\n\n", start), data.find(b"\r\n\r\n", start)) if i >= 0]
    end = min(ends) if ends else len(data)
    if data.find(b"{", start, end) < 0:
        return None
    return _add_to_object(data, extras, end)


class OpenAIStreamSink(AsgiSink):
    """SSE to an OpenAI client: the backend's own frames when it speaks OpenAI, else rendered."""

    def __init__(self, send: object, headers: Headers, include_usage: bool | None, *, single_tool: bool = False) -> None:
        super().__init__(send, headers)  # type: ignore[arg-type]
        self._renderer = openai.StreamRenderer(include_usage=include_usage, single_tool=single_tool)
        self._ended = False
        self._extras: bytes | None = None

    async def start(self) -> None:
        self._extras = _body_extras(self.extra_headers)
        await self._start(200, SSE_HEADERS)

    async def write(self, batch: Batch) -> None:
        if batch.raw is not None:
            data = batch.raw
            self._ended = self._ended or batch.done
        elif not batch.events and not batch.done:
            data = openai.KEEPALIVE
        else:
            data = self._renderer.render(batch.events)
            self._ended = self._ended or self._renderer.done
        if self._extras is not None and data:
            patched = _add_to_first_event(data, self._extras)
            if patched is not None:
                data, self._extras = patched, None
        if data:
            await self._body(data)

    async def finish(self) -> None:
        await self._end(b"" if self._ended else self._renderer.close())


class OpenAIJsonSink(JsonSink):
    def __init__(self, send: object, headers: Headers, *, single_tool: bool = False) -> None:
        super().__init__(send, headers)  # type: ignore[arg-type]
        self._single_tool = single_tool

    async def write(self, batch: Batch) -> None:
        if batch.raw is not None:
            data = batch.raw
        else:
            assert batch.completion is not None  # the relay completes non-streaming batches
            data = openai.render_completion(batch.completion, single_tool=self._single_tool)
        extras = _body_extras(self.extra_headers)
        await self._json(data if extras is None else _add_to_object(data, extras))


@exchanges.route("/v1/chat/completions")
async def chat_completions(incoming: Incoming) -> ExchangeBody:
    request = openai.parse_chat_request(incoming.body)
    extra = request.extra
    if "store" in extra:
        stored.check_store_fields(Fields(extra))
    meta = request_meta(incoming.head)
    exchange = incoming.gateway.chat.exchange(request, meta, relay_openai=True)
    exchange.adapt_with(_for_backend)
    if extra.get("store") is True:
        # Journalled as stored: read back by its id (`_stored_completions`). Not from the
        # semantic cache, whose hit is another request's answer under an id no row holds (a
        # hit writes none); the exact cache's is a request the same, `store` included: one stored.
        exchange.settings = stored.stored_settings(request, time.time_ns() // 1000)
        exchange.semantic_cache = None
    headers: Headers = [(b"x-request-id", meta.request_id.encode())]
    # `parallel_tool_calls: false` promises one call at most, whichever backend answers (an
    # OpenAI-compatible one's own answer is relayed as it came: vLLM and OpenAI keep it).
    single = request.parallel_tool_calls is False
    backends = incoming.gateway.backends
    if request.stream:
        include_usage = request.include_usage
        return OpenAIExchangeBody(
            exchange, lambda send: OpenAIStreamSink(send, headers, include_usage, single_tool=single), backends,
        )
    return OpenAIExchangeBody(exchange, lambda send: OpenAIJsonSink(send, headers, single_tool=single), backends)


class OpenAIExchangeBody(ExchangeBody):
    """An exchange whose response head also carries what of the answering backend's head
    OpenAI clients read (as LiteLLM passes them on): its own request id (an OpenAI-compatible
    backend's `x-request-id`, Anthropic's `request-id`) as `x-upstream-request-id`, the id
    their support asks for (the gateway's `x-request-id` stays); how to retry (`retry-after-ms`,
    `x-should-retry`, `retry-after`) unless the gateway said it already; and from an
    OpenAI-compatible backend `openai-processing-ms` and its `x-ratelimit-*` (an Anthropic
    backend's `anthropic-ratelimit-*` said as those) while the caller's key has no limits of
    its own (whose headers the gateway sends instead). Read once, as the head goes out; a
    cached or replayed answer has no backend head."""

    def __init__(
        self, exchange: ChatExchange, sink: Callable[[ASGISendCallable], ExchangeSink], backends: Mapping[str, Backend],
    ) -> None:
        super().__init__(exchange, sink)
        self._backends = backends
        self._heads = ResponseHeads()

    async def run(self, send: ASGISendCallable) -> None:
        token = current_heads.set(self._heads)  # the exchange's backend calls inherit it
        try:
            await super().run(send)
        finally:
            current_heads.reset(token)

    def sink(self, send: ASGISendCallable) -> ExchangeSink:
        made = super().sink(send)
        if isinstance(made, AsgiSink):
            made.upstream = self._upstream
        return made

    def _upstream(self, own: Headers) -> Headers:
        backend = self._backends.get(self.exchange.route.backend)
        kind = backend.config.kind if backend is not None else None
        if kind not in _ID_HEADERS:
            return []  # an Ollama backend's head says nothing of the sort (nor does a workflow's)
        id_header, passed_on = _ID_HEADERS[kind], _PASSED_ON[kind]
        taken = {name.lower() for name, _ in own}
        # The caller's key's own limits, when it has any, are what it backs off by.
        limits = not any(name.startswith(b"x-ratelimit-") for name in taken)
        passed: Headers = []
        upstream_id = None
        for name, value in self._heads.headers:
            if name == id_header:
                upstream_id = value
            elif name in taken:
                continue
            elif name in passed_on or (limits and kind == "openai" and name.startswith(b"x-ratelimit-")):
                passed.append((name, value))
        if limits and kind == "anthropic":
            passed += openai_limits_of_anthropic(self._heads.headers, time.time())
        # vLLM and others answer with the id they were sent (the gateway's): nothing to add.
        if upstream_id is not None and (b"x-request-id", upstream_id) not in own:
            passed.append((b"x-upstream-request-id", upstream_id))
        return passed


# The backend's own id for the call, by backend kind (what its support asks for).
_ID_HEADERS = {"openai": b"x-request-id", "anthropic": b"request-id"}
# How to retry, which the OpenAI SDK reads whoever says it (`retry-after-ms` first).
_RETRY = frozenset({b"retry-after", b"retry-after-ms", b"x-should-retry"})
_PASSED_ON = {"openai": _RETRY | {b"openai-processing-ms"}, "anthropic": _RETRY}


# Fields only OpenAI-compatible backends honour, with what to do instead; elsewhere (nor in a
# workflow) there is nothing they could become, and an answer without them would be silently
# wrong (LiteLLM refuses them too, unless told to drop them).
_OPENAI_ONLY = {
    "functions": ("(legacy function calling)", "Send the functions as `tools` instead."),
    "modalities": ("asking for audio output", "Leave out `audio` from `modalities` to get text."),
    "audio": ("(audio output)", "Leave it out to get text."),
    "logit_bias": ("", "Leave it out, or ask a model served by an OpenAI-compatible backend."),
    "web_search_options": ("(web search)", "Leave it out, or ask a model served by an OpenAI-compatible backend."),
}


def _asks(name: str, value: Any) -> bool:
    """Whether the client's `value` for `name` asks for something (a text-only `modalities`
    and an empty `logit_bias` ask nothing another backend would not do; an empty
    `web_search_options` is a search with the defaults)."""
    if name == "modalities":
        return isinstance(value, list) and "audio" in value
    if name == "web_search_options":
        return value is not None
    return bool(value)


def _for_backend(request: ChatRequest, backend: BackendConfig | None) -> ChatRequest:
    """The request as is for each backend it goes to (the model's, a stand-in's), or a 400
    for what only an OpenAI-compatible backend can be given."""
    if backend is not None and backend.kind == "openai":
        return request
    refuse_logprobs_without_backend(request, backend, field="logprobs")
    served = f"is served by backend `{backend.name}` ({backend.kind})" if backend else "is answered by a workflow"
    asked = next((name for name in _OPENAI_ONLY if _asks(name, request.extra.get(name))), None)
    if asked is not None:
        _refuse_openai_only(request.model, served, asked)
    _refuse_tools_without_equivalent(request, served)
    _refuse_parts_without_equivalent(request, served, anthropic_backend=backend is not None and backend.kind == "anthropic")
    if backend is not None and backend.kind == "anthropic":
        _refuse_images_anthropic_cannot_take(request, served)
    return request


def _refuse_images_anthropic_cannot_take(request: ChatRequest, served: str) -> None:
    """An image Anthropic cannot be given (a non-image or non-base64 `data:` URL, bare base64)
    is a 400 naming the part, not Anthropic's words about a request the client never wrote."""
    for i, message in enumerate(request.messages):
        # The client's parts: without the cache markers its `cache_control` became.
        parts = (p for p in message.content if not (isinstance(p, OpaquePart) and p.dialect == anthropic.DIALECT))
        for j, part in enumerate(parts):
            refusal = anthropic.image_refusal(part.url) if isinstance(part, ImagePart) else None
            if refusal is not None:
                raise invalid_request(
                    f"`messages[{i}].content[{j}].image_url.url` is {refusal}; model `{request.model}` {served}, "
                    "which takes images as http(s) URLs or base64 `data:image/...` URLs.",
                    param=f"messages[{i}].content[{j}].image_url.url",
                    code="unsupported_image",
                )


def _refuse_tools_without_equivalent(request: ChatRequest, served: str) -> None:
    """Custom (free-form) tools and an `allowed_tools` or custom `tool_choice` (kept as sent in
    `extra`): other backends have no equivalent, and without them the model would answer with
    other tools, or none, than the client gave."""
    tools = request.extra.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        if isinstance(tool, dict) and tool.get("type") == "custom":
            raise invalid_request(
                f"`tools[{i}]` is a `custom` tool, which model `{request.model}` cannot be given: it {served}, "
                "which has no equivalent. Only OpenAI-compatible backends accept it; send a `function` tool instead.",
                param=f"tools[{i}]", code=UNSUPPORTED_PARAMETER,
            )
    choice = request.extra.get("tool_choice")
    if isinstance(choice, dict):
        raise invalid_request(
            f"`tool_choice` of type `{choice.get('type')}` needs an OpenAI-compatible backend; model "
            f"`{request.model}` {served}. Send \"auto\", \"required\" or a `function` choice instead.",
            param="tool_choice", code=UNSUPPORTED_PARAMETER,
        )


def _refuse_openai_only(model: str, served: str, name: str) -> None:
    what, instead = _OPENAI_ONLY[name]
    raise invalid_request(
        f"`{name}` {what + ' ' if what else ''}needs an OpenAI-compatible backend; model `{model}` {served}. {instead}",
        param=name, code=UNSUPPORTED_PARAMETER,
    )


def _refuse_parts_without_equivalent(request: ChatRequest, served: str, *, anthropic_backend: bool) -> None:
    """Content parts other backends have no counterpart for (`input_audio`, `file`, …): their
    encoders leave them out, so the model would answer without the audio or file the client
    sent (or, with nothing else in the message, an Anthropic backend would get no message).
    A 400 naming the part instead. The assistant's own parts (`refusal`) carry nothing the
    model must read and stay dropped. An inline PDF `file` is an Anthropic backend's document."""
    for i, message in enumerate(request.messages):
        if message.role == "assistant":
            continue
        for j, part in enumerate(message.content):
            if anthropic_backend and isinstance(part, OpaquePart) and anthropic.openai_file_document(part.data):
                continue
            if isinstance(part, OpaquePart) and part.dialect == openai.DIALECT:
                raise invalid_request(
                    f"`messages[{i}].content[{j}]` is a `{part.data.get('type')}` part, which model "
                    f"`{request.model}` cannot be given: it {served}, which has no equivalent. "
                    "Only OpenAI-compatible backends accept it.",
                    param=f"messages[{i}].content[{j}]",
                    code="unsupported_content_part",
                )


# What an OpenAI-compatible backend (vLLM) said of a model beyond OpenAI's fields, passed on.
_BACKEND_MODEL_FIELDS = ("root", "parent", "max_model_len")


def _model_object(model: ModelInfo) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": model.id, "object": "model", "created": model.created, "owned_by": model.owned_by or model.backend,
    }
    details = model.details
    body.update((key, details[key]) for key in _BACKEND_MODEL_FIELDS if key in details)
    body["backend"] = model.backend
    if "alias_of" in details:
        body["alias_of"] = details["alias_of"]
    return body


def _listed_as(model_id: str, listed: list[str]) -> str | None:
    """The listed name `model_id` means: itself, or for an untagged name its `:latest` tag
    (Ollama's names: `llama3.2` is `llama3.2:latest`)."""
    if model_id in listed:
        return model_id
    if ":" not in model_id and model_id + ":latest" in listed:
        return model_id + ":latest"
    return None


def model_not_found(model_id: str) -> GatewayError:
    return GatewayError(
        ErrorKind.NOT_FOUND,
        f"The model `{model_id}` does not exist or you do not have access to it.",
        code="model_not_found",
    )


def _for_anthropic() -> bool:
    """Anthropic's SDK shares these paths and always sends `anthropic-version`: its clients
    get Anthropic's shapes (errors too, see `_errors`)."""
    return "anthropic-version" in request.headers


async def _anthropic_models() -> list[dict[str, Any]]:
    # The in-process embedding model cannot chat: no use to an Anthropic client.
    return [
        anthropic_models.model_object(m.id, created=m.created, facts=m.details)
        for m in await gateway().catalog.models()
        if m.backend != LOCAL_BACKEND
    ]


@blueprint.get("/v1/models")
async def list_models() -> Response:
    if _for_anthropic():
        query = anthropic_models.parse_page_query(request.args)
        body = anthropic_models.render_model_page(await _anthropic_models(), query)
        return Response(body, content_type="application/json", headers=listing_headers())
    models = await gateway().catalog.models()
    return Response(
        openai.render_model_list([_model_object(m) for m in models]), content_type="application/json",
        headers=listing_headers(),
    )


# `path:`: model ids may hold slashes (`org/model`), which the SDKs send percent-encoded.
@blueprint.get("/v1/models/<path:model_id>")
async def retrieve_model(model_id: str) -> Response:
    # The key's models only (the catalogue is filtered per key): others are unknown.
    if _for_anthropic():
        entries = await _anthropic_models()
        wanted = _listed_as(model_id, [entry["id"] for entry in entries])
        for entry in entries:
            if entry["id"] == wanted:
                return Response(anthropic_models.render_model(entry), content_type="application/json")
        resolved = await _resolved_by_backend(model_id)
        if resolved is None:
            raise anthropic_models.model_not_found(model_id)
        entry = anthropic_models.model_object(resolved.id, created=resolved.created, facts=resolved.details)
        return Response(anthropic_models.render_model(entry), content_type="application/json")
    models = await gateway().catalog.models()
    wanted = _listed_as(model_id, [model.id for model in models])
    found = next((model for model in models if model.id == wanted), None) or await _resolved_by_backend(model_id)
    if found is None:
        raise model_not_found(model_id)
    return Response(dumps(_model_object(found)), content_type="application/json")


async def _resolved_by_backend(model_id: str) -> ModelInfo | None:
    """A model the list lacks but its Anthropic backend knows: Anthropic's Models API resolves
    an alias (`claude-sonnet-4-0`, which chats take) to the model it stands for, and clients
    look models up by the names they chat with. None for any other (or the key's scope)."""
    gw = gateway()
    try:
        route = gw.router.resolve(model_id)
    except GatewayError:
        return None
    backend = gw.backends.get(route.backend)
    return await backend.retrieve_model(route.upstream_model) if isinstance(backend, AnthropicBackend) else None
