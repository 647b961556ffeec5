"""The pooled transport's hang-up: a client's departure closes its backend connection at
once, without waiting for any cancelled task, and never touches a pooled connection."""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import openai
import pytest
import trio

from proxy.infra.transport import Hangup, PooledTransport, current_hangup
from tests.fakes import OpenAIBackend, Script
from tests.harness import backend, running_gateway

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def test_hangup_closes_the_held_connection_without_cancelling_anyone() -> None:
    fake = OpenAIBackend()
    fake.set_script(Script(n_tokens=1000, pace=0.01))
    hangup = Hangup()
    read_error: list[BaseException] = []
    async with fake.serve() as server, httpx.AsyncClient(transport=PooledTransport(), base_url=server.url) as client:
        reading = trio.Event()

        async def read() -> None:
            current_hangup.set(hangup)
            async with client.stream("POST", "/v1/chat/completions", json=BODY) as response:
                try:
                    async for _ in response.aiter_raw():
                        reading.set()
                except httpx.ReadError as error:
                    read_error.append(error)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await reading.wait()
            hangup.fire()  # no cancellation: the reader only learns it from its socket
            gone = await fake.wait_disconnect(1.0)
    assert 0 < gone.frames_sent < 1000
    assert len(read_error) == 1


async def test_hangup_leaves_pooled_connections_alone() -> None:
    fake = OpenAIBackend()
    fake.set_script(Script(tokens=["a", "b"]))
    hangup = Hangup()
    async with fake.serve() as server, httpx.AsyncClient(transport=PooledTransport(), base_url=server.url) as client:
        current_hangup.set(hangup)
        first = await client.post("/v1/chat/completions", json=BODY)
        hangup.fire()  # the first response was read to its end: its connection is the pool's
        second = await client.post("/v1/chat/completions", json=BODY)
        assert first.status_code == second.status_code == 200
        assert server.connections_total == 1


async def test_a_connection_hung_up_after_its_response_arrived_is_never_pooled() -> None:
    fake = OpenAIBackend()
    fake.set_script(Script(tokens=["a", "b"]))
    hangup = Hangup()
    async with fake.serve() as server, httpx.AsyncClient(transport=PooledTransport(), base_url=server.url) as client:
        current_hangup.set(hangup)
        async with client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": False}) as response:
            await trio.sleep(0.05)  # the whole (small) body is in our socket buffer by now
            hangup.fire()  # the client left: closed, though the body can still be parsed
            await response.aread()
        current_hangup.set(None)
        # The closed connection must not come back from the pool (it did, as fd -1).
        for _ in range(3):
            again = await client.post("/v1/chat/completions", json=BODY)
            assert again.status_code == 200
        assert server.connections_total == 2


async def test_clients_hanging_up_at_once_never_hurt_the_next_requests() -> None:
    """Clients that send a request and close their socket at once, each followed by an
    ordinary request: every ordinary request succeeds, and the gateway stays up."""
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("oa", server.url, default=True)) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for stream in (False, True) * 15:
                body = json.dumps({**BODY, "stream": stream}).encode()
                sock = await trio.open_tcp_stream(host, int(port))
                await sock.send_all(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await sock.aclose()
                await trio.sleep(0.005)
                answer = await client.post("/v1/chat/completions", json={**BODY, "stream": False})
                assert answer.status_code == 200, answer.text


# -- backends that behave like real servers at the edges of keep-alive ---------------------------

OK_BODY = b'{"ok": true}'
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(OK_BODY), OK_BODY)
Handler = Callable[[trio.SocketStream, int], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback HTTP server written by hand: `handler(stream, n)` serves connection n.
    Yields its base URL and the list of connection numbers it has served."""
    served: list[int] = []

    async def connection(stream: trio.SocketStream) -> None:
        served.append(len(served))
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await handler(stream, served[-1])

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, connection, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}", served
        nursery.cancel_scope.cancel()


async def read_request(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    """One whole request (head and Content-Length body) from `stream`, consumed from `buffer`."""
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive_some(65536)
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), b"0"))
    while len(buffer) < len(head) + 4 + length:
        buffer += await stream.receive_some(65536)
    request = bytes(buffer[: len(head) + 4 + length])
    del buffer[: len(request)]
    return request


def reset(stream: trio.SocketStream) -> None:
    """Close with a RST, as a server does that closes a socket with unread bytes in it."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def test_a_pooled_connection_reset_before_any_answer_is_retried_on_a_new_one() -> None:
    """uvicorn (vLLM) closing an idle connection just as a request arrives on it: the request
    was never read, so it goes again on a fresh connection instead of failing."""

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        await read_request(stream, buffer)
        await stream.send_all(OK)
        if n == 0:
            await trio.lowlevel.wait_readable(stream.socket)  # the next request, left unread
            reset(stream)
            return
        while True:
            await read_request(stream, buffer)
            await stream.send_all(OK)

    async with raw_server(handler) as (url, served), httpx.AsyncClient(transport=PooledTransport(), base_url=url) as client:
        first = await client.post("/v1/chat/completions", content=b"{}")
        second = await client.post("/v1/chat/completions", content=b"{}")
        assert (first.status_code, second.status_code) == (200, 200)
        assert second.json() == {"ok": True} and len(served) == 2


async def test_bytes_after_a_response_never_reach_the_next_request() -> None:
    """A stray CRLF (or a Content-Length counted in characters) after a body: that connection is
    not reused, so the next request is not answered with the leftovers."""

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            await read_request(stream, buffer)
            await stream.send_all(OK + b"\r\n")

    async with raw_server(handler) as (url, served), httpx.AsyncClient(transport=PooledTransport(), base_url=url) as client:
        for _ in range(3):
            answer = await client.post("/v1/chat/completions", content=b"{}")
            assert answer.status_code == 200 and answer.json() == {"ok": True}
        assert len(served) == 3


async def test_an_answer_sent_before_the_body_was_read_is_the_answer() -> None:
    """A backend that refuses a large body after its head (413, then close) is heard: the
    client gets its 413 and message, not a write error."""
    refusal = b'{"error": {"message": "Request body too large (max 1 MiB)"}}'

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive_some(65536)
        await stream.send_all(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(refusal), refusal)
        )
        stream.socket.shutdown(socket.SHUT_WR)
        await trio.sleep(0.2)
        await stream.aclose()

    async with raw_server(handler) as (url, _), running_gateway(backend("oa", url, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        big = "word " * 2_000_000
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as raised:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": big}], stream=stream)
            assert raised.value.status_code == 413 and "max 1 MiB" in raised.value.message
        await client.close()


async def test_a_redirect_from_the_backend_is_a_502_whose_target_only_the_log_names(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            await read_request(stream, buffer)
            await stream.send_all(
                b"HTTP/1.1 307 Temporary Redirect\r\nlocation: http://elsewhere:8000/v1/chat/completions\r\n"
                b"content-length: 0\r\n\r\n"
            )

    async with raw_server(handler) as (url, _), running_gateway(backend("oa", url, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as raised:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=stream)
            assert raised.value.status_code == 502
            assert "307" in raised.value.message and "redirect" in raised.value.message
            assert "elsewhere" not in raised.value.message  # an address: the client is not told it
        await client.close()
    assert "http://elsewhere:8000/v1/chat/completions" in caplog.text
