-- Index builds running now, anywhere in this database.
SELECT p.pid,
       coalesce(a.application_name, '') AS application_name,
       p.command,
       p.phase,
       coalesce(nullif(p.index_relid, 0)::regclass::text, '') AS index_name,
       p.relid::regclass::text AS table_name,
       p.blocks_done, p.blocks_total, p.tuples_done, p.tuples_total
FROM pg_stat_progress_create_index p
LEFT JOIN pg_stat_activity a ON a.pid = p.pid
WHERE p.datname = current_database()
