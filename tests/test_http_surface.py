"""The HTTP surface every client sees, whatever the route: request ids on every response,
model lookups (OpenAI's and Anthropic's shapes), and `Allow` on every 405."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest

from tests.fakes import OpenAIBackend
from tests.harness import backend, running_gateway

MESSAGES = [{"role": "user", "content": "hi"}]


@asynccontextmanager
async def gateway(**settings: Any) -> AsyncIterator[str]:
    """A gateway whose only backend serves `m*` models (any other name is unknown)."""
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, prefixes=("m",)), **settings) as url:
        yield url


# (method, path, request arguments, the status expected): every kind of answer, on every
# dialect's routes, from the front door and from Quart, success and failure.
RESPONSES: list[tuple[str, str, dict[str, Any], int]] = [
    ("POST", "/v1/chat/completions", {"json": {"model": "m", "messages": MESSAGES}}, 200),
    ("POST", "/v1/chat/completions", {"json": {"model": "m", "messages": MESSAGES, "stream": True}}, 200),
    ("POST", "/v1/chat/completions", {"json": {"model": "m", "messages": MESSAGES, "n": 0}}, 400),
    ("POST", "/v1/chat/completions", {"content": b"{", "headers": {"content-type": "application/json"}}, 400),
    ("POST", "/v1/chat/completions", {"json": {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}}, 413),
    ("POST", "/v1/chat/completions", {"json": {"model": "zzz", "messages": MESSAGES}}, 404),
    ("GET", "/v1/chat/completions", {}, 405),
    ("GET", "/v1/models", {}, 200),
    ("POST", "/v1/models", {}, 405),
    ("GET", "/v1/embeddings", {}, 405),
    ("POST", "/v1/embeddings", {"content": b"{", "headers": {"content-type": "application/json"}}, 400),
    ("POST", "/v1/embeddings", {"json": {"model": "m", "input": "x" * 5000}}, 413),
    ("GET", "/v1/nothing", {}, 404),
    ("GET", "/health", {}, 200),
    ("GET", "/openapi.json", {}, 200),
    ("POST", "/api/chat", {"content": b"{"}, 400),
    ("GET", "/api/tags", {}, 200),
    ("POST", "/v1/messages", {"content": b"{"}, 400),
    ("POST", "/v1/messages/count_tokens", {"content": b"{"}, 400),
]


async def test_every_response_carries_the_clients_request_id() -> None:
    async with gateway(max_body_bytes=2000) as url, httpx.AsyncClient(base_url=url) as client:
        for method, path, arguments, status in RESPONSES:
            headers = {**arguments.get("headers", {}), "x-request-id": "client-id-1"}
            answer = await client.request(method, path, **{**arguments, "headers": headers})
            assert answer.status_code == status, (method, path, answer.text)
            assert answer.headers.get_list("x-request-id") == ["client-id-1"], (method, path, status)


async def test_without_one_every_response_carries_a_fresh_request_id() -> None:
    async with gateway(max_body_bytes=2000) as url, httpx.AsyncClient(base_url=url) as client:
        seen: set[str] = set()
        for method, path, arguments, status in RESPONSES:
            answer = await client.request(method, path, **arguments)
            assert answer.status_code == status, (method, path, answer.text)
            ids = answer.headers.get_list("x-request-id")
            assert len(ids) == 1 and len(ids[0]) >= 16, (method, path, status, ids)
            seen.add(ids[0])
        assert len(seen) == len(RESPONSES)
        # An unusable id (not printable ASCII) is replaced, not echoed.
        answer = await client.get("/v1/models", headers={"x-request-id": "bad\tid"})
        assert answer.headers["x-request-id"] != "bad\tid"


async def test_the_openai_sdk_reports_the_request_id_of_errors() -> None:
    async with gateway(max_body_bytes=2000) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        failures = [
            client.chat.completions.create(model="m", messages=[], extra_headers={"x-request-id": "r-1"}),
            client.chat.completions.create(model="zzz", messages=MESSAGES, extra_headers={"x-request-id": "r-1"}),
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x" * 5000}], extra_headers={"x-request-id": "r-1"}
            ),
            client.embeddings.create(model="m", input="x" * 5000, extra_headers={"x-request-id": "r-1"}),
        ]
        for failure in failures:
            with pytest.raises(openai.APIStatusError) as caught:
                await failure
            assert caught.value.request_id == "r-1", caught.value
        listed = await client.models.with_raw_response.list()
        assert listed.request_id


async def test_anthropic_clients_get_request_id_on_errors_too() -> None:
    import anthropic

    async with gateway() as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as caught:
            await client.messages.create(model="m", max_tokens=5, messages=[])
        assert caught.value.status_code == 400
        assert caught.value.request_id


async def test_the_openai_sdk_retrieves_listed_models_and_aliases() -> None:
    fake = OpenAIBackend(models=["m-1", "org/m-2"])
    async with fake.serve() as server, running_gateway(
        backend("b", server.url, prefixes=("m",)), aliases={"fast": "m-1"}
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        model = await client.models.retrieve("m-1")
        assert (model.id, model.object, model.created, model.owned_by) == ("m-1", "model", 1700000000, fake.name)
        assert (await client.models.retrieve("org/m-2")).id == "org/m-2"  # sent as org%2Fm-2
        alias = await client.models.retrieve("fast")
        assert alias.id == "fast" and alias.model_extra == {"backend": "b", "alias_of": "m-1"}
        listed = {m.id async for m in client.models.list()}
        assert {"m-1", "org/m-2", "fast"} <= listed
        for model_id in listed:
            assert (await client.models.retrieve(model_id)).id == model_id
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("m-unknown")
        assert caught.value.code == "model_not_found" and caught.value.type == "invalid_request_error"
        assert "`m-unknown` does not exist" in caught.value.message
