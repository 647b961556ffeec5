"""The gateway's own spans over OTLP/HTTP (the optional extra: `pip install 'llm-proxy[otel]'`).

On when the standard environment names a collector (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `[tracing] otlp_endpoint` does; off otherwise, and
then `TRACING` is None, the SDK is not even imported, and the request path keeps its own route
(the app's traced `asgi_app` is put in place only when on): what is left is a test of a value
at hand per backend attempt (`TraceContext.span`) and per chat record, never per chunk.

On, each HTTP request is a server span (a child of the client's `traceparent` when it sent
a valid one), named and attributed as the OpenTelemetry GenAI conventions say once its record
says what it was; each backend attempt is a client span under it, whose context is the
`traceparent` the backend receives (so vLLM's spans nest under the gateway's). Spans go to
the SDK's `BatchSpanProcessor`: a bounded queue (full: the span is dropped) exported by its
own thread, so a slow or absent collector never holds a request or the trio loop.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from proxy.domain.tracecontext import TraceContext

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from proxy.config import TracingSettings
    from proxy.domain.chat import ChatRequest
    from proxy.domain.events import CompletionBuilder
    from proxy.services._records import ExchangeRecord
    from proxy.workflow.runner import JobRun

log = logging.getLogger(__name__)

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# `kind` in the request log → `gen_ai.operation.name` (the conventions' names where they have one).
_OPERATIONS = {"chat": "chat", "completion": "text_completion", "embeddings": "embeddings"}
# How long a stop waits for the last spans' export.
STOP_SECONDS = 5.0
# What a span keeps of a string a client chose (a model name, stop sequences, a user agent, an
# error naming them): a request's body may hold 16 MiB of them, which its span would keep
# queued and export whole (a collector refuses a batch past 4 MiB over gRPC, every request's
# spans in it lost). The SDK's own limit (OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT) is off by default
# and warns for each value it cuts, a log line per request of a client's choosing.
MAX_TEXT = 1024
MAX_STOP_SEQUENCES = 16  # OpenAI takes 4; each is cut as any text


class Tracing:
    """One process's tracer provider and exporter (each `--workers` process has its own)."""

    def __init__(self, provider: TracerProvider, propagate: bool, kinds: Mapping[str, str] | None = None) -> None:
        from opentelemetry import trace as api
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self._api = api  # imported once, not per request
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("llm_proxy")
        # Backend requests carry the attempt's traceparent only with `[tracing] propagate`.
        self.propagate = propagate
        # A backend's name → its kind (openai, anthropic, ollama): `gen_ai.provider.name`.
        self._kinds = dict(kinds or {})
        self._server, self._client, self._consumer = SpanKind.SERVER, SpanKind.CLIENT, SpanKind.CONSUMER
        self._status, self._error_code = Status, StatusCode.ERROR
        self._excluded = _excluded_urls()

    def traces(self, path: str) -> bool:
        """Whether a request for `path` gets a span: not the probes and the metrics scrape
        (`/health`, `/ready`, `/metrics`: a span every few seconds per instance, for nobody),
        nor a path `OTEL_PYTHON_EXCLUDED_URLS` names (the Python instrumentations' variable:
        comma-separated regular expressions, searched for in the path)."""
        return path not in _UNTRACED and (self._excluded is None or self._excluded.search(path) is None)

    def _error(self, description: str) -> Any:
        return self._status(self._error_code, description)

    def request_span(self, scope: Mapping[str, Any], received: TraceContext | None) -> TraceContext:
        """The request's server span, under the client's span when it sent one, as the trace
        its backend calls continue."""
        return self._start(scope.get("method", "GET"), self._server, received, _http_attributes(scope))

    def job_span(self, received: TraceContext | None, subject: str, attempt: int) -> TraceContext:
        """A workflow worker's span for a job taken from NATS: under the span of the gateway
        request that queued it (its message headers' `traceparent`), its model calls' spans
        under it."""
        attributes = {
            "gen_ai.operation.name": "invoke_workflow", "messaging.system": "nats",
            "messaging.operation.type": "process", "messaging.destination.name": subject,
            "llm_proxy.attempt": attempt,
        }
        return self._start("invoke_workflow", self._consumer, received, attributes)

    def end_job(self, trace: TraceContext, run: JobRun | None) -> None:
        """The job's span, ended with what became of its attempt `run` (None: the job was
        not run, as undecodable or claimed by another process)."""
        span: Span = trace.span
        if not span.is_recording():
            return
        if run is None:
            span.end()
            return
        pipeline, outcome = run.job.pipeline, run.outcome
        span.update_name(f"invoke_workflow {pipeline}")
        span.set_attribute("gen_ai.workflow.name", pipeline)
        span.set_attribute("llm_proxy.trace_id", run.job.trace_id)
        if outcome is not None:
            span.set_attribute("llm_proxy.workflow.status", outcome.status)
            if outcome.winner:
                span.set_attribute("llm_proxy.workflow.winner", outcome.winner)
            if outcome.status == "completed":
                span.set_attribute("gen_ai.response.finish_reasons", (outcome.reason,))
            elif outcome.status == "cancelled":
                span.set_attribute("llm_proxy.cancelled", True)
            else:
                error = outcome.error
                span.set_status(self._error(error.message if error is not None else "failed"))
                span.set_attribute("error.type", error.code if error is not None and error.code else "failed")
        elif run.interrupted_by:
            span.set_attribute("llm_proxy.interrupted_by", run.interrupted_by)  # handed back: another attempt follows
        span.end()

    def _start(self, name: str, kind: Any, received: TraceContext | None, attributes: dict[str, Any]) -> TraceContext:
        api = self._api
        parent = None
        state = ""
        if received is not None:
            _, trace_id, parent_id, flags = received.traceparent.split("-")
            state = received.state
            # Its tracestate is not handed to the SDK, which logs a warning for each member it
            # finds malformed (a line per request of a client's choosing); the backends get it
            # as received all the same.
            parent = api.set_span_in_context(api.NonRecordingSpan(api.SpanContext(
                int(trace_id, 16), int(parent_id, 16), is_remote=True, trace_flags=api.TraceFlags(int(flags, 16)),
            )))
        span = self.tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
        context = span.get_span_context()
        trace_id = f"{context.trace_id:032x}"
        return TraceContext(trace_id, f"00-{trace_id}-{context.span_id:016x}-{context.trace_flags:02x}", state, span)

    def routed(self, trace: TraceContext, method: str, rule: str) -> None:
        """The route a request matched (a template: `/v1/models/<path:model_id>`), for its
        span's name as the HTTP conventions give it, `{method} {route}`, until its record
        names it a GenAI operation."""
        span: Span = trace.span
        if span.is_recording():
            span.set_attribute("http.route", rule)
            span.update_name(f"{method} {rule}")

    def end_request(self, trace: TraceContext, status: int | None, cancelled: bool) -> None:
        span: Span = trace.span
        if not span.is_recording():
            return
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(self._error(f"HTTP {status}"))
                span.set_attribute("error.type", str(status))
        if cancelled:
            _mark_cancelled(span)
        span.end()

    def recorded(self, record: ExchangeRecord) -> None:
        """What the request's record (its log line) says, on its server span: the GenAI
        conventions' name and attributes. A record sink: called in the request's context."""
        span = _request_span()
        if span is None:
            return
        operation = _OPERATIONS.get(record.kind, record.kind)
        model = _text(record.model) if record.model else record.model
        span.update_name(f"{operation} {model}" if model else operation)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "llm_proxy.trace_id": record.trace_id,
            "llm_proxy.source": record.source,
            "llm_proxy.stream": record.stream,
            "llm_proxy.dialect": record.dialect,
        }
        if record.upstream_model and "gen_ai.response.model" not in (getattr(span, "attributes", None) or {}):
            attributes["gen_ai.response.model"] = _text(record.upstream_model)  # the backend named none
        if record.backend:
            attributes["llm_proxy.backend"] = record.backend
            if kind := self._kinds.get(record.backend):
                attributes["gen_ai.provider.name"] = kind
        if record.replica:
            attributes["llm_proxy.replica"] = record.replica
        if record.prompt_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = record.prompt_tokens
        if record.completion_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = record.completion_tokens
        if record.usage_estimated:
            attributes["llm_proxy.usage_estimated"] = True
        if record.finish_reason:
            attributes["gen_ai.response.finish_reasons"] = (record.finish_reason,)
        if record.api_key_id is not None:
            attributes["llm_proxy.api_key_id"] = record.api_key_id
        if record.ttft_ms is not None and record.stream:  # the conventions': streams only
            attributes["gen_ai.response.time_to_first_chunk"] = record.ttft_ms / 1000
            # Also as an event at that moment, which a trace view draws on the span's bar.
            start = getattr(span, "start_time", None)
            if start is not None:
                span.add_event("gen_ai.first_chunk", timestamp=start + int(record.ttft_ms * 1_000_000))
        if record.status:
            attributes["http.response.status_code"] = record.status
        span.set_attributes(attributes)
        if record.cancelled:
            _mark_cancelled(span)
        elif record.error is not None or record.status >= 500:
            span.set_status(self._error(_text(record.error) if record.error else f"HTTP {record.status}"))
            span.set_attribute("error.type", str(record.status) if record.status >= 400 else "stream_error")

    def exchanged(self, request: ChatRequest, result: CompletionBuilder) -> None:
        """What a chat asked for and its backend's answer said, on the request's span (the
        conventions' request and response attributes the record does not hold)."""
        span = _request_span()
        if span is None:
            return
        params = request.params
        attributes: dict[str, Any] = {}
        for name, value in (
            ("gen_ai.request.max_tokens", params.max_tokens), ("gen_ai.request.temperature", params.temperature),
            ("gen_ai.request.top_p", params.top_p), ("gen_ai.request.top_k", params.top_k),
            ("gen_ai.request.seed", params.seed), ("gen_ai.request.presence_penalty", params.presence_penalty),
            ("gen_ai.request.frequency_penalty", params.frequency_penalty), ("gen_ai.request.choice.count", params.n),
        ):
            if value is not None:
                attributes[name] = value
        if params.stop:
            attributes["gen_ai.request.stop_sequences"] = tuple(_text(stop) for stop in params.stop[:MAX_STOP_SEQUENCES])
        if (start := result.start) is not None:
            if start.id:
                attributes["gen_ai.response.id"] = _text(start.id)
            if start.model:
                attributes["gen_ai.response.model"] = _text(start.model)
        if (usage := result.usage) is not None:
            if usage.cached_tokens:
                attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
            if usage.cache_write_tokens:
                attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
            if usage.reasoning_tokens:
                attributes["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
        span.set_attributes(attributes)

    def attempt(
        self, trace: TraceContext, method: str, url: str, host: str, send_context: bool
    ) -> tuple[Span, dict[str, str]]:
        """A backend attempt's client span, under the request's, and the headers its
        request carries: its own context, for the backend's spans to nest under (none for
        a backend with `trace_context = false`)."""
        host_name, _, port = host.rpartition(":") if host.rpartition(":")[2].isdigit() else (host, "", "")
        attributes: dict[str, Any] = {"http.request.method": method, "url.full": url, "server.address": host_name or host}
        if port:
            attributes["server.port"] = int(port)
        span = self.tracer.start_span(
            method, context=self._api.set_span_in_context(trace.span), kind=self._client, attributes=attributes
        )
        if not (self.propagate and send_context):
            return span, {}
        context = span.get_span_context()
        headers = {"traceparent": f"00-{trace.trace_id}-{context.span_id:016x}-{context.trace_flags:02x}"}
        if trace.state:
            headers["tracestate"] = trace.state
        return span, headers

    def answered(self, span: Span, status: int) -> None:
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_status(self._error(f"HTTP {status}"))
            span.set_attribute("error.type", str(status))

    def failed(self, span: Span, error: BaseException) -> None:
        """An attempt that got no response head (refused, dropped, timed out, or cancelled)."""
        if span.is_recording():
            span.set_status(self._error(_text(str(error)) or type(error).__name__))
            span.set_attribute("error.type", type(error).__qualname__)
            span.end()

    def stop(self) -> None:
        """Export what is queued, then stop the exporter's thread. Blocking, for as long as
        the SDK retries a collector that is down: run it off the trio loop, bounded."""
        self.provider.shutdown()


_UNTRACED = frozenset({"/health", "/ready", "/metrics"})


def _excluded_urls() -> re.Pattern[str] | None:
    patterns = [part.strip() for part in os.environ.get("OTEL_PYTHON_EXCLUDED_URLS", "").split(",") if part.strip()]
    if not patterns:
        return None
    try:
        return re.compile("|".join(f"(?:{pattern})" for pattern in patterns))
    except re.error as error:
        log.warning("OTEL_PYTHON_EXCLUDED_URLS is no list of regular expressions (%s): every path gets spans", error)
        return None


def _request_span() -> Span | None:
    """The server span of the request this task serves, while it is open (one ended already:
    a durable run outliving its client's request)."""
    from proxy.infra.backends import current_trace

    trace = current_trace.get()
    if trace is None or trace.span is None or not trace.span.is_recording():
        return None
    return trace.span  # type: ignore[no-any-return]


def _text(value: str) -> str:
    return value if len(value) <= MAX_TEXT else value[:MAX_TEXT]


def _mark_cancelled(span: Span) -> None:
    # The client's choice, not the gateway's failure: no error status, but named as such
    # (nginx's 499, as in the request log).
    span.set_attribute("llm_proxy.cancelled", True)
    span.set_attribute("http.response.status_code", 499)


def _http_attributes(scope: Mapping[str, Any]) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": scope.get("method", "GET"),
        "url.path": _text(scope.get("path", "/")),
        "url.scheme": scope.get("scheme", "http"),
    }
    server = scope.get("server")
    if server:
        attributes["server.address"], attributes["server.port"] = server[0], server[1]
    client = scope.get("client")
    if client:
        attributes["client.address"] = client[0]
    if version := scope.get("http_version"):
        attributes["network.protocol.version"] = version
    for name, value in scope.get("headers", ()):
        if name == b"user-agent":
            attributes["user_agent.original"] = _text(value.decode("latin-1"))
        elif name == b"host":
            host, _, port = value.decode("latin-1").rpartition(":")
            # `int` refuses what `isdigit` takes ("²", past 4,300 digits): the request's 500.
            if host and port.isascii() and port.isdigit() and len(port) <= 5:
                attributes["server.address"], attributes["server.port"] = _text(host), int(port)
            else:
                attributes["server.address"] = _text(value.decode("latin-1"))
    return attributes


# This process's tracing; None: off (the default), and nothing in the request path runs.
TRACING: Tracing | None = None


def wanted(settings: TracingSettings) -> bool:
    """Whether this configuration and environment ask for spans."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(settings.otlp_endpoint) or any(os.environ.get(name, "").strip() for name in _ENDPOINT_VARIABLES)


def start(settings: TracingSettings, service: str = "llm-proxy", kinds: Mapping[str, str] | None = None) -> Tracing | None:
    """Set up this process's tracing when asked for (see `wanted`), as `TRACING`; None when
    not asked for, or when this process has it set up already (a worker beside a gateway)."""
    global TRACING
    if not wanted(settings) or TRACING is not None:
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "an OTLP endpoint is configured but the OpenTelemetry SDK is not installed "
            "(pip install 'llm-proxy[otel]'): the gateway records no spans"
        )
        return None
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    # The sampler is the SDK's reading of OTEL_TRACES_SAMPLER (parent-based, always on by default).
    provider = TracerProvider(resource=resource)
    try:
        exporter = _exporter(settings)
    except ImportError:
        log.warning(
            "an OTLP endpoint is configured but the OTLP/HTTP exporter is not installed "
            "(pip install 'llm-proxy[otel]'): the gateway records no spans"
        )
        return None
    provider.add_span_processor(BatchSpanProcessor(exporter))
    TRACING = Tracing(provider, settings.propagate, kinds)
    return TRACING


def _exporter(settings: TracingSettings) -> Any:
    """The OTLP exporter the environment asks for: HTTP/protobuf (bundled), or gRPC when
    its exporter is installed. Its endpoint: the environment's, else `otlp_endpoint`."""
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    ).strip().lower()
    configured = None if any(os.environ.get(name, "").strip() for name in _ENDPOINT_VARIABLES) else settings.otlp_endpoint
    if protocol == "grpc":
        try:
            grpc = importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")  # not bundled
        except ImportError:
            # Said at start-up: otherwise only the exports' failures would tell, one by one.
            log.warning(
                "OTLP over gRPC is asked for, but its exporter is not installed (pip install "
                "opentelemetry-exporter-otlp-proto-grpc): exporting over HTTP/protobuf instead, which "
                "a collector's gRPC port (4317) does not take; its HTTP port is 4318"
            )
        else:
            return grpc.OTLPSpanExporter(endpoint=configured)
    elif protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not supported: exporting over HTTP/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # `otlp_endpoint` means what OTEL_EXPORTER_OTLP_ENDPOINT does: the signal's path is added.
    return OTLPSpanExporter(endpoint=configured.rstrip("/") + "/v1/traces" if configured else None)


async def stop_soon(tracing: Tracing) -> None:
    """`stop`, off the trio loop, and not waited for past `STOP_SECONDS` (the SDK retries a
    collector that is down for longer)."""
    with trio.move_on_after(STOP_SECONDS):
        await trio.to_thread.run_sync(stop, tracing, abandon_on_cancel=True)


def stop(tracing: Tracing) -> None:
    """Blocking (see `Tracing.stop`)."""
    global TRACING
    if TRACING is tracing:
        TRACING = None
    started = time.monotonic()
    try:
        tracing.stop()
    except Exception as error:  # a collector that is down must not fail the stop
        log.warning("exporting the last spans failed after %.1fs: %s", time.monotonic() - started, error)
