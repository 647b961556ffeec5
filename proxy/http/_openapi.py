"""`GET /openapi.json`: an OpenAPI 3.1 description of every endpoint the gateway serves.

Operations are described here, by path and method (`OPERATIONS`; a blueprint may add its
own with `document`). The served document holds exactly the routes registered on the app,
so it never lists an endpoint this build does not serve, and it marks the paths that need
no key under the running configuration. `tests/test_security_openapi.py` fails when a route
is served without a description here.
"""

from __future__ import annotations

import json
import re
from typing import Any, cast

from quart import Blueprint, Quart, Response, current_app

from proxy import __version__
from proxy.dialects.responses import INCLUDABLE
from proxy.http._context import GatewayApp, gateway

blueprint = Blueprint("openapi", __name__)

Schema = dict[str, Any]
Operation = dict[str, Any]

# -- schemas ------------------------------------------------------------------------------------

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_OBJ = {"type": "object"}

_OPENAI_ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": _STR,
                "type": _STR,
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ANTHROPIC_ERROR: Schema = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {"type": "object", "required": ["type", "message"], "properties": {"type": _STR, "message": _STR}},
    },
}
_OLLAMA_ERROR: Schema = {"type": "object", "required": ["error"], "properties": {"error": _STR}}
_ERRORS = {"openai": "OpenAIError", "anthropic": "AnthropicError", "ollama": "OllamaError"}

_TOOL: Schema = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": _STR, "description": _STR, "parameters": _OBJ, "strict": _BOOL},
        },
    },
}
_CONTENT_PART: Schema = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"enum": ["text", "image_url"]},
        "text": _STR,
        "image_url": {"type": "object", "required": ["url"], "properties": {"url": _STR, "detail": _STR}},
    },
}
_OPENAI_MESSAGE: Schema = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"oneOf": [_STR, {"type": "array", "items": _CONTENT_PART}, {"type": "null"}]},
        "name": _STR,
        "tool_call_id": _STR,
        "tool_calls": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "type", "function"],
                "properties": {
                    "id": _STR,
                    "type": {"const": "function"},
                    "function": {
                        "type": "object",
                        "required": ["name", "arguments"],
                        "properties": {"name": _STR, "arguments": _STR},
                    },
                },
            },
        },
    },
}
_CHAT_REQUEST: Schema = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "messages": {"type": "array", "items": _OPENAI_MESSAGE},
        "stream": _BOOL,
        "stream_options": {"type": "object", "properties": {"include_usage": _BOOL}},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "n": {"type": "integer", "minimum": 1},
        "stop": {"oneOf": [_STR, {"type": "array", "items": _STR}]},
        "seed": _INT,
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "tools": {"type": "array", "items": _TOOL},
        "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, _OBJ]},
        "response_format": {"type": "object", "required": ["type"], "properties": {"type": _STR}},
        "logprobs": _BOOL,
        "top_logprobs": {"type": "integer", "minimum": -1},
        "user": _STR,
    },
}
_USAGE: Schema = {
    "type": "object",
    "properties": {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT},
}


def _completion(kind: str, content: str, content_schema: Schema) -> Schema:
    """A whole completion: a chat's (`message`) or a legacy text completion's (`text`)."""
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": _STR,
            "object": {"const": kind},
            "created": _INT,
            "model": _STR,
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", content, "finish_reason"],
                    "properties": {"index": _INT, content: content_schema, "finish_reason": {"type": ["string", "null"]}},
                },
            },
            "usage": _USAGE,
        },
    }


_CHAT_COMPLETION = _completion("chat.completion", "message", _OBJ)
_TOKENS: Schema = {"type": "array", "items": {"type": "integer"}, "minItems": 1}
_COMPLETIONS_REQUEST: Schema = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "prompt": {
            "oneOf": [_STR, {"type": "array", "items": _STR, "minItems": 1}, _TOKENS, {"type": "array", "items": _TOKENS, "minItems": 1}]
        },
        "suffix": _STR,
        "stream": _BOOL,
        "max_tokens": _INT,
        "temperature": _NUM,
        "stop": {"oneOf": [_STR, {"type": "array", "items": _STR}]},
    },
    "additionalProperties": True,
}
_TEXT_COMPLETION = _completion("text_completion", "text", _STR)
_RERANK_DOCUMENT: Schema = {"oneOf": [_STR, {"type": "object", "properties": {"text": _STR}, "additionalProperties": True}]}
_RERANK_REQUEST: Schema = {
    "type": "object",
    "required": ["model", "query", "documents"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "query": _RERANK_DOCUMENT,
        "documents": {"type": "array", "items": _RERANK_DOCUMENT, "minItems": 1},
        "top_n": {"type": "integer", "minimum": 0},
        "return_documents": _BOOL,
    },
    "additionalProperties": True,
}
_RERANK: Schema = {
    "type": "object",
    "required": ["results"],
    "properties": {
        "id": _STR,
        "model": _STR,
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "relevance_score"],
                "properties": {"index": _INT, "relevance_score": _NUM, "document": _OBJ},
            },
        },
        "usage": _OBJ,
    },
}
_MODEL: Schema = {
    "type": "object",
    "required": ["id", "object"],
    "properties": {"id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR},
}
_ANTHROPIC_MODEL: Schema = {
    "type": "object",
    "required": ["type", "id", "display_name", "created_at"],
    "properties": {"type": {"const": "model"}, "id": _STR, "display_name": _STR, "created_at": {"type": "string", "format": "date-time"}},
}
_ANTHROPIC_MODEL_PAGE: Schema = {
    "type": "object",
    "required": ["data", "has_more", "first_id", "last_id"],
    "properties": {
        "data": {"type": "array", "items": _ANTHROPIC_MODEL},
        "has_more": _BOOL,
        "first_id": {"type": ["string", "null"]},
        "last_id": {"type": ["string", "null"]},
    },
}
_ANTHROPIC_VERSION: Schema = {
    "name": "anthropic-version", "in": "header", "schema": _STR,
    "description": "Sent by Anthropic's SDK: answers (errors too) in Anthropic's shapes.",
}
_MODEL_LIST: Schema = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _MODEL}},
}
_EMBEDDINGS_REQUEST: Schema = {
    "type": "object",
    "required": ["model"],
    # `messages`: vLLM's chat form, for its multimodal embedding models (one embedding).
    "anyOf": [{"required": ["input"]}, {"required": ["messages"]}],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "input": {
            "oneOf": [
                _STR,
                {"type": "array", "items": _STR, "minItems": 1},
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            ]
        },
        "messages": {"type": "array", "items": _OBJ, "minItems": 1},
        "encoding_format": {"enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1},
        "user": _STR,
    },
}
_EMBEDDINGS: Schema = {
    "type": "object",
    "required": ["object", "data", "model"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _OBJ}, "model": _STR, "usage": _USAGE},
}

_ANTHROPIC_BLOCK: Schema = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"enum": ["text", "image", "tool_use", "tool_result", "thinking", "document"]},
        "text": _STR,
        "id": _STR,
        "name": _STR,
        "input": _OBJ,
        "tool_use_id": _STR,
        "content": {"oneOf": [_STR, {"type": "array", "items": _OBJ}]},
    },
}
_ANTHROPIC_MESSAGE: Schema = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": ["user", "assistant"]},
        "content": {"oneOf": [_STR, {"type": "array", "items": _ANTHROPIC_BLOCK}]},
    },
}
_ANTHROPIC_TOOL: Schema = {
    "type": "object",
    "required": ["name", "input_schema"],
    "properties": {"name": _STR, "description": _STR, "input_schema": _OBJ},
}
_MESSAGES_COMMON: Schema = {
    "model": {"type": "string", "minLength": 1},
    "messages": {"type": "array", "items": _ANTHROPIC_MESSAGE},
    "system": {"oneOf": [_STR, {"type": "array", "items": _ANTHROPIC_BLOCK}]},
    "tools": {"type": "array", "items": _ANTHROPIC_TOOL},
    "tool_choice": {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["auto", "any", "tool", "none"]}, "name": _STR}},
}
_MESSAGES_REQUEST: Schema = {
    "type": "object",
    "required": ["model", "messages", "max_tokens"],
    "properties": {
        **_MESSAGES_COMMON,
        "max_tokens": {"type": "integer", "minimum": 1},
        "stream": _BOOL,
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "stop_sequences": {"type": "array", "items": _STR},
        "metadata": {"type": "object", "properties": {"user_id": _STR}},
    },
}
_COUNT_REQUEST: Schema = {"type": "object", "required": ["model", "messages"], "properties": _MESSAGES_COMMON}
_MESSAGE: Schema = {
    "type": "object",
    "required": ["id", "type", "role", "content", "model"],
    "properties": {
        "id": _STR,
        "type": {"const": "message"},
        "role": {"const": "assistant"},
        "content": {"type": "array", "items": _OBJ},
        "model": _STR,
        "stop_reason": {"type": ["string", "null"]},
        "usage": _OBJ,
    },
}

_RESPONSES_PART: Schema = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"enum": ["input_text", "input_image", "output_text", "refusal"]},
        "text": _STR, "image_url": _STR, "detail": _STR, "refusal": _STR,
    },
}
_RESPONSES_ITEM: Schema = {
    "type": "object",
    "properties": {
        "type": {"enum": ["message", "function_call", "function_call_output", "reasoning"]},
        "role": {"enum": ["user", "system", "developer", "assistant"]},
        "content": {"oneOf": [_STR, {"type": "array", "items": _RESPONSES_PART}]},
        "call_id": _STR, "name": _STR, "arguments": _STR,
        "output": {"oneOf": [_STR, {"type": "array", "items": _RESPONSES_PART}]},
    },
}
_RESPONSES_REQUEST: Schema = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "input": {"oneOf": [_STR, {"type": "array", "minItems": 1, "items": _RESPONSES_ITEM}]},
        "instructions": _STR,
        "stream": _BOOL,
        "tools": {
            "type": "array",
            "items": {
                "type": "object", "required": ["type", "name"],
                "properties": {"type": {"const": "function"}, "name": _STR, "description": _STR, "parameters": _OBJ, "strict": _BOOL},
            },
        },
        "tool_choice": {"oneOf": [{"enum": ["none", "auto", "required"]}, _OBJ]},
        "parallel_tool_calls": _BOOL,
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "text": {"type": "object", "properties": {"format": {"type": "object", "required": ["type"], "properties": {"type": _STR}}}},
        "reasoning": {"type": "object", "properties": {"effort": _STR}},
        "metadata": {"type": "object", "additionalProperties": _STR},
        "store": _BOOL, "user": _STR, "truncation": {"enum": ["auto", "disabled"]},
        "include": {"type": "array", "items": {"enum": list(INCLUDABLE)}}, "service_tier": _STR,
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "conversation": {"oneOf": [_STR, {"type": "object", "required": ["id"], "properties": {"id": _STR}}]},
        "previous_response_id": _STR, "background": _BOOL, "stream_options": _OBJ,
    },
}
_RESPONSE: Schema = {
    "type": "object",
    "required": ["id", "object", "created_at", "status", "model", "output"],
    "properties": {
        "id": _STR,
        "object": {"const": "response"},
        "created_at": _INT,
        # OpenAI's: a background response is `queued` when created, `in_progress` when polled,
        # `cancelled` once cancelled; one that failed is `failed`.
        "status": {"enum": ["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]},
        "incomplete_details": {"type": ["object", "null"]},
        "model": _STR,
        "output": {"type": "array", "items": _OBJ},
        "usage": {"type": ["object", "null"]},
    },
}
_RESPONSE_ID = {"name": "response_id", "in": "path", "required": True, "schema": _STR}

_OLLAMA_MESSAGE: Schema = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "user", "assistant", "tool"]},
        "content": _STR,
        "images": {"type": "array", "items": _STR},
        "tool_calls": {"type": "array", "items": _OBJ},
        "thinking": _STR,
    },
}
_OLLAMA_COMMON: Schema = {
    "model": {"type": "string", "minLength": 1},
    "stream": _BOOL,
    "format": {"oneOf": [{"const": "json"}, _OBJ]},
    "options": _OBJ,
    "keep_alive": {"oneOf": [_STR, _NUM]},
    "think": _BOOL,
    "logprobs": _BOOL,
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
}
_OLLAMA_CHAT: Schema = {
    "type": "object",
    "required": ["model"],
    "properties": {**_OLLAMA_COMMON, "messages": {"type": "array", "items": _OLLAMA_MESSAGE}, "tools": {"type": "array", "items": _TOOL}},
}
_OLLAMA_GENERATE: Schema = {
    "type": "object",
    "required": ["model"],
    "properties": {
        **_OLLAMA_COMMON,
        "prompt": _STR,
        "suffix": _STR,
        "system": _STR,
        "template": _STR,
        "raw": _BOOL,
        "images": {"type": "array", "items": _STR},
        "context": {"type": "array", "items": _INT},
    },
}
_OLLAMA_SHOW: Schema = {"type": "object", "required": ["model"], "properties": {"model": {"type": "string", "minLength": 1}, "verbose": _BOOL}}
_OLLAMA_EMBED: Schema = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "input": {"oneOf": [_STR, {"type": "array", "items": _STR}]},
        "truncate": _BOOL,
        "dimensions": {"type": "integer", "minimum": 1},
        "options": _OBJ,
        "keep_alive": {"oneOf": [_STR, _NUM]},
    },
}
_OLLAMA_EMBEDDINGS: Schema = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {"model": {"type": "string", "minLength": 1}, "prompt": _STR, "options": _OBJ},
}
_OLLAMA_TAGS: Schema = {
    "type": "object",
    "required": ["models"],
    "properties": {
        "models": {
            "type": "array",
            "items": {"type": "object", "required": ["name", "model"], "properties": {"name": _STR, "model": _STR}},
        }
    },
}

_WS: Schema = {"name": "ws", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"}}
_DOCUMENT_ID: Schema = {"name": "document_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_LIST: Schema = {"type": "object", "required": ["object", "data"], "properties": {"object": {"const": "list"}, "data": {"type": "array"}}}
_WORKSPACE: Schema = {"type": "object", "required": ["object", "name"], "properties": {"object": {"const": "workspace"}, "name": _STR}}
_RETRIEVAL: Schema = {
    "top_k": {"type": "integer", "minimum": 1, "maximum": 200},
    "candidates": {"type": "integer", "minimum": 1, "maximum": 200},
    "rerank": {"type": "integer", "minimum": 1, "maximum": 200},
    "score_threshold": {"type": "number", "minimum": -1, "maximum": 1},
}
# The settings top-level (`{"top_k": 3}`) or under `settings`, as a workspace reads back.
_WORKSPACE_SETTINGS: Schema = {
    "type": "object", "properties": {"language": _STR, "settings": {"type": "object", "properties": _RETRIEVAL}, **_RETRIEVAL},
}
_DOCUMENT: Schema = {
    "type": "object",
    # Text as `content`, or a file's bytes (a PDF) as `content_base64`.
    "oneOf": [{"required": ["content"]}, {"required": ["content_base64"]}],
    "properties": {"content": _STR, "content_base64": _STR,
                   "format": {"enum": ["markdown", "text", "html", "pdf"]},
                   "source": {"type": "string", "minLength": 1}, "metadata": _OBJ},
}
_DOCUMENTS: Schema = {
    "oneOf": [
        {**_DOCUMENT, "properties": {**_DOCUMENT["properties"], "language": _STR}},
        {"type": "object", "required": ["documents"], "properties": {"documents": {"type": "array", "items": _DOCUMENT, "minItems": 1}, "language": _STR}},
    ]
}
# Files in any field (each one a document, named by its file name), beside the two below.
_UPLOADED_DOCUMENTS: Schema = {
    "type": "object",
    "properties": {"file": {"type": "string", "format": "binary"},
                   "metadata": {"type": "string", "description": "a JSON object, for every file"}, "language": _STR},
    "additionalProperties": {"type": "string", "format": "binary"},
}

# -- operations ---------------------------------------------------------------------------------

# W3C Trace Context: read on every route that calls a backend (README "Tracing").
_TRACE_HEADERS = [
    {"name": "traceparent", "in": "header", "schema": {"type": "string", "maxLength": 200},
     "description": "W3C Trace Context: each backend request made for this one continues the trace (a parent id "
     "per attempt); an invalid one is ignored and a new trace started."},
    {"name": "tracestate", "in": "header", "schema": {"type": "string"},
     "description": "Passed on with a valid `traceparent` (at most 512 characters: whole entries dropped past it)."},
]

_CHAT_HEADERS = [
    {"name": "x-route", "in": "header", "schema": {"enum": ["direct", "rag", "workflow"]},
     "description": "Route: a backend LLM (default), RAG over `x-workspace`, or a workflow pipeline."},
    {"name": "x-workspace", "in": "header", "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
     "description": "RAG: the workspace to retrieve from (implies `x-route: rag`)."},
    {"name": "idempotency-key", "in": "header", "schema": {"type": "string", "maxLength": 200},
     "description": "A repeated request with the same key gets the first one's answer."},
    {"name": "x-request-id", "in": "header", "schema": {"type": "string", "maxLength": 200}},
    {"name": "x-cache", "in": "header", "schema": {"enum": ["exact", "off"]}},
    *_TRACE_HEADERS,
]


def _json_body(schema: Schema) -> Schema:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _ok(schema: Schema | None = None, *, media: str = "application/json", stream: str | None = None, description: str = "OK") -> Schema:
    content: dict[str, Any] = {media: {"schema": schema}} if schema is not None else {media: {}}
    if stream is not None:
        content[stream] = {"schema": _STR}
    return {"description": description, "content": content}


def _op(summary: str, tag: str, ok: Schema, *, body: Schema | None = None, dialect: str = "openai", parameters: list[Schema] | None = None, description: str | None = None) -> Operation:
    error_ref = {"$ref": f"#/components/responses/{_ERRORS[dialect]}"}
    operation: Operation = {
        "summary": summary,
        "tags": [tag],
        "responses": {"200": ok, "4XX": error_ref, "5XX": error_ref},
    }
    if description:
        operation["description"] = description
    if body is not None:
        operation["requestBody"] = _json_body(body)
    if parameters:
        operation["parameters"] = parameters
    return operation


def _health_body(statuses: list[str]) -> Schema:
    return {"type": "object", "required": ["status"], "properties": {"status": {"enum": statuses}, "checks": _OBJ, "reason": _STR}}


# (path in OpenAPI syntax, method) -> operation. Paths not served by this build are left out
# of the served document.
def _refused(operation: Operation) -> Operation:
    """An operation that always fails: it has no success response to describe."""
    responses = {status: answer for status, answer in operation["responses"].items() if status != "200"}
    return {**operation, "responses": responses}


def _ingest_operation() -> Operation:
    """201 when anything was created or changed, 200 when every document was unchanged."""
    operation = _op(
        "Ingest documents (admin keys)", "Workspaces", _ok(_OBJ), parameters=[_WS],
        description="JSON (one document, or `documents`: [...]) or multipart/form-data files. 201 when anything "
        "was created or changed, 200 when every document was unchanged.",
        body=_DOCUMENTS,
    )
    operation["requestBody"]["content"]["multipart/form-data"] = {"schema": _UPLOADED_DOCUMENTS}
    operation["responses"] = {"201": _ok(_OBJ, description="Created or changed"), **operation["responses"]}
    return operation


def _streams_operation(*args: Any, **kwargs: Any) -> Operation:
    """`/v1/streams`: 204 too, for a client past the end."""
    operation = _op(*args, **kwargs)
    operation["responses"] = {**operation["responses"], "204": {"description": "The client saw `finished` already"}}
    return operation


_RERANK_OPERATION = _op(
    "Rerank documents against a query (Jina's and Cohere's shape)", "OpenAI", _ok(_RERANK), body=_RERANK_REQUEST,
    parameters=_TRACE_HEADERS,
    description="Relayed as is to the model's OpenAI-compatible backend's `/rerank` (vLLM, llama.cpp, Infinity); "
    "a model on an Ollama or Anthropic backend is a 400.",
)
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("/v1/chat/completions", "post"): _op(
        "Chat completion (OpenAI)", "OpenAI",
        _ok(_CHAT_COMPLETION, stream="text/event-stream"), body=_CHAT_REQUEST, parameters=_CHAT_HEADERS,
        description="`stream: true` answers with server-sent events ending in `data: [DONE]`.",
    ),
    ("/v1/completions", "post"): _op(
        "Text completion (OpenAI's legacy API; fill-in-the-middle with `suffix`)", "OpenAI",
        _ok(_TEXT_COMPLETION, stream="text/event-stream"), body=_COMPLETIONS_REQUEST,
        parameters=[{"name": name, "in": "header", "schema": {"type": "string", "maxLength": 200},
                     "description": "Passed on to the backend."} for name in ("x-request-id", "x-correlation-id")]
        + _TRACE_HEADERS,
        description="Relayed as is to the model's OpenAI-compatible or Ollama backend (the body with `model` "
        "replaced by the backend's name for it; the answer, `stream: true` SSE included, byte for byte). "
        "A model on an Anthropic backend is a 400. No completion log, idempotency, caches or fallbacks.",
    ),
    **{(path, "post"): _RERANK_OPERATION for path in ("/v1/rerank", "/v2/rerank", "/rerank")},
    ("/v1/models", "get"): _op(
        "Models this key may use (OpenAI; Anthropic's with `anthropic-version`)", "OpenAI",
        _ok({"oneOf": [_MODEL_LIST, _ANTHROPIC_MODEL_PAGE]}),
        parameters=[
            _ANTHROPIC_VERSION,
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
             "description": "Anthropic's shape only: models per page (20 by default)."},
            {"name": "after_id", "in": "query", "schema": _STR, "description": "Anthropic's shape only: the page after this model."},
            {"name": "before_id", "in": "query", "schema": _STR, "description": "Anthropic's shape only: the page before this model."},
        ],
        description="With `anthropic-version` (Anthropic's SDK sends it) the list is Anthropic's cursor page, "
        "without the in-process embedding model, and errors come in Anthropic's shape.",
    ),
    ("/v1/models/{model_id}", "get"): _op(
        "A model this key may use (OpenAI; Anthropic's with `anthropic-version`)", "OpenAI",
        _ok({"oneOf": [_MODEL, _ANTHROPIC_MODEL]}),
        parameters=[{"name": "model_id", "in": "path", "required": True, "schema": _STR}, _ANTHROPIC_VERSION],
        description="An id not listed by `GET /v1/models` is a 404: `model_not_found` (OpenAI), "
        "`not_found_error` (Anthropic).",
    ),
    ("/v1/embeddings", "post"): _op(
        "Embeddings (OpenAI)", "OpenAI", _ok(_EMBEDDINGS), body=_EMBEDDINGS_REQUEST, parameters=_TRACE_HEADERS
    ),
    ("/v1/messages", "post"): _op(
        "Message (Anthropic)", "Anthropic", _ok(_MESSAGE, stream="text/event-stream"),
        body=_MESSAGES_REQUEST, dialect="anthropic", parameters=_CHAT_HEADERS,
    ),
    ("/v1/messages/count_tokens", "post"): _op(
        "Count a message's input tokens (Anthropic)", "Anthropic",
        _ok({"type": "object", "required": ["input_tokens"], "properties": {"input_tokens": _INT}}),
        body=_COUNT_REQUEST, dialect="anthropic",
    ),
    ("/v1/responses", "post"): _op(
        "Response (OpenAI's Responses API)", "OpenAI", _ok(_RESPONSE, stream="text/event-stream"),
        body=_RESPONSES_REQUEST, parameters=_CHAT_HEADERS,
        description="Translated to a chat for any backend; `stream: true` answers with `event: response.*` "
        "server-sent events. `previous_response_id` continues a response the journal keeps (400 "
        "`previous_response_not_found` for one it does not), and an `item_reference` "
        "input stands for one of its items (404 for one it does not keep); `conversation` puts a stored "
        "conversation's items first and appends the response's input and output to it once completed (see "
        "`/v1/conversations`; one response at a time: another meanwhile is a 400 `conversation_locked`); "
        "`prompt` is a 400; `background: true` runs on when the connection drops (without `stream`, answered "
        "`queued` at once: poll `GET /v1/responses/{response_id}`).",
    ),
    ("/v1/responses/compact", "post"): _op(
        "Compact a conversation (OpenAI's compact)", "OpenAI",
        _ok({"type": "object", "required": ["id", "object", "created_at", "output", "usage"], "properties": {
            "id": _STR, "object": {"const": "response.compaction"}, "created_at": _INT,
            "output": {"type": "array", "items": _OBJ}, "usage": _OBJ,
        }}),
        body={"type": "object", "required": ["model"], "properties": {
            "model": _STR, "input": {}, "instructions": _STR, "previous_response_id": _STR,
        }},
        description="The model summarizes the conversation (`input`, or that of `previous_response_id`), fitted to "
        "its window; the answer is the conversation's user messages and a `compaction` item holding the summary "
        "(encoded, not encrypted), which a later request's `input` takes in place of what it summarized.",
    ),
    ("/v1/responses/input_tokens", "post"): _op(
        "Count a response's input tokens (OpenAI's input_tokens.count)", "OpenAI",
        _ok({"type": "object", "required": ["object", "input_tokens"], "properties": {
            "object": {"const": "response.input_tokens"}, "input_tokens": _INT,
        }}),
        body={"type": "object", "properties": {
            "model": _STR, "input": {}, "instructions": _STR, "tools": {"type": "array", "items": _OBJ},
            "previous_response_id": _STR, "conversation": {},
        }},
        description="The request `POST /v1/responses` would send for this body (with the response or conversation "
        "it continues and the items it references) counted by the backend's tokenizer (Anthropic's count_tokens, "
        "vLLM's `/tokenize`), else estimated at about four characters a token (`x-token-count: estimate`); a model "
        "the backend says it lacks is a 404. `model` may be left out with `previous_response_id` (that response's). "
        "Nothing is generated or charged as usage.",
    ),
    ("/v1/responses/{response_id}", "get"): _op(
        "A response read back from the journal (OpenAI's retrieve; with `stream=true`, its resume)", "OpenAI",
        _ok(_RESPONSE, stream="text/event-stream"),
        parameters=[
            _RESPONSE_ID,
            {"name": "stream", "in": "query", "schema": _BOOL, "description": "The response's events again, as SSE."},
            {"name": "starting_after", "in": "query", "schema": {"type": "integer", "minimum": 0},
             "description": "With `stream=true`: the last `sequence_number` seen; the events after it "
             "(`Last-Event-ID`, the frames' `id`, wins, and is answered 204 when there are none)."},
        ],
        description="Found while the journal keeps the response (its row, and its events on NATS); the settings "
        "it echoes are the defaults, not the request's.",
    ),
    ("/v1/responses/{response_id}", "delete"): _op(
        "Delete a response (OpenAI's delete)", "OpenAI",
        _ok({"type": "object", "required": ["id", "object", "deleted"], "properties": {
            "id": _STR, "object": {"enum": ["response.deleted"]}, "deleted": _BOOL,
        }}),
        parameters=[_RESPONSE_ID],
        description="Its answer, request and events leave the journal, on every instance: read back, continued, "
        "listed or referenced it is then a 404. A background response still running is cancelled first; one "
        "still streaming to its client is a 400.",
    ),
    ("/v1/responses/{response_id}/input_items", "get"): _op(
        "A response's input items (OpenAI's list), from the journal", "OpenAI", _ok(_LIST),
        parameters=[
            _RESPONSE_ID,
            {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}, "description": "Default `desc`."},
            {"name": "after", "in": "query", "schema": _STR, "description": "An item's id: the items after it."},
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
        ],
    ),
    ("/v1/responses/{response_id}/cancel", "post"): _op(
        "Cancel a background response (OpenAI's cancel)", "OpenAI", _ok(_RESPONSE), parameters=[_RESPONSE_ID],
        description="Stops a response on whichever instance runs it (passed on over NATS; 409 when that instance "
        "does not stop it within 10 s) and answers it `cancelled`; one that has ended is answered as it stands.",
    ),
    ("/v1/streams/{trace_id}", "get"): _streams_operation(
        "Resume a trace's event stream", "Streams", _ok(media="text/event-stream"),
        parameters=[
            {"name": "trace_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}},
            {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0},
             "description": "The last sequence number seen (`Last-Event-ID`, when sent, wins)."},
        ],
        description="Server-sent events `id: SEQ`, `event: TYPE`, ending after `finished`; 204 (no content) for a "
        "client that saw `finished` already, which ends a browser's EventSource.",
    ),
    ("/api/chat", "post"): _op(
        "Chat (Ollama)", "Ollama", _ok(_OBJ, stream="application/x-ndjson"), body=_OLLAMA_CHAT, dialect="ollama",
        parameters=_CHAT_HEADERS, description="Streams NDJSON unless `stream: false`.",
    ),
    ("/api/generate", "post"): _op(
        "Generate (Ollama)", "Ollama", _ok(_OBJ, stream="application/x-ndjson"), body=_OLLAMA_GENERATE,
        dialect="ollama", parameters=_CHAT_HEADERS,
    ),
    ("/api/tags", "get"): _op("Models this key may use (Ollama)", "Ollama", _ok(_OLLAMA_TAGS), dialect="ollama"),
    ("/api/show", "post"): _op("A model's details (Ollama)", "Ollama", _ok(_OBJ), body=_OLLAMA_SHOW, dialect="ollama"),
    ("/api/ps", "get"): _op(
        "Running models (Ollama): what the Ollama backends hold in memory", "Ollama",
        _ok({"type": "object", "required": ["models"], "properties": {"models": {"type": "array", "items": _OBJ}}}),
        dialect="ollama",
    ),
    ("/api/pull", "post"): _op(
        "Pull a model (Ollama): succeeds at once for a served model", "Ollama",
        _ok({"type": "object", "required": ["status"], "properties": {"status": _STR}}, stream="application/x-ndjson"),
        body={"type": "object", "properties": {"model": _STR, "name": _STR, "stream": _BOOL, "insecure": _BOOL}},
        dialect="ollama", description="A model the gateway does not serve is a 404, as Ollama's for an unknown model.",
    ),
    **{
        (path, method): _refused(_op(
            f"{what} (Ollama): not available through the gateway (a 403)", "Ollama", {},
            body=_OBJ if method == "post" else None, dialect="ollama",
            parameters=[{"name": "digest", "in": "path", "required": True, "schema": _STR}] if "{digest}" in path else None,
        ))
        for path, method, what in (
            ("/api/delete", "delete", "Delete a model"),
            ("/api/delete", "post", "Delete a model"),
            ("/api/copy", "post", "Copy a model"),
            ("/api/create", "post", "Create a model"),
            ("/api/push", "post", "Push a model"),
            ("/api/blobs/{digest}", "head", "Check a blob"),
            ("/api/blobs/{digest}", "post", "Upload a blob"),
        )
    },
    ("/api/version", "get"): _op(
        "Version (Ollama)", "Ollama", _ok({"type": "object", "required": ["version"], "properties": {"version": _STR}}),
        dialect="ollama",
    ),
    ("/api/embed", "post"): _op("Embeddings (Ollama)", "Ollama", _ok(_OBJ), body=_OLLAMA_EMBED, dialect="ollama"),
    ("/api/embeddings", "post"): _op(
        "Embedding, legacy (Ollama)", "Ollama", _ok(_OBJ), body=_OLLAMA_EMBEDDINGS, dialect="ollama"
    ),
    ("/", "get"): _op("Ollama's liveness text", "Ollama", _ok(media="text/plain"), dialect="ollama"),
    ("/", "head"): _op("Ollama's liveness probe", "Ollama", {"description": "OK"}, dialect="ollama"),
    ("/v1/workspaces", "get"): _op("List RAG workspaces", "Workspaces", _ok(_LIST)),
    ("/v1/workspaces/{ws}", "get"): _op("A workspace", "Workspaces", _ok(_WORKSPACE), parameters=[_WS]),
    ("/v1/workspaces/{ws}", "put"): _op(
        "Create a workspace, or change its retrieval settings (admin keys)", "Workspaces", _ok(_WORKSPACE),
        body=_WORKSPACE_SETTINGS, parameters=[_WS],
    ),
    ("/v1/workspaces/{ws}", "delete"): _op(
        "Delete a workspace and its documents (admin keys)", "Workspaces", _ok(_OBJ), parameters=[_WS]
    ),
    ("/v1/workspaces/{ws}/documents", "post"): _ingest_operation(),
    ("/v1/workspaces/{ws}/documents", "get"): _op(
        "List a workspace's documents", "Workspaces", _ok(_LIST),
        parameters=[_WS, {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}}],
    ),
    ("/v1/workspaces/{ws}/documents/{document_id}", "get"): _op(
        "A document's metadata, as the list shows it", "Workspaces", _ok(_OBJ), parameters=[_WS, _DOCUMENT_ID],
    ),
    ("/v1/workspaces/{ws}/documents/{document_id}", "delete"): _op(
        "Delete a document (admin keys)", "Workspaces", _ok(_OBJ), parameters=[_WS, _DOCUMENT_ID],
    ),
    ("/v1/workspaces/{ws}/search", "post"): _op(
        "Retrieval only: the passages a query gets", "Workspaces", _ok(_OBJ), parameters=[_WS],
        # An empty (or blank) query finds nothing: an empty list, not an error.
        body={"type": "object", "required": ["query"], "properties": {"query": _STR, **_RETRIEVAL}, "additionalProperties": False},
    ),
    ("/health", "get"): _op("Liveness", "Operations", _ok(_health_body(["ok"]))),
    ("/ready", "get"): _op(
        "Readiness: backends, PostgreSQL, NATS", "Operations",
        {"description": "Ready", "content": {"application/json": {"schema": _health_body(["ok"])}}},
        description="503 with the failing checks when a dependency is down.",
    ),
    ("/metrics", "get"): _op(
        "Prometheus metrics: requests, durations, time to first token, tokens", "Operations",
        {"description": "Prometheus's text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}},
    ),
    ("/openapi.json", "get"): _op("This document", "Operations", _ok(_OBJ)),
}


def document(path: str, method: str, operation: Operation) -> None:
    """Describe a route (OpenAPI path syntax, lower-case method) from its own module."""
    OPERATIONS[(path, method.lower())] = operation


_CONVERTER = re.compile(r"<(?:[a-z_]+:)?([A-Za-z_][A-Za-z0-9_]*)>")


def openapi_path(rule: str) -> str:
    """`/v1/streams/<trace_id>` -> `/v1/streams/{trace_id}`."""
    return _CONVERTER.sub(r"{\1}", rule)


def served_operations(rules: list[tuple[str, set[str]]]) -> set[tuple[str, str]]:
    """(OpenAPI path, method) of every served route; HEAD only where a route asks for it."""
    found: set[tuple[str, str]] = set()
    for rule, methods in rules:
        if rule.startswith("/static"):
            continue
        explicit_head = "HEAD" in methods and "GET" not in methods
        for method in methods - {"OPTIONS", "HEAD"}:
            found.add((openapi_path(rule), method.lower()))
        if explicit_head or (rule == "/" and "HEAD" in methods):
            found.add((openapi_path(rule), "head"))
    return found


def build_document(rules: list[tuple[str, set[str]]], public_paths: set[str]) -> dict[str, Any]:
    paths: dict[str, dict[str, Operation]] = {}
    for path, method in sorted(served_operations(rules)):
        operation = OPERATIONS.get((path, method))
        if operation is None:
            operation = {"summary": "Undocumented", "responses": {"default": {"description": "Any"}}}
        if path in public_paths:
            operation = {**operation, "security": []}
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-proxy",
            "version": __version__,
            "description": "An LLM gateway speaking the OpenAI, Anthropic and Ollama APIs in front of "
            "self-hosted backends. Errors come in the dialect of the path: `/api/*` Ollama's, "
            "`/v1/messages*` Anthropic's, everything else OpenAI's.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer sk-llmp-...`"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
            "schemas": {"OpenAIError": _OPENAI_ERROR, "AnthropicError": _ANTHROPIC_ERROR, "OllamaError": _OLLAMA_ERROR},
            "responses": {
                name: {
                    "description": f"An error in {name.removesuffix('Error')}'s shape",
                    "headers": {
                        "retry-after": {"schema": _INT, "description": "On 429 and 503: seconds to wait."},
                        "www-authenticate": {"schema": _STR, "description": "On 401."},
                    },
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
                }
                for name in _ERRORS.values()
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }


def app_rules(app: Quart | None = None) -> list[tuple[str, set[str]]]:
    """Every route the app serves: Quart's, and the exchange front door's."""
    app = app or current_app
    rules = [(rule.rule, set(rule.methods or ())) for rule in app.url_map.iter_rules()]
    return rules + cast(GatewayApp, app).front.rules()


@blueprint.get("/openapi.json")
async def openapi_document() -> Response:
    gw = gateway()
    if gw.auth is None or gw.auth.enabled() is False:
        public = {path for path, _ in OPERATIONS} | {openapi_path(rule) for rule, _ in app_rules()}
    else:
        public = {"/health", *gw.settings.auth_public_paths}
    document_ = build_document(app_rules(), public)
    return Response(json.dumps(document_), content_type="application/json")
