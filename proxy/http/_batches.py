"""OpenAI's Files and Batch APIs, stored in PostgreSQL, each file and batch its API key's own:

    POST   /v1/files                     upload (multipart: `file`, `purpose` = batch)
    GET    /v1/files                     list (`purpose`, `after`, `limit`, `order`)
    GET    /v1/files/{id}                the file's object
    GET    /v1/files/{id}/content        its bytes
    DELETE /v1/files/{id}                delete it
    POST   /v1/batches                   create (`input_file_id`, `endpoint`, `completion_window`)
    GET    /v1/batches                   list (`after`, `limit`), newest first
    GET    /v1/batches/{id}              the batch
    POST   /v1/batches/{id}/cancel       cancel it

The batches run in `services.batches.BatchRunner`; their lines are sent to this gateway's own
front door by `dispatcher`, on the batch's key's behalf.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar, cast

import trio
from hypercorn.typing import ASGIReceiveEvent, ASGISendEvent, HTTPScope
from quart import Blueprint, Response, request

from proxy.dialects._json import dumps
from proxy.dialects.openai import batches as wire
from proxy.dialects.responses import conversations
from proxy.domain.errors import ErrorKind, GatewayError, database_not_configured, invalid_request
from proxy.domain.ids import storable
from proxy.http import _upload
from proxy.http._context import GatewayApp, gateway, request_body, request_head
from proxy.http._errors import _closing, error_response
from proxy.http._head import ON_BEHALF_OF, current_tenant, refuse_routes, request_meta
from proxy.http._openapi import _INT, _OBJ, _STR, _ok, _op, document
from proxy.http._request import PacedRequest
from proxy.infra.batch_store import BatchStore
from proxy.infra.postgres import DatabaseError, answered_within
from proxy.services.auth import current_principal
from proxy.services.batches import Answer, Dispatch
from proxy.services.persistence import Persistence

log = logging.getLogger("llm_proxy.batches")

blueprint = Blueprint("batches", __name__)

FILES = "/v1/files"
# A file's bytes read and sent at a time.
_SLICE = 1 << 20
_T = TypeVar("_T")
# How long a statement moving a file's bytes waits for PostgreSQL: some seconds, and a second
# per MiB on top (a slow disk writes 100 MB in well under 100 s). Past that it is stalled or
# locked: a 503, the statement cancelled with nothing of it kept.
SLOW_BASE_SECONDS: Final = 30.0
SLOW_BYTES_PER_SECOND: Final = float(1 << 20)



def _persistence() -> Persistence:
    persistence = gateway().persistence
    if persistence is None or persistence.resources.database_url is None or gateway().batches is None:
        raise database_not_configured("files and batches need")
    return persistence


async def _stored(call: Callable[[BatchStore], Awaitable[_T]], what: str, *, change: bool = False) -> _T:
    return await _persistence().batches(call, what, change=change)


async def _owned(
    well_formed: bool, lookup: Callable[[BatchStore], Awaitable[dict[str, Any] | None]], what: str,
    missing: GatewayError,
) -> dict[str, Any]:
    """The caller's record `lookup` finds, or `missing` (an id of the wrong shape, another key's
    record, none at all: the same 404, so ids of others are not confirmed)."""
    found = await _stored(lookup, what) if well_formed else None
    if found is None:
        raise missing
    return found


async def _stored_slowly(call: Callable[[BatchStore], Awaitable[_T]], what: str, size: int = 0) -> _T:
    """A statement moving a file's bytes (`size` of them, if known): as long as they take, not
    a lookup's few seconds, but not for ever."""
    db = _persistence().resources.database
    try:
        if db is None:
            raise DatabaseError("not connected")
        with answered_within(SLOW_BASE_SECONDS + size / SLOW_BYTES_PER_SECOND):
            return await call(BatchStore(db))
    except DatabaseError as error:
        log.warning("%s failed: %s", what, error)
        raise GatewayError(
            ErrorKind.UNAVAILABLE, "The database (PostgreSQL) is unavailable; try again shortly.",
            code="database_unavailable", retry_after=2,
        ) from error


def _reply(body: dict[str, Any]) -> Response:
    return Response(dumps(body), content_type="application/json")


def _page_query(max_limit: int, default: int) -> tuple[str | None, int, str]:
    query = request.args.to_dict(flat=False)
    query.setdefault("limit", [str(default)])
    return conversations.page_query(query, max_limit)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        ErrorKind.REQUEST_TOO_LARGE,
        f"The file is too large: the limit is {limit} bytes (`[batches] file_max_bytes`).", param="file",
        code="file_too_large",
    )


# -- files ---------------------------------------------------------------------------------------


@blueprint.post(FILES)
async def upload_file() -> Response:
    _persistence()
    if request.mimetype != "multipart/form-data":
        raise invalid_request("Upload a file as multipart/form-data with the fields `file` and `purpose`.", param="file")
    limit = gateway().settings.batches.file_max_bytes
    try:
        upload = await _upload.receive(cast(PacedRequest, request), "file", limit, lambda: _too_large(limit))
    except GatewayError as error:
        # Refused before the body's end: the connection cannot carry another request.
        response = error_response(error)
        _closing(response)
        return response
    try:
        return await _store_upload(upload)
    finally:
        upload.close()


async def _store_upload(upload: _upload.Upload) -> Response:
    form = upload.fields
    purpose = wire.check_purpose(form.get("purpose"))
    # The SDK sends `expires_after={...}` as the form's fields `expires_after[anchor]` and `[seconds]`.
    seconds: str | int | None = form.get("expires_after[seconds]")
    if isinstance(seconds, str) and seconds.isdigit():
        seconds = int(seconds)
    expires = wire.expires_after(form.get("expires_after[anchor]"), seconds, "expires_after")
    if expires is None:
        expires = wire.BATCH_FILE_SECONDS  # the only purpose kept (`check_purpose`)
    content = upload.content
    if content is None:
        raise invalid_request("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
    filename = upload.filename or "upload.jsonl"
    if not storable(filename) or len(filename) > 512:
        raise invalid_request("Invalid file name.", param="file")
    tenant = current_tenant()
    created = await _stored_slowly(
        lambda store: store.add_file(
            wire.new_file_id(), tenant, purpose, filename, content, expires, size=upload.size
        ), "storing a file", upload.size,
    )
    return _reply(wire.file_object(created))


@blueprint.get(FILES)
async def list_files() -> Response:
    after, limit, order = _page_query(10_000, 10_000)
    purpose = request.args.get("purpose") or None
    tenant = current_tenant()
    found = await _stored(
        lambda store: store.files(tenant, purpose=purpose, after=after, limit=limit, order=order), "the files"
    )
    if found is None:
        raise invalid_request(f"`after` names no file of yours: {after}", param="after")
    rows, more = found
    return _reply(wire.page([wire.file_object(row) for row in rows], more))


async def _own_file(file_id: str) -> dict[str, Any]:
    tenant = current_tenant()
    return await _owned(
        wire.is_file_id(file_id), lambda store: store.file(file_id, tenant), f"file {file_id}",
        wire.file_not_found(file_id),
    )


@blueprint.get(f"{FILES}/<file_id>")
async def retrieve_file(file_id: str) -> Response:
    return _reply(wire.file_object(await _own_file(file_id)))


@blueprint.get(f"{FILES}/<file_id>/content")
async def file_content(file_id: str) -> Response:
    tenant = current_tenant()
    found = None
    if wire.is_file_id(file_id):
        found = await _stored(lambda store: store.content_size(file_id, tenant), f"file {file_id}")
    if found is None:
        raise wire.file_not_found(file_id)
    size, compressed = found
    if compressed or size <= _SLICE:
        content = await _stored_slowly(lambda store: store.content(file_id, tenant), f"reading file {file_id}")
        if content is None:  # deleted meanwhile
            raise wire.file_not_found(file_id)
        return Response(content, content_type="application/octet-stream")
    db = _persistence().database_now(f"file {file_id}")
    return Response(
        _slices(BatchStore(db), file_id, size), content_type="application/octet-stream",
        headers={"content-length": str(size)},
    )


async def _slices(store: BatchStore, file_id: str, size: int) -> AsyncIterator[bytes]:
    """A file's bytes a slice at a time: a batch's output of hundreds of megabytes is never
    whole in memory. Deleted or unreadable midway, the download is cut short (its status was
    sent): the client sees a broken download, not a short file."""
    for start in range(0, size, _SLICE):
        try:
            piece = await store.content_slice(file_id, start, _SLICE)
        except DatabaseError as error:
            log.warning("reading file %s failed: %s", file_id, error)
            raise
        if piece is None:
            raise DatabaseError(f"file {file_id} was deleted while it was read")
        yield piece


@blueprint.delete(f"{FILES}/<file_id>")
async def delete_file(file_id: str) -> Response:
    await _own_file(file_id)
    tenant = current_tenant()
    deleted = await _stored(lambda store: store.delete_file(file_id, tenant), f"file {file_id}", change=True)
    if isinstance(deleted, str):
        raise GatewayError(
            ErrorKind.CONFLICT, f"The file {file_id} is the input of batch {deleted}, which has not ended: cancel "
            "it, or wait for it to end, before deleting the file.", param="file_id", code="file_in_use",
        )
    if not deleted:
        raise wire.file_not_found(file_id)
    return _reply({"id": file_id, "object": "file", "deleted": True})


# -- batches ---------------------------------------------------------------------------------------

# A batch's lines carry no headers: `x-pipeline`, `x-workspace` or `x-route` on the request that
# creates it would be dropped, its lines answered by the model alone (see `refuse_routes`).
BATCH_GOES = (
    "runs each line as a plain request of its model, whatever headers the request creating the batch has: "
    "send the pipeline's or workspace's requests one by one"
)



@blueprint.post("/v1/batches")
async def create_batch() -> Response:
    _persistence()
    refuse_routes(request_meta(request_head()), "/v1/batches", BATCH_GOES)
    new = wire.parse_create(await request_body())
    tenant = current_tenant()
    found = await _stored(lambda store: store.file(new.input_file_id, tenant), f"file {new.input_file_id}")
    if found is None:
        raise wire.file_not_found(new.input_file_id, "input_file_id")
    if found["purpose"] != "batch":
        raise invalid_request(
            f"The file {new.input_file_id} was uploaded with purpose {found['purpose']!r}; a batch's input needs "
            "purpose 'batch'.", param="input_file_id", code="invalid_value",
        )
    principal = current_principal.get()
    key_id = principal.id if principal is not None else None
    # Answered once its row is known written or not: a batch answered 503 that commits
    # afterwards would run beside the one its client's retry creates, every line twice.
    batch_id = wire.new_batch_id()
    created = await _persistence().batch_write(
        lambda store: store.add_batch(
            batch_id, tenant, key_id, new.endpoint, new.input_file_id, new.completion_window, new.metadata,
            new.output_expires_seconds,
        ), "a new batch",
    )
    runner = gateway().batches
    assert runner is not None
    runner.wake()
    return _reply(wire.batch_object(created))


@blueprint.get("/v1/batches")
async def list_batches() -> Response:
    after, limit, _ = _page_query(100, 20)
    tenant = current_tenant()
    found = await _stored(lambda store: store.batches(tenant, after=after, limit=limit), "the batches")
    if found is None:
        raise invalid_request(f"`after` names no batch of yours: {after}", param="after")
    rows, more = found
    return _reply(wire.page([wire.batch_object(row) for row in rows], more))


async def _own_batch(batch_id: str) -> dict[str, Any]:
    tenant = current_tenant()
    return await _owned(
        wire.is_batch_id(batch_id), lambda store: store.batch(batch_id, tenant), f"batch {batch_id}",
        wire.batch_not_found(batch_id),
    )


@blueprint.get("/v1/batches/<batch_id>")
async def retrieve_batch(batch_id: str) -> Response:
    return _reply(wire.batch_object(await _own_batch(batch_id)))


@blueprint.post("/v1/batches/<batch_id>/cancel")
async def cancel_batch(batch_id: str) -> Response:
    found = await _own_batch(batch_id)
    tenant = current_tenant()
    if await _stored(lambda store: store.cancel(batch_id, tenant), f"batch {batch_id}", change=True):
        runner = gateway().batches
        assert runner is not None
        runner.cancelled(batch_id)
    else:
        found = await _own_batch(batch_id)
        if found["status"] not in ("cancelling", "cancelled"):
            raise GatewayError(
                ErrorKind.CONFLICT, f"Cannot cancel a batch with status '{found['status']}'.", param="batch_id",
                code="invalid_state",
            )
    return _reply(wire.batch_object(await _own_batch(batch_id)))


# -- a batch's lines, sent to the gateway's own front door ----------------------------------------


def dispatcher(app: GatewayApp) -> Dispatch:
    """Send a batch's line through `app` as a request of the batch's key (`ON_BEHALF_OF`): the
    guard, the routes, limits and accounting all see it as the key's own request."""

    async def dispatch(key_id: int | None, path: str, body: bytes, request_id: str) -> Answer:
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "extensions": {},
            "headers": [
                (b"host", b"localhost"), (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)), (b"x-request-id", request_id.encode()),
            ],
            ON_BEHALF_OF: key_id,
        }
        given = False
        status = 500
        headers: dict[str, str] = {}
        chunks: list[bytes] = []

        async def receive() -> ASGIReceiveEvent:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await trio.sleep_forever()  # nobody hangs up: the answer is waited for whole
            raise AssertionError("unreachable")

        async def send(message: ASGISendEvent) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers.update((name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in message["headers"])
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await app.asgi_app(scope_of(scope), receive, send)
        return Answer(status, b"".join(chunks), headers)

    return dispatch


def scope_of(scope: dict[str, Any]) -> HTTPScope:
    return scope  # type: ignore[return-value]


_FILE = {"type": "object", "properties": {"id": _STR, "object": _STR, "bytes": _INT, "created_at": _INT, "filename": _STR, "purpose": _STR}}
_BATCH = {"type": "object", "properties": {"id": _STR, "object": _STR, "status": _STR, "endpoint": _STR, "request_counts": _OBJ}}
_LIST = {"type": "object", "properties": {"object": _STR, "data": {"type": "array"}, "has_more": {"type": "boolean"}}}
_SECONDS = {"type": "integer", "minimum": wire.EXPIRY_SECONDS[0], "maximum": wire.EXPIRY_SECONDS[1]}
_ANCHOR = {"enum": ["created_at"]}
# As accepted: only `batch` is kept; the SDK sends `expires_after` as two bracketed fields.
_MULTIPART = {"type": "object", "required": ["file", "purpose"], "properties": {
    "file": {"type": "string", "format": "binary"}, "purpose": {"enum": list(wire.PURPOSES)},
    "expires_after[anchor]": _ANCHOR, "expires_after[seconds]": _SECONDS,
}}
_UPLOAD = _op("Upload a file (purpose `batch`)", "Batches", _ok(_FILE))
_UPLOAD["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": _MULTIPART}}}
_NEW_BATCH = {"type": "object", "required": ["input_file_id", "endpoint", "completion_window"], "properties": {
    "input_file_id": {"type": "string", "minLength": 1}, "endpoint": {"enum": list(wire.ENDPOINTS)},
    "completion_window": {"enum": ["24h"]}, "metadata": {"type": ["object", "null"], "additionalProperties": _STR},
    "output_expires_after": {"type": "object", "required": ["anchor", "seconds"], "properties": {"anchor": _ANCHOR, "seconds": _SECONDS}},
}}
_FILE_ID = [{"name": "file_id", "in": "path", "required": True, "schema": _STR}]
_BATCH_ID = [{"name": "batch_id", "in": "path", "required": True, "schema": _STR}]


def _page(max_limit: int, what: str, *, order: bool) -> list[dict[str, Any]]:
    """The query of a list (`_page_query`): a cursor, a page size and, for files, an order."""
    parameters: list[dict[str, Any]] = [
        {"name": "after", "in": "query", "schema": _STR, "description": f"A {what}'s id: the {what}s after it."},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": max_limit}},
    ]
    if order:
        parameters.append({"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}, "description": "Default `desc`."})
    return parameters


document(FILES, "post", _UPLOAD)
document(FILES, "get", _op("List your files", "Batches", _ok(_LIST), parameters=[
    {"name": "purpose", "in": "query", "schema": _STR}, *_page(10_000, "file", order=True),
]))
document(FILES + "/{file_id}", "get", _op("A file", "Batches", _ok(_FILE), parameters=_FILE_ID))
document(FILES + "/{file_id}", "delete", _op("Delete a file", "Batches", _ok(_OBJ), parameters=_FILE_ID))
document(FILES + "/{file_id}/content", "get",
         _op("A file's content", "Batches", _ok(media="application/octet-stream"), parameters=_FILE_ID))
document("/v1/batches", "post", _op("Create a batch", "Batches", _ok(_BATCH), body=_NEW_BATCH))
document("/v1/batches", "get", _op("List your batches", "Batches", _ok(_LIST), parameters=_page(100, "batch", order=False)))
document("/v1/batches/{batch_id}", "get", _op("A batch", "Batches", _ok(_BATCH), parameters=_BATCH_ID))
document("/v1/batches/{batch_id}/cancel", "post", _op("Cancel a batch", "Batches", _ok(_BATCH), parameters=_BATCH_ID))
