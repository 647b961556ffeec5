"""Images a tool returned, for backends whose tool messages carry text only.

OpenAI's chat API (and vLLM, which refuses them: "tool message content only supports text")
takes images in user messages alone, while Anthropic's tool results and the Responses API's
`function_call_output` carry them (Claude Code's Read of an image, Codex's `view_image`). The
images move into a user message right after the turn's tool results, each labelled with the
call it answers, and the tool message says so: the model still sees them, in the place nearest
to where the client put them.
"""

from __future__ import annotations

from dataclasses import replace

from proxy.domain.chat import ContentPart, ImagePart, Message, TextPart


def has_tool_images(message: Message) -> bool:
    return message.role == "tool" and any(isinstance(part, ImagePart) for part in message.content)


def images_after_tool_results(messages: list[Message]) -> list[Message]:
    """`messages` with tool results' images moved as the module says (the list itself when
    no tool result holds one)."""
    if not any(has_tool_images(message) for message in messages):
        return messages
    out: list[Message] = []
    moved: list[ContentPart] = []
    for message in messages:
        if has_tool_images(message):
            images = [part for part in message.content if isinstance(part, ImagePart)]
            plural = "s" if len(images) > 1 else ""
            moved.append(TextPart(f"Image{plural} returned by tool call {message.tool_call_id}:"))
            moved.extend(images)
            kept = [part for part in message.content if not isinstance(part, ImagePart)]
            kept.append(TextPart(f"[{len(images)} image{plural} attached in the next user message]"))
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
