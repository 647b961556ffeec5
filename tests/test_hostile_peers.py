"""Backends and clients at the edges of HTTP: what reaches the client is a correct relay
or a clear error in its dialect, never a misleading one."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import ssl
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import trio
import trustme

import proxy.serve
from proxy.http import _front
from proxy.infra.backends import _errors as backend_errors
from tests.fakes import OpenAIBackend, Script
from tests.harness import backend, running_gateway
from tests.test_transport import raw_server, read_request


def _chunk(text: str | None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    data = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _compressor(coding: str) -> Any:
    return zlib.compressobj(wbits=16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS)


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_a_stream_compressed_by_a_proxy_in_front_of_the_backend_reaches_the_client_decoded(coding: str) -> None:
    """nginx with `gzip on` for text/event-stream compresses an SSE answer though the gateway
    asked for identity: each frame flushed in its own chunk, the first split mid-frame. The
    client got a 502 'closed the stream before it finished' (chats) or gzip bytes (relays)."""
    frames = [_chunk("Hel"), _chunk("lo"), _chunk(None, "stop"), b"data: [DONE]\n\n"]
    text_frames = [
        b'data: {"id":"t1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"Hi","finish_reason":"stop"}]}\n\n',
        b"data: [DONE]\n\n",
    ]

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            request = await read_request(stream, buffer)
            parts = text_frames if request.startswith(b"POST /v1/completions") else frames
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: %s\r\n"
                b"transfer-encoding: chunked\r\n\r\n" % coding.encode()
            )
            compress = _compressor(coding)
            for frame in parts:
                data = compress.compress(frame) + compress.flush(zlib.Z_SYNC_FLUSH)
                await stream.send_all(_chunked(data[:7]))
                await trio.sleep(0.01)
                await stream.send_all(_chunked(data[7:]))
            await stream.send_all(_chunked(compress.flush()) + b"0\r\n\r\n")

    async with raw_server(handler) as (url, _), running_gateway(backend("oa", url, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        chat = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in chat if c.choices]) == "Hello"
        texts = await client.completions.create(model="m", prompt="hi", stream=True)
        assert [c.choices[0].text async for c in texts] == ["Hi"]
        await client.close()


async def test_a_compressed_error_body_is_read_for_its_message() -> None:
    refusal = zlib.compress(b'{"error": {"message": "This model\'s maximum context length is 4096 tokens", "code": 400}}')

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            await read_request(stream, buffer)
            await stream.send_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-encoding: deflate\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(refusal), refusal)
            )

    async with raw_server(handler) as (url, _), running_gateway(backend("oa", url, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        for stream in (True, False):
            with pytest.raises(openai.BadRequestError) as raised:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=stream)
            assert "maximum context length is 4096" in raised.value.message
            assert raised.value.code == "context_length_exceeded"
        await client.close()


async def test_a_corrupt_compressed_stream_is_a_clear_error() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            await read_request(stream, buffer)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\n"
                b"transfer-encoding: chunked\r\n\r\n" + _chunked(b"data: not gzip at all\n\n") + b"0\r\n\r\n"
            )

    async with raw_server(handler) as (url, _), running_gateway(backend("oa", url, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as raised:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert raised.value.status_code == 502 and "Backend `oa`" in raised.value.message
        await client.close()


# -- clients that compress their request bodies ----------------------------------------------

CHATS = {
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi there"}]},
    "/v1/messages": {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi there"}]},
    "/api/chat": {"model": "m", "messages": [{"role": "user", "content": "hi there"}], "stream": False},
}


async def test_a_gzip_request_body_is_inflated_in_every_dialect() -> None:
    """`Content-Encoding: gzip` bodies (some SDKs compress large prompts) were a 400 'not valid
    JSON: can't decode byte 0x8b'."""
    fake = OpenAIBackend(default=Script(echo=True))
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as gateway, \
            httpx.AsyncClient(base_url=gateway) as client:
        for path, body in CHATS.items():
            for coding, packed in (("gzip", gzip.compress(json.dumps(body).encode())),
                                   ("deflate", zlib.compress(json.dumps(body).encode()))):
                answer = await client.post(
                    path, content=packed, headers={"content-type": "application/json", "content-encoding": coding}
                )
                assert answer.status_code == 200, (path, coding, answer.text)
                assert "hi there" in answer.text
        # The backend got the prompt as JSON, not the client's compressed bytes.
        assert fake.requests[-1].json["messages"][-1]["content"] == "hi there"
        assert "content-encoding" not in fake.requests[-1].headers
        embedded = await client.post(
            "/v1/embeddings", content=gzip.compress(json.dumps({"model": "m", "input": "hi"}).encode()),
            headers={"content-type": "application/json", "content-encoding": "gzip"},
        )
        assert embedded.status_code == 200, embedded.text
        # A client that labels every request, bodiless ones too.
        listed = await client.get("/v1/models", headers={"content-encoding": "gzip"})
        assert listed.status_code == 200, listed.text
        empty = await client.post("/v1/chat/completions", content=b"", headers={"content-encoding": "gzip"})
        assert empty.status_code == 400 and empty.json()["error"]["code"] == "invalid_json"


async def test_a_compressed_body_is_held_to_the_size_limit_once_inflated() -> None:
    fake = OpenAIBackend(default=Script())
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 300_000}]}
    bomb = gzip.compress(json.dumps(body).encode())  # a few hundred bytes on the wire
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True), max_body_bytes=100_000) as gateway, \
            httpx.AsyncClient(base_url=gateway) as client:
        for path, error in (("/v1/chat/completions", lambda a: a.json()["error"]["message"]),
                            ("/api/chat", lambda a: a.json()["error"]),
                            ("/v1/embeddings", lambda a: a.json()["error"]["message"])):
            answer = await client.post(path, content=bomb, headers={"content-type": "application/json", "content-encoding": "gzip"})
            assert answer.status_code == 413, answer.text
            assert "the limit is 100000 bytes" in error(answer)
        assert fake.requests == []


async def test_an_unknown_or_corrupt_content_encoding_is_refused_in_the_callers_dialect() -> None:
    fake = OpenAIBackend(default=Script())
    plain = json.dumps(CHATS["/v1/messages"]).encode()
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as gateway, \
            httpx.AsyncClient(base_url=gateway) as client:
        unknown = await client.post("/v1/messages", content=plain, headers={"content-encoding": "br"})
        assert unknown.status_code == 415
        assert unknown.json()["error"]["type"] == "invalid_request_error" and "`br`" in unknown.json()["error"]["message"]
        corrupt = await client.post("/v1/chat/completions", content=plain, headers={"content-encoding": "gzip"})
        assert corrupt.status_code == 400 and corrupt.json()["error"]["code"] == "invalid_content_encoding"
        cut = await client.post("/api/chat", content=gzip.compress(plain)[:-12], headers={"content-encoding": "gzip"})
        assert cut.status_code == 400 and "gzip" in cut.json()["error"]
        assert fake.requests == []


# -- web pages where an API answer was expected ----------------------------------------------

NGINX_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n"
    b"<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>\r\n"
)
LOGIN_PAGE = b"<!DOCTYPE html><html><head><meta charset=utf-8><title>Sign in &middot; Acme SSO</title></head><body>...</body></html>"


def _page_server(status: bytes, page: bytes) -> Any:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            await read_request(stream, buffer)
            await stream.send_all(
                b"HTTP/1.1 %s\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n%s" % (status, len(page), page)
            )
    return raw_server(handler)


async def test_a_reverse_proxys_error_page_is_named_by_its_title_not_relayed_as_markup() -> None:
    """nginx's 502 page in front of a restarting vLLM reached clients as 500 characters of HTML."""
    async with _page_server(b"502 Bad Gateway", NGINX_502) as (url, _), \
            running_gateway(backend("oa", url, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        for stream in (True, False):
            with pytest.raises(openai.APIStatusError) as raised:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=stream)
            assert raised.value.status_code == 502
            assert raised.value.message.endswith('Backend `oa` returned 502: an HTML page titled "502 Bad Gateway"')
        with pytest.raises(openai.APIStatusError) as raised:
            await client.completions.create(model="m", prompt="hi")
        assert raised.value.message.endswith('an HTML page titled "502 Bad Gateway"')
        await client.close()


async def test_a_web_page_under_a_200_is_a_clear_error_not_an_early_end() -> None:
    """A login portal or a web UI answering 200 with a page: a stream ended as 'The backend
    closed the stream before it finished', a relayed one gave the client the page as SSE."""
    async with _page_server(b"200 OK", LOGIN_PAGE) as (url, _), \
            running_gateway(backend("oa", url, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as raised:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert raised.value.status_code == 502
        assert raised.value.message.endswith('Backend `oa` answered with an HTML page titled "Sign in · Acme SSO", not a stream.')
        with pytest.raises(openai.APIStatusError) as raised:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert raised.value.message.endswith('answered with an HTML page titled "Sign in · Acme SSO", not JSON.')
        with pytest.raises(openai.APIStatusError) as raised:
            await client.completions.create(model="m", prompt="hi", stream=True)
        assert raised.value.status_code == 502 and "not a stream" in raised.value.message
        await client.close()
        async with httpx.AsyncClient(base_url=gateway) as raw:
            answer = await raw.post("/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 502 and "Acme SSO" in answer.json()["error"]


# -- a stream event without an end ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["openai", "ollama"])
async def test_a_backend_streaming_without_a_line_end_is_cut_off_not_buffered(kind: str) -> None:
    """A broken backend that, after its first event, streams bytes with no line end: the
    gateway held all of it (and re-copied it at every read, quadratic time on the one event
    loop) until the idle or total timeout. Past 64 MiB the client now gets an error."""
    first = _chunk("Hel") if kind == "openai" else (
        b'{"model":"m","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant","content":"Hel"},"done":false}\n'
    )
    endless = b"x" * 65536

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        await read_request(stream, buffer)
        content_type = b"text/event-stream" if kind == "openai" else b"application/x-ndjson"
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n" % content_type
            + _chunked(first + (b"data: " if kind == "openai" else b""))
        )
        for _ in range(2000):  # 125 MiB at most
            await stream.send_all(_chunked(endless))

    async with raw_server(handler) as (url, _), running_gateway(backend("b", url, kind=kind, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        received: list[str] = []
        with trio.fail_after(60), pytest.raises(openai.APIError) as raised:
            chunks = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
            async for chunk in chunks:
                received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        assert "".join(received) == "Hel"
        assert "larger than 64 MiB" in raised.value.message
        await client.close()


async def test_a_whole_answer_without_end_is_cut_off_not_buffered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that answers a whole-answer request with a body that does not end (a server
    streaming though asked not to, a broken proxy) was read into memory until the total timeout."""
    monkeypatch.setattr(backend_errors, "MAX_ANSWER_BYTES", 4 << 20)

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        await read_request(stream, buffer)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(2000):
            await stream.send_all(_chunked(b" " * 65536))

    async with raw_server(handler) as (url, _), running_gateway(backend("oa", url, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        for call in (
            lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]),
            lambda: client.completions.create(model="m", prompt="hi"),
        ):
            with trio.fail_after(30), pytest.raises(openai.APIStatusError) as raised:
                await call()
            assert raised.value.status_code == 502
            assert raised.value.message.endswith("Backend `oa` sent an answer larger than 4 MiB.")
        await client.close()


# -- request targets as clients write them ------------------------------------------------------


async def test_a_path_with_doubled_slashes_or_in_absolute_form_reaches_its_route() -> None:
    """`$BASE/v1/...` with a BASE ending in `/` sends `//v1/chat/completions`: it was a 404
    saying 'Unknown endpoint: POST /v1/chat/completions', the very endpoint asked for. Behind
    nginx (merge_slashes) it works; an absolute-form target (`POST http://host/v1/...`, which
    HTTP/1.1 servers must accept) was a 404 the same way."""
    fake = OpenAIBackend(default=Script())
    chat = json.dumps(CHATS["/api/chat"]).encode()
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as gateway, \
            httpx.AsyncClient() as client:
        for path in ("//v1/chat/completions", "/v1//chat/completions", "//api/chat", "//v1/models"):
            answer = await (client.get(gateway + path) if path.endswith("models")
                            else client.post(gateway + path, content=chat))
            assert answer.status_code == 200, (path, answer.text)
        host, port = gateway.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(
            b"POST http://%s/api/chat HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (gateway[7:].encode(), gateway[7:].encode(), len(chat), chat)
        )
        answer = b""
        with trio.fail_after(10):
            while data := await stream.receive_some(65536):
                answer += data
        await stream.aclose()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        missing = await client.post(gateway + "//v1/nothing", content=chat)
        assert missing.status_code == 404 and missing.json()["error"]["message"] == "Unknown endpoint: POST /v1/nothing"


async def test_a_path_with_a_trailing_slash_is_answered_as_without_it() -> None:
    """`GET /v1/models/` (a base URL and path joined by hand, a browser's address bar) was a
    404; vLLM's FastAPI redirects it. It is answered in place, for every method: a POST's body
    is not lost, and a client that follows no redirect (curl without -L) gets its answer."""
    fake = OpenAIBackend(default=Script())
    chat = json.dumps(CHATS["/api/chat"]).encode()
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as gateway, \
            httpx.AsyncClient(base_url=gateway) as client:
        plain = await client.get("/v1/models")
        slashed = await client.get("/v1/models/")
        assert slashed.status_code == 200 and slashed.json() == plain.json()
        assert (await client.head("/v1/models//")).status_code == 200
        assert (await client.get("/api/tags/")).status_code == 200
        assert (await client.get("/health/")).status_code == 200
        completed = await client.post("/v1/chat/completions/", content=chat, headers={"content-type": "application/json"})
        assert completed.status_code == 200 and completed.json()["choices"][0]["message"]["content"]
        missing = await client.get("/v1/nothing/")
        assert missing.status_code == 404 and missing.json()["error"]["message"] == "Unknown endpoint: GET /v1/nothing"
        assert (await client.get("/")).status_code == 200  # Ollama's liveness text, at the root itself


# -- clients that stop reading ----------------------------------------------------------------


async def _open_stream(gateway: str, body: dict[str, Any]) -> trio.SocketStream:
    host, port = gateway.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    data = json.dumps(body).encode()
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(data), data)
    )
    return stream


async def test_a_client_that_stops_reading_is_cut_off_and_its_backend_call_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that asks for a stream and never reads it: hypercorn shields its writes from
    cancellation, so the connection, its task and (until `total`) its backend call were held
    as long as the client stayed connected: a slow-read attack's whole recipe."""
    monkeypatch.setattr(proxy.serve, "CLIENT_STALL_SECONDS", 1.0)
    fake = OpenAIBackend(default=Script(n_tokens=200_000, frames_per_write=100))
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as gateway:
        stream = await _open_stream(gateway, {**CHATS["/v1/chat/completions"], "stream": True})
        await fake.wait_disconnect(20.0)  # the backend call ends with the connection, long before `total`
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):  # reset: unread bytes are dropped
            while await stream.receive_some(65536):
                pass
        await stream.aclose()


async def test_a_client_reading_slowly_but_steadily_gets_its_whole_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy.serve, "CLIENT_STALL_SECONDS", 1.0)
    fake = OpenAIBackend(default=Script(n_tokens=2_500, frames_per_write=100))
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as gateway:
        stream = await _open_stream(gateway, {**CHATS["/v1/chat/completions"], "stream": True})
        received = bytearray()
        with trio.fail_after(60):
            while not received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
                await trio.sleep(0.1)  # the stream takes several times the stall limit
                received += await stream.receive_some(65536)
        await stream.aclose()
        assert received.count(b'"content":"w') == 2_500


async def test_a_large_body_over_a_slow_link_is_read_while_it_keeps_coming(monkeypatch: pytest.MonkeyPatch) -> None:
    """The body's time limit was a fixed total (120 s): a few MB of images sent from a phone at
    1 Mbit/s were a 400 'did not arrive within 120 s' however steadily they came. A trickle is
    still cut off at the limit."""
    monkeypatch.setattr(_front, "BODY_TIMEOUT", 0.5)
    monkeypatch.setattr(_front, "BODY_MIN_RATE", 64 * 1024)
    fake = OpenAIBackend(default=Script())
    body = json.dumps({**CHATS["/v1/chat/completions"], "user": "x" * 300_000}).encode()

    async def steadily(piece: int, pause: float) -> AsyncIterator[bytes]:
        for start in range(0, len(body), piece):
            await trio.sleep(pause)
            yield body[start : start + piece]

    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as gateway, \
            httpx.AsyncClient(base_url=gateway, timeout=30) as client:
        # ~200 KB/s, over 1.5 s: three times the base limit.
        answer = await client.post("/v1/chat/completions", content=steadily(20_000, 0.1),
                                   headers={"content-length": str(len(body))})
        assert answer.status_code == 200, answer.text
        # A few bytes at a time is no upload: refused once the base limit is over.
        trickled = await client.post("/v1/chat/completions", content=steadily(50, 0.1),
                                     headers={"content-length": str(len(body))})
        assert trickled.status_code == 408 and trickled.json()["error"]["code"] == "body_timeout"


async def test_a_body_that_does_not_arrive_in_time_is_a_408_in_the_callers_dialect(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was a 400, which says the request was wrong; HTTP's (and nginx's) answer is 408
    Request Timeout. The SDKs retry a 408, which is safe: without its body nothing ran."""
    monkeypatch.setattr(_front, "BODY_TIMEOUT", 0.3)
    fake = OpenAIBackend(default=Script())
    paths = {**CHATS, "/v1/embeddings": {"model": "m", "input": "hi there"}}

    async def trickle(body: bytes) -> AsyncIterator[bytes]:
        for start in range(len(body)):
            await trio.sleep(0.05)
            yield body[start : start + 1]

    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as gateway, \
            httpx.AsyncClient(base_url=gateway, timeout=30) as client:
        for path, data in paths.items():
            body = json.dumps(data).encode()
            answer = await client.post(path, content=trickle(body), headers={
                "content-length": str(len(body)), "content-type": "application/json"})
            assert answer.status_code == 408, (path, answer.text)
            # Its body half-read, the connection cannot carry another request: the client is told
            # (before, not by the routes Quart serves: `/v1/embeddings`).
            assert answer.headers.get("connection") == "close", path
            error = answer.json()["error"]
            if path == "/api/chat":
                assert "did not arrive within 0.3 s" in error
            elif path == "/v1/messages":
                assert answer.json()["type"] == "error" and error["type"] == "invalid_request_error"
            else:
                assert error["code"] == "body_timeout" and error["type"] == "invalid_request_error"
        assert fake.recorder.requests_total == 0


async def test_the_stalled_reader_watch_survives_connections_closed_while_their_requests_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Clients that leave mid-stream: hypercorn closes the socket at once but keeps the
    connection until its request winds down. The watch for stalled readers asked the closed
    socket's send queue (fd -1), a ValueError that stopped the whole gateway within
    `CLIENT_STALL_SECONDS / 4` of such a client (30 s into a real load with drops)."""
    monkeypatch.setattr(proxy.serve, "CLIENT_STALL_SECONDS", 0.02)
    fake = OpenAIBackend(default=Script(n_tokens=400, pace=0.01))
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as gateway:
        for _ in range(40):
            stream = await _open_stream(gateway, {**CHATS["/v1/chat/completions"], "stream": True})
            await stream.receive_some(65536)
            await stream.aclose()
        async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
            answer = await client.post("/v1/chat/completions", json=CHATS["/v1/chat/completions"])
        assert answer.status_code == 200, answer.text


async def test_a_keep_alive_connection_its_client_closed_is_closed_at_once() -> None:
    """A client that closes its idle keep-alive connection: hypercorn read the end-of-file
    but kept the socket (CLOSE-WAIT, one fd) and its task until the keep-alive timeout, 75 s
    later. A busy gateway whose clients open a connection per request held one fd per
    request of the last 75 s: at a few hundred req/s, the process's fd limit."""
    fake = OpenAIBackend(default=Script())
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as gateway:
        for path, body in (("/v1/chat/completions", CHATS["/v1/chat/completions"]),
                           ("/v1/embeddings", {"model": "gpt-x", "input": "hello"})):
            for _ in range(5):
                async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
                    answer = await client.post(path, json=body)
                    assert answer.status_code == 200, answer.text
                    await trio.sleep(0.1)  # the connection is idle, waiting for the next request
        with trio.fail_after(5):
            while any(proxy.serve._connections.values()):  # noqa: ASYNC110 (no event for a socket's close)
                await trio.sleep(0.05)


# -- a base URL whose scheme the backend does not speak ---------------------------------------


def _tls_server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def test_a_base_url_whose_scheme_the_backend_does_not_speak_is_named_as_the_likely_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`http://host:443` for a server speaking TLS, `https://` for a plain one: the client was
    told only "connection failed" or "unreachable", and the log said no more."""
    context = _tls_server_context()

    async def speaks_tls(stream: trio.SocketStream, n: int) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # OpenSSL closes on a plain HTTP request
            await trio.SSLStream(stream, context, server_side=True).do_handshake()

    async def alerts(stream: trio.SocketStream, n: int) -> None:
        await stream.receive_some()
        await stream.send_all(b"\x15\x03\x01\x00\x02\x02\x46")  # a TLS alert: protocol_version

    async def plain(stream: trio.SocketStream, n: int) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")

    async with raw_server(speaks_tls) as (tls_url, _), raw_server(alerts) as (alert_url, _), \
            raw_server(plain) as (plain_url, _), running_gateway(
                backend("tls", tls_url, prefixes=("tls/",)), backend("alert", alert_url, prefixes=("alert/",)),
                backend("plain", plain_url.replace("http://", "https://"), prefixes=("plain/",)),
            ) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        said: dict[str, str] = {}
        for model, status in (("tls/m", 502), ("alert/m", 502), ("plain/m", 503)):
            with pytest.raises(openai.APIStatusError) as raised:
                await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
            assert raised.value.status_code == status, raised.value.message
            said[model] = raised.value.message
            assert "127.0.0.1" not in said[model]  # the client is not told where the backend is
        await client.close()
    assert "as a server speaking TLS does to plain HTTP; if it speaks TLS, its base URL must say https://" in said["tls/m"]
    assert "it answered in TLS, but its base URL says http://" in said["alert/m"]
    assert "it does not speak TLS, but its base URL says https://" in said["plain/m"]
    logged = caplog.text
    assert "it answered in TLS" in logged and "does not speak TLS" in logged and "127.0.0.1" in logged
