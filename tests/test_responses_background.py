"""Background responses (`background: true` without `stream`), as the official `openai` SDK
uses them: created and answered at once `queued`, polled with `responses.retrieve` until they
end, cancelled with `responses.cancel`. On real PostgreSQL and NATS."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import trio

from proxy.infra.chat_store import ChatStore
from tests.fakes import OpenAIBackend, Script, Usage
from tests.test_auth_helpers import bearer, eventually, keys_cli, new_key, wait_for_key
from tests.test_persistence import wait_for_row
from tests.test_responses_stored import Stack, journaled_stack

pytest_plugins = ["tests.infra_servers"]

TOKENS = [f" w{i}" for i in range(20)]


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    # An answer that takes the backend 2 s (a background run streams it from the backend, for
    # its journal): long enough to poll and to cancel.
    fake = OpenAIBackend(default=Script(tokens=TOKENS, usage=Usage(6, 20), pace=0.1))
    async with journaled_stack(pg_database_url, nats_url, fake) as built:
        yield built


async def poll_until_ended(client: openai.AsyncOpenAI, response_id: str, within: float = 15.0) -> list[str]:
    """Poll as the SDK's users do; the statuses seen, in order."""
    seen: list[str] = []
    with trio.fail_after(within):
        while not seen or seen[-1] in ("queued", "in_progress"):
            seen.append((await client.responses.retrieve(response_id)).status or "")
            await trio.sleep(0.1)
    return seen


async def test_a_background_response_is_answered_queued_at_once_and_polled_to_its_end(stack: Stack) -> None:
    created = await stack.client.responses.create(model="m", input="Count", background=True)
    # Answered while the backend is still generating, not once it is done.
    assert created.status == "queued" and created.background is True
    assert [g.outcome for g in stack.fake.recorder.generations] in ([], ["running"])
    statuses = await poll_until_ended(stack.client, created.id)
    assert statuses[0] in ("queued", "in_progress") and statuses[-1] == "completed"
    done = await stack.client.responses.retrieve(created.id)
    assert done.output_text == "".join(TOKENS)
    assert done.usage is not None and (done.usage.input_tokens, done.usage.output_tokens) == (6, 20)
    assert [g.outcome for g in stack.fake.recorder.generations] == ["completed"]


@pytest.mark.parametrize(("header", "code"), [("x-workspace", "workspace_not_found"), ("x-pipeline", "pipeline_not_found")])
async def test_a_background_response_naming_what_does_not_exist_is_refused_at_its_creation(
    stack: Stack, header: str, code: str
) -> None:
    # As the same request without `background` is. Before, it was answered `queued`, then
    # polled as `failed` with `server_error`: the client's mistake as the gateway's failure.
    with pytest.raises(openai.NotFoundError) as refused:
        await stack.client.responses.create(model="m", input="Hi", background=True, extra_headers={header: "nope"})
    assert (refused.value.code, refused.value.param) == (code, header)
    assert not stack.fake.recorder.generations


async def test_a_background_response_its_backend_refuses_as_the_clients_mistake_fails_as_invalid_prompt(
    stack: Stack,
) -> None:
    # Its run learns of the mistake once the client was answered `queued`: the failure says
    # whose it is (OpenAI's `invalid_prompt`), not `server_error`, which invites a retry.
    stack.fake.set_script(Script(status=400, error_message="This model's maximum context length is 8192 tokens."))
    created = await stack.client.responses.create(model="m", input="Hi", background=True)
    assert (await poll_until_ended(stack.client, created.id))[-1] == "failed"
    failed = await stack.client.responses.retrieve(created.id)
    assert failed.error is not None and failed.error.code == "invalid_prompt"
    assert "maximum context length" in failed.error.message
    # It failed before its backend said anything: it was created when it was asked for.
    assert abs(failed.created_at - created.created_at) <= 2


async def test_a_background_response_is_polled_at_once_after_its_creation(stack: Stack) -> None:
    created = await stack.client.responses.create(model="m", input="Count", background=True)
    # Before its `running` row can have been written: the live run answers for it.
    assert (await stack.client.responses.retrieve(created.id)).status in ("queued", "in_progress")


async def test_a_background_response_reads_queued_until_its_backend_starts_answering(stack: Stack) -> None:
    """OpenAI's `queued` until a worker takes it: here until its backend says its first word
    (as its own stream announces `response.queued`, then `response.in_progress`), then
    `in_progress`, never `queued` again."""
    stack.fake.push(Script(tokens=TOKENS, usage=Usage(6, 20), pace=0.1, header_delay=1.5))
    created = await stack.client.responses.create(model="m", input="Count", background=True)
    assert created.status == "queued"
    await stack.fake.wait_requests(1)
    assert (await stack.client.responses.retrieve(created.id)).status == "queued"
    statuses = await poll_until_ended(stack.client, created.id)
    assert statuses[0] == "queued" and statuses[-1] == "completed" and "in_progress" in statuses
    assert "queued" not in statuses[statuses.index("in_progress"):]


async def test_cancelling_a_background_response_stops_its_backend_and_records_it_cancelled(stack: Stack) -> None:
    created = await stack.client.responses.create(model="m", input="Count", background=True)
    await stack.fake.wait_requests(1, 10)
    cancelled = await stack.client.responses.cancel(created.id)
    assert (cancelled.id, cancelled.status) == (created.id, "cancelled")
    await eventually(lambda: _ended(stack.fake))
    assert [g.outcome for g in stack.fake.recorder.generations] == ["cancelled"]
    assert (await stack.client.responses.retrieve(created.id)).status == "cancelled"
    await wait_for_row(stack.db, created.id.removeprefix("resp_"), "cancelled")
    # Cancelling again, or cancelling an ended response, answers it as it stands.
    assert (await stack.client.responses.cancel(created.id)).status == "cancelled"


async def _ended(fake: OpenAIBackend) -> bool:
    return all(g.outcome != "running" for g in fake.recorder.generations)


async def test_a_finished_response_is_not_cancelled(stack: Stack) -> None:
    stack.fake.default = Script(tokens=["Done."], usage=Usage(3, 1))
    answered = await stack.client.responses.create(model="m", input="Hi")
    await wait_for_row(stack.db, answered.id.removeprefix("resp_"), "completed")
    again = await stack.client.responses.cancel(answered.id)
    assert (again.status, again.output_text) == ("completed", "Done.")


async def test_cancelling_an_unknown_response_is_a_404(stack: Stack) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await stack.client.responses.cancel("resp_0123456789abcdef0123456789abcdef")
    assert info.value.status_code == 404


async def test_background_without_store_is_a_400_naming_store(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await stack.client.responses.create(model="m", input="x", background=True, store=False)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "store"
    assert stack.fake.requests == []


async def test_a_background_run_is_charged_to_its_key_when_it_ends(stack: Stack) -> None:
    key = await new_key(stack.db, "background")
    await wait_for_key(stack.url, key)
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0)
    created = await client.responses.create(model="m", input="Count", background=True)
    assert (await poll_until_ended(client, created.id))[-1] == "completed"
    await client.close()

    async def charged() -> dict[str, int] | None:
        code, out, err = await trio.to_thread.run_sync(lambda: keys_cli(stack.db, "list", "--json"))
        assert code == 0, err
        entry = next(json.loads(line) for line in out.splitlines() if json.loads(line)["name"] == "background")
        return entry if entry["completion_tokens"] else None

    entry = await eventually(charged, within=10)
    # The creating request and the polls are not chats; the run is, with the backend's usage.
    assert (entry["requests"], entry["prompt_tokens"], entry["completion_tokens"]) == (1, 6, 20)


async def test_a_key_cannot_poll_or_cancel_another_keys_response(stack: Stack) -> None:
    owner, other = await new_key(stack.db, "owner"), await new_key(stack.db, "other")
    await wait_for_key(stack.url, owner)
    await wait_for_key(stack.url, other)
    mine = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=owner, max_retries=0)
    theirs = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=other, max_retries=0)
    created = await mine.responses.create(model="m", input="Count", background=True)
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.cancel(created.id)
    assert (await mine.responses.cancel(created.id)).status == "cancelled"
    # Nor read its input, nor continue its conversation.
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.input_items.list(created.id)
    stack.fake.default = Script(tokens=["Done."], usage=Usage(3, 1))
    answered = await mine.responses.create(model="m", input="My secret is 42.")
    with pytest.raises(openai.BadRequestError) as info:
        await theirs.responses.create(model="m", input="What is my secret?", previous_response_id=answered.id)
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "previous_response_not_found"
    assert [m.id for m in (await mine.responses.input_items.list(answered.id)).data]
    await mine.close()
    await theirs.close()
    assert bearer(owner) != bearer(other)



async def test_a_polled_background_response_echoes_what_it_was_created_with(stack: Stack) -> None:
    tool: Any = {"type": "function", "name": "count", "parameters": {"type": "object", "properties": {}}}
    created = await stack.client.responses.create(
        model="m", input="Count", background=True, instructions="Count slowly.", tools=[tool],
        metadata={"ticket": "T-2"}, temperature=0.4,
    )
    asked = (created.instructions, [t.name for t in created.tools], created.metadata, created.temperature, created.background)
    assert asked == ("Count slowly.", ["count"], {"ticket": "T-2"}, 0.4, True)
    polled = await stack.client.responses.retrieve(created.id)
    await poll_until_ended(stack.client, created.id)
    done = await stack.client.responses.retrieve(created.id)
    for response in (polled, done):
        assert (response.instructions, [t.name for t in response.tools], response.metadata, response.temperature,
                response.background) == asked
    assert done.status == "completed"


async def test_a_cancelled_background_stream_ends_cancelled_for_the_client_reading_it(stack: Stack) -> None:
    stream = await stack.client.responses.create(model="m", input="Count", background=True, stream=True)
    seen: list[Any] = []
    async for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta":
            break
    response_id = seen[0].response.id
    assert (await stack.client.responses.cancel(response_id)).status == "cancelled"
    seen.extend([event async for event in stream])
    # Its client asked for the cancel: what was said so far is no completed answer.
    assert "response.completed" not in [event.type for event in seen]
    last = seen[-1]
    assert (last.type, last.response.status, last.response.error) == ("response.incomplete", "cancelled", None)
    assert last.response.output[0].status == "incomplete" and last.response.output_text.startswith(TOKENS[0])
    # Its stream read again ends the same way.
    again = [event async for event in await stack.client.responses.retrieve(response_id, stream=True)]
    assert (again[-1].type, again[-1].response.status) == ("response.incomplete", "cancelled")


async def test_a_background_response_is_live_while_it_runs_and_keeps_what_it_said_when_cancelled(stack: Stack) -> None:
    created = await stack.client.responses.create(model="m", input="Count", background=True)
    # Read back as a stream while it runs: its text as the backend generates it (2 s in all),
    # not all of it at the end.
    with trio.fail_after(1.0):
        stream = await stack.client.responses.retrieve(created.id, stream=True)
        async for event in stream:
            if event.type == "response.output_text.delta":
                break
        await stream.close()
    # Polled: what it has said so far.
    polled = await stack.client.responses.retrieve(created.id)
    assert polled.status == "in_progress" and polled.output_text.startswith(TOKENS[0])
    # Cancelled: what it said stays.
    cancelled = await stack.client.responses.cancel(created.id)
    assert cancelled.status == "cancelled" and cancelled.output_text.startswith(TOKENS[0])
    assert (await stack.client.responses.retrieve(created.id)).output_text == cancelled.output_text
    # The backend was asked for a stream with its usage, whatever the client's `stream`.
    body = stack.fake.recorder.requests[-1].json
    assert body is not None and body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_a_background_request_repeated_with_its_idempotency_key_is_answered_by_its_response(stack: Stack) -> None:
    key = {"Idempotency-Key": "background-repeat"}
    first = await stack.client.responses.create(model="m", input="Count", background=True, extra_headers=key)
    # While it runs: the same response, not a second run (nor a 503).
    again = await stack.client.responses.create(model="m", input="Count", background=True, extra_headers=key)
    assert (again.id, again.status) == (first.id, "in_progress")
    assert (await poll_until_ended(stack.client, first.id))[-1] == "completed"
    # Once it has completed: that response, whole.
    raw = await stack.client.responses.with_raw_response.create(
        model="m", input="Count", background=True, extra_headers=key,
    )
    done = raw.parse()
    assert (done.id, done.status, done.output_text) == (first.id, "completed", "".join(TOKENS))
    assert raw.headers["idempotent-replayed"] == "true"
    assert len(stack.fake.recorder.requests) == 1


async def test_cancelling_a_response_that_is_not_background_is_a_400_and_it_goes_on(stack: Stack) -> None:
    stream = await stack.client.responses.create(model="m", input="Count", stream=True)
    seen: list[Any] = []
    async for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta":
            break
    with pytest.raises(openai.BadRequestError) as info:
        await stack.client.responses.cancel(seen[0].response.id)
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "invalid_request_error"
    assert "background" in info.value.body["message"]
    seen.extend([event async for event in stream])
    assert seen[-1].type == "response.completed"


async def test_a_response_read_back_whole_or_as_a_stream_keeps_its_own_times(stack: Stack) -> None:
    events = [event async for event in await stack.client.responses.create(model="m", input="Count", stream=True)]
    created, completed = events[0].response.created_at, events[-1].response.completed_at
    assert completed is not None and completed - created >= 1  # the answer takes the backend 2 s
    await trio.sleep(1.5)
    whole = await stack.client.responses.retrieve(events[0].response.id)
    again = [event async for event in await stack.client.responses.retrieve(events[0].response.id, stream=True)]
    # When it was created and completed, not when it was read (a second's rounding aside).
    for response in (whole, again[0].response, again[-1].response):
        assert abs(response.created_at - created) <= 1
    for response in (whole, again[-1].response):
        assert response.completed_at is not None and abs(response.completed_at - completed) <= 1


async def test_a_background_response_its_backend_rate_limited_is_polled_failed_as_rate_limited(stack: Stack) -> None:
    stack.fake.default = Script(status=429)
    created = await stack.client.responses.create(model="m", input="Count", background=True)
    assert (await poll_until_ended(stack.client, created.id))[-1] == "failed"
    failed = await stack.client.responses.retrieve(created.id)
    assert failed.error is not None and failed.error.code == "rate_limit_exceeded"


async def test_a_background_response_that_ends_while_it_is_read_back_is_found(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read that looked for its row just before the run ended, and got its answer just after,
    # found neither the row nor the run: a 404 for a response the client had just created.
    read = ChatStore.stored_run
    raced = False

    async def answer_after_the_end(self: ChatStore, trace_id: str) -> Any:
        nonlocal raced
        if raced:
            return await read(self, trace_id)
        raced = True
        # No row yet (the writer holds a young run's row back); the answer comes once the
        # run has failed and its row says so.
        with trio.fail_after(10):
            while True:
                row = await read(self, trace_id)
                if row is not None and row.status != "running":
                    return None
                await trio.sleep(0.02)

    stack.fake.default = Script(status=429, header_delay=0.2)
    created = await stack.client.responses.create(model="m", input="Count", background=True)
    monkeypatch.setattr(ChatStore, "stored_run", answer_after_the_end)
    polled = await stack.client.responses.retrieve(created.id)
    assert raced
    assert polled.status == "failed" and polled.error is not None and polled.error.code == "rate_limit_exceeded"


async def test_a_background_stream_opens_queued_as_openais_does_and_is_resumed_numbered_alike(stack: Stack) -> None:
    """OpenAI's background stream: `response.created` and `response.queued` (both `queued`),
    then `response.in_progress`; its sequence numbers run on without a gap, and its stream read
    again (whole, or after an event) numbers every event as its client saw it."""
    stream = await stack.client.responses.create(model="m", input="Count", background=True, stream=True)
    seen: list[Any] = []
    polled = None
    async for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta" and polled is None:
            # Polled while it streams: in progress, as its stream has said.
            polled = await stack.client.responses.retrieve(seen[0].response.id)
            assert polled.status == "in_progress" and polled.background is True
    assert polled is not None
    assert [event.type for event in seen[:3]] == ["response.created", "response.queued", "response.in_progress"]
    assert isinstance(seen[1], openai.types.responses.ResponseQueuedEvent)
    assert [event.response.status for event in seen[:3]] == ["queued", "queued", "in_progress"]
    assert seen[-1].type == "response.completed" and seen[-1].response.output_text == "".join(TOKENS)
    assert [event.sequence_number for event in seen] == list(range(len(seen)))
    response_id = seen[0].response.id
    again = [event async for event in await stack.client.responses.retrieve(response_id, stream=True)]
    assert [(e.type, e.sequence_number) for e in again] == [(e.type, e.sequence_number) for e in seen]
    after = [event async for event in await stack.client.responses.retrieve(response_id, stream=True, starting_after=1)]
    assert [(e.type, e.sequence_number) for e in after] == [(e.type, e.sequence_number) for e in seen[2:]]
    # Not a background stream: no `response.queued`.
    plain = [event async for event in await stack.client.responses.create(model="m", input="Count", stream=True)]
    assert [event.type for event in plain[:2]] == ["response.created", "response.in_progress"]
    assert plain[0].response.status == "in_progress"
