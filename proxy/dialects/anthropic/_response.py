"""Anthropic `message` objects (non-streamed responses): render the client's, parse a
backend's, and the token-count and model-list bodies."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from proxy.dialects._json import dumps
from proxy.dialects.anthropic._request import input_object
from proxy.dialects.anthropic._vocabulary import (
    SignedReasoningDelta,
    WireUsage,
    finish_from_wire,
    message_id,
    new_tool_use_id,
    stop_reason_to_wire,
    usage_to_wire,
)
from proxy.domain.chat import ChatCompletion
from proxy.domain.events import (
    Finish,
    ReasoningDelta,
    StreamEvent,
    StreamStart,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
)


def render_message(completion: ChatCompletion, events: Iterable[StreamEvent] = (), *, model: str = "") -> bytes:
    """The `message` object for a finished completion. `events` (the exchange's, when at
    hand) supply what the completion cannot hold: the thinking signature and the matched
    stop sequence."""
    return dumps(message_body(completion, events, model=model))


def message_body(completion: ChatCompletion, events: Iterable[StreamEvent] = (), *, model: str = "") -> dict[str, Any]:
    signature = ""
    finish: Finish | None = None
    for event in events:
        if isinstance(event, SignedReasoningDelta) and event.choice == 0:
            signature = event.signature
        elif isinstance(event, Finish) and event.choice == 0:
            finish = event
    choice = completion.choices[0] if completion.choices else None
    content: list[dict[str, Any]] = []
    if choice is not None:
        if finish is None and choice.finish_reason is not None:
            finish = Finish(choice.finish_reason)
        if choice.reasoning:
            content.append({"type": "thinking", "thinking": choice.reasoning, "signature": signature})
        if choice.content:
            content.append({"type": "text", "text": choice.content})
        for call in choice.tool_calls:
            content.append(
                {"type": "tool_use", "id": call.id or new_tool_use_id(), "name": call.name, "input": input_object(call.arguments)}
            )
    stop_reason, stop_sequence = stop_reason_to_wire(finish)
    usage = usage_to_wire(completion.usage)
    return {
        "id": message_id(completion.id),
        "type": "message",
        "role": "assistant",
        "model": completion.model or model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


def message_events(data: dict[str, Any], *, created: int | None = None) -> list[StreamEvent]:
    """A backend's `message` object as the events that describe it (tolerant of gaps)."""
    events: list[StreamEvent] = [
        StreamStart(
            id=str(data.get("id") or message_id("")),
            model=str(data.get("model") or ""),
            created=int(time.time()) if created is None else created,
        )
    ]
    tools = 0
    content = data.get("content")
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            events.append(TextDelta(block["text"]))
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            signature = block.get("signature")
            if isinstance(signature, str) and signature:
                events.append(SignedReasoningDelta(block["thinking"], 0, signature))
            elif block["thinking"]:
                events.append(ReasoningDelta(block["thinking"]))
        elif kind == "tool_use":
            call_id = block.get("id")
            events.append(
                ToolCallStart(tools, call_id if isinstance(call_id, str) and call_id else new_tool_use_id(), str(block.get("name") or ""))
            )
            arguments = block.get("input")
            events.append(ToolCallDelta(tools, json.dumps(arguments if isinstance(arguments, dict) else {}, ensure_ascii=False)))
            tools += 1
    reason = data.get("stop_reason")
    if isinstance(reason, str):
        events.append(finish_from_wire(reason, data.get("stop_sequence")))
    if isinstance(data.get("usage"), dict):
        usage = WireUsage()
        usage.update(data["usage"])
        events.append(UsageReport(usage.domain()))
    return events


def render_token_count(count: int) -> bytes:
    return dumps({"input_tokens": count})
