-- Whether a table has an index that is not valid: one being built, or a
-- failed build's leftover. Planned in a tenth of table_indexes.sql's time,
-- so an index statement with nothing to wait for or repair pays little.
SELECT EXISTS (
    SELECT 1 FROM pg_index i
    WHERE i.indrelid = to_regclass($1) AND NOT i.indisvalid
) AS found
