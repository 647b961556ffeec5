-- A batch's model: the one model all its lines name (OpenAI's `Batch.model`), set once its
-- input file is validated.
ALTER TABLE batches ADD COLUMN IF NOT EXISTS model text;
