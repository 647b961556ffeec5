-- Workflow runs (issue 5): one row per pipeline job, keyed by its trace. Written by workers
-- with UPSERTs only: the start of every attempt, then the outcome once. A row in a final
-- state is never changed again, so a redelivered job that finds one only re-announces it.

CREATE TABLE IF NOT EXISTS workflow_runs (
    trace_id          text        PRIMARY KEY,
    req_id            text        NOT NULL,
    request_id        text        NOT NULL,
    correlation_id    text,
    pipeline          text        NOT NULL,
    status            text        NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'cancelled')),
    attempts          integer     NOT NULL DEFAULT 1,
    worker            text,
    winner            text,
    finish_reason     text,
    content           text,
    result            jsonb,
    data              jsonb,
    error             jsonb,
    prompt_tokens     integer,
    completion_tokens integer,
    request           jsonb       NOT NULL,
    submitted_at      timestamptz NOT NULL,
    started_at        timestamptz,
    finished_at       timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS workflow_runs_req_id ON workflow_runs (req_id);
CREATE INDEX IF NOT EXISTS workflow_runs_pipeline_submitted ON workflow_runs (pipeline, submitted_at);
