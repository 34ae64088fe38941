-- Runs under the track's lock: whoever holds it knows that every attempt of
-- the track still 'running' is dead (its process died, a pooler freed the
-- lock of a backend that lives on, or recording its outcome failed). The next
-- attempt resumes after its last recorded statement.
UPDATE {attempts}
SET outcome = 'interrupted',
    finished_at = clock_timestamp(),
    error = 'interrupted: the process applying it (pid ' || coalesce(client_pid::text, '?')
            || ' on ' || coalesce(host, '?') || ') stopped before it finished'
WHERE outcome = 'running' AND track = $1 AND (ledger = {ledger} OR ledger IS NULL)
