"""OpenAI's Conversations API, stored in PostgreSQL, each conversation its API key's own:

    POST   /v1/conversations                              create (`items`: up to 20, `metadata`)
    GET    /v1/conversations/{id}                         the conversation
    POST   /v1/conversations/{id}                         replace its metadata
    DELETE /v1/conversations/{id}                         delete it with its items
    POST   /v1/conversations/{id}/items                   add up to 20 items
    GET    /v1/conversations/{id}/items                   list (`after`, `limit`, `order`)
    GET    /v1/conversations/{id}/items/{item_id}         one item
    DELETE /v1/conversations/{id}/items/{item_id}         delete one (answers the conversation)

`responses.create(conversation=...)` puts a conversation's items before its input
(`join_conversation`) and, once the response has completed, appends its input and output
items (`conversation_appender`, told by the exchange before its client has the answer's end).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from quart import Blueprint, Response, request

from proxy.dialects import responses
from proxy.dialects._json import dumps
from proxy.dialects.responses import conversations
from proxy.domain.chat import ChatCompletion
from proxy.domain.errors import GatewayError, database_not_configured, invalid_request
from proxy.domain.fingerprint import message_to_canonical
from proxy.domain.ids import storable
from proxy.http._context import gateway, request_body
from proxy.http._head import current_tenant
from proxy.http._openapi import _BOOL, _INT, _OBJ, _STR, _ok, _op, document
from proxy.infra.conversation_store import ConversationRow, ConversationStore
from proxy.services.chat import AnswerHook, new_trace_id
from proxy.services.persistence import Persistence

log = logging.getLogger("llm_proxy.conversations")

blueprint = Blueprint("conversations", __name__)

_T = TypeVar("_T")



def _persistence(persistence: Persistence | None) -> Persistence:
    if persistence is None or persistence.resources.database_url is None:
        raise database_not_configured("conversations need")
    return persistence


async def _stored(call: Callable[[ConversationStore], Awaitable[_T]], what: str, *, change: bool = False) -> _T:
    return await _persistence(gateway().persistence).conversations(call, what, change=change)


def _reply(body: dict[str, Any]) -> Response:
    return Response(dumps(body), content_type="application/json")


def _object(row: ConversationRow) -> dict[str, Any]:
    return conversations.conversation_object(row.id, row.created_at, row.metadata)


async def _own(conversation: str) -> ConversationRow:
    """The caller's conversation, or a 404 naming it."""
    tenant = current_tenant()
    found = None
    if conversations.is_conversation_id(conversation):
        found = await _stored(lambda store: store.get(conversation, tenant), f"conversation {conversation}")
    if found is None:
        raise conversations.conversation_not_found(conversation, param="conversation_id")
    return found


async def _with_references(parse: Callable[[conversations.Referenced | None], _T]) -> _T:
    """`parse` applied to a request's body, its `item_reference`s looked up as on
    `/v1/responses` (the caller's conversations' items, then its kept responses' items; one
    not found is a 404 naming its path) when it has any: most have none, one parse."""
    try:
        return parse(None)
    except responses.UnresolvedReferences as unresolved:
        # Imported here: the Responses routes import this module.
        from proxy.http._responses import referenced_items

        persistence = _persistence(gateway().persistence)
        return parse(await referenced_items(persistence, unresolved.references))


@blueprint.post("/v1/conversations")
async def create_conversation() -> Response:
    mint = new_trace_id()
    body = await request_body()
    metadata, items = await _with_references(lambda referenced: conversations.parse_create(body, mint, referenced))
    tenant = current_tenant()
    # Answered once its row is known written or not: a 503 for a conversation that commits
    # afterwards leaves an orphan, and its client's retry makes a second.
    created = await _persistence(gateway().persistence).conversation_write(
        lambda store: store.create(f"conv_{mint}", tenant, metadata, items), "a new conversation"
    )
    return _reply(_object(created))


@blueprint.get("/v1/conversations/<conversation_id>")
async def retrieve_conversation(conversation_id: str) -> Response:
    return _reply(_object(await _own(conversation_id)))


@blueprint.post("/v1/conversations/<conversation_id>")
async def update_conversation(conversation_id: str) -> Response:
    await _own(conversation_id)
    metadata = conversations.parse_update(await request_body())
    tenant = current_tenant()
    updated = await _stored(
        lambda store: store.update(conversation_id, tenant, metadata), f"conversation {conversation_id}", change=True
    )
    if updated is None:  # deleted meanwhile
        raise conversations.conversation_not_found(conversation_id, param="conversation_id")
    return _reply(_object(updated))


@blueprint.delete("/v1/conversations/<conversation_id>")
async def delete_conversation(conversation_id: str) -> Response:
    await _own(conversation_id)
    tenant = current_tenant()
    if not await _stored(lambda store: store.delete(conversation_id, tenant), f"conversation {conversation_id}",
                         change=True):
        raise conversations.conversation_not_found(conversation_id, param="conversation_id")
    return _reply(conversations.deleted_object(conversation_id))


@blueprint.post("/v1/conversations/<conversation_id>/items")
async def create_items(conversation_id: str) -> Response:
    await _own(conversation_id)
    body, mint = await request_body(), new_trace_id()
    items = await _with_references(lambda referenced: conversations.parse_items(body, mint, referenced))
    tenant = current_tenant()
    # Not given up on while it may still commit: a 503 for items added anyway would have its
    # client's retry add them again, under new ids.
    appended = await _persistence(gateway().persistence).conversation_write(
        lambda store: store.append(conversation_id, tenant, items), f"conversation {conversation_id}"
    )
    if not appended:
        raise conversations.conversation_not_found(conversation_id, param="conversation_id")
    return _reply(conversations.item_list(items))


@blueprint.get("/v1/conversations/<conversation_id>/items")
async def list_items(conversation_id: str) -> Response:
    after, limit, order = conversations.page_query(request.args.to_dict(flat=False))
    await _own(conversation_id)
    page = await _stored(
        lambda store: store.page(conversation_id, after=after, limit=limit + 1, order=order),
        f"the items of {conversation_id}",
    )
    if page is None:
        raise invalid_request(f"No item `{after}` in conversation '{conversation_id}'.", param="after")
    return _reply(conversations.item_list(page[:limit], has_more=len(page) > limit))


@blueprint.get("/v1/conversations/<conversation_id>/items/<item_id>")
async def retrieve_item(conversation_id: str, item_id: str) -> Response:
    await _own(conversation_id)
    if not storable(item_id):
        raise conversations.item_not_found(item_id, param="item_id")
    item = await _stored(lambda store: store.item(conversation_id, item_id), f"the items of {conversation_id}")
    if item is None:
        raise conversations.item_not_found(item_id, param="item_id")
    return _reply(item)


@blueprint.delete("/v1/conversations/<conversation_id>/items/<item_id>")
async def delete_item(conversation_id: str, item_id: str) -> Response:
    row = await _own(conversation_id)
    if not storable(item_id) or not await _stored(
        lambda store: store.delete_item(conversation_id, item_id), f"the items of {conversation_id}", change=True
    ):
        raise conversations.item_not_found(item_id, param="item_id")
    return _reply(_object(row))


# -- responses in a conversation ---------------------------------------------------------------------


async def join_conversation(persistence: Persistence | None, parsed: responses.ResponsesRequest, conversation: str) -> int:
    """`conversation` on `POST /v1/responses`: the conversation's items (the caller's own) go
    before the request's input; one it does not have is a 404 (as OpenAI's, naming no field).
    Returns its last item's `seq`, which its lock checks (`ConversationLock`)."""
    tenant = current_tenant()
    found = None
    if conversations.is_conversation_id(conversation):
        found = await _persistence(persistence).conversations(
            lambda store: store.all_items(conversation, tenant), f"conversation {conversation}"
        )
    if found is None:
        raise conversations.conversation_not_found(conversation)
    items, seen = found
    responses.in_conversation(parsed, conversations.prefix_messages(items))
    return seen


class ConversationLock:
    """The lock of the conversation a response answers in (OpenAI's `conversation_locked`),
    held in PostgreSQL by its run, on any instance, from its start until its answer is
    appended (see `0020_conversation_locks.sql`): a second response in it meanwhile is a 400,
    as is one whose conversation gained items since it read them (`seen`)."""

    def __init__(self, persistence: Persistence, conversation: str, tenant: str | None, seen: int) -> None:
        self._persistence = persistence
        self._conversation = conversation
        self._tenant = tenant
        self._seen = seen
        self._held: str | None = None  # the run it was taken for
        # Its run's items the database could not take: its row writes them (`pending`), and
        # gives the lock back then, not before: a next turn meanwhile is `conversation_locked`
        # rather than answered without them, or its items put before them.
        self._pending: dict[str, Any] | None = None

    async def acquire(self, trace_id: str) -> None:
        persistence, conversation = self._persistence, self._conversation
        settings = persistence.settings
        # Not given up on while it may still commit: a lock taken for a run refused meanwhile
        # (a 503) would be held as long as this instance lives.
        there, taken = await persistence.conversation_write(lambda store: store.lock(
            conversation, self._tenant, trace=trace_id, owner=persistence.instance_id, seen=self._seen,
            silent=settings.dead_after, late=settings.late,
        ), f"conversation {conversation}")
        if not there:  # deleted since its items were read
            raise conversations.conversation_not_found(conversation)
        if not taken:
            raise conversations.conversation_locked()
        self._held = trace_id

    def defer(self, trace_id: str, items: list[dict[str, Any]]) -> bool:
        """Leave run `trace_id`'s items to its log row (see `pending`); False when this lock
        is not that run's (a replayed answer's), whose row has them to write."""
        if self._held != trace_id:
            return False
        self._pending = {"id": self._conversation, "tenant": self._tenant, "items": items}
        return True

    def pending(self, trace_id: str) -> dict[str, Any] | None:
        return self._pending if self._held == trace_id else None

    async def release(self, trace_id: str) -> None:
        conversation = self._conversation
        if self._pending is not None and self._held == trace_id:
            return  # its row gives it back, with its items
        try:
            await self._persistence.conversations(
                lambda store: store.unlock(conversation, trace_id), f"conversation {conversation}"
            )
        except GatewayError as error:
            # Free all the same once its run's row says it ended (see `_LOCK`).
            log.warning("the lock of %s was not given back by %s: %s", conversation, trace_id, error.message)


async def conversation_item(persistence: Persistence, item: str) -> dict[str, Any] | None:
    """An item of one of the caller's conversations, by its id (an `item_reference`)."""
    if persistence.resources.database_url is None or not storable(item):
        return None
    tenant = current_tenant()
    return await persistence.conversations(lambda store: store.find_item(item, tenant), f"item {item}")


def conversation_appender(
    persistence: Persistence, parsed: responses.ResponsesRequest, tenant: str | None, lock: ConversationLock
) -> AnswerHook:
    """What appends a completed response's input items and output items to its conversation,
    named as its `input_items` and `output` name them (appended again, by a replay of its
    answer, they are kept once). Past a long outage, they are written with the run's log row,
    which the outbox keeps (NATS, else the spool) until PostgreSQL is back; the conversation
    stays locked to its run until then (see `ConversationLock.defer`)."""
    conversation = parsed.conversation
    assert conversation is not None
    messages = parsed.chat.messages
    instructions = parsed.settings.get("instructions")
    prior = int(parsed.settings.get(responses.CONVERSATION_PREFIX) or 0)
    namespaces = responses.namespaces_of(parsed.settings)

    async def append(trace_id: str, completion: ChatCompletion) -> None:
        response = responses.response_id(trace_id)
        choice = completion.choices[0] if completion.choices else None
        status = responses.status_of(choice.finish_reason if choice else None)[0]
        items = [
            *responses.input_items(
                [message_to_canonical(message) for message in messages], response,
                instructions=instructions if isinstance(instructions, str) else None, prior=prior,
                namespaces=namespaces,
            ),
            *responses.output_of(
                completion, response, status, summary=responses.summarized(parsed.settings), namespaces=namespaces
            ),
        ]
        try:
            # Before its client has the end: a database blip delays it rather than losing the turn.
            kept = await persistence.conversation_write(
                lambda store: store.append(conversation, tenant, items), f"conversation {conversation}"
            )
        except GatewayError as error:
            if lock.defer(trace_id, items):
                log.warning("the items of %s wait for PostgreSQL to be added to %s, with its log row: %s",
                            response, conversation, error.message)
            else:
                log.error("the items of %s were not added to %s: %s", response, conversation, error.message)
            return
        if not kept:
            log.info("the items of %s were not added to %s: it was deleted meanwhile", response, conversation)

    return append


# -- OpenAPI -------------------------------------------------------------------------------------------

_CONVERSATION_ID = {"name": "conversation_id", "in": "path", "required": True, "schema": _STR}
_ITEM_ID = {"name": "item_id", "in": "path", "required": True, "schema": _STR}
_CONVERSATION = {
    "type": "object", "required": ["id", "object", "created_at", "metadata"],
    "properties": {"id": _STR, "object": {"const": "conversation"}, "created_at": _INT, "metadata": _OBJ},
}
_METADATA = {"type": "object", "maxProperties": 16, "additionalProperties": _STR}
_ITEMS = {"type": "array", "maxItems": conversations.MAX_ITEMS, "items": _OBJ}
_ITEM_LIST = {
    "type": "object", "required": ["object", "data", "has_more"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _OBJ}, "has_more": _BOOL},
}
_OWN = " A conversation is its API key's own: another key's is a 404."

document("/v1/conversations", "post", _op(
    "Create a conversation (OpenAI's Conversations API)", "OpenAI", _ok(_CONVERSATION),
    body={"type": "object", "properties": {"items": _ITEMS, "metadata": _METADATA}},
    description="Its first items (up to 20: messages, function calls and their outputs, `item_reference`s to "
    "items of the key's conversations or kept responses) and metadata. "
    "`POST /v1/responses` with `conversation` puts its items before its input and appends its input and output "
    "once it has completed." + _OWN,
))
document("/v1/conversations/{conversation_id}", "get", _op(
    "A conversation", "OpenAI", _ok(_CONVERSATION), parameters=[_CONVERSATION_ID], description=_OWN.strip(),
))
document("/v1/conversations/{conversation_id}", "post", _op(
    "Replace a conversation's metadata", "OpenAI", _ok(_CONVERSATION), parameters=[_CONVERSATION_ID],
    body={"type": "object", "required": ["metadata"], "properties": {"metadata": _METADATA}},
))
document("/v1/conversations/{conversation_id}", "delete", _op(
    "Delete a conversation and its items", "OpenAI",
    _ok({"type": "object", "required": ["id", "object", "deleted"],
         "properties": {"id": _STR, "object": {"const": "conversation.deleted"}, "deleted": _BOOL}}),
    parameters=[_CONVERSATION_ID], description="The responses made in it stay.",
))
document("/v1/conversations/{conversation_id}/items", "post", _op(
    "Add items to a conversation (up to 20)", "OpenAI", _ok(_ITEM_LIST), parameters=[_CONVERSATION_ID],
    body={"type": "object", "required": ["items"], "properties": {"items": {**_ITEMS, "minItems": 1}}},
))
document("/v1/conversations/{conversation_id}/items", "get", _op(
    "A conversation's items, a page", "OpenAI", _ok(_ITEM_LIST),
    parameters=[
        _CONVERSATION_ID,
        {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}, "description": "Default `desc`."},
        {"name": "after", "in": "query", "schema": _STR, "description": "An item's id: the items after it."},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
        {"name": "include", "in": "query", "schema": {"type": "array", "items": _STR}, "description": "Accepted; no effect."},
    ],
))
document("/v1/conversations/{conversation_id}/items/{item_id}", "get", _op(
    "One item of a conversation", "OpenAI", _ok(_OBJ), parameters=[_CONVERSATION_ID, _ITEM_ID],
))
document("/v1/conversations/{conversation_id}/items/{item_id}", "delete", _op(
    "Delete an item of a conversation", "OpenAI", _ok(_CONVERSATION), parameters=[_CONVERSATION_ID, _ITEM_ID],
    description="Answers the conversation.",
))
