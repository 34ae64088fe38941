-- Inside the migration's own transaction, after its SQL and its version row
-- (`claim_version.sql`, which took the migration's own lock): the successful
-- attempt (now() is when the transaction started). Read under that lock:
-- the version row under its plain spelling ($9, no leading zeros) when this
-- binary spells it otherwise, or an attempt under either spelling still
-- `running` outside a transaction with statements done (its process died
-- after this run planned, and the run just repeated those statements),
-- inserts nothing but fails the division, and the transaction rolls back.
-- Two index probes, as this is on every migration's success path: other
-- spellings, and an attempt that failed (rather than died) meanwhile, are
-- left to the plan's read.
INSERT INTO {attempts}
    (ledger, version, name, track, operation, checksum, outcome, started_at, finished_at,
     statements_completed, statements_total, host, client_pid, os_user)
SELECT {ledger}, $1, $2, $3, 'up', $4, 'success', now(), clock_timestamp(), $5, $5, $6, $7, $8
WHERE 1 / (NOT EXISTS (SELECT 1 FROM {migrations} WHERE version = $9 AND version <> $1)
  AND NOT EXISTS (SELECT 1 FROM {attempts}
    WHERE version IN ($1, $9) AND outcome = 'running' AND operation = 'up'
      AND statements_completed > 0 AND (ledger = {ledger} OR ledger IS NULL)))::int = 1
