"""hypercorn's HTTP/2, mended where a client could end the whole server.

A request refused before its body was read (a 401 without a key, a 413 from its declared
length, a 405) has its stream closed once the response is out, while the client may well go
on sending the body (it cannot know yet). hypercorn 0.18 looked each such DATA frame's stream
up and raised `KeyError`; under the trio worker that exception left the connection's task
and ended the server, every client's requests with it: one unauthenticated POST of a few
hundred kilobytes over `h2c` stopped the gateway. Such frames are dropped here, their bytes
acknowledged to the connection's flow-control window (or the connection's other streams
would starve once the dropped bytes had used it up).
"""

from __future__ import annotations

import h2.events
from hypercorn.protocol.h2 import H2Protocol


class MendedH2Protocol(H2Protocol):
    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        pending: list[h2.events.Event] = []
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                # The stream may be one whose request is in `pending`: those go first.
                if pending:
                    await super()._handle_events(pending)
                    pending = []
                if event.stream_id not in self.streams:
                    self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    continue
            pending.append(event)
        await super()._handle_events(pending)  # sends the window updates too
