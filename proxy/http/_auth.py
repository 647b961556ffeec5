"""The guard in front of every route: header limits, API keys, workspace scopes, rate limits.

One `before_request` hook runs for every request, whatever route it matches (an unknown path
too, so a caller without a key learns nothing about which paths exist). `/health` and the
configured public paths pass without a key. A wrong or missing key is a 401 in the caller's
dialect with `WWW-Authenticate`; anything outside the key's scope a 403; an exhausted limit a
429 with `Retry-After`. The `after_request` hook puts the `x-ratelimit-*` headers on the
answer and the key's id on the exchange's record (for usage accounting and the request log).
"""

from __future__ import annotations

import contextvars

from quart import Response, request

from proxy.domain.errors import ErrorKind, GatewayError
from proxy.http._context import GatewayApp, gateway
from proxy.http._errors import error_response
from proxy.http._exchange import ExchangeBody
from proxy.services.auth import Principal, check_workspace, current_principal
from proxy.services.limits import Decision

_WORKSPACES = "/v1/workspaces"
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_READ_POSTS = ("/search",)  # POSTs under a workspace that only read it
_decision: contextvars.ContextVar[Decision | None] = contextvars.ContextVar("llm_proxy_rate_decision", default=None)


def credentials() -> list[str]:
    """The keys the request presents: `Authorization: Bearer KEY`, then `x-api-key: KEY`."""
    found: list[str] = []
    authorization = request.headers.get("authorization", "")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        found.append(value.strip())
    api_key = request.headers.get("x-api-key", "").strip()
    if api_key and api_key not in found:
        found.append(api_key)
    return found


def _header_bytes() -> int:
    return sum(len(name) + len(value) + 4 for name, value in request.headers.items())


def _unauthorized(error: GatewayError, presented: bool) -> Response:
    response = error_response(error)
    if error.kind is ErrorKind.AUTHENTICATION:
        challenge = 'Bearer realm="llm-proxy"'
        if presented:
            challenge += ', error="invalid_token"'
        response.headers["www-authenticate"] = challenge
    return response


def request_workspaces() -> list[str]:
    """Every workspace a request names: `x-workspace`, and the `{ws}` of a
    `/v1/workspaces/{ws}/...` path (both are checked: one must not vouch for the other)."""
    named: list[str] = []
    header = request.headers.get("x-workspace")
    if header:
        named.append(header)
    path = request.path
    if path.startswith(_WORKSPACES + "/"):
        args = request.view_args or {}
        in_path = args.get("workspace", args.get("ws")) or path[len(_WORKSPACES) + 1 :].split("/", 1)[0]
        if in_path:
            named.append(str(in_path))
    return named


def _check_scopes(principal: Principal) -> None:
    """Workspaces: the one named must be in the key's scope (changing its documents needs an
    admin key); the bare collection (listing, or creating a workspace named in the body) needs
    a key not limited to some workspaces."""
    path = request.path
    in_workspaces = path == _WORKSPACES or path.startswith(_WORKSPACES + "/")
    manage = in_workspaces and request.method not in _READS and not path.endswith(_READ_POSTS)
    workspaces = request_workspaces()
    for workspace in workspaces:
        check_workspace(workspace, manage=manage)
    if path == _WORKSPACES:
        if principal.workspaces is not None:
            raise GatewayError(
                ErrorKind.PERMISSION,
                "This API key is limited to some workspaces; it may not list or create workspaces.",
                code="workspace_not_allowed",
            )
        if manage and not principal.admin:
            check_workspace("*", manage=True)
    elif not workspaces and principal.workspaces is not None and (request.headers.get("x-route") or "").strip().lower() == "rag":
        raise GatewayError(
            ErrorKind.PERMISSION,
            "This API key is limited to some workspaces: name one with `x-workspace`.",
            param="x-workspace",
            code="workspace_not_allowed",
        )


def install_auth(app: GatewayApp) -> None:
    @app.before_request
    async def guard() -> Response | None:
        current_principal.set(None)
        _decision.set(None)
        gw = gateway()
        limit = gw.settings.max_header_bytes
        if _header_bytes() > limit:
            response = error_response(
                GatewayError(
                    ErrorKind.INVALID_REQUEST,
                    f"The request's headers are too large (more than {limit} bytes).",
                    code="headers_too_large",
                )
            )
            response.status_code = 431
            return response
        authenticator = gw.auth
        path = request.path
        if authenticator is None or path == "/health" or path in gw.settings.auth_public_paths:
            return None
        presented = credentials()
        try:
            principal = authenticator.authenticate(presented)
        except GatewayError as error:
            return _unauthorized(error, bool(presented))
        if principal is None:
            return None
        current_principal.set(principal)
        _check_scopes(principal)
        limiter = gw.limits
        if limiter is not None and principal.limited and request.method not in _READS:
            decision = await limiter.admit(principal)
            _decision.set(decision)
            if not decision.allowed:
                response = error_response(decision.error(principal))
                response.headers.extend(decision.headers)
                return response
        return None

    @app.after_request
    async def stamp(response: Response) -> Response:
        principal = current_principal.get()
        if principal is None:
            return response
        decision = _decision.get()
        body = response.response
        if isinstance(body, ExchangeBody):
            # The exchange writes its own head; its record feeds the usage hook and the log.
            exchange = body.exchange
            exchange.record.api_key_id = principal.id
            if exchange.meta.idempotency_key is not None:
                # A client names its own requests: another key's same name must not replay
                # (or, with another body, reveal) this key's answer.
                exchange.meta.idempotency_key = f"key-{principal.id}:{exchange.meta.idempotency_key}"
            if decision is not None and decision.allowed:
                exchange.response_headers.extend((k.encode(), v.encode()) for k, v in decision.headers)
        elif decision is not None and decision.allowed:
            response.headers.extend(decision.headers)
        return response
