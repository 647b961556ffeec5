"""What every backend adapter provides, and the pieces they share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import trio

from proxy.config import BackendConfig
from proxy.domain.chat import ChatCompletion, ChatRequest
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import StreamEvent
from proxy.infra.transport import PooledTransport


@dataclass(slots=True)
class Batch:
    """What one read from a backend produced.

    `raw` is the same content already rendered as OpenAI SSE, present only when the backend
    speaks OpenAI and the caller asked for it (the byte-exact relay). `done` marks the batch
    after which the client's stream is complete. A non-streaming exchange yields a single
    batch carrying `completion` (and `raw` JSON when relayable).
    """

    events: list[StreamEvent]
    raw: bytes | None = None
    done: bool = False
    completion: ChatCompletion | None = None


@dataclass(slots=True)
class BackendCall:
    request: ChatRequest
    upstream_model: str
    relay_openai: bool = False
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class ModelInfo:
    id: str
    backend: str
    created: int = 0
    owned_by: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """A backend adapter. `stream` sends batches into `send` and returns when the stream is
    complete; both calls raise `GatewayError` for failures before their first batch."""

    config: BackendConfig

    async def stream(self, call: BackendCall, send: trio.MemorySendChannel[Batch]) -> None: ...

    async def complete(self, call: BackendCall) -> Batch: ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def check(self) -> None: ...

    async def aclose(self) -> None: ...


def create_client(config: BackendConfig, *, auth_header: dict[str, str]) -> httpx.AsyncClient:
    """One pooled client per backend, kept for the process's life."""
    timeouts = config.timeouts
    transport = PooledTransport(
        max_connections=config.max_connections,
        max_keepalive=config.max_connections,
        keepalive_expiry=30.0,
    )
    return httpx.AsyncClient(
        transport=transport,
        base_url=config.base_url,
        headers={"accept-encoding": "identity", **auth_header},
        timeout=httpx.Timeout(connect=timeouts.connect, read=None, write=timeouts.connect, pool=timeouts.connect),
        follow_redirects=False,
    )


def status_error(backend: str, status: int, message: str | None, retry_after: str | None = None) -> GatewayError:
    """Map a backend's HTTP error onto the client-facing one.

    Client mistakes the backend caught (400, 404, 413, 422) keep their meaning; a backend
    refusing the gateway's own credentials is a gateway-side fault (502), never a 401/403
    to the client, whose auth is the gateway's business.
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
    return GatewayError(kind, message_out, code=f"backend_{status}", retry_after=retry)


@contextmanager
def transport_errors(backend: str) -> Iterator[None]:
    """Turn httpx's transport failures into gateway errors (503 unreachable, 504 timeout)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise GatewayError(
            ErrorKind.TIMEOUT, f"Backend `{backend}` timed out ({type(exc).__name__}).", code="backend_timeout"
        ) from None
    except (httpx.ConnectError, httpx.ProxyError, httpx.UnsupportedProtocol) as exc:
        raise GatewayError(
            ErrorKind.UNAVAILABLE, f"Backend `{backend}` is unreachable: {exc}", code="backend_unreachable"
        ) from None
    except httpx.TransportError as exc:
        raise GatewayError(
            ErrorKind.BACKEND, f"Backend `{backend}` connection failed: {exc or type(exc).__name__}",
            code="backend_connection_error",
        ) from None


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
