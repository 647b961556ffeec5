"""The completion log, idempotency keys and the exact cache in PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.domain.chat import ChatCompletion, Choice, FinishReason, ToolCall, Usage
from proxy.infra.conversation_store import pending_turns
from proxy.infra.postgres import Database, DatabaseError, Tx, json_text, plain_text

Status = Literal["running", "completed", "failed", "cancelled"]


def completion_to_json(completion: ChatCompletion, headers: Sequence[tuple[bytes, bytes]] = ()) -> dict[str, Any]:
    """`headers`: response headers that belong to the answer (a RAG answer's sources), kept
    with it for its replays (see `stored_headers`)."""
    usage = completion.usage
    return {
        **({"headers": {name.decode(): value.decode() for name, value in headers}} if headers else {}),
        "id": completion.id,
        "model": completion.model,
        "created": completion.created,
        "choices": [
            {
                "index": c.index,
                "content": c.content,
                "reasoning": c.reasoning,
                "tool_calls": [{"id": t.id, "name": t.name, "arguments": t.arguments} for t in c.tool_calls],
                "finish_reason": c.finish_reason.value if c.finish_reason else None,
                **({"logprobs": c.logprobs} if c.logprobs is not None else {}),
                **({"refusal": c.refusal} if c.refusal else {}),
                **({"annotations": c.annotations} if c.annotations else {}),
                **({"function_call": {"name": c.function_call.name, "arguments": c.function_call.arguments}}
                   if c.function_call is not None else {}),
                **({"audio": c.audio} if c.audio is not None else {}),
                **({"context": list(c.context)} if c.context else {}),
                **({"signed": _signed_to_json(c.signed)} if c.signed else {}),
            }
            for c in completion.choices
        ],
        **({"system_fingerprint": completion.system_fingerprint} if completion.system_fingerprint else {}),
        "usage": None
        if usage is None
        else {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
        },
    }


def _signed_to_json(signed: tuple[tuple[str, str], ...]) -> list[list[Any]]:
    """Each signed block as where it ends in the reasoning, and its signature: its text is
    the reasoning's already (kept once)."""
    out: list[list[Any]] = []
    end = 0
    for thinking, signature in signed:
        end += len(thinking)
        out.append([end, signature])
    return out


def _signed_from_json(data: Any, reasoning: str) -> tuple[tuple[str, str], ...]:
    """The signed blocks `_signed_to_json` kept; none if they no longer fit the reasoning (a
    block given back altered would be refused with its signature: better unsigned)."""
    if not isinstance(data, list):
        return ()
    out: list[tuple[str, str]] = []
    start = 0
    for entry in data:
        if not (
            isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) and isinstance(entry[1], str)
            and start <= entry[0] <= len(reasoning)
        ):
            return ()
        out.append((reasoning[start:entry[0]], entry[1]))
        start = entry[0]
    return tuple(out)


def stored_headers(data: dict[str, Any] | None) -> list[tuple[bytes, bytes]]:
    """The headers `completion_to_json` kept with an answer."""
    kept = (data or {}).get("headers")
    if not isinstance(kept, dict):
        return []
    return [(str(name).encode(), str(value).encode()) for name, value in kept.items()]


def completion_from_json(data: dict[str, Any]) -> ChatCompletion:
    usage = data.get("usage")
    return ChatCompletion(
        id=str(data.get("id") or ""),
        model=str(data.get("model") or ""),
        created=int(data.get("created") or 0),
        choices=[
            Choice(
                index=int(c.get("index") or 0),
                content=c.get("content") or "",
                reasoning=c.get("reasoning") or "",
                tool_calls=[ToolCall(t["id"], t["name"], t["arguments"]) for t in c.get("tool_calls") or []],
                finish_reason=FinishReason(c["finish_reason"]) if c.get("finish_reason") else None,
                logprobs=c.get("logprobs"),
                refusal=c.get("refusal") or "",
                annotations=list(c.get("annotations") or []),
                function_call=ToolCall("", str(legacy.get("name") or ""), str(legacy.get("arguments") or ""))
                if isinstance(legacy := c.get("function_call"), dict) else None,
                audio=spoken if isinstance(spoken := c.get("audio"), dict) else None,
                context=tuple(tokens) if isinstance(tokens := c.get("context"), list) else (),
                signed=_signed_from_json(c.get("signed"), c.get("reasoning") or ""),
            )
            for c in data.get("choices") or []
        ],
        usage=None
        if not usage
        else Usage(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=usage.get("cached_tokens"),
            cache_write_tokens=usage.get("cache_write_tokens"),
            reasoning_tokens=usage.get("reasoning_tokens"),
        ),
        system_fingerprint=data.get("system_fingerprint"),
    )


@dataclass(slots=True)
class LogRow:
    """One chat's row; written as `running` at the start and upserted with its outcome.

    A complete row on its own, so an outcome queued in the outbox while PostgreSQL was down
    can be written later even if the `running` row never was."""

    trace_id: str
    req_id: str
    idempotency_key: str | None
    route: str
    dialect: str
    model: str
    backend: str | None
    upstream_model: str | None
    stream: bool
    request: dict[str, Any]
    status: Status = "running"
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None
    last_seq: int = 0
    tenant: str | None = None
    cache_ttl: float | None = None
    cache_id: str | None = None  # the exact-cache key: req_id, scoped to the tenant
    owner: str | None = None  # the gateway instance running it (see `sweep_dead_instances`)
    replayable: bool = True  # `result` is the whole answer (else it is not cached)
    # What the answer echoes of the request when read back (a Response's settings, in wire
    # form); None for dialects that echo nothing. Not part of `request`, whose hash is `req_id`.
    settings: dict[str, Any] | None = None
    api_key_id: int | None = None  # the key it was made with (see `settle_orphaned_workflows`)
    # A conversation turn's items its run could not append (PostgreSQL out for longer than its
    # client waits): {"id", "tenant", "items"}, appended with this row, in its transaction,
    # which gives the conversation's lock back (see `conversation_store.pending_turns`).
    conversation: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LogRow:
        fields: dict[str, Any] = {name: data[name] for name in cls.__slots__ if name in data}
        return cls(**fields)


@dataclass(slots=True, frozen=True)
class StoredRun:
    """A trace's row as `GET /v1/streams` needs it."""

    status: Status
    completion: ChatCompletion | None
    error: dict[str, Any] | None
    tenant: str | None
    route: str
    upstream_model: str | None = None
    # The sequence number of the run's `finished` as its clients saw it (0: not recorded).
    finished_seq: int = 0
    model: str = ""  # as the client named it
    created_at: float = 0.0  # when its row was first written (Unix seconds)
    settings: dict[str, Any] | None = None  # see `LogRow.settings`
    finished_at: float = 0.0  # when its row was last written: its outcome's, once it has ended (Unix seconds)
    # A workflow whose client waited for the whole answer: the job's attempt whose events are
    # that answer (a retry after a dead worker replaces the attempts before it). 0: from the first.
    answer_attempt: int = 0
    deleted: bool = False  # its client deleted it (`DELETE /v1/responses/{id}`): nothing to read back
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # kept with its answer (`stored_headers`)


@dataclass(slots=True, frozen=True)
class Claim:
    """Who answers a key: `owner` (this trace runs it), `running` or `completed` (another
    trace does or did), `conflict` (the key was used for a different request)."""

    outcome: Literal["owner", "running", "completed", "conflict"]
    trace_id: str


def _json(value: Any) -> str | None:
    return None if value is None else json_text(value)


def _text(value: str | None) -> str | None:
    return None if value is None else plain_text(value)


_COLUMNS = (
    "trace_id, req_id, idempotency_key, route, dialect, model, backend, upstream_model, stream, status, "
    "request, result, error, finish_reason, prompt_tokens, completion_tokens, ttft_ms, total_ms, last_seq, tenant, owner, "
    "settings, api_key_id"
)
_VALUES = (
    "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s::jsonb, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s"
)


def _row_params(row: LogRow) -> tuple[Any, ...]:
    return (
        row.trace_id, row.req_id, _text(row.idempotency_key), _text(row.route), row.dialect, _text(row.model),
        row.backend, _text(row.upstream_model), row.stream, row.status, _json(row.request), _json(row.result),
        _json(row.error), row.finish_reason, row.prompt_tokens, row.completion_tokens, row.ttft_ms, row.total_ms,
        row.last_seq, _text(row.tenant), row.owner, _json(row.settings), row.api_key_id,
    )


_INSERT_START = f"INSERT INTO chat_log ({_COLUMNS}) VALUES ({_VALUES}) ON CONFLICT (trace_id) DO NOTHING"
_OUTCOME_UPDATE = (
    " ON CONFLICT (trace_id) DO UPDATE SET "
    "status = EXCLUDED.status, result = EXCLUDED.result, error = EXCLUDED.error, "
    "finish_reason = EXCLUDED.finish_reason, prompt_tokens = EXCLUDED.prompt_tokens, "
    "completion_tokens = EXCLUDED.completion_tokens, ttft_ms = EXCLUDED.ttft_ms, "
    "total_ms = EXCLUDED.total_ms, last_seq = EXCLUDED.last_seq, updated_at = now() "
    # A deleted response stays deleted, whatever outcome of its run is written late.
    "WHERE chat_log.deleted_at IS NULL"
)
_UPSERT_OUTCOME = f"INSERT INTO chat_log ({_COLUMNS}) VALUES ({_VALUES}){_OUTCOME_UPDATE}"


# Any number of outcomes in one statement of constant text (prepared once per connection),
# from one JSON array of rows: a single C-speed `json.dumps` on our side, the request and
# result objects embedded as they are.
_UPSERT_OUTCOMES = (
    f"INSERT INTO chat_log ({_COLUMNS}) SELECT {_COLUMNS} FROM jsonb_to_recordset(%s::jsonb) AS v("
    "trace_id text, req_id text, idempotency_key text, route text, dialect text, model text, backend text, "
    "upstream_model text, stream boolean, status text, request jsonb, result jsonb, error jsonb, "
    "finish_reason text, prompt_tokens integer, completion_tokens integer, ttft_ms real, total_ms real, "
    f"last_seq integer, tenant text, owner text, settings jsonb, api_key_id bigint){_OUTCOME_UPDATE}"
)


_SET_KEY_STATUS = "UPDATE idempotency_keys SET status = %s, updated_at = now() WHERE key = %s AND trace_id = %s"
# An outcome's key: its status if the key is still this trace's; the key itself if nobody holds
# it (the run was not claimed: PostgreSQL was down), so a retry after the outage replays it.
_PUT_KEY_STATUS = (
    "INSERT INTO idempotency_keys (key, req_id, trace_id, status) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (key) DO UPDATE SET status = EXCLUDED.status, updated_at = now() "
    "WHERE idempotency_keys.trace_id = EXCLUDED.trace_id"
)
# Not for a deleted response (an outcome replayed late, from the outbox): its row, locked by
# the outcome's upsert just before in the same transaction, says so (see `_DELETE_CACHED`).
_PUT_CACHE = (
    "INSERT INTO completions_cache (req_id, model, trace_id, result, expires_at) "
    "SELECT %s, %s, %s, %s::jsonb, now() + make_interval(secs => %s) "
    "WHERE NOT EXISTS (SELECT 1 FROM chat_log WHERE trace_id = %s AND deleted_at IS NOT NULL) "
    "ON CONFLICT (req_id) DO UPDATE SET trace_id = EXCLUDED.trace_id, result = EXCLUDED.result, "
    "created_at = now(), expires_at = EXCLUDED.expires_at"
)

# Expired exact-cache entries, a batch at a time, with the keys that guarded them (`cache:`,
# unless a run holds one again): nothing reads them any more, and without this every distinct
# cached request would stay in both tables for good. Rows another transaction holds are
# skipped (a write re-caching one of them), never waited for: a later write takes them.
_PURGE_EXPIRED_CACHE = """
WITH gone AS (
    DELETE FROM completions_cache WHERE req_id IN (
        SELECT req_id FROM completions_cache WHERE expires_at <= now() LIMIT %s FOR UPDATE SKIP LOCKED
    ) RETURNING req_id
)
DELETE FROM idempotency_keys WHERE key IN (
    SELECT k.key FROM idempotency_keys k JOIN gone ON k.key = 'cache:' || gone.req_id
    WHERE k.status <> 'running' FOR UPDATE OF k SKIP LOCKED
)
"""
# More than a group commit adds: the table shrinks back to its live entries as it is written.
_PURGE_BATCH = 200

# Keys whose run ended more than the retention ago (an Idempotency-Key, a background
# response's, a cached attempt's that failed), a batch at a time: a retry that late runs
# again, as it would at OpenAI or Stripe. Never a running key (its run still answers
# whoever retries), nor a `cache:` key whose entry lives (it still answers identical
# requests); held rows are skipped, as in `_PURGE_EXPIRED_CACHE`.
_PURGE_EXPIRED_KEYS = """
DELETE FROM idempotency_keys WHERE key IN (
    SELECT k.key FROM idempotency_keys k
    WHERE k.status <> 'running' AND k.updated_at < now() - make_interval(secs => %s)
        AND NOT (left(k.key, 6) = 'cache:' AND EXISTS (
            SELECT 1 FROM completions_cache c WHERE c.req_id = substr(k.key, 7) AND c.expires_at > now()
        ))
    LIMIT %s FOR UPDATE SKIP LOCKED
)
"""

_FORGET_EXPIRED_KEY = (
    "DELETE FROM idempotency_keys WHERE key = %s AND trace_id = %s AND status <> 'running'"
    " AND updated_at < now() - make_interval(secs => %s)"
)

# Log rows made more than the retention ago whose run has ended, a batch at a time, oldest
# first (`chat_log_created_at`), with their workflow job's record (its request and answer):
# without this every request's prompt and answer would stay for good. A running row is kept
# however old (its run still writes it); held rows are skipped, as in `_PURGE_EXPIRED_CACHE`.
# What else names a run is left to its own bound: its key (`idempotency_retention_seconds`:
# a key whose row is gone runs its request again), its cache entries (their TTL), its events
# (JetStream's), a conversation's items (kept whole in the conversation, which outlives them).
_PURGE_EXPIRED_LOG = """
WITH gone AS (
    DELETE FROM chat_log WHERE trace_id IN (
        SELECT trace_id FROM chat_log
        WHERE created_at < now() - make_interval(secs => %s) AND status <> 'running'
        ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED
    ) RETURNING trace_id, route
), runs AS (
    DELETE FROM workflow_runs WHERE trace_id IN (SELECT trace_id FROM gone WHERE route = 'workflow')
)
SELECT count(*) FROM gone
"""


# The judging instance (`me`) may declare another dead: it beat within `late` seconds and has
# beaten promptly for `silent` seconds, so others' silence is theirs, not a stall's.
_STEADY = (
    "EXISTS (SELECT 1 FROM gateway_instances me WHERE me.id = %(judge)s"
    " AND me.seen_at > now() - make_interval(secs => %(late)s)"
    " AND me.steady_since <= now() - make_interval(secs => %(silent)s))"
)

# Who holds a key: its request, trace, status and age, whether the exact-cache entry lives,
# how its trace's row ended (NULL: no row, or running) and whether its owner is silent (while
# this instance can tell).
_HOLDER = f"""
SELECT k.req_id, k.trace_id, k.status, extract(epoch FROM now() - k.updated_at),
    EXISTS (SELECT 1 FROM completions_cache WHERE req_id = %(cache_id)s AND expires_at > now()),
    (SELECT c.status FROM chat_log c WHERE c.trace_id = k.trace_id AND c.status <> 'running'),
    k.owner IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM gateway_instances g WHERE g.id = k.owner AND g.seen_at > now() - make_interval(secs => %(silent)s)
    ) AND {_STEADY}
FROM idempotency_keys k WHERE k.key = %(key)s
"""


INTERRUPTED_MESSAGE = "The gateway process running it stopped (killed or crashed) before it completed."
_INTERRUPTED = json_text({"kind": "UNAVAILABLE", "message": INTERRUPTED_MESSAGE})
_SWEEP_DEAD = f"""
WITH dead AS (
    DELETE FROM gateway_instances WHERE seen_at < now() - make_interval(secs => %(silent)s) AND {_STEADY}
    RETURNING id
), keys AS (
    UPDATE idempotency_keys SET status = 'failed', updated_at = now()
    WHERE status = 'running' AND owner IN (SELECT id FROM dead)
), rows AS (
    UPDATE chat_log SET status = 'failed', error = %(error)s::jsonb, updated_at = now()
    WHERE status = 'running' AND owner IN (SELECT id FROM dead) RETURNING 1
), gone AS (
    -- With the owners of budget holds that have no row at all: processes that died before
    -- their first heartbeat, held in the name of no instance a sweep could find (a gateway
    -- registers before its first hold now; these are older ones'). The subquery reads the
    -- table as it was before `dead`, whose ids it may list again.
    SELECT array_agg(DISTINCT id) AS ids FROM (
        SELECT id FROM dead
        UNION ALL
        SELECT h.owner FROM api_key_limits l, jsonb_object_keys(l.budget_holds) AS h(owner)
        WHERE l.budget_holds IS NOT NULL AND {_STEADY}
            AND NOT EXISTS (SELECT 1 FROM gateway_instances g WHERE g.id = h.owner)
    ) AS owners
), holds AS (
    -- The budget reservations of their requests, which will never end (migration 0017).
    UPDATE api_key_limits l
    SET budget_reserved = greatest(0, l.budget_reserved - api_key_holds_of(l.budget_holds, gone.ids, l.budget_start)),
        budget_holds = nullif(l.budget_holds - gone.ids, '{{}}'::jsonb)
    FROM gone WHERE gone.ids IS NOT NULL AND l.budget_holds ?| gone.ids
)
SELECT count(*) FROM rows
"""
_OTHERS_ALIVE = (
    "SELECT EXISTS (SELECT 1 FROM gateway_instances"
    " WHERE id <> %(id)s AND starts_with(id, %(tag)s) AND seen_at > now() - make_interval(secs => %(silent)s))"
)
# A beat: late (its previous one more than `late` seconds ago) it starts the steady period again.
_BEAT = (
    "UPDATE gateway_instances SET seen_at = now(), steady_since = CASE"
    " WHEN seen_at < now() - make_interval(secs => %(late)s) THEN now() ELSE steady_since END"
    " WHERE id = %(id)s"
)
# The first beat of an instance whose row is gone: a new process has seen no stall (steady at
# once: it sweeps what a killed predecessor left without waiting); one declared dead has.
_FIRST_BEAT = (
    "INSERT INTO gateway_instances (id, steady_since)"
    " VALUES (%(id)s, CASE WHEN %(new)s THEN '-infinity'::timestamptz ELSE now() END)"
    " ON CONFLICT (id) DO UPDATE SET seen_at = now()"
)
# A workflow's row whose gateway died while it relayed the job (its rows have no owner to be
# swept by: the job lives in its worker, which went on): once the worker's outcome has been in
# `workflow_runs` for `grace` seconds (a live relay writes its own within moments), that
# outcome is the row's, and its key's, so the answer is read back, replayed and continued
# rather than `running` for ever. (The relay's own outcome, written later, still wins.)
_SETTLE_ORPHANED_WORKFLOWS = """
WITH settled AS (
    UPDATE chat_log c SET status = w.status, error = w.error, finish_reason = w.finish_reason,
        prompt_tokens = w.prompt_tokens, completion_tokens = w.completion_tokens, updated_at = now(),
        result = w.result || jsonb_build_object('headers', jsonb_strip_nulls(jsonb_build_object(
            'x-pipeline', w.pipeline, 'x-workflow-winner', CASE WHEN c.stream THEN NULL ELSE w.winner END)))
    FROM workflow_runs w
    WHERE c.status = 'running' AND c.route = 'workflow' AND c.deleted_at IS NULL AND w.trace_id = c.trace_id
        AND w.status <> 'running' AND w.finished_at < now() - make_interval(secs => %(grace)s)
    RETURNING c.trace_id, c.status, c.api_key_id, c.prompt_tokens, c.completion_tokens, w.finished_at
), keys AS (
    UPDATE idempotency_keys k SET status = settled.status, updated_at = now()
    FROM settled WHERE k.trace_id = settled.trace_id AND k.status = 'running'
), charged AS (
    -- Its gateway, killed, never charged the key: this is the run's one charge (a row leaves
    -- `running` once, whichever gateway's sweep settles it), in the key's usage and its budget
    -- (its reservation, held by the dead gateway, is given back by that gateway's sweep).
    SELECT api_key_id AS key_id, count(*) AS requests, count(*) FILTER (WHERE status = 'failed') AS errors,
        sum(coalesce(prompt_tokens, 0)) AS prompt, sum(coalesce(completion_tokens, 0)) AS completion,
        max(extract(epoch FROM finished_at)) AS used_at
    FROM settled WHERE EXISTS (SELECT 1 FROM api_keys WHERE id = settled.api_key_id) GROUP BY api_key_id
), usage AS (
    INSERT INTO api_key_usage AS u (key_id, hour, requests, errors, prompt_tokens, completion_tokens)
    SELECT key_id, date_trunc('hour', now()), requests, errors, prompt, completion FROM charged
    ON CONFLICT (key_id, hour) DO UPDATE SET
        requests = u.requests + EXCLUDED.requests, errors = u.errors + EXCLUDED.errors,
        prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens, last_used_at = now()
), budget AS (
    UPDATE api_key_limits l
    SET budget_start = api_key_budget_start(l.budget_start, k.budget_period, now()),
        budget_used = api_key_budget_settled(l.budget_start, l.budget_used, k.budget_period, now(),
                                             ch.prompt + ch.completion, ch.used_at),
        budget_reserved = api_key_budget_held(l.budget_start, l.budget_reserved, k.budget_period, now(), 0, NULL),
        budget_holds = CASE WHEN api_key_budget_start(l.budget_start, k.budget_period, now())
            IS DISTINCT FROM l.budget_start THEN NULL ELSE l.budget_holds END
    FROM charged ch JOIN api_keys k ON k.id = ch.key_id
    WHERE l.key_id = ch.key_id AND k.budget IS NOT NULL
)
SELECT count(*) FROM settled
"""
# What a sweep of a live instance failed of its runs still going on, running again: their rows
# (unless their outcome was written since) and the keys they still hold.
_REASSERT = """
WITH rows AS (
    UPDATE chat_log SET status = 'running', error = NULL, updated_at = now()
    WHERE owner = %(id)s AND status = 'failed' AND error = %(error)s::jsonb AND trace_id = ANY(%(live)s)
    RETURNING trace_id
), keys AS (
    UPDATE idempotency_keys SET status = 'running', updated_at = now()
    WHERE owner = %(id)s AND status = 'failed' AND trace_id = ANY(%(live)s)
)
SELECT count(*) FROM rows
"""


# What a run said and was asked goes; its row stays (see `0015_chat_log_deleted.sql`), with
# its tokens and times for the accounts, and how many messages a response continuing it
# carried over (`carried`: that one's input items are still told from them).
_DELETE = """
UPDATE chat_log SET deleted_at = now(), result = NULL, error = NULL, settings = NULL,
    request = jsonb_build_object('carried', %s::integer)
WHERE trace_id = %s AND deleted_at IS NULL RETURNING 1
"""
# Where else its content is kept goes too: its entries in either cache (they would answer a
# request like it again with its content), and a workflow-routed run's job record (its
# request and answer, its pipeline's data; the record stays, as the row does, for the
# accounts). Separate statements after `_DELETE`, in its transaction: a cache write that held
# the row's lock before it committed its entry before these statements' snapshot, and one
# after finds the row deleted (`_PUT_CACHE`, `SemanticCache.store`). The exact cache is
# scanned (deletes are rare; an index would cost every cached answer's write), the semantic
# one not.
_DELETE_CACHED = (
    "DELETE FROM completions_cache WHERE trace_id = %s",
    "DELETE FROM semantic_cache WHERE trace_id = %s",
    "UPDATE workflow_runs SET request = '{}'::jsonb, content = NULL, result = NULL, data = NULL, error = NULL"
    " WHERE trace_id = %s",
)


class ChatStore:
    def __init__(self, db: Database, *, key_retention: float = 86400.0) -> None:
        self._db = db
        self._key_retention = key_retention  # seconds a settled key is kept

    async def start(self, row: LogRow) -> None:
        # DO NOTHING: if the outcome was written first (a fast failure), it must win.
        await self._db.execute(_INSERT_START, _row_params(row))

    async def write_batch(self, starts: list[LogRow], outcomes: list[LogRow]) -> None:
        """Many rows in one transaction (group commit): starts first, so an outcome in the
        same batch always wins."""
        keys = [(r.idempotency_key, r.req_id, r.trace_id, r.status) for r in outcomes if r.idempotency_key is not None]
        keys += [
            (f"cache:{r.cache_id or r.req_id}", r.req_id, r.trace_id, r.status) for r in outcomes if r.cache_ttl is not None
        ]
        cached = [
            (r.cache_id or r.req_id, r.model, r.trace_id, _json(r.result), r.cache_ttl, r.trace_id)
            for r in outcomes
            if r.cache_ttl is not None and r.status == "completed" and r.result is not None and r.replayable
        ]
        turns = [(r.trace_id, r.conversation) for r in outcomes if r.conversation is not None]
        if outcomes and not starts and not keys and not cached and not turns:
            # The common batch: plain outcomes. One statement, atomic on its own, costs one
            # round trip instead of a transaction's three.
            await self._db.execute(_UPSERT_OUTCOMES, (_json([row.to_json() for row in outcomes]),))
            return
        await self._db.execute_batch([
            (_INSERT_START, [_row_params(r) for r in starts]),
            (_UPSERT_OUTCOME, [_row_params(r) for r in outcomes]),
            (_PUT_KEY_STATUS, keys),
            (_PUT_CACHE, cached),
            *pending_turns(turns),
        ])
        if cached:
            # The rows are committed: a purge that fails is left to the next cached answer's write.
            with contextlib.suppress(DatabaseError):
                await self._db.execute(_PURGE_EXPIRED_CACHE, (_PURGE_BATCH,))
        if keys:
            # Likewise, left to the next batch that writes keys, which add no more than it takes.
            with contextlib.suppress(DatabaseError):
                await self._db.execute(_PURGE_EXPIRED_KEYS, (self._key_retention, _PURGE_BATCH))

    async def purge_log(self, retention: float, limit: int) -> int:
        """Delete up to `limit` log rows of runs made more than `retention` seconds ago that
        have ended (see `_PURGE_EXPIRED_LOG`); how many went."""
        return int(await self._db.fetchval(_PURGE_EXPIRED_LOG, (retention, limit)) or 0)

    async def finish(self, row: LogRow) -> None:
        """The outcome, the key's status and (when asked) the cache entry, in one transaction."""
        await self.write_batch([], [row])

    async def claim(
        self, key: str, req_id: str, trace_id: str, *, stale_after: float, cache_id: str | None = None,
        owner: str | None = None, owner_silence: float = 30.0, judge: str | None = None, late: float = 10.0,
    ) -> Claim:
        """Claim `key` for `trace_id` (run by gateway instance `owner`) unless another trace
        holds it; a failed, cancelled or stale holder is taken over. Stale: running for longer
        than `stale_after` seconds, or for longer than `owner_silence` with its owner silent
        as long (no heartbeat: gone, whether or not any instance swept it) — as judged by
        instance `judge`, only while its own heartbeats are steady (see `sweep_dead_instances`).

        A holder whose row has ended although its key still says running (its outcome's write
        landed before a claim or take-over PostgreSQL applied late, after its request stopped
        waiting) counts as its row says, and its key is set right.

        With `cache_id` (the key guards an exact-cache entry), a completed holder counts only
        while that entry lives: an expired one is taken over, so the request runs again."""
        for _ in range(5):
            won = await self._db.fetchval(
                "INSERT INTO idempotency_keys (key, req_id, trace_id, status, owner) VALUES (%s, %s, %s, 'running', %s) "
                "ON CONFLICT (key) DO NOTHING RETURNING trace_id",
                (key, req_id, trace_id, owner),
            )
            if won is not None:
                return Claim("owner", trace_id)
            row = await self._db.fetchrow(
                _HOLDER, {"cache_id": cache_id, "silent": owner_silence, "key": key, "judge": judge, "late": late}
            )
            if row is None:
                continue  # deleted between the two statements
            held_req, held_trace, status, age, cached, ended, owner_gone = row
            if status != "running" and float(age) >= self._key_retention and not cached:
                # Past its retention but not purged yet (no group commit since): forgotten,
                # as the docs promise, whatever the request now holding it asks.
                await self._db.execute(_FORGET_EXPIRED_KEY, (key, held_trace, self._key_retention))
                continue
            if held_req != req_id:
                return Claim("conflict", held_trace)
            if status == "running" and ended is not None:
                status = ended
                await _set_key_status(self._db, key, held_trace, ended)
            if status == "completed" and (cache_id is None or cached):
                return Claim("completed", held_trace)
            if status == "running" and float(age) < stale_after and not (owner_gone and float(age) >= owner_silence):
                return Claim("running", held_trace)
            if await self.take_over(key, held_trace, trace_id, owner=owner):
                return Claim("owner", trace_id)
        return Claim("running", trace_id)

    async def take_over(self, key: str, previous_trace: str, trace_id: str, *, owner: str | None = None) -> bool:
        taken = await self._db.execute(
            "UPDATE idempotency_keys SET trace_id = %s, status = 'running', owner = %s, updated_at = now() "
            "WHERE key = %s AND trace_id = %s",
            (trace_id, owner, key, previous_trace),
        )
        return taken == 1

    async def trace_failed(self, trace_id: str) -> bool:
        """Whether the key `trace_id` holds says its run failed or was cancelled (a run whose
        process died before writing its row has only its key to say so)."""
        status = await self._db.fetchval("SELECT status FROM idempotency_keys WHERE trace_id = %s LIMIT 1", (trace_id,))
        return status in ("failed", "cancelled")

    async def trace_claimed(self, trace_id: str) -> bool:
        """Whether a key is held `running` by `trace_id` (a keyed run's key is claimed before it
        starts; its `running` row is written a moment later)."""
        status = await self._db.fetchval("SELECT status FROM idempotency_keys WHERE trace_id = %s LIMIT 1", (trace_id,))
        return bool(status == "running")

    async def heartbeat(self, instance: str, *, late: float = 10.0, first: bool = False) -> bool:
        """Beat `instance`'s heartbeat (a beat more than `late` seconds after its previous one
        restarts its steady period); False when its row was gone though this is not its
        `first` beat: another instance declared it dead and failed its running chats."""
        if await self._db.execute(_BEAT, {"late": late, "id": instance}):
            return True
        await self._db.execute(_FIRST_BEAT, {"id": instance, "new": first})
        return first

    async def others_alive(self, instance: str, tag: str, silent_for: float) -> bool:
        """Whether a gateway instance other than `instance`, of the process tagged `tag`, has
        beaten within `silent_for` seconds."""
        return bool(await self._db.fetchval(_OTHERS_ALIVE, {"id": instance, "tag": tag, "silent": silent_for}))

    async def sweep_dead_instances(self, silent_for: float, *, judge: str, late: float = 10.0) -> int:
        """Fail the running rows and keys of every instance silent for `silent_for` seconds and
        give back the budget reservations it holds (and forget it); how many rows that was.
        Only while `judge` (the sweeping instance) beats steadily (see `_STEADY`): just after
        a stall every instance looks silent."""
        swept = await self._db.fetchval(
            _SWEEP_DEAD, {"silent": silent_for, "error": _INTERRUPTED, "judge": judge, "late": late}
        )
        return int(swept or 0)

    async def settle_orphaned_workflows(self, grace: float) -> int:
        """Give the workflow rows left running by a gateway that died while relaying them
        their workers' outcomes (see `_SETTLE_ORPHANED_WORKFLOWS`); how many rows that was."""
        settled = await self._db.fetchval(_SETTLE_ORPHANED_WORKFLOWS, {"grace": grace})
        return int(settled or 0)

    async def reassert(self, instance: str, live: list[str]) -> int:
        """Say running again what a sweep failed of live `instance`'s runs `live` (those it
        still runs): their rows failed as interrupted, and the keys they still hold; how many
        rows that was."""
        found = await self._db.fetchval(_REASSERT, {"id": instance, "error": _INTERRUPTED, "live": live})
        return int(found or 0)

    async def release(self, key: str, trace_id: str, status: Status) -> None:
        await _set_key_status(self._db, key, trace_id, status)

    async def stored(self, trace_id: str) -> tuple[Status, ChatCompletion | None, dict[str, Any] | None] | None:
        """A trace's status, its completion (if it has one) and its error (if it failed)."""
        found = await self.stored_run(trace_id)
        return None if found is None else (found.status, found.completion, found.error)

    async def stored_run(self, trace_id: str) -> StoredRun | None:
        row = await self._db.fetchrow(
            "SELECT c.status, c.result, c.error, c.tenant, c.route, c.upstream_model, c.last_seq, c.model, "
            "extract(epoch FROM c.created_at)::float8, c.settings, extract(epoch FROM c.updated_at)::float8, "
            "CASE WHEN c.stream THEN 0 ELSE w.attempts END, c.deleted_at IS NOT NULL "
            "FROM chat_log c LEFT JOIN workflow_runs w ON c.route = 'workflow' AND w.trace_id = c.trace_id "
            "WHERE c.trace_id = %s",
            (trace_id,),
        )
        if row is None:
            return None
        (status, result, error, tenant, route, upstream_model, last_seq, model, created_at, settings, updated_at,
         attempt, deleted) = row
        completion = completion_from_json(result) if result else None
        return StoredRun(
            status, completion, error, tenant, route, upstream_model, last_seq, model or "", float(created_at or 0.0),
            settings, float(updated_at or 0.0), attempt or 0, bool(deleted), headers=stored_headers(result),
        )

    async def delete(self, trace_id: str, carried: int) -> bool:
        """Delete a run's answer, request and settings (its row stays, marked deleted, with
        `carried`), the entries of both caches holding its answer, and its workflow job's
        content; False when it has no row or was deleted already."""
        async with self._db.transaction() as tx:
            if await tx.fetchval(_DELETE, (carried, trace_id)) is None:
                return False
            for statement in _DELETE_CACHED:
                await tx.execute(statement, (trace_id,))
        return True

    async def carried(self, trace_id: str) -> int:
        """How many messages a response continuing this deleted one carried over (0: unknown)."""
        found = await self._db.fetchval("SELECT (request->>'carried')::integer FROM chat_log WHERE trace_id = %s", (trace_id,))
        return int(found or 0)

    async def stored_messages(self, trace_id: str) -> list[dict[str, Any]] | None:
        """The messages of the trace's request, as its row keeps them (canonical form)."""
        request = await self._db.fetchval("SELECT request FROM chat_log WHERE trace_id = %s", (trace_id,))
        if not isinstance(request, dict):
            return None
        messages = request.get("messages")
        return messages if isinstance(messages, list) else None

    async def cached(self, req_id: str) -> tuple[str, ChatCompletion, list[tuple[bytes, bytes]]] | None:
        """(trace id, answer, the headers kept with it) of a live exact-cache entry."""
        row = await self._db.fetchrow(
            "SELECT trace_id, result FROM completions_cache WHERE req_id = %s AND expires_at > now()", (req_id,)
        )
        return (row[0], completion_from_json(row[1]), stored_headers(row[1])) if row else None


async def _set_key_status(db: Database | Tx, key: str, trace_id: str, status: Status) -> None:
    await db.execute(_SET_KEY_STATUS, (status, key, trace_id))
