"""Running a real gateway inside a test's trio loop, on a loopback port."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import trio

from proxy.config import BackendConfig, Settings, Timeouts
from proxy.serve import serve
from tests.fakes import FakeBackend, OllamaBackend

# Held for the whole session: see `refusing_port`.
_REFUSING: list[socket.socket] = []


def refusing_port() -> int:
    """A loopback port that refuses every connection for the rest of the session: bound and
    never listening. (A port found free and let go may be taken by the next server bound,
    another xdist worker's too, which then answers for the "down" backend.)"""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _REFUSING.append(sock)
    return int(sock.getsockname()[1])


def backend(name: str, url: str, *, kind: str = "openai", default: bool = False,
            prefixes: tuple[str, ...] = (), timeouts: Timeouts | None = None, **extra: Any) -> BackendConfig:
    """A backend entry for `url` (the fake's base URL; `/v1` is added for OpenAI kinds)."""
    base_url = url.rstrip("/") + ("/v1" if kind == "openai" else "")
    return BackendConfig(
        name=name, kind=kind, base_url=base_url, default=default, prefixes=prefixes,
        timeouts=timeouts or Timeouts(connect=2.0, first_token=10.0, idle=10.0, total=60.0), **extra,
    )


@asynccontextmanager
async def running_gateway(
    *backends: BackendConfig, aliases: Mapping[str, str] | None = None, **settings_fields: Any
) -> AsyncIterator[str]:
    """Serve a gateway for `backends` on 127.0.0.1 (a free port); yields its base URL."""
    fields: dict[str, Any] = {"access_log": False, **settings_fields}
    settings = replace(
        Settings(), backends=tuple(backends), aliases=dict(aliases or {}), host="127.0.0.1", port=0, **fields
    )
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(settings, shutdown_trigger=stop.wait, task_status=task_status))
        try:
            yield binds[0]
        finally:
            stop.set()


async def hang_up_once_received(fake: FakeBackend, request: Callable[[], Awaitable[object]], within: float = 10.0) -> None:
    """Run a client's `request` and leave as soon as `fake` has the backend call it causes.
    (A fixed client timeout can end before a loaded gateway has called the backend at all.)"""
    seen = fake.recorder.requests_total
    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await fake.wait_requests(seen + 1, within)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def relay_gateway(fake: FakeBackend, aliases: Mapping[str, str]) -> AsyncIterator[tuple[str, OllamaBackend]]:
    """The relayed APIs' topology: `fake` the default (OpenAI-compatible) backend, an Ollama
    one for `llama*` models and an unreachable Anthropic one for `claude*` (neither serves
    those APIs). Yields the gateway's URL and the Ollama fake."""
    ollama = OllamaBackend()
    async with (
        fake.serve() as server,
        ollama.serve() as ollama_server,
        running_gateway(
            backend("vllm", server.url, default=True),
            backend("ollama", ollama_server.url, kind="ollama", prefixes=("llama",)),
            backend("claude", "http://127.0.0.1:9", kind="anthropic", prefixes=("claude",)),
            aliases=aliases,
        ) as url,
    ):
        yield url, ollama
