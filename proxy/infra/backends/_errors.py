"""How a backend's failures reach the client: its HTTP errors and httpx's transport
failures mapped onto gateway errors, and the bounded read of an error body."""

from __future__ import annotations

import html
import json
import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import trio

from proxy.domain.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    ErrorKind,
    GatewayError,
    is_context_overflow,
)
from proxy.infra.transport import SchemeMismatch, current_hangup

_KINDS = {
    400: ErrorKind.INVALID_REQUEST, 422: ErrorKind.INVALID_REQUEST, 404: ErrorKind.NOT_FOUND, 410: ErrorKind.NOT_FOUND,
    409: ErrorKind.CONFLICT, 413: ErrorKind.REQUEST_TOO_LARGE, 415: ErrorKind.UNSUPPORTED_MEDIA_TYPE,
    429: ErrorKind.RATE_LIMITED, 503: ErrorKind.UNAVAILABLE, 504: ErrorKind.TIMEOUT,
}
# A backend's 4xx that says how the gateway called it, not what the client asked: its key
# (401, 403, a proxy's 407), its account (402: out of credit), its method, framing or headers.
_GATEWAY_SIDE_4XX = frozenset({401, 402, 403, 405, 407, 408, 411, 421, 426, 428, 431})


def status_error(
    backend: str, status: int, message: str | None, retry_after: str | None = None, *, param: str | None = None
) -> GatewayError:
    """Map a backend's HTTP error onto the client-facing one.

    Client mistakes the backend caught keep their meaning: 400, 404, 409, 413, 415 their
    status, a 422 (FastAPI's) and any other 4xx about the request a 400, and the field it named
    (`param`: a FastAPI 422's `loc`) reaches the client, as LiteLLM passes a backend's 4xx on. A
    4xx about the gateway's own call (its credentials, its account, its method or headers) is
    a gateway-side fault (502), never a 401/403 to the client, whose auth is the gateway's
    business.

    The `code`: none for a bad request (as OpenAI's own often have none; the caller sets the
    backend's own code when it said one), else `backend_<status>`, the backend's status where
    the client's differs (and a backend's 404, which the Ollama surface tells apart by it).
    """
    text = message or f"HTTP {status}"
    detail = f"Backend `{backend}` returned {status}: {text}"
    kind = _KINDS.get(status) or (
        ErrorKind.INVALID_REQUEST if 400 <= status < 500 and status not in _GATEWAY_SIDE_4XX else ErrorKind.BACKEND
    )
    retry: float | None = None
    if retry_after is not None:
        try:
            retry = float(retry_after)
        except ValueError:
            retry = None
    message_out = text if kind in (ErrorKind.INVALID_REQUEST, ErrorKind.NOT_FOUND) else detail
    if kind is ErrorKind.INVALID_REQUEST and is_context_overflow(text):
        return GatewayError(kind, message_out, code=CONTEXT_LENGTH_EXCEEDED, param="messages")
    mistake = status in (400, 413, 422)
    return GatewayError(
        kind, message_out, code=None if mistake else f"backend_{status}", retry_after=retry,
        param=param if kind is ErrorKind.INVALID_REQUEST else None,
    )


_log = logging.getLogger("llm_proxy.backends")


def listing_refused(backend: str, base_url: str, path: str, error: GatewayError) -> str:
    """A readiness probe's model listing the backend refused, said with the backend and what
    was asked (a 404's message alone, "Not Found", named neither).

    A server that answers HTTP serves: one with no listing (an audio- or embedding-only server
    answers 404, or 405) or one whose listing is rate limited (Anthropic's counts against the
    gateway's account) is ready, and this is its note, which also reads as a base URL missing
    vLLM's `/v1`. Raised when the backend cannot serve: its key refused, its server failing."""
    shown = urlsplit(base_url).path.rstrip("/") + path
    if error.kind is ErrorKind.NOT_FOUND or error.code == "backend_405":
        status = error.code.removeprefix("backend_") if error.code else "404"
        return f"no model listing: GET {shown} answered {status}: {error.message} (is its `base_url` right?)"
    if error.kind is ErrorKind.RATE_LIMITED:
        return f"its model listing GET {shown} is rate limited: {error.message}"
    if error.status < 500:  # no request of a client's to blame
        raise GatewayError(ErrorKind.BACKEND, f"Backend `{backend}` refused GET {shown} (its model listing): {error.message}")
    raise error


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
        why = f": {exc.hint}" if isinstance(exc, SchemeMismatch) else ""
        raise GatewayError(
            ErrorKind.UNAVAILABLE, f"Backend `{backend}` is unreachable{why}.", code="backend_unreachable"
        ) from None
    except httpx.TransportError as exc:
        if not _cancelled():
            _log.warning("backend %s connection failed: %s", backend, exc or type(exc).__name__)
        why = exc.hint if isinstance(exc, SchemeMismatch) else type(exc).__name__
        raise GatewayError(
            ErrorKind.BACKEND, f"Backend `{backend}` connection failed ({why}).",
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


# The largest whole answer read from a backend: far above a real one (a big embedding batch
# is tens of MB), low enough that a broken backend sending without end cannot fill memory.
MAX_ANSWER_BYTES = 256 << 20


class _Bounded(httpx.AsyncByteStream):
    def __init__(self, body: httpx.AsyncByteStream, backend: str) -> None:
        self._body = body
        self._chunks = body.__aiter__()
        self._backend = backend
        self._size = 0

    def __aiter__(self) -> _Bounded:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._chunks.__anext__()
        self._size += len(chunk)
        if self._size > MAX_ANSWER_BYTES:
            raise GatewayError(
                ErrorKind.BACKEND, f"Backend `{self._backend}` sent an answer larger than {MAX_ANSWER_BYTES >> 20} MiB."
            )
        return chunk

    async def aclose(self) -> None:
        await self._body.aclose()


async def read_whole(response: httpx.Response, backend: str) -> bytes:
    """Read a whole answer (then `response.content`), up to `MAX_ANSWER_BYTES`."""
    response.stream = _Bounded(cast(httpx.AsyncByteStream, response.stream), backend)
    return await response.aread()


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


# A reverse proxy's or a web server's page (nginx's "502 Bad Gateway", a login portal, a web
# UI where an API was expected): told by its title, not relayed as 500 characters of markup.
_HTML_START = re.compile(rb"\s*(?:<!--.*?-->\s*)?<(?:!doctype\s+html|html|head|body)\b", re.IGNORECASE | re.DOTALL)
_HTML_TITLE = re.compile(rb"<(title|h1)\b[^>]*>(.*?)</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*>")


def html_page(body: bytes) -> str | None:
    """`an HTML page titled "..."` when `body` is an HTML page, else None."""
    if not _HTML_START.match(body[:1024]):
        return None
    found = _HTML_TITLE.search(body[:65536])
    if found is not None and (title := _text_of(found.group(2))):
        return f"an HTML page titled \"{title[:200]}\""
    if text := _text_of(body[:4096]):  # a page without a title: what it says
        return f"an HTML page saying \"{text[:200]}\""
    return "an HTML page"


def _text_of(markup: bytes) -> str:
    return " ".join(html.unescape(_HTML_TAG.sub(" ", markup.decode("utf-8", "replace"))).split())


def body_text(body: bytes) -> str:
    """What a backend's body that is no API answer says, readable in an error message."""
    return html_page(body) or body[:500].decode("utf-8", "replace").strip()


def json_mended(body: bytes) -> Any:
    """A whole answer whose bytes are not all UTF-8 (llama.cpp's), parsed with U+FFFD for
    them; None if it is not JSON even so."""
    try:
        return json.loads(body.decode("utf-8", "replace"))
    except ValueError:
        return None


def not_json(backend: str, body: bytes) -> GatewayError:
    """A whole answer that is no JSON object."""
    page = html_page(body)
    if page is not None:
        return GatewayError(ErrorKind.BACKEND, f"Backend `{backend}` answered with {page}, not JSON.")
    return GatewayError(ErrorKind.BACKEND, f"Backend `{backend}` returned invalid JSON.")


async def page_not_stream(backend: str, response: httpx.Response) -> GatewayError:
    """A web page under a 200 where a stream was asked (a login portal, a web UI at the
    base URL): it makes no event, and would end as "closed the stream before it finished"."""
    with transport_errors(backend):
        page = html_page(await read_limited(response, 65536)) or "an HTML page"
    return GatewayError(ErrorKind.BACKEND, f"Backend `{backend}` answered with {page}, not a stream.")


def is_html(response: httpx.Response) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.lstrip().lower().startswith(("text/html", "application/xhtml"))
