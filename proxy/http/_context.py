"""Per-request context the handlers share: the gateway, ids, the body."""

from __future__ import annotations

from typing import cast

from quart import current_app, request
from quart_trio import QuartTrio

from proxy.gateway import Gateway
from proxy.services.auth import current_principal
from proxy.services.chat import RequestMeta, new_trace_id


class GatewayApp(QuartTrio):
    gateway: Gateway


def gateway() -> Gateway:
    return cast(GatewayApp, current_app).gateway


def _clean_id(value: str | None) -> str | None:
    if value and len(value) <= 200 and value.isascii() and value.isprintable():
        return value
    return None


def _tenant() -> str | None:
    principal = current_principal.get()
    return None if principal is None else f"key-{principal.id}"


def request_meta() -> RequestMeta:
    """Ids and route choice from the request's headers.

    `x-route: direct|rag|workflow` picks the route explicitly; `x-workspace: WS` implies RAG
    and `x-pipeline: NAME` implies a workflow. `Idempotency-Key` names the request.
    """
    trace_id = new_trace_id()
    headers = request.headers
    workspace = headers.get("x-workspace") or None
    pipeline = headers.get("x-pipeline") or None
    route = (headers.get("x-route") or "").strip().lower()
    if not route:
        route = "workflow" if pipeline else "rag" if workspace else "direct"
    return RequestMeta(
        trace_id=trace_id,
        request_id=_clean_id(headers.get("x-request-id")) or trace_id,
        correlation_id=_clean_id(headers.get("x-correlation-id")),
        route=route,
        workspace=workspace,
        pipeline=pipeline,
        idempotency_key=_clean_id(headers.get("idempotency-key")),
        tenant=_tenant(),
        cache=(headers.get("x-cache") or "").strip().lower() or None,
    )


async def request_body() -> bytes:
    """The request body; werkzeug raises 413 past MAX_CONTENT_LENGTH."""
    return cast(bytes, await request.get_data(cache=False, as_text=False))
