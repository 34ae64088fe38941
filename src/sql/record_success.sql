-- Inside the migration's own transaction, after its SQL, sent with it: its
-- version row, a check, and the successful attempt (now() is when the
-- transaction started), as three plain statements (one statement with CTEs
-- and subqueries cost the server about twice as much). The version row is
-- inserted only with the migration's own lock ($9) for the rest of the
-- transaction, tried and never waited for (a wait would hold a snapshot, on
-- which a `CREATE INDEX CONCURRENTLY` the holder runs would deadlock):
-- without it the version is NULL, which the primary key refuses; the same
-- spelling already there fails on the key. An attempt still `running`
-- outside a transaction with statements done (its process died after this
-- run planned, and the run just repeated those statements) fails the
-- division, under either spelling ($10: $1, and the plain one when it
-- differs; one value plans as an equality, a little cheaper).
-- Each failure rolls the transaction back, the migration's SQL with it.
-- One index probe and two inserts: this is on every migration's success
-- path. The version row's plain spelling is checked by
-- `other_spelling.sql`, sent before this only when it differs.
INSERT INTO {migrations} (version, checksum)
SELECT CASE WHEN pg_try_advisory_xact_lock($9) THEN $1 END, $4;
SELECT 1 / (statements_completed * 0) FROM {attempts}
WHERE version IN ($10) AND outcome = 'running' AND operation = 'up'
  AND statements_completed > 0 AND (ledger = {ledger} OR ledger IS NULL);
INSERT INTO {attempts}
    (ledger, version, name, track, operation, checksum, outcome, started_at, finished_at,
     statements_completed, statements_total, host, client_pid, os_user)
VALUES ({ledger}, $1, $2, $3, 'up', $4, 'success', now(), clock_timestamp(), $5, $5, $6, $7, $8)
