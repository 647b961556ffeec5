-- The run whose answer a semantic-cache entry holds, so that deleting that response
-- (`DELETE /v1/responses/{id}`) deletes its entries too: else a similar question would still
-- be answered with the deleted text. NULL for entries stored before this column existed.
-- Indexed: a delete finds them without scanning a cache that holds `ttl_seconds` of answers
-- (each store already pays for the HNSW index; a btree entry is small beside it).
ALTER TABLE semantic_cache ADD COLUMN IF NOT EXISTS trace_id text;
CREATE INDEX IF NOT EXISTS semantic_cache_trace ON semantic_cache (trace_id) WHERE trace_id IS NOT NULL;
