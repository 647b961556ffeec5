"""The workflow route end to end: gateway, NATS JetStream, a worker, PostgreSQL, fake backends,
official SDKs — all real, in one process (the worker is the same code `llm-proxy worker` runs)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import anthropic
import httpx
import ollama
import openai
import pytest
import trio

from proxy.config import PipelineConfig, WorkflowSettings
from proxy.dialects.events import Finished
from proxy.domain.chat import FinishReason
from proxy.domain.events import Finish, StreamStart, TextDelta
from proxy.domain.tokens import requested_tokens
from proxy.infra.backends import Batch
from proxy.infra.embedded import EmbeddedNats
from proxy.infra.nats import BusMessage, open_bus
from proxy.services.journal import EVENTS_STREAM, ensure_streams
from proxy.services.workflow import WorkflowRoute, _Follow
from proxy.workflow.bus import workers_kv
from proxy.workflow.view import ClientView, Continuity, encode
from proxy.workflow.worker import Worker, WorkerOptions
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend, running_gateway
from tests.test_auth_helpers import bearer, eventually, new_key, wait_for_key
from tests.test_persistence import wait_for_row
from tests.workflow_support import (
    bus_events,
    fanout,
    key_charged,
    pipeline_name,
    rows,
    run_row,
    running_worker,
    worker_settings,
    workflow,
)

pytest_plugins = ["tests.infra_servers"]

MESSAGES: Any = [{"role": "user", "content": "Name a colour"}]
RED = ["Red", " is", " warm", "."]


@dataclass
class Stack:
    alpha: OpenAIBackend
    beta: OpenAIBackend
    url: str
    db: str
    nats: str
    pipeline: str
    client: openai.AsyncOpenAI


@asynccontextmanager
async def workflow_stack(
    db: str, nats: str, pipelines: dict[str, PipelineConfig], *, worker: bool = True, **fields: Any
) -> AsyncIterator[tuple[str, OpenAIBackend, OpenAIBackend, WorkflowSettings]]:
    """Two fake OpenAI backends (models `alpha-*`, `beta-*`), a gateway, and a worker."""
    alpha = OpenAIBackend(default=Script(tokens=RED, usage=Usage(5, 4)))
    beta = OpenAIBackend(default=Script(tokens=["Blue"], usage=Usage(5, 1), header_delay=0.8))
    settings = workflow(pipelines, **fields)
    async with alpha.serve() as a, beta.serve() as b:
        backends = [backend("alpha", a.url, prefixes=("alpha-",)), backend("beta", b.url, prefixes=("beta-",))]
        async with running_gateway(*backends, database_url=db, nats_url=nats, workflow=settings) as url:
            if not worker:
                yield url, alpha, beta, settings
                return
            worker_config = worker_settings(backends, database_url=db, nats_url=nats, workflow=settings)
            async with running_worker(worker_config, pipelines=list(pipelines)):
                yield url, alpha, beta, settings


@pytest.fixture
async def stack(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[Stack]:
    name = pipeline_name()
    pipelines = {name: fanout(models=["alpha-1", "beta-1"])}
    async with workflow_stack(pg_database_url, nats_url, pipelines) as (url, alpha, beta, _):
        client = openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="unused", max_retries=0, default_headers={"x-pipeline": name}
        )
        yield Stack(alpha, beta, url, pg_database_url, nats_url, name, client)
        await client.close()


def text_of(chunks: list[Any], choice: int = 0) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == choice)


# -- fanout through the SDKs -----------------------------------------------------------------


async def test_fanout_streams_the_first_finisher_through_the_openai_sdk(stack: Stack) -> None:
    with trio.fail_after(10):
        stream = await stack.client.chat.completions.with_raw_response.create(
            model="colours", messages=MESSAGES, stream=True
        )
        trace_id = stream.headers["x-trace-id"]
        assert stream.headers["x-pipeline"] == stack.pipeline
        chunks = [chunk async for chunk in stream.parse()]
    assert text_of(chunks) == "Red is warm."
    assert {c.choices[0].index for c in chunks if c.choices} == {0}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == "colours"

    row = await run_row(stack.db, trace_id, status="completed")
    assert (row["winner"], row["content"], row["finish_reason"], row["attempts"]) == ("alpha-1", "Red is warm.", "stop", 1)
    tasks = {t["task"]: t for t in row["data"]["tasks"]}
    assert tasks["A"]["status"] == "completed"
    assert tasks["B"]["status"] == "cancelled"  # `first`, winner view: nobody will read the loser
    await stack.beta.wait_idle()

    events = await bus_events(stack.nats, trace_id)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["role", "tasks"]
    assert events[1]["tasks"] == [{"task": "A", "model": "alpha-1"}, {"task": "B", "model": "beta-1"}]
    assert "".join(e["text"] for e in events if e["type"] == "token" and e["task"] == "A") == "Red is warm."
    assert [(e["task"], e["model"]) for e in events if e["type"] == "winner"] == [("A", "alpha-1")]
    assert kinds.count("finished") == 1 and kinds[-1] == "finished"
    assert events[-1] | {"seq": 0} == {"seq": 0, "type": "finished", "reason": "stop", "status": "completed", "winner": "alpha-1"}
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    usage = next(e for e in events if e["type"] == "usage")["usage"]
    assert usage["prompt_tokens"] == 5  # the loser was cancelled before it reported any


async def test_stream_resume_of_a_workflow_trace_is_the_clients_view(stack: Stack) -> None:
    with trio.fail_after(10):
        reply = await stack.client.chat.completions.with_raw_response.create(model="colours", messages=MESSAGES, stream=True)
        trace_id = reply.headers["x-trace-id"]
        assert text_of([chunk async for chunk in reply.parse()]) == "Red is warm."
        while True:  # the log row is written once the client has its answer
            if await trio.to_thread.run_sync(
                rows, stack.db, "SELECT 1 FROM chat_log WHERE trace_id = %s AND status = 'completed'", trace_id
            ):
                break
            await trio.sleep(0.05)

    def frames(text: str) -> list[tuple[int, dict[str, Any]]]:
        blocks = [block.split("\n") for block in text.split("\n\n") if block]
        return [(int(lines[0][len("id: "):]), json.loads(lines[2][len("data: "):])) for lines in blocks]

    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        whole = frames((await client.get(f"/v1/streams/{trace_id}")).text)
        tail = frames((await client.get(f"/v1/streams/{trace_id}", params={"after": 3})).text)
    # What the client saw, numbered as it saw it: no `tasks`/`winner` bookkeeping, no gaps.
    assert [seq for seq, _ in whole] == list(range(1, len(whole) + 1))
    kinds = [body["type"] for _, body in whole]
    assert kinds[0] == "role" and kinds[-1] == "finished" and kinds.count("finished") == 1
    assert "".join(body["text"] for _, body in whole if body["type"] == "token") == "Red is warm."
    assert {body["task"] for _, body in whole if "task" in body} == {"A"}
    assert whole[-1][1]["winner"] == "alpha-1"
    assert tail == whole[3:]


async def test_a_nul_character_does_not_make_the_run_unwritable(stack: Stack) -> None:
    stack.alpha.set_script(Script(tokens=["Red\u0000", " is warm."], usage=Usage(5, 2)))
    with trio.fail_after(10):
        reply = await stack.client.chat.completions.with_raw_response.create(model="colours", messages=MESSAGES)
    assert reply.parse().choices[0].message.content == "Red\u0000 is warm."  # the client gets it as sent
    row = await run_row(stack.db, reply.headers["x-trace-id"], status="completed")
    assert row["content"] == "Red\ufffd is warm."  # PostgreSQL text cannot hold U+0000


async def test_request_options_pick_the_rule_and_n_shows_every_model(stack: Stack) -> None:
    longest: Any = {"workflow": {"rule": "longest"}}
    with trio.fail_after(10):
        reply = await stack.client.chat.completions.with_raw_response.create(
            model="colours", messages=MESSAGES, extra_body=longest
        )
    assert reply.headers["x-workflow-winner"] == "alpha-1"
    completion = reply.parse()
    assert [(c.index, c.message.content) for c in completion.choices] == [(0, "Red is warm.")]
    assert completion.usage is not None and completion.usage.completion_tokens == 5  # both models ran to the end

    with trio.fail_after(10):
        both = await stack.client.chat.completions.create(model="colours", messages=MESSAGES, n=2)
        chunks = [c async for c in await stack.client.chat.completions.create(
            model="colours", messages=MESSAGES, n=2, stream=True
        )]
    assert sorted((c.index, c.message.content) for c in both.choices) == [(0, "Red is warm."), (1, "Blue")]
    assert (text_of(chunks, 0), text_of(chunks, 1)) == ("Red is warm.", "Blue")
    # Live: the fast model's tokens are on the wire before the slow one has answered at all.
    first_blue = next(i for i, c in enumerate(chunks) if c.choices and c.choices[0].index == 1)
    assert text_of(chunks[:first_blue], 0) == "Red is warm."

    with pytest.raises(openai.BadRequestError, match="`n` must be 1 or the number of fanout models"):
        await stack.client.chat.completions.create(model="colours", messages=MESSAGES, n=3)


async def test_judge_rule_asks_the_judge_model(stack: Stack) -> None:
    stack.alpha.set_script(Script(tokens=["The best is B."]), model="alpha-judge")
    judged: Any = {"workflow": {"rule": "judge", "judge_model": "alpha-judge"}}
    with trio.fail_after(10):
        reply = await stack.client.chat.completions.with_raw_response.create(
            model="colours", messages=MESSAGES, extra_body=judged
        )
    assert reply.parse().choices[0].message.content == "Blue"
    row = await run_row(stack.db, reply.headers["x-trace-id"], status="completed")
    assert row["winner"] == "beta-1" and row["data"]["judge"]["reply"] == "The best is B."
    prompt = stack.alpha.requests[-1].json["messages"][1]["content"]
    assert "Answer A:\nRed is warm." in prompt and "Answer B:\nBlue" in prompt


THINKING = ["<think>", "Answer", " A", " is", " warm"] + [" hmm"] * 20 + [" but", " B", " is", " shorter", "</think>", "Answer: B"]


@pytest.mark.parametrize(
    "judge",
    [
        Script(tokens=["A better answer is B."]),  # the article is not task A
        Script(tokens=THINKING),  # a thinking model: 30 tokens of thought first, weighing both
        Script(tokens=['{"best": "B"}']),  # the structured answer
    ],
    ids=["prose", "thinking", "structured"],
)
async def test_the_judge_verdict_is_read_from_what_the_judge_means(stack: Stack, judge: Script) -> None:
    stack.alpha.set_script(judge, model="alpha-judge")
    judged: Any = {"workflow": {"rule": "judge", "judge_model": "alpha-judge"}}
    with trio.fail_after(10):
        reply = await stack.client.chat.completions.with_raw_response.create(
            model="colours", messages=MESSAGES, extra_body=judged
        )
    assert reply.parse().choices[0].message.content == "Blue"
    asked = stack.alpha.requests[-1].json
    assert asked["response_format"]["json_schema"]["schema"]["properties"]["best"]["enum"] == ["A", "B"]
    assert asked["max_tokens"] >= 1024


async def test_a_judge_without_structured_output_is_asked_in_plain_words(stack: Stack) -> None:
    stack.alpha.set_script(Script(status=400), model="alpha-judge")
    judged: Any = {"workflow": {"rule": "judge", "judge_model": "alpha-judge"}}
    with trio.fail_after(10):
        reply = await stack.client.chat.completions.with_raw_response.create(
            model="colours", messages=MESSAGES, extra_body=judged
        )
    assert reply.parse().choices[0].message.content == "Red is warm."  # no verdict: the longest
    judge_calls = [r.json for r in stack.alpha.requests if r.json.get("model") == "alpha-judge"]
    assert len(judge_calls) == 2
    assert "response_format" in judge_calls[0] and "response_format" not in judge_calls[1]
    assert "Answer: X" in judge_calls[1]["messages"][1]["content"]


async def test_ollama_and_anthropic_clients_get_the_winner_in_their_dialect(stack: Stack) -> None:
    headers = {"x-pipeline": stack.pipeline}
    client = ollama.AsyncClient(host=stack.url, headers=headers)
    with trio.fail_after(10):
        parts = [p async for p in await client.chat(model="colours", messages=MESSAGES, stream=True)]
    assert "".join(p.message.content or "" for p in parts) == "Red is warm."
    assert parts[-1].done and parts[-1].done_reason == "stop"
    with trio.fail_after(10):
        generated = await client.generate(model="colours", prompt="Which colour is warm?")
    assert generated.response == "Red is warm."

    claude = anthropic.AsyncAnthropic(base_url=stack.url, api_key="unused", max_retries=0, default_headers=headers)
    with trio.fail_after(10):
        async with claude.messages.stream(model="colours", max_tokens=64, messages=MESSAGES) as stream:
            text = "".join([t async for t in stream.text_stream])
            message = await stream.get_final_message()
    assert text == "Red is warm." and message.stop_reason == "end_turn"
    await claude.close()


async def test_the_all_view_asked_by_a_client_without_choices_shows_it_the_winner(stack: Stack) -> None:
    # Anthropic and Ollama answers have no choices: in the `all` view such a client got the
    # first model's answer (task A), whichever the judge chose.
    stack.alpha.set_script(Script(tokens=["The best is B."]), model="alpha-judge")
    options: Any = {"workflow": {"rule": "judge", "judge_model": "alpha-judge", "view": "all"}}
    headers = {"x-pipeline": stack.pipeline}
    claude = anthropic.AsyncAnthropic(base_url=stack.url, api_key="unused", max_retries=0, default_headers=headers)
    with trio.fail_after(15):
        message = await claude.messages.create(model="colours", max_tokens=64, messages=MESSAGES, extra_body=options)
    await claude.close()
    assert [block.text for block in message.content if block.type == "text"] == ["Blue"]


async def test_a_responses_client_picks_the_pipelines_options_as_a_chat_client_does(stack: Stack) -> None:
    # `workflow` in a `/v1/responses` body (the SDK's `extra_body`) was dropped: the pipeline
    # ran with its configured options, whatever the client asked.
    stack.alpha.set_script(Script(tokens=["The best is B."]), model="alpha-judge")
    options: Any = {"workflow": {"rule": "judge", "judge_model": "alpha-judge"}}
    with trio.fail_after(15):
        reply = await stack.client.responses.with_raw_response.create(model="colours", input="Name a colour", extra_body=options)
        streamed = [e async for e in await stack.client.responses.create(
            model="colours", input="Name a colour", extra_body=options, stream=True
        )]
    assert reply.headers["x-workflow-winner"] == "beta-1"
    assert reply.parse().output_text == "Blue"
    completed = next(e for e in streamed if e.type == "response.completed")
    assert completed.response.output_text == "Blue"
    with pytest.raises(openai.BadRequestError, match="`workflow` must be an object"):
        await stack.client.responses.create(model="colours", input="Name a colour", extra_body={"workflow": "judge"})


async def test_a_streaming_client_waiting_for_the_winner_gets_its_head_and_keep_alives(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The winner view shows nothing until every model has answered (rule longest): a stream
    # that sent not even its head for that long would be cut by a proxy on the way.
    monkeypatch.setattr("proxy.infra.backends._pump.KEEPALIVE_SECONDS", 0.3)
    words = [f" w{i}" for i in range(12)]
    stack.alpha.set_script(Script(tokens=words, pace=0.15))
    body = {"model": "m", "messages": MESSAGES, "stream": True, "workflow": {"rule": "longest"}}
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        started = time.monotonic()
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"x-pipeline": stack.pipeline}
        ) as response:
            head = time.monotonic() - started
            lines = [line async for line in response.aiter_lines()]
        whole = time.monotonic() - started
    assert response.status_code == 200
    assert head < whole - 0.8  # not held back until the answer
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert ": keep-alive" in lines[:first_data]
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "".join(words)


async def stored_usage(db: str, trace_id: str) -> tuple[int, int]:
    await run_row(db, trace_id, status="completed")
    found = await trio.to_thread.run_sync(
        rows, db, "SELECT prompt_tokens, completion_tokens FROM workflow_runs WHERE trace_id = %s", trace_id
    )
    return found[0][0], found[0][1]


async def test_usage_counts_every_model_call_the_pipeline_made(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    fan, echoing = pipeline_name(), pipeline_name("echo")
    pipelines = {
        fan: fanout(models=["alpha-1", "beta-1"]),
        echoing: PipelineConfig("tests.workflow_pipelines:echo", {"model": "alpha-1"}),
    }
    async with workflow_stack(pg_database_url, nats_url, pipelines) as (url, alpha, beta, _):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        # A pipeline of one's own that streams a model (README's example) reports no usage
        # itself: its client gets what the model reported, not none.
        with trio.fail_after(10):
            reply = await client.chat.completions.with_raw_response.create(
                model="m", messages=MESSAGES, extra_headers={"x-pipeline": echoing}
            )
        usage = reply.parse().usage
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (5, 4)
        assert await stored_usage(pg_database_url, reply.headers["x-trace-id"]) == (5, 4)

        # `first`: alpha wins while beta is mid-answer; beta's tokens were spent all the same.
        alpha.set_script(Script(tokens=RED, usage=Usage(5, 4), pace=0.2))
        beta.set_script(Script(n_tokens=400, pace=0.01))
        with trio.fail_after(10):
            reply = await client.chat.completions.with_raw_response.create(
                model="m", messages=MESSAGES, extra_headers={"x-pipeline": fan}
            )
        assert reply.headers["x-workflow-winner"] == "alpha-1"
        usage = reply.parse().usage
        assert usage is not None and usage.prompt_tokens > 5 and usage.completion_tokens > 4 + 10
        stored = await stored_usage(pg_database_url, reply.headers["x-trace-id"])
        assert stored == (usage.prompt_tokens, usage.completion_tokens)
        await client.close()


async def test_a_failing_model_drops_out_and_all_failing_is_an_http_error(stack: Stack) -> None:
    stack.alpha.set_script(Script(status=500, error_message="alpha is down"))
    with trio.fail_after(10):
        reply = await stack.client.chat.completions.create(model="colours", messages=MESSAGES)
    assert reply.choices[0].message.content == "Blue"

    stack.beta.set_script(Script(tokens=["Bl"], fail_after=2, fail_mode="close"))
    with trio.fail_after(10), pytest.raises(openai.APIStatusError) as caught:
        await stack.client.chat.completions.create(model="colours", messages=MESSAGES, stream=True)
    # Nothing of the answer was shown yet, so the failure is a real status, not a broken stream.
    assert caught.value.status_code == 502
    assert "All 2 fanout models failed" in caught.value.message and "alpha is down" in caught.value.message


async def test_a_model_only_a_backends_listing_names_works_in_a_pipeline(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    # No prefix or default sends `teal-7b` anywhere; the backend lists it. The gateway (which
    # checks the client's models) and the worker (which calls them) each learn it from the
    # listings, as the chat routes do, instead of answering 404.
    alpha = OpenAIBackend(default=Script(tokens=["Teal"], usage=Usage(5, 1)), models=["alpha-1", "teal-7b"])
    name = pipeline_name()
    pipelines = {name: fanout()}
    settings = workflow(pipelines)
    async with alpha.serve() as a:
        backends = [backend("alpha", a.url, prefixes=("alpha-",))]
        async with running_gateway(*backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings) as url:
            worker_config = worker_settings(backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings)
            async with running_worker(worker_config, pipelines=list(pipelines)), httpx.AsyncClient(base_url=url, timeout=10) as client:
                body = {"model": "m", "messages": MESSAGES, "workflow": {"models": ["teal-7b"]}}
                reply = await client.post("/v1/chat/completions", json=body, headers={"x-pipeline": name})
                assert reply.status_code == 200, reply.text
                assert reply.json()["choices"][0]["message"]["content"] == "Teal"
                unknown = await client.post(
                    "/v1/chat/completions", json=body | {"workflow": {"models": ["mauve-1"]}}, headers={"x-pipeline": name}
                )
                assert unknown.status_code == 404
    assert [r.json["model"] for r in alpha.requests if r.path == "/v1/chat/completions"] == ["teal-7b"]  # type: ignore[index]


async def test_a_keys_model_scope_covers_the_models_its_pipeline_is_configured_with(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A key limited to `alpha-*` may not reach `beta-1` by running a pipeline configured with
    it: a 403 naming it, in the caller's dialect, before any model is called. Its own models
    in the request's options replace the configured ones; an unscoped key runs the pipeline."""
    name = pipeline_name()
    async with workflow_stack(pg_database_url, nats_url, {name: fanout(models=["alpha-1", "beta-1"])}) as (
        url, alpha, beta, _,
    ):
        scoped = await new_key(pg_database_url, "scoped", "--models", "alpha-*", "m")
        free = await new_key(pg_database_url, "free")
        await wait_for_key(url, scoped)
        await wait_for_key(url, free)
        body = {"model": "m", "messages": MESSAGES}
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            refused = await client.post(
                "/v1/chat/completions", json=body, headers={"x-pipeline": name, **bearer(scoped)}
            )
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"]["code"] == "model_not_allowed"
            assert "`beta-1`" in refused.json()["error"]["message"]
            in_anthropic = await client.post(
                "/v1/messages", json={**body, "max_tokens": 20}, headers={"x-pipeline": name, **bearer(scoped)}
            )
            assert in_anthropic.status_code == 403 and in_anthropic.json()["type"] == "error"
            assert in_anthropic.json()["error"]["type"] == "permission_error"
            assert "`beta-1`" in in_anthropic.json()["error"]["message"]
            assert not [r for fake in (alpha, beta) for r in fake.requests if r.path == "/v1/chat/completions"]

            own = await client.post(
                "/v1/chat/completions", json=body | {"workflow": {"models": ["alpha-1"]}},
                headers={"x-pipeline": name, **bearer(scoped)},
            )
            assert own.status_code == 200, own.text
            unscoped = await client.post("/v1/chat/completions", json=body, headers={"x-pipeline": name, **bearer(free)})
            assert unscoped.status_code == 200, unscoped.text


async def test_an_idempotent_workflow_request_runs_once_and_replays(stack: Stack) -> None:
    headers = {"idempotency-key": f"colours-{stack.pipeline}"}
    with trio.fail_after(10):
        first = await stack.client.chat.completions.with_raw_response.create(
            model="colours", messages=MESSAGES, extra_headers=headers
        )
        # Until the outcome is committed (group commit lingers) a repeat attaches instead.
        await wait_for_row(stack.db, first.headers["x-trace-id"], "completed")
        again = await stack.client.chat.completions.with_raw_response.create(
            model="colours", messages=MESSAGES, stream=True, extra_headers=headers
        )
        chunks = [c async for c in again.parse()]
    assert first.parse().choices[0].message.content == text_of(chunks) == "Red is warm."
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-replay-of"] == first.headers["x-trace-id"]
    assert len(stack.alpha.requests) == 1  # one job, one model call
    # The replay says which pipeline and which of its models answered, as the first did.
    assert first.headers["x-workflow-winner"] == again.headers["x-workflow-winner"] == "alpha-1"
    assert again.headers["x-pipeline"] == first.headers["x-pipeline"] == stack.pipeline


async def test_a_deleted_workflow_response_leaves_nothing_of_what_it_said_in_its_job_record(stack: Stack) -> None:
    with trio.fail_after(20):
        answered = await stack.client.responses.create(model="colours", input="Name a colour")
        assert answered.output_text == "Red is warm."
        trace_id = answered.id.removeprefix("resp_")
        await wait_for_row(stack.db, trace_id, "completed")
        before = await run_row(stack.db, trace_id, status="completed")
        assert before["content"] == "Red is warm."
        await stack.client.responses.delete(answered.id)
        found = rows(stack.db, "SELECT status, request, content, result, data, error, completion_tokens"
                     " FROM workflow_runs WHERE trace_id = %s", trace_id)
    # The job's record stays, for the accounts, without the request and the answer.
    assert found[0][:6] == ("completed", {}, None, None, None, None) and found[0][6]
    assert "Name a colour" not in json.dumps(rows(stack.db, "SELECT * FROM workflow_runs WHERE trace_id = %s", trace_id),
                                             default=str)


async def test_a_pipelines_answer_is_never_another_routes(stack: Stack) -> None:
    """The same key and body sent to the direct route is another request: a 409, never the
    pipeline's answer replayed; nor does the exact cache serve one route's answer to another."""
    headers = {"idempotency-key": f"route-{stack.pipeline}"}
    with trio.fail_after(10):
        first = await stack.client.chat.completions.with_raw_response.create(
            model="alpha-1", messages=MESSAGES, extra_headers=headers
        )
        assert first.parse().choices[0].message.content == "Red is warm."
        await wait_for_row(stack.db, first.headers["x-trace-id"], "completed")  # the key's run is over
        with pytest.raises(openai.ConflictError):
            await stack.client.chat.completions.create(
                model="alpha-1", messages=MESSAGES, extra_headers={**headers, "x-route": "direct"}
            )
    with trio.fail_after(10):
        cached = await stack.client.chat.completions.with_raw_response.create(
            model="alpha-1", messages=MESSAGES, temperature=0, extra_headers={"x-cache": "exact"}
        )
        plain = await stack.client.chat.completions.with_raw_response.create(
            model="alpha-1", messages=MESSAGES, temperature=0, extra_headers={"x-cache": "exact", "x-route": "direct"}
        )
    assert cached.headers["x-cache"] == "miss" and plain.headers["x-cache"] == "miss"
    await wait_for_row(stack.db, cached.headers["x-trace-id"], "completed")
    with trio.fail_after(10):
        hit = await stack.client.chat.completions.with_raw_response.create(
            model="alpha-1", messages=MESSAGES, temperature=0, extra_headers={"x-cache": "exact"}
        )
    # The pipeline's answer again, saying so as it did the first time.
    assert hit.headers["x-cache"] == "hit" and hit.headers["x-replay-of"] == cached.headers["x-trace-id"]
    assert hit.headers["x-pipeline"] == stack.pipeline
    assert hit.headers["x-workflow-winner"] == cached.headers["x-workflow-winner"] == "alpha-1"


async def test_the_semantic_cache_never_gives_a_pipelines_answer_to_another_route(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A pipeline's answer (a fan-out's winner) is not the model's own, nor another
    pipeline's: asked again on the direct route or through another pipeline, the same
    conversation runs anew; through its own pipeline it is a semantic hit."""
    one, two = pipeline_name(), pipeline_name()
    pipelines = {one: fanout(models=["alpha-1", "beta-1"]), two: fanout(models=["alpha-1", "beta-1"])}
    db = pg_database_url
    body = {"model": "alpha-1", "messages": MESSAGES}
    semantic = {"x-cache": "semantic"}

    async def stored() -> bool:
        return bool(await trio.to_thread.run_sync(rows, db, "SELECT FROM semantic_cache"))

    async with workflow_stack(db, nats_url, pipelines) as (url, alpha, _, _), httpx.AsyncClient(
        base_url=url, timeout=30
    ) as client:
        first = await client.post("/v1/chat/completions", json=body, headers={**semantic, "x-pipeline": one})
        assert first.status_code == 200 and first.headers["x-cache"] == "miss"
        await eventually(stored, within=10)  # stored once its client has the answer
        calls = len(alpha.requests)
        direct = await client.post("/v1/chat/completions", json=body, headers=semantic)
        assert direct.status_code == 200 and direct.headers["x-cache"] == "miss"
        assert len(alpha.requests) == calls + 1  # the model itself answered
        other = await client.post("/v1/chat/completions", json=body, headers={**semantic, "x-pipeline": two})
        assert other.status_code == 200 and other.headers["x-cache"] == "miss"
        assert other.headers["x-pipeline"] == two
        again = await client.post("/v1/chat/completions", json=body, headers={**semantic, "x-pipeline": one})
        assert again.headers.get("x-cache") == "semantic"
        assert again.json()["choices"][0]["message"]["content"] == "Red is warm."
        assert again.headers["x-pipeline"] == one  # whose answer it is, as the first said
        assert again.headers["x-workflow-winner"] == first.headers["x-workflow-winner"] == "alpha-1"


async def test_a_default_pipelines_answer_is_cached_under_its_name(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    """A workflow request naming no pipeline runs `default_pipeline`, and its answer is that
    pipeline's: cached under its name (it was cached under "", so that once the default
    changed, the old pipeline's answers came back for the new one's requests)."""
    one, two = pipeline_name(), pipeline_name()
    pipelines = {one: fanout(models=["alpha-1", "beta-1"]), two: fanout(models=["alpha-1", "beta-1"])}
    body = {"model": "alpha-1", "messages": MESSAGES}
    semantic = {"x-cache": "semantic"}

    async def stored() -> bool:
        return bool(await trio.to_thread.run_sync(rows, pg_database_url, "SELECT FROM semantic_cache"))

    async with workflow_stack(pg_database_url, nats_url, pipelines, default_pipeline=one) as (url, *_), httpx.AsyncClient(
        base_url=url, timeout=30
    ) as client:
        first = await client.post("/v1/chat/completions", json=body, headers={**semantic, "x-route": "workflow"})
        assert first.status_code == 200 and first.headers["x-pipeline"] == one and first.headers["x-cache"] == "miss"
        await eventually(stored, within=10)
        named = await client.post("/v1/chat/completions", json=body, headers={**semantic, "x-pipeline": one})
        assert named.headers.get("x-cache") == "semantic"
        other = await client.post("/v1/chat/completions", json=body, headers={**semantic, "x-pipeline": two})
        assert other.status_code == 200 and other.headers["x-cache"] == "miss"


async def test_a_pipeline_that_just_returns_gives_every_dialect_a_well_formed_answer(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    plain, nothing = pipeline_name("plain"), pipeline_name("nothing")
    pipelines = {
        plain: PipelineConfig("tests.workflow_pipelines:plain"),
        nothing: PipelineConfig("tests.workflow_pipelines:nothing"),
    }
    async with workflow_stack(pg_database_url, nats_url, pipelines) as (url, *_):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        async with httpx.AsyncClient(base_url=url, timeout=10) as raw:
            for name, text in ((plain, "Just text."), (nothing, "")):
                headers = {"x-pipeline": name}
                with trio.fail_after(10):
                    reply = await client.chat.completions.create(
                        model="asked-for", messages=MESSAGES, extra_headers=headers
                    )
                    chunks = [c async for c in await client.chat.completions.create(
                        model="asked-for", messages=MESSAGES, stream=True, extra_headers=headers
                    )]
                    sse = await raw.post(
                        "/v1/chat/completions", headers=headers,
                        json={"model": "asked-for", "messages": MESSAGES, "stream": True},
                    )
                assert reply.id.startswith("chatcmpl-") and reply.created > 0 and reply.model == "asked-for"
                assert reply.choices[0].message.content == text and reply.choices[0].finish_reason == "stop"
                assert chunks[0].choices[0].delta.role == "assistant"
                assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
                assert {c.model for c in chunks} == {"asked-for"}
                assert text_of(chunks) == text
                assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
                events = [line[6:] for line in sse.text.splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"

                claude = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0, default_headers=headers)
                with trio.fail_after(10):
                    async with claude.messages.stream(model="asked-for", max_tokens=64, messages=MESSAGES) as stream:
                        streamed = "".join([t async for t in stream.text_stream])
                        message = await stream.get_final_message()
                await claude.close()
                assert streamed == text and message.stop_reason == "end_turn" and message.model == "asked-for"
                ollama_client = ollama.AsyncClient(host=url, headers=headers)
                with trio.fail_after(10):
                    parts = [p async for p in await ollama_client.chat(model="asked-for", messages=MESSAGES, stream=True)]
                assert "".join(p.message.content or "" for p in parts) == text
                assert parts[-1].done and parts[-1].done_reason == "stop"
        await client.close()


# -- errors, deadlines, cancellation ---------------------------------------------------------


async def test_pipeline_errors_before_any_event_keep_their_status(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    fan, refusing = pipeline_name(), pipeline_name("refuse")
    pipelines = {fan: fanout(), refusing: PipelineConfig("tests.workflow_pipelines:refuse")}
    async with workflow_stack(pg_database_url, nats_url, pipelines) as (url, *_):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            body = {"model": "m", "messages": MESSAGES}
            missing = await client.post("/v1/chat/completions", json=body, headers={"x-pipeline": fan})
            assert missing.status_code == 400
            assert "The fanout pipeline needs models" in missing.json()["error"]["message"]
            unknown_model = await client.post(
                "/v1/chat/completions", json=body | {"workflow": {"models": ["alpha-1", "nope"]}},
                headers={"x-pipeline": fan},
            )
            assert unknown_model.status_code == 404  # checked by the gateway's router, before any job
            limited = await client.post("/v1/chat/completions", json=body, headers={"x-pipeline": refusing})
            assert limited.status_code == 429  # (the event schema has no room for Retry-After)
            assert limited.json()["error"]["message"] == "Too many colours today."
            row = await run_row(pg_database_url, limited.headers["x-trace-id"], status="failed")
            assert row["error"]["message"] == "Too many colours today."
            # Its stream read back says why it failed, as a direct run's does.
            await wait_for_row(pg_database_url, limited.headers["x-trace-id"], "failed")
            read_back = await client.get(f"/v1/streams/{limited.headers['x-trace-id']}")
            events = [json.loads(line[6:]) for line in read_back.text.splitlines() if line.startswith("data: ")]
            assert [(e["type"], e.get("status")) for e in events] == [("error", None), ("finished", "failed")]
            assert "Too many colours today." in json.dumps(events[0])


async def test_a_request_larger_than_a_nats_message_is_a_413_not_a_retryable_503(stack: Stack) -> None:
    # A job is one NATS message (1 MiB by default); the gateway takes bodies up to 16 MiB.
    big: Any = [{"role": "user", "content": "colour " * 200_000}]
    with pytest.raises(openai.APIStatusError) as caught:
        await stack.client.chat.completions.create(model="m", messages=big)
    assert caught.value.status_code == 413
    assert "retry-after" not in caught.value.response.headers
    assert "too large for a workflow job" in caught.value.message
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        native = await client.post(
            "/api/chat", json={"model": "m", "messages": big}, headers={"x-pipeline": stack.pipeline}
        )
    assert native.status_code == 413 and "max_payload" in native.json()["error"]


async def test_no_worker_is_a_clear_503_and_unknown_pipelines_a_404(aio_loop: object, pg_database_url: str, nats_url: str) -> None:
    name = pipeline_name()
    async with workflow_stack(pg_database_url, nats_url, {name: fanout(models=["alpha-1"])}, worker=False) as (url, *_):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            body = {"model": "m", "messages": MESSAGES, "stream": True}
            started = time.monotonic()
            idle = await client.post("/v1/chat/completions", json=body, headers={"x-pipeline": name})
            assert time.monotonic() - started < 3.0  # at once, not after the 5 s silence deadline
            assert idle.status_code == 503 and idle.headers["retry-after"] == "5"
            assert f"No worker is running the pipeline `{name}`" in idle.json()["error"]["message"]
            unknown = await client.post("/v1/chat/completions", json=body, headers={"x-pipeline": "nope"})
            assert unknown.status_code == 404 and "Unknown pipeline `nope`" in unknown.json()["error"]["message"]
            assert "fanout" in unknown.json()["error"]["message"]
            bad = await client.post("/v1/chat/completions", json=body, headers={"x-pipeline": "a.b"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-pipeline"
            unnamed = await client.post("/v1/chat/completions", json=body, headers={"x-route": "workflow"})
            assert unnamed.status_code == 400
            ollama_style = await client.post("/api/chat", json=body, headers={"x-pipeline": name})
            assert ollama_style.status_code == 503 and "No worker" in ollama_style.json()["error"]


async def test_a_job_nobody_starts_times_out_within_the_silence_deadline(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    name = pipeline_name()
    async with workflow_stack(
        pg_database_url, nats_url, {name: fanout(models=["alpha-1"])}, worker=False, silence_seconds=1.0
    ) as (url, *_):
        async with open_bus(nats_url) as bus:
            await (await workers_kv(bus)).put(name, b'{"worker":"a worker stuck elsewhere"}')
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            started = time.monotonic()
            response = await client.post(
                "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, headers={"x-pipeline": name}
            )
            elapsed = time.monotonic() - started
    assert response.status_code == 504 and 1.0 <= elapsed < 3.5
    assert "No worker started" in response.json()["error"]["message"]


async def test_a_job_whose_last_worker_stopped_meanwhile_is_a_503_not_a_wait_for_the_silence_deadline(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    name = pipeline_name()
    async with workflow_stack(
        pg_database_url, nats_url, {name: fanout(models=["alpha-1"])}, worker=False, silence_seconds=30.0
    ) as (url, *_):
        async with open_bus(nats_url) as bus, httpx.AsyncClient(base_url=url, timeout=40) as client:
            kv = await workers_kv(bus)
            await kv.put(name, b'{"worker":"a worker about to stop"}')  # it passes the gateway's check
            result: dict[str, httpx.Response] = {}

            async def ask() -> None:
                result["response"] = await client.post(
                    "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, headers={"x-pipeline": name}
                )

            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await trio.sleep(1.0)  # the job waits in the queue
                await kv.delete(name)  # the worker stopped (or its key's TTL ran out)
            elapsed = time.monotonic() - started
    response = result["response"]
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert f"No worker is running the pipeline `{name}`" in response.json()["error"]["message"]
    assert elapsed < 10  # not the 30 s silence deadline


async def test_a_draining_sole_worker_finishes_a_job_that_has_said_nothing_yet(
    aio_loop: object, pg_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The job publishes nothing for 8 s (its keep-alive is 20 s away): only the worker's
    # liveness tells the gateway it is being run, and the pipeline's key lapses after the
    # SIGTERM (the bucket's TTL: 10 s, 3 s here, on a NATS of its own since a bucket keeps the
    # TTL it was made with). The job must still finish; a new job must not wait for this worker.
    monkeypatch.setattr("proxy.workflow.bus.WORKERS_TTL", 3.0)
    for module in ("proxy.workflow.worker", "proxy.services.workflow"):
        monkeypatch.setattr(f"{module}.WORKERS_REFRESH", 1.0)
    name = pipeline_name("ponder")
    pipelines = {name: PipelineConfig("tests.workflow_pipelines:ponder", {"wait": 8})}
    with EmbeddedNats(tmp_path / "nats") as own_nats:
        nats_url = own_nats.start()  # its URL: already started
        async with workflow_stack(pg_database_url, nats_url, pipelines, worker=False, silence_seconds=60.0) as (
            url, _alpha, _beta, settings
        ):
            config = worker_settings([], database_url=pg_database_url, nats_url=nats_url, workflow=settings)
            worker = Worker(config, WorkerOptions(pipelines=[name], drain_seconds=60.0))
            shutdown = trio.Event()
            result: dict[str, Any] = {}
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                        default_headers={"x-pipeline": name})

            async def ask() -> None:
                try:
                    reply = await client.chat.completions.create(model="m", messages=MESSAGES)
                    result["text"] = reply.choices[0].message.content
                except openai.APIStatusError as error:
                    result["error"] = error

            async with open_bus(nats_url) as bus, httpx.AsyncClient(base_url=url, timeout=10) as http:
                kv = await workers_kv(bus)
                async with trio.open_nursery() as nursery:
                    await nursery.start(lambda task_status: worker.run(shutdown=shutdown, task_status=task_status))
                    nursery.start_soon(ask)
                    with trio.fail_after(10):
                        while True:
                            if worker.running:
                                break
                            await trio.sleep(0.05)
                    shutdown.set()  # what SIGTERM does
                    with trio.fail_after(7):  # the pipeline's key lapses: no new job goes to this worker
                        while True:
                            if await kv.get(name) is None:
                                break
                            await trio.sleep(0.2)
                    started = time.monotonic()
                    refused = await http.post(
                        "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, headers={"x-pipeline": name}
                    )
                    assert refused.status_code == 503 and time.monotonic() - started < 3.0
            await client.close()
    assert "error" not in result, result.get("error")
    assert result["text"] == "Pondered."


class CuttableLink:
    """A TCP forwarder to NATS that the test can cut (a network partition of one worker)."""

    def __init__(self, url: str) -> None:
        self.target = urlsplit(url)
        self.cut = False
        self.url = ""
        self._links: set[trio.CancelScope] = set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"nats://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        await trio.serve_listeners(self._link, listeners)

    def sever(self) -> None:
        self.cut = True
        for link in self._links:
            link.cancel()

    async def _link(self, client: trio.SocketStream) -> None:
        async with client:
            if self.cut:
                return
            with trio.CancelScope() as scope:
                self._links.add(scope)
                try:
                    server = await trio.open_tcp_stream(self.target.hostname or "", self.target.port or 4222)
                    async with server, trio.open_nursery() as nursery:
                        nursery.start_soon(_pipe, client, server)
                        nursery.start_soon(_pipe, server, client)
                except (OSError, trio.BrokenResourceError):
                    pass
                finally:
                    self._links.discard(scope)


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    async for data in source:
        await sink.send_all(data)


async def test_a_worker_cut_off_from_nats_past_the_ack_wait_stops_the_job_another_worker_took(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    name = pipeline_name("echo")
    pipelines = {name: PipelineConfig("tests.workflow_pipelines:echo", {"model": "alpha-1"})}
    settings = workflow(pipelines, silence_seconds=15.0, ack_wait_seconds=1.5)
    alpha = OpenAIBackend(default=Script(tokens=[f" w{i}" for i in range(100)], pace=0.1))  # 10 s: past the redelivery
    async with alpha.serve() as served:
        backends = [backend("alpha", served.url, prefixes=("alpha-",))]
        gateway = running_gateway(*backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings)
        async with gateway as url:
            await _partitioned_worker(url, alpha, backends, settings, name, pg_database_url, nats_url)


async def _partitioned_worker(
    url: str, alpha: OpenAIBackend, backends: list[Any], settings: WorkflowSettings, name: str,
    pg_database_url: str, nats_url: str,
) -> None:
    link = CuttableLink(nats_url)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                default_headers={"x-pipeline": name})
    result: dict[str, Any] = {}

    async def ask() -> None:
        reply = await client.chat.completions.create(model="m", messages=MESSAGES)
        result["text"] = reply.choices[0].message.content

    async with trio.open_nursery() as nursery:
        await nursery.start(link.serve)
        cut_off = worker_settings(backends, database_url=pg_database_url, nats_url=link.url, workflow=settings)
        direct = worker_settings(backends, database_url=pg_database_url, nats_url=nats_url, workflow=settings)
        async with running_worker(cut_off, pipelines=[name]) as first:
            nursery.start_soon(ask)
            await alpha.wait_active_streams(1)
            # Only the first run, cut off, must outlast the redelivery: the second answers at once.
            alpha.set_script(Script(tokens=[f" w{i}" for i in range(100)]))
            link.sever()
            async with running_worker(direct, pipelines=[name]):
                # The redelivery reaches the second worker: its run calls the backend (and,
                # answered at once, may be over before a look at the worker would see it).
                with trio.fail_after(8):
                    while True:
                        if len(alpha.recorder.generations) >= 2:
                            break
                        await trio.sleep(0.05)
                with trio.fail_after(4):  # and the first, still cut off, has stopped its run
                    while True:
                        if not first.running and alpha.active_streams == 0:  # the second's ends at once
                            break
                        await trio.sleep(0.05)
                with trio.fail_after(20):
                    while True:
                        if "text" in result:
                            break
                        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    await client.close()
    assert result["text"] == "".join(f" w{i}" for i in range(100))


async def test_client_disconnect_cancels_the_workers_backend_calls(stack: Stack) -> None:
    slow = Script(n_tokens=2000, pace=0.01)
    stack.alpha.set_script(slow)
    stack.beta.set_script(slow)
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        body = {"model": "m", "messages": MESSAGES, "stream": True, "n": 2}
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"x-pipeline": stack.pipeline}
        ) as response:
            assert response.status_code == 200
            trace_id = response.headers["x-trace-id"]
            lines = response.aiter_lines()
            with trio.fail_after(5):
                while "index\":1" not in await lines.__anext__():
                    pass  # both models are streaming to the client
            await stack.alpha.wait_active_streams(1)
            await stack.beta.wait_active_streams(1)
    # The client is gone: the gateway cancels the job, the worker its two backend calls.
    started = time.monotonic()
    await stack.alpha.wait_disconnect(3.0)
    await stack.beta.wait_disconnect(3.0)
    assert time.monotonic() - started < 3.0
    await run_row(stack.db, trace_id, status="cancelled")
    events = await bus_events(stack.nats, trace_id)
    assert events[-1]["type"] == "finished" and events[-1]["status"] == "cancelled"


async def test_a_client_that_leaves_before_the_winner_is_charged_what_every_model_generated(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The winner view shows nothing until the end: a client that hung up just before it was
    # charged nothing (the gateway had relayed nothing), though both models had generated.
    monkeypatch.setattr("proxy.infra.backends._pump.KEEPALIVE_SECONDS", 0.3)
    slow = Script(n_tokens=2000, pace=0.01)
    stack.alpha.set_script(slow)
    stack.beta.set_script(slow)
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        body = {"model": "m", "messages": MESSAGES, "stream": True, "workflow": {"rule": "longest"}}
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"x-pipeline": stack.pipeline}
        ) as response:
            assert response.status_code == 200
            trace_id = response.headers["x-trace-id"]
            await stack.alpha.wait_active_streams(1)
            await stack.beta.wait_active_streams(1)
            await trio.sleep(1.0)  # tokens generated, none shown
    await stack.alpha.wait_disconnect(3.0)
    run = await run_row(stack.db, trace_id, status="cancelled")
    [(spent,)] = await trio.to_thread.run_sync(
        rows, stack.db, "SELECT completion_tokens FROM workflow_runs WHERE trace_id = %s", trace_id
    )
    assert run["status"] == "cancelled" and spent > 10
    _status, _reason, _prompt, charged, *_ = await wait_for_row(stack.db, trace_id, "cancelled")
    assert charged == spent  # the client's row, whose tokens its key is charged


async def test_a_pipeline_that_fails_after_its_model_calls_is_charged_what_they_spent(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    # The client gets the pipeline's error as a status; its key was charged nothing of what
    # the pipeline's model calls had spent (the run's row had none either).
    name = pipeline_name("check")
    pipelines = {name: PipelineConfig("tests.workflow_pipelines:spend_then_fail", {"model": "alpha-1"})}
    async with workflow_stack(pg_database_url, nats_url, pipelines) as (url, *_):
        async with httpx.AsyncClient(base_url=url, timeout=10, headers={"x-pipeline": name}) as client:
            for stream in (False, True):
                response = await client.post(
                    "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": stream}
                )
                assert response.status_code == 502 and "pipeline's check" in response.json()["error"]["message"]
                trace_id = response.headers["x-trace-id"]
                row = await run_row(pg_database_url, trace_id, status="failed")
                assert row["error"]["code"] == "check_failed"
                _status, _reason, prompt, completion, *_ = await wait_for_row(pg_database_url, trace_id, "failed")
                assert (prompt, completion) == (5, 4)  # the client's row: what its key is charged


async def test_a_keyed_or_background_pipeline_that_fails_is_charged_and_its_row_says_so(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    # With an Idempotency-Key the key was charged, but the request's row (what `GET` and the
    # operator's usage read) said no tokens; a background run was charged nothing at all.
    name = pipeline_name("check")
    pipelines = {name: PipelineConfig("tests.workflow_pipelines:spend_then_fail", {"model": "alpha-1"})}
    async with workflow_stack(pg_database_url, nats_url, pipelines) as (url, *_):
        keyed, background = [await new_key(pg_database_url, n, "--budget", "100000") for n in ("keyed", "bg")]
        await wait_for_key(url, keyed)
        await wait_for_key(url, background)
        async with httpx.AsyncClient(base_url=url, timeout=10, headers={"x-pipeline": name}) as client:
            response = await client.post(
                "/v1/chat/completions", json={"model": "m", "messages": MESSAGES},
                headers={"idempotency-key": f"k-{name}", **bearer(keyed)},
            )
            assert response.status_code == 502, response.text
            _status, _reason, prompt, completion, *_ = await wait_for_row(
                pg_database_url, response.headers["x-trace-id"], "failed"
            )
            assert (prompt, completion) == (5, 4)
            assert await key_charged(pg_database_url, keyed) == (9, 9)

            created = await client.post(
                "/v1/responses", json={"model": "m", "input": "Name a colour", "background": True},
                headers=bearer(background),
            )
            assert created.status_code == 200, created.text
            trace_id = created.json()["id"].removeprefix("resp_")
            _status, _reason, prompt, completion, *_ = await wait_for_row(pg_database_url, trace_id, "failed", within=10)
            assert (prompt, completion) == (5, 4)
            assert await key_charged(pg_database_url, background) == (9, 9)


async def test_a_cancelled_background_pipeline_is_charged_what_its_models_generated(stack: Stack) -> None:
    # Its run was stored with what its model calls spent; its key was charged none of it.
    slow = Script(n_tokens=2000, pace=0.01)
    stack.alpha.set_script(slow)
    stack.beta.set_script(slow)
    key = await new_key(stack.db, "bg", "--budget", "100000")
    await wait_for_key(stack.url, key)
    async with httpx.AsyncClient(base_url=stack.url, timeout=10, headers={"x-pipeline": stack.pipeline, **bearer(key)}) as client:
        created = await client.post(
            "/v1/responses", json={"model": "m", "input": "Name a colour", "background": True,
                                   "workflow": {"rule": "longest"}},
        )
        assert created.status_code == 200, created.text
        response_id = created.json()["id"]
        await stack.alpha.wait_active_streams(1)
        await stack.beta.wait_active_streams(1)
        await trio.sleep(1.0)  # some 100 tokens each
        cancelled = await client.post(f"/v1/responses/{response_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    trace_id = response_id.removeprefix("resp_")
    await run_row(stack.db, trace_id, status="cancelled")
    [(prompt, spent)] = await trio.to_thread.run_sync(
        rows, stack.db, "SELECT prompt_tokens, completion_tokens FROM workflow_runs WHERE trace_id = %s", trace_id
    )
    assert spent >= 2 * 40
    _status, _reason, row_prompt, row_spent, *_ = await wait_for_row(stack.db, trace_id, "cancelled")
    assert (row_prompt, row_spent) == (prompt, spent)
    assert await key_charged(stack.db, key) == (prompt + spent,) * 2


async def test_a_fanout_reserves_what_all_its_models_may_spend_so_a_key_cannot_overshoot_its_budget(
    stack: Stack,
) -> None:
    # The admission reserved one model's estimate while the pipeline asked two: a second
    # request was admitted against a budget the first would spend twice over.
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 50, "stream": True}
    one = requested_tokens(body, generates=True).tokens
    slow = Script(n_tokens=40, pace=0.05, usage=Usage(5, 40))
    stack.alpha.set_script(slow)
    stack.beta.set_script(slow)
    key = await new_key(stack.db, "near", "--budget", str(2 * one))
    await wait_for_key(stack.url, key)
    [(key_id,)] = await trio.to_thread.run_sync(rows, stack.db, "SELECT id FROM api_keys WHERE prefix = %s", key[:16])
    headers = {"x-pipeline": stack.pipeline, **bearer(key)}
    answered: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=stack.url, timeout=10, headers=headers) as client:

        async def first() -> None:
            answered.append(await client.post("/v1/chat/completions", json=body))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await stack.alpha.wait_active_streams(1)
            await stack.beta.wait_active_streams(1)
            [(held,)] = await trio.to_thread.run_sync(
                rows, stack.db, "SELECT budget_reserved FROM api_key_limits WHERE key_id = %s", key_id
            )
            assert held == 2 * one  # both models' prompt and max_tokens
            second = await client.post("/v1/chat/completions", json=body)
            assert second.status_code == 429, second.text
            assert "held by requests in flight" in second.json()["error"]["message"]
    assert answered[0].status_code == 200
    # Settled as usual: what both models spent (the loser's until the winner ended it).
    spent, used = await key_charged(stack.db, key)
    assert spent == used and 45 + 20 < spent <= 90

    async def given_back() -> bool:
        [(reserved,)] = await trio.to_thread.run_sync(
            rows, stack.db, "SELECT budget_reserved FROM api_key_limits WHERE key_id = %s", key_id
        )
        return reserved == 0

    await eventually(given_back)


async def test_a_judged_fanout_reserves_the_judges_reading_too(stack: Stack) -> None:
    # The judge reads the prompt and every answer, and writes up to 2,048 tokens of its own.
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 50,
            "workflow": {"rule": "judge", "judge_model": "alpha-judge"}}
    one, prompt = (requested_tokens(body, generates=generates).tokens for generates in (True, False))
    slow = Script(n_tokens=40, pace=0.05)
    stack.alpha.set_script(slow)
    stack.beta.set_script(slow)
    stack.alpha.set_script(Script(tokens=["Answer: B"]), model="alpha-judge")
    key = await new_key(stack.db, "judged", "--budget", "1000000")
    await wait_for_key(stack.url, key)
    [(key_id,)] = await trio.to_thread.run_sync(rows, stack.db, "SELECT id FROM api_keys WHERE prefix = %s", key[:16])
    answered: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=stack.url, timeout=10, headers={"x-pipeline": stack.pipeline, **bearer(key)}) as client:

        async def ask() -> None:
            answered.append(await client.post("/v1/chat/completions", json=body))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await stack.alpha.wait_active_streams(1)
            await stack.beta.wait_active_streams(1)
            [(held,)] = await trio.to_thread.run_sync(
                rows, stack.db, "SELECT budget_reserved FROM api_key_limits WHERE key_id = %s", key_id
            )
    assert held == 2 * one + prompt + 2 * (one - prompt) + 2048
    assert answered[0].status_code == 200 and answered[0].headers["x-workflow-winner"] == "beta-1"


async def test_a_crashing_pipeline_is_a_500_that_hides_its_internals_and_the_worker_goes_on(
    aio_loop: object, pg_database_url: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    crashing, counting = pipeline_name("crash"), pipeline_name("count")
    pipelines = {
        crashing: PipelineConfig("tests.workflow_pipelines:crash"),
        counting: PipelineConfig("tests.workflow_pipelines:count", {"n": 3}),
    }
    async with workflow_stack(pg_database_url, nats_url, pipelines) as (url, *_):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        claude = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
        with trio.fail_after(10):
            stream = await client.chat.completions.with_raw_response.create(
                model="m", messages=MESSAGES, stream=True, extra_headers={"x-pipeline": crashing}
            )
            streamed_trace = stream.headers["x-trace-id"]
            with pytest.raises(openai.APIError) as streamed:
                async for _ in stream.parse():
                    pass
            with pytest.raises(anthropic.InternalServerError) as whole:
                await claude.messages.create(
                    model="m", max_tokens=16, messages=MESSAGES, extra_headers={"x-pipeline": crashing}
                )
            reply = await client.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"x-pipeline": counting})
        assert reply.choices[0].message.content == "0 1 2 "
        await client.close()
        await claude.close()
    # The client learns that the pipeline failed and where to look, not the exception's text.
    whole_trace = whole.value.response.headers["x-trace-id"]
    assert whole.value.status_code == 500
    for error, trace_id in ((streamed.value, streamed_trace), (whole.value, whole_trace)):
        assert f"`{crashing}` failed with an internal error" in error.message
        assert trace_id in error.message
        assert "bug in the pipeline" not in error.message and "RuntimeError" not in error.message
    assert streamed.value.code == "workflow_crashed"
    row = await run_row(pg_database_url, whole_trace, status="failed")
    assert "bug in the pipeline" not in json.dumps(row["error"])
    # The worker's log has it all, under the trace id.
    crashes = [r for r in caplog.records if r.name == "llm_proxy.workflow" and "crashed" in r.getMessage()]
    assert {getattr(r, "trace_id", None) for r in crashes} == {streamed_trace, whole_trace}
    assert all(r.exc_info and "bug in the pipeline" in str(r.exc_info[1]) for r in crashes)


# -- load --------------------------------------------------------------------------------------


async def test_200_concurrent_streams_each_get_every_token_in_order(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    name = pipeline_name("count")
    pipelines = {name: PipelineConfig("tests.workflow_pipelines:count", {"n": 30})}
    expected = "".join(f"{i} " for i in range(30))
    # The gateway, the worker and 200 streams share one process: on a loaded machine a job
    # may wait longer than the other tests' 5 s for its worker.
    async with workflow_stack(
        pg_database_url, nats_url, pipelines, concurrency=256, silence_seconds=30.0, ack_wait_seconds=10.0
    ) as (url, *_):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        texts: list[str] = []

        async def one() -> None:
            texts.append(await _raw_stream(host, int(port), name))

        started = time.monotonic()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(200):
                    nursery.start_soon(one)
        elapsed = time.monotonic() - started
    assert texts == [expected] * 200
    print(f"200 workflow streams in {elapsed:.2f}s")


async def test_an_idle_worker_serving_many_pipelines_starts_any_job_at_once(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    names = [pipeline_name("count") for _ in range(12)]
    pipelines = {name: PipelineConfig("tests.workflow_pipelines:count", {"n": 3}) for name in names}
    async with workflow_stack(pg_database_url, nats_url, pipelines, concurrency=2) as (url, *_):
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:

            async def ask(name: str, **options: Any) -> float:
                started = time.monotonic()
                reply = await client.post(
                    "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "workflow": options},
                    headers={"x-pipeline": name},
                )
                assert reply.status_code == 200, reply.text
                assert reply.json()["choices"][0]["message"]["content"] == "".join(f"{i} " for i in range(options.get("n", 3)))
                return time.monotonic() - started

            # Idle pullers of eleven other pipelines must not keep the twelfth's job waiting.
            latencies = [await ask(name) for name in (names[-1], names[5], names[-1], names[0], names[-1], names[7])]
            assert max(latencies) < 1.0, latencies

            # Yet no more than `concurrency` jobs run at once: four jobs of 0.6 s take two rounds.
            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                for name in names[:4]:
                    nursery.start_soon(lambda name=name: ask(name, n=3, pace=0.2))
            elapsed = time.monotonic() - started
            assert 1.15 <= elapsed < 3.0, elapsed


async def _raw_stream(host: str, port: int, pipeline: str) -> str:
    """One streamed request over a plain socket (httpx's pool costs more CPU than the gateway
    at this concurrency); returns the streamed text."""
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"x-pipeline: {pipeline}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(head + body)
        received = bytearray()
        while chunk := await stream.receive_some(65536):
            received += chunk
    header, _, payload = bytes(received).partition(b"\r\n\r\n")
    assert header.startswith(b"HTTP/1.1 200"), header
    text = []
    for line in _unchunk(payload).split(b"\n"):
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            text.extend(c["delta"].get("content") or "" for c in chunk["choices"])
    return "".join(text)


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


# -- the relay's gap repair ------------------------------------------------------------------


async def test_a_gap_in_the_live_feed_is_repaired_from_jetstream(aio_loop: object, nats_url: str) -> None:
    trace = f"gap{time.monotonic_ns()}"
    subject = f"evt.chat.{trace}"
    events = [StreamStart("chatcmpl-x", "m", 1), TextDelta("one "), TextDelta("two "), TextDelta("three")]
    wire = [encode(seq, event) for seq, event in enumerate(events, start=1)]
    wire.append(encode(5, Finished("stop", "completed", "m")))
    route = WorkflowRoute.__new__(WorkflowRoute)
    route._settings = workflow({}, silence_seconds=2.0)
    exchange: Any = SimpleNamespace(request=SimpleNamespace(stream=True), response_headers=[])
    job: Any = SimpleNamespace(pipeline="p")
    follow = _Follow(ClientView(), Continuity())
    out_send, out_receive = trio.open_memory_channel[Batch](10)
    live_send, live_receive = trio.open_memory_channel[BusMessage](10)
    for seq in (1, 2, 4):  # the live feed lost event 3
        live_send.send_nowait(BusMessage(subject, wire[seq - 1], {}, None))
    assert await route._relay(live_receive, follow, exchange, job, out_send) is False
    assert follow.needs_replay
    async with open_bus(nats_url) as bus:
        await ensure_streams(bus, events_retention=60)
        for data in wire:
            await bus.publish(subject, data)
        async with bus.subscribe(subject, from_start=True, stream=EVENTS_STREAM) as replay:
            follow.replaying = True
            with trio.fail_after(5):
                assert await route._relay(replay, follow, exchange, job, out_send) is True
    out_send.close()
    received = [event async for batch in out_receive for event in batch.events]
    assert received == [*events, Finish(FinishReason.STOP)]  # the role, then every token, in order, once
