"""Anthropic's Message Batches API, sans I/O: the create request (each request checked as
Anthropic checks it, a fault naming its index), the `message_batch` object and the results'
lines. A message batch runs on the gateway's batch engine as a batch of endpoint
`/v1/messages`: its requests are kept as that engine's input lines."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from proxy.dialects._json import loads_object
from proxy.dialects.anthropic._request import BETA_EXTRA, parse_messages_request
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request

MESSAGES = "/v1/messages"
MAX_REQUESTS = 100_000  # Anthropic's, per batch
_CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ENDED = ("completed", "cancelled", "expired", "failed")
# The Message Batches API's own beta (older SDKs send it): not a feature of its requests.
_BATCHES_BETA = "message-batches-2024-09-24"


def ended(status: str) -> bool:
    """Whether a batch of this (engine's) status has ended processing."""
    return status in _ENDED


def new_batch_id() -> str:
    return "msgbatch_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def is_batch_id(value: str) -> bool:
    return value.startswith("msgbatch_") and len(value) <= 128 and _CUSTOM_ID.fullmatch(value[9:]) is not None


def batch_not_found(batch_id: str) -> GatewayError:
    return GatewayError(ErrorKind.NOT_FOUND, f"No message batch found with id '{batch_id}'.", param="message_batch_id")


def parse_create(body: bytes, max_requests: int) -> list[tuple[str, dict[str, Any]]]:
    """`POST /v1/messages/batches`: each request's `custom_id` and `params` (a Messages
    request, validated as `/v1/messages` validates it). A fault is a 400 naming the request's
    index (`requests.3.params: Missing required parameter ...`); nothing is created."""
    data = loads_object(body)
    requests = data.get("requests")
    if not isinstance(requests, list) or not requests:
        raise invalid_request("requests: expected a non-empty array of requests.", param="requests")
    if len(requests) > max_requests:
        whose = "Anthropic's limit" if max_requests >= MAX_REQUESTS else "this gateway's `[batches] max_lines`"
        raise invalid_request(
            f"requests: a message batch holds at most {max_requests} requests ({whose}); this one has {len(requests)}.",
            param="requests",
        )
    for name in data:
        if name != "requests":
            raise invalid_request(f"{name}: Extra inputs are not permitted", param=name)
    parsed: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for index, request in enumerate(requests):
        where = f"requests.{index}"
        if not isinstance(request, dict):
            raise invalid_request(f"{where}: expected an object with `custom_id` and `params`.", param=where)
        for name in request:
            if name not in ("custom_id", "params"):
                raise invalid_request(f"{where}.{name}: Extra inputs are not permitted", param=f"{where}.{name}")
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or _CUSTOM_ID.fullmatch(custom_id) is None:
            raise invalid_request(
                f"{where}.custom_id: must be 1 to 64 letters, digits, underscores or hyphens "
                f"(^[a-zA-Z0-9_-]{{1,64}}$).", param=f"{where}.custom_id",
            )
        if custom_id in seen:
            raise invalid_request(
                f"{where}.custom_id: {custom_id!r} is used by another request of this batch; each custom_id "
                "must be unique.", param=f"{where}.custom_id",
            )
        seen.add(custom_id)
        params = request.get("params")
        if not isinstance(params, dict):
            raise invalid_request(f"{where}.params: expected a Messages request (an object).", param=f"{where}.params")
        try:
            parse_messages_request(json.dumps(params).encode())
        except GatewayError as error:
            raise invalid_request(f"{where}.params: {error.message}", param=f"{where}.params") from None
        parsed.append((custom_id, params))
    return parsed


def input_lines(requests: list[tuple[str, dict[str, Any]]], beta: str | None = None) -> bytes:
    """The requests as the batch engine's input (one line each, numbered from 1 in order),
    each carrying the create request's `anthropic-beta` (its features are its requests')."""
    beta = ", ".join(name for name in _names(beta) if name != _BATCHES_BETA) or None
    return b"".join(
        json.dumps({"custom_id": custom_id, "method": "POST", "url": MESSAGES,
                    "body": params if beta is None else {**params, BETA_EXTRA: beta}},
                   ensure_ascii=False).encode() + b"\n"
        for custom_id, params in requests
    )


def _names(header: str | None) -> list[str]:
    return [name.strip() for name in (header or "").split(",") if name.strip()]


def _when(epoch: int | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def batch_object(row: Mapping[str, Any], results_url: str) -> dict[str, Any]:
    """A batch as Anthropic renders it: requests count as `processing` until it has ended
    (as Anthropic's do), then each by its outcome."""
    status = row["status"]
    done = ended(status)
    counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    if not done:
        counts["processing"] = row["total"]
    else:
        answered = row["completed"] + row["failed"]
        counts.update(
            succeeded=row["completed"], errored=row["failed"] - row["expired"], expired=row["expired"],
            canceled=max(row["total"] - answered, 0),
        )
    ended_at = next((row.get(name) for name in ("completed_at", "cancelled_at", "expired_at", "failed_at") if row.get(name)), None)
    return {
        "id": row["id"], "type": "message_batch",
        "processing_status": "ended" if done else "canceling" if status == "cancelling" else "in_progress",
        "request_counts": counts, "ended_at": _when(ended_at), "created_at": _when(row["created_at"]),
        "expires_at": _when(row["expires_at"]), "archived_at": _when(row.get("archived_at")),
        "cancel_initiated_at": _when(row.get("cancelling_at")), "results_url": results_url if done else None,
    }


def deleted(batch_id: str) -> dict[str, Any]:
    return {"id": batch_id, "type": "message_batch_deleted"}


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def results(requests: Iterable[tuple[str, Any]]) -> bytes:
    """The results' JSONL of `requests` (each its `custom_id` and the answer the batch engine
    recorded for it, the `/v1/messages` call's body and status; None: canceled, it never ran,
    as an ended batch's unrecorded requests are those its cancel stopped)."""
    return b"".join(
        json.dumps({"custom_id": custom_id, "result": _result(recorded)}, ensure_ascii=False).encode() + b"\n"
        for custom_id, recorded in requests
    )


def _result(line: Any) -> dict[str, Any]:
    if line is None:
        return {"type": "canceled"}
    response = line.get("response") if isinstance(line, dict) else None
    if not isinstance(response, dict):  # recorded unrun: the batch's window ended first
        return {"type": "expired"}
    body, status = response.get("body"), response.get("status_code")
    if isinstance(status, int) and 200 <= status < 300:
        return {"type": "succeeded", "message": body}
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(body, dict) and body.get("type") == "error" and isinstance(error, dict) and isinstance(error.get("type"), str)):
        # Not an Anthropic error body (the engine's own 500, a body that is not JSON).
        message = error.get("message") if isinstance(error, dict) else None
        error = {"type": "api_error", "message": message if isinstance(message, str) else str(body)}
    return {"type": "errored", "error": {"type": "error", "error": error, "request_id": response.get("request_id")}}
