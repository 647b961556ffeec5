"""The OpenAI surface: /v1/chat/completions and /v1/models."""

from __future__ import annotations

from quart import Blueprint, Response

from proxy.dialects import openai
from proxy.domain.errors import GatewayError
from proxy.http._context import gateway, request_body, request_meta
from proxy.http._exchange import JSON_HEADERS, SSE_HEADERS, AsgiSink, ExchangeBody, Headers
from proxy.infra.backends import Batch

blueprint = Blueprint("openai", __name__)


class OpenAIStreamSink(AsgiSink):
    """SSE to an OpenAI client: the backend's own frames when it speaks OpenAI, else rendered."""

    def __init__(self, send: object, headers: Headers, include_usage: bool | None) -> None:
        super().__init__(send, headers)  # type: ignore[arg-type]
        self._renderer = openai.StreamRenderer(include_usage=include_usage)
        self._ended = False

    async def fail(self, error: GatewayError) -> None:
        await self._error(error, openai.render_error(error))

    async def start(self) -> None:
        await self._start(200, SSE_HEADERS)

    async def write(self, batch: Batch) -> None:
        if batch.raw is not None:
            data = batch.raw
            self._ended = self._ended or batch.done
        else:
            data = self._renderer.render(batch.events)
            self._ended = self._ended or self._renderer.done
        if data:
            await self._body(data)

    async def finish(self) -> None:
        await self._end(b"" if self._ended else self._renderer.close())


class OpenAIJsonSink(AsgiSink):
    async def fail(self, error: GatewayError) -> None:
        await self._error(error, openai.render_error(error))

    async def start(self) -> None:
        await self._start(200, JSON_HEADERS)

    async def write(self, batch: Batch) -> None:
        if batch.raw is not None:
            await self._body(batch.raw)
        elif batch.completion is not None:
            await self._body(openai.render_completion(batch.completion))

    async def finish(self) -> None:
        await self._end()


@blueprint.post("/v1/chat/completions")
async def chat_completions() -> Response:
    request = openai.parse_chat_request(await request_body())
    meta = request_meta()
    exchange = gateway().chat.exchange(request, meta, relay_openai=True)
    headers: Headers = [(b"x-request-id", meta.request_id.encode())]
    if request.stream:
        include_usage = request.include_usage
        return Response(ExchangeBody(exchange, lambda send: OpenAIStreamSink(send, headers, include_usage)))
    return Response(ExchangeBody(exchange, lambda send: OpenAIJsonSink(send, headers)))


@blueprint.get("/v1/models")
async def list_models() -> Response:
    models = await gateway().catalog.models()
    data = [
        {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by or m.backend, "backend": m.backend}
        | ({"alias_of": m.details["alias_of"]} if "alias_of" in m.details else {})
        for m in models
    ]
    return Response(openai.render_model_list(data), content_type="application/json")
