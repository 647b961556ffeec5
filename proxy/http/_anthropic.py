"""The Anthropic surface: /v1/messages and /v1/messages/count_tokens.

Credentials (`x-api-key` or `Authorization: Bearer`) and `anthropic-version` are accepted
as sent and not checked here: a missing version is fine, and authentication is the
gateway's business elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping

from hypercorn.typing import ASGISendCallable, ASGISendEvent
from quart import Blueprint

from proxy.config import BackendConfig
from proxy.dialects import anthropic
from proxy.domain.chat import ChatRequest
from proxy.domain.tokens import estimated_prompt_tokens
from proxy.http._counted import record_answered
from proxy.http._errors import Reply, register_dialect_errors
from proxy.http._exchange import (
    SSE_HEADERS,
    ExchangeBody,
    Headers,
    JsonSink,
    RenderedStreamSink,
)
from proxy.http._front import FrontDoor, Incoming
from proxy.http._head import RequestHead, request_meta
from proxy.infra.backends import Backend, Batch
from proxy.infra.backends._anthropic import count_tokens
from proxy.infra.transport import ResponseHeads, current_heads
from proxy.services.chat import ChatExchange, ExchangeSink
from proxy.services.rag import counted_as_sent

exchanges = FrontDoor()
blueprint = Blueprint("anthropic", __name__)

# Every error on these paths (ours, werkzeug's 404/405/413, unexpected 500s) in Anthropic's shape.
register_dialect_errors("anthropic", ("/v1/messages",), anthropic.render_error, identified=anthropic.render_error)


class AnthropicJsonSink(JsonSink):
    dialect = "anthropic"

    def __init__(
        self, send: ASGISendCallable, headers: Headers, model: str, *, as_asked: bool = False, single_tool: bool = False,
    ) -> None:
        super().__init__(send, headers)
        self._model = model
        self._as_asked = as_asked
        self._single_tool = single_tool

    async def write(self, batch: Batch) -> None:
        completion = batch.whole()
        await self._json(anthropic.render_message(
            completion, batch.events, model=self._model, as_asked=self._as_asked, single_tool=self._single_tool,
        ))


class AnthropicExchangeBody(ExchangeBody):
    """An exchange whose response head also carries, when an Anthropic backend answered, that
    backend's `request-id` (as `x-upstream-request-id`: the gateway's own `request-id` is the
    trace) and its `anthropic-ratelimit-*`, `retry-after` and `x-should-retry` headers, which
    Anthropic clients show in errors and back off (or give up) by. Only its response head's: they go with the first byte."""

    def __init__(
        self, exchange: ChatExchange, sink: Callable[[ASGISendCallable], ExchangeSink], backends: Mapping[str, Backend],
    ) -> None:
        super().__init__(exchange, sink)
        self._backends = backends

    async def run(self, send: ASGISendCallable) -> None:
        heads = ResponseHeads()

        async def with_upstream(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], *self._upstream(heads, message["headers"])]}
            await send(message)

        token = current_heads.set(heads)  # the exchange's backend calls inherit it
        try:
            await super().run(with_upstream)
        finally:
            current_heads.reset(token)

    def _upstream(self, heads: ResponseHeads, own: Iterable[tuple[bytes, bytes]]) -> Headers:
        backend = self._backends.get(self.exchange.route.backend)
        if backend is None or backend.config.kind != "anthropic":
            return []  # another kind answered (a stand-in): what an Anthropic call heard is not its
        taken = {name.lower() for name, _ in own}
        passed: Headers = []
        for name, value in heads.headers:
            if name == b"request-id":
                passed.append((b"x-upstream-request-id", value))
            elif (name.startswith(b"anthropic-ratelimit-") or name in _PASSED_ON) and name not in taken:
                passed.append((name, value))  # (an error's own `retry-after` says it already)
        return passed


# How long to back off, and whether to retry at all (the SDKs obey Anthropic's `x-should-retry`).
_PASSED_ON = frozenset({b"retry-after", b"x-should-retry"})


def _headers(request_id: str) -> Headers:
    value = request_id.encode()
    return [(b"request-id", value), (b"x-request-id", value)]


def _parse(body: bytes, head: RequestHead, *, count_only: bool = False) -> ChatRequest:
    parsed = anthropic.parse_messages_request(body, count_only=count_only, internal=head.internal)
    beta = head.header_list("anthropic-beta")
    if beta:
        parsed.extra[anthropic.BETA_EXTRA] = beta
    return parsed


def _for_backend(request: ChatRequest, backend: BackendConfig | None) -> ChatRequest:
    """Anthropic-only content translated for each backend of another kind the request goes
    to (the model's, a stand-in's), or a 400 (never dropped)."""
    return request if backend is None else anthropic.adapted_for_dialect(request, backend.kind)


@exchanges.route("/v1/messages")
async def messages(incoming: Incoming) -> ExchangeBody:
    request = _parse(incoming.body, incoming.head)
    meta = request_meta(incoming.head)
    exchange = incoming.gateway.chat.exchange(request, meta, relay_openai=False)
    exchange.adapt_with(_for_backend)
    headers = _headers(meta.request_id)
    model = request.model
    # A model asked for by an alias is answered in the client's name (as Ollama and Responses
    # clients are), not the backend's; otherwise the backend's stands (Anthropic's snapshot).
    aliased = exchange.route.upstream_model != model
    # `disable_parallel_tool_use` promises one call at most, whichever backend answers.
    single = request.parallel_tool_calls is False
    if request.stream:
        return AnthropicExchangeBody(exchange, lambda send: RenderedStreamSink(
            send, headers, anthropic.StreamRenderer(
                model=model, as_asked=aliased, single_tool=single, request_id=meta.request_id,
                prompt_tokens=functools.partial(estimated_prompt_tokens, request),
            ),
            content_headers=SSE_HEADERS, dialect="anthropic",
        ), incoming.gateway.backends)
    return AnthropicExchangeBody(
        exchange, lambda send: AnthropicJsonSink(send, headers, model, as_asked=aliased, single_tool=single),
        incoming.gateway.backends,
    )


# On the front door, as `/v1/messages`: its refusals (the guard's too) are logged and counted.
@exchanges.route("/v1/messages/count_tokens", kind="count_tokens")
async def messages_count_tokens(incoming: Incoming) -> Reply:
    meta = request_meta(incoming.head)
    request = _parse(incoming.body, incoming.head, count_only=True)
    gw = incoming.gateway
    route = gw.router.resolve(request.model)
    backend = gw.backends[route.backend]
    request, rag_headers = await counted_as_sent(gw.rag, meta, request)
    anthropic.adapt_for_dialect(request, backend.config.kind)
    count = await count_tokens(backend, request, route.upstream_model)
    headers: Headers = [(b"request-id", meta.request_id.encode()), *rag_headers]
    if count.estimated:
        headers.append((b"x-token-count", b"estimate"))
    record_answered(gw, meta, kind="count_tokens", dialect="anthropic", model=request.model, route=route)
    return Reply(anthropic.render_token_count(count.input_tokens, count.fields), headers=headers)
