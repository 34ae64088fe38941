-- The fast path's one query, on one table: applied versions and the checksum
-- of up.sql each was applied with (NULL where diesel applied it).
SELECT version, checksum AS applied_checksum FROM {migrations}
