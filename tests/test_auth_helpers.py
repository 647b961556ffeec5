"""Shared pieces of the auth and security tests (no tests here): keys made through the real
CLI, a gateway on the session's PostgreSQL and NATS, and small polling helpers."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import trio

from proxy.cli import build_parser
from proxy.config import BackendConfig
from proxy.keys_command import run as run_keys
from tests.fakes import OpenAIBackend, Script, Usage
from tests.harness import backend, running_gateway

MESSAGES = [{"role": "user", "content": "Say hello"}]


def keys_cli(db: str, *argv: str) -> tuple[int, str, str]:
    """`llm-proxy keys ARGV` against `db`: (exit code, stdout, stderr)."""
    args = build_parser().parse_args(["keys", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = run_keys(args, db, out, err)
    return code, out.getvalue(), err.getvalue()


async def new_key(db: str, name: str = "test", *options: str) -> str:
    """Create a key with the CLI (in a thread: it runs its own event loop); the secret."""
    code, out, err = await trio.to_thread.run_sync(lambda: keys_cli(db, "create", "--name", name, *options))
    assert code == 0, err
    return out.strip()


def rows(db: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(db, autocommit=True) as conn:
        cursor = conn.execute(sql, params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description is not None else []


async def sql(db: str, statement: str, *params: object) -> list[tuple[Any, ...]]:
    return await trio.to_thread.run_sync(lambda: rows(db, statement, *params))


async def eventually(check: Callable[[], Any], within: float = 5.0, every: float = 0.05) -> Any:
    """Poll an async `check` until it returns something truthy."""
    with trio.fail_after(within):
        while True:
            result = await check()
            if result:
                return result
            await trio.sleep(every)


@asynccontextmanager
async def gateway(db: str, nats: str, *backends: BackendConfig, **settings: Any) -> AsyncIterator[str]:
    async with running_gateway(*backends, database_url=db, nats_url=nats, **settings) as url:
        yield url


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def wait_for_key(url: str, key: str, within: float = 15.0) -> None:
    """Until the gateway knows the key (before that, with no key at all, auth is still off).
    Told of the change, a gateway reloads at once; when it missed the notice, its key ring's
    5 s poll finds it."""

    async def known() -> bool:
        async with httpx.AsyncClient(base_url=url) as client:
            anonymous = await client.get("/v1/models")
            keyed = await client.get("/v1/models", headers=bearer(key))
            return anonymous.status_code == 401 and keyed.status_code == 200

    await eventually(known, within=within)


@dataclass
class Stack:
    """A gateway on the session's PostgreSQL and NATS in front of one fake OpenAI backend."""

    url: str
    db: str
    nats: str
    fake: OpenAIBackend
    server_url: str


@asynccontextmanager
async def keyed_stack(db: str, nats: str, usage: Usage, *, pace: float = 0.0) -> AsyncIterator[Stack]:
    """`Stack` whose backend answers "Hello" with `usage` (the keys' token counts follow it),
    `pace` seconds per chunk."""
    fake = OpenAIBackend(default=Script(tokens=["Hello"], usage=usage, pace=pace))
    async with fake.serve() as server, gateway(db, nats, backend("vllm", server.url, default=True)) as url:
        yield Stack(url, db, nats, fake, server.url)
