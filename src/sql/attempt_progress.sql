-- How many statements an attempt has recorded as completed.
SELECT coalesce(statements_completed, 0) AS n FROM {attempts} WHERE id = $1
