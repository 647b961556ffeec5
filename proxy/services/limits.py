"""Per-key rate limits (requests and tokens per minute), token budgets and per-key usage.

Each limit is a bucket refilled continuously over a minute (GCRA, as OpenAI's own limits
behave): a key with `rpm = 10` may send 10 requests at once, then one every 6 s. The state
lives in PostgreSQL, so every process and host sharing the database counts together: a
request is admitted by one atomic call (`api_key_admit`, one round trip, made only for keys
that have a limit, which also settles what this process holds for the key: admissions given
back after a 403 or made alone in an outage, tokens of ended exchanges). A key's admissions
that arrive while its call runs go together in its next call (`KeysStore.admit_many`), one
after the other, each with its own answer: a burst costs one round trip and one connection
of the pool, not one per request. As OpenAI's limits
do, an admission reserves the request's estimated tokens (its prompt's estimate and its max
output tokens, at most the key's `tpm`) in the token bucket, and is refused if they do not
fit: concurrent requests cannot overspend the bucket they all saw not yet empty. A request
that asks for more than the whole bucket (its prompt and the max output tokens it names) is
refused at once, without a call, and told not to retry: it could never fit. When the
exchange ends, its real usage is charged and its reservation given back (`record`, batched,
or settled by the key's next admission). A reservation never settled (its process was
killed) is a charge like any other: it refills with the bucket, within a minute. The answer
carries OpenAI's `x-ratelimit-*` headers; a refusal is a 429 with `Retry-After`.

A key's budget (tokens per period, `keys create --budget`) is counted beside its buckets. An
admission is refused while the period's count has reached the budget (OpenAI's 429
`insufficient_quota`, not to be retried before the period ends); admitted, a request reserves
its estimated tokens in the count as in the token bucket, or what is left of the budget if that
is less, so that concurrent requests cannot all spend the budget they saw not yet spent: only
the one that took its last tokens may pass it (a request admitted finishes, whatever it uses).
When the exchange ends, its usage (prompt + completion, as recorded) is counted and its
reservation given back, by the usage writer or the key's next admission. Periods are fixed
windows from the budget's start, rolled by whichever call comes first after one ends. Usage
and reservations are counted apart (migration 0014): a key refused while only reservations fill its
budget is told to retry in a moment (429 `rate_limit_exceeded`), not that it is spent; usage
carries the time it was made, and is not charged to a period that began after it. Budget
reservations are held in the name of this process (its instance id, also its usage writer's
name: migration 0017), so that the sweep of a killed process gives its reservations back, and a
stopping one gives back what no record did (`_release_holds`).

If the database cannot answer, the limits are enforced per process from an in-memory copy
of the same buckets (kept in step with the database's answers), so an outage loosens them
to "per process" instead of lifting them; what a process admitted alone is charged to the
shared buckets once the database answers again. A request waits for the database at most
`_ADMIT_TIMEOUT` (3 s), whatever the database does: the call runs as a task of the limiter (a
cancelled psycopg query can take ten seconds more to give up on a stalled server), and while
one call is overdue, requests do not start another: they are admitted locally at once, until
that call returns (the database answers again) or gives up.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import outcome
import trio

from proxy.domain.errors import ErrorKind, Exhausted, GatewayError
from proxy.infra.keys_store import Admission, KeysStore, UsageDelta
from proxy.infra.postgres import Database, DatabaseError, DatabaseUnavailable
from proxy.infra.resources import Resources
from proxy.infra.spool import Spool, UsageBatch, open_spool
from proxy.services._records import NOTHING_RESERVED, Reserved
from proxy.services.auth import KeyRing, Principal, period_text
from proxy.services.chat import ExchangeRecord

log = logging.getLogger("llm_proxy.limits")

WINDOW = 60.0
_EPSILON = 1e-6
_ADMIT_TIMEOUT = 3.0
# How long an overdue admission call may wait for a stalled database before it is cancelled
# and the next request tries again (the database answering ends it sooner).
_CALL_TIMEOUT = 30.0
_FLUSH_TIMEOUT = 10.0
_LINGER_SECONDS = 0.02
_RETRY_SECONDS = 2.0
# How often a usage writer folds old hours of usage into days (`KeysStore.roll_up_usage`), and
# how many rows at a time (a first fold of years of hours takes many, a pause between each).
_ROLLUP_EVERY = 3600.0
_ROLLUP_ROWS = 5000
# When a budget held by requests in flight is retried: most exchanges end within seconds.
_HELD_RETRY = 2.0
# How long an admission refused for reservations (a budget held by requests in flight, a token
# bucket without room for this request's) waits to ask once more: they may be those of requests
# already answered by another gateway process (a worker, a replica), whose usage writer gives
# them back a few milliseconds later (it lingers `_LINGER_SECONDS`). A client sending its
# requests one after the other, each once the previous one was answered, was refused for what
# nothing held any more (told to wait up to a minute, for a token bucket).
_RECHECK = 0.15


def duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `6s`, `1.5s`, `1m30s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    rest_text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    headers: list[tuple[str, str]]
    retry_after: float | None = None
    # "requests", "tokens", "budget" (spent), "held" (the budget's rest is held by requests in
    # flight), or "too_large": more than the whole bucket
    exhausted: str | None = None
    reserved: int = 0  # tokens the request reserved (or asked to) in the token bucket
    budget_reserved: int = 0  # tokens it reserved in its budget period's count
    budget_from: float | None = None  # the start of that period (the database's; None: local)
    budget_used: int = 0  # tokens the key's budget period has counted as used
    budget_reset: float | None = None  # when that period ends (epoch seconds)
    budget_held: int = 0  # tokens its requests in flight hold
    used: int = 0  # refused for a bucket: what the bucket counts as taken in the last minute

    def error(self, principal: Principal, model: str | None = None) -> GatewayError:
        """The refusal, in OpenAI's words (with the key for its organization): clients and
        retry helpers read the wait from "Please try again in 3.89s"."""
        if self.exhausted == "budget":
            return budget_spent(principal, self.budget_used, self.budget_reset, self.retry_after or 0)
        if self.exhausted == "held":
            return budget_held(principal, self.budget_used, self.budget_held)
        subject = f"{model} with this API key" if model else "this API key"
        if self.exhausted == "too_large":
            # No Retry-After: waiting does not help.
            return GatewayError(
                ErrorKind.RATE_LIMITED,
                f"Request too large for {subject} on tokens per min (TPM): Limit {principal.tpm}, "
                f"Requested {self.reserved}. The input or output tokens must be reduced in order to run "
                "successfully.",
                code="rate_limit_exceeded",
                hopeless=True,
                exhausted=Exhausted.TOKENS,
            )
        if self.exhausted == "tokens":
            limit, exhausted, requested = f"tokens per min (TPM): Limit {principal.tpm}", Exhausted.TOKENS, self.reserved
        else:
            limit, exhausted, requested = f"requests per min (RPM): Limit {principal.rpm}", Exhausted.REQUESTS, 1
        return GatewayError(
            ErrorKind.RATE_LIMITED,
            f"Rate limit reached for {subject} on {limit}, Used {self.used}, Requested {requested}. "
            f"Please try again in {duration(self.retry_after or 0)}.",
            code="rate_limit_exceeded",
            retry_after=math.ceil(self.retry_after or 1),
            exhausted=exhausted,
        )


def _span(seconds: float) -> str:
    """A wait of days as people read it: `29d23h59m`, `5h2m`, `40s`."""
    if seconds < 60:
        return f"{max(0, math.ceil(seconds))}s"
    minutes = math.ceil(seconds / 60)
    days, rest = divmod(minutes, 1440)
    hours, minutes = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n) or "0m"


def budget_spent(principal: Principal, used: int, reset: float | None, wait: float) -> GatewayError:
    """OpenAI's answer to an exhausted quota (429 `insufficient_quota`), which its SDKs would
    retry as a rate limit unless told not to: waiting seconds does not help, the period's end
    does (`Retry-After`)."""
    when = datetime.fromtimestamp(reset, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if reset is not None else "the period's end"
    return GatewayError(
        ErrorKind.RATE_LIMITED,
        f"You exceeded your current quota: this API key's budget of {principal.budget} tokens per "
        f"{period_text(principal.budget_period)} is spent ({used} used). It resets at {when} "
        f"(in {_span(wait)}).",
        code="insufficient_quota",
        retry_after=math.ceil(max(wait, 1)),
        hopeless=True,
    )


def budget_held(principal: Principal, used: int, held: int) -> GatewayError:
    """The budget is not spent, but requests in flight hold its rest until they end (seconds,
    usually): a rate limit to retry shortly, not a spent quota (OpenAI's SDKs retry it)."""
    return GatewayError(
        ErrorKind.RATE_LIMITED,
        f"Rate limit reached for this API key's budget of {principal.budget} tokens per "
        f"{period_text(principal.budget_period)}: {used} used, {held} held by requests in flight until "
        f"they end. Please try again in {_HELD_RETRY:g}s.",
        code="rate_limit_exceeded",
        retry_after=_HELD_RETRY,
        exhausted=Exhausted.TOKENS,
    )


# Refusals for reservations, which requests ending give back.
_RESERVED = frozenset({"held", "tokens"})


def _held(principal: Principal, state: Admission) -> bool:
    """Whether the admission was refused for a budget that is not spent but held by requests
    in flight."""
    return (
        not state.allowed and principal.budget is not None
        and state.budget_used < principal.budget <= state.budget_used + state.budget_held
    )


def reservation(principal: Principal, tokens: int) -> int:
    """What a request estimated at `tokens` reserves: never more than the whole bucket, so
    that a request given the default max output tokens fits a full one."""
    if principal.tpm is None:
        return 0
    return max(0, min(tokens, principal.tpm))


def decide(principal: Principal, state: Admission, reserved: int = 0) -> Decision:
    """The answer and its headers for a key's buckets after an admission attempt that
    reserved (or, refused, asked for) `reserved` tokens."""
    now, headers = state.now, []
    if not state.allowed and principal.budget is not None and state.budget_used >= principal.budget:
        # Refused for its budget, before any bucket was asked: their headers would say "go on".
        wait = max(0.0, (state.budget_reset or now) - now)
        return Decision(
            False, [], retry_after=wait, exhausted="budget",
            budget_used=state.budget_used, budget_reset=state.budget_reset,
        )
    if _held(principal, state):
        return Decision(
            False, [], retry_after=_HELD_RETRY, exhausted="held",
            budget_used=state.budget_used, budget_reset=state.budget_reset, budget_held=state.budget_held,
        )
    retry = 0.0
    exhausted: str | None = None
    used = 0
    if principal.rpm is not None:
        rpm = principal.rpm
        interval = WINDOW / rpm
        ahead = max(0.0, state.requests_at - now)
        headers += [
            ("x-ratelimit-limit-requests", str(rpm)),
            ("x-ratelimit-remaining-requests", str(max(0, min(rpm, math.floor((WINDOW - ahead) / interval + _EPSILON))))),
            ("x-ratelimit-reset-requests", duration(ahead)),
        ]
        if not state.allowed and ahead + interval > WINDOW + _EPSILON:
            retry, exhausted = ahead + interval - WINDOW, "requests"
            used = math.ceil(ahead / interval - _EPSILON)
    if principal.tpm is not None:
        tpm = principal.tpm
        ahead = max(0.0, state.tokens_at - now)
        headers += [
            ("x-ratelimit-limit-tokens", str(tpm)),
            ("x-ratelimit-remaining-tokens", str(max(0, math.floor(tpm * (WINDOW - ahead) / WINDOW)))),
            ("x-ratelimit-reset-tokens", duration(ahead)),
        ]
        if not state.allowed:
            needed = ahead + reserved * WINDOW / tpm  # refused: the state is without the reservation
            if (needed > WINDOW + _EPSILON if reserved else ahead >= WINDOW) and needed - WINDOW >= retry:
                retry, exhausted = needed - WINDOW, "tokens"
                used = math.ceil(tpm * ahead / WINDOW - _EPSILON)
    if state.allowed:
        return Decision(
            True, headers, reserved=reserved, budget_reserved=state.budget_reserved, budget_from=state.budget_start
        )
    return Decision(
        False, headers, retry_after=max(retry, 0.001), reserved=reserved, used=used,
        exhausted=exhausted or ("requests" if principal.rpm is not None else "tokens"),
    )


class _LocalBuckets:
    """The same buckets in process memory, on this process's clock: the fallback."""

    def __init__(self, ring: KeyRing | None = None) -> None:
        self._ring = ring
        self._state: dict[int, list[float]] = {}
        # Budgets: key -> [tokens counted in the period (used and held), its end, its length]
        # (a key not yet seen in the database's answers starts from its period as loaded with
        # the keys, or, if none was, a period of its own: an outage must not lock it out; a
        # changed length starts a new period now, as `keys update` does).
        self._budgets: dict[int, list[float]] = {}

    def sync(self, key_id: int, state: Admission) -> None:
        offset = time.time() - state.now
        self._state[key_id] = [state.requests_at + offset, state.tokens_at + offset]
        if state.budget_reset is not None:
            length = state.budget_reset - state.budget_start if state.budget_start is not None else 0.0
            self._budgets[key_id] = [float(state.budget_used + state.budget_held), state.budget_reset + offset, length]

    def _budget(self, principal: Principal, now: float) -> list[float]:
        budget = self._budgets.get(principal.id)
        if budget is None:
            # Never admitted here: from its period as loaded with the keys, if it was.
            loaded = self._ring.budgets.get(principal.id) if self._ring is not None else None
            counted, end = loaded or (0, now + principal.budget_period)
            budget = self._budgets[principal.id] = [float(counted), end, principal.budget_period]
        if abs(budget[2] - principal.budget_period) > 0.5:
            budget[1], budget[2] = now + principal.budget_period, principal.budget_period
        if now >= budget[1]:
            periods = math.floor((now - budget[1]) / principal.budget_period) + 1
            budget[0], budget[1] = 0.0, budget[1] + periods * principal.budget_period
        return budget

    def peek(self, principal: Principal) -> Admission:
        """The key's buckets now, nothing taken."""
        now = time.time()
        requests_at, tokens_at = (max(t, now) for t in self._state.get(principal.id, [now, now]))
        return Admission(True, now, requests_at, tokens_at)

    def admit(self, principal: Principal, reserve: int, budget_reserve: int) -> Admission:
        """As `api_key_admit` does (see its migrations, 0012 and 0014)."""
        now = time.time()
        requests_at, tokens_at = (max(t, now) for t in self._state.get(principal.id, [now, now]))
        allowed, reserved_at = True, tokens_at
        used, reset, budget = 0, None, None
        if principal.budget is not None:
            budget = self._budget(principal, now)
            used, reset = int(budget[0]), budget[1]
            allowed = used < principal.budget
        if principal.tpm is not None:
            if reserve > 0:
                reserved_at = tokens_at + reserve * WINDOW / principal.tpm
                allowed = allowed and reserved_at - now <= WINDOW + _EPSILON
            else:
                allowed = allowed and tokens_at - now < WINDOW
        if principal.rpm is not None:
            later = requests_at + WINDOW / principal.rpm
            if later - now > WINDOW + _EPSILON:
                allowed = False
            elif allowed:
                requests_at = later
        held = 0
        if allowed:
            tokens_at = reserved_at
            if budget is not None and principal.budget is not None:
                held = max(0, min(budget_reserve, principal.budget - used))
                budget[0] += held
                used += held
        self._state[principal.id] = [requests_at, tokens_at]
        return Admission(allowed, now, requests_at, tokens_at, used, reset, held)

    def count(self, principal: Principal, tokens: int) -> None:
        """Count tokens in the key's budget period (negative: a reservation's unused rest)."""
        if principal.budget is not None and tokens:
            budget = self._budget(principal, time.time())
            budget[0] = max(0.0, budget[0] + tokens)

    def give_back(self, principal: Principal) -> None:
        if principal.rpm is None:
            return
        state = self._state.get(principal.id)
        if state is not None:
            state[0] -= WINDOW / principal.rpm

    def spend(self, principal: Principal, tokens: int) -> None:
        """Charge `tokens` to the token bucket (negative: a reservation's unused rest back)."""
        if principal.tpm is None or tokens == 0:
            return
        now = time.time()
        state = self._state.setdefault(principal.id, [now, now])
        if tokens > 0:
            state[1] = max(state[1], now) + tokens * WINDOW / principal.tpm
        else:
            state[1] += tokens * WINDOW / principal.tpm


class _Call:
    """One request's admission in the database and its outcome, handed from the limiter's task
    to the request waiting for it."""

    __slots__ = ("abandoned", "budget_reserve", "done", "forsaken", "principal", "reserve", "result")

    def __init__(self, principal: Principal, reserve: int, budget_reserve: int) -> None:
        self.principal, self.reserve, self.budget_reserve = principal, reserve, budget_reserve
        self.done = trio.Event()
        self.result: outcome.Outcome[Admission] | None = None
        self.abandoned = False  # its request stopped waiting and was answered locally
        self.forsaken = False  # its request was cancelled while waiting (its client left)


class RateLimiter:
    """Admits requests of limited keys and records every key's usage (see the module
    docstring). `record` is a `RecordSink`: compose it into the chat service's sink."""

    def __init__(
        self, resources: Resources, ring: KeyRing, *, spool: Path | None = None, owner: str | None = None,
        register: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._resources = resources
        self._ring = ring
        self._local = _LocalBuckets(ring)
        self._pending: dict[int, UsageDelta] = {}
        # Usage cut into numbered batches, oldest first, until the database confirms them
        # (see `KeysStore.record_usage`); kept in the spool file (`spool`: its directory)
        # while it cannot, so a stop or a crash during an outage loses none. The writer is
        # `owner`, the gateway instance that heartbeats (`Persistence.instance_id`): budget
        # reservations are held in its name, so that the sweep of a dead instance gives them
        # back, and its batches (replayed from its spool, too) give back only what it holds.
        self._writer = owner or secrets.token_hex(8)
        # Writes the owner's `gateway_instances` row, awaited before its first budget hold: a
        # process killed before its first heartbeat would have held its reservations with no
        # row for a sweep to find (until the period's end). None: nothing (more) to wait for.
        self._register = register
        self._seq = 0
        self._batches: list[UsageBatch] = []
        self._spool = Spool(spool, self._writer) if spool is not None else None
        self._failing = False  # the last write failed: spool before writing, not after
        # Writers that will number no more batches (processes gone, whose spools this one
        # took; this one, stopping): each one's row of `api_key_usage_writes` is needed only
        # while a batch of it that may have been applied can be sent again, so it is deleted
        # once none is held here or in the spool file.
        self._retired: set[str] = set()
        self._next_rollup = -math.inf  # at the first write
        # The batch the usage writer is writing, and the event that says it is written.
        self._flushing: dict[int, UsageDelta] = {}
        self._flushed = trio.Event()
        self._kick = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()
        self._degraded = False
        # Admission calls run here, not in the requests' tasks (see `_shared_admission`).
        self._calls: trio.Nursery | None = None
        self._overdue = 0  # calls whose request stopped waiting and that have not returned
        # Keys with a database call running: the admissions of the key that arrive meanwhile,
        # which go together in its next call (one round trip for all of them).
        self._queued: dict[int, list[_Call]] = {}

    async def admit(self, principal: Principal, tokens: int = 0, least: int = 0) -> Decision:
        """Take one request from the key's request bucket and reserve the request's estimated
        `tokens` in its token bucket (if it has limits). An admitted request's record must
        carry `Decision.reserved` (or `settle` be called), so that its reservation is settled.
        A request that asks for `least` tokens, more than the whole bucket, takes nothing and
        is refused."""
        if principal.tpm is not None and least > principal.tpm:
            # Nothing taken, so nothing asked of the database: the buckets' headers, as every
            # other limit answer has them, are as this process last saw them.
            headers = decide(principal, self._local.peek(principal)).headers
            return Decision(False, headers, exhausted="too_large", reserved=least)
        reserve = reservation(principal, tokens)
        budget_reserve = tokens if principal.budget is not None else 0
        state = await self._shared_admission(principal, reserve, budget_reserve)
        if state is not None and not state.allowed and decide(principal, state, reserve).exhausted in _RESERVED:
            # A refused admission takes nothing (but this process's settlements): asked again.
            await trio.sleep(_RECHECK)
            state = await self._shared_admission(principal, reserve, budget_reserve) or state
        if state is None:
            state = self._local.admit(principal, reserve, budget_reserve)
            if state.allowed and (principal.rpm is not None or reserve):
                # Counted by this process only: the shared buckets are charged once they answer
                # again, so keys do not exceed their limit across processes after an outage. (A
                # budget reservation stays local: the request's usage is counted when it ends.)
                pending = self._pending.setdefault(principal.id, UsageDelta())
                pending.admissions += principal.rpm is not None
                pending.tokens += reserve
                self._kick.set()
        else:
            self._local.sync(principal.id, state)
        return decide(principal, state, reserve)

    async def _shared_admission(self, principal: Principal, reserve: int, budget_reserve: int) -> Admission | None:
        """The database's answer, or None when it has none within `_ADMIT_TIMEOUT`."""
        db = self._resources.database
        calls = self._calls
        if db is None or calls is None:
            self._degrade("the database is not connected")
            return None
        if self._overdue:
            return None  # a call already waits on the database: another would only hang too
        call = _Call(principal, reserve, budget_reserve)
        queued = self._queued.get(principal.id)
        if queued is not None:
            queued.append(call)  # in the key's next call, once the one running returns
        else:
            self._queued[principal.id] = []
            calls.start_soon(self._calls_of, db, principal.id, [call])
        try:
            with trio.move_on_after(_ADMIT_TIMEOUT):
                await call.done.wait()
        except trio.Cancelled:
            # Its request is gone (a client that left a route its disconnect cancels, such as
            # the embeddings'): nobody will settle what the call reserves for it, now or once
            # the database answers, so it is given back here, or a budget stays held by it
            # until its period ends.
            call.forsaken = True
            if call.done.is_set():
                self._forsake(call)
            raise
        if not call.done.is_set():
            call.abandoned = True
            self._overdue += 1
            self._degrade(f"the database did not answer within {_ADMIT_TIMEOUT:g} s")
            return None
        if call.result is None:
            return None  # the limiter is shutting down
        try:
            state = call.result.unwrap()
        except DatabaseError as error:
            self._degrade(str(error))
            return None
        self._recover()
        return state

    async def _calls_of(self, db: Database, key_id: int, batch: list[_Call]) -> None:
        """The key's admission calls, one at a time: each takes every admission of the key that
        arrived while the one before ran (those of one `Principal`, its limits as loaded)."""
        try:
            while True:
                # Sent even if its request was answered locally meanwhile (overdue): as any
                # late call, it tells when the database answers again (`_late`).
                await self._call(batch, db, batch[0].principal)
                queued = self._queued[key_id]
                if not queued:
                    return
                first = queued[0].principal
                size = next((i for i, call in enumerate(queued) if call.principal is not first), len(queued))
                batch, queued[:] = queued[:size], queued[size:]
        finally:
            for call in self._queued.pop(key_id, []):
                call.done.set()  # the limiter is stopping: no result, the request is answered locally

    async def _call(self, calls: list[_Call], db: Database, principal: Principal) -> None:
        """One round trip admitting `calls` (requests of `principal` that each wait at most
        `_ADMIT_TIMEOUT`), in order, each with its own answer and reservation.

        The admissions and tokens this process holds for the key (given back, made alone in an
        outage, used by ended exchanges) are settled by the same call, so that the requests see
        the buckets with them.
        Its errors go to the requests (a bug surfaces there, not as the end of the limiter).
        """
        held = UsageDelta()
        result: outcome.Outcome[list[Admission]] | None = None
        try:
            with trio.fail_after(_CALL_TIMEOUT):
                await self._settled_elsewhere(principal)
                if self._register is not None and any(call.budget_reserve for call in calls) and await self._register():
                    self._register = None  # registered: a later sweep finds the row
                held = self._take_settlements(principal)
                states = await KeysStore(db).admit_many(
                    principal.id, principal.rpm, principal.tpm, [(c.reserve, c.budget_reserve) for c in calls],
                    held.admissions, held.tokens, budget=principal.budget,
                    budget_period=timedelta(seconds=principal.budget_period), settle_budget=held.budget,
                    settled_at=held.budget_at, release_budget=held.released, released_from=held.released_from,
                    owner=self._writer,
                )
            result = outcome.Value(states)
        except trio.TooSlowError:
            result = outcome.Error(DatabaseUnavailable(f"no answer within {_CALL_TIMEOUT:g} s"))
        except Exception as error:
            result = outcome.Error(error)
        finally:
            if (held.admissions or held.tokens or held.budget or held.released) and not isinstance(
                result, outcome.Value
            ):
                self._pending.setdefault(principal.id, UsageDelta()).add(held)  # for the writer
                self._kick.set()
            for index, call in enumerate(calls):
                if isinstance(result, outcome.Value):
                    call.result = outcome.Value(result.value[index])
                elif isinstance(result, outcome.Error):
                    call.result = outcome.Error(result.error)
                call.done.set()
                if call.abandoned:
                    self._overdue -= 1
                if call.forsaken:
                    self._forsake(call)
        for call in calls:
            if call.abandoned and call.result is not None:
                self._late(call.result, principal, call.reserve)

    async def _settled_elsewhere(self, principal: Principal) -> None:
        """Until the usage writer has written the key's admissions and tokens it is writing (a
        few milliseconds, unless the database stalls): this admission must see them."""
        while (writing := self._flushing.get(principal.id)) is not None and (
            (principal.rpm is not None and writing.admissions) or (principal.tpm is not None and writing.tokens)
            or (principal.budget is not None and (writing.budget or writing.released))
        ):
            await self._flushed.wait()

    def _take_settlements(self, principal: Principal) -> UsageDelta:
        """The admissions and tokens this process holds for the key's buckets and budget, for
        its admission to settle (the usage writer settles only those of keys without the limit)."""
        held = UsageDelta()
        # A batch never sent may give its settlements up; a sent one may have been applied.
        sources = [self._pending, *(batch.deltas for batch in self._batches if not batch.sent)]
        for deltas in sources:
            pending = deltas.get(principal.id)
            if pending is None:
                continue
            if principal.rpm is not None:
                held.admissions, pending.admissions = held.admissions + pending.admissions, 0
            if principal.tpm is not None:
                held.tokens, pending.tokens = held.tokens + pending.tokens, 0
            if principal.budget is not None:
                held.add(UsageDelta(budget=pending.budget, budget_at=pending.budget_at))
                pending.budget, pending.budget_at = 0, None
                held.release(pending.released, pending.released_from)
                pending.released, pending.released_from = 0, None
        return held

    def _forsake(self, call: _Call) -> None:
        """Give back what the admission of a request that stopped waiting (cancelled) reserved:
        its tokens and its budget hold. (The admission itself counts: the request was made.)"""
        result = call.result
        if not isinstance(result, outcome.Value) or not result.value.allowed:
            return
        admission = result.value
        if not call.reserve and not admission.budget_reserved:
            return
        pending = self._pending.setdefault(call.principal.id, UsageDelta())
        pending.tokens -= call.reserve
        pending.release(admission.budget_reserved, admission.budget_start)
        self._kick.set()

    def _late(self, result: outcome.Outcome[Admission], principal: Principal, reserve: int) -> None:
        """An overdue call returned. Its request was admitted locally meanwhile, and the local
        buckets have counted this process's requests since: what matters now is the database's
        coming back, and that, if the call took its admission there, it is not charged twice."""
        if isinstance(result, outcome.Value):
            if result.value.allowed and (principal.rpm is not None or reserve or result.value.budget_reserved):
                pending = self._pending.setdefault(principal.id, UsageDelta())
                pending.admissions -= principal.rpm is not None
                pending.tokens -= reserve
                pending.release(result.value.budget_reserved, result.value.budget_start)
                self._kick.set()  # written now, not whenever the key's next request comes
            if not self._overdue:  # admissions stay local while another call still hangs
                self._recover()
        elif isinstance(result, outcome.Error) and not isinstance(result.error, DatabaseError):
            log.error("rate limit admission failed", exc_info=result.error)

    def _degrade(self, why: str) -> None:
        if not self._degraded:
            log.warning("rate limits enforced per process until the database answers again (%s)", why)
            self._degraded = True

    def _recover(self) -> None:
        if self._degraded:
            log.info("rate limits shared through the database again")
            self._degraded = False

    # -- usage ------------------------------------------------------------------------------

    def record(self, record: ExchangeRecord) -> None:
        key_id = record.api_key_id
        if key_id is None:
            return
        prompt, completion = record.prompt_tokens or 0, record.completion_tokens or 0
        failed = record.error is not None or record.status >= 400
        # The key's usage says what it was served; its `--tpm` and budget are charged only what a
        # backend generated for it (as the token metrics): a replay (an `Idempotency-Key` retry),
        # a cache hit or a request attached to another's run cost no backend anything, and an
        # idempotent retry must not pay twice for one answer.
        charged = prompt + completion if record.source == "backend" else 0
        # Its reservations are given back as its real usage is charged: one settlement.
        spent = charged - record.reserved.tokens
        delta = UsageDelta(
            requests=1, errors=int(failed), prompt_tokens=prompt, completion_tokens=completion, tokens=spent,
        )
        delta.use(charged, time.time())
        delta.release(record.reserved.budget, record.reserved.period)
        pending = self._pending.get(key_id)
        if pending is None:
            self._pending[key_id] = delta
        else:
            pending.add(delta)
        principal = self._ring.by_id(key_id)
        if principal is not None:
            self._local.spend(principal, spent)
            self._local.count(principal, charged - record.reserved.budget)
        self._kick.set()

    def settle(self, principal: Principal, reserved: Reserved) -> None:
        """Give back the tokens an admitted request reserved that no record settled (it
        ended without any usage to charge)."""
        if reserved == NOTHING_RESERVED:
            return
        self._local.spend(principal, -reserved.tokens)
        self._local.count(principal, -reserved.budget)
        pending = self._pending.setdefault(principal.id, UsageDelta())
        pending.tokens -= reserved.tokens
        pending.release(reserved.budget, reserved.period)
        self._kick.set()

    def give_back(self, principal: Principal) -> None:
        """Return an admission to the key's request bucket: the request was refused for
        what the key may not do (a model or workspace outside its scope), which is checked
        only once its body is read, after admission. Such a refusal takes nothing from `rpm`."""
        if principal.rpm is None:
            return
        self._local.give_back(principal)
        self._pending.setdefault(principal.id, UsageDelta()).admissions -= 1
        self._kick.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run admissions' database calls, and write recorded usage to the database
        (batched), until `aclose()`."""
        try:
            with trio.CancelScope() as self._scope:
                await self._adopt_spools()
                async with trio.open_nursery() as self._calls:
                    task_status.started()
                    while True:
                        waiting = self._pending or self._batches
                        with trio.move_on_after(_RETRY_SECONDS if waiting else math.inf):
                            await self._kick.wait()
                        self._kick = trio.Event()
                        # Requests ending together share one write (one round trip through the
                        # bridge, not one each), as the completion log's writer lingers too.
                        await trio.sleep(_LINGER_SECONDS)
                        await self._flush()
        finally:
            self._calls = None
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + _FLUSH_TIMEOUT
                self._failing = True  # stopping: spooled first, whatever the write does
                if self._seq:
                    self._retired.add(self._writer)  # it numbers no more batches
                await self._flush()
                await self._release_holds()
            if self._batches:
                where = "spooled for the next start" if self._spool is not None and self._spool.saved else "not recorded"
                log.warning("usage of %d API key batch(es) %s: the database is unreachable", len(self._batches), where)
            if self._spool is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._spool.close)
            self._done.set()

    def _cut(self) -> None:
        """Move `_pending` into the batch not yet sent, or a new one."""
        if not self._pending:
            return
        last = self._batches[-1] if self._batches else None
        if last is not None and not last.sent and last.writer == self._writer:
            for key_id, delta in self._pending.items():
                last.deltas.setdefault(key_id, UsageDelta()).add(delta)
        else:
            self._seq += 1
            self._batches.append(UsageBatch(self._writer, self._seq, self._pending))
        self._pending = {}

    async def _flush(self) -> None:
        self._cut()
        if not self._batches and not self._retired:
            return
        if self._failing:
            await self._save_spool()
        db = self._resources.database
        if db is None:
            self._failing = True
            await self._save_spool()
            return
        while self._batches:
            batch = self._batches[0]
            batch.sent = True
            self._flushing = batch.deltas
            try:
                with trio.fail_after(_FLUSH_TIMEOUT):
                    await KeysStore(db).record_usage(batch.deltas, batch.writer, batch.seq)
            except (DatabaseError, trio.TooSlowError) as error:
                # Kept as it is (it may have been applied): its retry, under its number, is
                # applied only if it was not.
                log.warning("recording API key usage failed (%s); will retry", error)
                self._failing = True
                await self._save_spool()
                return
            finally:
                # Written, or kept for the next write to settle.
                self._flushing = {}
                self._flushed.set()
                self._flushed = trio.Event()
            self._batches.pop(0)
        self._failing = False
        if await self._save_spool() and self._retired:
            await self._forget_retired(db)
        if trio.current_time() >= self._next_rollup and self._calls is not None:
            # Beside the writes (its own task), as they take the database's attention anyway.
            self._next_rollup = trio.current_time() + _ROLLUP_EVERY
            self._calls.start_soon(self._roll_up, db)

    async def _roll_up(self, db: Database) -> None:
        """Fold old hours of usage into days until none is left (a batch at a time)."""
        store = KeysStore(db)
        while True:
            try:
                with trio.fail_after(_FLUSH_TIMEOUT):
                    folded = await store.roll_up_usage(_ROLLUP_ROWS)
            except (DatabaseError, trio.TooSlowError) as error:
                log.warning("folding API key usage into days failed (%s); will retry", error)
                return
            if folded is None or folded < _ROLLUP_ROWS:
                return
            await trio.sleep(0.1)

    async def _release_holds(self) -> None:
        """Stopping, with every usage written: give back the budget reservations this process
        still holds (a request cut without a record), rather than leave them to the sweep of
        its instance once its heartbeat has been silent for a while."""
        db = self._resources.database
        if db is None or self._batches:
            return  # the spooled batches give theirs back when replayed; the sweep, the rest
        try:
            with trio.fail_after(_FLUSH_TIMEOUT):
                await KeysStore(db).release_holds(self._writer)
        except (DatabaseError, trio.TooSlowError) as error:
            log.warning("giving back this process's budget reservations failed (%s): its sweep will", error)

    async def _forget_retired(self, db: Database) -> None:
        """Delete the rows of retired writers none of whose batches is held any more (the
        spool file says so too: a process killed now leaves none to send again)."""
        held = {batch.writer for batch in self._batches}
        done = sorted(self._retired - held)
        if not done:
            return
        try:
            with trio.fail_after(_FLUSH_TIMEOUT):
                await KeysStore(db).forget_writers(done)
        except (DatabaseError, trio.TooSlowError) as error:
            log.warning("forgetting finished usage writers failed (%s); will retry", error)
            return
        self._retired.difference_update(done)

    async def _save_spool(self) -> bool:
        """Make the spool file hold the batches; False if it could not."""
        spool = self._spool
        if spool is None or (not self._batches and not spool.saved):
            return True
        self._cut()
        batches = [batch.to_json() for batch in self._batches]
        try:
            await trio.to_thread.run_sync(spool.save, batches)
        except OSError as error:
            log.error("usage spool %s not written: %s", spool.directory, error)
            return False
        return True

    async def _adopt_spools(self) -> None:
        """Open this process's spool, and take over those of processes gone (their batches
        are written with the next flush, under their own numbers)."""
        spool = self._spool
        if spool is None:
            return
        adopted = await open_spool(spool, "usage")
        if adopted is None:
            self._spool = None
            return
        self._retired.update(spool.vacated)
        if not adopted:
            return
        taken: list[tuple[list[dict[str, Any]], Path]] = []
        for items, path in adopted:
            try:
                self._batches[:0] = [UsageBatch.from_json(item) for item in items]
            except (ValueError, KeyError, TypeError) as error:
                log.error("unreadable usage spool %s left as it is: %s", path, error)
                continue
            taken.append((items, path))
        await self._save_spool()
        if not spool.saved:
            return  # not in this process's file: the others stay where they are
        for items, path in taken:
            if await trio.to_thread.run_sync(spool.release, path):
                # Its process (`path`'s writer) and those whose batches it held number no more.
                self._retired.update({path.stem, *(str(item["writer"]) for item in items)})
            log.info("usage spooled by a stopped gateway process (%d batch(es)) taken over from %s", len(items), path)
        self._kick.set()

    async def aclose(self) -> None:
        """Stop, after writing what is pending (bounded)."""
        if self._scope is None:
            return
        self._scope.cancel()
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _FLUSH_TIMEOUT + 1
            await self._done.wait()
