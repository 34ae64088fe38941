-- After add_checksum_column.sql, when an attempts table of layout 3 exists.
UPDATE {migrations} m
SET checksum = s.checksum
FROM (
    SELECT DISTINCT ON (version) version, checksum
    FROM {attempts}
    WHERE ((operation = 'up' AND outcome = 'success') OR (operation = 'resolve' AND outcome = 'applied'))
      AND (ledger = {ledger} OR ledger IS NULL)
    ORDER BY version, id DESC
) s
WHERE s.version = m.version AND m.checksum IS NULL;
