-- Foreign-key columns used in joins and ON DELETE cascades.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_project_id_idx ON tasks (project_id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_assignee_id_idx ON tasks (assignee_id);
