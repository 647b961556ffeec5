"""OpenAI chat requests: parse a client's body into the domain, render the domain for a backend."""

from __future__ import annotations

import json
from typing import Any

from proxy.dialects._json import Fields, dumps, loads_object
from proxy.domain.chat import (
    ChatRequest,
    ContentPart,
    GenerationParams,
    ImagePart,
    Message,
    OpaquePart,
    ResponseFormat,
    Role,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
)
from proxy.domain.errors import invalid_request
from proxy.domain.tool_images import images_after_tool_results

DIALECT = "openai"

_ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}

# Fields the domain models; everything else at the top level travels in `extra`.
_MODELLED = frozenset(
    {
        "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
        "temperature", "top_p", "top_k", "stop", "seed", "presence_penalty", "frequency_penalty",
        "n", "response_format", "tools", "tool_choice", "reasoning_effort", "logprobs", "top_logprobs",
    }
)


def parse_chat_request(body: bytes) -> ChatRequest:
    """Validate an OpenAI `/v1/chat/completions` body; errors are 400s naming the field."""
    fields = Fields(loads_object(body))
    model = fields.text("model", required=True, nonempty=True)
    assert model is not None
    raw_messages = fields.array("messages", required=True, nonempty=True)
    assert raw_messages is not None
    messages = [_parse_message(item, f"messages[{i}]") for i, item in enumerate(raw_messages)]

    stream = bool(fields.boolean("stream"))
    include_usage: bool | None = None
    extra = {k: v for k, v in fields.data.items() if k not in _MODELLED}
    options = fields.object("stream_options")
    if options is not None and not stream:
        # OpenAI's own words: a client that meant to stream should hear it, not get a whole answer.
        raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options")
    if options is not None:
        include_usage = options.boolean("include_usage")
        # The rest (vLLM's `continuous_usage_stats`, …) is for an OpenAI backend to read.
        other_options = {k: v for k, v in options.data.items() if k != "include_usage"}
        if other_options:
            extra["stream_options"] = other_options
    max_tokens = fields.integer("max_tokens", minimum=1)
    max_completion_tokens = fields.integer("max_completion_tokens", minimum=1)
    if max_completion_tokens is not None:
        # One limit, the newer name winning. The fields the client used stay in `extra`,
        # to reach an OpenAI backend as sent: OpenAI's reasoning models refuse `max_tokens`.
        extra["max_completion_tokens"] = max_completion_tokens
        if max_tokens is not None:
            extra["max_tokens"] = max_tokens
        max_tokens = max_completion_tokens
    params = GenerationParams(
        max_tokens=max_tokens,
        temperature=fields.number("temperature", minimum=0, maximum=2),
        top_p=fields.number("top_p", minimum=0, maximum=1),
        top_k=fields.integer("top_k", minimum=-1),
        stop=fields.stop("stop"),
        seed=fields.integer("seed"),
        presence_penalty=fields.number("presence_penalty", minimum=-2, maximum=2),
        frequency_penalty=fields.number("frequency_penalty", minimum=-2, maximum=2),
        n=fields.integer("n", minimum=1, maximum=128),
        response_format=_parse_response_format(fields.object("response_format")),
        reasoning_effort=fields.text("reasoning_effort", nonempty=True),
        logprobs=fields.boolean("logprobs"),
        # vLLM's -1 is the whole vocabulary; the backend checks its own bounds.
        top_logprobs=fields.integer("top_logprobs", minimum=-1),
    )
    if params.top_logprobs not in (None, 0) and not params.logprobs:
        # As OpenAI and vLLM refuse it: alternatives alone would come back as no logprobs at all.
        raise invalid_request(
            "`top_logprobs` needs `logprobs: true`: set `logprobs` to true to get the top log probabilities.",
            param="top_logprobs",
        )
    raw_tools = fields.array("tools") or []
    tools = [
        _parse_tool(item, f"tools[{i}]") for i, item in enumerate(raw_tools) if not _is_custom_tool(item, f"tools[{i}]")
    ]
    if len(tools) < len(raw_tools):
        # Custom (free-form) tools have no domain form: an OpenAI backend gets the tools as sent.
        extra["tools"] = raw_tools
    tool_choice = _parse_tool_choice(fields.data.get("tool_choice"))
    if tool_choice is None and fields.data.get("tool_choice") is not None:
        extra["tool_choice"] = fields.data["tool_choice"]  # likewise: `allowed_tools`, a custom tool
    check_forced_tool(tool_choice, tools, custom_tools=len(tools) < len(raw_tools))
    return ChatRequest(
        model=model,
        messages=messages,
        params=params,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=fields.boolean("parallel_tool_calls"),
        stream=stream,
        include_usage=include_usage,
        dialect=DIALECT,
        extra=extra,
    )


# A message's fields the domain models; the rest travel in `Message.extra`.
_MESSAGE_MODELLED = frozenset({"role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content"})


def _parse_message(item: Any, path: str) -> Message:
    if not isinstance(item, dict):
        raise invalid_request(f"Invalid `{path}`: expected an object.", param=path)
    fields = Fields(item, path)
    role_name = fields.text("role", required=True)
    role = _ROLES.get(role_name or "")
    if role is None:
        raise invalid_request(
            f"Invalid `{path}.role`: {role_name!r} is not one of system, developer, user, assistant, tool.",
            param=f"{path}.role", code="invalid_value",
        )
    content = _parse_content(item.get("content"), f"{path}.content")
    tool_calls = tuple(
        _parse_tool_call(call, f"{path}.tool_calls[{i}]")
        for i, call in enumerate(fields.array("tool_calls") or [])
    )
    tool_call_id = fields.text("tool_call_id")
    if role_name == "tool" and not tool_call_id:
        raise fields.missing("tool_call_id")
    if role != "assistant" and not content and role_name != "function":
        raise fields.missing("content")
    extra = {k: v for k, v in item.items() if k not in _MESSAGE_MODELLED}
    raw_content = item.get("content")
    if isinstance(raw_content, list) and any(_has_unmodelled_fields(part) for part in raw_content):
        # Parts carrying more than the domain keeps (`cache_control`, …) go back as sent.
        extra["content"] = raw_content
    if role_name == "function":
        # A legacy function result is a tool result to the domain, but an OpenAI backend
        # gets it back under its own role (it has no tool_call_id to be a `tool` message).
        extra["role"] = role_name
    return Message(
        role=role,
        content=content,
        tool_calls=tool_calls,
        tool_call_id=tool_call_id,
        name=fields.text("name"),
        reasoning=fields.text("reasoning_content"),
        extra=extra,
    )


def _parse_content(value: Any, path: str) -> tuple[ContentPart, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (TextPart(value),)
    if not isinstance(value, list):
        raise invalid_request(f"Invalid `{path}`: expected a string or an array of content parts.", param=path)
    parts: list[ContentPart] = []
    for i, part in enumerate(value):
        part_path = f"{path}[{i}]"
        if not isinstance(part, dict):
            raise invalid_request(f"Invalid `{part_path}`: expected an object.", param=part_path)
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid_request(f"Invalid `{part_path}.text`: expected a string.", param=f"{part_path}.text")
            parts.append(TextPart(text))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise invalid_request(
                    f"Invalid `{part_path}.image_url.url`: expected a string.", param=f"{part_path}.image_url"
                )
            detail = image.get("detail") if isinstance(image, dict) else None
            at = f"{part_path}.image_url.url" if isinstance(image, dict) else f"{part_path}.image_url"
            parts.append(ImagePart(url=url, detail=detail if isinstance(detail, str) else None, at=at))
        elif isinstance(kind, str):
            parts.append(OpaquePart(DIALECT, part, at=part_path))
        else:
            raise invalid_request(f"Invalid `{part_path}.type`: expected a string.", param=f"{part_path}.type")
        control = part.get("cache_control")
        if kind in ("text", "image_url", "file") and isinstance(control, dict):
            parts.append(OpaquePart(_ANTHROPIC, {"cache_control": control}))
    return tuple(parts)


# A text, image or file part's `cache_control` (LiteLLM's and OpenRouter's convention for Claude,
# which aider and Cline send) is an Anthropic backend's cache breakpoint: kept as the marker
# the Anthropic dialect puts after the part it applies to (other backends leave it out; an
# OpenAI-compatible one gets the part as sent).
_ANTHROPIC = "anthropic"


def _has_unmodelled_fields(part: dict[str, Any]) -> bool:
    kind = part.get("type")
    if kind == "text":
        return len(part) > 2
    if kind == "image_url":
        image = part.get("image_url")
        return len(part) > 2 or (isinstance(image, dict) and not image.keys() <= {"url", "detail"})
    return False  # kept whole as an OpaquePart


def _parse_tool_call(item: Any, path: str) -> ToolCall:
    if not isinstance(item, dict):
        raise invalid_request(f"Invalid `{path}`: expected an object.", param=path)
    function = Fields(item, path).object("function", required=True)
    assert function is not None
    name = function.text("name", required=True, nonempty=True)
    arguments = function.data.get("arguments", "")
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    elif not isinstance(arguments, str):
        raise function.fail("arguments", "a JSON string")
    call_id = item.get("id")
    return ToolCall(id=call_id if isinstance(call_id, str) else "", name=name or "", arguments=arguments)


def _is_custom_tool(item: Any, path: str) -> bool:
    """Whether `item` is OpenAI's custom tool (free-form input), checked as OpenAI does."""
    if not isinstance(item, dict) or item.get("type") != "custom":
        return False
    custom = Fields(item, path).object("custom", required=True)
    assert custom is not None
    custom.text("name", required=True, nonempty=True)
    return True


def _parse_tool(item: Any, path: str) -> Tool:
    if not isinstance(item, dict):
        raise invalid_request(f"Invalid `{path}`: expected an object.", param=path)
    fields = Fields(item, path)
    if item.get("type", "function") != "function":
        raise fields.fail("type", '"function" or "custom"')
    function = fields.object("function", required=True)
    assert function is not None
    name = function.text("name", required=True, nonempty=True)
    parameters = function.object("parameters")
    return Tool(
        name=name or "",
        description=function.text("description"),
        parameters=parameters.data if parameters else None,
        strict=function.boolean("strict"),
    )


def _parse_tool_choice(value: Any) -> ToolChoice | None:
    """The domain's choice; None for none, and for the choices only OpenAI backends know
    (`allowed_tools`, a custom tool), which the caller keeps as sent."""
    if value is None:
        return None
    if value in ("auto", "none", "required"):
        return ToolChoice(mode=value)
    if isinstance(value, dict):
        kind = value.get("type")
        inner = value.get(kind) if kind in ("custom", "allowed_tools") else value.get("function")
        inner = inner if isinstance(inner, dict) else {}
        if kind == "allowed_tools":
            if inner.get("mode") in ("auto", "required") and isinstance(inner.get("tools"), list):
                return None
        elif isinstance(inner.get("name"), str) and inner["name"]:
            return None if kind == "custom" else ToolChoice(mode="required", name=inner["name"])
    raise invalid_request(
        'Invalid `tool_choice`: expected "none", "auto", "required", {"type": "function", "function": {"name": ...}}, '
        '{"type": "custom", "custom": {"name": ...}} or {"type": "allowed_tools", "allowed_tools": {"mode": ..., '
        '"tools": [...]}}.',
        param="tool_choice",
    )


def check_forced_tool(choice: ToolChoice | None, tools: list[Tool], *, custom_tools: bool) -> None:
    """A choice that forces a tool the request does not give is a 400, as OpenAI and vLLM
    answer it: an Ollama backend, which forces nothing, would answer in text, and a backend
    that gets no tools (the gateway sends no choice without them) would too."""
    if choice is None or choice.mode != "required":
        return
    if choice.name is not None and choice.name not in {tool.name for tool in tools}:
        raise invalid_request(
            f"Invalid value for `tool_choice`: function `{choice.name}` is not one of the functions in `tools`.",
            param="tool_choice",
        )
    if not tools and not custom_tools:
        raise invalid_request(
            "Invalid value for `tool_choice`: a required tool call needs `tools`; send the tools to choose from.",
            param="tool_choice",
        )


def _parse_response_format(fields: Fields | None) -> ResponseFormat | None:
    if fields is None:
        return None
    kind = fields.text("type", required=True)
    if kind == "text":
        return ResponseFormat(kind="text")
    if kind == "json_object":
        return ResponseFormat(kind="json_object")
    if kind == "json_schema":
        spec = fields.object("json_schema", required=True)
        assert spec is not None
        schema = spec.object("schema")
        return ResponseFormat(
            kind="json_schema",
            schema=schema.data if schema else None,
            name=spec.text("name"),
            strict=spec.boolean("strict"),
            description=spec.text("description"),
        )
    raise fields.fail("type", '"text", "json_object" or "json_schema"')


# ---------------------------------------------------------------------------------------------
# Rendering for OpenAI-compatible backends


def encode_chat_request(
    request: ChatRequest, upstream_model: str, *, stream: bool, include_usage: bool, template_fields: bool = False
) -> bytes:
    """The body for an OpenAI-compatible backend. `include_usage` asks the backend for the
    usage chunk (the gateway asks for accounting even when the client did not).
    `template_fields`: the backend takes vLLM's chat-template fields (see `_template_fields`)."""
    body: dict[str, Any] = {}
    if request.dialect == DIALECT:
        body.update(request.extra)
    body["model"] = upstream_model
    same_dialect = request.dialect == DIALECT
    reasoning = template_fields and request.dialect in _REASONING_DIALECTS
    # Another dialect's tool results may hold images (a Responses client's `view_image`), which
    # OpenAI and vLLM take in user messages only; an OpenAI client's request goes as it came.
    messages = request.messages if same_dialect else images_after_tool_results(request.messages)
    body["messages"] = [render_message(message, as_sent=same_dialect, reasoning=reasoning) for message in messages]
    if template_fields:
        body.update(_template_fields(request))
    params = request.params
    # The client's `max_completion_tokens` (kept in `extra`) carries the limit; otherwise
    # `max_tokens`, which every OpenAI-compatible server knows.
    limit_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    effort = params.reasoning_effort
    if effort == "none" and request.dialect in _SWITCH_DIALECTS:
        # Thinking switched off: vLLM knows no such effort (a 400), OpenAI's older models
        # neither; the template switch says it where the backend takes one.
        effort = None
    for key, value in (
        (limit_key, params.max_tokens),
        ("temperature", params.temperature),
        ("top_p", params.top_p),
        ("top_k", params.top_k),
        ("seed", params.seed),
        ("presence_penalty", params.presence_penalty),
        ("frequency_penalty", params.frequency_penalty),
        ("n", params.n),
        ("reasoning_effort", effort),
        ("logprobs", params.logprobs),
        # Alternatives only with the logprobs themselves (vLLM refuses them alone; 0 asks nothing).
        ("top_logprobs", params.top_logprobs if params.logprobs else None),
    ):
        if value is not None:
            body[key] = value
    if params.stop:
        body["stop"] = list(params.stop)
    if params.response_format is not None:
        body["response_format"] = _render_response_format(params.response_format, as_sent=same_dialect)
    # Custom tools, when the client sent any: all its tools as sent (from `extra`).
    tools_as_sent = same_dialect and "tools" in request.extra
    if request.tools or tools_as_sent:
        if not tools_as_sent:
            body["tools"] = [_render_tool(tool) for tool in request.tools]
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
    # A choice among no tools is a 400 at vLLM ("When using `tool_choice`, `tools` must be
    # set") and OpenAI; it can be left without them when the client's tools were an empty
    # list or only Anthropic server tools, which other backends do not get.
    if request.tool_choice is not None and (request.tools or tools_as_sent):
        choice = request.tool_choice
        body["tool_choice"] = (
            {"type": "function", "function": {"name": choice.name}} if choice.name else choice.mode
        )
    body["stream"] = stream
    options = body.pop("stream_options", None)  # the client's own, from `extra`
    if stream:
        options = dict(options) if isinstance(options, dict) else {}
        if include_usage:
            options["include_usage"] = True
        if options:
            body["stream_options"] = options
    return dumps(body)


# Dialects in which a conversation ending with an assistant message asks the model to go on
# with that message (Anthropic's prefill; Ollama continues one too).
_PREFILL_DIALECTS = frozenset({"anthropic", "ollama"})
# Dialects whose clients give an assistant turn's reasoning back (Ollama's `thinking`, which
# Ollama renders into the model's template; a Responses client's reasoning items, Codex's and
# opencode's; an Anthropic client's thinking blocks, Claude Code's), for a backend that takes
# vLLM's fields: thinking models' templates read it as `reasoning_content` (Qwen3's inside a
# tool loop; vLLM's gpt-oss as the analysis channel its tool calls need). Hosted APIs would
# refuse the field.
_REASONING_DIALECTS = frozenset({"ollama", "responses", "anthropic"})
# Dialects that switch thinking off (Anthropic's `thinking: {type: "disabled"}`, Ollama's
# `think: false`), which their parsers say as the effort "none".
_SWITCH_DIALECTS = frozenset({"anthropic", "ollama"})


def is_prefill(request: ChatRequest) -> bool:
    """Whether another dialect's client asks the model to continue the last assistant message."""
    last = request.messages[-1] if request.messages else None
    return (
        request.dialect in _PREFILL_DIALECTS and last is not None and last.role == "assistant" and not last.tool_calls
    )


def _template_fields(request: ChatRequest) -> dict[str, Any]:
    """vLLM's (and SGLang's) fields for what another dialect's client asked in its own terms:
    a prefill is continued where it stops (without them vLLM closes the message and starts a
    new turn; llama.cpp continues one by itself and ignores them), and thinking switched off
    is the templates' `enable_thinking: false` (Qwen3's, GLM's, …, which think unless told;
    vLLM's reasoning parser and llama.cpp read it too). Thinking switched on is left to the
    template's default, on for those models: llama.cpp refuses a prefill next to
    `enable_thinking: true`. An OpenAI client's request says what it means in these fields
    itself. An Ollama client's `min_p` and `repeat_penalty` options are vLLM's (and SGLang's)
    sampling fields of the same meaning, which hosted APIs would refuse like the others."""
    fields: dict[str, Any] = _ollama_sampling(request) if request.dialect == "ollama" else {}
    if is_prefill(request):
        fields["continue_final_message"] = True
        fields["add_generation_prompt"] = False  # vLLM refuses it next to continue_final_message
    if request.params.reasoning_effort == "none" and request.dialect in _SWITCH_DIALECTS:
        fields["chat_template_kwargs"] = {"enable_thinking": False}
    return fields


# Ollama options vLLM and SGLang sample with too, under their names there; the other options
# (num_ctx, num_gpu, mirostat, …) are an Ollama server's own settings.
_OLLAMA_SAMPLING = (("min_p", "min_p"), ("repeat_penalty", "repetition_penalty"))


def _ollama_sampling(request: ChatRequest) -> dict[str, Any]:
    options = request.extra.get("options")  # the options the domain does not model
    if not isinstance(options, dict):
        return {}
    return {
        name: options[key] for key, name in _OLLAMA_SAMPLING
        if isinstance(options.get(key), int | float) and not isinstance(options.get(key), bool)
    }


def wants_chunk_usage(request: ChatRequest) -> bool:
    """Whether an OpenAI client asked for usage on every chunk (vLLM's `continuous_usage_stats`)."""
    options = request.extra.get("stream_options") if request.dialect == DIALECT else None
    return isinstance(options, dict) and options.get("continuous_usage_stats") is True


def render_message(message: Message, *, as_sent: bool = False, reasoning: bool = False) -> dict[str, Any]:
    """`as_sent`: the message came from an OpenAI client, so its unmodelled fields (legacy
    `function_call`, `prefix`, …) go with it. `reasoning`: an assistant turn's reasoning goes
    as `reasoning_content` (see `_REASONING_DIALECTS`)."""
    role = message.role
    out: dict[str, Any] = {"role": role}
    legacy_call = as_sent and "function_call" in message.extra
    parts = [p for p in message.content if not (isinstance(p, OpaquePart) and p.dialect != DIALECT)]
    if not parts:
        out["content"] = None if message.tool_calls or legacy_call else ""
    elif len(parts) == 1 and isinstance(parts[0], TextPart):
        out["content"] = parts[0].text
    else:
        out["content"] = [_render_part(part) for part in parts]
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    if reasoning and message.reasoning and role == "assistant":
        out["reasoning_content"] = message.reasoning
    if as_sent:
        if message.reasoning is not None:
            out["reasoning_content"] = message.reasoning
        sent = message.extra
        if "content" in sent and _parse_content(sent["content"], "content") != message.content:
            # The gateway changed the content since (retrieval context, …): its version wins.
            sent = {k: v for k, v in sent.items() if k != "content"}
        out.update(sent)
    return out


def _render_part(part: ContentPart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        image: dict[str, Any] = {"url": part.url}
        if part.detail:
            image["detail"] = part.detail
        return {"type": "image_url", "image_url": image}
    return part.data


def _render_tool(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _render_response_format(fmt: ResponseFormat, *, as_sent: bool) -> dict[str, Any]:
    """`as_sent`: an OpenAI client's format goes back as it came; one from another dialect
    gets the `name` OpenAI requires."""
    if fmt.kind != "json_schema":
        return {"type": fmt.kind}
    spec: dict[str, Any] = {}
    if fmt.name is not None or not as_sent:
        spec["name"] = fmt.name or "response"
    if fmt.description is not None:
        spec["description"] = fmt.description
    if fmt.schema is not None:
        spec["schema"] = fmt.schema
    if fmt.strict is not None:
        spec["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": spec}
