"""The one asyncio loop of a process, bridged into trio (for psycopg and nats-py).

Everything asyncio stays inside `proxy.infra`; the rest of the gateway only opens the bridge.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, NoReturn, TypeVar

import outcome
import trio
import trio_asyncio

_T = TypeVar("_T")

# A cancelled asyncio task may take long to end: psycopg, its query cancelled, asks the server
# to cancel it and waits for that (5 s), then for the query to end (5 s more). A stalled
# server (SIGSTOP, a partition) gives neither, and a stop waited for every such query. Cancelled
# a second time, psycopg closes the connection at once: a task still running this long after
# its cancellation is cancelled again (a healthy server confirms within milliseconds).
CANCEL_GRACE = 1.0
# The loop closing: how its tasks end matters no more, only that they do.
_CLOSING_GRACE = 0.1


async def aio_call(fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
    """`await fn(*args)` in the asyncio loop, from a trio task (as `aio_as_trio(fn)(*args)`);
    cancelling the trio scope cancels it, and again after `CANCEL_GRACE`."""
    loop = trio_asyncio.current_loop.get()
    task: asyncio.Task[_T] = loop.create_task(_called(fn, args))
    return await _ended(task, loop)


async def _called(fn: Callable[..., Awaitable[_T]], args: tuple[Any, ...]) -> _T:
    return await fn(*args)  # made inside the task: what `fn` does when called sees asyncio


async def _ended(task: asyncio.Future[_T], loop: asyncio.AbstractEventLoop) -> _T:
    """`task`'s result, once it has ended (trio_asyncio's `run_aio_future`, but a cancelled
    task is cancelled again after `CANCEL_GRACE`)."""
    waiter = trio.lowlevel.current_task()
    raise_cancel: Callable[[], NoReturn] | None = None

    def done(_: object) -> None:
        trio.lowlevel.reschedule(waiter, outcome.capture(task.result))

    def abort(cancelling: Callable[[], NoReturn]) -> trio.lowlevel.Abort:
        nonlocal raise_cancel
        raise_cancel = cancelling
        _cancel(task, loop, CANCEL_GRACE)
        return trio.lowlevel.Abort.FAILED  # trio waits for `done`

    task.add_done_callback(done)
    try:
        result: _T = await trio.lowlevel.wait_task_rescheduled(abort)
    except asyncio.CancelledError:
        if raise_cancel is None:  # not by us: the task's own
            raise
        raise_cancel()
    return result


def _cancel(task: asyncio.Future[Any], loop: asyncio.AbstractEventLoop, grace: float) -> None:
    task.cancel()
    loop.call_later(grace, task.cancel)  # a no-op once it has ended


@asynccontextmanager
async def asyncio_bridge() -> AsyncIterator[None]:
    """The loop for the block. What the block raises comes out as itself: the loop's nursery
    wraps it in an exception group, which callers' `except DatabaseError` would not match
    (the CLI printed tracebacks instead of its one-line errors)."""
    try:
        async with trio_asyncio.open_loop() as loop:
            try:
                yield
            finally:
                with trio.CancelScope(shield=True):
                    await _end_tasks(loop)
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]  # one per nursery the loop has
        if error is group or isinstance(error, BaseExceptionGroup):
            raise
        raise error from error.__cause__


async def _end_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the asyncio tasks still running (a pool's connection being set up on a stalled
    server), as closing the loop would, but without waiting for a stalled server."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        _cancel(task, loop, _CLOSING_GRACE)
    for task in tasks:
        with suppress(Exception, asyncio.CancelledError):  # how they end matters no more
            await _ended(task, loop)
