"""OpenAI's `POST /v1/responses/compact` (what the Agents SDK's
`OpenAIResponsesCompactionSession` calls), sans-IO.

OpenAI answers with the conversation's user messages followed by one `compaction` item, whose
`encrypted_content` stands for the rest in later requests' input. The gateway has the model
write a summary of the conversation; the `compaction` item carries it (encoded, not
encrypted: the gateway holds no key of OpenAI's), and given back as input it is a user
message that opens with `SUMMARY_LEAD`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import replace
from typing import Any

from proxy.dialects._json import dumps
from proxy.domain.chat import ChatCompletion, ChatRequest, Message, TextPart
from proxy.domain.errors import invalid_request

SUMMARY_LEAD = "Summary of the conversation so far (compacted):\n"
# The gateway's note in a journalled run's settings: its answer is a `compaction_trigger`'s
# (read back as that `compaction` item, continued from its summary alone).
COMPACTED = "_compacted"
_MARK = "llm-proxy.compaction.v1:"
_PROMPT = (
    "Summarize the conversation above for your own later use: it will be replaced by your summary. Keep the "
    "user's goals and requests, facts and decisions, the tool calls made and what they returned that still "
    "matters, and what is left to do. Write only the summary."
)

_NOT_RUN = "(not run: the conversation was compacted before this call's result was given)"


def compaction_message(item: dict[str, Any], path: str) -> Message:
    """A `compaction` input item (one this gateway made) as the message it stands for."""
    content = item.get("encrypted_content")
    summary = None
    if isinstance(content, str) and content.startswith(_MARK):
        try:
            summary = base64.urlsafe_b64decode(content[len(_MARK):].encode("ascii")).decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            summary = None
    if summary is None:
        raise invalid_request(
            f"Invalid `{path}.encrypted_content`: not a compaction made by this gateway "
            "(`POST /v1/responses/compact`).", param=f"{path}.encrypted_content",
        )
    return summary_message(summary)


def summary_message(summary: str) -> Message:
    """The message a compaction's summary stands as in a later request."""
    return Message(role="user", content=(TextPart(SUMMARY_LEAD + summary),))


def summary_of(completion: ChatCompletion) -> str:
    choice = completion.choices[0] if completion.choices else None
    return (choice.content or "") if choice is not None else ""


def compaction_request(chat: ChatRequest) -> tuple[ChatRequest, list[Message]]:
    """The request asking the model for the summary (no tools: it is to write, not act), and
    the user messages the compaction keeps (not those that are earlier compactions: the
    summary has them)."""
    kept = [
        message for message in chat.messages
        if message.role == "user" and not message.text.startswith(SUMMARY_LEAD)
    ]
    asked = replace(
        chat, messages=[*_answered(chat.messages), Message(role="user", content=(TextPart(_PROMPT),))],
        tools=[], tool_choice=None, parallel_tool_calls=None,
    )
    return asked, kept


def _answered(messages: list[Message]) -> list[Message]:
    """`messages` with a result for each tool call that has none (a turn compacted before its
    calls ran: a run stopped for a tool's approval, or out of turns): backends refuse a call
    whose result does not follow it (Anthropic's 400 "`tool_use` ids were found without
    `tool_result` blocks"), and the summary is to say the call was made, not run."""
    answered = {message.tool_call_id for message in messages if message.role == "tool"}
    if all(call.id in answered for message in messages for call in message.tool_calls):
        return messages
    given: list[Message] = []
    pending: list[Message] = []
    for message in messages:
        if pending and message.role != "tool":
            given.extend(pending)
            pending = []
        given.append(message)
        pending.extend(
            Message(role="tool", tool_call_id=call.id, content=(TextPart(_NOT_RUN),))
            for call in message.tool_calls if call.id not in answered
        )
    return [*given, *pending]


def compaction_item(response: str, summary: str) -> dict[str, Any]:
    return {"id": "cmp_" + response.removeprefix("resp_"), "type": "compaction", "encrypted_content": _encoded(summary)}


def given_compaction(role: str, parts: list[Any], item_id: str) -> dict[str, Any] | None:
    """The `compaction` item a message stands for, when it is one (`compaction_message`), for
    it to be listed back as the item it was given as (in a conversation, a response's input)."""
    if role != "user" or not parts or not all(isinstance(part, str) for part in parts):
        return None
    text = "".join(parts)
    if not text.startswith(SUMMARY_LEAD):
        return None
    return {"id": item_id, "type": "compaction", "encrypted_content": _encoded(text[len(SUMMARY_LEAD):])}


def compaction_answer(completion: ChatCompletion, response: str) -> dict[str, Any]:
    """The `compaction` item of a summary the model wrote."""
    return compaction_item(response, summary_of(completion))


def _encoded(summary: str) -> str:
    return _MARK + base64.urlsafe_b64encode(summary.encode("utf-8")).decode("ascii")


def compacted_object(
    completion: ChatCompletion, *, response: str, kept: list[dict[str, Any]], usage: dict[str, Any] | None,
    created_at: int,
) -> bytes:
    """The `response.compaction` object: the kept user messages' items, then the compaction."""
    return dumps({
        "id": response, "object": "response.compaction", "created_at": created_at,
        "output": [*kept, compaction_answer(completion, response)], "usage": usage,
    })
