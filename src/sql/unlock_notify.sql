-- Releases the advisory locks $1 and wakes the sessions waiting for them
-- (`LISTEN` on channel $2), in one round trip: `true` when every lock was
-- held. The notification is delivered when this statement commits, after
-- the locks are free.
WITH released AS (
    SELECT bool_and(pg_advisory_unlock(k)) AS all_held FROM unnest($1::bigint[]) AS k
), woken AS (
    SELECT pg_notify($2, '') FROM released
)
SELECT coalesce(all_held, false) AS flag, (SELECT count(*) FROM woken) AS woken FROM released
