UPDATE {attempts}
SET outcome = $2, finished_at = clock_timestamp(), error = $3
WHERE id = $1
