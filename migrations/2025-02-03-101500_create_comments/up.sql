CREATE TABLE comments (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id     BIGINT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    author_id   BIGINT REFERENCES users (id) ON DELETE SET NULL,
    body        TEXT NOT NULL CHECK (length(body) <= 10000),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
