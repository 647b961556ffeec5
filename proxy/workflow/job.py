"""A workflow job on the wire: the envelope, the request inside it, and its NATS names.

The gateway publishes one job per request on `jobs.{pipeline}` (a work-queue stream, so each
job goes to one worker); the worker publishes the trace's events on `evt.chat.{trace_id}`;
a cancel for the job is a core message on `cancel.{trace_id}` plus a mark in the jobs KV
bucket (a worker that picks the job up later finds it there).

The request travels as the domain `ChatRequest`, serialised field by field (sorted keys,
compact) and parsed back exactly: a pipeline sees what the gateway parsed, whatever dialect
the client spoke.

Sequence numbers: attempt `k` (the k-th delivery of the job) numbers its events from
`(k - 1) * ATTEMPT_SPAN + 1`, so every event of every attempt has its own `seq` (and its own
`Nats-Msg-Id` `{trace_id}:{seq}`), and seqs still grow along the stream.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from proxy.config import PIPELINE_NAME
from proxy.domain.chat import (
    ChatRequest,
    ContentPart,
    GenerationParams,
    ImagePart,
    Message,
    OpaquePart,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
)
from proxy.domain.events import StreamStart

JOBS_STREAM = "WORKFLOW_JOBS"
JOBS_SUBJECTS = ["jobs.>"]
# Liveness of resident workers: one key per pipeline, refreshed by every worker serving it,
# gone `WORKERS_TTL` seconds after the last refresh. A draining worker refreshes no pipeline
# key (it takes no new job) but one key per job it still runs (`running_key`).
WORKERS_BUCKET = "workflow_workers"
WORKERS_TTL = 10.0
WORKERS_REFRESH = 3.0
# Jobs for the systemd launcher (`job.{trace_id}`) and cancel marks (`cancel.{trace_id}`).
JOBS_BUCKET = "workflow_jobs"

ATTEMPT_SPAN = 1_000_000_000
# The request's `workflow` object: options for the pipeline, never forwarded to a backend.
OPTIONS_FIELD = "workflow"
JOB_VERSION = 1


class JobError(ValueError):
    """A job message that cannot be understood."""


def jobs_subject(pipeline: str) -> str:
    return f"jobs.{pipeline}"


def cancel_subject(trace_id: str) -> str:
    return f"cancel.{trace_id}"


def cancel_key(trace_id: str) -> str:
    return f"cancel.{trace_id}"


def running_key(trace_id: str) -> str:
    """A draining worker's liveness for one job it still runs (workers bucket; no pipeline
    name has a dot, so it never collides with a pipeline's key)."""
    return f"run.{trace_id}"


def job_key(trace_id: str) -> str:
    return f"job.{trace_id}"


def consumer_name(pipeline: str) -> str:
    return f"workflow-{pipeline}"


def valid_pipeline(name: str) -> bool:
    return bool(PIPELINE_NAME.match(name))


def valid_trace_id(trace_id: str) -> bool:
    # A NATS subject token and a systemd instance name: no dots, spaces, slashes or wildcards.
    return 0 < len(trace_id) <= 128 and all(c.isascii() and (c.isalnum() or c in "-_") for c in trace_id)


def first_seq(attempt: int) -> int:
    return (attempt - 1) * ATTEMPT_SPAN + 1


def attempt_of(seq: int) -> int:
    return (seq - 1) // ATTEMPT_SPAN + 1 if seq > 0 else 1


@dataclass(slots=True)
class Job:
    """One pipeline run. `deadline` (unix seconds): the gateway stops waiting for the job's
    first event then, so a worker that picks it up for the first time later drops it.
    `silence` is the gateway's deadline on silence: the worker sends a `progress` event when
    it has published nothing for a third of it."""

    trace_id: str
    req_id: str
    request_id: str
    pipeline: str
    request: ChatRequest
    submitted_at: float
    deadline: float
    silence: float
    correlation_id: str | None = None
    attempt: int = 0  # attempts so far, counted by systemd launches (pull: num_delivered)
    version: int = JOB_VERSION
    # The W3C trace of the request, for a job whose store has no headers (systemd's entry;
    # a pulled job's message carries them in its NATS headers instead).
    traceparent: str | None = None
    tracestate: str | None = None

    @property
    def options(self) -> dict[str, Any]:
        value = self.request.extra.get(OPTIONS_FIELD)
        return dict(value) if isinstance(value, dict) else {}

    def stream_start(self) -> StreamStart:
        """The run's role event: the worker announces it, and the gateway shows it even for a
        pipeline that returned without emitting anything."""
        return StreamStart(id=f"chatcmpl-{self.trace_id}", model=self.request.model, created=int(self.submitted_at))

    def encode(self) -> bytes:
        body = {
            "v": self.version,
            "trace_id": self.trace_id,
            "req_id": self.req_id,
            "request_id": self.request_id,
            "correlation_id": self.correlation_id,
            "pipeline": self.pipeline,
            "request": request_to_json(self.request),
            "submitted_at": self.submitted_at,
            "deadline": self.deadline,
            "silence": self.silence,
            "attempt": self.attempt,
        }
        if self.traceparent is not None:
            body["traceparent"] = self.traceparent
            if self.tracestate:
                body["tracestate"] = self.tracestate
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, data: bytes) -> Job:
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise JobError(f"job is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise JobError("job is not a JSON object")
        version = body.get("v")
        if version != JOB_VERSION:
            raise JobError(f"job version {version!r} is not {JOB_VERSION}")
        trace_id = _str(body, "trace_id")
        if not valid_trace_id(trace_id):
            raise JobError(f"bad trace_id {trace_id!r}")
        pipeline = _str(body, "pipeline")
        if not valid_pipeline(pipeline):
            raise JobError(f"bad pipeline name {pipeline!r}")
        request = body.get("request")
        if not isinstance(request, dict):
            raise JobError("job has no request object")
        correlation = body.get("correlation_id")
        traceparent, tracestate = body.get("traceparent"), body.get("tracestate")
        return cls(
            trace_id=trace_id,
            req_id=_str(body, "req_id"),
            request_id=_str(body, "request_id"),
            pipeline=pipeline,
            request=request_from_json(request),
            submitted_at=_number(body, "submitted_at"),
            deadline=_number(body, "deadline"),
            silence=_number(body, "silence"),
            correlation_id=correlation if isinstance(correlation, str) else None,
            attempt=_count(body.get("attempt", 0)),
            traceparent=traceparent if isinstance(traceparent, str) else None,
            tracestate=tracestate if isinstance(tracestate, str) else None,
        )


def peek_trace_id(data: bytes) -> str | None:
    """The trace id of a job that failed to decode, to tell its client (if it is readable)."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    trace_id = body.get("trace_id") if isinstance(body, dict) else None
    return trace_id if isinstance(trace_id, str) and valid_trace_id(trace_id) else None


def _str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise JobError(f"job field `{key}` must be a string")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise JobError("job field `attempt` must be a count")
    return value


def _number(body: dict[str, Any], key: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JobError(f"job field `{key}` must be a number")
    return float(value)


# -- ChatRequest <-> JSON -------------------------------------------------------------------


def request_to_json(request: ChatRequest) -> dict[str, Any]:
    params = asdict(request.params)
    params["stop"] = list(request.params.stop)
    return {
        "model": request.model,
        "messages": [_message_to_json(m) for m in request.messages],
        "params": params,
        "tools": [asdict(t) for t in request.tools],
        "tool_choice": asdict(request.tool_choice) if request.tool_choice else None,
        "stream": request.stream,
        "include_usage": request.include_usage,
        "dialect": request.dialect,
        "extra": request.extra,
        "parallel_tool_calls": request.parallel_tool_calls,
    }


def _message_to_json(message: Message) -> dict[str, Any]:
    return {
        "role": message.role,
        "content": [_part_to_json(p) for p in message.content],
        "tool_calls": [asdict(c) for c in message.tool_calls],
        "tool_call_id": message.tool_call_id,
        "name": message.name,
        "reasoning": message.reasoning,
        "extra": message.extra,
    }


def _part_to_json(part: ContentPart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        return {"type": "image", "url": part.url, "detail": part.detail}
    return {"type": "opaque", "dialect": part.dialect, "data": part.data}


def request_from_json(body: dict[str, Any]) -> ChatRequest:
    try:
        params_raw = dict(body.get("params") or {})
        response_format = params_raw.pop("response_format", None)
        params = GenerationParams(
            **params_raw,
            response_format=ResponseFormat(**response_format) if response_format else None,
        )
        params.stop = tuple(params.stop)
        choice = body.get("tool_choice")
        return ChatRequest(
            model=str(body["model"]),
            messages=[_message_from_json(m) for m in body.get("messages") or []],
            params=params,
            tools=[Tool(**t) for t in body.get("tools") or []],
            tool_choice=ToolChoice(**choice) if choice else None,
            stream=bool(body.get("stream")),
            include_usage=body.get("include_usage"),
            dialect=str(body.get("dialect") or "openai"),
            extra=dict(body.get("extra") or {}),
            parallel_tool_calls=body.get("parallel_tool_calls"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise JobError(f"job request is malformed: {exc!r}") from None


def _message_from_json(body: dict[str, Any]) -> Message:
    return Message(
        role=body["role"],
        content=tuple(_part_from_json(p) for p in body.get("content") or []),
        tool_calls=tuple(ToolCall(**c) for c in body.get("tool_calls") or []),
        tool_call_id=body.get("tool_call_id"),
        name=body.get("name"),
        reasoning=body.get("reasoning"),
        extra=dict(body.get("extra") or {}),
    )


def _part_from_json(body: dict[str, Any]) -> ContentPart:
    kind = body.get("type")
    if kind == "text":
        return TextPart(str(body["text"]))
    if kind == "image":
        return ImagePart(str(body["url"]), body.get("detail"))
    if kind == "opaque":
        return OpaquePart(str(body["dialect"]), dict(body["data"]))
    raise ValueError(f"unknown content part type {kind!r}")


@dataclass(slots=True)
class WorkerBeacon:
    """What a worker writes under its pipelines' keys in the workers bucket."""

    worker: str
    host: str
    pid: int
    concurrency: int
    pipelines: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()
