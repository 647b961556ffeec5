"""Liveness, readiness and metrics."""

from __future__ import annotations

import json

import httpx
from quart import Blueprint, Response

from proxy.domain.errors import GatewayError
from proxy.http._auth import credentials
from proxy.http._context import gateway, request_head
from proxy.infra.backends import ReplicaState
from proxy.infra.metrics import CONTENT_TYPE

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
async def health() -> Response:
    return Response(b'{"status":"ok"}', content_type="application/json")


@blueprint.get("/ready")
async def ready() -> Response:
    states = await gateway().readiness()
    failing = {name: state for name, state in states.items() if state != "ok" and not state.startswith("ok (")}
    body: dict[str, object] = {"status": "ok" if not failing else "unavailable", "checks": states}
    if failing:
        body["reason"] = "; ".join(f"{name}: {state}" for name, state in failing.items())
    # A replica set aside does not make its backend unready while another serves: shown, not failed.
    trusted = _may_see_addresses()
    replicas = {
        name: {
            (replica.url if trusted else str(number)): _replica_state(number, replica, trusted)
            for number, replica in enumerate(backend.replicas(), start=1)
        }
        for name, backend in gateway().backends.items()
        if len(backend.replicas()) > 1
    }
    if replicas:
        body["replicas"] = replicas
    return Response(json.dumps(body), status=200 if not failing else 503, content_type="application/json")


def _may_see_addresses() -> bool:
    """`/ready` is public by default: who may read it without a key is not told where the
    backends live (as no error tells it). A caller with a valid key (or any caller, when keys
    are off), who may read `/metrics` too, is told each replica's URL."""
    authenticator = gateway().auth
    if authenticator is None or authenticator.enabled() is False:
        return True
    presented = credentials(request_head())
    if not presented:
        return False
    try:
        authenticator.authenticate(presented)
    except GatewayError:
        return False
    return True


def _replica_state(number: int, replica: ReplicaState, trusted: bool) -> str:
    """A replica's state; for a caller not `trusted`, its address in the reason (a connection
    error's) is its place in `base_url` instead."""
    if not replica.set_aside_for:
        return "ok"
    reason = replica.reason
    if not trusted:
        url = httpx.URL(replica.url)
        for address in (replica.url, url.netloc.decode(), url.host):
            if address:
                reason = reason.replace(address, f"replica {number}")
    return f"set aside for {replica.set_aside_for:.1f}s ({reason})"


@blueprint.get("/metrics")
async def metrics() -> Response:
    """Prometheus's text format (see `proxy.infra.metrics`)."""
    serving = gateway()
    await serving.catalog.models()  # names a backend listed since: known, so labelled from now on
    if serving.metrics is not None:
        serving.metrics.learnt()  # the records held until the backends were listed count in this scrape
    body = serving.metrics.render() if serving.metrics is not None else b""
    return Response(body, content_type=CONTENT_TYPE)
