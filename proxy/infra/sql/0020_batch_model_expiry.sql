-- A batch's model: the one model all its lines name (OpenAI's `Batch.model`), set once its
-- input file is validated.
ALTER TABLE batches ADD COLUMN IF NOT EXISTS model text;
-- How long after they are written its output and error files are kept (OpenAI's
-- `output_expires_after`; NULL: until deleted). An expired file is deleted by the batch runner.
ALTER TABLE batches ADD COLUMN IF NOT EXISTS output_expires_seconds integer;
CREATE INDEX IF NOT EXISTS files_expiring ON files (expires_at) WHERE expires_at IS NOT NULL;
-- A line of an output file as it was answered, its keys in their order (jsonb sorts them).
ALTER TABLE batch_lines ALTER COLUMN output TYPE json USING output::json;
