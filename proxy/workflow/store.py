"""`workflow_runs`: one row per job (migration 0005), written with UPSERTs only.

A row reaches a final state (completed, failed, cancelled) once; later writes for the same
trace (a redelivered job, a slow duplicate) find it final and change nothing, and learn the
stored outcome instead — which is what they then announce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.dialects.events import Finished
from proxy.domain.chat import ChatCompletion, Usage
from proxy.domain.errors import GatewayError
from proxy.infra.chat_store import completion_to_json
from proxy.infra.postgres import Database, json_text, plain_text
from proxy.workflow.job import Job, request_to_json


@dataclass(slots=True)
class RunOutcome:
    status: str  # completed | failed | cancelled
    reason: str  # the finish reason; "error" / "cancelled" for the others
    winner: str | None = None
    completion: ChatCompletion | None = None
    data: dict[str, Any] = field(default_factory=dict)
    error: GatewayError | None = None
    spent: Usage | None = None  # a cancelled or failed run's model calls until its end

    @property
    def finished(self) -> Finished:
        return Finished(self.reason, self.status, self.winner)


_START = """
INSERT INTO workflow_runs (trace_id, req_id, request_id, correlation_id, pipeline, status, attempts,
                           worker, request, submitted_at, started_at)
VALUES (%s, %s, %s, %s, %s, 'running', %s, %s, %s::jsonb, to_timestamp(%s), now())
ON CONFLICT (trace_id) DO UPDATE
   SET attempts = GREATEST(workflow_runs.attempts, EXCLUDED.attempts),
       worker = EXCLUDED.worker, started_at = now(), updated_at = now()
 WHERE workflow_runs.status = 'running'
RETURNING status
"""

_FINISH = """
INSERT INTO workflow_runs (trace_id, req_id, request_id, correlation_id, pipeline, status, attempts,
                           worker, winner, finish_reason, content, result, data, error,
                           prompt_tokens, completion_tokens, request, submitted_at, finished_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s::jsonb, %s, %s,
        %s::jsonb, to_timestamp(%s), now())
ON CONFLICT (trace_id) DO UPDATE
   SET status = EXCLUDED.status,
       attempts = GREATEST(workflow_runs.attempts, EXCLUDED.attempts),
       worker = EXCLUDED.worker, winner = EXCLUDED.winner, finish_reason = EXCLUDED.finish_reason,
       content = EXCLUDED.content, result = EXCLUDED.result, data = EXCLUDED.data,
       error = EXCLUDED.error, prompt_tokens = EXCLUDED.prompt_tokens,
       completion_tokens = EXCLUDED.completion_tokens, finished_at = now(), updated_at = now()
 WHERE workflow_runs.status = 'running'
RETURNING status
"""

_STORED = "SELECT status, finish_reason, winner FROM workflow_runs WHERE trace_id = %s"


class RunStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def start(self, job: Job, attempt: int, worker: str) -> Finished | None:
        """Record that `attempt` runs; if the run already ended, its final event instead."""
        row = await self._db.fetchrow(
            _START,
            (job.trace_id, job.req_id, job.request_id, job.correlation_id, job.pipeline, attempt, worker,
             json_text(request_to_json(job.request)), job.submitted_at),
        )
        return None if row is not None else await self._stored(job.trace_id)

    async def finish(self, job: Job, attempt: int, worker: str, outcome: RunOutcome) -> Finished:
        """Store the outcome unless the run already ended; the run's final event either way."""
        completion = outcome.completion
        choice = completion.choices[0] if completion and completion.choices else None
        usage = completion.usage if completion else outcome.spent
        error = None if outcome.error is None else {
            "kind": outcome.error.kind.name, "message": outcome.error.message, "code": outcome.error.code,
        }
        row = await self._db.fetchrow(
            _FINISH,
            (job.trace_id, job.req_id, job.request_id, job.correlation_id, job.pipeline, outcome.status, attempt,
             worker, outcome.winner, outcome.reason, plain_text(choice.content) if choice else None,
             json_text(completion_to_json(completion)) if completion else None, json_text(outcome.data),
             json_text(error) if error else None, usage.prompt_tokens if usage else None,
             usage.completion_tokens if usage else None, json_text(request_to_json(job.request)), job.submitted_at),
        )
        if row is not None:
            return outcome.finished
        stored = await self._stored(job.trace_id)
        return stored if stored is not None else outcome.finished

    async def _stored(self, trace_id: str) -> Finished | None:
        row = await self._db.fetchrow(_STORED, (trace_id,))
        if row is None or row[0] == "running":
            return None
        status, reason, winner = row
        return Finished(reason or ("stop" if status == "completed" else status), status, winner)

