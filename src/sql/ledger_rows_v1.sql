-- ledger_rows.sql for an attempts table of an earlier layout (read before the
-- lock upgrades it, or on a read-only server): only the columns layout 1 has.
WITH latest AS (
    SELECT DISTINCT ON (ltrim(version, '0')) version, outcome, error, statements_completed,
           statements_total, checksum, finished_at
    FROM {attempts}
    ORDER BY ltrim(version, '0'), id DESC
), succeeded AS (
    SELECT DISTINCT ON (ltrim(version, '0')) version, checksum
    FROM {attempts}
    WHERE outcome = 'success'
    ORDER BY ltrim(version, '0'), id DESC
)
SELECT coalesce(m.version, l.version) AS version,
       m.version IS NOT NULL AS applied,
       to_char(m.run_on, 'YYYY-MM-DD HH24:MI:SS') AS applied_at,
       CASE WHEN l.version IS NULL THEN NULL ELSE 'up' END AS operation,
       l.outcome,
       l.error,
       l.statements_completed,
       l.statements_total,
       l.checksum AS attempt_checksum,
       s.checksum AS applied_checksum,
       extract(epoch FROM l.finished_at)::float8 AS finished_epoch,
       NULL::integer AS attempt_backend_pid
FROM {migrations} m
FULL JOIN latest l ON ltrim(l.version, '0') = ltrim(m.version, '0')
LEFT JOIN succeeded s ON ltrim(s.version, '0') = ltrim(coalesce(m.version, l.version), '0')
