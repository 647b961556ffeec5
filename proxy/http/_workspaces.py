"""RAG workspaces and their documents over HTTP (errors in OpenAI's shape).

    GET    /v1/workspaces                          list workspaces
    PUT    /v1/workspaces/{ws}                     create, or update retrieval settings
    GET    /v1/workspaces/{ws}                     one workspace
    DELETE /v1/workspaces/{ws}                     delete it with its documents
    POST   /v1/workspaces/{ws}/documents           ingest (JSON or multipart/form-data)
    GET    /v1/workspaces/{ws}/documents           list documents (?limit=&offset=)
    GET    /v1/workspaces/{ws}/documents/{id}      one document, as the list shows it
    DELETE /v1/workspaces/{ws}/documents/{id}      delete one document
    POST   /v1/workspaces/{ws}/search              retrieval only: the passages a question gets
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Sequence
from typing import Any, Final

from quart import Blueprint, Response, request
from werkzeug.datastructures import FileStorage

from proxy.dialects._json import Fields, dumps, is_decimal, loads_object
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.domain.ids import storable
from proxy.http._context import gateway, request_body
from proxy.infra.chunking import FORMATS, Format, UnsupportedDocument, decode_text, detect_format
from proxy.infra.rag_store import DocumentRow, LanguageLocked, WorkspaceSummary
from proxy.services.rag import (
    DocumentInput,
    RagService,
    bounded_query,
    bounded_write,
    check_workspace_name,
    language_locked,
    passages_json,
    validate_overrides,
    workspace_not_found,
)

blueprint = Blueprint("workspaces", __name__)

_MAX_DOCUMENTS: Final = 1000
_JSON: Final = "application/json"


def _rag() -> RagService:
    rag = gateway().rag
    if rag is None:
        raise GatewayError(ErrorKind.UNAVAILABLE, "RAG is not available on this gateway.")
    return rag


def _reply(body: Any, status: int = 200) -> Response:
    return Response(dumps(body), status=status, content_type=_JSON)


def _workspace_json(summary: WorkspaceSummary) -> dict[str, Any]:
    return {
        "object": "workspace", "name": summary.name, "language": summary.language, "settings": summary.settings,
        "documents": summary.documents, "chunks": summary.chunks,
        "created_at": summary.created_at, "updated_at": summary.updated_at,
    }


def _document_json(row: DocumentRow) -> dict[str, Any]:
    return {
        "object": "document", "id": row.id, "source": row.source, "media_type": row.media_type,
        "metadata": row.metadata, "sha256": row.content_hash, "chars": row.chars, "chunks": row.chunks,
        "created_at": row.created_at, "updated_at": row.updated_at,
    }


async def _summaries(rag: RagService) -> list[WorkspaceSummary]:
    with bounded_query():  # a stalled database: a 503, not a request that never ends
        return await rag.store().list_workspaces()


async def _language_exists(rag: RagService, language: str) -> bool:
    with bounded_query():
        return await rag.store().language_exists(language)


async def _summary(rag: RagService, name: str) -> WorkspaceSummary:
    for summary in await _summaries(rag):
        if summary.name == name:
            return summary
    raise workspace_not_found(name, param=None)


@blueprint.get("/v1/workspaces")
async def list_workspaces() -> Response:
    summaries = await _summaries(_rag())
    return _reply({"object": "list", "data": [_workspace_json(s) for s in summaries]})


@blueprint.get("/v1/workspaces/<ws>")
async def get_workspace(ws: str) -> Response:
    check_workspace_name(ws)
    return _reply(_workspace_json(await _summary(_rag(), ws)))


@blueprint.put("/v1/workspaces/<ws>")
async def put_workspace(ws: str) -> Response:
    check_workspace_name(ws)
    body = await request_body()
    data = loads_object(body) if body.strip() else {}
    language = data.pop("language", None)
    rag = _rag()
    store = rag.store()
    if language is not None and (
        not isinstance(language, str) or not storable(language) or not await _language_exists(rag, language)
    ):
        raise invalid_request(
            f"Invalid `language` {language!r}: a PostgreSQL text search configuration (english, simple, german, ...).",
            param="language",
        )
    # Top-level (`{"top_k": 3}`, as the README shows) or under `settings` (as a workspace
    # reads back), or both: no setting given is left out without a word.
    nested = data.pop("settings", None)
    if nested is not None and not isinstance(nested, dict):
        raise invalid_request("Invalid `settings`: expected an object.", param="settings")
    settings = validate_overrides({**data, **(nested or {})})
    try:
        with bounded_write():
            await store.configure_workspace(ws, settings, language=language)
    except LanguageLocked as locked:
        raise language_locked(ws, locked.language) from None
    return _reply(_workspace_json(await _summary(rag, ws)))


@blueprint.delete("/v1/workspaces/<ws>")
async def delete_workspace(ws: str) -> Response:
    check_workspace_name(ws)
    with bounded_write():
        deleted = await _rag().store().delete_workspace(ws)
    if not deleted:
        raise workspace_not_found(ws, param=None)
    return _reply({"object": "workspace.deleted", "name": ws, "deleted": True})


# -- documents -------------------------------------------------------------------------------------


def _metadata(value: Any, param: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        # As a JSON body is read: nesting bounded (deeper is a 400, not a crash), no NaN, no
        # lone surrogate, nothing PostgreSQL's jsonb would refuse later without a name.
        try:
            value = loads_object(value, what=f"`{param}`")
        except GatewayError as error:
            raise invalid_request(f"Invalid `{param}`: {error.message}", param=param, code=error.code) from None
    if not isinstance(value, dict):
        raise invalid_request(f"Invalid `{param}`: expected a JSON object.", param=param)
    return value


def _json_document(item: Any, where: str) -> DocumentInput:
    """`content` (text), or `content_base64` (a file's bytes: a PDF, or text in UTF-8/16)."""
    if not isinstance(item, dict):
        raise invalid_request(f"Invalid `{where}`: expected an object.", param=where)
    fields = Fields(item, where)
    encoded = fields.text("content_base64")
    content = fields.text("content", required=encoded is None)
    if content is not None and encoded is not None:
        raise invalid_request(f"`{where}` has both `content` and `content_base64`: send one.", param=f"{where}.content")
    source = fields.text("source", nonempty=True)
    fmt = fields.text("format")
    if fmt is not None and fmt not in FORMATS:
        raise invalid_request(f"Invalid `{where}.format` {fmt!r}: expected one of {', '.join(FORMATS)}.",
                              param=f"{where}.format")
    metadata = _metadata(item.get("metadata"), f"{where}.metadata")
    if encoded is None:
        assert content is not None
        detected = fmt or detect_format(source, None, content[:1024].encode())
        if detected == "pdf":
            raise invalid_request(f"A PDF is sent as `{where}.content_base64` (its bytes, base64), not as text.",
                                  param=f"{where}.content", code="unsupported_document")
        return DocumentInput(content=content, format=detected, source=source, metadata=metadata)
    data, media = _file_bytes(encoded, f"{where}.content_base64")
    return _file_document(data, fmt or detect_format(source, media, data), source, metadata, f"{where}.content_base64")


def _file_bytes(encoded: str, param: str) -> tuple[bytes, str | None]:
    """A file's bytes sent as base64, and the media type it was sent with: plain, in lines
    (what `base64` and MIME write), or a `data:` URL (`data:application/pdf;base64,…`, as
    OpenAI's `file_data` carries a file)."""
    media: str | None = None
    if encoded.startswith("data:"):
        head, comma, encoded = encoded.partition(",")
        if not comma or not head.endswith(";base64"):
            raise invalid_request(f"Invalid `{param}`: a `data:` URL here is base64 (`data:<type>;base64,…`).", param=param)
        media = head.removeprefix("data:").split(";", 1)[0] or None
    try:
        # Line breaks dropped in one pass over the bytes (a PDF's base64 can be tens of MB).
        return base64.b64decode(encoded.encode("ascii").translate(None, b" \t\r\n"), validate=True), media
    except (binascii.Error, ValueError):  # ValueError: a character that is not ASCII too
        raise invalid_request(f"Invalid `{param}`: not base64.", param=param) from None


def _file_document(data: bytes, fmt: Format, source: str | None, metadata: dict[str, Any], param: str) -> DocumentInput:
    if fmt == "pdf":  # read (and refused if need be) off the event loop, by `RagService.ingest`
        return DocumentInput(content="", format="pdf", source=source, metadata=metadata, data=data)
    try:
        text = decode_text(data, source or "The document")
    except UnsupportedDocument as exc:
        raise invalid_request(str(exc), param=param, code="unsupported_document") from None
    return DocumentInput(content=text, format=fmt, source=source, metadata=metadata)


async def _uploaded(files: Sequence[tuple[str, FileStorage]], metadata: dict[str, Any]) -> list[DocumentInput]:
    documents = []
    for field_name, upload in files:
        name = upload.filename or field_name
        data = upload.read()
        documents.append(_file_document(data, detect_format(name, upload.content_type, data), name, metadata, field_name))
    return documents


@blueprint.post("/v1/workspaces/<ws>/documents")
async def add_documents(ws: str) -> Response:
    """JSON: `{"documents": [{"content" | "content_base64", "format"?, "source"?, "metadata"?}]}`
    or one such document as the body; multipart: one or more files (any field name), optional `metadata`
    (a JSON object for all of them) and `language` fields."""
    check_workspace_name(ws)
    language: str | None = None
    if (request.mimetype or "").startswith("multipart/"):
        files = list((await request.files).items(multi=True))
        form = await request.form
        if not files:
            raise invalid_request("The upload has no files.", param="files")
        documents = await _uploaded(files, _metadata(form.get("metadata"), "metadata"))
        language = form.get("language") or None
    else:
        data = loads_object(await request_body())
        language = Fields(data).text("language", nonempty=True)
        items = data.get("documents")
        if items is None:
            documents = [_json_document(data, "body")]
        elif isinstance(items, list) and items:
            documents = [_json_document(item, f"documents[{i}]") for i, item in enumerate(items)]
        else:
            raise invalid_request("Invalid `documents`: expected a non-empty array.", param="documents")
    if len(documents) > _MAX_DOCUMENTS:
        raise invalid_request(f"Too many documents: at most {_MAX_DOCUMENTS} per request.", param="documents")
    rag = _rag()
    if language is not None and (not storable(language) or not await _language_exists(rag, language)):
        raise invalid_request(f"Invalid `language` {language!r}: not a text search configuration.", param="language")
    results = await rag.ingest(ws, documents, language=language)
    changed = any(result.status in ("created", "updated") for result in results)
    return _reply({"object": "list", "workspace": ws, "data": [r.as_json() for r in results]}, 201 if changed else 200)


@blueprint.get("/v1/workspaces/<ws>/documents")
async def list_documents(ws: str) -> Response:
    rag = _rag()
    workspace = await rag.workspace(ws, None)
    limit = _query_int("limit", 100, 1, 1000)
    offset = _query_int("offset", 0, 0, 10**9)
    store = rag.store()
    with bounded_query():
        rows = await store.list_documents(workspace.id, limit=limit, offset=offset)
        total = await store.count_documents(workspace.id)
    return _reply({"object": "list", "workspace": ws, "total": total, "data": [_document_json(r) for r in rows]})


def _query_int(name: str, default: int, minimum: int, maximum: int) -> int:
    value = request.args.get(name)
    if value is None:
        return default
    if not is_decimal(value) or not minimum <= int(value) <= maximum:
        raise invalid_request(f"Invalid `{name}`: expected an integer between {minimum} and {maximum}.", param=name)
    return int(value)


def _document_not_found(ws: str, document_id: str) -> GatewayError:
    return GatewayError(ErrorKind.NOT_FOUND, f"Document `{document_id}` is not in workspace `{ws}`.",
                        param="document_id", code="document_not_found")


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


@blueprint.get("/v1/workspaces/<ws>/documents/<document_id>")
async def get_document(ws: str, document_id: str) -> Response:
    rag = _rag()
    workspace = await rag.workspace(ws, None)
    row = None
    if _is_uuid(document_id):
        with bounded_query():
            row = await rag.store().get_document(workspace.id, document_id)
    if row is None:
        raise _document_not_found(ws, document_id)
    return _reply(_document_json(row))


@blueprint.delete("/v1/workspaces/<ws>/documents/<document_id>")
async def delete_document(ws: str, document_id: str) -> Response:
    rag = _rag()
    workspace = await rag.workspace(ws, None)
    deleted = False
    if _is_uuid(document_id):
        with bounded_write():
            deleted = await rag.store().delete_document(workspace.id, document_id)
    if not deleted:
        raise _document_not_found(ws, document_id)
    return _reply({"object": "document.deleted", "id": document_id, "deleted": True})


@blueprint.post("/v1/workspaces/<ws>/search")
async def search(ws: str) -> Response:
    fields = Fields(loads_object(await request_body()))
    query = fields.text("query", required=True)
    assert query is not None
    overrides = validate_overrides({k: v for k, v in fields.data.items() if k != "query"})
    rag = _rag()
    retrieval = await rag.retrieve(ws, query, overrides, param=None)
    workspace = await rag.workspace(ws, None)
    with bounded_query():
        terms = await rag.store().full_text_terms(workspace, query)
    return _reply({
        "object": "list", "workspace": ws, "query": query, "candidates": retrieval.candidates,
        "full_text_terms": terms,
        "data": passages_json(retrieval.passages),
        "timings": {k: round(v, 2) for k, v in retrieval.timings.items()},
    })
