"""The OpenAI dialect: chat requests, completions, streams, errors and model lists."""

from proxy.dialects.openai._request import (
    DIALECT,
    encode_chat_request,
    parse_chat_request,
    render_message,
    wants_chunk_usage,
)
from proxy.dialects.openai._response import (
    completion_body,
    completion_is_conformant,
    error_body,
    error_message_from_body,
    failed_finish_reason,
    finish_reason_from_wire,
    parse_completion,
    parse_usage,
    relay_completion,
    render_completion,
    render_error,
    render_model_list,
    render_usage,
)
from proxy.dialects.openai._stream import (
    DONE,
    RelayOutput,
    StreamRelay,
    StreamRenderer,
    error_frame,
    new_tool_call_id,
)

__all__ = [
    "DIALECT",
    "DONE",
    "RelayOutput",
    "StreamRelay",
    "StreamRenderer",
    "completion_body",
    "completion_is_conformant",
    "encode_chat_request",
    "error_body",
    "error_frame",
    "error_message_from_body",
    "failed_finish_reason",
    "finish_reason_from_wire",
    "new_tool_call_id",
    "parse_chat_request",
    "parse_completion",
    "parse_usage",
    "relay_completion",
    "render_completion",
    "render_error",
    "render_message",
    "render_model_list",
    "render_usage",
    "wants_chunk_usage",
]
