-- Per version: applied or not, when, the latest attempt (of any operation),
-- and the checksum of up.sql as last applied (an 'up' that succeeded, or a
-- resolution as applied), in one query. Versions are numbers: `01` and `1`
-- are one version (a directory renamed to sort), one row.
-- $1 NULL: every version. Else only those of $1, by the indexes on version
-- (what a revert checks): $1 holds every spelling of each with leading
-- zeros (`1`, `01`, `001`, ...), so a ledger that spells them otherwise is
-- read the same. Sent unnamed, the statement is planned with $1 known, so
-- the test of $1 costs nothing.
WITH exact AS (
    SELECT DISTINCT ON (version) id, version, operation, outcome, error, statements_completed,
           statements_total, checksum, finished_at, backend_pid
    FROM {attempts}
    WHERE ($1::text[] IS NULL OR version = ANY($1::text[])) AND (ledger = {ledger} OR ledger IS NULL)
    ORDER BY version, id DESC
), latest AS (
    -- Of the few rows left, the newest per version however it is spelled.
    SELECT DISTINCT ON (ltrim(version, '0')) * FROM exact ORDER BY ltrim(version, '0'), id DESC
), succeeded_exact AS (
    SELECT DISTINCT ON (version) id, version, checksum
    FROM {attempts}
    WHERE ($1::text[] IS NULL OR version = ANY($1::text[]))
      AND ((operation = 'up' AND outcome = 'success') OR (operation = 'resolve' AND outcome = 'applied'))
      AND (ledger = {ledger} OR ledger IS NULL)
    ORDER BY version, id DESC
), succeeded AS (
    SELECT DISTINCT ON (ltrim(version, '0')) version, checksum
    FROM succeeded_exact
    ORDER BY ltrim(version, '0'), id DESC
), m AS (
    SELECT * FROM {migrations} WHERE $1::text[] IS NULL OR version = ANY($1::text[])
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
