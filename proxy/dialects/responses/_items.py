"""A Response's input items (`GET /v1/responses/{id}/input_items`), read back from the
request its journal row keeps (the canonical request of `proxy/domain/fingerprint.py`)."""

from __future__ import annotations

from typing import Any

from proxy.dialects._json import is_decimal
from proxy.dialects.anthropic import REDACTED_THINKING
from proxy.dialects.responses._compaction import given_compaction
from proxy.dialects.responses._response import call_item, reasoning_item
from proxy.domain.errors import invalid_request

_MAX_LIMIT = 100


def input_items(
    messages: list[dict[str, Any]], response: str, *, instructions: str | None, prior: int = 0,
    namespaces: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """The items the request gave as `input`, in its order: messages, the assistant's
    function calls, their outputs (`instructions`, which became its first system message,
    are not input, as OpenAI lists them; nor are the `prior` messages after them, the
    conversation of the response it continued). `namespaces`: the request's tool namespaces,
    whose tools' calls name their namespace, as its answer named them (see `output_of`)."""
    trace = response.removeprefix("resp_")
    items: list[dict[str, Any]] = []

    def named(kind: str) -> str:
        return f"{kind}_{trace}_in{len(items)}"

    if messages and instructions and messages[0].get("role") == "system" and _text(messages[0].get("content") or []) == instructions:
        messages = messages[1:]
    for message in messages[prior:]:
        role = str(message.get("role") or "user")
        parts = message.get("content") or []
        if role == "tool":
            items.append({
                "id": named("fco"), "type": "function_call_output", "call_id": str(message.get("tool_call_id") or ""),
                "output": _text(parts), "status": "completed",
            })
            continue
        compaction = given_compaction(role, parts, f"cmp_{trace}_in{len(items)}")
        if compaction is not None:
            items.append(compaction)
            continue
        reasoning = message.get("reasoning")
        signed = [block for block in (_signed(p) for p in parts) if block is not None] if role == "assistant" else []
        if signed or (role == "assistant" and isinstance(reasoning, str) and reasoning):
            # Given back as a reasoning item (see `_request._parse_items`): listed, and carried on in
            # a conversation, as that item; each block Claude signed an item of its own, as its
            # answer gave them.
            for thinking, signature in signed or [(str(reasoning), "")]:
                items.append(reasoning_item(named("rs"), thinking, "completed", signature=signature))
        content = [part for part in (_part(p, role) for p in parts) if part is not None]
        if content or not message.get("tool_calls"):
            items.append({"id": named("msg"), "type": "message", "role": role, "status": "completed", "content": content})
        for call_id, name, arguments in message.get("tool_calls") or []:
            items.append(call_item(named("fc"), str(call_id), str(name), str(arguments), "completed", namespaces))
    return items


def _signed(part: Any) -> tuple[str, str] | None:
    """A Claude block given back (see `_signed.thinking_block`), as its reasoning item holds it."""
    data = part.get("data") if isinstance(part, dict) and part.get("opaque") == "anthropic" else None
    if not isinstance(data, dict):
        return None
    if data.get("type") == "redacted_thinking" and isinstance(data.get("data"), str) and data["data"]:
        return "", REDACTED_THINKING + data["data"]
    thinking, signature = data.get("thinking"), data.get("signature")
    if data.get("type") == "thinking" and isinstance(thinking, str) and isinstance(signature, str) and signature:
        return thinking, signature
    return None


def _text(parts: list[Any]) -> str:
    return "".join(part for part in parts if isinstance(part, str))


def _part(part: Any, role: str) -> dict[str, Any] | None:
    if isinstance(part, str):
        if role == "assistant":
            return {"type": "output_text", "text": part, "annotations": []}
        return {"type": "input_text", "text": part}
    if isinstance(part, dict) and "image" in part:
        return {"type": "input_image", "image_url": part["image"], "detail": part.get("detail") or "auto"}
    file = part.get("data", {}).get("file") if isinstance(part, dict) and part.get("opaque") == "openai" else None
    if isinstance(file, dict) and isinstance(file.get("file_data"), str):
        # An `input_file` (see `_request._parse_file`), or an OpenAI chat client's `file`.
        return {"type": "input_file", "file_data": file["file_data"]} | (
            {"filename": file["filename"]} if isinstance(file.get("filename"), str) else {}
        )
    return None  # another dialect's part: not one a Responses request can have given


def item_page(items: list[dict[str, Any]], query: dict[str, list[str]]) -> dict[str, Any]:
    """OpenAI's list page of `items`: `order` (`desc`, the default, or `asc`), `after` an
    item's id, `limit` (1 to 100, default 20)."""
    order = (query.get("order") or ["desc"])[0]
    if order not in ("asc", "desc"):
        raise invalid_request("`order` must be `asc` or `desc`.", param="order")
    raw_limit = (query.get("limit") or ["20"])[0]
    if not is_decimal(raw_limit) or not 1 <= int(raw_limit) <= _MAX_LIMIT:
        raise invalid_request(f"`limit` must be an integer from 1 to {_MAX_LIMIT}.", param="limit")
    ordered = items if order == "asc" else items[::-1]
    after = (query.get("after") or [""])[0]
    if after:
        position = next((i for i, item in enumerate(ordered) if item["id"] == after), None)
        if position is None:
            raise invalid_request(f"No input item `{after}` in this response.", param="after")
        ordered = ordered[position + 1 :]
    page = ordered[: int(raw_limit)]
    return {
        "object": "list", "data": page, "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > len(page),
    }
