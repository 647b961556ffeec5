"""A request's W3C trace, read from its ASGI scope once, before any layer serves it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.domain.tracecontext import TraceContext, received_trace, start_trace


def request_trace(scope: Mapping[str, Any]) -> TraceContext:
    """The trace the client's `traceparent` continues, or a new one (none sent, an invalid
    one, or several: the spec's test suite expects a new trace for a repeated header)."""
    trace = received_from(scope)
    return trace if trace is not None else start_trace()


def received_from(scope: Mapping[str, Any]) -> TraceContext | None:
    """The trace the client's `traceparent` continues; None for none (see `request_trace`)."""
    traceparent: bytes | None = None
    repeated = False
    for name, value in scope["headers"]:
        if name == b"traceparent":
            repeated = traceparent is not None
            traceparent = value
    if traceparent is None or repeated:
        return None
    # A repeated tracestate is one list (RFC 9110 §5.3), as its spec says.
    state = b",".join(value for name, value in scope["headers"] if name == b"tracestate")
    return received_trace(traceparent.decode("latin-1"), state.decode("latin-1"))
