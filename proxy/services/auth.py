"""API keys: who is calling, and what they may see.

Keys look like `sk-llmp-` + 43 URL-safe characters (256 random bits). The database holds
only their sha256 digest and a short non-secret prefix; the key itself is shown once, when
it is created.

Every gateway process keeps the whole key table in memory (`KeyRing`): checking a key is a
digest and a dict look-up, with no database round trip, and a gateway whose database goes
away keeps accepting the keys it knew. The copy is reloaded when PostgreSQL notifies a change
(a trigger on `api_keys`, so a revocation takes effect within milliseconds whoever made it)
and, should that notification be lost, by a poll every few seconds.

Scopes are enforced in two choke points every route goes through: `ScopedRouter.resolve`
(any model a request names) and the HTTP guard (`proxy.http._auth`: workspaces); the fields
relayed to a backend that may name other models for it (`fallbacks`, …) are checked where each
route hands them on (`check_body_models`: the chat exchange, the relay, embeddings). The caller's
key travels in `current_principal`, a context variable the HTTP guard sets per request;
code running outside a request (pipelines, the CLI) has none and is not restricted.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import trio

from proxy.domain.errors import ErrorKind, GatewayError
from proxy.domain.model_fields import MODEL_FIELDS, named_models
from proxy.domain.routing import Route, Router
from proxy.domain.truncation import Window
from proxy.infra.backends import ModelInfo
from proxy.infra.keys_store import DEFAULT_BUDGET_PERIOD, KeysStore, StoredKey, key_changes
from proxy.infra.postgres import ConstraintViolation, DatabaseError
from proxy.infra.resources import Resources
from proxy.services.models import ModelCatalog

log = logging.getLogger("llm_proxy.auth")

KEY_PREFIX = "sk-llmp-"
# The prefix plus eight random characters: shown in listings, never enough to use the key.
_DISPLAY_CHARS = len(KEY_PREFIX) + 8
_MAX_KEY_CHARS = 256
# The longest a request with a key not known here waits for the database to be asked again.
_CATCH_UP_SECONDS = 1.0
# The least time between two of those reloads: a client guessing keys as fast as it can costs
# the database a few reads a second, not one read after another.
_CATCH_UP_EVERY = 0.25
# Control characters and bidirectional overrides: in a name or pattern they would rewrite the
# operator's terminal (`keys list`) or disguise one name as another; no name needs them.
# Patterns per scope: every gateway compiles a key's patterns into one regex, on the event loop,
# at each reload of its key ring (a thousand take milliseconds; 300,000 took seconds).
MAX_PATTERNS = 1000
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")



# -- keys -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewKey:
    secret: str
    prefix: str
    digest: bytes


def key_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def new_key() -> NewKey:
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    return NewKey(secret, secret[:_DISPLAY_CHARS], key_digest(secret))


def glob_pattern(patterns: Iterable[str]) -> re.Pattern[str]:
    """One regex for a list of globs in which only `*` is special (any run of characters)."""
    parts = [".*".join(re.escape(piece) for piece in p.split("*")) for p in patterns]
    return re.compile("|".join(f"(?:{part})" for part in parts) or "(?!)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified key: who it is and what it may do. `models`/`workspaces` None: any."""

    id: int
    name: str
    prefix: str
    models: tuple[str, ...] | None = None
    workspaces: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    admin: bool = False
    expires_at: float | None = None
    revoked: bool = False
    budget: int | None = None  # tokens per `budget_period` (seconds)
    budget_period: float = DEFAULT_BUDGET_PERIOD.total_seconds()
    _models_re: re.Pattern[str] | None = field(default=None, repr=False, compare=False)
    _workspaces_re: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, key: StoredKey) -> Principal:
        models, workspaces = _scope(key.models), _scope(key.workspaces)
        return cls(
            id=key.id,
            name=key.name,
            prefix=key.prefix,
            models=models,
            workspaces=workspaces,
            rpm=key.rpm,
            tpm=key.tpm,
            admin=key.admin,
            expires_at=key.expires_at.timestamp() if key.expires_at else None,
            revoked=key.revoked_at is not None,
            budget=key.budget,
            budget_period=key.budget_period.total_seconds(),
            _models_re=glob_pattern(models) if models is not None else None,
            _workspaces_re=glob_pattern(workspaces) if workspaces is not None else None,
        )

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.budget is not None

    def may_use_model(self, model: str) -> bool:
        """The name as the client sent it (an alias is checked as the alias). As in Ollama's
        naming, `x` and `x:latest` are one model: a scope naming either allows both (a key
        scoped to `llama3.2:latest`, as /api/tags lists it, may use `llama3.2`)."""
        pattern = self._models_re
        if pattern is None:
            return True
        return any(pattern.fullmatch(name) is not None for name in _latest_twins(model))

    def may_use_workspace(self, workspace: str) -> bool:
        pattern = self._workspaces_re
        return pattern is None or pattern.fullmatch(workspace) is not None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def _scope(patterns: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """None for patterns that match everything: a `*` scope is none (it may list workspaces
    and, on an admin key, manage keys), however it was stored."""
    return None if patterns is None or "*" in patterns else patterns


def _latest_twins(model: str) -> tuple[str, ...]:
    """`model` and its other spelling: without `:latest`, or with it when untagged (the
    tag follows the last `/`: a registry host may have a port)."""
    if model.endswith(":latest"):
        return (model, model.removesuffix(":latest"))
    if ":" not in model.rpartition("/")[2]:
        return (model, model + ":latest")
    return (model,)


# The calling key of the current request (None: no key, or auth off).
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "llm_proxy_principal", default=None
)


def check_model(model: str) -> None:
    """403 unless the current request's key may use `model`. Routes that serve a model
    without asking the router (e.g. an in-process model) call this themselves."""
    principal = current_principal.get()
    if principal is not None and not principal.may_use_model(model):
        raise GatewayError(
            ErrorKind.PERMISSION,
            f"This API key may not use the model `{model}`.",
            param="model",
            code="model_not_allowed",
        )


def model_scoped() -> bool:
    """Whether the current request's key is limited to some models."""
    principal = current_principal.get()
    return principal is not None and principal.models is not None


def check_body_models(body: Mapping[str, Any]) -> None:
    """403 unless every model `body`'s fields name besides `model` (`models`, `fallbacks`, …:
    `domain.model_fields`), which a backend would answer with, is in the key's scope. A key
    without a model scope pays one context-variable read; a body without such fields, one set
    operation more."""
    principal = current_principal.get()
    if principal is None or principal.models is None or MODEL_FIELDS.isdisjoint(body):
        return
    for param, model in named_models(body):
        if model is None:
            raise GatewayError(
                ErrorKind.PERMISSION,
                f"This API key is limited to some models, and `{param}` would let the backend choose "
                "others: leave it out.",
                param=param, code="model_not_allowed",
            )
        if not principal.may_use_model(model):
            raise GatewayError(
                ErrorKind.PERMISSION,
                f"This API key may not use the model `{model}` (named in `{param}`).",
                param=param, code="model_not_allowed",
            )


def check_workspace(workspace: str, *, manage: bool = False, param: str | None = "x-workspace") -> None:
    """403 unless the current request's key may use `workspace` (and, with `manage`, change
    its contents: admin keys only); `param` is where the request named it (None: its path)."""
    principal = current_principal.get()
    if principal is None:
        return
    if not principal.may_use_workspace(workspace):
        raise GatewayError(
            ErrorKind.PERMISSION,
            f"This API key may not use the workspace `{workspace}`.",
            param=param,
            code="workspace_not_allowed",
        )
    if manage and not principal.admin:
        raise GatewayError(
            ErrorKind.PERMISSION,
            "Changing a workspace's documents needs an admin key (`llm-proxy keys create --admin`).",
            code="admin_key_required",
        )


# -- scope choke points -----------------------------------------------------------------------


class ScopedRouter(Router):
    """The router every request resolves its model with: the key's model scope is checked
    first, against the name the client used (so an unknown model is a 403 too, and the
    answer says nothing about which models exist)."""

    def resolve(self, model: str) -> Route:
        check_model(model)
        return super().resolve(model)


class ScopedCatalog(ModelCatalog):
    """Model listings (`/v1/models`, `/api/tags`, `/api/show`) show a key only its models.
    Wraps whichever catalogue the gateway builds."""

    def __init__(self, inner: ModelCatalog) -> None:  # the inner catalogue holds the state
        self._inner = inner

    @property
    def unavailable(self) -> tuple[str, ...]:
        # A key limited to some models is not told the names of backends beyond them.
        principal = current_principal.get()
        return self._inner.unavailable if principal is None or principal.models is None else ()

    @property
    def listed(self) -> bool:
        return self._inner.listed

    @property
    def expired(self) -> bool:
        return self._inner.expired

    def window(self, backend: str, model: str) -> Window | None:
        return self._inner.window(backend, model)

    async def models(self) -> list[ModelInfo]:
        models = await self._inner.models()
        principal = current_principal.get()
        if principal is None or principal.models is None:
            return models
        return [m for m in models if principal.may_use_model(m.id)]


# -- the key ring -----------------------------------------------------------------------------


class KeyRing:
    """Every key of the database, in memory; see the module docstring."""

    def __init__(self, resources: Resources, *, poll_seconds: float = 5.0) -> None:
        self._resources = resources
        self._poll = poll_seconds
        self._by_digest: dict[bytes, tuple[bytes, Principal]] = {}
        self._by_id: dict[int, Principal] = {}
        self._fingerprint: tuple[int, int] | None = None
        self._wake = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._unavailable_logged = False
        self.loaded = False
        # Sticky: once any key was ever created (revoked ones count), auth stays on in
        # "auto" mode, so revoking the last key never opens the gateway.
        self.any_keys = False
        # Reloads asked for by requests with a key not known here (`catch_up`): how many were
        # started, begun reading and finished (one at a time), the one in flight, and when the
        # next may begin.
        self._catch_ups_started = 0
        self._catch_ups_begun = 0
        self._catch_ups_done = 0
        self._next_catch_up = -math.inf
        self._catching: trio.Event | None = None
        # One reload at a time: an older snapshot installed after a newer one would undo it.
        self._reloading = trio.Lock()
        # Budgeted keys' periods as last loaded with the keys (key -> tokens counted, used and
        # held, and the period's end, epoch seconds): where a process that has not admitted a
        # key yet starts counting it if the database goes down.
        self.budgets: dict[int, tuple[int, float]] = {}

    def lookup(self, secret: str) -> Principal | None:
        digest = key_digest(secret)
        entry = self._by_digest.get(digest)
        if entry is None:
            return None
        # The dict found it by the digest's hash; compare the whole digest in constant time.
        stored, principal = entry
        return principal if hmac.compare_digest(stored, digest) else None

    def by_id(self, key_id: int) -> Principal | None:
        return self._by_id.get(key_id)

    def keys(self) -> list[Principal]:
        return list(self._by_id.values())

    def changed(self) -> None:
        """Reload now (e.g. after this process changed a key)."""
        self._wake.set()

    async def catch_up(self) -> None:
        """Reload now if the table changed, with a reload begun after this call: a key created
        (on another instance) a moment ago, whose notice has not come yet, is then known.
        Callers share the reload in flight, so unknown keys, however many, ask the database
        one query at a time, `_CATCH_UP_EVERY` apart; it is given up after `_CATCH_UP_SECONDS`."""
        wanted = self._catch_ups_begun + 1
        with trio.move_on_after(_CATCH_UP_SECONDS):
            while self._catch_ups_done < wanted:
                if self._catching is not None:
                    await self._catching.wait()
                    continue
                self._catch_ups_started += 1
                number, self._catching = self._catch_ups_started, trio.Event()
                try:
                    # Callers that come meanwhile are served by this one: it begins after them.
                    await trio.sleep_until(self._next_catch_up)
                    self._catch_ups_begun = number
                    self._next_catch_up = trio.current_time() + _CATCH_UP_EVERY
                    await self.refresh()
                finally:
                    if self._catch_ups_begun == number:  # given up before it began: it served nobody
                        self._catch_ups_done = number
                    done, self._catching = self._catching, None
                    done.set()

    async def refresh(self) -> bool:
        """Reload if the table changed; False if the database could not be asked."""
        db = self._resources.database
        if db is None:
            return False
        store = KeysStore(db)
        async with self._reloading:
            return await self._reload(store)

    async def _reload(self, store: KeysStore) -> bool:
        try:
            with trio.fail_after(10):
                if self._fingerprint is not None and await store.fingerprint() == self._fingerprint:
                    return True
                fingerprint, keys = await store.all_keys()
                budgets = await store.budgets() if any(key.budget is not None for key in keys) else {}
        except (DatabaseError, trio.TooSlowError) as error:
            if not self._unavailable_logged:
                log.warning("cannot load API keys (%s); keeping the %d known", error, len(self._by_id))
                self._unavailable_logged = True
            return False
        self._unavailable_logged = False
        self._install(fingerprint, keys)
        self.budgets = {key: (state.used + state.reserved, state.resets_at.timestamp()) for key, state in budgets.items()}
        return True

    def _install(self, fingerprint: tuple[int, int], keys: list[StoredKey]) -> None:
        principals = {key.id: Principal.of(key) for key in keys}
        self._by_digest = {key.digest: (key.digest, principals[key.id]) for key in keys}
        self._by_id = principals
        self._fingerprint = fingerprint
        self.any_keys = self.any_keys or bool(keys)
        if not self.loaded:
            log.info("API keys loaded: %d", len(keys))
        self.loaded = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load now, then keep the copy fresh until `stop()`."""
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen)
                nursery.start_soon(self._follow_database)
                await self.refresh()
                task_status.started()
                while True:
                    with trio.move_on_after(self._poll):
                        await self._wake.wait()
                    self._wake = trio.Event()
                    await self.refresh()

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def _follow_database(self) -> None:
        while True:
            await self._resources.database_changed.wait()
            self._wake.set()

    async def _listen(self) -> None:
        url = self._resources.database_url
        if url is None:
            return
        delay = 0.5
        while True:
            try:
                async with key_changes(url) as changes:
                    delay = 0.5
                    self._wake.set()  # whatever changed while we were not listening
                    while True:
                        if await changes.wait(30.0):
                            self._wake.set()
            except DatabaseError as error:
                log.debug("key change listener: %s; retrying in %.1fs", error, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 10.0)


# -- authentication ---------------------------------------------------------------------------


def _unauthorized(message: str, code: str) -> GatewayError:
    return GatewayError(ErrorKind.AUTHENTICATION, message, code=code)


class Authenticator:
    """Decides, per request, whether a key is needed and whose it is.

    `mode`: "off" never asks; "required" always does; "auto" does once any key exists
    (and, with no database configured, never). While the keys cannot be known (the
    database has been down since start-up) a request that needs a key gets a 503."""

    def __init__(self, mode: str, ring: KeyRing, *, has_database: bool) -> None:
        self.mode = mode
        self.ring = ring
        self._has_database = has_database

    def enabled(self) -> bool | None:
        """Whether requests need a key; None while that cannot be known yet."""
        if self.mode == "off":
            return False
        if self.mode == "required":
            return True
        if not self._has_database:
            return False
        return True if self.ring.any_keys else (False if self.ring.loaded else None)

    def authenticate(self, credentials: Sequence[str]) -> Principal | None:
        """The caller's key among `credentials` (the values of `Authorization: Bearer` and
        `x-api-key`); None when no key is needed. GatewayError 401 (or 503) otherwise."""
        enabled = self.enabled()
        if enabled is False:
            return None
        if not self.ring.loaded:
            if not self._has_database:
                raise _unauthorized(
                    "API keys are required, but this gateway has no database to keep them in.",
                    "invalid_api_key",
                )
            raise GatewayError(
                ErrorKind.UNAVAILABLE,
                "API keys cannot be verified: the database has been unreachable since start-up.",
                code="auth_unavailable",
                retry_after=5,
            )
        if not credentials:
            raise _unauthorized(
                "Missing API key: send it as `Authorization: Bearer KEY` or `x-api-key: KEY`.",
                "missing_api_key",
            )
        now = time.time()
        refusal: GatewayError | None = None
        for secret in credentials:
            principal = self.ring.lookup(secret) if len(secret) <= _MAX_KEY_CHARS else None
            if principal is None:
                continue
            if principal.revoked:
                refusal = _unauthorized("This API key has been revoked.", "revoked_api_key")
            elif principal.expired(now):
                refusal = _unauthorized("This API key has expired.", "expired_api_key")
            else:
                return principal
        raise refusal or _unauthorized("Invalid API key.", "invalid_api_key")


    async def authenticate_fresh(self, credentials: Sequence[str]) -> Principal | None:
        """`authenticate`, asking the database once more before refusing a key not known here:
        with several instances, a client given a new key by one (`POST /v1/keys`) may use it
        on another before that one's notice of it came (a 401 `invalid_api_key` until then)."""
        try:
            return self.authenticate(credentials)
        except GatewayError as error:
            # Only a key this gateway could have made (never a client's placeholder, `unused`).
            ours = any(secret.startswith(KEY_PREFIX) for secret in credentials)
            if error.code != "invalid_api_key" or not ours or not self.ring.loaded or not self._has_database:
                raise
        await self.ring.catch_up()
        return self.authenticate(credentials)

    def authenticate_id(self, key_id: int | None) -> Principal | None:
        """The key of a request the gateway sends on its behalf (a batch's line), as it is now:
        a key revoked or expired since is refused as its own requests would be."""
        if self.enabled() is False:
            return None
        principal = self.ring.by_id(key_id) if key_id is not None else None
        if principal is None:
            raise _unauthorized(
                "The API key this batch was created with no longer exists (or, created while no key was "
                "asked, the gateway now asks for one).", "invalid_api_key",
            )
        if principal.revoked:
            raise _unauthorized("This API key has been revoked.", "revoked_api_key")
        if principal.expired(time.time()):
            raise _unauthorized("This API key has expired.", "expired_api_key")
        return principal


# -- management (the CLI) ---------------------------------------------------------------------


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """`2026-12-31` (that day, 00:00 UTC), an ISO date-time (UTC unless it says otherwise), or
    a duration from now: `90d`, `12h`, `30m`. ValueError if unreadable or not in the future."""
    now = now or datetime.now(UTC)
    value = text.strip()
    match = re.fullmatch(r"(\d+)\s*([dhm])", value)
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        try:
            when = now + {"d": timedelta(days=amount), "h": timedelta(hours=amount), "m": timedelta(minutes=amount)}[unit]
        except OverflowError:
            raise ValueError(f"{text!r} is too far in the future") from None
    else:
        try:
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                day = date.fromisoformat(value)
                when = datetime(day.year, day.month, day.day, tzinfo=UTC)
            else:
                when = datetime.fromisoformat(value.replace("Z", "+00:00"))
                if when.tzinfo is None:
                    when = when.replace(tzinfo=UTC)
        except ValueError:
            raise ValueError(
                f"cannot read {text!r} as a date: use 2026-12-31, 2026-12-31T18:00:00Z or 90d / 12h / 30m"
            ) from None
    if when <= now:
        raise ValueError(f"{text!r} is not in the future")
    try:
        # Stored as is, a date past year 9999 in UTC could not be read back into Python: every
        # gateway's key ring would fail to load.
        too_far = when.astimezone(UTC).year >= _LAST_YEAR
    except OverflowError:
        too_far = True
    if too_far:
        raise ValueError(f"{text!r} is too far in the future")
    return when


def _patterns(values: Sequence[str] | None, what: str) -> tuple[str, ...] | None:
    if values is None:
        return None
    cleaned = tuple(v.strip() for v in values)
    if len(cleaned) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} {what} patterns")
    if not cleaned or any(not v or len(v) > 200 or CONTROL_CHARS.search(v) for v in cleaned):
        raise ValueError(f"each {what} pattern must be 1 to 200 characters, none of them a control character")
    return _scope(cleaned)  # stored as no scope: `keys list` and records say so


_LAST_YEAR = 9999
_PERIOD_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_LONGEST_PERIOD = 3660 * 86400  # ten years: a budget is for a month or a year, not for ever


def parse_period(text: str) -> timedelta:
    """A budget period: `30m`, `12h`, `30d`, `4w` (at least a minute). ValueError otherwise."""
    match = re.fullmatch(r"(\d+)\s*([mhdw])", text.strip().lower())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"cannot read {text!r} as a period: use 30m, 12h, 30d or 4w")
    seconds = int(match.group(1)) * _PERIOD_UNITS[match.group(2)]
    if seconds > _LONGEST_PERIOD:
        raise ValueError(f"{text!r} is longer than ten years")
    return timedelta(seconds=seconds)


def period_text(period: timedelta | float) -> str:
    """A period as `parse_period` reads it, in its largest whole unit (`30d`, `90m`)."""
    seconds = round(period.total_seconds() if isinstance(period, timedelta) else period)
    for unit in ("d", "h", "m"):  # 7d, not 1w: as budgets are usually spoken of
        size = _PERIOD_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# As the columns hold them: rpm and tpm are integers, a budget a bigint.
_LARGEST = {"rpm": 2**31 - 1, "tpm": 2**31 - 1, "budget": 2**63 - 1}


def _positive(value: int | None, what: str) -> None:
    if value is not None and not 0 < value <= _LARGEST[what]:
        raise ValueError(f"--{what} must be a positive integer up to {_LARGEST[what]:,}")


async def create_key(
    store: KeysStore,
    *,
    name: str,
    models: Sequence[str] | None = None,
    workspaces: Sequence[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    admin: bool = False,
    expires_at: datetime | None = None,
    budget: int | None = None,
    budget_period: timedelta = DEFAULT_BUDGET_PERIOD,
) -> tuple[StoredKey, str]:
    """Create a key; returns its row and the key itself (the only time it is known)."""
    name = _name(name)
    for limit, what in ((rpm, "rpm"), (tpm, "tpm"), (budget, "budget")):
        _positive(limit, what)
    model_patterns = _patterns(models, "model")
    workspace_patterns = _patterns(workspaces, "workspace")
    for _ in range(3):
        fresh = new_key()
        try:
            stored = await store.create(
                name=name, prefix=fresh.prefix, digest=fresh.digest, models=model_patterns,
                workspaces=workspace_patterns, rpm=rpm, tpm=tpm, admin=admin, expires_at=expires_at,
                budget=budget, budget_period=budget_period,
            )
        except ConstraintViolation:
            continue  # a prefix collision (1 in 2^48): draw again
        return stored, fresh.secret
    raise RuntimeError("could not draw a unique key prefix")


def _name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 200 or CONTROL_CHARS.search(name):
        raise ValueError("the name must be 1 to 200 characters, none of them a control character")
    return name


async def update_key(
    store: KeysStore, key_id: int, changes: Mapping[str, Any], *, keep_manager: bool = False
) -> StoredKey | None:
    """Change key `key_id` in place (the columns `KeysStore.update` takes; None clears a
    limit, scope or expiry), after the checks `create_key` makes. None: no such key.
    `keep_manager`: see `KeysStore.update`."""
    checked = dict(changes)
    for what in ("rpm", "tpm", "budget"):
        _positive(checked.get(what), what)
    if "name" in checked:
        checked["name"] = _name(checked["name"])
    for column in ("models", "workspaces"):
        if column in checked:
            checked[column] = _patterns(checked[column], column.removesuffix("s"))
    return await store.update(key_id, checked, keep_manager=keep_manager)
