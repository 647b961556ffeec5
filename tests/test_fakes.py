"""The fake backends speak their protocols the way the official SDKs expect.

The SDKs' async clients are used directly under trio: openai and anthropic run on
httpx2 + anyio, ollama on httpx + anyio, and all three work on the trio backend.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
import trio
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from tests.fakes import (
    AnthropicBackend,
    OllamaBackend,
    OpenAIBackend,
    Script,
    Usage,
)

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is the weather in Paris and Tokyo?"
USER: list[dict[str, Any]] = [{"role": "user", "content": QUESTION}]
OPENAI_USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
ANTHROPIC_USER: list[MessageParam] = [{"role": "user", "content": QUESTION}]


def openai_client(url: str, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, **kwargs)


def anthropic_client(url: str, **kwargs: Any) -> anthropic.AsyncAnthropic:
    kwargs.setdefault("api_key", "sk-ant-test")
    return anthropic.AsyncAnthropic(base_url=url, max_retries=0, **kwargs)


def sse_data(raw: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len("data: ") :] for line in raw.split("\n") if line.startswith("data: ")]


def sse_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# --------------------------------------------------------------------------- OpenAI


async def test_openai_stream_is_byte_exact_and_sdk_reads_it() -> None:
    backend = OpenAIBackend(default=Script(tokens=["Hel", "lo", " world"]))
    async with backend.serve() as server, httpx.AsyncClient() as http:
        body = {"model": "m1", "messages": USER, "stream": True}
        raw = await http.post(f"{server.url}/v1/chat/completions", json=body)
        stream = await openai_client(server.url).chat.completions.create(
            model="m1", messages=OPENAI_USER, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream])

    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["cache-control"] == "no-cache"
    assert "content-length" not in raw.headers
    assert raw.text.endswith("data: [DONE]\n\n")
    chunks = [json.loads(d) for d in sse_data(raw.text)[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == ["Hel", "lo", " world"]
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert text == "Hello world"


@pytest.mark.parametrize("interleave", [False, True])
async def test_openai_parallel_tool_calls_reassemble_in_the_sdk(interleave: bool) -> None:
    calls = [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_weather", {"city": "Tokyo", "unit": "celsius"}),
        ("get_time", {"tz": "Asia/Tokyo"}),
    ]
    script = Script(
        tokens=[], tool_calls=calls, tool_arg_fragment=5, interleave_tool_calls=interleave
    )
    backend = OpenAIBackend(default=script)
    async with backend.serve() as server:
        client = openai_client(server.url)
        async with client.chat.completions.stream(model="m", messages=OPENAI_USER) as stream:
            completion = await stream.get_final_completion()
        plain = await client.chat.completions.create(model="m", messages=OPENAI_USER)

    for choice in (completion.choices[0], plain.choices[0]):
        assert choice.finish_reason == "tool_calls"
        got = [
            (c.function.name, json.loads(c.function.arguments))  # type: ignore[union-attr]
            for c in choice.message.tool_calls or []
        ]
        assert got == calls
        ids = [c.id for c in choice.message.tool_calls or []]
        assert len(set(ids)) == 3 and all(i.startswith("call_") for i in ids)
    assert plain.choices[0].message.content is None


async def test_openai_tool_call_deltas_follow_the_fragment_rules() -> None:
    backend = OpenAIBackend(default=Script(tokens=[], tool_calls=[("f", {"a": 1}), ("g", "{}")]))
    async with backend.serve() as server, httpx.AsyncClient() as http:
        body = {"model": "m", "messages": USER, "stream": True}
        raw = await http.post(f"{server.url}/v1/chat/completions", json=body)
    deltas = [json.loads(d)["choices"][0]["delta"] for d in sse_data(raw.text)[1:-2]]
    first, *rest = [d["tool_calls"][0] for d in deltas if d["tool_calls"][0]["index"] == 0]
    assert first.keys() == {"index", "id", "type", "function"}
    assert first["function"] == {"name": "f", "arguments": ""}
    assert all(
        r.keys() == {"index", "function"} and r["function"].keys() == {"arguments"} for r in rest
    )
    assert {d["tool_calls"][0]["index"] for d in deltas} == {0, 1}


async def test_openai_usage_chunk_only_when_asked() -> None:
    usage = Usage(prompt_tokens=11, completion_tokens=3, cached_tokens=4)
    backend = OpenAIBackend(default=Script(tokens=["a", "b", "c"], usage=usage))
    async with backend.serve() as server, httpx.AsyncClient() as http:
        client = openai_client(server.url)
        asked = [
            c
            async for c in await client.chat.completions.create(
                model="m",
                messages=OPENAI_USER,
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        not_asked = [
            c
            async for c in await client.chat.completions.create(
                model="m", messages=OPENAI_USER, stream=True
            )
        ]
        body = {"model": "m", "messages": USER, "stream": True}
        raw_asked = await http.post(
            f"{server.url}/v1/chat/completions",
            json={**body, "stream_options": {"include_usage": True}},
        )

    assert asked[-1].choices == []
    assert asked[-1].usage is not None
    assert (asked[-1].usage.prompt_tokens, asked[-1].usage.completion_tokens) == (11, 3)
    assert asked[-1].usage.total_tokens == 14
    assert asked[-1].usage.prompt_tokens_details.cached_tokens == 4  # type: ignore[union-attr]
    assert all(c.usage is None and c.choices for c in asked[:-1])
    assert all(c.usage is None and c.choices for c in not_asked)
    assert len(not_asked) == len(asked) - 1
    assert all('"usage":null' in d for d in sse_data(raw_asked.text)[:-2])


async def test_openai_non_stream_honours_max_tokens() -> None:
    backend = OpenAIBackend(default=Script(n_tokens=10))
    async with backend.serve() as server:
        client = openai_client(server.url)
        full = await client.chat.completions.create(model="m", messages=OPENAI_USER)
        cut = await client.chat.completions.create(model="m", messages=OPENAI_USER, max_tokens=4)
    assert full.object == "chat.completion"
    assert full.choices[0].finish_reason == "stop"
    assert full.choices[0].message.content == "".join(f"w{i} " for i in range(10))
    assert full.usage is not None and full.usage.completion_tokens == 10
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == "w0 w1 w2 w3 "


async def test_openai_reasoning_comments_and_vllm_finish_shape() -> None:
    script = Script(
        tokens=["x", "y"],
        reasoning=["think", "ing"],
        keepalive_comments=True,
        finish_on_last_token=True,
        no_role_chunk=True,
    )
    backend = OpenAIBackend(default=script)
    async with backend.serve() as server, httpx.AsyncClient() as http:
        body = {"model": "m", "messages": USER, "stream": True}
        raw = await http.post(f"{server.url}/v1/chat/completions", json=body)
        chunks = [
            c
            async for c in await openai_client(server.url).chat.completions.create(
                model="m", messages=OPENAI_USER, stream=True
            )
        ]
    assert raw.text.count(": ping\n\n") == len(sse_data(raw.text))
    deltas = [json.loads(d)["choices"][0] for d in sse_data(raw.text)[:-1]]
    assert [d["delta"] for d in deltas] == [
        {"reasoning_content": "think"},
        {"reasoning_content": "ing"},
        {"content": "x"},
        {"content": "y"},
    ]
    assert deltas[-1]["finish_reason"] == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "xy"


async def test_openai_errors_raise_the_sdk_exceptions() -> None:
    backend = OpenAIBackend(models=["known"])
    async with backend.serve() as server:
        client = openai_client(server.url)
        backend.push(Script(status=429, retry_after=2))
        with pytest.raises(openai.RateLimitError) as rate_limited:
            await client.chat.completions.create(model="known", messages=OPENAI_USER)
        with pytest.raises(openai.NotFoundError) as not_found:
            await client.chat.completions.create(model="nope", messages=OPENAI_USER)
        backend.push(Script(status=503, stall_before_headers=False))
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="known", messages=OPENAI_USER, stream=True)

        backend.push(Script(n_tokens=10, fail_after=3, error_message="engine died"))
        stream = await client.chat.completions.create(
            model="known", messages=OPENAI_USER, stream=True
        )
        seen = []
        with pytest.raises(openai.APIError, match="engine died"):
            async for chunk in stream:
                seen.append(chunk)

        backend.push(Script(n_tokens=10, fail_after=3, fail_mode="close"))
        stream = await client.chat.completions.create(
            model="known", messages=OPENAI_USER, stream=True
        )
        with pytest.raises(openai.APIConnectionError):
            async for _ in stream:
                pass

    assert rate_limited.value.response.headers["retry-after"] == "2"
    assert rate_limited.value.body == {
        "message": "scripted failure with status 429",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert not_found.value.code == "model_not_found"
    assert len(seen) == 3
    assert (backend.completed, backend.failed) == (0, 4)


async def test_openai_embeddings_are_deterministic_in_both_encodings() -> None:
    backend = OpenAIBackend(embedding_dim=16)
    texts = ["the cat sat on the mat", "the cat sat on a mat", "quarterly tax filing"]
    async with backend.serve() as server:
        client = openai_client(server.url)
        as_b64 = await client.embeddings.create(model="e", input=texts)  # SDK asks for base64
        as_float = await client.embeddings.create(model="e", input=texts, encoding_format="float")
        models = await client.models.list()

    assert backend.requests[0].json["encoding_format"] == "base64"
    vectors = [d.embedding for d in as_float.data]
    assert all(len(v) == 16 for v in vectors)
    assert [pytest.approx(v, abs=1e-6) for v in vectors] == [d.embedding for d in as_b64.data]

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.3
    assert [m.id for m in models.data] == ["fake-model"]


async def test_openai_requests_are_recorded_with_headers_and_body() -> None:
    backend = OpenAIBackend(api_key="sk-test")
    async with backend.serve() as server:
        await openai_client(server.url).chat.completions.create(
            model="m",
            messages=OPENAI_USER,
            extra_headers={"x-request-id": "abc"},
        )
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(
                base_url=f"{server.url}/v1", api_key="wrong", max_retries=0
            ).models.list()
    first = backend.requests[0]
    assert (first.method, first.path, first.model) == ("POST", "/v1/chat/completions", "m")
    assert first.headers["authorization"] == "Bearer sk-test"
    assert first.headers["x-request-id"] == "abc"
    assert first.json["messages"] == USER
    assert first.received_at <= time.monotonic()


async def test_openai_stream_cancelled_by_client_is_recorded_quickly() -> None:
    backend = OpenAIBackend(default=Script(n_tokens=1000, pace=0.01))
    async with backend.serve() as server:
        stream = await openai_client(server.url).chat.completions.create(
            model="m", messages=OPENAI_USER, stream=True
        )
        got = 0
        async for _ in stream:
            got += 1
            if got == 5:
                break
        assert backend.active_streams == 1
        closed_at = time.monotonic()
        await stream.close()
        disconnect = await backend.wait_disconnect(1.0)
        await backend.wait_idle(1.0)

    assert disconnect.at - closed_at < 0.1
    assert disconnect.path == "/v1/chat/completions"
    assert disconnect.headers_sent
    assert 5 <= disconnect.frames_sent < 20
    assert (backend.cancelled, backend.completed, backend.active_streams) == (1, 0, 0)


async def test_disconnect_before_headers_and_during_stall_are_recorded() -> None:
    backend = OpenAIBackend()
    async with backend.serve() as server:
        client = openai_client(server.url, timeout=0.3)
        backend.push(Script(stall_before_headers=True))
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=OPENAI_USER)
        before_headers = await backend.wait_disconnect(1.0)

        backend.push(Script(stall_after=2, keepalive_interval=0.05))
        async with httpx.AsyncClient() as http:
            body = {"model": "m", "messages": USER, "stream": True}
            async with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
                received = b""
                async for piece in r.aiter_bytes():
                    received += piece
                    if received.count(b": ping") >= 2:
                        break
        stalled = await backend.wait_disconnect(1.0)

    assert not before_headers.headers_sent and before_headers.frames_sent == 0
    assert stalled.headers_sent and stalled.frames_sent == 2
    assert received.count(b"data: ") == 2
    assert backend.cancelled == 2


async def test_frames_per_write_coalesces_frames_into_one_socket_write() -> None:
    backend = OpenAIBackend(default=Script(tokens=["t"] * 10, pace=0.03, frames_per_write=4))
    request = json.dumps({"model": "m", "messages": USER, "stream": True}).encode()
    async with backend.serve() as server:
        sock = await trio.open_tcp_stream(server.host, server.port)
        await sock.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(request), request)
        )
        arrivals: list[tuple[float, bytes]] = []
        while not arrivals or b"0\r\n\r\n" not in arrivals[-1][1]:
            data = await sock.receive_some(65536)
            arrivals.append((time.monotonic(), data))
        await sock.aclose()

    groups: list[bytes] = []
    last = -1.0
    for at, data in arrivals:
        if at - last > 0.015:
            groups.append(b"")
        groups[-1] += data
        last = at
    # 13 frames (role, 10 tokens, finish, [DONE]) in writes of 4: 4 + 4 + 4 + 1.
    assert [g.count(b"data: ") for g in groups] == [4, 4, 4, 1]


async def test_many_concurrent_streams_are_served_and_counted() -> None:
    backend = OpenAIBackend(default=Script(n_tokens=20))
    async with backend.serve() as server:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(limits=limits) as http:

            async def one() -> None:
                body = {"model": "m", "messages": USER, "stream": True}
                r = await http.post(f"{server.url}/v1/chat/completions", json=body)
                assert r.text.count("data: ") == 23

            async with trio.open_nursery() as nursery:
                for _ in range(64):
                    nursery.start_soon(one)
        assert server.connections_total <= 32

    assert (backend.completed, backend.cancelled, backend.failed) == (64, 0, 0)
    assert all(g.frames_sent == 23 for g in backend.generations)


async def test_client_closing_after_the_last_byte_is_not_a_disconnect() -> None:
    backend = OpenAIBackend(default=Script(n_tokens=20))
    request = json.dumps({"model": "m", "messages": USER, "stream": True}).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
    async with backend.serve() as server:
        for _ in range(30):
            sock = await trio.open_tcp_stream(server.host, server.port)
            await sock.send_all(head % len(request) + request)
            received = b""
            while not received.endswith(b"\r\n0\r\n\r\n"):
                received += await sock.receive_some(65536)
            await sock.aclose()
        await backend.wait_idle(1.0)
    assert (backend.completed, backend.cancelled, len(backend.disconnects)) == (30, 0, 0)


async def test_dropping_connections_cuts_streams_like_a_crash() -> None:
    backend = OpenAIBackend(default=Script(n_tokens=1000, pace=0.01))
    async with backend.serve() as server:
        stream = await openai_client(server.url).chat.completions.create(
            model="m", messages=OPENAI_USER, stream=True
        )
        with pytest.raises(openai.APIConnectionError):
            async for _ in stream:
                server.drop_connections()
        await backend.wait_idle(1.0)
    assert (backend.failed, backend.cancelled, backend.disconnects) == (1, 0, [])


async def test_keep_alive_reuses_one_connection() -> None:
    backend = OpenAIBackend()
    async with backend.serve() as server:
        client = openai_client(server.url)
        for _ in range(3):
            await client.chat.completions.create(model="m", messages=OPENAI_USER)
            await client.models.list()
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{server.url}/health")).json() == {"status": "ok"}
            backend.healthy = False
            assert (await http.get(f"{server.url}/health")).status_code == 503
    assert server.connections_total == 2
    assert backend.recorder.requests_total == 8


# --------------------------------------------------------------------------- Anthropic


async def test_anthropic_stream_event_sequence_is_exact() -> None:
    script = Script(
        tokens=["Let me ", "check."],
        reasoning=["The user ", "wants weather."],
        tool_calls=[("get_weather", {"city": "Paris"})],
        tool_arg_fragment=6,
    )
    backend = AnthropicBackend(default=script)
    async with backend.serve() as server, httpx.AsyncClient() as http:
        body = {"model": "claude-x", "max_tokens": 100, "messages": USER, "stream": True}
        raw = await http.post(f"{server.url}/v1/messages", json=body)

    events = sse_events(raw.text)
    names = [n for n, _ in events]
    assert all(data["type"] == name for name, data in events)
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] > 0
    blocks = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [b["type"] for b in blocks] == ["thinking", "text", "tool_use"]
    assert blocks[2]["input"] == {} and blocks[2]["name"] == "get_weather"
    assert [d["index"] for n, d in events if n == "content_block_stop"] == [0, 1, 2]
    partial = [
        d["delta"]["partial_json"]
        for n, d in events
        if n == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
    ]
    assert partial[0] == "" and json.loads("".join(partial)) == {"city": "Paris"}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert "input_tokens" not in delta["usage"] and delta["usage"]["output_tokens"] > 0


async def test_anthropic_sdk_assembles_messages() -> None:
    script = Script(
        tokens=["Hi", " there"],
        reasoning=["hmm"],
        tool_calls=[("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})],
        usage=Usage(prompt_tokens=21, completion_tokens=9),
    )
    backend = AnthropicBackend(default=script, api_key="sk-ant-test", require_version=True)
    async with backend.serve() as server:
        client = anthropic_client(server.url)
        async with client.messages.stream(
            model="claude-x", max_tokens=100, messages=ANTHROPIC_USER
        ) as stream:
            streamed = await stream.get_final_message()
        whole = await client.messages.create(
            model="claude-x", max_tokens=100, messages=ANTHROPIC_USER
        )
        counted = await client.messages.count_tokens(model="claude-x", messages=ANTHROPIC_USER)
        models = await client.models.list()

    for message in (streamed, whole):
        assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use"]
        assert message.content[1].text == "Hi there"  # type: ignore[union-attr]
        assert [(b.name, b.input) for b in message.content[2:]] == [  # type: ignore[union-attr]
            ("get_weather", {"city": "Paris"}),
            ("get_time", {"tz": "UTC"}),
        ]
        assert message.stop_reason == "tool_use"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (21, 9)
    assert counted.input_tokens > 0
    assert [m.id for m in models.data] == ["claude-sonnet-4-5"]
    assert backend.requests[0].headers["anthropic-version"]


@pytest.mark.parametrize(
    ("script", "max_tokens", "stop_reason", "stop_sequence"),
    [
        (Script(tokens=["a", "b"]), 100, "end_turn", None),
        (Script(n_tokens=10), 3, "max_tokens", None),
        (Script(tokens=["a"], stop_sequence="###"), 100, "stop_sequence", "###"),
    ],
)
async def test_anthropic_stop_reasons(
    script: Script, max_tokens: int, stop_reason: str, stop_sequence: str | None
) -> None:
    backend = AnthropicBackend(default=script)
    async with backend.serve() as server:
        client = anthropic_client(server.url)
        async with client.messages.stream(
            model="claude-x", max_tokens=max_tokens, messages=ANTHROPIC_USER
        ) as stream:
            message = await stream.get_final_message()
    assert (message.stop_reason, message.stop_sequence) == (stop_reason, stop_sequence)


async def test_anthropic_errors_are_anthropic_shaped() -> None:
    backend = AnthropicBackend(api_key="right", require_version=True, models=["claude-x"])
    async with backend.serve() as server, httpx.AsyncClient() as http:
        with pytest.raises(anthropic.AuthenticationError) as bad_key:
            await anthropic_client(server.url, api_key="wrong").messages.create(
                model="claude-x", max_tokens=10, messages=ANTHROPIC_USER
            )
        client = anthropic_client(server.url, api_key="right")
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.create(model="claude-y", max_tokens=10, messages=ANTHROPIC_USER)
        backend.push(Script(status=529))
        with pytest.raises(anthropic.OverloadedError):
            await client.messages.create(model="claude-x", max_tokens=10, messages=ANTHROPIC_USER)
        no_version = await http.post(
            f"{server.url}/v1/messages",
            headers={"x-api-key": "right"},
            json={"model": "claude-x", "max_tokens": 10, "messages": USER},
        )

        backend.push(Script(n_tokens=20, fail_after=4))
        seen: list[str] = []
        with pytest.raises(anthropic.APIStatusError) as mid_stream:
            async with client.messages.stream(
                model="claude-x", max_tokens=100, messages=ANTHROPIC_USER
            ) as stream:
                async for event in stream:
                    seen.append(event.type)

    assert bad_key.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
    }
    assert bad_key.value.response.headers["request-id"].startswith("req_")
    assert no_version.status_code == 400
    assert no_version.json()["error"]["type"] == "invalid_request_error"
    assert mid_stream.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert seen[0] == "message_start" and "message_stop" not in seen


async def test_anthropic_disconnect_is_recorded() -> None:
    backend = AnthropicBackend(default=Script(n_tokens=500, pace=0.01))
    async with backend.serve() as server:
        client = anthropic_client(server.url)
        async with client.messages.stream(
            model="claude-x", max_tokens=1000, messages=ANTHROPIC_USER
        ) as stream:
            async for event in stream:
                if event.type == "content_block_delta":
                    break
            closed_at = time.monotonic()
        disconnect = await backend.wait_disconnect(1.0)
    assert disconnect.at - closed_at < 0.1
    assert disconnect.path == "/v1/messages"
    assert backend.cancelled == 1


# --------------------------------------------------------------------------- Ollama


async def test_ollama_chat_stream_with_whole_tool_calls() -> None:
    script = Script(tokens=["Sun", "ny"], tool_calls=[("get_weather", {"city": "Paris"})])
    backend = OllamaBackend(default=script)
    async with backend.serve() as server, httpx.AsyncClient() as http:
        client = ollama.AsyncClient(host=server.url)
        parts = [p async for p in await client.chat(model="llama3.2", messages=USER, stream=True)]
        raw = await http.post(
            f"{server.url}/api/chat", json={"model": "llama3.2", "messages": USER}
        )

    assert raw.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in raw.text.splitlines()]
    assert [line["done"] for line in lines] == [False, False, False, True]
    assert lines[2]["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    final = lines[-1]
    assert final["done_reason"] == "stop"
    for key in (
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ):
        assert isinstance(final[key], int) and final[key] > 0, key
    assert final["total_duration"] >= final["load_duration"]
    assert "".join(p.message.content or "" for p in parts) == "Sunny"
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert parts[-1].done and parts[-1].done_reason == "stop"


async def test_ollama_non_stream_generate_and_model_endpoints() -> None:
    backend = OllamaBackend(default=Script(tokens=["4"], reasoning=["2+2"]), models=["llama3.2"])
    async with backend.serve() as server, httpx.AsyncClient() as http:
        client = ollama.AsyncClient(host=server.url)
        chat = await client.chat(model="llama3.2:latest", messages=USER, stream=False)
        gen = await client.generate(model="llama3.2", prompt="2+2?", stream=False)
        streamed = [
            p async for p in await client.generate(model="llama3.2", prompt="2+2?", stream=True)
        ]
        tags = await client.list()
        show = await client.show("llama3.2")
        embed = await client.embed(model="llama3.2", input=["a b", "c"])
        legacy = await client.embeddings(model="llama3.2", prompt="a b")
        load = await client.chat(model="llama3.2", messages=[], stream=False)
        version = (await http.get(f"{server.url}/api/version")).json()
        root = await http.get(f"{server.url}/")

    assert (chat.message.content, chat.message.thinking, chat.done) == ("4", "2+2", True)
    assert gen.response == "4" and gen.context and gen.done_reason == "stop"
    assert "".join(p.response or "" for p in streamed) == "4"
    assert streamed[-1].context == gen.context
    assert [m.model for m in tags.models] == ["llama3.2:latest"]
    assert tags.models[0].details is not None and tags.models[0].details.family == "llama"
    assert show.capabilities == ["completion", "tools"]
    assert len(embed.embeddings) == 2 and len(embed.embeddings[0]) == 384
    assert list(legacy.embedding) == pytest.approx(list(embed.embeddings[0]))
    assert load.done_reason == "load"
    assert version == {"version": "0.12.6"}
    assert root.text == "Ollama is running"


async def test_ollama_errors() -> None:
    backend = OllamaBackend(models=["llama3.2"])
    async with backend.serve() as server:
        client = ollama.AsyncClient(host=server.url)
        with pytest.raises(ollama.ResponseError) as missing:
            await client.chat(model="mistral", messages=USER)
        backend.push(Script(n_tokens=10, fail_after=3, error_message="model runner crashed"))
        seen = []
        with pytest.raises(ollama.ResponseError) as mid_stream:
            async for part in await client.chat(model="llama3.2", messages=USER, stream=True):
                seen.append(part)
        backend.push(Script(status=503))
        with pytest.raises(ollama.ResponseError) as busy:
            await client.generate(model="llama3.2", prompt="hi")

    assert missing.value.status_code == 404
    assert missing.value.error == 'model "mistral" not found, try pulling it first'
    assert mid_stream.value.error == "model runner crashed"
    assert len(seen) == 3
    assert busy.value.status_code == 503


async def test_ollama_disconnect_is_recorded() -> None:
    backend = OllamaBackend(default=Script(n_tokens=500, pace=0.01))
    async with backend.serve() as server, httpx.AsyncClient() as http:
        body = {"model": "llama3.2", "messages": USER}
        async with http.stream("POST", f"{server.url}/api/chat", json=body) as response:
            async for _ in response.aiter_lines():
                break
            closed_at = time.monotonic()
        disconnect = await backend.wait_disconnect(1.0)
    assert disconnect.at - closed_at < 0.1
    assert disconnect.frames_sent >= 1
    assert backend.cancelled == 1


# --------------------------------------------------------------------------- process


@asynccontextmanager
async def fake_process(*args: str) -> AsyncIterator[tuple[trio.Process, str, list[str]]]:
    """Run ``python -m tests.fakes ...``; yields the process, its URL and its stdout lines."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    async with trio.open_nursery() as nursery:
        command = [sys.executable, "-m", "tests.fakes", *args]
        run = partial(trio.run_process, stdout=subprocess.PIPE, cwd=REPO, env=env, check=False)
        proc: trio.Process = await nursery.start(run, command)
        assert proc.stdout is not None
        lines: list[str] = []
        buffer = b""
        with trio.fail_after(10):
            while b"\n" not in buffer:
                buffer += await proc.stdout.receive_some()
        lines.append(buffer.decode().splitlines()[0])
        url = lines[0].removeprefix("READY ")
        try:
            yield proc, url, lines
        finally:
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                rest = buffer.split(b"\n", 1)[1]
                while chunk := await proc.stdout.receive_some():
                    rest += chunk
            lines.extend(rest.decode().splitlines())


async def test_cli_runs_a_fake_and_reports_stats() -> None:
    async with (
        fake_process("openai", "--port", "0", "--tokens", "7", "--pace", "0") as (_, url, lines),
        httpx.AsyncClient() as http,
    ):
        assert lines[0].startswith("READY http://127.0.0.1:")
        body = {"model": "m", "messages": USER, "stream": True}
        raw = await http.post(f"{url}/v1/chat/completions", json=body)
        assert raw.text.count("data: ") == 10
        once = {"script": {"status": 429}, "once": True}
        assert (await http.post(f"{url}/_fake/script", json=once)).status_code == 200
        assert (await http.post(f"{url}/v1/chat/completions", json=body)).status_code == 429
        stats = (await http.get(f"{url}/_fake/stats")).json()
        assert (stats["requests"], stats["completed"], stats["failed"]) == (2, 1, 1)
    final = json.loads(lines[-1].removeprefix("STATS "))
    assert final["requests"] == 2
