"""`truncation: "auto"` (OpenAI's Responses API): a conversation longer than the model's
context window loses items from its beginning until it fits, rather than failing.

What is never dropped: system messages (the request's `instructions`), the last user message,
and the last item (what the model answers). A tool call and its results go together: a
backend refuses a result whose call it has not seen, or a call without its result. Sizes are
the gateway's estimate (`proxy.domain.tokens`), so the backend may still find a trimmed
conversation too long: `shortened` then trims it by what the backend said was too much.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from proxy.domain.chat import ChatRequest, Message
from proxy.domain.tokens import CHARS_PER_TOKEN, estimated_prompt_tokens, message_chars


@dataclass(frozen=True, slots=True)
class Window:
    """A model's context window, as its backend's listing says it: vLLM's `max_model_len`
    holds the prompt and the answer's `max_tokens`; Anthropic's `max_input_tokens` the
    prompt alone."""

    tokens: int
    counts_output: bool


def fitted(request: ChatRequest, window: Window) -> ChatRequest:
    """`request` with the oldest items dropped until its estimate (and, where the window
    counts it, its `max_tokens`) fits `window`; `request` itself when it fits already."""
    reserved = (request.params.max_tokens or 0) if window.counts_output else 0
    return _trimmed(request, window.tokens - reserved)


# The numbers a backend's refusal gives: what the prompt (or prompt and answer) came to, and
# the most it may be. vLLM: "maximum context length is 4096 tokens. However, you requested
# 5120 tokens"; Anthropic: "prompt is too long: 210345 tokens > 200000 maximum"; Ollama:
# "exceeded max context length by 17 tokens".
_VLLM = re.compile(r"context length is (\d+) tokens.*?(?:requested|resulted in|has) (\d+)", re.IGNORECASE | re.DOTALL)
_ANTHROPIC = re.compile(r"(\d+) tokens > (\d+)")
_OVER_BY = re.compile(r"exceeded max context length by (\d+)", re.IGNORECASE)


def shortened(request: ChatRequest, refusal: str) -> ChatRequest | None:
    """`request` (as sent) trimmed further after its backend refused it as too long, by the
    share the refusal says was too much (a quarter when it says no numbers), or None when
    nothing more can be dropped."""
    estimate = estimated_prompt_tokens(request)
    share = 0.75
    if (found := _VLLM.search(refusal)) is not None:
        share = int(found.group(1)) / max(int(found.group(2)), 1)
    elif (found := _ANTHROPIC.search(refusal)) is not None:
        share = int(found.group(2)) / max(int(found.group(1)), 1)
    elif (found := _OVER_BY.search(refusal)) is not None:
        share = 1 - int(found.group(1)) / max(estimate, 1)
    # Estimates are rough: aim a tenth below what the backend said fits.
    trimmed = _trimmed(request, int(estimate * min(share, 1.0) * 0.9))
    return None if trimmed is request else trimmed


def _trimmed(request: ChatRequest, budget: int) -> ChatRequest:
    messages = request.messages
    estimate = estimated_prompt_tokens(request)
    if estimate <= budget:
        return request
    over = (estimate - budget) * CHARS_PER_TOKEN  # characters to drop
    kept = [True] * len(messages)
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    for group in _droppable(messages, last_user):
        if over <= 0:
            break
        for i in group:
            kept[i] = False
            over -= message_chars(messages[i])
    if all(kept):
        return request
    # A conversation whose first turn is the model's is one no chat template expects: what
    # remains before the last user message starts at a user message.
    first = next((i for i, m in enumerate(messages) if kept[i] and m.role != "system"), None)
    while first is not None and first < last_user and messages[first].role != "user":
        kept[first] = False
        first = next((i for i in range(first + 1, len(messages)) if kept[i] and messages[i].role != "system"), None)
    return replace(request, messages=[m for i, m in enumerate(messages) if kept[i]])


def _droppable(messages: list[Message], last_user: int) -> list[list[int]]:
    """The items that may go, oldest first, each a list of message indexes: one message, or
    an assistant's tool calls with their results."""
    groups: list[list[int]] = []
    end = len(messages) - 1
    i = 0
    while i < len(messages):
        message = messages[i]
        group = [i]
        if message.tool_calls:
            while group[-1] + 1 < len(messages) and messages[group[-1] + 1].role == "tool":
                group.append(group[-1] + 1)
        i = group[-1] + 1
        if message.role == "system" or last_user in group or end in group:
            continue
        groups.append(group)
    return groups

