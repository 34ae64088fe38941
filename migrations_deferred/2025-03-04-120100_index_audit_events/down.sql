DROP INDEX CONCURRENTLY IF EXISTS tasks_open_due_idx;
DROP INDEX CONCURRENTLY IF EXISTS audit_events_account_occurred_idx;
