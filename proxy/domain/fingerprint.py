"""`req_id`: what makes two chat requests the same request (the seed's idempotency key).

sha256 over canonical JSON of the model, the messages and every parameter that changes the
answer. Not part of it: streaming, the client's dialect, usage reporting, request ids — the
same question asked as a stream or not, in OpenAI's or Ollama's words, is one request.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields, is_dataclass
from typing import Any

from proxy.domain.chat import (
    ChatRequest,
    GenerationParams,
    ImagePart,
    Message,
    OpaquePart,
    TextPart,
    ToolCall,
)


def _part(part: TextPart | ImagePart | OpaquePart) -> Any:
    if isinstance(part, TextPart):
        return part.text
    if isinstance(part, ImagePart):
        return {"image": part.url, "detail": part.detail}
    return {"opaque": part.dialect, "data": part.data}


def _message(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": [_part(p) for p in message.content]}
    if message.tool_calls:
        out["tool_calls"] = [[c.id, c.name, c.arguments] for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    if message.extra:  # a legacy `function_call`, a `prefix` flag...: they change the answer
        out["extra"] = message.extra
    if message.reasoning:  # a turn's reasoning given back reaches a thinking model's template
        out["reasoning"] = message.reasoning
    return out


def message_to_canonical(message: Message) -> dict[str, Any]:
    """A message as a journalled request keeps it (see `message_from_canonical`)."""
    return _message(message)


def message_from_canonical(data: dict[str, Any]) -> Message:
    """A message as `_message` wrote it (a journalled request's, continued by a later one)."""
    parts: list[TextPart | ImagePart | OpaquePart] = []
    for part in data.get("content") or []:
        if isinstance(part, str):
            parts.append(TextPart(part))
        elif isinstance(part, dict) and "image" in part:
            parts.append(ImagePart(str(part["image"]), part.get("detail")))
        elif isinstance(part, dict) and "opaque" in part:
            parts.append(OpaquePart(str(part["opaque"]), dict(part.get("data") or {})))
    return Message(
        role=data.get("role") or "user",
        content=tuple(parts),
        tool_calls=tuple(ToolCall(str(i), str(n), str(a)) for i, n, a in data.get("tool_calls") or []),
        tool_call_id=data.get("tool_call_id"),
        name=data.get("name"),
        reasoning=data.get("reasoning") or None,
        extra=dict(data.get("extra") or {}),
    )


_PARAM_NAMES = tuple(f.name for f in fields(GenerationParams))


def canonical_request(
    request: ChatRequest, upstream_model: str | None = None, route: tuple[str, str | None] | None = None
) -> dict[str, Any]:
    """`route`: a route that answers otherwise than the model alone would (RAG with its
    workspace, a workflow with its pipeline); None for the direct route."""
    params = request.params
    # Not `asdict(params)`: its recursive deep copy costs more than all the rest.
    present = {
        name: asdict(value) if is_dataclass(value) else value  # type: ignore[arg-type]
        for name in _PARAM_NAMES
        if (value := getattr(params, name)) not in (None, (), [])
    }
    return {
        "model": upstream_model or request.model,
        "messages": [_message(m) for m in request.messages],
        "params": present,
        "tools": [asdict(t) for t in request.tools],
        "tool_choice": asdict(request.tool_choice) if request.tool_choice else None,
        **({"parallel_tool_calls": request.parallel_tool_calls} if request.parallel_tool_calls is not None else {}),
        "extra": request.extra,
        **({"route": list(route)} if route is not None else {}),
    }


def request_fingerprint(
    request: ChatRequest, upstream_model: str | None = None, route: tuple[str, str | None] | None = None
) -> str:
    return fingerprint_of(canonical_request(request, upstream_model, route))


def fingerprint_of(canonical: dict[str, Any]) -> str:
    """`req_id` of a request already in its canonical form."""
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
