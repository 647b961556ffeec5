"""OpenAI Responses requests (`POST /v1/responses`): a client's body as a domain chat request.

The gateway keeps no prompts (`prompt` is a 400 saying so); `previous_response_id` continues
a response its journal keeps (see `continued`), `conversation` one of its stored
conversations (its items, looked up by the caller, go first: `in_conversation`), and an
`item_reference` stands for an item of a kept response (looked up by the caller, told of
them by `UnresolvedReferences`), and a `compaction` item for the summary it holds (see
`_compaction`).
`background: true` makes a run that outlives its connection, read back (polled, or streamed
again) from the journal. Only function tools are served; OpenAI's built-in tools run on
OpenAI's servers and have nothing to become here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from proxy.dialects._json import Fields, loads_object
from proxy.dialects.openai import check_forced_tool
from proxy.dialects.responses._compaction import compaction_message, summary_message, summary_of
from proxy.dialects.responses._signed import signed_thinking, thinking_block
from proxy.domain.chat import (
    ChatCompletion,
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
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.domain.ids import storable

DIALECT = "responses"
# The dialect of an `input_file`'s part: an OpenAI chat client's `file` (see `_parse_file`).
CHAT_DIALECT = "openai"

_ROLES: dict[str, Role] = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}

_NOT_STORED = "this gateway stores no prompts: send the prompt's text in `instructions` and `input`"
# Field -> what it would need, for the 400 that refuses it.
_STATEFUL = {
    "prompt": "names a stored prompt template",
}
# A response's settings key (never echoed: see `response_object`) for how many of its
# messages, after its instructions, are its conversation's items: its own input comes after.
CONVERSATION_PREFIX = "_conversation_prefix"
# The `include` that asks for the output text's token log probabilities.
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# Every `include` OpenAI knows: a misspelt one is a 400 there, not silently nothing.
INCLUDABLE = (
    "file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
    "message.input_image.image_url", "computer_call_output.output.image_url",
    "code_interpreter_call.outputs", "reasoning.encrypted_content", LOGPROBS_INCLUDE,
)
# A workflow pipeline's options (`x-pipeline`), as in a chat request: the workflow route reads
# them from `extra` (a Responses request's `extra` never reaches a backend).
_PIPELINE_OPTIONS = "workflow"
_BUILT_IN_TOOLS = "this gateway serves function tools only (`{\"type\": \"function\", \"name\": ...}`)"
_CODEX_WEB_SEARCH = ' (Codex CLI: `web_search = "disabled"` in its config.toml, or `-c web_search=disabled`)'


@dataclass(slots=True)
class ResponsesRequest:
    """A parsed request: the chat for the backend, and the settings the Response echoes
    (in wire form, computed once per request)."""

    chat: ChatRequest
    settings: dict[str, Any] = field(default_factory=dict)
    # The client's `stream`: a background run streams from its backend whatever the client
    # asked (`chat.stream`), so that its journal has its events as they come.
    stream: bool = False
    # The response this one continues (`previous_response_id`): its conversation and answer
    # go before this request's input (see `continued`).
    previous: str | None = None
    # The stored conversation (`conversation`) whose items go before this request's input
    # (see `in_conversation`), and to which its input and output are appended.
    conversation: str | None = None
    # The input ended with `{"type": "compaction_trigger"}` (Codex CLI's compaction on OpenAI):
    # the answer is one `compaction` item standing for the rest, as `/v1/responses/compact` makes.
    compaction_triggered: bool = False

    @property
    def background(self) -> bool:
        """The run must outlive its connection (and be read back from the journal)."""
        return bool(self.settings.get("background"))


class UnresolvedReferences(Exception):
    """A request with `item_reference` inputs parsed without the items they name: its
    references, as (path, item id), for the caller to look up and parse it again with them."""

    def __init__(self, references: list[tuple[str, str]]) -> None:
        super().__init__(references)
        self.references = references


def parse_responses_request(
    body: bytes, referenced: Mapping[str, dict[str, Any]] | None = None, *, compaction: bool = False,
    counting: bool = False,
) -> ResponsesRequest:
    """Validate a `/v1/responses` body; every bad input is a 400 naming its field.
    `referenced`: the items its `item_reference`s name, by id; None: raises
    `UnresolvedReferences` for a request that has any (most have none: one parse).
    `compaction`: a `/v1/responses/compact` body, whose `input` may be left out when it
    names a `previous_response_id` (that response's conversation is compacted).
    `counting`: a `/v1/responses/input_tokens` body, whose `input` is optional (the
    instructions, or the response or conversation it continues, are counted alone), and
    so is `model` with a `previous_response_id` (the caller gives it that response's)."""
    fields = Fields(loads_object(body))
    data = fields.data
    model = fields.text("model", required=not counting, nonempty=True)
    for name, what in _STATEFUL.items():
        if data.get(name) is not None:
            raise invalid_request(f"`{name}` {what}: {_NOT_STORED}.", param=name, code="unsupported_parameter")
    previous = fields.text("previous_response_id", nonempty=True)
    if model is None and previous is None:
        # A count may leave it out for the model of the response it continues (set by the caller).
        raise invalid_request(
            "Missing required parameter `model` (a count may leave it out with `previous_response_id`, for the model "
            "of that response).", param="model",
        )
    conversation = _parse_conversation(data.get("conversation"))
    if conversation is not None and previous is not None:
        raise invalid_request(
            "Mutually exclusive parameters: Ensure you are only providing one of: 'previous_response_id' or "
            "'conversation'.", param="conversation",
        )
    background = bool(fields.boolean("background"))
    if background and fields.data.get("store") is False:
        raise invalid_request(
            "`background: true` needs `store`: a background response is read back by its id.", param="store",
        )

    messages: list[Message] = []
    instructions = fields.text("instructions")
    if instructions:
        messages.append(Message(role="system", content=(TextPart(instructions),)))
    raw_input = data.get("input")
    triggered = (
        not (compaction or counting) and isinstance(raw_input, list) and bool(raw_input)
        and raw_input[-1] == {"type": "compaction_trigger"}
    )
    if triggered and isinstance(raw_input, list):
        raw_input = raw_input[:-1]
        if not raw_input:
            raise invalid_request("Nothing to compact: `input` holds only its `compaction_trigger`.", param="input")
    if raw_input is None and not (counting or (compaction and previous is not None)):
        raise invalid_request("Missing required parameter `input`.", param="input")
    if raw_input is None:
        pass
    elif isinstance(raw_input, str):
        messages.append(Message(role="user", content=(TextPart(raw_input),)))
    elif isinstance(raw_input, list) and raw_input:
        _parse_items(raw_input, messages, referenced)
    else:
        raise fields.fail("input", "a string or a non-empty array of input items")
    if not messages and raw_input is not None:
        raise invalid_request(
            "`input` holds no message (only reasoning items): nothing to answer.", param="input"
        )

    raw_tools = fields.array("tools") or []
    tools = [tool for i, item in enumerate(raw_tools) for tool in _parse_tools(item, f"tools[{i}]")]
    tool_choice, tool_choice_wire = _parse_tool_choice(data.get("tool_choice"))
    offered = _allowed_tools(tool_choice_wire, tools)
    check_forced_tool(tool_choice, offered, custom_tools=False)
    text = fields.object("text")
    response_format, text_wire = _parse_text(text)
    reasoning = fields.object("reasoning")
    effort = reasoning.text("effort", nonempty=True) if reasoning is not None else None
    summary = reasoning.text("summary") if reasoning is not None else None
    max_output_tokens = fields.integer("max_output_tokens", minimum=1)
    temperature = fields.number("temperature", minimum=0, maximum=2)
    top_p = fields.number("top_p", minimum=0, maximum=1)
    parallel = fields.boolean("parallel_tool_calls")
    metadata = _parse_metadata(fields.object("metadata"))
    user = fields.text("user")
    safety_identifier = fields.text("safety_identifier")
    prompt_cache_key = fields.text("prompt_cache_key")
    retention = fields.text("prompt_cache_retention")
    if retention is not None and retention not in ("in_memory", "24h"):
        raise fields.fail("prompt_cache_retention", '"in_memory" or "24h"')
    max_tool_calls = fields.integer("max_tool_calls", minimum=0)
    truncation = fields.text("truncation")
    if truncation is not None and truncation not in ("auto", "disabled"):
        raise fields.fail("truncation", '"auto" or "disabled"')
    include = fields.array("include")
    if include is not None:
        _check_include(fields, include)
    top_logprobs = fields.integer("top_logprobs", minimum=0, maximum=20)
    service_tier = fields.text("service_tier")
    store = fields.boolean("store")
    stream = bool(fields.boolean("stream"))
    options = fields.object("stream_options")
    if options is not None and not stream:
        # OpenAI's documented rule (and its refusal on chat completions): a client that meant
        # to stream should hear it, not get a whole answer.
        raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options")
    if options is not None:
        options.boolean("include_obfuscation")

    chat = ChatRequest(
        model=model or "",
        messages=messages,
        params=GenerationParams(
            max_tokens=max_output_tokens,
            temperature=temperature,
            top_p=top_p,
            response_format=response_format,
            reasoning_effort=effort,
            # Asked by `include`; `top_logprobs` alone only says how many alternatives.
            logprobs=True if include and LOGPROBS_INCLUDE in include else None,
            top_logprobs=top_logprobs if include and LOGPROBS_INCLUDE in include else None,
        ),
        tools=offered,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        # A background run's events are journalled as they come: polled, read back as a
        # stream or cancelled, it has what it generated so far.
        stream=stream or background,
        # The gateway's accounting asks every backend for usage; the Response carries it.
        include_usage=True if stream or background else None,
        dialect=DIALECT,
        # The end user, as an OpenAI chat client's: an Anthropic backend's `metadata.user_id`;
        # a pipeline's options, as a chat client's.
        extra={key: value for key, value in (("safety_identifier", safety_identifier), ("user", user)) if value}
        | ({_PIPELINE_OPTIONS: data[_PIPELINE_OPTIONS]} if _PIPELINE_OPTIONS in data else {}),
    )
    settings: dict[str, Any] = {
        "instructions": instructions,
        "metadata": metadata if metadata is not None else {},
        "parallel_tool_calls": True if parallel is None else parallel,
        # OpenAI's echo of what the request left unset: its defaults (1, 1, no metadata).
        "temperature": 1.0 if temperature is None else temperature,
        "top_p": 1.0 if top_p is None else top_p,
        "tool_choice": tool_choice_wire,
        "tools": _tools_to_wire(raw_tools, tools),
        "max_output_tokens": max_output_tokens,
        "text": text_wire,
        "reasoning": {"effort": effort, "summary": summary} if reasoning is not None else None,
        "truncation": truncation or "disabled",
        "user": user,
        # Echoed as OpenAI does: a chat backend has no prompt cache to key, nor built-in tools to
        # count the calls of (function calls are the client's to count).
        "safety_identifier": safety_identifier,
        "prompt_cache_key": prompt_cache_key,
        "prompt_cache_retention": retention,
        "max_tool_calls": max_tool_calls,
        "service_tier": service_tier or "default",
        "top_logprobs": top_logprobs if top_logprobs is not None else 0,
        "background": background,
        "previous_response_id": previous,
        # OpenAI's default; `false`: not read back by its id (see `readable`).
        "store": store is not False,
    }
    if conversation is not None:
        settings["conversation"] = {"id": conversation}
    return ResponsesRequest(
        chat, settings, stream=stream, previous=previous, conversation=conversation, compaction_triggered=triggered
    )


def _parse_conversation(value: Any) -> str | None:
    """`conversation`: its id, or `{"id": ...}`."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("id")
        param = "conversation.id"
    else:
        param = "conversation"
    if not isinstance(value, str) or not value:
        raise invalid_request(
            f"Invalid `{param}`: expected a conversation id (`conv_...`), or an object with it as `id`.", param=param
        )
    return value


def readable(settings: dict[str, Any] | None) -> bool:
    """Whether a response is read back by its id (retrieved, continued, listed, referred to,
    deleted): not one its request made with `store: false`, which OpenAI keeps for nobody."""
    return settings is None or settings.get("store") is not False


def continued(parsed: ResponsesRequest, prior: list[Message], answer: ChatCompletion, *, compacted: bool = False) -> None:
    """Make `parsed` continue a response: the conversation that response was answered with
    (`prior`, without its own instructions, which OpenAI does not carry over), its answer,
    then this request's input, after this request's instructions. `compacted`: the response
    answered a `compaction_trigger`, whose `compaction` item stands for all before it."""
    chat = parsed.chat
    own = 1 if parsed.settings.get("instructions") else 0
    if compacted:
        chat.messages = [*chat.messages[:own], summary_message(summary_of(answer)), *chat.messages[own:]]
        return
    said = answer.choices[0] if answer.choices else None
    reply = (
        [Message(
            role="assistant",
            # Claude's signed thinking first, as it gave it: it thinks on in a tool loop only so.
            content=(*(thinking_block(*block) for block in said.signed), *((TextPart(said.content),) if said.content else ())),
            tool_calls=tuple(said.tool_calls), reasoning=said.reasoning or None,
        )]
        if said is not None and (said.content or said.tool_calls) else []
    )
    chat.messages = [*chat.messages[:own], *prior, *reply, *chat.messages[own:]]


def in_conversation(parsed: ResponsesRequest, prior: list[Message]) -> None:
    """Put a conversation's items (`prior`, as messages) before this request's input, after
    its instructions."""
    chat = parsed.chat
    own = 1 if parsed.settings.get("instructions") else 0
    chat.messages = [*chat.messages[:own], *prior, *chat.messages[own:]]
    parsed.settings[CONVERSATION_PREFIX] = len(prior)


def default_settings() -> dict[str, Any]:
    """What a Response echoes of a request that set nothing: for one read back later (the
    gateway keeps the answer, not the settings it was asked with)."""
    return parse_responses_request(b'{"model": "-", "input": ""}').settings


# -- input items ---------------------------------------------------------------------------------------


def _is_reference(item: dict[str, Any]) -> bool:
    """An `item_reference`: so typed, or (its `type` being optional) an item with an `id` and
    neither a `type` nor a `role`."""
    kind = item.get("type")
    return kind == "item_reference" or (kind is None and "role" not in item and "id" in item)


def item_not_found(item: str, param: str | None = None) -> GatewayError:
    return GatewayError(ErrorKind.NOT_FOUND, f"Item with id '{item}' not found.", param=param)


def _parse_items(
    items: list[Any], messages: list[Message], referenced: Mapping[str, dict[str, Any]] | None,
    param: str = "input",
) -> None:
    """`items` (a request's `input`, or what a conversation is given) parsed into `messages`;
    with `referenced` None, a list with item references raises `UnresolvedReferences` for the
    caller to look them up and call again."""
    unresolved: list[tuple[str, str]] = []
    reasoning: list[str] = []
    signed: list[ContentPart] = []
    for i, item in enumerate(items):
        path = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise invalid_request(f"Invalid `{path}`: expected an object.", param=path)
        if _is_reference(item):
            reference = Fields(item, path).text("id", required=True, nonempty=True) or ""
            if referenced is None:
                unresolved.append((path, reference))
                continue
            # The item it names, as the response keeping it lists it: parsed as if sent here.
            found = referenced.get(reference)
            if found is None:
                raise item_not_found(reference, param=path)
            item = found
        if item.get("type") == "reasoning":
            given = signed_thinking(item.get("encrypted_content"))
            if given is not None:
                # A Claude backend's thinking, given back signed: Claude's own block again.
                thinking, signature = given
                reasoning.append(thinking)
                signed.append(thinking_block(thinking, signature))
            else:
                reasoning.extend(_reasoning_text(item))
            continue
        before = len(messages)
        _parse_item(item, path, messages)
        if reasoning:
            # The reasoning behind the assistant turn it comes before (its calls, its text).
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and not last.reasoning and (
                len(messages) > before or last.tool_calls
            ):
                messages[-1] = replace(last, reasoning="\n".join(reasoning), content=(*signed, *last.content))
            reasoning.clear()
            signed.clear()
    if unresolved:
        raise UnresolvedReferences(unresolved)


def _reasoning_text(item: dict[str, Any]) -> list[str]:
    """A reasoning item's text: its `reasoning_text` content (the gateway's own items, vLLM's), else
    its summary. OpenAI's own (encrypted, a summary at most) has little or none."""
    for key, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key)
        if isinstance(parts, list):
            texts = [p["text"] for p in parts if isinstance(p, dict) and p.get("type") == kind and isinstance(p.get("text"), str)]
            if any(texts):
                return ["".join(texts)] if kind == "reasoning_text" else ["\n\n".join(texts)]
    return []


def _parse_item(item: dict[str, Any], path: str, messages: list[Message]) -> None:
    kind = item.get("type", "message")
    if kind == "message":
        messages.append(_parse_message(item, path))
    elif kind == "function_call":
        _add_call(messages, _parse_call(item, path))
    elif kind == "function_call_output":
        messages.append(_parse_call_output(item, path))
    elif kind == "reasoning":
        return  # `_parse_items` gives it to the assistant turn it comes before
    elif kind == "compaction":
        messages.append(compaction_message(item, path))
    elif isinstance(kind, str):
        raise invalid_request(
            f"Invalid `{path}.type`: {kind!r} is not an input item this gateway takes (message, function_call, "
            f"function_call_output, reasoning, compaction, item_reference); {_BUILT_IN_TOOLS}.",
            param=f"{path}.type",
        )
    else:
        raise invalid_request(f"Invalid `{path}.type`: expected a string.", param=f"{path}.type")


def _parse_message(item: dict[str, Any], path: str) -> Message:
    fields = Fields(item, path)
    role_name = fields.text("role", required=True)
    role = _ROLES.get(role_name or "")
    if role is None:
        raise invalid_request(
            f"Invalid `{path}.role`: {role_name!r} is not one of user, system, developer, assistant.",
            param=f"{path}.role",
        )
    value = item.get("content")
    content_path = f"{path}.content"
    if isinstance(value, str):
        content: tuple[ContentPart, ...] = (TextPart(value),)
    elif isinstance(value, list):
        content = tuple(_parse_part(part, f"{content_path}[{j}]") for j, part in enumerate(value))
    elif value is None:
        raise invalid_request(f"Missing required parameter `{content_path}`.", param=content_path)
    else:
        raise invalid_request(
            f"Invalid `{content_path}`: expected a string or an array of content parts.", param=content_path
        )
    return Message(role=role, content=content)


def _parse_part(part: Any, path: str) -> ContentPart:
    if not isinstance(part, dict):
        raise invalid_request(f"Invalid `{path}`: expected an object.", param=path)
    fields = Fields(part, path)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        text = fields.text("text", required=True)
        return TextPart(text or "")
    if kind == "refusal":
        return TextPart(fields.text("refusal", required=True) or "")
    if kind == "input_image":
        if part.get("file_id") is not None:
            raise invalid_request(
                f"`{path}.file_id` names an uploaded file: this gateway stores no files; send the image as "
                "`image_url` (an https URL or a `data:` URL).",
                param=f"{path}.file_id", code="unsupported_parameter",
            )
        url = fields.text("image_url", required=True, nonempty=True)
        return ImagePart(url=url or "", detail=fields.text("detail"), at=f"{path}.image_url")
    if kind == "input_file":
        return _parse_file(fields, path)
    if isinstance(kind, str):
        raise invalid_request(
            f"Invalid `{path}.type`: {kind!r} is not a content part this gateway takes "
            "(input_text, input_image, input_file, output_text, refusal).",
            param=f"{path}.type",
        )
    raise invalid_request(f"Invalid `{path}.type`: expected a string.", param=f"{path}.type")


def _parse_file(fields: Fields, path: str) -> OpaquePart:
    """An `input_file` sent inline (`file_data`, a base64 `data:` URL) as the OpenAI chat
    client's `file` part it is: the backend's encoders and refusals know that one (an
    Anthropic backend takes a PDF as a document, an OpenAI-compatible one the part itself)."""
    for name, what in (("file_id", "names an uploaded file"), ("file_url", "names a file by URL")):
        if fields.data.get(name) is not None:
            raise invalid_request(
                f"`{path}.{name}` {what}: this gateway fetches no files; send its content as `file_data` (a base64 "
                "`data:` URL, such as `data:application/pdf;base64,...`).",
                param=f"{path}.{name}", code="unsupported_parameter",
            )
    data = fields.text("file_data", required=True, nonempty=True) or ""
    file: dict[str, Any] = {"file_data": data}
    filename = fields.text("filename")
    if filename:
        file["filename"] = filename
    return OpaquePart(CHAT_DIALECT, {"type": "file", "file": file}, at=path)


def _parse_call(item: dict[str, Any], path: str) -> ToolCall:
    fields = Fields(item, path)
    call_id = fields.text("call_id", required=True, nonempty=True)
    name = fields.text("name", required=True, nonempty=True)
    namespace = fields.text("namespace")
    if namespace:
        name = flat_name(namespace, name or "")
    arguments = item.get("arguments")
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    elif not isinstance(arguments, str):
        raise fields.fail("arguments", "a JSON string")
    return ToolCall(id=call_id or "", name=name or "", arguments=arguments)


def _add_call(messages: list[Message], call: ToolCall) -> None:
    """Calls of one turn are one assistant message to a chat backend (its text, if it said
    any, included): a parallel call's results must follow the message holding all of them."""
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant":
        messages[-1] = Message(
            role="assistant", content=last.content, tool_calls=(*last.tool_calls, call), reasoning=last.reasoning
        )
    else:
        messages.append(Message(role="assistant", tool_calls=(call,)))


def _parse_call_output(item: dict[str, Any], path: str) -> Message:
    fields = Fields(item, path)
    call_id = fields.text("call_id", required=True, nonempty=True)
    output = item.get("output")
    output_path = f"{path}.output"
    if isinstance(output, str):
        content: tuple[ContentPart, ...] = (TextPart(output),)
    elif isinstance(output, list):
        content = tuple(_parse_part(part, f"{output_path}[{j}]") for j, part in enumerate(output))
    elif output is None:
        raise invalid_request(f"Missing required parameter `{output_path}`.", param=output_path)
    else:
        raise invalid_request(f"Invalid `{output_path}`: expected a string or an array of content parts.", param=output_path)
    return Message(role="tool", content=content, tool_call_id=call_id)


# -- tools and settings ----------------------------------------------------------------------------------


# A namespace's tools (Codex groups its sub-agent and MCP tools so) reach a chat backend, which
# has no namespaces, as function tools named `<namespace>__<name>`; the model's calls of them
# are given back to the client with `namespace` and `name` apart, as OpenAI gives them.
NAMESPACE_SEPARATOR = "__"


def flat_name(namespace: str, name: str) -> str:
    return f"{namespace}{NAMESPACE_SEPARATOR}{name}"


def namespaces_of(settings: dict[str, Any]) -> frozenset[str]:
    """The namespaces a request's tools (as its Response echoes them) declare."""
    tools = settings.get("tools") or ()
    return frozenset(
        str(tool["name"]) for tool in tools if isinstance(tool, dict) and tool.get("type") == "namespace"
    )


def split_name(name: str, namespaces: frozenset[str]) -> tuple[str | None, str]:
    """A called tool's namespace (None: a plain function) and name within it. A namespace may
    hold the separator itself (Codex's MCP servers' are `mcp__<server>`): the longest that
    begins the name is the call's."""
    if namespaces and NAMESPACE_SEPARATOR in name:
        owner = max(
            (ns for ns in namespaces if name.startswith(ns) and name.startswith(NAMESPACE_SEPARATOR, len(ns))
             and len(name) > len(ns) + len(NAMESPACE_SEPARATOR)),
            key=len, default=None,
        )
        if owner is not None:
            return owner, name[len(owner) + len(NAMESPACE_SEPARATOR):]
    return None, name


def _parse_tools(item: Any, path: str) -> list[Tool]:
    if isinstance(item, dict) and item.get("type") == "namespace":
        fields = Fields(item, path)
        namespace = fields.text("name", required=True, nonempty=True) or ""
        inner = fields.array("tools", required=True, nonempty=True) or []
        return [
            replace(tool, name=flat_name(namespace, tool.name))
            for j, entry in enumerate(inner) for tool in [_parse_tool(entry, f"{path}.tools[{j}]")]
        ]
    return [_parse_tool(item, path)]


def _tools_to_wire(raw_tools: list[Any], tools: list[Tool]) -> list[dict[str, Any]]:
    """The request's tools as its Response echoes them: namespaces as namespaces."""
    flat = iter(tools)
    out: list[dict[str, Any]] = []
    for item in raw_tools:
        if isinstance(item, dict) and item.get("type") == "namespace":
            inner = [
                {**_tool_to_wire(tool), "name": split_name(tool.name, frozenset({item["name"]}))[1]}
                for tool in (next(flat) for _ in item["tools"])
            ]
            out.append({"type": "namespace", "name": item["name"], "description": item.get("description"), "tools": inner})
        else:
            out.append(_tool_to_wire(next(flat)))
    return out


def _parse_tool(item: Any, path: str) -> Tool:
    if not isinstance(item, dict):
        raise invalid_request(f"Invalid `{path}`: expected an object.", param=path)
    fields = Fields(item, path)
    kind = fields.text("type", required=True)
    if kind != "function":
        # A `custom` tool is the client's own, but takes free text (or a grammar's), which a
        # chat backend's tool calls cannot carry.
        what = "a custom tool, whose input is free text" if kind == "custom" else "one of OpenAI's built-in tools"
        # Codex CLI offers web search on every request unless told not to: say how.
        hint = _CODEX_WEB_SEARCH if isinstance(kind, str) and kind.startswith("web_search") else ""
        raise invalid_request(
            f"Invalid `{path}.type`: {kind!r} is {what}; {_BUILT_IN_TOOLS}{hint}.",
            param=f"{path}.type", code="unsupported_tool",
        )
    name = fields.text("name", required=True, nonempty=True)
    parameters = fields.object("parameters")
    return Tool(
        name=name or "",
        description=fields.text("description"),
        parameters=parameters.data if parameters is not None else None,
        strict=fields.boolean("strict"),
    )


def _tool_to_wire(tool: Tool) -> dict[str, Any]:
    return {
        "type": "function", "name": tool.name, "description": tool.description, "parameters": tool.parameters,
        "strict": tool.strict,
    }


def _parse_tool_choice(value: Any) -> tuple[ToolChoice | None, Any]:
    if value is None:
        return None, "auto"
    if value in ("auto", "none", "required"):
        return ToolChoice(mode=value), value
    if isinstance(value, dict) and value.get("type") == "function":
        name = value.get("name")
        if isinstance(name, str) and name:
            return ToolChoice(mode="required", name=name), {"type": "function", "name": name}
        raise invalid_request("Invalid `tool_choice.name`: expected a non-empty string.", param="tool_choice.name")
    if isinstance(value, dict) and value.get("type") == "allowed_tools":
        return _parse_allowed_tools(Fields(value, "tool_choice"))
    raise invalid_request(
        'Invalid `tool_choice`: expected "none", "auto", "required", {"type": "function", "name": ...} or '
        '{"type": "allowed_tools", "mode": ..., "tools": [...]}; ' + _BUILT_IN_TOOLS + ".",
        param="tool_choice",
    )


def _parse_allowed_tools(fields: Fields) -> tuple[ToolChoice, dict[str, Any]]:
    """`{"type": "allowed_tools", "mode": "auto" | "required", "tools": [{"type": "function",
    "name": ...}, ...]}`: the choice, and its wire form (the names, for `_allowed_tools`)."""
    mode = fields.text("mode", required=True)
    if mode not in ("auto", "required"):
        raise fields.fail("mode", '"auto" or "required"')
    entries = fields.array("tools", required=True, nonempty=True) or []
    names: list[str] = []
    for i, entry in enumerate(entries):
        path = f"tool_choice.tools[{i}]"
        if not isinstance(entry, dict):
            raise invalid_request(f"Invalid `{path}`: expected an object.", param=path)
        entry_fields = Fields(entry, path)
        if entry_fields.text("type", required=True) != "function":
            raise invalid_request(
                f"Invalid `{path}.type`: {entry.get('type')!r} is one of OpenAI's built-in tools; {_BUILT_IN_TOOLS}.",
                param=f"{path}.type", code="unsupported_tool",
            )
        names.append(entry_fields.text("name", required=True, nonempty=True) or "")
    wire = {"type": "allowed_tools", "mode": mode, "tools": [{"type": "function", "name": name} for name in names]}
    return ToolChoice(mode="required" if mode == "required" else "auto"), wire


def _allowed_tools(choice: Any, tools: list[Tool]) -> list[Tool]:
    """The tools an `allowed_tools` choice lets the model call: all a chat backend is given
    (it has no such choice), each of them one of the request's `tools` (OpenAI's 400 if not).
    Other choices leave the tools as they are."""
    if not isinstance(choice, dict) or choice.get("type") != "allowed_tools":
        return tools
    names = {entry["name"] for entry in choice["tools"]}
    known = {tool.name for tool in tools}
    for i, entry in enumerate(choice["tools"]):
        if entry["name"] not in known:
            raise invalid_request(
                f"Invalid value for `tool_choice.tools[{i}]`: function `{entry['name']}` is not one of the functions "
                "in `tools`.", param=f"tool_choice.tools[{i}]",
            )
    return [tool for tool in tools if tool.name in names]


def _parse_text(text: Fields | None) -> tuple[ResponseFormat | None, dict[str, Any]]:
    """`text.format` as the domain's response format, and the `text` the Response echoes."""
    wire: dict[str, Any] = {"format": {"type": "text"}}
    if text is None:
        return None, wire
    verbosity = text.text("verbosity")
    if verbosity is not None:
        if verbosity not in ("low", "medium", "high"):
            raise text.fail("verbosity", '"low", "medium" or "high"')
        wire["verbosity"] = verbosity
    fmt = text.object("format")
    if fmt is None:
        return None, wire
    kind = fmt.text("type", required=True)
    if kind == "text":
        return ResponseFormat(kind="text"), wire
    if kind == "json_object":
        wire["format"] = {"type": "json_object"}
        return ResponseFormat(kind="json_object"), wire
    if kind == "json_schema":
        name = fmt.text("name", required=True, nonempty=True)
        schema = fmt.object("schema", required=True)
        assert schema is not None
        description = fmt.text("description")
        strict = fmt.boolean("strict")
        wire["format"] = {"type": "json_schema", "name": name, "schema": schema.data, "strict": strict} | (
            {"description": description} if description is not None else {}
        )
        return ResponseFormat(
            kind="json_schema", schema=schema.data, name=name, strict=strict, description=description
        ), wire
    raise fmt.fail("type", '"text", "json_object" or "json_schema"')


def _check_include(fields: Fields, include: list[Any]) -> None:
    for index, item in enumerate(include):
        if not isinstance(item, str):
            raise fields.fail("include", "an array of strings")
        if item not in INCLUDABLE:
            raise invalid_request(
                f"Invalid value: {item!r}. Supported values are: " + ", ".join(f"{v!r}" for v in INCLUDABLE) + ".",
                param=f"include[{index}]", code="invalid_value",
            )


def _parse_metadata(fields: Fields | None) -> dict[str, str] | None:
    if fields is None:
        return None
    if len(fields.data) > 16 or not all(isinstance(v, str) for v in fields.data.values()):
        raise invalid_request(
            "Invalid `metadata`: expected at most 16 keys with string values.", param="metadata"
        )
    return storable_metadata(dict(fields.data))


def storable_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """`metadata` if PostgreSQL can keep it as it is: one with a NUL would be kept with U+FFFD
    in its place, read back and listed other than its client sent it (400 naming `metadata`)."""
    if not all(storable(key) and storable(value) for key, value in metadata.items()):
        raise invalid_request("Invalid `metadata`: keys and values hold no NUL character.", param="metadata")
    return metadata
