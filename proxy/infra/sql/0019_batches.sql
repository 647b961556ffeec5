-- OpenAI's Files and Batch APIs (`/v1/files`, `/v1/batches`): a file's bytes, a batch, and
-- each line of a batch answered (one row per input line, written as the line ends: a batch
-- resumed after its process died runs only the lines without one, and the output holds each
-- line once). Files and batches are their tenant's (`key-<id>`; NULL with auth off).
CREATE TABLE IF NOT EXISTS files (
    seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    id text PRIMARY KEY,
    tenant text,
    purpose text NOT NULL,
    filename text NOT NULL,
    bytes bigint NOT NULL,
    content bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz
);
CREATE INDEX IF NOT EXISTS files_by_tenant ON files (tenant, seq);

CREATE TABLE IF NOT EXISTS batches (
    seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    id text PRIMARY KEY,
    tenant text,
    key_id bigint,  -- whose limits, budget and scope its lines run under (NULL: auth off)
    endpoint text NOT NULL,
    input_file_id text NOT NULL,
    completion_window text NOT NULL,
    metadata jsonb,
    status text NOT NULL,
    -- The gateway instance running it (`gateway_instances`); NULL: nobody, any may take it.
    owner text,
    errors jsonb,
    total integer NOT NULL DEFAULT 0,
    output_file_id text,
    error_file_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    in_progress_at timestamptz,
    finalizing_at timestamptz,
    completed_at timestamptz,
    failed_at timestamptz,
    cancelling_at timestamptz,
    cancelled_at timestamptz,
    expired_at timestamptz
);
CREATE INDEX IF NOT EXISTS batches_by_tenant ON batches (tenant, seq);
CREATE INDEX IF NOT EXISTS batches_active ON batches (owner)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');

CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id text NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    line integer NOT NULL,  -- 1-based, in the input file
    ok boolean NOT NULL,  -- a 2xx answer (the output file); otherwise the error file
    output jsonb NOT NULL,  -- the line of the output or error file
    input_tokens bigint NOT NULL DEFAULT 0,
    output_tokens bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, line)
);
