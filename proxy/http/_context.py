"""Per-request context for the Quart-served routes: the gateway, ids, the body."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from quart import current_app, request
from quart_trio import QuartTrio

from proxy.gateway import Gateway
from proxy.http._body_coding import inflate_body
from proxy.http._head import RequestHead
from proxy.http._head import request_meta as meta_of
from proxy.services.chat import RequestMeta

if TYPE_CHECKING:
    from proxy.http._front import FrontDoor


class GatewayApp(QuartTrio):
    gateway: Gateway
    front: FrontDoor  # the routes served before Quart (see `_front`)
    # When the graceful stop ends (trio's clock), set when the server is told to stop: the
    # durable runs get the same grace as the requests in flight.
    stopping_by: float | None = None


def gateway() -> Gateway:
    return cast(GatewayApp, current_app).gateway


def request_head() -> RequestHead:
    return RequestHead(request.scope)


def request_meta() -> RequestMeta:
    """Ids and route choice from the current request's headers (see `_head.request_meta`)."""
    return meta_of(request_head())


async def request_body() -> bytes:
    """The request body, inflated if it came compressed; werkzeug raises 413 past
    MAX_CONTENT_LENGTH, and so does an inflated body past it."""
    body = cast(bytes, await request.get_data(cache=False, as_text=False))
    return inflate_body(body, request.headers.get("content-encoding"), gateway().settings.max_body_bytes)


def listing_headers() -> dict[str, str]:
    """A model listing's headers: `x-unavailable-backends` names the backends whose latest
    listing failed (their models are those they listed before, if any), so a client or an
    operator can tell a partial list from a whole one."""
    unavailable = gateway().catalog.unavailable
    return {"x-unavailable-backends": ", ".join(unavailable)} if unavailable else {}
