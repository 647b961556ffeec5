"""Anthropic's Message Batches API (`client.messages.batches`), each batch its API key's own
and run by the same engine as OpenAI's batches (`services.batches.BatchRunner`): each request
is a `/v1/messages` call of the batch's key through the gateway's front door.

    POST   /v1/messages/batches                 create (`requests: [{custom_id, params}]`)
    GET    /v1/messages/batches                 list (`before_id`, `after_id`, `limit`), newest first
    GET    /v1/messages/batches/{id}            the batch
    POST   /v1/messages/batches/{id}/cancel     cancel it
    DELETE /v1/messages/batches/{id}            delete an ended one
    GET    /v1/messages/batches/{id}/results    its results (JSONL), once it has ended

Errors are Anthropic's (`/v1/messages` paths answer in its shape).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Blueprint, Response, request

from proxy.dialects.anthropic import batches as wire
from proxy.dialects.openai.batches import new_file_id
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.http._batches import BATCH_GOES, _owned, _persistence, _reply, _stored, _stored_slowly
from proxy.http._context import gateway, request_body, request_head
from proxy.http._head import current_tenant, refuse_routes, request_meta
from proxy.http._openapi import _MESSAGES_REQUEST, _OBJ, _STR, _ok, _op, document
from proxy.infra.batch_store import BatchStore
from proxy.infra.postgres import DatabaseError
from proxy.services.auth import current_principal

blueprint = Blueprint("message_batches", __name__)

log = logging.getLogger("llm_proxy.batches")

BATCHES = "/v1/messages/batches"
# Requests whose results are read and sent at a time.
_RESULTS_PAGE = 1000
_MAX_LIMIT = 1000
_SAFE = re.compile(r"[A-Za-z0-9._~:/\[\]-]{1,255}")


def _forwarded(name: str) -> str | None:
    value = (request.headers.get(name) or "").split(",")[0].strip()
    return value if value and _SAFE.fullmatch(value) else None


def _results_url(batch_id: str) -> str:
    """Absolute, as Anthropic's, and where the client reached the gateway: behind a proxy
    that terminates TLS or rewrites `Host`, the one it names (`X-Forwarded-Proto`, `-Host`,
    `-Prefix`). Only the caller sees it."""
    scheme = _forwarded("x-forwarded-proto") or request.scheme
    host = _forwarded("x-forwarded-host") or request.host
    prefix = (_forwarded("x-forwarded-prefix") or "").rstrip("/")
    if scheme not in ("http", "https") or "/" in host or (prefix and not prefix.startswith("/")):
        scheme, host, prefix = request.scheme, request.host, ""
    return f"{scheme}://{host}{prefix}{BATCHES}/{batch_id}/results"


def _rendered(row: dict[str, Any]) -> dict[str, Any]:
    return wire.batch_object(row, _results_url(row["id"]))


async def _own(batch_id: str) -> dict[str, Any]:
    tenant = current_tenant()
    return await _owned(
        wire.is_batch_id(batch_id), lambda store: store.message_batch(batch_id, tenant), f"message batch {batch_id}",
        wire.batch_not_found(batch_id),
    )


@blueprint.post(BATCHES)
async def create() -> Response:
    _persistence()
    refuse_routes(request_meta(request_head()), "/v1/messages/batches", BATCH_GOES)
    body = await request_body()
    settings = gateway().settings.batches
    limit = min(wire.MAX_REQUESTS, settings.max_lines)
    # Tens of thousands of requests each validated: not on the event loop.
    requests = await trio.to_thread.run_sync(wire.parse_create, body, limit)
    content = wire.input_lines(requests, request_head().header_list("anthropic-beta"))
    tenant = current_tenant()
    principal = current_principal.get()
    key_id = principal.id if principal is not None else None
    batch_id = wire.new_batch_id()
    created = await _stored_slowly(
        lambda store: store.add_message_batch(
            batch_id, new_file_id(), tenant, key_id, content, [custom_id for custom_id, _ in requests]
        ),
        "storing a message batch", len(content),
    )
    runner = gateway().batches
    assert runner is not None
    runner.wake()
    return _reply(_rendered(created))


def _limit() -> int:
    raw = request.args.get("limit")
    if raw is None:
        return 20
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= _MAX_LIMIT:
        raise invalid_request(f"limit: must be an integer from 1 to {_MAX_LIMIT}.", param="limit")
    return limit


@blueprint.get(BATCHES)
async def list_batches() -> Response:
    limit = _limit()
    before, after = request.args.get("before_id") or None, request.args.get("after_id") or None
    if before is not None and after is not None:
        raise invalid_request("Give `before_id` or `after_id`, not both.", param="before_id")
    tenant = current_tenant()
    found = await _stored(
        lambda store: store.message_batches(tenant, before=before, after=after, limit=limit), "the message batches"
    )
    if found is None:
        cursor = "before_id" if before is not None else "after_id"
        raise invalid_request(f"{cursor}: no message batch of yours has the id {before or after}.", param=cursor)
    rows, more = found
    return _reply(wire.page([_rendered(row) for row in rows], more))


@blueprint.get(f"{BATCHES}/<batch_id>")
async def retrieve(batch_id: str) -> Response:
    return _reply(_rendered(await _own(batch_id)))


@blueprint.post(f"{BATCHES}/<batch_id>/cancel")
async def cancel(batch_id: str) -> Response:
    await _own(batch_id)
    tenant = current_tenant()
    asked = await _stored(lambda store: store.cancel(batch_id, tenant), f"message batch {batch_id}", change=True)
    if asked:
        runner = gateway().batches
        assert runner is not None
        runner.cancelled(batch_id)
    found = await _own(batch_id)
    # Not asked here: canceling already, or its requests have all ended (its results being
    # written: nothing is left to cancel), or it has ended.
    if not asked and wire.ended(found["status"]):
        raise invalid_request(f"Message batch {batch_id} has already ended; it cannot be canceled.", param="message_batch_id")
    return _reply(_rendered(found))


@blueprint.delete(f"{BATCHES}/<batch_id>")
async def delete(batch_id: str) -> Response:
    await _own(batch_id)
    tenant = current_tenant()
    # Its requests' bytes and every answer go: as long as that takes, not a lookup's few seconds.
    status = await _stored_slowly(lambda store: store.delete_message_batch(batch_id, tenant), f"deleting message batch {batch_id}")
    if status is None:
        raise wire.batch_not_found(batch_id)
    if not wire.ended(status):
        raise invalid_request(
            f"Message batch {batch_id} is still processing: cancel it, or wait for it to end, before deleting it.",
            param="message_batch_id",
        )
    return _reply(wire.deleted(batch_id))


@blueprint.get(f"{BATCHES}/<batch_id>/results")
async def results(batch_id: str) -> Response:
    found = await _own(batch_id)
    if not wire.ended(found["status"]):
        raise invalid_request(
            f"Message batch {batch_id} is still processing: its results are ready once `processing_status` is "
            "'ended'.", param="message_batch_id",
        )
    if found.get("archived_at") is not None:
        raise GatewayError(
            ErrorKind.NOT_FOUND,
            f"The results of message batch {batch_id} are no longer available: a batch's results are kept for 29 days "
            "after it was created.", param="message_batch_id",
        )
    db = _persistence().database_now(f"the results of {batch_id}")
    return Response(_results(BatchStore(db), batch_id, found["total"]), content_type="application/x-jsonl")


async def _results(store: BatchStore, batch_id: str, total: int) -> AsyncIterator[bytes]:
    """A batch's results a page of requests at a time, each page only its own requests' rows
    (their `custom_id`s and answers): its tens of thousands are never all in memory at once,
    nor its requests' bodies read. Deleted or unreadable midway, the response is cut short
    (its status was sent): the client sees a broken download, not a short file."""
    sent = last = 0
    while True:
        try:
            page = await store.results(batch_id, last, _RESULTS_PAGE)
            if len(page) < _RESULTS_PAGE and sent + len(page) < total:
                raise DatabaseError(f"message batch {batch_id} was deleted while its results were read")
        except DatabaseError as error:
            log.warning("reading message batch %s's results failed: %s", batch_id, error)
            raise
        if page:
            yield await trio.to_thread.run_sync(wire.results, [(custom_id, output) for _, custom_id, output in page])
        if len(page) < _RESULTS_PAGE:
            return
        sent, last = sent + len(page), page[-1][0]


_BATCH = {"type": "object", "properties": {"id": _STR, "type": _STR, "processing_status": _STR, "request_counts": _OBJ}}
_LIST = {"type": "object", "properties": {"data": {"type": "array"}, "has_more": {"type": "boolean"}}}
# As `wire.parse_create` takes it: each request's `params` a Messages request.
_NEW_BATCH = {"type": "object", "required": ["requests"], "additionalProperties": False, "properties": {
    "requests": {"type": "array", "minItems": 1, "maxItems": wire.MAX_REQUESTS, "items": {
        "type": "object", "required": ["custom_id", "params"], "additionalProperties": False, "properties": {
            "custom_id": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}, "params": _MESSAGES_REQUEST,
        },
    }},
}}
# Their errors are Anthropic's, as `/v1/messages`'s.
document(BATCHES, "post", _op(
    "Create a message batch (Anthropic)", "Batches", _ok(_BATCH), body=_NEW_BATCH, dialect="anthropic",
    description="Each request's `custom_id` unique in the batch; at most 100,000 requests, or `[batches] max_lines`.",
))
_ID = [{"name": "batch_id", "in": "path", "required": True, "schema": _STR}]
_PAGE = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": _MAX_LIMIT}, "description": "Default 20."},
    {"name": "after_id", "in": "query", "schema": _STR, "description": "The batches older than this one."},
    {"name": "before_id", "in": "query", "schema": _STR, "description": "The batches newer than this one (not with `after_id`)."},
]
document(BATCHES, "get", _op("List your message batches (Anthropic)", "Batches", _ok(_LIST), dialect="anthropic", parameters=_PAGE))
document(BATCHES + "/{batch_id}", "get",
         _op("A message batch (Anthropic)", "Batches", _ok(_BATCH), dialect="anthropic", parameters=_ID))
document(BATCHES + "/{batch_id}", "delete",
         _op("Delete an ended message batch (Anthropic)", "Batches", _ok(_OBJ), dialect="anthropic", parameters=_ID))
document(BATCHES + "/{batch_id}/cancel", "post",
         _op("Cancel a message batch (Anthropic)", "Batches", _ok(_BATCH), dialect="anthropic", parameters=_ID))
document(BATCHES + "/{batch_id}/results", "get", _op(
    "A message batch's results (Anthropic)", "Batches", _ok(media="application/x-jsonl"), dialect="anthropic", parameters=_ID,
))
