"""A backend whose stream is not valid UTF-8 (llama.cpp's server has sent a character's
bytes split across two events, and lone bytes): every client gets valid UTF-8 and a finished
answer, the split character whole where the gateway re-encodes, U+FFFD for a lone byte."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
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
