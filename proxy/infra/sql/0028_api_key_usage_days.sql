-- A key's usage is kept per hour for a day or two, then per day (UTC): `KeysStore.roll_up_usage`
-- folds the hours of days before yesterday into their day's row (the hour 00:00 UTC), so the
-- table holds a row per key and day it was used rather than per hour, its sums unchanged.
-- This index holds only the hours still to fold: finding them reads none of the days.
CREATE INDEX IF NOT EXISTS api_key_usage_hours ON api_key_usage (hour)
    WHERE hour <> date_trunc('day', hour AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
