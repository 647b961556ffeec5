"""The OpenAI Responses surface: `POST /v1/responses`, translated to a chat exchange.

Any backend answers it (OpenAI-compatible, Ollama, Anthropic, the RAG and workflow routes),
with everything an exchange brings (idempotency, caches, the journal, limits, metrics). The
gateway stores no responses: the paths that read one back are 404s saying so.
"""

from __future__ import annotations

import time
from typing import Any

from hypercorn.typing import ASGISendCallable
from quart import Blueprint, Response

from proxy.dialects import openai, responses
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import CompletionBuilder
from proxy.http._errors import register_dialect_errors
from proxy.http._exchange import SSE_HEADERS, ExchangeBody, Headers, JsonSink, RenderedStreamSink
from proxy.http._front import FrontDoor, Incoming
from proxy.http._head import request_meta
from proxy.infra.backends import Batch

exchanges = FrontDoor()
blueprint = Blueprint("responses", __name__)

# Errors in OpenAI's shape, as on every OpenAI path; the registration names the dialect, so a
# request refused before its exchange is logged and counted as this surface's too.
register_dialect_errors(responses.DIALECT, ("/v1/responses",), openai.render_error)


class ResponsesJsonSink(JsonSink):
    dialect = responses.DIALECT

    def __init__(
        self, send: ASGISendCallable, headers: Headers, *, response: str, model: str, settings: dict[str, Any],
        created_at: int,
    ) -> None:
        super().__init__(send, headers)
        self._response = response
        self._model = model
        self._settings = settings
        self._created_at = created_at

    async def write(self, batch: Batch) -> None:
        completion = batch.completion
        if completion is None:
            builder = CompletionBuilder()
            for event in batch.events:
                builder.add(event)
            completion = builder.build()
        await self._json(
            responses.render_response(
                completion, response=self._response, model=self._model, settings=self._settings,
                created_at=self._created_at, completed_at=int(time.time()),
            )
        )


@exchanges.route("/v1/responses")
async def create_response(incoming: Incoming) -> ExchangeBody:
    parsed = responses.parse_responses_request(incoming.body)
    request = parsed.chat
    meta = request_meta(incoming.head)
    exchange = incoming.gateway.chat.exchange(request, meta, relay_openai=False)
    headers: Headers = [(b"x-request-id", meta.request_id.encode())]
    response = responses.response_id(meta.trace_id)
    model, settings = request.model, parsed.settings
    if request.stream:
        return ExchangeBody(exchange, lambda send: RenderedStreamSink(
            send, headers, responses.StreamRenderer(response=response, model=model, settings=settings),
            content_headers=SSE_HEADERS, dialect=responses.DIALECT,
        ))
    created_at = int(time.time())
    return ExchangeBody(exchange, lambda send: ResponsesJsonSink(
        send, headers, response=response, model=model, settings=settings, created_at=created_at,
    ))


def _not_stored(response_id: str) -> GatewayError:
    return GatewayError(
        ErrorKind.NOT_FOUND,
        f"Response with id '{response_id}' not found: this gateway does not store responses "
        "(send the whole conversation in `input` of each request).",
        param="response_id", code="response_not_found",
    )


@blueprint.route("/v1/responses/<response_id>", methods=["GET", "DELETE"])
async def stored_response(response_id: str) -> Response:
    raise _not_stored(response_id)


@blueprint.post("/v1/responses/<response_id>/cancel")
async def cancel_response(response_id: str) -> Response:
    raise _not_stored(response_id)


@blueprint.get("/v1/responses/<response_id>/input_items")
async def response_input_items(response_id: str) -> Response:
    raise _not_stored(response_id)
