-- A transactional migration's run, after its SQL and before its attempt is
-- recorded, with the migration's own lock held since the first statement,
-- under every spelling of the version ($4 with $5 to $6 leading zeros): the
-- version row under another spelling, or a latest attempt that stopped
-- halfway outside a transaction (whose statements the run just repeated),
-- fails the division, and the transaction rolls back. After the SQL, not
-- before it, so `pg_stat_activity` shows the migration's SQL near the start.
WITH spelling AS (
  SELECT repeat('0', n) || $4 AS v FROM generate_series($5, $6) n
)
SELECT 1 / (NOT EXISTS (SELECT 1 FROM {migrations}
    WHERE version <> $1 AND version = ANY (ARRAY(SELECT v FROM spelling)))
  AND NOT EXISTS (SELECT 1 FROM (
    SELECT a.* FROM spelling CROSS JOIN LATERAL (
      SELECT id, operation, outcome, statements_completed FROM {attempts}
      WHERE version = spelling.v AND (ledger = {ledger} OR ledger IS NULL)
      ORDER BY id DESC LIMIT 1) a
    ORDER BY a.id DESC LIMIT 1) latest
    WHERE latest.operation = 'up' AND latest.statements_completed > 0
      AND latest.outcome IN ('running', 'failed', 'retrying', 'interrupted')))::int
