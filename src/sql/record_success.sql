-- Inside the migration's own transaction: now() is when it started.
INSERT INTO {attempts}
    (version, name, track, checksum, outcome, started_at, finished_at,
     statements_completed, statements_total, host, client_pid)
VALUES ($1, $2, $3, $4, 'success', now(), clock_timestamp(), $5, $5, $6, $7)
