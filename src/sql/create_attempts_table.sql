-- diesel-rollout's own record: one row per attempt to apply (operation 'up'),
-- revert ('down') or resolve by hand ('resolve') a migration.
-- outcome: 'failed' is final; 'retrying' failed and the leader will try again;
-- a resolution is 'applied' or 'rolled_back'.
-- checksum: of up.sql for 'up' and 'resolve', of down.sql for 'down'.
-- The comment holds the layout version (see ledger.rs, ATTEMPTS_VERSION).
-- Layout 1 (the first release) had no `ledger`, `operation`, `os_user` or
-- `db_user`, and no 'retrying'.
CREATE TABLE {attempts} (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The migrations table (schema.table) the attempt belongs to, so ledgers
    -- that share an attempts table never read each other's attempts.
    ledger               TEXT,
    version              VARCHAR(50) NOT NULL,
    name                 TEXT NOT NULL,
    track                TEXT NOT NULL CHECK (track IN ('required', 'deferred')),
    operation            TEXT NOT NULL DEFAULT 'up'
                         CONSTRAINT diesel_rollout_operation
                         CHECK (operation IN ('up', 'down', 'resolve')),
    checksum             TEXT NOT NULL,
    started_at           TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    finished_at          TIMESTAMPTZ,
    outcome              TEXT NOT NULL
                         CONSTRAINT diesel_rollout_outcome
                         CHECK (outcome IN ('running', 'success', 'failed', 'retrying', 'interrupted',
                                            'applied', 'rolled_back')),
    error                TEXT,
    statements_completed INTEGER NOT NULL DEFAULT 0,
    statements_total     INTEGER NOT NULL,
    host                 TEXT,
    client_pid           INTEGER,
    backend_pid          INTEGER NOT NULL DEFAULT pg_backend_pid(),
    application_name     TEXT NOT NULL DEFAULT current_setting('application_name'),
    os_user              TEXT,
    db_user              TEXT DEFAULT current_user
);
CREATE INDEX ON {attempts} (version, id);
COMMENT ON TABLE {attempts} IS 'diesel-rollout attempts v3';
