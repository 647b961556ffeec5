-- A batch's request counts and token sums (`request_counts`, `usage`), kept on its row: each
-- line adds its own in the statement that records it (a line recorded a second time, by
-- another process, adds nothing), so reading or listing batches does not sum their lines.
ALTER TABLE batches
    ADD COLUMN IF NOT EXISTS completed integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS failed integer NOT NULL DEFAULT 0,
    -- Of the failed, those recorded unrun at the batch's window's end (`batch_expired`).
    ADD COLUMN IF NOT EXISTS expired integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS input_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS output_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS cached_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS reasoning_tokens bigint NOT NULL DEFAULT 0;
UPDATE batches b SET completed = c.completed, failed = c.failed, expired = c.expired, input_tokens = c.input_tokens,
    output_tokens = c.output_tokens, cached_tokens = c.cached_tokens, reasoning_tokens = c.reasoning_tokens
FROM (
    SELECT batch_id, count(*) FILTER (WHERE ok) AS completed, count(*) FILTER (WHERE NOT ok) AS failed,
        count(*) FILTER (WHERE NOT ok AND output->'error'->>'code' = 'batch_expired') AS expired,
        sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, sum(cached_tokens) AS cached_tokens,
        sum(reasoning_tokens) AS reasoning_tokens
    FROM batch_lines GROUP BY batch_id
) c
WHERE c.batch_id = b.id;
-- A file's bytes stored as they are, not compressed: its download reads a slice at a time,
-- and a slice of a compressed value costs decompressing all that comes before it.
ALTER TABLE files ALTER COLUMN content SET STORAGE EXTERNAL;
