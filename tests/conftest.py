"""Session-wide test set-up."""

from __future__ import annotations

import anthropic._base_client
import openai._base_client

pytest_plugins = ["tests.session_tmp", "tests.infra_servers"]


def _no_asyncio_cleanup(self: object) -> None:
    """The SDKs' async clients, when garbage-collected unclosed, schedule their `aclose()`
    as a task on `asyncio.get_running_loop()`. Under trio-asyncio (which the gateway's
    PostgreSQL and NATS clients need) that loop is trio's, so the task runs trio code as
    asyncio and fails the test that happens to be running. Tests close their clients;
    garbage collection must not do it for them on the wrong event loop."""


openai._base_client.AsyncHttpxClientWrapper.__del__ = _no_asyncio_cleanup  # type: ignore[method-assign,assignment]
anthropic._base_client.AsyncHttpxClientWrapper.__del__ = _no_asyncio_cleanup  # type: ignore[method-assign,assignment]
