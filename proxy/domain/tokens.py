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
from typing import NamedTuple

from proxy.domain.chat import ChatRequest, Message, Usage
from proxy.domain.events import CompletionBuilder

CHARS_PER_TOKEN = 4


def estimate_tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


def estimated_usage(request: ChatRequest, answer: CompletionBuilder) -> Usage | None:
    """The request's and the answer's estimated usage; None when nothing was generated."""
    generated = answer.generated_chars()
    if not generated:
        return None
    return Usage(prompt_tokens=estimated_prompt_tokens(request), completion_tokens=estimate_tokens(generated))


def estimated_prompt_tokens(request: ChatRequest) -> int:
    """The request's input: its messages' text, reasoning and tool calls, and its tools."""
    prompt = sum(message_chars(message) for message in request.messages)
    if request.tools:
        prompt += len(json.dumps([asdict(tool) for tool in request.tools]))
    return estimate_tokens(prompt)


def message_chars(message: Message) -> int:
    """The characters of a message that `estimated_prompt_tokens` counts."""
    return len(message.text) + len(message.reasoning or "") + sum(len(call.arguments) for call in message.tool_calls)


def charged_usage(request: ChatRequest, answer: CompletionBuilder, *, left: bool = False) -> tuple[Usage | None, bool]:
    """What an answer costs, and whether that is (partly) an estimate: the backend's usage once
    the answer ended; before that, what it reported so far raised to the estimate. `left`: its
    client left before the end, so an answer with nothing generated yet still costs its prompt
    (the backend has read it by then: vLLM aborts a request only as its connection closes)."""
    reported = answer.usage
    if reported is not None and (reported.prompt_tokens < 0 or reported.completion_tokens < 0):
        reported = None  # no count a server can mean (a bug's): estimated, never a credit to the key
    if reported is not None and answer.finish_reason is not None:
        return reported, answer.usage_estimated
    estimate = estimated_usage(request, answer)
    if estimate is None:
        if not left or answer.error is not None or (reported is not None and reported.prompt_tokens):
            return reported, False
        # Charged nothing, a client could send huge prompts and hang up before the first token.
        read = estimated_prompt_tokens(request)
        if not read:  # nothing to read (a model's preload): nothing spent
            return reported, False
        return (Usage(prompt_tokens=read) if reported is None else replace(reported, prompt_tokens=read)), True
    if reported is None:
        return estimate, True
    prompt = reported.prompt_tokens or estimate.prompt_tokens
    completion = max(reported.completion_tokens, estimate.completion_tokens)
    if (prompt, completion) == (reported.prompt_tokens, reported.completion_tokens):
        return reported, answer.usage_estimated
    return replace(reported, prompt_tokens=prompt, completion_tokens=completion), True


# What a request reserves for its answer when it names no limit of its own (OpenAI counts a
# request as its prompt and its `max_tokens`; without one, a chat may write this much and more).
DEFAULT_MAX_OUTPUT = 4096
_OUTPUT_LIMITS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# Fields whose strings are encoded media, not text a tokenizer reads at four characters a token.
_MEDIA = frozenset({"image_url", "images", "data", "file_data", "input_audio", "image", "audio"})


class Requested(NamedTuple):
    """A request's estimated tokens (`tokens`), and how many of them it asks for itself
    (`least`: its prompt and the max output tokens it names, not the default it is given)."""

    tokens: int
    least: int


def requested_tokens(body: object, *, generates: bool) -> Requested:
    """A request body's (parsed JSON) estimated tokens, as a rate limit counts them before the
    answer: the characters of its text (and the tokens of a prompt given as token ids), and for
    a call that generates, its max output tokens
    (`max_completion_tokens`, `max_tokens`, `max_output_tokens`, Ollama's `num_predict`, times
    `n`), `DEFAULT_MAX_OUTPUT` when it names none."""
    chars = ids = 0
    stack = [body]  # not recursive: the body's nesting is checked later, by its codec
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, dict):
            stack.extend(value for key, value in item.items() if key not in _MEDIA)
        elif isinstance(item, list):
            for element in item:
                if type(element) is int:
                    ids += 1
                else:
                    stack.append(element)
    prompt = estimate_tokens(chars) + ids
    if not generates:
        return Requested(prompt, prompt)
    named, n = _max_output(body)
    if named is None:
        return Requested(prompt + DEFAULT_MAX_OUTPUT * n, prompt)
    return Requested(prompt + named * n, prompt + named * n)


def fanned_out_tokens(body: object, calls: int, judged: bool, *, judge_output: int) -> int:
    """What a pipeline is estimated to spend on a request when `calls` models each answer it
    once and, `judged`, a judge then reads the prompt and every answer and writes up to
    `judge_output` tokens of its own."""
    single = {**body, "n": 1} if isinstance(body, dict) else body  # each model answers once
    prompt = requested_tokens(single, generates=False).tokens
    one = requested_tokens(single, generates=True).tokens
    total = calls * one
    if judged:
        total += prompt + calls * (one - prompt) + judge_output
    return total


def _max_output(body: object) -> tuple[int | None, int]:
    """The max output tokens the request names (None: none) and its number of answers `n`."""
    if not isinstance(body, dict):
        return None, 1
    options = body.get("options")
    candidates = [body.get(name) for name in _OUTPUT_LIMITS]
    if isinstance(options, dict):
        candidates.append(options.get("num_predict"))  # -1, -2: until the model stops
    limit = next((c for c in candidates if type(c) is int and c > 0), None)
    n = body.get("n")
    return limit, n if type(n) is int and 1 < n <= 128 else 1
