"""OpenAI Response objects: a finished (or failed) answer in the Responses API's wire form.

Output items come in the order a model produces them: its reasoning, its message, its
function calls. Ids are the response's own (`resp_<trace id>`) with the item's kind and
position, so a streamed answer and its final Response name the same items.
"""

from __future__ import annotations

from typing import Any

from proxy.dialects import openai
from proxy.dialects._json import dumps
from proxy.dialects.responses._compaction import COMPACTED, compaction_answer
from proxy.dialects.responses._request import CONVERSATION_PREFIX, namespaces_of, split_name
from proxy.dialects.responses._signed import signed_content
from proxy.domain.chat import ChatCompletion, Choice, FinishReason, ToolCall, Usage
from proxy.domain.errors import ErrorKind, GatewayError

# FinishReason -> the `incomplete_details.reason` of an incomplete Response.
_INCOMPLETE = {FinishReason.LENGTH: "max_output_tokens", FinishReason.CONTENT_FILTER: "content_filter"}


def response_id(trace_id: str) -> str:
    return "resp_" + trace_id


def item_id(response: str, kind: str, output_index: int) -> str:
    """`msg_…`, `rs_…`, `fc_…`: the item's kind, then the response's id and its position."""
    return f"{kind}_{response.removeprefix('resp_')}_{output_index}"


def status_of(finish: FinishReason | None) -> tuple[str, dict[str, str] | None]:
    """The Response's `status` and `incomplete_details` for how its answer ended."""
    reason = _INCOMPLETE.get(finish) if finish is not None else None
    return ("incomplete", {"reason": reason}) if reason is not None else ("completed", None)


def usage_to_wire(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_tokens or 0,
            "cache_write_tokens": usage.cache_write_tokens or 0,
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens or 0},
        "total_tokens": usage.total_tokens,
    }


# A refusal made after translation (by the chat codecs, a backend's encoder, a backend) names
# the chat field; a Responses client sent it under its own name.
_CHAT_FIELDS = {
    "messages": "input", "reasoning_effort": "reasoning.effort", "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
}


def render_error(error: GatewayError) -> bytes:
    """An error in OpenAI's shape, its `param` named as in the Responses request."""
    param = error.param
    if param is not None:
        field = param.split("[", 1)[0].split(".", 1)[0]
        if field in _CHAT_FIELDS:
            error = GatewayError(
                error.kind, error.message, param=_CHAT_FIELDS[field], code=error.code, retry_after=error.retry_after,
                hopeless=error.hopeless, exhausted=error.exhausted,
            )
    return openai.render_error(error)


# The SDK's codes name no gateway condition but a rate limit and a request at fault (a prompt
# too long for the model, a field its backend refuses: what a background run learns once its
# client was answered); every other failure is OpenAI's `server_error`.
_FAILURE_CODES = {
    ErrorKind.RATE_LIMITED: "rate_limit_exceeded",
    ErrorKind.INVALID_REQUEST: "invalid_prompt",
    ErrorKind.REQUEST_TOO_LARGE: "invalid_prompt",
}


def error_to_wire(error: GatewayError) -> dict[str, Any]:
    """A failed Response's `error`, its message kept."""
    return {"code": _FAILURE_CODES.get(error.kind, "server_error"), "message": error.message}


def response_object(
    *,
    response: str,
    created_at: int,
    model: str,
    settings: dict[str, Any],
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    incomplete_details: dict[str, str] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body = {
        "id": response,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "completed_at": None,
        "error": error,
        "incomplete_details": incomplete_details,
        "model": model,
        "output": output,
        "usage": usage,
        **settings,
    }
    body.pop(CONVERSATION_PREFIX, None)  # the gateway's own notes, not the request's
    body.pop(COMPACTED, None)
    return body


def summarized(settings: dict[str, Any] | None) -> bool:
    """Whether the request asked for reasoning summaries (`reasoning.summary`). The gateway
    makes none, so the model's reasoning itself is then the summary: clients that show only
    summaries (the AI SDK's `openai(...)`, Codex CLI, LangChain) would otherwise show nothing."""
    reasoning = settings.get("reasoning") if settings else None
    return isinstance(reasoning, dict) and bool(reasoning.get("summary"))


def reasoning_item(item: str, text: str, status: str, summary: bool = False, signature: str = "") -> dict[str, Any]:
    """`summary`: the text as the item's summary, as OpenAI gives a summary asked for (and no
    `content`); else as its `reasoning_text` part, as vLLM gives a model's reasoning.
    `signature`: Claude's for this thinking, carried in `encrypted_content`."""
    # Claude's redacted thinking (signed, no text) has nothing to read, as OpenAI's encrypted own.
    shown = text or (status != "in_progress" and not signature)
    parts = [{"type": "summary_text" if summary else "reasoning_text", "text": text}] if shown else []
    if summary:
        out: dict[str, Any] = {"id": item, "type": "reasoning", "summary": parts, "status": status}
    else:
        out = {"id": item, "type": "reasoning", "summary": [], "content": parts, "status": status}
    if signature:
        out["encrypted_content"] = signed_content(text, signature)
    return out


def message_item(item: str, text: str | None, status: str, logprobs: list[Any] | None = None) -> dict[str, Any]:
    """`text` None: the message as just opened, before its first part. `logprobs`: its
    tokens' (OpenAI's entries), when they were asked for."""
    content = [] if text is None else [output_text(text, logprobs)]
    return {"id": item, "type": "message", "role": "assistant", "status": status, "content": content}


def output_text(text: str, logprobs: list[Any] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def call_item(
    item: str, call_id: str, name: str, arguments: str, status: str, namespaces: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """`namespaces`: the request's tool namespaces, whose tools' calls name their namespace."""
    namespace, name = split_name(name, namespaces)
    return {
        "id": item, "type": "function_call", "call_id": call_id, "name": name,
        **({"namespace": namespace} if namespace is not None else {}), "arguments": arguments, "status": status,
    }


def output_of(
    completion: ChatCompletion, response: str, status: str, *, summary: bool = False,
    namespaces: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """The first choice as output items (a Response has one answer); `summary`: see
    `summarized`; `namespaces`: the request's tool namespaces (see `namespaces_of`)."""
    choice = completion.choices[0] if completion.choices else None
    output: list[dict[str, Any]] = []
    if choice is None:
        return [message_item(item_id(response, "msg", 0), "", status)]
    for text, signature in _reasoning_blocks(choice):
        output.append(reasoning_item(item_id(response, "rs", len(output)), text, "completed", summary, signature))
    if choice.content or not choice.tool_calls:
        entries = choice.logprobs.get("content") if choice.logprobs is not None else None
        logprobs = entries if isinstance(entries, list) else None
        output.append(message_item(item_id(response, "msg", len(output)), choice.content, status, logprobs))
    for call in choice.tool_calls:
        output.append(_call(response, len(output), call, namespaces))
    return output


def _reasoning_blocks(choice: Choice) -> list[tuple[str, str]]:
    """The reasoning as items hold it, (text, signature) each: a block Claude signed is an
    item of its own (as its stream gave it), its signature in `encrypted_content`."""
    blocks = list(choice.signed)
    rest = choice.reasoning[sum(len(text) for text, _ in blocks):]
    if rest or (choice.reasoning and not blocks):
        blocks.append((rest, ""))
    return blocks


def _call(response: str, index: int, call: ToolCall, namespaces: frozenset[str]) -> dict[str, Any]:
    return call_item(item_id(response, "fc", index), call.id, call.name, call.arguments, "completed", namespaces)


def render_response(
    completion: ChatCompletion, *, response: str, model: str, settings: dict[str, Any], created_at: int,
    completed_at: int,
) -> bytes:
    """The whole Response of a non-streaming request (`model` as the client named it)."""
    choice = completion.choices[0] if completion.choices else None
    status, incomplete = status_of(choice.finish_reason if choice else None)
    output = (
        [compaction_answer(completion, response)] if settings.get(COMPACTED)
        else output_of(completion, response, status, summary=summarized(settings), namespaces=namespaces_of(settings))
    )
    body = response_object(
        response=response, created_at=created_at, model=model, settings=settings,
        status=status, output=output, usage=usage_to_wire(completion.usage),
        incomplete_details=incomplete,
    )
    if status == "completed":
        body["completed_at"] = completed_at
    return dumps(body)
