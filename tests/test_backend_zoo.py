"""Self-hosted OpenAI-compatible servers other than vLLM (LocalAI, TGI, llama.cpp, SGLang,
LM Studio), emulated by the bytes they really send: each client gets a correct answer in
its own dialect."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import ollama
import openai
import trio

from proxy.domain.chat import ChatRequest, FinishReason, Message, TextPart, Usage
from proxy.domain.events import (
    CompletionBuilder,
    EstimatedUsageReport,
    Finish,
    StreamStart,
    TextDelta,
    UsageReport,
)
from proxy.domain.tokens import charged_usage
from tests.harness import backend, running_gateway
from tests.test_transport import raw_server, read_request

_HI = [{"role": "user", "content": "hi"}]
_TOOLS: list[Any] = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def _chunk(delta: dict[str, Any], finish: Any = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-z", "object": "chat.completion.chunk", "created": 5, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def _sse(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


@contextlib.asynccontextmanager
async def _server(stream_body: bytes, json_body: Any = None, status: int = 200) -> AsyncIterator[str]:
    """A server answering every chat with `stream_body` (SSE) or `json_body`, as asked."""

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            request = await read_request(stream, buffer)
            streamed = b'"stream":true' in request
            body = stream_body if streamed or json_body is None else json.dumps(json_body).encode()
            kind = b"text/event-stream" if streamed and status == 200 else b"application/json"
            await stream.send_all(
                b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (status, kind, len(body), body)
            )

    async with raw_server(handler) as (url, _), running_gateway(backend("zoo", url, default=True)) as gateway:
        yield gateway


async def test_localai_empty_finish_reason_on_every_chunk_is_no_finish() -> None:
    """LocalAI says `"finish_reason": ""` on every chunk until the last: an OpenAI client was
    told `stop` on the first chunk (and `""`, off OpenAI's enum, on the rest)."""
    body = _sse(_chunk({"role": "assistant", "content": ""}, ""), _chunk({"content": "Hel"}, ""),
                _chunk({"content": "lo"}, ""), _chunk({}, "stop"))
    async with _server(body) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        chunks = [c async for c in await client.chat.completions.create(model="m", messages=_HI, stream=True)]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello"
        assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
        await client.close()


_TGI_TOOL = [  # TGI 2.x: each fragment one object (not a list), its id empty, its name null after the first
    _chunk({"role": "assistant", "tool_calls": {"index": 0, "id": "", "type": "function",
                                                "function": {"name": "get_weather", "arguments": '{"city":'}}}),
    _chunk({"role": "assistant", "tool_calls": {"index": 0, "id": "", "type": "function",
                                                "function": {"name": None, "arguments": ' "Paris"}'}}}),
    _chunk({"role": "assistant", "content": ""}, "eos_token"),
]


async def test_tgi_streamed_tool_call_fragments_as_objects_reach_every_client() -> None:
    """The OpenAI SDK got `tool_calls` as a dict (its accumulators iterate a list), and an
    Anthropic client got no tool_use at all: the call was lost, the turn `end_turn`."""
    async with _server(_sse(*_TGI_TOOL)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(model="m", messages=_HI, tools=_TOOLS, stream=True)
        calls: dict[int, dict[str, str]] = {}
        finish = None
        async for chunk in stream:
            for call in chunk.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                entry["name"] += (call.function and call.function.name) or ""
                entry["arguments"] += (call.function and call.function.arguments) or ""
            finish = chunk.choices[0].finish_reason or finish
        assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
        assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
        assert finish == "tool_calls"
        await client.close()

        message = await _claude_weather_call(gateway)
        assert message.stop_reason == "tool_use"
        assert [(b.type, getattr(b, "input", None)) for b in message.content] == [("tool_use", {"city": "Paris"})]


async def test_tool_arguments_sent_as_a_json_object_reach_openai_clients_as_text() -> None:
    """TGI's whole answers (and some llama.cpp builds' streams) give `arguments` as an object:
    the OpenAI SDK's `json.loads(call.function.arguments)` raised TypeError, and an Anthropic
    client's tool_use streamed had `input: {}`."""
    whole = {"id": "chatcmpl-z", "object": "chat.completion", "created": 5, "model": "m",
             "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                 "role": "assistant", "content": None, "tool_calls": [
                     {"id": "0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}}],
             "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}
    streamed = _sse(
        _chunk({"role": "assistant", "tool_calls": [
            {"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}),
        _chunk({}, "tool_calls"),
    )
    async with _server(streamed, whole) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        answer = await client.chat.completions.create(model="m", messages=_HI, tools=_TOOLS)
        tool_calls = answer.choices[0].message.tool_calls or []
        assert json.loads(tool_calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
        stream = await client.chat.completions.create(model="m", messages=_HI, tools=_TOOLS, stream=True)
        arguments = "".join([
            call.function.arguments or "" async for chunk in stream
            for call in chunk.choices[0].delta.tool_calls or [] if call.function
        ])
        assert json.loads(arguments) == {"city": "Paris"}
        await client.close()

        message = await _claude_weather_call(gateway)
        assert [getattr(b, "input", None) for b in message.content] == [{"city": "Paris"}]


def _tgi_refusal(window: int, prompt: int, output: int) -> dict[str, Any]:
    return {"error": f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {window}. "
                     f"Given: {prompt} `inputs` tokens and {output} `max_new_tokens`", "error_type": "validation"}


async def test_tgi_refusing_a_prompt_with_its_answer_too_long_is_said_as_each_dialect_says_it() -> None:
    """TGI's 422 for a prompt and `max_tokens` past the window: OpenAI clients lacked
    `code: context_length_exceeded` (what LangChain and Codex trim on), and Claude Code's
    `max_tokens: 32000` was a 400 where Anthropic (and the gateway on vLLM) gives the answer
    the room the window leaves."""
    asked: list[Any] = []

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            request = await read_request(stream, buffer)
            limit = json.loads(request.partition(b"\r\n\r\n")[2]).get("max_tokens")
            asked.append(limit)
            if limit is None or limit > 4096 - 1000:
                status, kind, body = 422, b"application/json", json.dumps(_tgi_refusal(4096, 1000, limit or 4096)).encode()
            else:
                status, kind = 200, b"text/event-stream"
                body = _sse(_chunk({"role": "assistant", "content": "Hi"}), _chunk({}, "length"))
            await stream.send_all(
                b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (status, kind, len(body), body)
            )

    async with raw_server(handler) as (url, _), running_gateway(backend("tgi", url, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        try:
            await client.chat.completions.create(model="m", messages=_HI, max_tokens=32000)
            raise AssertionError("no refusal")
        except openai.BadRequestError as refusal:
            assert refusal.code == "context_length_exceeded" and "must be <= 4096" in refusal.message
        await client.close()

        asked.clear()
        claude = anthropic.AsyncAnthropic(base_url=gateway, api_key="x", max_retries=0)
        async with claude.messages.stream(model="m", max_tokens=32000, messages=_HI) as events:
            message = await events.get_final_message()
        assert asked == [32000, 3096]
        assert [getattr(b, "text", None) for b in message.content] == ["Hi"]
        assert message.stop_reason == "model_context_window_exceeded"
        await claude.close()


async def test_an_ollama_chat_too_long_for_tgi_loses_its_oldest_messages_by_what_tgi_said() -> None:
    """Ollama fits a chat to the model's context: TGI's "`inputs` must have less than N
    tokens. Given: M" was a 400 to the Ollama client (not read as a window refusal at all),
    and the one retry, trimmed by a guessed quarter, was refused again."""
    seen: list[int] = []

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            request = await read_request(stream, buffer)
            messages = json.loads(request.partition(b"\r\n\r\n")[2])["messages"]
            seen.append(len(messages))
            if len(messages) > 1:
                status, body = 422, {"error": "Input validation error: `inputs` must have less than 1000 tokens. "
                                              "Given: 5000", "error_type": "validation"}
            else:
                status, body = 200, {"id": "z", "object": "chat.completion", "created": 5, "model": "m", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "Fits"}, "finish_reason": "eos_token"}]}
            data = json.dumps(body).encode()
            await stream.send_all(
                b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (status, len(data), data)
            )

    async with raw_server(handler) as (url, _), running_gateway(backend("tgi", url, default=True)) as gateway:
        history = [{"role": ("user", "assistant")[i % 2], "content": f"{i} " + "word " * 800} for i in range(5)]
        answer = await ollama.AsyncClient(host=gateway).chat(model="m", messages=history)
        assert answer.message.content == "Fits" and answer.done_reason == "stop"
        assert seen == [5, 1]


async def test_counting_tokens_on_tgi_whose_tokenize_takes_another_body_is_the_estimate() -> None:
    """TGI has a `/tokenize` of its own (`{"inputs": ...}`), which refuses vLLM's body with
    axum's plain-text 422: Claude Code's count_tokens got that as a 400, and stopped."""

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            request = await read_request(stream, buffer)
            assert request.startswith(b"POST /tokenize ")
            body = b"Failed to deserialize the JSON body into the target type: missing field `inputs` at line 1 column 60"
            await stream.send_all(
                b"HTTP/1.1 422 Unprocessable Entity\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )

    async with raw_server(handler) as (url, _), running_gateway(backend("tgi", url, default=True)) as gateway:
        claude = anthropic.AsyncAnthropic(base_url=gateway, api_key="x", max_retries=0)
        counted = await claude.messages.count_tokens(model="m", messages=[{"role": "user", "content": "word " * 400}])
        assert 300 < counted.input_tokens < 700
        await claude.close()


async def test_localai_usage_of_zeros_is_no_usage_the_estimate_stands() -> None:
    """LocalAI sends `usage` of zeros on every chunk: an OpenAI client asking for usage was
    told 0 tokens, and the gateway's log (and a key's budget) charged nothing."""
    zeros = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    body = _sse(_chunk({"role": "assistant", "content": ""}, "", usage=zeros),
                _chunk({"content": "Hello there, " * 10}, "", usage=zeros), _chunk({}, "stop", usage=zeros))
    async with _server(body) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        chunks = [c async for c in await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "word " * 100}], stream=True,
            stream_options={"include_usage": True},
        )]
        usages = [c.usage for c in chunks if c.usage is not None]
        assert len(usages) == 1 and chunks[-1].usage is usages[0]
        assert usages[0].prompt_tokens > 50 and usages[0].completion_tokens > 10
        await client.close()


_LLAMA_CPP_REFUSAL = (
    b'error: {"code":400,"message":"the request exceeds the available context size, try increasing it",'
    b'"type":"exceed_context_size_error","n_prompt_tokens":5000,"n_ctx":4096}\n\ndata: [DONE]\n\n'
)


async def test_llama_cpp_error_line_in_a_stream_is_an_error_not_an_empty_answer() -> None:
    """llama.cpp's server says a streamed failure as an `error:` line, then `[DONE]`: every
    client got an empty answer that ended normally (the refusal lost without a word)."""
    async with _server(_LLAMA_CPP_REFUSAL) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        try:
            async for _ in await client.chat.completions.create(model="m", messages=_HI, stream=True):
                pass
            raise AssertionError("no error")
        except openai.BadRequestError as refusal:
            assert refusal.code == "context_length_exceeded" and "available context size" in refusal.message
        await client.close()

        claude = anthropic.AsyncAnthropic(base_url=gateway, api_key="x", max_retries=0)
        try:
            async with claude.messages.stream(model="m", max_tokens=50, messages=_HI) as events:
                await events.get_final_message()
            raise AssertionError("no error")
        except anthropic.BadRequestError as refusal:
            assert refusal.message.startswith("prompt is too long") or "prompt is too long" in str(refusal)
        await claude.close()


async def test_llama_cpp_error_line_after_some_text_ends_the_stream_with_its_message() -> None:
    body = _sse(_chunk({"role": "assistant", "content": "Hel"}))[: -len(b"data: [DONE]\n\n")] + (
        b'error: {"code":500,"message":"slot 0: KV cache is full","type":"server_error"}\n\ndata: [DONE]\n\n'
    )
    async with _server(body) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        text = ""
        try:
            async for chunk in await client.chat.completions.create(model="m", messages=_HI, stream=True):
                text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            raise AssertionError("no error")
        except openai.APIError as failure:
            assert "KV cache is full" in failure.message and text == "Hel"
        await client.close()


async def test_a_stream_that_ends_without_a_finish_reason_ends_its_choice() -> None:
    """A server whose chunks all say `finish_reason: null` before `[DONE]`: the OpenAI SDK's
    final completion had `finish_reason=None` (OpenAI's streams always say one)."""
    async with _server(_sse(_chunk({"role": "assistant", "content": "Hello"}), _chunk({"content": " there"}))) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        async with client.chat.completions.stream(model="m", messages=_HI) as stream:
            final = await stream.get_final_completion()
        assert final.choices[0].message.content == "Hello there" and final.choices[0].finish_reason == "stop"
        await client.close()


async def test_sglang_matched_stop_is_the_stop_sequence_an_anthropic_client_is_told() -> None:
    """SGLang names the stop string that ended an answer `matched_stop` (vLLM: `stop_reason`):
    an Anthropic client asking `stop_sequences` was told `end_turn`, with no `stop_sequence`."""
    whole = {"id": "z", "object": "chat.completion", "created": 5, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "One, two"}, "finish_reason": "stop", "matched_stop": "three"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}
    streamed = _sse(_chunk({"role": "assistant", "content": "One, two"}),
                    {**_chunk({}, "stop"), "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "matched_stop": "three"}]})
    async with _server(streamed, whole) as gateway:
        claude = anthropic.AsyncAnthropic(base_url=gateway, api_key="x", max_retries=0)
        message = await claude.messages.create(model="m", max_tokens=50, messages=_HI, stop_sequences=["three"])
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "three")
        async with claude.messages.stream(model="m", max_tokens=50, messages=_HI, stop_sequences=["three"]) as events:
            message = await events.get_final_message()
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "three")
        await claude.close()


async def test_a_stream_without_usage_tells_anthropic_and_ollama_clients_the_estimate() -> None:
    """A server that reports no usage (LocalAI, older TGI): an OpenAI client asking for usage
    was given the gateway's estimate, but an Anthropic client was told 0 input and 0 output
    tokens (Claude Code tracks its context window by them) and an Ollama client 0 counts."""
    body = _sse(_chunk({"role": "assistant", "content": "Hello there, " * 20}), _chunk({}, "stop"))
    prompt = [{"role": "user", "content": "word " * 200}]
    async with _server(body) as gateway:
        claude = anthropic.AsyncAnthropic(base_url=gateway, api_key="x", max_retries=0)
        async with claude.messages.stream(model="m", max_tokens=500, messages=prompt) as events:
            message = await events.get_final_message()
        assert message.usage.input_tokens > 150 and message.usage.output_tokens > 40
        await claude.close()

        last = None
        async for part in await ollama.AsyncClient(host=gateway).chat(model="m", messages=prompt, stream=True):
            last = part
        assert last is not None and last.done
        assert (last.prompt_eval_count or 0) > 150 and (last.eval_count or 0) > 40


def test_the_estimate_told_for_a_backend_without_usage_is_charged_as_an_estimate() -> None:
    """The estimate a client is told stands in for the backend's usage, and the request's log
    still says its tokens were estimated (not counted by the backend)."""
    request = ChatRequest("m", [Message("user", (TextPart("word " * 100),))])
    builder = CompletionBuilder()
    for event in (StreamStart("c", "m", 1), TextDelta("Hello there"), Finish(FinishReason.STOP),
                  EstimatedUsageReport(Usage(120, 3))):
        builder.add(event)
    assert charged_usage(request, builder) == (Usage(120, 3), True)
    builder.add(UsageReport(Usage(118, 3)))
    assert charged_usage(request, builder) == (Usage(118, 3), False)


async def test_a_whole_answer_without_usage_tells_anthropic_and_ollama_clients_the_estimate() -> None:
    """The same for a whole answer (no usage, or LocalAI's zeros): an Anthropic client was told
    0 and 0 tokens, an Ollama client no prompt count and an eval count of 1, an OpenAI client
    no usage (or the zeros)."""
    answer = {"id": "z", "object": "chat.completion", "created": 5, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello there, " * 20}, "finish_reason": "stop"}]}
    prompt = [{"role": "user", "content": "word " * 200}]
    for usage in (None, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}):
        async with _server(b"", answer if usage is None else {**answer, "usage": usage}) as gateway:
            claude = anthropic.AsyncAnthropic(base_url=gateway, api_key="x", max_retries=0)
            message = await claude.messages.create(model="m", max_tokens=500, messages=prompt)
            assert message.usage.input_tokens > 150 and message.usage.output_tokens > 40
            await claude.close()
            said = await ollama.AsyncClient(host=gateway).chat(model="m", messages=prompt)
            assert (said.prompt_eval_count or 0) > 150 and (said.eval_count or 0) > 40
            client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
            completion = await client.chat.completions.create(model="m", messages=prompt)
            assert completion.usage is not None
            assert completion.usage.prompt_tokens > 150 and completion.usage.completion_tokens > 40
            assert completion.choices[0].message.content == "Hello there, " * 20
            await client.close()


async def test_a_refusal_said_as_an_error_event_in_a_stream_is_a_400_in_every_shape() -> None:
    """vLLM and SGLang say a refusal met once the stream began as an error event, then
    `[DONE]`: clients got a 502 (the refusal's meaning lost), or, for older vLLM's error
    object without its `error` wrapper, an empty answer that ended normally."""
    refusal = {"object": "error", "message": "This model's maximum context length is 4096 tokens. However, you "
               "requested 5000 tokens (4000 in the messages, 1000 in the completion).", "type": "BadRequestError", "code": 400}
    for event in ({"error": refusal}, refusal):
        async with _server(b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n") as gateway:
            client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
            try:
                async for _ in await client.chat.completions.create(model="m", messages=_HI, stream=True):
                    pass
                raise AssertionError("no error")
            except openai.BadRequestError as error:
                assert error.code == "context_length_exceeded" and "maximum context length is 4096" in error.message
            await client.close()


async def test_an_ollama_chat_too_long_for_llama_cpp_refusing_in_its_stream_loses_its_oldest_messages() -> None:
    """llama.cpp refusing a prompt past its context size as an `error:` line in a 200 stream:
    an Ollama client's chat, which Ollama would fit to the context, got an empty answer."""
    seen: list[int] = []
    refusal = (b'error: {"code":400,"message":"request (5000 tokens) exceeds the available context size (4096 tokens), '
               b'try increasing it","type":"exceed_context_size_error"}\n\ndata: [DONE]\n\n')

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            request = await read_request(stream, buffer)
            messages = json.loads(request.partition(b"\r\n\r\n")[2])["messages"]
            seen.append(len(messages))
            body = refusal if len(messages) == 5 else _sse(_chunk({"role": "assistant", "content": "Fits"}), _chunk({}, "stop"))
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )

    async with raw_server(handler) as (url, _), running_gateway(backend("llama", url, default=True)) as gateway:
        history = [{"role": ("user", "assistant")[i % 2], "content": f"{i} " + "word " * 800} for i in range(5)]
        parts = [part async for part in await ollama.AsyncClient(host=gateway).chat(model="m", messages=history, stream=True)]
        assert "".join(p.message.content or "" for p in parts) == "Fits" and parts[-1].done_reason == "stop"
        assert seen[0] == 5 and 1 <= seen[1] < 5


async def _claude_weather_call(gateway: str) -> anthropic.types.Message:
    """What an Anthropic client streaming a chat with a `get_weather` tool ends up holding."""
    async with anthropic.AsyncAnthropic(base_url=gateway, api_key="x", max_retries=0) as claude:
        async with claude.messages.stream(
            model="m", max_tokens=50, messages=_HI,
            tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
        ) as events:
            return await events.get_final_message()
