"""An Anthropic client's request bound for a backend of another dialect.

Other dialects' encoders leave Anthropic-only parts out, which is right for what only
Anthropic needs back (signed thinking, cache and `is_error` markers) but would silently
lose content the model is meant to read. So, before such a request leaves:
- a `document` whose source is plain text (or text and image blocks) becomes that text,
  headed by its title and context; a base64 PDF is, for an OpenAI-compatible backend, the
  chat `file` part (its title the filename), as a Responses client's `input_file` is;
- any other block the backend cannot take (PDF documents for Ollama or by URL,
  `search_result`, Files API references, …) is a 400 naming the block type, never dropped;
- in the assistant's own turns, Anthropic-only blocks (server tool uses and their results,
  encrypted for Anthropic; redacted thinking) are left out like thinking: the text the
  model wrote from them is there, and a conversation that used web search on Claude can
  go on with another model;
- a tool result marked `is_error` says so in its text ("Error: …"), the only way an
  OpenAI or Ollama tool message can: else the model takes a failed call's message for its
  output (LiteLLM drops the flag);
- Anthropic-defined client tools with a published input schema (bash, the text editor) are
  function tools of that schema under the client's name for them, so the model's calls come
  back as `tool_use` blocks the client runs; server tools (web search, code execution, …),
  computer use and any other Anthropic-defined tool are a 400 naming the tool, never dropped;
- structured output (`output_config.format`, or the beta's `output_format`: a JSON schema)
  is the domain's `json_schema` response format, which the backend's encoder renders in its
  words (OpenAI's `response_format`, Ollama's `format`); `mcp_servers` and `container`
  (what Anthropic's servers run) are a 400 naming the field, as server tools are;
- Claude Code's attribution line at the head of the system prompt
  (`x-anthropic-billing-header: cc_version=…; cch=…;`, which Anthropic reads and which changes
  from request to request) is left out: at the very start of the prompt it would make every
  request miss the backend's prefix cache (vLLM, SGLang, llama.cpp and Ollama drop it too);
- for OpenAI-compatible backends, whose tool messages carry text only, the images of a
  tool result (Claude Code's Read tool reading an image) move into a user message right
  after the turn's tool results, each labelled with the call it answers, and the tool
  message says so. The model still sees the image, in the place nearest to where the
  client put it that OpenAI allows.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from proxy.dialects.anthropic._request import IS_ERROR_MARKER, is_custom_tool
from proxy.dialects.anthropic._vocabulary import DIALECT
from proxy.domain.chat import (
    ChatRequest,
    ContentPart,
    ImagePart,
    Message,
    OpaquePart,
    ResponseFormat,
    TextPart,
    Tool,
)
from proxy.domain.errors import invalid_request
from proxy.domain.tool_images import has_tool_images, images_after_tool_results

# Anthropic-only blocks other backends do without: the domain carries their meaning already
# (reasoning) or they only steer Anthropic (markers have no `type`).
_NEEDLESS = frozenset({"thinking", "redacted_thinking"})
_BACKEND_NAMES = {"openai": "an OpenAI-compatible backend", "ollama": "an Ollama backend"}


def adapted_for_dialect(request: ChatRequest, target: str) -> ChatRequest:
    """`request` as a backend speaking `target` must be given it: the request itself when
    nothing changes, else a changed copy (the client's request stays as sent, for a stand-in
    of another kind); raises a 400 for content that backend cannot be given."""
    if target == DIALECT or request.dialect != DIALECT:
        return request
    adapted = replace(request)  # `adapt_for_dialect` assigns new lists, never changes the old ones
    adapt_for_dialect(adapted, target)
    return adapted


def adapt_for_dialect(request: ChatRequest, target: str) -> None:
    """Make an Anthropic client's `request` fit a backend speaking `target` (in place);
    raises a 400 for content that backend cannot be given. A no-op for Anthropic backends
    and for requests without Anthropic-only content."""
    if target == DIALECT or request.dialect != DIALECT:
        return
    backend = _BACKEND_NAMES.get(target, f"a `{target}` backend")
    _drop_attribution(request)
    _adapt_tools(request, backend)
    _adapt_output(request, backend)
    move_images = target == "openai"
    if not any(_needs_work(message, move_images) for message in request.messages):
        return
    messages: list[Message] = []
    for message in request.messages:
        content = tuple(_translated(message, request.model, backend, target))
        messages.append(message if content == message.content else _replace_content(message, content))
    request.messages = images_after_tool_results(messages) if move_images else messages


_ATTRIBUTION = "x-anthropic-billing-header:"


def _drop_attribution(request: ChatRequest) -> None:
    first = request.messages[0] if request.messages else None
    if first is None or first.role != "system" or not any(
        isinstance(part, TextPart) and part.text.startswith(_ATTRIBUTION) for part in first.content
    ):
        return
    kept: list[ContentPart] = []
    for part in first.content:
        if isinstance(part, TextPart) and part.text.startswith(_ATTRIBUTION):
            rest = part.text.partition("\n")[2]  # the line alone, when the prompt goes on after it
            if rest.strip():
                kept.append(TextPart(rest))
        else:
            kept.append(part)
    rest_of_chat = request.messages[1:]
    if any(isinstance(part, TextPart) for part in kept):
        request.messages = [_replace_content(first, tuple(kept)), *rest_of_chat]
    else:
        request.messages = rest_of_chat


def _anthropic_content(part: ContentPart, role: str) -> bool:
    """An Anthropic-only block the model reads (not a marker, thinking, or the assistant's
    own server tool traffic)."""
    return (
        isinstance(part, OpaquePart) and part.dialect == DIALECT and role != "assistant"
        and "type" in part.data and part.data["type"] not in _NEEDLESS
    )


def _needs_work(message: Message, move_images: bool) -> bool:
    return _failed(message) or (move_images and has_tool_images(message)) or any(
        _anthropic_content(part, message.role) for part in message.content
    )


def _failed(message: Message) -> bool:
    return message.role == "tool" and IS_ERROR_MARKER in message.content


def _translated(message: Message, model: str, backend: str, target: str) -> list[ContentPart]:
    out: list[ContentPart] = []
    for part in message.content:
        if isinstance(part, OpaquePart) and _anthropic_content(part, message.role):
            out.extend(_document(part, model, backend, target))
        else:
            out.append(part)
    return _said_failed(out) if _failed(message) else out


ERROR_PREFIX = "Error: "


def _said_failed(parts: list[ContentPart]) -> list[ContentPart]:
    """A failed tool call's result, its first text headed `Error: ` (unless it already says
    so); one that has no text says only that the call failed. The marker stays, for the
    record; other backends leave it out."""
    for i, part in enumerate(parts):
        if isinstance(part, TextPart):
            if part.text.lstrip().lower().startswith("error"):
                return parts
            return [*parts[:i], TextPart(ERROR_PREFIX + part.text), *parts[i + 1:]]
    return [TextPart(ERROR_PREFIX + "the tool call failed."), *parts]


def _document(part: OpaquePart, model: str, backend: str, target: str) -> list[ContentPart]:
    """A `document` block as text (and images), or as an OpenAI-compatible backend's `file`
    part; the 400 for any block that cannot be one."""
    block = part.data
    kind = block.get("type")
    source = block.get("source")
    source_type = source.get("type") if isinstance(source, dict) else None
    if kind == "document" and isinstance(source, dict):
        body: list[ContentPart] | None = None
        title = block.get("title") if isinstance(block.get("title"), str) and block["title"] else None
        if source_type == "text" and isinstance(source.get("data"), str):
            body = [TextPart(source["data"])]
        elif source_type == "content":
            body = _content_source(source.get("content"))
        elif target == "openai" and (file := _pdf_file(source, title)) is not None:
            # vLLM's and OpenAI's chat `file` part, as a Responses client's `input_file`.
            body = [OpaquePart("openai", {"type": "file", "file": file}, at=part.at)]
            title = None  # said as its filename
        if body is not None:
            head = [
                f"{label}: {value}"
                for label, value in (("Document", title), ("Context", block.get("context")))
                if isinstance(value, str) and value
            ]
            return ([TextPart("\n".join(head) + "\n\n")] if head else []) + body
    what = f"`{kind}` blocks"
    if kind in ("document", "image") and isinstance(source_type, str):
        what = f"`{kind}` blocks with a `{source_type}` source"
    takers = "Only Anthropic backends accept them."
    if kind == "document" and source_type == "base64" and target != "openai":
        takers = "An Anthropic backend accepts them, and an OpenAI-compatible one a base64 PDF (as a chat `file` part)."
    raise invalid_request(
        f"{what} cannot be sent to model `{model}`: it is served by {backend}, which has no equivalent. {takers}",
        code="unsupported_content_block",
    )


def _pdf_file(source: dict[str, Any], title: str | None) -> dict[str, Any] | None:
    """A base64 PDF source as the chat `file` part's `file`; None for any other source."""
    data = source.get("data")
    if source.get("type") != "base64" or source.get("media_type") != "application/pdf" or not isinstance(data, str):
        return None
    file: dict[str, Any] = {"file_data": f"data:application/pdf;base64,{data}"}
    if title is not None:
        file["filename"] = title
    return file


def _content_source(content: Any) -> list[ContentPart] | None:
    """A document's `content` source (a string, or text and image blocks) as parts."""
    if isinstance(content, str):
        return [TextPart(content)]
    if not isinstance(content, list):
        return None
    parts: list[ContentPart] = []
    for block in content:
        if not isinstance(block, dict):
            return None
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(TextPart(block["text"]))
            continue
        source = block.get("source")
        if block.get("type") != "image" or not isinstance(source, dict):
            return None
        if source.get("type") == "base64" and isinstance(source.get("media_type"), str) and isinstance(source.get("data"), str):
            parts.append(ImagePart(f"data:{source['media_type']};base64,{source['data']}"))
        elif source.get("type") == "url" and isinstance(source.get("url"), str):
            parts.append(ImagePart(source["url"]))
        else:
            return None
    return parts


def _replace_content(message: Message, content: tuple[ContentPart, ...]) -> Message:
    return replace(message, content=content)


# -- Anthropic-defined tools -------------------------------------------------------------------

_BASH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "command": {"type": "string", "description": "The bash command to run."},
        "restart": {"type": "boolean", "description": "Restart the bash session (no command is needed then)."},
    },
}
_BASH_DESCRIPTION = (
    "Run a command in a persistent bash session (its working directory and environment carry over "
    "from one call to the next) and read its output."
)
_EDITOR_DESCRIPTION = (
    "View, create and edit text files. `view` shows a file with line numbers (`view_range` [start, end] "
    "for some lines, end -1 for the rest) or lists a directory; `create` writes `file_text` to a new "
    "file; `str_replace` replaces `old_str`, which must occur in the file exactly once, with `new_str`; "
    "`insert` inserts `new_str` after line `insert_line` (0 for the top of the file)."
)
# The editor versions of Claude 3.x, which also undo (Claude 4's have no `undo_edit`).
_EDITORS_WITH_UNDO = frozenset({"text_editor_20241022", "text_editor_20250124"})


def _editor(kind: str) -> tuple[str, dict[str, Any]]:
    commands = ["view", "create", "str_replace", "insert"]
    description = _EDITOR_DESCRIPTION
    if kind in _EDITORS_WITH_UNDO:
        commands.append("undo_edit")
        description += " `undo_edit` reverts the last edit of the file at `path`."
    schema = {
        "type": "object",
        "properties": {
            "command": {"type": "string", "enum": commands, "description": "The command to run."},
            "path": {"type": "string", "description": "Absolute path of the file or directory."},
            "file_text": {"type": "string", "description": "The new file's content (`create`)."},
            "old_str": {"type": "string", "description": "The text to replace (`str_replace`)."},
            "new_str": {"type": "string", "description": "The replacement (`str_replace`) or the text to insert (`insert`)."},
            "insert_line": {"type": "integer", "description": "The line to insert after (`insert`)."},
            "view_range": {
                "type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2,
                "description": "First and last line to show (`view`).",
            },
        },
        "required": ["command", "path"],
    }
    return description, schema


def _client_tool(kind: str) -> tuple[str, dict[str, Any]] | None:
    """The description and input schema of an Anthropic-defined tool the client runs, by its
    `type`, where Anthropic publishes the schema."""
    if kind.startswith("bash_"):
        return _BASH_DESCRIPTION, _BASH_SCHEMA
    if kind.startswith("text_editor_"):
        return _editor(kind)
    return None


# Types of the tools Anthropic runs on its own servers.
_SERVER_TOOLS = ("web_search_", "web_fetch_", "code_execution_", "tool_search_tool_", "mcp_toolset")


def _adapt_tools(request: ChatRequest, backend: str) -> None:
    """Another backend's tools: the client's own, and function tools for the Anthropic-defined
    ones it can run (in the order the client gave them); a 400 for the others."""
    kept = request.extra.get("tools")
    if not isinstance(kept, list) or all(is_custom_tool(tool) for tool in kept):
        return
    custom = iter(request.tools)
    tools: list[Tool] = []
    for i, raw in enumerate(kept):
        if is_custom_tool(raw):
            tools.append(next(custom))
            continue
        kind, name = str(raw.get("type")), str(raw.get("name"))
        known = _client_tool(kind)
        if known is None:
            raise invalid_request(
                f"Tool `{name}` (`{kind}`) {_what_it_is(kind)}; model `{request.model}` is served by {backend}, "
                "which cannot offer it. Only Anthropic backends accept it.",
                param=f"tools[{i}]", code="unsupported_tool",
            )
        description, schema = known
        tools.append(Tool(name=name, description=description, parameters=schema))
    request.tools = tools


def _what_it_is(kind: str) -> str:
    if kind.startswith(_SERVER_TOOLS):
        return "is a server tool, which Anthropic runs itself"
    if kind.startswith("computer_"):
        return "is computer use, which needs a model trained on its screenshots and actions"
    return "is an Anthropic-defined tool the gateway has no input schema for"


# -- top-level fields ------------------------------------------------------------------------------

# Fields that ask Anthropic's servers to run something of their own.
_SERVER_FIELDS = {
    "mcp_servers": "connects Anthropic's servers to remote MCP servers",
    "container": "names a code execution container on Anthropic's servers",
}


def _adapt_output(request: ChatRequest, backend: str) -> None:
    """Structured output as the domain's response format; a 400 for what only Anthropic's
    servers can do."""
    for field, what in _SERVER_FIELDS.items():
        if request.extra.get(field):
            raise invalid_request(
                f"`{field}` {what}; model `{request.model}` is served by {backend}, which cannot. "
                "Only Anthropic backends accept it.",
                param=field, code="unsupported_parameter",
            )
    config = request.extra.get("output_config")
    if isinstance(config, dict) and config.get("format") is not None:
        param, spec = "output_config.format", config["format"]
    elif request.extra.get("output_format") is not None:
        param, spec = "output_format", request.extra["output_format"]
    else:
        return
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or spec.get("type") != "json_schema" or not isinstance(schema, dict):
        raise invalid_request(
            f"Invalid `{param}`: expected {{\"type\": \"json_schema\", \"schema\": {{…}}}}.", param=param,
        )
    # A new `params`: the client's request (shared with `adapted_for_dialect`'s copy) stays as sent.
    request.params = replace(request.params, response_format=ResponseFormat(kind="json_schema", schema=schema))
