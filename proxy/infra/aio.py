"""The one asyncio loop of a process, bridged into trio (for psycopg and nats-py).

Everything asyncio stays inside `proxy.infra`; the rest of the gateway only opens the bridge.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio_asyncio


@asynccontextmanager
async def asyncio_bridge() -> AsyncIterator[None]:
    """The loop for the block. What the block raises comes out as itself: the loop's nursery
    wraps it in an exception group, which callers' `except DatabaseError` would not match
    (the CLI printed tracebacks instead of its one-line errors)."""
    try:
        async with trio_asyncio.open_loop():
            yield
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]  # one per nursery the loop has
        if error is group or isinstance(error, BaseExceptionGroup):
            raise
        raise error from error.__cause__
