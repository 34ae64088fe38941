-- Inside the migration's own transaction, after its SQL, in one statement:
-- its version row and the successful attempt (now() is when the transaction
-- started). The version row is inserted only with the migration's own lock
-- ($10) for the rest of the transaction, tried and never waited for (a wait
-- would hold a snapshot, on which a `CREATE INDEX CONCURRENTLY` the holder
-- runs would deadlock): without it the version is NULL, which the primary
-- key refuses; the same spelling already there fails on the key. The
-- version under its plain spelling ($9, no leading zeros) when this binary
-- spells it otherwise, or an attempt under either spelling still `running`
-- outside a transaction with statements done (its process died after this
-- run planned, and the run just repeated those statements), fails the
-- division. Each failure rolls the transaction back, the migration's SQL
-- with it. Two index probes: this is on every migration's success path.
WITH own AS (
    SELECT pg_try_advisory_xact_lock($10) AS held
), applied AS (
    INSERT INTO {migrations} (version, checksum)
    SELECT CASE WHEN held THEN $1 END, $4 FROM own
    RETURNING version
)
INSERT INTO {attempts}
    (ledger, version, name, track, operation, checksum, outcome, started_at, finished_at,
     statements_completed, statements_total, host, client_pid, os_user)
SELECT {ledger}, $1, $2, $3, 'up', $4, 'success', now(), clock_timestamp(), $5, $5, $6, $7, $8
FROM applied
WHERE 1 / (NOT EXISTS (SELECT 1 FROM {migrations} WHERE version = $9 AND version <> $1)
  AND NOT EXISTS (SELECT 1 FROM {attempts}
    WHERE version IN ($1, $9) AND outcome = 'running' AND operation = 'up'
      AND statements_completed > 0 AND (ledger = {ledger} OR ledger IS NULL)))::int = 1
