"""Token counts when a backend gave none, or not yet its final ones: an estimate, for
accounting only.

A stream the client leaves before its end never reads the backend's usage (the backend call
is cancelled with it), some servers never send usage at all, and Anthropic's stream opens
with a usage of one output token that only its end makes true. Charging nothing for such
an answer would let a key with a token limit read whole answers for free; charging by size
is what every OpenAI-compatible tokenizer roughly does (about four characters a token for
English text and code).
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace

from proxy.domain.chat import ChatRequest, Usage
from proxy.domain.events import CompletionBuilder

_CHARS_PER_TOKEN = 4


def estimate_tokens(chars: int) -> int:
    return -(-chars // _CHARS_PER_TOKEN)


def estimated_usage(request: ChatRequest, answer: CompletionBuilder) -> Usage | None:
    """The request's and the answer's estimated usage; None when nothing was generated."""
    generated = answer.generated_chars()
    if not generated:
        return None
    return Usage(prompt_tokens=estimated_prompt_tokens(request), completion_tokens=estimate_tokens(generated))


def estimated_prompt_tokens(request: ChatRequest) -> int:
    """The request's input: its messages' text, reasoning and tool calls, and its tools."""
    prompt = sum(len(message.text) + len(message.reasoning or "") for message in request.messages)
    prompt += sum(len(call.arguments) for message in request.messages for call in message.tool_calls)
    if request.tools:
        prompt += len(json.dumps([asdict(tool) for tool in request.tools]))
    return estimate_tokens(prompt)


def charged_usage(request: ChatRequest, answer: CompletionBuilder) -> tuple[Usage | None, bool]:
    """What an answer costs, and whether that is (partly) an estimate: the backend's usage once
    the answer ended; before that, what it reported so far raised to the estimate."""
    reported = answer.usage
    if reported is not None and answer.finish_reason is not None:
        return reported, False
    estimate = estimated_usage(request, answer)
    if estimate is None:
        return reported, False
    if reported is None:
        return estimate, True
    prompt = reported.prompt_tokens or estimate.prompt_tokens
    completion = max(reported.completion_tokens, estimate.completion_tokens)
    if (prompt, completion) == (reported.prompt_tokens, reported.completion_tokens):
        return reported, False
    return replace(reported, prompt_tokens=prompt, completion_tokens=completion), True
