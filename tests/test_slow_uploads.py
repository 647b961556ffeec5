"""The routes Quart serves (embeddings, workspace document uploads) give a request body the
chat routes' time: 120 s plus a second per 16 KiB received. A large upload over a slow link
is read while it keeps coming; a trickle is still cut off, with the chat routes' 408."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from proxy.http import _front
from tests.fakes import OpenAIBackend
from tests.harness import backend, running_gateway
from tests.rag_corpus import HANDBOOK

pytest_plugins = ["tests.infra_servers"]


@pytest.fixture(autouse=True)
def _short_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0.5 s, and a second more per 4 KiB: a 20 KB body sent steadily over 1.5 s keeps its time.
    monkeypatch.setattr(_front, "BODY_TIMEOUT", 0.5)
    monkeypatch.setattr(_front, "BODY_MIN_RATE", 4 * 1024)


async def steadily(body: bytes, piece: int, pause: float) -> AsyncIterator[bytes]:
    for start in range(0, len(body), piece):
        await trio.sleep(pause)
        yield body[start : start + piece]


async def test_a_large_embeddings_request_over_a_slow_link_is_read_while_it_keeps_coming() -> None:
    # Before, Quart's fixed total (120 s; 0.5 s here) cut it off: a 400 "Request Timeout".
    body = json.dumps({"model": "m", "input": ["x" * 2_000] * 10}).encode()
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as url, \
            httpx.AsyncClient(base_url=url, timeout=30) as client:
        headers = {"content-length": str(len(body)), "content-type": "application/json"}
        answer = await client.post("/v1/embeddings", content=steadily(body, 2_000, 0.15), headers=headers)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["data"]) == 10
        trickled = await client.post("/v1/embeddings", content=steadily(body, 50, 0.1), headers=headers)
        assert trickled.status_code == 408
        assert trickled.json()["error"]["code"] == "body_timeout"
        assert "a second more per 4 KiB received" in trickled.json()["error"]["message"]
        # Its body half-read, the connection closes: the client is told, so it sends its next
        # request on a new one (before, it could reuse the closing one).
        assert trickled.headers["connection"] == "close"
        again = await client.post("/v1/embeddings", content=body, headers=headers)
        assert again.status_code == 200, again.text


async def test_a_document_upload_over_a_slow_link_is_read_while_it_keeps_coming(pg_database_url: str) -> None:
    document = "\n\n".join(f"# Part {i}\n\n{HANDBOOK}" for i in range(12)).encode()
    request = httpx.Request("POST", "http://x/v1/workspaces/slow/documents",
                            files={"file": ("handbook.md", document, "text/markdown")})
    body, headers = request.read(), {k: v for k, v in request.headers.items() if k != "host"}
    async with running_gateway(database_url=pg_database_url) as url, \
            httpx.AsyncClient(base_url=url, timeout=120) as client:
        uploaded = await client.post("/v1/workspaces/slow/documents", content=steadily(body, len(body) // 10, 0.15),
                                     headers=headers)
        assert uploaded.status_code == 201, uploaded.text
        trickled = await client.post("/v1/workspaces/slow/documents", content=steadily(body, 20, 0.1), headers=headers)
        assert trickled.status_code == 408
        assert trickled.json()["error"]["code"] == "body_timeout"
        assert trickled.headers["connection"] == "close"
