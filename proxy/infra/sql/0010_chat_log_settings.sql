-- What a run's client asked that its answer echoes when it is read back later: a Responses
-- request's settings (instructions, tools, metadata, background, …) in the wire form its
-- Response carries. NULL for every other dialect (nothing to echo), so other rows pay nothing
-- but the null bitmap; nullable without a default, the column is added without a table rewrite.
ALTER TABLE chat_log ADD COLUMN IF NOT EXISTS settings jsonb;
