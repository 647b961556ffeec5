-- OpenAI's Conversations API (`/v1/conversations`): a conversation, whose (`key-<id>`; NULL
-- with auth off), and its items, one row each, in the order they were added (`seq`, from one
-- sequence: an append locks its conversation's row first, so one conversation's items are
-- numbered in the order their appends committed). A listing page is an index scan.
CREATE TABLE IF NOT EXISTS conversations (
    id text PRIMARY KEY,
    tenant text,
    metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS conversation_items (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    id text NOT NULL,
    item jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- A response's items are named after it: appended twice (its answer replayed), kept once.
    UNIQUE (conversation_id, id)
);
CREATE INDEX IF NOT EXISTS conversation_items_by_conversation ON conversation_items (conversation_id, seq);
-- An `item_reference` names an item by its id alone.
CREATE INDEX IF NOT EXISTS conversation_items_by_id ON conversation_items (id);
