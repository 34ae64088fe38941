-- Where the ledger lives. $1: the migrations table as written (quoted, maybe
-- qualified); $2: its schema when configured; $3: the attempts table's schema
-- when configured (else the migrations table's); $4: the attempts table.
-- An unqualified migrations table is where PostgreSQL finds it on search_path
-- (to_regclass), as any query of it would; when it does not exist yet, the
-- schema a CREATE TABLE would use (current_schema()).
WITH found AS (
    SELECT c.relnamespace AS nsp FROM pg_class c WHERE c.oid = to_regclass($1)
), ledger AS (
    SELECT coalesce(
               (SELECT nsp FROM found),
               (SELECT oid FROM pg_namespace WHERE nspname = coalesce($2, current_schema()))
           ) AS nsp
), attempts AS (
    SELECT CASE WHEN $3::text IS NULL THEN (SELECT nsp FROM ledger)
                ELSE (SELECT oid FROM pg_namespace WHERE nspname = $3) END AS nsp
)
SELECT n.nspname::text AS schema,
       EXISTS (SELECT 1 FROM found) AS migrations_exist,
       EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = to_regclass($1) AND attname = 'checksum' AND NOT attisdropped)
           AS migrations_checksum,
       (SELECT nsp FROM attempts) IS NOT NULL AS attempts_schema_exists,
       a.oid IS NOT NULL AS attempts_exist,
       obj_description(a.oid, 'pg_class') AS attempts_comment,
       -- What ledger_rows.sql reads: tables commented by layout differ, so
       -- the columns decide.
       (SELECT count(*) = 2 FROM pg_attribute
        WHERE attrelid = a.oid AND attname IN ('operation', 'ledger') AND NOT attisdropped)
           AS attempts_operations
FROM ledger
LEFT JOIN pg_namespace n ON n.oid = ledger.nsp
LEFT JOIN pg_class a
       ON a.relname = $4
      AND a.relkind IN ('r', 'p')
      AND a.relnamespace = (SELECT nsp FROM attempts)
