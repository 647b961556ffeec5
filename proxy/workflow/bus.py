"""The workflow's NATS objects — jobs stream, KV buckets — made once per connection.

`Resources` may replace the `Bus` (a reconnect after NATS was unreachable); what was set
up on one bus is remembered with it, so a new bus is set up again.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from proxy.infra.nats import Bus, KeyValueStore
from proxy.workflow.job import JOBS_BUCKET, JOBS_STREAM, JOBS_SUBJECTS, WORKERS_BUCKET, WORKERS_TTL


@dataclass(slots=True)
class _Prepared:
    stream: bool = False
    kv: dict[str, KeyValueStore] = field(default_factory=dict)


_prepared: weakref.WeakKeyDictionary[Bus, _Prepared] = weakref.WeakKeyDictionary()


def _state(bus: Bus) -> _Prepared:
    state = _prepared.get(bus)
    if state is None:
        state = _prepared[bus] = _Prepared()
    return state


async def ensure_jobs_stream(bus: Bus, *, retention: float) -> None:
    """The work queue of jobs (`jobs.{pipeline}`): each job goes to one consumer, and is
    gone once acked (or after `retention` seconds unclaimed)."""
    state = _state(bus)
    if not state.stream:
        await bus.ensure_stream(JOBS_STREAM, JOBS_SUBJECTS, retention="workqueue", max_age=retention)
        state.stream = True


async def jobs_kv(bus: Bus, *, retention: float) -> KeyValueStore:
    """Systemd launches' jobs (`job.{trace_id}`) and cancel marks (`cancel.{trace_id}`)."""
    return await _kv(bus, JOBS_BUCKET, retention)


async def workers_kv(bus: Bus) -> KeyValueStore:
    """One key per pipeline while a resident worker serves it (expires `WORKERS_TTL` s after
    the last worker's last refresh)."""
    return await _kv(bus, WORKERS_BUCKET, WORKERS_TTL)


async def _kv(bus: Bus, bucket: str, ttl: float) -> KeyValueStore:
    state = _state(bus)
    store = state.kv.get(bucket)
    if store is None:
        store = state.kv[bucket] = await bus.kv(bucket, ttl=ttl)
    return store
