-- The checksum column on the migrations table (see
-- create_migrations_table.sql), for a table diesel or an earlier release
-- created: filled in from the attempts that applied each version.
ALTER TABLE {migrations} ADD COLUMN IF NOT EXISTS checksum TEXT;
