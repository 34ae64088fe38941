CREATE INDEX CONCURRENTLY IF NOT EXISTS comments_task_id_created_at_idx
    ON comments (task_id, created_at);
