UPDATE {attempts} SET statements_completed = $2 WHERE id = $1
