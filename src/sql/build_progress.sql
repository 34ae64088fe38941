-- Progress of the index build a backend is running, if any.
SELECT coalesce(p.phase, '?') AS phase,
       coalesce(nullif(p.index_relid, 0)::regclass::text, '') AS index_name,
       coalesce(p.relid::regclass::text, '?') AS table_name,
       coalesce(p.blocks_done, 0) AS blocks_done,
       coalesce(p.blocks_total, 0) AS blocks_total,
       coalesce(p.tuples_done, 0) AS tuples_done,
       coalesce(p.tuples_total, 0) AS tuples_total
FROM pg_stat_progress_create_index p
WHERE p.pid = $1
