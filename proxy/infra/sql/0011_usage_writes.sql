-- Exactly-once usage: each usage writer (one per gateway process) numbers its batches, and a
-- batch is applied only if its number is beyond the last one applied for that writer. A
-- batch whose write timed out (applied or not: unknown) is retried with its number, and one
-- left in a stopped gateway's spool file is replayed with it, so neither counts twice.
CREATE TABLE IF NOT EXISTS api_key_usage_writes (
    writer     text        PRIMARY KEY,
    seq        bigint      NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now()
);
