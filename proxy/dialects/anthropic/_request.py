"""Anthropic Messages requests: parse a client's body into the domain, render the domain for
an Anthropic backend.

Mapping choices (ingress):
- `system` (a string or text blocks) becomes one leading system message;
- a user message's `tool_result` blocks become domain `tool` messages (placed before the
  rest of that user message, which is where Anthropic requires them to be); `is_error`
  travels as an Anthropic-only marker part, so other backends see just the content;
- assistant `thinking` blocks become the message's `reasoning`; signed ones are also kept
  verbatim (an Anthropic-only part) because Anthropic needs them back unchanged to continue
  a tool-use turn; `redacted_thinking` is kept for Anthropic backends only;
- `cache_control` (prompt caching) on system, content, tool_use and tool_result blocks
  travels as Anthropic-only marker parts placed after what they mark, and on tool
  definitions in `extra`, so an Anthropic backend gets its cache breakpoints back; a text
  block's `citations` (an earlier answer's, given back) travel the same way;
- Anthropic-defined tools (a `tools` entry with a `type` other than `custom`: server tools,
  bash, the text editor, …) and every unmodelled top-level field (`thinking`, `metadata`,
  `service_tier`, …) travel in `extra`, for Anthropic backends (`adapt_for_dialect` makes
  function tools of the ones other backends can be given); `tool_choice`'s `disable_parallel_tool_use` does too (sent
  back as written) and is also the domain's `parallel_tool_calls`, for other backends.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from typing import Any

from proxy.dialects._effort import EFFORTS, effort_param, unknown_effort
from proxy.dialects._json import Fields, dumps, loads_object, loads_value
from proxy.dialects.anthropic._schema import structured_schema
from proxy.dialects.anthropic._vocabulary import DIALECT
from proxy.domain.chat import (
    ChatRequest,
    ContentPart,
    GenerationParams,
    ImagePart,
    Message,
    OpaquePart,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
)
from proxy.domain.errors import UNSUPPORTED_VALUE, invalid_request

# The gateway's marker for `is_error: true` on a tool result (an Anthropic-only part).
IS_ERROR_MARKER = OpaquePart(DIALECT, {"is_error": True})
# Markers (Anthropic-only parts without a `type`) carry what a domain part cannot:
# {"cache_control": …} for the block rendered just before it, plus "tool_use_id" to mark a
# tool call, or "on": "tool_result" to mark the tool result itself.
# The client's `anthropic-beta` header, for Anthropic backends (see `beta_header`).
BETA_EXTRA = "_anthropic_beta"

_MODELLED = frozenset(
    {
        "model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p",
        "top_k", "stream", "tools", "tool_choice",
    }
)
# Fields Anthropic's count_tokens accepts besides the modelled ones.
_COUNT_EXTRA = frozenset({"thinking", "mcp_servers", "context_management", "output_config", "output_format"})
# A `data:` URL (RFC 2397): its media type, its parameters (`;charset=utf-8`, then `;base64`).
_DATA_URL = re.compile(r"(?i:data):(?P<media>[^;,]*)(?P<params>[^,]*),(?P<data>.*)", re.DOTALL)
_TOOL_ID = re.compile(r"[A-Za-z0-9_-]+")


def parse_messages_request(body: bytes, *, count_only: bool = False, internal: bool = False) -> ChatRequest:
    """Validate a `/v1/messages` body (or a `/v1/messages/count_tokens` one, which has no
    `max_tokens`); errors are 400s naming the field. `internal`: the gateway sent it itself (a
    message batch's request), its `anthropic-beta` kept in the body as `BETA_EXTRA`."""
    fields = Fields(loads_object(body))
    model = fields.text("model", required=True, nonempty=True)
    assert model is not None
    max_tokens = fields.integer("max_tokens", minimum=1)
    if max_tokens is None and not count_only:
        raise invalid_request("Missing required parameter `max_tokens`.", param="max_tokens")
    raw_messages = fields.array("messages", required=True, nonempty=True)
    assert raw_messages is not None

    messages = _parse_system(fields.data.get("system"))
    for i, item in enumerate(raw_messages):
        messages.extend(_parse_message(item, f"messages[{i}]"))

    # Keys starting with `_` are reserved for the gateway's own notes (Anthropic has none).
    extra = {k: v for k, v in fields.data.items() if k not in _MODELLED and not k.startswith("_")}
    if internal and isinstance(fields.data.get(BETA_EXTRA), str):
        extra[BETA_EXTRA] = fields.data[BETA_EXTRA]
    metadata = fields.object("metadata")
    if metadata is not None:
        metadata.text("user_id")
    raw_tools = fields.array("tools") or []
    tools = _parse_tools(raw_tools)
    if raw_tools:
        # For an Anthropic backend, every tool in its order: server tools whole, custom ones
        # with what the domain does not keep (cache breakpoints, `strict`, `defer_loading`,
        # …); their description and schema are the domain's, not carried twice.
        extra["tools"] = [
            {k: v for k, v in tool.items() if k not in _TOOL_MODELLED} if is_custom_tool(tool) else tool
            for tool in raw_tools
        ]
    tool_choice = _parse_tool_choice(fields.object("tool_choice"))
    parallel_tool_calls: bool | None = None
    if tool_choice is not None and "disable_parallel_tool_use" in fields.data["tool_choice"]:
        extra["tool_choice"] = fields.data["tool_choice"]
        disable = Fields(fields.data["tool_choice"], "tool_choice").boolean("disable_parallel_tool_use")
        if disable is not None:
            parallel_tool_calls = not disable

    stream = bool(fields.boolean("stream"))
    params = GenerationParams(
        max_tokens=max_tokens,
        temperature=fields.number("temperature", minimum=0, maximum=1),
        top_p=fields.number("top_p", minimum=0, maximum=1),
        top_k=fields.integer("top_k", minimum=0),
        stop=_parse_stop_sequences(fields),
        reasoning_effort=_effort_of(fields.object("thinking"), fields.data.get("output_config")),
    )
    return ChatRequest(
        model=model,
        messages=messages,
        params=params,
        tools=tools,
        tool_choice=tool_choice,
        stream=stream and not count_only,
        # Anthropic clients always receive usage; ask every backend for it.
        include_usage=True if stream else None,
        dialect=DIALECT,
        extra=extra,
        parallel_tool_calls=parallel_tool_calls,
    )


# A `thinking` budget and OpenAI's `reasoning_effort`, each way (LiteLLM's budgets).
_BUDGET_FOR_EFFORT = {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096, "xhigh": 8192}
_MIN_BUDGET = 1024


# Anthropic's `output_config.effort` as OpenAI's word for it: `xhigh` and `max` are above
# what vLLM (low, medium, high) and Ollama's levels know, so they are its highest.
_EFFORT_OF_ANTHROPIC = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def _effort_of(thinking: Fields | None, output_config: Any = None) -> str | None:
    """The effort an Anthropic `thinking` asks of a backend that is not Anthropic's. Adaptive
    thinking's depth is `output_config.effort` (Claude Code's effort setting), medium without one.
    Without `thinking`, `output_config.effort` alone still says how hard to work (Anthropic
    applies it to the whole answer), the closest another backend has being its reasoning effort."""
    if thinking is None:
        effort = output_config.get("effort") if isinstance(output_config, dict) else None
        return _EFFORT_OF_ANTHROPIC.get(effort) if isinstance(effort, str) else None
    kind = thinking.text("type")
    if kind == "adaptive":
        effort = output_config.get("effort") if isinstance(output_config, dict) else None
        return _EFFORT_OF_ANTHROPIC.get(effort, "medium") if isinstance(effort, str) else "medium"
    if kind == "disabled":
        return "none"  # OpenAI's word for it: Ollama's `think: false`, vLLM's template switch
    if kind != "enabled":
        return None
    budget = thinking.data.get("budget_tokens")  # its checks are the Anthropic backend's to make
    if not isinstance(budget, int):
        budget = _MIN_BUDGET
    return "low" if budget <= 1024 else "medium" if budget <= 2048 else "high"


def _thinking_for(request: ChatRequest) -> dict[str, Any] | None:
    """`thinking` for another dialect's `reasoning_effort`: a budget within the client's
    `max_tokens`, which Anthropic counts the thinking in (at least 1024 tokens, or none).
    Without a client limit the budget is whole (the limit is then made to fit it).
    An Ollama client's `think: true` (thinking on, no level) is the middle budget."""
    effort, max_tokens = request.params.reasoning_effort, request.params.max_tokens
    if effort is None and request.dialect == "ollama" and request.extra.get("think") is True:
        effort = "medium"
    budget = _BUDGET_FOR_EFFORT.get(effort or "")
    if budget is None:
        return None
    if max_tokens is not None:
        budget = min(budget, max_tokens - 1)
    if budget < _MIN_BUDGET:
        param = effort_param(request)
        asked = request.extra.get("think", effort) if request.dialect == "ollama" else effort  # as the client said it
        raise invalid_request(
            f"An Anthropic backend thinks with at least {_MIN_BUDGET} tokens, counted in the answer's limit: "
            f"`{param}` {asked!r} needs a token limit above {_MIN_BUDGET} (it is {max_tokens}).",
            param=param,
        )
    return {"type": "enabled", "budget_tokens": budget}


def _litellm_thinking(request: ChatRequest) -> dict[str, Any] | None:
    """An OpenAI client's `thinking: {"type": "enabled", "budget_tokens": N}`, LiteLLM's way
    of asking a Claude model to think (`extra_body` in the OpenAI SDK), as sent."""
    asked = request.extra.get("thinking") if request.dialect == "openai" else None
    if isinstance(asked, dict) and asked.get("type") == "enabled" and type(asked.get("budget_tokens")) is int:
        return {"type": "enabled", "budget_tokens": asked["budget_tokens"]}
    return None


# JSON mode without a schema has no Anthropic equivalent: the answer is asked for as the
# input of this one forced tool, and read back as the text (LiteLLM does the same).
JSON_TOOL = "json_answer"
_JSON_TOOL_SPEC = {
    "name": JSON_TOOL, "description": "Give your whole answer as this JSON object.", "input_schema": {"type": "object"},
}


def json_mode(request: ChatRequest) -> bool:
    """Whether another dialect's JSON mode (OpenAI's `json_object`, Ollama's `format: "json"`)
    is asked of an Anthropic backend through `JSON_TOOL` (not beside the client's own tools)."""
    fmt = request.params.response_format
    return (
        request.dialect != DIALECT and fmt is not None and not request.tools
        and (fmt.kind == "json_object" or (fmt.kind == "json_schema" and fmt.schema is None))
    )


def _may_think(request: ChatRequest) -> bool:
    """Whether thinking can be switched on for another dialect's request: not with a forced
    tool, which Anthropic refuses with thinking, and not inside a tool loop, whose last
    assistant turn would have to open with its signed thinking block — which only a Responses
    client has, given back in a reasoning item's `encrypted_content`."""
    choice = request.tool_choice
    if (choice is not None and (choice.name or choice.mode == "required")) or json_mode(request):
        return False
    last = next((m for m in reversed(request.messages) if m.role == "assistant"), None)
    return last is None or not last.tool_calls or any(
        isinstance(part, OpaquePart) and part.dialect == DIALECT and part.data.get("type") in ("thinking", "redacted_thinking")
        for part in last.content
    )


def _parse_stop_sequences(fields: Fields) -> tuple[str, ...]:
    value = fields.array("stop_sequences")
    if value is None:
        return ()
    if not all(isinstance(item, str) for item in value):
        raise fields.fail("stop_sequences", "an array of strings")
    return tuple(value)


def _parse_system(value: Any, path: str = "system", extra: dict[str, Any] | None = None) -> list[Message]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [Message(role="system", content=(TextPart(value),), extra=extra or {})]
    if not isinstance(value, list):
        raise invalid_request(f"Invalid `{path}`: expected a string or an array of text blocks.", param=path)
    parts: list[ContentPart] = []
    for i, block in enumerate(value):
        block_path = f"{path}[{i}]"
        if not isinstance(block, dict) or block.get("type") != "text":
            raise invalid_request(f"Invalid `{block_path}`: expected a text block.", param=block_path)
        parts.append(TextPart(_text(block, block_path)))
        parts.extend(_cache_mark(block))
    return [Message(role="system", content=tuple(parts), extra=extra or {})] if parts else []


# Marks a `role: "system"` turn of `messages` (Anthropic's mid-conversation system message,
# which Claude Code sends), so that an Anthropic backend gets it where it stood.
IN_MESSAGES = "in_messages"


def _parse_message(item: Any, path: str) -> list[Message]:
    if not isinstance(item, dict):
        raise invalid_request(f"Invalid `{path}`: expected an object.", param=path)
    fields = Fields(item, path)
    role = fields.text("role", required=True)
    if role not in ("user", "assistant", "system") or (role == "system" and path == "messages[0]"):
        raise invalid_request(
            f"Invalid `{path}.role`: {role!r} is not one of user, assistant "
            "(a system message may follow a turn; the first goes in the top-level `system`).",
            param=f"{path}.role",
        )
    content = item.get("content")
    if content is None:
        raise invalid_request(f"Missing required parameter `{path}.content`.", param=f"{path}.content")
    if role == "system":
        # Instructions given partway through (Claude Code's reminders): the model's system
        # turn where it stands, which keeps the cached prefix before it unchanged.
        return _parse_system(content, f"{path}.content", {IN_MESSAGES: True})
    if isinstance(content, str):
        return [Message(role="user" if role == "user" else "assistant", content=(TextPart(content),) if content else ())]
    if not isinstance(content, list):
        raise invalid_request(
            f"Invalid `{path}.content`: expected a string or an array of content blocks.", param=f"{path}.content"
        )
    blocks = []
    for j, block in enumerate(content):
        block_path = f"{path}.content[{j}]"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid_request(f"Invalid `{block_path}`: expected a content block with a `type`.", param=block_path)
        blocks.append((block, block_path))
    if role == "user":
        return _user_messages(blocks)
    return [_assistant_message(blocks)]


def _user_messages(blocks: list[tuple[dict[str, Any], str]]) -> list[Message]:
    results: list[Message] = []
    parts: list[ContentPart] = []
    for block, path in blocks:
        if block["type"] == "tool_result":
            results.append(_tool_result(block, path))
        else:
            parts.extend(_parts(block, path))
    if parts or not results:
        results.append(Message(role="user", content=tuple(parts)))
    return results


def _tool_result(block: dict[str, Any], path: str) -> Message:
    fields = Fields(block, path)
    call_id = fields.text("tool_use_id", required=True, nonempty=True)
    content = block.get("content")
    parts: list[ContentPart] = []
    if isinstance(content, str):
        if content:
            parts.append(TextPart(content))
    elif isinstance(content, list):
        for k, inner in enumerate(content):
            inner_path = f"{path}.content[{k}]"
            if not isinstance(inner, dict) or not isinstance(inner.get("type"), str):
                raise invalid_request(f"Invalid `{inner_path}`: expected a content block.", param=inner_path)
            parts.extend(_parts(inner, inner_path))
    elif content is not None:
        raise fields.fail("content", "a string or an array of content blocks")
    if fields.boolean("is_error"):
        parts.append(IS_ERROR_MARKER)
    parts.extend(_cache_mark(block, on="tool_result"))
    return Message(role="tool", content=tuple(parts), tool_call_id=call_id)


def _assistant_message(blocks: list[tuple[dict[str, Any], str]]) -> Message:
    parts: list[ContentPart] = []
    calls: list[ToolCall] = []
    reasoning: list[str] = []
    for block, path in blocks:
        kind = block["type"]
        if kind == "tool_use":
            fields = Fields(block, path)
            call_id = fields.text("id", required=True, nonempty=True)
            name = fields.text("name", required=True, nonempty=True)
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise fields.fail("input", "an object")
            calls.append(ToolCall(id=call_id or "", name=name or "", arguments=json.dumps(arguments, ensure_ascii=False)))
            parts.extend(_cache_mark(block, tool_use_id=call_id))
        elif kind == "thinking":
            thinking = Fields(block, path).text("thinking", required=True)
            reasoning.append(thinking or "")
            if block.get("signature"):
                parts.append(OpaquePart(DIALECT, block))
        elif kind == "redacted_thinking":
            parts.append(OpaquePart(DIALECT, block))
        else:
            parts.extend(_parts(block, path))
    return Message(
        role="assistant",
        content=tuple(parts),
        tool_calls=tuple(calls),
        reasoning="".join(reasoning) if reasoning else None,
        extra=_order_kept(blocks),
    )


def _order_kept(blocks: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """The blocks as sent, for an Anthropic backend, when the domain's rendering would change
    them: their order (thinking, then the rest, then tool calls), which interleaved thinking
    must come back in exactly, or a tool call's fields the domain does not keep (`caller`: a
    call code execution made). Kept only then: the canonical request (the log row, the
    fingerprints) carries them a second time."""
    ranks = [_RENDER_RANK.get(block["type"], 1) for block, _ in blocks]
    if ranks == sorted(ranks) and not any(
        block["type"] == "tool_use" and not {k for k, v in block.items() if v is not None} <= _TOOL_USE_RENDERED
        for block, _ in blocks
    ):
        return {}
    return {"content": [block for block, _ in blocks]}


_RENDER_RANK = {"thinking": 0, "redacted_thinking": 0, "tool_use": 2}
# What `_render_blocks` gives a tool call back with.
_TOOL_USE_RENDERED = frozenset({"type", "id", "name", "input", "cache_control"})


def _parts(block: dict[str, Any], path: str) -> list[ContentPart]:
    part = _content_part(block, path)
    if isinstance(part, OpaquePart):
        return [part]  # the whole block, cache_control included
    if block.get("citations") is not None:
        # An answer's cited text, given back: Anthropic wants the citations with it.
        marks = {"citations": block["citations"], **({"cache_control": block["cache_control"]} if "cache_control" in block else {})}
        return [part, OpaquePart(DIALECT, marks)]
    return [part, *_cache_mark(block)]


def _cache_mark(block: dict[str, Any], **where: Any) -> list[ContentPart]:
    control = block.get("cache_control")
    if control is None:
        return []
    return [OpaquePart(DIALECT, {"cache_control": control, **where})]


def _content_part(block: dict[str, Any], path: str) -> ContentPart:
    kind = block["type"]
    if kind == "text":
        return TextPart(_text(block, path))
    if kind == "image":
        source = Fields(block, path).object("source", required=True)
        assert source is not None
        source_type = source.text("type", required=True)
        if source_type == "base64":
            media = source.text("media_type", required=True, nonempty=True)
            data = source.text("data", required=True)
            return ImagePart(url=f"data:{media};base64,{data}")
        if source_type == "url":
            url = source.text("url", required=True, nonempty=True)
            return ImagePart(url=url or "", at=f"{path}.source.url")
        # Files API references and the like only mean something to Anthropic.
        return OpaquePart(DIALECT, block, at=path)
    if kind in ("tool_use", "tool_result", "thinking"):
        raise invalid_request(f"Invalid `{path}`: a `{kind}` block is not allowed here.", param=path)
    return OpaquePart(DIALECT, block, at=path)  # `at`: a document's `source.url` is named by it


def _text(block: dict[str, Any], path: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise invalid_request(f"Invalid `{path}.text`: expected a string.", param=f"{path}.text")
    return text


def _parse_tools(items: list[Any]) -> list[Tool]:
    """The custom tools (server tools are Anthropic's alone: they stay in `extra`)."""
    tools: list[Tool] = []
    for i, item in enumerate(items):
        path = f"tools[{i}]"
        if not isinstance(item, dict):
            raise invalid_request(f"Invalid `{path}`: expected an object.", param=path)
        fields = Fields(item, path)
        if not is_custom_tool(item):
            fields.text("name", required=True, nonempty=True)
            continue
        name = fields.text("name", required=True, nonempty=True)
        schema = fields.object("input_schema", required=True)
        assert schema is not None
        tools.append(Tool(name=name or "", description=fields.text("description"), parameters=schema.data,
                          strict=fields.boolean("strict")))
    return tools


def is_custom_tool(tool: dict[str, Any]) -> bool:
    """A tool the client defined (not one Anthropic defined: a server tool, bash, …)."""
    return tool.get("type", "custom") in ("custom", None)


_TOOL_MODELLED = frozenset({"description", "input_schema"})


def _render_tools(request: ChatRequest, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """An Anthropic client's tools as it sent them, unless the gateway changed the custom
    ones (then those are rendered, its server tools after them); others' tools rendered."""
    kept = extra.get("tools")
    server: list[dict[str, Any]] = []
    if isinstance(kept, list):
        if [tool.get("name") for tool in kept if is_custom_tool(tool)] == [tool.name for tool in request.tools]:
            domain = iter(request.tools)
            return [{**_render_tool(next(domain)), **tool} if is_custom_tool(tool) else tool for tool in kept]
        server = [tool for tool in kept if not is_custom_tool(tool)]
    return [_render_tool(tool, as_sent=request.dialect == DIALECT) for tool in request.tools] + server


def _parse_tool_choice(fields: Fields | None) -> ToolChoice | None:
    if fields is None:
        return None
    kind = fields.text("type", required=True)
    if kind == "auto":
        return ToolChoice(mode="auto")
    if kind == "any":
        return ToolChoice(mode="required")
    if kind == "none":
        return ToolChoice(mode="none")
    if kind == "tool":
        return ToolChoice(mode="required", name=fields.text("name", required=True, nonempty=True))
    raise fields.fail("type", '"auto", "any", "tool" or "none"')


# ---------------------------------------------------------------------------------------------
# Rendering for Anthropic backends


def encode_messages_request(
    request: ChatRequest,
    upstream_model: str,
    *,
    stream: bool,
    default_max_tokens: int,
    count_only: bool = False,
) -> bytes:
    """The body for an Anthropic backend's `/v1/messages` (or its `count_tokens`).

    System messages are hoisted into `system` wherever they stood; consecutive messages of
    one role are merged (tool results first); `max_tokens` defaults to `default_max_tokens`
    because Anthropic requires it; an OpenAI temperature above 1 is clamped to Anthropic's
    maximum of 1. For another dialect's client: a `json_schema` response format is Anthropic's
    structured output (`output_config.format`), a schemaless JSON mode a forced tool
    (`json_mode`), `reasoning_effort` a `thinking` budget; `seed` and penalties have no
    Anthropic equivalent and are left out.
    """
    params = request.params
    if params.n is not None and params.n > 1:
        raise invalid_request(
            "Anthropic backends return one choice per request; `n` must be 1.", param="n", code=UNSUPPORTED_VALUE,
        )
    same_dialect = request.dialect == DIALECT
    extra = request.extra if same_dialect else {}
    body: dict[str, Any] = {}
    # Keys starting with `_` are the gateway's own notes, never body fields.
    if count_only:
        body.update({k: v for k, v in extra.items() if k in _COUNT_EXTRA})
    else:
        body.update({k: v for k, v in extra.items() if k not in ("tools", "tool_choice") and not k.startswith("_")})
    body["model"] = upstream_model
    system = _render_system(request)
    messages = _render_messages(request.messages, as_sent=same_dialect)
    if not messages and system is not None and not same_dialect:
        # A chat of instructions alone, which OpenAI and Ollama answer: Anthropic refuses a
        # request without messages, so the instructions are the one turn.
        messages, system = [{"role": "user", "content": system}], None
    if system is not None:
        body["system"] = system
    body["messages"] = messages
    tools = _render_tools(request, extra)
    if tools:
        body["tools"] = tools
    choice = request.tool_choice
    if choice is None and request.parallel_tool_calls is False and tools:
        choice = ToolChoice()  # Anthropic says "no parallel calls" only inside `tool_choice`
    if choice is not None and tools:  # Anthropic refuses any `tool_choice` without tools
        body["tool_choice"] = _render_tool_choice(choice, extra.get("tool_choice"), request.parallel_tool_calls)
    if json_mode(request):
        body["tools"] = [_JSON_TOOL_SPEC]
        body["tool_choice"] = {"type": "tool", "name": JSON_TOOL}
    if count_only:
        return dumps(body)
    body["max_tokens"] = params.max_tokens or default_max_tokens
    if params.temperature is not None:
        body["temperature"] = min(params.temperature, 1.0)
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.top_k is not None and params.top_k > 0:
        body["top_k"] = params.top_k
    if params.stop:
        body["stop_sequences"] = list(params.stop)
    if not same_dialect:
        if "stop_sequences" in body:
            # Anthropic refuses an empty or whitespace-only stop sequence ("each stop sequence
            # must contain non-whitespace"), which OpenAI and Ollama clients send (`"\n"`):
            # left out, as LiteLLM does, rather than the whole request refused.
            kept = [stop for stop in body["stop_sequences"] if stop.strip()]
            if kept:
                body["stop_sequences"] = kept
            else:
                del body["stop_sequences"]
        if "temperature" in body and "top_p" in body:
            # Claude 4.5 models refuse the two together ("`temperature` and `top_p` cannot both
            # be specified for this model"), and Anthropic asks for one or the other on every
            # model; OpenAI and Ollama clients often send both (LangChain4j, ragas, presets).
            del body["top_p"]
        if params.reasoning_effort is not None and params.reasoning_effort not in EFFORTS:
            raise unknown_effort(request)
        thinking = _thinking_for(request) or _litellm_thinking(request) if _may_think(request) else None
        if thinking is not None:
            body["thinking"] = thinking
            if params.max_tokens is None:
                # The client set no limit: the default is the answer's, the thinking comes on
                # top (within it, a full budget would leave the answer a single token).
                body["max_tokens"] = default_max_tokens + thinking["budget_tokens"]
            # Anthropic refuses these next to thinking; the client asked for thinking, and
            # did not ask for it in Anthropic's terms.
            body.pop("temperature", None)
            body.pop("top_k", None)
            if body.get("top_p", 1.0) < 0.95:
                del body["top_p"]
        fmt = params.response_format
        if fmt is not None and fmt.kind == "json_schema" and fmt.schema is not None:
            body["output_config"] = {"format": {"type": "json_schema", "schema": structured_schema(fmt.schema)}}
        user = next((value for key in ("safety_identifier", "user")
                     if isinstance(value := request.extra.get(key), str) and value.strip()), None)
        if user is not None:
            # OpenAI's end-user id (`safety_identifier`, which replaces the deprecated `user`)
            # is Anthropic's `metadata.user_id` (as LiteLLM maps `user`): what Anthropic's
            # abuse detection tells one end user from another by.
            body["metadata"] = {"user_id": user[:_USER_ID_LIMIT]}
    body["stream"] = stream
    return dumps(body)


_USER_ID_LIMIT = 256  # Anthropic's maximum length of `metadata.user_id`


def beta_header(request: ChatRequest) -> str | None:
    """The `anthropic-beta` header an Anthropic client sent, to pass on to Anthropic backends."""
    if request.dialect != DIALECT:
        return None
    value = request.extra.get(BETA_EXTRA)
    return value if isinstance(value, str) and value else None


def _render_system(request: ChatRequest) -> str | list[dict[str, Any]] | None:
    blocks: list[dict[str, Any]] = []
    for message in request.messages:
        if message.role == "system" and not (request.dialect == DIALECT and message.extra.get(IN_MESSAGES)):
            _append_blocks(blocks, (p for p in message.content if isinstance(p, TextPart | OpaquePart)))
    if request.dialect != DIALECT:
        blocks = _without_blank_text(blocks)
    if not blocks:
        return None
    if len(blocks) == 1 and "cache_control" not in blocks[0]:
        return str(blocks[0]["text"])
    return blocks


def _append_blocks(blocks: list[dict[str, Any]], parts: Iterable[ContentPart]) -> None:
    """Render parts onto `blocks`, attaching each cache marker to the block before it."""
    for part in parts:
        if isinstance(part, OpaquePart) and part.dialect == DIALECT and "type" not in part.data:
            if blocks and set(part.data) <= {"cache_control", "citations"}:
                blocks[-1] = {**blocks[-1], **part.data}
            continue
        block = _render_part(part)
        if block is not None:
            blocks.append(block)


def _render_messages(messages: list[Message], *, as_sent: bool = False) -> list[dict[str, Any]]:
    """`as_sent`: an Anthropic client's assistant turns go back block for block as it sent them."""
    out: list[dict[str, Any]] = []
    for position, message in enumerate(messages):
        if message.role == "system":
            if as_sent and message.extra.get(IN_MESSAGES):
                system_blocks: list[dict[str, Any]] = []
                _append_blocks(system_blocks, message.content)
                out.append({"role": "system", "content": system_blocks})
            continue
        role = "assistant" if message.role == "assistant" else "user"
        raw = message.extra.get("content") if as_sent and role == "assistant" else None
        blocks = _as_sent(raw) if isinstance(raw, list) else _render_blocks(message)
        if not as_sent and (kept := _without_blank_text(blocks)) != blocks and (kept or role == "assistant"):
            # A user turn of nothing but blank text stays: without it the turn before would
            # be a prefill, and the model would continue it instead of answering.
            blocks = kept
        if not blocks:
            if role == "user" and position == len(messages) - 1 and out and out[-1]["role"] == "assistant":
                # Left out, it would make the turn before a prefill: the model would go on
                # with it instead of answering (and Anthropic refuses an empty turn).
                raise invalid_request(
                    f"Invalid `messages[{position}].content`: the last message is empty, which an Anthropic "
                    "backend refuses.", param=f"messages[{position}].content",
                )
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    for entry in out:
        blocks = entry["content"]
        if entry["role"] == "user":
            # Anthropic wants a turn's tool results ahead of anything else the user says.
            blocks.sort(key=lambda block: block.get("type") != "tool_result")
        if len(blocks) == 1 and blocks[0].get("type") == "text" and set(blocks[0]) == {"type", "text"}:
            entry["content"] = blocks[0]["text"]
    return out


def _without_blank_text(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`blocks` without whitespace-only text, which Anthropic refuses ("text content blocks must
    contain non-whitespace text") and other dialects' clients send: a chat UI's blank turn, the
    `"\n\n"` a Qwen or Llama model wrote before its tool calls, replayed to a Claude model."""
    return [block for block in blocks if block.get("type") != "text" or str(block.get("text", "")).strip()]


def _as_sent(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant turn's blocks as its client sent them, less what `_render_blocks` would
    not send either: a thinking block without its signature (another backend's reasoning
    rendered for the client), and tool ids Anthropic refuses, made to fit as their results' are."""
    out = []
    for block in blocks:
        kind = block.get("type")
        if kind == "thinking" and not block.get("signature"):
            continue
        if kind == "tool_use" and isinstance(block.get("id"), str):
            block = {**block, "id": tool_use_id(block["id"])}
        out.append(block)
    return out


def _render_blocks(message: Message) -> list[dict[str, Any]]:
    if message.role == "tool":
        return [_render_tool_result(message)]
    blocks: list[dict[str, Any]] = []
    if message.role == "assistant":
        # A thinking block is only valid with the signature Anthropic gave it: reasoning
        # from other backends (unsigned) cannot be sent back and is left out.
        blocks.extend(
            part.data
            for part in message.content
            if isinstance(part, OpaquePart) and part.dialect == DIALECT
            and part.data.get("type") in ("thinking", "redacted_thinking")
        )
    _append_blocks(
        blocks,
        (p for p in message.content if not (isinstance(p, OpaquePart) and p.data.get("type") in ("thinking", "redacted_thinking"))),
    )
    marks = {
        part.data["tool_use_id"]: part.data["cache_control"]
        for part in message.content
        if isinstance(part, OpaquePart) and part.dialect == DIALECT and "type" not in part.data and "tool_use_id" in part.data
    }
    for call in message.tool_calls:
        block = {"type": "tool_use", "id": tool_use_id(call.id), "name": call.name, "input": input_object(call.arguments)}
        if call.id in marks:
            block["cache_control"] = marks[call.id]
        blocks.append(block)
    return blocks


def _render_tool_result(message: Message) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id(message.tool_call_id or "")}
    rendered: list[dict[str, Any]] = []
    _append_blocks(rendered, (p for p in message.content if not _marks_tool_result(p)))
    if len(rendered) == 1 and set(rendered[0]) == {"type", "text"}:
        block["content"] = rendered[0]["text"]
    elif rendered:
        block["content"] = rendered
    if IS_ERROR_MARKER in message.content:
        block["is_error"] = True
    for part in message.content:
        if _marks_tool_result(part) and isinstance(part, OpaquePart) and "cache_control" in part.data:
            block["cache_control"] = part.data["cache_control"]
    return block


def _marks_tool_result(part: ContentPart) -> bool:
    return part == IS_ERROR_MARKER or (
        isinstance(part, OpaquePart) and part.dialect == DIALECT and "type" not in part.data
        and part.data.get("on") == "tool_result"
    )


def _render_part(part: ContentPart) -> dict[str, Any] | None:
    if isinstance(part, TextPart):
        # Anthropic rejects empty text blocks.
        return {"type": "text", "text": part.text} if part.text else None
    if isinstance(part, ImagePart):
        inline = _base64_image(part.url)
        if inline is not None:
            source = {"type": "base64", "media_type": inline[0], "data": inline[1]}
        else:
            source = {"type": "url", "url": part.url}
        return {"type": "image", "source": source}
    # Anthropic's own blocks go back as they came; markers (no `type`) are not blocks.
    if part.dialect == DIALECT and "type" in part.data:
        return part.data
    return openai_file_document(part.data) if part.dialect == _OPENAI else None


_OPENAI = "openai"
_PDF_DATA_URL = re.compile(r"(?i:data:application/pdf)(?:;[^,]*)?;base64,(?P<data>.*)", re.DOTALL)


def openai_file_document(part: dict[str, Any]) -> dict[str, Any] | None:
    """An OpenAI client's `file` part holding a PDF inline (`file_data`, a base64 `data:` URL)
    as the Anthropic `document` it is (its `filename` the title); None for any other part (a
    Files API `file_id` has no equivalent)."""
    file = part.get("file")
    if part.get("type") != "file" or not isinstance(file, dict) or not isinstance(file.get("file_data"), str):
        return None
    match = _PDF_DATA_URL.fullmatch(file["file_data"])
    if match is None:
        return None
    document: dict[str, Any] = {
        "type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": match["data"]},
    }
    if isinstance(file.get("filename"), str) and file["filename"]:
        document["title"] = file["filename"]
    return document


def _base64_image(url: str) -> tuple[str, str] | None:
    """A base64 image `data:` URL's media type and data (its parameters dropped: Anthropic's
    `media_type` takes none); None for any other URL. The type is what the image's first
    bytes say when they say one Anthropic takes: it refuses a label that does not match the
    data ("Image does not match the provided media type") and `image/jpg`, both common."""
    match = _DATA_URL.fullmatch(url)
    if match is None or not match["params"].lower().endswith(";base64"):
        return None
    media = match["media"].strip().lower()
    if not media.startswith("image/"):
        return None
    data = match["data"]
    return _sniffed_image_type(data) or _IMAGE_TYPE_ALIASES.get(media, media), data


# The image types Anthropic takes, and other names clients give two of them.
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
_IMAGE_TYPE_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg", "image/x-png": "image/png"}


def _sniffed_image_type(data: str) -> str | None:
    """The type of a base64 image by its magic number (its first 12 bytes), if Anthropic takes it."""
    head = data[:16]
    try:
        raw = base64.b64decode(head + "=" * (-len(head) % 4))
    except ValueError:
        return None
    if raw.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if raw.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "image/webp"
    return None


def image_refusal(url: str) -> str | None:
    """Why an image given by `url` cannot reach an Anthropic backend (which refuses it with
    words about its own request), said for the client; None when it can."""
    if url[:8].lower().startswith(("https://", "http://")):
        return None
    inline = _base64_image(url)
    if inline is not None:
        if inline[0] in _IMAGE_TYPES:
            return None
        return f"a `data:` URL of type `{inline[0]}`, which Anthropic does not take (JPEG, PNG, GIF or WebP only)"
    match = _DATA_URL.fullmatch(url)
    if match is None:
        return "neither an http(s) URL nor a `data:` URL (base64 data needs its `data:image/...;base64,` prefix)"
    if not match["params"].lower().endswith(";base64"):
        return "a `data:` URL without `;base64` (inline images must be base64)"
    return f"a `data:` URL of type `{match['media'].strip() or 'text/plain'}`, not an image"


def tool_use_id(call_id: str) -> str:
    """Anthropic accepts tool ids of `[A-Za-z0-9_-]+` only; others are made to fit, the same
    way for a call and its result so that they still pair up."""
    if _TOOL_ID.fullmatch(call_id):
        return call_id
    return re.sub(r"[^A-Za-z0-9_-]", "_", call_id) or "toolu_"


def input_object(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic requires. Arguments that are not a
    JSON object (a model's malformed output replayed in history) are kept as text rather
    than lost or refused."""
    if not arguments.strip():
        return {}
    try:
        value = loads_value(arguments)
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def _render_tool(tool: Tool, *, as_sent: bool = True) -> dict[str, Any]:
    """`as_sent`: an Anthropic client's tool, its schema as it wrote it."""
    out: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        out["description"] = tool.description
    schema = tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}
    if tool.strict:
        # OpenAI's strict function is Anthropic's strict tool use (grammar-constrained input),
        # whose schemas are structured output's subset.
        out["strict"] = True
        if not as_sent:
            schema = structured_schema(schema)
    out["input_schema"] = schema
    return out


def _render_tool_choice(choice: ToolChoice, raw: Any, parallel: bool | None) -> dict[str, Any]:
    out: dict[str, Any]
    if choice.name:
        out = {"type": "tool", "name": choice.name}
    elif choice.mode == "required":
        out = {"type": "any"}
    else:
        out = {"type": choice.mode}
    if out["type"] != "none":
        if isinstance(raw, dict) and "disable_parallel_tool_use" in raw:
            out["disable_parallel_tool_use"] = raw["disable_parallel_tool_use"]
        elif parallel is not None:
            out["disable_parallel_tool_use"] = not parallel
    return out
