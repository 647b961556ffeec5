-- Budget reservations held in the name of the gateway process that made them, so that a
-- process killed with requests in flight does not hold its keys' budgets until their periods
-- end (up to 30 days: the key refused "held by requests in flight" all that time). Beside the
-- aggregate `budget_reserved`, the key's row keeps what each process holds
-- (`budget_holds`: {owner: [period start, epoch seconds; tokens]}), in the row the admission
-- already locks and writes: no other row, no other round trip. A process gives back only
-- what it holds (so a release that comes after its reservations were swept frees nothing
-- twice); the sweep of a dead process (`gateway_instances`, 0007) and a clean stop give back
-- what it still holds. The owner is the gateway process's instance id, also its usage
-- writer's name (`api_key_usage_writes.writer`), so that a batch of a stopped process replayed
-- from its spool gives back that process's reservations. Token-bucket (`--tpm`) reservations
-- need none of this: a charge never settled refills with the bucket within a minute (0012).
ALTER TABLE api_key_limits ADD COLUMN IF NOT EXISTS budget_holds jsonb;

-- Of `released` tokens `owner` gives back, reserved in the period that started at `period`
-- (epoch seconds), what it holds there (NULL owner: a gateway of before this migration, whose
-- reservations are in the aggregate alone).
CREATE OR REPLACE FUNCTION api_key_hold_released(holds jsonb, owner text, released bigint, period double precision)
RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN released <= 0 OR period IS NULL THEN 0
        WHEN owner IS NULL THEN released
        WHEN holds -> owner IS NULL OR abs((holds -> owner ->> 0)::double precision - period) >= 0.001 THEN 0
        ELSE least(released, (holds -> owner ->> 1)::bigint)
    END
$$;

-- `holds` after `owner` holds `delta` more tokens (negative: given back) in the period that
-- started at `period` (an entry of an earlier period is replaced); an entry at 0 goes, and
-- no entry at all is NULL.
CREATE OR REPLACE FUNCTION api_key_holds_after(holds jsonb, owner text, period double precision, delta bigint)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN owner IS NULL OR delta = 0 OR period IS NULL THEN holds
        ELSE nullif(
            CASE WHEN coalesce(held, 0) + delta > 0
                THEN coalesce(holds, '{}'::jsonb) || jsonb_build_object(owner, jsonb_build_array(period, held + delta))
                ELSE coalesce(holds, '{}'::jsonb) - owner END,
            '{}'::jsonb)
    END
    FROM (SELECT CASE WHEN holds -> owner IS NOT NULL AND abs((holds -> owner ->> 0)::double precision - period) < 0.001
                      THEN (holds -> owner ->> 1)::bigint ELSE 0 END AS held) AS h
$$;

-- What `owners` hold of the key's current period (`start`): given back when they are gone.
CREATE OR REPLACE FUNCTION api_key_holds_of(holds jsonb, owners text[], start timestamptz)
RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum((e.value ->> 1)::bigint), 0)::bigint
    FROM jsonb_each(holds) AS e
    WHERE e.key = ANY(owners) AND start IS NOT NULL
        AND abs((e.value ->> 0)::double precision - extract(epoch FROM start)::double precision) < 0.001
$$;

-- 0014's admission, its budget reservation and release made by `p_owner` (NULL: as 0014).
CREATE OR REPLACE FUNCTION api_key_admit(
    p_key bigint, p_rpm integer, p_tpm integer, p_settle integer, p_settle_tokens bigint, p_reserve integer,
    p_budget bigint, p_period interval, p_settle_budget bigint, p_settled_at double precision,
    p_budget_reserve bigint, p_release_budget bigint, p_released_from double precision, p_owner text
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
    hs jsonb;
    nh jsonb;
    rel bigint := 0;
    ok boolean := true;
BEGIN
    SELECT l.requests_at, l.tokens_at, l.budget_start, l.budget_used, l.budget_reserved, l.budget_holds
        INTO r, k, bs, bu, bh, hs
        FROM api_key_limits l WHERE l.key_id = p_key FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO api_key_limits (key_id) VALUES (p_key) ON CONFLICT (key_id) DO NOTHING;
        SELECT l.requests_at, l.tokens_at, l.budget_start, l.budget_used, l.budget_reserved, l.budget_holds
            INTO r, k, bs, bu, bh, hs
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
    nh := hs;
    IF p_budget IS NOT NULL THEN
        nb := api_key_budget_start(bs, p_period, ts);
        bu := api_key_budget_settled(bs, bu, p_period, ts, p_settle_budget, p_settled_at);
        IF nb IS DISTINCT FROM bs THEN
            nh := NULL;  -- a period's end drops every process's reservations with its count
        ELSE
            rel := api_key_hold_released(hs, p_owner, p_release_budget, p_released_from);
            nh := api_key_holds_after(hs, p_owner, p_released_from, -rel);
        END IF;
        bh := api_key_budget_held(bs, bh, p_period, ts, rel, p_released_from);
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
            nh := api_key_holds_after(nh, p_owner, extract(epoch FROM nb)::double precision, br);
        END IF;
    END IF;
    IF ok OR p_settle <> 0 OR p_settle_tokens <> 0
        OR (p_budget IS NOT NULL AND (p_settle_budget <> 0 OR p_release_budget <> 0 OR nb IS DISTINCT FROM bs)) THEN
        UPDATE api_key_limits l
            SET requests_at = r, tokens_at = k, budget_start = nb, budget_used = bu, budget_reserved = bh,
                budget_holds = nh
            WHERE l.key_id = p_key;
    END IF;
    RETURN QUERY SELECT ok, t, r, k, bu,
        CASE WHEN p_budget IS NULL THEN NULL ELSE extract(epoch FROM nb + p_period)::double precision END, br,
        CASE WHEN p_budget IS NULL THEN NULL ELSE extract(epoch FROM nb)::double precision END, bh;
END
$$;
