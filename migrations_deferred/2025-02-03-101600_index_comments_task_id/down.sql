DROP INDEX CONCURRENTLY IF EXISTS comments_task_id_created_at_idx;
