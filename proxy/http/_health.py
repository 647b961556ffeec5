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
    body: dict[str, object] = {"status": "ok" if not failing else "unavailable", "checks": states}
    if failing:
        body["reason"] = "; ".join(f"{name}: {state}" for name, state in failing.items())
    # A replica set aside does not make its backend unready while another serves: shown, not failed.
    replicas = {
        name: {
            replica.url: f"set aside for {replica.set_aside_for:.1f}s ({replica.reason})" if replica.set_aside_for else "ok"
            for replica in backend.replicas()
        }
        for name, backend in gateway().backends.items()
        if len(backend.replicas()) > 1
    }
    if replicas:
        body["replicas"] = replicas
    return Response(json.dumps(body), status=200 if not failing else 503, content_type="application/json")


@blueprint.get("/metrics")
async def metrics() -> Response:
    """Prometheus's text format (see `proxy.infra.metrics`)."""
    serving = gateway()
    await serving.catalog.models()  # names a backend listed since: known, so labelled from now on
    body = serving.metrics.render() if serving.metrics is not None else b""
    return Response(body, content_type=CONTENT_TYPE)
