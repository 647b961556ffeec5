"""proxy.infra.nats against a real embedded nats-server with JetStream."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator

import pytest
import trio
import trio_asyncio

from proxy.infra.nats import Bus, BusMessage, BusUnavailable, JobMessage, KeyConflict, open_bus

pytest_plugins = ["tests.infra_servers"]


@pytest.fixture
async def bus(aio_loop: trio_asyncio.TrioEventLoop, nats_url: str) -> AsyncIterator[Bus]:
    async with open_bus(nats_url) as connected:
        yield connected


@pytest.fixture
def prefix() -> str:
    """A subject prefix / stream name of our own: the server is shared by the session."""
    return f"t{uuid.uuid4().hex[:10]}"


async def _receive(channel: trio.MemoryReceiveChannel[BusMessage], n: int) -> list[BusMessage]:
    with trio.fail_after(5):
        return [await channel.receive() for _ in range(n)]


async def test_publish_then_replay_from_a_sequence_then_live(bus: Bus, prefix: str) -> None:
    await bus.ensure_stream(prefix, [f"{prefix}.>"], max_age=60)
    seqs = []
    for i in range(5):
        seqs.append(await bus.publish(f"{prefix}.a", f"a{i}".encode(), headers={"n": str(i)}))
        await bus.publish(f"{prefix}.b", b"other subject")
    assert seqs == sorted(seqs)

    async with bus.subscribe(f"{prefix}.a", deliver_from_seq=seqs[2]) as messages:
        replayed = await _receive(messages, 3)
        assert [m.data for m in replayed] == [b"a2", b"a3", b"a4"]
        assert [m.seq for m in replayed] == seqs[2:]
        assert replayed[0].headers["n"] == "2"
        assert replayed[0].subject == f"{prefix}.a"
        live_seq = await bus.publish(f"{prefix}.a", b"live")
        (live,) = await _receive(messages, 1)
        assert (live.data, live.seq) == (b"live", live_seq)

    async with bus.subscribe(f"{prefix}.a", from_start=True) as messages:
        everything = await _receive(messages, 6)
        assert [m.data for m in everything] == [b"a0", b"a1", b"a2", b"a3", b"a4", b"live"]


async def test_msg_id_deduplicates(bus: Bus, prefix: str) -> None:
    await bus.ensure_stream(prefix, [f"{prefix}.>"])
    first = await bus.publish(f"{prefix}.x", b"once", msg_id="req-1")
    again = await bus.publish(f"{prefix}.x", b"once", msg_id="req-1")
    other = await bus.publish(f"{prefix}.x", b"twice", msg_id="req-2")
    assert again == first
    assert other == first + 1


async def test_ensure_stream_is_idempotent_and_updates(bus: Bus, prefix: str) -> None:
    await bus.ensure_stream(prefix, [f"{prefix}.>"], max_age=60)
    await bus.ensure_stream(prefix, [f"{prefix}.>"], max_age=60)
    await bus.ensure_stream(prefix, [f"{prefix}.>", f"{prefix}x.>"], max_age=120)
    assert await bus.publish(f"{prefix}x.y", b"new subject is in the stream") == 1


async def test_core_subscription_delivers_to_trio_and_ends_on_exit(bus: Bus, prefix: str) -> None:
    async with bus.subscribe(f"{prefix}.core.*") as messages:
        for i in range(3):
            await bus.publish_core(f"{prefix}.core.{i}", f"m{i}".encode(), headers={"k": "v"})
        got = await _receive(messages, 3)
    assert [(m.subject, m.data, m.seq) for m in got] == [
        (f"{prefix}.core.{i}", f"m{i}".encode(), None) for i in range(3)
    ]
    assert got[0].headers == {"k": "v"}
    with trio.fail_after(1), pytest.raises(trio.EndOfChannel):
        await messages.receive()


async def test_slow_reader_gets_every_message_in_order(bus: Bus, prefix: str) -> None:
    count = 40
    async with bus.subscribe(f"{prefix}.slow", buffer=1) as messages:
        for i in range(count):
            await bus.publish_core(f"{prefix}.slow", str(i).encode())
        received = []
        with trio.fail_after(5):
            for _ in range(count):
                received.append(int((await messages.receive()).data))
                await trio.sleep(0.001)
    assert received == list(range(count))


async def test_cancelled_subscriber_unsubscribes(bus: Bus, prefix: str) -> None:
    await bus.ensure_stream(prefix, [f"{prefix}.>"])
    live_subscriptions = bus._nc._subs  # nats-py's sid -> subscription map
    before = len(live_subscriptions)
    with trio.move_on_after(0.2):
        async with bus.subscribe(f"{prefix}.core") as core, bus.subscribe(
            f"{prefix}.js", from_start=True
        ) as js:
            assert len(live_subscriptions) == before + 2
            await core.receive()
            await js.receive()
    assert len(live_subscriptions) == before
    async with bus.subscribe(f"{prefix}.core") as core:  # the bus is still fine
        await bus.publish_core(f"{prefix}.core", b"after")
        (msg,) = await _receive(core, 1)
        assert msg.data == b"after"


async def test_pull_consumer_ack_and_redelivery(bus: Bus, prefix: str) -> None:
    await bus.ensure_stream(prefix, [f"{prefix}.jobs.>"], retention="workqueue")
    for i in range(3):
        await bus.publish(f"{prefix}.jobs.embed", f"job{i}".encode())
    ack_wait = 1.0

    async with bus.pull(prefix, "workers", f"{prefix}.jobs.embed", ack_wait=ack_wait) as jobs:
        delivered_at = trio.current_time()  # the ack deadlines start after this
        first = await jobs.fetch(3, timeout=2)
        assert [j.data for j in first] == [b"job0", b"job1", b"job2"]
        assert all(j.num_delivered == 1 for j in first)
        await first[0].ack()
        await first[1].nak()  # redeliver now
        # job2 is neither acked nor nak'ed: redelivered once its ack deadline passes

        # Each redelivery is acked as it arrives: an unacked one would itself be redelivered
        # once its own ack deadline passed, and could race job2 on a slow machine.
        arrived: dict[bytes, float] = {}
        redelivered: list[JobMessage] = []
        with trio.fail_after(10):
            while len(redelivered) < 2:
                for job in await jobs.fetch(2, timeout=2):
                    arrived[job.data] = trio.current_time()
                    redelivered.append(job)
                    await job.ack()
        assert sorted(j.data for j in redelivered) == [b"job1", b"job2"]
        assert all(j.num_delivered == 2 for j in redelivered)
        assert arrived[b"job2"] - delivered_at >= ack_wait - 0.05
        assert await jobs.fetch(1, timeout=0.3) == []


async def test_cancelled_fetch_does_not_slow_down_shutdown(
    aio_loop: trio_asyncio.TrioEventLoop, nats_url: str, prefix: str
) -> None:
    async with open_bus(nats_url) as own:
        await own.ensure_stream(prefix, [f"{prefix}.q"], retention="workqueue")
        async with own.pull(prefix, "w", f"{prefix}.q") as jobs:
            with trio.move_on_after(0.1):
                await jobs.fetch(1, timeout=30)
        start = trio.current_time()
    assert trio.current_time() - start < 1.0


async def test_kv_revisions_and_counters(bus: Bus, prefix: str) -> None:
    kv = await bus.kv(prefix)
    assert await kv.get("missing") is None
    rev = await kv.create("k", b"1")
    with pytest.raises(KeyConflict):
        await kv.create("k", b"again")
    new_rev = await kv.update("k", b"2", revision=rev)
    with pytest.raises(KeyConflict):
        await kv.update("k", b"3", revision=rev)
    entry = await kv.get("k")
    assert entry is not None
    assert (entry.value, entry.revision) == (b"2", new_rev)

    async def bump() -> None:
        for _ in range(10):
            await kv.increment("counter")

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(bump)
    counter = await kv.get("counter")
    assert counter is not None
    assert counter.value == b"30"


async def test_ping(bus: Bus) -> None:
    await bus.ping()


async def test_unreachable_server_is_bus_unavailable(aio_loop: trio_asyncio.TrioEventLoop) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        with trio.fail_after(5), pytest.raises(BusUnavailable):
            async with open_bus(f"nats://127.0.0.1:{port}"):
                pass


async def test_a_cluster_given_as_comma_separated_servers_is_reached_past_a_dead_one(
    aio_loop: trio_asyncio.TrioEventLoop, nats_url: str, prefix: str
) -> None:
    """`NATS_URL=nats://a:4222,nats://b:4222`, as NATS's own tools take it: one dead server
    must not keep the gateway off the others (it was read as one malformed URL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"nats://127.0.0.1:{probe.getsockname()[1]}"
    async with open_bus(f"{dead}, {nats_url}") as bus:
        await bus.ensure_stream(prefix, [f"{prefix}.>"], max_age=60)
        assert await bus.publish(f"{prefix}.a", b"reached") == 1
