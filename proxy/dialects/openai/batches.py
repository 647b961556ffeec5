"""OpenAI's Files and Batch APIs, sans I/O: the create requests, a batch input file's lines
(checked as OpenAI checks them, each fault named by its line), and the objects and output
lines as OpenAI renders them."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.dialects._json import Fields, loads_object
from proxy.dialects.responses._conversations import _metadata
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.domain.ids import storable

# What the gateway serves of OpenAI's batch endpoints (its moderations, images and videos: no),
# and the rerank and score lines of vLLM's own batch runner (`vllm run-batch`).
ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/completions", "/v1/rerank", "/v1/score")
# Of OpenAI's purposes, the ones whose files the gateway has a use for.
PURPOSES = ("batch",)
OUTPUT_PURPOSE = "batch_output"
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
_TIMESTAMPS = (
    "created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelling_at",
    "cancelled_at", "expired_at",
)
# Errors named per line stop at this many (OpenAI lists a handful, not one per line of a bad file).
_MAX_ERRORS = 100
# OpenAI's bounds of a file's `expires_after.seconds` (and a batch's `output_expires_after`).
EXPIRY_SECONDS = (3600, 2_592_000)
# How long a file of purpose `batch` is kept without `expires_after`: OpenAI's default (30 days),
# so that a gateway's uploads do not stay for good unless their clients delete them.
BATCH_FILE_SECONDS = 2_592_000


def new_file_id() -> str:
    return "file-" + secrets.token_urlsafe(16).replace("_", "").replace("-", "")[:22]


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


def new_line_id() -> str:
    return "batch_req_" + secrets.token_hex(16)


def is_file_id(value: str) -> bool:
    return value.startswith("file-") and storable(value) and len(value) <= 128


def is_batch_id(value: str) -> bool:
    return value.startswith("batch_") and storable(value) and len(value) <= 128


def file_not_found(file_id: str, param: str = "file_id") -> GatewayError:
    return GatewayError(ErrorKind.NOT_FOUND, f"No such File object: {file_id}", param=param, code="file_not_found")


def batch_not_found(batch_id: str) -> GatewayError:
    return GatewayError(ErrorKind.NOT_FOUND, f"No batch found with id '{batch_id}'.", param="batch_id", code="batch_not_found")


def check_purpose(purpose: str | None) -> str:
    if not purpose:
        raise invalid_request("Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter")
    if purpose not in PURPOSES:
        raise invalid_request(
            f"Invalid value for 'purpose': {purpose!r}. This gateway keeps files for the Batch API only: "
            "purpose must be 'batch'.", param="purpose", code="invalid_value",
        )
    return purpose


def expires_after(anchor: Any, seconds: Any, param: str) -> int | None:
    """OpenAI's `expires_after` (`anchor: "created_at"`, `seconds` from an hour to 30 days):
    the seconds a file is kept after it is written; None: not asked, kept until deleted."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise invalid_request(
            f"Invalid value for '{param}.anchor': {anchor!r}. Supported: 'created_at'.", param=f"{param}.anchor",
            code="invalid_value" if anchor is not None else "missing_required_parameter",
        )
    low, high = EXPIRY_SECONDS
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not low <= seconds <= high:
        raise invalid_request(
            f"Invalid value for '{param}.seconds': {seconds!r}. It must be an integer between {low} (1 hour) and "
            f"{high} (30 days).", param=f"{param}.seconds", code="invalid_value",
        )
    return seconds


@dataclass(frozen=True, slots=True)
class NewBatch:
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    output_expires_seconds: int | None = None


def parse_create(body: bytes) -> NewBatch:
    """`POST /v1/batches`."""
    fields = Fields(loads_object(body))
    input_file_id = fields.text("input_file_id", required=True, nonempty=True)
    endpoint = fields.text("endpoint", required=True, nonempty=True)
    window = fields.text("completion_window", required=True, nonempty=True)
    assert input_file_id is not None and endpoint is not None and window is not None
    if endpoint not in ENDPOINTS:
        raise invalid_request(
            f"Invalid value for 'endpoint': {endpoint!r}. Supported: {', '.join(ENDPOINTS)}.",
            param="endpoint", code="invalid_value",
        )
    if window != "24h":
        raise invalid_request(
            f"Invalid value for 'completion_window': {window!r}. Supported: '24h'.",
            param="completion_window", code="invalid_value",
        )
    metadata = _metadata(fields) if fields.data.get("metadata") is not None else None
    policy = fields.object("output_expires_after")
    given: dict[str, Any] = policy.data if policy is not None else {}
    output_expires = expires_after(given.get("anchor"), given.get("seconds"), "output_expires_after")
    if not is_file_id(input_file_id):
        raise file_not_found(input_file_id, "input_file_id")
    return NewBatch(input_file_id, endpoint, window, metadata, output_expires)


_STREAMING = ("stream", "stream_options")


@dataclass(frozen=True, slots=True)
class Line:
    number: int  # 1-based, in the file
    custom_id: str
    model: str
    # The request sent for it (its `body` without `stream`: a batch's answers are whole),
    # kept as bytes: a batch's tens of thousands of lines held as parsed JSON take several
    # times the file's size.
    payload: bytes


def raw_lines(content: bytes) -> Iterator[bytes]:
    """The lines of a JSONL file, one at a time (not a list of them all: another copy of it)."""
    start, size = 0, len(content)
    while start < size:
        end = content.find(b"\n", start)
        if end < 0:
            end = size
        yield content[start:end]
        start = end + 1


def _fault(number: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "line": number, "message": message, "param": param}


def _checked(number: int, text: bytes, endpoint: str) -> Line | dict[str, Any]:
    try:
        request = json.loads(text)
    except (ValueError, RecursionError):
        return _fault(number, "invalid_json_line", "This line is not parseable as valid JSON.")
    if not isinstance(request, dict):
        return _fault(number, "invalid_json_line", "This line is not a JSON object.")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or not storable(custom_id):
        return _fault(number, "missing_required_parameter", "Each request needs a `custom_id` (a non-empty string).", "custom_id")
    if request.get("method") != "POST":
        return _fault(number, "invalid_value", "The `method` of each request must be 'POST'.", "method")
    url = request.get("url")
    if url != endpoint:
        return _fault(
            number, "url_mismatch", f"The `url` of this request ({url!r}) is not the batch's endpoint ({endpoint}).", "url"
        )
    body = request.get("body")
    if not isinstance(body, dict):
        return _fault(number, "missing_required_parameter", "Each request needs a `body` (a JSON object).", "body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return _fault(number, "missing_required_parameter", "The `body` of each request needs a `model`.", "body.model")
    payload = json.dumps({key: value for key, value in body.items() if key not in _STREAMING}, ensure_ascii=False)
    return Line(number, custom_id, body["model"], payload.encode())


def parse_lines(content: bytes, endpoint: str, max_lines: int) -> tuple[list[Line], list[dict[str, Any]]]:
    """A batch input file's requests, and what is wrong with it (each fault naming its line,
    OpenAI's `errors.data[]`): with any fault, the batch fails and runs nothing. An OpenAI
    batch's lines all name one model, the first line's (OpenAI's `model_mismatch`)."""
    one_model = endpoint in ENDPOINTS
    lines: list[Line] = []
    faults: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_lines(content), start=1):
        if not raw.strip():
            continue
        if len(lines) + len(faults) >= max_lines:
            faults.append(_fault(index, "too_many_tasks", f"A batch holds at most {max_lines} requests."))
            break
        checked = _checked(index, raw, endpoint)
        if isinstance(checked, Line):
            if checked.custom_id in seen:
                checked = _fault(index, "duplicate_custom_id", f"The custom_id {checked.custom_id!r} is used more than once.", "custom_id")
            elif one_model and lines and checked.model != lines[0].model:
                checked = _fault(
                    index, "model_mismatch", f"The model {checked.model!r} of this request is not the batch's "
                    f"({lines[0].model!r}): every request of a batch names the same model.", "body.model",
                )
            else:
                seen.add(checked.custom_id)
                lines.append(checked)
                continue
        faults.append(checked)
        if len(faults) >= _MAX_ERRORS:
            break
    if not lines and not faults:
        faults.append({"code": "empty_file", "line": None, "message": "The input file holds no requests.", "param": None})
    return lines, faults


def model_of(lines: list[Line], endpoint: str) -> str | None:
    """The model of an OpenAI batch (`Batch.model`): the one its lines name."""
    return lines[0].model if lines and endpoint in ENDPOINTS else None


def file_object(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
        "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
        "expires_at": row.get("expires_at"), "status_details": None,
    }


def batch_object(row: Mapping[str, Any]) -> dict[str, Any]:
    """A batch as OpenAI renders it, from its row (timestamps in Unix seconds, its lines'
    counts and token sums)."""
    errors = row.get("errors")
    usage = {  # zeros before any line is answered, as OpenAI's
        "input_tokens": row["input_tokens"], "input_tokens_details": {"cached_tokens": row.get("cached_tokens", 0)},
        "output_tokens": row["output_tokens"], "output_tokens_details": {"reasoning_tokens": row.get("reasoning_tokens", 0)},
        "total_tokens": row["input_tokens"] + row["output_tokens"],
    }
    rendered: dict[str, Any] = {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"], "model": row.get("model"),
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"], "status": row["status"],
        "output_file_id": row.get("output_file_id"), "error_file_id": row.get("error_file_id"),
        "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
        "usage": usage, "metadata": row.get("metadata"),
    }
    for name in _TIMESTAMPS:
        rendered[name] = row.get(name)
    return rendered


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list", "data": data, "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None, "has_more": has_more,
    }


def output_line(custom_id: str, status: int, request_id: str, body: Any) -> dict[str, Any]:
    """A line's answer, in the output file (2xx) or the error file: OpenAI's per-line format."""
    return {
        "id": new_line_id(), "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None,
    }


def unrun_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A line that never ran (its batch expired first): the error file's, without a response."""
    return {"id": new_line_id(), "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}


def usage_of(body: Any) -> tuple[int, int, int, int]:
    """Input, output, cached input and reasoning tokens of an answer of any batch endpoint
    (chat and completions, Responses, embeddings, rerank and score; Anthropic's messages)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0, 0, 0

    def count(within: dict[str, Any], *names: str) -> int:
        for name in names:
            value = within.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        return 0

    def details(*names: str) -> dict[str, Any]:
        for name in names:
            found = usage.get(name)
            if isinstance(found, dict):
                return found
        return {}

    cached = count(details("prompt_tokens_details", "input_tokens_details"), "cached_tokens") or count(
        usage, "cache_read_input_tokens"
    )
    reasoning = count(details("completion_tokens_details", "output_tokens_details"), "reasoning_tokens")
    output = count(usage, "completion_tokens", "output_tokens")
    # A rerank server may count only `total_tokens` (vLLM's, Jina's): all of it input.
    read = count(usage, "prompt_tokens", "input_tokens") or max(count(usage, "total_tokens") - output, 0)
    return read, output, cached, reasoning
