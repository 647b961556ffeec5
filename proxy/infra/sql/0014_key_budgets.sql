-- Token budgets per key: at most `budget` tokens (prompt + completion, as usage records them)
-- per `budget_period`, after which the key is refused until the period resets. Periods are
-- fixed windows from `api_key_limits.budget_start` (set when the budget is given), so every
-- gateway process sees the same reset time; the count lives beside the rate-limit buckets,
-- locked and rolled by the same admission call.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS budget bigint CHECK (budget > 0);
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS budget_period interval NOT NULL DEFAULT interval '30 days'
    CHECK (budget_period >= interval '1 minute');

ALTER TABLE api_key_limits ADD COLUMN IF NOT EXISTS budget_start timestamptz;
ALTER TABLE api_key_limits ADD COLUMN IF NOT EXISTS budget_used bigint NOT NULL DEFAULT 0;

-- The start of the period `at` falls in, for periods of `period` from `start` (NULL: a budget
-- never counted yet starts its first period at `at`).
CREATE OR REPLACE FUNCTION api_key_budget_start(start timestamptz, period interval, at timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN start IS NULL THEN at
        WHEN at < start + period THEN start
        ELSE start + period * floor(extract(epoch FROM at - start) / extract(epoch FROM period))
    END
$$;

-- 0012's admission, with the key's budget: refused, taking nothing, once the period's usage
-- has reached `p_budget` (NULL: no budget). `p_settle_budget`: tokens the calling process has
-- recorded for the key that the count has not seen yet (so that its next request sees them).
-- A request admitted under the budget finishes whatever it uses; the next one is refused.
CREATE OR REPLACE FUNCTION api_key_admit(
    p_key bigint, p_rpm integer, p_tpm integer, p_settle integer, p_settle_tokens bigint, p_reserve integer,
    p_budget bigint, p_period interval, p_settle_budget bigint
)
RETURNS TABLE (
    allowed boolean, now_s double precision, requests_at double precision, tokens_at double precision,
    budget_used bigint, budget_reset double precision
)
LANGUAGE plpgsql AS $$
DECLARE
    ts timestamptz;
    t  double precision;
    r  double precision;
    k  double precision;
    nr double precision;
    nk double precision;
    bs timestamptz;
    nb timestamptz;
    bu bigint;
    ok boolean := true;
BEGIN
    SELECT l.requests_at, l.tokens_at, l.budget_start, l.budget_used INTO r, k, bs, bu
        FROM api_key_limits l WHERE l.key_id = p_key FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO api_key_limits (key_id) VALUES (p_key) ON CONFLICT (key_id) DO NOTHING;
        SELECT l.requests_at, l.tokens_at, l.budget_start, l.budget_used INTO r, k, bs, bu
            FROM api_key_limits l WHERE l.key_id = p_key FOR UPDATE;
    END IF;
    ts := clock_timestamp();
    t := extract(epoch FROM ts);
    IF p_rpm IS NOT NULL AND p_settle > 0 THEN
        r := greatest(r, t) + p_settle * 60.0 / p_rpm;
    ELSIF p_rpm IS NOT NULL AND p_settle < 0 THEN
        r := r + p_settle * 60.0 / p_rpm;
    END IF;
    IF p_tpm IS NOT NULL AND p_settle_tokens > 0 THEN
        k := greatest(k, t) + p_settle_tokens * 60.0 / p_tpm;
    ELSIF p_tpm IS NOT NULL AND p_settle_tokens < 0 THEN
        k := k + p_settle_tokens * 60.0 / p_tpm;
    END IF;
    r := greatest(r, t);
    k := greatest(k, t);
    nb := bs;
    IF p_budget IS NOT NULL THEN
        nb := api_key_budget_start(bs, p_period, ts);
        IF nb IS DISTINCT FROM bs THEN
            bu := 0;
        END IF;
        bu := bu + p_settle_budget;
        IF bu >= p_budget THEN
            ok := false;
        END IF;
    END IF;
    nk := k;
    IF p_tpm IS NOT NULL THEN
        IF p_reserve > 0 THEN
            nk := k + least(p_reserve, p_tpm) * 60.0 / p_tpm;
            IF nk - t > 60 + 1e-6 THEN
                ok := false;
            END IF;
        ELSIF k - t >= 60 THEN
            ok := false;
        END IF;
    END IF;
    IF p_rpm IS NOT NULL THEN
        nr := r + 60.0 / p_rpm;
        IF nr - t > 60 + 1e-6 THEN
            ok := false;
        END IF;
        IF ok THEN
            r := nr;
        END IF;
    END IF;
    IF ok THEN
        k := nk;
    END IF;
    IF ok OR p_settle <> 0 OR p_settle_tokens <> 0
        OR (p_budget IS NOT NULL AND (p_settle_budget <> 0 OR nb IS DISTINCT FROM bs)) THEN
        UPDATE api_key_limits l SET requests_at = r, tokens_at = k, budget_start = nb, budget_used = bu
            WHERE l.key_id = p_key;
    END IF;
    RETURN QUERY SELECT ok, t, r, k, bu,
        CASE WHEN p_budget IS NULL THEN NULL ELSE extract(epoch FROM nb + p_period)::double precision END;
END
$$;
