-- The completion log (seed: idempotency_log, completions_cache). Every write is an UPSERT or
-- guarded by a unique key, so retries and replays from the outbox never duplicate anything.

CREATE TABLE IF NOT EXISTS chat_log (
    trace_id          text        PRIMARY KEY,
    req_id            text        NOT NULL,
    idempotency_key   text,
    route             text        NOT NULL DEFAULT 'direct',
    dialect           text        NOT NULL,
    model             text        NOT NULL,
    backend           text,
    upstream_model    text,
    stream            boolean     NOT NULL,
    status            text        NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'cancelled')),
    request           jsonb       NOT NULL,
    result            jsonb,
    error             jsonb,
    finish_reason     text,
    prompt_tokens     integer,
    completion_tokens integer,
    ttft_ms           real,
    total_ms          real,
    last_seq          integer     NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS chat_log_req_id ON chat_log (req_id);
CREATE INDEX IF NOT EXISTS chat_log_created_at ON chat_log (created_at);

-- One row per Idempotency-Key (and per cacheable req_id, keyed 'cache:<req_id>'): which
-- trace answers it. A failed or cancelled attempt may be taken over by a retry.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key        text        PRIMARY KEY,
    req_id     text        NOT NULL,
    trace_id   text        NOT NULL,
    status     text        NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'cancelled')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS completions_cache (
    req_id     text        PRIMARY KEY,
    model      text        NOT NULL,
    trace_id   text        NOT NULL,
    result     jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS completions_cache_expires ON completions_cache (expires_at);
