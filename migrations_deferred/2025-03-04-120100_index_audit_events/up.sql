-- Per-account timeline queries read the newest events first.
CREATE INDEX CONCURRENTLY IF NOT EXISTS audit_events_account_occurred_idx
    ON audit_events (account_id, occurred_at DESC);
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_open_due_idx
    ON tasks (due_on) WHERE status <> 'done';
