"""Anthropic's Models API, served: `GET /v1/models` (cursor pages) and `GET /v1/models/{id}`.

A page is `{"data": [...], "has_more", "first_id", "last_id"}`; `after_id` asks for the
models after that one, `before_id` for those before it (the SDK's auto-pagination follows
`last_id`, or `first_id` when it pages backwards), `limit` how many (1 to 1000, 20 by default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from proxy.dialects._json import dumps, is_decimal
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


# What Anthropic's Models API says of a model beyond its id and date, kept from a Claude
# backend's listing and passed on as it said it.
MODEL_FACTS = (
    "display_name", "max_input_tokens", "max_tokens", "capabilities", "lifecycle", "deprecated_at", "retires_at",
    "line",
)


def model_object(model_id: str, *, created: int = 0, facts: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A model as Anthropic describes one; `created` (Unix seconds) 0 if unknown, as the
    API does for an unknown release date (the epoch). `facts` are what the model's backend
    said of it: a Claude backend's Models API fields (`MODEL_FACTS`), or vLLM's
    `max_model_len`, the window Anthropic calls `max_input_tokens`."""
    facts = facts or {}
    body: dict[str, Any] = {
        "type": "model",
        "id": model_id,
        "display_name": model_id,
        "created_at": datetime.fromtimestamp(max(created, 0), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lifecycle": "active",
    }
    window = facts.get("max_model_len")
    if isinstance(window, int) and not isinstance(window, bool):
        body["max_input_tokens"] = window
    body.update((key, facts[key]) for key in MODEL_FACTS if facts.get(key) is not None)
    return body


def render_model(model: Mapping[str, Any]) -> bytes:
    return dumps(model)


def model_not_found(model_id: str) -> GatewayError:
    return GatewayError(ErrorKind.NOT_FOUND, f"model: {model_id}", code="not_found_error")


@dataclass(frozen=True, slots=True)
class PageQuery:
    limit: int = DEFAULT_LIMIT
    after_id: str | None = None
    before_id: str | None = None


def parse_page_query(args: Mapping[str, str]) -> PageQuery:
    """The page a listing asks for, from its query parameters; a 400 for a bad one."""
    raw_limit = args.get("limit")
    limit = DEFAULT_LIMIT
    if raw_limit is not None:
        if not is_decimal(raw_limit.strip()) or not 1 <= int(raw_limit) <= MAX_LIMIT:
            raise invalid_request(f"limit: Input should be an integer between 1 and {MAX_LIMIT}.", param="limit")
        limit = int(raw_limit)
    after_id = args.get("after_id") or None
    before_id = args.get("before_id") or None
    if after_id is not None and before_id is not None:
        raise invalid_request("Only one of `after_id` and `before_id` may be given.", param="after_id")
    return PageQuery(limit, after_id, before_id)


def _position(models: Sequence[Mapping[str, Any]], model_id: str, param: str) -> int:
    for index, model in enumerate(models):
        if model["id"] == model_id:
            return index
    raise invalid_request(f"{param}: no model `{model_id}` in the list.", param=param)


def render_model_page(models: Sequence[Mapping[str, Any]], query: PageQuery) -> bytes:
    """The page of `models` (model objects, in listing order) that `query` asks for."""
    if query.before_id is not None:
        end = _position(models, query.before_id, "before_id")
        start = max(0, end - query.limit)
        has_more = start > 0
    else:
        start = 0 if query.after_id is None else _position(models, query.after_id, "after_id") + 1
        end = min(len(models), start + query.limit)
        has_more = end < len(models)
    page = list(models[start:end])
    return dumps({
        "data": page,
        "has_more": has_more,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    })
