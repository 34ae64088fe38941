-- Whether a transaction of another session that began more than $3 seconds
-- ago holds a lock on table $1 (as written) in one of the modes $2: what a
-- statement that timed out waiting for its lock was probably waiting for.
SELECT EXISTS (
    SELECT 1
    FROM pg_locks l
    JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.relation = to_regclass($1)
      AND l.granted
      AND l.pid <> pg_backend_pid()
      AND l.mode = ANY ($2)
      AND a.xact_start < statement_timestamp() - make_interval(secs => $3)
) AS found
