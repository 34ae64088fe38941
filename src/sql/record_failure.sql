-- After the migration's transaction rolled back; $9 is how long it ran.
INSERT INTO {attempts}
    (ledger, version, name, track, operation, checksum, outcome, started_at, finished_at, error,
     statements_completed, statements_total, host, client_pid, os_user)
VALUES ({ledger}, $1, $2, $3, $10, $4, 'failed', clock_timestamp() - make_interval(secs => $9),
        clock_timestamp(), $5, 0, $6, $7, $8, $11)
