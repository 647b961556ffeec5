"""`llm-proxy keys create|list|revoke`: API keys, managed in the database directly.

A running gateway picks the change up at once (PostgreSQL notifies it), so there is nothing
to restart. `create` prints the key alone on stdout (so `KEY=$(llm-proxy keys create ...)`
works) and what it is on stderr; the key is never shown again.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import trio

from proxy.infra.aio import asyncio_bridge
from proxy.infra.keys_store import KeysStore, KeyUsage, StoredKey
from proxy.infra.migrations import migrate
from proxy.infra.postgres import DatabaseError, open_database
from proxy.services.auth import _DISPLAY_CHARS, create_key, key_digest, parse_expiry


def add_parser(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    create = actions.add_parser("create", help="create a key and print it (once)")
    common(create)
    create.add_argument("--name", required=True, help="what the key is for (shown in listings and logs)")
    create.add_argument("--models", nargs="+", metavar="PATTERN",
                        help="models the key may use, by the name clients send; * matches anything (default: all)")
    create.add_argument("--workspaces", nargs="+", metavar="WS",
                        help="RAG workspaces the key may use; * matches anything (default: all)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens (prompt + completion) per minute")
    create.add_argument("--expires", metavar="DATE",
                        help="when the key stops working: 2026-12-31 (00:00 UTC), an ISO date-time, or 90d / 12h / 30m")
    create.add_argument("--admin", action="store_true", help="may change workspaces' documents")

    listing = actions.add_parser("list", help="list keys (never the keys themselves) with their usage")
    common(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per key")

    revoke = actions.add_parser("revoke", help="revoke a key by id, prefix or the key itself")
    common(revoke)
    revoke.add_argument("key", metavar="ID|PREFIX|KEY",
                        help="the key's id, the start of its prefix (at least 6 characters), or the whole key")


def run(args: argparse.Namespace, database_url: str | None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    if not database_url:
        print("llm-proxy: no database: set DATABASE_URL or enable the embedded one", file=err)
        return 2
    action: Callable[[KeysStore], Awaitable[int]]
    if args.keys_command == "create":
        try:
            expires = parse_expiry(args.expires) if args.expires else None
        except ValueError as error:
            print(f"llm-proxy: --expires: {error}", file=err)
            return 2

        async def action(store: KeysStore) -> int:
            return await _create(store, args, expires, out, err)
    elif args.keys_command == "list":
        async def action(store: KeysStore) -> int:
            return await _list(store, args.json, out)
    else:
        async def action(store: KeysStore) -> int:
            return await _revoke(store, args.key, out, err)

    async def main() -> int:
        async with asyncio_bridge(), open_database(database_url, max_size=2) as db:
            await migrate(db)
            return await action(KeysStore(db))

    try:
        return trio.run(main)
    except DatabaseError as error:
        print(f"llm-proxy: database error: {error}", file=err)
        return 1


async def _create(store: KeysStore, args: argparse.Namespace, expires: datetime | None, out: TextIO, err: TextIO) -> int:
    try:
        key, secret = await create_key(
            store, name=args.name, models=args.models, workspaces=args.workspaces,
            rpm=args.rpm, tpm=args.tpm, admin=args.admin, expires_at=expires,
        )
    except ValueError as error:
        print(f"llm-proxy: {error}", file=err)
        return 2
    print(secret, file=out)
    print(f"created key {key.id} ({key.prefix}...) {key.name!r}: {_scope_text(key)}", file=err)
    print("store it now: it cannot be shown again", file=err)
    return 0


async def _list(store: KeysStore, as_json: bool, out: TextIO) -> int:
    keys = await store.find_all()
    usage = await store.usage()
    now = datetime.now(UTC)
    if as_json:
        for key in keys:
            print(json.dumps(_key_json(key, usage.get(key.id, KeyUsage()), now)), file=out)
        return 0
    header = ("ID", "PREFIX", "NAME", "STATUS", "MODELS", "WORKSPACES", "RPM", "TPM", "ADMIN", "EXPIRES", "REQUESTS", "TOKENS", "LAST USED")
    rows = [header]
    for key in keys:
        used = usage.get(key.id, KeyUsage())
        rows.append((
            str(key.id), key.prefix, key.name, _status(key, now),
            ",".join(key.models) if key.models is not None else "*",
            ",".join(key.workspaces) if key.workspaces is not None else "*",
            str(key.rpm or "-"), str(key.tpm or "-"), "yes" if key.admin else "no",
            _when(key.expires_at), str(used.requests), str(used.prompt_tokens + used.completion_tokens),
            _when(used.last_used_at),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)
    return 0


async def _revoke(store: KeysStore, ref: str, out: TextIO, err: TextIO) -> int:
    ref = ref.strip()
    if len(ref) > _DISPLAY_CHARS:
        # Longer than any prefix: the key itself (a leaked one, say), found by its digest.
        found = await store.find_by_digest(key_digest(ref))
        matches = [found] if found is not None else []
    else:
        matches = await store.find(ref)
    if not matches:
        print(
            f"llm-proxy: no key with id, prefix or value {_shown(ref)!r} (a prefix needs at least 6 characters)",
            file=err,
        )
        return 1
    if len(matches) > 1:
        ids = ", ".join(f"{k.id} ({k.prefix})" for k in matches)
        print(f"llm-proxy: {_shown(ref)!r} matches several keys: {ids}; use the id", file=err)
        return 1
    key = await store.revoke(matches[0].id)
    assert key is not None
    print(f"revoked key {key.id} ({key.prefix}...) {key.name!r}", file=out)
    return 0


def _shown(ref: str) -> str:
    """A reference as messages may show it: no more of a key than listings show."""
    return ref if len(ref) <= _DISPLAY_CHARS else ref[:_DISPLAY_CHARS] + "..."


def _status(key: StoredKey, now: datetime) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if value else "-"


def _scope_text(key: StoredKey) -> str:
    parts = [
        "models " + (", ".join(key.models) if key.models is not None else "*"),
        "workspaces " + (", ".join(key.workspaces) if key.workspaces is not None else "*"),
    ]
    if key.rpm:
        parts.append(f"{key.rpm} requests/min")
    if key.tpm:
        parts.append(f"{key.tpm} tokens/min")
    if key.admin:
        parts.append("admin")
    if key.expires_at:
        parts.append("expires " + key.expires_at.astimezone(UTC).isoformat())
    return "; ".join(parts)


def _key_json(key: StoredKey, used: KeyUsage, now: datetime) -> dict[str, Any]:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "name": key.name,
        "status": _status(key, now),
        "models": list(key.models) if key.models is not None else None,
        "workspaces": list(key.workspaces) if key.workspaces is not None else None,
        "rpm": key.rpm,
        "tpm": key.tpm,
        "admin": key.admin,
        "created_at": key.created_at.isoformat(),
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
        "requests": used.requests,
        "errors": used.errors,
        "prompt_tokens": used.prompt_tokens,
        "completion_tokens": used.completion_tokens,
        "last_used_at": used.last_used_at.isoformat() if used.last_used_at else None,
    }
