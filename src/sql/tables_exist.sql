SELECT to_regclass($1) IS NOT NULL AS migrations, to_regclass($2) IS NOT NULL AS attempts
