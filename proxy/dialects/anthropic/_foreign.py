"""An Anthropic client's request bound for a backend of another dialect.

Other dialects' encoders leave Anthropic-only parts out, which is right for what only
Anthropic needs back (signed thinking, cache and `is_error` markers) but would silently
lose content the model is meant to read. So, before such a request leaves:
- a `document` whose source is plain text (or text and image blocks) becomes that text,
  headed by its title and context;
- any other block the backend cannot take (PDF documents, `search_result`, Files API
  references, …) is a 400 naming the block type, never dropped;
- in the assistant's own turns, Anthropic-only blocks (server tool uses and their results,
  encrypted for Anthropic; redacted thinking) are left out like thinking: the text the
  model wrote from them is there, and a conversation that used web search on Claude can
  go on with another model;
- a tool result marked `is_error` says so in its text ("Error: …"), the only way an
  OpenAI or Ollama tool message can: else the model takes a failed call's message for its
  output (LiteLLM drops the flag);
- for OpenAI-compatible backends, whose tool messages carry text only, the images of a
  tool result (Claude Code's Read tool reading an image) move into a user message right
  after the turn's tool results, each labelled with the call it answers, and the tool
  message says so. The model still sees the image, in the place nearest to where the
  client put it that OpenAI allows.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from proxy.dialects.anthropic._request import IS_ERROR_MARKER
from proxy.dialects.anthropic._vocabulary import DIALECT
from proxy.domain.chat import ChatRequest, ContentPart, ImagePart, Message, OpaquePart, TextPart
from proxy.domain.errors import invalid_request

# Anthropic-only blocks other backends do without: the domain carries their meaning already
# (reasoning) or they only steer Anthropic (markers have no `type`).
_NEEDLESS = frozenset({"thinking", "redacted_thinking"})
_BACKEND_NAMES = {"openai": "an OpenAI-compatible backend", "ollama": "an Ollama backend"}


def adapt_for_dialect(request: ChatRequest, target: str) -> None:
    """Make an Anthropic client's `request` fit a backend speaking `target` (in place);
    raises a 400 for content that backend cannot be given. A no-op for Anthropic backends
    and for requests without Anthropic-only content."""
    if target == DIALECT or request.dialect != DIALECT:
        return
    move_images = target == "openai"
    if not any(_needs_work(message, move_images) for message in request.messages):
        return
    backend = _BACKEND_NAMES.get(target, f"a `{target}` backend")
    messages: list[Message] = []
    moved: list[ContentPart] = []
    for message in request.messages:
        content = tuple(_translated(message, request.model, backend))
        if move_images and message.role == "tool" and any(isinstance(p, ImagePart) for p in content):
            images = [p for p in content if isinstance(p, ImagePart)]
            moved.append(TextPart(f"Image{'s' if len(images) > 1 else ''} returned by tool call {message.tool_call_id}:"))
            moved.extend(images)
            kept = [p for p in content if not isinstance(p, ImagePart)]
            kept.append(TextPart(f"[{len(images)} image{'s' if len(images) > 1 else ''} attached in the next user message]"))
            content = tuple(kept)
        elif moved and message.role != "tool":
            messages.append(_images_message(moved, message))
            moved = []
            if message.role == "user":
                continue  # merged into the images' message
        messages.append(message if content == message.content else _replace_content(message, content))
    if moved:
        messages.append(_images_message(moved, None))
    request.messages = messages


def _anthropic_content(part: ContentPart, role: str) -> bool:
    """An Anthropic-only block the model reads (not a marker, thinking, or the assistant's
    own server tool traffic)."""
    return (
        isinstance(part, OpaquePart) and part.dialect == DIALECT and role != "assistant"
        and "type" in part.data and part.data["type"] not in _NEEDLESS
    )


def _needs_work(message: Message, move_images: bool) -> bool:
    return _failed(message) or any(
        _anthropic_content(part, message.role) or (move_images and message.role == "tool" and isinstance(part, ImagePart))
        for part in message.content
    )


def _failed(message: Message) -> bool:
    return message.role == "tool" and IS_ERROR_MARKER in message.content


def _translated(message: Message, model: str, backend: str) -> list[ContentPart]:
    out: list[ContentPart] = []
    for part in message.content:
        if isinstance(part, OpaquePart) and _anthropic_content(part, message.role):
            out.extend(_document(part.data, model, backend))
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


def _document(block: dict[str, Any], model: str, backend: str) -> list[ContentPart]:
    """A `document` block as text (and images), or the 400 for any block that cannot be one."""
    kind = block.get("type")
    source = block.get("source")
    source_type = source.get("type") if isinstance(source, dict) else None
    if kind == "document" and isinstance(source, dict):
        body: list[ContentPart] | None = None
        if source_type == "text" and isinstance(source.get("data"), str):
            body = [TextPart(source["data"])]
        elif source_type == "content":
            body = _content_source(source.get("content"))
        if body is not None:
            head = [
                f"{label}: {block[key]}"
                for key, label in (("title", "Document"), ("context", "Context"))
                if isinstance(block.get(key), str) and block[key]
            ]
            return ([TextPart("\n".join(head) + "\n\n")] if head else []) + body
    what = f"`{kind}` blocks"
    if kind in ("document", "image") and isinstance(source_type, str):
        what = f"`{kind}` blocks with a `{source_type}` source"
    raise invalid_request(
        f"{what} cannot be sent to model `{model}`: it is served by {backend}, which has no "
        f"equivalent. Only Anthropic backends accept them.",
        code="unsupported_content_block",
    )


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


def _images_message(moved: list[ContentPart], following: Message | None) -> Message:
    """The user message that carries tool results' images, with the user's own next
    message (when there is one) after them, so the turn keeps a single user message."""
    if following is not None and following.role == "user":
        return _replace_content(following, (*moved, *following.content))
    return Message(role="user", content=tuple(moved))


def _replace_content(message: Message, content: tuple[ContentPart, ...]) -> Message:
    return replace(message, content=content)
