-- The fast path's one query: applied versions and, for each, the checksum
-- of its latest successful attempt (an index lookup per version). Both names
-- resolve on search_path; when an unqualified attempts table found there is
-- not beside the migrations table, no row comes back and the caller resolves
-- the ledger.
SELECT m.version,
       (SELECT a.checksum FROM {attempts} a
        WHERE a.version = m.version
          AND ((a.operation = 'up' AND a.outcome = 'success')
               OR (a.operation = 'resolve' AND a.outcome = 'applied'))
          AND (a.ledger = {ledger} OR a.ledger IS NULL)
        ORDER BY a.id DESC
        LIMIT 1) AS applied_checksum
FROM {migrations} m
WHERE {attempts_beside}
