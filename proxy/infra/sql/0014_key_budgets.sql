-- Token budgets per key: at most `budget` tokens (prompt + completion, as usage records them)
-- per `budget_period`, after which the key is refused until the period resets. Periods are
-- fixed windows from `api_key_limits.budget_start` (set when the budget is given), so every
-- gateway process sees the same reset time; the count lives beside the rate-limit buckets,
-- locked and rolled by the same admission call.
--
-- As the token bucket does (0012), an admission reserves the request's estimate (its prompt and
-- max output tokens), or what is left of the budget if that is less, so N requests admitted at
-- once cannot overspend the budget N times: a key is admitted while its settled usage plus the
-- reservations of requests in flight is under the budget, and the request that takes the last
-- of it is the only one that may pass it. Reservations (`budget_reserved`) are counted apart
-- from settled usage (`budget_used`): a key whose budget is only held by requests in flight is
-- told to retry in a moment, not that its budget is spent until the period ends. A reservation
-- never given back (its process was killed) is held until the period ends. Settled usage
-- carries the time it happened (epoch seconds) and counts only in the period that time falls
-- in: usage written late (a spool replayed, a batch retried after the period rolled) is not
-- charged to the next period.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS budget bigint CHECK (budget > 0);
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS budget_period interval NOT NULL DEFAULT interval '30 days'
    CHECK (budget_period >= interval '1 minute');

ALTER TABLE api_key_limits ADD COLUMN IF NOT EXISTS budget_start timestamptz;
ALTER TABLE api_key_limits ADD COLUMN IF NOT EXISTS budget_used bigint NOT NULL DEFAULT 0;
ALTER TABLE api_key_limits ADD COLUMN IF NOT EXISTS budget_reserved bigint NOT NULL DEFAULT 0;

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

-- The period's settled count (`counted`, of the period that started at `start`) at `at`, after
-- `used` more tokens used at `used_at` (NULL: unknown, counted now): counted
-- only if used since the current period started (usage before it is of a period that ended).
CREATE OR REPLACE FUNCTION api_key_budget_settled(
    start timestamptz, counted bigint, period interval, at timestamptz, used bigint, used_at double precision
)
RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT greatest(0,
        CASE WHEN s IS DISTINCT FROM start THEN 0 ELSE counted END
        + CASE WHEN used = 0 THEN 0
               WHEN used_at IS NULL OR start IS NULL THEN used
               WHEN to_timestamp(used_at) >= s THEN used
               ELSE 0 END)
    FROM api_key_budget_start(start, period, at) AS s
$$;

-- The period's reservations (`held`) at `at`, after `released` reserved in the period that
-- started at `released_from` given back (a period's end dropped its reservations).
CREATE OR REPLACE FUNCTION api_key_budget_held(
    start timestamptz, held bigint, period interval, at timestamptz, released bigint, released_from double precision
)
RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT greatest(0,
        CASE WHEN s IS DISTINCT FROM start THEN 0 ELSE held END
        - CASE WHEN released > 0 AND abs(extract(epoch FROM s) - released_from) < 0.001 THEN released ELSE 0 END)
    FROM api_key_budget_start(start, period, at) AS s
$$;

-- 0012's admission with the key's budget: usage (`p_settle_budget`, used at `p_settled_at`) and
-- reservations (`budget_held`) apart, refused while both together have reached `p_budget` (NULL:
-- no budget). `p_budget_reserve`: what this request reserves; `p_release_budget`: reservations
-- given back (requests ended: their usage is in `p_settle_budget`), made in the period that
-- started at `p_released_from` (epoch seconds): a period's end drops its reservations with its
-- count, so those of a period that has ended are not taken from the next one's.
CREATE OR REPLACE FUNCTION api_key_admit(
    p_key bigint, p_rpm integer, p_tpm integer, p_settle integer, p_settle_tokens bigint, p_reserve integer,
    p_budget bigint, p_period interval, p_settle_budget bigint, p_settled_at double precision,
    p_budget_reserve bigint, p_release_budget bigint, p_released_from double precision
)
RETURNS TABLE (
    allowed boolean, now_s double precision, requests_at double precision, tokens_at double precision,
    budget_used bigint, budget_reset double precision, budget_reserved bigint, budget_start double precision,
    budget_held bigint
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
    bh bigint;
    br bigint := 0;
    ok boolean := true;
BEGIN
    SELECT l.requests_at, l.tokens_at, l.budget_start, l.budget_used, l.budget_reserved INTO r, k, bs, bu, bh
        FROM api_key_limits l WHERE l.key_id = p_key FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO api_key_limits (key_id) VALUES (p_key) ON CONFLICT (key_id) DO NOTHING;
        SELECT l.requests_at, l.tokens_at, l.budget_start, l.budget_used, l.budget_reserved INTO r, k, bs, bu, bh
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
        bu := api_key_budget_settled(bs, bu, p_period, ts, p_settle_budget, p_settled_at);
        bh := api_key_budget_held(bs, bh, p_period, ts, p_release_budget, p_released_from);
        IF bu + bh >= p_budget THEN
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
        IF p_budget IS NOT NULL AND p_budget_reserve > 0 THEN
            br := least(p_budget_reserve, p_budget - bu - bh);
            bh := bh + br;
        END IF;
    END IF;
    IF ok OR p_settle <> 0 OR p_settle_tokens <> 0
        OR (p_budget IS NOT NULL AND (p_settle_budget <> 0 OR p_release_budget <> 0 OR nb IS DISTINCT FROM bs)) THEN
        UPDATE api_key_limits l
            SET requests_at = r, tokens_at = k, budget_start = nb, budget_used = bu, budget_reserved = bh
            WHERE l.key_id = p_key;
    END IF;
    RETURN QUERY SELECT ok, t, r, k, bu,
        CASE WHEN p_budget IS NULL THEN NULL ELSE extract(epoch FROM nb + p_period)::double precision END, br,
        CASE WHEN p_budget IS NULL THEN NULL ELSE extract(epoch FROM nb)::double precision END, bh;
END
$$;
