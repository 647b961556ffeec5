"""How a backend's failures reach the client: its HTTP errors and httpx's transport
failures mapped onto gateway errors, and the bounded read of an error body."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import trio

from proxy.domain.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    ErrorKind,
    GatewayError,
    is_context_overflow,
)
from proxy.infra.transport import current_hangup


def status_error(
    backend: str, status: int, message: str | None, retry_after: str | None = None, *, param: str | None = None
) -> GatewayError:
    """Map a backend's HTTP error onto the client-facing one.

    Client mistakes the backend caught (400, 404, 413, 422) keep their meaning, and the
    field it named (`param`: a FastAPI 422's `loc`) reaches the client; a backend refusing
    the gateway's own credentials is a gateway-side fault (502), never a 401/403 to the
    client, whose auth is the gateway's business.

    The `code`: none for a bad request (as OpenAI's own often have none; the caller sets the
    backend's own code when it said one), else `backend_<status>`, the backend's status where
    the client's differs (and a backend's 404, which the Ollama surface tells apart by it).
    """
    text = message or f"HTTP {status}"
    detail = f"Backend `{backend}` returned {status}: {text}"
    kinds = {400: ErrorKind.INVALID_REQUEST, 422: ErrorKind.INVALID_REQUEST, 404: ErrorKind.NOT_FOUND,
             413: ErrorKind.REQUEST_TOO_LARGE, 429: ErrorKind.RATE_LIMITED, 503: ErrorKind.UNAVAILABLE,
             504: ErrorKind.TIMEOUT}
    kind = kinds.get(status, ErrorKind.BACKEND)
    retry: float | None = None
    if retry_after is not None:
        try:
            retry = float(retry_after)
        except ValueError:
            retry = None
    message_out = text if kind in (ErrorKind.INVALID_REQUEST, ErrorKind.NOT_FOUND) else detail
    if kind is ErrorKind.INVALID_REQUEST and is_context_overflow(text):
        return GatewayError(kind, message_out, code=CONTEXT_LENGTH_EXCEEDED, param="messages")
    mistake = kind in (ErrorKind.INVALID_REQUEST, ErrorKind.REQUEST_TOO_LARGE)
    return GatewayError(
        kind, message_out, code=None if mistake else f"backend_{status}", retry_after=retry,
        param=param if kind is ErrorKind.INVALID_REQUEST else None,
    )


_log = logging.getLogger("llm_proxy.backends")


@contextmanager
def transport_errors(backend: str) -> Iterator[None]:
    """Turn httpx's transport failures into gateway errors (503 unreachable, 504 timeout).

    A failure met while this task is being cancelled is our own doing, not the backend's:
    the client hung up, and its `Hangup` closed the connection under a pending read
    ("another task closed this fd"). It is not logged; the error still propagates, and the
    cancellation ends the task at its next checkpoint."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise GatewayError(
            ErrorKind.TIMEOUT, f"Backend `{backend}` timed out ({type(exc).__name__}).", code="backend_timeout"
        ) from None
    except (httpx.ConnectError, httpx.ProxyError, httpx.UnsupportedProtocol) as exc:
        # The detail names the backend's host and port: for the log, never for the client.
        if not _cancelled():
            _log.warning("backend %s unreachable: %s", backend, exc)
        raise GatewayError(
            ErrorKind.UNAVAILABLE, f"Backend `{backend}` is unreachable.", code="backend_unreachable"
        ) from None
    except httpx.TransportError as exc:
        if not _cancelled():
            _log.warning("backend %s connection failed: %s", backend, exc or type(exc).__name__)
        raise GatewayError(
            ErrorKind.BACKEND, f"Backend `{backend}` connection failed ({type(exc).__name__}).",
            code="backend_connection_error",
        ) from None


def _client_gone() -> bool:
    """This request's client has left: its hang-up closed our connections, or it is being
    cancelled (a failure now is our doing, not the backend's)."""
    hangup = current_hangup.get()
    return (hangup is not None and hangup.fired) or _cancelled()


def _cancelled() -> bool:
    """This task is in a cancelled scope (its next checkpoint raises `Cancelled`)."""
    return trio.current_effective_deadline() == -math.inf


def timeout_error(backend: str, what: str, seconds: float | None) -> GatewayError:
    return GatewayError(
        ErrorKind.TIMEOUT,
        f"Backend `{backend}` {what} within {seconds:g}s." if seconds else f"Backend `{backend}` {what}.",
        code="backend_timeout",
    )


async def read_limited(response: httpx.Response, limit: int = 1 << 20) -> bytes:
    """Read an error body, bounded: a broken backend must not make us buffer gigabytes."""
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        parts.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(parts)[:limit]
