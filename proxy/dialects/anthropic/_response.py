"""Anthropic `message` objects (non-streamed responses): render the client's, parse a
backend's, and the token-count and model-list bodies."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from proxy.dialects._json import dumps
from proxy.dialects._json_prefix import object_so_far
from proxy.dialects.anthropic._request import input_object
from proxy.dialects.anthropic._vocabulary import (
    BlockDelta,
    BlockStart,
    SignedReasoningDelta,
    WireToolCallStart,
    WireUsage,
    WireUsageReport,
    finish_from_wire,
    message_id,
    new_tool_use_id,
    redacted_block,
    redacted_thinking,
    stop_reason_to_wire,
    tool_call_start,
    usage_to_wire,
)
from proxy.domain.chat import ChatCompletion, Choice
from proxy.domain.events import (
    Finish,
    ReasoningDelta,
    StreamEvent,
    StreamStart,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
)


def render_message(
    completion: ChatCompletion, events: Iterable[StreamEvent] = (), *, model: str = "", as_asked: bool = False,
    single_tool: bool = False,
) -> bytes:
    """The `message` object for a finished completion. `events` (the exchange's, when at
    hand) supply what the completion cannot hold: the thinking signature and the matched
    stop sequence. Its `model` is the backend's, else `model`; with `as_asked`, `model`
    whatever the backend says (the client asked by an alias, and is answered in its name).
    `single_tool`: the client set `disable_parallel_tool_use`, Anthropic's promise of at most
    one `tool_use`, which backends of other kinds may not keep (Ollama has no such option)."""
    return dumps(message_body(completion, events, model=model, as_asked=as_asked, single_tool=single_tool))


def message_body(
    completion: ChatCompletion, events: Iterable[StreamEvent] = (), *, model: str = "", as_asked: bool = False,
    single_tool: bool = False,
) -> dict[str, Any]:
    events = list(events)
    signature = ""
    finish: Finish | None = None
    relayed = False
    unmodelled_usage: dict[str, Any] | None = None
    fields: dict[str, Any] = {}
    for event in events:
        if isinstance(event, WireUsageReport):
            unmodelled_usage = event.unmodelled
            fields = event.message
        elif isinstance(event, SignedReasoningDelta) and event.choice == 0:
            signature = event.signature
        elif isinstance(event, Finish) and event.choice == 0:
            finish = event
        elif isinstance(event, BlockStart | WireToolCallStart):
            relayed = True
    choice = completion.choices[0] if completion.choices else None
    content: list[dict[str, Any]] = []
    if relayed:
        # An Anthropic backend's message for an Anthropic client: its blocks as they came.
        content = _blocks_in_order(events)
    elif choice is not None:
        content.extend(_thinking_blocks(choice, signature))
        if choice.content:
            content.append({"type": "text", "text": choice.content})
        for call in choice.tool_calls[:1] if single_tool else choice.tool_calls:
            content.append(
                {"type": "tool_use", "id": call.id or new_tool_use_id(), "name": call.name, "input": _tool_input(call.arguments)}
            )
    if finish is None and choice is not None and choice.finish_reason is not None:
        finish = Finish(choice.finish_reason)
    stop_reason, stop_sequence = stop_reason_to_wire(finish)
    if stop_reason == "tool_use" and not any(block.get("type") == "tool_use" for block in content):
        stop_reason = "end_turn"  # a backend's `tool_calls` without a call: clients look for one
    usage = usage_to_wire(completion.usage, unmodelled_usage)
    return {
        "id": message_id(completion.id),
        "type": "message",
        "role": "assistant",
        "model": model if as_asked and model else completion.model or model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
        **fields,
    }


def _thinking_blocks(choice: Choice, signature: str) -> list[dict[str, Any]]:
    """The choice's thinking as Claude's blocks: each it signed (a replayed answer keeps them)
    as it sent it; the rest, or all of it unsigned, one block with `signature` (the events')."""
    blocks: list[dict[str, Any]] = []
    for thinking, signed in choice.signed:
        redacted = redacted_block(SignedReasoningDelta(thinking, choice.index, signed))
        blocks.append(redacted or {"type": "thinking", "thinking": thinking, "signature": signed})
    rest = choice.reasoning[sum(len(thinking) for thinking, _ in choice.signed):]
    if rest:
        blocks.append({"type": "thinking", "thinking": rest, "signature": "" if choice.signed else signature})
    return blocks


def _tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's input as its stream's final message has it: an object cut short (at
    `max_tokens`) or broken midway is what of it parses, as Anthropic's SDKs read the stream.
    Arguments that are no object at all are kept as text, nothing of them being an input."""
    if arguments.lstrip().startswith("{"):
        return object_so_far(arguments)
    return input_object(arguments)


def _blocks_in_order(events: Iterable[StreamEvent]) -> list[dict[str, Any]]:
    """Choice 0's content blocks rebuilt from its events in their order."""
    blocks: list[dict[str, Any]] = []
    arguments: dict[int, list[str]] = {}  # position in `blocks` -> tool input fragments
    tools: dict[int, int] = {}  # tool call index -> position in `blocks`
    for event in events:
        if getattr(event, "choice", 0) != 0:
            continue
        last = blocks[-1] if blocks else None
        if isinstance(event, BlockStart):
            blocks.append(dict(event.block))
        elif isinstance(event, BlockDelta):
            if event.on_text and last is not None and last.get("type") == "text" and "citation" in event.delta:
                last["citations"] = [*(last.get("citations") or []), event.delta["citation"]]
        elif isinstance(event, TextDelta):
            if last is not None and last.get("type") == "text":
                last["text"] += event.text
            elif event.text:
                blocks.append({"type": "text", "text": event.text})
        elif isinstance(event, ReasoningDelta) and (redacted := redacted_block(event)) is not None:
            blocks.append(redacted)
        elif isinstance(event, ReasoningDelta):
            if last is None or last.get("type") != "thinking" or last["signature"]:
                last = {"type": "thinking", "thinking": "", "signature": ""}
                blocks.append(last)
            last["thinking"] += event.text
            if isinstance(event, SignedReasoningDelta):
                last["signature"] = event.signature
        elif isinstance(event, ToolCallStart):
            tools[event.index] = len(blocks)
            arguments[len(blocks)] = []
            blocks.append({"type": "tool_use", "id": event.id or new_tool_use_id(), "name": event.name, "input": {},
                           **(event.fields if isinstance(event, WireToolCallStart) else {})})
        elif isinstance(event, ToolCallDelta) and event.index in tools:
            arguments[tools[event.index]].append(event.arguments)
    for position, parts in arguments.items():
        blocks[position]["input"] = _tool_input("".join(parts))
    return blocks


def message_events(
    data: dict[str, Any], *, created: int | None = None, relay_blocks: bool = False, json_tool: str | None = None
) -> list[StreamEvent]:
    """A backend's `message` object as the events that describe it (tolerant of gaps).
    `relay_blocks` (the client speaks Anthropic): blocks the domain does not model, and
    each text block's boundary and citations, come along as `BlockStart`s. `json_tool`:
    that tool's input is the answer's text (see `json_mode`)."""
    events: list[StreamEvent] = [
        StreamStart(
            id=str(data.get("id") or message_id("")),
            model=str(data.get("model") or ""),
            created=int(time.time()) if created is None else created,
        )
    ]
    tools = 0
    json_answer = False
    content = data.get("content")
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            if relay_blocks:
                events.append(BlockStart("", 0, {**block, "text": ""}))
            if block["text"]:
                events.append(TextDelta(block["text"]))
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            signature = block.get("signature")
            if isinstance(signature, str) and signature:
                events.append(SignedReasoningDelta(block["thinking"], 0, signature))
            elif block["thinking"]:
                events.append(ReasoningDelta(block["thinking"]))
        elif kind == "tool_use" and json_tool is not None and block.get("name") == json_tool:
            json_answer = True
            answer = block.get("input")
            events.append(TextDelta(json.dumps(answer if isinstance(answer, dict) else {}, ensure_ascii=False)))
        elif kind == "tool_use":
            events.append(tool_call_start(block, tools, relay=relay_blocks))
            arguments = block.get("input")
            events.append(ToolCallDelta(tools, json.dumps(arguments if isinstance(arguments, dict) else {}, ensure_ascii=False)))
            tools += 1
        elif kind == "redacted_thinking" and (redacted := redacted_thinking(block)) is not None:
            events.append(redacted)  # as the stream gives it (see `StreamParser._block_start`)
        elif relay_blocks and kind not in ("text", "thinking"):
            events.append(BlockStart("", 0, block))
    reason = data.get("stop_reason")
    if isinstance(reason, str):
        if reason == "tool_use" and json_answer:
            reason = "end_turn"  # the forced JSON tool was the answer, not a call
        events.append(finish_from_wire(reason, data.get("stop_sequence")))
    usage = WireUsage()
    usage.take_message_fields(data)
    if isinstance(data.get("usage"), dict):
        usage.update(data["usage"])
    if isinstance(data.get("usage"), dict) or usage.message:
        events.append(usage.report(relay=relay_blocks))
    return events


def render_token_count(count: int, fields: dict[str, Any] | None = None) -> bytes:
    """`fields`: what an Anthropic backend's answer said beside the count, as it said it."""
    return dumps({"input_tokens": count, **(fields or {})})
