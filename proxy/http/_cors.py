"""CORS: which browser pages may call the gateway, applied before anything else runs.

A request without `Origin` (SDKs, curl, servers) passes untouched, at the cost of one header
lookup. A browser's preflight is answered here, before the guard (it carries no key and must
never get 401). A page served under the gateway's own address (behind a reverse proxy that
serves the app and the gateway under one name) is not cross-origin, whatever `cors_origins`
says. Any other request from an origin outside `cors_origins` is refused 403 in the
path's dialect before a route runs: a page the user visits must not drive the gateway with a
"simple" request (a text/plain POST needs no preflight), whatever auth says. An allowed
origin's responses get their `Access-Control-*` headers once, on the response's head.
Credentials are bearer keys, never cookies: no `Access-Control-Allow-Credentials`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

from hypercorn.typing import ASGISendCallable

from proxy.config import OriginParts, parse_origin_pattern
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.http._errors import dialect_of, error_reply
from proxy.http._front import ResponseSend
from proxy.http._head import PAGE_HOST, RequestHead

log = logging.getLogger("llm_proxy.http")

Headers = list[tuple[bytes, bytes]]

ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE"  # PATCH: /v1/keys/{id} from an admin page
MAX_AGE = b"7200"  # Chromium's ceiling; Firefox would keep a day
# What browser code may read of a response beyond the CORS-safelisted headers: every header
# the gateway sets itself (ids, rate limits, cache and replay, RAG, workflow, embeddings).
EXPOSED_HEADERS = b", ".join(
    (
        b"x-request-id", b"request-id", b"x-trace-id", b"retry-after", b"retry-after-ms", b"x-should-retry",
        b"openai-processing-ms",  # an OpenAI-compatible backend's, passed on to OpenAI clients
        # A created key's (201) address, a 405's methods, a 401's scheme.
        b"location", b"allow", b"www-authenticate",
        b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests",
        b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens",
        b"x-cache", b"x-replay-of", b"x-attached-to", b"idempotent-replayed",
        b"x-rag-workspace", b"x-rag-sources", b"x-rag-context", b"x-pipeline", b"x-workflow-winner", b"x-fallback-model",
        b"x-embedding-backend", b"x-embeddings-truncated", b"x-token-count", b"x-upstream-request-id",
        b"x-unavailable-backends",
        # An Anthropic backend's, passed on to Anthropic clients.
        *(
            b"anthropic-ratelimit-%s-%s" % (what, field)
            for what in (b"requests", b"tokens", b"input-tokens", b"output-tokens")
            for field in (b"limit", b"remaining", b"reset")
        ),
    )
)
_PREFLIGHT_VARY = b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers, Access-Control-Request-Private-Network"


def origin_of(scope: Mapping[str, Any]) -> bytes | None:
    """The request's `Origin` header, or None (the common case: no object is made for it)."""
    for name, value in scope["headers"]:
        if name == b"origin":
            return value  # type: ignore[no-any-return]
    return None


class OriginPolicy:
    """Which origins `cors_origins` allows (entries validated by `proxy.config.cors_origins`)."""

    __slots__ = ("_any", "_exact", "_patterns")

    def __init__(self, entries: Iterable[str]) -> None:
        entries = tuple(entries)
        self._any = "*" in entries
        self._exact = frozenset(entry for entry in entries if "*" not in entry)
        self._patterns: list[OriginParts] = []
        for entry in entries:
            if "*" in entry and entry != "*":
                parts = parse_origin_pattern(entry)
                if parts is None:
                    raise ValueError(f"not an origin pattern: {entry!r}")
                self._patterns.append(parts)

    def allows(self, origin: str) -> bool:
        if self._any:
            return True
        origin = origin.lower()
        if origin in self._exact:
            return True
        if not self._patterns or "*" in origin:
            return False
        parts = parse_origin_pattern(origin)
        if parts is None:
            return False  # `null`, or not an origin at all
        scheme, host, port = parts
        for p_scheme, p_host, p_port in self._patterns:
            if p_scheme != scheme:
                continue
            if p_host == "*":
                return True
            if p_host.startswith("*."):
                if not host.endswith(p_host[1:]):
                    continue
            elif p_host != host:
                continue
            if p_port == "*" or p_port == port:
                return True
        return False


# A refused origin's log line: its first refusal, then at most one a minute (a page that polls
# the gateway in a loop must not flood the log), for this many origins at once.
REFUSAL_LOG_INTERVAL = 60.0
REFUSAL_LOG_ORIGINS = 256


class RefusalLog:
    """Logs refusals of an origin sparingly: what it remembers is bounded, whatever origins come."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, int]] = {}  # origin -> (last logged, refusals unlogged since)

    def refused(self, origin: str, method: str, path: str) -> None:
        now = time.monotonic()
        last = self._seen.get(origin)
        if last is not None and now - last[0] < REFUSAL_LOG_INTERVAL:
            self._seen[origin] = (last[0], last[1] + 1)
            return
        if last is None and len(self._seen) >= REFUSAL_LOG_ORIGINS:
            # The oldest entries first (insertion order); a forgotten origin is logged once more.
            for stale in list(self._seen)[: REFUSAL_LOG_ORIGINS // 4]:
                del self._seen[stale]
        self._seen.pop(origin, None)
        self._seen[origin] = (now, 0)
        more = f" ({last[1]} more refused since)" if last is not None and last[1] else ""
        log.info("refused %s %s from origin %r (not in cors_origins)%s; logged at most once a minute per origin",
                 method, path, origin, more)


class Cors:
    """The CORS layer of the ASGI app: `admit` for each request that carries an `Origin`."""

    __slots__ = ("policy", "refusals")

    def __init__(self, origins: Iterable[str]) -> None:
        self.policy = OriginPolicy(origins)
        self.refusals = RefusalLog()

    async def admit(self, origin: bytes, scope: Mapping[str, Any], send: ASGISendCallable) -> ASGISendCallable | None:
        """The `send` the request goes on with (adding the CORS headers), or None when this
        layer has answered it: a preflight, or a refused origin."""
        text = origin.decode("latin-1")
        headers = _header_map(scope)
        allowed = self.policy.allows(text)
        if not allowed and (page := _same_origin(text, headers)) is not None:
            allowed = True
            # Whether that name may be served is the guard's `Host` rule (a rebound name's
            # page is same-origin too, and behind a proxy that rewrites `Host` only its
            # `Origin` says the name).
            cast(dict[str, Any], scope)[PAGE_HOST] = page
        preflight = scope["method"] == "OPTIONS" and b"access-control-request-method" in headers
        if not allowed:
            self.refusals.refused(text, scope["method"], scope["path"])
            await _refuse(text, scope, headers, send)
            return None
        if preflight:
            await _preflight(origin, headers, send)
            return None
        return _WithCors(send, [(b"access-control-allow-origin", origin), (b"vary", b"Origin"),
                                (b"access-control-expose-headers", EXPOSED_HEADERS)])


def _same_origin(origin: str, headers: Mapping[bytes, bytes]) -> str | None:
    """The page's host (and port) when it is the gateway's own origin, else None: browsers
    send `Origin` on a same-origin POST too, which must not be refused as a stranger's page.
    The browser says so itself (`Sec-Fetch-Site`, which no page can set: right behind any
    proxy), or `origin` names the address the request was sent to (`Host`, or the
    `X-Forwarded-Host` a reverse proxy passes), either scheme, as Ollama's CORS layer (Go's
    `CrossOriginProtection` does both). A DNS-rebinding page is same-origin too, and may
    set `X-Forwarded-Host` itself: the guard holds the host returned to its `Host` rule."""
    _, sep, authority = origin.lower().partition("://")
    if not sep or not authority:
        return None  # `null` (a sandboxed frame, a file:// page): only `*` allows it
    if headers.get(b"sec-fetch-site") == b"same-origin":
        return authority
    for name in (b"host", b"x-forwarded-host"):
        value = headers.get(name)
        # A proxy chain's first entry is the name the browser used.
        if value is not None and value.decode("latin-1").partition(",")[0].strip().lower() == authority:
            return authority
    return None


def _header_map(scope: Mapping[str, Any]) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in headers:
            if name == b"access-control-request-headers":  # a list header, maybe on several lines
                headers[name] += b", " + value
        else:
            headers[name] = value
    return headers


async def _preflight(origin: bytes, headers: dict[bytes, bytes], send: ASGISendCallable) -> None:
    reply: Headers = [
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-methods", ALLOWED_METHODS),
        (b"access-control-max-age", MAX_AGE),
        (b"vary", _PREFLIGHT_VARY),
        # No `Content-Length` on a 204 (RFC 9110 §8.6): Envoy (Istio, Contour, Envoy Gateway)
        # answers such a response 502, and every preflight through it with it.
    ]
    requested = headers.get(b"access-control-request-headers")
    if requested:
        # Any header may come along: keys, SDK telemetry (x-stainless-*), anthropic-*,
        # idempotency-key, the gateway's own x-route/x-workspace/... What they may do is the
        # guard's business, not the preflight's.
        reply.append((b"access-control-allow-headers", requested))
    if headers.get(b"access-control-request-private-network", b"").lower() == b"true":
        # Chromium's Private Network Access: a public page calling this (private) address.
        reply.append((b"access-control-allow-private-network", b"true"))
    await send({"type": "http.response.start", "status": 204, "headers": reply})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _refuse(origin: str, scope: Mapping[str, Any], headers: dict[bytes, bytes], send: ASGISendCallable) -> None:
    error = GatewayError(
        ErrorKind.PERMISSION,
        f"Origin {origin} may not call this gateway: add it to `cors_origins` (LLM_PROXY_CORS_ORIGINS) to allow it.",
        code="origin_not_allowed",
    )
    anthropic_version = headers.get(b"anthropic-version")
    dialect = dialect_of(scope["path"], None if anthropic_version is None else anthropic_version.decode("latin-1"))
    head = RequestHead(scope)
    # Its id, in the head and (Anthropic's) body, as every other refusal has it.
    send = ResponseSend(send, scope, head)
    reply = error_reply(error, dialect, head.request_id())
    # A cache in front must not give this refusal to the pages that are allowed.
    reply.headers.append((b"vary", b"Origin"))
    if headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers:
        # The body is left unread: the connection cannot carry another request.
        reply.headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": reply.status, "headers": reply.asgi_headers()})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


class _WithCors:
    """`send` that adds the CORS headers to the response's head (streamed bodies pass as they are)."""

    __slots__ = ("_headers", "_send")

    def __init__(self, send: ASGISendCallable, headers: Headers) -> None:
        self._send = send
        self._headers = headers

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *self._headers]
        await self._send(message)
