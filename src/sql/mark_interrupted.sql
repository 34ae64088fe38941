-- Runs under the track's lock: an attempt still 'running' whose backend is
-- gone belongs to a process that died holding the lock.
UPDATE {attempts}
SET outcome = 'interrupted',
    finished_at = clock_timestamp(),
    error = 'interrupted: the process applying it (pid ' || coalesce(client_pid::text, '?')
            || ' on ' || coalesce(host, '?') || ') stopped before it finished'
WHERE outcome = 'running' AND track = $1
  AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = backend_pid)
