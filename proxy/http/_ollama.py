"""The Ollama surface: /api/chat, /api/generate, /api/tags, /api/show, /api/version and `/`.

The official `ollama` clients work unmodified against the gateway (`host=<gateway url>`),
whichever kind of backend serves the model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import trio
from hypercorn.typing import ASGISendCallable
from quart import Blueprint, Response, request

from proxy.config import BackendConfig
from proxy.dialects import ollama
from proxy.dialects._json import Fields, dumps, loads_object
from proxy.domain.chat import ChatRequest
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.domain.routing import Route
from proxy.domain.truncation import Window
from proxy.gateway import Gateway
from proxy.http._context import gateway, listing_headers, request_body
from proxy.http._counted import record_answered
from proxy.http._errors import Reply, register_dialect_errors
from proxy.http._exchange import ExchangeBody, Headers, JsonSink, RenderedStreamSink
from proxy.http._front import FrontDoor, Incoming
from proxy.http._head import request_meta
from proxy.http._logprobs import refuse_logprobs_without_backend
from proxy.infra.backends import AnthropicBackend, Batch, ModelInfo, OpenAIBackend
from proxy.infra.backends._ollama import OllamaBackend
from proxy.services.auth import check_model, current_principal
from proxy.services.chat import ChatExchange

log = logging.getLogger("llm_proxy.http")

exchanges = FrontDoor()
blueprint = Blueprint("ollama", __name__)

_JSON = "application/json; charset=utf-8"
NDJSON_HEADERS: Headers = [(b"content-type", b"application/x-ndjson")]

register_dialect_errors("ollama", ("/api/",), ollama.render_error, _JSON)


class OllamaJsonSink(JsonSink):
    """One JSON object (`"stream": false`), timed from the request's arrival."""

    dialect = "ollama"

    def __init__(
        self, send: ASGISendCallable, headers: Headers, *, model: str, generate: bool, started: float, thinking: bool
    ) -> None:
        super().__init__(send, headers)
        self._model = model
        self._generate = generate
        self._started = started
        self._thinking = thinking

    async def write(self, batch: Batch) -> None:
        completion = batch.whole()
        timing = ollama.Timing(self._started, None, time.perf_counter())
        finish = ollama.backend_finish(batch.events)  # an Ollama backend's: its context, its timings
        body = ollama.render_completion(
            completion, model=self._model, generate=self._generate, timing=timing, thinking=self._thinking,
            context=finish.context if finish is not None and self._generate else None,
            backend_timings=ollama.timings_in(finish),
        )
        await self._json(body, _JSON.encode())

    async def fail(self, error: GatewayError) -> None:
        await super().fail(_as_ollama(error, self._model))


class OllamaStreamSink(RenderedStreamSink):
    """An NDJSON stream; a model the backend does not have is Ollama's 404, as for the router."""

    def __init__(self, send: ASGISendCallable, headers: Headers, renderer: ollama.StreamRenderer, *, model: str) -> None:
        super().__init__(send, headers, renderer, content_headers=NDJSON_HEADERS, dialect="ollama")
        self._model = model

    async def fail(self, error: GatewayError) -> None:
        await super().fail(_as_ollama(error, self._model))


def _not_found(model: str) -> GatewayError:
    return GatewayError(
        ErrorKind.NOT_FOUND, f'model "{model}" not found, try pulling it first', param="model", code="model_not_found"
    )


def _as_ollama(error: GatewayError, model: str) -> GatewayError:
    """A backend's 404 (its own wording: "The model `x` does not exist", …) in Ollama's words,
    which Ollama clients recognise (and offer to pull)."""
    if error.kind is ErrorKind.NOT_FOUND and error.code == "backend_404":
        return _not_found(model)
    return error


def _exchange(incoming: Incoming, request: ChatRequest) -> tuple[ChatExchange, Headers]:
    meta = request_meta(incoming.head)
    try:
        exchange = incoming.gateway.chat.exchange(request, meta, relay_openai=False)
    except GatewayError as error:
        if error.code == "model_not_found":
            raise _not_found(request.model) from None
        raise
    return exchange, [(b"x-request-id", meta.request_id.encode())]


def _refuse_embedding_model(gw: Gateway, model: str, *, generate: bool) -> None:
    """The in-process embedding model cannot chat: Ollama's 400 for a model without the
    `completion` capability (rather than routing the name to some backend)."""
    if gw.embeddings is not None and gw.embeddings.is_local(model):
        raise invalid_request(
            f"{dumps(model).decode()} does not support {'generate' if generate else 'chat'}",
            param="model",
            code="model_not_supported",
        )


# /api/generate fields only an Ollama backend can honour, and what they ask for.
_OLLAMA_ONLY = {
    "suffix": "fill-in-the-middle",
    "raw": "a prompt sent without the model's template",
    "template": "a custom prompt template",
    # An Ollama backend's tokens of the conversation so far: without them the model would
    # answer as if nothing came before.
    "context": "an earlier answer's conversation tokens",
}


def _for_backend(request: ChatRequest, backend: BackendConfig | None) -> ChatRequest:
    """An /api/generate request as is for each backend it goes to (the model's, a stand-in's),
    or a 400 for a field only Ollama honours: chat backends have no fill-in-the-middle and
    apply their own chat template, so answering as if these fields were not there would be a
    confidently wrong completion. (A route without a backend, a workflow, gets it as is.)
    Log probabilities asked of a backend without them are a 400 too (`refuse_logprobs_without_backend`)."""
    refuse_logprobs_without_backend(request, backend, field="logprobs")
    if backend is None or backend.kind == "ollama":
        return request
    used = ollama.generate_only_fields(request)
    field = next((name for name in _OLLAMA_ONLY if name in used), None)
    if field is not None:
        raise invalid_request(
            f"`{field}` ({_OLLAMA_ONLY[field]}) needs an Ollama backend; model `{request.model}` "
            f"is served by backend `{backend.name}` ({backend.kind}).",
            param=field,
        )
    return request


async def _answer(incoming: Incoming, request: ChatRequest, *, generate: bool) -> ExchangeBody | Reply:
    _refuse_embedding_model(incoming.gateway, request.model, generate=generate)
    if not request.messages:
        return await _load(incoming, request, generate=generate)
    exchange, headers = _exchange(incoming, request)
    if generate or request.params.logprobs or request.params.top_logprobs:
        exchange.adapt_with(_for_backend)
    if not generate and request.extra.get("truncate") is not False:
        _truncate_as_ollama(incoming.gateway, exchange)
    started = exchange.meta.received
    thinking = ollama.wants_thinking(request)
    if request.stream:
        renderer = ollama.StreamRenderer(model=request.model, generate=generate, started=started, thinking=thinking)
        return ExchangeBody(exchange, lambda send: OllamaStreamSink(send, headers, renderer, model=request.model))
    return ExchangeBody(exchange, lambda send: OllamaJsonSink(
        send, headers, model=request.model, generate=generate, started=started, thinking=thinking,
    ))


def _truncate_as_ollama(gw: Gateway, exchange: ChatExchange) -> None:
    """A chat longer than the model's window loses its oldest messages (system messages and
    the last one stay) rather than failing, as Ollama fits a chat to its context (unless the
    client says `truncate: false`). An Ollama backend fits the chat to its own `num_ctx`."""
    def window(route: Route) -> Window | None:
        backend = gw.backends.get(route.backend)
        return None if isinstance(backend, OllamaBackend) else gw.catalog.window(route.backend, route.upstream_model)

    exchange.truncate(window)


async def _load(incoming: Incoming, request: ChatRequest, *, generate: bool) -> Reply:
    """No prompt: Ollama loads the model (`ollama run`'s preload), or unloads it with
    `keep_alive: 0` (`ollama stop`). A model on an Ollama backend: the request goes there, and
    the backend's answer (or its error) is the answer. Other backends load nothing on request:
    the gateway checks that the model is served and answers as Ollama does."""
    gw = incoming.gateway
    try:
        route = gw.router.resolve(request.model)
    except GatewayError as error:
        if error.code == "model_not_found":
            raise _not_found(request.model) from None
        raise
    backend = gw.backends.get(route.backend)
    if isinstance(backend, OllamaBackend):
        body = {**loads_object(incoming.body), "model": route.upstream_model}
        meta = request_meta(incoming.head)
        try:
            content, content_type = await backend.load(
                "/api/generate" if generate else "/api/chat", body, {"x-request-id": meta.request_id}
            )
        except GatewayError as error:
            raise _as_ollama(error, request.model) from None
        record_answered(gw, meta, kind=_load_kind(request), dialect="ollama", model=request.model, route=route)
        return Reply(_with_model(content, request.model), content_type.encode())
    kind = _load_kind(request)
    record_answered(gw, request_meta(incoming.head), kind=kind, dialect="ollama", model=request.model, route=route)
    return Reply(ollama.load_reply(request.model, generate=generate, unload=kind == "unload"), _JSON.encode())


def _load_kind(request: ChatRequest) -> str:
    """`unload` for `keep_alive: 0` (`ollama stop`), else `preload`."""
    return "unload" if ollama.unloads(request) else "preload"


def _with_model(content: bytes, model: str) -> bytes:
    """The backend's answer naming the model as the client did (an alias, say), as chat does."""
    try:
        data = json.loads(content)
    except ValueError:
        return content
    return dumps({**data, "model": model}) if isinstance(data, dict) and "model" in data else content


@exchanges.route("/api/chat")
async def chat(incoming: Incoming) -> ExchangeBody | Reply:
    return await _answer(incoming, ollama.parse_chat_request(incoming.body), generate=False)


@exchanges.route("/api/generate")
async def generate(incoming: Incoming) -> ExchangeBody | Reply:
    return await _answer(incoming, ollama.parse_generate_request(incoming.body), generate=True)


@blueprint.get("/api/tags")
async def tags() -> Response:
    models = await gateway().catalog.models()
    return Response(ollama.render_tags([_tag(info) for info in models]), content_type=_JSON, headers=listing_headers())


def _tag(info: ModelInfo) -> dict[str, object]:
    facts = info.details  # an alias has its target's (the catalogue copies them)
    target = facts.get("alias_of")
    if isinstance(target, str) and not isinstance(facts.get("details"), dict):
        # A family guessed from the alias (`gpt-4o`, `fast`) would be a made-up one.
        facts = {**facts, "details": ollama.placeholder_details(target)}
    return ollama.tag_entry(info.id, backend=info.backend, created=info.created, facts=facts)


@blueprint.post("/api/show")
async def show() -> Response:
    """What `/api/chat` would use for the model: the Ollama backend's own answer, otherwise
    facts from the model list (or placeholders) for models other backends serve."""
    data = loads_object(await request_body())
    name = data.get("model") or data.get("name")
    if not isinstance(name, str) or not name:
        raise invalid_request("model is required", param="model")
    gw = gateway()
    # A model outside the key's scope is answered as one that does not exist (as the
    # scoped listings leave it out), not with chat's 403.
    try:
        if gw.embeddings is not None and gw.embeddings.is_local(name):
            check_model(name)  # the local model is not resolved through the (scoped) router
            return Response(dumps(_local_show(gw.embeddings.local_models())), content_type=_JSON)
        route = gw.router.resolve(name)
    except GatewayError as error:
        if error.code == "model_not_found" or error.kind is ErrorKind.PERMISSION:
            raise _show_not_found(name) from None
        raise
    backend = gw.backends.get(route.backend)
    if isinstance(backend, OllamaBackend):
        try:
            shown = await backend.show(route.upstream_model, verbose=data.get("verbose") is True)
        except GatewayError as error:
            if error.kind is ErrorKind.NOT_FOUND:
                raise _show_not_found(name) from None
            raise
        return Response(dumps(shown), content_type=_JSON)
    models = await gw.catalog.models()
    variants = (*ollama.name_variants(name), *ollama.name_variants(route.upstream_model))
    info = next((m for m in models if m.id in variants), None)
    if info is not None:
        entry = _tag(info)
    elif await _backend_lacks(gw, name, route):  # `ollama run` pulls rather than chat with it
        raise _show_not_found(name)
    else:  # served by prefix or by the default backend, without being listed
        entry = ollama.tag_entry(name, backend=route.backend, created=0, facts={})
    kind = backend.config.kind if backend is not None else ""
    capabilities, context = _model_facts(kind, info.details if info is not None else {})
    body = ollama.show_body(entry, capabilities=capabilities, context_length=context)
    return Response(dumps(body), content_type=_JSON)


def _model_facts(kind: str, details: Mapping[str, Any]) -> tuple[tuple[str, ...], int | None]:
    """The capabilities and context window `/api/show` gives a model of a non-Ollama backend.

    Clients offer image input and thinking only where the capabilities say `vision` and
    `thinking` (Copilot's and Zed's Ollama providers), and size prompts by the context window.
    vLLM lists its window (`max_model_len`); Anthropic's Models API the window and what each
    model accepts; otherwise every Claude model reads images and has 200k tokens."""
    capabilities = ["completion", "tools"]
    context: int | None = None
    if kind == "openai":
        window = details.get("max_model_len")
        context = window if isinstance(window, int) else None
    elif kind == "anthropic":
        said = details.get("capabilities")
        said = said if isinstance(said, Mapping) else {}
        if _supported(said.get("image_input"), default=True):
            capabilities.append("vision")
        if _supported(said.get("thinking"), default=False):
            capabilities.append("thinking")
        window = details.get("max_input_tokens")
        context = window if isinstance(window, int) else _CLAUDE_CONTEXT
    return tuple(capabilities), context


def _supported(capability: object, *, default: bool) -> bool:
    if isinstance(capability, Mapping) and isinstance(capability.get("supported"), bool):
        return bool(capability["supported"])
    return default


# Claude's context window where the Models API does not say it.
_CLAUDE_CONTEXT = 200_000


def _local_show(local: list[ModelInfo]) -> dict[str, object]:
    info = local[0]
    facts = info.details
    family = str(facts.get("details", {}).get("family") or "bert")
    extra = {f"{family}.{key}": facts[key] for key in ("embedding_length", "context_length") if key in facts}
    entry = ollama.tag_entry(info.id, backend=info.backend, created=info.created, facts=facts)
    return ollama.show_body(entry, capabilities=("embedding",), model_info=extra)


def _show_not_found(name: str) -> GatewayError:
    return GatewayError(ErrorKind.NOT_FOUND, f"model '{name}' not found", param="model", code="model_not_found")


# How long `/api/ps` waits for the Ollama backends; one that has not answered by then is left out.
_PS_SECONDS = 5.0


@blueprint.get("/api/ps")
async def ps() -> Response:
    """The models the Ollama backends hold in memory, all in one list (the gateway itself and
    other kinds of backend load none on request). A backend that fails or is slow is left out
    rather than failing the listing; a key sees only the models it may use."""
    backends = [b for b in gateway().backends.values() if isinstance(b, OllamaBackend)]
    found: list[list[dict[str, Any]]] = [[] for _ in backends]

    async def ask(index: int, backend: OllamaBackend) -> None:
        try:
            found[index] = await backend.running()
        except GatewayError as error:
            log.warning("/api/ps: backend `%s` left out: %s", backend.config.name, error.message)

    with trio.move_on_after(_PS_SECONDS):
        async with trio.open_nursery() as nursery:
            for index, backend in enumerate(backends):
                nursery.start_soon(ask, index, backend)
    principal = current_principal.get()
    models, seen = [], set()
    for item in (item for listed in found for item in listed):
        name = item.get("name") or item.get("model")
        if not isinstance(name, str) or name in seen or (principal is not None and not principal.may_use_model(name)):
            continue
        seen.add(name)
        models.append(item)
    return Response(dumps({"models": models}), content_type=_JSON)


@blueprint.post("/api/pull")
async def pull() -> Response:
    """A model the gateway serves is already "pulled"; any other cannot be (it has no store
    to pull into): Ollama's answer for a model the registry does not have."""
    fields = Fields(loads_object(await request_body()))
    name = fields.text("model") or fields.text("name")
    if not name:
        raise invalid_request("model is required", param="model")
    stream = fields.boolean("stream") is not False
    gw = gateway()
    if gw.embeddings is not None and gw.embeddings.is_local(name):
        check_model(name)
    else:
        await _check_served(gw, name)
    return Response(ollama.pull_reply(stream=stream), content_type="application/x-ndjson" if stream else _JSON)


async def _check_served(gw: Gateway, name: str) -> None:
    """A 404 for a pull of a model no backend serves: one the gateway cannot route, or one a
    prefix or the default backend would get but that backend says it lacks. Chat tells an
    Ollama client "try pulling it first"; a pull answered "success" sent it round that loop."""
    await gw.catalog.models()  # a name a backend lists since the last look is known now
    try:
        route = gw.router.resolve(name)
    except GatewayError as error:
        if error.code == "model_not_found":
            raise _pull_not_found() from None
        raise
    if gw.router.knows(name):  # an alias, a configured model, one its backend lists
        return
    backend = gw.backends.get(route.backend)
    if isinstance(backend, OllamaBackend):
        try:
            await backend.show(route.upstream_model)
        except GatewayError as error:
            if error.kind is ErrorKind.NOT_FOUND:
                raise _pull_not_found(f" (the gateway cannot pull models: pull it on backend `{route.backend}`)") from None
            raise
    elif await _backend_lacks(gw, name, route):
        raise _pull_not_found()


async def _backend_lacks(gw: Gateway, name: str, route: Route) -> bool:
    """Whether an OpenAI-compatible or Anthropic backend that a prefix or the default would
    send `name` to, without anything naming it there, says it does not serve it (`lacks`)."""
    backend = gw.backends.get(route.backend)
    return (
        isinstance(backend, OpenAIBackend | AnthropicBackend)
        and not gw.router.knows(name)
        and await backend.lacks(route.upstream_model)
    )


def _pull_not_found(hint: str = "") -> GatewayError:
    return GatewayError(
        ErrorKind.NOT_FOUND, "pull model manifest: file does not exist" + hint, param="model", code="model_not_found"
    )


_MANAGEMENT = {"/api/delete": "delete", "/api/copy": "copy", "/api/create": "create", "/api/push": "push"}


@blueprint.route("/api/delete", methods=["DELETE", "POST"])
@blueprint.post("/api/copy")
@blueprint.post("/api/create")
@blueprint.post("/api/push")
@blueprint.route("/api/blobs/<path:digest>", methods=["HEAD", "POST"])
async def manage(digest: str | None = None) -> Response:
    """The gateway fronts other servers' models: it cannot change them."""
    what = _MANAGEMENT.get(request.path, "upload blobs for")
    raise GatewayError(
        ErrorKind.PERMISSION,
        f"Model management is not available through the gateway: it cannot {what} models. "
        "Manage models on the Ollama server behind it.",
        code="model_management_unavailable",
    )


@blueprint.get("/api/version")
async def version() -> Response:
    return Response(ollama.version_body(), content_type=_JSON)


@blueprint.route("/", methods=["GET", "HEAD"])
async def root() -> Response:
    return Response(ollama.ROOT_TEXT, content_type="text/plain; charset=utf-8")
