-- Keys whose run has ended, by when it did: they are purged once older than the retention
-- (`idempotency_retention_seconds`), a bounded batch after each group commit that writes keys.
-- Partial: a `running` key is never purged, and the index holds none of them.
CREATE INDEX IF NOT EXISTS idempotency_keys_settled ON idempotency_keys (updated_at) WHERE status <> 'running';
