"""How a pipeline's events reach `evt.chat.{trace_id}`: the `Emitter` it writes to, and the
publisher task that numbers and publishes them in order.

One publisher per job attempt. Events are queued (bounded: a stalled NATS slows the
pipeline down rather than growing memory), and each wake-up publishes whatever is queued as
one batch — adjacent text deltas of one task merged — in one trio->asyncio hop, without
waiting for JetStream's acks. Where it matters — `finished`, `flush()` — the last message
goes out as a JetStream publish: its ack means everything before it on the connection was
processed too. Every message carries `Nats-Msg-Id: {trace_id}:{seq}`, so a batch retried
after a NATS error is stored once (readers drop repeats by `seq`). When nothing was published
for `keepalive` seconds, a `progress` event tells the gateway the job is alive.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import trio

from proxy.dialects.events import Finished
from proxy.domain.events import (
    CompletionBuilder,
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
from proxy.infra.nats import Bus, BusError
from proxy.services.journal import events_subject
from proxy.workflow.job import first_seq
from proxy.workflow.view import Progress, TasksAnnounced, WinnerChosen, WorkflowEvent, encode

log = logging.getLogger("llm_proxy.workflow")

BusGetter = Callable[[], Bus | None]
_QUEUE = 256
_BATCH = 256
_RETRY_START = 0.2
_RETRY_MAX = 2.0


@dataclass(slots=True)
class _Flush:
    done: trio.Event


@dataclass(slots=True)
class _Final:
    finished: Finished
    done: trio.Event


class EventPublisher:
    """Publishes one attempt's events; run it with `nursery.start(publisher.run)`."""

    def __init__(self, bus: BusGetter, trace_id: str, attempt: int, *, keepalive: float) -> None:
        self._bus = bus
        self._trace_id = trace_id
        self._subject = events_subject(trace_id)
        self._next_seq = first_seq(attempt)
        self._keepalive = keepalive
        self._send, self._receive = trio.open_memory_channel[WorkflowEvent | _Flush | _Final](_QUEUE)
        # Only `close` stops the publisher: it must outlive a cancelled job long enough to
        # announce the job's end (callers bound that wait with their own deadlines).
        self._scope = trio.CancelScope(shield=True)
        self.published = 0

    def close(self) -> None:
        self._scope.cancel()

    async def put(self, event: WorkflowEvent) -> None:
        await self._send.send(event)

    async def flush(self) -> None:
        """Return once everything put so far is stored (at once if the publisher is closed)."""
        done = trio.Event()
        try:
            await self._send.send(_Flush(done))
        except trio.BrokenResourceError:
            return
        await done.wait()

    async def finish(self, finished: Finished) -> None:
        """Publish the terminal event (after everything before it) and stop. Its msg id is
        per trace, not per seq: a retry that finds the run already stored publishes it
        again, and JetStream keeps one."""
        done = trio.Event()
        await self._send.send(_Final(finished, done))
        await done.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        with self._scope, self._receive:
            while True:
                items: list[WorkflowEvent | _Flush | _Final] = []
                with trio.move_on_after(self._keepalive if self._keepalive > 0 else math.inf):
                    items.append(await self._receive.receive())
                if not items:
                    items.append(Progress())
                while len(items) < _BATCH:
                    try:
                        items.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                if await self._publish(items):
                    return

    async def _publish(self, items: list[WorkflowEvent | _Flush | _Final]) -> bool:
        """Publish `items` in order; True after the final event."""
        events: list[WorkflowEvent] = []
        waiters: list[trio.Event] = []
        final: _Final | None = None
        for item in items:
            if isinstance(item, _Flush):
                waiters.append(item.done)
            elif isinstance(item, _Final):
                final = item
                break  # nothing may follow `finished`
            else:
                _append_merged(events, item)
        messages = []
        for event in events:
            seq = self._next_seq
            self._next_seq += 1
            messages.append((self._subject, encode(seq, event), f"{self._trace_id}:{seq}"))
        if final is not None:
            seq = self._next_seq
            self._next_seq += 1
            messages.append((self._subject, encode(seq, final.finished), f"{self._trace_id}:finished"))
        if messages:
            await self._store(messages, confirm=bool(waiters) or final is not None)
            self.published += len(messages)
        for waiter in waiters:
            waiter.set()
        if final is not None:
            final.done.set()
            return True
        return False

    async def _store(self, messages: list[tuple[str, bytes, str]], *, confirm: bool) -> None:
        delay = _RETRY_START
        while True:
            bus = self._bus()
            if bus is not None:
                try:
                    if not confirm:
                        await bus.publish_batch(messages)
                        return
                    await bus.publish_batch(messages[:-1])
                    subject, data, msg_id = messages[-1]
                    await bus.publish(subject, data, msg_id=msg_id)
                    return
                except BusError as error:
                    log.warning("events of %s not published (%s); retrying", self._trace_id, error)
            await trio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX)


def _append_merged(events: list[WorkflowEvent], event: WorkflowEvent) -> None:
    last = events[-1] if events else None
    if isinstance(event, TextDelta) and isinstance(last, TextDelta) and last.choice == event.choice:
        events[-1] = TextDelta(last.text + event.text, event.choice)
    elif isinstance(event, ReasoningDelta) and isinstance(last, ReasoningDelta) and last.choice == event.choice:
        events[-1] = ReasoningDelta(last.text + event.text, event.choice)
    else:
        events.append(event)


ChoiceEvent = TextDelta | ReasoningDelta | ToolCallStart | ToolCallDelta | Finish


class Emitter:
    """What a pipeline writes its stream to.

    The role event goes out lazily, before the pipeline's first event: a pipeline that fails
    before emitting anything (say, on a bad option) gives its client a real HTTP error status.
    `result` folds everything emitted, per choice.
    """

    def __init__(self, publisher: EventPublisher, start: StreamStart) -> None:
        self._publisher = publisher
        self._start = start
        self._started = False
        self.result = CompletionBuilder()
        self.models: tuple[str, ...] = ()
        self.winner: WinnerChosen | None = None

    @property
    def started(self) -> bool:
        return self._started

    async def _begin(self) -> None:
        if not self._started:
            self._started = True
            self.result.add(self._start)
            await self._publisher.put(self._start)

    async def emit(self, *events: StreamEvent) -> None:
        await self._begin()
        for event in events:
            if isinstance(event, StreamStart):
                continue  # the job has its own
            self.result.add(event)
            await self._publisher.put(event)

    async def text(self, text: str, choice: int = 0) -> None:
        if text:
            await self.emit(TextDelta(text, choice))

    async def usage(self, usage: UsageReport) -> None:
        await self.emit(usage)

    async def announce_tasks(self, models: Sequence[str], *, select: bool) -> None:
        """Declare parallel tasks (task i = choice i = models[i]). With `select`, the client
        sees only the winner (see `choose`), as choice 0."""
        await self._begin()
        self.models = tuple(models)
        await self._publisher.put(TasksAnnounced(self.models, select))

    def task(self, choice: int) -> TaskEmitter:
        return TaskEmitter(self, choice)

    async def choose(self, choice: int) -> None:
        model = self.models[choice] if choice < len(self.models) else ""
        self.winner = WinnerChosen(choice, model)
        await self._begin()
        await self._publisher.put(self.winner)

    async def flush(self) -> None:
        await self._publisher.flush()


class TaskEmitter:
    """One task's view of the emitter: its content events become the task's choice.

    Usage and the backend's own stream start are not forwarded (a task's usage is part of the
    pipeline's total); an in-stream failure is not either — it fails the task, not the job."""

    def __init__(self, emitter: Emitter, choice: int) -> None:
        self._emitter = emitter
        self.choice = choice

    async def emit(self, event: StreamEvent) -> None:
        if isinstance(event, TextDelta | ReasoningDelta | ToolCallStart | ToolCallDelta | Finish):
            await self._emitter.emit(replace(event, choice=self.choice))
        elif isinstance(event, StreamStart | UsageReport | StreamFailed):
            return
