-- Sets the session's lock_timeout and statement_timeout ($1, $2, in ms)
-- and, each when given, its search_path ($3), max_parallel_maintenance_workers
-- ($4) and maintenance_work_mem ($5), and returns the values they had, in
-- one round trip. The subquery (kept apart by OFFSET 0) reads them before
-- the outer SELECT sets the new ones.
SELECT old.lock_timeout,
       old.statement_timeout,
       old.search_path,
       old.max_parallel_maintenance_workers,
       old.maintenance_work_mem,
       set_config('lock_timeout', $1, false) AS new_lock_timeout,
       set_config('statement_timeout', $2, false) AS new_statement_timeout,
       set_config('search_path', coalesce($3, old.search_path), false) AS new_search_path,
       set_config('max_parallel_maintenance_workers',
                  coalesce($4, old.max_parallel_maintenance_workers), false) AS new_workers,
       set_config('maintenance_work_mem',
                  coalesce($5, old.maintenance_work_mem), false) AS new_mem
FROM (SELECT current_setting('lock_timeout') AS lock_timeout,
             current_setting('statement_timeout') AS statement_timeout,
             current_setting('search_path') AS search_path,
             current_setting('max_parallel_maintenance_workers') AS max_parallel_maintenance_workers,
             current_setting('maintenance_work_mem') AS maintenance_work_mem
      OFFSET 0) AS old
