"""The one asyncio loop of a process, bridged into trio (for psycopg and nats-py).

Everything asyncio stays inside `proxy.infra`; the rest of the gateway only opens the bridge.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio_asyncio


@asynccontextmanager
async def asyncio_bridge() -> AsyncIterator[None]:
    async with trio_asyncio.open_loop():
        yield
