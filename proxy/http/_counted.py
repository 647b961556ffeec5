"""Calls the gateway answers that are no model call of their key — counting tokens
(`/v1/messages/count_tokens`, `/v1/responses/input_tokens`), Ollama's preload and unload —
still get their request-log line and their `llm_proxy_requests_total` sample, under a
`kind` of their own, so an operator sees them (Claude Code counts tokens constantly). Their
refusals are the front door's (`_front._refuse`), logged under the route's `kind`."""

from __future__ import annotations

import time

from proxy.domain.routing import Route
from proxy.gateway import Gateway
from proxy.services.auth import current_principal
from proxy.services.chat import ExchangeRecord, RequestMeta


def record_answered(gateway: Gateway, meta: RequestMeta, *, kind: str, dialect: str, model: str, route: Route) -> None:
    """Its line and its metrics, not its key's usage (nothing was generated)."""
    principal = current_principal.get()
    gateway.chat.record_unmetered(ExchangeRecord(
        trace_id=meta.trace_id, request_id=meta.request_id, model=model, backend=route.backend,
        upstream_model=route.upstream_model, stream=False, dialect=dialect, status=200,
        total_ms=(time.perf_counter() - meta.received) * 1000,
        api_key_id=principal.id if principal is not None else None, kind=kind,
    ))
