-- Bookkeeping for proxy.infra.migrations, and pgvector for the embedding tables that follow.
-- Every migration runs in its own transaction under an advisory lock; see migrations.py.

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
