-- Per version: applied or not, when, the latest attempt (of any operation),
-- and the checksum of up.sql as last applied (an 'up' that succeeded, or a
-- resolution as applied), in one query.
WITH latest AS (
    SELECT DISTINCT ON (version) version, operation, outcome, error, statements_completed,
           statements_total, checksum, finished_at
    FROM {attempts}
    WHERE ledger = {ledger} OR ledger IS NULL
    ORDER BY version, id DESC
), succeeded AS (
    SELECT DISTINCT ON (version) version, checksum
    FROM {attempts}
    WHERE ((operation = 'up' AND outcome = 'success') OR (operation = 'resolve' AND outcome = 'applied'))
      AND (ledger = {ledger} OR ledger IS NULL)
    ORDER BY version, id DESC
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
       extract(epoch FROM l.finished_at)::float8 AS finished_epoch
FROM {migrations} m
FULL JOIN latest l ON l.version = m.version
LEFT JOIN succeeded s ON s.version = coalesce(m.version, l.version)
