"""Responses behind a load balancer: two gateway instances sharing one PostgreSQL and one
NATS, each call of the official `openai` SDK landing on either of them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from proxy.config import Settings
from proxy.infra.embedded import EmbeddedNats
from proxy.serve import serve
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import eventually, gateway, keys_cli, new_key, wait_for_key
from tests.test_cli import free_port
from tests.test_persistence import rows, wait_for_row

pytest_plugins = ["tests.infra_servers"]

TOKENS = [f" w{i}" for i in range(40)]


@dataclass
class Pair:
    db: str
    fake: OpenAIBackend
    first: openai.AsyncOpenAI
    second: openai.AsyncOpenAI


@pytest.fixture
async def pair(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Pair]:
    # An answer that takes the backend 4 s: long enough to reach it from the other instance.
    fake = OpenAIBackend(default=Script(tokens=TOKENS, usage=Usage(6, 40), pace=0.1))
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True)
    ) as first, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as second:
        clients = [openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) for url in (first, second)]
        yield Pair(pg_database_url, fake, *clients)
        for client in clients:
            await client.close()


async def _backend_done(fake: OpenAIBackend) -> bool:
    return bool(fake.recorder.generations) and all(g.outcome != "running" for g in fake.recorder.generations)


async def test_a_background_response_is_cancelled_through_the_instance_not_running_it(pair: Pair) -> None:
    created = await pair.first.responses.create(model="m", input="Count", background=True)
    await pair.fake.wait_requests(1, 10)
    await trio.sleep(0.5)  # it has said something by now
    with trio.fail_after(10):
        cancelled = await pair.second.responses.cancel(created.id)
    assert (cancelled.id, cancelled.status) == (created.id, "cancelled")
    # Its backend stopped well before the answer's 4 s; what it said is kept.
    await eventually(lambda: _backend_done(pair.fake), within=5)
    assert [g.outcome for g in pair.fake.recorder.generations] == ["cancelled"]
    assert cancelled.output_text.startswith(TOKENS[0]) and cancelled.output_text != "".join(TOKENS)
    await wait_for_row(pair.db, created.id.removeprefix("resp_"), "cancelled")
    for client in (pair.first, pair.second):
        assert (await client.responses.retrieve(created.id)).status == "cancelled"
    # Cancelled again, on either: as it stands.
    assert (await pair.second.responses.cancel(created.id)).status == "cancelled"


async def test_a_background_response_deleted_through_the_instance_not_running_it_is_gone_on_both(pair: Pair) -> None:
    created = await pair.first.responses.create(model="m", input="Count", background=True)
    await pair.fake.wait_requests(1, 10)
    with trio.fail_after(15):
        await pair.second.responses.delete(created.id)
    # Stopped on the instance running it (over NATS) before it was deleted.
    await eventually(lambda: _backend_done(pair.fake), within=5)
    assert [g.outcome for g in pair.fake.recorder.generations] == ["cancelled"]
    for client in (pair.first, pair.second):
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.input_items.list(created.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.delete(created.id)


async def test_a_background_stream_is_found_and_cancelled_on_the_other_instance_right_after_its_creation(
    pair: Pair,
) -> None:
    stream = await pair.first.responses.create(model="m", input="Count", background=True, stream=True)
    created = await stream.__anext__()
    assert created.type == "response.created"
    response_id = created.response.id
    # At once, through the other instance: the response its client was just told of.
    polled = await pair.second.responses.retrieve(response_id)
    assert (polled.id, polled.status) == (response_id, "in_progress")
    with trio.fail_after(10):
        assert (await pair.second.responses.cancel(response_id)).status == "cancelled"
    rest = [event async for event in stream]
    assert (rest[-1].type, rest[-1].response.status) == ("response.incomplete", "cancelled")
    assert [g.outcome for g in pair.fake.recorder.generations] == ["cancelled"]


async def test_a_background_response_polled_on_the_other_instance_shows_what_it_has_said_so_far(pair: Pair) -> None:
    created = await pair.first.responses.create(model="m", input="Count", background=True)
    await pair.fake.wait_requests(1, 10)

    async def said() -> str | None:
        polled = await pair.second.responses.retrieve(created.id)
        assert polled.status == "in_progress"
        return polled.output_text if len(polled.output_text) > len(TOKENS[0]) else None

    # As its own instance shows it (see test_responses_background): its text so far, its item
    # `in_progress`, well before the answer's 4 s are up.
    so_far = await eventually(said, within=2)
    assert so_far is not None and "".join(TOKENS).startswith(so_far)
    polled = await pair.second.responses.retrieve(created.id)
    assert polled.output[-1].status == "in_progress"


async def test_a_background_response_whose_instance_was_killed_is_polled_failed_with_what_it_had_said(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """SIGKILL leaves its run `running` with no answer in its row; once a live instance has
    failed it (its process silent past `dead_after`, aged here in the database), a poll says
    `failed`, and still shows the text its client could have read while it ran."""
    fake = OpenAIBackend(default=Script(tokens=TOKENS, usage=Usage(6, 40), pace=0.1))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "DATABASE_URL", "NATS_URL"))}
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True)
    ) as survivor, httpx.AsyncClient(timeout=30) as http:
        env |= {"LLM_BASE_URL": f"{server.url}/v1", "DATABASE_URL": pg_database_url, "NATS_URL": nats_url}
        doomed = await trio.lowlevel.open_process(
            [sys.executable, "-m", "proxy", "serve", "--bind", f"127.0.0.1:{port}"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = openai.AsyncOpenAI(base_url=f"{survivor}/v1", api_key="x", max_retries=0)
        try:
            with trio.fail_after(30):
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await http.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                            break
                    await trio.sleep(0.1)
            doomed_client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
            created = await doomed_client.responses.create(model="m", input="Count", background=True)
            await doomed_client.close()
            await fake.wait_requests(1, 10)
            await trio.sleep(1.0)  # a quarter of its answer
            doomed.kill()
        finally:
            doomed.kill()
            await doomed.wait()
        trace_id = created.id.removeprefix("resp_")
        aged = await trio.to_thread.run_sync(
            rows, pg_database_url, "UPDATE gateway_instances SET seen_at = now() - interval '1 hour'"
            " WHERE id = (SELECT owner FROM idempotency_keys WHERE trace_id = %s) RETURNING id", trace_id,
        )
        assert len(aged) == 1
        await wait_for_row(pg_database_url, trace_id, "failed", within=15)  # the next heartbeat's sweep
        polled = await client.responses.retrieve(created.id)
        await client.close()
    assert polled.status == "failed" and polled.error is not None and "killed or crashed" in polled.error.message
    said = polled.output_text
    assert said.startswith(TOKENS[0]) and "".join(TOKENS).startswith(said) and said != "".join(TOKENS)
    assert polled.output[-1].status == "incomplete"


async def test_a_responses_input_items_are_listed_by_the_other_instance(pair: Pair) -> None:
    pair.fake.default = Script(tokens=["Sunny."], usage=Usage(9, 2))
    created = await pair.first.responses.create(
        model="m", instructions="Be brief.",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "22C, sun"},
            {"role": "user", "content": [{"type": "input_text", "text": "And so?"},
                                         {"type": "input_image", "image_url": "https://x.test/a.png", "detail": "low"}]},
        ],
    )
    await wait_for_row(pair.db, created.id.removeprefix("resp_"), "completed")
    # OpenAI's order: newest first; its instructions are not input.
    page = await pair.second.responses.input_items.list(created.id)
    kinds = [item.type for item in page.data]
    assert kinds == ["message", "function_call_output", "function_call", "message"]
    last, output, call, first = page.data
    assert first.type == "message" and (first.role, first.content[0].text) == ("user", "Weather in Paris?")
    assert call.type == "function_call" and (call.call_id, call.name, call.arguments) == (
        "call_1", "weather", '{"city":"Paris"}')
    assert output.type == "function_call_output" and (output.call_id, output.output) == ("call_1", "22C, sun")
    assert last.type == "message" and [part.type for part in last.content] == ["input_text", "input_image"]
    # Paged as the SDK pages it.
    ascending = await pair.second.responses.input_items.list(created.id, order="asc", limit=2)
    assert [item.id for item in ascending.data] == [first.id, call.id] and ascending.has_more
    rest = await pair.first.responses.input_items.list(created.id, order="asc", after=call.id)
    assert [item.id for item in rest.data] == [output.id, last.id] and not rest.has_more
    with pytest.raises(openai.NotFoundError):
        await pair.second.responses.input_items.list("resp_0123456789abcdef0123456789abcdef")


async def test_previous_response_id_continues_a_response_made_on_the_other_instance(pair: Pair) -> None:
    pair.fake.default = Script(tokens=["Hello", " Ada."], usage=Usage(9, 2))
    first = await pair.first.responses.create(model="m", instructions="Be brief.", input="My name is Ada.")
    await wait_for_row(pair.db, first.id.removeprefix("resp_"), "completed")
    pair.fake.default = Script(tokens=["Ada."], usage=Usage(20, 1))
    second = await pair.second.responses.create(
        model="m", instructions="Answer in French.", input="What is my name?", previous_response_id=first.id,
    )
    assert (second.output_text, second.previous_response_id) == ("Ada.", first.id)
    # Its conversation and answer, then the new input; the old instructions are not carried over.
    sent = pair.fake.recorder.requests[-1].json
    assert sent is not None
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("system", "Answer in French."), ("user", "My name is Ada."), ("assistant", "Hello Ada."),
        ("user", "What is my name?"),
    ]
    # A chain: the third turn has all of it, back on the first instance.
    await wait_for_row(pair.db, second.id.removeprefix("resp_"), "completed")
    third = await pair.first.responses.create(model="m", input="Thanks!", previous_response_id=second.id, stream=True)
    assert [event.type async for event in third][-1] == "response.completed"
    sent = pair.fake.recorder.requests[-1].json
    assert sent is not None
    assert [m["content"] for m in sent["messages"]] == [
        "My name is Ada.", "Hello Ada.", "What is my name?", "Ada.", "Thanks!",
    ]
    # Its input items are its own input, as OpenAI lists them.
    listed = await pair.first.responses.input_items.list(second.id)
    assert [(item.type, item.content[0].text) for item in listed.data if item.type == "message"] == [
        ("message", "What is my name?")]
    with pytest.raises(openai.BadRequestError) as missing:
        await pair.second.responses.create(model="m", input="x", previous_response_id="resp_0123456789abcdef")
    assert isinstance(missing.value.body, dict) and missing.value.body["code"] == "previous_response_not_found"
    assert missing.value.body["param"] == "previous_response_id"


async def test_previous_response_id_of_a_response_still_running_is_a_400(pair: Pair) -> None:
    running = await pair.first.responses.create(model="m", input="Count", background=True)
    with pytest.raises(openai.BadRequestError) as info:
        await pair.second.responses.create(model="m", input="And?", previous_response_id=running.id)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "previous_response_id"
    assert "in progress" in info.value.body["message"]


async def test_previous_response_id_carries_a_function_call_to_its_output(pair: Pair) -> None:
    """The agent loop: the model calls a function, the client answers the call with only its
    output and the response's id, on whichever instance."""
    tool: Any = {"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}
    pair.fake.default = Script(tokens=[], tool_calls=[("weather", '{"city":"Paris"}')], usage=Usage(9, 2))
    called = await pair.first.responses.create(model="m", input="Weather in Paris?", tools=[tool])
    call = next(item for item in called.output if item.type == "function_call")
    await wait_for_row(pair.db, called.id.removeprefix("resp_"), "completed")
    pair.fake.default = Script(tokens=["Sunny."], usage=Usage(20, 1))
    answered = await pair.second.responses.create(
        model="m", tools=[tool], previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "22C, sun"}],
    )
    assert answered.output_text == "Sunny."
    sent = pair.fake.recorder.requests[-1].json
    assert sent is not None
    assistant, output = sent["messages"][1:]
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == ["weather"]
    assert assistant["tool_calls"][0]["id"] == call.call_id
    assert (output["role"], output["tool_call_id"], output["content"]) == ("tool", call.call_id, "22C, sun")


async def test_previous_response_id_continues_a_response_the_moment_it_has_been_answered(pair: Pair) -> None:
    """Its row is written a moment after its client had the answer (a group commit): the next
    turn, sent at once to another instance, still finds it."""
    pair.fake.default = Script(tokens=["Hello."], usage=Usage(9, 2))
    for turn in range(5):
        first = await pair.first.responses.create(model="m", input=f"Hi {turn}", stream=turn % 2 == 1)
        if turn % 2 == 1:  # streamed: the id of the stream's response, once it has completed
            events = [event async for event in first]
            assert events[-1].type == "response.completed"
            first_id = events[-1].response.id
        else:
            first_id = first.id
        second = await pair.second.responses.create(model="m", input="And?", previous_response_id=first_id)
        assert second.status == "completed"


async def test_a_streaming_response_is_found_on_the_other_instance_from_its_response_created(pair: Pair) -> None:
    stream = await pair.first.responses.create(model="m", input="Count", stream=True)
    created = await stream.__anext__()
    await stream.__anext__()  # response.in_progress: its events are on their way to NATS
    # Its row is held back while it is young: found anyway, running.
    polled = await pair.second.responses.retrieve(created.response.id)
    assert (polled.id, polled.status) == (created.response.id, "in_progress")
    assert [event.type async for event in stream][-1] == "response.completed"


@dataclass
class Stoppable:
    url: str
    stop: trio.Event  # the signal
    stopped: trio.Event  # the process would exit


@asynccontextmanager
async def stoppable_gateway(db: str, nats: str, backend_url: str, grace: float) -> AsyncIterator[Stoppable]:
    """A gateway the test stops as SIGTERM would, and sees stop."""
    settings = replace(
        Settings(), backends=(backend("vllm", backend_url, default=True),), host="127.0.0.1", port=0,
        access_log=False, database_url=db, nats_url=nats, shutdown_grace_seconds=grace,
    )
    stop, stopped = trio.Event(), trio.Event()

    async def serving(task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await serve(settings, shutdown_trigger=stop.wait, task_status=task_status)
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(serving)
        try:
            yield Stoppable(url, stop, stopped)
        finally:
            stop.set()


async def test_a_background_response_goes_on_through_its_gateways_graceful_stop(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A rolling deploy: the instance running a background response is told to stop. The
    response is finished within the grace its requests in flight get, and polled (on the
    other instance) completed, not failed."""
    fake = OpenAIBackend(default=Script(tokens=TOKENS[:20], usage=Usage(6, 20), pace=0.1))  # 2 s
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True)
    ) as survivor, stoppable_gateway(pg_database_url, nats_url, server.url, grace=5.0) as stopping:
        client = openai.AsyncOpenAI(base_url=f"{stopping.url}/v1", api_key="x", max_retries=0)
        created = await client.responses.create(model="m", input="Count", background=True)
        await client.close()
        await fake.wait_requests(1, 10)
        stopping.stop.set()
        with trio.fail_after(10):
            await stopping.stopped.wait()
        other = openai.AsyncOpenAI(base_url=f"{survivor}/v1", api_key="x", max_retries=0)
        polled = await other.responses.retrieve(created.id)
        await other.close()
    assert polled.status == "completed", polled.error
    assert polled.output_text == "".join(TOKENS[:20])
    assert [g.outcome for g in fake.recorder.generations] == ["completed"]


async def test_a_background_response_within_a_grace_longer_than_five_seconds_is_not_cut_at_five(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """`shutdown_grace_seconds = 9`: a background response of 7 s is finished in the grace.
    The framework cancelled the gateway's own tasks (durable runs among them, and the writer,
    the database) 5 s into the stop, whatever the grace: the response was cut, failed."""
    tokens = TOKENS[:35]
    fake = OpenAIBackend(default=Script(tokens=tokens, usage=Usage(6, 35), pace=0.2))  # 7 s
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True)
    ) as survivor, stoppable_gateway(pg_database_url, nats_url, server.url, grace=9.0) as stopping:
        client = openai.AsyncOpenAI(base_url=f"{stopping.url}/v1", api_key="x", max_retries=0)
        created = await client.responses.create(model="m", input="Count", background=True)
        await client.close()
        await fake.wait_requests(1, 10)
        stopping.stop.set()
        with trio.fail_after(20):
            await stopping.stopped.wait()
        other = openai.AsyncOpenAI(base_url=f"{survivor}/v1", api_key="x", max_retries=0)
        polled = await other.responses.retrieve(created.id)
        await other.close()
    assert polled.status == "completed", polled.error
    assert polled.output_text == "".join(tokens)


async def test_a_background_response_longer_than_the_grace_is_failed_at_its_end_with_what_it_had_said(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(tokens=TOKENS, usage=Usage(6, 40), pace=0.1))  # 4 s
    key = await new_key(pg_database_url, "cut-by-the-stop")
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True)
    ) as survivor, stoppable_gateway(pg_database_url, nats_url, server.url, grace=2.0) as stopping:
        await wait_for_key(stopping.url, key)
        await wait_for_key(survivor, key)
        client = openai.AsyncOpenAI(base_url=f"{stopping.url}/v1", api_key=key, max_retries=0)
        created = await client.responses.create(model="m", input="Count", background=True)
        await client.close()
        other = openai.AsyncOpenAI(base_url=f"{survivor}/v1", api_key=key, max_retries=0)

        async def said() -> str | None:
            text = (await other.responses.retrieve(created.id)).output_text
            return text if len(text) > len(TOKENS[0]) else None

        before = await eventually(said, within=10)
        stopping.stop.set()
        asked = trio.current_time()
        with trio.fail_after(10):
            await stopping.stopped.wait()
        took = trio.current_time() - asked
        polled = await other.responses.retrieve(created.id)
        await other.close()
    assert 1.8 <= took < 6.0  # the grace, not the whole answer
    assert polled.status == "failed" and polled.error is not None and "shutting down" in polled.error.message
    after = polled.output_text
    assert "".join(TOKENS).startswith(after) and after != "".join(TOKENS)
    assert len(after.split()) >= len(before.split()) + 8  # it went on during the grace
    assert polled.output[-1].status == "incomplete"
    # What it had used is charged to its key before the gateway stopped.
    code, out, err = await trio.to_thread.run_sync(lambda: keys_cli(pg_database_url, "list", "--json"))
    assert code == 0, err
    entry = next(json.loads(line) for line in out.splitlines() if json.loads(line)["name"] == "cut-by-the-stop")
    assert (entry["requests"], entry["errors"]) == (1, 1) and entry["completion_tokens"] > 0, entry


async def test_a_background_stream_read_again_at_once_on_the_other_instance_is_numbered_as_its_client_saw_it(
    pair: Pair,
) -> None:
    """A background stream opens with one event more (`response.queued`): read again on the
    other instance right after its first event, it is numbered from the run's own settings (its
    row, written at once), as its client saw it."""
    stream = await pair.first.responses.create(model="m", input="Count", background=True, stream=True)
    created = await stream.__anext__()
    again = [event async for event in await pair.second.responses.retrieve(created.response.id, stream=True)]
    seen = [created, *[event async for event in stream]]
    assert seen[1].type == "response.queued" and seen[-1].type == "response.completed"
    assert [(e.type, e.sequence_number) for e in again] == [(e.type, e.sequence_number) for e in seen]


async def _nats_ready(url: str) -> bool:
    async with httpx.AsyncClient(base_url=url) as client:
        return (await client.get("/ready")).json()["checks"].get("nats") == "ok"


async def test_a_nats_back_without_its_streams_has_them_again_and_the_other_instance_follows_runs(
    aio_loop: object, pg_database_url: str, tmp_path: Path
) -> None:
    """A NATS replaced by one that kept nothing (a container without a volume, a memory store):
    the gateways, reconnected, make their streams again; until now every run's events went
    nowhere, and a background response polled on the other instance stayed `queued`, empty."""
    nats = EmbeddedNats(tmp_path / "nats")
    nats_url = await trio.to_thread.run_sync(nats.start)
    try:
        fake = OpenAIBackend(default=Script(tokens=TOKENS, usage=Usage(6, 40), pace=0.1))
        async with fake.serve() as server, gateway(
            pg_database_url, nats_url, backend("vllm", server.url, default=True)
        ) as first, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as second:
            await trio.to_thread.run_sync(nats.stop)
            shutil.rmtree(tmp_path / "nats" / "jetstream")
            assert await trio.to_thread.run_sync(nats.start) == nats_url
            for url in (first, second):
                await eventually(lambda url=url: _nats_ready(url), within=15, every=0.2)
            async with openai.AsyncOpenAI(base_url=f"{first}/v1", api_key="x", max_retries=0) as a, \
                    openai.AsyncOpenAI(base_url=f"{second}/v1", api_key="x", max_retries=0) as b:
                created = await a.responses.create(model="m", input="Count", background=True)
                await fake.wait_requests(1, 10)

                async def said() -> str | None:
                    polled = await b.responses.retrieve(created.id)
                    return polled.output_text if polled.status == "in_progress" and polled.output_text else None

                so_far = await eventually(said, within=3)
                assert so_far.startswith(TOKENS[0])
                # Its events are kept again: read back from the other instance, token by token.
                await wait_for_row(pg_database_url, created.id.removeprefix("resp_"), "completed", within=10)
                async with httpx.AsyncClient(base_url=second) as client:
                    read = await client.get(f"/v1/streams/{created.id.removeprefix('resp_')}")
                tokens = [line for line in read.text.splitlines() if line == "event: token"]
                assert len(tokens) == len(TOKENS)
    finally:
        await trio.to_thread.run_sync(nats.stop)
