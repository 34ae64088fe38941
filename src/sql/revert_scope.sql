-- What a revert chooses from, in one read without the whole ledger: every
-- applied version (applied = true), and every version with an attempt to
-- apply it that stopped with statements done (applied = false), of which
-- ledger_rows.sql (given the versions) then reads whether that attempt is
-- the latest.
SELECT version, true AS applied FROM {migrations}
UNION ALL
SELECT DISTINCT version, false
FROM {attempts}
WHERE operation = 'up'
  AND outcome IN ('failed', 'retrying', 'interrupted')
  AND statements_completed > 0
  AND (ledger = {ledger} OR ledger IS NULL)
