-- Where `ALTER TABLE $1 DETACH PARTITION $2 CONCURRENTLY` stands
-- (both as written, resolved on the search_path).
SELECT CASE
    WHEN to_regclass($1) IS NULL OR to_regclass($2) IS NULL THEN 'unknown'
    ELSE coalesce((
        SELECT CASE WHEN inhdetachpending THEN 'pending' ELSE 'attached' END
        FROM pg_inherits
        WHERE inhrelid = to_regclass($2) AND inhparent = to_regclass($1)
    ), 'detached')
END AS state
