-- The first statements of a transactional migration's run, before its SQL,
-- in the same round trip (comment lines are left out of what is sent, which
-- `pg_stat_activity` shows ahead of the migration's SQL). First its version
-- row ($1, checksum $2), taken only with the migration's own lock ($3) for
-- the transaction, tried and never waited for (a wait would hold a snapshot,
-- on which a `CREATE INDEX CONCURRENTLY` the holder runs would deadlock):
-- without the lock the version is NULL, which the primary key refuses. The
-- same spelling already there fails on the key; another spelling of it, read
-- once the lock is held ($4 with $5 to $6 leading zeros), fails the division.
INSERT INTO {migrations} (version, checksum)
SELECT CASE WHEN pg_try_advisory_xact_lock($3) THEN $1 END, $2;
SELECT 1 / (NOT EXISTS (SELECT 1 FROM {migrations} WHERE version <> $1
  AND version = ANY (ARRAY(SELECT repeat('0', n) || $4 FROM generate_series($5, $6) n))))::int
