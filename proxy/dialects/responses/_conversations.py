"""OpenAI's Conversations API (`/v1/conversations`), sans-IO: its requests, its objects, and
the items a conversation keeps.

A conversation keeps items as a Response's input items are listed (`input_items`): parsed
as a request's input would be, then written back in wire form, each with its id. So what a
conversation holds is what `responses.create(conversation=...)` puts before its input, and
a response's own items (its input and output, appended once it has completed) keep the ids
its `input_items` and `output` give them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.dialects._json import Fields, is_decimal, loads_object
from proxy.dialects.responses._items import input_items
from proxy.dialects.responses._request import _parse_items, _parse_metadata
from proxy.dialects.responses._request import item_not_found as item_not_found  # for the routes
from proxy.domain.chat import Message
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.domain.fingerprint import message_to_canonical
from proxy.domain.ids import storable

MAX_ITEMS = 20  # per create, as on OpenAI
_PREFIX = "conv_"


def conversation_object(conversation: str, created_at: int, metadata: dict[str, Any]) -> dict[str, Any]:
    return {"id": conversation, "object": "conversation", "created_at": created_at, "metadata": metadata}


def deleted_object(conversation: str) -> dict[str, Any]:
    return {"id": conversation, "object": "conversation.deleted", "deleted": True}


def item_list(items: list[dict[str, Any]], *, has_more: bool = False) -> dict[str, Any]:
    return {
        "object": "list", "data": items, "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None, "has_more": has_more,
    }


def conversation_not_found(conversation: str, param: str | None = None) -> GatewayError:
    return GatewayError(ErrorKind.NOT_FOUND, f"Conversation with id '{conversation}' not found.", param=param)


def conversation_locked() -> GatewayError:
    """OpenAI's words for a response in a conversation another response is answering in."""
    return invalid_request(
        "Another process is currently operating on this conversation. Please retry in a few seconds.",
        param="conversation", code="conversation_locked",
    )


def is_conversation_id(value: str) -> bool:
    return value.startswith(_PREFIX) and len(value) > len(_PREFIX) and storable(value)


def _metadata(fields: Fields) -> dict[str, str]:
    """OpenAI's metadata: at most 16 keys of up to 64 characters, values of up to 512."""
    metadata = _parse_metadata(fields.object("metadata")) or {}
    if any(len(key) > 64 or len(value) > 512 for key, value in metadata.items()):
        raise invalid_request(
            "Invalid `metadata`: keys are at most 64 characters long, values at most 512.", param="metadata"
        )
    return metadata


Referenced = Mapping[str, dict[str, Any]]


def parse_create(
    body: bytes, mint: str, referenced: Referenced | None = None
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """`POST /v1/conversations`: its metadata and its first items (ids minted from `mint`).
    `referenced`: the items its `item_reference`s name, as for `parse_responses_request`."""
    fields = Fields(loads_object(body) if body.strip() else {})
    metadata = _metadata(fields)
    raw = fields.array("items")
    return metadata, kept_items(raw, "items", mint, referenced) if raw else []


def parse_update(body: bytes) -> dict[str, str]:
    """`POST /v1/conversations/{id}`: its new metadata (the whole of it)."""
    fields = Fields(loads_object(body))
    if "metadata" not in fields.data:
        raise invalid_request("Missing required parameter: 'metadata'.", param="metadata")
    return _metadata(fields)


def parse_items(body: bytes, mint: str, referenced: Referenced | None = None) -> list[dict[str, Any]]:
    """`POST /v1/conversations/{id}/items`: 1 to 20 items to add."""
    fields = Fields(loads_object(body))
    raw = fields.array("items", required=True, nonempty=True)
    assert raw is not None
    return kept_items(raw, "items", mint, referenced)


def kept_items(
    raw: list[Any], param: str, mint: str, referenced: Referenced | None = None
) -> list[dict[str, Any]]:
    """Input items as a conversation keeps them (a 400 naming the path of a bad one); a
    reasoning item is kept with the assistant turn it comes before, as a request's input
    gives it to that turn (one before no assistant turn is dropped). An
    `item_reference` is a copy of the item it names, under a new id as every item added is:
    with `referenced` None, a list that has any raises `UnresolvedReferences` for the caller
    to look them up."""
    if len(raw) > MAX_ITEMS:
        raise invalid_request(
            f"Invalid '{param}': array too long. Expected an array with maximum length {MAX_ITEMS}, but got an array "
            f"with length {len(raw)} instead.", param=param,
        )
    messages: list[Message] = []
    _parse_items(raw, messages, referenced, param=param)
    # Calls given with their namespace are kept as given (no tools say which names are whose).
    namespaces = frozenset(
        item["namespace"] for item in raw
        if isinstance(item, dict) and item.get("type") == "function_call" and isinstance(item.get("namespace"), str)
    )
    return input_items([message_to_canonical(m) for m in messages], mint, instructions=None, namespaces=namespaces)


def prefix_messages(items: list[dict[str, Any]]) -> list[Message]:
    """A conversation's items as the messages before a response's input."""
    messages: list[Message] = []
    _parse_items(items, messages, {})
    return messages


def page_query(query: dict[str, list[str]], max_limit: int = 100) -> tuple[str | None, int, str]:
    """A listing's `after`, `limit` (1 to 100, default 20) and `order` (`desc` by default)."""
    order = (query.get("order") or ["desc"])[0]
    if order not in ("asc", "desc"):
        raise invalid_request("`order` must be `asc` or `desc`.", param="order")
    raw_limit = (query.get("limit") or ["20"])[0]
    if not is_decimal(raw_limit) or not 1 <= int(raw_limit) <= max_limit:
        raise invalid_request(f"`limit` must be an integer from 1 to {max_limit}.", param="limit")
    after = (query.get("after") or [""])[0]
    if not storable(after):
        raise invalid_request("`after` must be an item's id.", param="after")
    return after or None, int(raw_limit), order
