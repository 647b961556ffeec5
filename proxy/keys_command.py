"""`llm-proxy keys create|list|update|revoke`: API keys, managed in the database directly.

A running gateway picks the change up at once (PostgreSQL notifies it), so there is nothing
to restart. `create` prints the key alone on stdout (so `KEY=$(llm-proxy keys create ...)`
works) and what it is on stderr; the key is never shown again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TextIO, TypeVar

import trio

from proxy.infra.aio import asyncio_bridge
from proxy.infra.keys_store import BudgetState, KeysStore, KeyUsage, StoredKey
from proxy.infra.migrations import migrate
from proxy.infra.postgres import DatabaseError, open_database
from proxy.services.auth import (
    _DISPLAY_CHARS,
    CONTROL_CHARS,
    _name,
    _patterns,
    _positive,
    create_key,
    key_digest,
    parse_expiry,
    parse_period,
    period_text,
    update_key,
)

_T = TypeVar("_T")


def add_parser(commands: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    keys = commands.add_parser("keys", help="create, list, update and revoke API keys")
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
    create.add_argument("--budget", type=int, metavar="TOKENS",
                        help="tokens (prompt + completion) the key may use per budget period (default: unlimited)")
    create.add_argument("--budget-period", default="30d", metavar="PERIOD",
                        help="the budget's period, from now: 30m, 12h, 1d, 7d, 30d, 4w (default: 30d)")
    create.add_argument(
        "--admin", action="store_true",
        help="may change workspaces' documents, manage keys over HTTP (/v1/keys, if not limited by --models or "
        "--workspaces) and read /metrics under metrics_admin_only",
    )

    update = actions.add_parser("update", help="change a key's limits, scopes or expiry in place")
    common(update)
    update.add_argument("key", metavar="ID|PREFIX|KEY",
                        help="the key's id, the start of its prefix (at least 6 characters), or the whole key")
    update.add_argument("--name", help="what the key is for")
    update.add_argument("--models", nargs="+", metavar="PATTERN", help="models the key may use; * alone: all")
    update.add_argument("--workspaces", nargs="+", metavar="WS", help="RAG workspaces the key may use; * alone: all")
    update.add_argument("--rpm", type=_limit, metavar="N|none", help="requests per minute (none: unlimited)")
    update.add_argument("--tpm", type=_limit, metavar="N|none", help="tokens per minute (none: unlimited)")
    update.add_argument("--budget", type=_limit, metavar="TOKENS|none",
                        help="tokens per budget period (none: unlimited); the current period's count is kept")
    update.add_argument("--budget-period", metavar="PERIOD",
                        help="the budget's period: 30m, 12h, 1d, 7d, 30d, 4w (a change starts a new period now, carrying its usage)")
    update.add_argument("--expires", metavar="DATE|never",
                        help="2026-12-31, an ISO date-time, 90d / 12h / 30m from now, or never")

    listing = actions.add_parser("list", help="list keys (never the keys themselves) with their usage")
    common(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per key")

    revoke = actions.add_parser("revoke", help="revoke a key by id, prefix or the key itself")
    common(revoke)
    revoke.add_argument("key", metavar="ID|PREFIX|KEY",
                        help="the key's id, the start of its prefix (at least 6 characters), or the whole key")


_NONE = -1  # `none` on the command line: the limit is lifted


def _limit(text: str) -> int:
    if text.strip().lower() in ("none", "unlimited"):
        return _NONE
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or none") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer or none")
    return value


def check_arguments(args: argparse.Namespace, err: TextIO = sys.stderr) -> int:
    """0 if every flag of `keys create|update` holds a value the command takes; else 2, said on
    `err` in one line naming the flag: before a database is started (or adopted) for nothing."""
    try:
        if args.keys_command == "create":
            _create_values(args)
        elif args.keys_command == "update":
            _changes(args)
    except ValueError as error:
        print(f"llm-proxy: {error}", file=err)
        return 2
    return 0


def _flag(flag: str, check: Callable[[], _T]) -> _T:
    """`check()`, its ValueError naming `flag` (the checks are shared with `/v1/keys`, whose
    messages name no flags)."""
    try:
        return check()
    except ValueError as error:
        message = str(error)
        raise ValueError(message if message.startswith(flag) else f"{flag}: {message}") from None


def _create_values(args: argparse.Namespace) -> tuple[datetime | None, timedelta]:
    """`keys create`'s expiry and budget period, after the checks `create_key` makes on the
    other flags. ValueError naming the first flag refused."""
    _flag("--name", lambda: _name(args.name))
    for what in ("rpm", "tpm", "budget"):
        _positive(getattr(args, what), what)
    _flag("--models", lambda: _patterns(args.models, "model"))
    _flag("--workspaces", lambda: _patterns(args.workspaces, "workspace"))
    expires = _flag("--expires", lambda: parse_expiry(args.expires)) if args.expires else None
    return expires, _flag("--budget-period", lambda: parse_period(args.budget_period))


def run(args: argparse.Namespace, database_url: str | None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    if not database_url:
        print("llm-proxy: no database: set DATABASE_URL or enable the embedded one", file=err)
        return 2
    action: Callable[[KeysStore], Awaitable[int]]
    if args.keys_command == "create":
        try:
            expires, period = _create_values(args)
        except ValueError as error:
            print(f"llm-proxy: {error}", file=err)
            return 2

        async def action(store: KeysStore) -> int:
            return await _create(store, args, expires, period, out, err)
    elif args.keys_command == "update":
        try:
            changes = _changes(args)
        except ValueError as error:
            print(f"llm-proxy: {error}", file=err)
            return 2

        async def action(store: KeysStore) -> int:
            return await _update(store, args.key, changes, out, err)
    elif args.keys_command == "list":
        async def action(store: KeysStore) -> int:
            return await _list(store, args.json, out, err)
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


async def _create(
    store: KeysStore, args: argparse.Namespace, expires: datetime | None, period: timedelta, out: TextIO, err: TextIO
) -> int:
    try:
        key, secret = await create_key(
            store, name=args.name, models=args.models, workspaces=args.workspaces,
            rpm=args.rpm, tpm=args.tpm, admin=args.admin, expires_at=expires,
            budget=args.budget, budget_period=period,
        )
    except ValueError as error:
        print(f"llm-proxy: {error}", file=err)
        return 2
    print(secret, file=out)
    print(f"created key {key.id} ({key.prefix}...) {key.name!r}: {_scope_text(key)}", file=err)
    print("store it now: it cannot be shown again", file=err)
    return 0


async def _list(store: KeysStore, as_json: bool, out: TextIO, err: TextIO) -> int:
    keys = await store.find_all()
    usage = await store.usage()
    budgets = await store.budgets()
    now = datetime.now(UTC)
    if as_json:
        for key in keys:
            print(json.dumps(_key_json(key, usage.get(key.id, KeyUsage()), budgets.get(key.id), now)), file=out)
        return 0
    header = (
        "ID", "PREFIX", "NAME", "STATUS", "MODELS", "WORKSPACES", "RPM", "TPM", "BUDGET", "BUDGET USED", "RESERVED", "RESETS",
        "ADMIN", "EXPIRES", "REQUESTS", "TOKENS", "LAST USED",
    )
    rows: list[tuple[str, ...]] = [header]
    for key in keys:
        used = usage.get(key.id, KeyUsage())
        budget = budgets.get(key.id)
        rows.append((
            str(key.id), key.prefix, _cell(key.name), _status(key, now),
            _cell(",".join(key.models)) if key.models is not None else "*",
            _cell(",".join(key.workspaces)) if key.workspaces is not None else "*",
            str(key.rpm or "-"), str(key.tpm or "-"),
            f"{key.budget}/{period_text(key.budget_period)}" if key.budget else "-",
            str(budget.used) if budget else "-", str(budget.reserved) if budget else "-", _when(budget.resets_at if budget else None),
            "yes" if key.admin else "no",
            _when(key.expires_at), str(used.requests), str(used.prompt_tokens + used.completion_tokens),
            _when(used.last_used_at),
        ))
    shown = _fitting(rows, out, err)
    table = [tuple(row[i] for i in shown) for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(shown))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)
    return 0


# Left out first when a terminal is too narrow for the whole table: activity, then limits;
# who a key is, whether it works and what its budget has left stay.
_SPARED_LAST = ("LAST USED", "TOKENS", "REQUESTS", "RESERVED", "TPM", "RPM", "WORKSPACES", "MODELS", "EXPIRES", "ADMIN", "PREFIX")


def _fitting(rows: Sequence[tuple[str, ...]], out: TextIO, err: TextIO) -> list[int]:
    """The columns to print: all of them, unless `out` is a terminal too narrow for them (rows
    wrapped over two or three lines are unreadable); then, said on `err`, fewer."""
    header = rows[0]
    shown = list(range(len(header)))
    if not out.isatty():  # a pipe or a file takes the whole table
        return shown
    columns = shutil.get_terminal_size().columns
    widths = [max(len(row[i]) for row in rows) for i in shown]

    def width() -> int:
        return sum(widths[i] for i in shown) + 2 * (len(shown) - 1)

    left_out = []
    for name in _SPARED_LAST:
        if width() <= columns:
            break
        shown.remove(header.index(name))
        left_out.append(name)
    for name in reversed([*left_out]):  # a narrow one left out before a wide one may fit again
        index = header.index(name)
        if width() + widths[index] + 2 <= columns:
            shown = sorted([*shown, index])
            left_out.remove(name)
    if left_out:
        print(f"llm-proxy: {columns} columns are too few for {', '.join(left_out)}: `keys list --json` shows"
              " every field (or widen the terminal)", file=err)
    return shown


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    """What `keys update` was asked to change, as `KeysStore.update` takes it."""
    changes: dict[str, Any] = {}
    if args.name is not None:
        changes["name"] = _flag("--name", lambda: _name(args.name))
    for column in ("models", "workspaces"):
        patterns = getattr(args, column)
        if patterns is not None:
            everything = [p.strip() for p in patterns] == ["*"]
            _flag(f"--{column}", partial(_patterns, patterns, column.removesuffix("s")))
            changes[column] = None if everything else patterns
    for column in ("rpm", "tpm", "budget"):
        value = getattr(args, column)
        if value is not None:
            changes[column] = None if value == _NONE else value
            _positive(changes[column], column)
    if args.budget_period is not None:
        changes["budget_period"] = _flag("--budget-period", lambda: parse_period(args.budget_period))
    if args.expires is not None:
        never = args.expires.strip().lower() in ("never", "none")
        changes["expires_at"] = None if never else _flag("--expires", lambda: parse_expiry(args.expires))
    if not changes:
        raise ValueError("nothing to change: give --rpm, --tpm, --budget, --budget-period, --models, --workspaces, "
                         "--expires or --name")
    return changes


async def _find_one(store: KeysStore, ref: str, err: TextIO) -> StoredKey | None:
    """The one key `ref` names (id, prefix, or the key itself); None, said on `err`, if none
    or several."""
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
        return None
    if len(matches) > 1:
        ids = ", ".join(f"{k.id} ({k.prefix})" for k in matches)
        print(f"llm-proxy: {_shown(ref)!r} matches several keys: {ids}; use the id", file=err)
        return None
    return matches[0]


async def _revoke(store: KeysStore, ref: str, out: TextIO, err: TextIO) -> int:
    found = await _find_one(store, ref, err)
    if found is None:
        return 1
    key = await store.revoke(found.id)
    assert key is not None
    print(f"revoked key {key.id} ({key.prefix}...) {key.name!r}", file=out)
    return 0


async def _update(store: KeysStore, ref: str, changes: dict[str, Any], out: TextIO, err: TextIO) -> int:
    found = await _find_one(store, ref, err)
    if found is None:
        return 1
    try:
        key = await update_key(store, found.id, changes)
    except ValueError as error:
        print(f"llm-proxy: {error}", file=err)
        return 2
    if key is None:  # deleted meanwhile
        print(f"llm-proxy: key {found.id} no longer exists", file=err)
        return 1
    print(f"updated key {key.id} ({key.prefix}...) {key.name!r}: {_scope_text(key)}", file=out)
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


def escaped(text: str) -> str:
    """`text` with its control characters written as escapes (`\\n`, `\\x1b`): for a terminal or a log."""
    return CONTROL_CHARS.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), text)


_CELL_CHARS = 32  # the table stays readable with 200-character names: `--json` has them whole


def _cell(text: str) -> str:
    """A name or patterns as a table cell: on one line, control characters shown escaped (keys
    made before they were refused, or by SQL), cut short past `_CELL_CHARS`."""
    text = escaped(text)
    return text if len(text) <= _CELL_CHARS else text[: _CELL_CHARS - 3] + "..."


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
    if key.budget:
        parts.append(f"budget {key.budget} tokens/{period_text(key.budget_period)}")
    if key.admin:
        parts.append("admin")
    if key.expires_at:
        parts.append("expires " + key.expires_at.astimezone(UTC).isoformat())
    return "; ".join(parts)


def _key_json(key: StoredKey, used: KeyUsage, budget: BudgetState | None, now: datetime) -> dict[str, Any]:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "name": key.name,
        "status": _status(key, now),
        "models": list(key.models) if key.models is not None else None,
        "workspaces": list(key.workspaces) if key.workspaces is not None else None,
        "rpm": key.rpm,
        "tpm": key.tpm,
        "budget": key.budget,
        "budget_period": period_text(key.budget_period) if key.budget else None,
        "budget_used": budget.used if budget else None,
        "budget_reserved": budget.reserved if budget else None,
        "budget_resets_at": budget.resets_at.isoformat() if budget else None,
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
