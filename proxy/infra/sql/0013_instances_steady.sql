-- Since when an instance's heartbeats have come promptly. A beat that finds its own previous one
-- late (PostgreSQL stalled, or this process did) starts it again: an instance judges others
-- dead (sweeps them, takes their keys over) only once it has beaten promptly for a whole
-- `dead_after` since, for a stall silences every instance alike, the live ones included.
ALTER TABLE gateway_instances ADD COLUMN IF NOT EXISTS steady_since timestamptz NOT NULL DEFAULT '-infinity';
