-- OpenAI's stored chat completions (`store: true` on `/v1/chat/completions`): a stored
-- completion is its journal row, marked by its settings (NULL for every other chat row), and
-- read back by the id its client was given, a backend's (`chatcmpl-…`), which only its answer
-- holds. Partial indexes: rows of chats without `store` pay only the predicate's test of two
-- columns at hand, and a deleted completion (its settings emptied) leaves both. (An outcome's
-- update of a `running` row was not a HOT update before either: `chat_log_running_owner`'s
-- predicate reads the status it changes.)
CREATE INDEX IF NOT EXISTS chat_log_stored_completion_id ON chat_log ((result->>'id'))
    WHERE dialect = 'openai' AND settings IS NOT NULL;
-- A key's stored completions in the order they are listed: when each was asked (its
-- settings' `made_at`, microseconds), since its row's `created_at` is its first write's, at
-- its start or at its end, and rows written in one group commit share it.
CREATE INDEX IF NOT EXISTS chat_log_stored_completions
    ON chat_log (tenant, ((settings->>'made_at')::bigint), trace_id)
    WHERE dialect = 'openai' AND settings IS NOT NULL;
