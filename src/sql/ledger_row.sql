-- ledger_rows.sql for one version, by the indexes on version: where a
-- no-transaction migration resumes, and whether it is applied, read before
-- each attempt without reading the whole ledger. $1 holds every spelling of
-- the version with leading zeros (`1`, `01`, `001`, ...), so a ledger that
-- spells it otherwise than this binary is read as ledger_rows.sql reads it,
-- and the indexes still serve the lookup.
WITH spelling AS (
    SELECT unnest($1::text[]) AS v
), latest AS (
    SELECT a.* FROM spelling CROSS JOIN LATERAL (
        SELECT id, version, operation, outcome, error, statements_completed,
               statements_total, checksum, finished_at, backend_pid
        FROM {attempts}
        WHERE version = spelling.v AND (ledger = {ledger} OR ledger IS NULL)
        ORDER BY id DESC
        LIMIT 1
    ) a
    ORDER BY a.id DESC
    LIMIT 1
), succeeded AS (
    SELECT a.checksum FROM spelling CROSS JOIN LATERAL (
        SELECT id, checksum
        FROM {attempts}
        WHERE version = spelling.v
          AND ((operation = 'up' AND outcome = 'success') OR (operation = 'resolve' AND outcome = 'applied'))
          AND (ledger = {ledger} OR ledger IS NULL)
        ORDER BY id DESC
        LIMIT 1
    ) a
    ORDER BY a.id DESC
    LIMIT 1
), m AS (
    SELECT mm.* FROM spelling CROSS JOIN LATERAL (
        -- LIMIT keeps it a lookup by the primary key per spelling.
        SELECT * FROM {migrations} WHERE version = spelling.v LIMIT 1
    ) mm
    ORDER BY mm.run_on DESC
    LIMIT 1
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
FULL JOIN latest l ON true
LEFT JOIN succeeded s ON true
