-- A batch's model: the one model all its lines name (OpenAI's `Batch.model`), set once its
-- input file is validated.
ALTER TABLE batches ADD COLUMN IF NOT EXISTS model text;
-- How long after they are written its output and error files are kept (OpenAI's
-- `output_expires_after`; NULL: until deleted). An expired file is deleted by the batch runner.
ALTER TABLE batches ADD COLUMN IF NOT EXISTS output_expires_seconds integer;
CREATE INDEX IF NOT EXISTS files_expiring ON files (expires_at) WHERE expires_at IS NOT NULL;
-- A line of an output file as it was answered, its keys in their order (jsonb sorts them).
ALTER TABLE batch_lines ALTER COLUMN output TYPE json USING output::json;
-- Of each line's tokens, those read from the backend's prompt cache and those spent reasoning
-- (a batch's `usage.input_tokens_details.cached_tokens`, `output_tokens_details.reasoning_tokens`).
ALTER TABLE batch_lines ADD COLUMN IF NOT EXISTS cached_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE batch_lines ADD COLUMN IF NOT EXISTS reasoning_tokens bigint NOT NULL DEFAULT 0;
