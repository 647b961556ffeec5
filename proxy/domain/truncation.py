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


# What a backend's refusal says: the window, the output it reserves and what the prompt came
# to (or only a floor of it: "at least"). vLLM, current: "maximum context
# length is 4096 tokens. However, you requested 1024 output tokens and your prompt contains at
# least 3073 input tokens" (the prompt is read only up to the room left, so the figure is a floor);
# older: "... you requested 5120 tokens (4096 in the messages, 1024 in the completion)", "... your
# request has 5000 input tokens"; its engine: "The decoder prompt (length 5000) is longer than the
# maximum model length of 4096"; OpenAI: "... your messages resulted in 5000 tokens"; Anthropic:
# "prompt is too long: 210345 tokens > 200000 maximum", "input length and `max_tokens` exceed
# context limit: 188240 + 21333 > 200000"; llama.cpp: "request (5000 tokens) exceeds the available
# context size (4096 tokens)"; Ollama: "exceeded max context length by 17 tokens".
_WINDOW = r"context length is (?P<window>\d+) tokens"
_VLLM_NOW = re.compile(
    _WINDOW + r".*?requested (?P<output>\d+) output tokens.*?prompt contains (?P<floor>at least )?(?P<prompt>\d+)",
    re.IGNORECASE | re.DOTALL,
)
_VLLM_SPLIT = re.compile(
    _WINDOW + r".*?\((?P<prompt>\d+) in the messages, (?P<output>\d+) in the completion\)", re.IGNORECASE | re.DOTALL
)
_VLLM = re.compile(_WINDOW + r".*?(?:requested|resulted in|has) (?P<prompt>\d+)", re.IGNORECASE | re.DOTALL)
_ENGINE = re.compile(r"\(length (?P<prompt>\d+)\) is longer than the maximum model length of (?P<window>\d+)", re.IGNORECASE)
_ANTHROPIC = re.compile(r"(?P<prompt>\d+) tokens > (?P<window>\d+)")
_ANTHROPIC_WITH_OUTPUT = re.compile(r"(?P<prompt>\d+) \+ (?P<output>\d+) > (?P<window>\d+)")
_LLAMA_CPP = re.compile(r"request \((?P<prompt>\d+) tokens\) exceeds the available context size \((?P<window>\d+) tokens")
# TGI (a 422): "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given:
# 4000 `inputs` tokens and 200 `max_new_tokens`"; "`inputs` must have less than 4096 tokens. Given: 5000".
_TGI = re.compile(
    r"must be <= (?P<window>\d+)\. Given: (?P<prompt>\d+) `inputs` tokens and (?P<output>\d+) `max_new_tokens`"
)
_TGI_INPUT = re.compile(r"`inputs` must have less than (?P<window>\d+) tokens\. Given: (?P<prompt>\d+)")
_OVER_BY = re.compile(r"exceeded max context length by (\d+)", re.IGNORECASE)
# The share of the prompt kept when the refusal says no number (or only a floor): a quarter goes.
_UNKNOWN_SHARE = 0.75


def shortened(request: ChatRequest, refusal: str) -> ChatRequest | None:
    """`request` (as sent) trimmed further after its backend refused it as too long, by the
    share the refusal says was too much (a quarter when it cannot say), or None when nothing
    more can be dropped (or nothing dropped could make it fit)."""
    estimate = estimated_prompt_tokens(request)
    budget = estimate * _UNKNOWN_SHARE
    patterns = (_VLLM_NOW, _VLLM_SPLIT, _ANTHROPIC_WITH_OUTPUT, _TGI, _VLLM, _ENGINE, _ANTHROPIC, _LLAMA_CPP, _TGI_INPUT)
    for pattern in patterns:
        if (found := pattern.search(refusal)) is None:
            continue
        figures = found.groupdict()
        # The answer's room is not the prompt's: what fits is the window less the output asked for.
        room = int(figures["window"]) - int(figures.get("output") or 0)
        if room <= 0:
            return None  # `max_output_tokens` alone fills the window
        if figures.get("floor"):
            # The prompt is at least that long, and may be far longer (the gateway's estimate
            # evidently counts less than its tokenizer): a quarter less than the smaller of
            # what was sent and the room.
            budget = min(estimate, room) * _UNKNOWN_SHARE
        else:
            budget = estimate * min(room / max(int(figures["prompt"]), 1), 1.0)
        break
    else:
        if (over := _OVER_BY.search(refusal)) is not None:
            budget = estimate - int(over.group(1))
    # Estimates are rough: aim a tenth below what the backend said fits.
    trimmed = _trimmed(request, int(budget * 0.9))
    return None if trimmed is request else trimmed


# A refusal of the answer's room, the prompt fitting, with exact figures: vLLM, current:
# "'max_tokens' or 'max_completion_tokens' is too large: 32000. This model's maximum context
# length is 32768 tokens and your request has 17459 input tokens (32000 > 32768 - 17459)";
# SGLang: "... maximum context length of 32768 tokens. You requested a total of 33000 tokens:
# 1000 tokens from the input messages and 32000 tokens for the completion".
_OUTPUT_TOO_LARGE = re.compile(
    r"too large: (?P<output>\d+)\.\s*This model's maximum context length is (?P<window>\d+) tokens and your "
    r"request has (?P<prompt>\d+) input tokens",
    re.IGNORECASE,
)
_SGLANG = re.compile(
    r"maximum context length of (?P<window>\d+) tokens\. You requested a total of \d+ tokens: (?P<prompt>\d+) "
    r"tokens from the input messages and (?P<output>\d+) tokens for the completion",
    re.IGNORECASE,
)


def output_room(refusal: str) -> int | None:
    """The tokens the window leaves the answer, when a backend's refusal says the prompt fits
    but not with the answer's limit (and says both exactly); None for any other refusal."""
    for pattern in (_OUTPUT_TOO_LARGE, _SGLANG, _VLLM_SPLIT, _TGI):
        found = pattern.search(refusal)
        if found is not None:
            room = int(found["window"]) - int(found["prompt"])
            return room if 0 < room < int(found["output"]) else None
    return None


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

