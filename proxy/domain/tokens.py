"""Token counts when a backend gave none: an estimate, for accounting only.

A stream the client leaves before its end never reads the backend's usage (the backend call
is cancelled with it), and some servers never send usage at all. Charging nothing for such
an answer would let a key with a token limit read whole answers for free; charging by size
is what every OpenAI-compatible tokenizer roughly does (about four characters a token for
English text and code).
"""

from __future__ import annotations

import json
from dataclasses import asdict

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
    prompt = sum(len(message.text) + len(message.reasoning or "") for message in request.messages)
    prompt += sum(len(call.arguments) for message in request.messages for call in message.tool_calls)
    if request.tools:
        prompt += len(json.dumps([asdict(tool) for tool in request.tools]))
    return Usage(prompt_tokens=estimate_tokens(prompt), completion_tokens=estimate_tokens(generated))
