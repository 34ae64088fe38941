-- Sent before `record_success.sql` when this binary spells the version with
-- leading zeros: the version under its plain spelling ($1), applied by a
-- release that spells it so, fails a division and rolls the migration's
-- transaction back. (An attempt under it still `running` is checked there.)
SELECT 1 / (length(version) * 0) FROM {migrations} WHERE version = $1
