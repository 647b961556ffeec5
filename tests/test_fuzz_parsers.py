"""Hypothesis against the three dialects' request parsers: any bytes, any JSON, and
near-valid bodies. Only a 4xx `GatewayError` may come out; and whatever a parser accepts,
every backend encoder and the request fingerprint can handle."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.dialects import anthropic, ollama, openai
from proxy.dialects._json import MAX_DEPTH
from proxy.domain.chat import ChatRequest
from proxy.domain.errors import GatewayError
from proxy.domain.fingerprint import request_fingerprint

Parser = Callable[[bytes], ChatRequest]
PARSERS: dict[str, Parser] = {
    "openai.chat": openai.parse_chat_request,
    "ollama.chat": ollama.parse_chat_request,
    "ollama.generate": ollama.parse_generate_request,
    "anthropic.messages": anthropic.parse_messages_request,
    "anthropic.count_tokens": lambda body: anthropic.parse_messages_request(body, count_only=True),
}
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any JSON value (NaN and infinities are not JSON).
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "", "USER"])
content_parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "image", "tool_use", "tool_result", "thinking", "input_audio", "x"])},
    optional={
        "text": json_values, "image_url": json_values, "source": json_values, "id": json_values,
        "name": json_values, "input": json_values, "tool_use_id": json_values, "content": json_values,
    },
)
tool_calls = st.fixed_dictionaries(
    {"id": json_values, "type": st.just("function") | json_values,
     "function": st.fixed_dictionaries({}, optional={"name": json_values, "arguments": json_values})},
)
messages = st.fixed_dictionaries(
    {"role": roles | json_values},
    optional={
        "content": st.text() | st.lists(content_parts, max_size=3) | json_values,
        "tool_calls": st.lists(tool_calls, max_size=2) | json_values,
        "tool_call_id": json_values, "name": json_values, "images": json_values, "thinking": json_values,
    },
)
tools = st.fixed_dictionaries(
    {},
    optional={
        "type": st.just("function") | json_values, "name": json_values, "input_schema": json_values,
        "function": st.fixed_dictionaries({}, optional={"name": json_values, "parameters": json_values,
                                                        "description": json_values}),
    },
)
near_valid = st.fixed_dictionaries(
    {"model": st.text(max_size=20) | json_values},
    optional={
        "messages": st.lists(messages, max_size=4) | json_values,
        "prompt": json_values, "suffix": json_values, "system": st.text() | st.lists(content_parts, max_size=2) | json_values,
        "stream": json_values, "stream_options": json_values, "max_tokens": json_values,
        "max_completion_tokens": json_values, "temperature": json_values, "top_p": json_values,
        "top_k": json_values, "stop": json_values, "stop_sequences": json_values, "seed": json_values,
        "n": json_values, "tools": st.lists(tools, max_size=2) | json_values, "tool_choice": json_values,
        "response_format": json_values, "format": json_values, "options": json_values, "keep_alive": json_values,
        "images": json_values, "context": json_values, "raw": json_values, "think": json_values,
        "thinking": json_values, "metadata": json_values, "template": json_values,
    },
)


def check(parser: Parser, body: bytes) -> None:
    """The parser's contract: a request it can stand behind, or a 4xx GatewayError."""
    try:
        request = parser(body)
    except GatewayError as error:
        assert 400 <= error.status < 500, error
        assert error.message
        return
    # Accepted: every way the gateway uses a request must work too.
    request_fingerprint(request, "upstream")
    openai.encode_chat_request(request, "upstream", stream=request.stream, include_usage=True)
    ollama.encode_request(request, "upstream", stream=request.stream)
    try:
        anthropic.encode_messages_request(request, "upstream", stream=request.stream, default_max_tokens=1024)
    except GatewayError as error:  # e.g. a conversation Anthropic cannot represent: refused cleanly
        assert 400 <= error.status < 500, error


@pytest.mark.parametrize("name", PARSERS)
@FUZZ
@given(body=st.binary(max_size=300))
def test_any_bytes(name: str, body: bytes) -> None:
    check(PARSERS[name], body)


@pytest.mark.parametrize("name", PARSERS)
@FUZZ
@given(value=json_values)
def test_any_json(name: str, value: Any) -> None:
    check(PARSERS[name], json.dumps(value).encode())


@pytest.mark.parametrize("name", PARSERS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=near_valid)
def test_near_valid_bodies(name: str, value: dict[str, Any]) -> None:
    check(PARSERS[name], json.dumps(value).encode())


@pytest.mark.parametrize("name", PARSERS)
@FUZZ
@given(depth=st.integers(min_value=MAX_DEPTH - 2, max_value=50_000), opener=st.sampled_from(["[", '{"a":']))
def test_deep_nesting_is_a_400_at_any_depth(name: str, depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    body = '{"model": "m", "messages": ' + opener * depth + "1" + closer * depth + "}"
    check(PARSERS[name], body.encode())


@pytest.mark.parametrize("name", PARSERS)
def test_the_deepest_accepted_body_still_encodes(name: str) -> None:
    # Depth MAX_DEPTH exactly (the outer object counts): parsed, then encoded and hashed.
    arguments = "[" * (MAX_DEPTH - 5) + "]" * (MAX_DEPTH - 5)
    body = {
        "model": "m", "max_tokens": 5, "stream": False, "prompt": "hi",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "name": "t", "input_schema": {"type": "object", "x": json.loads(arguments)},
                   "function": {"name": "t", "parameters": {"type": "object", "x": json.loads(arguments)}}}],
    }
    check(PARSERS[name], json.dumps(body).encode())
