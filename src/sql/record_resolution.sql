-- A migration's outcome recorded by hand (`rollout resolve`): the version row
-- added or removed, and who did it, in one statement. $5: 'applied' or
-- 'rolled_back'; $6: why.
-- The version row is the one the ledger has, however it spells the version
-- (`1` for `01`), or a new one.
WITH spelled AS (
    SELECT coalesce(
        (SELECT version FROM {migrations} WHERE ltrim(version, '0') = ltrim($1, '0') LIMIT 1),
        $1) AS version
), added AS (
    INSERT INTO {migrations} (version, checksum)
    SELECT version, $4 FROM spelled WHERE $5 = 'applied'
    ON CONFLICT (version) DO UPDATE SET checksum = excluded.checksum
), removed AS (
    DELETE FROM {migrations} WHERE ltrim(version, '0') = ltrim($1, '0') AND $5 = 'rolled_back'
)
INSERT INTO {attempts}
    (ledger, version, name, track, operation, checksum, outcome, started_at, finished_at, error,
     statements_completed, statements_total, host, client_pid, os_user)
VALUES ({ledger}, $1, $2, $3, 'resolve', $4, $5, clock_timestamp(), clock_timestamp(), $6,
        0, 0, $7, $8, $9)
