-- api_key_admit read the clock before waiting for the key's row lock, so a caller that queued
-- behind another saw an earlier `now` than the state it then read: its bucket looked a hair
-- fuller-spent than it was, and `x-ratelimit-remaining-requests` came out one low (two
-- concurrent admissions both reporting 7 of 10). The clock is now read once the row is held,
-- so callers see time advance in the order they are admitted.
CREATE OR REPLACE FUNCTION api_key_admit(p_key bigint, p_rpm integer, p_tpm integer)
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
