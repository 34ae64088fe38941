-- Sets the session's lock_timeout and statement_timeout ($1, $2, in ms) and
-- returns the values they had, in one round trip. The subquery (kept apart
-- by OFFSET 0) reads them before the outer SELECT sets the new ones.
SELECT old.lock_timeout,
       old.statement_timeout,
       set_config('lock_timeout', $1, false) AS new_lock_timeout,
       set_config('statement_timeout', $2, false) AS new_statement_timeout
FROM (SELECT current_setting('lock_timeout') AS lock_timeout,
             current_setting('statement_timeout') AS statement_timeout
      OFFSET 0) AS old
