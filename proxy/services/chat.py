"""Chat orchestration: route a request, run its exchange with the backend, observe it.

Each exchange is one trio nursery. The backend call is a task that sends batches through a
memory channel; the client-facing writer (the `ExchangeSink`, supplied by the HTTP layer)
runs in the exchange's own task. A client disconnect cancels the caller, which cancels the
nursery, which closes the backend's HTTP stream.

This module is the face of the exchange's parts, each in its own: `_contracts` (what its
callers supply and are told), `_fallback` (the walk over a model's stand-ins), `_durable`
(its journalled runs) and `_records` (its log line and journal row).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from proxy.domain.chat import ChatRequest
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.domain.events import (
    CompletionBuilder,
    StreamEvent,
    StreamFailed,
    StreamStart,
    UsageReport,
)
from proxy.domain.fingerprint import request_fingerprint
from proxy.domain.routing import Route, Router
from proxy.domain.truncation import Window
from proxy.infra.backends import Backend, BackendCall, Batch, Served, current_served
from proxy.infra.transport import Hangup, current_hangup
from proxy.services._contracts import (
    ANSWER_HEADERS,
    SHUTTING_DOWN,
    AnswerHook,
    CachedAnswer,
    CompletionCache,
    ExchangeSink,
    Headers,
    RequestMeta,
    RouteHandler,
    RunLock,
    is_cancellation,
    new_trace_id,
)
from proxy.services._durable import DurableRun
from proxy.services._fallback import Adapter, Fallback, FallbackWalk
from proxy.services._records import NOTHING_RESERVED, ExchangeRecord, RecordSink, Reserved, _outcome
from proxy.services.auth import check_body_models
from proxy.services.journal import EventLog, Journal
from proxy.services.persistence import Persistence, Plan, Producer, replayer

log = logging.getLogger("llm_proxy.chat")

# Its parts' public names are imported from here: the exchange's face is this module.
__all__ = [
    "SHUTTING_DOWN", "Adapter", "AnswerHook", "CachedAnswer", "ChatExchange", "ChatService", "CompletionCache", "ExchangeRecord",
    "ExchangeSink", "Fallback", "Headers", "RecordSink", "RequestMeta", "RouteHandler", "RunLock", "is_cancellation",
    "new_trace_id",
]


class ChatService:
    def __init__(
        self,
        router: Router,
        backends: Mapping[str, Backend],
        record: RecordSink,
        routes: Mapping[str, RouteHandler] | None = None,
        persistence: Persistence | None = None,
        semantic_cache: CompletionCache | None = None,
        fallbacks: Mapping[str, Sequence[str]] | None = None,
        default_pipeline: str | None = None,
        observe: RecordSink | None = None,
    ) -> None:
        self._router = router
        # The log line and metrics without the key's usage (`record_unmetered`).
        self._observe = observe or record
        self._default_pipeline = default_pipeline
        self._backends = backends
        self._record = record
        self._fallbacks = fallbacks or {}
        self.routes: dict[str, RouteHandler] = dict(routes or {})
        self.persistence = persistence
        self.semantic_cache = semantic_cache

    def refused(
        self, *, request_id: str, dialect: str, model: str, stream: bool, status: int, error: str, total_ms: float,
        api_key_id: int | None, reserved: Reserved = NOTHING_RESERVED, kind: str = "chat", cancelled: bool = False,
    ) -> None:
        """A request refused before it became an exchange (bad input, unknown model, the
        guard), or whose client left before (`cancelled`): its log line all the same, and a
        failed request in its key's usage (its reservation of tokens, if admitted, given
        back). A refused token count is no model call of the key either: not in its usage."""
        record = self._observe if kind == "count_tokens" else self._record
        record(ExchangeRecord(
            trace_id="", request_id=request_id, model=model, backend="", upstream_model="", stream=stream,
            dialect=dialect, status=status, total_ms=total_ms, error=None if cancelled else error, source="refused",
            api_key_id=api_key_id, reserved=reserved, kind=kind, cancelled=cancelled,
        ))

    def record_relayed(self, record: ExchangeRecord) -> None:
        """A call relayed as is, without an exchange (text completion, rerank): its log
        line, its key's usage and its metrics, as a chat's."""
        self._record(record)

    def record_unmetered(self, record: ExchangeRecord) -> None:
        """A call the gateway answers that is no model call of its key (counting tokens,
        loading a model): its log line and its metrics, not the key's usage."""
        self._observe(record)

    def exchange(self, request: ChatRequest, meta: RequestMeta, *, relay_openai: bool) -> ChatExchange:
        """Resolve the route now (an unknown model or route fails before any response starts)."""
        handler: RouteHandler | None = None
        if meta.route != "direct":
            handler = self.routes.get(meta.route)
            if handler is None:
                known = ", ".join(["direct", *sorted(self.routes)])
                raise GatewayError(
                    ErrorKind.INVALID_REQUEST, f"Unknown route `{meta.route}`; this gateway serves: {known}.",
                    param="x-route",
                )
            # One route a chat: the other header would be dropped without a word, and the
            # answer taken for one drawn on the workspace (or made by the pipeline).
            unused = "x-workspace" if meta.route == "workflow" and meta.workspace else (
                "x-pipeline" if meta.route == "rag" and meta.pipeline else None)
            if unused is not None:
                raise invalid_request(
                    f"`{unused}` has no effect on the {meta.route} route: a workflow's pipeline does not retrieve"
                    " from a RAG workspace, nor does the RAG route run a pipeline. Send one of `x-workspace`"
                    " and `x-pipeline`.",
                    param=unused,
                )
            if meta.route == "workflow" and meta.pipeline is None:
                # Named from here on: the answer is that pipeline's, in the caches' keys too (as
                # "" an entry made under one default would answer for the next).
                meta.pipeline = self._default_pipeline
        backend: Backend | None = None
        route = Route(backend="", upstream_model=request.model)
        if handler is None or handler.needs_backend:
            route = self._router.resolve(request.model)
            backend = self._backends[route.backend]
        # The fields a backend of the client's dialect is sent as they came (and a pipeline
        # is given) may name other models for it to answer with.
        check_body_models(request.extra)
        exchange = ChatExchange(
            request, route, backend, meta, relay_openai=relay_openai, record=self._record, persistence=self.persistence
        )
        if self.semantic_cache is not None and self.semantic_cache.enabled_for(request, meta):
            exchange.semantic_cache = self.semantic_cache
        if handler is not None:
            exchange.handler = handler
            exchange.publishes_events = not handler.publishes_events
        if backend is not None and self._fallbacks and (stand_ins := self._stand_ins_for(request.model)):
            exchange.fallbacks = self._resolve_fallbacks(stand_ins)
        return exchange

    def _stand_ins_for(self, model: str) -> Sequence[str] | None:
        """The `[fallbacks]` entry of `model` as the router reads names: by its alias's target
        too, and `name` and `name:latest` alike."""
        target = self._router.aliases.get(model)
        for name in (model, target) if target is not None else (model,):
            for spelling in (name, name.removesuffix(":latest") if name.endswith(":latest") else f"{name}:latest"):
                found = self._fallbacks.get(spelling)
                if found is not None:
                    return found
        return None

    def stand_ins(self, model: str) -> list[Fallback]:
        """`model`'s stand-ins (`[fallbacks]`) this caller may use, routed now."""
        found = self._stand_ins_for(model) if self._fallbacks else None
        return self._resolve_fallbacks(found) if found else []

    def _resolve_fallbacks(self, models: Sequence[str]) -> list[Fallback]:
        """The stand-ins this caller may use, routed now (with its key's scope): one that no
        backend serves, or that the key may not use, is left out."""
        resolved: list[Fallback] = []
        for model in models:
            try:
                route = self._router.resolve(model)
            except GatewayError as error:
                # Per request (a key's scope may leave it out every time): not worth a warning.
                log.debug("fallback %s left out: %s", model, error.message)
                continue
            resolved.append(Fallback(model, route, self._backends[route.backend]))
        return resolved



def _cacheable(request: ChatRequest, meta: RequestMeta, backend: Backend | None) -> bool:
    """Exact caching: asked for by `x-cache: exact`, refused by `x-cache: off`; otherwise on
    for backends configured with `cache = true`, and then only for requests that are
    deterministic by their own statement (temperature 0)."""
    if meta.cache in ("off", "no-cache", "no-store"):
        return False
    if meta.cache == "exact":
        return True
    return bool(backend is not None and backend.config.cache and request.params.temperature == 0)


class ChatExchange(FallbackWalk, DurableRun):
    def __init__(
        self,
        request: ChatRequest,
        route: Route,
        backend: Backend | None,
        meta: RequestMeta,
        *,
        relay_openai: bool,
        record: RecordSink,
        persistence: Persistence | None = None,
    ) -> None:
        self.request = request
        self.route = route
        self.meta = meta
        self._backend = backend
        self._record_sink = record
        self._persistence = persistence
        headers = {"x-request-id": meta.request_id, "x-correlation-id": meta.correlation_id or meta.request_id}
        self._call = BackendCall(request, route.upstream_model, relay_openai=relay_openai, headers=headers)
        # The route's handler; None: the direct route (`call_backend`). Never a stored
        # producer: a closure over the exchange kept on it would be a reference cycle.
        self.handler: RouteHandler | None = None
        self.publishes_events = True
        self.semantic_cache: CompletionCache | None = None
        self.response_headers: list[tuple[bytes, bytes]] = [(b"x-trace-id", meta.trace_id.encode())]
        self.result = CompletionBuilder()
        self.fallbacks: list[Fallback] = []
        self._adapter: Adapter | None = None
        self._truncates = False
        self._window: Window | None = None
        self._window_of: Callable[[Route], Window | None] | None = None
        # What the client's dialect echoes of the request when its run is read back later (a
        # Response's settings, in wire form): kept in the run's journal row.
        self.settings: dict[str, Any] | None = None
        # Told of the answer once the run has completed (see `AnswerHook`): by the relay for
        # a run here or a replay, by the durable run for one in the Runs nursery.
        self.on_answer: AnswerHook | None = None
        # Held by this exchange's own run while it runs (see `RunLock`): a Responses
        # conversation's, which one response at a time answers.
        self.run_lock: RunLock | None = None
        self._locked = False
        # What an Idempotency-Key's request is (`req_id`) when not the request as sent: a
        # response in a conversation, asked again with its key once its first answer was
        # appended to the conversation, is the same request (not the exact cache's: an
        # answer to the conversation as it stood). None: the request itself.
        self.identity: ChatRequest | None = None
        self._relay_answers = True
        # A stand-in's answer is not the model's: neither cache gives it to later requests.
        self.fell_back = False
        self._hangup = Hangup()
        self._served = Served()
        self.hung_up = False
        self._detached = False  # run by `detach`: its run writes the record
        # Its client left its durable run before the run ended: the run's end writes the record,
        # with what the run spent (which a retry with its key then replays for free).
        self._recorded_by_run = False
        self._run_ended = False
        # What the run's producer spent that none of its events shows (a workflow that failed,
        # or was stopped, before its answer began): the run's row and its key's charge hold it.
        self.spent_unshown: UsageReport | None = None
        # The journalled run's event log: readers of the live run learn from it which model answers.
        self._live_log: EventLog | None = None
        # An attached request's: what its run told its own client of the answer, read as its
        # head goes out (`_adopt_answer_headers`). None: nothing to learn (any other plan).
        self._told_by_run: Callable[[], Awaitable[Headers]] | None = None
        self.record = ExchangeRecord(
            trace_id=meta.trace_id,
            request_id=meta.request_id,
            model=request.model,
            backend=route.backend,
            upstream_model=route.upstream_model,
            stream=request.stream,
            dialect=request.dialect,
        )

    # -- running ---------------------------------------------------------------------------

    def charge_unshown(self, spent: UsageReport) -> None:
        """Count `spent` as the answer's usage though no event showed it (see `spent_unshown`):
        the client's record takes it now; a durable run's own result, as the run ends."""
        self.spent_unshown = spent
        self.result.add(spent)

    @property
    def stopped_by_client(self) -> bool:
        """Its client left, or cancelled its (background) run: nobody waits for what it says."""
        return self.hung_up or self._cancelled_by_client()

    def hang_up(self) -> None:
        """The client has gone: close the backend connections this request holds, now.

        The caller cancels the exchange too; this only spares the backend the wait for the
        cancelled tasks to unwind (when many clients leave at once, that is long). A durable
        run is not the client's: it goes on."""
        self.hung_up = True
        self._hangup.fire()

    async def run(self, sink: ExchangeSink) -> None:
        """Drive the exchange to the end, writing to `sink`; returns when the client has it all.

        One nursery: the producer (backend call, durable-run reader, replay) and, when the
        gateway journals, the log-row writer and the event publisher run beside the client
        writer, which runs here. The outcome is journalled after the nursery, shielded."""
        journal: Journal | None = None
        complete = durable = False
        try:
            plan = await self._plan()
            await self._lock(plan)
            producer = plan.producer or self._producer()
            journal = self._journal(plan) if plan.kind == "here" else None
            if plan.kind == "durable":
                producer = self._start_durable(plan)
                durable = True
            self.response_headers.extend(plan.headers)
            if self.semantic_cache is not None and plan.kind in ("here", "durable") and not any(
                name == b"x-cache" for name, _ in plan.headers
            ):
                # Looked up and not found (a hit sets it to None): said as the exact cache says
                # it, so a client asking `x-cache: semantic` can tell a miss from no cache at all.
                self.response_headers.append((b"x-cache", b"miss"))
            self._told_by_run = self._told_by(plan) if plan.kind == "follow" else None
            self._relay_answers = plan.kind in ("here", "replay")
            async with trio.open_nursery() as nursery:
                send, receive = trio.open_memory_channel[Batch | GatewayError](0)
                nursery.start_soon(self._feed, producer, send, self._hangup)
                if journal is not None:
                    assert self._persistence is not None
                    self._persistence.runs.live[self.meta.trace_id] = journal.log  # for /v1/streams
                    journal.begin()
                async with receive:
                    complete = await self._relay(receive, sink, journal.log if journal else None)
                if not complete:
                    # Nothing more will reach the client: stop the producer now.
                    nursery.cancel_scope.cancel()
                elif journal is not None:
                    journal.log.close(_outcome(self.result, complete=True))
        except GatewayError as error:  # refused before anything started (e.g. a key conflict)
            self._failed_before_start(error)
            await sink.fail(error)
        except BaseException as exc:
            if is_cancellation(exc):
                if self.hung_up:
                    self.record.cancelled = True
                else:  # cancelled with its client still there: the server is stopping
                    self.record.error = SHUTTING_DOWN.message
                    self.record.status = self.record.status or SHUTTING_DOWN.status
                    self.result.error = self.result.error or SHUTTING_DOWN  # the row: failed, not cancelled
            raise
        finally:
            if self._relay_answers:  # a run here (a durable run gives its lock back itself)
                await self._unlock()
            if durable and not complete and not self._run_ended:
                self._recorded_by_run = True
            else:
                self._finish_record()
            if journal is not None:
                assert self._persistence is not None
                try:
                    await journal.finish(_outcome(self.result, complete), self._log_row(journal.row, self.result))
                finally:
                    # Only now: until its row is written, readers (`GET /v1/responses/{id}`
                    # right after its client had the answer) find the run here.
                    self._persistence.runs.live.pop(self.meta.trace_id, None)
            if (
                self.semantic_cache is not None and complete and self.result.error is None and self.result.replayable
                and not self.fell_back
            ):
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                    await self.semantic_cache.store(self.request, self.meta, self.result.build(), self.response_headers)

    async def _plan(self) -> Plan:
        persistence = self._persistence
        key = self.meta.idempotency_key
        # A chat with an `Idempotency-Key` asks the semantic cache once its key is claimed
        # (below): a hit is then the key's run, journalled, and a retry with the key replays
        # it (its id and `created`, fresh for each lookup) instead of asking the cache again.
        keyed = key is not None and persistence is not None and self.request.dialect != "responses"
        if not keyed and (hit := await self._semantic_hit()) is not None:
            return hit
        if persistence is None:
            return Plan("here")
        cache = self.identity is None and _cacheable(self.request, self.meta, self._backend)
        if key is None and not cache:
            return Plan("here")
        req_id = request_fingerprint(self.identity or self.request, self.route.upstream_model, self._route_identity())
        cache_id = req_id if self.meta.tenant is None else hashlib.sha256(f"{self.meta.tenant}:{req_id}".encode()).hexdigest()
        if cache and self.handler is not None and (scope := await self.handler.cache_scope(self)) is not None:
            # In the cache's key, not in `req_id`: an idempotent retry is the same request
            # however the workspace changed since, but a cached answer drew on what it held.
            cache_id = hashlib.sha256(f"{cache_id}:{scope}".encode()).hexdigest()
        if cache:
            cached = await persistence.cached(cache_id)
            if cached is not None:
                self.record.source = "cache"
                self._answered_by(cached[0])
                return Plan("replay", producer=replayer(cached[1]), req_id=req_id,
                            headers=[(b"x-cache", b"hit"), (b"x-replay-of", cached[0].encode()), *cached[2]])
        claim_key = key if key is not None else f"cache:{cache_id}"
        other = await persistence.claim(
            claim_key, req_id, self.meta.trace_id, cache_id=None if key else cache_id, runs_here=self.meta.route != "workflow"
        )
        if other is not None:
            # Another run's answer: that run keeps it in the semantic cache, if anyone does (a
            # replay's would name a trace with no row of its own).
            self.semantic_cache = None
            replayed = "replay" if key is not None else "cache"
            self.record.source = replayed if other.kind == "replay" else "attached"
            if other.answered_by is not None:
                self._answered_by(other.answered_by)
            said = any(name == b"x-fallback-model" for name, _ in other.headers)  # kept with its answer
            if not said and (stand_in := self._stand_in_named(other.winner)) is not None:
                other.headers.append((b"x-fallback-model", stand_in.encode()))  # as the first answer said
            return other
        if keyed and (hit := await self._semantic_hit()) is not None:
            return Plan("here", producer=hit.producer, req_id=req_id, key=key, headers=hit.headers)
        kind = "durable" if persistence.runs.available else "here"
        return Plan(kind, req_id=req_id, key=key, cache=cache, cache_id=cache_id,
                    headers=[(b"x-cache", b"miss")] if cache else [])

    async def _semantic_hit(self) -> Plan | None:
        """The semantic cache's answer to replay, if it has one."""
        if self.semantic_cache is None:
            return None
        hit = await self.semantic_cache.lookup(self.request, self.meta)
        if hit is None:
            return None
        self.record.source = "semantic-cache"
        self.semantic_cache = None  # nothing new to remember
        if hit.trace_id is not None and self.request.dialect == "responses":
            # A Response's id must read back (and continue): as an exact hit's, it
            # names the run that answered, whose row is found. Other dialects' hits
            # keep their own trace (no row): theirs are not read back by id.
            self._answered_by(hit.trace_id)
        return Plan("replay", producer=replayer(hit.completion), headers=[(b"x-cache", b"semantic"), *hit.headers])

    def _told_by(self, plan: Plan) -> Callable[[], Awaitable[Headers]] | None:
        """Where an attached request learns what its run told its own client of the answer:
        a run here, from its live headers; a stream from one on another instance, from that
        run's first event (or its row, read instead of its events), which its head waits for;
        a whole answer from another instance, from its row once it has ended."""
        live, told = plan.live, plan.told
        if live is not None:
            async def told_here() -> Headers:
                return live.headers

            return told_here
        if self.request.stream and told is not None:
            async def told_first() -> Headers:
                return told

            return told_first
        persistence, trace_id = self._persistence, plan.answered_by
        if self.request.stream or persistence is None or trace_id is None:
            return None

        async def told_there() -> Headers:
            try:
                run = await persistence.stored_run(trace_id)
            except GatewayError:  # its journal unreadable now: the answer without them
                return []
            return run.headers if run is not None else []

        return told_there

    async def _adopt_answer_headers(self) -> None:
        """An attached request's head says what its run's said of the answer (its twin's
        sources, pipeline, winner, stand-in), as a replay of it would."""
        told, self._told_by_run = self._told_by_run, None
        assert told is not None
        have = {name for name, _ in self.response_headers}
        self.response_headers.extend(h for h in await told() if h[0] in ANSWER_HEADERS and h[0] not in have)

    def _stand_in_named(self, winner: str | None) -> str | None:
        """The stand-in whose answer a replay gives (its `[fallbacks]` name, found by the
        upstream model the journal says answered); None when the model itself answered. Only
        a model with stand-ins can have had its answer from one."""
        if winner is None or winner == self.route.upstream_model or not self.fallbacks:
            return None
        return next((f.model for f in self.fallbacks if f.route.upstream_model == winner), winner)

    def _answered_by(self, trace_id: str) -> None:
        """An answer replayed or attached to is that trace's: `x-trace-id` names it, so its row
        and `/v1/streams/{x-trace-id}` are found. This exchange's own id stays in its record."""
        headers = self.response_headers  # in place: the sink holds this list
        headers[:] = [(name, trace_id.encode() if name == b"x-trace-id" else value) for name, value in headers]

    def _producer(self) -> Producer:
        return self.call_backend if self.handler is None else self.handler.producer(self)

    async def _admit(self) -> None:
        if self.handler is not None:
            await self.handler.admit(self)

    async def _feed(
        self, producer: Producer, send: trio.MemorySendChannel[Batch | GatewayError], hangup: Hangup | None
    ) -> None:
        current_hangup.set(hangup)  # this task's context only
        current_served.set(self._served)
        # BrokenResourceError: the reading side finished early; there is nobody left to tell.
        with contextlib.suppress(trio.BrokenResourceError):
            async with send:
                try:
                    await producer(send)
                except GatewayError as error:
                    await send.send(error)

    async def _relay(
        self,
        receive: trio.MemoryReceiveChannel[Batch | GatewayError],
        sink: ExchangeSink,
        event_log: EventLog | None,
    ) -> bool:
        """Pass batches to the sink; True when the client received a complete answer.

        A non-streaming client gets one completion at the end, whatever the producer sends."""
        started = False
        stream = self.request.stream
        # A non-streaming client's renderer reads what the completion cannot hold (a thinking
        # signature, a stop sequence, relayed blocks) from the events: all of them, not the
        # last batch's (a durable run's log arrives in several).
        events: list[StreamEvent] = []
        # Until the answer holds something, nothing need reach the client: a backend that says
        # 200 and fails before its first token (Ollama's model that cannot load, vLLM failing
        # right after its role chunk) is then answered with a real status, which SDKs retry.
        held: Batch | None = None
        async for item in receive:
            if isinstance(item, GatewayError):
                if not started:
                    self._failed_before_start(item)
                    await self._settle()
                    await sink.fail(item)
                    return False
                item = Batch([StreamFailed(item)], done=True)
            if not started:
                # A keep-alive (the backend alive, silent for a while) sends what is held: the
                # client gets its head and the keep-alives rather than nothing at all.
                keepalive = not item.events and item.raw is None and not item.done
                if held is not None:
                    item = _joined(held, item)
                    held = None
                if not keepalive and item.events and not item.done and all(isinstance(e, _OPENING) for e in item.events):
                    held = item  # a start (and usage) alone
                    continue
                failure = _failure_without_content(item.events)
                if failure is not None:
                    self._failed_before_start(failure)
                    await self._settle()
                    await sink.fail(failure)
                    return False
                started = True
                self.record.status = 200
                self.record.ttft_ms = (time.perf_counter() - self.meta.received) * 1000
                if stream:
                    if self._told_by_run is not None:
                        await self._adopt_answer_headers()
                    await sink.start()
            for event in item.events:
                self.result.add(event)
            if event_log is not None:
                event_log.extend(item.events)
            if stream:
                if item.done and self.result.error is not None:
                    await self._settle()  # before its client reads that it failed
                await sink.write(item)
            else:
                events.extend(item.events)
                if item.done:
                    if self.result.error is not None and item.completion is None:
                        self._failed_before_start(self.result.error)
                        await self._settle()
                        await sink.fail(self.result.error)
                        return False
                    if item.completion is None and item.raw is None:
                        item = Batch(events, done=True, completion=self.result.build())
                    if self.on_answer is not None and self._relay_answers and self.result.error is None:
                        await self.on_answer(self._answering_trace(), item.whole())
                    await self._settle()
                    if self._told_by_run is not None:
                        await self._adopt_answer_headers()
                    await sink.start()
                    await sink.write(item)
            if item.done:
                break
        if not started:
            error = GatewayError(ErrorKind.BACKEND, f"Backend `{self.route.backend}` returned nothing.")
            self._failed_before_start(error)
            await self._settle()
            await sink.fail(error)
            return False
        if stream and self.on_answer is not None and self._relay_answers and self.result.error is None:
            await self.on_answer(self._answering_trace(), self.result.build())
        await self._settle()
        await sink.finish()
        return self.result.error is None

    async def _settle(self) -> None:
        """A run here has ended: its lock given back before its client has the end (a
        durable run's reader leaves it to the run)."""
        if self._relay_answers:
            await self._unlock()

    def _failed_before_start(self, error: GatewayError) -> None:
        self.record.status = error.status
        self.record.error = error.message
        if self.result.error is None:
            self.result.error = error


# What a stream opens with before it says anything (vLLM's role chunk; Anthropic's
# `message_start` and its usage): not yet content a client must have.
_OPENING = (StreamStart, UsageReport)


def _joined(first: Batch, then: Batch) -> Batch:
    raw = None if first.raw is None and then.raw is None else (first.raw or b"") + (then.raw or b"")
    return Batch([*first.events, *then.events], raw, then.done, then.completion)


def _failure_without_content(events: list[StreamEvent]) -> GatewayError | None:
    """The failure of a batch that holds nothing else but its opening."""
    failure: GatewayError | None = None
    for event in events:
        if isinstance(event, StreamFailed):
            failure = failure or event.error
        elif not isinstance(event, _OPENING):
            return None
    return failure
