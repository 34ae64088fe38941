DELETE FROM {migrations} WHERE version = $1
