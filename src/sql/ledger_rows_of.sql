-- ledger_rows.sql for a few versions, by the indexes on version: what a
-- revert checks (the versions it reverts, and any newer one stopped
-- halfway), without reading the whole ledger. $1 holds every spelling of
-- each version with leading zeros (`1`, `01`, `001`, ...), so a ledger that
-- spells them otherwise is read as ledger_rows.sql reads it.
WITH exact AS (
    SELECT DISTINCT ON (version) id, version, operation, outcome, error, statements_completed,
           statements_total, checksum, finished_at, backend_pid
    FROM {attempts}
    WHERE version = ANY($1::text[]) AND (ledger = {ledger} OR ledger IS NULL)
    ORDER BY version, id DESC
), latest AS (
    SELECT DISTINCT ON (ltrim(version, '0')) * FROM exact ORDER BY ltrim(version, '0'), id DESC
), succeeded_exact AS (
    SELECT DISTINCT ON (version) id, version, checksum
    FROM {attempts}
    WHERE version = ANY($1::text[])
      AND ((operation = 'up' AND outcome = 'success') OR (operation = 'resolve' AND outcome = 'applied'))
      AND (ledger = {ledger} OR ledger IS NULL)
    ORDER BY version, id DESC
), succeeded AS (
    SELECT DISTINCT ON (ltrim(version, '0')) version, checksum
    FROM succeeded_exact
    ORDER BY ltrim(version, '0'), id DESC
), m AS (
    SELECT * FROM {migrations} WHERE version = ANY($1::text[])
)
SELECT coalesce(m.version, l.version) AS version,
       m.version IS NOT NULL AS applied,
       to_char(m.run_on, 'YYYY-MM-DD HH24:MI:SS') AS applied_at,
       l.operation,
       l.outcome,
       l.error,
       l.statements_completed,
       l.statements_total,
       l.checksum AS attempt_checksum,
       coalesce({migrations_checksum}, s.checksum) AS applied_checksum,
       extract(epoch FROM l.finished_at)::float8 AS finished_epoch,
       l.backend_pid AS attempt_backend_pid
FROM m
FULL JOIN latest l ON ltrim(l.version, '0') = ltrim(m.version, '0')
LEFT JOIN succeeded s ON ltrim(s.version, '0') = ltrim(coalesce(m.version, l.version), '0')
