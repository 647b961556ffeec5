"""A browser page reading a trace's events with `new EventSource("/v1/streams/<trace_id>")`, or
a stored Response with `new EventSource("/v1/responses/<id>?stream=true")`: the requests below are the ones EventSource makes (a GET with `Accept: text/event-stream`,
then, once the server closes the stream, the same URL again with `Last-Event-ID`, every few
seconds, until it gets a status other than 200)."""

from __future__ import annotations

import json

import httpx
import trio

from proxy.dialects.events import Finished, decode_event
from tests.fakes import OpenAIBackend, Script
from tests.harness import backend, running_gateway

pytest_plugins = ["tests.infra_servers"]

PAGE = "http://localhost:5173"
EVENT_SOURCE = {"origin": PAGE, "accept": "text/event-stream", "cache-control": "no-cache"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Tell me a story"}], "stream": True}


def frames(text: str) -> list[tuple[int, object]]:
    found = []
    for block in text.split("\n\n"):
        if block:
            found.append(decode_event(block.split("data: ", 1)[1].encode()))
    return found


async def test_an_event_source_reads_a_trace_once_and_stops_reconnecting(
    aio_loop: object, pg_database_url: str, nats_url: str,
) -> None:
    fake = OpenAIBackend(default=Script(tokens=["Once", " upon", " a", " time"]))
    async with fake.serve() as server, running_gateway(
        backend("b", server.url, default=True), database_url=pg_database_url, nats_url=nats_url,
    ) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        chat = await client.post("/v1/chat/completions", json=CHAT, headers={"origin": PAGE})
        trace_id = chat.headers["x-trace-id"]
        with trio.fail_after(10):
            opened = await client.get(f"/v1/streams/{trace_id}", headers=EVENT_SOURCE)
        assert opened.status_code == 200 and opened.headers["access-control-allow-origin"] == PAGE
        read = frames(opened.text)
        end, finished = read[-1]
        assert isinstance(finished, Finished)
        # The stream ended: the EventSource comes back with the last id it saw. It must be told
        # to stop (204), in a response the page may read (else it is a network error, retried).
        with trio.fail_after(10):
            again = await client.get(f"/v1/streams/{trace_id}", headers={**EVENT_SOURCE, "last-event-id": str(end)})
        assert again.status_code == 204 and again.content == b""
        assert again.headers["access-control-allow-origin"] == PAGE
        # A page that opened it part-way (`?after=`) and lost its connection later resumes from
        # where it got to, not from the URL's `after` again.
        with trio.fail_after(10):
            resumed = await client.get(
                f"/v1/streams/{trace_id}", params={"after": 1}, headers={**EVENT_SOURCE, "last-event-id": str(end - 2)},
            )
        assert resumed.status_code == 200
        assert [seq for seq, _ in frames(resumed.text)] == [end - 1, end]
        # Without `Last-Event-ID`, `after` is where it starts.
        with trio.fail_after(10):
            from_after = await client.get(f"/v1/streams/{trace_id}", params={"after": end - 1}, headers=EVENT_SOURCE)
        assert [seq for seq, _ in frames(from_after.text)] == [end]


def response_frames(text: str) -> list[tuple[int, int]]:
    """Each frame's SSE `id` and its event's `sequence_number`."""
    found = []
    for block in text.split("\n\n"):
        if block:
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            found.append((int(fields["id"]), json.loads(fields["data"])["sequence_number"]))
    return found


async def test_an_event_source_reads_a_stored_response_once_and_stops_reconnecting(
    aio_loop: object, pg_database_url: str, nats_url: str,
) -> None:
    """`new EventSource("/v1/responses/<id>?stream=true")`: OpenAI's stream has no `id:`, so
    an EventSource came back for the whole response again, every few seconds, forever."""
    fake = OpenAIBackend(default=Script(tokens=["Once", " upon", " a", " time"]))
    async with fake.serve() as server, running_gateway(
        backend("b", server.url, default=True), database_url=pg_database_url, nats_url=nats_url,
    ) as url, httpx.AsyncClient(base_url=url, timeout=20) as client:
        created = await client.post("/v1/responses", json={"model": "m", "input": "Tell me a story"}, headers={"origin": PAGE})
        assert created.status_code == 200
        path = f"/v1/responses/{created.json()['id']}"
        with trio.fail_after(10):
            opened = await client.get(path, params={"stream": "true"}, headers=EVENT_SOURCE)
        assert opened.status_code == 200 and opened.headers["access-control-allow-origin"] == PAGE
        read = response_frames(opened.text)
        assert [seq for seq, _ in read] == [number for _, number in read] == list(range(len(read)))
        last = read[-1][0]
        with trio.fail_after(10):
            again = await client.get(path, params={"stream": "true"}, headers={**EVENT_SOURCE, "last-event-id": str(last)})
        assert again.status_code == 204 and again.content == b""
        assert again.headers["access-control-allow-origin"] == PAGE
        with trio.fail_after(10):
            resumed = await client.get(
                path, params={"stream": "true", "starting_after": 0}, headers={**EVENT_SOURCE, "last-event-id": str(last - 2)},
            )
        assert resumed.status_code == 200 and response_frames(resumed.text) == [(last - 1, last - 1), (last, last)]


async def test_a_head_on_a_live_stream_ends_with_its_head(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    """An uptime check or `curl -I` asks HEAD of a run's stream while the run goes on: its answer
    is the head alone, and the connection is free at once for the client's next request (it was
    held, the body relayed to nobody, until the run ended)."""
    fake = OpenAIBackend(default=Script(tokens=[f" w{i}" for i in range(100)], pace=0.1))
    async with fake.serve() as server, running_gateway(
        backend("b", server.url, default=True), database_url=pg_database_url, nats_url=nats_url,
    ) as url, httpx.AsyncClient(base_url=url, timeout=20) as client, httpx.AsyncClient(
        base_url=url, timeout=20, limits=httpx.Limits(max_connections=1),
    ) as one_connection:
        async with client.stream("POST", "/v1/chat/completions", json=CHAT) as chat:
            trace_id = chat.headers["x-trace-id"]
            with trio.fail_after(3):  # the run goes on for 10 s
                head = await one_connection.head(f"/v1/streams/{trace_id}")
                assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
                assert (await one_connection.get("/health")).status_code == 200
            assert not chat.is_closed  # the run itself goes on
