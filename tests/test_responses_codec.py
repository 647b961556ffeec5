"""The Responses API codec, without I/O: requests into the domain, Response objects and streams
out of it. The official SDK's types are the spec: every frame and Response is validated by
them (pydantic, strictly), and every stream is replayed through the SDK's own accumulator,
which checks the order of events, their indexes and the final Response."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent

from proxy.dialects import anthropic, ollama, openai, responses
from proxy.domain.chat import (
    ChatCompletion,
    Choice,
    FinishReason,
    ImagePart,
    Message,
    ResponseFormat,
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
    StreamEvent,
    StreamFailed,
    StreamStart,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
)
from proxy.domain.fingerprint import message_to_canonical, request_fingerprint
from tests.test_fuzz_parsers import json_values
from tests.test_openai_roundtrip import event_streams

EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
RID = "resp_" + "ab" * 16


def parse(**fields: Any) -> responses.ResponsesRequest:
    return responses.parse_responses_request(json.dumps({"model": "m", "input": "hi", **fields}).encode())


def refused(**fields: Any) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        parse(**fields)
    assert info.value.kind is ErrorKind.INVALID_REQUEST
    return info.value


# -- requests ----------------------------------------------------------------------------------------


def test_a_string_input_is_one_user_message_after_the_instructions() -> None:
    chat = parse(instructions="Be brief.", input="Say hello").chat
    assert chat.messages == [
        Message(role="system", content=(TextPart("Be brief."),)),
        Message(role="user", content=(TextPart("Say hello"),)),
    ]
    assert (chat.model, chat.dialect, chat.stream, chat.include_usage) == ("m", "responses", False, None)
    assert chat.extra == {}  # nothing the Response echoes reaches the fingerprint or a backend


def test_an_inline_file_is_listed_back_as_it_was_given() -> None:
    """A response's (or conversation's) `input_file` reads back from the journal's canonical
    request as the item the client sent."""
    part = {"type": "input_file", "file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}
    chat = parse(input=[{"role": "user", "content": [part]}]).chat
    items = responses.input_items([message_to_canonical(m) for m in chat.messages], "resp_1", instructions=None)
    assert items[0]["content"] == [part]
    pydantic.TypeAdapter(ResponseItem).validate_python(items[0])


def test_input_items_become_chat_messages() -> None:
    chat = parse(input=[
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
        ]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_a", "name": "look", "arguments": '{"x":1}', "id": "fc_1"},
        {"type": "function_call", "call_id": "call_b", "name": "zoom", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "a cat"},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "big"}]},
        {"role": "user", "content": "Thanks"},
    ]).chat
    assert chat.messages == [
        Message(role="system", content=(TextPart("Rules."),)),
        Message(role="user", content=(TextPart("What is this?"), ImagePart("data:image/png;base64,AAAA", "low"))),
        # The turn's text and both its calls: one assistant message, as chat backends need it.
        Message(role="assistant", content=(TextPart("Let me look."),), tool_calls=(
            ToolCall("call_a", "look", '{"x":1}'), ToolCall("call_b", "zoom", "{}"),
        )),
        Message(role="tool", content=(TextPart("a cat"),), tool_call_id="call_a"),
        Message(role="tool", content=(TextPart("big"),), tool_call_id="call_b"),
        Message(role="user", content=(TextPart("Thanks"),)),
    ]


def test_a_call_after_a_tool_result_starts_a_new_assistant_message() -> None:
    chat = parse(input=[
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
        {"type": "function_call", "call_id": "c2", "name": "f", "arguments": {"n": 2}},
    ]).chat
    assert [m.role for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert chat.messages[3].tool_calls == (ToolCall("c2", "f", '{"n": 2}'),)


def test_settings_reach_the_domain() -> None:
    chat = parse(
        tools=[{"type": "function", "name": "get", "description": "Get it", "parameters": {"type": "object"}, "strict": True}],
        tool_choice={"type": "function", "name": "get"}, parallel_tool_calls=False, max_output_tokens=50,
        temperature=0.5, top_p=0.9, reasoning={"effort": "high", "summary": "auto"}, stream=True,
        text={"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}},
    ).chat
    assert chat.tools == [Tool("get", "Get it", {"type": "object"}, True)]
    assert chat.tool_choice == ToolChoice(mode="required", name="get")
    assert chat.parallel_tool_calls is False
    params = chat.params
    assert (params.max_tokens, params.temperature, params.top_p, params.reasoning_effort) == (50, 0.5, 0.9, "high")
    assert params.response_format == ResponseFormat(kind="json_schema", schema={"type": "object"}, name="out", strict=True)
    assert chat.stream and chat.include_usage


def test_no_built_in_tool_calls_is_a_limit_like_any_other() -> None:
    """`max_tool_calls: 0` (no built-in tool calls: there are none here) is echoed, not refused."""
    assert parse(max_tool_calls=0).settings["max_tool_calls"] == 0


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", ToolChoice("auto")), ("none", ToolChoice("none")), ("required", ToolChoice("required")),
])
def test_tool_choice_modes(choice: str, expected: ToolChoice) -> None:
    tools = [{"type": "function", "name": "get"}]
    assert parse(tools=tools, tool_choice=choice).chat.tool_choice == expected


@pytest.mark.parametrize(("fmt", "expected"), [
    ({"type": "text"}, ResponseFormat(kind="text")),
    ({"type": "json_object"}, ResponseFormat(kind="json_object")),
])
def test_text_formats(fmt: dict[str, Any], expected: ResponseFormat) -> None:
    parsed = parse(text={"format": fmt})
    assert parsed.chat.params.response_format == expected
    assert parsed.settings["text"]["format"] == fmt


def test_the_settings_the_response_echoes() -> None:
    settings = parse(
        instructions="x", metadata={"k": "v"}, user="u1", truncation="auto", service_tier="flex", store=True,
        include=["reasoning.encrypted_content"], prompt_cache_key="ignored", max_output_tokens=9,
        tools=[{"type": "function", "name": "f"}],
    ).settings
    assert settings["instructions"] == "x" and settings["metadata"] == {"k": "v"} and settings["user"] == "u1"
    assert settings["truncation"] == "auto" and settings["service_tier"] == "flex"
    assert settings["parallel_tool_calls"] is True and settings["tool_choice"] == "auto"
    assert settings["max_output_tokens"] == 9 and settings["text"] == {"format": {"type": "text"}}
    assert settings["tools"] == [{"type": "function", "name": "f", "description": None, "parameters": None, "strict": None}]
    assert parse().settings["reasoning"] is None
    # Unset, they echo as OpenAI's Responses do: its defaults, not null.
    assert {name: parse().settings[name] for name in ("temperature", "top_p", "metadata")} == {
        "temperature": 1.0, "top_p": 1.0, "metadata": {},
    }


@pytest.mark.parametrize(("fields", "param"), [
    ({"model": None}, "model"),
    ({"model": ""}, "model"),
    ({"input": None}, "input"),
    ({"input": []}, "input"),
    ({"input": 3}, "input"),
    ({"input": ["hi"]}, "input[0]"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user"}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0].image_url"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]}, "input[0].content[0].file_id"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]}, "input[0].name"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": 1}]}, "input[0].arguments"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ({"input": [{"type": "item_reference"}]}, "input[0].id"),
    ({"input": [{"type": "item_reference", "id": ""}]}, "input[0].id"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"instructions": 7}, "instructions"),
    ({"tools": {}}, "tools"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].name"),
    ({"tools": [{"type": "function", "name": "f", "parameters": []}]}, "tools[0].parameters"),
    ({"tool_choice": "any"}, "tool_choice"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"tool_choice": {"type": "function"}}, "tool_choice.name"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": "9"}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": -1}, "top_p"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"text": "json"}, "text"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema"),
    ({"text": {"verbosity": "loud"}}, "text.verbosity"),
    ({"reasoning": {"effort": 1}}, "reasoning.effort"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"metadata": {"k": "a\x00b"}}, "metadata"),
    ({"truncation": "middle"}, "truncation"),
    ({"include": [1]}, "include"),
    ({"stream": "yes"}, "stream"),
    ({"store": "no"}, "store"),
    ({"user": 5}, "user"),
    ({"safety_identifier": 5}, "safety_identifier"),
    ({"prompt_cache_key": 5}, "prompt_cache_key"),
    ({"prompt_cache_retention": "1h"}, "prompt_cache_retention"),
    ({"max_tool_calls": -1}, "max_tool_calls"),
])
def test_bad_input_is_a_400_naming_the_field(fields: dict[str, Any], param: str) -> None:
    error = refused(**fields)
    assert error.param == param, error.message
    assert f"`{param}" in error.message or param.split(".")[0] in error.message


def test_item_references_typed_or_not_are_looked_up_then_parsed_as_the_items_they_name() -> None:
    """`type` is optional on an item reference (OpenAI's `ItemReference`): an item with an id
    and neither a type nor a role is one."""
    body = json.dumps({"model": "m", "input": [
        {"type": "item_reference", "id": "msg_a_in0"}, {"id": "msg_a_0"}, {"role": "user", "content": "and?", "id": "x"},
    ]}).encode()
    with pytest.raises(responses.UnresolvedReferences) as info:
        responses.parse_responses_request(body)
    assert info.value.references == [("input[0]", "msg_a_in0"), ("input[1]", "msg_a_0")]
    parsed = responses.parse_responses_request(body, {
        "msg_a_in0": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        "msg_a_0": {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
    })
    assert [(m.role, m.content) for m in parsed.chat.messages] == [
        ("user", (TextPart("Hi"),)), ("assistant", (TextPart("Hello"),)), ("user", (TextPart("and?"),)),
    ]


def test_a_body_that_is_not_a_json_object_is_a_400() -> None:
    for body in (b"[]", b"{", b""):
        with pytest.raises(GatewayError) as info:
            responses.parse_responses_request(body)
        assert info.value.kind is ErrorKind.INVALID_REQUEST


def test_a_stored_prompt_is_refused_with_what_to_do_instead() -> None:
    error = refused(prompt={"id": "pmpt_1"})
    assert error.param == "prompt"
    assert "send the prompt's text in `instructions` and `input`" in error.message


def test_a_conversation_is_named_by_its_id_or_an_object_holding_it() -> None:
    for value in ("conv_1", {"id": "conv_1"}):
        parsed = parse(conversation=value, input="Hi")
        assert parsed.conversation == "conv_1" and parsed.settings["conversation"] == {"id": "conv_1"}
    assert "conversation" not in parse(input="Hi").settings
    for value, param in ((5, "conversation"), ({"id": 5}, "conversation.id"), ("", "conversation")):
        assert refused(conversation=value).param == param
    # Either continues a conversation: not both, as on OpenAI.
    assert refused(conversation="conv_1", previous_response_id="resp_1").param == "conversation"


def test_a_conversations_items_go_after_the_instructions_and_before_the_input() -> None:
    parsed = parse(conversation="conv_1", instructions="Be brief.", input="And?")
    items = responses.conversations.kept_items(
        [{"role": "user", "content": "Hi"}, {"type": "reasoning", "summary": []}, {"role": "assistant", "content": "Hello"}],
        "items", "abc",
    )
    assert [item["id"] for item in items] == ["msg_abc_in0", "msg_abc_in1"]
    responses.in_conversation(parsed, responses.conversations.prefix_messages(items))
    assert [(m.role, m.content[0].text) for m in parsed.chat.messages] == [  # type: ignore[union-attr]
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "And?"),
    ]
    # How many came from the conversation is kept, and never echoed.
    assert parsed.settings[responses.CONVERSATION_PREFIX] == 2
    body = responses.response_object(
        response="resp_1", created_at=0, model="m", settings=parsed.settings, status="completed", output=[],
    )
    assert responses.CONVERSATION_PREFIX not in body and body["conversation"] == {"id": "conv_1"}


def test_background_needs_store() -> None:
    error = refused(background=True, store=False)
    assert error.param == "store" and "`background: true`" in error.message
    assert parse(background=True, stream=True).background
    assert parse(background=True).background and parse(background=True, store=True).background
    assert not parse(background=False).background


def test_built_in_tools_are_refused_saying_only_function_tools_are_served() -> None:
    for kind in ("web_search", "file_search", "computer_use_preview", "code_interpreter", "mcp"):
        error = refused(tools=[{"type": kind}])
        assert "function tools only" in error.message and error.param == "tools[0].type"


def test_stateless_defaults_are_accepted() -> None:
    parse(background=False, previous_response_id=None, store=False, conversation=None)


def test_a_continued_response_has_the_conversation_it_continues_after_its_own_instructions() -> None:
    parsed = parse(previous_response_id="resp_1", instructions="Be brief.", input="And?")
    assert parsed.previous == "resp_1" and parsed.settings["previous_response_id"] == "resp_1"
    prior = [Message(role="user", content=(TextPart("Hi"),))]
    answer = ChatCompletion(id="c", model="m", created=0, choices=[Choice(index=0, content="Hello.")])
    responses.continued(parsed, prior, answer)
    assert [(m.role, m.text) for m in parsed.chat.messages] == [
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "And?"),
    ]
    assert refused(previous_response_id="").param == "previous_response_id"


# -- whole responses ---------------------------------------------------------------------------------


def completion(**choice: Any) -> ChatCompletion:
    return ChatCompletion(
        id="chatcmpl-1", model="upstream", created=1, choices=[Choice(**choice)],
        usage=Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=4, reasoning_tokens=2),
    )


def render(done: ChatCompletion, **fields: Any) -> dict[str, Any]:
    body = responses.render_response(
        done, response=RID, model="client-name", settings=parse(**fields).settings, created_at=100, completed_at=101
    )
    data: dict[str, Any] = json.loads(body)
    Response.model_validate(data, strict=False)
    # Every field the SDK's type requires is on the wire (the SDK itself never validates).
    required = {name for name, info in Response.model_fields.items() if info.is_required()}
    assert required <= data.keys(), required - data.keys()
    return data


def test_a_response_holds_reasoning_message_and_calls_in_order() -> None:
    data = render(completion(
        content="Sure.", reasoning="Think.", finish_reason=FinishReason.TOOL_CALLS,
        tool_calls=[ToolCall("call_1", "f", '{"a":1}'), ToolCall("call_2", "g", "{}")],
    ))
    assert (data["id"], data["object"], data["status"], data["model"]) == (RID, "response", "completed", "client-name")
    assert (data["created_at"], data["completed_at"], data["incomplete_details"], data["error"]) == (100, 101, None, None)
    key = RID.removeprefix("resp_")
    assert data["output"] == [
        {"id": f"rs_{key}_0", "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Think."}],
         "status": "completed"},
        {"id": f"msg_{key}_1", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Sure.", "annotations": [], "logprobs": []}]},
        {"id": f"fc_{key}_2", "type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"a":1}', "status": "completed"},
        {"id": f"fc_{key}_3", "type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}", "status": "completed"},
    ]
    assert data["usage"] == {
        "input_tokens": 10, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 15,
    }


def test_calls_alone_have_no_message_and_an_empty_answer_has_an_empty_one() -> None:
    calls = render(completion(tool_calls=[ToolCall("c", "f", "{}")], finish_reason=FinishReason.TOOL_CALLS))
    assert [item["type"] for item in calls["output"]] == ["function_call"]
    empty = render(completion(finish_reason=FinishReason.STOP))
    assert [(i["type"], i["content"][0]["text"]) for i in empty["output"]] == [("message", "")]


@pytest.mark.parametrize(("reason", "why"), [(FinishReason.LENGTH, "max_output_tokens"), (FinishReason.CONTENT_FILTER, "content_filter")])
def test_a_cut_answer_is_an_incomplete_response(reason: FinishReason, why: str) -> None:
    data = render(completion(content="Partial", finish_reason=reason))
    assert data["status"] == "incomplete" and data["incomplete_details"] == {"reason": why}
    assert data["completed_at"] is None and data["output"][0]["status"] == "incomplete"


def test_the_response_echoes_the_request_settings() -> None:
    data = render(completion(content="x", finish_reason=FinishReason.STOP),
                  instructions="sys", temperature=0.2, metadata={"a": "b"}, tool_choice="none", parallel_tool_calls=False,
                  text={"format": {"type": "json_object"}}, reasoning={"effort": "low"})
    assert (data["instructions"], data["temperature"], data["metadata"]) == ("sys", 0.2, {"a": "b"})
    assert (data["tool_choice"], data["parallel_tool_calls"], data["text"]) == ("none", False, {"format": {"type": "json_object"}})
    assert data["reasoning"] == {"effort": "low", "summary": None}


# -- streams -----------------------------------------------------------------------------------------


def frames(wire: bytes) -> list[dict[str, Any]]:
    """The payloads, checking the framing (`event:` naming the payload's type, no `[DONE]`)."""
    out = []
    assert wire.endswith(b"\n\n")
    for block in wire[:-2].split(b"\n\n"):
        if block.startswith(b":"):
            continue
        name, data = block.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        payload = json.loads(data[6:])
        assert payload["type"] == name[7:].decode()
        out.append(payload)
    return out


def replay(wire: bytes) -> tuple[list[dict[str, Any]], Any]:
    """Validate every frame with the SDK's types and feed it to the SDK's accumulator; the
    frames, and the SDK's final Response (None unless the stream completed)."""
    payloads = frames(wire)
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for payload in payloads:
        event = EVENT.validate_python(payload)
        state.handle_event(event)
    assert_items_nest(payloads)
    return payloads, state._completed_response


def assert_items_nest(payloads: list[dict[str, Any]]) -> None:
    """Every item is added once, gets its events while open, and is done before the end
    (unless the stream failed); output indexes count from 0."""
    open_items: set[int] = set()
    closed: list[int] = []
    for payload in payloads[2:-1]:
        index = payload["output_index"]
        if payload["type"] == "response.output_item.added":
            assert index == len(open_items) + len(closed) and index not in closed
            open_items.add(index)
        else:
            assert index in open_items, payload
            if payload["type"] == "response.output_item.done":
                open_items.remove(index)
                closed.append(index)
    assert payloads[-1]["type"] == "response.failed" or not open_items


def stream(events: list[StreamEvent], *, batches: int = 1, **fields: Any) -> bytes:
    renderer = responses.StreamRenderer(response=RID, model="client-name", settings=parse(**fields).settings, clock=lambda: 50.0)
    size = max(1, len(events) // batches)
    wire = [renderer.render(events[i : i + size]) for i in range(0, len(events), size)]
    wire.append(renderer.close())
    assert renderer.close() == b""  # once
    return b"".join(wire)


START = StreamStart(id="chatcmpl-1", model="upstream", created=1)
USAGE = UsageReport(Usage(prompt_tokens=7, completion_tokens=3, reasoning_tokens=1))


def test_a_text_stream_in_the_order_the_sdk_expects() -> None:
    wire = stream([START, TextDelta("Hel"), TextDelta("lo"), Finish(FinishReason.STOP), USAGE], batches=3)
    payloads, final = replay(wire)
    assert [p["type"] for p in payloads] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    assert payloads[0]["response"]["status"] == "in_progress" and payloads[0]["response"]["output"] == []
    assert [p["delta"] for p in payloads if p["type"].endswith(".delta")] == ["Hel", "lo"]
    assert payloads[6]["text"] == "Hello"
    assert final.output_text == "Hello" and final.status == "completed" and final.model == "client-name"
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.total_tokens) == (7, 3, 10)
    assert final.usage.output_tokens_details.reasoning_tokens == 1
    assert final.id == RID and final.created_at == 50 and final.completed_at == 50


def test_reasoning_streams_as_its_own_item_before_the_message() -> None:
    wire = stream([START, ReasoningDelta("Hm"), ReasoningDelta("m."), TextDelta("Yes"), Finish(FinishReason.STOP)])
    payloads, final = replay(wire)
    kinds = [p["type"] for p in payloads]
    assert kinds[2:9] == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
    ]
    assert payloads[2]["item"]["type"] == "reasoning" and payloads[3]["part"]["type"] == "reasoning_text"
    assert payloads[6]["text"] == "Hmm."
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == "Hmm." and final.output_text == "Yes"
    assert final.usage is None  # the backend gave none


def test_reasoning_asked_as_a_summary_streams_as_the_summary() -> None:
    wire = stream(
        [START, ReasoningDelta("Hm"), ReasoningDelta("m."), TextDelta("Yes"), Finish(FinishReason.STOP)], batches=3,
        reasoning={"summary": "detailed"},
    )
    payloads, final = replay(wire)
    assert_items_nest(payloads)
    assert [p["type"] for p in payloads][2:9] == [
        "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done", "response.output_item.done",
    ]
    assert payloads[3]["part"] == {"type": "summary_text", "text": ""} and payloads[6]["text"] == "Hmm."
    assert final.output[0].type == "reasoning" and final.output[0].summary[0].text == "Hmm."
    assert final.output_text == "Yes"


def test_parallel_calls_with_interleaved_arguments() -> None:
    events: list[StreamEvent] = [
        START, TextDelta("Checking."),
        ToolCallStart(0, "call_a", "weather"), ToolCallDelta(0, '{"city":'),
        ToolCallStart(1, "call_b", "time"), ToolCallDelta(1, '{"tz":"UTC"}'), ToolCallDelta(0, '"Paris"}'),
        Finish(FinishReason.TOOL_CALLS), USAGE,
    ]
    payloads, final = replay(stream(events, batches=4))
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments, c.status) for c in calls] == [
        ("call_a", "weather", '{"city":"Paris"}', "completed"), ("call_b", "time", '{"tz":"UTC"}', "completed"),
    ]
    assert final.output[0].type == "message" and final.output_text == "Checking."
    done = [p for p in payloads if p["type"] == "response.function_call_arguments.done"]
    assert [(p["output_index"], p["arguments"], p["name"]) for p in done] == [
        (1, '{"city":"Paris"}', "weather"), (2, '{"tz":"UTC"}', "time"),
    ]
    # The message closed when the first call opened: no item overlaps a message.
    kinds = [p["type"] for p in payloads]
    assert kinds.index("response.content_part.done") < kinds.index("response.function_call_arguments.delta")


def test_a_length_finish_ends_with_response_incomplete() -> None:
    payloads, final = replay(stream([START, TextDelta("cut"), Finish(FinishReason.LENGTH), USAGE]))
    assert final is None  # the SDK completes only on response.completed
    last = payloads[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["status"] == "incomplete" and last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["content"][0]["text"] == "cut" and last["response"]["usage"]["output_tokens"] == 3
    Response.model_validate(last["response"])


def test_a_failure_mid_stream_is_response_failed_and_the_end() -> None:
    error = GatewayError(ErrorKind.BACKEND, "engine died")
    renderer = responses.StreamRenderer(response=RID, model="m", settings=parse().settings)
    wire = renderer.render([START, TextDelta("par"), StreamFailed(error), TextDelta("ignored")])
    assert renderer.done and renderer.close() == b""
    payloads, final = replay(wire)
    assert final is None
    last = payloads[-1]
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert last["response"]["error"] == {"code": "server_error", "message": "engine died"}
    # What was said is in the failed Response, cut short.
    assert last["response"]["output"][0]["content"][0]["text"] == "par"
    assert last["response"]["output"][0]["status"] == "incomplete"
    assert "ignored" not in wire.decode()


def test_a_rate_limit_mid_stream_keeps_its_code() -> None:
    renderer = responses.StreamRenderer(response=RID, model="m", settings=parse().settings)
    wire = renderer.render([START, StreamFailed(GatewayError(ErrorKind.RATE_LIMITED, "slow down"))])
    payloads, _ = replay(wire)
    assert [p["type"] for p in payloads] == ["response.created", "response.in_progress", "response.failed"]
    assert payloads[-1]["response"]["error"]["code"] == "rate_limit_exceeded"


def test_an_empty_answer_is_one_empty_message() -> None:
    _payloads, final = replay(stream([START, Finish(FinishReason.STOP)]))
    assert [item.type for item in final.output] == ["message"] and final.output_text == ""
    _payloads, thought = replay(stream([START, ReasoningDelta("hm"), Finish(FinishReason.STOP)]))
    whole = render(completion(reasoning="hm", finish_reason=FinishReason.STOP))
    # Streamed or whole, the same items.
    assert [item.type for item in thought.output] == [item["type"] for item in whole["output"]] == ["reasoning", "message"]


def test_other_choices_and_empty_deltas_are_left_out() -> None:
    events: list[StreamEvent] = [
        START, TextDelta(""), TextDelta("zero"), TextDelta("one", choice=1), ToolCallStart(0, "c", "f", choice=1),
        ReasoningDelta("", 0), Finish(FinishReason.STOP), Finish(FinishReason.STOP, choice=1),
    ]
    _payloads, final = replay(stream(events))
    assert final.output_text == "zero" and len(final.output) == 1


def test_keepalive_is_a_comment_the_sdk_skips() -> None:
    assert responses.StreamRenderer.keepalive == openai.KEEPALIVE and openai.KEEPALIVE.startswith(b":")


def test_delta_frames_are_the_same_json_as_the_sdk_type() -> None:
    wire = stream([START, TextDelta('quote " and \n newline'), ToolCallStart(0, "c", "f"), ToolCallDelta(0, "{}"),
                   Finish(FinishReason.TOOL_CALLS)])
    payloads, _final = replay(wire)
    text = next(p for p in payloads if p["type"] == "response.output_text.delta")
    assert text["delta"] == 'quote " and \n newline' and text["logprobs"] == [] and text["content_index"] == 0
    args = next(p for p in payloads if p["type"] == "response.function_call_arguments.delta")
    assert set(args) == {"type", "item_id", "output_index", "delta", "sequence_number"}


@settings(max_examples=150, deadline=None)
@given(event_streams(max_choices=1))
def test_any_event_stream_is_a_stream_the_sdk_accepts(events: list[StreamEvent]) -> None:
    """Rendered in any batches, every valid domain stream passes the SDK's accumulator, and
    the final Response holds what the events said (choice 0: reasoning, text, calls)."""
    wire = stream(events, batches=3)
    payloads, final = replay(wire)
    built = CompletionBuilder()
    for event in events:
        built.add(event)
    expected = built.build().choices[0]
    failed = any(isinstance(event, StreamFailed) for event in events)
    if failed:
        assert payloads[-1]["type"] == "response.failed" and final is None
        return
    finish = expected.finish_reason
    if finish in (FinishReason.LENGTH, FinishReason.CONTENT_FILTER):
        assert payloads[-1]["type"] == "response.incomplete"
        Response.model_validate(payloads[-1]["response"])
        return
    assert payloads[-1]["type"] == "response.completed"
    assert final.output_text == expected.content
    reasoning = "".join(c.text for item in final.output if item.type == "reasoning" for c in item.content or [])
    assert reasoning == expected.reasoning
    calls = [(i.call_id, i.name, i.arguments) for i in final.output if i.type == "function_call"]
    assert calls == [(c.id, c.name, c.arguments) for c in expected.tool_calls]


# -- fuzzing the parser ------------------------------------------------------------------------------

def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid values 19 times in 20, any JSON value otherwise."""
    return st.sampled_from(range(20)).flatmap(lambda i: json_values if i == 7 else valid)


_texts = st.text(max_size=12)
_parts = st.fixed_dictionaries(
    {"type": _mostly(st.sampled_from(["input_text", "output_text", "input_image", "refusal", "input_file"]))},
    optional={"text": _mostly(_texts), "image_url": _mostly(_texts), "detail": _mostly(_texts),
              "refusal": _mostly(_texts), "file_id": json_values},
)
_items = st.one_of(
    st.fixed_dictionaries(
        {"role": _mostly(st.sampled_from(["user", "system", "developer", "assistant", "tool"])),
         "content": _mostly(_texts | st.lists(_parts, max_size=3))},
        optional={"type": _mostly(st.just("message"))},
    ),
    st.fixed_dictionaries({
        "type": st.just("function_call"), "call_id": _mostly(st.text(min_size=1, max_size=6)),
        "name": _mostly(st.text(min_size=1, max_size=6)), "arguments": _mostly(st.just('{"a":1}') | _texts),
    }),
    st.fixed_dictionaries({
        "type": st.just("function_call_output"), "call_id": _mostly(st.text(min_size=1, max_size=6)),
        "output": _mostly(_texts | st.lists(_parts, max_size=2)),
    }),
    st.fixed_dictionaries({"type": _mostly(st.sampled_from(["reasoning", "item_reference", "web_search_call"]))}),
)
_tools = st.fixed_dictionaries(
    {"type": _mostly(st.just("function")), "name": _mostly(st.text(min_size=1, max_size=8))},
    optional={"parameters": _mostly(st.just({"type": "object"})), "description": _mostly(_texts),
              "strict": _mostly(st.booleans())},
)
_near_valid = st.fixed_dictionaries(
    {"model": _mostly(st.text(min_size=1, max_size=20)), "input": _mostly(_texts | st.lists(_items, min_size=1, max_size=4))},
    optional={
        "instructions": _mostly(_texts), "tools": _mostly(st.lists(_tools, max_size=2)),
        "tool_choice": _mostly(st.sampled_from(["auto", "none", "required"]) | st.builds(
            lambda name: {"type": "function", "name": name}, st.text(max_size=6))),
        "parallel_tool_calls": _mostly(st.booleans()), "max_output_tokens": _mostly(st.integers(0, 10**6)),
        "temperature": _mostly(st.floats(0, 2)), "top_p": _mostly(st.floats(0, 1)), "stream": _mostly(st.booleans()),
        "store": _mostly(st.booleans()), "metadata": _mostly(st.dictionaries(_texts, _texts, max_size=3)),
        "user": _mostly(_texts), "truncation": _mostly(st.sampled_from(["auto", "disabled"])),
        "include": _mostly(st.lists(_texts, max_size=2)), "service_tier": _mostly(_texts),
        "background": _mostly(st.just(False)), "previous_response_id": _mostly(st.none()),
        "text": _mostly(st.fixed_dictionaries({}, optional={
            "format": _mostly(st.sampled_from([{"type": "text"}, {"type": "json_object"},
                                               {"type": "json_schema", "name": "n", "schema": {}}])),
            "verbosity": _mostly(st.sampled_from(["low", "medium", "high"])),
        })),
        "reasoning": _mostly(st.fixed_dictionaries({}, optional={
            "effort": _mostly(st.sampled_from(["low", "medium", "high"])), "summary": _mostly(st.just("auto")),
        })),
    },
)


def check(body: bytes) -> None:
    """The parser's contract: a request every backend's encoder and the fingerprint can take
    (or refuse with a 4xx, as Ollama's does an image by URL), or a 4xx of its own."""
    try:
        parsed = responses.parse_responses_request(body)
    except GatewayError as error:
        assert 400 <= error.status < 500 and error.message, error
        return
    except responses.UnresolvedReferences:
        return  # its caller looks the items up, and parses it again with them
    json.dumps(parsed.settings)  # what the Response echoes is JSON
    request = parsed.chat
    request_fingerprint(request, "upstream")
    encoders = (
        lambda: openai.encode_chat_request(request, "upstream", stream=request.stream, include_usage=True),
        lambda: ollama.encode_request(request, "upstream", stream=request.stream),
        lambda: anthropic.encode_messages_request(request, "upstream", stream=request.stream, default_max_tokens=1024),
    )
    for encode in encoders:
        try:
            encode()
        except GatewayError as error:
            assert 400 <= error.status < 500, error


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_near_valid)
# An image by URL: Ollama's encoder refuses it with a 400 (Ollama takes inline images only).
@example(value={"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/a.png"}]}]})
def test_near_valid_bodies_are_a_request_every_encoder_takes_or_a_4xx(value: dict[str, Any]) -> None:
    check(json.dumps(value).encode())


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_body_is_a_request_or_a_4xx(body: bytes) -> None:
    check(body)


def test_a_custom_tool_is_refused_as_the_clients_own_not_a_built_in_one() -> None:
    custom = refused(tools=[{"type": "custom", "name": "apply_patch", "format": {"type": "text"}}])
    assert custom.param == "tools[0].type" and "custom tool, whose input is free text" in custom.message
    assert "built-in" not in custom.message
    built_in = refused(tools=[{"type": "web_search"}])
    assert "built-in tools" in built_in.message and "function tools only" in built_in.message


def test_each_thinking_block_claude_signed_is_an_item_of_its_own_and_goes_back_signed() -> None:
    """Interleaved thinking: two blocks, each signed for its own text. As one item (their text
    joined, the last signature) Claude would refuse the turn given back; kept in the journal
    (`completion_to_json`), each still goes back with its own signature."""
    from proxy.infra.chat_store import completion_from_json, completion_to_json

    builder = CompletionBuilder()
    for event in (
        StreamStart(id="msg_1", model="claude", created=1), ReasoningDelta("Check "),
        anthropic.SignedReasoningDelta("the city.", 0, "sig-1"), anthropic.SignedReasoningDelta("Then call.", 0, "sig-2"),
        ToolCallStart(0, "toolu_1", "get_weather"), ToolCallDelta(0, "{}"), Finish(FinishReason.TOOL_CALLS),
    ):
        builder.add(event)
    completion = completion_from_json(completion_to_json(builder.build()))
    items = responses.output_of(completion, "resp_1", "completed")
    signed = [responses._signed.signed_thinking(item.get("encrypted_content")) for item in items if item["type"] == "reasoning"]
    assert signed == [("Check the city.", "sig-1"), ("Then call.", "sig-2")]
    parsed = responses.parse_responses_request(json.dumps({"model": "m", "input": "And?"}).encode())
    responses.continued(parsed, [], completion)
    turn = parsed.chat.messages[0]
    assert [part.data for part in turn.content if hasattr(part, "data")] == [
        {"type": "thinking", "thinking": "Check the city.", "signature": "sig-1"},
        {"type": "thinking", "thinking": "Then call.", "signature": "sig-2"},
    ]


def test_signatures_that_no_longer_fit_the_kept_reasoning_are_dropped() -> None:
    """A stored answer whose reasoning was cut (or altered) after it was signed goes back to
    Claude unsigned (thinking off) rather than signed wrongly (a 400 for the client)."""
    from proxy.infra.chat_store import completion_from_json

    stored = {"id": "x", "model": "m", "created": 1, "choices": [
        {"index": 0, "content": "", "reasoning": "Check", "tool_calls": [], "finish_reason": "stop", "signed": [[15, "sig-1"]]},
    ]}
    assert completion_from_json(stored).choices[0].signed == ()
    stored["choices"][0]["signed"] = [[5, "sig-1"]]  # type: ignore[index]
    assert completion_from_json(stored).choices[0].signed == (("Check", "sig-1"),)
