-- An Anthropic message batch's results are kept 29 days after it was created, as Anthropic
-- keeps them: then the batch is archived (`archived_at`), its requests (its input file), their
-- `custom_id`s and answers deleted; the batch itself, its counts and times, stays listed until
-- it is deleted. Nullable without a default: no table rewrite.
ALTER TABLE batches ADD COLUMN IF NOT EXISTS archived_at timestamptz;
-- The message batches not archived yet, oldest first: the batch runner's poll finds those due
-- without reading every batch. `batches` has a row per batch, not per request: a short build in
-- the migration's transaction, not `CONCURRENTLY`.
CREATE INDEX IF NOT EXISTS batches_to_archive ON batches (created_at) WHERE endpoint = '/v1/messages' AND archived_at IS NULL;
