-- Inside the migration's own transaction, after its SQL: the successful
-- attempt (now() is when the transaction started). Its version row was
-- inserted first, before the SQL ran (`insert_version.sql`).
INSERT INTO {attempts}
    (ledger, version, name, track, operation, checksum, outcome, started_at, finished_at,
     statements_completed, statements_total, host, client_pid, os_user)
VALUES ({ledger}, $1, $2, $3, 'up', $4, 'success', now(), clock_timestamp(), $5, $5, $6, $7, $8)
