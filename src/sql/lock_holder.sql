-- Who holds a bigint advisory lock: classid is the high half of the key,
-- objid the low half, objsubid 1 marks the one-bigint form.
SELECT l.pid,
       coalesce(a.application_name, '') AS application_name,
       coalesce(to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS TZ'), '?') AS since,
       coalesce(a.client_addr::text, 'local') AS client
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory'
  AND l.granted
  AND l.classid = (($1::bigint >> 32) & 4294967295)::oid
  AND l.objid = ($1::bigint & 4294967295)::oid
  AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
LIMIT 1
