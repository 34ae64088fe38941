-- Layout 1 -> 2, in one transaction under the lock: the outcome CHECK of
-- layout 1 rejects 'retrying'. Older binaries keep working on layout 2: it
-- accepts every outcome they write.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = '{attempts}'::regclass
          AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%outcome%'
    LOOP
        EXECUTE format('ALTER TABLE {attempts} DROP CONSTRAINT %I', c.conname);
    END LOOP;
END
$$;
ALTER TABLE {attempts} ADD CONSTRAINT diesel_rollout_outcome
    CHECK (outcome IN ('running', 'success', 'failed', 'retrying', 'interrupted'));
COMMENT ON TABLE {attempts} IS 'diesel-rollout attempts v2';
