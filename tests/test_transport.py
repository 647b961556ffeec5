"""The pooled transport's hang-up: a client's departure closes its backend connection at
once, without waiting for any cancelled task, and never touches a pooled connection."""

from __future__ import annotations

import httpx
import trio

from proxy.infra.transport import Hangup, PooledTransport, current_hangup
from tests.fakes import OpenAIBackend, Script

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
