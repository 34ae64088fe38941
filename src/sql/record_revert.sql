-- Inside a transactional revert, in one statement: the version row goes, and
-- the 'down' attempt is recorded (now() is when the transaction started).
WITH reverted AS (
    -- However the ledger spells the version (`1` for `01`).
    DELETE FROM {migrations} WHERE ltrim(version, '0') = ltrim($1, '0')
)
INSERT INTO {attempts}
    (ledger, version, name, track, operation, checksum, outcome, started_at, finished_at,
     statements_completed, statements_total, host, client_pid, os_user)
VALUES ({ledger}, $1, $2, $3, 'down', $4, 'success', now(), clock_timestamp(), $5, $5, $6, $7, $8)
