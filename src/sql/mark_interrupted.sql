-- Runs under the track's lock: whoever holds it knows that every attempt of
-- the track still 'running' is dead (its process died, a pooler freed the
-- lock of a backend that lives on, or recording its outcome failed). The next
-- attempt resumes after its last recorded statement. $1: the tracks ($2 NULL);
-- or $2: one version whose attempt's backend is gone, run on the other track
-- (a release that has it there), whose lock this session does not hold,
-- however the ledger spells that version (`5` or `05`).
UPDATE {attempts}
SET outcome = 'interrupted',
    finished_at = clock_timestamp(),
    error = 'interrupted: the process applying it (pid ' || coalesce(client_pid::text, '?')
            || ' on ' || coalesce(host, '?') || ') stopped before it finished'
WHERE outcome = 'running' AND (track = ANY($1::text[]) OR ltrim(version, '0') = ltrim($2, '0'))
  AND (ledger = {ledger} OR ledger IS NULL)
