"""The OpenAI Responses dialect (`/v1/responses`): requests, Response objects, streams (sans-IO)."""

from proxy.dialects.responses import _conversations as conversations
from proxy.dialects.responses._compaction import (
    COMPACTED,
    compacted_object,
    compaction_answer,
    compaction_request,
)
from proxy.dialects.responses._items import input_items, item_page
from proxy.dialects.responses._request import (
    CONVERSATION_PREFIX,
    DIALECT,
    INCLUDABLE,
    ResponsesRequest,
    UnresolvedReferences,
    continued,
    default_settings,
    in_conversation,
    namespaces_of,
    parse_responses_request,
    readable,
)
from proxy.dialects.responses._response import (
    error_to_wire,
    item_id,
    output_of,
    render_error,
    render_response,
    response_id,
    response_object,
    status_of,
    summarized,
    usage_to_wire,
)
from proxy.dialects.responses._stream import StreamRenderer, whole_stream

__all__ = [
    "COMPACTED",
    "CONVERSATION_PREFIX",
    "DIALECT",
    "INCLUDABLE",
    "ResponsesRequest",
    "StreamRenderer",
    "UnresolvedReferences",
    "compacted_object",
    "compaction_answer",
    "compaction_request",
    "continued",
    "conversations",
    "default_settings",
    "error_to_wire",
    "in_conversation",
    "input_items",
    "item_id",
    "item_page",
    "namespaces_of",
    "output_of",
    "parse_responses_request",
    "readable",
    "render_error",
    "render_response",
    "response_id",
    "response_object",
    "status_of",
    "summarized",
    "usage_to_wire",
    "whole_stream",
]
