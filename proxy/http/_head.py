"""A request's line and headers, read from its ASGI scope: what the guard and the route
choice need, whichever layer serves the request (the exchange front door or Quart)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.services.auth import current_principal
from proxy.services.chat import RequestMeta, new_trace_id

# Where a request's id lives once chosen: in its ASGI scope, which every layer that serves
# the request (the front door, Quart, the hooks, the response's stamp) sees the same.
_REQUEST_ID = "llm_proxy.request_id"
# A request the gateway sends itself on a key's behalf (a batch's line): the key's id (None:
# no key). In the ASGI scope, which only the process itself can set: no header can claim it.
ON_BEHALF_OF = "llm_proxy.on_behalf_of"
# The name a browser page used for the gateway (its `Origin`'s host and port), when the CORS
# layer let it in as the gateway's own page rather than by `cors_origins`.
PAGE_HOST = "llm_proxy.page_host"


class RequestHead:
    __slots__ = ("_headers", "_scope", "_size", "method", "path", "query")

    def __init__(self, scope: Mapping[str, Any]) -> None:
        self._scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: bytes = scope.get("query_string", b"")
        headers: dict[str, str] = {}
        size = 0
        for name, value in scope["headers"]:
            size += len(name) + len(value) + 4
            # The first of repeated headers counts, as with werkzeug's `Headers.get`.
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        self._headers = headers
        self._size = size

    @property
    def internal(self) -> bool:
        """Whether the gateway sent this request itself (a batch's line): see `on_behalf_of`."""
        return ON_BEHALF_OF in self._scope

    @property
    def on_behalf_of(self) -> int | None:
        return cast(int | None, self._scope.get(ON_BEHALF_OF))

    @property
    def page_host(self) -> str | None:
        """See `PAGE_HOST`."""
        return cast(str | None, self._scope.get(PAGE_HOST))

    def header(self, name: str) -> str | None:
        """The header `name` (lower case), or None."""
        return self._headers.get(name)

    def header_list(self, name: str) -> str | None:
        """Every `name` header (lower case) joined with ", ", as repeated lines of a list
        header mean (RFC 9110 §5.3); None without one."""
        key = name.encode("latin-1")
        values = [value.decode("latin-1") for found, value in self._scope["headers"] if found.lower() == key]
        return ", ".join(values) if values else None

    @property
    def header_bytes(self) -> int:
        """The size of the headers as sent, about: names, values and separators."""
        return self._size

    def request_id(self, minted: str | None = None) -> str:
        """The request's id, which its response carries as `x-request-id`: the client's
        `x-request-id` if usable, else `minted` (or a new id); chosen once per request."""
        chosen = self._scope.get(_REQUEST_ID)
        if chosen is None:
            chosen = _clean_id(self.header("x-request-id")) or minted or new_trace_id()
            cast(dict[str, Any], self._scope)[_REQUEST_ID] = chosen
        return cast(str, chosen)


def _clean_id(value: str | None) -> str | None:
    if value and len(value) <= 200 and value.isascii() and value.isprintable():
        return value
    return None


# Stripe's limit; a key the gateway cannot use is refused rather than ignored (which would
# run the request twice).
_KEY_LIMIT = 255


def _idempotency_key(value: str | None) -> str | None:
    if not value:
        return None
    if len(value) <= _KEY_LIMIT and value.isascii() and value.isprintable():
        return value
    raise GatewayError(
        ErrorKind.INVALID_REQUEST,
        f"The `Idempotency-Key` header must be at most {_KEY_LIMIT} printable ASCII characters.",
        param="Idempotency-Key", code="invalid_idempotency_key",
    )


def current_tenant() -> str | None:
    """Who asks, for per-tenant caches and resume: the admitted key as `key-<id>`."""
    principal = current_principal.get()
    return None if principal is None else f"key-{principal.id}"


def request_meta(head: RequestHead) -> RequestMeta:
    """Ids and route choice from the request's headers.

    `x-route: direct|rag|workflow` picks the route explicitly; `x-workspace: WS` implies RAG
    and `x-pipeline: NAME` implies a workflow. `Idempotency-Key` names the request.
    """
    trace_id = new_trace_id()
    header = head.header
    workspace = header("x-workspace") or None
    pipeline = header("x-pipeline") or None
    route = (header("x-route") or "").strip().lower()
    if not route:
        route = "workflow" if pipeline else "rag" if workspace else "direct"
    return RequestMeta(
        trace_id=trace_id,
        request_id=head.request_id(trace_id),
        correlation_id=_clean_id(header("x-correlation-id")),
        route=route,
        workspace=workspace,
        pipeline=pipeline,
        idempotency_key=_idempotency_key(header("idempotency-key")),
        tenant=current_tenant(),
        cache=(header("x-cache") or "").strip().lower() or None,
    )


def refuse_routes(meta: RequestMeta, path: str, goes: str) -> None:
    """A RAG workspace or a pipeline shapes a chat: asked of a call that does not go through
    them (`goes`: where it does go), the client would get the model's plain answer and take
    it for the route's. A 400 naming the header instead."""
    if meta.route == "direct":
        return
    header = "x-pipeline" if meta.pipeline else "x-workspace" if meta.workspace else "x-route"
    raise invalid_request(
        f"`{header}` routes chats (`/v1/chat/completions`, `/v1/messages`, `/api/chat`, ...); `{path}` {goes}.",
        param=header,
    )
