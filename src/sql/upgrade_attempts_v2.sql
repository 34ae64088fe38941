-- Layout 1 -> 2, in one transaction, under the ledger's DDL lock (so the two
-- tracks never upgrade at once): the outcome CHECK of layout 1 rejects
-- 'retrying'; attempts record their ledger, operation and who ran them.
-- Older binaries keep working on layout 2: it accepts every row they write
-- (their rows are operation 'up', the default).
DO $$
DECLARE
    c record;
BEGIN
    IF obj_description('{attempts}'::regclass, 'pg_class') = 'diesel-rollout attempts v2' THEN
        RETURN;
    END IF;
    FOR c IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = '{attempts}'::regclass
          AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%outcome%'
    LOOP
        EXECUTE format('ALTER TABLE {attempts} DROP CONSTRAINT %I', c.conname);
    END LOOP;
    ALTER TABLE {attempts} ADD CONSTRAINT diesel_rollout_outcome
        CHECK (outcome IN ('running', 'success', 'failed', 'retrying', 'interrupted',
                           'applied', 'rolled_back'));
    ALTER TABLE {attempts} ADD COLUMN IF NOT EXISTS ledger TEXT;
    ALTER TABLE {attempts} ADD COLUMN IF NOT EXISTS operation TEXT NOT NULL DEFAULT 'up'
        CONSTRAINT diesel_rollout_operation CHECK (operation IN ('up', 'down', 'resolve'));
    ALTER TABLE {attempts} ADD COLUMN IF NOT EXISTS os_user TEXT;
    ALTER TABLE {attempts} ADD COLUMN IF NOT EXISTS db_user TEXT DEFAULT current_user;
    COMMENT ON TABLE {attempts} IS 'diesel-rollout attempts v2';
END
$$;
