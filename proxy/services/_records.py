"""What an exchange leaves behind: its record (the request's log line, its metrics and its
key's usage) and its journal row."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from proxy.dialects.events import error_to_row
from proxy.domain.chat import ChatRequest
from proxy.domain.events import CompletionBuilder
from proxy.domain.fingerprint import canonical_request, fingerprint_of
from proxy.domain.routing import Route
from proxy.domain.tokens import charged_usage
from proxy.infra import otel
from proxy.infra.backends import Served, current_trace
from proxy.infra.chat_store import LogRow, completion_to_json
from proxy.services._contracts import ANSWER_HEADERS, RequestMeta, RunLock
from proxy.services.journal import Outcome
from proxy.services.persistence import Persistence, Plan


class Reserved(NamedTuple):
    """What a request's admission reserved: tokens in its key's token bucket (`--tpm`) and in
    its budget period's count (`--budget`), given back as its real usage is charged."""

    tokens: int = 0
    budget: int = 0
    # The start of the budget period it was reserved in (epoch seconds, the database's): it is
    # given back only while that period lasts. None: reserved by this process alone (an outage).
    period: float | None = None


NOTHING_RESERVED = Reserved()


def _current_trace_id() -> str | None:
    trace = current_trace.get()
    return None if trace is None else trace.trace_id


@dataclass(slots=True)
class ExchangeRecord:
    """What one exchange did, for the request log (one JSON line per request)."""

    trace_id: str
    request_id: str
    model: str
    backend: str
    upstream_model: str
    stream: bool
    dialect: str
    status: int = 0
    ttft_ms: float | None = None
    total_ms: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    error: str | None = None
    source: str = "backend"
    # The tokens are the gateway's estimate: the backend's usage never came (the client left
    # before the end of the stream, or the backend does not report usage).
    usage_estimated: bool = False
    # The caller's API key (its id, never the key): set by the HTTP guard, read by the rate
    # limiter's usage hook and logged instead of any credential.
    api_key_id: int | None = None
    # The tokens its admission reserved in the key's token bucket and budget (the rate
    # limiter gives them back as it charges the real usage).
    reserved: Reserved = NOTHING_RESERVED
    # The base URL of the replica that answered, for a backend with several.
    replica: str | None = None
    # The replicas the request left for another on the way there (down, full or silent).
    passed_over: list[str] | None = None
    # What was asked: chat, embeddings, or an API relayed as is (completion, rerank,
    # transcription, translation, speech).
    kind: str = "chat"
    # The seconds of audio a speech-to-text backend says it heard (`usage: {"type":
    # "duration"}`, OpenAI's whisper-1 and vLLM's count), when it counts no tokens.
    audio_seconds: float | None = None
    # The W3C trace its backend requests carry (the client's `traceparent`'s, or one started
    # for it), to find the request from a tracing UI; None with `[tracing] propagate` off.
    w3c_trace_id: str | None = field(default_factory=_current_trace_id)

    def as_log(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.__slots__}


RecordSink = Callable[[ExchangeRecord], None]


def _outcome(result: CompletionBuilder, complete: bool) -> Outcome:
    error = result.error
    if error is not None:
        return Outcome("failed", "error", error)
    if complete:
        reason = result.finish_reason
        return Outcome("completed", reason.value if reason else "stop")
    return Outcome("cancelled", "cancelled")


class Recording:
    """The record and journal row of a `ChatExchange` (it is one): what they are made of is
    declared here, set by the exchange."""

    request: ChatRequest
    meta: RequestMeta
    route: Route
    record: ExchangeRecord
    result: CompletionBuilder
    settings: dict[str, Any] | None
    fell_back: bool
    response_headers: list[tuple[bytes, bytes]]
    _served: Served
    _persistence: Persistence | None
    _record_sink: RecordSink
    run_lock: RunLock | None

    def _new_row(self, plan: Plan) -> LogRow:
        canonical = canonical_request(self.request, self.route.upstream_model, self._route_identity())
        return LogRow(
            trace_id=self.meta.trace_id,
            req_id=plan.req_id or fingerprint_of(canonical),
            idempotency_key=plan.key,
            route=self.meta.route,
            dialect=self.request.dialect,
            model=self.request.model,
            backend=self.route.backend or None,
            upstream_model=self.route.upstream_model,
            stream=self.request.stream,
            request=canonical,
            tenant=self.meta.tenant,
            cache_ttl=self._persistence.settings.cache_ttl if plan.cache and self._persistence else None,
            cache_id=plan.cache_id,
            # A workflow's job lives on in its worker whatever becomes of this process.
            owner=self._persistence.instance_id if self._persistence and self.meta.route != "workflow" else None,
            settings=self.settings,
            api_key_id=self.record.api_key_id,
        )

    def _route_identity(self) -> tuple[str, str | None] | None:
        """What besides the request decides the answer: the workspace a RAG answer drew on,
        the pipeline that made a workflow's. Part of `req_id`, so idempotency and the exact
        cache never give one route's answer for another's."""
        meta = self.meta
        if meta.route == "rag":
            return ("rag", meta.workspace)
        if meta.route == "workflow":
            return ("workflow", meta.pipeline)
        return None

    def _log_row(self, base: LogRow, result: CompletionBuilder) -> LogRow:
        outcome = _outcome(result, result.error is None and result.finish_reason is not None)
        usage = result.usage
        row = replace(base)
        row.backend = self.route.backend or None  # a stand-in's, when one answered
        row.upstream_model = self.route.upstream_model
        row.status = outcome.status
        row.result = completion_to_json(result.build(), [h for h in self.response_headers if h[0] in ANSWER_HEADERS])
        row.replayable = result.replayable and not self.fell_back
        row.error = None if outcome.error is None else error_to_row(outcome.error)
        row.finish_reason = result.finish_reason.value if result.finish_reason else None
        row.prompt_tokens = usage.prompt_tokens if usage else None
        row.completion_tokens = usage.completion_tokens if usage else None
        row.ttft_ms = self.record.ttft_ms
        row.total_ms = (time.perf_counter() - self.meta.received) * 1000
        # What its lock was held for and the database could not take (a conversation turn's
        # items): written with the row, in its transaction, from the outbox if need be.
        row.conversation = self.run_lock.pending(self.meta.trace_id) if self.run_lock is not None else None
        return row

    def _finish_record(self) -> None:
        record = self.record
        record.total_ms = (time.perf_counter() - self.meta.received) * 1000
        record.replica = self._served.replica
        record.passed_over = self._served.passed_over or None
        result = self.result
        usage = result.usage
        if record.source == "backend":
            usage, record.usage_estimated = charged_usage(self.request, result, left=record.cancelled)
        if usage is not None:
            record.prompt_tokens = usage.prompt_tokens
            record.completion_tokens = usage.completion_tokens
        if result.finish_reason is not None:
            record.finish_reason = result.finish_reason.value
        if result.error is not None and record.error is None:
            record.error = result.error.message
        if otel.TRACING is not None:
            otel.TRACING.exchanged(self.request, result)
        self._record_sink(record)
