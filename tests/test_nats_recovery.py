"""The bus recovers from a NATS server that stalls for a few seconds (a GC pause, a VM hiccup):
readiness probes during the stall must not break the connection, and a connection that broke
anyway is repaired without restarting the gateway. Real nats-server, paused with SIGSTOP."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import nats.errors
import pytest
import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from proxy.infra.embedded import EmbeddedNats
from proxy.infra.nats import Bus, BusUnavailable, open_bus
from proxy.infra.resources import Resources
from tests import pausing
from tests.fakes import OpenAIBackend, Script
from tests.harness import backend
from tests.test_auth_helpers import gateway

pytest_plugins = ["tests.infra_servers"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A server of our own: pausing the session's shared one would stall other tests."""
    with EmbeddedNats(tmp_path / "nats") as started:
        yield started


def paused(server: EmbeddedNats) -> AbstractContextManager[None]:
    assert server.pid is not None
    return pausing.paused(server.pid)


async def _ready_within(resources: Resources, seconds: float) -> None:
    with trio.fail_after(seconds):
        while True:
            if (await resources.readiness()).get("nats") == "ok":
                return
            await trio.sleep(0.2)


async def _round_trip(bus: Bus) -> None:
    """A JetStream publish and a core message to a live subscriber both get through."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    await bus.ensure_stream(prefix, [f"{prefix}.>"], storage="memory")
    assert await bus.publish(f"{prefix}.a", b"stored") >= 1
    async with bus.subscribe(f"{prefix}.core") as messages:
        await bus.publish_core(f"{prefix}.core", b"hello")
        with trio.fail_after(5):
            assert (await messages.receive()).data == b"hello"


async def test_probing_a_paused_server_does_not_break_the_bus(
    aio_loop: trio_asyncio.TrioEventLoop, server: EmbeddedNats
) -> None:
    assert server.url is not None
    async with open_bus(server.url) as bus:
        await bus.ping()
        with paused(server):
            for _ in range(2):  # each probe gives up after 2 s
                with pytest.raises(BusUnavailable):
                    await bus.ping()
        with trio.fail_after(5):
            while True:
                try:
                    await bus.ping()
                    break
                except BusUnavailable:
                    await trio.sleep(0.2)
        await _round_trip(bus)


async def test_gateway_readiness_recovers_after_a_nats_pause(
    aio_loop: trio_asyncio.TrioEventLoop, server: EmbeddedNats
) -> None:
    resources = Resources(None, server.url)
    async with trio.open_nursery() as nursery:
        await nursery.start(resources.run)
        assert await resources.readiness() == {"nats": "ok"}
        with paused(server):
            assert await resources.readiness() == {"nats": "unreachable"}
            await trio.sleep(2)
        await _ready_within(resources, 5)
        assert resources.bus is not None
        await _round_trip(resources.bus)
        resources.stop()


async def test_a_connection_whose_reader_died_is_repaired(
    aio_loop: trio_asyncio.TrioEventLoop, server: EmbeddedNats
) -> None:
    """nats-py 2.16 kills its reader when a PONG arrives for a flush that timed out; whatever
    stops the reader, the keeper notices and reconnects, and existing subscriptions keep
    working on the same Bus."""
    resources = Resources(None, server.url)
    async with trio.open_nursery() as nursery:
        await nursery.start(resources.run)
        bus = resources.bus
        assert bus is not None
        prefix = f"t{uuid.uuid4().hex[:10]}"
        async with bus.subscribe(f"{prefix}.live") as live:
            client = bus._nc
            # A flush that times out while the server is paused. The keeper pings too: a PONG
            # of its own PING, sent just before the pause, can answer this flush instead
            # (nats-py pairs them in order), so the flush is tried again until one times out.
            for _attempt in range(5):
                await aio_as_trio(client.flush)(timeout=5)
                with paused(server):
                    try:
                        await aio_as_trio(client.flush)(timeout=1)
                    except nats.errors.TimeoutError:
                        break
            else:
                pytest.fail("no flush timed out while the server was paused")
            await trio.sleep(0.5)  # the late PONG arrives and the reader dies on it
            await _ready_within(resources, 10)
            assert resources.bus is bus
            # nats-py re-sends its subscriptions right after reconnecting: an early message
            # can miss them, so publish until one arrives.
            with trio.fail_after(5):
                while True:
                    await bus.publish_core(f"{prefix}.live", b"still subscribed")
                    with trio.move_on_after(0.5):
                        assert (await live.receive()).data == b"still subscribed"
                        break
        await _round_trip(bus)
        resources.stop()


async def test_a_client_reconnects_after_the_embedded_server_restarts(
    aio_loop: trio_asyncio.TrioEventLoop, tmp_path: Path
) -> None:
    """A worker keeps the NATS_URL it was given: a restarted gateway's embedded server must
    come back on the same URL for the worker's connection to find it again."""
    server = EmbeddedNats(tmp_path / "nats")
    url = await trio.to_thread.run_sync(server.start)
    try:
        async with open_bus(url) as bus:
            await bus.ping()
            await trio.to_thread.run_sync(server.stop)
            assert await trio.to_thread.run_sync(server.start) == url
            with trio.fail_after(10):
                while True:
                    try:
                        await bus.ping()
                        break
                    except BusUnavailable:
                        await trio.sleep(0.2)
            await _round_trip(bus)
    finally:
        await trio.to_thread.run_sync(server.stop)


async def test_the_log_never_shows_credentials_written_into_the_nats_url(
    aio_loop: trio_asyncio.TrioEventLoop, server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    assert server.url is not None
    address = server.url.removeprefix("nats://")
    async with open_bus(f"nats://gateway:pa55word@{address}") as bus:
        await bus.ping()
        await trio.to_thread.run_sync(server.stop)
        with trio.fail_after(10):
            while "disconnected" not in caplog.text:  # noqa: ASYNC110 (the log has no event)
                await trio.sleep(0.2)
    assert f"disconnected from nats://{address}" in caplog.text
    assert "pa55word" not in caplog.text


async def test_a_stream_attached_on_another_instance_goes_on_through_a_nats_restart(
    aio_loop: trio_asyncio.TrioEventLoop, pg_database_url: str, server: EmbeddedNats
) -> None:
    """A request attached (its Idempotency-Key) on another instance reads the run's events
    through a consumer that a crashed and restarted server no longer has: it went silent
    until nats-py noticed (some 15 s here; more than 2 minutes once by hand). The gateway now
    makes its consumers again at the reconnect, after what they had delivered."""
    assert server.url is not None
    fake = OpenAIBackend(default=Script(tokens=[f" w{i}" for i in range(40)], pace=0.1))
    body = {"model": "m", "messages": [{"role": "user", "content": "Count"}], "stream": True}
    headers = {"Idempotency-Key": f"restart-{uuid.uuid4()}"}
    answers: dict[str, httpx.Response] = {}
    ended: dict[str, float] = {}
    async with fake.serve() as backend_server, gateway(
        pg_database_url, server.url, backend("vllm", backend_server.url, default=True)
    ) as first, gateway(
        pg_database_url, server.url, backend("vllm", backend_server.url, default=True)
    ) as second, httpx.AsyncClient(timeout=60) as client:

        async def ask(name: str, url: str) -> None:
            answers[name] = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            ended[name] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "owner", first)
            await fake.wait_requests(1, 10)
            nursery.start_soon(ask, "follower", second)
            await trio.sleep(1.0)  # the follower reads the run's events by now
            assert server.pid is not None
            os.kill(server.pid, signal.SIGKILL)  # a crash: its store kept, its consumers gone
            assert await trio.to_thread.run_sync(server.revive)
    owner, follower = answers["owner"], answers["follower"]
    # As the run's own client, not a quarter of a minute later (or never: nats-py's own
    # repair of a lost consumer, after missed heartbeats, did not always come).
    assert ended["follower"] - ended["owner"] < 3.0
    assert follower.headers["x-attached-to"] == owner.headers["x-trace-id"]
    assert owner.text.count(" w") == 40 and follower.text == owner.text
    assert len(fake.requests) == 1
