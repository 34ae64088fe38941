-- diesel-rollout's own record: one row per attempt to apply a migration.
-- outcome: 'failed' is final; 'retrying' failed and the leader will try again.
-- The comment holds the layout version (see ledger.rs, ATTEMPTS_VERSION).
-- Layout 1 (the first release) had no `ledger` and no 'retrying'.
CREATE TABLE {attempts} (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The migrations table (schema.table) the attempt belongs to, so ledgers
    -- that share an attempts table never read each other's attempts.
    ledger               TEXT,
    version              VARCHAR(50) NOT NULL,
    name                 TEXT NOT NULL,
    track                TEXT NOT NULL CHECK (track IN ('required', 'deferred')),
    checksum             TEXT NOT NULL,
    started_at           TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    finished_at          TIMESTAMPTZ,
    outcome              TEXT NOT NULL
                         CONSTRAINT diesel_rollout_outcome
                         CHECK (outcome IN ('running', 'success', 'failed', 'retrying', 'interrupted')),
    error                TEXT,
    statements_completed INTEGER NOT NULL DEFAULT 0,
    statements_total     INTEGER NOT NULL,
    host                 TEXT,
    client_pid           INTEGER,
    backend_pid          INTEGER NOT NULL DEFAULT pg_backend_pid(),
    application_name     TEXT NOT NULL DEFAULT current_setting('application_name')
);
CREATE INDEX ON {attempts} (version, id);
COMMENT ON TABLE {attempts} IS 'diesel-rollout attempts v2';
