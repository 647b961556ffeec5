"""The OpenAI codec alone: request validation, the byte-exact relay and its repairs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.dialects import openai
from proxy.dialects.sse import SSEDecoder
from proxy.domain.chat import FinishReason
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import (
    Finish,
    StreamFailed,
    StreamStart,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
)


def frame(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
    }
    body.update(extra)
    return body


def client_frames(raw: bytes) -> list[Any]:
    """What an SDK would see: the JSON payloads (or [DONE]) of each frame."""
    out: list[Any] = []
    for f in SSEDecoder().feed(raw):
        out.append("[DONE]" if f.data == b"[DONE]" else json.loads(f.data))
    return out


ROLE = chunk({"role": "assistant", "content": ""})
USAGE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


# -- requests ------------------------------------------------------------------------------------


def test_request_parses_params_tools_and_keeps_unknown_fields() -> None:
    body = {
        "model": "qwen3-8b",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ],
        "max_completion_tokens": 9, "temperature": 0.5, "stop": "END", "stream": True,
        "stream_options": {"include_usage": False}, "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}}, "repetition_penalty": 1.1,
    }
    request = openai.parse_chat_request(json.dumps(body).encode())
    assert request.messages[0].role == "system"
    assert request.params.max_tokens == 9 and request.params.stop == ("END",)
    assert request.include_usage is False  # explicit false is kept, not flattened to None
    assert request.tool_choice is not None and request.tool_choice.name == "f"
    assert request.extra == {"repetition_penalty": 1.1, "max_completion_tokens": 9}
    upstream = json.loads(openai.encode_chat_request(request, "qwen3-8b-awq", stream=True, include_usage=True))
    assert upstream["model"] == "qwen3-8b-awq"
    assert upstream["stream_options"] == {"include_usage": True}
    assert upstream["repetition_penalty"] == 1.1
    assert upstream["messages"][2] == {"role": "assistant", "content": None, "tool_calls": body["messages"][2]["tool_calls"]}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": True}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ],
)
def test_invalid_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as info:
        openai.parse_chat_request(json.dumps(body).encode())
    assert info.value.kind is ErrorKind.INVALID_REQUEST
    assert info.value.param == param
    assert param in info.value.message


def test_malformed_json_is_a_400() -> None:
    with pytest.raises(GatewayError) as info:
        openai.parse_chat_request(b'{"model": ')
    assert info.value.status == 400


# -- relay -----------------------------------------------------------------------------------------


def test_conformant_frames_pass_byte_for_byte_and_are_observed() -> None:
    upstream = frame(ROLE) + frame(chunk({"content": "Hel"})) + frame(chunk({"content": "lo"})) + frame(chunk(finish="stop")) + frame("[DONE]")
    relay = openai.StreamRelay(include_usage=None)
    out = relay.feed(upstream)
    assert out.raw == upstream
    assert out.done
    assert [e for e in out.events if isinstance(e, TextDelta)] == [TextDelta("Hel"), TextDelta("lo")]
    assert out.events[0] == StreamStart(id="chatcmpl-1", model="m", created=7)
    assert [e for e in out.events if isinstance(e, Finish)] == [Finish(FinishReason.STOP)]


def test_frames_split_across_reads_and_crlf_are_reassembled() -> None:
    upstream = (frame(ROLE) + frame(chunk({"content": "x"})) + frame(chunk(finish="stop")) + frame("[DONE]")).replace(b"\n", b"\r\n")
    relay = openai.StreamRelay(include_usage=None)
    raw = b"".join(relay.feed(upstream[i : i + 7]).raw for i in range(0, len(upstream), 7))
    assert client_frames(raw)[1]["choices"][0]["delta"] == {"content": "x"}
    assert client_frames(raw)[-1] == "[DONE]"


def test_a_crlf_split_between_reads_ends_one_line_not_the_frame() -> None:
    """sse-starlette's CRLF line ends, a read ending between CR and LF: the event's lines
    stay one frame (a multi-line `data:` too)."""
    stream = b"event: message\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n"
    for cut in range(1, len(stream)):
        decoder = SSEDecoder()
        frames = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert [(f.event, f.data) for f in frames] == [("message", b'{"a":\n1}')], cut


def test_usage_chunk_is_stripped_unless_the_client_asked() -> None:
    upstream = frame(ROLE) + frame(chunk(finish="stop")) + frame(USAGE) + frame("[DONE]")
    silent = openai.StreamRelay(include_usage=None).feed(upstream)
    assert all(f == "[DONE]" or f["choices"] for f in client_frames(silent.raw))
    assert any(isinstance(e, UsageReport) and e.usage.total_tokens == 7 for e in silent.events)

    asked = openai.StreamRelay(include_usage=True).feed(upstream)
    frames = client_frames(asked.raw)
    assert frames[-1] == "[DONE]"
    assert frames[-2]["choices"] == [] and frames[-2]["usage"]["total_tokens"] == 7
    assert all(f["usage"] is None for f in frames[:-2])  # usage: null on every other chunk


def test_usage_on_a_content_chunk_moves_to_its_own_chunk() -> None:
    upstream = frame(ROLE) + frame(chunk(finish="stop", usage=USAGE["usage"])) + frame("[DONE]")
    frames = client_frames(openai.StreamRelay(include_usage=True).feed(upstream).raw)
    assert frames[1]["choices"][0]["finish_reason"] == "stop" and frames[1]["usage"] is None
    assert frames[2]["choices"] == [] and frames[2]["usage"]["completion_tokens"] == 2
    assert frames[3] == "[DONE]"


def test_missing_role_chunk_is_synthesised_first() -> None:
    upstream = frame(chunk({"content": "hi"})) + frame(chunk(finish="stop")) + frame("[DONE]")
    frames = client_frames(openai.StreamRelay(include_usage=None).feed(upstream).raw)
    assert frames[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert frames[0]["id"] == frames[1]["id"] == "chatcmpl-1"


def test_non_enum_finish_reason_is_mapped_and_inconsistent_ids_repaired() -> None:
    upstream = frame(ROLE) + frame(chunk({"content": "x"}, id="other", created=99)) + frame(chunk(finish="eos")) + frame("[DONE]")
    frames = client_frames(openai.StreamRelay(include_usage=None).feed(upstream).raw)
    assert {f["id"] for f in frames[:-1]} == {"chatcmpl-1"}
    assert {f["created"] for f in frames[:-1]} == {7}
    assert frames[2]["choices"][0]["finish_reason"] == "stop"


def test_error_finish_reason_becomes_an_error_event() -> None:
    upstream = frame(ROLE) + frame(chunk(finish="error"))
    out = openai.StreamRelay(include_usage=None).feed(upstream)
    assert out.done
    assert "error" in client_frames(out.raw)[-1]
    assert isinstance(out.events[-1], StreamFailed)


def test_parallel_tool_calls_get_distinct_indexes_even_when_the_backend_repeats_zero() -> None:
    # Ollama's /v1 shim sends index 0 for every call (peers §3d #15).
    calls = [
        chunk({"tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":1}'}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "b", "type": "function", "function": {"name": "g", "arguments": '{"y":2}'}}]}),
        chunk(finish="tool_calls"),
    ]
    upstream = frame(ROLE) + b"".join(frame(c) for c in calls) + frame("[DONE]")
    out = openai.StreamRelay(include_usage=None).feed(upstream)
    starts = [e for e in out.events if isinstance(e, ToolCallStart)]
    assert [(s.index, s.id, s.name) for s in starts] == [(0, "a", "f"), (1, "b", "g")]
    assert [e for e in out.events if isinstance(e, ToolCallDelta)] == [ToolCallDelta(0, '{"x":1}'), ToolCallDelta(1, '{"y":2}')]
    frames = client_frames(out.raw)
    assert frames[3]["choices"][0]["delta"]["tool_calls"][0]["index"] == 1


def sdk_tool_calls(raw: bytes) -> list[tuple[str, str, str]]:
    """The tool calls the official SDK's stream helper accumulates from these bytes."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for payload in client_frames(raw):
        if payload != "[DONE]":
            state.handle_chunk(ChatCompletionChunk.model_validate(payload))
    calls = state.get_final_completion().choices[0].message.tool_calls or []
    return [(c.id, c.function.name, c.function.arguments) for c in calls]


def test_tool_call_fragments_repeating_id_and_name_reach_the_sdk_once() -> None:
    # Fireworks, DeepSeek and Qwen servers repeat id, type and name on every fragment; the
    # SDK concatenates string fields across fragments (`call_acall_a`, `ff`).
    def fragment(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
        call = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        return chunk({"tool_calls": [call]})

    first, second = frame(fragment(0, "call_a", "f", "")), frame(fragment(1, "call_b", "g", "{}"))
    upstream = (
        frame(ROLE) + first + frame(fragment(0, "call_a", "f", '{"x"')) + frame(fragment(0, "call_a", "f", ":1}"))
        + second + frame(chunk(finish="tool_calls")) + frame("[DONE]")
    )
    out = openai.StreamRelay(include_usage=None).feed(upstream)
    assert sdk_tool_calls(out.raw) == [("call_a", "f", '{"x":1}'), ("call_b", "g", "{}")]
    frames = client_frames(out.raw)
    assert frames[2]["choices"][0]["delta"]["tool_calls"] == [{"index": 0, "function": {"arguments": '{"x"'}}]
    # Frames that were right pass untouched.
    assert first in out.raw and second in out.raw
    assert [e for e in out.events if isinstance(e, ToolCallDelta)] == [
        ToolCallDelta(0, '{"x"'), ToolCallDelta(0, ":1}"), ToolCallDelta(1, "{}"),
    ]

    # A name that really is streamed in pieces still adds up.
    pieces = frame(fragment(0, "call_a", "get_", "")) + frame(fragment(0, "call_a", "weather", "{}"))
    out = openai.StreamRelay(include_usage=None).feed(frame(ROLE) + pieces + frame(chunk(finish="tool_calls")))
    assert sdk_tool_calls(out.raw) == [("call_a", "get_weather", "{}")]


def test_tool_call_without_id_gets_one() -> None:
    upstream = frame(ROLE) + frame(chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]})) + frame(chunk(finish="tool_calls"))
    out = openai.StreamRelay(include_usage=None).feed(upstream)
    start = next(e for e in out.events if isinstance(e, ToolCallStart))
    assert start.id.startswith("call_")
    assert client_frames(out.raw)[1]["choices"][0]["delta"]["tool_calls"][0]["id"] == start.id


def test_comments_and_keepalives_are_tolerated_and_not_forwarded() -> None:
    upstream = b": OPENROUTER PROCESSING\n\n" + frame(ROLE) + b":ping\n\n" + frame(chunk(finish="stop")) + frame("[DONE]")
    out = openai.StreamRelay(include_usage=None).feed(upstream)
    assert b"PROCESSING" not in out.raw and b"ping" not in out.raw
    assert client_frames(out.raw)[-1] == "[DONE]"


def test_in_stream_error_from_backend_is_passed_on_in_openai_shape() -> None:
    upstream = frame(ROLE) + frame({"error": {"message": "CUDA out of memory", "type": "server_error"}})
    out = openai.StreamRelay(include_usage=None).feed(upstream)
    last = client_frames(out.raw)[-1]
    assert last["error"]["message"] == "CUDA out of memory"
    assert set(last["error"]) == {"message", "type", "param", "code"}


def test_premature_close_is_an_error_but_a_finished_stream_gets_its_done() -> None:
    relay = openai.StreamRelay(include_usage=None)
    relay.feed(frame(ROLE) + frame(chunk({"content": "x"})))
    closed = relay.close()
    assert "error" in client_frames(closed.raw)[0]
    finished = openai.StreamRelay(include_usage=None)
    finished.feed(frame(ROLE) + frame(chunk(finish="stop")))
    assert client_frames(finished.close().raw) == ["[DONE]"]


def test_renderer_produces_what_the_sdk_expects() -> None:
    renderer = openai.StreamRenderer(include_usage=True)
    from proxy.domain.chat import Usage

    raw = renderer.render([
        StreamStart("id1", "m", 3), TextDelta("a"), ToolCallStart(0, "c", "f"), ToolCallDelta(0, "{}"),
        Finish(FinishReason.TOOL_CALLS), UsageReport(Usage(1, 2)),
    ]) + renderer.close()
    frames = client_frames(raw)
    assert frames[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert frames[2]["choices"][0]["delta"]["tool_calls"][0] == {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": ""}}
    assert frames[4]["choices"][0]["finish_reason"] == "tool_calls"
    assert frames[5] == {"id": "id1", "object": "chat.completion.chunk", "created": 3, "model": "m", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    assert frames[6] == "[DONE]"
    assert all(f["usage"] is None for f in frames[:5])


def test_fastapi_validation_errors_are_said_readably_with_their_field() -> None:
    many = {"detail": [{"loc": ["body", "messages", i, "content"], "msg": "Field required"} for i in range(5)]}
    assert openai.validation_error_from_body(json.dumps(many).encode()) == (
        "messages[0].content: Field required; messages[1].content: Field required; "
        "messages[2].content: Field required (and 2 more)",
        "messages[0].content",
    )
    # Pydantic v1, printed: the message quoted with double quotes for its apostrophe.
    printed = {"object": "error", "message": """[{'loc': ('body', 'n'), 'msg': "can't be 0", 'type': 'x'}]"""}
    assert openai.validation_error_from_body(json.dumps(printed).encode()) == ("n: can't be 0", "n")
    # Not a validation error: nothing is made up.
    assert openai.validation_error_from_body(b'{"detail": "Not Found"}') is None
    assert openai.validation_error_from_body(b'{"error": {"message": "bad"}}') is None
