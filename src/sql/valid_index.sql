-- Whether a table has a valid index of this name (as stored).
SELECT EXISTS (
    SELECT 1 FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    WHERE i.indrelid = to_regclass($1) AND c.relname = $2 AND i.indisvalid
) AS found
