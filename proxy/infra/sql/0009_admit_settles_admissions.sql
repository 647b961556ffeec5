-- An admission also settles what the calling process holds for the key's request bucket:
-- admissions given back (requests refused 403 for the key's scope after admission) and,
-- after an outage, admissions it made alone. Before, only the usage writer settled them, a
-- moment later, so a request that came meanwhile could be refused (429) for requests that
-- had been given back. `p_settle` is their count (negative: given back), applied as the
-- usage writer applies it, then the admission is decided.
CREATE OR REPLACE FUNCTION api_key_admit(p_key bigint, p_rpm integer, p_tpm integer, p_settle integer)
RETURNS TABLE (allowed boolean, now_s double precision, requests_at double precision, tokens_at double precision)
LANGUAGE plpgsql AS $$
DECLARE
    t  double precision;
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
    t := extract(epoch FROM clock_timestamp());
    IF p_rpm IS NOT NULL AND p_settle > 0 THEN
        r := greatest(r, t) + p_settle * 60.0 / p_rpm;
    ELSIF p_rpm IS NOT NULL AND p_settle < 0 THEN
        r := r + p_settle * 60.0 / p_rpm;
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
            r := nr;
        END IF;
        IF ok OR p_settle <> 0 THEN
            UPDATE api_key_limits l SET requests_at = r WHERE l.key_id = p_key;
        END IF;
    END IF;
    RETURN QUERY SELECT ok, t, r, k;
END
$$;

-- What gateways of before this migration call, during a rolling upgrade.
CREATE OR REPLACE FUNCTION api_key_admit(p_key bigint, p_rpm integer, p_tpm integer)
RETURNS TABLE (allowed boolean, now_s double precision, requests_at double precision, tokens_at double precision)
LANGUAGE sql AS $$
    SELECT * FROM api_key_admit(p_key, p_rpm, p_tpm, 0)
$$;
