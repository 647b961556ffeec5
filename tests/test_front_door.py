"""The exchange front door (chat routes and stream resume, served without Quart): the HTTP
details Quart used to take care of — method checks, body limits and timeouts, clients that
leave while still sending — in each route's dialect."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from proxy.http import _front
from tests.fakes import OpenAIBackend
from tests.harness import backend, running_gateway

CHAT_PATHS = {"/v1/chat/completions": "openai", "/api/chat": "ollama", "/api/generate": "ollama", "/v1/messages": "anthropic"}


def _error_message(dialect: str, answer: httpx.Response) -> str:
    body = answer.json()
    if dialect == "ollama":
        return str(body["error"])
    if dialect == "anthropic":
        assert body["type"] == "error"
        return str(body["error"]["message"])
    return str(body["error"]["message"])


async def test_a_wrong_method_is_a_405_naming_the_allowed_one() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for path, dialect in CHAT_PATHS.items():
                # `GET /v1/chat/completions` lists stored chat completions.
                method, allowed = ("PUT", "GET, HEAD, POST") if path == "/v1/chat/completions" else ("GET", "POST")
                answer = await client.request(method, path)
                assert answer.status_code == 405, path
                assert answer.headers["allow"] == allowed
                assert method in _error_message(dialect, answer)
            resume = await client.post("/v1/streams/abc")
            assert resume.status_code == 405 and resume.headers["allow"] == "GET, HEAD"
    assert fake.requests == []


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_a_chunked_body_past_the_limit_is_a_413_in_the_dialect() -> None:
    fake = OpenAIBackend()
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}'
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True), max_body_bytes=2000) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for path, dialect in CHAT_PATHS.items():
                # No Content-Length: the limit is found while reading.
                answer = await client.post(path, content=_chunks(body, 1000))
                assert answer.status_code == 413, path
                assert "too large" in _error_message(dialect, answer)
    assert fake.requests == []


async def test_a_body_that_never_completes_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_front, "BODY_TIMEOUT", 0.3)
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        host, port = url.removeprefix("http://").split(":")
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: 500\r\n\r\n{\"model\": "
                )
                answer = b""
                while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                    data = await stream.receive_some()
                    if not data:
                        break
                    answer += data
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"did not arrive within" in answer
    assert fake.requests == []


async def test_a_client_leaving_mid_body_costs_no_backend_call_and_no_harm() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        host, port = url.removeprefix("http://").split(":")
        for _ in range(20):
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n{\"model\": \"m\""
            )
            await stream.aclose()
        async with httpx.AsyncClient(base_url=url) as client:
            answer = await client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200
    assert len(fake.requests) == 1


async def test_an_unexpected_handler_error_is_a_500_in_the_dialect_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("secret internals")

    from proxy.dialects import anthropic, ollama, openai

    monkeypatch.setattr(openai, "parse_chat_request", broken)
    monkeypatch.setattr(anthropic, "parse_messages_request", broken)
    monkeypatch.setattr(ollama, "parse_chat_request", broken)
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            for path, dialect in (("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic"), ("/api/chat", "ollama")):
                answer = await client.post(path, json={"model": "m", "messages": []})
                assert answer.status_code == 500, path
                message = _error_message(dialect, answer)
                assert "Internal gateway error" in message
                assert "secret internals" not in answer.text and "Traceback" not in answer.text
    assert fake.requests == []
