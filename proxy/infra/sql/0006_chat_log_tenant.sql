-- Whose chat it is (the API key, as `key-<id>`; NULL with auth off): stream resume and the
-- exact cache are scoped by it.
ALTER TABLE chat_log ADD COLUMN IF NOT EXISTS tenant text;
