-- The version row, however the ledger spells the version (`1` for `01`).
DELETE FROM {migrations} WHERE ltrim(version, '0') = ltrim($1, '0')
