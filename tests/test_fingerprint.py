"""`req_id`: requests that would get different answers never share one (the exact cache and
idempotency replay by it); the same question asked as a stream or not does."""

from __future__ import annotations

import json
from typing import Any

from proxy.dialects import ollama, openai
from proxy.domain.fingerprint import request_fingerprint


def _req_id(**body: Any) -> str:
    request = openai.parse_chat_request(json.dumps({"model": "m", **body}).encode())
    return request_fingerprint(request, "up")


def _history(arguments: str) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "weather", "arguments": arguments}},
        {"role": "function", "name": "weather", "content": "sunny"},
    ]


def test_message_fields_beyond_the_modelled_ones_tell_requests_apart() -> None:
    assert _req_id(messages=_history('{"city": "Paris"}')) != _req_id(messages=_history('{"city": "Oslo"}'))
    prefix = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Once", "prefix": True}]
    assert _req_id(messages=prefix) != _req_id(messages=[*prefix[:1], {"role": "assistant", "content": "Once"}])


def test_parallel_tool_calls_tell_requests_apart_and_streaming_does_not() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "hi"}]
    base = _req_id(messages=messages, tools=tools)
    assert _req_id(messages=messages, tools=tools, parallel_tool_calls=False) != base
    assert _req_id(messages=messages, tools=tools, stream=True) == base


def _ollama_req_id(**body: Any) -> str:
    request = ollama.parse_chat_request(json.dumps({"model": "m", "stream": False, **body}).encode())
    return request_fingerprint(request, "up")


def test_an_ollama_option_the_domain_models_is_the_same_request_as_openais_field() -> None:
    """`options.temperature` is OpenAI's `temperature`: the same key for both is a replay, not a 409."""
    messages = [{"role": "user", "content": "hi"}]
    assert _ollama_req_id(messages=messages, options={"temperature": 0, "seed": 7, "num_predict": 5}) == _req_id(
        messages=messages, temperature=0, seed=7, max_tokens=5
    )
    assert _ollama_req_id(messages=messages, options={"temperature": 0}) != _req_id(messages=messages, temperature=0.5)
    # What only Ollama understands still tells requests apart.
    assert _ollama_req_id(messages=messages, options={"temperature": 0, "num_ctx": 4096}) != _req_id(
        messages=messages, temperature=0
    )
