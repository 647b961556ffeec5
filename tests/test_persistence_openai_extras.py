"""What an OpenAI backend says beyond the domain's answer (`logprobs`, `system_fingerprint`,
`n > 1` choices) reaches an OpenAI client of a keyed or exact-cached chat as it does a plain
one: live, and replayed from the stored answer."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
import trio

from tests.harness import backend, running_gateway
from tests.test_auth_helpers import eventually
from tests.test_persistence import wait_for_row

pytest_plugins = ["tests.infra_servers"]

LOGPROBS = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}]}
FINGERPRINT = "fp_abc123"


def _answer(body: dict[str, Any]) -> tuple[bytes, bytes]:
    """An OpenAI server's answer to `body` (as vLLM sends `n` choices): content type, body."""
    n = body.get("n") or 1
    logprobs = LOGPROBS if body.get("logprobs") else None
    base = {"id": "chatcmpl-x", "created": 1700000000, "model": body["model"], "system_fingerprint": FINGERPRINT}
    if body["messages"][-1]["content"].startswith("refuse"):
        return _refusal(base, stream=bool(body.get("stream")))
    if body["messages"][-1]["content"].startswith("search"):
        return _cited(base, stream=bool(body.get("stream")))
    if body["messages"][-1]["content"].startswith("call"):
        return _legacy_call(base, stream=bool(body.get("stream")))
    if body["messages"][-1]["content"].startswith("speak"):
        return _spoken(base, stream=bool(body.get("stream")))
    if not body.get("stream"):
        return b"application/json", json.dumps({
            **base, "object": "chat.completion",
            "choices": [{"index": i, "message": {"role": "assistant", "content": f"Hi{i}"}, "logprobs": logprobs,
                         "finish_reason": "stop"} for i in range(n)],
            "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n},
        }).encode()
    chunks: list[dict[str, Any]] = []
    for part in ({"role": "assistant", "content": ""}, "text", {}):
        for i in range(n):
            delta = {"content": f"Hi{i}"} if part == "text" else part
            chunks.append({**base, "object": "chat.completion.chunk", "choices": [{
                "index": i, "delta": delta, "logprobs": logprobs if part == "text" else None,
                "finish_reason": "stop" if part == {} else None}]})
    frames = b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks)
    return b"text/event-stream", frames + b"data: [DONE]\n\n"


REFUSAL = ["I'm sorry,", " I can't help with that."]


def _refusal(base: dict[str, Any], *, stream: bool) -> tuple[bytes, bytes]:
    """OpenAI's refusal (structured outputs, safety): `refusal` instead of `content`."""
    if not stream:
        message = {"role": "assistant", "content": None, "refusal": "".join(REFUSAL)}
        return b"application/json", json.dumps({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}}).encode()
    deltas = [{"role": "assistant", "content": None, "refusal": ""}, *({"refusal": piece} for piece in REFUSAL), {}]
    chunks = [{**base, "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None if delta else "stop"}]} for delta in deltas]
    frames = b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks)
    return b"text/event-stream", frames + b"data: [DONE]\n\n"


CITATION = {"type": "url_citation", "url_citation": {
    "url": "https://example.org/paris", "title": "Paris", "start_index": 0, "end_index": 6}}


def _cited(base: dict[str, Any], *, stream: bool) -> tuple[bytes, bytes]:
    """A search model's answer (`web_search_options`): its text, and the citations under it."""
    if not stream:
        message = {"role": "assistant", "content": "Paris.", "refusal": None, "annotations": [CITATION]}
        return b"application/json", json.dumps({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}).encode()
    deltas = [{"role": "assistant", "content": ""}, {"content": "Paris."}, {"annotations": [CITATION]}, {}]
    chunks = [{**base, "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None if delta else "stop"}]} for delta in deltas]
    frames = b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks)
    return b"text/event-stream", frames + b"data: [DONE]\n\n"


LEGACY_CALL = {"name": "get_weather", "arguments": '{"city":"Oslo"}'}


def _legacy_call(base: dict[str, Any], *, stream: bool) -> tuple[bytes, bytes]:
    """OpenAI's answer to legacy function calling (`functions`): one `function_call`."""
    if not stream:
        message = {"role": "assistant", "content": None, "function_call": LEGACY_CALL}
        return b"application/json", json.dumps({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": "function_call"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}}).encode()
    deltas = [{"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": ""}},
              {"function_call": {"arguments": '{"city":'}}, {"function_call": {"arguments": '"Oslo"}'}}, {}]
    chunks = [{**base, "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None if delta else "function_call"}]}
        for delta in deltas]
    frames = b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks)
    return b"text/event-stream", frames + b"data: [DONE]\n\n"


SPOKEN = {"id": "audio_abc", "data": "UklGRiQAAABXQVZF", "expires_at": 1700003600, "transcript": "Hello there"}


def _spoken(base: dict[str, Any], *, stream: bool) -> tuple[bytes, bytes]:
    """OpenAI's answer asked with `modalities: ["text", "audio"]`: `message.audio`, no content."""
    if not stream:
        message = {"role": "assistant", "content": None, "refusal": None, "audio": SPOKEN}
        return b"application/json", json.dumps({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}}).encode()
    deltas = [{"role": "assistant", "content": None, "audio": {"id": "audio_abc", "transcript": "Hello"}},
              {"audio": {"transcript": " there"}}, {"audio": {"data": "UklGRiQA"}}, {"audio": {"data": "AABXQVZF"}},
              {"audio": {"id": "audio_abc", "expires_at": 1700003600}}, {}]
    chunks = [{**base, "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None if delta else "stop"}]}
        for delta in deltas]
    frames = b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks)
    return b"text/event-stream", frames + b"data: [DONE]\n\n"


async def _serve_one(stream: trio.SocketStream) -> None:
    async with stream:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some()
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
        while len(rest) < length:
            rest += await stream.receive_some()
        kind, body = _answer(json.loads(rest)) if head.startswith(b"POST") else (b"application/json", b"{}")
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: " + kind + b"\r\ncontent-length: "
                              + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


@pytest.fixture
async def url(aio_loop: object, pg_database_url: str, nats_url: str) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, _serve_one, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        config = backend("vllm", f"http://127.0.0.1:{port}", default=True)
        async with running_gateway(config, database_url=pg_database_url, nats_url=nats_url) as gateway:
            yield gateway
        nursery.cancel_scope.cancel()


async def test_logprobs_and_system_fingerprint_survive_a_key_and_the_cache(url: str, pg_database_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    for headers in ({"Idempotency-Key": str(uuid.uuid4())}, {"x-cache": "exact"}):
        messages = [{"role": "user", "content": f"q {uuid.uuid4()}"}]
        first = await client.chat.completions.with_raw_response.create(
            model="m", messages=messages, logprobs=True, extra_headers=headers  # type: ignore[arg-type]
        )
        live = first.parse()
        assert live.system_fingerprint == FINGERPRINT
        assert live.choices[0].logprobs is not None and live.choices[0].logprobs.model_dump()["content"][0]["token"] == "Hi"
        await wait_for_row(pg_database_url, first.headers["x-trace-id"], "completed")
        replayed = await client.chat.completions.with_raw_response.create(
            model="m", messages=messages, logprobs=True, extra_headers=headers  # type: ignore[arg-type]
        )
        assert "x-replay-of" in replayed.headers
        again = replayed.parse()
        assert again.system_fingerprint == FINGERPRINT
        expected = live.choices[0].logprobs.model_dump()
        assert again.choices[0].logprobs is not None and again.choices[0].logprobs.model_dump() == expected
        streamed = await client.chat.completions.with_raw_response.create(
            model="m", messages=messages, logprobs=True, stream=True, extra_headers=headers  # type: ignore[arg-type]
        )
        assert "x-replay-of" in streamed.headers
        chunks = [chunk async for chunk in streamed.parse()]
        assert {chunk.system_fingerprint for chunk in chunks} == {FINGERPRINT}
        assert [c.choices[0].logprobs.model_dump() for c in chunks if c.choices and c.choices[0].logprobs] == [expected]
        # Live and streamed too.
        fresh = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"s {uuid.uuid4()}"}], logprobs=True, stream=True,
            extra_headers={k: (str(uuid.uuid4()) if k == "Idempotency-Key" else v) for k, v in headers.items()},
        )
        live_chunks = [chunk async for chunk in fresh]
        assert live_chunks[0].system_fingerprint == FINGERPRINT
        assert [c.choices[0].logprobs.model_dump() for c in live_chunks if c.choices and c.choices[0].logprobs] == [expected]
    await client.close()


async def test_each_choice_of_a_keyed_or_cached_stream_opens_with_its_role(url: str) -> None:
    """n > 1: the SDK's stream helper builds each choice from its role chunk; a keyed or cached
    stream (rendered from events, live or replayed) sends one per choice, as the backend did."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    for headers in ({"Idempotency-Key": str(uuid.uuid4())}, {"x-cache": "exact"}):
        messages = [{"role": "user", "content": f"n {uuid.uuid4()}"}]
        for attempt in ("live", "replayed"):
            async with client.chat.completions.stream(
                model="m", messages=messages, n=2, extra_headers=headers  # type: ignore[arg-type]
            ) as stream:
                roles = [(choice.index, choice.delta.role) async for event in stream if event.type == "chunk"
                         for choice in event.chunk.choices if choice.delta.role]
                final = await stream.get_final_completion()
            assert roles == [(0, "assistant"), (1, "assistant")], attempt
            assert [(c.index, c.message.role, c.message.content) for c in final.choices] == [
                (0, "assistant", "Hi0"), (1, "assistant", "Hi1")
            ], attempt
            if attempt == "live":
                body = {"model": "m", "messages": messages, "n": 2}
                await eventually(functools.partial(_replayed, url, body, headers), within=10)
    await client.close()


async def _replayed(url: str, body: dict[str, Any], headers: dict[str, str]) -> bool:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        return "x-replay-of" in (await http.post("/v1/chat/completions", json=body, headers=headers)).headers


class Verdict(pydantic.BaseModel):
    allowed: bool


async def test_a_refusal_survives_a_key_and_the_cache(url: str, pg_database_url: str) -> None:
    """`parse()` tells a refusal by `message.refusal` (and parses nothing); a keyed or cached
    answer, live or replayed, whole or streamed, came back with neither content nor refusal."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    refusal = "".join(REFUSAL)
    for headers in ({"Idempotency-Key": str(uuid.uuid4())}, {"x-cache": "exact"}):
        messages: Any = [{"role": "user", "content": f"refuse {uuid.uuid4()}"}]
        first = await client.chat.completions.with_raw_response.parse(
            model="m", messages=messages, response_format=Verdict, extra_headers=headers,
        )
        assert first.parse().choices[0].message.refusal == refusal
        await wait_for_row(pg_database_url, first.headers["x-trace-id"], "completed")
        replayed = await client.chat.completions.parse(
            model="m", messages=messages, response_format=Verdict, extra_headers=headers,
        )
        message = replayed.choices[0].message
        assert (message.refusal, message.content, message.parsed) == (refusal, None, None)
        async with client.chat.completions.stream(
            model="m", messages=messages, response_format=Verdict, extra_headers=headers,
        ) as stream:
            pieces = [event.delta async for event in stream if event.type == "refusal.delta"]
            final = await stream.get_final_completion()
        assert "".join(pieces) == refusal and final.choices[0].message.refusal == refusal
        # A fresh stream, rendered from events as it is run.
        fresh: Any = [{"role": "user", "content": f"refuse {uuid.uuid4()}"}]
        fresh_headers = {k: (str(uuid.uuid4()) if k == "Idempotency-Key" else v) for k, v in headers.items()}
        async with client.chat.completions.stream(model="m", messages=fresh, extra_headers=fresh_headers) as stream:
            final = await stream.get_final_completion()
        assert final.choices[0].message.refusal == refusal
    # Stored (`store: true`) and read back.
    made = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"refuse {uuid.uuid4()}"}], store=True,
    )
    got = await client.chat.completions.retrieve(made.id)
    assert (got.choices[0].message.refusal, got.choices[0].message.content) == (refusal, None)
    await client.close()


async def test_a_search_answers_citations_survive_a_key_the_cache_and_the_store(url: str, pg_database_url: str) -> None:
    """`message.annotations` (`delta.annotations`) hold a search model's sources: a keyed or
    cached answer, live or replayed, and a stored one read back came without them."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    search: Any = {"web_search_options": {}}
    for headers in ({"Idempotency-Key": str(uuid.uuid4())}, {"x-cache": "exact"}):
        messages: Any = [{"role": "user", "content": f"search {uuid.uuid4()}"}]
        for attempt in ("live", "replayed"):
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=messages, extra_headers=headers, extra_body=search,
            )
            answer = raw.parse()
            assert [a.model_dump() for a in answer.choices[0].message.annotations or []] == [CITATION], attempt
            if attempt == "live":
                await wait_for_row(pg_database_url, raw.headers["x-trace-id"], "completed")
        async with client.chat.completions.stream(
            model="m", messages=messages, extra_headers=headers, extra_body=search,
        ) as stream:
            final = await stream.get_final_completion()
        assert [a.model_dump() for a in final.choices[0].message.annotations or []] == [CITATION]
    made = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"search {uuid.uuid4()}"}], store=True, extra_body=search,
    )
    got = await client.chat.completions.retrieve(made.id)
    assert [a.model_dump() for a in got.choices[0].message.annotations or []] == [CITATION]
    await client.close()


async def test_a_legacy_function_call_survives_a_key_and_the_cache(url: str, pg_database_url: str) -> None:
    """A keyed or cached answer to `functions` came back with no call at all (and `tool_calls`)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    functions: Any = [{"name": "get_weather", "parameters": {"type": "object"}}]
    for headers in ({"Idempotency-Key": str(uuid.uuid4())}, {"x-cache": "exact"}):
        messages: Any = [{"role": "user", "content": f"call {uuid.uuid4()}"}]
        for attempt in ("live", "replayed"):
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=messages, functions=functions, extra_headers=headers,
            )
            choice = raw.parse().choices[0]
            assert choice.finish_reason == "function_call", attempt
            assert choice.message.function_call is not None, attempt
            assert choice.message.function_call.model_dump() == LEGACY_CALL, attempt
            if attempt == "live":
                await wait_for_row(pg_database_url, raw.headers["x-trace-id"], "completed")
            stream = await client.chat.completions.create(
                model="m", messages=messages, functions=functions, stream=True, extra_headers=headers,
            )
            names, arguments, reasons = [], "", []
            async for chunk in stream:
                for part in chunk.choices:
                    if part.delta.function_call is not None:
                        names += [part.delta.function_call.name] if part.delta.function_call.name else []
                        arguments += part.delta.function_call.arguments or ""
                    reasons += [part.finish_reason] if part.finish_reason else []
            assert (names, arguments, reasons) == (["get_weather"], LEGACY_CALL["arguments"], ["function_call"]), attempt
    await client.close()


async def test_a_spoken_answer_survives_a_key_and_the_cache(url: str, pg_database_url: str) -> None:
    """`message.audio` (asked with `modalities` and `audio`) came back lost from a keyed or
    cached answer: no audio, and `content: ""`."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    asked: dict[str, Any] = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
    for headers in ({"Idempotency-Key": str(uuid.uuid4())}, {"x-cache": "exact"}):
        messages: Any = [{"role": "user", "content": f"speak {uuid.uuid4()}"}]
        for attempt in ("live", "replayed"):
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=messages, extra_headers=headers, **asked,
            )
            message = raw.parse().choices[0].message
            assert message.audio is not None and message.audio.model_dump() == SPOKEN, attempt
            assert message.content is None, attempt
            if attempt == "live":
                await wait_for_row(pg_database_url, raw.headers["x-trace-id"], "completed")
            else:
                assert "x-replay-of" in raw.headers
            stream = await client.chat.completions.create(
                model="m", messages=messages, stream=True, extra_headers=headers, **asked,
            )
            data, transcript, ids = "", "", set()
            async for chunk in stream:
                for part in chunk.choices:
                    piece = part.delta.to_dict().get("audio")
                    if piece:
                        data += piece.get("data") or ""
                        transcript += piece.get("transcript") or ""
                        ids |= {piece["id"]} if piece.get("id") else set()
            assert (data, transcript, ids) == (SPOKEN["data"], SPOKEN["transcript"], {SPOKEN["id"]}), attempt
    await client.close()
