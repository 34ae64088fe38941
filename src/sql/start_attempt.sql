INSERT INTO {attempts}
    (ledger, version, name, track, checksum, outcome, statements_completed, statements_total,
     host, client_pid)
VALUES ({ledger}, $1, $2, $3, $4, 'running', $5, $6, $7, $8)
RETURNING id
