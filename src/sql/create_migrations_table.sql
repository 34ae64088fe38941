-- The table diesel's CLI and harness use, with diesel's own shape, so the
-- diesel CLI sees the same history.
CREATE TABLE {migrations} (
    version VARCHAR(50) PRIMARY KEY NOT NULL,
    run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
