-- Index builds running now, anywhere in this database. Without
-- pg_read_all_stats, another role's build shows NULL columns: keep the row.
SELECT p.pid,
       coalesce(a.application_name, '') AS application_name,
       coalesce(p.command, '?') AS command,
       coalesce(p.phase, '?') AS phase,
       coalesce(nullif(p.index_relid, 0)::regclass::text, '') AS index_name,
       coalesce(ic.relname::text, '') AS index_relname,
       coalesce(p.relid::regclass::text, '?') AS table_name,
       coalesce(p.blocks_done, 0) AS blocks_done,
       coalesce(p.blocks_total, 0) AS blocks_total,
       coalesce(p.tuples_done, 0) AS tuples_done,
       coalesce(p.tuples_total, 0) AS tuples_total
FROM pg_stat_progress_create_index p
LEFT JOIN pg_stat_activity a ON a.pid = p.pid
LEFT JOIN pg_class ic ON ic.oid = p.index_relid
WHERE p.datname = current_database()
