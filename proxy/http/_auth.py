"""The guard in front of every route: header limits, API keys, workspace scopes, rate limits.

`admit` runs for every request before any route handles it: from the exchange front door
for its routes, from Quart's `before_request` hook for the others (an unknown path too, so a
caller without a key learns nothing about which paths exist). `/health` and the configured
public paths pass without a key. A wrong or missing key is a 401 in the caller's dialect with
`WWW-Authenticate`; anything outside the key's scope a 403; an exhausted limit a 429 with
`Retry-After`. The exchange front door takes the rate limits (`limit`) once it has read the
body: a request reserves its estimated tokens, known only from its body (its prompt and its
max output tokens), and its record gives them back as it charges the real usage. An admitted
answer carries the `x-ratelimit-*` headers, and an exchange's record the key's id (for usage
accounting and the request log).
"""

from __future__ import annotations

import contextvars
import json
import logging
from functools import partial

import trio
from quart import Response, request

from proxy.dialects._json import loads_object
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.domain.tokens import requested_tokens
from proxy.gateway import Gateway
from proxy.http._context import GatewayApp, gateway, request_head
from proxy.http._errors import Reply, dialect_of, error_reply, response_of
from proxy.http._hangup import want_body
from proxy.http._head import RequestHead
from proxy.services._records import NOTHING_RESERVED, Reserved
from proxy.services.auth import Principal, check_workspace, current_principal
from proxy.services.chat import ChatExchange
from proxy.services.limits import Decision
from proxy.services.workflow import pipeline_tokens

log = logging.getLogger("llm_proxy.http")

_WORKSPACES = "/v1/workspaces"
_KEYS = "/v1/keys"
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_READ_POSTS = ("/search",)  # POSTs under a workspace that only read it
_decision: contextvars.ContextVar[Decision | None] = contextvars.ContextVar("llm_proxy_rate_decision", default=None)
# Paths whose requests reserve tokens at admission: those that generate (prompt and max
# output), those that only read a prompt.
_GENERATING = frozenset({
    "/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/responses/compact", "/v1/completions", "/api/chat",
    "/api/generate",
})
_READING = frozenset({
    "/v1/rerank", "/v2/rerank", "/rerank", "/v1/embeddings", "/api/embed", "/api/embeddings", "/v1/audio/speech",
    "/score", "/v1/score", "/classify", "/v1/classify", "/pooling",  # vLLM's (`_vllm`)
})

_EMBEDDINGS = frozenset({"/v1/embeddings", "/api/embed", "/api/embeddings"})


class _Reservation:
    """The tokens an admitted request reserved, until a record (or the request's end) takes
    them: shared by the request's tasks, so that they are settled once."""

    __slots__ = ("reserved",)

    def __init__(self, reserved: Reserved) -> None:
        self.reserved = reserved

    def take(self) -> Reserved:
        reserved, self.reserved = self.reserved, NOTHING_RESERVED
        return reserved


_reservation: contextvars.ContextVar[_Reservation | None] = contextvars.ContextVar(
    "llm_proxy_token_reservation", default=None
)


def credentials(head: RequestHead) -> list[str]:
    """The keys the request presents: `Authorization: Bearer KEY`, then `x-api-key: KEY`."""
    found: list[str] = []
    authorization = head.header("authorization") or ""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        found.append(value.strip())
    api_key = (head.header("x-api-key") or "").strip()
    if api_key and api_key not in found:
        found.append(api_key)
    return found


def _refusal(error: GatewayError, head: RequestHead, presented: bool = False) -> Reply:
    reply = error_reply(error, dialect_of(head.path, head.header("anthropic-version")), head.request_id())
    if error.kind is ErrorKind.AUTHENTICATION:
        challenge = 'Bearer realm="llm-proxy"'
        if presented:
            challenge += ', error="invalid_token"'
        reply.headers.append((b"www-authenticate", challenge.encode()))
    return reply


def request_workspaces(head: RequestHead) -> list[tuple[str, str | None]]:
    """Every workspace a request names, with the header that names it (a refusal's `param`):
    `x-workspace`, and the `{ws}` of a `/v1/workspaces/{ws}/...` path, which no header names
    (both are checked: one must not vouch for the other)."""
    named: list[tuple[str, str | None]] = []
    header = head.header("x-workspace")
    if header:
        named.append((header, "x-workspace"))
    path = head.path
    if path.startswith(_WORKSPACES + "/"):
        in_path = path[len(_WORKSPACES) + 1 :].split("/", 1)[0]
        if in_path:
            named.append((in_path, None))
    return named


def _check_scopes(principal: Principal, head: RequestHead) -> None:
    """Workspaces: the one named must be in the key's scope (changing its documents needs an
    admin key); the bare collection (listing, or creating a workspace named in the body) needs
    a key not limited to some workspaces."""
    path = head.path
    in_workspaces = path == _WORKSPACES or path.startswith(_WORKSPACES + "/")
    manage = in_workspaces and head.method not in _READS and not path.endswith(_READ_POSTS)
    workspaces = request_workspaces(head)
    for workspace, param in workspaces:
        check_workspace(workspace, manage=manage, param=param)
    if path == _WORKSPACES:
        if principal.workspaces is not None:
            raise GatewayError(
                ErrorKind.PERMISSION,
                "This API key is limited to some workspaces; it may not list or create workspaces.",
                code="workspace_not_allowed",
            )
        if manage and not principal.admin:
            check_workspace("*", manage=True)
    elif not workspaces and principal.workspaces is not None and (head.header("x-route") or "").strip().lower() == "rag":
        raise GatewayError(
            ErrorKind.PERMISSION,
            "This API key is limited to some workspaces: name one with `x-workspace`.",
            param="x-workspace",
            code="workspace_not_allowed",
        )


async def admit(gw: Gateway, head: RequestHead, *, limits: bool = True) -> Reply | None:
    """Check a request before any route handles it; None: it may go on, with its principal
    (if any) in `current_principal`. Otherwise the refusal to send, in the path's dialect.
    Without `limits`, the caller takes the rate limits itself (`limit`), once it has the body."""
    current_principal.set(None)
    _decision.set(None)
    _reservation.set(None)
    most = gw.settings.max_header_bytes
    if head.header_bytes > most:
        reply = _refusal(
            GatewayError(
                ErrorKind.INVALID_REQUEST,
                f"The request's headers are too large (more than {most} bytes).",
                code="headers_too_large",
            ),
            head,
        )
        reply.status = 431
        return reply
    if head.header("transfer-encoding") is not None and head.header("content-length") is not None:
        return _ambiguous_length(head)
    authenticator = gw.auth
    path = head.path
    hosts = gw.hosts
    if hosts is not None and (authenticator is None or authenticator.enabled() is False) and path != "/health":
        host = head.header("host")
        if not hosts.allows(host):
            return _refusal(_foreign_host(host or ""), head)
        # A page let in as the gateway's own: the name its browser used, which a proxy in
        # front may have replaced in `Host` (nginx's default sends its upstream's address).
        page = head.page_host
        if page and not hosts.allows(page):
            return _refusal(_foreign_host(page), head)
    if authenticator is None or path == "/health" or path in gw.settings.auth_public_paths:
        return None
    presented = credentials(head)
    try:
        if head.internal:  # a batch's line: its key's, as when the batch was created
            principal = authenticator.authenticate_id(head.on_behalf_of)
        else:
            principal = await authenticator.authenticate_fresh(presented)
        if principal is None:
            return None
        current_principal.set(principal)
        _check_scopes(principal, head)
        if path == "/metrics" and gw.settings.metrics_admin_only and not principal.admin:
            raise GatewayError(
                ErrorKind.PERMISSION,
                "Reading /metrics needs an admin key (`llm-proxy keys create --admin`): `metrics_admin_only` is on.",
                code="admin_key_required",
            )
    except GatewayError as error:
        return _refusal(error, head, bool(presented))
    return await limit(gw, head, None) if limits else None


def _ambiguous_length(head: RequestHead) -> Reply:
    """A request with both `Content-Length` and `Transfer-Encoding`: a proxy in front that
    framed it by the other header sent what follows as the next request (request smuggling).
    RFC 9112 §6.1 asks the server to close the connection after its answer whatever it does;
    it is refused (as an error, which the RFC says it ought to be), and closed."""
    reply = _refusal(
        invalid_request(
            "The request has both `Content-Length` and `Transfer-Encoding`: its length is ambiguous. Send one of them.",
            code="ambiguous_request_length",
        ),
        head,
    )
    reply.headers.append((b"connection", b"close"))
    return reply


_warned_hosts: set[str] = set()


def _foreign_host(host: str) -> GatewayError:
    # Behind a reverse proxy that passes its own Host this is every request: the operator
    # must learn the setting from the log as the client does from the answer.
    if len(_warned_hosts) < 64 and host not in _warned_hosts:  # an attacker's page may loop
        _warned_hosts.add(host)
        log.warning("refused requests for Host %r: no API key is asked and it is not in allowed_hosts", host)
    return GatewayError(
        ErrorKind.PERMISSION,
        f"Host {host!r} is not allowed: while it asks no API key, this gateway answers only requests "
        "addressed to this machine (localhost, an IP address, a name without a dot). Add the name to "
        "`allowed_hosts` (LLM_PROXY_ALLOWED_HOSTS), e.g. the public name a reverse proxy passes on.",
        code="host_not_allowed",
    )


def reserves_tokens(head: RequestHead) -> bool:
    """Whether the admitted request's rate limits need its body (`limit`): it reserves tokens."""
    principal = current_principal.get()
    return (
        principal is not None and (principal.tpm is not None or principal.budget is not None)
        and head.method not in _READS
        and (head.path in _GENERATING or head.path in _READING)
    )


async def limit(gw: Gateway, head: RequestHead, body: bytes | None) -> Reply | None:
    """Take the request of the admitted key (`admit`) from its rate limits, reserving the
    tokens `body` asks for; None: it may go on. Otherwise the 429 to send."""
    principal, limiter = current_principal.get(), gw.limits
    if limiter is None or principal is None or not principal.limited or head.method in _READS or _unmetered(head):
        return None
    tokens = least = 0
    data: object = None
    if body and reserves_tokens(head):
        data, tokens, least = await _requested(body, generates=head.path in _GENERATING)
        if data is not None:
            if head.path in _GENERATING:
                tokens = _pipeline_tokens(gw, head, data, tokens)
            if head.path in _EMBEDDINGS and gw.embeddings is not None:
                ceiling = gw.embeddings.local_ceiling(data)
                if ceiling is not None:  # the local model cuts a long input: it costs no more
                    tokens, least = min(tokens, ceiling), min(least, ceiling)
    decision = await limiter.admit(principal, tokens, least)
    _decision.set(decision)
    if not decision.allowed:
        # The refusal names the model, as OpenAI's does (a key limited per request only
        # parses its body here, refused).
        if data is None and body:
            data = _parsed(body)
        model = data.get("model") if isinstance(data, dict) else None
        reply = _refusal(decision.error(principal, model if isinstance(model, str) and model else None), head)
        reply.headers.extend((k.encode(), v.encode()) for k, v in decision.headers)
        return reply
    if decision.reserved or decision.budget_reserved:
        _reservation.set(_Reservation(Reserved(decision.reserved, decision.budget_reserved, decision.budget_from)))
    return None


def _pipeline_tokens(gw: Gateway, head: RequestHead, data: object, tokens: int) -> int:
    """A workflow request's reservation: what its pipeline's models spend together, not one's."""
    pipeline = head.header("x-pipeline") or None
    route = (head.header("x-route") or "").strip().lower()
    if route not in ("", "workflow"):
        return tokens
    if pipeline is None and route == "workflow":
        pipeline = gw.settings.workflow.default_pipeline
    if pipeline is None:
        return tokens
    config = gw.settings.workflow.pipelines.get(pipeline)
    return pipeline_tokens(data, config.options if config is not None else {}, tokens)


# Bodies past which a reservation's reading is done in a worker thread: a LangChain batch of
# token arrays (10 MB) took a seventh of a second to parse and count, every stream stalled.
_OFF_LOOP_BODY = 512 * 1024


async def _requested(body: bytes, *, generates: bool) -> tuple[object, int, int]:
    """`body` parsed (None: not a JSON object, its route refuses it) and the tokens it asks for."""
    if len(body) <= _OFF_LOOP_BODY:
        return _read_request(body, generates, yielding=False)
    return await trio.to_thread.run_sync(partial(_read_request, body, generates, yielding=True))


def _read_request(body: bytes, generates: bool, *, yielding: bool) -> tuple[object, int, int]:
    if not yielding:
        data = _parsed(body)
    else:
        try:  # its numbers through Python code: the thread lets the loop have the GIL meanwhile
            data = loads_object(body, yielding=True)
        except GatewayError:
            data = None
    if data is None:
        return None, 0, 0
    tokens, least = requested_tokens(data, generates=generates)
    return data, tokens, least


def _parsed(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # its codec refuses it (400): nothing to reserve
        return None


def take_reservation() -> Reserved:
    """The tokens the current request reserved, for the record that settles them (once)."""
    reservation = _reservation.get()
    return reservation.take() if reservation is not None else NOTHING_RESERVED


def settle_reservation(gw: Gateway) -> None:
    """The request ended: a reservation no record took is given back."""
    principal, limiter, reserved = current_principal.get(), gw.limits, take_reservation()
    if reserved != NOTHING_RESERVED and principal is not None and limiter is not None:
        limiter.settle(principal, reserved)


def give_back_admission(gw: Gateway) -> None:
    """The admitted request was refused 403 (a model or workspace outside its key's scope,
    known only from its body): its admission goes back to the key's request bucket."""
    decision, principal, limiter = _decision.get(), current_principal.get(), gw.limits
    if decision is None or not decision.allowed or principal is None or limiter is None:
        return
    _decision.set(None)  # once
    limiter.give_back(principal)


def granted_headers() -> list[tuple[bytes, bytes]]:
    """The `x-ratelimit-*` headers of the admitted request, if a limit applied."""
    decision = _decision.get()
    if decision is None or not decision.allowed:
        return []
    return [(k.encode(), v.encode()) for k, v in decision.headers]


def stamp_exchange(exchange: ChatExchange) -> None:
    """The admitted key onto its exchange: the record feeds the usage hook and the log."""
    principal = current_principal.get()
    if principal is None:
        return
    exchange.record.api_key_id = principal.id
    exchange.record.reserved = take_reservation()
    if exchange.meta.idempotency_key is not None:
        # A client names its own requests: another key's same name must not replay
        # (or, with another body, reveal) this key's answer.
        exchange.meta.idempotency_key = f"key-{principal.id}:{exchange.meta.idempotency_key}"
    exchange.response_headers.extend(granted_headers())


# `/api/show` is a read Ollama makes a POST: clients show every model they list (Open WebUI,
# VS Code), which must not spend the requests a key has for its chats. Counting tokens is free
# at Anthropic and OpenAI, and Claude Code's VS Code extension counts dozens of times at start;
# vLLM's tokenizer is the same count (and its inverse), free likewise.
_UNMETERED = (_KEYS, "/v1/files", "/v1/batches", "/v1/messages/batches", "/v1/conversations", "/api/show")
_COUNTS = frozenset({"/v1/messages/count_tokens", "/v1/responses/input_tokens", "/tokenize", "/detokenize"})
_RESPONSES = "/v1/responses/"
# A stored chat completion's own path (`POST` changes its metadata, `DELETE` removes it): the
# chat itself is `/v1/chat/completions`, without the slash.
_STORED_COMPLETION = "/v1/chat/completions/"


def _unmetered(head: RequestHead) -> bool:
    """The keys API, files, batches, conversations, a model's details, token counts,
    cancelling or deleting a stored response, changing or deleting a stored chat completion:
    not metered by the key's rate limits or budget (they meter model calls), so that revoking
    a leaked key never waits for the admin key's next period, a key whose limits are spent may
    still stop the run spending them and delete what it stored, and a batch's upload and
    creation do not take what its lines will need (each line is metered as the key's request)."""
    path = head.path
    if path in _COUNTS:
        return True
    if path.startswith(_RESPONSES):
        return head.method == "DELETE" or path.endswith("/cancel")
    if path.startswith(_STORED_COMPLETION):
        return True
    return any(path == prefix or path.startswith(prefix + "/") for prefix in _UNMETERED)


def install_auth(app: GatewayApp) -> None:
    """The guard for the Quart-served routes (the exchange front door calls `admit` itself)."""

    @app.before_request
    async def guard() -> Response | None:
        gw, head = gateway(), request_head()
        refusal = await admit(gw, head, limits=False)
        if refusal is None:
            await want_body()
            # Kept for the route, which reads it again (embeddings: their input is reserved).
            body = await request.get_data(cache=True, as_text=False, parse_form_data=False) if reserves_tokens(head) else None
            refusal = await limit(gw, head, body)
        return None if refusal is None else response_of(refusal)

    @app.after_request
    async def stamp(response: Response) -> Response:
        if response.status_code == 403:
            give_back_admission(gateway())
        for name, value in granted_headers():
            response.headers.add(name.decode(), value.decode())
        settle_reservation(gateway())  # what no record took (the routes' own run before this)
        return response
