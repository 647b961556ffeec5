"""Chat requests and results as the gateway understands them, whatever the dialect.

Every dialect codec parses its wire format into these types and renders them back, so a
request can arrive in one dialect and leave for a backend in another. Fields a dialect
has and the domain does not model travel in `extra` and are forwarded only to backends
of the same dialect.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


class FinishReason(enum.Enum):
    """OpenAI's finish_reason enum; other dialects map onto it (peers-and-protocols §4.4)."""

    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"


@dataclass(slots=True, frozen=True)
class TextPart:
    text: str


@dataclass(slots=True, frozen=True)
class ImagePart:
    """An image by URL; `data:` URLs carry inline base64 (media type in the URL)."""

    url: str
    detail: str | None = None
    # Where the URL is in the client's request (`messages[0].content[1].image_url.url`,
    # Anthropic's `…source.url`), for an error about it; not part of the image.
    at: str | None = field(default=None, compare=False)


@dataclass(slots=True, frozen=True)
class OpaquePart:
    """A content part the domain does not model (audio, files, …), kept as its dialect's JSON."""

    dialect: str
    data: dict[str, Any]
    # Where the part is in the client's request, for an error about it; not part of the part.
    at: str | None = field(default=None, compare=False)


ContentPart = TextPart | ImagePart | OpaquePart


@dataclass(slots=True, frozen=True)
class ToolCall:
    """A complete tool call. `arguments` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True, frozen=True)
class Message:
    role: Role
    content: tuple[ContentPart, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    reasoning: str | None = None
    # The message's fields in its request's dialect that the domain does not model (as
    # `ChatRequest.extra` is for the top level); forwarded only to backends of that dialect.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The message's text parts, one per line (as vLLM joins them for a chat template:
        glued, a system array's blocks or a tool result's ran their words together);
        images and opaque parts are left out."""
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))


@dataclass(slots=True, frozen=True)
class Tool:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


@dataclass(slots=True, frozen=True)
class ToolChoice:
    """`mode` is auto, none or required; `name` forces one named tool."""

    mode: Literal["auto", "none", "required"] = "auto"
    name: str | None = None


@dataclass(slots=True, frozen=True)
class ResponseFormat:
    """Structured output: plain JSON mode, or JSON constrained by a schema."""

    kind: Literal["text", "json_object", "json_schema"]
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool | None = None
    description: str | None = None


@dataclass(slots=True)
class GenerationParams:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int | None = None
    response_format: ResponseFormat | None = None
    # How hard to think, as OpenAI says it ("low", "medium", "high"; OpenAI's own models know
    # more): OpenAI's `reasoning_effort`, Ollama's `think`, Anthropic's `thinking` budget, each
    # read and rendered in its own words.
    reasoning_effort: str | None = None
    # Token log probabilities (OpenAI's `logprobs`/`top_logprobs`, Ollama's same-named fields,
    # a Responses client's `include` of `message.output_text.logprobs`): only OpenAI-compatible
    # and Ollama backends have them to give. `top_logprobs`: alternatives per token.
    logprobs: bool | None = None
    top_logprobs: int | None = None


@dataclass(slots=True)
class ChatRequest:
    """A chat request after parsing and validation.

    `model` is the name the client asked for; routing resolves aliases into
    `RoutedRequest.upstream_model`. `include_usage` is the client's explicit
    `stream_options.include_usage` (None when it did not say). `dialect` names the codec
    the request arrived in; `extra` holds that dialect's unmodelled top-level fields.
    """

    model: str
    messages: list[Message]
    params: GenerationParams = field(default_factory=GenerationParams)
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    stream: bool = False
    include_usage: bool | None = None
    dialect: str = "openai"
    extra: dict[str, Any] = field(default_factory=dict)
    # False: the client wants at most one tool call per turn (None: it did not say).
    parallel_tool_calls: bool | None = None


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    # Prompt tokens written to the prompt cache (Anthropic's cache_creation_input_tokens);
    # like cached_tokens (the part read from it), counted inside prompt_tokens.
    cache_write_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Choice:
    index: int = 0
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    logprobs: dict[str, Any] | None = None  # OpenAI's shape (see `TextDelta`)
    refusal: str = ""  # an OpenAI model's refusal, said instead of content (see `RefusalDelta`)
    annotations: list[dict[str, Any]] = field(default_factory=list)  # see `AnnotationsDelta`
    function_call: ToolCall | None = None  # legacy function calling's one call (see `FunctionCallDelta`)
    audio: dict[str, Any] | None = None  # an OpenAI model's spoken answer, OpenAI's shape (see `AudioDelta`)
    context: tuple[int, ...] = ()  # an Ollama `/api/generate` answer's tokens to go on from (see `ContinuedFinish`)
    # The reasoning's blocks as the backend signed them, (thinking, signature) each: Claude
    # takes its thinking back only signed, and in a tool loop thinks on only with it back.
    signed: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class ChatCompletion:
    """A finished (non-streamed or accumulated) completion."""

    id: str
    model: str
    created: int
    choices: list[Choice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
