INSERT INTO {migrations} (version, checksum) VALUES ($1, $2)
