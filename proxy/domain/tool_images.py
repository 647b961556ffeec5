"""Images (and files) a tool returned, for backends whose tool messages carry text only.

OpenAI's chat API (and vLLM, which refuses them: "tool message content only supports text")
takes images and files in user messages alone, while Anthropic's tool results and the Responses
API's `function_call_output` carry them (Claude Code's Read of an image or a PDF, Codex's
`view_image`). They move into a user message right after the turn's tool results, each labelled
with the call it answers, and the tool message says so: the model still sees them, in the place
nearest to where the client put them.
"""

from __future__ import annotations

from dataclasses import replace

from proxy.domain.chat import ContentPart, ImagePart, Message, OpaquePart, TextPart

# The kinds of parts moved, in the order a label names them.
_KINDS = ("image", "file")


def _kind(part: ContentPart) -> str | None:
    """"image", "file" (OpenAI's chat `file` part: a PDF an Anthropic or Responses client
    gave), or None for a part a tool message keeps."""
    if isinstance(part, ImagePart):
        return "image"
    if isinstance(part, OpaquePart) and part.dialect == "openai" and part.data.get("type") == "file":
        return "file"
    return None


def has_tool_images(message: Message) -> bool:
    return message.role == "tool" and any(_kind(part) is not None for part in message.content)


def _counted(moved: list[ContentPart]) -> list[str]:
    """`moved` as counted nouns in `_KINDS` order: ["2 images", "1 file"]."""
    kinds = [_kind(part) for part in moved]
    counts = [(kinds.count(kind), kind) for kind in _KINDS]
    return [f"{n} {kind}{'s' if n > 1 else ''}" for n, kind in counts if n]


def images_after_tool_results(messages: list[Message]) -> list[Message]:
    """`messages` with tool results' images and files moved as the module says (the list
    itself when no tool result holds one)."""
    if not any(has_tool_images(message) for message in messages):
        return messages
    out: list[Message] = []
    moved: list[ContentPart] = []
    for message in messages:
        if has_tool_images(message):
            parts = [part for part in message.content if _kind(part) is not None]
            counted = _counted(parts)
            named = " and ".join(words.partition(" ")[2] for words in counted)
            moved.append(TextPart(f"{named[:1].upper()}{named[1:]} returned by tool call {message.tool_call_id}:"))
            moved.extend(parts)
            kept = [part for part in message.content if _kind(part) is None]
            kept.append(TextPart(f"[{' and '.join(counted)} attached in the next user message]"))
            out.append(replace(message, content=tuple(kept)))
            continue
        if moved and message.role != "tool":
            out.append(_images_message(moved, message))
            moved = []
            if message.role == "user":
                continue  # merged into the images' message
        out.append(message)
    if moved:
        out.append(_images_message(moved, None))
    return out


def _images_message(moved: list[ContentPart], following: Message | None) -> Message:
    """The user message that carries tool results' images, with the user's own next
    message (when there is one) after them, so the turn keeps a single user message."""
    if following is not None and following.role == "user":
        return replace(following, content=(*moved, *following.content))
    return Message(role="user", content=tuple(moved))
