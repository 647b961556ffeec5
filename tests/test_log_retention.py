"""The completion log's retention (`log_retention_seconds`, 30 days by default, as OpenAI keeps
stored Responses and chat completions): a gateway running for months deletes the rows of runs
made longer ago than that once they have ended, and every reader answers for such a run as
OpenAI does for an expired one; what lives beside the log (conversations, key budgets and
usage) is not changed by it. Rows are aged with `UPDATE`, on real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from proxy.config import ConfigError, load_settings
from proxy.infra.embedded import EmbeddedNats
from proxy.infra.nats import _hop, open_bus
from proxy.services.journal import EVENTS_STREAM
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend
from tests.test_auth_helpers import bearer, eventually, gateway, new_key, sql, wait_for_key
from tests.test_persistence import wait_for_row
from tests.test_responses_stored import QUICK, Stack, journaled_stack, trace

pytest_plugins = ["tests.infra_servers"]


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    async with journaled_stack(pg_database_url, nats_url, OpenAIBackend(default=QUICK)) as built:
        yield built


async def age(db: str, traces: list[str], days: int) -> None:
    """Make the runs `traces` `days` old, as a gateway running for months has them."""
    await sql(
        db, "UPDATE chat_log SET created_at = now() - make_interval(days => %s), updated_at = now() - make_interval(days => %s) "
        "WHERE trace_id = ANY(%s)", days, days, traces,
    )


async def kept(db: str, traces: list[str]) -> int:
    [(count,)] = await sql(db, "SELECT count(*) FROM chat_log WHERE trace_id = ANY(%s)", traces)
    return int(count)


async def purged(url: str, db: str, traces: list[str], headers: dict[str, str] | None = None) -> None:
    """Until the rows `traces` are gone: the log is purged after its group commits (at most a
    purge a second while it finds nothing), so chats are made until then."""

    async def gone() -> bool:
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as http:
            answered = await http.post(
                "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": str(uuid.uuid4())}]}
            )
            assert answered.status_code == 200, answered.text
        return await kept(db, traces) == 0

    await eventually(gone, within=15.0, every=0.3)


async def test_a_month_old_response_is_gone_for_every_reader_and_younger_or_running_ones_stay(stack: Stack) -> None:
    client = stack.client
    old = await client.responses.create(model="m", input="Remember: the secret is 42.", instructions="Be brief.")
    continued = await client.responses.create(model="m", input="What is the secret?", previous_response_id=old.id)
    young = await client.responses.create(model="m", input="A newer question.")
    raw = await client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "Stored, a month ago."}], store=True
    )
    completion, completion_trace = raw.parse(), raw.headers["x-trace-id"]
    conversation = await client.conversations.create()
    in_conversation = await client.responses.create(model="m", input="Said in a conversation.", conversation=conversation.id)
    old_traces = [trace(old.id), completion_trace, trace(in_conversation.id)]
    for run in [*old_traces, trace(continued.id), trace(young.id)]:
        await wait_for_row(stack.db, run, "completed")
    items_before = (await client.responses.input_items.list(continued.id)).model_dump()["data"]
    conversation_before = (await client.conversations.items.list(conversation.id)).model_dump()["data"]
    running = f"running-{uuid.uuid4()}"  # a run made 31 days ago that is still going on
    await sql(
        stack.db, "INSERT INTO chat_log (trace_id, req_id, dialect, model, stream, status, request) "
        "VALUES (%s, 'r', 'openai', 'm', false, 'running', '{}'::jsonb)", running,
    )
    await age(stack.db, [*old_traces, running], 31)
    await age(stack.db, [trace(continued.id), trace(young.id)], 29)

    await purged(stack.url, stack.db, old_traces)
    async with open_bus(stack.nats) as bus:  # a run's events live no longer than its row (here: faked)
        for run in old_traces:
            await bus.purge("EVENTS", f"evt.chat.{run}")

    assert await kept(stack.db, [running, trace(continued.id), trace(young.id)]) == 3
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.retrieve(old.id)
    assert missing.value.body["message"].startswith(f"Response with id '{old.id}' not found.")  # type: ignore[index]
    assert "30 days" in missing.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        await client.responses.input_items.list(old.id)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.responses.create(model="m", input="And now?", previous_response_id=old.id)
    assert refused.value.code == "previous_response_not_found"
    assert "30 days" in refused.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as gone:
        await client.chat.completions.retrieve(completion.id)
    assert "30 days" in gone.value.body["message"]  # type: ignore[index]
    assert [c.id for c in (await client.chat.completions.list()).data] == []
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as http:
        assert (await http.get(f"/v1/streams/{trace(old.id)}")).status_code == 404
        assert (await http.get(f"/v1/responses/{old.id}", params={"stream": "true"})).status_code == 404

    # What is younger is read as before: a response that continued a purged one still lists
    # its own input only, and a conversation keeps the items of its purged responses.
    assert (await client.responses.retrieve(young.id)).output_text == "The secret is 42."
    assert (await client.responses.input_items.list(continued.id)).model_dump()["data"] == items_before
    assert (await client.conversations.items.list(conversation.id)).model_dump()["data"] == conversation_before
    said = next(item["id"] for item in conversation_before if item.get("role") == "user")
    referenced = await client.responses.create(model="m", input=[{"type": "item_reference", "id": said}])
    assert referenced.status == "completed"
    assert "Said in a conversation." in str(stack.fake.requests[-1].json)


async def test_key_budgets_and_usage_do_not_change_when_a_keys_old_rows_go(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A key's budget and usage are kept apart from the log (`api_key_limits`,
    `api_key_usage`), never summed from it: its month-old rows going changes neither, and
    its next request is charged on top of what it had spent. A workflow run's job record
    goes with its row."""
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=Usage(60, 10)))
    async with fake.serve() as server, gateway(pg_database_url, nats_url, backend("vllm", server.url, default=True)) as url:
        spender, other = await new_key(pg_database_url, "spender", "--budget", "1000"), await new_key(pg_database_url, "other")
        await wait_for_key(url, spender)
        [(number,)] = await sql(pg_database_url, "SELECT id FROM api_keys WHERE name = 'spender'")
        for _ in range(3):
            async with httpx.AsyncClient(base_url=url, timeout=10, headers=bearer(spender)) as http:
                answered = await http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                assert answered.status_code == 200

        async def accounts() -> tuple[object, ...]:
            [found] = await sql(
                pg_database_url, "SELECT l.budget_used, sum(u.requests), sum(u.prompt_tokens), sum(u.completion_tokens) "
                "FROM api_key_limits l JOIN api_key_usage u ON u.key_id = l.key_id WHERE l.key_id = %s GROUP BY l.budget_used",
                number,
            )
            return tuple(found)

        async def settled() -> bool:
            return await accounts() == (210, 3, 180, 30)

        await eventually(settled)
        spent = [str(t) for (t,) in await sql(pg_database_url, "SELECT trace_id FROM chat_log WHERE tenant = %s", f"key-{number}")]
        assert len(spent) == 3
        old_job, young_job = f"wf-{uuid.uuid4().hex}", f"wf-{uuid.uuid4().hex}"
        for job in (old_job, young_job):
            await sql(
                pg_database_url, "INSERT INTO chat_log (trace_id, req_id, route, dialect, model, stream, status, request) "
                "VALUES (%s, 'r', 'workflow', 'openai', 'm', false, 'completed', '{}'::jsonb)", job,
            )
            await sql(
                pg_database_url, "INSERT INTO workflow_runs (trace_id, req_id, request_id, pipeline, status, request, submitted_at) "
                "VALUES (%s, 'r', 'q', 'fanout', 'completed', '{\"secret\": 42}'::jsonb, now() - interval '31 days')", job,
            )
        await age(pg_database_url, [*spent, old_job], 31)

        await purged(url, pg_database_url, [*spent, old_job], headers=bearer(other))

        assert await accounts() == (210, 3, 180, 30)
        jobs = await sql(pg_database_url, "SELECT trace_id FROM workflow_runs WHERE trace_id = ANY(%s)", [old_job, young_job])
        assert jobs == [(young_job,)]
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=bearer(spender)) as http:
            answered = await http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            assert answered.status_code == 200

        async def charged() -> bool:
            return await accounts() == (280, 4, 240, 40)

        await eventually(charged)


async def test_a_runs_events_are_kept_no_longer_than_its_row(aio_loop: object, pg_database_url: str, tmp_path: Path) -> None:
    """`events_retention_seconds` longer than `log_retention_seconds` is lowered to it: a run's
    stream read again after its row expired would give back what every other reader says is gone."""
    fake = OpenAIBackend(default=QUICK)
    with EmbeddedNats(tmp_path / "nats") as nats:  # its own: the session's stream must stay as it is
        async with fake.serve() as server, gateway(
            pg_database_url, nats.url, backend("vllm", server.url, default=True), log_retention_seconds=3600,
        ), open_bus(nats.url) as bus:
            info = await _hop(bus._js.stream_info, EVENTS_STREAM)
            assert info.config.max_age == 3600


def test_the_log_retention_is_read_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    assert load_settings(config, {}).log_retention_seconds == 30 * 86400  # OpenAI's 30 days
    config.write_text("log_retention_seconds = 604800\n")
    assert load_settings(config, {}).log_retention_seconds == 604800
    for value in ("0", "-1", "1e10", '"30d"'):
        config.write_text(f"log_retention_seconds = {value}\n")
        with pytest.raises(ConfigError, match="log_retention_seconds"):
            load_settings(config, {})


async def test_a_key_kept_longer_than_its_runs_row_runs_its_request_again(stack: Stack) -> None:
    """`idempotency_retention_seconds` set above `log_retention_seconds`: a retry with the key
    of a run whose row expired is run again (its answer is gone), never an error."""
    messages = [{"role": "user", "content": f"keyed {uuid.uuid4()}"}]
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    first = await stack.client.chat.completions.with_raw_response.create(model="m", messages=messages, extra_headers=key)  # type: ignore[arg-type]
    await wait_for_row(stack.db, first.headers["x-trace-id"], "completed")
    await age(stack.db, [first.headers["x-trace-id"]], 31)  # its key, written then, is still kept
    await purged(stack.url, stack.db, [first.headers["x-trace-id"]])
    calls = len(stack.fake.requests)
    again = await stack.client.chat.completions.with_raw_response.create(model="m", messages=messages, extra_headers=key)  # type: ignore[arg-type]
    assert again.headers.get("idempotent-replayed") is None and again.parse().choices[0].message.content == "The secret is 42."
    assert len(stack.fake.requests) == calls + 1


async def test_a_backlog_of_expired_rows_is_drained_batch_after_batch(stack: Stack) -> None:
    """A first start with a retention on months of rows: they go a batch after another as the
    gateway is used, not a batch per second, and the young ones stay."""
    await sql(
        stack.db, "INSERT INTO chat_log (trace_id, req_id, dialect, model, stream, status, request, created_at) "
        "SELECT 'backlog-' || g, 'r', 'openai', 'm', false, 'completed', '{}'::jsonb, now() - interval '40 days' "
        "FROM generate_series(1, 2500) g",
    )
    await purged(stack.url, stack.db, [f"backlog-{n}" for n in range(1, 2501)])
    [(young,)] = await sql(stack.db, "SELECT count(*) FROM chat_log WHERE created_at > now() - interval '1 day'")
    assert young > 0
