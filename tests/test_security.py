"""Every endpoint without a key, with a wrong key and with a key scoped elsewhere; workspace
isolation; request limits (headers, body, JSON depth); nothing of a backend's address leaks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from proxy.config import Timeouts
from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend, Script, Usage
from tests.harness import backend, refusing_port, running_gateway
from tests.test_auth_helpers import MESSAGES, bearer, eventually, gateway, new_key, wait_for_key

pytest_plugins = ["tests.infra_servers"]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    body: Any = None
    dialect: str = "openai"
    foreign: int = 403  # what a key scoped to other models and workspaces gets


MODEL = "qwen3-8b"
ENDPOINTS = [
    Endpoint("POST", "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}),
    Endpoint("GET", "/v1/models", foreign=200),
    Endpoint("POST", "/v1/embeddings", {"model": MODEL, "input": "hello"}),
    Endpoint("POST", "/v1/embeddings", {"model": "all-minilm-l6-v2", "input": "hello"}),
    Endpoint("POST", "/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": MESSAGES}, "anthropic"),
    Endpoint("POST", "/v1/messages/count_tokens", {"model": MODEL, "messages": MESSAGES}, "anthropic"),
    Endpoint("GET", "/v1/streams/0123456789abcdef0123456789abcdef", foreign=404),
    Endpoint("POST", "/api/chat", {"model": MODEL, "messages": MESSAGES, "stream": False}, "ollama"),
    Endpoint("POST", "/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}, "ollama"),
    Endpoint("POST", "/api/show", {"model": MODEL}, "ollama", foreign=404),
    Endpoint("GET", "/api/tags", dialect="ollama", foreign=200),
    Endpoint("GET", "/api/version", dialect="ollama", foreign=200),
    Endpoint("GET", "/", dialect="ollama", foreign=200),
    Endpoint("POST", "/api/embed", {"model": MODEL, "input": "hello"}, "ollama"),
    Endpoint("POST", "/api/embeddings", {"model": MODEL, "prompt": "hello"}, "ollama"),
    Endpoint("GET", "/v1/workspaces"),
    Endpoint("GET", "/v1/workspaces/docs"),
    Endpoint("PUT", "/v1/workspaces/docs", {}),
    Endpoint("DELETE", "/v1/workspaces/docs"),
    Endpoint("POST", "/v1/workspaces/docs/documents", {"content": "# Title\n\nSome text."}),
    Endpoint("GET", "/v1/workspaces/docs/documents"),
    Endpoint("GET", "/v1/workspaces/docs/documents/8d0c5b8e-2f5a-4a38-9a8e-0e6a1c1b9f00"),
    Endpoint("DELETE", "/v1/workspaces/docs/documents/8d0c5b8e-2f5a-4a38-9a8e-0e6a1c1b9f00"),
    Endpoint("POST", "/v1/workspaces/docs/search", {"query": "text"}),
    Endpoint("GET", "/v1/no-such-endpoint", foreign=404),
]


def dialect_error(dialect: str, answer: httpx.Response, kind: str) -> str:
    """The error message, after checking the body is the dialect's error shape of `kind`."""
    body = answer.json()
    if dialect == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == kind
        return str(body["error"]["message"])
    if dialect == "ollama":
        assert set(body) == {"error"} and isinstance(body["error"], str)
        return body["error"]
    assert body["error"]["type"] == kind and body["error"]["message"]
    return str(body["error"]["message"])


@dataclass
class Stack:
    url: str
    db: str
    good: str
    foreign: str


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True), max_body_bytes=64 * 1024,
        max_header_bytes=8 * 1024,
    ) as url:
        good = await new_key(pg_database_url, "good", "--admin")
        foreign = await new_key(pg_database_url, "foreign", "--models", "other-*", "--workspaces", "other")
        await wait_for_key(url, good)
        await wait_for_key(url, foreign)
        yield Stack(url, pg_database_url, good, foreign)


async def call(client: httpx.AsyncClient, endpoint: Endpoint, headers: dict[str, str]) -> httpx.Response:
    return await client.request(endpoint.method, endpoint.path, json=endpoint.body, headers=headers)


async def test_every_endpoint_refuses_missing_wrong_and_foreign_keys_in_its_dialect(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        for endpoint in ENDPOINTS:
            where = f"{endpoint.method} {endpoint.path}"
            missing = await call(client, endpoint, {})
            assert missing.status_code == 401, where
            assert missing.headers["www-authenticate"].startswith("Bearer"), where
            if endpoint.path != "/":  # Ollama's `/` answers text; its 401 is still JSON
                assert "API key" in dialect_error(endpoint.dialect, missing, "authentication_error"), where

            for wrong in (bearer("sk-llmp-" + "x" * 43), {"x-api-key": stack.good[:-1]}, {"authorization": "Basic Zm9vOmJhcg=="}):
                refused = await call(client, endpoint, wrong)
                assert refused.status_code == 401, (where, wrong)

            foreign = await call(client, endpoint, bearer(stack.foreign))
            assert foreign.status_code == endpoint.foreign, (where, foreign.text)
            if endpoint.foreign == 403:
                message = dialect_error(endpoint.dialect, foreign, "permission_error")
                assert "may not" in message, where

            allowed = await call(client, endpoint, bearer(stack.good))
            assert allowed.status_code not in (401, 403), (where, allowed.text)


async def test_listings_show_a_scoped_key_only_its_models(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        everything = (await client.get("/v1/models", headers=bearer(stack.good))).json()["data"]
        assert {m["id"] for m in everything} >= {"fake-model", "all-minilm-l6-v2"}
        assert (await client.get("/v1/models", headers=bearer(stack.foreign))).json()["data"] == []
        assert (await client.get("/api/tags", headers=bearer(stack.foreign))).json()["models"] == []
        # No listing says where a backend lives.
        listing = (await client.get("/v1/models", headers=bearer(stack.good))).text
        tags = (await client.get("/api/tags", headers=bearer(stack.good))).text
        for text in (listing, tags):
            assert "127.0.0.1" not in text and "http://" not in text


async def test_workspaces_are_isolated_in_rag_through_every_dialect(stack: Stack) -> None:
    team = await new_key(stack.db, "team-a", "--workspaces", "team-a*")
    admin = await new_key(stack.db, "team-a-admin", "--workspaces", "team-a*", "--admin")
    await wait_for_key(stack.url, admin)
    chats = [
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}, "openai"),
        ("/api/chat", {"model": MODEL, "messages": MESSAGES, "stream": False}, "ollama"),
        ("/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": MESSAGES}, "anthropic"),
    ]
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        # The admin may create and fill its own workspace, not another team's.
        put = await client.put("/v1/workspaces/team-a-docs", json={}, headers=bearer(admin))
        assert put.status_code == 200, put.text
        added = await client.post(
            "/v1/workspaces/team-a-docs/documents", headers=bearer(admin),
            json={"content": "# Holidays\n\nThe office is closed on Fridays.", "source": "handbook.md"},
        )
        assert added.status_code in (200, 201), added.text
        assert (await client.put("/v1/workspaces/team-b", json={}, headers=bearer(admin))).status_code == 403
        # A plain key of the team reads and searches, but changes nothing.
        assert (await client.get("/v1/workspaces/team-a-docs/documents", headers=bearer(team))).status_code == 200
        search = await client.post("/v1/workspaces/team-a-docs/search", json={"query": "Friday"}, headers=bearer(team))
        assert search.status_code == 200
        refused = await client.post("/v1/workspaces/team-a-docs/documents", json={"content": "x"}, headers=bearer(team))
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
        assert (await client.get("/v1/workspaces", headers=bearer(team))).status_code == 403
        # A workspace the key may use in one place vouches for nothing elsewhere in the request.
        vouched = bearer(team) | {"x-workspace": "team-a-docs"}
        assert (await client.get("/v1/workspaces", headers=vouched)).status_code == 403
        assert (await client.get("/v1/workspaces/team-b/documents", headers=vouched)).status_code == 403
        assert (await client.get("/v1/workspaces/team-a-docs/documents", headers=vouched)).status_code == 200

        for path, body, dialect in chats:
            mine = await client.post(path, json=body, headers=bearer(team) | {"x-workspace": "team-a-docs"})
            assert mine.status_code == 200, (path, mine.text)
            theirs = await client.post(path, json=body, headers=bearer(team) | {"x-workspace": "team-b-docs"})
            assert theirs.status_code == 403, path
            assert "team-b-docs" in dialect_error(dialect, theirs, "permission_error")
            unnamed = await client.post(path, json=body, headers=bearer(team) | {"x-route": "rag"})
            assert unnamed.status_code == 403, path


async def test_oversized_headers_and_bodies_and_deep_json_are_clear_4xx(stack: Stack) -> None:
    deep = '{"model": "m", "messages": ' + "[" * 5000 + "]" * 5000 + "}"
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(stack.good), timeout=10) as client:
        big_header = await client.get("/v1/models", headers={"x-padding": "a" * 9000})
        assert big_header.status_code == 431
        assert big_header.json()["error"]["code"] == "headers_too_large"
        ollama_431 = await client.post("/api/chat", headers={"x-padding": "a" * 9000}, json={})
        assert ollama_431.status_code == 431 and "headers" in ollama_431.json()["error"]

        for path, dialect in (
            ("/v1/chat/completions", "openai"), ("/api/chat", "ollama"), ("/api/generate", "ollama"),
            ("/v1/messages", "anthropic"), ("/v1/messages/count_tokens", "anthropic"), ("/v1/embeddings", "openai"),
            ("/api/embed", "ollama"), ("/api/show", "ollama"), ("/v1/workspaces/docs/search", "openai"),
        ):
            answer = await client.post(path, content=deep, headers={"content-type": "application/json"})
            assert answer.status_code == 400, (path, answer.text)
            assert "nested more than" in dialect_error(dialect, answer, "invalid_request_error"), path

            huge = await client.post(path, content=b'{"model": "' + b"x" * 70_000 + b'"}')
            assert huge.status_code == 413, path


async def test_a_lone_surrogate_is_a_clear_400_on_every_json_route(stack: Stack) -> None:
    """Half a UTF-16 pair, legal JSON but not text: refused up front, in the path's dialect
    (it used to fail deep inside as a 500, and break the local embedding model)."""
    bad = '"say \\ud800 hi"'
    bodies = {
        "/v1/chat/completions": '{"model": "m", "messages": [{"role": "user", "content": %s}]}',
        "/api/chat": '{"model": "m", "messages": [{"role": "user", "content": %s}]}',
        "/v1/messages": '{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": %s}]}',
        "/v1/embeddings": '{"model": "all-minilm-l6-v2", "input": %s}',
        "/api/embed": '{"model": "all-minilm-l6-v2", "input": %s}',
        "/v1/workspaces/docs/documents": '{"source": "a.md", "content": %s}',
    }
    dialects = {"/api": "ollama", "/v1/messages": "anthropic"}
    async with httpx.AsyncClient(base_url=stack.url, headers=bearer(stack.good), timeout=30) as client:
        for path, template in bodies.items():
            answer = await client.post(path, content=template % bad, headers={"content-type": "application/json"})
            assert answer.status_code == 400, (path, answer.text)
            dialect = next((d for prefix, d in dialects.items() if path.startswith(prefix)), "openai")
            assert "surrogate" in dialect_error(dialect, answer, "invalid_request_error"), path
        paired = await client.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "emoji \U0001f600"})
        assert paired.status_code == 200 and len(paired.json()["data"][0]["embedding"]) == 384


async def test_public_paths_are_configurable_and_health_is_always_open(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server:
        await new_key(pg_database_url, "exists")
        async with gateway(pg_database_url, nats_url, backend("b", server.url, default=True)) as url:
            async with httpx.AsyncClient(base_url=url) as client:
                for path in ("/health", "/ready", "/openapi.json"):
                    assert (await client.get(path)).status_code in (200, 503), path
                assert (await client.get("/v1/models")).status_code == 401
        async with gateway(
            pg_database_url, nats_url, backend("b", server.url, default=True), auth_public_paths=()
        ) as url:
            async with httpx.AsyncClient(base_url=url) as client:
                assert (await client.get("/health")).status_code == 200
                for path in ("/ready", "/openapi.json"):
                    assert (await client.get(path)).status_code == 401, path


async def test_no_error_tells_a_client_where_a_backend_lives() -> None:
    port = refusing_port()  # a port with nobody listening
    down = backend("lab-gpu", f"http://127.0.0.1:{port}", default=True, timeouts=Timeouts(connect=1.0, total=5.0))
    async with running_gateway(down) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        for path, body in (
            ("/v1/chat/completions", {"model": "m", "messages": MESSAGES}),
            ("/api/chat", {"model": "m", "messages": MESSAGES}),
            ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": MESSAGES}),
            ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True}),
        ):
            answer = await client.post(path, json=body)
            assert answer.status_code == 503, answer.text
            assert "lab-gpu" in answer.text  # the backend's name helps; its address does not
            assert str(port) not in answer.text and "127.0.0.1" not in answer.text
        ready = await client.get("/ready")  # public by default
        assert ready.status_code == 503 and "lab-gpu" in ready.text
        assert str(port) not in ready.text and "127.0.0.1" not in ready.text


async def test_ready_tells_only_a_caller_with_a_key_where_replicas_live(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    port = refusing_port()  # a replica with nobody listening
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(5, 1)))
    async with fake.serve() as server:
        down = f"http://scraper:pa55word@127.0.0.1:{port}/v1"
        config = backend("lab-gpu", server.url, default=True, replicas=(down,), timeouts=Timeouts(connect=1.0, total=5.0))
        async with gateway(pg_database_url, nats_url, config) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            key = await new_key(pg_database_url, "ops")
            await wait_for_key(url, key)
            for _ in range(2):  # one of them meets the replica that is down
                answer = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}, headers=bearer(key))
                assert answer.status_code == 200

            anonymous = await client.get("/ready")  # public by default
            assert anonymous.status_code == 200
            states = anonymous.json()["replicas"]["lab-gpu"]
            assert states["1"] == "ok"
            assert states["2"].startswith("set aside for ") and "replica 2" in states["2"], states
            for secret in (str(port), "127.0.0.1", server.url, "pa55word"):
                assert secret not in anonymous.text, secret

            for presented in (bearer("sk-llmp-" + "x" * 43), {"x-api-key": "nonsense"}):
                assert "127.0.0.1" not in (await client.get("/ready", headers=presented)).text

            # A caller with a key (who may read /metrics) is told which replica is which;
            # credentials written into a replica's URL are shown to nobody.
            for who in (bearer(key), {"x-api-key": key}):
                keyed = (await client.get("/ready", headers=who)).json()["replicas"]["lab-gpu"]
                assert set(keyed) == {f"{server.url}/v1", f"http://127.0.0.1:{port}/v1"}, keyed
            metrics = (await client.get("/metrics", headers=bearer(key))).text
            assert f'replica="http://127.0.0.1:{port}/v1"' in metrics
            assert "pa55word" not in metrics and "pa55word" not in (await client.get("/ready", headers=bearer(key))).text


async def test_callers_without_a_key_cannot_make_ready_flood_the_backends() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=100)) as client:

            def listings() -> int:
                return sum(1 for request in fake.recorder.requests if request.path == "/v1/models")

            answers: list[httpx.Response] = []

            async def ask() -> None:
                answers.append(await client.get("/ready"))

            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(ask)
            for _ in range(20):
                await ask()
            took = trio.current_time() - started
            assert len(answers) == 70 and all(a.status_code == 200 for a in answers)
            # One probe in flight at a time, its answer reused for a second: not one a caller.
            assert listings() <= took + 2, (listings(), took)

            # Still a readiness check: a backend that went away is reported within seconds.
            fake.api_key = "rotated"  # it refuses the gateway from now on
            async def unready() -> bool:
                return (await client.get("/ready")).status_code == 503

            await eventually(unready, within=10, every=0.2)


async def test_no_error_repeats_the_api_key_the_gateway_sends_its_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    # A backend may quote the key it was sent ("Incorrect API key provided: sk-..."), before
    # its answer or in the stream; the gateway passes its words on, never its key.
    secret = "sk-backend-0123456789abcdef"
    monkeypatch.setenv("SECURITY_TEST_BACKEND_KEY", secret)
    quoted = f"Incorrect API key provided: {secret}."
    scripts = {
        "refused": Script(status=401, error_message=quoted),
        "broken": Script(status=500, error_message=f"upstream said {secret}"),
        "midway": Script(tokens=["a", "b", "c"], fail_after=2, error_message=quoted),
    }
    kinds = [("vllm", "openai"), ("claude", "anthropic"), ("ollama", "ollama")]
    fakes = [
        fake(scripts={f"{name}-{model}": script for model, script in scripts.items()})
        for fake, (name, _) in zip((OpenAIBackend, AnthropicBackend, OllamaBackend), kinds, strict=True)
    ]
    async with fakes[0].serve() as s0, fakes[1].serve() as s1, fakes[2].serve() as s2:
        configs = [
            backend(name, server.url, kind=kind, prefixes=(f"{name}-",), api_key_env="SECURITY_TEST_BACKEND_KEY")
            for (name, kind), server in zip(kinds, (s0, s1, s2), strict=True)
        ]
        async with running_gateway(*configs) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            for name, _ in kinds:
                for script in scripts:
                    model = f"{name}-{script}"
                    for path, body in (
                        ("/v1/chat/completions", {"model": model, "messages": MESSAGES}),
                        ("/v1/chat/completions", {"model": model, "messages": MESSAGES, "stream": True}),
                        ("/v1/messages", {"model": model, "max_tokens": 5, "messages": MESSAGES, "stream": True}),
                        ("/api/chat", {"model": model, "messages": MESSAGES}),
                    ):
                        answer = await client.post(path, json=body)
                        where = (path, model, body.get("stream"))
                        assert "Incorrect API key provided" in answer.text or "upstream said" in answer.text, where
                        assert secret not in answer.text, where
                        assert "[redacted]" in answer.text, where


async def test_idempotency_keys_belong_to_the_api_key_that_used_them(stack: Stack) -> None:
    other = await new_key(stack.db, "other-tenant")
    await wait_for_key(stack.url, other)
    body = {"model": MODEL, "messages": MESSAGES}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        first = await client.post("/v1/chat/completions", json=body, headers=bearer(stack.good) | {"idempotency-key": "k1"})
        assert first.status_code == 200
        again = await client.post("/v1/chat/completions", json=body, headers=bearer(stack.good) | {"idempotency-key": "k1"})
        assert again.json()["id"] == first.json()["id"]  # the same key replays its own answer
        theirs = await client.post("/v1/chat/completions", json=body, headers=bearer(other) | {"idempotency-key": "k1"})
        assert theirs.status_code == 200 and theirs.json()["id"] != first.json()["id"]
        changed = await client.post(
            "/v1/chat/completions", json=body | {"temperature": 0.5}, headers=bearer(other) | {"idempotency-key": "k1"}
        )
        assert changed.status_code == 409  # the other tenant's own earlier use, not the first one's


async def test_a_key_cannot_read_another_keys_stream_or_response_running_or_ended(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(tokens=["one", " two", " three"], pace=0.3, usage=Usage(5, 3)))
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        owner, other = await new_key(pg_database_url, "owner"), await new_key(pg_database_url, "other")
        await wait_for_key(url, owner)
        await wait_for_key(url, other)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def refused_to_other(trace: str) -> None:
                for path in (f"/v1/streams/{trace}", f"/v1/responses/resp_{trace}", f"/v1/responses/resp_{trace}?stream=true"):
                    theirs = await client.get(path, headers=bearer(other))
                    assert theirs.status_code == 404, (path, theirs.text)
                    assert "one" not in theirs.text and "three" not in theirs.text, path
                    assert (await client.get(path)).status_code == 401, path

            chat = {"model": MODEL, "messages": MESSAGES, "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=chat, headers=bearer(owner)) as live:
                trace = live.headers["x-trace-id"]
                checked = False
                async for _ in live.aiter_bytes():
                    if not checked:
                        checked = True
                        await refused_to_other(trace)  # while it runs, on this instance

            async def stored() -> bool:
                answer = await client.get(f"/v1/responses/resp_{trace}", headers=bearer(owner))
                return answer.status_code == 200 and answer.json()["status"] == "completed"

            await eventually(stored, within=15, every=0.2)
            await refused_to_other(trace)  # ended, read from the journal
            mine = await client.get(f"/v1/streams/{trace}", headers=bearer(owner))
            assert mine.status_code == 200 and "three" in mine.text
