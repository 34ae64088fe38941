-- Runs under the track's lock: any attempt still 'running' belongs to a
-- process that died holding it.
UPDATE {attempts}
SET outcome = 'interrupted',
    finished_at = clock_timestamp(),
    error = 'interrupted: the process applying it (pid ' || coalesce(client_pid::text, '?')
            || ' on ' || coalesce(host, '?') || ') stopped before it finished'
WHERE outcome = 'running' AND track = $1
