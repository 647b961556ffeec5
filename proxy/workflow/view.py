"""A workflow's events on `evt.chat.{trace_id}`, and what its client sees of them (sans-IO).

The bus carries the seed's schema (`proxy.dialects.events`) plus three extension types that
other readers skip as unknown:

    {"seq":2,"type":"tasks","tasks":[{"task":"A","model":"m1"},{"task":"B","model":"m2"}],"select":true}
    {"seq":40,"type":"winner","task":"B","model":"m2"}
    {"seq":41,"type":"progress"}

- `tasks`: the pipeline runs parallel tasks, task letter = choice index. With `select`, the
  client gets only the winner, as choice 0; otherwise every task is a choice of its own.
- `winner`: the task chosen (the `finished` event names its model too, seed-style).
- `progress`: the worker is alive but has had nothing to say for a while.

`ClientView` turns the bus events into the client's events: it buffers the tasks of a
`select` run until `winner`, renumbers the winner to choice 0, and handles redelivery. A
redelivered job starts a new attempt (its `seq`s jump to the next `ATTEMPT_SPAN`): if the
client has seen nothing but the role yet, the view forgets the dead attempt and follows the
new one (the client gets the completed stream); otherwise it ends the stream with an error.
Readers that replay or follow a workflow trace (resume, attach) should read it through a
`ClientView` too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from proxy.dialects._json import dumps
from proxy.dialects.events import (
    Finished,
    WireEvent,
    decode_event,
    encode_event,
    task_index,
    task_name,
)
from proxy.domain.chat import FinishReason
from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.events import (
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
from proxy.workflow.job import attempt_of, first_seq


@dataclass(slots=True, frozen=True)
class TasksAnnounced:
    models: tuple[str, ...]  # index = task = choice
    select: bool


@dataclass(slots=True, frozen=True)
class WinnerChosen:
    choice: int
    model: str


@dataclass(slots=True, frozen=True)
class Progress:
    pass


WorkflowEvent = WireEvent | TasksAnnounced | WinnerChosen | Progress
ChoiceEvent = TextDelta | ReasoningDelta | ToolCallStart | ToolCallDelta | Finish


def encode(seq: int, event: WorkflowEvent) -> bytes:
    match event:
        case TasksAnnounced(models, select):
            tasks = [{"task": task_name(i), "model": model} for i, model in enumerate(models)]
            return dumps({"seq": seq, "type": "tasks", "tasks": tasks, "select": select})
        case WinnerChosen(choice, model):
            return dumps({"seq": seq, "type": "winner", "task": task_name(choice), "model": model})
        case Progress():
            return dumps({"seq": seq, "type": "progress"})
    return encode_event(seq, event)


def decode(data: bytes) -> tuple[int, WorkflowEvent | None]:
    seq, event = decode_event(data)
    if event is not None:
        return seq, event
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return seq, None
    if not isinstance(body, dict):
        return seq, None
    return seq, _extension(body)


def _extension(body: dict[str, Any]) -> WorkflowEvent | None:
    kind = body.get("type")
    if kind == "progress":
        return Progress()
    if kind == "winner":
        return WinnerChosen(task_index(body.get("task")), str(body.get("model") or ""))
    if kind == "tasks" and isinstance(body.get("tasks"), list):
        models: dict[int, str] = {}
        for item in body["tasks"]:
            if isinstance(item, dict):
                models[task_index(item.get("task"))] = str(item.get("model") or "")
        ordered = tuple(models.get(i, "") for i in range(max(models, default=-1) + 1))
        return TasksAnnounced(ordered, bool(body.get("select")))
    return None


class Continuity:
    """Checks that a trace's events arrive complete and in order, by their `seq`.

    Within an attempt seqs are consecutive; a new attempt starts at its own first seq. A
    reader on a plain (core NATS) subscription uses this to notice what it missed — and then
    re-reads the trace from JetStream, where nothing is missing, skipping what it had.
    """

    def __init__(self) -> None:
        self.next_seq = first_seq(1)

    def check(self, seq: int) -> str:
        """"new" (take it), "seen" (a duplicate: skip it) or "gap" (something is missing)."""
        if seq < self.next_seq:
            return "seen"
        attempt = attempt_of(seq)
        if seq == self.next_seq or (attempt > attempt_of(self.next_seq) and seq == first_seq(attempt)):
            self.next_seq = seq + 1
            return "new"
        return "gap"

    def accept(self, seq: int) -> None:
        """Take `seq` whatever came before it (a replay that has nothing better)."""
        self.next_seq = max(self.next_seq, seq + 1)


def restarted_error() -> GatewayError:
    return GatewayError(
        ErrorKind.UNAVAILABLE,
        "The worker running this pipeline stopped mid-stream. The job was restarted, but the "
        "part of the answer already sent cannot be continued; retry the request.",
        code="workflow_restarted",
    )


def outcome_error(finished: Finished) -> GatewayError:
    if finished.status == "cancelled":
        return GatewayError(ErrorKind.UNAVAILABLE, "The workflow job was cancelled.", code="workflow_cancelled")
    return GatewayError(ErrorKind.BACKEND, "The workflow pipeline failed.", code="workflow_failed")


class ClientView:
    """Feed it a trace's events in bus order; it returns what the client should get.

    The role event is held back until there is something to show with it, so that a job
    failing before its answer starts gives the client a real error status, not a stream
    that opens and then fails (the caller raises `error` when `visible` is still False).

    A completed run always ends well-formed: a pipeline may just emit text and return
    (no `Finish`), or return without emitting anything (no role event either). The view
    then adds a `stop` finish for each choice left open (choice 0 when there was none) and,
    failing the trace's own, the role event `start` (the job's id, model and time).
    """

    def __init__(self, start: StreamStart | None = None, *, live: bool = True, from_attempt: int = 0) -> None:
        # `live`: what the view shows reaches the client at once (a stream). A client that
        # waits for the whole answer has seen nothing until the end: a retry's answer is its
        # answer, whatever the attempt before it had shown (`restarts` tells the caller to
        # forget that). `from_attempt`: the attempts before it are skipped (a reader of a
        # run whose answer a retry replaced).
        self._live = live
        self._from_attempt = from_attempt
        self.restarts = 0
        self.done = False
        self.finished: Finished | None = None
        self.error: GatewayError | None = None
        self.winner: str | None = None
        self.models: tuple[str, ...] = ()
        # True when the stream ended while the job may still run (it should be cancelled).
        self.abandoned = False
        self._attempt = 0
        self._start: StreamStart | None = None
        self._default_start = start
        self._shown = False
        self._open: set[int] = set()  # client choices shown content but no finish yet
        self._ended: set[int] = set()
        self._select = False
        self._winner_choice: int | None = None
        self._buffers: dict[int, list[ChoiceEvent]] = {}
        # A usage report while nothing is shown yet: it opens no answer (a run that then fails
        # is still the client's error status), and goes out with whatever is shown next.
        self.usage_unshown: UsageReport | None = None

    @property
    def visible(self) -> bool:
        """Whether the client has been sent anything yet."""
        return self._shown

    def feed_bytes(self, data: bytes) -> list[StreamEvent]:
        seq, event = decode(data)
        return self.feed(seq, event) if event is not None else []

    def feed(self, seq: int, event: WorkflowEvent) -> list[StreamEvent]:
        if self.done:
            return []
        out: list[StreamEvent] = []
        attempt = attempt_of(seq)
        if attempt < self._attempt or attempt < self._from_attempt:
            return out  # a late event of an attempt that was already given up
        if attempt > self._attempt and not isinstance(event, Finished):
            if self._shown and self._live:
                self.abandoned = True
                return self._fail(restarted_error(), out)
            self._restart(attempt)
        match event:
            case StreamStart():
                if self._start is None:
                    self._start = event
            case TasksAnnounced(models, select):
                self.models = models
                self._select = select
            case WinnerChosen(choice, model):
                self._choose(choice, model, out)
            case Progress():
                pass
            case UsageReport():
                if self._shown:
                    self._show(out, [event])
                else:
                    self.usage_unshown = event
            case StreamFailed(error):
                return self._fail(error, out)
            case Finished():
                self.finished = event
                if event.winner and self.winner is None:
                    self.winner = event.winner
                if event.status != "completed":
                    return self._fail(outcome_error(event), out)
                if self._select and self._winner_choice is None:
                    self._choose(0, event.winner or "", out)
                if self._start is None and not self._shown:
                    self._start = self._default_start
                unfinished = self._open if self._open or self._ended else {0}
                self._show(out, [Finish(FinishReason.STOP, choice) for choice in sorted(unfinished)])
                self.done = True
            case TextDelta() | ReasoningDelta() | ToolCallStart() | ToolCallDelta() | Finish():
                self._content(event, out)
        return out

    def _restart(self, attempt: int) -> None:
        if self._shown:  # not live: the caller drops what the earlier attempt showed
            self.restarts += 1
            self._shown = False
            self._start = None
        self._attempt = attempt
        self.usage_unshown = None
        self._open.clear()
        self._ended.clear()
        self._select = False
        self._winner_choice = None
        self._buffers.clear()
        self.models = ()

    def _show(self, out: list[StreamEvent], events: list[StreamEvent]) -> None:
        if not self._shown:
            self._shown = True
            if self._start is not None:
                out.append(self._start)
            if self.usage_unshown is not None:
                out.append(self.usage_unshown)
                self.usage_unshown = None
        for event in events:
            if isinstance(event, Finish):
                self._open.discard(event.choice)
                self._ended.add(event.choice)
            elif not isinstance(event, UsageReport | StreamFailed | StreamStart):
                self._open.add(event.choice)
        out.extend(events)

    def _choose(self, choice: int, model: str, out: list[StreamEvent]) -> None:
        if model:
            self.winner = model
        if not self._select or self._winner_choice is not None:
            return
        self._winner_choice = choice
        buffered = self._buffers.pop(choice, [])
        self._buffers.clear()
        if buffered:
            self._show(out, [replace(e, choice=0) for e in buffered])

    def _content(self, event: ChoiceEvent, out: list[StreamEvent]) -> None:
        if not self._select:
            self._show(out, [event])
        elif self._winner_choice is None:
            self._buffers.setdefault(event.choice, []).append(event)
        elif event.choice == self._winner_choice:
            self._show(out, [replace(event, choice=0)])

    def _fail(self, error: GatewayError, out: list[StreamEvent]) -> list[StreamEvent]:
        self.error = error
        self.done = True
        if self._shown:
            out.append(StreamFailed(error))
        return out
