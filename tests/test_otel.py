"""The gateway's own spans over OTLP/HTTP, received by a real loopback collector: a server span
per request between the client's span and the backend's, named and attributed as the
OpenTelemetry GenAI conventions say, each backend attempt a client span whose context is the
`traceparent` the backend receives — through the official SDKs, on real servers."""

from __future__ import annotations

import logging
import sys

import anthropic
import httpx
import ollama
import openai
import pytest
import trio

from proxy.config import ConfigError, TracingSettings, load_settings
from proxy.infra import otel
from tests.fakes import AnthropicBackend, OllamaBackend, OpenAIBackend, Script, Usage
from tests.fakes.recorder import RecordedRequest
from tests.harness import backend, hang_up_once_received, running_gateway
from tests.otlp_collector import CLIENT, CONSUMER, SERVER, Collector, Span, otlp_collector
from tests.test_workflow import workflow_stack
from tests.workflow_support import fanout, pipeline_name

pytest_plugins = ["tests.infra_servers"]

ASK = [{"role": "user", "content": "hi"}]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SENT = {"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "congo=t61rcWkgMzE"}


def exporting(collector: Collector) -> TracingSettings:
    return TracingSettings(otlp_endpoint=collector.url)


def backend_parent(request: RecordedRequest) -> tuple[str, str]:
    _, trace_id, parent_id, _ = request.headers["traceparent"].split("-")
    return trace_id, parent_id


def attempt_of(collector: Collector, request: RecordedRequest) -> Span:
    """The client span whose context a backend request carried."""
    trace_id, parent_id = backend_parent(request)
    [span] = [s for s in collector.of_kind(CLIENT) if (s.trace_id, s.span_id) == (trace_id, parent_id)]
    return span


async def test_a_streamed_chat_is_a_genai_server_span_between_the_clients_and_the_backends() -> None:
    fake = OpenAIBackend(default=Script(tokens=["Hel", "lo"], usage=Usage(prompt_tokens=7, completion_tokens=2), model_name="qwen3-8b-awq"))
    with otlp_collector() as collector:
        async with fake.serve() as server, running_gateway(
            backend("vllm", server.url, default=True), aliases={"gpt-4o": "qwen3-8b"}, tracing=exporting(collector)
        ) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            stream = await client.chat.completions.create(
                model="gpt-4o", messages=ASK, stream=True, max_tokens=20, temperature=0.3, stop=["END"],
                extra_headers=SENT,  # type: ignore[arg-type]
            )
            chunks = [chunk async for chunk in stream]
        # The gateway's stop exported what its processor held.
        [server_span] = collector.of_kind(SERVER)
    assert server_span.name == "chat gpt-4o"
    assert server_span.resource["service.name"] == "llm-proxy"
    # The client's span is its parent, in the client's trace.
    assert (server_span.trace_id, server_span.parent_id) == (TRACE, PARENT)
    attributes = server_span.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "gpt-4o"
    assert attributes["gen_ai.response.model"] == "qwen3-8b-awq"
    assert attributes["gen_ai.response.id"] == chunks[0].id
    assert attributes["gen_ai.usage.input_tokens"] == 7
    assert attributes["gen_ai.usage.output_tokens"] == 2
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["gen_ai.provider.name"] == "openai"  # the backend's kind
    assert attributes["gen_ai.request.max_tokens"] == 20 and attributes["gen_ai.request.temperature"] == 0.3
    assert attributes["gen_ai.request.stop_sequences"] == ("END",)
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.request.method"] == "POST" and attributes["url.path"] == "/v1/chat/completions"
    assert attributes["server.address"] == "127.0.0.1" and isinstance(attributes["server.port"], int)
    assert attributes["llm_proxy.stream"] is True and attributes["llm_proxy.backend"] == "vllm"
    assert attributes["llm_proxy.trace_id"]  # the gateway's x-trace-id: the request log's line
    assert 0 < attributes["gen_ai.response.time_to_first_chunk"] < 10
    assert server_span.start < server_span.events["gen_ai.first_chunk"] <= server_span.end
    assert server_span.status == 0
    # The backend call is a client span under it, and its context is what the backend got,
    # so vLLM's spans nest under the gateway's.
    [request] = [r for r in fake.requests if r.method == "POST"]
    attempt = attempt_of(collector, request)
    assert attempt.parent_id == server_span.span_id and attempt.trace_id == TRACE
    assert attempt.attributes["http.response.status_code"] == 200
    assert attempt.attributes["url.full"] == f"{server.url}/v1/chat/completions"
    assert request.headers["tracestate"] == SENT["tracestate"]
    # The attempt lasts until the backend's stream ended, inside the request's span.
    assert server_span.start <= attempt.start and attempt.end <= server_span.end
    assert attempt.end >= server_span.events["gen_ai.first_chunk"]


async def test_each_dialects_sdk_request_gets_its_span_and_one_without_traceparent_starts_the_trace() -> None:
    vllm, local, claude = OpenAIBackend(), OllamaBackend(), AnthropicBackend()
    with otlp_collector() as collector:
        async with vllm.serve() as v, local.serve() as o, claude.serve() as c, running_gateway(
            backend("vllm", v.url, default=True),
            backend("ollama", o.url, kind="ollama", prefixes=("llama",)),
            backend("claude", c.url, kind="anthropic", prefixes=("claude",)),
            tracing=exporting(collector),
        ) as url:
            claude_client = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
            await claude_client.messages.create(model="claude-x", max_tokens=20, messages=ASK)  # type: ignore[arg-type]
            await ollama.AsyncClient(host=url).chat(model="llama3.2", messages=ASK)
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            await client.embeddings.create(model="e5-large", input="hi")
            await client.completions.create(model="qwen3-8b", prompt="hi")
    by_name = {span.name: span for span in collector.of_kind(SERVER)}
    assert set(by_name) == {"chat claude-x", "chat llama3.2", "embeddings e5-large", "text_completion qwen3-8b"}
    for fake in (vllm, local, claude):
        for request in (r for r in fake.requests if r.method == "POST"):
            attempt = attempt_of(collector, request)
            [parent] = [s for s in collector.of_kind(SERVER) if s.span_id == attempt.parent_id]
            # No traceparent sent: the server span is the trace's root.
            assert parent.parent_id == "" and parent.trace_id == attempt.trace_id
    assert by_name["chat claude-x"].attributes["gen_ai.usage.output_tokens"] > 0
    assert by_name["chat claude-x"].attributes["gen_ai.provider.name"] == "anthropic"
    assert by_name["chat claude-x"].attributes["gen_ai.request.max_tokens"] == 20
    assert by_name["chat llama3.2"].attributes["gen_ai.provider.name"] == "ollama"
    assert by_name["embeddings e5-large"].attributes["gen_ai.usage.input_tokens"] > 0


async def test_a_fallback_shows_the_failed_attempt_and_the_stand_in_under_one_request() -> None:
    big, small = OpenAIBackend(default=Script(status=503)), OpenAIBackend(default=Script(tokens=["small"]))
    with otlp_collector() as collector:
        async with big.serve() as b, small.serve() as s, running_gateway(
            backend("big", b.url, models=("qwen3-32b",)),
            backend("small", s.url, models=("qwen3-8b",)),
            fallbacks={"qwen3-32b": ("qwen3-8b",)},
            tracing=exporting(collector),
        ) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            await client.chat.completions.create(model="qwen3-32b", messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
    [server_span] = collector.of_kind(SERVER)
    [failed] = [r for r in big.requests if r.method == "POST"]
    [answered] = [r for r in small.requests if r.method == "POST"]
    first, second = attempt_of(collector, failed), attempt_of(collector, answered)
    assert first.parent_id == second.parent_id == server_span.span_id and first.span_id != second.span_id
    assert first.status == 2 and first.attributes["http.response.status_code"] == 503
    assert second.status == 0 and server_span.status == 0
    assert server_span.attributes["llm_proxy.backend"] == "small"


async def test_a_failed_request_is_an_error_span_and_a_client_that_left_is_marked_cancelled() -> None:
    broken = OpenAIBackend(default=Script(status=500))
    slow = OpenAIBackend(default=Script(n_tokens=50, pace=0.2))
    with otlp_collector() as collector:
        async with broken.serve() as b, slow.serve() as s, running_gateway(
            backend("broken", b.url, models=("bad",)), backend("slow", s.url, default=True), tracing=exporting(collector)
        ) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(model="bad", messages=ASK)  # type: ignore[arg-type]

            async def leave_mid_stream() -> None:
                stream = await client.chat.completions.create(model="slow", messages=ASK, stream=True)  # type: ignore[arg-type]
                async for _ in stream:
                    pass

            await hang_up_once_received(slow, leave_mid_stream)
            await slow.wait_disconnect(5.0)
    failed, left = collector.named("chat bad"), collector.named("chat slow")
    assert len(failed) == 1 and failed[0].status == 2 and failed[0].attributes["error.type"] == "502"  # the gateway names the backend's 500 a 502
    assert len(left) == 1 and left[0].attributes["llm_proxy.cancelled"] is True
    assert left[0].attributes["http.response.status_code"] == 499 and left[0].status != 2


async def test_a_collector_that_is_down_fails_no_request() -> None:
    fake = OpenAIBackend()
    with otlp_collector() as collector:
        gone = collector.url  # closed once this block ends: nothing listens there
    async with fake.serve() as server:
        with trio.fail_after(30):  # the stop's last export is bounded, never a hang
            async with running_gateway(
                backend("vllm", server.url, default=True), tracing=TracingSettings(otlp_endpoint=gone)
            ) as url:
                client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
                for _ in range(3):
                    answer = await client.chat.completions.create(model="m", messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
                    assert answer.choices[0].message.content
    assert all(backend_parent(r)[0] == TRACE for r in fake.requests if r.method == "POST")


async def test_off_by_default_the_backend_gets_the_clients_parent_and_nothing_is_exported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    fake = OpenAIBackend()
    with otlp_collector() as collector:
        async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
            assert otel.TRACING is None
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            await client.chat.completions.create(model="m", messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
    assert collector.exports == 0
    [request] = [r for r in fake.requests if r.method == "POST"]
    assert backend_parent(request) == (TRACE, PARENT)


async def test_the_standard_environment_switches_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = OpenAIBackend()
    with otlp_collector() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-eu")
        async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                assert (await http.get("/v1/models")).status_code == 200
                assert (await http.get("/v1/models/no-such-model")).status_code == 404
                assert (await http.get("/v1/streams/no-such-run")).status_code in (404, 503)
    spans = {span.attributes["url.path"]: span for span in collector.of_kind(SERVER)}
    # Named as the HTTP conventions say: the method and the matched route (a template: one
    # name for every model or run asked about).
    listing, model, stream = spans["/v1/models"], spans["/v1/models/no-such-model"], spans["/v1/streams/no-such-run"]
    assert listing.name == "GET /v1/models" and listing.attributes["http.route"] == "/v1/models"
    assert model.name == "GET /v1/models/<path:model_id>" and model.attributes["http.response.status_code"] == 404
    assert stream.name == "GET /v1/streams/<trace_id>"
    assert model.status == 0  # a client's 4xx is no error of the server's
    assert listing.attributes["http.response.status_code"] == 200
    assert listing.resource["service.name"] == "gateway-eu"


def test_the_collector_is_configured_in_tracing(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "c.toml"  # type: ignore[operator]
    path.write_text('[tracing]\notlp_endpoint = "http://collector:4318"\n')
    assert load_settings(path, {}).tracing == TracingSettings(otlp_endpoint="http://collector:4318")
    path.write_text('[tracing]\notlp_endpoint = "collector:4318"\n')
    with pytest.raises(ConfigError, match=r"tracing\.otlp_endpoint"):
        load_settings(path, {})


async def test_a_clients_unsampled_trace_stays_unsampled_and_a_whole_answer_has_no_first_chunk_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    fake = OpenAIBackend()
    unsampled = {"traceparent": f"00-{TRACE}-{PARENT}-00", "tracestate": "UPPER=not-w3c,congo=t61rcWkgMzE"}
    with otlp_collector() as collector:
        async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True), tracing=exporting(collector)) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            await client.chat.completions.create(model="m", messages=ASK, extra_headers=unsampled)  # type: ignore[arg-type]
            await client.chat.completions.create(model="m", messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
    dropped, kept = [r for r in fake.requests if r.method == "POST"]
    # The client's sampling decision stands: nothing exported, the backend told not to sample.
    _, trace_id, parent_id, flags = dropped.headers["traceparent"].split("-")
    assert (trace_id, flags) == (TRACE, "00") and parent_id != PARENT
    assert dropped.headers["tracestate"] == unsampled["tracestate"]  # passed on as received
    [server_span] = collector.of_kind(SERVER)
    assert server_span.parent_id == PARENT and attempt_of(collector, kept).parent_id == server_span.span_id
    assert "gen_ai.response.time_to_first_chunk" not in server_span.attributes
    assert "gen_ai.first_chunk" not in server_span.events
    # A tracestate the SDK finds malformed is not a warning per request of the client's choosing
    # (the exporter's own complaints, a slow collector on a loaded machine, are not about it).
    assert not [
        r for r in caplog.records if r.name.startswith("opentelemetry") and not r.name.startswith("opentelemetry.exporter")
    ]


async def test_a_workflow_jobs_worker_span_nests_under_the_gateways_request_and_its_model_calls_under_it(
    aio_loop: object, pg_database_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = pipeline_name()
    with otlp_collector() as collector:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)  # the gateway's and its worker's
        async with workflow_stack(pg_database_url, nats_url, {name: fanout(models=["alpha-1", "beta-1"])}) as (
            url, alpha, beta, _,
        ):
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            reply = await client.chat.completions.with_raw_response.create(
                model="m", messages=ASK, extra_headers={**SENT, "x-pipeline": name}  # type: ignore[arg-type]
            )
    [request] = [s for s in collector.of_kind(SERVER) if s.attributes.get("url.path") == "/v1/chat/completions"]
    assert request.parent_id == PARENT
    # The job's NATS headers carried the gateway's span: the worker's is its child.
    [job] = collector.named(f"invoke_workflow {name}")
    assert job.kind == CONSUMER and (job.trace_id, job.parent_id) == (TRACE, request.span_id)
    assert job.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert job.attributes["messaging.system"] == "nats"
    assert job.attributes["llm_proxy.trace_id"] == reply.headers["x-trace-id"]
    assert job.attributes["llm_proxy.workflow.status"] == "completed" and job.status == 0
    calls = [r for fake in (alpha, beta) for r in fake.requests if r.method == "POST"]
    assert len(calls) == 2 and all(attempt_of(collector, r).parent_id == job.span_id for r in calls)


async def test_a_durable_keyed_run_is_attributed_on_its_requests_span(
    aio_loop: object, pg_database_url: str, nats_url: str
) -> None:
    fake = OpenAIBackend(default=Script(tokens=["ok"], usage=Usage(prompt_tokens=3, completion_tokens=1)))
    with otlp_collector() as collector:
        async with fake.serve() as server, running_gateway(
            backend("vllm", server.url, default=True), database_url=pg_database_url, nats_url=nats_url,
            tracing=exporting(collector),
        ) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            # A keyed request runs in the gateway's own nursery, not the request's task.
            keyed = {**SENT, "idempotency-key": f"otel-{id(fake)}"}
            for _ in range(2):  # the second gets the first's answer: no backend call
                await client.chat.completions.create(model="m", messages=ASK, extra_headers=keyed)  # type: ignore[arg-type]
    first, again = sorted(collector.named("chat m"), key=lambda span: span.start)
    assert first.attributes["gen_ai.usage.output_tokens"] == 1 and first.attributes["llm_proxy.source"] == "backend"
    assert again.attributes["llm_proxy.source"] in ("replay", "attached") and not collector.children(again)
    [request] = [r for r in fake.requests if r.method == "POST"]
    assert attempt_of(collector, request).parent_id == first.span_id


async def test_grpc_asked_for_without_its_exporter_is_said_at_start_and_http_is_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.infra.otel")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)  # not installed
    fake = OpenAIBackend()
    with otlp_collector() as collector:
        async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True), tracing=exporting(collector)) as url:
            assert any("opentelemetry-exporter-otlp-proto-grpc" in r.getMessage() for r in caplog.records)
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            await client.chat.completions.create(model="m", messages=ASK)  # type: ignore[arg-type]
    assert collector.named("chat m")


async def test_without_the_sdk_installed_a_configured_collector_is_a_warning_not_a_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.infra.otel")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # `pip install llm-proxy` without [otel]
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(
        backend("vllm", server.url, default=True), tracing=TracingSettings(otlp_endpoint="http://127.0.0.1:9")
    ) as url:
        assert otel.TRACING is None
        assert any("llm-proxy[otel]" in r.getMessage() for r in caplog.records)
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        await client.chat.completions.create(model="m", messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
    [request] = [r for r in fake.requests if r.method == "POST"]
    assert backend_parent(request) == (TRACE, PARENT)


@pytest.mark.parametrize("variable", ["OTEL_SDK_DISABLED=true", "OTEL_TRACES_EXPORTER=none"])
def test_the_standard_switches_turn_it_off(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert otel.wanted(TracingSettings())
    name, _, value = variable.partition("=")
    monkeypatch.setenv(name, value)
    assert not otel.wanted(TracingSettings(otlp_endpoint="http://127.0.0.1:4318"))


async def test_spans_without_propagation_tell_no_backend_and_a_third_party_backend_nothing() -> None:
    ours, hosted = OpenAIBackend(), AnthropicBackend()
    with otlp_collector() as collector:
        async with ours.serve() as o, hosted.serve() as h:
            backends = (
                backend("vllm", o.url, default=True),
                backend("claude", h.url, kind="anthropic", prefixes=("claude",), trace_context=False),
            )
            async with running_gateway(*backends, tracing=exporting(collector)) as url:
                client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
                for model in ("qwen3-8b", "claude-x"):
                    await client.chat.completions.create(model=model, messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
            async with running_gateway(
                *backends, tracing=TracingSettings(propagate=False, otlp_endpoint=collector.url)
            ) as url:
                client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
                await client.chat.completions.create(model="qwen3-8b", messages=ASK, extra_headers=SENT)  # type: ignore[arg-type]
    told, untold = [r for r in ours.requests if r.method == "POST"]
    [third_party] = [r for r in hosted.requests if r.method == "POST"]
    assert attempt_of(collector, told).trace_id == TRACE
    for request in (untold, third_party):
        assert "traceparent" not in request.headers and "tracestate" not in request.headers
    # Their attempts are recorded all the same, under their requests' spans.
    servers = {span.span_id: span for span in collector.of_kind(SERVER)}
    attempts = [span for span in collector.of_kind(CLIENT) if span.attributes.get("url.full", "").endswith("/messages")]
    assert len(attempts) == 1 and servers[attempts[0].parent_id].name == "chat claude-x"
    assert len(collector.of_kind(CLIENT)) == 3 and all(span.trace_id == TRACE for span in collector.spans)


async def test_probes_and_scrapes_make_no_spans_nor_what_otel_python_excluded_urls_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_EXCLUDED_URLS", "models/,^/openapi")
    fake = OpenAIBackend()
    with otlp_collector() as collector:
        async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True), tracing=exporting(collector)) as url:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                for path in ("/health", "/ready", "/metrics", "/v1/models/m", "/openapi.json", "/v1/models"):
                    await http.get(path)
                client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
                await client.chat.completions.create(model="m", messages=ASK)  # type: ignore[arg-type]
    assert sorted(span.name for span in collector.of_kind(SERVER)) == ["GET /v1/models", "chat m"]


async def test_what_a_client_chose_reaches_the_collector_bounded() -> None:
    """A client's model name, stop sequences and user agent are as long as its body and head
    allow (16 MiB): its span keeps a bounded part of each, not megabytes queued and exported
    (a collector refuses a batch past its size, every request's spans in it lost)."""
    fake = OpenAIBackend(default=Script(tokens=["Hi"], usage=Usage(prompt_tokens=7, completion_tokens=2)))
    model = "qwen" + "m" * 300_000
    with otlp_collector() as collector:
        async with fake.serve() as server, running_gateway(
            backend("vllm", server.url, prefixes=("qwen",)), tracing=exporting(collector)
        ) as url:
            async with httpx.AsyncClient(base_url=url, timeout=30, headers={"user-agent": "agent/" + "u" * 10_000}) as http:
                answer = await http.post("/v1/chat/completions", json={"model": model, "messages": ASK, "stop": ["s" * 100] * 30_000})
                assert answer.status_code == 200
        [span] = collector.of_kind(SERVER)
    attributes = span.attributes
    assert attributes["gen_ai.request.model"] == model[: otel.MAX_TEXT]
    assert span.name == f"chat {model[: otel.MAX_TEXT]}"
    assert attributes["gen_ai.request.stop_sequences"] == ("s" * 100,) * otel.MAX_STOP_SEQUENCES
    assert attributes["user_agent.original"] == ("agent/" + "u" * 10_000)[: otel.MAX_TEXT]
    assert fake.requests[-1].json["model"] == model  # the backend is sent what the client sent


async def test_a_host_whose_port_is_no_number_is_answered_with_tracing_on() -> None:
    """`Host: x:²` (a port `str.isdigit` takes and `int` refuses) was a 500 with no body for
    every request while spans were exported."""
    fake = OpenAIBackend()
    with otlp_collector() as collector:
        async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True), tracing=exporting(collector)) as url:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                for host in (b"llm-proxy:\xb2", b"llm-proxy:" + b"9" * 5000):
                    answer = await http.get("/v1/models", headers={"host": host})
                    assert answer.status_code == 200, answer.text
        assert {span.attributes["server.address"] for span in collector.of_kind(SERVER)} == {
            "llm-proxy:\xb2", ("llm-proxy:" + "9" * 5000)[: otel.MAX_TEXT],
        }
