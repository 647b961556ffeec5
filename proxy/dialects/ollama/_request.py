"""Ollama requests: parse `/api/chat` and `/api/generate` bodies into the domain, and render the
domain for an Ollama backend.

Ollama has no tool-call ids: a `tool` message names its tool (`tool_name`) and answers the
calls of the assistant message before it in order. Parsing gives every call a deterministic id
(`call<message><call>`, see `synthetic_call_id`) and pairs each tool message with the earliest
unanswered call of that name, so OpenAI and Anthropic backends receive a consistent
`tool_call_id` thread.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from proxy.dialects._effort import unknown_effort
from proxy.dialects._json import Fields, dumps, loads_object
from proxy.dialects.ollama._common import (
    DIALECT,
    arguments_object,
    arguments_text,
    image_base64,
    image_part,
)
from proxy.domain.chat import (
    ChatRequest,
    ContentPart,
    GenerationParams,
    ImagePart,
    Message,
    ResponseFormat,
    Role,
    TextPart,
    Tool,
    ToolCall,
)
from proxy.domain.errors import UNSUPPORTED_VALUE, invalid_request

_ROLES: dict[str, Role] = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}

# Marks a request that arrived on /api/generate; kept in `extra` so an Ollama backend can be
# asked on /api/generate too (suffix, raw and template only mean something there).
ENDPOINT_KEY = "@endpoint"

_CHAT_MODELLED = frozenset(
    {"model", "messages", "stream", "options", "format", "tools", "logprobs", "top_logprobs", ENDPOINT_KEY}
)
_GENERATE_MODELLED = frozenset(
    {"model", "prompt", "system", "images", "stream", "options", "format", "logprobs", "top_logprobs", ENDPOINT_KEY}
)
_MODELLED_OPTIONS = frozenset(
    {"temperature", "top_p", "top_k", "num_predict", "stop", "seed", "presence_penalty", "frequency_penalty"}
)
# What the generate endpoint can carry that chat cannot (forwarded to Ollama backends only).
_GENERATE_ONLY = ("suffix", "raw", "template", "context")


def parse_chat_request(body: bytes) -> ChatRequest:
    """Validate an Ollama `/api/chat` body; errors are 400s naming the field.

    No messages means "load the model" in Ollama: the request parses with `messages == []`
    and the caller answers it (see `load_reply`)."""
    fields = Fields(loads_object(body))
    model = _model(fields)
    raw_messages = fields.array("messages") or []
    request = ChatRequest(
        model=model,
        messages=_parse_messages(raw_messages),
        params=_parse_options(fields, fields.data.get("think")),
        tools=[_parse_tool(item, f"tools[{i}]") for i, item in enumerate(fields.array("tools") or [])],
        stream=fields.boolean("stream") is not False,
        dialect=DIALECT,
        extra=_extra(fields, _CHAT_MODELLED),
    )
    return request


def parse_generate_request(body: bytes) -> ChatRequest:
    """Validate an Ollama `/api/generate` body and express it as a chat: an optional system
    message and one user message (prompt and images). An empty prompt without images means
    "load the model" and parses with `messages == []`."""
    fields = Fields(loads_object(body))
    model = _model(fields)
    prompt = fields.text("prompt") or ""
    system = fields.text("system")
    images = _parse_images(fields, "images")
    for key in ("suffix", "template"):
        fields.text(key)
    fields.boolean("raw")
    context = fields.array("context")
    if context is not None and not all(isinstance(x, int) and not isinstance(x, bool) for x in context):
        raise fields.fail("context", "an array of integers")
    messages: list[Message] = []
    if prompt or images:
        if system:
            messages.append(Message(role="system", content=(TextPart(system),)))
        content: tuple[ContentPart, ...] = ((TextPart(prompt),) if prompt else ()) + images
        messages.append(Message(role="user", content=content))
    extra = _extra(fields, _GENERATE_MODELLED)
    extra[ENDPOINT_KEY] = "generate"
    return ChatRequest(
        model=model,
        messages=messages,
        params=_parse_options(fields, fields.data.get("think")),
        stream=fields.boolean("stream") is not False,
        dialect=DIALECT,
        extra=extra,
    )


def is_generate(request: ChatRequest) -> bool:
    """Whether the request arrived on /api/generate (its replies use `response`, not `message`)."""
    return request.dialect == DIALECT and request.extra.get(ENDPOINT_KEY) == "generate"


def wants_thinking(request: ChatRequest) -> bool:
    """False when the client said `think: false`: no thinking in the answer, whatever the
    backend sends (an OpenAI backend's model may reason regardless)."""
    return not (request.dialect == DIALECT and request.extra.get("think") is False)


def generate_only_fields(request: ChatRequest) -> list[str]:
    """The generate fields only an Ollama backend understands that this request uses."""
    if request.dialect != DIALECT:
        return []
    return [key for key in _GENERATE_ONLY if request.extra.get(key) not in (None, "", False, [])]


def _model(fields: Fields) -> str:
    model = fields.text("model", nonempty=True)
    if not model:
        raise invalid_request("model is required", param="model")
    return model


def _extra(fields: Fields, modelled: frozenset[str]) -> dict[str, Any]:
    """Unmodelled top-level fields, plus the options the domain does not model (for Ollama
    backends; see `unmodelled_options`). The modelled ones live in the domain's fields only,
    so `options.temperature` and OpenAI's `temperature` make the same request (`req_id`)."""
    _check_extra(fields)
    extra = {k: v for k, v in fields.data.items() if k not in modelled}
    options = fields.data.get("options")
    if isinstance(options, dict):
        rest = {key: value for key, value in options.items() if not _modelled_option(key, value)}
        if rest:
            extra["options"] = rest
    return extra


# Ollama's numbers for "no value": a num_predict or top_k below 1 is no limit (-1, -2: fill the
# context), a negative seed a random one (Ollama's default, -1, which some clients send). As
# domain values they would be a limit, a fixed seed (vLLM would answer every retry alike), or a
# top_k of 0 that vLLM refuses: they go to Ollama backends only.
_NO_VALUE_BELOW = {"num_predict": 1, "top_k": 1, "seed": 0}


def _modelled_option(key: str, value: Any) -> bool:
    """Whether the domain's fields hold this option (not one of Ollama's "no value" numbers)."""
    return key in _MODELLED_OPTIONS and not _no_value(key, value)


def _no_value(key: str, value: Any) -> bool:
    below = _NO_VALUE_BELOW.get(key)
    return below is not None and isinstance(value, int | float) and not isinstance(value, bool) and value < below


def _check_extra(fields: Fields) -> None:
    keep_alive = fields.data.get("keep_alive")
    if keep_alive is not None and (isinstance(keep_alive, bool) or not isinstance(keep_alive, int | float | str)):
        raise fields.fail("keep_alive", 'a duration (seconds, or a string such as "5m")')
    think = fields.data.get("think")
    if think is not None and not isinstance(think, bool) and think not in _THINK_LEVELS:
        raise fields.fail("think", 'a boolean or "low", "medium", "high"')


# A Go duration (`time.ParseDuration`), which is how Ollama reads a `keep_alive` string.
_DURATION = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: Any) -> float | None:
    """A `keep_alive` in seconds as Ollama reads it: a number of seconds, or a Go duration
    ("5m", "1h30m", "0s"); a number in a string is seconds too (as `OLLAMA_KEEP_ALIVE` reads
    one). Negative is "keep it loaded". None: not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    if not _DURATION.fullmatch(text):
        return None
    seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(text))
    return -seconds if text.startswith("-") else seconds


def unloads(request: ChatRequest) -> bool:
    """Whether a request without a prompt asks to unload the model (`keep_alive` of zero:
    `ollama stop`, which sends 0; "0s", "0m" too)."""
    return keep_alive_seconds(request.extra.get("keep_alive")) == 0


# -- messages ------------------------------------------------------------------------------


def _parse_messages(items: list[Any]) -> list[Message]:
    messages: list[Message] = []
    unanswered: list[ToolCall] = []
    for i, item in enumerate(items):
        path = f"messages[{i}]"
        if not isinstance(item, dict):
            raise invalid_request(f"Invalid `{path}`: expected an object.", param=path)
        fields = Fields(item, path)
        role_name = fields.text("role", required=True)
        role = _ROLES.get(role_name or "")
        if role is None:
            raise invalid_request(
                f"Invalid `{path}.role`: {role_name!r} is not one of system, user, assistant, tool.",
                param=f"{path}.role",
            )
        text = fields.text("content") or ""
        content: tuple[ContentPart, ...] = ((TextPart(text),) if text else ()) + _parse_images(fields, "images")
        tool_calls = tuple(
            _parse_tool_call(call, f"{path}.tool_calls[{j}]", synthetic_call_id(i, j))
            for j, call in enumerate(fields.array("tool_calls") or [])
        )
        name: str | None = None
        tool_call_id: str | None = None
        if role == "assistant":
            unanswered = list(tool_calls)
        elif role == "tool":
            tool_call_id, name = _answer(
                unanswered, fields.text("tool_call_id") or None, fields.text("tool_name") or fields.text("name"), i
            )
        messages.append(
            Message(
                role=role,
                content=content,
                tool_calls=tool_calls,
                tool_call_id=tool_call_id,
                name=name,
                reasoning=fields.text("thinking") or None,
            )
        )
    return messages


def synthetic_call_id(message: int, call: int) -> str:
    """The id of the `call`-th tool call of the `message`-th message, which the client sent
    without one: nine letters and digits, the only ids Mistral's models take (mistral-common's
    check, in vLLM serving them and in Mistral's API: `call_1_0` was a 400 on the tool loop's
    second turn); every other backend takes them too."""
    if message < 1000 and call < 100:
        return f"call{message:03d}{call:02d}"
    # Hex has no "l": these never meet the ids above.
    return hashlib.sha256(f"{message}.{call}".encode()).hexdigest()[:9]


def _answer(unanswered: list[ToolCall], call_id: str | None, name: str | None, position: int) -> tuple[str, str | None]:
    """Pair a tool message with the call it answers; the call is then no longer open."""
    match: ToolCall | None = None
    if call_id is not None:
        match = next((call for call in unanswered if call.id == call_id), None)
    elif name:
        match = next((call for call in unanswered if call.name == name), None)
    elif unanswered:
        match = unanswered[0]
    if match is not None:
        unanswered.remove(match)
        return match.id, name or match.name
    # Nothing to answer: keep the message; an id-checking backend will say what is wrong.
    return call_id or synthetic_call_id(position, 0), name


def _parse_images(fields: Fields, key: str) -> tuple[ImagePart, ...]:
    images = fields.array(key)
    if not images:
        return ()
    if not all(isinstance(image, str) and image for image in images):
        raise fields.fail(key, "an array of base64-encoded images")
    parts = []
    for index, image in enumerate(images):
        try:
            parts.append(image_part(image))
        except ValueError as error:
            raise fields.fail(f"{key}[{index}]", f"a base64-encoded image ({error})") from None
    return tuple(parts)


def _parse_tool_call(item: Any, path: str, default_id: str) -> ToolCall:
    if not isinstance(item, dict):
        raise invalid_request(f"Invalid `{path}`: expected an object.", param=path)
    fields = Fields(item, path)
    function = fields.object("function", required=True)
    assert function is not None
    name = function.text("name", required=True, nonempty=True)
    arguments = function.data.get("arguments")
    if arguments is not None and not isinstance(arguments, dict | str):
        raise function.fail("arguments", "an object")
    return ToolCall(id=fields.text("id") or default_id, name=name or "", arguments=arguments_text(arguments))


def _parse_tool(item: Any, path: str) -> Tool:
    if not isinstance(item, dict):
        raise invalid_request(f"Invalid `{path}`: expected an object.", param=path)
    fields = Fields(item, path)
    if item.get("type", "function") != "function":
        raise fields.fail("type", '"function"')
    function = fields.object("function", required=True)
    assert function is not None
    name = function.text("name", required=True, nonempty=True)
    parameters = function.object("parameters")
    return Tool(name=name or "", description=function.text("description"), parameters=parameters.data if parameters else None)


# -- options and format ------------------------------------------------------------------


_THINK_LEVELS = ("low", "medium", "high")


def _parse_options(fields: Fields, think: Any) -> GenerationParams:
    """Options and format; a `think` level (validated by `_check_extra`) is also the domain's
    `reasoning_effort`, for backends that are not Ollama, and `think: false` is "none"."""
    options = fields.object("options") or Fields({}, "options")

    def value(key: str) -> int | None:
        number = options.integer(key)
        return None if _no_value(key, number) else number

    return GenerationParams(
        max_tokens=value("num_predict"),
        temperature=options.number("temperature", minimum=0),
        top_p=options.number("top_p", minimum=0, maximum=1),
        top_k=value("top_k"),
        stop=options.stop("stop"),
        seed=value("seed"),
        presence_penalty=options.number("presence_penalty"),
        frequency_penalty=options.number("frequency_penalty"),
        response_format=_parse_format(fields.data.get("format")),
        reasoning_effort=think if think in _THINK_LEVELS else "none" if think is False else None,
        logprobs=fields.boolean("logprobs"),
        top_logprobs=fields.integer("top_logprobs", minimum=0, maximum=20),  # Ollama's bounds
    )


def _parse_format(value: Any) -> ResponseFormat | None:
    if value is None or value == "":
        return None
    if value == "json":
        return ResponseFormat(kind="json_object")
    if isinstance(value, dict):
        return ResponseFormat(kind="json_schema", schema=value, name=_schema_name(value.get("title")))
    raise invalid_request('Invalid `format`: expected "json" or a JSON schema object.', param="format")


_NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9_-]+")


def _schema_name(title: Any) -> str | None:
    """A schema's `title` as the name OpenAI's `json_schema` requires: letters, digits, `_` and
    `-`, at most 64 (OpenAI answers 400 to "Weather report", or pydantic's `Page[Item]`)."""
    if not isinstance(title, str):
        return None
    name = _NOT_IN_A_NAME.sub("_", title).strip("_")[:64]
    return name or None


def unmodelled_options(request: ChatRequest) -> dict[str, Any]:
    """The client's Ollama options the domain does not model (num_ctx, repeat_penalty, …,
    and the "no value" numbers of `_NO_VALUE_BELOW`), for an Ollama backend."""
    if request.dialect != DIALECT:
        return {}
    options = request.extra.get("options")
    if not isinstance(options, dict):
        return {}
    return {key: value for key, value in options.items() if not _modelled_option(key, value)}


# ---------------------------------------------------------------------------------------------
# Rendering for Ollama backends


def encode_request(request: ChatRequest, upstream_model: str, *, stream: bool) -> tuple[str, bytes]:
    """The path and body for an Ollama backend: /api/generate for a generate request that
    still has its shape (so suffix, raw and template keep their meaning), /api/chat otherwise."""
    if request.params.n is not None and request.params.n > 1:
        raise invalid_request(
            "Ollama backends generate one choice per request; `n` must be 1.", param="n", code=UNSUPPORTED_VALUE,
        )
    body: dict[str, Any] = {}
    if request.dialect == DIALECT:
        body.update((k, v) for k, v in request.extra.items() if k != ENDPOINT_KEY and k != "options")
    body["model"] = upstream_model
    prompt = _generate_prompt(request)
    if prompt is not None:
        path = "/api/generate"
        system, user = prompt
        body["prompt"] = user.text
        if system is not None:
            body["system"] = system.text
        images = [image_base64(p) for p in user.content if isinstance(p, ImagePart)]
        if images:
            body["images"] = images
    else:
        path = "/api/chat"
        for key in _GENERATE_ONLY:
            body.pop(key, None)
        body["messages"] = render_messages(request.messages)
        choice = request.tool_choice
        if request.tools and not (choice is not None and choice.mode == "none"):
            tools = request.tools
            if choice is not None and choice.name is not None:
                # Ollama has no `tool_choice`: a forced tool is offered alone, the nearest it
                # comes to forcing it (`any`/`required` has no such stand-in: every tool goes).
                tools = [tool for tool in tools if tool.name == choice.name] or tools
            body["tools"] = [_render_tool(tool) for tool in tools]
    fmt = request.params.response_format
    if fmt is not None and fmt.kind != "text":
        body["format"] = fmt.schema if fmt.kind == "json_schema" and fmt.schema else "json"
    options = _render_options(request)
    if options:
        body["options"] = options
    effort = request.params.reasoning_effort
    if effort is not None and "think" not in body:
        think = _THINK_FOR_EFFORT.get(effort)
        if think is None:
            raise unknown_effort(request)
        body["think"] = think
    if request.params.logprobs is not None:
        body["logprobs"] = request.params.logprobs
    if request.params.top_logprobs is not None:
        body["top_logprobs"] = request.params.top_logprobs
    body["stream"] = stream
    return path, dumps(body)


# What Ollama's own OpenAI-compatible endpoint does with `reasoning_effort`: a level for
# models that have levels, thinking on (off for "none") for the others. "minimal" is off too:
# a level would have Qwen3 and the other models without levels think in full.
_THINK_FOR_EFFORT: dict[str, bool | str] = {
    "none": False, "minimal": False, "low": "low", "medium": "medium", "high": "high", "xhigh": "high",
}


# Ollama's refusals of a `think` its model cannot take: a level (only models with levels take
# one: gpt-oss), or thinking at all (llama3.1, qwen2.5, ...).
_LEVEL_REFUSED = re.compile(r"think value \S+ is not supported")
_NO_THINKING = "does not support thinking"


def think_refused(refusal: str) -> bool:
    """Whether an Ollama error says its model cannot take the request's `think`."""
    return _NO_THINKING in refusal or _LEVEL_REFUSED.search(refusal) is not None


def without_refused_think(request: ChatRequest, body: bytes, refusal: str) -> bytes | None:
    """`body` again with the `think` its model refused made what it can take: a level as
    thinking on, thinking as none. Only for a `think` the gateway made of another dialect's
    effort (Claude Code's `thinking`, an OpenAI `reasoning_effort`), which asks for thinking
    as well as the model can; an Ollama client's own `think` gets Ollama's answer. None: not
    such a refusal, or nothing left to change."""
    if request.dialect == DIALECT:
        return None
    data = loads_object(body)
    think = data.get("think")
    if isinstance(think, str) and _LEVEL_REFUSED.search(refusal):
        data["think"] = True
    elif think is not None and _NO_THINKING in refusal:
        del data["think"]
    else:
        return None
    return dumps(data)


def _generate_prompt(request: ChatRequest) -> tuple[Message | None, Message] | None:
    if not is_generate(request):
        return None
    messages = request.messages
    if len(messages) == 1 and messages[0].role == "user":
        return None, messages[0]
    if len(messages) == 2 and messages[0].role == "system" and messages[1].role == "user":
        return messages[0], messages[1]
    return None


def _render_options(request: ChatRequest) -> dict[str, Any]:
    options = unmodelled_options(request)
    params = request.params
    for key, value in (
        ("temperature", params.temperature),
        ("top_p", params.top_p),
        ("top_k", params.top_k),
        ("num_predict", params.max_tokens),
        ("seed", params.seed),
        ("presence_penalty", params.presence_penalty),
        ("frequency_penalty", params.frequency_penalty),
    ):
        if value is not None:
            options[key] = value
    if params.stop:
        options["stop"] = list(params.stop)
    return options


def render_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Domain messages as Ollama's: text joined, images as base64, tool calls with object
    arguments, tool results named by `tool_name` (looked up from the call they answer)."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.text}
        images = [image_base64(part) for part in message.content if isinstance(part, ImagePart)]
        if images:
            item["images"] = images
        if message.reasoning:
            item["thinking"] = message.reasoning
        if message.tool_calls:
            calls = []
            for call in message.tool_calls:
                names[call.id] = call.name
                calls.append({"id": call.id, "function": {"name": call.name, "arguments": arguments_object(call.arguments)}})
            item["tool_calls"] = calls
        if message.role == "tool":
            name = message.name or names.get(message.tool_call_id or "")
            if name:
                item["tool_name"] = name
            if message.tool_call_id:
                item["tool_call_id"] = message.tool_call_id
        out.append(item)
    return out


def _render_tool(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}
    return {"type": "function", "function": function}
