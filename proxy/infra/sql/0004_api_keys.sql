-- API keys (issue 7): stored as sha256 digests, never in the clear; scopes; per-key rate-limit
-- state shared by every gateway process; usage per key and hour.

-- Bumped on every insert and update of a key, so a gateway's in-memory copy can tell cheaply
-- whether anything changed (see proxy.infra.keys_store.KeysStore.fingerprint).
CREATE SEQUENCE IF NOT EXISTS api_keys_revision_seq;

CREATE TABLE IF NOT EXISTS api_keys (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    -- The key's first characters: not secret, enough to tell keys apart in listings.
    prefix      text        NOT NULL UNIQUE,
    -- sha256 of the whole key. The key is 256 random bits, so a plain digest is safe.
    digest      bytea       NOT NULL UNIQUE CHECK (length(digest) = 32),
    -- Glob patterns (`*` only). NULL: every model / every workspace.
    models      text[],
    workspaces  text[],
    rpm         integer     CHECK (rpm > 0),
    tpm         integer     CHECK (tpm > 0),
    admin       boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz,
    revision    bigint      NOT NULL DEFAULT nextval('api_keys_revision_seq')
);

CREATE OR REPLACE FUNCTION api_keys_bump_revision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.revision := nextval('api_keys_revision_seq');
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS api_keys_bump_revision ON api_keys;
CREATE TRIGGER api_keys_bump_revision BEFORE UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_bump_revision();

-- Gateways LISTEN on this channel and reload their keys at once (delivered on commit), so a
-- revocation takes effect immediately, whoever made it (the CLI, or plain SQL).
CREATE OR REPLACE FUNCTION api_keys_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('llm_proxy_api_keys', NEW.id::text);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS api_keys_notify ON api_keys;
CREATE TRIGGER api_keys_notify AFTER INSERT OR UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_notify();

-- Rate-limit state: one row per key, two GCRA "theoretical arrival times" in epoch seconds.
-- A bucket of capacity C refilled over 60 s is full when its time is <= now, and each unit
-- spent pushes the time 60/C seconds further; it is empty once the time is 60 s ahead.
CREATE TABLE IF NOT EXISTS api_key_limits (
    key_id      bigint           PRIMARY KEY REFERENCES api_keys (id),
    requests_at double precision NOT NULL DEFAULT 0,
    tokens_at   double precision NOT NULL DEFAULT 0
);

-- Admit one request of a key with these limits (NULL: unlimited), atomically across every
-- process sharing the database: takes a request from the request bucket if both the request
-- bucket has room and the token bucket is not empty (tokens are charged after the exchange,
-- by api_key_spend). Returns the decision and the state after it, with the database's clock.
CREATE OR REPLACE FUNCTION api_key_admit(p_key bigint, p_rpm integer, p_tpm integer)
RETURNS TABLE (allowed boolean, now_s double precision, requests_at double precision, tokens_at double precision)
LANGUAGE plpgsql AS $$
DECLARE
    t  double precision := extract(epoch FROM clock_timestamp());
    r  double precision;
    k  double precision;
    nr double precision;
    ok boolean := true;
BEGIN
    SELECT l.requests_at, l.tokens_at INTO r, k FROM api_key_limits l WHERE l.key_id = p_key FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO api_key_limits (key_id) VALUES (p_key) ON CONFLICT (key_id) DO NOTHING;
        SELECT l.requests_at, l.tokens_at INTO r, k FROM api_key_limits l WHERE l.key_id = p_key FOR UPDATE;
    END IF;
    r := greatest(r, t);
    k := greatest(k, t);
    IF p_tpm IS NOT NULL AND k - t >= 60 THEN
        ok := false;
    END IF;
    IF p_rpm IS NOT NULL THEN
        nr := r + 60.0 / p_rpm;
        IF nr - t > 60 + 1e-6 THEN
            ok := false;
        END IF;
        IF ok THEN
            UPDATE api_key_limits l SET requests_at = nr WHERE l.key_id = p_key;
            r := nr;
        END IF;
    END IF;
    RETURN QUERY SELECT ok, t, r, k;
END
$$;

-- Usage per key and hour, written in batches by each gateway process.
CREATE TABLE IF NOT EXISTS api_key_usage (
    key_id            bigint      NOT NULL REFERENCES api_keys (id),
    hour              timestamptz NOT NULL,
    requests          bigint      NOT NULL DEFAULT 0,
    errors            bigint      NOT NULL DEFAULT 0,
    prompt_tokens     bigint      NOT NULL DEFAULT 0,
    completion_tokens bigint      NOT NULL DEFAULT 0,
    last_used_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_id, hour)
);
