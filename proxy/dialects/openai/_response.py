"""OpenAI completions, errors and model lists: parse a backend's, render the client's."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from proxy.dialects._json import dumps
from proxy.domain.chat import ChatCompletion, Choice, FinishReason, ToolCall, Usage
from proxy.domain.errors import ErrorKind, Exhausted, GatewayError
from proxy.domain.events import Finish, StopSequenceFinish, StreamEvent, completion_events

_ERROR_TYPES = {
    ErrorKind.INVALID_REQUEST: "invalid_request_error",
    ErrorKind.AUTHENTICATION: "authentication_error",
    ErrorKind.PERMISSION: "permission_error",
    ErrorKind.NOT_FOUND: "invalid_request_error",
    ErrorKind.METHOD_NOT_ALLOWED: "invalid_request_error",
    ErrorKind.REQUEST_TIMEOUT: "invalid_request_error",
    ErrorKind.CONFLICT: "conflict_error",
    ErrorKind.REQUEST_TOO_LARGE: "invalid_request_error",
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: "invalid_request_error",
    ErrorKind.RATE_LIMITED: "rate_limit_error",
    ErrorKind.INTERNAL: "server_error",
    ErrorKind.BACKEND: "backend_error",
    ErrorKind.UNAVAILABLE: "service_unavailable_error",
    ErrorKind.TIMEOUT: "timeout_error",
}

_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": FinishReason.STOP,
    "eos": FinishReason.STOP,
    "eos_token": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "end_turn": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "max_tokens": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "tool_use": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
}

# Backends that end a choice with these are reporting a failure, not a finish.
FAILED_FINISH_REASONS = frozenset({"error", "abort", "cancelled"})


def failed_finish_reason(data: dict[str, Any]) -> str | None:
    """The finish reason by which a backend's completion reports a failure, if one does."""
    for choice in data.get("choices") or ():
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if isinstance(reason, str) and reason in FAILED_FINISH_REASONS:
            return reason
    return None


def stop_string(choice: dict[str, Any]) -> Any:
    """What ended a backend's choice, as it names it: vLLM's `stop_reason`, SGLang's
    `matched_stop` (a stop string, or the id of the token that ended it)."""
    said = choice.get("stop_reason")
    return said if said is not None else choice.get("matched_stop")


def finish_event(reason: FinishReason, choice: int, stop_reason: Any) -> Finish:
    """A choice's finish; vLLM's `stop_reason` names the stop string that ended it (an int
    is a stop token's id, no sequence the client sent)."""
    if reason is FinishReason.STOP and isinstance(stop_reason, str) and stop_reason:
        return StopSequenceFinish(reason, choice, stop_reason)
    return Finish(reason, choice)


def completion_events_of(data: dict[str, Any], completion: ChatCompletion) -> list[StreamEvent]:
    """The events replaying a backend's `chat.completion`, its stop strings included."""
    events = completion_events(completion)
    stops = {
        int(item.get("index", position)): stop_string(item)
        for position, item in enumerate(data.get("choices") or [])
        if isinstance(item, dict) and isinstance(stop_string(item), str)
    }
    if not stops:
        return events
    return [finish_event(e.reason, e.choice, stops.get(e.choice)) if type(e) is Finish else e for e in events]


def finish_reason_from_wire(value: str) -> FinishReason:
    """Map any backend's finish reason onto OpenAI's enum (unknown ones read as `stop`)."""
    return _FINISH_REASONS.get(value, FinishReason.STOP)


# OpenAI's exhausted quota is its own type (and code), which clients tell from a rate limit.
INSUFFICIENT_QUOTA = "insufficient_quota"


# OpenAI's 429 for a rate limit is typed by the limit it hit.
_EXHAUSTED_TYPES = {Exhausted.REQUESTS: "requests", Exhausted.TOKENS: "tokens"}
_TYPES_EXHAUSTED = {value: key for key, value in _EXHAUSTED_TYPES.items()}


def _error_type(error: GatewayError) -> str:
    if error.code == INSUFFICIENT_QUOTA:
        return INSUFFICIENT_QUOTA
    if error.exhausted is not None and error.kind is ErrorKind.RATE_LIMITED:
        return _EXHAUSTED_TYPES[error.exhausted]
    return _ERROR_TYPES.get(error.kind, "server_error")


def exhausted_of_body(body: bytes) -> Exhausted | None:
    """The limit an OpenAI 429 body says ran out (its `type`), if it says one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return _TYPES_EXHAUSTED.get(kind) if isinstance(kind, str) else None


def error_body(error: GatewayError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": _error_type(error),
            "param": error.param,
            "code": error.code,
        }
    }


def render_error(error: GatewayError) -> bytes:
    return dumps(error_body(error))


def error_message_from_body(body: bytes) -> str | None:
    """The message of an error body in OpenAI's (or a close cousin's) shape, if there is one:
    a FastAPI validation error's (vLLM, TGI, Infinity) made readable (`validation_error`)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail")
            if isinstance(message, str):
                readable = _validation_of_repr(message)
                return readable[0] if readable is not None else message
        if isinstance(error, str):
            return error
        detail = data.get("detail")
        if isinstance(detail, str):
            return detail
        readable = _validation_of_list(detail)
        if readable is not None:
            return readable[0]
    return None


def error_code_and_param_from_body(body: bytes) -> tuple[str | None, str | None]:
    """The `code` and `param` strings of an error body in OpenAI's shape (vLLM's numeric
    `code` is the status again, not a code); a validation error's `param` is its field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    error = data.get("error", data)
    if not isinstance(error, dict):
        return None, None
    code, param = error.get("code"), error.get("param")
    code = code if isinstance(code, str) and code else None
    if isinstance(param, str) and param:
        return code, param
    message, detail = error.get("message"), data.get("detail")
    readable = _validation_of_repr(message) if isinstance(message, str) else _validation_of_list(detail)
    return code, readable[1] if readable is not None else None


# A FastAPI validation error lists pydantic's errors; it says the first few, in a line.
_VALIDATION_ERRORS_SAID = 3
# Where FastAPI found the field: not part of its name.
_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})
# pydantic's errors as Python prints them, inside vLLM's `{"object": "error", "message": ...}`.
_ERROR_REPR = re.compile(r"""'loc': \((?P<loc>[^)]*)\), 'msg': (?P<msg>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
_LOC_PART = re.compile(r"""'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"|(-?\d+)""")


def validation_error_from_body(body: bytes) -> tuple[str, str | None] | None:
    """A FastAPI validation error's message made readable, and its field, whatever the
    dialect around it (a 422's `detail` list, or vLLM's 400 printing pydantic's errors)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error", data)
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str):
        return _validation_of_repr(message)
    return _validation_of_list(data.get("detail"))


def _validation_of_list(detail: Any) -> tuple[str, str | None] | None:
    """FastAPI's 422 body `{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`: the
    message (`top_n: Input should be greater than 0`) and the field (`top_n`)."""
    if not isinstance(detail, list) or not detail:
        return None
    errors: list[tuple[list[Any], str]] = []
    for item in detail:
        if not isinstance(item, dict) or not isinstance(item.get("msg"), str):
            return None
        loc = item.get("loc")
        errors.append((loc if isinstance(loc, list) else [], item["msg"]))
    return _validation_said(errors)


def _validation_of_repr(message: str) -> tuple[str, str | None] | None:
    """The same errors printed by Python, as vLLM words its validation 400s."""
    errors: list[tuple[list[Any], str]] = []
    for match in _ERROR_REPR.finditer(message):
        loc: list[Any] = [
            int(number) if number else (single or double)
            for single, double, number in _LOC_PART.findall(match["loc"])
        ]
        errors.append((loc, match["msg"][1:-1]))
    return _validation_said(errors) if errors else None


def _validation_said(errors: list[tuple[list[Any], str]]) -> tuple[str, str | None] | None:
    if not errors:
        return None
    said = []
    for loc, msg in errors[:_VALIDATION_ERRORS_SAID]:
        field = _field_name(loc)
        said.append(f"{field}: {msg}" if field else msg)
    more = len(errors) - _VALIDATION_ERRORS_SAID
    message = "; ".join(said) + (f" (and {more} more)" if more > 0 else "")
    return message, _field_name(errors[0][0]) or None


def _field_name(loc: list[Any]) -> str:
    """`["body", "messages", 0, "content"]` is `messages[0].content`."""
    parts = loc[1:] if loc and loc[0] in _LOCATIONS else loc
    name = ""
    for part in parts:
        if isinstance(part, int) and not isinstance(part, bool):
            name += f"[{part}]"
        elif isinstance(part, str) and part:
            name += f".{part}" if name else part
    return name


def _is_count(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def parse_usage(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    prompt = data.get("prompt_tokens") or 0
    completion = data.get("completion_tokens") or 0
    if not (_is_count(prompt) and _is_count(completion)):
        return None  # not counts (a string, an object, NaN): as if the server had sent none
    if not prompt and not completion:
        # No prompt is zero tokens: LocalAI's zeros on every chunk count nothing, and would
        # have made its answers free to a key's budget.
        return None
    prompt_details = data.get("prompt_tokens_details")
    completion_details = data.get("completion_tokens_details")
    return Usage(
        prompt_tokens=int(prompt),
        completion_tokens=int(completion),
        cached_tokens=prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None,
        reasoning_tokens=(
            completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else None
        ),
    )


def render_usage(usage: Usage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if usage.reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return out


def parse_completion(data: dict[str, Any]) -> ChatCompletion:
    """A backend's `chat.completion` object in domain form (tolerant of missing fields)."""
    choices = []
    for position, item in enumerate(data.get("choices") or []):
        if not isinstance(item, dict):
            continue
        message = item.get("message") or {}
        calls = [
            ToolCall(
                id=str(call.get("id") or f"call_{position}_{i}"),
                name=str((call.get("function") or {}).get("name") or ""),
                arguments=_arguments_text((call.get("function") or {}).get("arguments")),
            )
            for i, call in enumerate(message.get("tool_calls") or [])
            if isinstance(call, dict)
        ]
        reason = item.get("finish_reason")
        finish = finish_reason_from_wire(reason) if isinstance(reason, str) else None
        if finish is FinishReason.STOP and calls:
            # Some backends say `stop` (or something unknown) after calling tools; the stream
            # parser reads that as `tool_calls`, and a whole answer must end the same way.
            finish = FinishReason.TOOL_CALLS
        choices.append(
            Choice(
                index=int(item.get("index", position)),
                content=message.get("content") or "",
                reasoning=message.get("reasoning_content") or message.get("reasoning") or "",
                tool_calls=calls,
                finish_reason=finish,
                logprobs=item["logprobs"] if isinstance(item.get("logprobs"), dict) else None,
                refusal=refusal if isinstance(refusal := message.get("refusal"), str) else "",
                annotations=[a for a in notes if isinstance(a, dict)]
                if isinstance(notes := message.get("annotations"), list) else [],
                function_call=ToolCall("", str(legacy.get("name") or ""), _arguments_text(legacy.get("arguments")))
                if isinstance(legacy := message.get("function_call"), dict) else None,
                audio=dict(spoken) if isinstance(spoken := message.get("audio"), dict) else None,
            )
        )
    return ChatCompletion(
        id=str(data.get("id") or ""),
        model=str(data.get("model") or ""),
        created=int(data.get("created") or 0),
        choices=choices,
        usage=parse_usage(data.get("usage")),
        system_fingerprint=data.get("system_fingerprint"),
    )


def _arguments_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


def reasoning_fields(text: str) -> dict[str, str]:
    """A model's reasoning under both names OpenAI-compatible servers give it: `reasoning`
    (vLLM's today, OpenRouter's; what the OpenAI Agents SDK for JS reads) and `reasoning_content`
    (DeepSeek's, older vLLM's; what LangChain reads). Clients read one, preferring either."""
    return {"reasoning": text, "reasoning_content": text}


def completion_body(completion: ChatCompletion, *, single_tool: bool = False) -> dict[str, Any]:
    """`single_tool`: the client set `parallel_tool_calls: false`, a promise of one call at most
    that a backend without the option (Ollama) or ignoring it may not keep."""
    choices = []
    for choice in completion.choices:
        message: dict[str, Any] = {"role": "assistant", "content": choice.content or None}
        if choice.refusal:
            message["refusal"] = choice.refusal
        if choice.annotations:
            message["annotations"] = choice.annotations
        legacy = choice.function_call
        if legacy is not None:
            message["function_call"] = {"name": legacy.name, "arguments": legacy.arguments}
        if choice.audio is not None:
            message["audio"] = choice.audio
        if choice.reasoning:
            message.update(reasoning_fields(choice.reasoning))
        if choice.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in (choice.tool_calls[:1] if single_tool else choice.tool_calls)
            ]
        elif message["content"] is None and not choice.refusal and legacy is None and choice.audio is None:
            message["content"] = ""
        reason = choice.finish_reason or FinishReason.STOP
        said = LEGACY_FUNCTION_CALL if legacy is not None and reason is FinishReason.TOOL_CALLS else reason.value
        choices.append({"index": choice.index, "message": message, "logprobs": choice.logprobs, "finish_reason": said})
    body: dict[str, Any] = {
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "choices": choices,
    }
    if completion.usage is not None:
        body["usage"] = render_usage(completion.usage)
    if completion.system_fingerprint is not None:
        body["system_fingerprint"] = completion.system_fingerprint
    return body


def render_completion(completion: ChatCompletion, *, single_tool: bool = False) -> bytes:
    return dumps(completion_body(completion, single_tool=single_tool))


def completion_is_conformant(data: dict[str, Any]) -> bool:
    """Whether a backend's completion can be relayed to an OpenAI client byte for byte."""
    choices = data.get("choices")
    if not isinstance(choices, list) or data.get("object") != "chat.completion":
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") not in _ENUM_VALUES:
            return False
        if not _arguments_are_text(choice.get("message")):
            return False
    return True


def _arguments_are_text(message: Any) -> bool:
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not isinstance(calls, list):
        return True
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and not isinstance(function.get("arguments"), str | None):
            return False
    return True


def relay_completion(data: dict[str, Any], raw: bytes) -> bytes:
    """The body an OpenAI client gets for a backend's completion (`raw`, parsed as `data`):
    its own bytes when they conform, else its own JSON repaired where a client could not
    read it (`object`, finish reasons off OpenAI's enum, choices that are not objects).
    Everything else it said (logprobs, refusal, annotations, service_tier, usage details…)
    is kept. `data` is changed in place; an empty `raw` has it encoded afresh."""
    return raw if raw and completion_is_conformant(data) else dumps(_conform(data))


def _conform(data: dict[str, Any]) -> dict[str, Any]:
    data["object"] = "chat.completion"
    choices = data.get("choices")
    data["choices"] = [choice for choice in choices if isinstance(choice, dict)] if isinstance(choices, list) else []
    for choice in data["choices"]:
        reason = choice.get("finish_reason")
        if reason not in _ENUM_VALUES:
            mapped = finish_reason_from_wire(reason) if isinstance(reason, str) else FinishReason.STOP
            choice["finish_reason"] = mapped.value
        if not _arguments_are_text(choice.get("message")):
            # TGI's (and some llama.cpp builds') arguments as a JSON object: OpenAI's are text.
            for call in choice["message"]["tool_calls"]:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and not isinstance(function.get("arguments"), str | None):
                    function["arguments"] = _arguments_text(function["arguments"])
    return data


# OpenAI's own finish reasons, as its clients read them: the domain's, and legacy function
# calling's `function_call` (the domain's tool call), which those clients branch on.
LEGACY_FUNCTION_CALL = "function_call"
_ENUM_VALUES = frozenset(reason.value for reason in FinishReason) | {LEGACY_FUNCTION_CALL}


def render_model_list(models: list[dict[str, Any]]) -> bytes:
    return dumps({"object": "list", "data": models})
