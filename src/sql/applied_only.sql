-- The ledger rows when only diesel's table exists (a database migrated by
-- diesel before diesel-rollout was adopted).
SELECT version,
       true AS applied,
       to_char(run_on, 'YYYY-MM-DD HH24:MI:SS') AS applied_at,
       NULL::text AS operation,
       NULL::text AS outcome,
       NULL::text AS error,
       NULL::integer AS statements_completed,
       NULL::integer AS statements_total,
       NULL::text AS attempt_checksum,
       NULL::text AS applied_checksum,
       NULL::float8 AS finished_epoch,
       NULL::integer AS attempt_backend_pid
FROM {migrations}
