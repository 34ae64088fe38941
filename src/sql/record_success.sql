-- Inside the migration's own transaction, in one statement: the version row
-- diesel reads, and the attempt (now() is when the transaction started).
WITH applied AS (
    INSERT INTO {migrations} (version, checksum) VALUES ($1, $4)
)
INSERT INTO {attempts}
    (ledger, version, name, track, operation, checksum, outcome, started_at, finished_at,
     statements_completed, statements_total, host, client_pid, os_user)
VALUES ({ledger}, $1, $2, $3, 'up', $4, 'success', now(), clock_timestamp(), $5, $5, $6, $7, $8)
