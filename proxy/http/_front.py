"""The exchange front door: routes whose response is an exchange, served straight on ASGI.

A chat's status waits for its backend, its body is a stream the exchange writes itself, and
a client that hangs up must have its backend hung up at once: Quart's request/response cycle
only gets in the way there, and costs about a fifth of a chat's CPU (building werkzeug's
request, URL matching, hooks, the response object). So the routes registered here are
matched before Quart sees the request; every other route is Quart's. Both kinds share the
guard (`_auth.admit`), the header view (`_head`) and the errors in the path's dialect.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable

from proxy.config import Settings
from proxy.dialects.multipart import FORM_TRUE, parse_form
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.gateway import Gateway
from proxy.http._auth import (
    admit,
    give_back_admission,
    granted_headers,
    limit,
    settle_reservation,
    stamp_exchange,
    take_reservation,
)
from proxy.http._body_coding import inflate_body, too_large
from proxy.http._errors import Reply, dialect_of_path, error_reply
from proxy.http._exchange import DirectBody, ExchangeBody
from proxy.http._hangup import on_client_gone, receiving_body, until_client_gone, want_body
from proxy.http._head import RequestHead
from proxy.infra.postgres import InvalidValue
from proxy.services.auth import current_principal

log = logging.getLogger("llm_proxy.http")

# A client trickling its body must not hold a request forever (Quart's routes get the same).
# One sending a large body over a slow link (a few MB of images from a phone) has more time,
# as long as its body keeps coming at this rate (bytes per second).
BODY_TIMEOUT = 120.0
BODY_MIN_RATE = 16 * 1024


def body_deadline(started: float, received: int) -> float:
    """When a body that began arriving at `started` must have ended, `received` bytes in."""
    return started + BODY_TIMEOUT + received / BODY_MIN_RATE


def body_timeout() -> GatewayError:
    """A 408, as nginx's `client_body_timeout` answers: SDKs retry it, which is safe, since
    nothing ran without the body."""
    return GatewayError(
        ErrorKind.REQUEST_TIMEOUT,
        f"The request body did not arrive within {BODY_TIMEOUT:g} s (and a second more per "
        f"{BODY_MIN_RATE >> 10} KiB received).", code="body_timeout",
    )


@dataclass(slots=True)
class Incoming:
    """A request the front door accepted: its head, its whole body, its path parameters."""

    gateway: Gateway
    head: RequestHead
    body: bytes
    params: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Incoming], Awaitable[DirectBody | Reply]]


@dataclass(frozen=True, slots=True)
class FrontRoute:
    rule: str  # Quart's syntax (`/v1/streams/<trace_id>`), for the OpenAPI document
    handlers: dict[str, Handler]  # by method
    # What a refusal on this route is logged and counted as (`ExchangeRecord.kind`), so that a
    # refused rerank is not counted among the chats. None: not a model call, so neither
    # logged nor counted, refused or answered (reading back, cancelling or deleting a run).
    kind: str | None = "chat"
    # A route taking an upload (audio) has a body limit of its own instead of `max_body_bytes`,
    # and says what is too large in its own words (the file's limit, not the form's).
    body_limit: Callable[[Settings], int] | None = None
    too_large: Callable[[Settings], GatewayError] | None = None
    # Methods counted otherwise than `kind` (listing stored chat completions is a read of the
    # chat path, not a chat).
    method_kinds: dict[str, str | None] = field(default_factory=dict)

    @property
    def allow(self) -> bytes:
        return ", ".join(sorted({*self.handlers, "HEAD"} if "GET" in self.handlers else self.handlers)).encode()

    def method_of(self, method: str) -> str:
        """The method whose handler serves `method`: a HEAD is a GET without its body
        (RFC 9110 §9.3.2; hypercorn leaves the body out), as on Quart's routes."""
        return "GET" if method == "HEAD" and "GET" in self.handlers else method

    def kind_of(self, method: str) -> str | None:
        return self.method_kinds.get(method, self.kind)

    def with_methods_of(self, other: FrontRoute) -> FrontRoute:
        """This route and `other`'s methods (the same rule, declared by two surfaces)."""
        assert self.body_limit is other.body_limit, f"{self.rule}: every method of a route has one body limit"
        kinds = {**self.method_kinds, **{method: other.kind_of(method) for method in other.handlers}}
        return replace(
            self, handlers={**self.handlers, **other.handlers},
            method_kinds={method: kind for method, kind in kinds.items() if kind != self.kind},
        )


class FrontDoor:
    """Routes served without Quart: exact paths, or paths with one parameter segment
    (`/v1/streams/<trace_id>`, `/v1/responses/<response_id>/cancel`). Each surface module
    declares its own (as it does its blueprint); the app includes them."""

    def __init__(self) -> None:
        self._exact: dict[str, FrontRoute] = {}
        self._with_param: list[tuple[str, str, str, FrontRoute]] = []  # prefix, name, suffix

    def route(
        self, rule: str, *, method: str = "POST", kind: str | None = "chat",
        body_limit: Callable[[Settings], int] | None = None, too_large: Callable[[Settings], GatewayError] | None = None,
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            known = self._routes_by_rule().get(rule)
            if known is not None:
                assert known.body_limit is body_limit, f"{rule}: every method of a route has one body limit"
                known.handlers[method] = handler
                if kind != known.kind:
                    known.method_kinds[method] = kind
                return handler
            route = FrontRoute(rule, {method: handler}, kind, body_limit, too_large)
            if "<" in rule:
                prefix, _, rest = rule.partition("<")
                name, _, suffix = rest.partition(">")
                self._with_param.append((prefix, name, suffix, route))
            else:
                self._exact[rule] = route
            return handler

        return register

    def include(self, other: FrontDoor) -> None:
        """`other`'s routes too; a rule both declare has the methods of both."""
        for path, route in other._exact.items():
            known = self._exact.get(path)
            self._exact[path] = route if known is None else known.with_methods_of(route)
        for prefix, name, suffix, route in other._with_param:
            place = next((i for i, entry in enumerate(self._with_param) if entry[3].rule == route.rule), None)
            if place is None:
                self._with_param.append((prefix, name, suffix, route))
            else:
                self._with_param[place] = (prefix, name, suffix, self._with_param[place][3].with_methods_of(route))

    def match(self, path: str) -> tuple[FrontRoute, dict[str, str]] | None:
        route = self._exact.get(path)
        if route is not None:
            return route, {}
        for prefix, name, suffix, route in self._with_param:
            if path.startswith(prefix) and path.endswith(suffix) and len(path) > len(prefix) + len(suffix):
                value = path[len(prefix) : len(path) - len(suffix)]
                if "/" not in value:
                    return route, {name: value}
        return None

    def rules(self) -> list[tuple[str, set[str]]]:
        return [(route.rule, set(route.handlers)) for route in self._routes_by_rule().values()]

    def _routes_by_rule(self) -> dict[str, FrontRoute]:
        return {route.rule: route for route in [*self._exact.values(), *(route for *_, route in self._with_param)]}


async def serve(
    gateway: Gateway,
    route: FrontRoute,
    params: dict[str, str],
    scope: Mapping[str, Any],
    receive: ASGIReceiveCallable,
    send: ASGISendCallable,
) -> None:
    """One request on a front-door route, from the guard to the last byte; what its
    admission reserved is settled however it ends."""
    try:
        head = RequestHead(scope)
        out = ResponseSend(send, scope, head)
        started = time.perf_counter()
        body: bytes | None = None
        method = route.method_of(head.method)
        # The rate limits wait for the body: a request reserves the tokens it asks for.
        refusal = await admit(gateway, head, limits=False)
        if refusal is not None:
            await _refuse(out, gateway, route.kind_of(method), head, refusal, body, started)
            return
        try:
            handler = route.handlers.get(method)
            if handler is None:
                raise GatewayError(
                    ErrorKind.METHOD_NOT_ALLOWED, f"Method {head.method} is not allowed on {head.path}"
                )
            settings = gateway.settings
            max_body = route.body_limit(settings) if route.body_limit is not None else settings.max_body_bytes
            try:
                body = await _read_body(receive, head, max_body)
                if body is None:  # the client left before its request was whole (an upload given up)
                    if (kind := route.kind_of(method)) is not None:
                        _log_refusal(gateway, kind, head, _GONE, None, started, "The client left.", cancelled=True)
                    return
                body = inflate_body(body, head.header("content-encoding"), max_body)
            except GatewayError as error:
                if error.kind is ErrorKind.REQUEST_TOO_LARGE and route.too_large is not None:
                    raise route.too_large(settings) from None
                raise
            refusal = await limit(gateway, head, body)
            if refusal is not None:
                await _refuse(out, gateway, route.kind_of(method), head, refusal, body, started)
                return
            kind = route.kind_of(method)
            try:
                if kind is None:  # reading, cancelling or deleting what is stored: done all the same
                    answer = await _answer(handler, Incoming(gateway, head, body, params))
                else:
                    # A model call's handler may call its backend already (a token count, a
                    # model's load): a client that leaves ends it, as it ends an exchange.
                    gone = False
                    with until_client_gone() as watched:
                        try:
                            answer = await _answer(handler, Incoming(gateway, head, body, params))
                        except GatewayError:
                            # A backend call its hang-up cut short may fail as the backend's fault.
                            gone = watched.cancel_called
                            if not gone:
                                raise
                    if gone or watched.cancelled_caught:
                        _log_refusal(gateway, kind, head, _GONE, body, started, "The client left.", cancelled=True)
                        return
            except InvalidValue as invalid:
                raise invalid.refusal() from invalid
        except GatewayError as error:
            if error.kind is ErrorKind.PERMISSION:
                give_back_admission(gateway)
            reply = error_reply(error, dialect_of_path(head.path), head.request_id())
            if error.kind is ErrorKind.METHOD_NOT_ALLOWED:
                reply.headers.append((b"allow", route.allow))
            await _refuse(out, gateway, route.kind_of(method), head, reply, body, started, error.message)
            return
        except Exception:
            log.exception("unhandled error on %s %s", head.method, head.path)
            internal = GatewayError(ErrorKind.INTERNAL, "Internal gateway error; see the gateway's log.")
            await _refuse(out, gateway, route.kind_of(method), head, error_reply(internal, dialect_of_path(head.path), head.request_id()), body, started, internal.message)
            return
        if isinstance(answer, Reply):
            answer.headers.extend(granted_headers())
            await send_reply(out, answer)
            return
        if isinstance(answer, ExchangeBody):
            stamp_exchange(answer.exchange)
        await _respond(answer, receive, out, head_only=head.method == "HEAD")
    finally:
        settle_reservation(gateway)


async def _refuse(
    out: ResponseSend, gateway: Gateway, kind: str | None, head: RequestHead, reply: Reply, body: bytes | None,
    started: float, message: str | None = None,
) -> None:
    """Answer a request that got no exchange with `reply`, and log it.

    A body left unread makes the server close the connection after the reply; the client is
    told (`Connection: close`), or it would send its next request into a closing connection."""
    if body is None and expects_body(head) and all(name != b"connection" for name, _ in reply.headers):
        reply.headers.append((b"connection", b"close"))
    if kind is not None:
        _log_refusal(gateway, kind, head, reply, body, started, message)
    await send_reply(out, reply)


# What a request whose client left before its response began is logged and counted as (nginx's
# "client closed request"); nothing is sent.
_GONE = Reply(b"", status=499)


def _log_refusal(
    gateway: Gateway, kind: str, head: RequestHead, reply: Reply, body: bytes | None, started: float, message: str | None,
    *, cancelled: bool = False,
) -> None:
    """A request that got no exchange still gets its line in the request log (and counts
    as a failed request of its key). Only refusals pay for reading the body's model."""
    model, stream = "", False
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):  # what made it a refusal, maybe (deep nesting)
        data = None
    if isinstance(data, dict):
        model = data["model"] if isinstance(data.get("model"), str) else ""
        stream = data.get("stream") is True
    elif body and (head.header("content-type") or "").lower().startswith("multipart/form-data"):
        model, stream = _form_model(head, body)
    principal = current_principal.get()
    gateway.chat.refused(
        request_id=head.request_id(), dialect=dialect_of_path(head.path), model=model, stream=stream,
        status=reply.status, error=message or _message_of(reply.body), total_ms=(time.perf_counter() - started) * 1000,
        api_key_id=principal.id if principal is not None else None, reserved=take_reservation(), kind=kind,
        cancelled=cancelled,
    )


def _form_model(head: RequestHead, body: bytes) -> tuple[str, bool]:
    """A refused upload's (audio's) `model` and `stream` fields, if it has them."""
    try:
        form = parse_form(head.header("content-type"), body)
    except GatewayError:
        return "", False
    return (form.text("model") or "").strip(), (form.text("stream") or "").strip().lower() in FORM_TRUE


def _message_of(body: bytes) -> str:
    """The message of an error body in any dialect's shape."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) else ""


async def _answer(handler: Handler, incoming: Incoming) -> DirectBody | Reply:
    try:
        answer = await handler(incoming)
    except GatewayError as error:
        if error.code != "model_not_found":
            raise
    else:
        if not await _listed_elsewhere_now(answer, incoming.gateway):
            return answer
    # A name no backend was known to list may be one a backend lists now: the catalogue
    # (listed afresh unless its list is recent) teaches the router, and the request is
    # tried once more. Only unknown models pay for this.
    await incoming.gateway.catalog.models()
    return await handler(incoming)


async def _listed_elsewhere_now(answer: DirectBody | Reply, gateway: Gateway) -> bool:
    """Whether a chat that the default backend was to get only because no backend was known
    to list its model goes elsewhere once the backends are listed again (a model pulled on
    an Ollama backend since): they are, when their list has expired, as for unknown names.
    (A gateway that has never listed them sends such names to the default backend.) Other
    requests pay a string comparison."""
    if not isinstance(answer, ExchangeBody) or len(gateway.backends) < 2:  # nowhere else to go
        return False
    route, router = answer.exchange.route, gateway.router
    model = answer.exchange.request.model
    if route.backend != router.default_backend or not gateway.catalog.expired or not router.by_default(model):
        return False
    await gateway.catalog.models()
    return router.backend_of(model) != route.backend


async def send_reply(send: ASGISendCallable, reply: Reply) -> None:
    await send({"type": "http.response.start", "status": reply.status, "headers": reply.asgi_headers()})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


async def _read_body(receive: ASGIReceiveCallable, head: RequestHead, limit: int) -> bytes | None:
    """The whole body, or None if the client disconnected first; 413 past `limit`."""
    declared = head.header("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    await want_body()
    chunks: list[bytes] = []
    size = 0
    started = trio.current_time()
    with trio.move_on_after(BODY_TIMEOUT) as waited:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = cast(bytes, message.get("body", b""))
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
                waited.deadline = max(waited.deadline, body_deadline(started, size))
            if not message.get("more_body", False):
                break
    if waited.cancelled_caught:
        raise body_timeout()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def expects_body(head: RequestHead) -> bool:
    """Whether the request has a body to come (which a refusal may leave unread)."""
    length = head.header("content-length")
    return (length is not None and length != "0") or head.header("transfer-encoding") is not None


class ResponseSend:
    """`send` for one request, whichever layer serves it: the response's head gets the
    request's id (`x-request-id`, and Anthropic's `request-id` for Anthropic clients) unless
    the route set it, and `complete` notes when the last byte has gone out.

    For Quart's routes (`unread_body`), which may answer before the body has come (a hook's
    401 or 429, werkzeug's 404 or 405), a response starting while the server still waits for
    the body says `Connection: close`: the server closes such a connection after the response,
    and a client not told so sent its next request into it and got no answer ("Server
    disconnected without sending a response"). The front door's refusals say it themselves."""

    __slots__ = ("_head", "_scope", "_send", "_unread_body", "complete")

    def __init__(
        self, send: ASGISendCallable, scope: Mapping[str, Any], head: RequestHead | None = None, *, unread_body: bool = False,
    ) -> None:
        self._send = send
        self._scope = scope
        self._head = head  # made on demand for Quart's routes, which parse their own
        self._unread_body = unread_body
        self.complete = False

    async def __call__(self, message: Any) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if not message.get("more_body", False):
                # Set before sending: hypercorn reports the disconnect from inside this send.
                self.complete = True
                # It also closes a `Connection: close` connection from inside it: cancelled
                # there (Quart cancels its request's tasks once it hears that disconnect), the
                # close never happened and the client waited for the idle timeout.
                with trio.CancelScope(shield=True):
                    await self._send(message)
                return
        elif kind == "http.response.start":
            message["headers"] = self._with_ids(message.get("headers", ()))
        await self._send(message)

    def _with_ids(self, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        stamped = list(headers)
        names = {name for name, _ in stamped}
        head = self._head or RequestHead(self._scope)
        request_id = head.request_id().encode()
        if b"x-request-id" not in names:
            stamped.append((b"x-request-id", request_id))
        if b"request-id" not in names and (
            head.header("anthropic-version") is not None or dialect_of_path(head.path) == "anthropic"
        ):
            stamped.append((b"request-id", request_id))
        if self._unread_body and b"connection" not in names and receiving_body():
            stamped.append((b"connection", b"close"))
        return stamped


async def _respond(body: DirectBody, receive: ASGIReceiveCallable, tracked: ResponseSend, *, head_only: bool = False) -> None:
    """Run `body` as the response, until it ends or the client leaves: its connection's end
    is heard from the server's reader when it can be (`_hangup`), else from `receive`.

    `head_only` (a HEAD): the response ends with its head. hypercorn only drops a HEAD's body,
    so a live stream's (`/v1/streams/<trace_id>`) kept the connection busy until the run ended,
    and the client's next request on it waited as long."""
    async with trio.open_nursery() as nursery:
        send: ASGISendCallable = _HeadOnly(tracked, nursery.cancel_scope) if head_only else tracked

        def client_gone() -> None:
            # Hypercorn reports every finished response as a disconnect: that one cancels
            # nothing, since the exchange may still be returning its backend connection or
            # writing its log.
            if not tracked.complete and not nursery.cancel_scope.cancel_called:
                body.hang_up()  # the backend connections close now, not once the cancellation unwinds
                nursery.cancel_scope.cancel()

        nursery.start_soon(_watch_disconnect, receive, client_gone)
        with on_client_gone(client_gone):
            await body.run(send)
        nursery.cancel_scope.cancel()


class _HeadOnly:
    """`send` for a HEAD's response: its head, then the end, and the body's run is stopped."""

    __slots__ = ("_scope", "_send")

    def __init__(self, send: ResponseSend, scope: trio.CancelScope) -> None:
        self._send = send
        self._scope = scope

    async def __call__(self, message: Any) -> None:
        if message["type"] != "http.response.start":
            return
        await self._send(message)
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        self._scope.cancel()


async def _watch_disconnect(receive: ASGIReceiveCallable, client_gone: Callable[[], None]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    client_gone()
