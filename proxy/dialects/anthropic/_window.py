"""An Anthropic client's `max_tokens` past what the model's window leaves the answer.

Anthropic takes such a request: the answer runs until the window is full and ends with
`stop_reason: "model_context_window_exceeded"`. vLLM and SGLang refuse it instead ("'max_tokens'
... is too large: 32000. This model's maximum context length is 32768 tokens and your request has
17459 input tokens"), and Claude Code asks for 32000 or 64000 tokens whatever the model: every
request to a model of a small window was refused (as "prompt is too long", which Claude Code
compacts on, for nothing). So the request goes again with the limit the refusal says is left,
and an answer cut there ends as Anthropic's would.
"""

from __future__ import annotations

from dataclasses import replace

from proxy.dialects.anthropic._vocabulary import DIALECT, StopReasonFinish
from proxy.domain.chat import ChatRequest, FinishReason
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import Finish, StreamEvent
from proxy.domain.truncation import output_room

WINDOW_EXCEEDED = "model_context_window_exceeded"


# Clients whose own servers take a limit past the window: Anthropic's (above) and Ollama's,
# whose answer stops where the window is full (`done_reason: "length"`).
_FITTED_DIALECTS = frozenset({DIALECT, "ollama"})


def output_fitted(request: ChatRequest, refusal: GatewayError) -> ChatRequest | None:
    """An Anthropic or Ollama client's `request` with the answer's limit the backend's
    `refusal` says is left; None for another client's (OpenAI and vLLM refuse it too), or
    any other refusal."""
    if request.dialect not in _FITTED_DIALECTS or refusal.kind is not ErrorKind.INVALID_REQUEST:
        return None
    room = output_room(refusal.message)
    if room is None or (request.params.max_tokens or 0) <= room:
        return None
    return replace(request, params=replace(request.params, max_tokens=room))


def window_filled(request: ChatRequest, events: list[StreamEvent]) -> list[StreamEvent]:
    """`events` with an answer cut at its limit said as Anthropic says one cut by the window
    (for an Anthropic client's `request`; another's as they are)."""
    if request.dialect != DIALECT or not any(type(event) is Finish and event.reason is FinishReason.LENGTH for event in events):
        return events
    return [
        StopReasonFinish(FinishReason.LENGTH, event.choice, WINDOW_EXCEEDED)
        if type(event) is Finish and event.reason is FinishReason.LENGTH else event
        for event in events
    ]
