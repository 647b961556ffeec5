"""hypercorn's protocols, mended where a client could break them.

HTTP/2: a request refused before its body was read (a 401 without a key, a 413 from its declared
length, a 405) has its stream closed once the response is out, while the client may well go
on sending the body (it cannot know yet). hypercorn 0.18 looked each such DATA frame's stream
up and raised `KeyError`; under the trio worker that exception left the connection's task
and ended the server, every client's requests with it: one unauthenticated POST of a few
hundred kilobytes over `h2c` stopped the gateway. Such frames are dropped here, their bytes
acknowledged to the connection's flow-control window (or the connection's other streams
would starve once the dropped bytes had used it up).

HTTP/1.1: once the connection is to close after the response (the response says
`Connection: close`: a refusal whose body is left unread or that was framed two ways; or the
client said so), what the client sends on (a pipelined request, the rest of a body) can
only be dropped. h11 calls it a protocol error, on which hypercorn's reader closed the
connection at once, in the middle of the response going out (which was lost, or failed on a
socket busy with the close). It is dropped here, and the connection closes once the response
is out.

HTTP/1.1 `Expect: 100-continue` (curl's for a body past 1 MB): hypercorn answered `100
Continue` the moment it read the request's head, so a client whose request the guard then
refused (a 401 without a key, a 413 from the declared length) had sent its whole upload for
nothing. The `100` goes once the request has passed its guard (`proxy.http._hangup.want_body`);
a refusal then leaves the body unsent and the connection closes.

HTTP/1.1 bytes that are not a request h11 can read (conflicting `Content-Length`s, no `Host`,
an unknown `Transfer-Encoding`) get hypercorn's 400 (or 431, 501) with a body naming the
trouble; it had none.
"""

from __future__ import annotations

from typing import Any

import h2.events
import h11
from hypercorn.events import Event, RawData
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol

from proxy.dialects import openai
from proxy.domain.errors import ErrorKind, GatewayError


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


class _Connection(h11.Connection):
    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        # hypercorn sends `100 Continue` as soon as it reads such a request's head; the
        # gateway sends it once the request has passed its guard (`send_continue`).
        return False

    @property
    def waiting_for_continue(self) -> bool:
        return bool(h11.Connection.they_are_waiting_for_100_continue.fget(self))  # type: ignore[attr-defined]

    def next_event(self) -> Any:
        # What follows a request after which the connection closes is not parsed: h11 would
        # find "data when expecting EOF", while the response may still be going out.
        if self.their_state is h11.MUST_CLOSE and self.our_state in _ANSWERING:
            return h11.NEED_DATA
        return super().next_event()


_ANSWERING = frozenset({h11.SEND_BODY, h11.DONE, h11.MUST_CLOSE})


class MendedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection = _Connection(h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size)

    async def handle(self, event: Event) -> None:
        if isinstance(event, RawData) and event.data and getattr(self.connection, "their_state", None) is h11.MUST_CLOSE:
            return  # not read: the connection closes once the response is out
        await super().handle(event)

    async def send_continue(self) -> None:
        """`100 Continue`, to a client waiting for it before it sends its body."""
        if isinstance(self.connection, _Connection) and self.connection.waiting_for_continue:
            await self._send_h11_event(h11.InformationalResponse(status_code=100, headers=self.config.response_headers("h11")))

    async def _send_error_response(self, status_code: int) -> None:
        # hypercorn's answer to bytes h11 cannot read as a request had an empty body: the
        # client learnt only "400". In OpenAI's error shape, the default one: the request's
        # path, and so its dialect, may not have been read.
        error = GatewayError(
            ErrorKind.INVALID_REQUEST, _MALFORMED.get(status_code, _MALFORMED[400]), code="malformed_http_request",
        )
        body = openai.render_error(error)
        await self._send_h11_event(h11.Response(status_code=status_code, headers=[
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


_MALFORMED = {
    400: "The request is not valid HTTP/1.1: a malformed request line or header, a Host header missing or "
         "repeated, or Content-Length headers that disagree.",
    431: "The request's headers are too large.",
    501: "The request's Transfer-Encoding is not supported: send the body chunked or with a Content-Length.",
}
