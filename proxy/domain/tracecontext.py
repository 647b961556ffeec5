"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the `traceparent` and
`tracestate` a client's tracing sends, read as the spec says, and what each backend request
the gateway makes for it carries on.

The gateway exports no spans of its own, so it passes the client's parent id on unchanged (the
spec lets a vendor that records nothing do so): a backend's spans (vLLM's
`--otlp-traces-endpoint`) then nest under the client's span, where a parent id of the
gateway's own would name a span no collector has and leave them loose in the trace. Two
attempts (a replica moved off, a stand-in) are told apart by the backends' own spans.
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

# version-trace_id-parent_id-flags, then (a later version only) more after a dash.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16
# What the spec asks a vendor to pass on at least; members past it are dropped (the
# longest first, then from the end), as the spec says to truncate.
TRACESTATE_MAX_CHARS = 512
_TRACESTATE_MAX_MEMBERS = 32
_LONG_MEMBER = 128


class TraceContext(NamedTuple):  # a tuple: made per request, ~1 µs less than a frozen dataclass
    """The trace a request belongs to: its id, the `traceparent` (version 00) its backend
    requests carry, and the tracestate to pass on ("" for none)."""

    trace_id: str
    traceparent: str
    state: str = ""
    # The gateway's server span for the request, with OTLP export on (`infra/otel.py`);
    # None otherwise. Typed loosely: the domain knows nothing of the SDK.
    span: Any = None

    def outgoing(self) -> dict[str, str]:
        """The headers of a backend request made for this trace."""
        if self.state:
            return {"traceparent": self.traceparent, "tracestate": self.state}
        return {"traceparent": self.traceparent}


def start_trace() -> TraceContext:
    """A new trace, sampled (a backend's tracer samples by its parent's flag: vLLM's, with the
    SDK's default sampler, records the gateway's calls as it did without a parent), under one
    parent id for the request: its backend calls (a retry on a replica, a stand-in) are siblings."""
    trace_id = os.urandom(16).hex()
    while trace_id == _ZERO_TRACE:  # pragma: no cover - one chance in 2**128
        trace_id = os.urandom(16).hex()
    return TraceContext(trace_id, f"00-{trace_id}-{_span_id()}-01")


def received_trace(traceparent: str | None, tracestate: str | None) -> TraceContext | None:
    """The trace a client's headers continue, or None when `traceparent` is missing or
    invalid (the spec: start a new trace; its tracestate is then ignored too)."""
    if not traceparent:
        return None
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return None
    if version == "00":
        if rest is not None:  # version 00 is exactly 55 characters
            return None
    else:
        # A later version: what version 00 knows is read from its place, the rest left
        # out, and only the sampled flag (the one flag 00 defines) passed on, as version 00.
        flags = "01" if int(flags, 16) & 1 else "00"
    state = _bounded_state(tracestate) if tracestate else ""
    return TraceContext(trace_id, f"00-{trace_id}-{parent_id}-{flags}", state)


def _bounded_state(value: str) -> str:
    """`tracestate` as it may be passed on: "" when it is not printable ASCII or has too
    many members; past `TRACESTATE_MAX_CHARS`, whole members dropped (the spec's order)."""
    value = value.strip(" \t")
    if not (value.isascii() and value.isprintable()):
        return ""
    if len(value) <= TRACESTATE_MAX_CHARS and value.count(",") < _TRACESTATE_MAX_MEMBERS:
        return value
    members = [member.strip(" \t") for member in value.split(",")]
    members = [member for member in members if member]
    if len(members) > _TRACESTATE_MAX_MEMBERS:
        return ""
    short = [member for member in members if len(member) <= _LONG_MEMBER]
    if len(",".join(members)) > TRACESTATE_MAX_CHARS:
        members = short
    while members and len(",".join(members)) > TRACESTATE_MAX_CHARS:
        members.pop()
    return ",".join(members)


def _span_id() -> str:
    span = os.urandom(8).hex()
    while span == _ZERO_PARENT:  # pragma: no cover - one chance in 2**64
        span = os.urandom(8).hex()
    return span
