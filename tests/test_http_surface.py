"""The HTTP surface every client sees, whatever the route: request ids on every response,
model lookups (OpenAI's and Anthropic's shapes), and `Allow` on every 405."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anthropic
import httpx
import openai
import pytest
import trio

from proxy.config import Settings
from proxy.dialects.anthropic import _models as anthropic_models
from proxy.domain.errors import GatewayError
from proxy.serve import hypercorn_config, serve
from tests.fakes import AnthropicBackend, OpenAIBackend, Script
from tests.harness import backend, running_gateway

pytest_plugins = ["tests.infra_servers"]

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
    # Stored chat completions are listed from the journal, which this gateway runs without.
    ("GET", "/v1/chat/completions", {}, 503),
    ("PUT", "/v1/chat/completions", {}, 405),
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


@asynccontextmanager
async def two_dialects(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """OpenAI-speaking `qwen-*` models, Anthropic's `claude-*`, an alias, the local embedder."""
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", "sk-ant-test")
    qwen = OpenAIBackend(models=["qwen-a", "qwen-b"])
    claude = AnthropicBackend(api_key="sk-ant-test", require_version=True, models=["claude-x", "claude-y"])
    async with qwen.serve() as s1, claude.serve() as s2, running_gateway(
        backend("vllm", s1.url, prefixes=("qwen",)),
        backend("claude", s2.url, kind="anthropic", prefixes=("claude",), api_key_env="TEST_ANTHROPIC_KEY"),
        aliases={"fast": "claude-x"},
    ) as url:
        yield url


async def test_the_anthropic_sdk_lists_and_retrieves_models(monkeypatch: pytest.MonkeyPatch) -> None:
    async with two_dialects(monkeypatch) as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
        everything = [m async for m in client.models.list()]
        ids = [m.id for m in everything]
        assert sorted(ids) == ["claude-x", "claude-y", "fast", "qwen-a", "qwen-b"]  # no embedding model
        assert all(m.type == "model" and m.display_name for m in everything)
        claude_x = await client.models.retrieve("claude-x")
        assert claude_x.display_name == "Claude X" and claude_x.created_at.year == 2025  # the backend's facts
        qwen_a = await client.models.retrieve("qwen-a")
        assert qwen_a.display_name == "qwen-a" and qwen_a.created_at.tzinfo is not None
        assert (await client.models.retrieve("fast")).id == "fast"

        first = await client.models.list(limit=2)
        assert [m.id for m in first.data] == ids[:2] and first.has_more and first.last_id == ids[1]
        assert [m.id async for m in await client.models.list(limit=2)] == ids  # the SDK follows the cursor
        after = await client.models.list(limit=2, after_id=ids[3])
        assert [m.id for m in after.data] == ids[4:] and after.has_more is False
        before = await client.models.list(limit=2, before_id=ids[3])
        assert [m.id for m in before.data] == ids[1:3] and before.has_more and before.first_id == ids[1]

        for unknown in ("all-minilm-l6-v2", "claude-nope"):
            with pytest.raises(anthropic.NotFoundError) as missing:
                await client.models.retrieve(unknown)
            assert missing.value.request_id
            assert missing.value.body == {
                "type": "error", "error": {"type": "not_found_error", "message": f"model: {unknown}"},
                "request_id": missing.value.request_id,
            }
        with pytest.raises(anthropic.BadRequestError) as bad:
            await client.models.list(limit=0)
        assert isinstance(bad.value.body, dict) and bad.value.body["error"]["type"] == "invalid_request_error"

        # OpenAI's clients, on the same paths, still get OpenAI's shapes and the whole catalogue.
        oa = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert "all-minilm-l6-v2" in {m.id async for m in oa.models.list()}
        assert (await oa.models.retrieve("claude-x")).object == "model"


def test_model_pages_follow_anthropics_cursors() -> None:
    models = [anthropic_models.model_object(name) for name in "abcde"]

    def page(**query: str) -> dict[str, Any]:
        return dict(json.loads(anthropic_models.render_model_page(models, anthropic_models.parse_page_query(query))))

    assert page() == {"data": models, "has_more": False, "first_id": "a", "last_id": "e"}
    assert page(limit="2", after_id="c")["data"] == models[3:5]
    assert page(limit="2", after_id="e") == {"data": [], "has_more": False, "first_id": None, "last_id": None}
    assert page(limit="2", before_id="b") == {"data": models[:1], "has_more": False, "first_id": "a", "last_id": "a"}
    assert page(limit="3", before_id="e")["has_more"] is True
    assert models[0]["created_at"] == "1970-01-01T00:00:00Z"
    for bad in ({"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"after_id": "a", "before_id": "b"}, {"after_id": "zz"}):
        with pytest.raises(GatewayError):
            page(**bad)


async def test_a_number_in_a_query_that_int_cannot_read_is_a_400(pg_database_url: str, nats_url: str) -> None:
    """`str.isdigit` takes "²" (and thousands of digits): where it let them through to `int`,
    a list's `limit` or a stream's position was a 500 instead of the 400 naming it."""
    async with gateway(database_url=pg_database_url, nats_url=nats_url) as url, httpx.AsyncClient(
        base_url=url, timeout=30
    ) as client:
        response = (await client.post("/v1/responses", json={"model": "m", "input": "hi"})).json()["id"]
        conversation = (await client.post("/v1/conversations", json={})).json()["id"]
        await client.put("/v1/workspaces/docs", json={})
        trace = response.removeprefix("resp_")
        for number in ("%C2%B2", "%D9%A3", "9" * 5000):
            for path, param in (
                ("/v1/models?limit={}", "limit"),  # Anthropic's listing
                (f"/v1/responses/{response}/input_items?limit={{}}", "limit"),
                (f"/v1/conversations/{conversation}/items?limit={{}}", "limit"),
                (f"/v1/responses/{response}?stream=true&starting_after={{}}", "starting_after"),
                (f"/v1/streams/{trace}?after={{}}", "after"),
                ("/v1/workspaces/docs/documents?offset={}", "offset"),
            ):
                headers = {"anthropic-version": "2023-06-01"} if path.startswith("/v1/models") else {}
                answer = await client.get(path.format(number), headers=headers)
                assert answer.status_code == 400, (path, number[:8], answer.text)
                error = answer.json()["error"]
                assert error.get("param", param) == param and param in error["message"], (path, answer.text)


async def test_every_405_names_the_allowed_methods() -> None:
    async with gateway() as url, httpx.AsyncClient(base_url=url) as client:
        for method, path, allowed in (
            ("GET", "/v1/embeddings", "POST"),
            ("POST", "/v1/models", "GET, HEAD"),
            ("DELETE", "/v1/models/m", "GET, HEAD"),
            ("POST", "/v1/workspaces/ws1", "DELETE, GET, HEAD, PUT"),
            ("GET", "/api/chat", "POST"),
            ("PUT", "/v1/chat/completions", "GET, HEAD, POST"),
            ("OPTIONS", "/v1/chat/completions", "GET, HEAD, POST"),
            ("PUT", "/v1/chat/completions/chatcmpl-1", "DELETE, GET, HEAD, POST"),
        ):
            answer = await client.request(method, path)
            assert answer.status_code == 405, (method, path)
            assert answer.headers["allow"] == allowed, (method, path)
            assert method in answer.text
        anthropic_client = await client.post("/v1/models", headers={"anthropic-version": "2023-06-01"})
        assert anthropic_client.status_code == 405 and anthropic_client.headers["allow"] == "GET, HEAD"
        assert anthropic_client.json()["type"] == "error"


async def test_a_refused_body_closes_its_connection_so_the_next_request_is_answered() -> None:
    big = {"model": "m", "input": "x" * 5000, "messages": [{"role": "user", "content": "x" * 5000}]}
    async with gateway(max_body_bytes=2000) as url, httpx.AsyncClient(base_url=url, timeout=5) as client:
        for path in ("/v1/embeddings", "/v1/chat/completions", "/v1/messages", "/api/chat"):
            for _ in range(3):
                refused = await client.post(path, json=big)
                assert refused.status_code == 413 and refused.headers["connection"] == "close", path
                # The same client's next request (a connection from its pool) is answered.
                assert (await client.get("/v1/models")).status_code == 200, path
        wrong_method = await client.put("/v1/chat/completions", json=big)
        assert wrong_method.status_code == 405 and wrong_method.headers["connection"] == "close"
        assert (await client.get("/v1/models")).status_code == 200
        # A refusal without a body keeps the connection.
        assert "connection" not in (await client.get("/v1/chat/completions")).headers


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
async def test_a_connection_the_response_says_is_closing_is_closed(request_head: bytes) -> None:
    # An HTTP/1.0 client (or one that asked for `Connection: close`) reads to the end of the
    # connection; on Quart's routes the server kept it open until its idle timeout.
    async with gateway() as url:
        host, port = url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(request_head)
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                received += chunk
        await stream.aclose()
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 ") and b"connection: close" in head


async def test_stopping_the_gateway_tells_clients_still_waiting_instead_of_cutting_them_off() -> None:
    # Once its graceful timeout is over, the server cancels what still runs: a stream used to
    # stop mid-answer with no error and no [DONE], and was logged as the client's hang-up.
    slow = OpenAIBackend(default=Script(tokens=[f" w{i}" for i in range(400)], pace=0.05))
    mute = OpenAIBackend(default=Script(tokens=["late"], header_delay=30))
    stop = trio.Event()
    answers: dict[str, Any] = {}
    async with slow.serve() as s, mute.serve() as m, trio.open_nursery() as nursery:
        settings = replace(
            Settings(), backends=(backend("slow", s.url, prefixes=("slow",)), backend("mute", m.url, prefixes=("mute",))),
            host="127.0.0.1", port=0, access_log=False, shutdown_grace_seconds=1.0,  # both outlast it
        )
        [url] = await nursery.start(lambda task_status: serve(settings, shutdown_trigger=stop.wait, task_status=task_status))
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def waiting() -> None:
                answers["waiting"] = await client.post("/v1/chat/completions", json={"model": "mute", "messages": MESSAGES})

            nursery.start_soon(waiting)
            body = {"model": "slow", "messages": MESSAGES, "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                frames = []
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        frames.append(line[6:])
                    if len(frames) == 3:
                        stop.set()
                answers["stream"] = frames
    waiting_answer = answers["waiting"]
    assert waiting_answer.status_code == 503
    assert waiting_answer.json()["error"]["code"] == "gateway_shutting_down"
    frames = answers["stream"]
    assert len(frames) > 3 and frames[-1] != "[DONE]"
    assert json.loads(frames[-1])["error"]["code"] == "gateway_shutting_down"


async def test_a_client_reading_slowly_does_not_keep_the_gateway_past_its_graceful_timeout() -> None:
    """The server's writes wait for their client, and hypercorn shields them from the graceful
    timeout's cancel: a client reading a long answer a byte a second kept the process alive
    for as long as it read. Its connection is now closed once the grace (and last words) is over."""
    big = OpenAIBackend(default=Script(tokens=["x" * 16384] * 1000))  # 16 MB, as fast as it goes
    stop, finished = trio.Event(), trio.Event()
    async with big.serve() as b, trio.open_nursery() as nursery:
        settings = replace(
            Settings(), backends=(backend("big", b.url, default=True),), host="127.0.0.1", port=0, access_log=False,
            shutdown_grace_seconds=1.0,
        )
        config = hypercorn_config(settings)

        async def gateway(task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(settings, shutdown_trigger=stop.wait, task_status=task_status)
            finished.set()

        [url] = await nursery.start(gateway)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        client = trio.SocketStream(sock)
        body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
        await client.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )

        async def trickle(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                while True:  # a byte a second
                    if not await client.receive_some(1):
                        return
                    await trio.sleep(1)

        try:
            reading = await nursery.start(trickle)
            await big.wait_requests(1)
            await trio.sleep(1.0)  # the answer fills every buffer between the gateway and its reader
            stop.set()
            stopped_at = trio.current_time()
            with trio.fail_after(config.graceful_timeout + 6):
                await finished.wait()
            took = trio.current_time() - stopped_at
            reading.cancel()
            with trio.fail_after(5):  # what the connection still held, then its end
                try:
                    while await client.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass
        finally:
            await client.aclose()  # (without the fix, what lets the gateway stop at all)
    assert took < config.graceful_timeout + 3, took
