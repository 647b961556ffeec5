-- A budget reserves tokens at admission, as the token bucket does (0012): N requests admitted
-- at once each saw the period's count under the budget, and could overspend it N times what
-- each used. Now an admission also reserves `p_budget_reserve` tokens (the request's prompt
-- estimate and its max output tokens) in the period's count, or what is left of the budget if
-- that is less: a key is admitted while its count (usage plus reservations of requests in
-- flight) is under the budget, as before, so a big budget with small requests behaves as it
-- did, and the request that takes the last of the budget is the only one that may pass it.
-- `p_release_budget`: reservations given back (requests ended: their usage is in
-- `p_settle_budget`), made in the period that started at `p_released_from` (epoch seconds):
-- a period's end drops its reservations with its count, so those of a period that has ended
-- are not taken from the next one's count. A reservation never given back (its process was
-- killed) counts as usage until the period ends.

-- A period's count (`counted`, of the period that started at `start`) at `at`, after `used`
-- more tokens and `released` reserved in the period that started at `released_from` given back.
CREATE OR REPLACE FUNCTION api_key_budget_used(
    start timestamptz, counted bigint, period interval, at timestamptz,
    used bigint, released bigint, released_from double precision
)
RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT greatest(0,
        CASE WHEN s IS DISTINCT FROM start THEN 0 ELSE counted END + used
        - CASE WHEN released > 0 AND abs(extract(epoch FROM s) - released_from) < 0.001 THEN released ELSE 0 END)
    FROM api_key_budget_start(start, period, at) AS s
$$;

CREATE OR REPLACE FUNCTION api_key_admit(
    p_key bigint, p_rpm integer, p_tpm integer, p_settle integer, p_settle_tokens bigint, p_reserve integer,
    p_budget bigint, p_period interval, p_settle_budget bigint, p_budget_reserve bigint,
    p_release_budget bigint, p_released_from double precision
)
RETURNS TABLE (
    allowed boolean, now_s double precision, requests_at double precision, tokens_at double precision,
    budget_used bigint, budget_reset double precision, budget_reserved bigint, budget_start double precision
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
    br bigint := 0;
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
        bu := api_key_budget_used(bs, bu, p_period, ts, p_settle_budget, p_release_budget, p_released_from);
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
        IF p_budget IS NOT NULL AND p_budget_reserve > 0 THEN
            br := least(p_budget_reserve, p_budget - bu);
            bu := bu + br;
        END IF;
    END IF;
    IF ok OR p_settle <> 0 OR p_settle_tokens <> 0
        OR (p_budget IS NOT NULL AND (p_settle_budget <> 0 OR p_release_budget <> 0 OR nb IS DISTINCT FROM bs)) THEN
        UPDATE api_key_limits l SET requests_at = r, tokens_at = k, budget_start = nb, budget_used = bu
            WHERE l.key_id = p_key;
    END IF;
    RETURN QUERY SELECT ok, t, r, k, bu,
        CASE WHEN p_budget IS NULL THEN NULL ELSE extract(epoch FROM nb + p_period)::double precision END, br,
        CASE WHEN p_budget IS NULL THEN NULL ELSE extract(epoch FROM nb)::double precision END;
END
$$;
