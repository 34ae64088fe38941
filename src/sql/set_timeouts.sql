-- Sets the session's lock_timeout and statement_timeout ($1, $2, in ms)
-- and, when $3 is given, its search_path, and returns the values they had,
-- in one round trip. The subquery (kept apart by OFFSET 0) reads them
-- before the outer SELECT sets the new ones.
SELECT old.lock_timeout,
       old.statement_timeout,
       old.search_path,
       set_config('lock_timeout', $1, false) AS new_lock_timeout,
       set_config('statement_timeout', $2, false) AS new_statement_timeout,
       set_config('search_path', coalesce($3, old.search_path), false) AS new_search_path
FROM (SELECT current_setting('lock_timeout') AS lock_timeout,
             current_setting('statement_timeout') AS statement_timeout,
             current_setting('search_path') AS search_path
      OFFSET 0) AS old
