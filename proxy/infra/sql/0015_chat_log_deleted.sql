-- A response its client deleted (`DELETE /v1/responses/{id}`): its row stays, emptied of
-- what it said and was asked, so that every reader (read back, continued, resumed, replayed
-- for its Idempotency-Key) tells it apart from a run whose row is not written yet, and a late
-- write of its outcome cannot bring it back. Nullable without a default: no table rewrite.
ALTER TABLE chat_log ADD COLUMN IF NOT EXISTS deleted_at timestamptz;
