"""W3C Trace Context through the gateway: a client's `traceparent` (the OpenTelemetry-
instrumented SDKs send one) reaches every backend request made for it, with the same trace id
and its parent id, so vLLM's spans nest under the client's span — on real servers."""

from __future__ import annotations

import json
import logging
import re

import anthropic
import httpx
import ollama
import openai
import pytest

from proxy.config import ConfigError, TracingSettings, load_settings
from proxy.domain.tracecontext import TRACESTATE_MAX_CHARS, received_trace
from proxy.infra.logging import REQUEST_LOGGER
from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend, Script
from tests.fakes.recorder import RecordedRequest
from tests.harness import backend, running_gateway
from tests.test_batches import chat_line, jsonl, submit, until_status
from tests.test_persistence import wait_for_row
from tests.test_replicas import _replicated
from tests.test_responses_stored import journaled_stack
from tests.test_workflow import workflow_stack
from tests.workflow_support import bus_events, fanout, pipeline_name

pytest_plugins = ["tests.infra_servers"]

ASK = [{"role": "user", "content": "hi"}]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
SENT = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
_HEADER = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def parts(request: RecordedRequest) -> tuple[str, str, str]:
    """(trace id, parent id, flags) of the traceparent a backend received, checked well formed."""
    match = _HEADER.fullmatch(request.headers.get("traceparent", ""))
    assert match is not None, request.headers
    trace_id, parent_id, flags = match.groups()
    assert trace_id != "0" * 32 and parent_id != "0" * 16
    return trace_id, parent_id, flags


def continues_the_clients_trace(request: RecordedRequest) -> str:
    trace_id, parent_id, flags = parts(request)
    assert (trace_id, flags) == (TRACE, "01")
    # The gateway records no span of its own: the client's span is the backend's parent, so a
    # tracing UI nests the backend's spans under it instead of leaving them loose.
    assert parent_id == PARENT
    assert request.headers["tracestate"] == TRACESTATE
    return parent_id


async def test_every_dialects_sdk_request_reaches_its_backend_in_the_clients_trace() -> None:
    vllm, local, claude = OpenAIBackend(), OllamaBackend(), AnthropicBackend()
    async with vllm.serve() as v, local.serve() as o, claude.serve() as c, running_gateway(
        backend("vllm", v.url, default=True),
        backend("ollama", o.url, kind="ollama", prefixes=("llama",)),
        backend("claude", c.url, kind="anthropic", prefixes=("claude",)),
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await client.chat.completions.create(model="qwen3-8b", messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
        stream = await client.chat.completions.create(
            model="qwen3-8b", messages=ASK, stream=True, extra_headers=SENT  # type: ignore[arg-type]
        )
        [chunk async for chunk in stream]
        await client.completions.create(model="qwen3-8b", prompt="hi", extra_headers=SENT)
        await client.embeddings.create(model="e5-large", input="hi", extra_headers=SENT)
        await client.chat.completions.create(model="llama3.2", messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
        claude_client = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
        await claude_client.messages.create(model="claude-x", max_tokens=20, messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
        await ollama.AsyncClient(host=url, headers=SENT).chat(model="llama3.2", messages=ASK)
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=SENT) as http:
            reranked = await http.post("/v1/rerank", json={"model": "bge-reranker", "query": "q", "documents": ["a"]})
            assert reranked.status_code == 200, reranked.text
    calls = [r for fake in (vllm, local, claude) for r in fake.requests if r.method == "POST"]
    assert {r.path for r in calls} >= {
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/api/chat", "/v1/messages"
    }
    parents = [continues_the_clients_trace(r) for r in calls]
    assert len(parents) == 8


async def test_a_stand_in_is_a_new_attempt_in_the_same_trace() -> None:
    big, small = OpenAIBackend(default=Script(status=503)), OpenAIBackend(default=Script(tokens=["small"]))
    async with big.serve() as b, small.serve() as s, running_gateway(
        backend("big", b.url, models=("qwen3-32b",)),
        backend("small", s.url, models=("qwen3-8b",)),
        fallbacks={"qwen3-32b": ("qwen3-8b",)},
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(model="qwen3-32b", messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
        assert raw.headers["x-fallback-model"] == "qwen3-8b"
        # Without a traceparent, the gateway starts one trace for the request: both attempts share it.
        await client.chat.completions.create(model="qwen3-32b", messages=ASK)  # type: ignore[arg-type]
    first, second = [r for r in big.requests if r.method == "POST"], [r for r in small.requests if r.method == "POST"]
    continues_the_clients_trace(first[0]), continues_the_clients_trace(second[0])
    (started, failed_parent, flags), (same, parent, _) = parts(first[1]), parts(second[1])
    assert started == same != TRACE and failed_parent == parent != PARENT and flags == "01"
    assert "tracestate" not in second[1].headers


async def test_a_moved_replica_attempt_stays_in_the_clients_trace() -> None:
    full, free = OpenAIBackend(default=Script(status=503)), OpenAIBackend(default=Script(tokens=["ok"]))
    async with _replicated(full, free) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for _ in range(2):  # the first pick may be either replica
            await client.chat.completions.create(model="m", messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
    calls = [r for fake in (full, free) for r in fake.requests if r.method == "POST"]
    assert len(calls) >= 3 and all(continues_the_clients_trace(r) for r in calls)


@pytest.mark.parametrize("traceparent", [
    f"00-{TRACE.upper()}-{PARENT}-01",  # upper-case hex
    f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
    f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
    f"ff-{TRACE}-{PARENT}-01",  # the forbidden version
    f"00-{TRACE}-{PARENT}-01-extra",  # version 00 is exactly 55 characters
    f"00-{TRACE[:-1]}-{PARENT}-01",  # a short trace id
    "not a traceparent",
])
async def test_an_invalid_traceparent_is_ignored_and_a_new_trace_started(traceparent: str) -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = await client.chat.completions.create(
            model="m", messages=ASK, extra_headers={"traceparent": traceparent, "tracestate": TRACESTATE}  # type: ignore[arg-type]
        )
    assert reply.choices[0].message.content  # not an error
    trace_id, _, flags = parts(fake.requests[-1])
    assert trace_id not in (TRACE, TRACE.upper(), "0" * 32) and flags == "01"
    assert "tracestate" not in fake.requests[-1].headers  # the spec: not read without a valid traceparent


async def test_repeated_or_later_version_traceparents_are_read_as_the_spec_says() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            body = {"model": "m", "messages": ASK}
            # A later version: read as far as version 00 goes, the sampled flag kept, sent as 00.
            later = await http.post("/v1/chat/completions", json=body, headers={"traceparent": f"cc-{TRACE}-{PARENT}-09-what-comes"})
            # Two traceparents: neither is trusted.
            twice = [("traceparent", TRACEPARENT), ("traceparent", f"00-{'1' * 32}-{PARENT}-01")]
            repeated = await http.post("/v1/chat/completions", json=body, headers=twice)
            # Repeated tracestate headers are one list; one too long is cut by whole members.
            long_state = [("traceparent", TRACEPARENT), ("tracestate", "a=1"), ("tracestate", f"big={'x' * 200},b=2")]
            long_state += [("tracestate", ",".join(f"k{i}={'y' * 40}" for i in range(12)))]
            cut = await http.post("/v1/chat/completions", json=body, headers=long_state)
            unsampled = await http.post("/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT[:-2] + "00"})
    assert {later.status_code, repeated.status_code, cut.status_code, unsampled.status_code} == {200}
    chats = [r for r in fake.requests if r.method == "POST"]
    assert parts(chats[0])[0::2] == (TRACE, "01")
    assert parts(chats[1])[0] not in (TRACE, "1" * 32)
    state = chats[2].headers["tracestate"]
    assert state.startswith("a=1,b=2,k0=") and "big=" not in state and len(state) <= TRACESTATE_MAX_CHARS
    assert parts(chats[3])[0::2] == (TRACE, "00")  # the client's sampling decision stands


async def test_without_a_traceparent_each_request_is_its_own_trace_and_off_sends_none() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server:
        async with running_gateway(backend("vllm", server.url, default=True)) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            for _ in range(2):
                await client.chat.completions.create(model="m", messages=ASK)  # type: ignore[arg-type]
        async with running_gateway(backend("vllm", server.url, default=True), tracing=TracingSettings(propagate=False)) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            await client.chat.completions.create(model="m", messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
    first, second, off = [r for r in fake.requests if r.method == "POST"]
    assert parts(first)[0] != parts(second)[0]
    assert "traceparent" not in off.headers and "tracestate" not in off.headers


async def test_a_backend_with_trace_context_off_gets_none_while_others_do() -> None:
    ours, hosted = OpenAIBackend(), AnthropicBackend()
    async with ours.serve() as o, hosted.serve() as h, running_gateway(
        backend("vllm", o.url, default=True),
        backend("claude", h.url, kind="anthropic", prefixes=("claude",), trace_context=False),
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for model in ("qwen3-8b", "claude-x"):
            await client.chat.completions.create(model=model, messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
    [local] = [r for r in ours.requests if r.method == "POST"]
    [third_party] = [r for r in hosted.requests if r.method == "POST"]
    continues_the_clients_trace(local)
    assert "traceparent" not in third_party.headers and "tracestate" not in third_party.headers


async def test_the_request_log_line_names_the_trace(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True), access_log=True) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await client.chat.completions.create(model="m", messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
        await client.embeddings.create(model="e5", input="hi", extra_headers=SENT)
        await client.chat.completions.create(model="m", messages=ASK)  # type: ignore[arg-type]
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=SENT) as http:
            await http.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    logged = [(r.kind, r.w3c_trace_id) for r in caplog.records if r.name == REQUEST_LOGGER]  # type: ignore[attr-defined]
    started = parts([r for r in fake.requests if r.method == "POST"][2])[0]
    assert logged == [("chat", TRACE), ("embeddings", TRACE), ("chat", started), ("completion", TRACE)]


def test_tracing_is_configured_in_its_own_section(tmp_path: pytest.TempPathFactory) -> None:
    config = tmp_path / "g.toml"  # type: ignore[operator]
    config.write_text("[tracing]\npropagate = false\n")
    assert load_settings(config, environ={}).tracing == TracingSettings(propagate=False)
    assert load_settings(None, environ={}).tracing.propagate is True
    config.write_text("[tracing]\npropagte = false\n")
    with pytest.raises(ConfigError, match=r"did you mean `tracing\.propagate`"):
        load_settings(config, environ={})
    config.write_text('[[backends]]\nname = "claude"\nkind = "anthropic"\nbase_url = "https://api.anthropic.com"\n'
                      'default = true\ntrace_context = false\n')
    assert load_settings(config, environ={}).backends[0].trace_context is False


def test_tracestate_that_cannot_be_passed_on_is_dropped_not_the_trace() -> None:
    for state in ("a=1\x7f", ",".join(f"k{i}=v" for i in range(33))):  # a control character; 33 members
        trace = received_trace(TRACEPARENT, state)
        assert trace is not None and trace.trace_id == TRACE and trace.state == ""


async def test_a_workflow_job_carries_the_trace_to_its_workers_backend_calls(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    name = pipeline_name()
    async with workflow_stack(pg_database_url, nats_url, {name: fanout(models=["alpha-1", "beta-1"])}) as (
        url, alpha, beta, _,
    ):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = await client.chat.completions.with_raw_response.create(
            model="m", messages=ASK, extra_headers={**SENT, "x-pipeline": name}  # type: ignore[arg-type]
        )
        assert reply.headers["x-workflow-winner"] in ("alpha-1", "beta-1")
        # The events the worker published are relayed as they were: the job's trace is not theirs.
        events = await bus_events(nats_url, reply.headers["x-trace-id"])
    calls = [r for fake in (alpha, beta) for r in fake.requests if r.method == "POST"]
    assert len(calls) == 2 and all(continues_the_clients_trace(r) for r in calls)
    assert events and all("traceparent" not in json.dumps(event) for event in events)


async def test_durable_runs_keep_the_trace_of_the_request_that_started_them(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        # A keyed request runs in the gateway's own nursery, not the request's task.
        keyed = {**SENT, "idempotency-key": f"trace-{TRACE}-{id(fake)}"}
        await client.chat.completions.create(model="m", messages=ASK, extra_headers=keyed)  # type: ignore[arg-type]
        # So does a background response, which runs on after its creation was answered.
        queued = await client.responses.create(model="m", input="hi", background=True, extra_headers=SENT)
        await wait_for_row(pg_database_url, queued.id.removeprefix("resp_"), "completed")
    calls = [r for r in fake.requests if r.method == "POST"]
    assert len(calls) == 2
    assert all(continues_the_clients_trace(r) for r in calls)


async def test_each_batch_line_reaches_the_backend_as_a_trace_of_its_own(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    async with journaled_stack(pg_database_url, nats_url, OpenAIBackend()) as stack:
        batch = await submit(stack.client, jsonl(chat_line("first"), chat_line("second")))
        done = await until_status(stack.client, batch.id, "completed", "failed")
        assert done.status == "completed", done
    lines = [r for r in stack.fake.requests if r.path.endswith("/chat/completions")]
    assert len(lines) == 2 and len({parts(r)[0] for r in lines}) == 2


async def test_openapi_names_the_trace_headers_where_they_are_read() -> None:
    async with running_gateway() as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        paths = (await http.get("/openapi.json")).json()["paths"]
    for path in ("/v1/chat/completions", "/v1/messages", "/api/chat", "/v1/completions", "/v1/embeddings", "/v1/rerank"):
        names = {parameter["name"] for parameter in paths[path]["post"].get("parameters", [])}
        assert {"traceparent", "tracestate"} <= names, path
