-- The table of an index, schema-qualified and quoted.
SELECT format('%I.%I', tn.nspname, t.relname) AS table_name
FROM pg_index i
JOIN pg_class t ON t.oid = i.indrelid
JOIN pg_namespace tn ON tn.oid = t.relnamespace
WHERE i.indexrelid = to_regclass($1)
