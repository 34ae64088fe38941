-- After add_checksum_column.sql, when an attempts table of layout 3 exists.
UPDATE {migrations} m
SET checksum = s.checksum
FROM (
    SELECT DISTINCT ON (ltrim(version, '0')) version, checksum
    FROM {attempts}
    WHERE ((operation = 'up' AND outcome = 'success') OR (operation = 'resolve' AND outcome = 'applied'))
      AND (ledger = {ledger} OR ledger IS NULL)
    ORDER BY ltrim(version, '0'), id DESC
) s
-- However each spells the version (`1` for `01`).
WHERE ltrim(s.version, '0') = ltrim(m.version, '0') AND m.checksum IS NULL;
