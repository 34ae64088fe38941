-- Sent before `record_success.sql` when this binary spells the version with
-- leading zeros: the version under its plain spelling ($1) applied by a
-- release that spells it so, or an attempt under it still `running`
-- outside a transaction with statements done (see `record_success.sql`),
-- fails a division and rolls the migration's transaction back.
SELECT 1 / (length(version) * 0) FROM {migrations} WHERE version = $1;
SELECT 1 / (statements_completed * 0) FROM {attempts}
WHERE version = $1 AND outcome = 'running' AND operation = 'up'
  AND statements_completed > 0 AND (ledger = {ledger} OR ledger IS NULL)
