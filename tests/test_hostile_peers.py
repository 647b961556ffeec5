"""Backends and clients at the edges of HTTP: what reaches the client is a correct relay
or a clear error in its dialect, never a misleading one."""

from __future__ import annotations

import json
import zlib
from typing import Any

import openai
import pytest
import trio

from tests.harness import backend, running_gateway
from tests.test_transport import raw_server, read_request


def _chunk(text: str | None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    data = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _compressor(coding: str) -> Any:
    return zlib.compressobj(wbits=16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS)


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
async def test_a_stream_compressed_by_a_proxy_in_front_of_the_backend_reaches_the_client_decoded(coding: str) -> None:
    """nginx with `gzip on` for text/event-stream compresses an SSE answer though the gateway
    asked for identity: each frame flushed in its own chunk, the first split mid-frame. The
    client got a 502 'closed the stream before it finished' (chats) or gzip bytes (relays)."""
    frames = [_chunk("Hel"), _chunk("lo"), _chunk(None, "stop"), b"data: [DONE]\n\n"]
    text_frames = [
        b'data: {"id":"t1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"Hi","finish_reason":"stop"}]}\n\n',
        b"data: [DONE]\n\n",
    ]

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            request = await read_request(stream, buffer)
            parts = text_frames if request.startswith(b"POST /v1/completions") else frames
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: %s\r\n"
                b"transfer-encoding: chunked\r\n\r\n" % coding.encode()
            )
            compress = _compressor(coding)
            for frame in parts:
                data = compress.compress(frame) + compress.flush(zlib.Z_SYNC_FLUSH)
                await stream.send_all(_chunked(data[:7]))
                await trio.sleep(0.01)
                await stream.send_all(_chunked(data[7:]))
            await stream.send_all(_chunked(compress.flush()) + b"0\r\n\r\n")

    async with raw_server(handler) as (url, _), running_gateway(backend("oa", url, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        chat = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in chat if c.choices]) == "Hello"
        texts = await client.completions.create(model="m", prompt="hi", stream=True)
        assert [c.choices[0].text async for c in texts] == ["Hi"]
        await client.close()


async def test_a_compressed_error_body_is_read_for_its_message() -> None:
    refusal = zlib.compress(b'{"error": {"message": "This model\'s maximum context length is 4096 tokens", "code": 400}}')

    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            await read_request(stream, buffer)
            await stream.send_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-encoding: deflate\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(refusal), refusal)
            )

    async with raw_server(handler) as (url, _), running_gateway(backend("oa", url, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        for stream in (True, False):
            with pytest.raises(openai.BadRequestError) as raised:
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=stream)
            assert "maximum context length is 4096" in raised.value.message
            assert raised.value.code == "context_length_exceeded"
        await client.close()


async def test_a_corrupt_compressed_stream_is_a_clear_error() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        buffer = bytearray()
        while True:
            await read_request(stream, buffer)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: gzip\r\n"
                b"transfer-encoding: chunked\r\n\r\n" + _chunked(b"data: not gzip at all\n\n") + b"0\r\n\r\n"
            )

    async with raw_server(handler) as (url, _), running_gateway(backend("oa", url, default=True)) as gateway:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as raised:
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert raised.value.status_code == 502 and "Backend `oa`" in raised.value.message
        await client.close()
