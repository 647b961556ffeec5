"""OpenAI's stored chat completions (`store: true`), sans-IO: what a stored completion's
journal row keeps besides its answer, and the wire shapes `client.chat.completions.retrieve`,
`.list`, `.update`, `.delete` and `.messages.list` read.

A completion is stored by its journal row (`chat_log`): its answer, its request's messages,
and its settings, which say it was stored (`STORED`) and hold its metadata. Its id is the one
its client was given (a backend's `chatcmpl-…`, relayed as it came).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.dialects._json import Fields, is_decimal, loads_object
from proxy.dialects.openai._response import completion_body
from proxy.dialects.responses._conversations import _metadata
from proxy.dialects.responses._request import storable_metadata
from proxy.domain.chat import ChatCompletion, ChatRequest
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.domain.ids import storable

# What a stored chat completion's journal row says in its settings (a Response's settings
# hold `store` too, hence a key of its own).
STORED = "chat_completion_stored"
MADE_AT = "made_at"
MAX_LIMIT = 100


def check_store_fields(fields: Fields) -> None:
    """`store` and, for a completion to store, `metadata` as OpenAI checks them: a boolean;
    at most 16 string values, keys of up to 64 characters, values of up to 512 (400s naming
    the field). Not a chat's metadata that is not stored: LiteLLM's clients send their own
    there (`tags` lists, numbers), which the backend gets as before."""
    if fields.boolean("store") and fields.data.get("metadata") is not None:
        _metadata(fields)


def stored_settings(request: ChatRequest, made_at: int) -> dict[str, Any] | None:
    """What the journal row of a chat asked with `store: true` keeps for reading it back
    (None for any other chat: nothing is kept besides the journal's own row). `made_at`:
    when it was asked (microseconds since the epoch), the order completions are listed in
    (its row's own times are its first write's, at its start or at its end)."""
    if request.extra.get("store") is not True:
        return None
    metadata = request.extra.get("metadata")
    return {STORED: True, MADE_AT: made_at, "metadata": dict(metadata) if isinstance(metadata, dict) else {}}


def is_stored(settings: dict[str, Any] | None) -> bool:
    return bool(settings) and settings.get(STORED) is True  # type: ignore[union-attr]


def parse_update(body: bytes) -> dict[str, str]:
    """`POST /v1/chat/completions/{id}`: its new metadata, the whole of it (null: none)."""
    fields = Fields(loads_object(body))
    if "metadata" not in fields.data:
        raise invalid_request("Missing required parameter: 'metadata'.", param="metadata")
    return _metadata(fields) if fields.data["metadata"] is not None else {}


def completion_object(completion: ChatCompletion, metadata: dict[str, Any], *, single_tool: bool = False) -> dict[str, Any]:
    """A stored completion as `retrieve` and `list` give it: the `chat.completion` its client
    was given (streamed, assembled), its metadata with it."""
    return {**completion_body(completion, single_tool=single_tool), "metadata": metadata}


def deleted_object(completion_id: str) -> dict[str, Any]:
    return {"object": "chat.completion.deleted", "id": completion_id, "deleted": True}


def not_found(completion_id: str, kept: str) -> GatewayError:
    """`kept`: how long the journal keeps a completion ("for 30 days after it was made")."""
    return GatewayError(
        ErrorKind.NOT_FOUND,
        f"Chat completion with id '{completion_id}' not found: only completions made with `store: true` are kept, "
        f"each {kept}, unless it is deleted.",
        param="completion_id", code="not_found",
    )


def is_completion_id(value: str) -> bool:
    """Whether `value` can be a completion's id at all (any backend's: not only `chatcmpl-…`)."""
    return 0 < len(value) <= 512 and storable(value)


@dataclass(frozen=True, slots=True)
class PageQuery:
    order: str
    limit: int
    after: str | None


def page_query(query: dict[str, list[str]]) -> PageQuery:
    """`after`, `limit` (1 to 100, 20 by default) and `order` (`asc`, the default, or `desc`)."""
    order = (query.get("order") or ["asc"])[0]
    if order not in ("asc", "desc"):
        raise invalid_request("`order` must be `asc` or `desc`.", param="order")
    raw_limit = (query.get("limit") or ["20"])[0]
    if not is_decimal(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise invalid_request(f"`limit` must be an integer from 1 to {MAX_LIMIT}.", param="limit")
    after = (query.get("after") or [""])[0] or None
    if after is not None and not storable(after):
        raise invalid_request(f"No chat completion `{after!r}` to list after.", param="after")
    return PageQuery(order, int(raw_limit), after)


def metadata_filter(query: dict[str, list[str]]) -> dict[str, str]:
    """`metadata[key]=value` query parameters (the SDK's form of `metadata={...}`): the pairs
    a listed completion's metadata must all have."""
    wanted: dict[str, str] = {}
    for name, values in query.items():
        if name.startswith("metadata[") and name.endswith("]") and values:
            wanted[name[len("metadata[") : -1]] = values[0]
    return storable_metadata(wanted)


def page(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    return {
        "object": "list", "data": data, "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None, "has_more": has_more,
    }


def stored_messages(messages: list[dict[str, Any]], completion_id: str) -> list[dict[str, Any]]:
    """A stored completion's request messages (as its journal row keeps them: canonical form)
    as `messages.list` gives them, each with an id (`{completion id}-{place}`, as OpenAI's)."""
    return [_store_message(message, f"{completion_id}-{i}") for i, message in enumerate(messages)]


def _store_message(message: dict[str, Any], message_id: str) -> dict[str, Any]:
    extra = message.get("extra") or {}
    parts = [wire for part in message.get("content") or [] if (wire := _part(part)) is not None]
    as_sent = extra.get("content") if isinstance(extra.get("content"), list) else None
    texts = [part["text"] for part in parts if part["type"] == "text"]
    whole_text = len(parts) == 1 and len(texts) == 1 and as_sent is None
    out: dict[str, Any] = {
        "id": message_id,
        "role": extra.get("role") or message.get("role") or "user",
        "content": "\n".join(texts) if texts else None,
        "content_parts": None if whole_text or not parts else (as_sent or parts),
    }
    if message.get("name") is not None:
        out["name"] = message["name"]
    calls = message.get("tool_calls") or []
    if calls:
        out["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            for call_id, name, arguments in calls
        ]
    if message.get("tool_call_id") is not None:
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _part(part: Any) -> dict[str, Any] | None:
    """A canonical content part in OpenAI's wire form (the parts the gateway added, such as
    another dialect's cache markers, left out)."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if isinstance(part, dict) and "image" in part:
        image = {"url": part["image"], **({"detail": part["detail"]} if part.get("detail") else {})}
        return {"type": "image_url", "image_url": image}
    if isinstance(part, dict) and part.get("opaque") == "openai" and isinstance(part.get("data"), dict):
        return dict(part["data"])
    return None


def message_page(messages: list[dict[str, Any]], query: PageQuery) -> dict[str, Any]:
    """A page of a stored completion's messages (oldest first unless `order=desc`)."""
    ordered = messages if query.order == "asc" else messages[::-1]
    if query.after is not None:
        position = next((i for i, message in enumerate(ordered) if message["id"] == query.after), None)
        if position is None:
            raise invalid_request(f"No message `{query.after}` in this chat completion.", param="after")
        ordered = ordered[position + 1 :]
    data = ordered[: query.limit]
    return page(data, has_more=len(ordered) > len(data))
