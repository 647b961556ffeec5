"""Bounded storage over weeks: JetStream's chat events are bounded by size as well as age, and
what reads old events says so plainly once they are gone (rather than half an answer)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from proxy.domain.events import TextDelta
from proxy.infra.embedded import EmbeddedNats, nats_server_binary
from proxy.infra.nats import Bus, _hop, open_bus
from proxy.services.journal import EVENTS_STREAM, EVENTS_SUBJECTS, ensure_streams, events_subject
from tests.fakes import OpenAIBackend, Script
from tests.harness import backend
from tests.test_auth_helpers import eventually, gateway
from tests.test_cli import free_port
from tests.test_persistence import rows, sse_payloads, stream_frames, wait_for_row

pytest_plugins = ["tests.infra_servers"]

LIMIT = 64 * 1024


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[str]:
    """A NATS of its own: the session's must keep its events stream as every test expects it."""
    with EmbeddedNats(tmp_path / "nats") as server:
        yield server.url


async def _held(bus: Bus, trace_id: str) -> int:
    """How many events of `trace_id` the stream holds."""
    info = await _hop(bus._js.stream_info, EVENTS_STREAM, subjects_filter=events_subject(trace_id))
    return int((info.state.subjects or {}).get(events_subject(trace_id), 0))


def _text(frames: list[tuple[int, object]]) -> str:
    return "".join(event.text for _, event in frames if isinstance(event, TextDelta))


async def _chat(client: httpx.AsyncClient, url: str, tokens: int, **extra: Any) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": uuid.uuid4().hex}], "stream": True, **extra}
    response = await client.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 200
    return response


async def test_an_existing_events_stream_is_bounded_by_size_and_keeps_its_events(
    aio_loop: object, pg_database_url: str, own_nats: str
) -> None:
    async with open_bus(own_nats) as bus:  # as an earlier version left it: bounded by age only
        await bus.ensure_stream(EVENTS_STREAM, EVENTS_SUBJECTS, max_age=86400)
        await bus.publish(events_subject("earlier"), b"kept")
    fake = OpenAIBackend(default=Script(n_tokens=20))
    async with fake.serve() as server, gateway(
        pg_database_url, own_nats, backend("vllm", server.url, default=True), events_max_bytes=LIMIT
    ) as url, httpx.AsyncClient(timeout=10) as client, open_bus(own_nats) as bus:
        first = await _chat(client, url, 20)
        info = await _hop(bus._js.stream_info, EVENTS_STREAM)
        assert (info.config.max_bytes, info.config.max_age) == (LIMIT, 86400)
        assert await bus.last_message(EVENTS_STREAM, events_subject("earlier")) == b"kept"  # updated, not replaced

        async def first_held() -> bool:  # its events are published a moment after its answer
            return await _held(bus, first.headers["x-trace-id"]) > 20

        await eventually(first_held, within=10)

        # A few hundred KiB of events later the stream still holds at most its limit: the
        # oldest went, the newest run's events are all there.
        for _ in range(60):
            last = await _chat(client, url, 20)
        info = await _hop(bus._js.stream_info, EVENTS_STREAM)
        assert 0 < info.state.bytes <= LIMIT
        assert await bus.last_message(EVENTS_STREAM, events_subject("earlier")) is None
        assert await _held(bus, first.headers["x-trace-id"]) == 0
        trace_id = last.headers["x-trace-id"]
        await wait_for_row(pg_database_url, trace_id, "completed")
        resumed = await client.get(f"{url}/v1/streams/{trace_id}")
        assert len(_text(stream_frames(resumed.text)).split()) == 20


async def test_a_finished_trace_whose_first_events_were_discarded_is_read_whole_or_refused(
    aio_loop: object, pg_database_url: str, own_nats: str
) -> None:
    fake = OpenAIBackend(default=Script(n_tokens=1), scripts={"long": Script(n_tokens=40)})
    async with fake.serve() as server, gateway(
        pg_database_url, own_nats, backend("vllm", server.url, default=True), events_max_bytes=LIMIT
    ) as first, gateway(
        pg_database_url, own_nats, backend("vllm", server.url, default=True), events_max_bytes=LIMIT
    ) as second, httpx.AsyncClient(timeout=10) as client, open_bus(own_nats) as bus:
        long = await _chat(client, first, 40, model="long")
        trace_id = long.headers["x-trace-id"]
        await wait_for_row(pg_database_url, trace_id, "completed")
        whole = await _held(bus, trace_id)
        # Traffic after it, until the stream has discarded its beginning but not all of it.
        for _ in range(400):
            if 0 < await _held(bus, trace_id) < whole - 5:
                break
            await _chat(client, first, 1)
        else:
            raise AssertionError("its events were never partly discarded")

        # Read on the other instance (which has only NATS and the row): the whole answer, from its row.
        read = await client.get(f"{second}/v1/streams/{trace_id}")
        assert read.status_code == 200
        assert len(_text(stream_frames(read.text)).split()) == 40
        # Resuming from the middle cannot be served from the row: a 409 saying why, in OpenAI's shape.
        resumed = await client.get(f"{second}/v1/streams/{trace_id}", params={"after": 3})
        assert resumed.status_code == 409
        assert resumed.json()["error"]["code"] == "resume_unavailable"


async def test_a_running_trace_whose_first_events_were_discarded_is_refused_or_answered_whole(
    aio_loop: object, pg_database_url: str, own_nats: str
) -> None:
    fake = OpenAIBackend(default=Script(n_tokens=40, pace=0.1))
    key = str(uuid.uuid4())
    body = {"model": "m", "messages": [{"role": "user", "content": "count"}], "stream": True}
    async with fake.serve() as server, gateway(
        pg_database_url, own_nats, backend("vllm", server.url, default=True)
    ) as first, gateway(
        pg_database_url, own_nats, backend("vllm", server.url, default=True)
    ) as second, httpx.AsyncClient(timeout=20) as client, open_bus(own_nats) as bus:
        async with trio.open_nursery() as nursery:
            trace: list[str] = []

            async def run() -> None:
                response = await client.post(f"{first}/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
                trace.append(response.headers["x-trace-id"])

            nursery.start_soon(run)
            await fake.wait_requests(1, 10)
            trace_id = await eventually(lambda: _key_holder(pg_database_url, key))

            async def said_some() -> bool:
                return await _held(bus, trace_id) >= 8

            await eventually(said_some, within=10)
            # The stream's limit discards its oldest events (as a busy gateway's would).
            await _hop(bus._js.purge_stream, EVENTS_STREAM, subject=events_subject(trace_id), keep=2)

            # Read while it runs: nothing holds its beginning any more. A 409, not a stream
            # starting mid-answer.
            read = await client.get(f"{second}/v1/streams/{trace_id}")
            assert read.status_code == 409
            assert read.json()["error"]["code"] == "resume_unavailable"
            # A retry of its request on the other instance waits for it and gets the whole answer.
            again = await client.post(f"{second}/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
            assert again.headers["x-attached-to"] == trace_id
            payloads = [json.loads(p) for p in sse_payloads(again.text) if p != "[DONE]"]
            text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p["choices"])
            assert len(text.split()) == 40
        assert trace == [trace_id]
        assert len(fake.requests) == 1


async def _key_holder(db: str, key: str) -> str | None:
    found = await trio.to_thread.run_sync(rows, db, "SELECT trace_id FROM idempotency_keys WHERE key = %s", key)
    return str(found[0][0]) if found else None


@pytest.fixture
def small_nats(tmp_path: Path) -> Iterator[str]:
    """A NATS whose JetStream may store 200 MB (a small disk: 75% of its free space)."""
    port = free_port()
    config = tmp_path / "nats.conf"
    config.write_text(f'port: {port}\njetstream {{ store_dir: "{tmp_path / "js"}", max_file_store: 200MB }}\n')
    server = subprocess.Popen([str(nats_server_binary()), "-c", str(config)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


async def test_a_size_limit_the_server_has_no_room_for_is_lowered_to_one_it_has(
    aio_loop: object, small_nats: str
) -> None:
    # The default 4 GiB on a small disk: the events stream is still made (a smaller one),
    # where the gateway could otherwise follow no chat at all.
    async with open_bus(small_nats) as bus:
        await ensure_streams(bus, events_retention=86400, events_max_bytes=4 * 1024**3)
        info = await _hop(bus._js.stream_info, EVENTS_STREAM)
        assert 64 * 1024**2 <= info.config.max_bytes <= 200 * 1000**2
        await bus.publish(events_subject("t"), b"x")
