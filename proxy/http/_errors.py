"""Errors in the caller's dialect, whatever raised them (our code, Quart, werkzeug)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from quart import Quart, Response, current_app, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from proxy.dialects import openai
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.http._body_coding import too_large
from proxy.http._head import RequestHead
from proxy.infra.postgres import DatabaseUnavailable, InvalidValue

log = logging.getLogger("llm_proxy.http")

# dialect name -> (render error body, content type)
ErrorRenderer = Callable[[GatewayError], bytes]
IdentifiedErrorRenderer = Callable[[GatewayError, str | None], bytes]  # the body names the request's id
_RENDERERS: dict[str, tuple[ErrorRenderer, str]] = {"openai": (openai.render_error, "application/json")}
_IDENTIFIED: dict[str, IdentifiedErrorRenderer] = {}
_PREFIXES: list[tuple[str, str]] = []


def register_dialect_errors(
    dialect: str, path_prefixes: tuple[str, ...], render: ErrorRenderer, content_type: str = "application/json",
    *, identified: IdentifiedErrorRenderer | None = None,
) -> None:
    """Paths under `path_prefixes` answer errors in `dialect`'s shape (OpenAI's otherwise);
    `identified` renders one whose body carries the request's id (Anthropic's `request_id`)."""
    _RENDERERS[dialect] = (render, content_type)
    if identified is not None:
        _IDENTIFIED[dialect] = identified
    _PREFIXES.extend((prefix, dialect) for prefix in path_prefixes)
    _PREFIXES.sort(key=lambda item: -len(item[0]))


def dialect_of_path(path: str) -> str:
    for prefix, dialect in _PREFIXES:
        if path.startswith(prefix):
            return dialect
    return "openai"


Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Reply:
    """A response known in full, framework-free: what the guard refuses with, and what the
    exchange front door sends whole."""

    body: bytes
    content_type: bytes = b"application/json"
    status: int = 200
    headers: Headers = field(default_factory=list)

    def asgi_headers(self) -> Headers:
        return [(b"content-type", self.content_type), (b"content-length", b"%d" % len(self.body)), *self.headers]


# A backend refusing the gateway's own credentials (or its account: 402, out of credit; or
# how it is called: a method, a proxy's auth, a length, an upgrade it wants): no retry helps
# until the gateway's set-up is mended, and the OpenAI and Anthropic SDKs would retry the 502
# (they obey `x-should-retry`). A workflow job whose every run ended with its worker's death:
# resent, it would most likely kill as many workers again (and the other jobs they ran).
_HOPELESS = frozenset({
    "backend_401", "backend_402", "backend_403", "backend_405", "backend_407", "backend_411", "backend_426",
    "workflow_retries_exhausted",
})


def error_reply(error: GatewayError, dialect: str, request_id: str | None = None) -> Reply:
    """`error` in `dialect`'s shape; `request_id` (the response's `request-id`) goes in the
    body too where the dialect's errors carry it."""
    render, content_type = _RENDERERS[dialect]
    identified = _IDENTIFIED.get(dialect) if request_id else None
    body = identified(error, request_id) if identified is not None else render(error)
    reply = Reply(body, content_type.encode(), error.status)
    if error.retry_after is not None:
        reply.headers.append((b"retry-after", str(max(1, round(error.retry_after))).encode()))
    if error.hopeless or error.code in _HOPELESS:
        reply.headers.append((b"x-should-retry", b"false"))
    return reply


def response_of(reply: Reply) -> Response:
    response = Response(reply.body, status=reply.status, content_type=reply.content_type.decode())
    for name, value in reply.headers:
        response.headers.add(name.decode("latin-1"), value.decode("latin-1"))
    return response


# Paths both OpenAI's and Anthropic's APIs have: Anthropic's clients, which always send
# `anthropic-version`, get their errors in Anthropic's shape there.
_SHARED_PATHS = "/v1/models"


def dialect_of(path: str, anthropic_version: str | None) -> str:
    """Whose error shape a request gets: its path's, or Anthropic's on the shared paths
    for a client that sends `anthropic-version`."""
    if anthropic_version is not None and path.startswith(_SHARED_PATHS):
        return "anthropic"
    return dialect_of_path(path)


def _dialect_of_request() -> str:
    return dialect_of(request.path, request.headers.get("anthropic-version"))


def error_response(error: GatewayError, dialect: str | None = None) -> Response:
    # The id is the one `ResponseSend` stamps on the head (chosen once, kept in the scope).
    return response_of(error_reply(error, dialect or _dialect_of_request(), RequestHead(request.scope).request_id()))


_HTTP_KINDS = {
    400: ErrorKind.INVALID_REQUEST,
    404: ErrorKind.NOT_FOUND,
    405: ErrorKind.METHOD_NOT_ALLOWED,
    408: ErrorKind.REQUEST_TIMEOUT,
    413: ErrorKind.REQUEST_TOO_LARGE,
    415: ErrorKind.UNSUPPORTED_MEDIA_TYPE,
}


def _closing(response: Response) -> None:
    """A response to a request whose body was left unread (refused, or timed out half-way):
    the connection cannot carry another request, and the client is told so, or it would
    send its next one into a connection the server is closing (left open, hypercorn would
    leave it unanswered)."""
    response.headers["connection"] = "close"


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(GatewayError)
    async def gateway_error(error: GatewayError) -> Response:
        response = error_response(error)
        if error.status == 408:
            _closing(response)
        return response

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        kind = _HTTP_KINDS.get(status, ErrorKind.INVALID_REQUEST if status < 500 else ErrorKind.INTERNAL)
        if status == 404:
            message = f"Unknown endpoint: {request.method} {request.path}"
        elif status == 405:
            message = f"Method {request.method} is not allowed on {request.path}"
        elif status == 413:
            limit = request.max_content_length  # a file upload's own, or `max_body_bytes`
            message = too_large(int(limit if limit is not None else current_app.config["MAX_CONTENT_LENGTH"])).message
        else:
            message = error.description or error.name
        response = error_response(GatewayError(kind, message, code="request_too_large" if status == 413 else None))
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            response.headers["allow"] = ", ".join(sorted(error.valid_methods))  # RFC 9110 §15.5.6
        if status in (408, 413):
            _closing(response)
        return response

    @app.errorhandler(DatabaseUnavailable)
    async def database_down(error: DatabaseUnavailable) -> Response:
        # A route that asked PostgreSQL just as it went away (its pooled connection cut, no
        # other to be had): the outage every route reports once it knows, not a bug.
        log.warning("database unavailable on %s %s: %s", request.method, request.path, error)
        return error_response(GatewayError(
            ErrorKind.UNAVAILABLE, "The database (PostgreSQL) is unavailable; try again shortly.",
            code="database_unavailable", retry_after=2,
        ))

    @app.errorhandler(InvalidValue)
    async def invalid_value(error: InvalidValue) -> Response:
        return error_response(error.refusal())

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(GatewayError(ErrorKind.INTERNAL, "Internal gateway error; see the gateway's log."))
