"""The Anthropic Messages dialect: requests, messages, streams, errors (sans-IO)."""

from proxy.dialects.anthropic._foreign import adapt_for_dialect
from proxy.dialects.anthropic._request import (
    BETA_EXTRA,
    beta_header,
    encode_messages_request,
    parse_messages_request,
    tool_use_id,
)
from proxy.dialects.anthropic._response import (
    message_body,
    message_events,
    render_message,
    render_token_count,
)
from proxy.dialects.anthropic._stream import PING, ParseOutput, StreamParser, StreamRenderer
from proxy.dialects.anthropic._vocabulary import (
    API_VERSION,
    DIALECT,
    BlockDelta,
    BlockStart,
    SignedReasoningDelta,
    StopReasonFinish,
    error_body,
    error_frame,
    error_from_wire,
    error_message_from_body,
    finish_from_wire,
    message_id,
    render_error,
    stop_reason_to_wire,
    usage_to_wire,
)

__all__ = [
    "API_VERSION",
    "BETA_EXTRA",
    "DIALECT",
    "PING",
    "BlockDelta",
    "BlockStart",
    "ParseOutput",
    "SignedReasoningDelta",
    "StopReasonFinish",
    "StreamParser",
    "StreamRenderer",
    "adapt_for_dialect",
    "beta_header",
    "encode_messages_request",
    "error_body",
    "error_frame",
    "error_from_wire",
    "error_message_from_body",
    "finish_from_wire",
    "message_body",
    "message_events",
    "message_id",
    "parse_messages_request",
    "render_error",
    "render_message",
    "render_token_count",
    "stop_reason_to_wire",
    "tool_use_id",
    "usage_to_wire",
]
