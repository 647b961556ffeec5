"""The Ollama codec without I/O: requests both ways, NDJSON streams both ways, completions, errors."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.dialects import ollama
from proxy.domain.chat import (
    ChatCompletion,
    ChatRequest,
    Choice,
    FinishReason,
    GenerationParams,
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
    completion_events,
)

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAghs7GQAAAABJRU5ErkJggg=="
JPEG = "/9j/4AAQSkZJRgABAQ=="


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def fail_of(call: Any, *args: Any, **kwargs: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        call(*args, **kwargs)
    return caught.value


# -- ingress: /api/chat ------------------------------------------------------------------------


def test_chat_request_maps_messages_options_and_extras() -> None:
    request = ollama.parse_chat_request(
        body(
            model="llama3.2",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is this?", "images": [PNG, JPEG]},
                {"role": "assistant", "content": "", "thinking": "hmm"},
            ],
            options={"temperature": 0.2, "top_p": 0.9, "top_k": 40, "num_predict": 128, "stop": ["\n\n"],
                     "seed": 7, "presence_penalty": 0.5, "frequency_penalty": 0.25, "num_ctx": 8192, "min_p": 0.05},
            format="json",
            keep_alive="5m",
            think=True,
        )
    )
    assert request.model == "llama3.2" and request.stream is True and request.dialect == "ollama"
    system, user, assistant = request.messages
    assert system == Message(role="system", content=(TextPart("Be brief."),))
    assert user.content == (
        TextPart("What is this?"),
        ImagePart(f"data:image/png;base64,{PNG}"),
        ImagePart(f"data:image/jpeg;base64,{JPEG}"),
    )
    assert assistant.reasoning == "hmm" and assistant.content == ()
    assert request.params == GenerationParams(
        max_tokens=128, temperature=0.2, top_p=0.9, top_k=40, stop=("\n\n",), seed=7,
        presence_penalty=0.5, frequency_penalty=0.25, response_format=ResponseFormat(kind="json_object"),
    )
    assert request.extra["keep_alive"] == "5m" and request.extra["think"] is True
    assert ollama.unmodelled_options(request) == {"num_ctx": 8192, "min_p": 0.05}


@pytest.mark.parametrize("num_predict", [-1, -2, 0])
def test_unlimited_num_predict_is_no_limit_but_reaches_ollama_backends(num_predict: int) -> None:
    request = ollama.parse_chat_request(
        body(model="m", messages=[{"role": "user", "content": "x"}], options={"num_predict": num_predict})
    )
    assert request.params.max_tokens is None
    assert ollama.unmodelled_options(request) == {"num_predict": num_predict}


def test_stream_false_and_schema_format() -> None:
    schema = {"title": "Answer", "type": "object", "properties": {"n": {"type": "integer"}}}
    request = ollama.parse_chat_request(
        body(model="m", stream=False, messages=[{"role": "user", "content": "x"}], format=schema)
    )
    assert request.stream is False
    assert request.params.response_format == ResponseFormat(kind="json_schema", schema=schema, name="Answer")


def test_tool_messages_are_paired_with_the_calls_they_answer() -> None:
    request = ollama.parse_chat_request(
        body(
            model="m",
            messages=[
                {"role": "user", "content": "Weather in Paris and Rome, and the time?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
                    {"function": {"name": "time", "arguments": {}}},
                    {"function": {"name": "weather", "arguments": {"city": "Rome"}}},
                ]},
                {"role": "tool", "tool_name": "weather", "content": "sunny"},
                {"role": "tool", "tool_name": "weather", "content": "rainy"},
                {"role": "tool", "content": "noon"},
                {"role": "user", "content": "thanks"},
            ],
            tools=[{"type": "function", "function": {"name": "weather", "description": "d",
                                                     "parameters": {"type": "object"}}}],
        )
    )
    calls = request.messages[1].tool_calls
    assert [c.name for c in calls] == ["weather", "time", "weather"]
    assert [json.loads(c.arguments) for c in calls] == [{"city": "Paris"}, {}, {"city": "Rome"}]
    assert len({c.id for c in calls}) == 3
    answers = [(m.tool_call_id, m.name, m.text) for m in request.messages[2:5]]
    assert answers == [(calls[0].id, "weather", "sunny"), (calls[2].id, "weather", "rainy"), (calls[1].id, "time", "noon")]
    assert request.tools == [Tool(name="weather", description="d", parameters={"type": "object"})]


def test_tool_call_ids_from_the_client_are_kept() -> None:
    request = ollama.parse_chat_request(
        body(model="m", messages=[
            {"role": "assistant", "tool_calls": [{"id": "call_a", "function": {"name": "f", "arguments": {}}},
                                                 {"id": "call_b", "function": {"name": "f", "arguments": {}}}]},
            {"role": "tool", "tool_call_id": "call_b", "content": "B"},
            {"role": "tool", "tool_name": "f", "content": "A"},
        ])
    )
    assert [(m.tool_call_id, m.text) for m in request.messages[1:]] == [("call_b", "B"), ("call_a", "A")]


def test_chat_without_messages_is_a_load_request() -> None:
    assert ollama.parse_chat_request(body(model="m")).messages == []
    reply = json.loads(ollama.load_reply("m", generate=False, unload=False))
    assert reply["done"] is True and reply["done_reason"] == "load" and reply["message"]["content"] == ""
    assert json.loads(ollama.load_reply("m", generate=True, unload=True))["done_reason"] == "unload"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        (b"{nope", None),
        (b"[1]", None),
        (body(messages=[]), "model"),
        (body(model=""), "model"),
        (body(model="m", messages={}), "messages"),
        (body(model="m", messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
        (body(model="m", messages=[{"role": "user", "content": ["x"]}]), "messages[0].content"),
        (body(model="m", messages=[{"role": "user", "content": "x", "images": [3]}]), "messages[0].images"),
        (body(model="m", messages=[{"role": "assistant", "tool_calls": [{"function": {}}]}]),
         "messages[0].tool_calls[0].function.name"),
        (body(model="m", messages=[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}]),
         "messages[0].tool_calls[0].function.arguments"),
        (body(model="m", options={"temperature": "hot"}), "options.temperature"),
        (body(model="m", options={"num_predict": 1.5}), "options.num_predict"),
        (body(model="m", options={"stop": [1]}), "options.stop"),
        (body(model="m", options=[]), "options"),
        (body(model="m", format="yaml"), "format"),
        (body(model="m", tools=[{"type": "retrieval"}]), "tools[0].type"),
        (body(model="m", think="very"), "think"),
        (body(model="m", keep_alive=[1]), "keep_alive"),
        (body(model="m", stream="yes"), "stream"),
    ],
)
def test_bad_chat_requests_are_400s_naming_the_field(payload: bytes, param: str | None) -> None:
    error = fail_of(ollama.parse_chat_request, payload)
    assert error.kind is ErrorKind.INVALID_REQUEST
    assert error.param == param
    if param is not None:
        assert param in error.message
    assert json.loads(ollama.render_error(error)) == {"error": error.message}


# -- ingress: /api/generate --------------------------------------------------------------------


def test_generate_request_becomes_system_and_user_messages() -> None:
    request = ollama.parse_generate_request(
        body(model="m", prompt="Describe", system="Be terse", images=[PNG], suffix="}", raw=True,
             options={"num_predict": 5}, stream=False, context=[1, 2])
    )
    assert request.messages == [
        Message(role="system", content=(TextPart("Be terse"),)),
        Message(role="user", content=(TextPart("Describe"), ImagePart(f"data:image/png;base64,{PNG}"))),
    ]
    assert ollama.is_generate(request) and request.stream is False and request.params.max_tokens == 5
    assert ollama.generate_only_fields(request) == ["suffix", "raw", "context"]
    assert not ollama.is_generate(ollama.parse_chat_request(body(model="m")))


def test_generate_with_empty_prompt_is_a_load_request() -> None:
    assert ollama.parse_generate_request(body(model="m", prompt="")).messages == []
    assert ollama.parse_generate_request(body(model="m")).messages == []


@pytest.mark.parametrize(
    ("payload", "param"),
    [(body(model="m", prompt=3), "prompt"), (body(model="m", context=["a"]), "context"),
     (body(model="m", raw="yes"), "raw"), (body(model="m", suffix=1), "suffix")],
)
def test_bad_generate_requests_are_400s(payload: bytes, param: str) -> None:
    assert fail_of(ollama.parse_generate_request, payload).param == param


# -- egress ------------------------------------------------------------------------------------


def openai_style_request(**changes: Any) -> ChatRequest:
    fields: dict[str, Any] = {
        "model": "alias",
        "messages": [
            Message(role="system", content=(TextPart("sys"),)),
            Message(role="user", content=(TextPart("look"), TextPart("here"), ImagePart(f"data:image/png;base64,{PNG}"))),
            Message(role="assistant", tool_calls=(ToolCall("call_1", "weather", '{"city": "Paris"}'),
                                                  ToolCall("call_2", "broken", '{"city": '))),
            Message(role="tool", content=(TextPart("sunny"),), tool_call_id="call_1"),
            Message(role="tool", content=(TextPart("?"),), tool_call_id="call_2"),
        ],
        "params": GenerationParams(max_tokens=50, temperature=0.5, stop=("END",), seed=1,
                                   response_format=ResponseFormat(kind="json_schema", schema={"type": "object"})),
        "tools": [Tool(name="weather")],
        "dialect": "openai",
        "extra": {"user": "u-1", "logit_bias": {}},
    }
    fields.update(changes)
    return ChatRequest(**fields)


def test_egress_chat_body_speaks_ollama() -> None:
    path, raw = ollama.encode_request(openai_style_request(), "llama3.2:latest", stream=True)
    sent = json.loads(raw)
    assert path == "/api/chat"
    assert sent["model"] == "llama3.2:latest" and sent["stream"] is True
    assert "user" not in sent and "logit_bias" not in sent  # OpenAI-only fields stay behind
    system, user, assistant, tool1, tool2 = sent["messages"]
    assert system == {"role": "system", "content": "sys"}
    assert user == {"role": "user", "content": "look\nhere", "images": [PNG]}
    assert assistant["tool_calls"] == [
        {"id": "call_1", "function": {"name": "weather", "arguments": {"city": "Paris"}}},
        {"id": "call_2", "function": {"name": "broken", "arguments": {ollama.RAW_ARGUMENTS_KEY: '{"city": '}}},
    ]
    assert tool1 == {"role": "tool", "content": "sunny", "tool_name": "weather", "tool_call_id": "call_1"}
    assert tool2["tool_name"] == "broken"
    assert sent["options"] == {"temperature": 0.5, "num_predict": 50, "seed": 1, "stop": ["END"]}
    assert sent["format"] == {"type": "object"}
    assert sent["tools"] == [{"type": "function", "function": {"name": "weather",
                                                                "parameters": {"type": "object", "properties": {}}}}]


def test_egress_forwards_ollama_only_fields_for_ollama_clients() -> None:
    request = ollama.parse_chat_request(
        body(model="m", messages=[{"role": "user", "content": "x"}], keep_alive=0, think="high",
             options={"num_ctx": 4096, "num_predict": -1, "temperature": 0.1}, format="json")
    )
    path, raw = ollama.encode_request(request, "m", stream=False)
    sent = json.loads(raw)
    assert path == "/api/chat"
    assert sent["keep_alive"] == 0 and sent["think"] == "high" and sent["format"] == "json"
    assert sent["options"] == {"num_ctx": 4096, "num_predict": -1, "temperature": 0.1}
    assert sent["stream"] is False and "@endpoint" not in sent


def test_egress_generate_stays_generate_for_ollama_backends() -> None:
    request = ollama.parse_generate_request(
        body(model="m", prompt="def f(", suffix="\n    return x", system="code", raw=True, images=[PNG])
    )
    path, raw = ollama.encode_request(request, "qwen2.5-coder", stream=True)
    sent = json.loads(raw)
    assert path == "/api/generate"
    assert {k: sent[k] for k in ("model", "prompt", "suffix", "system", "raw", "images", "stream")} == {
        "model": "qwen2.5-coder", "prompt": "def f(", "suffix": "\n    return x", "system": "code",
        "raw": True, "images": [PNG], "stream": True,
    }
    assert "messages" not in sent and "@endpoint" not in sent


def test_egress_refuses_what_ollama_cannot_do() -> None:
    url_image = openai_style_request(messages=[Message(role="user", content=(ImagePart("https://x/cat.png"),))])
    assert fail_of(ollama.encode_request, url_image, "m", stream=True).kind is ErrorKind.INVALID_REQUEST
    many = openai_style_request(params=GenerationParams(n=2))
    assert fail_of(ollama.encode_request, many, "m", stream=True).param == "n"


def test_tool_choice_none_sends_no_tools() -> None:
    request = openai_style_request(tool_choice=ToolChoice(mode="none"))
    assert "tools" not in json.loads(ollama.encode_request(request, "m", stream=True)[1])


# -- egress: parsing Ollama streams -------------------------------------------------------------


def line(**fields: Any) -> bytes:
    return json.dumps({"model": "llama3.2", "created_at": "2025-10-01T12:00:00.123456789Z", **fields}).encode() + b"\n"


def chat_line(content: str = "", **fields: Any) -> bytes:
    message = {"role": "assistant", "content": content, **fields.pop("message", {})}
    return line(message=message, done=False, **fields)


def done_line(reason: str = "stop", **fields: Any) -> bytes:
    return line(message={"role": "assistant", "content": ""}, done=True, done_reason=reason,
                total_duration=5, prompt_eval_count=12, eval_count=7, **fields)


def parse_all(data: bytes, step: int | None = None) -> list[StreamEvent]:
    parser = ollama.StreamParser()
    events: list[StreamEvent] = []
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        events.extend(parser.feed(data[i : i + step]).events)
    events.extend(parser.close().events)
    return events


def test_parser_reads_text_thinking_usage_and_stop() -> None:
    data = chat_line(message={"thinking": "let me"}) + chat_line("Hel") + chat_line("lo") + done_line()
    for step in (1, 3, 7, None):
        events = parse_all(data, step)
        start = events[0]
        assert isinstance(start, StreamStart) and start.model == "llama3.2" and start.created == 1759320000
        assert events[1:] == [
            ReasoningDelta("let me"), TextDelta("Hel"), TextDelta("lo"),
            UsageReport(Usage(prompt_tokens=12, completion_tokens=7)),
            ollama.OllamaFinish(FinishReason.STOP, timings=(("total_duration", 5),)),  # the backend's own figure
        ]


def test_parser_gives_tool_calls_ids_indexes_and_tool_calls_reason() -> None:
    calls = [
        {"function": {"index": 0, "name": "weather", "arguments": {"city": "Paris"}}},
        {"function": {"index": 0, "name": "weather", "arguments": {"city": "Rome"}}},
    ]
    data = chat_line(message={"tool_calls": calls}) + chat_line(
        message={"tool_calls": [{"id": "call_x", "function": {"name": "time", "arguments": {}}}]}
    ) + chat_line(message={"tool_calls": [{"id": "call_x", "function": {"name": "time", "arguments": {}}}]}) + done_line()
    events = parse_all(data)
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [(s.index, s.name) for s in starts] == [(0, "weather"), (1, "weather"), (2, "time")]
    assert all(s.id.startswith("call_") for s in starts) and len({s.id for s in starts}) == 3
    assert starts[2].id == "call_x"  # kept when Ollama sends one; its repeat is dropped
    assert [json.loads(d.arguments) for d in deltas] == [{"city": "Paris"}, {"city": "Rome"}, {}]
    assert isinstance(events[-1], Finish) and events[-1].reason is FinishReason.TOOL_CALLS


def test_parser_maps_length_and_generate_lines() -> None:
    data = line(response="Hi", done=False) + line(response="", done=True, done_reason="length", context=[1, 2], eval_count=1)
    events = parse_all(data)
    assert events[1:] == [TextDelta("Hi"), UsageReport(Usage(0, 1)), ollama.OllamaFinish(FinishReason.LENGTH, 0, (1, 2))]


def test_an_ollama_backends_own_timings_reach_the_client_unchanged() -> None:
    """The gateway's clock used to replace them: a 3 s model load vanished from the figures."""
    figures = {"total_duration": 5_000_000_000, "load_duration": 3_000_000_000, "prompt_eval_count": 30,
               "prompt_eval_duration": 1_000_000_000, "eval_count": 40, "eval_duration": 1_000_000_000}
    data = chat_line("hi") + line(message={"role": "assistant", "content": ""}, done=True, done_reason="stop", **figures)
    renderer = ollama.StreamRenderer(model="m")
    closing = lines_of(renderer.render(parse_all(data)) + renderer.close())[-1]
    assert {key: closing.get(key) for key in figures} == figures
    reply = json.loads(data.splitlines()[-1])
    events = ollama.with_closing(completion_events(ollama.parse_completion(reply)), reply)
    finish = ollama.backend_finish(events)
    assert finish is not None
    whole = ollama.render_completion(ollama.parse_completion(reply), model="m", generate=False,
                                     timing=ollama.Timing(0.0, None, 0.001), backend_timings=finish.timings)
    assert {key: json.loads(whole).get(key) for key in figures} == figures
    # Another kind of backend has no such figures: the gateway's clock stands in, no load time.
    translated = ollama.StreamRenderer(model="m")
    ending = lines_of(translated.render([TextDelta("hi"), UsageReport(Usage(30, 40)), Finish(FinishReason.STOP)]) + translated.close())[-1]
    assert "load_duration" not in ending and ending["total_duration"] < 1_000_000_000


def test_generate_context_is_relayed_on_the_closing_line_only() -> None:
    # A client continuing a conversation through `context` needs the backend's array back.
    data = line(response="Hi", done=False) + line(response="", done=True, done_reason="stop", context=[7, 8, 9])
    renderer = ollama.StreamRenderer(model="m", generate=True)
    rendered = lines_of(renderer.render(parse_all(data)) + renderer.close())
    assert [item.get("context") for item in rendered] == [None, [7, 8, 9]]
    assert rendered[-1]["done"] is True
    chat = ollama.StreamRenderer(model="m")  # /api/chat replies have no context
    assert "context" not in lines_of(chat.render(parse_all(data)) + chat.close())[-1]
    completion = ollama.parse_completion(json.loads(data.splitlines()[-1]))
    events = ollama.with_closing(completion_events(completion), json.loads(data.splitlines()[-1]))
    finish = ollama.backend_finish(events)
    assert finish is not None
    sent = ollama.render_completion(completion, model="m", generate=True, timing=ollama.Timing(1.0, None, 2.0),
                                    context=finish.context)
    assert json.loads(sent)["context"] == [7, 8, 9]
    builder = CompletionBuilder()  # other dialects' renderers see a plain finish
    for event in events:
        builder.add(event)
    assert builder.finish_reason is FinishReason.STOP


def test_parser_turns_error_lines_and_truncation_into_failures() -> None:
    events = parse_all(chat_line("a") + b'{"error":"llama runner process has terminated"}\n' + chat_line("never"))
    failure = events[-1]
    assert isinstance(failure, StreamFailed) and failure.error.message == "llama runner process has terminated"
    assert TextDelta("never") not in events

    truncated = parse_all(chat_line("a") + chat_line("b")[:-10])
    assert isinstance(truncated[-1], StreamFailed) and "before it finished" in truncated[-1].error.message
    garbage = parse_all(b"<html>\n")
    assert isinstance(garbage[-1], StreamFailed) and garbage[-1].error.kind is ErrorKind.BACKEND


def test_parser_accepts_crlf_and_a_final_line_without_newline() -> None:
    data = chat_line("a").replace(b"\n", b"\r\n") + done_line().rstrip(b"\n")
    events = parse_all(data, 5)
    assert [e for e in events if isinstance(e, TextDelta)] == [TextDelta("a")]
    assert isinstance(events[-1], Finish) and events[-1].reason is FinishReason.STOP


def test_parse_completion_of_a_non_streamed_reply() -> None:
    data = json.loads(done_line())
    data["message"] = {"role": "assistant", "content": "Hi", "thinking": "t",
                       "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}
    completion = ollama.parse_completion(data)
    choice = completion.choices[0]
    assert (choice.content, choice.reasoning, choice.finish_reason) == ("Hi", "t", FinishReason.TOOL_CALLS)
    assert choice.tool_calls[0].name == "f" and json.loads(choice.tool_calls[0].arguments) == {"a": 1}
    assert choice.tool_calls[0].id.startswith("call_")
    assert completion.usage == Usage(12, 7) and completion.model == "llama3.2"


# -- ingress: rendering streams ---------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


def lines_of(data: bytes) -> list[dict[str, Any]]:
    assert data.endswith(b"\n") and b"\n\n" not in data
    return [json.loads(item) for item in data.split(b"\n")[:-1]]


STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def test_renderer_writes_ollama_chat_lines() -> None:
    renderer = ollama.StreamRenderer(model="my-alias", started=100.0, clock=FakeClock())
    data = renderer.render([StreamStart("chatcmpl-1", "upstream", 0), ReasoningDelta("think"), TextDelta("Hi"), TextDelta("")])
    data += renderer.render([TextDelta(" there"), Finish(FinishReason.STOP), UsageReport(Usage(9, 3, cached_tokens=2))])
    data += renderer.close()
    first, second, third, final = lines_of(data)
    assert data.split(b"\n")[1].startswith(b'{"model":"my-alias","created_at":"')
    assert STAMP.match(first["created_at"])
    assert first == {"model": "my-alias", "created_at": first["created_at"],
                     "message": {"role": "assistant", "content": "", "thinking": "think"}, "done": False}
    assert second["message"] == {"role": "assistant", "content": "Hi"} and third["message"]["content"] == " there"
    assert list(final) == ["model", "created_at", "message", "done_reason", "done", "total_duration",
                           "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration"]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert (final["prompt_eval_count"], final["eval_count"]) == (9, 3)
    assert final["prompt_eval_duration"] == 250_000_000  # request → first output
    assert final["total_duration"] == final["prompt_eval_duration"] + final["eval_duration"]
    assert renderer.close() == b""


def test_renderer_sends_streamed_tool_calls_whole_with_object_arguments() -> None:
    renderer = ollama.StreamRenderer(model="m")
    events: list[StreamEvent] = [
        StreamStart("id", "m", 0), TextDelta("Checking."),
        ToolCallStart(0, "call_a", "weather"), ToolCallDelta(0, '{"ci'),
        ToolCallStart(1, "call_b", "time"), ToolCallDelta(0, 'ty": "Paris"}'), ToolCallDelta(1, "{not json"),
        ToolCallStart(2, "call_c", "noargs"),
    ]
    assert [item["message"]["content"] for item in lines_of(renderer.render(events))] == ["Checking."]
    data = renderer.render([Finish(FinishReason.TOOL_CALLS)]) + renderer.render([UsageReport(Usage(1, 2))]) + renderer.close()
    calls_line, final = lines_of(data)
    assert calls_line["done"] is False and calls_line["message"]["tool_calls"] == [
        {"id": "call_a", "function": {"index": 0, "name": "weather", "arguments": {"city": "Paris"}}},
        {"id": "call_b", "function": {"index": 1, "name": "time", "arguments": {ollama.RAW_ARGUMENTS_KEY: "{not json"}}},
        {"id": "call_c", "function": {"index": 2, "name": "noargs", "arguments": {}}},
    ]
    assert final["done_reason"] == "stop" and final["eval_count"] == 2


def test_renderer_ends_a_failed_stream_with_an_error_line() -> None:
    renderer = ollama.StreamRenderer(model="m")
    data = renderer.render([StreamStart("id", "m", 0), TextDelta("a"), ToolCallStart(0, "c", "f"),
                            StreamFailed(GatewayError(ErrorKind.TIMEOUT, "Backend `x` went silent.")), TextDelta("b")])
    *_, text, error = lines_of(data)
    # The call was cut short: never sent, or a client would run it with truncated arguments.
    assert text["message"] == {"role": "assistant", "content": "a"}
    assert error == {"error": "Backend `x` went silent."}
    assert renderer.close() == b"" and renderer.render([TextDelta("c")]) == b""


def test_renderer_generate_lines_and_length() -> None:
    renderer = ollama.StreamRenderer(model="m", generate=True)
    data = renderer.render([StreamStart("id", "m", 0), ReasoningDelta("r"), TextDelta("x"), Finish(FinishReason.LENGTH)])
    thinking, text, final = lines_of(data + renderer.close())
    assert thinking == {"model": "m", "created_at": thinking["created_at"], "response": "", "thinking": "r", "done": False}
    assert text["response"] == "x"
    assert list(final)[:5] == ["model", "created_at", "response", "done", "done_reason"]
    assert final["done_reason"] == "length" and "context" not in final
    assert "prompt_eval_count" not in final  # unknown counts are left out, as Ollama's omitempty does
    assert final["eval_count"] == 2  # no usage reported: the pieces seen


def test_non_stream_completion_body() -> None:
    completion = ChatCompletion("id", "up", 0, [Choice(content="Hi", reasoning="r", finish_reason=FinishReason.TOOL_CALLS,
                                                       tool_calls=[ToolCall("call_1", "f", '{"a":1}')])], Usage(4, 5))
    sent = json.loads(ollama.render_completion(completion, model="m", generate=False, timing=ollama.Timing(1.0, None, 2.0)))
    assert sent["message"] == {"role": "assistant", "content": "Hi", "thinking": "r", "tool_calls": [
        {"id": "call_1", "function": {"index": 0, "name": "f", "arguments": {"a": 1}}}]}
    assert (sent["done"], sent["done_reason"], sent["total_duration"], sent["eval_duration"]) == (True, "stop", 10**9, 10**9)
    assert (sent["prompt_eval_count"], sent["eval_count"]) == (4, 5)
    generated = json.loads(ollama.render_completion(completion, model="m", generate=True, timing=ollama.Timing(1.0, None, 2.0)))
    assert generated["response"] == "Hi" and "message" not in generated and "tool_calls" not in generated


# -- models --------------------------------------------------------------------------------------


def test_tags_pass_ollama_facts_through_and_fill_placeholders_otherwise() -> None:
    item = {"name": "llama3.2:latest", "model": "llama3.2:latest", "modified_at": "2025-10-01T12:00:00.000000000Z",
            "size": 2019393189, "digest": "ab" * 32, "details": {"family": "llama", "format": "gguf"}}
    name, created, facts = ollama.parse_tag(item) or ("", 0, {})
    assert (name, created) == ("llama3.2:latest", 1759320000)
    assert ollama.tag_entry(name, backend="ol", created=created, facts=facts) == item
    entry = ollama.tag_entry("gpt-4o-mini", backend="oa", created=0, facts={})
    assert entry["size"] == 0 and len(entry["digest"]) == 64 and entry["details"]["family"] == "gpt"
    assert ollama.name_variants("llama3.2") == ("llama3.2", "llama3.2:latest")
    assert ollama.name_variants("llama3.2:latest") == ("llama3.2:latest", "llama3.2")


def test_timestamps() -> None:
    assert ollama.parse_timestamp("2024-05-01T10:00:00.123456789-07:00") == 1714582800
    assert ollama.parse_timestamp("garbage") == 0 and ollama.parse_timestamp(None) == 0
    assert STAMP.match(ollama.timestamp(0)) and ollama.timestamp(0).startswith("1970-01-01T00:00:00")


# -- properties --------------------------------------------------------------------------------

texts = st.text(max_size=12)
names = st.from_regex(r"[a-z_]{1,10}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(texts, json_values, max_size=4)
argument_texts = json_objects.map(json.dumps) | st.text(max_size=20)


def sent_whole(calls: list[ToolCall], reason: FinishReason | None) -> list[ToolCall]:
    """The calls an Ollama client gets: a turn cut off by `length` loses those whose
    arguments do not parse (cut inside them)."""
    def parses(text: str) -> bool:
        try:
            json.loads(text)
        except ValueError:
            return not text.strip()
        return True

    return [c for c in calls if reason is not FinishReason.LENGTH or parses(c.arguments)]


@st.composite
def event_streams(draw: st.DrawFn) -> list[StreamEvent]:
    events: list[StreamEvent] = [StreamStart("chatcmpl-x", "upstream", 1)]
    for kind, text in draw(st.lists(st.tuples(st.booleans(), texts), max_size=8)):
        events.append(TextDelta(text) if kind else ReasoningDelta(text))
    calls = draw(st.lists(st.tuples(names, argument_texts), max_size=3))
    pending: list[tuple[int, str]] = []
    for index, (name, arguments) in enumerate(calls):
        events.append(ToolCallStart(index, f"call_{index}_{name}", name))
        cut = draw(st.integers(0, len(arguments)))
        pending += [(index, arguments[:cut]), (index, arguments[cut:])]
    if draw(st.booleans()):
        pending.sort(key=lambda item: item[1] == "")  # interleave parallel calls' fragments
    events += [ToolCallDelta(index, part) for index, part in pending if part]
    if draw(st.booleans()):
        usage = Usage(draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6)), cached_tokens=draw(st.none() | st.integers(0, 9)))
        events.insert(draw(st.integers(1, len(events))), UsageReport(usage))
    ending = draw(st.sampled_from(["finish", "finish", "none", "failed"]))
    if ending == "finish":
        events.append(Finish(draw(st.sampled_from(FinishReason))))
        if draw(st.booleans()):
            events.append(UsageReport(Usage(3, 4)))
    elif ending == "failed":
        events.append(StreamFailed(GatewayError(ErrorKind.BACKEND, draw(st.text(min_size=1, max_size=20)))))
    return events


def split_batches(draw: Any, events: list[StreamEvent]) -> list[list[StreamEvent]]:
    cuts = sorted(draw(st.lists(st.integers(0, len(events)), max_size=4)))
    bounds = [0, *cuts, len(events)]
    return [events[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=event_streams(), data=st.data(), generate=st.booleans())
def test_rendered_streams_parse_back_to_the_same_events(events: list[StreamEvent], data: st.DataObject, generate: bool) -> None:
    """Render any valid event stream as Ollama NDJSON and parse it back (split anywhere).

    Normalised for what Ollama cannot carry: the stream id/created and model (the client's
    model name is echoed; a stream failing before any output has no start), empty deltas, argument fragmentation and whitespace (calls arrive
    whole, arguments as objects), cached/reasoning token counts, `content_filter` and
    `tool_calls` reasons (Ollama says `stop`; the parser infers `tool_calls` from the calls),
    and, on /api/generate, tool calls altogether."""
    renderer = ollama.StreamRenderer(model="client-name", generate=generate)
    wire = b"".join(renderer.render(batch) for batch in split_batches(data.draw, events)) + renderer.close()
    step = data.draw(st.integers(1, 200))  # not len(wire): durations make it vary per run
    parsed = parse_all(wire, step)

    if isinstance(parsed[0], StreamStart):
        assert parsed[0].model == "client-name"
        assert sum(isinstance(e, StreamStart) for e in parsed) == 1
    else:
        # An error before any output is the only line: there is nothing to start a stream with.
        assert len(parsed) == 1 and isinstance(parsed[0], StreamFailed)

    def pieces(stream: list[StreamEvent]) -> list[tuple[str, str]]:
        return [(type(e).__name__, e.text) for e in stream if isinstance(e, TextDelta | ReasoningDelta) and e.text]

    assert pieces(parsed) == pieces(events)

    sent, got = CompletionBuilder(), CompletionBuilder()
    for event in events:
        sent.add(event)
    for event in parsed:
        got.add(event)
    failure = next((e for e in events if isinstance(e, StreamFailed)), None)
    # Calls of a failed stream never finished: none is sent (Ollama sends only whole calls).
    want_calls = [] if generate or failure is not None else sent_whole(sent.build().choices[0].tool_calls, sent.finish_reason)
    got_calls = got.build().choices[0].tool_calls
    assert [(c.id, c.name, ollama.arguments_object(c.arguments)) for c in got_calls] == [
        (c.id, c.name, ollama.arguments_object(c.arguments)) for c in want_calls
    ]
    assert [s.index for s in parsed if isinstance(s, ToolCallStart)] == list(range(len(want_calls)))

    if failure is not None:
        assert isinstance(parsed[-1], StreamFailed) and parsed[-1].error.message == failure.error.message
        assert not any(isinstance(e, Finish) for e in parsed)
        return
    reason = sent.finish_reason
    expected = FinishReason.LENGTH if reason is FinishReason.LENGTH else (
        FinishReason.TOOL_CALLS if want_calls else FinishReason.STOP
    )
    assert isinstance(parsed[-1], Finish) and (parsed[-1].reason, parsed[-1].choice) == (expected, 0)
    if sent.usage is not None:
        assert (got.usage or Usage()).prompt_tokens == sent.usage.prompt_tokens
        assert (got.usage or Usage()).completion_tokens == sent.usage.completion_tokens


def test_arguments_round_trip_through_objects() -> None:
    for text in ['{"a": [1, 2]}', "{bad", "[1, 2]", "3", ""]:
        back = ollama.arguments_text(ollama.arguments_object(text))
        assert back == (text if text not in ('{"a": [1, 2]}', "") else ('{"a":[1,2]}' if text else "{}"))
    for text in ('{"x": NaN}', '{"x": 1e999}'):
        assert ollama.arguments_object(text) == {ollama.RAW_ARGUMENTS_KEY: text}


base64_payloads = st.sampled_from([PNG, JPEG, "R0lGODlhAQABAAAAACw=", "UklGRiQAAABXRUJQ"])
compact_objects = json_objects.map(lambda value: json.dumps(value, ensure_ascii=False, separators=(",", ":")))


@st.composite
def ollama_requests(draw: st.DrawFn) -> ChatRequest:
    messages: list[Message] = []
    if draw(st.booleans()):
        messages.append(Message(role="system", content=(TextPart(draw(st.text(min_size=1, max_size=10))),)))
    for turn in range(draw(st.integers(1, 3))):
        text = draw(st.text(min_size=1, max_size=10))
        images = tuple(ollama.image_part(p) for p in draw(st.lists(base64_payloads, max_size=2)))
        messages.append(Message(role="user", content=(TextPart(text), *images)))
        calls = tuple(
            ToolCall(f"call_{turn}_{i}", name, arguments)
            for i, (name, arguments) in enumerate(draw(st.lists(st.tuples(names, compact_objects), max_size=3)))
        )
        reply = draw(texts)
        messages.append(Message(role="assistant", content=(TextPart(reply),) if reply else (), tool_calls=calls,
                                reasoning=draw(st.none() | st.text(min_size=1, max_size=5))))
        for call in calls:
            messages.append(Message(role="tool", content=(TextPart(draw(st.text(min_size=1, max_size=5))),),
                                    tool_call_id=call.id, name=call.name))
    fmt = draw(st.none() | st.just(ResponseFormat(kind="json_object")) |
               st.just(ResponseFormat(kind="json_schema", schema={"type": "object"})))
    params = GenerationParams(
        max_tokens=draw(st.none() | st.integers(1, 10**5)),
        temperature=draw(st.none() | st.floats(0, 2)),
        top_p=draw(st.none() | st.floats(0, 1)),
        top_k=draw(st.none() | st.integers(1, 100)),  # Ollama's 0 is "no top-k", no domain value
        stop=tuple(draw(st.lists(st.text(min_size=1, max_size=4), max_size=2))),
        seed=draw(st.none() | st.integers(0, 2**31)),
        presence_penalty=draw(st.none() | st.floats(-2, 2)),
        frequency_penalty=draw(st.none() | st.floats(-2, 2)),
        response_format=fmt,
    )
    tools = [Tool(name=n, description=draw(st.none() | texts), parameters={"type": "object"})
             for n in draw(st.lists(names, max_size=2, unique=True))]
    extra = draw(st.fixed_dictionaries({}, optional={"keep_alive": st.sampled_from(["5m", 0, 300]),
                                                     "think": st.booleans(),
                                                     "options": st.just({"num_ctx": 2048})}))
    if extra.get("think") is False:
        params.reasoning_effort = "none"  # as the parser says `think: false` for other backends
    return ChatRequest(model="m", messages=messages, params=params, tools=tools, stream=draw(st.booleans()),
                       dialect="ollama", extra=extra)


@settings(max_examples=200, deadline=None)
@given(request=ollama_requests())
def test_egress_bodies_parse_back_to_the_same_request(request: ChatRequest) -> None:
    """What the gateway sends an Ollama backend is what an Ollama client would have sent:
    encode for the backend, parse as ingress, same request (the raw `options` in `extra`
    compare by their unmodelled part, the only part that travels through `extra`)."""
    path, raw = ollama.encode_request(request, "m", stream=request.stream)
    assert path == "/api/chat"
    back = ollama.parse_chat_request(raw)
    assert back.messages == request.messages
    assert back.params == request.params
    assert back.tools == request.tools
    assert back.stream == request.stream and back.model == "m"
    assert {k: v for k, v in back.extra.items() if k != "options"} == {
        k: v for k, v in request.extra.items() if k != "options"
    }
    assert ollama.unmodelled_options(back) == ollama.unmodelled_options(request)


@settings(max_examples=100, deadline=None)
@given(content=texts, reasoning=texts, calls=st.lists(st.tuples(names, argument_texts), max_size=3),
       reason=st.sampled_from(FinishReason), usage=st.none() | st.builds(Usage, st.integers(0, 999), st.integers(0, 999)))
def test_completions_round_trip(content: str, reasoning: str, calls: list[tuple[str, str]], reason: FinishReason,
                                usage: Usage | None) -> None:
    tool_calls = [ToolCall(f"call_{i}", name, arguments) for i, (name, arguments) in enumerate(calls)]
    completion = ChatCompletion("x", "up", 0, [Choice(content=content, reasoning=reasoning, tool_calls=tool_calls,
                                                      finish_reason=reason)], usage)
    raw = ollama.render_completion(completion, model="m", generate=False, timing=ollama.Timing(0.0, None, 1.0))
    back = ollama.parse_completion(json.loads(raw)).choices[0]
    assert (back.content, back.reasoning) == (content, reasoning)
    assert [(c.id, c.name, ollama.arguments_object(c.arguments)) for c in back.tool_calls] == [
        (c.id, c.name, ollama.arguments_object(c.arguments)) for c in sent_whole(tool_calls, reason)
    ]
    expected = FinishReason.LENGTH if reason is FinishReason.LENGTH else (
        FinishReason.TOOL_CALLS if tool_calls else FinishReason.STOP
    )
    assert back.finish_reason is expected
