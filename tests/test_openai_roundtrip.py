"""Any valid domain event stream, rendered by the OpenAI `StreamRenderer` and read back by the
OpenAI `StreamRelay`, yields the same events.

Normalised where OpenAI's wire format legitimately cannot carry something:
- empty text/reasoning/argument deltas are not sent (nothing to carry);
- usage travels in one chunk before `[DONE]`: only the last report survives, at the end,
  and none after a failure (the stream ends at the error);
- a choice that called tools and finished with `stop` reads back as `tool_calls` (the relay
  repairs backends that say `stop` there, §3d);
- an in-stream error reads back as a backend error with the same message;
- a stream that reports no usage reads back with the gateway's estimate of what it generated;
- a stream that ends with no choice finished reads back with choice 0 finished (`stop`, or
  `tool_calls` after calling tools), as OpenAI's streams always end theirs.
"""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dialects import openai
from proxy.domain.chat import FinishReason, Usage
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import (
    EstimatedUsageReport,
    Finish,
    ReasoningDelta,
    StreamEvent,
    StreamFailed,
    StreamStart,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UsageReport,
)
from proxy.domain.tokens import estimate_tokens

# -- strategies (also used by tests/test_anthropic_codec.py) ----------------------------------------

_texts = st.text(max_size=12)
_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)
_json_values = st.one_of(st.integers(-1000, 1000), st.text(max_size=6), st.booleans(), st.none())
_arguments = st.dictionaries(st.text(max_size=6), _json_values, max_size=3).map(
    lambda obj: json.dumps(obj, ensure_ascii=False)
)
_usages = st.builds(
    Usage,
    prompt_tokens=st.integers(1, 10_000),  # no prompt is 0 tokens: zeros read as no usage (LocalAI's)
    completion_tokens=st.integers(0, 10_000),
    cached_tokens=st.none() | st.integers(0, 100),
    reasoning_tokens=st.none() | st.integers(0, 100),
)


@st.composite
def _fragments(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=4))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


@st.composite
def _merge(draw: st.DrawFn, sequences: list[list[StreamEvent]]) -> list[StreamEvent]:
    """A random interleaving that keeps each sequence's own order."""
    tags = [i for i, seq in enumerate(sequences) for _ in seq]
    order = draw(st.permutations(tags))
    positions = [0] * len(sequences)
    merged: list[StreamEvent] = []
    for tag in order:
        merged.append(sequences[tag][positions[tag]])
        positions[tag] += 1
    return merged


@st.composite
def choice_events(draw: st.DrawFn, choice: int, *, interleave_tools: bool) -> list[StreamEvent]:
    """One choice's deltas (text, reasoning, tool calls) and maybe its Finish."""
    events: list[StreamEvent] = []
    tools: list[list[StreamEvent]] = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["text", "reasoning", "tool"]))
        if kind == "text":
            events.append(TextDelta(draw(_texts), choice))
        elif kind == "reasoning":
            events.append(ReasoningDelta(draw(_texts), choice))
        else:
            index = len(tools)
            call: list[StreamEvent] = [ToolCallStart(index, f"call_{choice}_{index}", draw(_names), choice)]
            call.extend(ToolCallDelta(index, piece, choice) for piece in draw(_fragments(draw(_arguments))))
            tools.append(call)
            if not interleave_tools:
                events.extend(call)
    if interleave_tools and tools:
        # Parallel calls' fragments interleaved, after the choice's other deltas; indexes
        # renumbered so they count up in order of first appearance.
        events.extend(_renumber(draw(_merge(tools))))
    if draw(st.booleans()):
        events.append(Finish(draw(st.sampled_from(list(FinishReason))), choice))
    return events


def _renumber(events: list[StreamEvent]) -> list[StreamEvent]:
    order: dict[int, int] = {}
    out: list[StreamEvent] = []
    for event in events:
        if isinstance(event, ToolCallStart):
            index = order.setdefault(event.index, len(order))
            out.append(ToolCallStart(index, event.id, event.name, event.choice))
        elif isinstance(event, ToolCallDelta):
            out.append(ToolCallDelta(order[event.index], event.arguments, event.choice))
        else:
            out.append(event)
    return out


@st.composite
def event_streams(draw: st.DrawFn, *, max_choices: int = 3, interleave_tools: bool | None = None) -> list[StreamEvent]:
    """A stream that keeps every rule in `proxy.domain.events`."""
    start = StreamStart(
        id="chatcmpl-" + draw(st.text(alphabet="0123456789abcdef", min_size=1, max_size=8)),
        model=draw(_texts),
        created=draw(st.integers(0, 2**31)),
    )
    interleave = draw(st.booleans()) if interleave_tools is None else interleave_tools
    choices = [draw(choice_events(i, interleave_tools=interleave)) for i in range(draw(st.integers(1, max_choices)))]
    body = draw(_merge(choices))
    for _ in range(draw(st.integers(0, 3))):
        body.insert(draw(st.integers(0, len(body))), UsageReport(draw(_usages)))
    if draw(st.booleans()) and draw(st.booleans()):
        body.append(StreamFailed(GatewayError(ErrorKind.BACKEND, draw(_texts) or "boom")))
    return [start, *body]


def comparable(event: StreamEvent) -> Any:
    """Events as plain values (GatewayError has no equality)."""
    if isinstance(event, StreamFailed):
        return ("failed", event.error.kind, event.error.message)
    return event


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """The same bytes cut into arbitrary reads."""
    if len(data) < 2:
        return [data]
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in pairwise(bounds)]


# -- the property ------------------------------------------------------------------------------------


def _expected(events: list[StreamEvent]) -> list[Any]:
    out: list[Any] = []
    usage: Usage | None = None
    with_tools: set[int] = set()
    failed = False
    for event in events:
        match event:
            case TextDelta(text) | ReasoningDelta(text) if not text:
                continue
            case ToolCallDelta(_, arguments) if not arguments:
                continue
            case UsageReport(report):
                usage = report
                continue
            case ToolCallStart(choice=choice):
                with_tools.add(choice)
            case Finish(FinishReason.STOP, choice) if choice in with_tools:
                event = Finish(FinishReason.TOOL_CALLS, choice)
            case StreamFailed(error):
                event = StreamFailed(GatewayError(ErrorKind.BACKEND, error.message))
                failed = True
        out.append(comparable(event))
        if failed:
            return out
    if not any(isinstance(event, Finish) for event in events):
        out.append(Finish(FinishReason.TOOL_CALLS if 0 in with_tools else FinishReason.STOP, 0))
    generated = sum(
        len(event.text) if isinstance(event, TextDelta | ReasoningDelta) else len(event.arguments)
        for event in events if isinstance(event, TextDelta | ReasoningDelta | ToolCallDelta)
    )
    if usage is not None:
        out.append(UsageReport(usage))
    elif generated:
        out.append(EstimatedUsageReport(Usage(0, estimate_tokens(generated))))
    return out


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_renderer_then_relay_gives_back_the_events(data: st.DataObject) -> None:
    events = data.draw(event_streams())
    renderer = openai.StreamRenderer(include_usage=True)
    wire = renderer.render(events) + renderer.close()

    relay = openai.StreamRelay(include_usage=True)
    seen: list[StreamEvent] = []
    for piece in data.draw(splits(wire)):
        seen.extend(relay.feed(piece).events)
    seen.extend(relay.close().events)

    expected = _expected(events)
    assert [comparable(e) for e in seen] == expected
    if [comparable(e) for e in events if not isinstance(e, UsageReport)] == [e for e in expected if not isinstance(e, UsageReport)]:
        # Nothing needed repair, so the rendered stream is conformant: the relay forwards
        # it byte for byte.
        forwarded = openai.StreamRelay(include_usage=True).feed(wire).raw
        if not any(isinstance(e, UsageReport) for e in events) and wire.endswith(openai.DONE):
            # Except the usage chunk the client asked for, which a stream without usage
            # gets from the gateway's estimate.
            head = wire.removesuffix(openai.DONE)
            assert forwarded.startswith(head) and forwarded.endswith(openai.DONE)
            added = json.loads(forwarded[len(head):].removesuffix(openai.DONE).removeprefix(b"data: "))
            assert added["choices"] == [] and added["usage"]["prompt_tokens"] == 0
            return
        assert forwarded == wire
