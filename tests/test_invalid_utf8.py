"""A backend whose stream is not valid UTF-8 (llama.cpp's server has sent a character's
bytes split across two events, and lone bytes): every client gets valid UTF-8 and a finished
answer, the split character whole where the gateway re-encodes, U+FFFD for a lone byte."""

from __future__ import annotations

import json

import anthropic
import httpx
import ollama
import openai
import pytest
import trio

from tests.harness import backend, running_gateway
from tests.test_transport import raw_server, read_request

NI, HAO = "你".encode(), "好".encode()


def _frame(content: bytes | None, finish: str | None = None) -> bytes:
    # Built as bytes: llama.cpp writes the token's bytes as they are, not \u-escaped.
    delta = b'{"content":"' + content + b'"}' if content is not None else b"{}"
    reason = b"null" if finish is None else b'"' + finish.encode() + b'"'
    return (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
            b'[{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":' + reason + b"}]}\n\n")


# "你" split across two events, "好" whole, a lone 0xff, "你" cut off by the end of the answer.
CHAT_FRAMES = [_frame(NI[:2]), _frame(NI[2:] + HAO), _frame(b"a\xffb"), _frame(NI[:1]), _frame(None, "stop"),
               b"data: [DONE]\n\n"]
CHAT_TEXT = "你好a\ufffdb\ufffd"
WHOLE = (b'{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":'
         b'{"role":"assistant","content":"' + NI + b'a\xffb"},"finish_reason":"stop"}],'
         b'"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}')
TEXT_FRAMES = [
    b'data: {"id":"t1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"' + NI[:2]
    + b'","finish_reason":null}]}\n\n',
    b'data: {"id":"t1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"' + NI[2:]
    + b'b\xff","finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
]


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _llama(stream: trio.SocketStream, n: int) -> None:
    buffer = bytearray()
    while True:
        request = await read_request(stream, buffer)
        body = json.loads(request.partition(b"\r\n\r\n")[2])
        if not body.get("stream"):
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                  % (len(WHOLE), WHOLE))
            continue
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for frame in TEXT_FRAMES if request.startswith(b"POST /v1/completions") else CHAT_FRAMES:
            await stream.send_all(_chunked(frame))
            await trio.sleep(0.005)
        await stream.send_all(b"0\r\n\r\n")


async def test_an_openai_client_gets_split_characters_rejoined_and_lone_bytes_replaced() -> None:
    async with raw_server(_llama) as (url, _), running_gateway(backend("llama", url, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        chat = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        chunks = [chunk async for chunk in chat]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CHAT_TEXT
        assert chunks[-1].choices[0].finish_reason == "stop"
        whole = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert whole.choices[0].message.content == "你a\ufffdb"
        texts = await client.completions.create(model="m", prompt="hi", stream=True)
        # Relayed as it came, unparsed: a split character cannot be rejoined, but what the
        # client reads is UTF-8 (the SDK fails on anything else) and ends as it should.
        pieces = [c.choices[0] async for c in texts]
        assert "".join(c.text for c in pieces).endswith("b\ufffd") and pieces[-1].finish_reason == "stop"
        relayed = await client.completions.with_raw_response.create(model="m", prompt="hi")
        assert "你a\ufffdb" in relayed.content.decode("utf-8")
        await client.close()


async def test_translated_streams_get_the_characters_rejoined() -> None:
    async with raw_server(_llama) as (url, _), running_gateway(backend("llama", url, default=True)) as gateway:
        claude = anthropic.AsyncAnthropic(base_url=gateway, api_key="x", max_retries=0)
        async with claude.messages.stream(model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as events:
            message = await events.get_final_message()
        assert message.content[0].text == CHAT_TEXT and message.stop_reason == "end_turn"  # type: ignore[union-attr]
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        response = await client.responses.create(model="m", input="hi", stream=True)
        done = [event async for event in response if event.type == "response.completed"]
        assert done[0].response.output_text == CHAT_TEXT
        await client.close()
        async with httpx.AsyncClient(base_url=gateway, timeout=10) as http:
            answer = await http.post("/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            lines = [json.loads(line) for line in answer.content.decode("utf-8").splitlines()]
        assert "".join(line["message"]["content"] for line in lines) == CHAT_TEXT and lines[-1]["done"]


async def _respond(stream: trio.SocketStream, request: bytes, frames: list[bytes], whole: bytes, stream_type: bytes) -> None:
    """`whole` for a request that does not stream, else `frames`; a GET (a model lookup) is a 404."""
    if request.startswith(b"GET"):
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        return
    if not json.loads(request.partition(b"\r\n\r\n")[2]).get("stream"):
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                              % (len(whole), whole))
        return
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: " + stream_type + b"\r\ntransfer-encoding: chunked\r\n\r\n")
    for frame in frames:
        await stream.send_all(_chunked(frame))
        await trio.sleep(0.005)
    await stream.send_all(b"0\r\n\r\n")


def _claude_delta(text: bytes) -> bytes:
    return (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":"' + text + b'"}}\n\n')


# The same pieces as CHAT_FRAMES, from a server speaking Anthropic's Messages API: the
# character cut off by the end of the block is U+FFFD when the block stops.
CLAUDE_FRAMES = [
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":'
    b'"assistant","model":"m","content":[],"stop_reason":null,"usage":{"input_tokens":3,"output_tokens":0}}}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n',
    _claude_delta(NI[:2]), _claude_delta(NI[2:] + HAO), _claude_delta(b"a\xffb"), _claude_delta(NI[:1]),
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":4}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]
CLAUDE_WHOLE = (b'{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[{"type":"text","text":"'
                + NI + b'a\xffb"}],"stop_reason":"end_turn","stop_sequence":null,'
                b'"usage":{"input_tokens":3,"output_tokens":3}}')


def _ollama_line(text: bytes, done: bool = False) -> bytes:
    end = b',"done":true,"done_reason":"stop","prompt_eval_count":3,"eval_count":4}\n' if done else b',"done":false}\n'
    return (b'{"model":"m","created_at":"2026-01-01T00:00:00Z","message":{"role":"assistant","content":"' + text
            + b'"}' + end)


# The character cut off by the end of the answer is U+FFFD on the `done` line.
OLLAMA_LINES = [_ollama_line(NI[:2]), _ollama_line(NI[2:] + HAO), _ollama_line(b"a\xffb"), _ollama_line(NI[:1]),
                _ollama_line(b"", done=True)]
OLLAMA_WHOLE = _ollama_line(NI + b"a\xffb", done=True)
# `/api/generate` says it at the top, as `response`.
GENERATE_LINES = [line.replace(b'"message":{"role":"assistant","content":', b'"response":').replace(b'"}', b'"', 1)
                  for line in OLLAMA_LINES]


async def _claude_server(stream: trio.SocketStream, n: int) -> None:
    buffer = bytearray()
    while True:
        await _respond(stream, await read_request(stream, buffer), CLAUDE_FRAMES, CLAUDE_WHOLE, b"text/event-stream")


async def _ollama_server(stream: trio.SocketStream, n: int) -> None:
    buffer = bytearray()
    while True:
        request = await read_request(stream, buffer)
        lines = GENERATE_LINES if request.startswith(b"POST /api/generate") else OLLAMA_LINES
        await _respond(stream, request, lines, OLLAMA_WHOLE, b"application/x-ndjson")


@pytest.mark.parametrize("kind", ["anthropic", "ollama"])
async def test_anthropic_and_ollama_backends_bytes_reach_clients_mended(kind: str) -> None:
    # Before, the Anthropic and Ollama parsers failed the stream ("malformed stream event")
    # and a whole answer was a 502 "returned invalid JSON".
    server = _claude_server if kind == "anthropic" else _ollama_server
    async with raw_server(server) as (url, _), running_gateway(backend("b", url, kind=kind, default=True)) as gateway:
        async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0) as client:
            chat = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            chunks = [chunk async for chunk in chat]
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CHAT_TEXT
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
            whole = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            assert whole.choices[0].message.content == "你a\ufffdb"
        if kind == "anthropic":
            async with anthropic.AsyncAnthropic(base_url=gateway, api_key="x", max_retries=0) as claude:
                async with claude.messages.stream(
                    model="m", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
                ) as events:
                    message = await events.get_final_message()
            assert message.content[0].text == CHAT_TEXT  # type: ignore[union-attr]
            assert message.stop_reason == "end_turn"
        else:
            async with ollama.AsyncClient(host=gateway) as llama:
                parts = [part async for part in await llama.chat(
                    model="m", messages=[{"role": "user", "content": "hi"}], stream=True
                )]
                pieces = [piece async for piece in await llama.generate(model="m", prompt="hi", stream=True)]
            assert "".join(part.message.content or "" for part in parts) == CHAT_TEXT and parts[-1].done
            assert "".join(piece.response for piece in pieces) == CHAT_TEXT and pieces[-1].done
