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
CREATE INDEX IF NOT EXISTS chat_log_running_owner ON chat_log (owner) WHERE status = 'running';
