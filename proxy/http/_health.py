"""Liveness, readiness and metrics."""

from __future__ import annotations

import json

from quart import Blueprint, Response

from proxy.http._context import gateway
from proxy.infra.metrics import CONTENT_TYPE

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
async def health() -> Response:
    return Response(b'{"status":"ok"}', content_type="application/json")


@blueprint.get("/ready")
async def ready() -> Response:
    states = await gateway().readiness()
    failing = {name: state for name, state in states.items() if state != "ok"}
    body = {"status": "ok" if not failing else "unavailable", "checks": states}
    if failing:
        body["reason"] = "; ".join(f"{name}: {state}" for name, state in failing.items())
    return Response(json.dumps(body), status=200 if not failing else 503, content_type="application/json")


@blueprint.get("/metrics")
async def metrics() -> Response:
    """Prometheus's text format (see `proxy.infra.metrics`)."""
    counted = gateway().metrics
    body = counted.render() if counted is not None else b""
    return Response(body, content_type=CONTENT_TYPE)
