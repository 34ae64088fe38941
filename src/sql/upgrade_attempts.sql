-- Any earlier layout -> 3, in one transaction, under the ledger's DDL lock
-- (so the two tracks never upgrade at once). Every step is idempotent, since
-- the tables earlier releases created under the same comment differ:
-- layout 1 has none of the columns below and an outcome CHECK that rejects
-- 'retrying'; early "v2" tables lack `ledger`, later ones lack `operation`,
-- `os_user` and `db_user`. Older binaries keep working on layout 3: it
-- accepts every row they write (their rows are operation 'up', the default).
DO $$
DECLARE
    c record;
BEGIN
    IF obj_description('{attempts}'::regclass, 'pg_class') = 'diesel-rollout attempts v3' THEN
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
    ALTER TABLE {attempts} ADD COLUMN IF NOT EXISTS operation TEXT NOT NULL DEFAULT 'up';
    IF NOT EXISTS (
        SELECT FROM pg_constraint
        WHERE conrelid = '{attempts}'::regclass AND conname = 'diesel_rollout_operation'
    ) THEN
        ALTER TABLE {attempts} ADD CONSTRAINT diesel_rollout_operation
            CHECK (operation IN ('up', 'down', 'resolve'));
    END IF;
    ALTER TABLE {attempts} ADD COLUMN IF NOT EXISTS os_user TEXT;
    -- Who ran the earlier attempts is not known: NULL, not the role
    -- running this upgrade. New rows get their role from the default.
    ALTER TABLE {attempts} ADD COLUMN IF NOT EXISTS db_user TEXT;
    ALTER TABLE {attempts} ALTER COLUMN db_user SET DEFAULT current_user;
    COMMENT ON TABLE {attempts} IS 'diesel-rollout attempts v3';
END
$$;
