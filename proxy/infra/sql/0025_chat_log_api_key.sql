-- The API key a request was made with: a workflow's row left running by a gateway killed while
-- it relayed the job takes its worker's outcome from another gateway's sweep
-- (`settle_orphaned_workflows`), which charges that key what the run spent (its own gateway,
-- killed, never did). Nullable without a default: no table rewrite; no key, no charge.
ALTER TABLE chat_log ADD COLUMN IF NOT EXISTS api_key_id bigint;
