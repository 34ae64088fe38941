-- Every index of a table: validity, and whether a build is in progress
-- (CREATE INDEX CONCURRENTLY reports index_relid; REINDEX CONCURRENTLY
-- leftovers, *_ccnew / *_ccold, count as building while any build of the
-- table is in progress).
SELECT n.nspname AS schema_name,
       c.relname AS index_name,
       t.relname AS table_name,
       i.indisvalid AS valid,
       pg_get_indexdef(c.oid) AS definition,
       c.relkind = 'I' AS partitioned,
       EXISTS (
           SELECT 1 FROM pg_stat_progress_create_index p
           WHERE p.datname = current_database()
             AND (p.index_relid = c.oid
                  OR (p.relid = t.oid AND c.relname ~ '_cc(new|old)[0-9]*$')
                  -- Another role's build we may not see: assume it could be
                  -- this one, and wait rather than drop it.
                  OR p.relid IS NULL)
       ) AS building
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE i.indrelid = to_regclass($1)
ORDER BY c.relname
