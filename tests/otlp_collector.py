"""A real OTLP/HTTP trace receiver on loopback: what an OpenTelemetry Collector's `otlphttp`
receiver takes (`POST /v1/traces`, protobuf), decoded with `opentelemetry-proto`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

SERVER, CLIENT, CONSUMER = 2, 3, 5  # the protocol's span kinds


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(item) for item in value.array_value.values)
    return getattr(value, kind) if kind else None


@dataclass
class Span:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    events: dict[str, int]  # name → time (ns)
    start: int
    end: int
    status: int  # 0 unset, 1 ok, 2 error
    status_message: str
    resource: dict[str, Any]


@dataclass
class Collector:
    spans: list[Span] = field(default_factory=list)
    exports: int = 0
    url: str = ""

    def named(self, name: str) -> list[Span]:
        return [span for span in self.spans if span.name == name]

    def of_kind(self, kind: int) -> list[Span]:
        return [span for span in self.spans if span.kind == kind]

    def children(self, parent: Span) -> list[Span]:
        return [span for span in self.spans if span.parent_id == parent.span_id and span.trace_id == parent.trace_id]

    def take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.exports += 1
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(Span(
                        name=span.name, kind=span.kind, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        events={event.name: event.time_unix_nano for event in span.events},
                        start=span.start_time_unix_nano, end=span.end_time_unix_nano,
                        status=span.status.code, status_message=span.status.message, resource=resource,
                    ))


@contextmanager
def otlp_collector() -> Iterator[Collector]:
    """A collector listening on 127.0.0.1 (a free port); its `url` is the OTLP endpoint."""
    collector = Collector()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if self.path == "/v1/traces" and self.headers.get("content-type") == "application/x-protobuf":
                collector.take(body)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
            else:
                answer = b""
                self.send_response(404)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    collector.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield collector
    finally:
        server.shutdown()
        server.server_close()
