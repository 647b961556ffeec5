"""Reading a run of this instance as it goes (`trace_events`: `/v1/streams`, the Responses
resume): every event once, in order, however slowly the reader takes them."""

from __future__ import annotations

import trio

from proxy.dialects.events import Finished, WireEvent
from proxy.domain.events import TextDelta
from proxy.infra.resources import Resources
from proxy.services.journal import EventLog, Outcome
from proxy.services.persistence import Persistence, PersistenceSettings, trace_events


async def test_events_appended_while_the_reader_is_slow_are_not_skipped() -> None:
    persistence = Persistence(Resources(None, None), PersistenceSettings())
    log = EventLog("t1")
    persistence.runs.live["t1"] = log
    log.extend([TextDelta("a"), TextDelta("b")])
    got: list[tuple[int, WireEvent]] = []
    send, receive = trio.open_memory_channel[tuple[int, WireEvent]](0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trace_events, persistence, "t1", 0, send)
        got.append(await receive.receive())  # the reader now waits to send "b"
        log.extend([TextDelta("c")])  # appended meanwhile
        log.close(Outcome("completed", "stop"))
        async for item in receive:
            got.append(item)
            if isinstance(item[1], Finished):
                break
    assert [(seq, getattr(event, "text", None)) for seq, event in got] == [
        (1, "a"), (2, "b"), (3, "c"), (4, None),
    ]
