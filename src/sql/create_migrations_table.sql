-- The table diesel's CLI and harness use, with diesel's own shape, so the
-- diesel CLI sees the same history, and one column more: the checksum of
-- up.sql as applied, so the start-up read finds everything in one table
-- (diesel writes versions only and leaves it NULL).
CREATE TABLE {migrations} (
    version VARCHAR(50) PRIMARY KEY NOT NULL,
    run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    checksum TEXT
);
