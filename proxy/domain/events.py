"""The stream of a chat completion as dialect-free events.

Backends' wire formats are parsed into these events and client dialects render them; the
seed's NATS schema (`role`, `token`, `tool_call`, `usage`, `finished`) is a projection of
them. `choice` is the OpenAI choice index (`n > 1`, or fan-out tasks as choices).

Rules every producer keeps, so that every renderer can rely on them:
- `StreamStart` comes first, exactly once;
- a tool call's `ToolCallStart` precedes its `ToolCallDelta`s; `index` counts from 0 per
  choice, in order of first appearance;
- `Finish` comes at most once per choice, after that choice's deltas;
- `UsageReport` may come anywhere after `StreamStart`; the last one wins (an
  `EstimatedUsageReport` is the gateway's estimate, for a backend that reported none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from proxy.domain.chat import ChatCompletion, Choice, FinishReason, ToolCall, Usage
from proxy.domain.errors import GatewayError


@dataclass(slots=True, frozen=True)
class StreamStart:
    id: str
    model: str
    created: int
    system_fingerprint: str | None = None  # an OpenAI backend's, passed on to OpenAI clients


@dataclass(slots=True, frozen=True)
class TextDelta:
    text: str
    choice: int = 0
    # The backend's log probabilities for this text in OpenAI's shape (`{"content": [{token,
    # logprob, bytes, top_logprobs}, ...]}`; an Ollama backend's list is wrapped so), otherwise
    # opaque to the gateway. None (the common case) when none were asked for.
    logprobs: dict[str, Any] | None = None


@dataclass(slots=True, frozen=True)
class RefusalDelta:
    """An OpenAI model's refusal (`refusal` instead of `content`: structured outputs, safety),
    which OpenAI clients tell from an answer (`parse()` parses none). Other dialects have no
    such field and leave it out."""

    text: str
    choice: int = 0


@dataclass(slots=True, frozen=True)
class AnnotationsDelta:
    """An OpenAI model's annotations of its answer (a web search's `url_citation`s), in OpenAI's
    shape, opaque to the gateway; other dialects have no such field and leave them out."""

    annotations: tuple[dict[str, Any], ...]
    choice: int = 0


@dataclass(slots=True, frozen=True)
class FunctionCallDelta:
    """A piece of legacy function calling's one call (OpenAI's `function_call`, asked with
    `functions`): its name with the first piece, then its arguments. Only OpenAI clients ask for
    one, and only OpenAI-compatible backends make one."""

    name: str
    arguments: str
    choice: int = 0


@dataclass(slots=True, frozen=True)
class AudioDelta:
    """A piece of an OpenAI model's spoken answer (`message.audio`, asked with `modalities`
    and `audio`): its id and expiry as said (the last one said holds), pieces of its base64
    `data` and of its `transcript`. Only OpenAI-compatible backends speak, for OpenAI clients."""

    id: str
    data: str
    transcript: str
    expires_at: int | None
    choice: int = 0


@dataclass(slots=True, frozen=True)
class ReasoningDelta:
    text: str
    choice: int = 0

    # False for a dialect's subclass carrying what a `ChatCompletion` cannot keep (a
    # signature, a block the domain does not model): a replay of the answer would lack it.
    replayable: ClassVar[bool] = True


@dataclass(slots=True, frozen=True)
class SignedReasoningDelta(ReasoningDelta):
    """The last piece of a thinking block, with the signature the backend gave it (Claude's:
    it takes its thinking back only so). A completion keeps its blocks (`Choice.signed`), and
    its replay gives them again as these."""

    signature: str = ""

    replayable: ClassVar[bool] = False


@dataclass(slots=True, frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str
    choice: int = 0

    replayable: ClassVar[bool] = True  # as `ReasoningDelta.replayable`


@dataclass(slots=True, frozen=True)
class ToolCallDelta:
    index: int
    arguments: str
    choice: int = 0


@dataclass(slots=True, frozen=True)
class UsageReport:
    usage: Usage


@dataclass(slots=True, frozen=True)
class EstimatedUsageReport(UsageReport):
    """The gateway's estimate, for a backend that reported no usage: clients are told it
    (Claude Code tracks its context by it), and its charge is logged as an estimate."""


@dataclass(slots=True, frozen=True)
class Finish:
    reason: FinishReason
    choice: int = 0

    replayable: ClassVar[bool] = True  # as `ReasoningDelta.replayable`


@dataclass(slots=True, frozen=True)
class ContinuedFinish(Finish):
    """A finish that carries what its client sends back to go on from the answer: Ollama's
    `/api/generate` `context` (the conversation's tokens). Kept with the answer for a replay
    of its `Idempotency-Key`; not by a cache, whose hit another prompt's tokens would mislead."""

    context: tuple[int, ...] = ()

    @property
    def replayable(self) -> bool:  # type: ignore[override]
        return not self.context


@dataclass(slots=True, frozen=True)
class StopSequenceFinish(Finish):
    """A `stop` finish known to come from this stop sequence (Anthropic's `stop_sequence`,
    vLLM's `stop_reason`); an Anthropic client is told which."""

    stop_sequence: str = ""

    replayable: ClassVar[bool] = False


@dataclass(slots=True, frozen=True)
class StreamFailed:
    """The stream broke after it started; renderers emit their dialect's in-stream error."""

    error: GatewayError


StreamEvent = (
    StreamStart
    | TextDelta
    | RefusalDelta
    | AnnotationsDelta
    | FunctionCallDelta
    | AudioDelta
    | ReasoningDelta
    | ToolCallStart
    | ToolCallDelta
    | UsageReport
    | Finish
    | StreamFailed
)


class CompletionBuilder:
    """Folds a stream of events into the `ChatCompletion` it describes."""

    def __init__(self) -> None:
        self.start: StreamStart | None = None
        self.usage: Usage | None = None
        self.usage_estimated = False  # `usage` is the gateway's estimate (`EstimatedUsageReport`)
        self.error: GatewayError | None = None
        # Whether `build()` holds the whole answer, so that a cache may replay it for it.
        self.replayable = True
        self._choices: dict[int, Choice] = {}
        self._text: dict[int, list[str]] = {}
        self._reasoning: dict[int, list[str]] = {}
        self._signed: dict[int, list[tuple[str, str]]] = {}
        self._signed_from: dict[int, int] = {}  # where in `_reasoning` its next signed block begins
        self._refusal: dict[int, list[str]] = {}
        self._annotations: dict[int, list[dict[str, Any]]] = {}
        self._function_calls: dict[int, tuple[str, list[str]]] = {}
        self._audio: dict[int, _Audio] = {}
        self._tool_ids: dict[tuple[int, int], str] = {}
        self._tool_names: dict[tuple[int, int], str] = {}
        self._tool_args: dict[tuple[int, int], list[str]] = {}
        self._logprobs: dict[int, dict[str, Any]] = {}

    def _choice(self, index: int) -> Choice:
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = Choice(index=index)
            self._text[index] = []
            self._reasoning[index] = []
        return choice

    def add(self, event: StreamEvent) -> None:
        match event:
            case TextDelta(text, choice, logprobs):
                self._choice(choice)
                self._text[choice].append(text)
                if logprobs is not None:
                    _merge_logprobs(self._logprobs.setdefault(choice, {}), logprobs)
            case RefusalDelta(text, choice):
                self._choice(choice)
                self._refusal.setdefault(choice, []).append(text)
            case AnnotationsDelta(annotations, choice):
                self._choice(choice)
                self._annotations.setdefault(choice, []).extend(annotations)
            case FunctionCallDelta(name, arguments, choice):
                self._choice(choice)
                held = self._function_calls.setdefault(choice, (name, []))
                held[1].append(arguments)
            case AudioDelta(audio_id, data, transcript, expires_at, choice):
                self._choice(choice)
                self._audio.setdefault(choice, _Audio()).add(audio_id, data, transcript, expires_at)
            case ReasoningDelta(text, choice):
                self._choice(choice)
                self._reasoning[choice].append(text)
                if not event.replayable:
                    self.replayable = False
                    # A dialect's refinement ends its block with the backend's signature (Claude's):
                    # once a block, never per piece.
                    signature = getattr(event, "signature", "")
                    if isinstance(signature, str) and signature:
                        self._sign(choice, signature)
            case ToolCallStart(index, call_id, name, choice):
                self._choice(choice)
                if not event.replayable:
                    self.replayable = False
                self._tool_ids[choice, index] = call_id
                self._tool_names[choice, index] = name
                self._tool_args.setdefault((choice, index), [])
            case ToolCallDelta(index, arguments, choice):
                self._tool_args.setdefault((choice, index), []).append(arguments)
            case Finish(reason, choice):
                self._choice(choice).finish_reason = reason
                if not event.replayable:
                    self.replayable = False
                if isinstance(event, ContinuedFinish) and event.context:
                    self._choice(choice).context = event.context
            case UsageReport(usage):
                self.usage = usage
                self.usage_estimated = type(event) is EstimatedUsageReport
            case StreamStart():
                self.start = event
            case StreamFailed(error):
                self.error = error

    def _sign(self, choice: int, signature: str) -> None:
        pieces = self._reasoning[choice]
        start = self._signed_from.get(choice, 0)
        self._signed.setdefault(choice, []).append(("".join(pieces[start:]), signature))
        self._signed_from[choice] = len(pieces)

    def generated_chars(self) -> int:
        """How much was generated so far (text, reasoning, tool-call arguments), in characters."""
        parts = (*self._text.values(), *self._reasoning.values(), *self._refusal.values(), *self._tool_args.values(),
                 *(pieces for _, pieces in self._function_calls.values()))
        return sum(len(piece) for pieces in parts for piece in pieces)

    @property
    def finish_reason(self) -> FinishReason | None:
        """The first choice's finish reason (None while unfinished)."""
        choice = self._choices.get(0)
        return choice.finish_reason if choice else None

    def build(self) -> ChatCompletion:
        choices = []
        for index in sorted(self._choices):
            choice = self._choices[index]
            choice.content = "".join(self._text[index])
            choice.reasoning = "".join(self._reasoning[index])
            choice.signed = tuple(self._signed.get(index, ()))
            choice.refusal = "".join(self._refusal.get(index, ()))
            choice.annotations = self._annotations.get(index, [])
            if (legacy := self._function_calls.get(index)) is not None:
                choice.function_call = ToolCall(id="", name=legacy[0], arguments="".join(legacy[1]))
            if (audio := self._audio.get(index)) is not None:
                choice.audio = audio.said()
            choice.logprobs = self._logprobs.get(index)
            choice.tool_calls = [
                ToolCall(
                    id=self._tool_ids.get(key, ""),
                    name=self._tool_names.get(key, ""),
                    arguments="".join(parts),
                )
                for key, parts in sorted(self._tool_args.items())
                if key[0] == index
            ]
            choices.append(choice)
        if not choices:
            choices.append(Choice(index=0))
        start = self.start or StreamStart(id="", model="", created=0)
        return ChatCompletion(
            id=start.id, model=start.model, created=start.created, choices=choices, usage=self.usage,
            system_fingerprint=start.system_fingerprint,
        )


class _Audio:
    """A choice's spoken answer so far (see `AudioDelta`)."""

    __slots__ = ("data", "expires_at", "id", "transcript")

    def __init__(self) -> None:
        self.id = ""
        self.expires_at: int | None = None
        self.data: list[str] = []
        self.transcript: list[str] = []

    def add(self, audio_id: str, data: str, transcript: str, expires_at: int | None) -> None:
        self.id = audio_id or self.id
        self.expires_at = expires_at if expires_at is not None else self.expires_at
        if data:
            self.data.append(data)
        if transcript:
            self.transcript.append(transcript)

    def said(self) -> dict[str, Any]:
        """OpenAI's `message.audio`."""
        return {"id": self.id, "data": "".join(self.data), "expires_at": self.expires_at,
                "transcript": "".join(self.transcript)}


def audio_delta(piece: dict[str, Any], choice: int) -> AudioDelta:
    """The event of an OpenAI `audio` object (a whole message's, or a stream delta's piece)."""
    expires = piece.get("expires_at")
    return AudioDelta(
        str(piece.get("id") or ""), data if isinstance(data := piece.get("data"), str) else "",
        text if isinstance(text := piece.get("transcript"), str) else "",
        expires if isinstance(expires, int) and not isinstance(expires, bool) else None, choice,
    )


def _merge_logprobs(into: dict[str, Any], part: dict[str, Any]) -> None:
    """A choice's logprobs so far and one piece's: each list (`content`, `refusal`) extended."""
    for name, value in part.items():
        held = into.get(name)
        if isinstance(held, list) and isinstance(value, list):
            held.extend(value)
        elif held is None:
            into[name] = list(value) if isinstance(value, list) else value


def completion_events(completion: ChatCompletion) -> list[StreamEvent]:
    """The events that replay a finished completion as a stream (cache hits, resumes)."""
    events: list[StreamEvent] = [
        StreamStart(id=completion.id, model=completion.model, created=completion.created,
                    system_fingerprint=completion.system_fingerprint)
    ]
    for choice in completion.choices:
        signed_end = 0
        for thinking, signature in choice.signed:  # each block as signed, so it goes back so
            events.append(SignedReasoningDelta(thinking, choice.index, signature))
            signed_end += len(thinking)
        if choice.reasoning[signed_end:]:
            events.append(ReasoningDelta(choice.reasoning[signed_end:], choice.index))
        if choice.content:
            events.append(TextDelta(choice.content, choice.index, choice.logprobs))
        if choice.refusal:
            events.append(RefusalDelta(choice.refusal, choice.index))
        if choice.annotations:
            events.append(AnnotationsDelta(tuple(choice.annotations), choice.index))
        if choice.function_call is not None:
            call = choice.function_call
            events.append(FunctionCallDelta(call.name, call.arguments, choice.index))
        if choice.audio is not None:
            events.append(audio_delta(choice.audio, choice.index))
        for position, call in enumerate(choice.tool_calls):
            events.append(ToolCallStart(position, call.id, call.name, choice.index))
            if call.arguments:
                events.append(ToolCallDelta(position, call.arguments, choice.index))
        if choice.finish_reason is not None:
            events.append(
                ContinuedFinish(choice.finish_reason, choice.index, choice.context) if choice.context
                else Finish(choice.finish_reason, choice.index)
            )
    if completion.usage is not None:
        events.append(UsageReport(completion.usage))
    return events
