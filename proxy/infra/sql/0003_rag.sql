-- Retrieval-augmented generation (workspaces, documents, chunks) and the semantic cache.
-- Vectors are all-MiniLM-L6-v2's: 384 dimensions, unit length, compared by cosine distance.

CREATE TABLE IF NOT EXISTS rag_workspaces (
    id         bigserial   PRIMARY KEY,
    name       text        NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    -- Full-text search configuration of the workspace's chunks (and of queries against them).
    language   regconfig   NOT NULL DEFAULT 'english',
    -- Per-workspace retrieval overrides: top_k, score_threshold, candidates.
    settings   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Bumped by every document change; semantic-cache entries of an older revision are stale.
    revision   bigint      NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS rag_documents (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    workspace_id bigint      NOT NULL REFERENCES rag_workspaces (id) ON DELETE CASCADE,
    -- The document's identity within its workspace: a file path, a URL, or a name the client
    -- chose (defaults to the content hash). Ingesting the same source again replaces it.
    source       text        NOT NULL,
    -- sha256 of the extracted text; with `chunker` it decides whether a re-ingest is a no-op.
    content_hash text        NOT NULL,
    chunker      text        NOT NULL,
    media_type   text        NOT NULL,
    metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    chars        integer     NOT NULL,
    chunk_count  integer     NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, source)
);

CREATE TABLE IF NOT EXISTS rag_chunks (
    id            bigserial PRIMARY KEY,
    -- Denormalised from the document so that every retrieval query filters on it directly.
    workspace_id  bigint    NOT NULL REFERENCES rag_workspaces (id) ON DELETE CASCADE,
    document_id   uuid      NOT NULL REFERENCES rag_documents (id) ON DELETE CASCADE,
    ordinal       integer   NOT NULL,
    -- The Markdown heading path the chunk sits under ("Install > Linux"), or ''.
    heading       text      NOT NULL DEFAULT '',
    content       text      NOT NULL,
    embedding     vector(384) NOT NULL,
    language      regconfig NOT NULL DEFAULT 'english',
    tsv           tsvector  GENERATED ALWAYS AS (
                      setweight(to_tsvector(language, heading), 'A') || to_tsvector(language, content)
                  ) STORED,
    -- Per-token vectors for the MaxSim rerank, computed at ingest (int8 rows + scales; see
    -- proxy/infra/rag_store.py), so a query never re-encodes its candidates.
    token_vectors bytea     NOT NULL,
    UNIQUE (document_id, ordinal)
);
CREATE INDEX IF NOT EXISTS rag_chunks_embedding ON rag_chunks
    USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64);
CREATE INDEX IF NOT EXISTS rag_chunks_tsv ON rag_chunks USING gin (tsv);
CREATE INDEX IF NOT EXISTS rag_chunks_workspace ON rag_chunks (workspace_id);

-- Completions keyed by the meaning of the whole conversation (see
-- proxy/services/semantic_cache.py). `scope` is the exact part of the key (model, generation
-- parameters, tools, workspace and its revision, the conversation's shape); `embedding` finds candidates
-- within a scope, `segments` verifies every message of a candidate.
CREATE TABLE IF NOT EXISTS semantic_cache (
    id           bigserial   PRIMARY KEY,
    scope        text        NOT NULL,
    model        text        NOT NULL,
    workspace    text,
    embedding    vector(384) NOT NULL,
    segments     bytea       NOT NULL,
    conversation text        NOT NULL,
    completion   jsonb       NOT NULL,
    hits         integer     NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    UNIQUE (scope, conversation)
);
CREATE INDEX IF NOT EXISTS semantic_cache_scope ON semantic_cache (scope, expires_at);
CREATE INDEX IF NOT EXISTS semantic_cache_expires ON semantic_cache (expires_at);
CREATE INDEX IF NOT EXISTS semantic_cache_embedding ON semantic_cache
    USING hnsw (embedding vector_cosine_ops);
