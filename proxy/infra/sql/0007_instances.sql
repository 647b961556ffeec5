-- Gateway processes that hold running chats: each writes its heartbeat here, and its running
-- rows and idempotency keys carry its id (`owner`). One whose heartbeat stopped (killed,
-- crashed, its host gone) is swept by any live one: its running rows and keys become
-- `failed`, so a retry with the key runs again instead of waiting on a run that will never end.
CREATE TABLE IF NOT EXISTS gateway_instances (
    id         text        PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS owner text;
ALTER TABLE chat_log ADD COLUMN IF NOT EXISTS owner text;
CREATE INDEX IF NOT EXISTS idempotency_keys_running_owner ON idempotency_keys (owner) WHERE status = 'running';
-- A trace's key, for a reader of a trace whose process died before it wrote its row.
CREATE INDEX IF NOT EXISTS idempotency_keys_trace ON idempotency_keys (trace_id);
CREATE INDEX IF NOT EXISTS chat_log_running_owner ON chat_log (owner) WHERE status = 'running';
-- What a gateway of before this migration left running has no owner to be swept by: its
-- process is gone (or, in a rolling upgrade, writes its outcome over this). A workflow's
-- rows and keys are its workers' and keep no owner.
UPDATE chat_log SET status = 'failed', updated_at = now(),
    error = '{"kind": "UNAVAILABLE", "message": "The gateway process running it stopped (killed or crashed) before it completed."}'::jsonb
WHERE status = 'running' AND route <> 'workflow';
UPDATE idempotency_keys k SET status = 'failed', updated_at = now()
WHERE k.status = 'running'
    AND NOT EXISTS (SELECT 1 FROM chat_log c WHERE c.trace_id = k.trace_id AND c.route = 'workflow');
