-- A transactional migration's run, after its SQL: its version row ($1,
-- checksum $2), inserted only with the migration's own lock ($3) for the rest
-- of the transaction, tried and never waited for (a wait would hold a
-- snapshot, on which a `CREATE INDEX CONCURRENTLY` the holder runs would
-- deadlock): without the lock the version is NULL, which the primary key
-- refuses, and the transaction, its SQL included, rolls back. The same
-- spelling already there fails on the key. Comment lines are not sent.
INSERT INTO {migrations} (version, checksum)
SELECT CASE WHEN pg_try_advisory_xact_lock($3) THEN $1 END, $2
