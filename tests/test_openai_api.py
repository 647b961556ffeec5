"""The official `openai` SDK against the gateway, in front of a fake OpenAI-compatible backend."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
import trio

from proxy.config import Timeouts
from tests.fakes import (
    AnthropicBackend,
    Exchange,
    OllamaBackend,
    OpenAIBackend,
    Request,
    Script,
    ToolCall,
    Usage,
)
from tests.fakes.base import Call
from tests.harness import backend, hang_up_once_received, refusing_port, running_gateway
from tests.test_auth_helpers import eventually

MESSAGES = [{"role": "user", "content": "Say hello"}]


@dataclass
class Setup:
    fake: OpenAIBackend
    url: str
    client: openai.AsyncOpenAI


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        yield Setup(fake, url, client)
        await client.close()


async def test_non_streaming_completion(setup: Setup) -> None:
    setup.fake.set_script(Script(tokens=["Hello", " there"], usage=Usage(11, 2)))
    reply = await setup.client.chat.completions.create(model="qwen3-8b", messages=MESSAGES)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "Hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and (reply.usage.prompt_tokens, reply.usage.total_tokens) == (11, 13)
    sent = setup.fake.requests[-1]
    assert sent.json["model"] == "qwen3-8b" and sent.json["stream"] is False


async def test_whole_answers_carry_their_length(setup: Setup) -> None:
    # Non-streaming answers and errors go out whole: Content-Length, no chunked framing.
    setup.fake.set_script(Script(tokens=["Hello"]))
    async with httpx.AsyncClient(base_url=setup.url) as client:
        for body in ({"model": "m", "messages": MESSAGES}, {"model": "m"}):
            answer = await client.post("/v1/chat/completions", json=body)
            assert answer.headers["content-length"] == str(len(answer.content)), answer.status_code
            assert "transfer-encoding" not in answer.headers


async def test_streaming_is_openai_exact(setup: Setup) -> None:
    setup.fake.set_script(Script(tokens=["a", "b", "c"]))
    stream = await setup.client.chat.completions.create(model="m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "abc"
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks)
    # The gateway asks the backend for usage for its own accounting, even unasked.
    assert setup.fake.requests[-1].json["stream_options"] == {"include_usage": True}


async def test_include_usage_true_gives_one_usage_chunk_before_done(setup: Setup) -> None:
    setup.fake.set_script(Script(tokens=["x", "y"], usage=Usage(5, 2)))
    stream = await setup.client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


async def test_include_usage_false_is_never_flipped(setup: Setup) -> None:
    setup.fake.set_script(Script(tokens=["x"], usage=Usage(5, 1)))
    stream = await setup.client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": False}  # type: ignore[arg-type]
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)  # chunk.choices[0] never raises IndexError
    assert all(c.usage is None for c in chunks)


async def test_stream_options_without_stream_is_refused_as_openai_does(setup: Setup) -> None:
    # A client that set stream_options but forgot `stream` meant to stream: OpenAI says so (400).
    asked = len(setup.fake.requests)
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.chat.completions.create(
            model="m", messages=MESSAGES, stream_options={"include_usage": True}  # type: ignore[arg-type]
        )
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "stream_options"
    assert error["message"] == "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    assert len(setup.fake.requests) == asked  # no backend call for it


async def test_parallel_tool_calls_stream_with_their_indexes(setup: Setup) -> None:
    calls = [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_time", '{"tz": "Europe/Paris"}')]
    setup.fake.set_script(Script(tokens=[], tool_calls=calls, tool_arg_fragment=5, interleave_tool_calls=True))
    stream = await setup.client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
        tools=[{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("get_weather", "get_time")],
    )
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    names[call.index] = call.function.name
                arguments[call.index] = arguments.get(call.index, "") + ((call.function and call.function.arguments) or "")
            finish = choice.finish_reason or finish
    assert names == {0: "get_weather", 1: "get_time"}
    assert {i: json.loads(a) for i, a in arguments.items()} == {0: {"city": "Paris"}, 1: {"tz": "Europe/Paris"}}
    assert finish == "tool_calls"
    assert setup.fake.requests[-1].json["tools"][0]["function"]["name"] == "get_weather"


async def test_headers_ids_and_correlation(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.url) as client:
        body = {"model": "m", "messages": MESSAGES, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers={"x-request-id": "req-123", "x-correlation-id": "corr-9"}) as response:
            raw = await response.aread()
    assert response.headers["x-request-id"] == "req-123"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in response.headers
    assert raw.endswith(b"data: [DONE]\n\n")
    forwarded = setup.fake.requests[-1].headers
    assert forwarded["x-correlation-id"] == "corr-9" and forwarded["x-request-id"] == "req-123"
    assert "authorization" not in forwarded  # the client's key is never passed to a backend


UPSTREAM = [("x-request-id", "req_hosted"), ("openai-processing-ms", "321"), ("x-ratelimit-remaining-requests", "4999"),
            ("x-ratelimit-reset-tokens", "6ms"), ("openai-organization", "the-operators-org")]


@pytest.mark.parametrize("stream", [False, True])
async def test_an_openai_backends_request_id_and_limits_reach_the_sdks_raw_response(setup: Setup, stream: bool) -> None:
    """What an OpenAI client reads off `with_raw_response` (and support asks for) comes from the
    backend that answered: its request id beside the gateway's, its processing time, its limits."""
    setup.fake.push(Script(headers=UPSTREAM))
    raw = await setup.client.chat.completions.with_raw_response.create(
        model="m", messages=MESSAGES, stream=stream,  # type: ignore[arg-type]
    )
    if stream:
        async for _ in raw.parse():  # type: ignore[union-attr]
            pass
    assert raw.headers["x-upstream-request-id"] == "req_hosted" and raw.headers["x-request-id"] != "req_hosted"
    assert raw.headers["openai-processing-ms"] == "321"
    assert raw.headers["x-ratelimit-remaining-requests"] == "4999"
    assert raw.headers["x-ratelimit-reset-tokens"] == "6ms"
    assert "openai-organization" not in raw.headers  # the operator's account is not the client's business

    # A backend's 429: how long to wait, to the millisecond, and its id for the error report.
    setup.fake.push(Script(status=429, retry_after=2, headers=[("retry-after-ms", "1500"), *UPSTREAM]))
    with pytest.raises(openai.RateLimitError) as info:
        await setup.client.chat.completions.create(model="m", messages=MESSAGES, stream=stream)  # type: ignore[arg-type]
    headers = info.value.response.headers
    assert headers["retry-after-ms"] == "1500" and headers.get_list("retry-after") == ["2"]
    assert headers["x-upstream-request-id"] == "req_hosted"
    assert headers["x-ratelimit-remaining-requests"] == "4999"

    # A backend that answers with the id it was sent (vLLM's) adds nothing.
    plain = await setup.client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    assert "x-upstream-request-id" not in plain.headers and "openai-processing-ms" not in plain.headers


@pytest.mark.parametrize("stream", [False, True])
async def test_an_anthropic_backends_rate_limits_reach_openai_clients_in_openais_names(stream: bool) -> None:
    # What OpenAI's SDK users and LiteLLM's router back off by, from Claude's own headers.
    reset = (datetime.now(UTC) + timedelta(seconds=90)).strftime("%Y-%m-%dT%H:%M:%SZ")
    limits = [
        ("anthropic-ratelimit-requests-limit", "50"), ("anthropic-ratelimit-requests-remaining", "49"),
        ("anthropic-ratelimit-requests-reset", reset), ("anthropic-ratelimit-tokens-limit", "80000"),
        ("anthropic-ratelimit-tokens-remaining", "79000"), ("anthropic-ratelimit-input-tokens-limit", "40000"),
    ]
    fake = AnthropicBackend(default=Script(tokens=["hi"], headers=limits))
    async with fake.serve() as server, running_gateway(backend("c", server.url, kind="anthropic", default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES, stream=stream)  # type: ignore[arg-type]
        if stream:
            async for _ in raw.parse():  # type: ignore[union-attr]
                pass
        # Refused for its rate limit: the numbers to back off by come with the 429 too.
        fake.push(Script(status=429, retry_after=3, headers=[*limits[:1], ("anthropic-ratelimit-requests-remaining", "0")]))
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=stream)  # type: ignore[arg-type]
        assert info.value.response.headers.get_list("x-ratelimit-remaining-requests") == ["0"]
        await client.close()
    headers = raw.headers
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("50", "49")
    assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) == ("80000", "79000")
    waited = headers["x-ratelimit-reset-requests"]  # OpenAI's duration, "1m29.5s"
    assert waited.startswith("1m") and 80 <= 60 + float(waited[2:].removesuffix("s")) <= 90
    assert not any(name.startswith("anthropic-ratelimit-") for name in headers)


# -- errors -----------------------------------------------------------------------------------------


async def test_invalid_field_is_a_400_naming_it(setup: Setup) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.chat.completions.create(model="m", messages=MESSAGES, temperature=7)  # type: ignore[arg-type]
    assert info.value.status_code == 400
    assert "temperature" in info.value.message
    assert info.value.body["param"] == "temperature"  # type: ignore[index]
    assert setup.fake.requests == []


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"messages": []}, "messages", "empty_array"),
        ({"messages": None}, "messages", "missing_required_parameter"),
        ({"temperature": 7}, "temperature", "decimal_above_max_value"),
        ({"temperature": -1}, "temperature", "decimal_below_min_value"),
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"n": 0}, "n", "integer_below_min_value"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens", "invalid_type"),
        ({"stream": "yes"}, "stream", "invalid_type"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    ],
)
async def test_a_refused_field_carries_openais_code(setup: Setup, fields: dict[str, object], param: str, code: str) -> None:
    """OpenAI's 400s say what was wrong in `code` as well as which field (`param`): clients and
    their tests branch on both; the gateway's said `code: null`."""
    body = {"model": "m", "messages": MESSAGES, **fields}
    body = {key: value for key, value in body.items() if value is not None}
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.post("/chat/completions", body=body, cast_to=httpx.Response)
    assert (info.value.param, info.value.code) == (param, code)
    assert setup.fake.requests == []


async def test_malformed_json_is_a_400(setup: Setup) -> None:
    async with httpx.AsyncClient(base_url=setup.url) as client:
        response = await client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_body_too_large_is_a_413() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, default=True), max_body_bytes=2000) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 5000}])
        assert info.value.status_code == 413
        assert "too large" in info.value.message
        await client.close()


async def test_unknown_model_is_a_404() -> None:
    fake = OpenAIBackend()
    async with fake.serve() as server, running_gateway(backend("b", server.url, prefixes=("qwen3-",))) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(model="gpt-9", messages=MESSAGES)  # type: ignore[arg-type]
        assert "gpt-9" in info.value.message
        await client.close()


async def test_backend_error_is_a_502_with_its_message(setup: Setup) -> None:
    setup.fake.set_script(Script(status=500, error_message="CUDA out of memory"))
    with pytest.raises(openai.InternalServerError) as info:
        await setup.client.chat.completions.create(model="m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert info.value.status_code == 502
    assert "CUDA out of memory" in info.value.message


@pytest.mark.parametrize("reason", ["error", "abort"])
async def test_a_whole_answer_the_backend_ended_in_failure_is_a_502_not_a_stop(setup: Setup, reason: str) -> None:
    # vLLM ends an aborted or failed request this way; streamed, it is already an error event.
    setup.fake.set_script(Script(tokens=["half an ans"], finish_reason=reason))
    with pytest.raises(openai.InternalServerError) as info:
        await setup.client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 502
    assert f"`{reason}`" in info.value.message


async def test_backend_validation_error_keeps_its_400(setup: Setup) -> None:
    setup.fake.set_script(Script(status=400, error_message="max_tokens is too large for this model's context"))
    with pytest.raises(openai.BadRequestError) as info:
        await setup.client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert "context" in info.value.message


async def test_backend_rate_limit_passes_retry_after(setup: Setup) -> None:
    setup.fake.set_script(Script(status=429, error_message="slow down", retry_after=7))
    with pytest.raises(openai.RateLimitError) as info:
        await setup.client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.response.headers["retry-after"] == "7"
    # OpenAI's backend said which limit ran out (its `type`): so does the gateway.
    assert info.value.type == "requests" and info.value.code == "rate_limit_exceeded"


async def test_unreachable_backend_is_a_503() -> None:
    port = refusing_port()
    async with running_gateway(backend("dead", f"http://127.0.0.1:{port}", default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        assert info.value.status_code == 503
        assert "unreachable" in info.value.message
        await client.close()


async def test_first_token_timeout_is_a_504_and_closes_the_backend() -> None:
    fake = OpenAIBackend(default=Script(stall_before_headers=True))
    quick = Timeouts(connect=2, first_token=0.3, idle=5, total=30)
    async with fake.serve() as server, running_gateway(backend("slow", server.url, default=True, timeouts=quick)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        assert info.value.status_code == 504
        await fake.wait_disconnect(2.0)
        await client.close()


async def test_idle_timeout_mid_stream_ends_with_an_error_event() -> None:
    fake = OpenAIBackend(default=Script(tokens=["a", "b", "c", "d"], stall_after=3))
    quick = Timeouts(connect=2, first_token=5, idle=0.3, total=30)
    async with fake.serve() as server, running_gateway(backend("slow", server.url, default=True, timeouts=quick)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        seen = []
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                seen.append(chunk)
        assert seen and "idle" in info.value.message
        await fake.wait_disconnect(2.0)
        await client.close()


@pytest.mark.parametrize("mode", ["error", "close"])
async def test_backend_failing_mid_stream_gives_one_error_event(setup: Setup, mode: str) -> None:
    setup.fake.set_script(Script(tokens=["a", "b", "c", "d", "e"], fail_after=3, fail_mode=mode, error_message="engine died"))  # type: ignore[arg-type]
    async with httpx.AsyncClient(base_url=setup.url) as client:
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True})
    assert response.status_code == 200
    frames = [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]
    errors = [json.loads(f) for f in frames if f != "[DONE]" and "error" in json.loads(f)]
    assert len(errors) == 1 and frames[-1] != "[DONE]"
    assert set(errors[0]["error"]) == {"message", "type", "param", "code"}
    if mode == "error":
        assert "engine died" in errors[0]["error"]["message"]
    stream = await setup.client.chat.completions.create(model="m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


@pytest.mark.parametrize("mode", ["error", "close"])
async def test_a_backend_failing_right_after_its_role_chunk_is_a_real_status(setup: Setup, mode: str) -> None:
    # Nothing but the role chunk came before the failure: the client has been told nothing yet.
    setup.fake.push(Script(tokens=["a"], fail_after=1, pace=0.05, fail_mode=mode, error_message="model failed to load"))  # type: ignore[arg-type]
    with pytest.raises(openai.APIStatusError) as info:
        await setup.client.chat.completions.create(model="m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert info.value.status_code == 502
    if mode == "error":
        assert "model failed to load" in info.value.message


async def test_a_backend_alive_but_silent_after_its_role_chunk_still_gives_the_client_its_head(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The role chunk alone is held back (a failure after it would still be a real status), but
    # not for as long as the backend thinks: its first keep-alive sends the head, and the
    # keep-alives follow, so no client or proxy on the way times out on a silent 200.
    monkeypatch.setattr("proxy.infra.backends._pump.KEEPALIVE_SECONDS", 0.2)
    setup.fake.set_script(Script(tokens=["a", "b"], stall_after=1, keepalive_interval=0.05))
    async with httpx.AsyncClient(base_url=setup.url) as client:
        with trio.fail_after(3):
            async with client.stream(
                "POST", "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True}
            ) as response:
                assert response.status_code == 200
                first = await response.aiter_lines().__anext__()
    assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"


# -- cancellation -------------------------------------------------------------------------------------


async def test_disconnect_mid_stream_closes_the_backend_request(setup: Setup) -> None:
    setup.fake.set_script(Script(n_tokens=1000, pace=0.01))
    async with httpx.AsyncClient(base_url=setup.url) as client:
        async with client.stream("POST", "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True}) as response:
            lines = response.aiter_lines()
            for _ in range(6):
                await lines.__anext__()
    gone = await setup.fake.wait_disconnect(2.0)
    assert 0 < gone.frames_sent < 1000
    await setup.fake.wait_idle(2.0)


async def test_disconnect_before_first_token_closes_the_backend_request(setup: Setup) -> None:
    setup.fake.set_script(Script(header_delay=30))
    async with httpx.AsyncClient(base_url=setup.url) as client:
        await hang_up_once_received(setup.fake, lambda: client.post(
            "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True}
        ))
    gone = await setup.fake.wait_disconnect(2.0)
    assert not gone.headers_sent


async def test_disconnect_while_non_streaming_request_waits(setup: Setup) -> None:
    setup.fake.set_script(Script(n_tokens=100, pace=0.2))  # a 20 s generation
    async with httpx.AsyncClient(base_url=setup.url) as client:
        await hang_up_once_received(setup.fake, lambda: client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES}))
    await setup.fake.wait_disconnect(2.0)
    await setup.fake.wait_idle(2.0)


@pytest.mark.parametrize("stream", [True, False])
async def test_the_connection_closing_is_heard_before_the_request_reads_its_disconnect(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    # When a hundred clients leave at once, a request's task reads hypercorn's
    # `http.disconnect` only after much of the others' teardown: the connection's reader
    # closes the backend request the moment it reads the end. Here the message never comes.
    async def never_reads_it(*_: object) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr("proxy.http._front._watch_disconnect", never_reads_it)
    setup.fake.set_script(Script(n_tokens=100, pace=0.2))  # a 20 s generation
    async with httpx.AsyncClient(base_url=setup.url) as client:
        await hang_up_once_received(setup.fake, lambda: client.post(
            "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": stream}
        ))
    gone = await setup.fake.wait_disconnect(2.0)
    assert gone.frames_sent < 100
    await setup.fake.wait_idle(2.0)


async def test_repeated_disconnects_leave_no_tasks_behind(setup: Setup) -> None:
    setup.fake.set_script(Script(n_tokens=1000, pace=0.01))

    def task_count() -> int:
        def count(task: trio.lowlevel.Task) -> int:
            return 1 + sum(count(child) for nursery in task.child_nurseries for child in nursery.child_tasks)
        return count(trio.lowlevel.current_root_task())

    async def drop_one(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True}) as response:
            lines = response.aiter_lines()
            await lines.__anext__()

    async with httpx.AsyncClient(base_url=setup.url, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        await drop_one(client)
        await setup.fake.wait_idle(2.0)
        await trio.sleep(0.1)
        baseline = task_count()
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(drop_one, client)
        await setup.fake.wait_idle(2.0)
    assert setup.fake.cancelled >= 21
    # The gateway's handlers wind down a moment after the backend saw them go: a leak is
    # a task that never ends.
    async def wound_down() -> bool:
        return task_count() <= baseline

    await eventually(wound_down)


# -- routing and catalogue ------------------------------------------------------------------------------


async def test_prefix_routing_aliases_and_default() -> None:
    general, coder = OpenAIBackend(name="general"), OpenAIBackend(name="coder")
    async with general.serve() as g, coder.serve() as c, running_gateway(
        backend("general", g.url, default=True),
        backend("coder", c.url, prefixes=("qwen3-coder",)),
        aliases={"gpt-4o": "qwen3-coder-30b"},
    ) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        for model in ("qwen3-coder-30b", "gpt-4o", "llama-3"):
            await client.chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
        await client.close()
    assert [r.json["model"] for r in coder.requests] == ["qwen3-coder-30b", "qwen3-coder-30b"]
    assert [r.json["model"] for r in general.requests] == ["llama-3"]


async def test_models_are_the_union_of_backends_tagged_and_ready_reports_outages() -> None:
    one = OpenAIBackend(models=["qwen3-8b", "qwen3-32b"])
    two = OpenAIBackend(models=["llama-3-8b"])
    async with one.serve() as a, two.serve() as b:
        dead = "http://127.0.0.1:9"
        async with running_gateway(
            backend("a", a.url, default=True), backend("b", b.url, prefixes=("llama",)),
            aliases={"gpt-4o": "qwen3-32b"},
        ) as url:
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            models = {m.id: m for m in (await client.models.list()).data}
            assert {"qwen3-8b", "qwen3-32b", "llama-3-8b", "gpt-4o"} <= set(models)
            assert models["llama-3-8b"].model_extra["backend"] == "b"  # type: ignore[index]
            assert models["gpt-4o"].model_extra["backend"] == "a"  # type: ignore[index]
            await client.close()
            async with httpx.AsyncClient(base_url=url) as http:
                assert (await http.get("/health")).status_code == 200
                assert (await http.get("/ready")).status_code == 200
        async with running_gateway(backend("a", a.url, default=True), backend("gone", dead, prefixes=("x",))) as url:
            async with httpx.AsyncClient(base_url=url) as http:
                ready = await http.get("/ready")
                assert ready.status_code == 503
                assert "gone" in ready.json()["reason"]
                assert (await http.get("/health")).status_code == 200


class NoListing(OpenAIBackend):
    """A server answering its model listing as FastAPI answers a path it lacks (vLLM's root
    without `/v1`; an audio server without a listing), or with another `status`."""

    def __init__(self, *, status: int = 404, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.status = status

    async def route(self, request: Request, exchange: Exchange, call: Call) -> None:
        if request.method == "GET" and request.path.endswith("/models"):
            await exchange.respond_json(self.status, {"detail": "Not Found" if self.status == 404 else "Slow down"})
            return
        await super().route(request, exchange, call)


@pytest.mark.parametrize(("status", "said"), [(404, "no model listing"), (405, "no model listing"), (429, "rate limited")])
async def test_a_backend_without_a_model_listing_is_ready_and_says_where_it_looked(status: int, said: str) -> None:
    # An audio- or embedding-only server has no listing, and serves: `/ready` answered 503,
    # which takes the whole gateway out of its load balancer (so did a hosted API's rate limit
    # on its listing). Its note still reads as a base URL missing vLLM's `/v1`, where that is the cause.
    fake = NoListing(status=status, default=Script(tokens=["served"]))
    async with fake.serve() as server, running_gateway(backend("whisper", server.url, default=True)) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            ready = await http.get("/ready")
            chat = await http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert ready.status_code == 200 and ready.json()["status"] == "ok", ready.text
    note = ready.json()["checks"]["backend:whisper"]
    assert note.startswith("ok (") and said in note and "GET /v1/models" in note, note
    assert chat.status_code == 200


async def test_a_backend_refusing_the_gateways_key_is_unready_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("READY_TEST_KEY", "sk-a-wrong-one")
    fake = OpenAIBackend(api_key="sk-the-right-one")
    async with fake.serve() as server, running_gateway(
        backend("hosted", server.url, default=True, api_key_env="READY_TEST_KEY")
    ) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            ready = await http.get("/ready")
    assert ready.status_code == 503
    reason = ready.json()["checks"]["backend:hosted"]
    assert "Backend `hosted` returned 401" in reason


async def test_backend_connections_are_reused_across_requests(setup: Setup) -> None:
    setup.fake.set_script(Script(tokens=["a", "b"]))
    for stream in (True, False, True, True, False):
        await setup.client.chat.completions.create(model="m", messages=MESSAGES, stream=stream)  # type: ignore[call-overload]
    await trio.sleep(0.1)
    assert setup.fake.server is not None and setup.fake.server.connections_total == 1


async def test_request_log_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    fake = OpenAIBackend(default=Script(tokens=["a", "b"], usage=Usage(3, 2)))
    caplog.set_level("INFO", logger="llm_proxy.request")
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True), access_log=True) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        await client.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"x-request-id": "r1"})  # type: ignore[arg-type]
        fake.set_script(Script(n_tokens=500, pace=0.01))
        async with httpx.AsyncClient(base_url=url) as http:
            async with http.stream("POST", "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True},
                                   headers={"x-request-id": "r2"}) as response:
                await response.aiter_lines().__anext__()
        await fake.wait_disconnect(2.0)
        await client.close()
    records = {r.request_id: r for r in caplog.records if r.name == "llm_proxy.request"}  # type: ignore[attr-defined]
    done, dropped = records["r1"], records["r2"]
    assert (done.status, done.cancelled, done.finish_reason, done.backend) == (200, False, "stop", "vllm")  # type: ignore[attr-defined]
    assert (done.prompt_tokens, done.completion_tokens) == (3, 2)  # type: ignore[attr-defined]
    assert done.trace_id and done.total_ms > 0 and done.ttft_ms is not None  # type: ignore[attr-defined]
    assert dropped.cancelled is True and dropped.stream is True  # type: ignore[attr-defined]


async def test_a_chat_left_before_its_answer_began_is_logged_499_as_it_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    # Its line said `"status": 0` while `/metrics` (and a relayed call's line) said 499.
    fake = OpenAIBackend(default=Script(tokens=["a"], header_delay=5.0))
    caplog.set_level("INFO", logger="llm_proxy.request")
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, default=True), access_log=True) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            await hang_up_once_received(fake, lambda: http.post(
                "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, headers={"x-request-id": "gone"},
            ))

            async def logged() -> object:
                return next((r for r in caplog.records if getattr(r, "request_id", None) == "gone"), None)

            line = await eventually(logged)
    assert (line.status, line.cancelled) == (499, True)  # type: ignore[attr-defined]


async def test_refused_requests_get_their_log_line_too(caplog: pytest.LogCaptureFixture) -> None:
    """An operator sees the clients the gateway turned away, not only the answered ones."""
    fake = OpenAIBackend()
    caplog.set_level("INFO", logger="llm_proxy.request")
    async with fake.serve() as server, running_gateway(backend("vllm", server.url, prefixes=("qwen",)), access_log=True) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            bad_json = await http.post("/v1/chat/completions", content=b"{nope", headers={"x-request-id": "bad"})
            unknown = await http.post("/v1/chat/completions", headers={"x-request-id": "unknown"},
                                      json={"model": "mistral", "messages": MESSAGES, "stream": True})
            ollama_bad = await http.post("/api/chat", json={"model": "qwen3", "messages": "hi"}, headers={"x-request-id": "ol"})
    assert (bad_json.status_code, unknown.status_code, ollama_bad.status_code) == (400, 404, 400)
    records = {r.request_id: r for r in caplog.records if r.name == "llm_proxy.request"}  # type: ignore[attr-defined]
    bad, missing, ollama_line = records["bad"], records["unknown"], records["ol"]
    assert (bad.status, bad.source, bad.model, bad.dialect) == (400, "refused", "", "openai")  # type: ignore[attr-defined]
    assert "JSON" in bad.error  # type: ignore[attr-defined]
    assert (missing.status, missing.model, missing.stream) == (404, "mistral", True)  # type: ignore[attr-defined]
    assert "mistral" in missing.error  # type: ignore[attr-defined]
    assert (ollama_line.status, ollama_line.dialect, ollama_line.model) == (400, "ollama", "qwen3")  # type: ignore[attr-defined]


# What vLLM, TGI and Infinity answer when pydantic refuses a field: FastAPI's 422, and
# vLLM's own 400 that prints pydantic's errors in its message.
FASTAPI_422 = {"detail": [{"loc": ["body", "repetition_penalty"], "msg": "Input should be greater than 0", "type": "greater_than"}]}
VLLM_400 = {
    "object": "error", "type": "BadRequestError", "param": None, "code": 400,
    "message": "1 validation error:\n  {'type': 'greater_than', 'loc': ('body', 'repetition_penalty'), "
               "'msg': 'Input should be greater than 0', 'input': -1, 'ctx': {'gt': 0}}",
}


@pytest.mark.parametrize(("status", "body"), [(422, FASTAPI_422), (400, VLLM_400)])
async def test_a_backend_validation_error_names_its_field_in_every_dialect(
    setup: Setup, status: int, body: dict[str, object]
) -> None:
    setup.fake.set_script(Script(status=status, error_body=body))
    said = "repetition_penalty: Input should be greater than 0"
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await setup.client.chat.completions.create(
                model="m", messages=MESSAGES, stream=stream, extra_body={"repetition_penalty": -1}  # type: ignore[arg-type]
            )
        assert isinstance(info.value.body, dict) and info.value.body["message"] == said
        assert info.value.param == "repetition_penalty"
    async with httpx.AsyncClient(base_url=setup.url) as http:
        claude = await http.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": MESSAGES})
        ollama = await http.post("/api/chat", json={"model": "m", "stream": False, "messages": MESSAGES})
    assert claude.status_code == 400 and claude.json()["error"]["message"] == said
    assert ollama.status_code == 400 and ollama.json() == {"error": said}


@pytest.mark.parametrize("kind", ["openai", "anthropic", "ollama"])
@pytest.mark.parametrize(("status", "expected"), [(409, 409), (415, 415), (451, 400), (402, 502), (405, 502)])
async def test_a_backends_4xx_about_the_request_keeps_its_status_class_in_every_dialect(
    kind: str, status: int, expected: int
) -> None:
    # As LiteLLM passes a backend's 4xx on: the client's mistake is no bad gateway (nor a
    # stand-in's to make good); one about the gateway's own call (its account, its method) is.
    fakes = {"openai": OpenAIBackend, "anthropic": AnthropicBackend, "ollama": OllamaBackend}
    fake = fakes[kind](default=Script(status=status, error_message="the backend says no"))
    async with fake.serve() as server, running_gateway(backend("b", server.url, kind=kind, default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as info:
                await client.chat.completions.create(model="m", messages=MESSAGES, stream=stream)  # type: ignore[arg-type]
            assert info.value.status_code == expected, stream
            assert "the backend says no" in info.value.message
            # The gateway's own set-up must be mended first: the SDK is told not to retry it.
            assert info.value.response.headers.get("x-should-retry") == ("false" if expected == 502 else None)
        await client.close()
        async with httpx.AsyncClient(base_url=url) as http:
            claude = await http.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": MESSAGES})
            local = await http.post("/api/chat", json={"model": "m", "stream": False, "messages": MESSAGES})
    assert claude.status_code == expected and claude.json()["type"] == "error"
    assert claude.json()["error"]["type"] == ("api_error" if expected == 502 else "invalid_request_error")
    assert local.status_code == expected and "the backend says no" in local.json()["error"]


async def test_a_validation_error_of_vllms_messages_api_names_its_field() -> None:
    # vLLM serves Anthropic's Messages API too, with the same FastAPI 422s.
    fake = AnthropicBackend(default=Script(status=422, error_body=FASTAPI_422))
    async with fake.serve() as server, running_gateway(backend("c", server.url, kind="anthropic", default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
        await client.close()
    assert isinstance(info.value.body, dict)
    assert info.value.body["message"] == "repetition_penalty: Input should be greater than 0"
    assert info.value.param == "repetition_penalty"


async def test_a_prefill_ending_in_whitespace_reaches_an_anthropic_backend_without_it() -> None:
    # Anthropic refuses "final assistant content cannot end with trailing whitespace".
    fake = AnthropicBackend(default=Script(tokens=[" 42"]))
    question = {"role": "user", "content": "What is six times seven?"}
    async with fake.serve() as server, running_gateway(backend("c", server.url, kind="anthropic", default=True)) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = await client.chat.completions.create(
            model="m", messages=[question, {"role": "assistant", "content": "The answer is "}],  # type: ignore[list-item]
        )
        assert answer.choices[0].message.content == " 42"
        # Text parts: the one left empty goes, the one before loses its trailing space.
        parts = [{"type": "text", "text": "The answer is "}, {"type": "text", "text": "\n\n"}]
        await client.chat.completions.create(model="m", messages=[question, {"role": "assistant", "content": parts}])  # type: ignore[list-item]
        await client.close()
        async with httpx.AsyncClient(base_url=url) as http:
            ollama = {"model": "m", "stream": False, "messages": [question, {"role": "assistant", "content": "The answer is\n"}]}
            assert (await http.post("/api/chat", json=ollama)).status_code == 200
            # Nothing but whitespace: no prefill at all; the question ends the conversation.
            await http.post("/v1/chat/completions", json={"model": "m", "messages": [question, {"role": "assistant", "content": " "}]})
            claude = {"model": "m", "max_tokens": 9, "messages": [question, {"role": "assistant", "content": [{"type": "text", "text": "The answer is "}]}]}
            assert (await http.post("/v1/messages", json=claude)).status_code == 200
            # A conversation that does not end with the assistant is sent as it came.
            await http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi "}]})
    last = [request.json["messages"][-1] for request in fake.requests if request.path == "/v1/messages"]
    assert last == [
        {"role": "assistant", "content": "The answer is"},
        {"role": "assistant", "content": "The answer is"},
        {"role": "assistant", "content": "The answer is"},
        {"role": "user", "content": "What is six times seven?"},
        {"role": "assistant", "content": "The answer is"},
        {"role": "user", "content": "hi "},
    ]
