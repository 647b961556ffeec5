"""The pooled transport's hang-up: a client's departure closes its backend connection at
once, without waiting for any cancelled task, and never touches a pooled connection."""

from __future__ import annotations

import json

import httpx
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
