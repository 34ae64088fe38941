-- The fast path's one query: applied versions and, for each, the checksum
-- of its latest successful attempt (an index lookup per version).
SELECT m.version,
       (SELECT a.checksum FROM {attempts} a
        WHERE a.version = m.version AND a.outcome = 'success'
        ORDER BY a.id DESC
        LIMIT 1) AS applied_checksum
FROM {migrations} m
