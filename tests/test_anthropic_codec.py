"""The Anthropic Messages codec, without I/O: requests both ways, streams both ways, messages,
errors. Property tests check that domain event streams survive rendering to Anthropic SSE and
parsing back."""

from __future__ import annotations

import json
from typing import Any

import jiter
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dialects import anthropic, openai
from proxy.dialects._json_prefix import object_so_far
from proxy.dialects.anthropic import SignedReasoningDelta, StopReasonFinish
from proxy.domain.chat import (
    ChatCompletion,
    ChatRequest,
    Choice,
    FinishReason,
    GenerationParams,
    ImagePart,
    Message,
    OpaquePart,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
    Usage,
)
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import (
    CompletionBuilder,
    Finish,
    ReasoningDelta,
    StopSequenceFinish,
    StreamEvent,
    StreamFailed,
    StreamStart,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
    completion_events,
)
from proxy.infra.chat_store import completion_from_json, completion_to_json
from tests.test_openai_roundtrip import comparable, event_streams, splits


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "claude-x", "max_tokens": 64, **fields}).encode()


def sse_frames(wire: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, payload) per frame, checking the framing Anthropic uses exactly."""
    frames = []
    assert wire.endswith(b"\n\n")
    for block in wire[:-2].split(b"\n\n"):
        name, data = block.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        payload = json.loads(data[6:])
        assert payload["type"] == name[7:].decode()
        frames.append((payload["type"], payload))
    return frames


def assert_valid_anthropic_stream(wire: bytes) -> None:
    """The event grammar of §4.4: blocks strictly sequential with consecutive indexes, tool
    blocks started with empty input, and the stream closed by message_delta + message_stop
    (or cut short by one `error`)."""
    frames = sse_frames(wire)
    names = [name for name, _ in frames]
    if names[-1] == "error":
        assert names.count("error") == 1
        frames = frames[:-1]
        if not frames:
            return
    else:
        assert names[-2:] == ["message_delta", "message_stop"]
    assert names[:2] == ["message_start", "ping"]
    expected_index = 0
    open_index: int | None = None
    open_type = ""
    for name, payload in frames[2:]:
        if name == "content_block_start":
            assert open_index is None and payload["index"] == expected_index
            open_index, open_type = expected_index, payload["content_block"]["type"]
            if open_type.endswith("tool_use"):
                assert payload["content_block"]["input"] == {}
            expected_index += 1
        elif name == "content_block_delta":
            assert payload["index"] == open_index
            kind = payload["delta"]["type"]
            allowed = {
                "text": {"text_delta", "citations_delta"}, "thinking": {"thinking_delta", "signature_delta"},
                "tool_use": {"input_json_delta"}, "server_tool_use": {"input_json_delta"}, "mcp_tool_use": {"input_json_delta"},
            }
            assert kind in allowed.get(open_type, set())
        elif name == "content_block_stop":
            assert payload["index"] == open_index
            open_index = None
        else:
            assert name in ("message_delta", "message_stop") and open_index is None


# -- request parsing (ingress) ----------------------------------------------------------------------


def test_full_request_maps_onto_the_domain() -> None:
    request = anthropic.parse_messages_request(
        body(
            system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            messages=[
                {"role": "user", "content": [
                    {"type": "text", "text": "Look:"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                ]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Two tools.", "signature": "sig1"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                     "content": [{"type": "text", "text": "clock broken"}]},
                    {"type": "text", "text": "And tomorrow?"},
                ]},
            ],
            tools=[{"name": "weather", "description": "Weather now", "input_schema": {"type": "object"}}],
            tool_choice={"type": "any"},
            stop_sequences=["END"],
            temperature=0.5, top_p=0.9, top_k=40,
            metadata={"user_id": "u1"},
            thinking={"type": "enabled", "budget_tokens": 1024},
            _tool_cache_control="not the gateway's",
            stream=True,
        )
    )
    system, user, assistant, result1, result2, follow_up = request.messages
    assert system == Message(role="system", content=(TextPart("Be brief."), TextPart("Be kind.")))
    assert user.content == (
        TextPart("Look:"), ImagePart("data:image/png;base64,iVBOR"), ImagePart("https://example.com/cat.jpg"),
    )
    assert assistant.text == "Checking." and assistant.reasoning == "Two tools."
    assert assistant.tool_calls == (
        ToolCall("toolu_1", "weather", '{"city": "Paris"}'), ToolCall("toolu_2", "time", "{}"),
    )
    assert result1 == Message(role="tool", content=(TextPart("Sunny"),), tool_call_id="toolu_1")
    assert result2.role == "tool" and result2.tool_call_id == "toolu_2" and result2.text == "clock broken"
    assert follow_up == Message(role="user", content=(TextPart("And tomorrow?"),))
    assert request.tools == [Tool("weather", "Weather now", {"type": "object"})]
    assert request.tool_choice == ToolChoice(mode="required")
    assert request.params.stop == ("END",) and request.params.max_tokens == 64
    assert (request.params.temperature, request.params.top_p, request.params.top_k) == (0.5, 0.9, 40)
    assert request.stream and request.include_usage and request.dialect == "anthropic"
    assert request.extra == {"metadata": {"user_id": "u1"}, "thinking": {"type": "enabled", "budget_tokens": 1024},
                             "tools": [{"name": "weather"}]}  # in its place; its description and schema are the domain's


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, ToolChoice("auto")),
        ({"type": "any"}, ToolChoice("required")),
        ({"type": "none"}, ToolChoice("none")),
        ({"type": "tool", "name": "f"}, ToolChoice("required", "f")),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: ToolChoice) -> None:
    assert anthropic.parse_messages_request(body(messages=[{"role": "user", "content": "x"}], tool_choice=choice)).tool_choice == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": "x"}}]}]},
         "messages[0].content[0].source.media_type"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "messages[0].content[0].tool_use_id"),
        ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": []}]}]},
         "messages[0].content[0].input"),
        ({"temperature": 1.5}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"tool_choice": {"type": "required"}}, "tool_choice.type"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
        ({"tool_choice": {"type": "auto", "disable_parallel_tool_use": "yes"}}, "tool_choice.disable_parallel_tool_use"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"system": 3}, "system"),
        ({"metadata": {"user_id": 7}}, "metadata.user_id"),
    ],
)
def test_invalid_fields_are_400s_naming_them(fields: dict[str, Any], param: str) -> None:
    data = {"model": "claude-x", "max_tokens": 64, "messages": [{"role": "user", "content": "x"}], **fields}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(GatewayError) as info:
        anthropic.parse_messages_request(json.dumps(data).encode())
    assert info.value.kind is ErrorKind.INVALID_REQUEST
    assert info.value.param == param and param in info.value.message


def test_malformed_json_is_a_400() -> None:
    with pytest.raises(GatewayError) as info:
        anthropic.parse_messages_request(b"{nope")
    assert info.value.status == 400


def test_count_tokens_body_needs_no_max_tokens() -> None:
    request = anthropic.parse_messages_request(
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode(), count_only=True
    )
    assert request.params.max_tokens is None and not request.stream


def test_history_thinking_becomes_reasoning_and_redacted_thinking_stays_anthropic_only() -> None:
    request = anthropic.parse_messages_request(body(messages=[
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [
            {"type": "redacted_thinking", "data": "EmwK"},
            {"type": "thinking", "thinking": "unsigned"},
            {"type": "text", "text": "a"},
        ]},
    ]))
    assistant = request.messages[1]
    assert assistant.reasoning == "unsigned"
    # Unsigned thinking cannot be replayed to Anthropic; redacted thinking only to Anthropic.
    assert assistant.content == (OpaquePart("anthropic", {"type": "redacted_thinking", "data": "EmwK"}), TextPart("a"))


# -- request encoding (egress) ----------------------------------------------------------------------


def encode(request: ChatRequest, **kwargs: Any) -> dict[str, Any]:
    options = {"stream": True, "default_max_tokens": 4096, **kwargs}
    sent: dict[str, Any] = json.loads(anthropic.encode_messages_request(request, "claude-up", **options))
    return sent


def test_openai_shaped_conversation_becomes_an_anthropic_one() -> None:
    request = ChatRequest(
        model="alias",
        messages=[
            Message("system", (TextPart("Be brief."),)),
            Message("user", (TextPart("Weather and time?"), ImagePart("data:image/jpeg;base64,/9j/4"))),
            Message("assistant", (), tool_calls=(ToolCall("call_1", "weather", '{"city":"Paris"}'), ToolCall("call.2", "time", ""))),
            Message("tool", (TextPart("Sunny"),), tool_call_id="call_1"),
            Message("tool", (TextPart("12:00"),), tool_call_id="call.2"),
            Message("system", (TextPart("Answer in French."),)),
            Message("user", (TextPart("Thanks"), ImagePart("https://example.com/x.png"))),
        ],
        params=GenerationParams(temperature=1.7, top_k=-1, stop=("END",), seed=3, frequency_penalty=1),
        tools=[Tool("weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}}}), Tool("time")],
        tool_choice=ToolChoice("required", "weather"),
        dialect="openai",
        extra={"user": "someone", "logit_bias": {}},
    )
    sent = encode(request)
    assert sent == {
        "model": "claude-up",
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Answer in French."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather and time?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "time", "input": {}},
            ]},
            # Consecutive tool results and the user's next words share one user turn, results first.
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "Sunny"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "12:00"},
                {"type": "text", "text": "Thanks"},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}},
            ]},
        ],
        "tools": [
            {"name": "weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
            {"name": "time", "input_schema": {"type": "object", "properties": {}}},
        ],
        "tool_choice": {"type": "tool", "name": "weather"},
        "max_tokens": 4096,
        "temperature": 1.0,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "someone"},  # OpenAI's end-user id, as LiteLLM maps it
        "stream": True,
    }


def test_anthropic_request_round_trips_to_an_anthropic_backend() -> None:
    cache = {"type": "ephemeral"}
    original = {
        "model": "claude-x",
        "max_tokens": 300,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Long rules.", "cache_control": cache}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "hi", "cache_control": cache},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}, "cache_control": cache},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "sig"},
                {"type": "redacted_thinking", "data": "EmwK"},
                {"type": "text", "text": "Calling."},
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}},
                {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, 2]}, "cache_control": cache},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True, "cache_control": cache,
                 "content": [{"type": "text", "text": "failed", "cache_control": cache}, {"type": "text", "text": "twice"}]},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}, "cache_control": cache},
            ]},
        ],
        "tools": [
            {"name": "f", "input_schema": {"type": "object"}, "cache_control": cache},
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 2},
        ],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "thinking": {"type": "enabled", "budget_tokens": 200},
        "service_tier": "auto",
        "metadata": {"user_id": "u"},
        "top_k": 5,
        "stream": False,
    }
    request = anthropic.parse_messages_request(json.dumps(original).encode())
    sent = encode(request, stream=False)
    assert "_tool_cache_control" not in sent
    assert sent["messages"] == original["messages"]
    assert sent["system"] == original["system"] and sent["max_tokens"] == 300 and sent["top_k"] == 5
    assert sent["tools"] == original["tools"] and sent["tool_choice"] == original["tool_choice"]
    for key in ("thinking", "service_tier", "metadata"):
        assert sent[key] == original[key]


def test_anthropic_only_fields_never_reach_other_backends() -> None:
    request = anthropic.parse_messages_request(body(
        system=[{"type": "text", "text": "rules", "cache_control": {"type": "ephemeral"}}],
        tools=[{"name": "f", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "sig"},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
            ]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True, "content": "no"}]},
        ],
        thinking={"type": "enabled", "budget_tokens": 200},
    ))
    sent = json.loads(openai.encode_chat_request(request, "m", stream=True, include_usage=True))
    assert "thinking" not in sent and "metadata" not in sent and "_tool_cache_control" not in sent
    assert sent["messages"][0] == {"role": "system", "content": "rules"}
    assert sent["messages"][1] == {"role": "user", "content": "hi"}
    assert sent["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert sent["messages"][2] == {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    assert sent["messages"][3] == {"role": "tool", "content": "no", "tool_call_id": "toolu_1"}


def _adapted(target: str, messages: Any) -> list[Message]:
    request = anthropic.parse_messages_request(body(messages=messages))
    anthropic.adapt_for_dialect(request, target)
    return request.messages


def test_markers_and_thinking_need_no_adapting_for_other_backends() -> None:
    request = anthropic.parse_messages_request(body(messages=[
        {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hm", "signature": "sig"}, {"type": "redacted_thinking", "data": "xx"},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
        ]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "no"}]},
    ]))
    before = list(request.messages)
    anthropic.adapt_for_dialect(request, "openai")
    assert request.messages == before


def test_a_failed_tool_results_text_says_it_failed_for_other_backends() -> None:
    messages = [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True, "content": "no"}]},
    ]
    for target in ("openai", "ollama"):
        assert _adapted(target, messages)[1].text == "Error: no"
    said = _adapted("openai", [messages[0], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True, "content": "error: no such file"}]}])
    assert said[1].text == "error: no such file"  # it says so already
    request = anthropic.parse_messages_request(body(messages=messages))
    anthropic.adapt_for_dialect(request, "anthropic")
    assert request.messages[1].text == "no"  # Anthropic has the flag


def test_document_content_sources_become_text_and_images() -> None:
    messages = _adapted("ollama", [{"role": "user", "content": [{"type": "document", "source": {"type": "content", "content": [
        {"type": "text", "text": "page 1"},
        {"type": "image", "source": {"type": "url", "url": "https://x/p2.png"}},
    ]}}]}])
    assert messages == [Message("user", (TextPart("page 1"), ImagePart("https://x/p2.png")))]


@pytest.mark.parametrize(
    ("block", "named"),
    [
        ({"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}}, "`document` blocks with a `url` source"),
        ({"type": "image", "source": {"type": "file", "file_id": "file_1"}}, "`image` blocks with a `file` source"),
        ({"type": "search_result", "source": "s", "title": "t", "content": []}, "`search_result` blocks"),
        ({"type": "container_upload", "file_id": "file_1"}, "`container_upload` blocks"),
    ],
)
def test_blocks_without_an_equivalent_are_refused_for_other_backends(block: dict[str, Any], named: str) -> None:
    for target in ("openai", "ollama"):
        with pytest.raises(GatewayError) as info:
            _adapted(target, [{"role": "user", "content": [block]}])
        assert info.value.kind is ErrorKind.INVALID_REQUEST and info.value.message.startswith(named)
    # Inside a tool result too.
    with pytest.raises(GatewayError):
        _adapted("openai", [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [block]}]},
        ])
    assert _adapted("anthropic", [{"role": "user", "content": [block]}])[0].content == (OpaquePart("anthropic", block),)


def test_tool_result_images_follow_the_turn_for_openai_backends_only() -> None:
    png = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    history: Any = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t1", "name": "Read", "input": {}},
            {"type": "tool_use", "id": "t2", "name": "Read", "input": {}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "two pages"}, png, png]},
            {"type": "tool_result", "tool_use_id": "t2", "content": "plain"},
        ]},
    ]
    image = ImagePart("data:image/png;base64,AAAA")
    assert _adapted("openai", history)[2:] == [
        Message("tool", (TextPart("two pages"), TextPart("[2 images attached in the next user message]")), tool_call_id="t1"),
        Message("tool", (TextPart("plain"),), tool_call_id="t2"),
        Message("user", (TextPart("Images returned by tool call t1:"), image, image)),
    ]
    # Ollama messages take images whatever their role.
    assert _adapted("ollama", history)[2].content == (TextPart("two pages"), image, image)


def test_unsigned_reasoning_is_not_sent_to_anthropic() -> None:
    request = ChatRequest("m", [Message("user", (TextPart("q"),)), Message("assistant", (TextPart("a"),), reasoning="thought")])
    assert encode(request)["messages"][1] == {"role": "assistant", "content": "a"}


def test_n_above_one_is_refused_for_anthropic_backends() -> None:
    request = ChatRequest("m", [Message("user", (TextPart("q"),))], params=GenerationParams(n=2))
    with pytest.raises(GatewayError) as info:
        encode(request)
    assert info.value.status == 400 and info.value.param == "n"


def test_count_tokens_body_keeps_only_what_count_tokens_accepts() -> None:
    request = anthropic.parse_messages_request(body(
        messages=[{"role": "user", "content": "x"}], thinking={"type": "enabled", "budget_tokens": 100},
        metadata={"user_id": "u"}, temperature=0.2,
    ))
    sent = json.loads(anthropic.encode_messages_request(request, "up", stream=False, default_max_tokens=1, count_only=True))
    assert sent == {"thinking": {"type": "enabled", "budget_tokens": 100}, "model": "up", "messages": [{"role": "user", "content": "x"}]}


# -- rendering streams (ingress) --------------------------------------------------------------------


def test_text_stream_is_byte_exact() -> None:
    renderer = anthropic.StreamRenderer(model="fallback")
    wire = renderer.render([StreamStart("msg_1", "claude-x", 0), UsageReport(Usage(10, 1)), TextDelta("Hi")])
    wire += renderer.render([TextDelta(" there"), Finish(FinishReason.STOP)])
    wire += renderer.render([UsageReport(Usage(10, 2))])
    wire += renderer.close()
    assert wire == (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
        b'"role":"assistant","model":"claude-x","content":[],"stop_reason":null,"stop_sequence":null,'
        b'"usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}\n\n'
        b'event: ping\ndata: {"type":"ping"}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" there"}}\n\n'
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
        b'"usage":{"output_tokens":2,"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":0}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )


def test_input_tokens_unknown_at_start_come_in_message_delta() -> None:
    renderer = anthropic.StreamRenderer()
    wire = renderer.render([StreamStart("chatcmpl-9", "m", 0)])
    wire += renderer.render([TextDelta("x"), Finish(FinishReason.LENGTH)])
    wire += renderer.render([UsageReport(Usage(120, 7, cached_tokens=100))])
    wire += renderer.close()
    frames = dict(sse_frames(wire))
    start = frames["message_start"]["message"]
    assert start["id"] == "msg_chatcmpl-9"
    assert start["usage"]["input_tokens"] == 0
    delta = frames["message_delta"]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    # Anthropic counts cache reads apart from input_tokens.
    assert delta["usage"] == {"output_tokens": 7, "input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100}


def test_a_final_count_read_with_the_start_gives_message_start_no_output_yet() -> None:
    """A whole answer in one batch (a short one read at once, a replay) has its final usage
    after its content: message_start gets its input, and its output only in message_delta.
    LangChain adds the two events' `output_tokens` up, so saying it in both counted it twice."""
    renderer = anthropic.StreamRenderer()
    wire = renderer.render([StreamStart("c", "m", 0), TextDelta("ab"), Finish(FinishReason.STOP), UsageReport(Usage(7, 3))])
    wire += renderer.close()
    frames = dict(sse_frames(wire))
    assert frames["message_start"]["message"]["usage"] == {
        "input_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0,
    }
    assert frames["message_delta"]["usage"] == {
        "output_tokens": 3, "input_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
    }


def test_cache_reads_and_writes_are_counted_apart_from_input_tokens() -> None:
    usage = Usage(160, 2, cached_tokens=50, cache_write_tokens=100)
    renderer = anthropic.StreamRenderer()
    early = renderer.render([StreamStart("msg_1", "m", 0), UsageReport(usage), TextDelta("x")]) + renderer.close()
    expected = {"input_tokens": 10, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 50}
    assert {k: dict(sse_frames(early))["message_start"]["message"]["usage"][k] for k in expected} == expected
    renderer = anthropic.StreamRenderer()
    late = renderer.render([StreamStart("msg_1", "m", 0), TextDelta("x")]) + renderer.render([UsageReport(usage)]) + renderer.close()
    assert dict(sse_frames(late))["message_delta"]["usage"] == {"output_tokens": 2, **expected}


@pytest.mark.parametrize(
    ("finish", "stop_reason", "stop_sequence"),
    [
        (Finish(FinishReason.STOP), "end_turn", None),
        (StopSequenceFinish(FinishReason.STOP, 0, "###"), "stop_sequence", "###"),
        (Finish(FinishReason.LENGTH), "max_tokens", None),
        (Finish(FinishReason.TOOL_CALLS), "tool_use", None),
        (Finish(FinishReason.CONTENT_FILTER), "refusal", None),
        (StopReasonFinish(FinishReason.STOP, 0, "pause_turn"), "pause_turn", None),
        (StopReasonFinish(FinishReason.LENGTH, 0, "model_context_window_exceeded"), "model_context_window_exceeded", None),
    ],
)
def test_stop_reasons(finish: Finish, stop_reason: str, stop_sequence: str | None) -> None:
    renderer = anthropic.StreamRenderer()
    called: list[StreamEvent] = [ToolCallStart(0, "toolu_1", "f")] if stop_reason == "tool_use" else []
    wire = renderer.render([StreamStart("i", "m", 0), *called, finish]) + renderer.close()
    assert dict(sse_frames(wire))["message_delta"]["delta"] == {"stop_reason": stop_reason, "stop_sequence": stop_sequence}


def test_tool_use_without_a_tool_call_is_end_turn() -> None:
    renderer = anthropic.StreamRenderer()
    wire = renderer.render([StreamStart("i", "m", 0), TextDelta("x"), Finish(FinishReason.TOOL_CALLS)]) + renderer.close()
    assert dict(sse_frames(wire))["message_delta"]["delta"]["stop_reason"] == "end_turn"


def test_thinking_then_tools_with_signature_and_streamed_arguments() -> None:
    renderer = anthropic.StreamRenderer()
    wire = renderer.render([
        StreamStart("msg_1", "m", 0),
        ReasoningDelta("Let me"),
        SignedReasoningDelta(" think.", 0, "sig=="),
        ToolCallStart(0, "toolu_a", "f"),
        ToolCallDelta(0, '{"x":'),
        ToolCallDelta(0, "1}"),
        ToolCallStart(1, "toolu_b", "g"),
        ToolCallDelta(1, "{}"),
        Finish(FinishReason.TOOL_CALLS),
    ]) + renderer.close()
    assert_valid_anthropic_stream(wire)
    frames = sse_frames(wire)
    deltas = [(p["index"], p["delta"]) for name, p in frames if name == "content_block_delta"]
    assert deltas == [
        (0, {"type": "thinking_delta", "thinking": "Let me"}),
        (0, {"type": "thinking_delta", "thinking": " think."}),
        (0, {"type": "signature_delta", "signature": "sig=="}),
        (1, {"type": "input_json_delta", "partial_json": '{"x":'}),
        (1, {"type": "input_json_delta", "partial_json": "1}"}),
        (2, {"type": "input_json_delta", "partial_json": "{}"}),
    ]
    starts = [p["content_block"] for name, p in frames if name == "content_block_start"]
    assert starts == [
        {"type": "thinking", "thinking": "", "signature": ""},
        {"type": "tool_use", "id": "toolu_a", "name": "f", "input": {}},
        {"type": "tool_use", "id": "toolu_b", "name": "g", "input": {}},
    ]


def test_interleaved_parallel_tool_calls_are_serialised_without_losing_fragments() -> None:
    renderer = anthropic.StreamRenderer()
    first = renderer.render([
        StreamStart("i", "m", 0),
        ToolCallStart(0, "call_a", "f"), ToolCallStart(1, "call_b", "g"),
        ToolCallDelta(0, '{"a"'), ToolCallDelta(1, '{"b"'),
        ToolCallDelta(0, ":1"), ToolCallDelta(1, ":2}"),
    ])
    # Call b waits while call a is incomplete; a's fragments stream live.
    assert b'"partial_json":"{\\"b\\""' not in first
    rest = renderer.render([ToolCallDelta(0, "}"), Finish(FinishReason.TOOL_CALLS)]) + renderer.close()
    wire = first + rest
    assert_valid_anthropic_stream(wire)
    blocks: dict[int, str] = {}
    for name, payload in sse_frames(wire):
        if name == "content_block_delta":
            blocks[payload["index"]] = blocks.get(payload["index"], "") + payload["delta"]["partial_json"]
    assert blocks == {0: '{"a":1}', 1: '{"b":2}'}


def test_error_mid_stream_is_an_error_event_and_the_end() -> None:
    renderer = anthropic.StreamRenderer()
    wire = renderer.render([StreamStart("i", "m", 0), TextDelta("par")])
    wire += renderer.render([StreamFailed(GatewayError(ErrorKind.UNAVAILABLE, "engine gone")), TextDelta("x")])
    wire += renderer.close()
    assert wire.endswith(
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"engine gone"}}\n\n'
    )
    assert_valid_anthropic_stream(wire)


@pytest.mark.parametrize(
    ("kind", "wire_type"),
    [
        (ErrorKind.INVALID_REQUEST, "invalid_request_error"),
        (ErrorKind.AUTHENTICATION, "authentication_error"),
        (ErrorKind.PERMISSION, "permission_error"),
        (ErrorKind.NOT_FOUND, "not_found_error"),
        (ErrorKind.REQUEST_TOO_LARGE, "request_too_large"),
        (ErrorKind.RATE_LIMITED, "rate_limit_error"),
        (ErrorKind.INTERNAL, "api_error"),
        (ErrorKind.BACKEND, "api_error"),
        (ErrorKind.UNAVAILABLE, "overloaded_error"),
        (ErrorKind.TIMEOUT, "timeout_error"),
    ],
)
def test_error_shape(kind: ErrorKind, wire_type: str) -> None:
    assert json.loads(anthropic.render_error(GatewayError(kind, "why"))) == {
        "type": "error", "error": {"type": wire_type, "message": "why"},
    }


# -- parsing streams (egress) -----------------------------------------------------------------------

BACKEND_STREAM = b"".join([
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_01","type":"message","role":"assistant",'
    b'"model":"claude-up","content":[],"stop_reason":null,"stop_sequence":null,'
    b'"usage":{"input_tokens":25,"cache_creation_input_tokens":5,"cache_read_input_tokens":10,"output_tokens":1}}}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n',
    b"event: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\n",
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Hmm"}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"."}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"S1"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Hi"}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"citations_delta","citation":{}}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n',
    b'event: brand_new_event\ndata: {"type":"brand_new_event","stuff":1}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_A","name":"f","input":{}}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\\"q\\":"}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"1}"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":2}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":3,"content_block":{"type":"tool_use","id":"toolu_B","name":"g","input":{}}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":3,"delta":{"type":"input_json_delta","partial_json":"{}"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":3}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":42}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
])


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_backend_stream_parses_into_events_however_it_is_cut(data: st.DataObject) -> None:
    parser = anthropic.StreamParser(clock=lambda: 1700000000)
    events: list[StreamEvent] = []
    done = False
    for piece in data.draw(splits(BACKEND_STREAM)):
        output = parser.feed(piece)
        events.extend(output.events)
        done = output.done
    assert done
    input_usage = Usage(prompt_tokens=40, completion_tokens=1, cached_tokens=10, cache_write_tokens=5)
    assert events == [
        StreamStart("msg_01", "claude-up", 1700000000),
        UsageReport(input_usage),
        ReasoningDelta("Hmm"),
        SignedReasoningDelta(".", 0, "S1"),
        TextDelta("Hi"),
        ToolCallStart(0, "toolu_A", "f"),
        ToolCallDelta(0, '{"q":'),
        ToolCallDelta(0, "1}"),
        ToolCallStart(1, "toolu_B", "g"),
        ToolCallDelta(1, "{}"),
        Finish(FinishReason.TOOL_CALLS),
        # Input counts from message_start merged with message_delta's cumulative output (§3e #28).
        UsageReport(Usage(prompt_tokens=40, completion_tokens=42, cached_tokens=10, cache_write_tokens=5)),
    ]


RELAYED_STREAM = b"".join([
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_02","model":"claude-up","usage":{"input_tokens":5,"output_tokens":1,"service_tier":"standard"}}}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"redacted_thinking","data":"XX"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":1,"content_block":{"type":"server_tool_use","id":"srvtoolu_1","name":"web_search","input":{}}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"query\\":\\"x\\"}"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":2,"content_block":{"type":"text","text":"","citations":[]}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":2,"delta":{"type":"citations_delta","citation":{"type":"char_location","cited_text":"c"}}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":2,"delta":{"type":"text_delta","text":"Cited."}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":2}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":3,"content_block":{"type":"text","text":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":3,"delta":{"type":"text_delta","text":" Plain."}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":3}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":9}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
])


def test_blocks_the_domain_does_not_model_are_relayed_between_anthropic_ends_only() -> None:
    def blocks(wire: bytes) -> list[tuple[str, Any]]:
        return [(name, p.get("content_block") or p.get("delta")) for name, p in sse_frames(wire) if name.startswith("content_block_")]

    renderer = anthropic.StreamRenderer()
    relayed = renderer.render(anthropic.StreamParser(relay_blocks=True).feed(RELAYED_STREAM).events) + renderer.close()
    assert_valid_anthropic_stream(relayed)
    assert blocks(relayed) == [(n, b) for n, b in blocks(RELAYED_STREAM)]
    assert dict(sse_frames(relayed))["message_start"]["message"]["usage"]["service_tier"] == "standard"
    # Without relaying (a client of another dialect), the same stream is plain text, but for the
    # redacted thinking, carried as an empty signed block (a Responses client gives it back).
    events = anthropic.StreamParser().feed(RELAYED_STREAM).events
    assert [e for e in events if isinstance(e, TextDelta | ReasoningDelta | ToolCallStart)] == [
        anthropic.SignedReasoningDelta("", 0, anthropic.REDACTED_THINKING + "XX"), TextDelta("Cited."), TextDelta(" Plain."),
    ]
    assert all(type(e) is UsageReport for e in events if isinstance(e, UsageReport))


def test_relayed_message_keeps_its_blocks_in_order() -> None:
    content = [
        {"type": "text", "text": "A"},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "x"}},
        {"type": "text", "text": "B", "citations": [{"type": "char_location", "cited_text": "c"}]},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
    ]
    data = {"id": "msg_1", "model": "m", "content": content, "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 2}}
    events = anthropic.message_events(data, relay_blocks=True)
    builder = CompletionBuilder()
    for event in events:
        builder.add(event)
    completion = builder.build()
    assert completion.choices[0].content == "AB"
    assert anthropic.message_body(completion, events)["content"] == content
    assert anthropic.message_body(completion, anthropic.message_events(data))["content"] == [
        {"type": "text", "text": "AB"}, content[3],
    ]


def test_citations_given_back_reach_anthropic_backends_only() -> None:
    cited = {"type": "text", "text": "Sunny.", "citations": [{"type": "char_location", "cited_text": "c"}]}
    server = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "x"}}
    request = anthropic.parse_messages_request(body(messages=[
        {"role": "user", "content": "q"}, {"role": "assistant", "content": [server, cited]}, {"role": "user", "content": "more"},
    ]))
    assert encode(request)["messages"][1]["content"] == [server, cited]
    anthropic.adapt_for_dialect(request, "openai")
    sent = json.loads(openai.encode_chat_request(request, "m", stream=False, include_usage=False))
    assert sent["messages"][1] == {"role": "assistant", "content": "Sunny."}


@pytest.mark.parametrize(
    ("stop_reason", "expected"),
    [
        ("end_turn", Finish(FinishReason.STOP)),
        ("stop_sequence", StopSequenceFinish(FinishReason.STOP, 0, "###")),
        ("max_tokens", Finish(FinishReason.LENGTH)),
        ("tool_use", Finish(FinishReason.TOOL_CALLS)),
        ("refusal", Finish(FinishReason.CONTENT_FILTER)),
        ("pause_turn", StopReasonFinish(FinishReason.STOP, 0, "pause_turn")),
        ("model_context_window_exceeded", StopReasonFinish(FinishReason.LENGTH, 0, "model_context_window_exceeded")),
        ("something_new", Finish(FinishReason.STOP)),
    ],
)
def test_backend_stop_reasons(stop_reason: str, expected: Finish) -> None:
    sequence = '"###"' if stop_reason == "stop_sequence" else "null"
    wire = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","usage":{"input_tokens":1,"output_tokens":0}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"' + stop_reason.encode()
        + b'","stop_sequence":' + sequence.encode() + b'},"usage":{"output_tokens":3}}\n\n'
    )
    events = anthropic.StreamParser().feed(wire).events
    assert [e for e in events if isinstance(e, Finish)] == [expected]


def test_backend_error_event_fails_the_stream_with_its_kind() -> None:
    parser = anthropic.StreamParser()
    output = parser.feed(
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","usage":{"input_tokens":1,"output_tokens":0}}}\n\n'
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
    failure = output.events[-1]
    assert output.done and parser.failed and isinstance(failure, StreamFailed)
    assert (failure.error.kind, failure.error.message) == (ErrorKind.UNAVAILABLE, "Overloaded")


def test_backend_stream_cut_short_is_a_failure() -> None:
    parser = anthropic.StreamParser()
    parser.feed(BACKEND_STREAM[:600])
    closing = parser.close()
    assert closing.done and isinstance(closing.events[-1], StreamFailed)
    assert closing.events[-1].error.kind is ErrorKind.BACKEND


# -- non-streamed messages ----------------------------------------------------------------------------


def test_backend_message_and_rendered_message() -> None:
    backend_message = {
        "id": "msg_9", "type": "message", "role": "assistant", "model": "claude-up",
        "content": [
            {"type": "thinking", "thinking": "hm", "signature": "S"},
            {"type": "text", "text": "Result"},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
        ],
        "stop_reason": "stop_sequence", "stop_sequence": "END",
        "usage": {"input_tokens": 5, "cache_creation_input_tokens": 4, "cache_read_input_tokens": 3, "output_tokens": 9},
    }
    events = anthropic.message_events(backend_message, created=7)
    builder = CompletionBuilder()
    for event in events:
        builder.add(event)
    completion = builder.build()
    assert completion.choices[0].tool_calls == [ToolCall("toolu_1", "f", '{"a": 1}')]
    assert completion.usage == Usage(12, 9, cached_tokens=3, cache_write_tokens=4)
    rendered = json.loads(anthropic.render_message(completion, events))
    assert rendered == {
        "id": "msg_9", "type": "message", "role": "assistant", "model": "claude-up",
        "content": [
            {"type": "thinking", "thinking": "hm", "signature": "S"},
            {"type": "text", "text": "Result"},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
        ],
        "stop_reason": "stop_sequence", "stop_sequence": "END",
        "usage": {"input_tokens": 5, "cache_creation_input_tokens": 4, "cache_read_input_tokens": 3, "output_tokens": 9},
    }


def test_rendered_message_from_another_backend() -> None:
    completion = ChatCompletion(
        id="chatcmpl-1", model="qwen", created=0,
        choices=[Choice(content="", tool_calls=[ToolCall("call_1", "f", "not json")], finish_reason=FinishReason.TOOL_CALLS)],
        usage=Usage(10, 2),
    )
    rendered = json.loads(anthropic.render_message(completion))
    assert rendered["id"] == "msg_chatcmpl-1" and rendered["stop_reason"] == "tool_use"
    # Malformed arguments are kept (as text) rather than dropped.
    assert rendered["content"] == [{"type": "tool_use", "id": "call_1", "name": "f", "input": {"arguments": "not json"}}]


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=4), _JSON_VALUES, max_size=4), st.booleans())
def test_a_tool_input_cut_anywhere_reads_as_the_anthropic_sdk_reads_its_stream(value: dict[str, Any], spaced: bool) -> None:
    # A whole message's input must be what the SDK's final message of the stream holds: its
    # partial parser (jiter's) applied to the input's text so far.
    text = json.dumps(value, ensure_ascii=False, indent=1 if spaced else None)
    for end in range(len(text) + 1):
        cut = text[:end]
        expected = jiter.from_json(cut.encode(), partial_mode=True) if cut.strip() else {}
        assert object_so_far(cut) == expected, cut


# -- round trips (property) ---------------------------------------------------------------------------


def _final_usage(usage: Usage | None) -> Usage:
    """What the parser reads back from the renderer's usage (Anthropic always sends the cache
    counters, so an unknown cache count reads as 0)."""
    if usage is None:
        return Usage(0, 0, cached_tokens=0)
    cached = usage.cached_tokens or 0
    return Usage(max(usage.prompt_tokens, cached), usage.completion_tokens, cached, usage.reasoning_tokens)


def _expected(events: list[StreamEvent]) -> tuple[list[Any], Usage | None, bool]:
    """Events as they come back, the final usage, and whether the stream failed.

    Anthropic messages have one choice (others are not rendered); ids gain `msg_`; empty
    deltas are not sent; the finish moves after usage-only events and a missing one reads
    as `end_turn`, as does `tool_use` without a tool call; a failure before anything was
    said is the error alone."""
    start = events[0]
    assert isinstance(start, StreamStart)
    body = [e for e in events[1:] if getattr(e, "choice", 0) == 0]
    first = next((e for e in body if not isinstance(e, UsageReport)), None)
    if isinstance(first, StreamFailed):
        return [("failed", ErrorKind.BACKEND, first.error.message)], None, True
    out: list[Any] = [StreamStart(anthropic.message_id(start.id), start.model, start.created)]
    usage: Usage | None = None
    finish: Finish | None = None
    for event in body:
        match event:
            case TextDelta(text) | ReasoningDelta(text) if not text:
                continue
            case ToolCallDelta(_, arguments) if not arguments:
                continue
            case UsageReport(report):
                usage = report
            case Finish():
                finish = event
            case StreamFailed(error):
                out.append(("failed", ErrorKind.BACKEND, error.message))
                return out, None, True
            case _:
                out.append(event)
    if finish is not None and finish.reason is FinishReason.TOOL_CALLS and not any(isinstance(e, ToolCallStart) for e in out):
        finish = None
    out.append(finish or Finish(FinishReason.STOP))
    return out, usage, False


def _round_trip(events: list[StreamEvent], pieces: list[bytes] | None = None) -> tuple[bytes, list[StreamEvent]]:
    renderer = anthropic.StreamRenderer()
    wire = renderer.render(events) + renderer.close()
    start = events[0]
    assert isinstance(start, StreamStart)
    parser = anthropic.StreamParser(clock=lambda: start.created)
    seen: list[StreamEvent] = []
    for piece in pieces or [wire]:
        seen.extend(parser.feed(piece).events)
    seen.extend(parser.close().events)
    return wire, seen


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_renderer_then_parser_gives_back_the_events(data: st.DataObject) -> None:
    events = data.draw(event_streams(max_choices=2, interleave_tools=False))
    renderer = anthropic.StreamRenderer()
    wire = renderer.render(events) + renderer.close()
    wire, seen = _round_trip(events, data.draw(splits(wire)))
    assert_valid_anthropic_stream(wire)
    expected, usage, failed = _expected(events)
    assert [comparable(e) for e in seen if not isinstance(e, UsageReport)] == expected
    if not failed:
        reports = [e.usage for e in seen if isinstance(e, UsageReport)]
        assert reports[-1] == _final_usage(usage)


@settings(max_examples=300, deadline=None)
@given(events=event_streams(max_choices=1, interleave_tools=True))
def test_interleaved_tool_calls_survive_as_sequential_blocks(events: list[StreamEvent]) -> None:
    wire, seen = _round_trip(events)
    assert_valid_anthropic_stream(wire)
    if any(isinstance(e, StreamFailed) for e in events):
        return
    before, after = CompletionBuilder(), CompletionBuilder()
    for event in events:
        before.add(event)
    for event in seen:
        after.add(event)
    expected, got = before.build().choices[0], after.build().choices[0]
    assert got.tool_calls == expected.tool_calls
    assert (got.content, got.reasoning) == (expected.content, expected.reasoning)


@settings(max_examples=100, deadline=None)
@given(
    signature=st.text(alphabet="ABCDEFabcdef0123456789+/=", min_size=1, max_size=20),
    thinking=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4),
    stop_sequence=st.none() | st.text(min_size=1, max_size=5),
)
def test_signatures_and_stop_sequences_survive(signature: str, thinking: list[str], stop_sequence: str | None) -> None:
    events: list[StreamEvent] = [StreamStart("msg_x", "m", 1)]
    events.extend(ReasoningDelta(piece) for piece in thinking[:-1])
    events.append(SignedReasoningDelta(thinking[-1], 0, signature))
    events.append(TextDelta("answer"))
    events.append(StopSequenceFinish(FinishReason.STOP, 0, stop_sequence) if stop_sequence else Finish(FinishReason.STOP))
    _, seen = _round_trip(events)
    assert [e for e in seen if not isinstance(e, UsageReport)] == events


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("auto", True, {"type": "auto", "disable_parallel_tool_use": False}),
        ("none", False, {"type": "none"}),
        (None, None, None),
    ],
)
def test_an_openai_clients_parallel_tool_calls_reach_an_anthropic_backend(
    tool_choice: str | None, parallel: bool | None, expected: dict[str, Any] | None
) -> None:
    body: dict[str, Any] = {
        "model": "claude-x", "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    }
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    request = openai.parse_chat_request(json.dumps(body).encode())
    sent = json.loads(anthropic.encode_messages_request(request, "up", stream=False, default_max_tokens=10))
    assert sent.get("tool_choice") == expected


def test_an_assistant_turns_blocks_are_kept_as_sent_only_when_their_order_needs_it() -> None:
    """Kept, they travel twice (the canonical request, the log row): only for an order the
    domain's rendering (thinking, the rest, tool calls) would change."""
    thinking = {"type": "thinking", "thinking": "t", "signature": "S"}
    text = {"type": "text", "text": "x"}
    call = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}

    def kept(turn: list[dict[str, Any]]) -> bool:
        body = {"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": turn}]}
        request = anthropic.parse_messages_request(json.dumps(body).encode())
        return "content" in request.messages[-1].extra

    assert not kept([thinking, text, call]) and not kept([text]) and not kept([thinking, call])
    assert kept([thinking, text, thinking, text]) and kept([text, call, text])


def test_backend_bytes_that_are_not_utf8_are_mended_in_every_kind_of_block() -> None:
    """A character split across two deltas (llama.cpp's Anthropic API writes a token's bytes
    as they are) is rejoined in thinking, text and tool input alike; a lone byte, and one
    left unfinished when its block stops, is U+FFFD. Before, the stream failed."""
    ni = "你".encode()

    def frame(name: str, data: bytes) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"

    def delta(index: int, kind: bytes, field: bytes, value: bytes) -> bytes:
        return frame("content_block_delta", b'{"type":"content_block_delta","index":%d,"delta":{"type":"%s","%s":"%s"}}'
                     % (index, kind, field, value))

    wire = b"".join([
        frame("message_start", b'{"type":"message_start","message":{"id":"m","usage":{"input_tokens":1,"output_tokens":0}}}'),
        frame("content_block_start", b'{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}'),
        delta(0, b"thinking_delta", b"thinking", ni[:1]), delta(0, b"thinking_delta", b"thinking", ni[1:] + b"!"),
        delta(0, b"signature_delta", b"signature", b"sig"),
        frame("content_block_stop", b'{"type":"content_block_stop","index":0}'),
        frame("content_block_start", b'{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"t1","name":"f","input":{}}}'),
        delta(1, b"input_json_delta", b"partial_json", b'{\\"q\\": \\"' + ni[:2]),
        delta(1, b"input_json_delta", b"partial_json", ni[2:] + b'\\"}'),
        frame("content_block_stop", b'{"type":"content_block_stop","index":1}'),
        frame("content_block_start", b'{"type":"content_block_start","index":2,"content_block":{"type":"text","text":""}}'),
        delta(2, b"text_delta", b"text", b"a\xffb" + ni[:2]),
        frame("content_block_stop", b'{"type":"content_block_stop","index":2}'),
        frame("message_delta", b'{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":3}}'),
        frame("message_stop", b'{"type":"message_stop"}'),
    ])
    parser = anthropic.StreamParser()
    events = parser.feed(wire).events + parser.close().events
    assert not parser.failed
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "你!"
    assert json.loads("".join(e.arguments for e in events if isinstance(e, ToolCallDelta))) == {"q": "你"}
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "a\ufffdb\ufffd"


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(value=st.dictionaries(st.text(max_size=5), _JSON_VALUES, max_size=4), indent=st.sampled_from([None, 1]),
       data=st.data())
def test_a_tool_input_that_is_json_streams_as_sent_and_every_prefix_parses(
    value: dict[str, Any], indent: int | None, data: st.DataObject
) -> None:
    """What Anthropic's SDK does with each `input_json_delta` (jiter's partial parse) never
    fails on a valid input, however the backend cut it; the input arrives whole."""
    import jiter

    text = json.dumps(value, indent=indent, ensure_ascii=data.draw(st.booleans()))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True) if text[a:b]]
    renderer = anthropic.StreamRenderer(model="m")
    wire = renderer.render([StreamStart("chatcmpl-1", "m", 0), ToolCallStart(0, "call_1", "f")])
    wire += renderer.render([ToolCallDelta(0, piece) for piece in pieces] + [Finish(FinishReason.TOOL_CALLS)])
    wire += renderer.close()
    sent = ""
    for _, payload in sse_frames(wire):
        if payload["type"] == "content_block_delta":
            sent += payload["delta"]["partial_json"]
            jiter.from_json(sent.encode(), partial_mode=True)
    assert json.loads(sent) == value


@pytest.mark.parametrize(("arguments", "streamed"), [
    ('{"a": 1, "b": [1, 2,', '{"a": 1, "b": [1, 2,'),  # cut short (max_tokens): left as it is
    ('{"a": 1, "b": [1, 2, x]}', '{"a": 1, "b": [1, 2, null]}'),
    ('{"a": 1, oops}', '{"a": 1, "":null}'),
    ('{"a": "\\q"}', '{"a": "\\\\"}'),
    ('{"a": 1} trailing', '{"a": 1} '),
])
def test_a_tool_input_that_stops_being_json_is_ended_where_it_did(arguments: str, streamed: str) -> None:
    renderer = anthropic.StreamRenderer(model="m")
    wire = renderer.render([StreamStart("chatcmpl-1", "m", 0), ToolCallStart(0, "call_1", "f")])
    wire += renderer.render([ToolCallDelta(0, c) for c in arguments] + [Finish(FinishReason.TOOL_CALLS)]) + renderer.close()
    deltas = [p["delta"]["partial_json"] for _, p in sse_frames(wire) if p["type"] == "content_block_delta"]
    assert "".join(deltas) == streamed


def test_an_openai_clients_safety_identifier_is_the_anthropic_user_id() -> None:
    # The newest SDKs send `safety_identifier` in place of the deprecated `user`.
    def sent_metadata(extra: dict[str, Any]) -> Any:
        request = ChatRequest(model="m", messages=[Message("user", (TextPart("hi"),))], dialect="openai", extra=extra)
        return encode(request).get("metadata")

    assert sent_metadata({"safety_identifier": "hash-1"}) == {"user_id": "hash-1"}
    assert sent_metadata({"safety_identifier": "hash-1", "user": "old"}) == {"user_id": "hash-1"}
    assert sent_metadata({"safety_identifier": " ", "user": "old"}) == {"user_id": "old"}
    assert sent_metadata({}) is None


def _claude_event(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()


def _block(index: int, block: dict[str, Any], *deltas: dict[str, Any]) -> list[bytes]:
    return [
        _claude_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}),
        *(_claude_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas),
        _claude_event("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]


@pytest.mark.parametrize("relay", [False, True])
def test_a_redacted_block_between_two_signed_ones_is_kept_and_replayed_as_claude_sent_it(relay: bool) -> None:
    """Claude's thinking signed, redacted, signed again: the answer the journal keeps (its
    offsets, the redacted block's empty) replays to an Anthropic client block for block,
    whole and streamed (a replay gave one thinking block of all the text, signed "")."""
    thinking: dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
    wire = b"".join([
        _claude_event("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x", "usage": {"input_tokens": 3, "output_tokens": 0}}}),
        *_block(0, thinking, {"type": "thinking_delta", "thinking": "First "}, {"type": "thinking_delta", "thinking": "this."},
                {"type": "signature_delta", "signature": "SIG_A"}),
        *_block(1, {"type": "redacted_thinking", "data": "REDACTED"}),
        *_block(2, thinking, {"type": "thinking_delta", "thinking": "Then that."}, {"type": "signature_delta", "signature": "SIG_B"}),
        *_block(3, {"type": "text", "text": ""}, {"type": "text_delta", "text": "Done."}),
        _claude_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}}),
        _claude_event("message_stop", {"type": "message_stop"}),
    ])
    builder = CompletionBuilder()
    for event in anthropic.StreamParser(relay_blocks=relay).feed(wire).events:
        builder.add(event)
    kept = completion_to_json(builder.build(), [])
    assert kept["choices"][0]["signed"] == [[11, "SIG_A"], [11, "redacted_thinking:REDACTED"], [21, "SIG_B"]]
    replayed = completion_from_json(json.loads(json.dumps(kept)))
    blocks = [
        {"type": "thinking", "thinking": "First this.", "signature": "SIG_A"}, {"type": "redacted_thinking", "data": "REDACTED"},
        {"type": "thinking", "thinking": "Then that.", "signature": "SIG_B"}, {"type": "text", "text": "Done."},
    ]
    assert json.loads(anthropic.render_message(replayed, completion_events(replayed)))["content"] == blocks
    renderer = anthropic.StreamRenderer(model="claude-x")
    streamed = renderer.render(completion_events(replayed)) + renderer.close()
    starts = [payload["content_block"] for name, payload in sse_frames(streamed) if name == "content_block_start"]
    assert [block["type"] for block in starts] == ["thinking", "redacted_thinking", "thinking", "text"]
    assert starts[1] == blocks[1]
    signatures = [p["delta"]["signature"] for name, p in sse_frames(streamed) if name == "content_block_delta" and p["delta"]["type"] == "signature_delta"]
    assert signatures == ["SIG_A", "SIG_B"]
