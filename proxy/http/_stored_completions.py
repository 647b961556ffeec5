"""OpenAI's stored chat completions (`store: true`), read back from the journal, each the
API key's own (and, for a key limited to some models, only those models'):

    GET    /v1/chat/completions                         list (`model`, `metadata[k]=v`, `after`, `limit`, `order`)
    GET    /v1/chat/completions/{id}                    the `chat.completion`, its metadata with it
    POST   /v1/chat/completions/{id}                    replace its metadata
    DELETE /v1/chat/completions/{id}                    delete it (from every reader, caches and events too)
    GET    /v1/chat/completions/{id}/messages           its request's messages (`after`, `limit`, `order`)

Nothing is copied: a chat asked with `store: true` says so in its journal row's settings
(`_openai.chat_completions`), and the row is read by the id its client was given.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import trio

from proxy.dialects._json import dumps
from proxy.dialects.openai import stored
from proxy.domain.errors import database_not_configured, invalid_request
from proxy.http._errors import Reply
from proxy.http._front import FrontDoor, Incoming
from proxy.http._head import current_tenant
from proxy.http._openapi import _BOOL, _CHAT_COMPLETION, _OBJ, _STR, _ok, _op, document
from proxy.infra.chat_store import completion_from_json
from proxy.infra.stored_completions import StoredCompletion
from proxy.services.auth import current_principal
from proxy.services.persistence import Persistence

exchanges = FrontDoor()

# Longest wait for the rows of this instance's stored chats that have ended but whose rows
# are not written yet (a group commit, a few milliseconds after their client had the answer).
_ROW_WAIT_SECONDS = 5.0
# How long an id not found is looked for again before it is a 404 while another instance is
# alive: a chat it answered a moment ago has its row written by its group commit (its client
# had the answer first), and the id (the backend's) names no process that this one could ask after.
_ELSEWHERE_SECONDS = 1.0


def _journal(incoming: Incoming) -> Persistence:
    persistence = incoming.gateway.persistence
    if persistence is None or persistence.resources.database_url is None:
        raise database_not_configured("stored chat completions need")
    return persistence


def _may_read(found: StoredCompletion) -> bool:
    """A key limited to some models reads only the completions of those it may use now."""
    principal = current_principal.get()
    return principal is None or principal.may_use_model(found.model)


async def _settled(persistence: Persistence, tenant: str | None) -> None:
    """Wait (bounded) for the rows of this instance's stored chats of the tenant that have
    ended: a client reading its completion right after it had the answer finds it."""
    with trio.move_on_after(_ROW_WAIT_SECONDS):
        for log in list(persistence.runs.live.values()):
            if log.closed and stored.is_stored(log.settings) and (tenant is None or log.tenant == tenant):
                await log.written.wait()


async def _readable(persistence: Persistence, completion_id: str, tenant: str | None) -> StoredCompletion | None:
    if not stored.is_completion_id(completion_id):
        return None  # no store is asked (a NUL in it is no outage)
    await _settled(persistence, tenant)
    elsewhere = None  # whether another instance may have answered it: asked once, if need be
    with trio.move_on_after(_ELSEWHERE_SECONDS):
        while True:
            found = await persistence.stored_completions(
                lambda store: store.by_id(completion_id, tenant), f"the stored chat completion {completion_id}"
            )
            if found:
                return next((row for row in found if _may_read(row)), None)
            if elsewhere is None:
                elsewhere = await persistence.others_alive()
            if not elsewhere:
                return None  # a gateway alone: its own chats' rows were settled above
            await trio.sleep(0.05)  # another instance's group commit: a few milliseconds
    return None


async def _found(incoming: Incoming) -> tuple[Persistence, StoredCompletion]:
    persistence = _journal(incoming)
    completion_id = incoming.params["completion_id"]
    found = await _readable(persistence, completion_id, current_tenant())
    if found is None:
        raise stored.not_found(completion_id, persistence.kept)
    return persistence, found


def _object(found: StoredCompletion, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    return stored.completion_object(
        completion_from_json(found.result), found.metadata if metadata is None else metadata,
        single_tool=found.single_tool,
    )


def _query(incoming: Incoming) -> dict[str, list[str]]:
    return parse_qs(incoming.head.query.decode("latin-1"))


@exchanges.route("/v1/chat/completions", method="GET", kind=None)
async def list_completions(incoming: Incoming) -> Reply:
    persistence = _journal(incoming)
    query = _query(incoming)
    paging = stored.page_query(query)
    wanted = stored.metadata_filter(query)
    model = (query.get("model") or [""])[0] or None
    tenant = current_tenant()
    cursor: str | None = None
    if paging.after is not None:
        after = await _readable(persistence, paging.after, tenant)
        if after is None:
            raise invalid_request(f"No chat completion `{paging.after}` to list after.", param="after")
        cursor = after.trace_id
    else:
        await _settled(persistence, tenant)
    kept: list[StoredCompletion] = []
    while len(kept) <= paging.limit:
        # One more than the page, to tell whether there are more; a key limited to some
        # models reads on past the completions of others.
        rows = await persistence.stored_completions(
            lambda store, after=cursor: store.page(  # type: ignore[misc]
                tenant, order=paging.order, limit=paging.limit + 1, after=after, model=model, metadata=wanted,
            ),
            "the stored chat completions",
        )
        kept += [row for row in rows if _may_read(row)]
        if len(rows) <= paging.limit:
            break
        cursor = rows[-1].trace_id
    data = [_object(row) for row in kept[: paging.limit]]
    return Reply(dumps(stored.page(data, has_more=len(kept) > paging.limit)))


@exchanges.route("/v1/chat/completions/<completion_id>", method="GET", kind=None)
async def retrieve_completion(incoming: Incoming) -> Reply:
    _, found = await _found(incoming)
    return Reply(dumps(_object(found)))


@exchanges.route("/v1/chat/completions/<completion_id>", method="POST", kind=None)
async def update_completion(incoming: Incoming) -> Reply:
    """Its metadata replaced whole; nothing else of it changes."""
    metadata = stored.parse_update(incoming.body)
    persistence, found = await _found(incoming)
    updated = await persistence.stored_completions(
        lambda store: store.set_metadata(found.trace_id, metadata), f"the stored chat completion {found.id}",
        change=True,
    )
    if not updated:  # deleted meanwhile
        raise stored.not_found(incoming.params["completion_id"], persistence.kept)
    return Reply(dumps(_object(found, metadata)))


@exchanges.route("/v1/chat/completions/<completion_id>", method="DELETE", kind=None)
async def delete_completion(incoming: Incoming) -> Reply:
    """Gone for every reader: its row emptied, its cache entries and events deleted."""
    persistence, found = await _found(incoming)
    if not await persistence.delete(found.trace_id):
        raise stored.not_found(incoming.params["completion_id"], persistence.kept)
    return Reply(dumps(stored.deleted_object(incoming.params["completion_id"])))


@exchanges.route("/v1/chat/completions/<completion_id>/messages", method="GET", kind=None)
async def completion_messages(incoming: Incoming) -> Reply:
    paging = stored.page_query(_query(incoming))
    persistence, found = await _found(incoming)
    messages = await persistence.journal_read(
        lambda store: store.stored_messages(found.trace_id), f"the request of {found.trace_id}"
    )
    listed = stored.stored_messages(messages or [], incoming.params["completion_id"])
    return Reply(dumps(stored.message_page(listed, paging)))


# -- the OpenAPI document ------------------------------------------------------------------------------

_ID = {"name": "completion_id", "in": "path", "required": True, "schema": _STR,
       "description": "The id its client was given (the backend's, e.g. vLLM's `chatcmpl-…`)."}
_METADATA = {"type": "object", "maxProperties": 16, "additionalProperties": {"type": "string", "maxLength": 512},
             "propertyNames": {"maxLength": 64}}
_STORED = {**_CHAT_COMPLETION, "properties": {**_CHAT_COMPLETION.get("properties", {}), "metadata": _METADATA}}


def _list_of(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object", "required": ["object", "data", "first_id", "last_id", "has_more"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": item},
                       "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]}, "has_more": _BOOL},
    }


_PAGING = [
    {"name": "after", "in": "query", "schema": _STR, "description": "The id of the last one of the previous page."},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": stored.MAX_LIMIT},
     "description": "Default 20."},
    {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}, "description": "Default `asc`, oldest first."},
]
_OWN = (" Only completions made with `store: true`; each is its API key's own (a key limited to some models reads "
        "those models' only): another's is a 404.")

document("/v1/chat/completions", "get", _op(
    "Stored chat completions, a page (OpenAI's `client.chat.completions.list`)", "OpenAI", _ok(_list_of(_STORED)),
    parameters=[
        {"name": "model", "in": "query", "schema": _STR, "description": "Only those of this model."},
        {"name": "metadata", "in": "query", "style": "deepObject", "explode": True, "schema": _OBJ,
         "description": "`metadata[key]=value`: only those whose metadata holds every pair."},
        *_PAGING,
    ],
    description="In the order they were asked." + _OWN,
))
document("/v1/chat/completions/{completion_id}", "get", _op(
    "A stored chat completion", "OpenAI", _ok(_STORED), parameters=[_ID],
    description="The `chat.completion` its client was given (a stream's assembled), with its metadata." + _OWN,
))
document("/v1/chat/completions/{completion_id}", "post", _op(
    "Replace a stored chat completion's metadata", "OpenAI", _ok(_STORED), parameters=[_ID],
    body={"type": "object", "required": ["metadata"], "properties": {"metadata": {"oneOf": [_METADATA, {"type": "null"}]}}},
    description="Nothing else of it changes." + _OWN,
))
document("/v1/chat/completions/{completion_id}", "delete", _op(
    "Delete a stored chat completion", "OpenAI",
    _ok({"type": "object", "required": ["id", "object", "deleted"],
         "properties": {"id": _STR, "object": {"const": "chat.completion.deleted"}, "deleted": _BOOL}}),
    parameters=[_ID],
    description="Its answer and request leave the journal, and its answer the exact and semantic caches." + _OWN,
))
document("/v1/chat/completions/{completion_id}/messages", "get", _op(
    "A stored chat completion's request messages, a page", "OpenAI", _ok(_list_of(_OBJ)), parameters=[_ID, *_PAGING],
    description="Each with an id (`{completion_id}-{n}`), as sent." + _OWN,
))
