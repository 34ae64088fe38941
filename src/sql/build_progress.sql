-- Progress of the index build a backend is running, if any.
SELECT p.phase,
       coalesce(p.index_relid::regclass::text, '') AS index_name,
       p.relid::regclass::text AS table_name,
       p.blocks_done, p.blocks_total, p.tuples_done, p.tuples_total
FROM pg_stat_progress_create_index p
WHERE p.pid = $1
