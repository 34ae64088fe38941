INSERT INTO {migrations} (version) VALUES ($1)
