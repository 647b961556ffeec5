"""The OpenAI Responses surface: `POST /v1/responses`, translated to a chat exchange.

Any backend answers it (OpenAI-compatible, Ollama, Anthropic, the RAG and workflow routes),
with everything an exchange brings (idempotency, caches, the journal, limits, metrics). A
response is read back from the journal while it keeps it (whole, or its stream resumed); a
background one runs durably, polled for, and can be cancelled or deleted on any instance. The
gateway continues a response it journalled (`previous_response_id`) or a stored conversation
(`conversation`, see `_conversations`), lists its input items, and takes its items by
reference (`item_reference`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs

import trio
from hypercorn.typing import ASGISendCallable

from proxy.config import BackendConfig
from proxy.dialects import anthropic, responses
from proxy.dialects._json import dumps, is_decimal, loads_object
from proxy.dialects.events import RUN_CANCELLED, Finished, WireEvent
from proxy.dialects.openai import stored as openai_stored
from proxy.domain.chat import ChatCompletion, ChatRequest, Message, OpaquePart
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.domain.events import CompletionBuilder, StreamEvent, StreamFailed, StreamStart
from proxy.domain.fingerprint import message_from_canonical, message_to_canonical
from proxy.domain.ids import is_trace_id
from proxy.http._conversations import (
    ConversationLock,
    conversation_appender,
    conversation_item,
    join_conversation,
)
from proxy.http._counted import record_answered
from proxy.http._errors import Reply, error_reply, register_dialect_errors
from proxy.http._exchange import (
    SSE_HEADERS,
    DirectBody,
    ExchangeBody,
    Headers,
    JsonSink,
    RenderedStreamSink,
)
from proxy.http._front import FrontDoor, Incoming, send_reply
from proxy.http._head import current_tenant, request_meta
from proxy.http._logprobs import refuse_logprobs_without_backend
from proxy.http._openai import OpenAIExchangeBody
from proxy.http._streams import EventsBody
from proxy.infra.backends import Batch
from proxy.infra.backends._anthropic import count_tokens
from proxy.infra.chat_store import StoredRun
from proxy.services._contracts import ANSWER_HEADERS
from proxy.services.chat import ChatExchange, ExchangeSink
from proxy.services.persistence import Persistence
from proxy.services.rag import counted_as_sent

exchanges = FrontDoor()

# Longest wait for an ended run's row (its write is a group commit, a few milliseconds).
_ROW_WAIT_SECONDS = 5.0

# Errors in OpenAI's shape, as on every OpenAI path, naming the Responses request's fields; the
# registration names the dialect, so a request refused before its exchange is logged and counted
# as this surface's too.
register_dialect_errors(responses.DIALECT, ("/v1/responses",), responses.render_error)


class ResponsesJsonSink(JsonSink):
    dialect = responses.DIALECT

    def __init__(
        self, send: ASGISendCallable, headers: Headers, *, response: str, model: str, settings: dict[str, Any],
        created_at: int,
    ) -> None:
        super().__init__(send, headers)
        self._response = response
        self._model = model
        self._settings = settings
        self._created_at = created_at

    async def write(self, batch: Batch) -> None:
        completion = batch.whole()
        await self._json(
            responses.render_response(
                completion, response=_answering(self.extra_headers, self._response), model=self._model,
                settings=self._settings,
                created_at=self._created_at, completed_at=int(time.time()),
            )
        )


class ResponsesStreamSink(RenderedStreamSink):
    """The stream's renderer is made when it starts: by then the exchange knows which run
    answers (its own, or the one it replays or attaches to)."""

    def __init__(
        self, send: ASGISendCallable, headers: Headers, *, response: str, model: str, settings: dict[str, Any]
    ) -> None:
        super().__init__(
            send, headers, responses.StreamRenderer(response=response, model=model, settings=settings),
            content_headers=SSE_HEADERS, dialect=responses.DIALECT,
        )
        self._response = response
        self._model = model
        self._settings = settings

    async def start(self) -> None:
        answering = _answering(self.extra_headers, self._response)
        if answering != self._response:
            self._renderer = responses.StreamRenderer(response=answering, model=self._model, settings=self._settings)
        await super().start()


def _answering(headers: Headers, own: str) -> str:
    """The Response's id: its run's trace (`x-trace-id`), which an idempotent replay, a
    cache hit or a duplicate attached to a running request takes from the run answering it,
    so that the id reads that run back (`GET /v1/responses/{id}`)."""
    trace = next((value for name, value in headers if name == b"x-trace-id"), None)
    return responses.response_id(trace.decode("latin-1")) if trace else own


async def _parsed(
    incoming: Incoming, *, compaction: bool = False, counting: bool = False
) -> responses.ResponsesRequest:
    """A Responses body parsed, its `item_reference`s looked up and the response it
    continues (`previous_response_id`) put before its input."""
    persistence = incoming.gateway.persistence
    try:
        parsed = responses.parse_responses_request(incoming.body, compaction=compaction, counting=counting)
    except responses.UnresolvedReferences as unresolved:
        # Parsed again, with the items its references name: only a request that has any.
        referenced = await referenced_items(persistence, unresolved.references)
        parsed = responses.parse_responses_request(incoming.body, referenced, compaction=compaction, counting=counting)
    if parsed.previous is not None:
        await _continue(persistence, parsed, parsed.previous)
    return parsed


@exchanges.route("/v1/responses")
async def create_response(incoming: Incoming) -> ExchangeBody:
    persistence = incoming.gateway.persistence
    parsed = await _parsed(incoming)
    if parsed.compaction_triggered:
        return _triggered_compaction(incoming, parsed)
    own, seen = None, 0
    if parsed.conversation is not None:
        own = replace(parsed.chat, extra={**parsed.chat.extra, "conversation": parsed.conversation})
        seen = await join_conversation(persistence, parsed, parsed.conversation)
    request = parsed.chat
    meta = request_meta(incoming.head)
    if not parsed.settings["store"]:
        # Kept for nobody, as on OpenAI: not in the caches either, whose hits are answered with
        # the id of the response they keep (one that must then be read back, and continued).
        meta.cache = "off"
    response = responses.response_id(meta.trace_id)
    if parsed.background:
        if persistence is None:
            raise invalid_request(
                "`background: true` needs the gateway's journal (PostgreSQL and NATS), and this gateway runs without.",
                param="background", code="unsupported_parameter",
            )
        # A keyed run is durable: it goes on when its client leaves, and its journal holds
        # the events a client reads back with `GET /v1/responses/{id}?stream=true`.
        meta.idempotency_key = meta.idempotency_key or response
    exchange = incoming.gateway.chat.exchange(request, meta, relay_openai=False)
    if request.params.logprobs or _has_files(request):
        exchange.adapt_with(_for_backend)
    if parsed.conversation is not None and persistence is not None:
        tenant = current_tenant()
        # One response at a time answers in a conversation (OpenAI's `conversation_locked`).
        lock = exchange.run_lock = ConversationLock(persistence, parsed.conversation, tenant, seen)
        exchange.on_answer = conversation_appender(persistence, parsed, tenant, lock)
        exchange.identity = own  # without the conversation's items, which its answer adds to
        # Nor the semantic cache: a hit names the response that made its answer, and this
        # turn's items would go into the conversation under that response's ids.
        exchange.semantic_cache = None
    model, settings = request.model, parsed.settings
    if settings["truncation"] == "auto":
        catalog = incoming.gateway.catalog
        exchange.truncate(lambda route: catalog.window(route.backend, route.upstream_model))
    exchange.settings = settings  # journalled: the Response read back echoes them too
    headers: Headers = [(b"x-request-id", meta.request_id.encode())]
    if parsed.background and not parsed.stream:
        return _Background(
            exchange, headers, response=response, model=model, settings=settings,
            persistence=persistence,
        )
    # The answering backend's request id, limits and retry advice, as on `/v1/chat/completions`.
    backends = incoming.gateway.backends
    if parsed.stream:
        return OpenAIExchangeBody(exchange, lambda send: ResponsesStreamSink(
            send, headers, response=response, model=model, settings=settings,
        ), backends)
    created_at = int(time.time())
    return OpenAIExchangeBody(exchange, lambda send: ResponsesJsonSink(
        send, headers, response=response, model=model, settings=settings, created_at=created_at,
    ), backends)


def _for_backend(request: ChatRequest, backend: BackendConfig | None) -> ChatRequest:
    """The request as is for each backend it goes to, or a 400 for log probabilities or a
    file one has none of."""
    refuse_logprobs_without_backend(request, backend, field="include")
    if backend is None or backend.kind != "openai":
        _refuse_files(request, backend)
    return request


def _is_file(part: object) -> bool:
    """An `input_file` (the other opaque part a Responses request has is a Claude backend's signed
    thinking given back, which only an Anthropic backend is sent)."""
    return isinstance(part, OpaquePart) and part.data.get("type") == "file"


def _has_files(request: ChatRequest) -> bool:
    return any(_is_file(part) for message in request.messages for part in message.content)


def _refuse_files(request: ChatRequest, backend: BackendConfig | None) -> None:
    """An `input_file` a backend other than an OpenAI-compatible one cannot read (an
    Anthropic backend reads a PDF, as a document): a 400 naming it, not an answer given
    without the file."""
    for message in request.messages:
        for part in message.content:
            if not isinstance(part, OpaquePart) or not _is_file(part):
                continue
            if backend is not None and backend.kind == "anthropic" and anthropic.openai_file_document(part.data):
                continue
            served = f"is served by backend `{backend.name}` ({backend.kind})" if backend else "is answered by a workflow"
            where = part.at or "input"
            raise invalid_request(
                f"`{where}` is an `input_file` that model `{request.model}` cannot read: it {served}. An "
                "OpenAI-compatible backend takes any file, an Anthropic one a PDF (`data:application/pdf;base64,...`).",
                param=where, code="unsupported_content_part",
            )


class CompactionJsonSink(JsonSink):
    dialect = responses.DIALECT

    def __init__(self, send: ASGISendCallable, headers: Headers, *, response: str, kept: list[Message]) -> None:
        super().__init__(send, headers)
        self._response = response
        self._kept = kept
        self._created_at = int(time.time())

    async def write(self, batch: Batch) -> None:
        completion = batch.whole()
        kept = responses.input_items(
            [message_to_canonical(message) for message in self._kept], self._response, instructions=None
        )
        await self._json(responses.compacted_object(
            completion, response=self._response, kept=kept, usage=responses.usage_to_wire(completion.usage),
            created_at=self._created_at,
        ))


class TriggeredCompactionSink(ResponsesJsonSink):
    """The answer to a `compaction_trigger`: a Response whose one output item is the
    `compaction`, whole or as its stream (sent once the summary is written)."""

    def __init__(
        self, send: ASGISendCallable, headers: Headers, *, response: str, model: str, settings: dict[str, Any],
        stream: bool,
    ) -> None:
        super().__init__(send, headers, response=response, model=model, settings=settings, created_at=int(time.time()))
        self._stream = stream

    async def write(self, batch: Batch) -> None:
        completion = batch.whole()
        response = _answering(self.extra_headers, self._response)  # a keyed replay's: its run's
        body = responses.response_object(
            response=response, created_at=self._created_at, model=self._model, settings=self._settings,
            status="completed", output=[responses.compaction_answer(completion, response)],
            usage=responses.usage_to_wire(completion.usage),
        )
        body["completed_at"] = int(time.time())
        if self._stream:
            await self._json(responses.whole_stream(body), b"text/event-stream; charset=utf-8")
        else:
            await self._json(dumps(body))


def _summarizing(incoming: Incoming, request: ChatRequest) -> tuple[ChatExchange, str, Headers]:
    """The exchange of a compaction's summary request (`compaction_request`), fitted to the
    model's window as `truncation: "auto"` would; its response id and answer headers."""
    meta = request_meta(incoming.head)
    meta.cache = "off"  # a summary holds for its conversation alone: the semantic cache would give another's
    exchange = incoming.gateway.chat.exchange(request, meta, relay_openai=False)
    if _has_files(request):
        exchange.adapt_with(_for_backend)
    catalog = incoming.gateway.catalog
    exchange.truncate(lambda route: catalog.window(route.backend, route.upstream_model))
    return exchange, responses.response_id(meta.trace_id), [(b"x-request-id", meta.request_id.encode())]


def _triggered_compaction(incoming: Incoming, parsed: responses.ResponsesRequest) -> ExchangeBody:
    """Codex CLI's compaction on OpenAI: its input, ended by `{"type": "compaction_trigger"}`,
    summarized as `/v1/responses/compact` does; the answer's one item is the `compaction`."""
    for name, given in (("conversation", parsed.conversation is not None), ("background", parsed.background)):
        if given:
            raise invalid_request(f"`{name}` does not go with a `compaction_trigger` input item.", param=name)
    request, _kept = responses.compaction_request(parsed.chat)
    # The item is sent whole, once written.
    exchange, response, headers = _summarizing(incoming, replace(request, stream=False))
    model, settings, stream = parsed.chat.model, parsed.settings, parsed.stream
    # Journalled so: read back, its answer is the `compaction` item, continued its summary alone.
    exchange.settings = {**settings, responses.COMPACTED: True}
    return OpenAIExchangeBody(
        exchange,
        lambda send: TriggeredCompactionSink(send, headers, response=response, model=model, settings=settings, stream=stream),
        incoming.gateway.backends,
    )


@exchanges.route("/v1/responses/compact")
async def compact_response(incoming: Incoming) -> ExchangeBody:
    """OpenAI's compaction (`client.responses.compact`, the Agents SDK's
    `OpenAIResponsesCompactionSession`): the model summarizes the conversation (`input`, or
    that of `previous_response_id`), fitted to its window as `truncation: "auto"` would; the
    answer is the conversation's user messages and a `compaction` item holding the summary,
    which later requests take as input."""
    parsed = await _parsed(incoming, compaction=True)
    for name, given in (("conversation", parsed.conversation is not None), ("stream", parsed.stream), ("background", parsed.background)):
        if given:
            raise invalid_request(f"`{name}` is not a parameter of `/v1/responses/compact`.", param=name)
    if len(parsed.chat.messages) == (1 if parsed.settings.get("instructions") else 0):
        raise invalid_request("Nothing to compact: the conversation has no items.", param="input")
    request, kept = responses.compaction_request(parsed.chat)
    exchange, response, headers = _summarizing(incoming, request)
    return OpenAIExchangeBody(
        exchange, lambda send: CompactionJsonSink(send, headers, response=response, kept=kept), incoming.gateway.backends,
    )


@exchanges.route("/v1/responses/input_tokens", kind="count_tokens")
async def count_input_tokens(incoming: Incoming) -> Reply:
    """OpenAI's `client.responses.input_tokens.count`: the input tokens of the request
    `responses.create` would send for this body (its instructions, tools, `item_reference`s,
    and the response or conversation it continues), counted as `/v1/messages/count_tokens`
    counts them: by the backend's own tokenizer where it has one, else the gateway's
    estimate (said by `x-token-count: estimate`). Nothing is generated: no usage is charged."""
    parsed = await _parsed(incoming, counting=True)
    for name, given in (("stream", parsed.stream), ("background", parsed.background)):
        if given:
            raise invalid_request(f"`{name}` is not a parameter of `/v1/responses/input_tokens`.", param=name)
    if parsed.conversation is not None:
        await join_conversation(incoming.gateway.persistence, parsed, parsed.conversation)
    meta = request_meta(incoming.head)
    route = incoming.gateway.router.resolve(parsed.chat.model)
    request, rag_headers = await counted_as_sent(incoming.gateway.rag, meta, parsed.chat)
    count = await count_tokens(incoming.gateway.backends[route.backend], request, route.upstream_model)
    headers: Headers = [(b"x-request-id", meta.request_id.encode()), *rag_headers]
    if count.estimated:
        headers.append((b"x-token-count", b"estimate"))
    record_answered(incoming.gateway, meta, kind="count_tokens", dialect=responses.DIALECT, model=request.model, route=route)
    return Reply(dumps({"object": "response.input_tokens", "input_tokens": count.input_tokens}), headers=headers)


async def _continue(persistence: Persistence | None, parsed: responses.ResponsesRequest, previous: str) -> None:
    """`previous_response_id`: the conversation and answer of a response the journal keeps
    (on any instance, the tenant's own) go before this request's input."""
    trace_id = previous.removeprefix("resp_")
    # OpenAI's 400 (not a 404: the request is at fault, not its path).
    missing = invalid_request(
        f"Previous response with id '{previous}' not found. {_kept(persistence)}",
        param="previous_response_id", code="previous_response_not_found",
    )
    if persistence is None or trace_id == previous or not trace_id:
        raise missing
    try:
        stored = await _found(persistence, trace_id, previous)
    except GatewayError as error:
        raise missing if error.kind is ErrorKind.NOT_FOUND else error from None
    if stored.status == "running":
        raise invalid_request(
            f"Previous response '{previous}' is still in progress: continue it once it has ended.",
            param="previous_response_id",
        )
    messages = await _stored_messages(persistence, trace_id) if stored.status == "completed" else None
    if stored.completion is None or messages is None:
        raise invalid_request(
            f"Previous response '{previous}' has no answer to continue (it ended {stored.status}).",
            param="previous_response_id",
        )
    if not parsed.chat.model:  # a count that named none: the model of the response it continues
        parsed.chat.model = stored.model or stored.completion.model
    prior = [message_from_canonical(message) for message in messages]
    if (stored.settings or {}).get("instructions") and prior and prior[0].role == "system":
        prior = prior[1:]  # its instructions: not carried over
    responses.continued(parsed, prior, stored.completion, compacted=_compacted(stored.settings))
    # Its own row says how many of its messages were carried over: the response it continued
    # may be deleted, or expire, before it.
    parsed.settings[responses.CONVERSATION_PREFIX] = _carried(stored, messages)


class _Background(ExchangeBody):
    """A background response (`background: true` without `stream`): its run started in the
    app's Runs nursery, and answered at once, queued; the client polls `GET /v1/responses/{id}`."""

    def __init__(
        self, exchange: ChatExchange, headers: Headers, *, response: str, model: str, settings: dict[str, Any],
        persistence: Persistence | None,
    ) -> None:
        super().__init__(exchange, _no_sink)
        self._persistence = persistence
        self._headers = headers
        self._response = response
        self._model = model
        self._settings = settings

    async def run(self, send: ASGISendCallable) -> None:
        try:
            started = await self.exchange.detach()
        except GatewayError as error:
            await send_reply(send, error_reply(error, responses.DIALECT))
            return
        headers = [*self._headers, *self.exchange.response_headers]
        response = _answering(self.exchange.response_headers, self._response)
        persistence = self._persistence
        if not started and persistence is not None:
            # A repeat of a keyed request: the response its first request made, as it stands.
            try:
                stored = await _found(persistence, response.removeprefix("resp_"), response)
            except GatewayError:
                pass  # a run of another instance whose row is not written yet: it is queued
            else:
                reply = _rendered(stored, response)
                await send_reply(send, Reply(reply.body, headers=headers))
                return
        queued = responses.response_object(
            response=response, created_at=int(time.time()), model=self._model, settings=self._settings,
            status="queued", output=[],
        )
        await send_reply(send, Reply(dumps(queued), headers=headers))


def _no_sink(send: ASGISendCallable) -> ExchangeSink:
    raise AssertionError("a background response writes no stream")


# -- reading a response back ------------------------------------------------------------------------


def _addressed(incoming: Incoming) -> tuple[str, str, Persistence]:
    """The response a route's path names, its run's trace id and the journal that keeps it;
    404 for an id this gateway never makes, or without a journal."""
    response = incoming.params["response_id"]
    trace_id = response.removeprefix("resp_")
    persistence = incoming.gateway.persistence
    if persistence is None or trace_id == response or not is_trace_id(trace_id):
        raise _not_found(response, persistence)
    return response, trace_id, persistence


@exchanges.route("/v1/responses/<response_id>", method="GET", kind=None)
async def retrieve_response(incoming: Incoming) -> DirectBody | Reply:
    """A response read back from the journal while it keeps it: whole (its row), or with
    `stream=true` its stream again, from the event after `starting_after` (OpenAI's resume)."""
    response, trace_id, persistence = _addressed(incoming)
    query = parse_qs(incoming.head.query.decode("latin-1"))
    if (query.get("stream") or ["false"])[0].lower() != "true":
        return await _whole(persistence, trace_id, response)
    # A browser's EventSource reconnects to the URL it opened, saying in `Last-Event-ID` (the
    # frames' `id`) how far it got.
    last_event_id = incoming.head.header("last-event-id") or None
    raw_after = last_event_id or (query.get("starting_after") or ["-1"])[0]
    if not is_decimal(raw_after.removeprefix("-")) or int(raw_after) < -1:
        raise invalid_request("`starting_after` must be a sequence number (an integer, 0 or more).", param="starting_after")
    stored = await _stored(persistence, trace_id)
    live = persistence.runs.live.get(trace_id)
    # A run of this instance whose row is not written yet has its settings with its events.
    settings = stored.settings if stored is not None else live.settings if live is not None else None
    if not responses.readable(settings) or (stored is not None and stored.deleted):
        raise _not_found(response, persistence)
    after = int(raw_after)
    if _compacted(settings) and stored is not None and stored.status == "completed" and stored.completion is not None:
        # A `compaction_trigger`'s answer, streamed whole once written: so again, its one item.
        whole = loads_object(_rendered(stored, response).body, "response")
        return Reply(_numbered(responses.whole_stream(whole), after), content_type=b"text/event-stream; charset=utf-8")
    # Its own times, as read whole: not the resume's.
    created_at = _created_at(stored) if stored is not None and stored.completion is not None else None
    completed_at = _completed_at(stored) if stored is not None and stored.status != "running" else None
    framer = _ResumeFramer(
        response, stored.model if stored else "", after, _echoed(settings), created_at=created_at,
        completed_at=completed_at,
    )
    # From the start, its events rebuilt from its row are its stream; after an event, only
    # the events as they streamed are numbered as its client saw them.
    resumed = f"read it whole with `GET /v1/responses/{response}`" if after >= 0 else None
    return EventsBody(
        persistence, trace_id, 0, current_tenant(), framer, resumed=resumed, not_found=_not_found(response, persistence),
        hold_head=last_event_id is not None,
    )


async def _stored(persistence: Persistence, trace_id: str) -> StoredRun | None:
    """The response's row; a 503 when the journal cannot be read, unless its run is here."""
    try:
        return await persistence.stored_run(trace_id)
    except GatewayError:
        if trace_id in persistence.runs.live:
            return None  # the run itself answers
        raise


async def _whole(persistence: Persistence, trace_id: str, response: str) -> Reply:
    return _rendered(await _found(persistence, trace_id, response), response)


async def _found(persistence: Persistence, trace_id: str, response: str) -> StoredRun:
    """The response's row, if it is the tenant's; for a run of this instance whose row is
    not written yet, the run as it stands."""
    if not is_trace_id(trace_id):
        raise _not_found(response, persistence)  # no store is asked (a NUL in it is no outage)
    live = persistence.runs.live.get(trace_id)
    await _row_written(persistence, trace_id)
    stored = await _stored(persistence, trace_id)
    if stored is None and live is not None and live.closed:
        # It ended while its row was being read: read again once the row is written.
        with trio.move_on_after(_ROW_WAIT_SECONDS):
            await live.written.wait()
        stored = await _stored(persistence, trace_id)
    here = _running_here(persistence, trace_id)
    if stored is None and here is None:
        stored = await persistence.row_coming(trace_id)
    if stored is None:
        stored = here
    elif stored.status == "running" and here is not None:
        stored = replace(stored, completion=here.completion)  # what it has said so far
    elif stored.completion is None and stored.status in ("running", "failed") and stored.route != "workflow":
        # Running on another instance, or failed with its process (which wrote no answer):
        # what its events say it had said. (A workflow's events are its workers'.)
        said = await persistence.said_so_far(trace_id)
        if said is not None:
            stored = replace(stored, completion=said)
    tenant = current_tenant()
    if (
        stored is None or (tenant is not None and stored.tenant != tenant) or stored.deleted
        or not responses.readable(stored.settings)
    ):
        raise _not_found(response, persistence)
    return stored


def _echoed(settings: dict[str, Any] | None) -> dict[str, Any]:
    """What the Response echoes of its request: as the request set them (kept with its run),
    or the defaults for a run that does not have them (not a Responses request, or one
    journalled before they were kept; a run of another instance whose row is not written yet)."""
    if settings is None or openai_stored.is_stored(settings):  # a stored chat completion's are its own
        return responses.default_settings()
    return settings


def _rendered(stored: StoredRun, response: str) -> Reply:
    completion = stored.completion
    settings = _echoed(stored.settings)
    if stored.status == "completed" and completion is not None:
        # What its run told its client of the answer (`x-rag-*`, `x-pipeline`, …), as a replay
        # says it: a background response's client, answered `queued`, learns it only here.
        told = [header for header in stored.headers if header[0] in ANSWER_HEADERS]
        return Reply(responses.render_response(
            completion, response=response, model=stored.model or completion.model, settings=settings,
            created_at=_created_at(stored), completed_at=_completed_at(stored),
        ), headers=told)
    status = {"running": "in_progress", "cancelled": "cancelled"}.get(stored.status, "failed")
    if status == "in_progress" and completion is None and settings.get("background") and stored.route != "workflow":
        # Its run has not started answering (its backend has said nothing yet): `queued`, as
        # on OpenAI until a worker takes it, and as its own stream says until its first event.
        # (A workflow's events are its workers': its row alone cannot tell.)
        status = "queued"
    error = None
    if status == "failed":
        stored_error = stored.error or {}
        message = stored_error.get("message") or "The response failed."
        # Its kind as stored: a rate limit is told apart (`rate_limit_exceeded`), as in its stream.
        kind = ErrorKind.__members__.get(str(stored_error.get("kind")), ErrorKind.BACKEND)
        error = responses.error_to_wire(GatewayError(kind, str(message)))
    return Reply(dumps(responses.response_object(
        response=response, created_at=_created_at(stored), model=stored.model,
        settings=settings, status=status, output=_said(
            completion, response, status, responses.summarized(settings), responses.namespaces_of(settings)
        ),
        error=error,
    )))


def _created_at(stored: StoredRun) -> int:
    """When the backend says it started the answer, else when the run's row was made (a run
    that failed before its backend said anything has a completion with no `created`)."""
    return (stored.completion.created if stored.completion is not None else 0) or int(stored.created_at)


def _completed_at(stored: StoredRun) -> int:
    """When an ended run's outcome was written (its row's last write), else its start."""
    if stored.finished_at:
        return int(stored.finished_at)
    return _created_at(stored)


def _said(
    completion: ChatCompletion | None, response: str, status: str, summary: bool = False,
    namespaces: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """What a run that has not given its answer has said: one that ended without it, as its
    stream's last event held it, its items cut short (`incomplete`, for the row cannot tell
    which were whole); one still running (here), so far (`in_progress`)."""
    choice = completion.choices[0] if completion is not None and completion.choices else None
    if completion is None or choice is None or not (choice.content or choice.tool_calls or choice.reasoning):
        return []
    state = "in_progress" if status == "in_progress" else "incomplete"
    return [
        item | {"status": state}
        for item in responses.output_of(completion, response, state, summary=summary, namespaces=namespaces)
    ]


async def _row_written(persistence: Persistence, trace_id: str) -> None:
    """A run of this instance that has ended is read from its row, written a moment after
    its client had the answer: a client reading it back at once waits for it (bounded)."""
    live = persistence.runs.live.get(trace_id)
    if live is not None and live.closed:
        with trio.move_on_after(_ROW_WAIT_SECONDS):
            await live.written.wait()


def _running_here(persistence: Persistence, trace_id: str) -> StoredRun | None:
    """A run of this instance whose row is not written yet: the writer holds a `running`
    row back for a moment (most runs end sooner), so a client reading right after its
    `response.created` (or its background response's creation) would be told its response
    does not exist."""
    live = persistence.runs.live.get(trace_id)
    if live is None or live.closed:
        return None
    start = next((event for event in live.events if isinstance(event, StreamStart)), None)
    said = CompletionBuilder()
    for event in live.events:
        said.add(event)
    return StoredRun(
        status="running", completion=said.build() if live.events else None, error=None, tenant=live.tenant,
        route="direct",
        model=start.model if start else "", created_at=start.created if start else time.time(),
        settings=live.settings,
    )


class _ResumeFramer:
    """A Response's stream rendered again from its trace's events, from the first (the
    sequence numbers are the renderer's, and it numbers the same events the same way), and
    written from the frame after `starting_after` on."""

    def __init__(
        self, response: str, model: str, starting_after: int, settings: dict[str, Any], *,
        created_at: int | None = None, completed_at: int | None = None,
    ) -> None:
        self._response = response
        self._model = model
        self._after = starting_after
        self._settings = settings
        self._created_at = created_at
        self._completed_at = completed_at
        self._renderer: responses.StreamRenderer | None = None

    def frame(self, seq: int, event: WireEvent) -> bytes:
        if isinstance(event, Finished):
            if event.status == "completed":
                return self._written(self._render_close())
            if event.status == "cancelled":
                return self._written(self._render([StreamFailed(RUN_CANCELLED)]))
            # A run that ended without its answer (it failed without saying).
            return self._written(self._render([StreamFailed(GatewayError(
                ErrorKind.UNAVAILABLE, f"The response ended without completing ({event.status}).",
            ))]))
        if isinstance(event, StreamStart):
            self._model = self._model or event.model
            if self._created_at is None:  # a run still going on: when it started
                self._created_at = event.created
        return self._written(self._render([event]))

    def error(self, error: GatewayError) -> bytes:
        return self._written(self._render([StreamFailed(error)]))

    def _render(self, events: list[StreamEvent]) -> bytes:
        if self._renderer is None:
            self._renderer = responses.StreamRenderer(
                response=self._response, model=self._model, settings=self._settings, created_at=self._created_at,
                completed_at=self._completed_at,
            )
        return self._renderer.render(events)

    def _render_close(self) -> bytes:
        self._render([])
        assert self._renderer is not None
        return self._renderer.close()

    def _written(self, frames: bytes) -> bytes:
        return _numbered(frames, self._after)


def _numbered(frames: bytes, after: int) -> bytes:
    """The frames past `after`, each with its `id:`, its sequence number: what a browser's
    EventSource resumes from."""
    return b"".join(
        b"id: %d\n%s\n\n" % (number, frame)
        for frame in frames.split(b"\n\n") if frame and (number := _number(frame)) > after
    )


def _number(frame: bytes) -> int:
    """A frame's `sequence_number` (the renderer writes it last)."""
    tail = frame.rpartition(b'"sequence_number":')[2]
    return int(tail.rstrip(b"}"))


@exchanges.route("/v1/responses/<response_id>", method="DELETE", kind=None)
async def delete_response(incoming: Incoming) -> Reply:
    """Delete a response, on any instance (the tenant's own): read back, continued, listed,
    streamed again or referenced, it is then a 404. A background response still running is
    cancelled first (else its answer would go on being written); one whose client is still
    streaming it is a 400 until that stream ends."""
    response, trace_id, persistence = _addressed(incoming)
    stored = await _found(persistence, trace_id, response)  # the tenant's own, or not found
    if stored.status == "running":
        stored = await _stopped(persistence, trace_id, response, stored, (
            f"Response '{response}' is still in progress and was not created with `background: true`: delete it "
            "once its stream has ended (its client stops it by closing the stream)."
        ))
    carried = _carried(stored, await _stored_messages(persistence, trace_id))
    if not await persistence.delete(trace_id, carried):
        raise _not_found(response, persistence)  # deleted meanwhile, by another request
    return Reply(dumps({"id": response, "object": "response.deleted", "deleted": True}))


def _not_found(response_id: str, persistence: Persistence | None) -> GatewayError:
    """OpenAI's 404 for a response it does not keep (never made, deleted, or expired)."""
    return GatewayError(
        ErrorKind.NOT_FOUND, f"Response with id '{response_id}' not found. {_kept(persistence)}",
        param="response_id", code="response_not_found",
    )


def _kept(persistence: Persistence | None) -> str:
    if persistence is None:
        return "This gateway keeps no responses (it has no database): send the whole conversation in `input`."
    return (
        f"This gateway keeps a response {persistence.kept}, unless it is deleted; past that, send the whole "
        "conversation in `input`."
    )


@exchanges.route("/v1/responses/<response_id>/cancel", kind=None)
async def cancel_response(incoming: Incoming) -> Reply:
    """Stop a background response, on this instance or (over NATS) the one running it: the
    Response as it then stands (`cancelled`). One that has ended already is answered as it is."""
    response, trace_id, persistence = _addressed(incoming)
    stored = await _found(persistence, trace_id, response)  # the tenant's own, or not found
    if stored.status == "running":
        stored = await _stopped(persistence, trace_id, response, stored, (
            f"Response '{response}' was not created with `background: true`: only background responses can be "
            "cancelled (a streaming response stops when its client closes the stream)."
        ))
    return _rendered(stored, response)


async def _stopped(persistence: Persistence, trace_id: str, response: str, stored: StoredRun, refusal: str) -> StoredRun:
    """A running background response stopped, here or on the instance running it: its row
    once it has ended (`cancelled`). Any other running response is refused (`refusal`): its
    client's connection is its run, and closing it is how that one stops."""
    if not (stored.settings or {}).get("background"):
        raise invalid_request(refusal, param="response_id")
    if await persistence.runs.cancel(trace_id):
        return await _found(persistence, trace_id, response)
    ended = await persistence.cancel_elsewhere(trace_id)
    if ended is None:
        raise GatewayError(
            ErrorKind.CONFLICT,
            f"Response '{response}' runs on another gateway instance, which did not stop it in time (if that "
            "instance is gone, the response is failed within a minute).",
            param="response_id", code="response_elsewhere",
        )
    return ended


@exchanges.route("/v1/responses/<response_id>/input_items", method="GET", kind=None)
async def response_input_items(incoming: Incoming) -> Reply:
    """The items its request gave as `input` (OpenAI's list page), read from its journal row
    on any instance."""
    response, trace_id, persistence = _addressed(incoming)
    query = parse_qs(incoming.head.query.decode("latin-1"))
    stored = await _found(persistence, trace_id, response)  # the tenant's own, or not found
    items = await _inputs_of(persistence, stored, trace_id, response)
    if items is None:
        raise _not_found(response, persistence)
    return Reply(dumps(responses.item_page(items, query)))


async def _inputs_of(
    persistence: Persistence, stored: StoredRun, trace_id: str, response: str
) -> list[dict[str, Any]] | None:
    """A response's input items, from its row (None: the journal has not its request)."""
    messages = await _stored_messages(persistence, trace_id)
    if messages is None:
        return None
    if _compacted(stored.settings):
        messages = messages[:-1]  # the gateway's ask for the summary is none of its client's
    instructions = (stored.settings or {}).get("instructions")
    return responses.input_items(
        messages, response, instructions=instructions if isinstance(instructions, str) else None,
        prior=await _continued_length(persistence, stored.settings),
        namespaces=responses.namespaces_of(stored.settings or {}),
    )


# Without a database every reference is unknown: the client is told what to send instead, and
# how the SDK that refers back unasked (the Vercel AI SDK's `openai(...)`, `store` on by
# default: its earlier answers by their ids) is told not to.
_NO_ITEMS = (
    "This gateway keeps no responses (it has no database): send the items themselves in `input` (with the "
    "Vercel AI SDK's `openai(...)`: `providerOptions: { openai: { store: false } }`)."
)


async def referenced_items(persistence: Persistence | None, references: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """The items a request's `item_reference`s name, by id: items of the tenant's
    conversations, or input or output items of the responses the journal keeps (the
    tenant's own, ended; on any instance). One neither keeps is a 404 naming the
    reference's path, in OpenAI's words."""
    found: dict[str, dict[str, Any]] = {}
    kept: dict[str, list[dict[str, Any]]] = {}  # by trace id: one read per response referred to
    for path, item in references:
        if item in found:
            continue
        # First its conversations (one indexed read): an item made by `items.create` names no
        # response, whose row would be waited for.
        match = await conversation_item(persistence, item) if persistence is not None else None
        if match is None:
            # A response's item id is its kind, its trace id and its place (`responses.item_id`).
            trace_id = item.partition("_")[2].rpartition("_")[0]
            if trace_id not in kept:
                kept[trace_id] = await _items_of(persistence, trace_id) if persistence is not None and trace_id else []
            match = next((candidate for candidate in kept[trace_id] if candidate["id"] == item), None)
        if match is None:
            said = f"Item with id '{item}' not found."
            if persistence is None:
                said += f" {_NO_ITEMS}"
            raise GatewayError(ErrorKind.NOT_FOUND, said, param=path)
        found[item] = match
    return found


async def _items_of(persistence: Persistence, trace_id: str) -> list[dict[str, Any]]:
    """An ended response's input and output items, as it lists them ([]: none it keeps)."""
    response = responses.response_id(trace_id)
    try:
        stored = await _found(persistence, trace_id, response)
    except GatewayError as error:
        if error.kind is ErrorKind.NOT_FOUND:
            return []
        raise
    if stored.status == "running" or stored.completion is None:
        return []
    completion = stored.completion
    settings = _echoed(stored.settings)
    namespaces = responses.namespaces_of(settings)
    if stored.status == "completed":
        choice = completion.choices[0] if completion.choices else None
        output = responses.output_of(
            completion, response, responses.status_of(choice.finish_reason if choice else None)[0],
            summary=responses.summarized(settings), namespaces=namespaces,
        )
    else:
        output = _said(completion, response, "failed", responses.summarized(settings), namespaces)
    return [*(await _inputs_of(persistence, stored, trace_id, response) or []), *output]


async def _continued_length(persistence: Persistence, settings: dict[str, Any] | None) -> int:
    """How many of a response's messages (after its instructions) are those of the response
    it continued, and its answer, or its conversation's items (0: it continued none, or the
    journal no longer has it)."""
    prefix = (settings or {}).get(responses.CONVERSATION_PREFIX)
    if isinstance(prefix, int):
        return prefix
    previous = (settings or {}).get("previous_response_id")
    store = persistence.store()
    if not isinstance(previous, str) or store is None:
        return 0
    trace_id = previous.removeprefix("resp_")
    stored = await persistence.journal_read(lambda store: store.stored_run(trace_id), f"the row of {trace_id}")
    if stored is not None and stored.deleted:
        # Deleted since: its row kept the number for this.
        return await persistence.journal_read(lambda store: store.carried(trace_id), f"the row of {trace_id}")
    messages = await persistence.journal_read(lambda store: store.stored_messages(trace_id), f"the request of {trace_id}")
    return _carried(stored, messages)


def _compacted(settings: dict[str, Any] | None) -> bool:
    """The run answered a `compaction_trigger` (see `_triggered_compaction`)."""
    return bool((settings or {}).get(responses.COMPACTED))


def _carried(stored: StoredRun | None, messages: list[dict[str, Any]] | None) -> int:
    """How many messages a response continuing this one carries over: its conversation
    (after its instructions, which are not carried over) and its answer."""
    if stored is None or messages is None or stored.completion is None:
        return 0
    if _compacted(stored.settings):
        return 1  # its summary alone (see `responses.continued`)
    instructions = (stored.settings or {}).get("instructions")
    own = 1 if instructions and messages and messages[0].get("role") == "system" else 0
    said = stored.completion.choices[0] if stored.completion.choices else None
    return len(messages) - own + (1 if said is not None and (said.content or said.tool_calls) else 0)


async def _stored_messages(persistence: Persistence, trace_id: str) -> list[dict[str, Any]] | None:
    """Its request's messages; for a run of this instance whose row is held back a moment
    (most runs end sooner), once its row is written."""
    store = persistence.store()
    if store is None:
        return None
    with trio.move_on_after(_ROW_WAIT_SECONDS):
        while True:
            messages = await persistence.journal_read(
                lambda store: store.stored_messages(trace_id), f"the request of {trace_id}"
            )
            if messages is not None or trace_id not in persistence.runs.live:
                return messages
            await trio.sleep(0.05)
    return None
