"""Errors in the caller's dialect, whatever raised them (our code, Quart, werkzeug)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from proxy.dialects import openai
from proxy.domain.errors import ErrorKind, GatewayError

log = logging.getLogger("llm_proxy.http")

# dialect name -> (render error body, content type)
ErrorRenderer = Callable[[GatewayError], bytes]
_RENDERERS: dict[str, tuple[ErrorRenderer, str]] = {"openai": (openai.render_error, "application/json")}
_PREFIXES: list[tuple[str, str]] = []


def register_dialect_errors(dialect: str, path_prefixes: tuple[str, ...], render: ErrorRenderer, content_type: str = "application/json") -> None:
    """Paths under `path_prefixes` answer errors in `dialect`'s shape (OpenAI's otherwise)."""
    _RENDERERS[dialect] = (render, content_type)
    _PREFIXES.extend((prefix, dialect) for prefix in path_prefixes)
    _PREFIXES.sort(key=lambda item: -len(item[0]))


def dialect_of_path(path: str) -> str:
    for prefix, dialect in _PREFIXES:
        if path.startswith(prefix):
            return dialect
    return "openai"


def error_response(error: GatewayError, dialect: str | None = None) -> Response:
    render, content_type = _RENDERERS[dialect or dialect_of_path(request.path)]
    response = Response(render(error), status=error.status, content_type=content_type)
    if error.retry_after is not None:
        response.headers["retry-after"] = str(max(1, round(error.retry_after)))
    return response


_HTTP_KINDS = {
    400: ErrorKind.INVALID_REQUEST,
    404: ErrorKind.NOT_FOUND,
    405: ErrorKind.METHOD_NOT_ALLOWED,
    413: ErrorKind.REQUEST_TOO_LARGE,
}


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(GatewayError)
    async def gateway_error(error: GatewayError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        kind = _HTTP_KINDS.get(status, ErrorKind.INVALID_REQUEST if status < 500 else ErrorKind.INTERNAL)
        if status == 404:
            message = f"Unknown endpoint: {request.method} {request.path}"
        elif status == 405:
            message = f"Method {request.method} is not allowed on {request.path}"
        elif status == 413:
            message = "The request body is too large."
        else:
            message = error.description or error.name
        return error_response(GatewayError(kind, message, code="request_too_large" if status == 413 else None))

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(GatewayError(ErrorKind.INTERNAL, "Internal gateway error; see the gateway's log."))
