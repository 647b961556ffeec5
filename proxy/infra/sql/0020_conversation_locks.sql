-- A conversation's lock (OpenAI's `conversation_locked`): the run answering a response in it,
-- from the moment it starts until its answer is appended (or it fails, or is cancelled), so
-- that a second response in the same conversation meanwhile is refused instead of both
-- answering the conversation as it stood and both being appended. `lock_trace` is that run's
-- trace, `lock_owner` its gateway instance: a lock is free once its instance is gone (swept,
-- see 0007) or its run's row says it ended (a release lost to an outage heals itself).
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS lock_trace text;
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS lock_owner text;
