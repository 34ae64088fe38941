INSERT INTO {attempts}
    (ledger, version, name, track, operation, checksum, outcome, statements_completed,
     statements_total, host, client_pid, os_user)
VALUES ({ledger}, $1, $2, $3, $9, $4, 'running', $5, $6, $7, $8, $10)
RETURNING id
