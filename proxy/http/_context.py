"""Per-request context the handlers share: the gateway, ids, the body."""

from __future__ import annotations

from typing import cast

from quart import current_app, request
from quart_trio import QuartTrio

from proxy.gateway import Gateway
from proxy.services.chat import RequestMeta, new_trace_id


class GatewayApp(QuartTrio):
    gateway: Gateway


def gateway() -> Gateway:
    return cast(GatewayApp, current_app).gateway


def _clean_id(value: str | None) -> str | None:
    if value and len(value) <= 200 and value.isascii() and value.isprintable():
        return value
    return None


def request_meta() -> RequestMeta:
    trace_id = new_trace_id()
    headers = request.headers
    return RequestMeta(
        trace_id=trace_id,
        request_id=_clean_id(headers.get("x-request-id")) or trace_id,
        correlation_id=_clean_id(headers.get("x-correlation-id")),
    )


async def request_body() -> bytes:
    """The request body; werkzeug raises 413 past MAX_CONTENT_LENGTH."""
    return cast(bytes, await request.get_data(cache=False, as_text=False))
