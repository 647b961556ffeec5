"""A client connection's end, told to its requests the moment it is read.

hypercorn tells an app that its client left with an `http.disconnect` message, which the
request reads on its task's next turn. When a hundred clients leave at once, those turns
come behind much of the others' teardown (each cancelled request unwinding, journalling
its outcome), and every backend goes on generating until its request's turn comes. So the
server (`proxy.serve`) gives each connection a `ClientConnection`, visible to the tasks
serving its requests, and calls `ended()` from the connection's reader as soon as it reads
end-of-file: the hooks a request registered with `on_client_gone` run there, synchronously,
before anything unwinds. The `http.disconnect` still comes, and still counts: a server
without this hook (or a connection without a `ClientConnection`) loses only the head start.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import trio

from proxy.infra.transport import Hangup, current_hangup

Hook = Callable[[], None]


def body_received() -> bool:
    """`ClientConnection.receiving_body` of a connection that cannot tell (or has ended)."""
    return False


async def nothing_to_ask() -> None:
    """`ClientConnection.want_body` of a connection that has nothing to say for it."""


class ClientConnection:
    """The hooks the requests of one client connection run when it ends; and whether the
    server is still receiving its current request's body (`receiving_body`)."""

    __slots__ = ("_hooks", "gone", "receiving_body", "want_body")

    def __init__(
        self, receiving_body: Callable[[], bool] = body_received, want_body: Callable[[], Awaitable[None]] = nothing_to_ask,
    ) -> None:
        self._hooks: list[Hook] = []
        self.gone = False
        self.receiving_body = receiving_body
        self.want_body = want_body

    def ended(self) -> None:
        """The client closed (or broke) the connection: run every hook, once."""
        if self.gone:
            return
        self.gone = True
        hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()


# Set by the task that reads the connection; the tasks it starts to serve requests inherit it.
current_connection: ContextVar[ClientConnection | None] = ContextVar("current_connection", default=None)


def receiving_body() -> bool:
    """Whether the server has yet to receive the rest of the current request's body (its
    HTTP/1.1 connection then closes once the response is out)."""
    connection = current_connection.get()
    return connection is not None and connection.receiving_body()


async def want_body() -> None:
    """The request has passed the guard and its body is wanted: a client that asked
    (`Expect: 100-continue`) is told to send it."""
    connection = current_connection.get()
    if connection is not None:
        await connection.want_body()


@contextmanager
def on_client_gone(hook: Hook) -> Iterator[None]:
    """Run `hook` if the client's connection ends inside the block (at once if it has)."""
    connection = current_connection.get()
    if connection is None:
        yield
        return
    if connection.gone:
        hook()
        yield
        return
    hooks = connection._hooks
    hooks.append(hook)
    try:
        yield
    finally:
        # HTTP/1.1 serves one request at a time per connection: the list holds one or two.
        if hook in hooks:
            hooks.remove(hook)


@contextmanager
def until_client_gone() -> Iterator[trio.CancelScope]:
    """Run the block until the client's connection ends: then the backend connections it holds
    (made in this task) close at once and the block is cancelled (`cancelled_caught`). For
    the work a request does before its response has a body of its own to watch the client
    (a token count's backend call, a model's load, a chat's lookups before its exchange)."""
    hangup = Hangup()

    def gone() -> None:
        hangup.fire()
        scope.cancel()

    token = current_hangup.set(hangup)
    try:
        with trio.CancelScope() as scope, on_client_gone(gone):
            yield scope
    finally:
        current_hangup.reset(token)
