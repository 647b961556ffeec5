"""`POST /v1/files` read as its bytes arrive: a file up to exactly `[batches] file_max_bytes`
is taken whatever the form's size around it, its bytes stored exactly (across the slices it
is streamed to PostgreSQL in), and one past the limit refused as soon as its bytes pass it,
its sender stopped (chunked too: not read to its end first)."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import psycopg
import pytest
import trio

import proxy.http._batches
from proxy.config import BatchSettings
from tests.fakes import OpenAIBackend
from tests.harness import backend
from tests.test_auth_helpers import gateway

pytest_plugins = ["tests.infra_servers", "tests.rag_fixtures"]

BOUNDARY = "upload-boundary-7d1f"


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


async def test_a_file_of_exactly_the_limit_is_stored_byte_for_byte_whatever_the_forms_order(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """The limit is the file's (the 413 says so), not the form's around it; bytes that look
    like the form's own (near-boundaries, CRLFs, every byte value) are the file's, stored exactly
    across the megabyte slices they are streamed in; `purpose` may follow the file (curl's
    `-F` order)."""
    limit = 3 * 2**20 + 12_345
    tricky = b"".join(bytes(range(256)) + f"\r\n--{BOUNDARY}x\r\n--{BOUNDARY[:-1]}\r\n\r\n--{BOUNDARY}".encode() for _ in range(64))
    content = (tricky + os.urandom(limit))[:limit]
    fake = OpenAIBackend()
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True), batches=BatchSettings(file_max_bytes=limit),
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        uploaded = await client.files.create(file=("exact.jsonl", content), purpose="batch")
        assert uploaded.bytes == limit and uploaded.filename == "exact.jsonl"
        assert (await client.files.content(uploaded.id)).content == content

        body = part("file", content[:5000], "first.jsonl") + part("purpose", b"batch") + f"--{BOUNDARY}--\r\n".encode()
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            reply = await http.post("/v1/files", content=body, headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
            assert reply.status_code == 200, reply.text
            assert reply.json()["filename"] == "first.jsonl" and reply.json()["purpose"] == "batch"
            assert (await http.get(f"/v1/files/{reply.json()['id']}/content")).content == content[:5000]
            cut = await http.post(
                "/v1/files", content=part("purpose", b"batch") + part("file", b"{}", "cut.jsonl"),
                headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
            )
            assert cut.status_code == 400 and cut.json()["error"]["type"] == "invalid_request_error"

        with pytest.raises(openai.APIStatusError) as too_large:
            await client.files.create(file=("over.jsonl", content + b"x"), purpose="batch")
        assert too_large.value.status_code == 413 and f"{limit} bytes" in too_large.value.message
        assert too_large.value.code == "file_too_large"
        assert [file.id for file in (await client.files.list()).data] == [reply.json()["id"], uploaded.id]
        await client.close()


async def test_a_chunked_upload_past_the_limit_is_refused_before_its_end(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """No `content-length` to refuse it by: the file's bytes are counted as they arrive, and
    past `file_max_bytes` the upload is a 413 in OpenAI's shape at once, its connection
    closed: the sender is stopped long before the gigabytes it meant to send."""
    limit, meant = 4 * 2**20, 128 * 2**20
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        head = part("purpose", b"batch") + f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'.encode()
        yield head
        piece = b'{"custom_id": "x"}\n' * 3000
        while sent < meant:
            sent += len(piece)
            yield piece

    fake = OpenAIBackend()
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True), batches=BatchSettings(file_max_bytes=limit),
    ) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        reply = await http.post(
            "/v1/files", content=endless(), headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
        )
        assert reply.status_code == 413
        error = reply.json()["error"]
        assert error["code"] == "file_too_large" and error["param"] == "file" and f"{limit} bytes" in error["message"]
        assert reply.headers["connection"] == "close"
        assert sent < meant / 4
        assert (await http.get("/v1/files")).json()["data"] == []


async def test_a_compressed_upload_is_stored_inflated_and_a_bomb_refused_at_the_limit(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A form sent with `Content-Encoding: gzip` (or deflate, as the other routes take it) is
    the file it inflates to, stored byte for byte; the limit holds for what it inflates to, so
    a few kilobytes that inflate to gigabytes are a 413, and a coding the gateway does not
    speak a 415."""
    limit = 2 * 2**20
    content = b"".join(b'{"custom_id": "r%d", "method": "POST"}\n' % i for i in range(20_000))[: limit - 10]
    form = part("purpose", b"batch") + part("file", content, "grüße.jsonl") + f"--{BOUNDARY}--\r\n".encode()
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    fake = OpenAIBackend()
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True), batches=BatchSettings(file_max_bytes=limit),
    ) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        for coding, packed in (("gzip", gzip.compress(form)), ("deflate", zlib.compress(form))):
            reply = await http.post("/v1/files", content=packed, headers={**headers, "content-encoding": coding})
            assert reply.status_code == 200, reply.text
            assert reply.json()["bytes"] == len(content) and reply.json()["filename"] == "grüße.jsonl"
            assert (await http.get(f"/v1/files/{reply.json()['id']}/content")).content == content

        bomb = gzip.compress(part("purpose", b"batch") + part("file", b"\n" * (64 * limit), "bomb.jsonl"))
        assert len(bomb) < limit // 4
        refused = await http.post("/v1/files", content=bomb, headers={**headers, "content-encoding": "gzip"})
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "file_too_large"

        unknown = await http.post("/v1/files", content=form, headers={**headers, "content-encoding": "br"})
        assert unknown.status_code == 415 and unknown.json()["error"]["code"] == "unsupported_content_encoding"
        assert len((await http.get("/v1/files")).json()["data"]) == 2


async def test_the_openapi_document_says_which_uploads_and_batches_are_accepted(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """`/openapi.json` describes `POST /v1/files` and `POST /v1/batches` as they are checked:
    the purposes kept, `expires_after`'s fields and bounds, the endpoints a batch may run."""
    fake = OpenAIBackend()
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True),
    ) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        paths = (await http.get("/openapi.json")).json()["paths"]
        upload = paths["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert set(upload["required"]) == {"file", "purpose"}
        seconds = upload["properties"]["expires_after[seconds]"]
        for purpose in ("batch", "user_data", "fine-tune", "assistants"):
            reply = await http.post("/v1/files", data={"purpose": purpose}, files={"file": ("a.jsonl", b"{}\n")})
            assert (reply.status_code == 200) == (purpose in upload["properties"]["purpose"]["enum"]), purpose
        file_id = reply.json()["id"] if reply.status_code == 200 else None
        for value in (seconds["minimum"] - 1, seconds["minimum"], seconds["maximum"], seconds["maximum"] + 1):
            reply = await http.post(
                "/v1/files", data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": str(value)},
                files={"file": ("a.jsonl", b"{}\n")},
            )
            assert (reply.status_code == 200) == (seconds["minimum"] <= value <= seconds["maximum"]), value
            file_id = file_id or (reply.json()["id"] if reply.status_code == 200 else None)

        new_batch = paths["/v1/batches"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(new_batch["required"]) == {"input_file_id", "endpoint", "completion_window"}
        endpoints = new_batch["properties"]["endpoint"]["enum"]
        for endpoint in [*endpoints, "/v1/moderations", "/v1/messages"]:
            reply = await http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"})
            assert (reply.json().get("error", {}).get("param") != "endpoint") == (endpoint in endpoints), endpoint


async def test_a_file_or_message_batch_stored_on_a_stalled_database_is_a_503_that_keeps_nothing(
    aio_loop: object, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The table locked by another writer (or PostgreSQL stalled): an upload, or a message
    # batch's creation, waited for it for as long as it lasted, the client with no answer.
    monkeypatch.setattr(proxy.http._batches, "SLOW_BASE_SECONDS", 1.0)
    lines = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": []}}\n'
    requests: Any = [{"custom_id": "a", "params": {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}}]
    fake = OpenAIBackend()
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        oa = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
        an = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0, timeout=30)
        holder = await trio.to_thread.run_sync(lambda: psycopg.connect(pg_database_url))
        try:
            await trio.to_thread.run_sync(holder.execute, "LOCK TABLE files IN EXCLUSIVE MODE")  # reads go on
            with trio.fail_after(20), pytest.raises(openai.APIStatusError) as upload:
                await oa.files.create(file=("in.jsonl", lines), purpose="batch")
            with trio.fail_after(20), pytest.raises(anthropic.APIStatusError) as batch:
                await an.messages.batches.create(requests=requests)
        finally:
            await trio.to_thread.run_sync(holder.close)
        assert upload.value.status_code == 503 and upload.value.code == "database_unavailable"
        assert upload.value.response.headers["retry-after"] == "2"
        assert batch.value.status_code == 503 and batch.value.response.headers["retry-after"] == "2"
        # Nothing of either was kept; sent again, each is.
        assert (await oa.files.list()).data == []
        assert [b async for b in an.messages.batches.list()] == []
        assert (await oa.files.create(file=("in.jsonl", lines), purpose="batch")).bytes == len(lines)
        assert (await an.messages.batches.create(requests=requests)).request_counts.processing == 1
        await oa.close()
        await an.close()
