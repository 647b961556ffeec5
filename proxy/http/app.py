"""The quart-trio application."""

from __future__ import annotations

import re
from contextlib import AsyncExitStack
from typing import Any, ClassVar, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope, WebsocketScope
from quart import current_app, request

from proxy.config import Settings
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.gateway import open_gateway
from proxy.http import (
    _anthropic,
    _audio,
    _batches,
    _completions,
    _conversations,
    _cors,
    _embeddings,
    _front,
    _health,
    _keys,
    _message_batches,
    _ollama,
    _openai,
    _rerank,
    _responses,
    _stored_completions,
    _streams,
    _upload,
    _vllm,
    _workspaces,
)
from proxy.http._auth import install_auth
from proxy.http._context import GatewayApp
from proxy.http._errors import dialect_of, error_reply, install_error_handlers
from proxy.http._openapi import blueprint as openapi_blueprint
from proxy.http._request import PacedRequest
from proxy.http._trace import received_from, request_trace
from proxy.infra import otel
from proxy.infra.backends import current_trace

# Past the grace, what the stop still does is bounded by its steps (runs cut, rows written
# or spooled, connections closed): well within this.
_STOP_BACKSTOP_SECONDS = 30.0


async def _refuse_websocket(scope: WebsocketScope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """The gateway serves no WebSockets: Codex CLI's first try at `/v1/responses` (on its
    `openai` provider) is told so in the path's error shape, and falls back to HTTP (it was a
    500 with two tracebacks logged per try, five tries a turn)."""
    await receive()  # websocket.connect
    path = scope["path"]
    message = f"Unknown endpoint: WebSocket {path} (this gateway serves HTTP only: POST {path})"
    reply = error_reply(GatewayError(ErrorKind.NOT_FOUND, message), dialect_of(path, None))
    if "websocket.http.response" in (scope.get("extensions") or {}):  # hypercorn's, for a refusal
        headers = [(b"content-type", reply.content_type), (b"content-length", b"%d" % len(reply.body))]
        await send({"type": "websocket.http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": reply.body, "more_body": False})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": ""})


class _App(GatewayApp):
    cors: _cors.Cors
    propagate_traces = True  # `[tracing] propagate`
    tracing: otel.Tracing | None = None  # this process's span export, when on
    request_class: type[PacedRequest] = PacedRequest  # its body's time limit is the chat routes' (not BODY_TIMEOUT)

    async def asgi_app(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http" and self.propagate_traces:
            # Every backend call made for the request, in this task or one it starts (an
            # exchange's producer, a durable run), carries its trace.
            token = current_trace.set(request_trace(scope))
            try:
                await self._serve(scope, receive, send)
            finally:
                current_trace.reset(token)
            return
        await self._serve(scope, receive, send)

    async def asgi_app_traced(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        """`asgi_app` with span export on (set in its stead at startup: off, no request
        tests for it): each HTTP request within its server span."""
        tracing = self.tracing
        if scope["type"] != "http" or tracing is None or not tracing.traces(scope["path"]):
            await type(self).asgi_app(self, scope, receive, send)
            return
        trace = tracing.request_span(scope, received_from(scope))
        if (matched := self.front.match(scope["path"])) is not None:  # Quart's routes: `_note_route`
            tracing.routed(trace, scope["method"], matched[0].rule)
        token = current_trace.set(trace)
        watched = _StatusSend(send)
        failed = False
        try:
            await self._serve(scope, receive, watched)
        except BaseException:
            failed = True
            raise
        finally:
            current_trace.reset(token)
            # A response that never ended, with nothing raised: its client went away.
            tracing.end_request(trace, watched.status, cancelled=not (watched.complete or failed))

    async def _serve(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "websocket":
            await _refuse_websocket(scope, receive, send)
            return
        if scope["type"] == "http":
            path = scope["path"]
            if not path.startswith("/") or "//" in path or (path.endswith("/") and path != "/"):
                scope = _normalised(scope)
            # Before anything else, the guard included: a preflight carries no key, and a
            # page from an origin not allowed must not make any route run.
            origin = _cors.origin_of(scope)
            if origin is not None:
                with_cors = await self.cors.admit(origin, scope, send)
                if with_cors is None:
                    return
                send = with_cors
            matched = self.front.match(scope["path"])
            if matched is not None:
                route, params = matched
                await _front.serve(self.gateway, route, params, scope, receive, send)
                return
            # Every response carries the request's id, whatever made it: a route, a hook, an
            # error handler, werkzeug's 404/405/413; and says when it leaves a body unread.
            send = _front.ResponseSend(send, scope, unread_body=True)
        await super().asgi_app(scope, receive, send)


async def _note_route() -> None:
    """A Quart route's rule on its request's span (only with span export on)."""
    rule = request.url_rule
    tracing = cast(_App, current_app).tracing
    if rule is not None and tracing is not None and (trace := current_trace.get()) is not None and trace.span is not None:
        tracing.routed(trace, request.method, rule.rule)


class _StatusSend:
    """`send` noting the response's status and its end, for the request's span (only with
    span export on: it costs a call per message)."""

    __slots__ = ("_send", "complete", "status")

    def __init__(self, send: ASGISendCallable) -> None:
        self._send = send
        self.status: int | None = None
        self.complete = False

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif not message.get("more_body", False):
            self.complete = True
        await self._send(message)


_SLASHES = re.compile(r"/{2,}")
_ORIGIN = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*")


def _normalised(scope: HTTPScope) -> HTTPScope:
    """The path a client meant: `//v1/chat/completions` (a base URL ending in `/`, joined
    to a path by hand) is `/v1/chat/completions`, as behind nginx (`merge_slashes`), and an
    absolute-form target (`POST http://host/v1/...`, which HTTP/1.1 servers must accept)
    is its path. A trailing slash (`/v1/models/`) is answered as the path without it, whatever
    the method: no route's path ends in one, and a redirect (FastAPI's 307) would fail clients
    that follow none (curl without `-L`) and cost the others a round trip. Every layer then
    sees the same path: the guard, the front door, Quart, and the 404 that names it."""
    normalised: dict[str, Any] = {**scope, "path": _path_meant(scope["path"])}
    if (raw := cast(bytes | None, scope.get("raw_path"))) is not None:
        normalised["raw_path"] = _path_meant(raw.decode("latin-1")).encode("latin-1")
    return cast(HTTPScope, normalised)


def _path_meant(path: str) -> str:
    return _SLASHES.sub("/", _ORIGIN.sub("", path)).rstrip("/") or "/"


def create_app(settings: Settings) -> GatewayApp:
    app = _App("llm_proxy", static_folder=None)  # no static files: no route to probe

    class _Request(PacedRequest):
        limits: ClassVar[dict[str, int]] = {  # an upload's own
            _batches.FILES: settings.batches.file_max_bytes + _upload.OVERHEAD, _message_batches.BATCHES: settings.batches.file_max_bytes,
        }

    app.request_class = _Request
    app.front = _front.FrontDoor()
    app.cors = _cors.Cors(settings.cors_origins)
    app.propagate_traces = settings.tracing.propagate
    # Ingesting a large document may take minutes; Quart's 60 s default would cut it silently.
    app.config["RESPONSE_TIMEOUT"] = None
    # Quart cancels the app's nursery this long after the stop reaches the app (5 s by
    # default): the gateway's own tasks (durable runs, the writer, the database) were cut
    # then, whatever `shutdown_grace_seconds` said. They end in the order `open_gateway`
    # gives them, each bounded; this only backs that up.
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = settings.shutdown_grace_seconds + _STOP_BACKSTOP_SECONDS
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.register_blueprint(_openai.blueprint)
    app.register_blueprint(_health.blueprint)
    app.register_blueprint(_ollama.blueprint)
    app.register_blueprint(_anthropic.blueprint)
    app.register_blueprint(_embeddings.blueprint)
    app.register_blueprint(_workspaces.blueprint)
    app.register_blueprint(_keys.blueprint)
    app.register_blueprint(_conversations.blueprint)
    app.register_blueprint(_batches.blueprint)
    app.register_blueprint(_message_batches.blueprint)
    app.register_blueprint(openapi_blueprint)
    for surface in (
        _openai, _stored_completions, _completions, _rerank, _audio, _vllm, _responses, _ollama, _anthropic, _streams,
    ):
        app.front.include(surface.exchanges)
    install_error_handlers(app)
    install_auth(app)
    resources = AsyncExitStack()

    @app.before_serving
    async def startup() -> None:
        # In each process (`--workers`): the exporter's thread does not survive a fork.
        app.tracing = otel.start(settings.tracing, kinds={backend.name: backend.kind for backend in settings.backends})
        if app.tracing is not None:
            app.asgi_app = app.asgi_app_traced  # type: ignore[method-assign]
            app.before_request(_note_route)
        app.gateway = await resources.enter_async_context(open_gateway(settings, app.nursery))
        if app.gateway.batches is not None:
            app.gateway.batches.serve(_batches.dispatcher(app))

    @app.after_serving
    async def shutdown() -> None:
        deadline = app.stopping_by
        if deadline is None:  # served by another server than `proxy.serve`: the grace starts now
            deadline = trio.current_time() + settings.shutdown_grace_seconds
        try:
            await app.gateway.wind_down(deadline)
        finally:
            try:
                await resources.aclose()
            finally:
                if (tracing := app.tracing) is not None:
                    app.tracing = None
                    del app.asgi_app
                    await otel.stop_soon(tracing)

    return app
