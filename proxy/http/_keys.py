"""API keys over HTTP, for admin keys only (errors in OpenAI's shape).

    POST   /v1/keys         create a key: its record and, this once, the key itself (`key`)
    GET    /v1/keys         list keys with their usage, a page at a time (never the keys themselves)
    GET    /v1/keys/{id}    one key
    PATCH  /v1/keys/{id}    change its name, scopes, limits, budget or expiry
    DELETE /v1/keys/{id}    revoke it (idempotent)

A record is what `llm-proxy keys list --json` prints for the key, plus `"object": "api_key"`.
Every gateway sharing the database applies a change at once (the table's trigger notifies
their key rings); this one reloads before answering, so its next request sees the change.

No key asked (auth off, or `auto` before any key exists) means no admin to recognise: the API
then refuses everything, and the first admin key comes from `llm-proxy keys create --admin`
on the database host. A gateway reached only through a local reverse proxy sees every client
as loopback, so "loopback may bootstrap" would be an open door there. For the same reason the
API refuses (400 `last_admin_key`, naming the key) to revoke, or limit to some models or
workspaces, the last key that can manage keys: that would leave only the CLI able to. An admin
may revoke its own key while another such key remains. (An expiry is always in the future: the
key keeps its power until then.)
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Final

import trio
from quart import Blueprint, Response, request

from proxy.dialects._json import Fields, dumps, loads_object
from proxy.domain.errors import ErrorKind, GatewayError, invalid_request
from proxy.http._context import gateway, request_body
from proxy.http._openapi import _INT, _STR, _op, document
from proxy.infra.keys_store import (
    DEFAULT_BUDGET_PERIOD,
    BudgetState,
    KeysStore,
    KeyUsage,
    LastManager,
    StoredKey,
)
from proxy.infra.postgres import Database, answered_within
from proxy.keys_command import _key_json, _scope_text, escaped
from proxy.services.auth import (
    CONTROL_CHARS,
    MAX_PATTERNS,
    create_key,
    current_principal,
    parse_expiry,
    parse_period,
    update_key,
)

blueprint = Blueprint("keys", __name__)
log = logging.getLogger("llm_proxy.auth")

_JSON: Final = "application/json"
_MAX_INT4: Final = 2**31 - 1
_MAX_INT8: Final = 2**63 - 1
_PATTERN_CHARS: Final = 200
# What a request may set; `admin` only when creating (a key's powers are fixed at birth).
_SETTABLE: Final = ("name", "models", "workspaces", "rpm", "tpm", "budget", "budget_period", "expires", "expires_at")
_CREATE_ONLY: Final = ("admin",)
# How long a call waits for PostgreSQL (stalled, or a key's row locked by another writer): a
# few statements of milliseconds on a healthy server. Then a 503: a write cancelled commits
# nothing, and a change (PATCH, DELETE) sent again is the same change. Once it committed, the
# answer is the record it wrote, its use null when it could not be read in time.
DATABASE_WAIT: Final = 10.0


@blueprint.before_request
async def admins_only() -> None:
    principal = current_principal.get()
    if principal is not None and principal.admin and principal.models is None and principal.workspaces is None:
        return
    if principal is not None:
        _refused(principal.id, principal.prefix, principal.name)
    if principal is not None and principal.admin:
        # It could grant keys models or workspaces it may not use itself (as a key limited to
        # some workspaces may not list or create workspaces).
        message = "Managing API keys needs an admin key not limited to some models or workspaces."
    elif principal is not None:
        message = "Managing API keys needs an admin key (`llm-proxy keys create --admin`)."
    else:
        auth = gateway().auth
        off = auth is None or auth.mode == "off"
        message = (
            "Managing API keys needs an admin key, and this gateway asks for none"
            + (" (`auth = \"off\"`)." if off else " yet: no key exists.")
            + " Create the first admin key on the database host: `llm-proxy keys create --name NAME --admin`."
        )
    raise GatewayError(ErrorKind.PERMISSION, message, code="admin_key_required")


_warned_keys: set[str] = set()  # prefixes: unique, unlike ids across databases


def _refused(key_id: int, prefix: str, name: str) -> None:
    # A key that is not an admin's trying the keys API is worth an operator's look (a stolen
    # key probing, say): said once per key and process, as a caller may loop.
    if len(_warned_keys) < 1024 and prefix not in _warned_keys:
        _warned_keys.add(prefix)
        log.warning("API key %d (%s...) %r refused %s %s: not an admin key allowed to manage keys",
                    key_id, prefix, name, request.method, request.path)


def _database() -> Database:
    db = gateway().resources.database
    if db is None:
        raise GatewayError(ErrorKind.UNAVAILABLE, "API keys are kept in the database, which is not available.",
                           code="database_unavailable", retry_after=5)
    return db


def _reply(body: Any, status: int = 200, **headers: str) -> Response:
    return Response(dumps(body), status=status, content_type=_JSON, headers=headers)


def _record(key: StoredKey, usage: KeyUsage, budget: BudgetState | None) -> dict[str, Any]:
    return {"object": "api_key", **_key_json(key, usage, budget, datetime.now(UTC))}


async def _applied(key: StoredKey, what: str, *, granted: bool = True) -> None:
    """Log who changed the key and, `granted`, what the key may now do (an audit trail an
    operator can search: an admin key made or a scope lifted is there; never the key), and
    reload this process's key ring now (the others are notified by the database)."""
    by = current_principal.get()
    assert by is not None  # the blueprint's guard let only an admin key through
    powers = ": " + escaped(_scope_text(key)) if granted else ""
    log.info("API key %d (%s...) %r %s by key %d (%s...) %r%s",
             key.id, key.prefix, key.name, what, by.id, by.prefix, by.name, powers)
    auth = gateway().auth
    if auth is not None:
        await auth.ring.refresh()


def _not_found(key_id: str) -> GatewayError:
    return GatewayError(ErrorKind.NOT_FOUND, f"No API key with id `{key_id}`.", param="id", code="key_not_found")


def _last_manager(key: StoredKey, doing: str, field: str) -> GatewayError:
    return invalid_request(
        f"API key {key.id} ({key.prefix}...) {escaped(repr(key.name))} is the last admin key not limited to some models"
        f" or workspaces: {doing} would leave no key able to manage keys over this API (only `llm-proxy keys` on the"
        " database host could). Create another admin key first (`POST /v1/keys` with `\"admin\": true`).",
        param=field, code="last_admin_key",
    )


def _key_id(text: str) -> int:
    # ASCII only: `isdigit` is true of `²`, which `int` refuses. Bigint ids: 19 digits name no key.
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise _not_found(text)
    return int(text)


# -- request fields ------------------------------------------------------------------------------


def _patterns(fields: Fields, name: str) -> tuple[str, ...] | None:
    items = fields.array(name)
    if items is None:
        return None
    if not 1 <= len(items) <= MAX_PATTERNS:
        raise invalid_request(
            f"Invalid `{name}`: expected an array of 1 to {MAX_PATTERNS} patterns (null: every one).", param=name
        )
    for i, item in enumerate(items):
        if not isinstance(item, str) or not 1 <= len(item.strip()) <= _PATTERN_CHARS or CONTROL_CHARS.search(item.strip()):
            raise invalid_request(
                f"Invalid `{name}[{i}]`: expected a pattern of 1 to {_PATTERN_CHARS} characters, no control"
                " characters (`*` matches anything).",
                param=f"{name}[{i}]",
            )
    return tuple(item.strip() for item in items)


def _expiry(fields: Fields) -> tuple[bool, datetime | None]:
    """(given, when): `expires` (as the CLI's `--expires`) or `expires_at` (as records show it)."""
    given = [name for name in ("expires", "expires_at") if name in fields.data]
    if len(given) > 1:
        raise invalid_request("Give `expires` or `expires_at`, not both.", param="expires_at")
    if not given:
        return False, None
    name = given[0]
    text = fields.text(name)
    if text is None:
        return True, None
    try:
        when = parse_expiry(text)
    except ValueError as error:
        raise invalid_request(f"Invalid `{name}`: {error}.", param=name) from None
    return True, when


def _changes(data: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    """The request's fields as `update_key` / `create_key` take them: only those given (a
    null clears a scope, a limit or the expiry); a 400 naming the first bad one."""
    allowed = _SETTABLE + _CREATE_ONLY if creating else _SETTABLE
    for field in data:
        if field not in allowed:
            hint = " (a key's admin right is fixed when it is created)" if field in _CREATE_ONLY else ""
            raise invalid_request(
                f"Unknown or read-only field `{field}`{hint}: a request may set {', '.join(f'`{a}`' for a in allowed)}.",
                param=field, code="unknown_parameter",
            )
    fields = Fields(data)
    changes: dict[str, Any] = {}
    if "name" in data or creating:
        name = fields.text("name", required=creating)
        if name is None or not 1 <= len(name.strip()) <= 200 or CONTROL_CHARS.search(name.strip()):
            raise invalid_request("Invalid `name`: expected 1 to 200 characters, no control characters.", param="name")
        changes["name"] = name.strip()
    for scope in ("models", "workspaces"):
        if scope in data:
            changes[scope] = _patterns(fields, scope)
    for limit in ("rpm", "tpm"):
        if limit in data:
            changes[limit] = fields.integer(limit, minimum=1, maximum=_MAX_INT4)
    if "budget" in data:
        changes["budget"] = fields.integer("budget", minimum=1, maximum=_MAX_INT8)
    if data.get("budget_period", "") is None:
        # As a record shows it for a key without a budget: sent back, it means the default.
        changes["budget_period"] = DEFAULT_BUDGET_PERIOD
    elif "budget_period" in data:
        period = fields.text("budget_period", required=True)
        try:
            changes["budget_period"] = parse_period(period or "")
        except ValueError as error:
            raise invalid_request(f"Invalid `budget_period`: {error}.", param="budget_period") from None
    given, when = _expiry(fields)
    if given:
        changes["expires_at"] = when
    if "admin" in data:
        changes["admin"] = bool(fields.boolean("admin"))
    return changes


# -- routes --------------------------------------------------------------------------------------


@blueprint.post("/v1/keys")
async def create() -> Response:
    changes = _changes(loads_object(await request_body()), creating=True)
    db = _database()
    try:
        with answered_within(DATABASE_WAIT):
            key, secret = await create_key(KeysStore(db), **changes)
    except ValueError as error:  # the checks above make this unreachable; the CLI's words if not
        raise invalid_request(str(error)) from None
    # Made: its client must have the key, the one answer that holds it, even if PostgreSQL
    # stalls now (a 503 would leave a key nobody has). A key just made has used nothing.
    record = await _after_change(db, key, "created",
                                 known=(KeyUsage(), BudgetState(0, key.created_at + key.budget_period) if key.budget else None))
    # No cache may keep it.
    return _reply({**record, "key": secret}, 201,
                  **{"cache-control": "no-store", "location": f"/v1/keys/{key.id}"})


_PAGE, _MOST = 20, 100  # as OpenAI's own lists of keys


def _query_int(name: str, default: int | None, most: int) -> int | None:
    value = request.args.get(name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 18 or (name == "limit" and not 1 <= int(value) <= most):
        raise invalid_request(f"Invalid `{name}`: expected " + (
            f"an integer between 1 and {most}." if name == "limit" else "a key's id."), param=name)
    return int(value)


@blueprint.get("/v1/keys")
async def list_keys() -> Response:
    """A page of keys by id (OpenAI's list pagination: `limit`, `after`, `has_more`)."""
    limit = _query_int("limit", _PAGE, _MOST) or _PAGE
    after = _query_int("after", None, 0)
    store = KeysStore(_database())
    with answered_within(DATABASE_WAIT):
        keys = await store.page(after, limit + 1)
        more, keys = len(keys) > limit, keys[:limit]
        ids = [key.id for key in keys]
        usage, budgets = await store.usage(ids), await store.budgets(ids)
    return _reply({
        "object": "list",
        "data": [_record(key, usage.get(key.id, KeyUsage()), budgets.get(key.id)) for key in keys],
        "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None, "has_more": more,
    })


def _found(key: StoredKey | None, key_id: str) -> StoredKey:
    if key is None:
        raise _not_found(key_id)
    return key


# What a record shows of a key's use: null when it could not be read after a change was made.
_USAGE_FIELDS: Final = ("requests", "errors", "prompt_tokens", "completion_tokens", "last_used_at")
_BUDGET_FIELDS: Final = ("budget_used", "budget_reserved", "budget_resets_at")


async def _after_change(
    db: Database, key: StoredKey, what: str | None, *, granted: bool = True,
    known: tuple[KeyUsage, BudgetState | None] | None = None,
) -> dict[str, Any]:
    """The record of `key` as the committed change (`what`; None: nothing changed) wrote it.
    The change is made whatever happens now: PostgreSQL stalling before the key's use is read
    leaves that use null (or as `known` says it is: a key just made) rather than a 503 telling
    the client that a change it made was not."""
    store = KeysStore(db)
    usage: KeyUsage | None = known[0] if known else None
    budget: BudgetState | None = known[1] if known else None
    budget_read = known is not None
    with trio.move_on_after(DATABASE_WAIT) as waited:
        if what is not None:
            await _applied(key, what, granted=granted)
        usage = (await store.usage([key.id])).get(key.id, KeyUsage())
        budget, budget_read = (await store.budgets([key.id])).get(key.id), True
    if waited.cancelled_caught:
        log.warning("API key %d: %s, but its use could not be read within %.0f s (PostgreSQL stalled); answered"
                    " without it", key.id, what or "unchanged", DATABASE_WAIT)
    record = _record(key, usage or KeyUsage(), budget)
    if usage is None:
        record.update(dict.fromkeys(_USAGE_FIELDS))
    if not budget_read and key.budget is not None:
        record.update(dict.fromkeys(_BUDGET_FIELDS))
    return record


async def _record_of(db: Database, key: StoredKey) -> dict[str, Any]:
    store = KeysStore(db)
    return _record(key, (await store.usage([key.id])).get(key.id, KeyUsage()), (await store.budgets([key.id])).get(key.id))


async def _answer(db: Database, key: StoredKey) -> Response:
    return _reply(await _record_of(db, key))


@blueprint.get("/v1/keys/<key_id>")
async def get_key(key_id: str) -> Response:
    db = _database()
    with answered_within(DATABASE_WAIT):
        found = await KeysStore(db).find(str(_key_id(key_id)))  # by id: one key or none
        return await _answer(db, _found(found[0] if found else None, key_id))


@blueprint.patch("/v1/keys/<key_id>")
async def patch_key(key_id: str) -> Response:
    data = loads_object(await request_body())
    changes = _changes(data, creating=False)
    db = _database()
    try:
        with answered_within(DATABASE_WAIT):
            changed = await update_key(KeysStore(db), _key_id(key_id), changes, keep_manager=True)
    except ValueError as error:  # the checks above make this unreachable; the CLI's words if not
        raise invalid_request(str(error)) from None
    except LastManager as last:
        # The scope that took the key's power (an expiry is in the future: it keeps it till then).
        field = next((name for name in ("models", "workspaces") if data.get(name) is not None), "models")
        raise _last_manager(last.key, "limiting it to some models or workspaces", field) from None
    key = _found(changed, key_id)
    return _reply(await _after_change(db, key, "changed (" + ", ".join(changes) + ")" if changes else None))


@blueprint.delete("/v1/keys/<key_id>")
async def revoke_key(key_id: str) -> Response:
    db = _database()
    store, number = KeysStore(db), _key_id(key_id)
    with answered_within(DATABASE_WAIT):
        before = await store.find(str(number))
        try:
            key = _found(await store.revoke(number, keep_manager=True), key_id)
        except LastManager as last:
            raise _last_manager(last.key, "revoking it", "id") from None
    # Idempotent, but the audit trail must not name a later admin as the one who revoked it.
    was = before[0].revoked_at if before else None
    return _reply(await _after_change(
        db, key, "revoked" if was is None else f"revoked again (revoked since {was.isoformat()})", granted=False))


# -- OpenAPI -------------------------------------------------------------------------------------

# ECMA-262, as JSON Schema's patterns are: CONTROL_CHARS refused.
_PRINTABLE = "^[^\\x00-\\x1f\\x7f-\\x9f\\u202a-\\u202e\\u2066-\\u2069]*$"
_NULLABLE_PATTERNS = {"type": ["array", "null"],
                      "items": {"type": "string", "minLength": 1, "maxLength": _PATTERN_CHARS, "pattern": _PRINTABLE},
                      "minItems": 1, "maxItems": MAX_PATTERNS, "description": "Glob patterns (`*` matches anything); null: every one."}
_LIMIT = {"type": ["integer", "null"], "minimum": 1, "maximum": _MAX_INT4}
_EXPIRES = {"type": ["string", "null"],
            "description": "`2026-12-31` (00:00 UTC), an ISO date-time, or `90d` / `12h` / `30m` from now; null: never."}
_SETTABLE_SCHEMA: dict[str, Any] = {
    "name": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": _PRINTABLE},
    "models": _NULLABLE_PATTERNS, "workspaces": _NULLABLE_PATTERNS, "rpm": _LIMIT, "tpm": _LIMIT,
    "budget": {"type": ["integer", "null"], "minimum": 1, "maximum": _MAX_INT8,
               "description": "Tokens (prompt + completion) per `budget_period`; null: unlimited."},
    "budget_period": {"type": ["string", "null"], "pattern": "^\\s*0*[1-9][0-9]*\\s*[mhdwMHDW]\\s*$",
                      "description": "`30m`, `12h`, `1d`, `7d`, `30d` (the default; null: it) or `4w`."},
    "expires": _EXPIRES, "expires_at": _EXPIRES,
}
_NULLABLE_STR = {"type": ["string", "null"]}
_UNREAD_INT = {"type": ["integer", "null"], "description": "Null only in the answer to a change made while PostgreSQL"
               " stalled before the key's use could be read (as are `last_used_at` and the budget's figures)."}
_RECORD: dict[str, Any] = {
    "type": "object",
    "required": ["object", "id", "prefix", "name", "status"],
    "properties": {
        "object": {"const": "api_key"}, "id": _INT, "prefix": _STR, "name": _STR,
        "status": {"enum": ["active", "expired", "revoked"]},
        "models": {"type": ["array", "null"], "items": _STR}, "workspaces": {"type": ["array", "null"], "items": _STR},
        "rpm": {"type": ["integer", "null"]}, "tpm": {"type": ["integer", "null"]}, "admin": {"type": "boolean"},
        "created_at": _STR, "expires_at": _NULLABLE_STR, "revoked_at": _NULLABLE_STR,
        "requests": _UNREAD_INT, "errors": _UNREAD_INT, "prompt_tokens": _UNREAD_INT, "completion_tokens": _UNREAD_INT,
        "last_used_at": _NULLABLE_STR,
        "budget": {"type": ["integer", "null"]}, "budget_period": _NULLABLE_STR,
        "budget_used": {"type": ["integer", "null"], "description": "Tokens used (settled) in the current period."},
        "budget_reserved": {"type": ["integer", "null"],
                            "description": "Tokens held by requests in flight in the current period."},
        "budget_resets_at": _NULLABLE_STR,
    },
}
_ID = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}}
_ADMIN = ("Admin keys not limited to some models or workspaces only: 403 `admin_key_required` otherwise, "
          "and while the gateway asks for no key at all.")


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


_created = _op(
    "Create an API key (admin keys)", "Keys", _ok({}), description=_ADMIN + " The answer holds the key, once.",
    body={"type": "object", "required": ["name"], "additionalProperties": False,
          "properties": {**_SETTABLE_SCHEMA, "admin": {"type": "boolean"}}},
)
_created["responses"] = {
    "201": _ok({**_RECORD, "required": [*_RECORD["required"], "key"],
                "properties": {**_RECORD["properties"], "key": {"type": "string", "description": "The key; never shown again."}}},
               "Created"),
    **{status: answer for status, answer in _created["responses"].items() if status != "200"},
}
document("/v1/keys", "post", _created)
document("/v1/keys", "get", _op(
    "List API keys with their usage (admin keys)", "Keys",
    description=_ADMIN + f" By id, {_PAGE} a page unless `limit` says otherwise; the next page is `after` the"
    " last id while `has_more`.",
    parameters=[
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": _MOST, "default": _PAGE}},
        {"name": "after", "in": "query", "required": False, "schema": {"type": "string", "pattern": "^[0-9]+$"},
         "description": "A key's id: the page starts after it."},
    ],
    ok=_ok({"type": "object", "required": ["object", "data", "first_id", "last_id", "has_more"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _RECORD},
                           "first_id": {"type": ["integer", "null"]}, "last_id": {"type": ["integer", "null"]},
                           "has_more": {"type": "boolean"}}}),
))
document("/v1/keys/{key_id}", "get", _op("An API key (admin keys)", "Keys", _ok(_RECORD), parameters=[_ID], description=_ADMIN))
document("/v1/keys/{key_id}", "patch", _op(
    "Change an API key's name, scopes, limits or expiry (admin keys)", "Keys", _ok(_RECORD), parameters=[_ID],
    description=_ADMIN + " Fields left out are unchanged; null clears a scope, a limit or the expiry.",
    body={"type": "object", "additionalProperties": False, "properties": _SETTABLE_SCHEMA},
))
document("/v1/keys/{key_id}", "delete", _op(
    "Revoke an API key (admin keys; idempotent)", "Keys", _ok(_RECORD), parameters=[_ID],
    description=_ADMIN + " Every gateway refuses the key (401 `revoked_api_key`) from its next request.",
))
