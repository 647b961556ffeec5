"""OpenAI's Files and Batch APIs with the official `openai` SDK (`client.files`,
`client.batches`), on a gateway with PostgreSQL and NATS in front of a fake backend: a batch
runs its lines through the gateway's own routing and limits, fails naming a malformed file's
lines, cancels, survives its gateway's stop (another one finishes it, each line once), and is
its key's alone."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from openai.types import Batch

from proxy.config import BatchSettings, ConfigError, load_settings
from proxy.dialects.openai.batches import parse_lines
from proxy.infra.batch_store import BatchStore
from proxy.infra.batch_store import _record as record_line
from proxy.infra.migrations import load_migrations, migrate
from proxy.infra.postgres import open_database
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import eventually, gateway, keys_cli, new_key, sql, wait_for_key
from tests.test_budget_holds import gateway_process
from tests.test_cli import free_port
from tests.test_responses_stored import Stack, journaled_stack

pytest_plugins = ["tests.infra_servers", "tests.rag_fixtures"]

ECHO = Script(echo=True, usage=Usage(7, 3, cached_tokens=2, reasoning_tokens=1))


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return b"".join((line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines)


def chat_line(custom_id: str, text: str | None = None, url: str = "/v1/chat/completions") -> dict[str, Any]:
    return {
        "custom_id": custom_id, "method": "POST", "url": url,
        "body": {"model": "m", "messages": [{"role": "user", "content": text or f"answer {custom_id}"}]},
    }


async def submit(client: openai.AsyncOpenAI, content: bytes, endpoint: str = "/v1/chat/completions") -> Batch:
    uploaded = await client.files.create(file=("input.jsonl", content), purpose="batch")
    return await client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]


async def until_status(client: openai.AsyncOpenAI, batch_id: str, *statuses: str, within: float = 20.0) -> Batch:
    with trio.fail_after(within):
        while True:
            batch = await client.batches.retrieve(batch_id)
            if batch.status in statuses:
                return batch
            await trio.sleep(0.05)


async def output_lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines()]


def chats(fake: OpenAIBackend) -> int:
    """How many chats the backend was asked for (model listings aside)."""
    return sum(request.path.endswith("/chat/completions") for request in fake.requests)


async def trio_value(value: bool) -> bool:
    return value


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    async with journaled_stack(pg_database_url, nats_url, OpenAIBackend(default=ECHO)) as built:
        yield built


async def test_a_batch_runs_every_line_through_the_gateway_and_writes_openais_output(stack: Stack) -> None:
    content = jsonl(chat_line("first"), chat_line("second"), chat_line("third"))
    uploaded = await stack.client.files.create(file=("requests.jsonl", content), purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(content) and uploaded.purpose == "batch"
    assert (await stack.client.files.content(uploaded.id)).content == content
    created = await stack.client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "nightly"}
    )
    assert created.status == "validating" and created.metadata == {"job": "nightly"} and created.id.startswith("batch_")
    assert created.usage is not None and created.usage.total_tokens == 0  # zeros, not null, until lines answer
    done = await until_status(stack.client, created.id, "completed", "failed")
    assert done.status == "completed", done
    assert done.model == "m"  # the one model its lines name
    assert done.request_counts is not None and (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 3, 0)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.error_file_id is None
    assert done.usage is not None and (done.usage.input_tokens, done.usage.output_tokens) == (21, 9)
    assert (done.usage.input_tokens_details.cached_tokens, done.usage.output_tokens_details.reasoning_tokens) == (6, 3)
    lines = await output_lines(stack.client, done.output_file_id)
    assert [line["custom_id"] for line in lines] == ["first", "second", "third"]
    # Each line's keys in OpenAI's order, its answer's as the endpoint gave them.
    assert list(lines[0]) == ["id", "custom_id", "response", "error"]
    assert list(lines[0]["response"]) == ["status_code", "request_id", "body"]
    assert list(lines[0]["response"]["body"])[:2] == ["id", "object"]
    for line in lines:
        assert line["error"] is None and line["id"].startswith("batch_req_")
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["choices"][0]["message"]["content"] == f"answer {line['custom_id']}"
    output = await stack.client.files.retrieve(done.output_file_id or "")
    assert output.purpose == "batch_output"
    # Each line was one request of the gateway's own: the backend saw three.
    assert chats(stack.fake) == 3
    with pytest.raises(openai.ConflictError):
        await stack.client.batches.cancel(created.id)
    listed = await stack.client.batches.list(limit=1)
    assert [batch.id for batch in listed.data] == [created.id]
    files = [file.id for file in (await stack.client.files.list(purpose="batch")).data]
    assert uploaded.id in files and done.output_file_id not in files


async def test_an_ended_batchs_answers_are_kept_once_in_its_files_and_a_late_line_changes_nothing(stack: Stack) -> None:
    """A gateway running batches for months: each ended batch's answers are its output and
    error files' lines, not also rows of `batch_lines` for good; its counts and usage stay on
    its row, and a line recorded after it ended (by a process presumed dead) adds nothing."""
    created = await submit(stack.client, jsonl(chat_line("first"), chat_line("second"), {"custom_id": "bad", "method": "POST",
                                                "url": "/v1/chat/completions", "body": {"model": "m", "messages": "no"}}))
    done = await until_status(stack.client, created.id, "completed", "failed")
    assert done.status == "completed", done
    assert await sql(stack.db, "SELECT count(*) FROM batch_lines WHERE batch_id = %s", created.id) == [(0,)]
    assert [line["custom_id"] for line in await output_lines(stack.client, done.output_file_id)] == ["first", "second"]
    assert [line["custom_id"] for line in await output_lines(stack.client, done.error_file_id)] == ["bad"]
    async with open_database(stack.db) as db:
        late = {"custom_id": "first", "response": {"status_code": 200}, "error": None}
        await BatchStore(db).record(created.id, 1, True, late, (7, 3, 0, 0))
    again = await stack.client.batches.retrieve(created.id)
    assert again.request_counts is not None and (again.request_counts.completed, again.request_counts.failed) == (2, 1)
    assert again.usage is not None and again.usage.input_tokens == done.usage.input_tokens  # type: ignore[union-attr]
    assert await sql(stack.db, "SELECT count(*) FROM batch_lines WHERE batch_id = %s", created.id) == [(0,)]


async def test_a_malformed_input_file_fails_the_batch_naming_its_lines(stack: Stack) -> None:
    other_model = chat_line("d")
    other_model["body"]["model"] = "another"
    content = jsonl(
        chat_line("a"), "{not json", chat_line("a"), {**chat_line("b"), "method": "GET"},
        chat_line("c", url="/v1/embeddings"), other_model,
    )
    batch = await submit(stack.client, content)
    failed = await until_status(stack.client, batch.id, "failed", "completed")
    assert failed.status == "failed" and failed.failed_at
    assert failed.errors is not None and failed.errors.data is not None
    assert [(error.line, error.code) for error in failed.errors.data] == [
        (2, "invalid_json_line"), (3, "duplicate_custom_id"), (4, "invalid_value"), (5, "url_mismatch"),
        (6, "model_mismatch"),  # OpenAI's rule: one model per batch
    ]
    assert failed.errors.data[-1].param == "body.model" and "'another'" in (failed.errors.data[-1].message or "")
    assert failed.output_file_id is None and chats(stack.fake) == 0


async def test_responses_and_embeddings_batches_run_too(stack: Stack) -> None:
    responses = await submit(stack.client, jsonl({
        "custom_id": "r", "method": "POST", "url": "/v1/responses", "body": {"model": "m", "input": "answer r"},
    }), "/v1/responses")
    embeddings = await submit(stack.client, jsonl({
        "custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": ["one", "two"]},
    }), "/v1/embeddings")
    done = await until_status(stack.client, responses.id, "completed", "failed")
    [line] = await output_lines(stack.client, done.output_file_id)
    assert line["custom_id"] == "r" and line["response"]["body"]["object"] == "response"
    assert line["response"]["body"]["output"][-1]["content"][0]["text"] == "answer r"
    done = await until_status(stack.client, embeddings.id, "completed", "failed")
    [line] = await output_lines(stack.client, done.output_file_id)
    assert line["custom_id"] == "e" and line["response"]["status_code"] == 200
    assert [item["index"] for item in line["response"]["body"]["data"]] == [0, 1]


async def test_the_apis_refuse_in_openais_shape(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as purpose:
        await stack.client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert isinstance(purpose.value.body, dict) and purpose.value.body["param"] == "purpose"
    with pytest.raises(openai.NotFoundError) as missing:
        await stack.client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert isinstance(missing.value.body, dict) and missing.value.body["param"] == "input_file_id"
    with pytest.raises(openai.BadRequestError) as endpoint:
        await stack.client.batches.create(input_file_id="file-nope", endpoint="/v1/moderations", completion_window="24h")
    assert isinstance(endpoint.value.body, dict) and endpoint.value.body["param"] == "endpoint"
    with pytest.raises(openai.NotFoundError):
        await stack.client.batches.retrieve("batch_nope")
    uploaded = await stack.client.files.create(file=("x.jsonl", b"{}\n"), purpose="batch")
    assert (await stack.client.files.delete(uploaded.id)).deleted is True
    with pytest.raises(openai.NotFoundError):
        await stack.client.files.retrieve(uploaded.id)


async def test_cancelling_a_batch_stops_its_lines_and_keeps_what_finished(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    slow = OpenAIBackend(default=Script(tokens=["slow"], usage=Usage(2, 1), header_delay=0.5))
    async with journaled_stack(pg_database_url, nats_url, slow) as stack:
        batch = await submit(stack.client, jsonl(*(chat_line(f"line-{i}") for i in range(20))))
        await until_status(stack.client, batch.id, "in_progress")
        await eventually(lambda: trio_value(chats(stack.fake) >= 1), within=10)
        with pytest.raises(openai.ConflictError):  # a running batch's input stays
            await stack.client.files.delete(batch.input_file_id)
        cancelling = await stack.client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
        cancelled = await until_status(stack.client, batch.id, "cancelled")
        assert cancelled.cancelled_at and cancelled.request_counts is not None
        finished = cancelled.request_counts.completed
        assert 1 <= finished < 20 and cancelled.request_counts.failed == 0
        lines = await output_lines(stack.client, cancelled.output_file_id)
        assert len(lines) == finished == chats(stack.fake)
        await trio.sleep(0.6)  # nothing more starts
        assert chats(stack.fake) == finished
        assert (await stack.client.batches.cancel(batch.id)).status == "cancelled"  # again: nothing to do
        assert (await stack.client.files.delete(batch.input_file_id)).deleted


async def test_a_cancel_sent_to_another_gateway_stops_the_batch_where_it_runs(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(tokens=["slow"], usage=Usage(2, 1), header_delay=0.5))
    async with fake.serve() as server:
        config = backend("vllm", server.url, default=True)
        # The second gateway looks for batches only at its start: the first one runs this one.
        async with gateway(pg_database_url, nats_url, config) as runs, gateway(
            pg_database_url, nats_url, config, batches=BatchSettings(poll_seconds=600)
        ) as other:
            here = openai.AsyncOpenAI(base_url=f"{runs}/v1", api_key="x", max_retries=0)
            there = openai.AsyncOpenAI(base_url=f"{other}/v1", api_key="x", max_retries=0)
            batch = await submit(here, jsonl(*(chat_line(f"line-{i}") for i in range(30))))
            await eventually(lambda: trio_value(chats(fake) >= 1), within=10)
            await there.batches.cancel(batch.id)
            cancelled = await until_status(there, batch.id, "cancelled")
            assert cancelled.request_counts is not None and 1 <= cancelled.request_counts.completed < 30
            assert len(await output_lines(there, cancelled.output_file_id)) == cancelled.request_counts.completed
            await here.close()
            await there.close()


async def test_a_batch_whose_gateway_stops_is_finished_by_the_next_each_line_once(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(echo=True, usage=Usage(1, 1), header_delay=0.3))
    custom_ids = [f"line-{i}" for i in range(10)]
    async with fake.serve() as server:
        config = backend("vllm", server.url, default=True)
        async with gateway(pg_database_url, nats_url, config, shutdown_grace_seconds=0.2) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            batch = await submit(client, jsonl(*(chat_line(custom_id) for custom_id in custom_ids)))
            await until_status(client, batch.id, "in_progress")
            await eventually(lambda: trio_value(chats(fake) >= 2), within=10)
            await client.close()
        # Stopped mid-batch: let go, with some lines answered.
        rows = await sql(pg_database_url, "SELECT status, owner FROM batches WHERE id = %s", batch.id)
        assert rows == [("in_progress", None)]
        answered = (await sql(pg_database_url, "SELECT count(*) FROM batch_lines WHERE batch_id = %s", batch.id))[0][0]
        assert answered < len(custom_ids)
        # As if its process had been killed instead: owned by an instance that beat just now.
        await sql(pg_database_url, "INSERT INTO gateway_instances (id) VALUES ('killed') ON CONFLICT (id) DO UPDATE SET seen_at = now()")
        await sql(pg_database_url, "UPDATE batches SET owner = 'killed' WHERE id = %s", batch.id)
        async with gateway(pg_database_url, nats_url, config, batches=BatchSettings(poll_seconds=0.1)) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            asked = chats(fake)
            await trio.sleep(1.0)  # while its owner may be alive, nobody else runs it
            assert chats(fake) == asked
            await sql(pg_database_url, "UPDATE gateway_instances SET seen_at = now() - interval '1 hour' WHERE id = 'killed'")
            done = await until_status(client, batch.id, "completed", within=30)
            lines = await output_lines(client, done.output_file_id)
            await client.close()
    assert sorted(line["custom_id"] for line in lines) == sorted(custom_ids)
    assert done.request_counts is not None and done.request_counts.completed == len(custom_ids)
    for line in lines:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == f"answer {line['custom_id']}"


async def test_a_clean_stop_lets_go_every_batch_its_instance_owns_for_the_next_to_take_at_once(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A claim committed in PostgreSQL just as the gateway stops (its answer cut short) owns
    a batch the runner never ran: the stop lets it go all the same, so the next gateway runs
    it at once instead of waiting for the stopped one to be judged silent."""
    fake = OpenAIBackend(default=ECHO)
    async with fake.serve() as server:
        config = backend("vllm", server.url, default=True)
        async with gateway(pg_database_url, nats_url, config) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            uploaded = await client.files.create(file=("input.jsonl", jsonl(chat_line("only"))), purpose="batch")
            await client.close()
            [(me,)] = await sql(pg_database_url, "SELECT id FROM gateway_instances")
            # As that claim left it: owned here, not running here.
            await sql(
                pg_database_url, "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, owner, "
                "expires_at) VALUES ('batch_stranded', '/v1/chat/completions', %s, '24h', 'validating', %s, "
                "now() + interval '24 hours')", uploaded.id, me,
            )
        assert await sql(pg_database_url, "SELECT status, owner FROM batches WHERE id = 'batch_stranded'") == [("validating", None)]
        # The stopped instance's heartbeat looks fresh: only a batch let go is taken now.
        await sql(pg_database_url, "UPDATE gateway_instances SET seen_at = now() WHERE id = %s", me)
        async with gateway(pg_database_url, nats_url, config) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            done = await until_status(client, "batch_stranded", "completed", "failed", within=10)
            await client.close()
    assert done.status == "completed" and chats(fake) == 1


async def test_a_batch_whose_gateway_process_is_killed_is_finished_by_another_each_line_once(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """SIGKILL mid-batch: nothing is let go, and the lines in flight had no row written. Once the
    killed process's heartbeat is silent (aged here), another gateway takes the batch over."""
    fake = OpenAIBackend(default=Script(echo=True, usage=Usage(1, 1), header_delay=0.3))
    custom_ids = [f"line-{i}" for i in range(16)]
    async with fake.serve() as server:
        async with gateway_process(server.url, pg_database_url, nats_url) as (url, process):
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            batch = await submit(client, jsonl(*(chat_line(custom_id) for custom_id in custom_ids)))
            await eventually(lambda: trio_value(chats(fake) >= 5), within=20)
            process.kill()
            await client.close()
        [(status, owner)] = await sql(pg_database_url, "SELECT status, owner FROM batches WHERE id = %s", batch.id)
        assert status == "in_progress" and owner is not None
        async with gateway(
            pg_database_url, nats_url, backend("vllm", server.url, default=True), batches=BatchSettings(poll_seconds=0.2)
        ) as url:
            await sql(pg_database_url, "UPDATE gateway_instances SET seen_at = now() - interval '1 hour' WHERE id = %s", owner)
            # The survivor has beaten steadily long enough to judge another instance dead.
            await sql(pg_database_url, "UPDATE gateway_instances SET steady_since = now() - interval '1 hour' WHERE id <> %s", owner)
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            done = await until_status(client, batch.id, "completed", within=30)
            lines = await output_lines(client, done.output_file_id)
            await client.close()
    assert sorted(line["custom_id"] for line in lines) == sorted(custom_ids)
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.total) == (16, 16)
    for line in lines:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == f"answer {line['custom_id']}"
    assert chats(fake) >= len(custom_ids)  # the lines cut in flight were sent again


async def test_a_batchs_counts_are_kept_on_its_row_each_line_counted_once_even_recorded_by_two_processes(
    aio_loop: object, pg_database_url: str
) -> None:
    """Reading a batch reads its row, not a sum over its (tens of thousands of) lines: each
    line adds its counts and tokens as it is recorded, once, though two processes record it."""
    async with open_database(pg_database_url) as one, open_database(pg_database_url) as two:
        await migrate(one)
        here, there = BatchStore(one), BatchStore(two)
        file = await here.add_file("file-in", None, "batch", "in.jsonl", b"{}\n")
        await here.add_batch("batch_counted", None, None, "/v1/chat/completions", file["id"], "24h", None)
        answer = {"custom_id": "a", "response": {"status_code": 200}, "error": None}
        async with trio.open_nursery() as nursery:  # the same line, both at once
            for store in (here, there, here, there):
                nursery.start_soon(store.record, "batch_counted", 1, True, answer, (7, 3, 2, 1))
        await there.record("batch_counted", 2, False, {"custom_id": "b", "error": {"code": "x"}}, (0, 0, 0, 0))
        found = await here.batch("batch_counted", None)
        assert found is not None
        assert (found["completed"], found["failed"], found["input_tokens"], found["output_tokens"]) == (1, 1, 7, 3)
        assert (found["cached_tokens"], found["reasoning_tokens"]) == (2, 1)
        # What was read: the row's own counts.
        row = await one.fetchrow(
            "SELECT completed, failed, input_tokens, output_tokens, cached_tokens, reasoning_tokens FROM batches "
            "WHERE id = 'batch_counted'"
        )
        assert tuple(row or ()) == (1, 1, 7, 3, 2, 1)


async def test_a_line_recorded_by_a_process_presumed_dead_while_another_finalizes_the_batch_waits_not_deadlocks(
    aio_loop: object, pg_database_url: str
) -> None:
    """The batch's finalizer (its row locked) records a line unrun while the presumed-dead
    process records the same line's answer: that one waits for the finalizer, then adds nothing."""
    async with open_database(pg_database_url) as one, open_database(pg_database_url) as two:
        await migrate(one)
        store = BatchStore(one)
        file = await store.add_file("file-in", None, "batch", "in.jsonl", b"{}\n")
        await store.add_batch("batch_ending", None, None, "/v1/chat/completions", file["id"], "24h", None)
        answer = {"custom_id": "a", "response": {"status_code": 200}, "error": None}
        unrun = {"custom_id": "a", "response": None, "error": {"code": "batch_expired"}}

        async def waiting_for_a_lock() -> bool:
            rows = await sql(pg_database_url, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                             "AND datname = current_database()")
            return bool(rows[0][0])

        async with trio.open_nursery() as nursery:
            async with one.transaction() as tx:  # as `finalize` does
                await tx.fetchrow("SELECT id FROM batches WHERE id = 'batch_ending' FOR UPDATE")
                nursery.start_soon(BatchStore(two).record, "batch_ending", 1, True, answer, (7, 3, 0, 0))
                await eventually(waiting_for_a_lock, within=10)
                await record_line(tx, "batch_ending", 1, False, unrun, (0, 0, 0, 0))
        found = await store.batch("batch_ending", None)
    assert found is not None and (found["completed"], found["failed"], found["input_tokens"]) == (0, 1, 0)


async def test_a_batch_recorded_before_its_counts_were_kept_on_its_row_keeps_them_after_the_upgrade(
    aio_loop: object, pg_database_url: str, tmp_path: Path
) -> None:
    """A gateway upgraded mid-batch: 0022 sums the lines recorded before it onto the row."""
    before = tmp_path / "sql"
    before.mkdir()
    for migration in load_migrations():
        if migration.version < 22:
            (before / f"{migration.name}.sql").write_text(migration.sql)
    async with open_database(pg_database_url) as db:
        await migrate(db, directory=before)
        await db.execute(
            "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, expires_at) "
            "VALUES ('batch_old', '/v1/messages', 'file-x', '24h', 'in_progress', now() + interval '1 day')"
        )
        await db.execute(
            "INSERT INTO batch_lines (batch_id, line, ok, output, input_tokens, output_tokens, cached_tokens, "
            "reasoning_tokens) VALUES ('batch_old', 1, true, '{}', 5, 2, 1, 0), ('batch_old', 2, false, '{}', 0, 0, 0, 0), "
            "('batch_old', 3, false, '{\"error\": {\"code\": \"batch_expired\"}}', 0, 0, 0, 0)"
        )
        assert "0022_batch_counts" in await migrate(db)  # and any later one
        found = await BatchStore(db).message_batch("batch_old", None)
    assert found is not None
    assert (found["completed"], found["failed"], found["expired"], found["input_tokens"], found["cached_tokens"]) == (1, 2, 1, 5, 1)


async def test_a_batch_is_its_keys_own_and_spends_its_keys_limits(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    fake = OpenAIBackend(default=Script(tokens=["ok"], usage=Usage(5, 5)))
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        owner, other = await new_key(pg_database_url, "batch-owner", "--rpm", "2"), await new_key(pg_database_url, "other")
        await wait_for_key(url, owner)
        mine = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=owner, max_retries=0)
        theirs = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=other, max_retries=0)
        batch = await submit(mine, jsonl(*(chat_line(f"line-{i}") for i in range(4))))
        with pytest.raises(openai.NotFoundError):
            await theirs.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            await theirs.files.content(batch.input_file_id)
        assert (await theirs.batches.list()).data == []
        # Its key may make 2 requests a minute: the batch makes two, then waits for the next
        # minute rather than failing its lines, and the key's own requests are refused meanwhile.
        await eventually(lambda: trio_value(chats(fake) >= 2), within=15)
        with pytest.raises(openai.RateLimitError):
            await mine.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        async def two_answered() -> Batch | None:
            found = await mine.batches.retrieve(batch.id)
            return found if found.request_counts is not None and found.request_counts.completed >= 2 else None

        waiting = await eventually(two_answered, within=10)
        assert waiting.status == "in_progress" and waiting.request_counts is not None
        assert (waiting.request_counts.completed, waiting.request_counts.failed) == (2, 0)
        assert chats(fake) == 2
        await mine.batches.cancel(batch.id)
        cancelled = await until_status(mine, batch.id, "cancelled", within=70)
        assert cancelled.request_counts is not None and cancelled.request_counts.completed == 2
        # The key's usage counts the batch's lines.
        used = await sql(pg_database_url, "SELECT sum(requests) FROM api_key_usage u JOIN api_keys k ON k.id = u.key_id WHERE k.name = 'batch-owner'")
        assert used and used[0][0] is not None and used[0][0] >= 2
        await mine.close()
        await theirs.close()


async def test_a_batch_waiting_for_its_keys_rate_limit_does_not_hold_up_another_keys_batch(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """One slot, taken by a batch whose key may send a request a minute: while its lines wait
    for the next minute, another key's batch runs in the slot and ends."""
    fake = OpenAIBackend(default=Script(tokens=["ok"], usage=Usage(1, 1)))
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True), batches=BatchSettings(concurrency=1)
    ) as url:
        slow, other = await new_key(pg_database_url, "one-a-minute", "--rpm", "1"), await new_key(pg_database_url, "unlimited")
        await wait_for_key(url, slow)
        waiting = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=slow, max_retries=0)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=other, max_retries=0)
        held = await submit(waiting, jsonl(*(chat_line(f"slow-{i}") for i in range(4))))
        await eventually(lambda: trio_value(chats(fake) >= 1), within=10)
        await trio.sleep(0.5)  # its second line is refused: it waits a minute
        batch = await submit(client, jsonl(chat_line("first"), chat_line("second")))
        done = await until_status(client, batch.id, "completed", within=15)
        assert done.request_counts is not None and done.request_counts.completed == 2
        assert [line["custom_id"] for line in await output_lines(client, done.output_file_id)] == ["first", "second"]
        still = await waiting.batches.retrieve(held.id)
        assert still.status == "in_progress" and still.request_counts is not None and still.request_counts.completed == 1
        await waiting.batches.cancel(held.id)
        await until_status(waiting, held.id, "cancelled", within=15)
        await waiting.close()
        await client.close()


async def test_a_batch_waits_out_its_backends_outage_instead_of_failing_its_lines(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """The backend is down when the batch starts (a restart): its lines, answered 503, are sent
    again with a backoff, and answered once it is back."""
    port = free_port()
    fake = OpenAIBackend(default=ECHO)
    async with gateway(pg_database_url, nats_url, backend("vllm", f"http://127.0.0.1:{port}", default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        batch = await submit(client, jsonl(*(chat_line(f"line-{i}") for i in range(6))))
        await until_status(client, batch.id, "in_progress")
        await trio.sleep(1.5)
        waiting = await client.batches.retrieve(batch.id)
        assert waiting.status == "in_progress" and waiting.request_counts is not None
        assert (waiting.request_counts.completed, waiting.request_counts.failed) == (0, 0)
        async with fake.serve(port=port):
            done = await until_status(client, batch.id, "completed", "failed", within=40)
        await client.close()
    assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (6, 0)
    assert done.error_file_id is None and chats(fake) == 6


async def test_a_batch_spends_its_keys_budget_and_the_lines_past_it_are_refused(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(tokens=["ok"], usage=Usage(5, 5)))  # 10 tokens a line
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True), batches=BatchSettings(concurrency=1)
    ) as url:
        key = await new_key(pg_database_url, "batch-budget", "--budget", "25")
        await wait_for_key(url, key)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        batch = await submit(client, jsonl(*(chat_line(f"line-{i}") for i in range(5))))
        done = await until_status(client, batch.id, "completed", within=30)
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (3, 2)  # the third crossed it
        refused = await output_lines(client, done.error_file_id)
        assert [line["custom_id"] for line in refused] == ["line-3", "line-4"]
        for line in refused:
            assert line["response"]["status_code"] == 429
            assert line["response"]["body"]["error"]["code"] == "insufficient_quota"
        assert chats(fake) == 3
        await client.close()


async def test_an_upload_has_its_own_size_limit(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    """Files may be larger than a chat's body (`max_body_bytes`), up to `file_max_bytes`, which a
    larger one's 413 names."""
    fake = OpenAIBackend(default=ECHO)
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True),
        max_body_bytes=4000, batches=BatchSettings(file_max_bytes=20_000),
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        content = jsonl(*(chat_line(f"line-{i}", "x" * 50) for i in range(60)))
        assert 4000 < len(content) < 20_000
        uploaded = await client.files.create(file=("big.jsonl", content), purpose="batch")
        assert (await client.files.content(uploaded.id)).content == content
        with pytest.raises(openai.APIStatusError) as too_large:
            await client.files.create(file=("bigger.jsonl", content * 2), purpose="batch")
        assert too_large.value.status_code == 413 and "20000 bytes" in too_large.value.message
        with pytest.raises(openai.APIStatusError) as chat:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 5000}])
        assert chat.value.status_code == 413 and "4000 bytes" in chat.value.message
        await client.close()


async def test_a_big_file_is_downloaded_a_slice_at_a_time_byte_for_byte(stack: Stack) -> None:
    """A file of megabytes (a batch's output) is read from the database a slice at a time, not
    whole: stored as it is (a slice of a compressed value costs decompressing all before it),
    its download exact across the slices; one stored compressed (before 0022) is read whole."""
    content = jsonl(*(chat_line(f"line-{n}", "x" * (n % 300)) for n in range(12_000)))
    assert len(content) > 2.5 * 2**20
    big = await stack.client.files.create(file=("big.jsonl", content), purpose="batch")
    await sql(stack.db, "ALTER TABLE files ALTER COLUMN content SET STORAGE EXTENDED")
    try:
        old = await stack.client.files.create(file=("old.jsonl", content), purpose="batch")
    finally:
        await sql(stack.db, "ALTER TABLE files ALTER COLUMN content SET STORAGE EXTERNAL")
    stored = dict(await sql(stack.db, "SELECT id, pg_column_compression(content) FROM files"))
    assert stored[big.id] is None and stored[old.id] is not None
    for file in (big, old):
        assert (await stack.client.files.content(file.id)).content == content
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        downloaded = await http.get(f"/v1/files/{big.id}/content")
    assert downloaded.headers["content-length"] == str(len(content)) and downloaded.content == content


async def test_files_and_outputs_expire_as_asked_with_openais_expires_after(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=ECHO)
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True), batches=BatchSettings(poll_seconds=0.2)
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        content = jsonl(chat_line("only"))
        kept = await client.files.create(
            file=("in.jsonl", content), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
        )
        assert kept.expires_at == kept.created_at + 3600
        assert (await client.files.retrieve(kept.id)).expires_at == kept.expires_at
        # Without `expires_after`, OpenAI's default for a `batch` file: 30 days, not for good.
        plain = await client.files.create(file=("in.jsonl", content), purpose="batch")
        assert plain.expires_at == plain.created_at + 30 * 86400
        for policy, param in (({"anchor": "created_at", "seconds": 60}, "expires_after.seconds"),
                              ({"anchor": "last_active_at", "seconds": 3600}, "expires_after.anchor")):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.files.create(file=("in.jsonl", content), purpose="batch", expires_after=policy)  # type: ignore[arg-type]
            assert isinstance(refused.value.body, dict) and refused.value.body["param"] == param
        with pytest.raises(openai.BadRequestError) as refused:
            await client.batches.create(
                input_file_id=kept.id, endpoint="/v1/chat/completions", completion_window="24h",
                output_expires_after={"anchor": "created_at", "seconds": 31 * 86400},
            )
        assert isinstance(refused.value.body, dict) and refused.value.body["param"] == "output_expires_after.seconds"
        batch = await client.batches.create(
            input_file_id=kept.id, endpoint="/v1/chat/completions", completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 7200},
        )
        done = await until_status(client, batch.id, "completed")
        output = await client.files.retrieve(done.output_file_id or "")
        assert output.expires_at == output.created_at + 7200
        # Past its time, a file is gone.
        await sql(pg_database_url, "UPDATE files SET expires_at = now() - interval '1 second' WHERE id = %s", kept.id)

        async def gone() -> bool:
            try:
                await client.files.retrieve(kept.id)
            except openai.NotFoundError:
                return True
            return False

        await eventually(gone, within=10)
        assert (await client.files.content(output.id)).text.count("\n") == 1  # the others stay
        await client.close()


def test_the_batches_settings_are_read_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[batches]\nconcurrency = 2\nfile_max_bytes = 1000\n")
    settings = load_settings(config, {})
    assert (settings.batches.concurrency, settings.batches.file_max_bytes, settings.batches.max_lines) == (2, 1000, 50_000)
    for text, key in (("[batches]\nconcurrency = 0\n", "batches.concurrency"), ("[batches]\nthreads = 2\n", "batches.threads")):
        config.write_text(text)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_settings(config, {})


async def test_a_batchs_lines_keep_to_its_keys_scope_and_stop_once_it_is_revoked(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(tokens=["ok"], usage=Usage(1, 1), header_delay=0.3))
    async with fake.serve() as server, gateway(
        pg_database_url, nats_url, backend("vllm", server.url, default=True), batches=BatchSettings(concurrency=1)
    ) as url:
        key = await new_key(pg_database_url, "scoped", "--models", "m")
        await wait_for_key(url, key)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        forbidden = chat_line("forbidden")
        forbidden["body"]["model"] = "other"
        outside = await submit(client, jsonl(forbidden))
        refused_batch = await until_status(client, outside.id, "completed")
        [refusal] = await output_lines(client, refused_batch.error_file_id)
        assert refusal["response"]["status_code"] == 403
        assert refusal["response"]["body"]["error"]["code"] == "model_not_allowed"
        batch = await submit(client, jsonl(chat_line("first"), *(chat_line(f"line-{i}") for i in range(6))))

        async def two_answered() -> bool:
            rows = await sql(pg_database_url, "SELECT count(*) FROM batch_lines WHERE batch_id = %s", batch.id)
            return bool(rows[0][0] >= 2)

        await eventually(two_answered, within=10)
        code, out, _ = await trio.to_thread.run_sync(lambda: keys_cli(pg_database_url, "revoke", key[:14]))
        assert code == 0 and "revoked key" in out
        await eventually(lambda: status_of(pg_database_url, batch.id, "completed"), within=15)
        await client.close()
    files = await sql(
        pg_database_url, "SELECT f.content FROM files f JOIN batches b ON f.id IN (b.output_file_id, b.error_file_id) "
        "WHERE b.id = %s", batch.id,
    )  # its key revoked, its output is read in the database
    lines = {
        output["custom_id"]: output["response"]
        for (content,) in files for output in map(json.loads, bytes(content).decode().splitlines())
    }
    assert lines["first"]["status_code"] == 200
    refused = [response for custom_id, response in lines.items() if response["status_code"] == 401]
    assert refused and all(response["body"]["error"]["code"] == "revoked_api_key" for response in refused)
    # Only what the key could still ask reached the backend (the line in flight at the revocation, at most).
    assert chats(fake) <= 7 - len(refused)


async def status_of(db: str, batch_id: str, status: str) -> bool:
    return await sql(db, "SELECT status FROM batches WHERE id = %s", batch_id) == [(status,)]


async def test_a_batch_past_its_window_expires_with_its_unrun_lines_in_the_error_file(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(echo=True, usage=Usage(1, 1), header_delay=0.3))
    custom_ids = [f"line-{i}" for i in range(12)]
    async with fake.serve() as server:
        config = backend("vllm", server.url, default=True)
        async with gateway(pg_database_url, nats_url, config, shutdown_grace_seconds=0.1) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            batch = await submit(client, jsonl(*(chat_line(custom_id) for custom_id in custom_ids)))
            await until_status(client, batch.id, "in_progress")
            await client.close()
        # Resumed with less than a second of its 24 h left.
        await sql(pg_database_url, "UPDATE batches SET expires_at = now() + interval '800 milliseconds' WHERE id = %s", batch.id)
        async with gateway(pg_database_url, nats_url, config, batches=BatchSettings(concurrency=1)) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            expired = await until_status(client, batch.id, "expired")
            answered = await output_lines(client, expired.output_file_id)
            unrun = await output_lines(client, expired.error_file_id)
            await client.close()
    assert expired.expired_at and expired.request_counts is not None
    assert sorted(line["custom_id"] for line in answered + unrun) == sorted(custom_ids)
    assert unrun and all(line["response"] is None and line["error"]["code"] == "batch_expired" for line in unrun)
    assert (expired.request_counts.completed, expired.request_counts.failed) == (len(answered), len(unrun))


def test_an_input_files_lines_are_read_one_at_a_time_numbered_and_sent_without_stream() -> None:
    streamed = chat_line("b")
    streamed["body"] |= {"stream": True, "stream_options": {"include_usage": True}, "model": "m"}
    content = jsonl(chat_line("a")) + b"\n  \n" + jsonl(streamed).rstrip(b"\n")  # no last newline
    lines, faults = parse_lines(content, "/v1/chat/completions", 10)
    assert faults == [] and [(line.number, line.custom_id, line.model) for line in lines] == [(1, "a", "m"), (4, "b", "m")]
    # Its answer is waited for whole: a batch line is sent without `stream`.
    assert json.loads(lines[1].payload) == {"model": "m", "messages": [{"role": "user", "content": "answer b"}]}
