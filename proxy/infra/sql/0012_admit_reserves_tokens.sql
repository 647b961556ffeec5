-- An admission reserves the request's estimated tokens (its prompt's estimate and its max
-- output tokens) in the token bucket, as OpenAI's limits do, and settles what the calling
-- process holds for the key's token bucket: real usage of ended exchanges minus what they
-- reserved (negative: tokens given back), and tokens reserved alone during an outage.
-- Before, tokens were charged only when an exchange ended, so any number of concurrent
-- requests were admitted while the bucket was not yet empty, and the key was then locked
-- out for as long as they had overspent. A reservation is a charge like any other: one
-- whose settlement never comes (its process was killed) refills with the bucket, within a
-- minute (a reservation is never more than the key's `tpm`).
--
-- `p_reserve` must fit in what is left of the bucket (0: the bucket must only not be empty,
-- as before); a refused admission changes nothing but the settlements.
CREATE OR REPLACE FUNCTION api_key_admit(
    p_key bigint, p_rpm integer, p_tpm integer, p_settle integer, p_settle_tokens bigint, p_reserve integer
)
RETURNS TABLE (allowed boolean, now_s double precision, requests_at double precision, tokens_at double precision)
LANGUAGE plpgsql AS $$
DECLARE
    t  double precision;
    r  double precision;
    k  double precision;
    nr double precision;
    nk double precision;
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
    IF p_tpm IS NOT NULL AND p_settle_tokens > 0 THEN
        k := greatest(k, t) + p_settle_tokens * 60.0 / p_tpm;
    ELSIF p_tpm IS NOT NULL AND p_settle_tokens < 0 THEN
        k := k + p_settle_tokens * 60.0 / p_tpm;
    END IF;
    r := greatest(r, t);
    k := greatest(k, t);
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
    IF ok OR p_settle <> 0 OR p_settle_tokens <> 0 THEN
        UPDATE api_key_limits l SET requests_at = r, tokens_at = k WHERE l.key_id = p_key;
    END IF;
    RETURN QUERY SELECT ok, t, r, k;
END
$$;

-- What gateways of before this migration call, during a rolling upgrade.
CREATE OR REPLACE FUNCTION api_key_admit(p_key bigint, p_rpm integer, p_tpm integer, p_settle integer)
RETURNS TABLE (allowed boolean, now_s double precision, requests_at double precision, tokens_at double precision)
LANGUAGE sql AS $$
    SELECT * FROM api_key_admit(p_key, p_rpm, p_tpm, p_settle, 0, 0)
$$;
