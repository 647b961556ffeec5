"""The seed's event schema on `evt.chat.{trace_id}`, sans-IO.

One JSON object per NATS message, each with its sequence number `seq` (1, 2, …, per trace):

    {"seq":1,"type":"role","role":"assistant","id":"chatcmpl-…","model":"m","created":1700000000}
    {"seq":2,"type":"token","text":"Hel","task":"A"}          task: the choice or fan-out task
    {"seq":3,"type":"reasoning","text":"…"}                    an extension: reasoning deltas
    {"seq":3,"type":"reasoning","text":"…","signature":"…"}    the last of a thinking block Claude signed
    {"seq":3,"type":"refusal","text":"…"}                      an extension: an OpenAI model's refusal
    {"seq":3,"type":"annotations","annotations":[…]}           an extension: its citations, OpenAI's shape
    {"seq":4,"type":"function_call","name":"f","arguments":"{"}  an extension: legacy function calling
    {"seq":4,"type":"audio","audio":{"id":"audio_1","data":"UklG","transcript":"Hi"}}  an extension: spoken output
    {"seq":4,"type":"tool_call","index":0,"id":"call_1","name":"search","arguments":""}
    {"seq":5,"type":"tool_call","index":0,"arguments":"{\\"q\\":"}   later argument fragments
    {"seq":6,"type":"finish","reason":"tool_calls"}             one choice finished
    {"seq":7,"type":"usage","usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14}}
    {"seq":8,"type":"error","error":{"kind":"BACKEND","message":"…"}}
    {"seq":9,"type":"finished","reason":"tool_calls","winner":"qwen3-8b","status":"completed"}

`finished` is the stream's last event, published exactly once, after the outcome is committed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.dialects._json import dumps
from proxy.dialects.anthropic import SignedReasoningDelta
from proxy.domain.chat import FinishReason, Usage
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import (
    AnnotationsDelta,
    AudioDelta,
    ContinuedFinish,
    Finish,
    FunctionCallDelta,
    ReasoningDelta,
    RefusalDelta,
    StreamEvent,
    StreamFailed,
    StreamStart,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
    audio_delta,
)

TASKS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def task_name(choice: int) -> str:
    return TASKS[choice] if choice < len(TASKS) else str(choice)


def task_index(task: Any) -> int:
    if isinstance(task, int):
        return task
    if isinstance(task, str) and len(task) == 1 and task in TASKS:
        return TASKS.index(task)
    if isinstance(task, str) and task.isdigit():
        return int(task)
    return 0


@dataclass(slots=True, frozen=True)
class Finished:
    """The terminal event: the exchange is over and its outcome is stored."""

    reason: str
    status: str
    winner: str | None = None


WireEvent = StreamEvent | Finished

# How a run's readers are told it was stopped by its client's cancel (`finished` with status
# `cancelled`) as a stream event: its renderer ends the stream as cancelled (a Response's
# `status: cancelled`), or as an error in a dialect that has no such end.
RUN_CANCELLED = GatewayError(
    ErrorKind.CONFLICT, "The run was cancelled before it completed.", code="run_cancelled",
)


_json_string = json.JSONEncoder(ensure_ascii=False).encode


def encode_event(seq: int, event: WireEvent) -> bytes:
    if type(event) is TextDelta:  # nearly every event: formatted directly, no dict
        text, task = _json_string(event.text), task_name(event.choice)
        if event.logprobs is None:
            return f'{{"seq":{seq},"type":"token","text":{text},"task":"{task}"}}'.encode()
        # Log probabilities asked for (OpenAI's shape): a resumed or read-back stream has them too.
        head = f'{{"seq":{seq},"type":"token","text":{text},"task":"{task}","logprobs":'.encode()
        return head + dumps(event.logprobs) + b"}"
    body: dict[str, Any] = {"seq": seq}
    match event:
        case TextDelta(text, choice):
            body |= {"type": "token", "text": text, "task": task_name(choice)}
        case ToolCallDelta(index, arguments, choice):
            body |= {"type": "tool_call", "index": index, "arguments": arguments, "task": task_name(choice)}
        case StreamStart(id_, model, created):
            body |= {"type": "role", "role": "assistant", "id": id_, "model": model, "created": created}
        case ReasoningDelta(text, choice):
            body |= {"type": "reasoning", "text": text, "task": task_name(choice)}
            if isinstance(event, SignedReasoningDelta) and event.signature:
                body["signature"] = event.signature  # Claude's: its stream read again keeps it
        case RefusalDelta(text, choice):
            body |= {"type": "refusal", "text": text, "task": task_name(choice)}
        case AnnotationsDelta(annotations, choice):
            body |= {"type": "annotations", "annotations": list(annotations), "task": task_name(choice)}
        case FunctionCallDelta(name, arguments, choice):
            body |= {"type": "function_call", "name": name, "arguments": arguments, "task": task_name(choice)}
        case AudioDelta(audio_id, data, transcript, expires_at, choice):
            spoken = {"id": audio_id, "data": data, "transcript": transcript, "expires_at": expires_at}
            body |= {"type": "audio", "audio": spoken, "task": task_name(choice)}
        case ToolCallStart(index, call_id, name, choice):
            body |= {"type": "tool_call", "index": index, "id": call_id, "name": name, "arguments": "",
                     "task": task_name(choice)}
        case Finish(reason, choice):
            body |= {"type": "finish", "reason": reason.value, "task": task_name(choice)}
            if isinstance(event, ContinuedFinish) and event.context:
                body["context"] = list(event.context)
        case UsageReport(usage):
            body |= {"type": "usage", "usage": {
                "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens}}
        case StreamFailed(error):
            body |= {"type": "error", "error": {
                "kind": error.kind.name, "message": error.message, "code": error.code, "param": error.param,
                "retry_after": error.retry_after}}
        case Finished(reason, status, winner):
            body |= {"type": "finished", "reason": reason, "status": status, "winner": winner}
    return dumps(body)


def error_to_row(error: GatewayError) -> dict[str, Any]:
    """A run's error as its journal row keeps it: what a client reading the row (attached on
    another instance, a poll, a replay) is told, as the run's own client was (its `code` and
    `param`: `context_length_exceeded`, what LangChain and LiteLLM act on)."""
    row: dict[str, Any] = {"kind": error.kind.name, "message": error.message}
    for name, value in (("code", error.code), ("param", error.param), ("retry_after", error.retry_after)):
        if value is not None:
            row[name] = value
    return row


def error_from_row(row: Mapping[str, Any], *, kind: ErrorKind, message: str) -> GatewayError:
    """The error a row (or an error event) keeps; `kind` and `message` where it has none."""
    code, param, retry_after = row.get("code"), row.get("param"), row.get("retry_after")
    return GatewayError(
        ErrorKind.__members__.get(str(row.get("kind")), kind), str(row.get("message") or message),
        code=code if isinstance(code, str) else None, param=param if isinstance(param, str) else None,
        retry_after=float(retry_after) if isinstance(retry_after, int | float) else None,
    )


def decode_event(data: bytes) -> tuple[int, WireEvent | None]:
    """(seq, event); the event is None for types this version does not know (skip them)."""
    try:
        body = json.loads(data)
    except ValueError:
        return 0, None
    if not isinstance(body, dict):
        return 0, None
    raw_seq = body.get("seq")
    seq = raw_seq if isinstance(raw_seq, int) else 0
    choice = task_index(body.get("task"))
    kind = body.get("type")
    event: WireEvent | None = None
    if kind == "token" and isinstance(body.get("text"), str):
        logprobs = body.get("logprobs")
        event = TextDelta(body["text"], choice, logprobs if isinstance(logprobs, dict) else None)
    elif kind == "tool_call":
        index = body.get("index", 0) if isinstance(body.get("index"), int) else 0
        if isinstance(body.get("name"), str) and "id" in body:
            event = ToolCallStart(index, str(body.get("id") or ""), body["name"], choice)
        else:
            event = ToolCallDelta(index, str(body.get("arguments") or ""), choice)
    elif kind == "role":
        event = StreamStart(str(body.get("id") or ""), str(body.get("model") or ""), int(body.get("created") or 0))
    elif kind == "reasoning" and isinstance(body.get("text"), str):
        signature = body.get("signature")
        event = (
            SignedReasoningDelta(body["text"], choice, signature) if isinstance(signature, str) and signature
            else ReasoningDelta(body["text"], choice)
        )
    elif kind == "refusal" and isinstance(body.get("text"), str):
        event = RefusalDelta(body["text"], choice)
    elif kind == "function_call":
        event = FunctionCallDelta(str(body.get("name") or ""), str(body.get("arguments") or ""), choice)
    elif kind == "audio" and isinstance(body.get("audio"), dict):
        event = audio_delta(body["audio"], choice)
    elif kind == "annotations" and isinstance(body.get("annotations"), list):
        event = AnnotationsDelta(tuple(item for item in body["annotations"] if isinstance(item, dict)), choice)
    elif kind == "finish":
        context = body.get("context")
        event = (
            ContinuedFinish(_reason(body.get("reason")), choice, tuple(context)) if isinstance(context, list) and context
            else Finish(_reason(body.get("reason")), choice)
        )
    elif kind == "usage" and isinstance(body.get("usage"), dict):
        usage = body["usage"]
        event = UsageReport(Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)))
    elif kind == "error" and isinstance(body.get("error"), dict):
        event = StreamFailed(error_from_row(body["error"], kind=ErrorKind.BACKEND, message="stream failed"))
    elif kind == "finished":
        event = Finished(str(body.get("reason") or "stop"), str(body.get("status") or "completed"), body.get("winner"))
    return seq, event


def _reason(value: Any) -> FinishReason:
    try:
        return FinishReason(value)
    except ValueError:
        return FinishReason.STOP
