//! A generated diesel history in the shapes real projects have: tables,
//! columns and indexes, functions with `$$` bodies, triggers, `DO` blocks,
//! enum changes, views, check constraints, data fixes, `run_in_transaction
//! = false` index builds, down.sql files (some empty, some missing, one
//! with `CONCURRENTLY` in a transactional migration's down.sql), and CRLF
//! line endings on some files.

use std::path::{Path, PathBuf};

/// What [`write`] wrote.
pub struct History {
    /// The versions, oldest first.
    pub versions: Vec<String>,
    /// The directories of the migrations whose transactional down.sql uses
    /// CONCURRENTLY (what old histories hold and new rules refuse).
    pub concurrently_in_down: Vec<PathBuf>,
    /// How many run with `run_in_transaction = false`.
    pub no_transaction: usize,
    /// Tables given one `'committed early'` row by a transactional
    /// migration that commits itself halfway (an old workaround).
    pub committed_early: Vec<String>,
}

/// The directory name of migration `i`: a 14-digit version, as diesel's
/// `YYYY-MM-DD-HHMMSS` layout gives.
pub fn dir_name(i: usize, name: &str) -> String {
    format!("2020-01-01-{i:06}_{name}")
}

/// The version of migration `i`.
pub fn version(i: usize) -> String {
    format!("20200101{i:06}")
}

fn file(dir: &Path, name: &str, body: &str, crlf: bool) {
    let body = if crlf {
        body.replace('\n', "\r\n")
    } else {
        body.to_string()
    };
    std::fs::write(dir.join(name), body).unwrap();
}

/// Writes `n` migrations into `migrations` (created if missing).
pub fn write(migrations: &Path, n: usize) -> History {
    write_with(migrations, n, true)
}

/// As [`write`]; without `legacy_problems`, no down.sql uses
/// `CONCURRENTLY` in a transactional migration (a set any release accepts
/// without a baseline).
pub fn write_with(migrations: &Path, n: usize, legacy_problems: bool) -> History {
    std::fs::create_dir_all(migrations).unwrap();
    let mut history = History {
        versions: Vec::new(),
        concurrently_in_down: Vec::new(),
        no_transaction: 0,
        committed_early: Vec::new(),
    };
    for i in 0..n {
        let k = i % 12;
        // The table of this cycle, created by its first migration.
        let t = format!("t{}", i - k);
        let crlf = i % 10 == 3;
        let (name, up, down, meta): (String, String, Option<String>, Option<&str>) = match k {
            0 => (
                format!("create_{t}"),
                format!(
                    "CREATE TABLE {t} (\n    id BIGSERIAL PRIMARY KEY,\n    name TEXT NOT NULL,\n    \
                     created_at TIMESTAMPTZ NOT NULL DEFAULT now()\n);\n"
                ),
                Some(format!("DROP TABLE {t};\n")),
                None,
            ),
            1 => (
                format!("add_note_to_{t}"),
                format!(
                    "ALTER TABLE {t} ADD COLUMN note TEXT;\nCREATE INDEX {t}_note ON {t} (note);\n"
                ),
                Some(format!(
                    "DROP INDEX {t}_note;\nALTER TABLE {t} DROP COLUMN note;\n"
                )),
                None,
            ),
            2 => (
                format!("touch_function_{i}"),
                format!(
                    "CREATE OR REPLACE FUNCTION touch_{i}() RETURNS trigger\nLANGUAGE plpgsql AS $$\n\
                     BEGIN\n    NEW.created_at := now(); -- keep it fresh; really\n    RETURN NEW;\nEND;\n$$;\n"
                ),
                Some(format!("DROP FUNCTION touch_{i}();\n")),
                None,
            ),
            3 => (
                format!("trigger_on_{t}"),
                format!(
                    "CREATE TRIGGER {t}_touch BEFORE UPDATE ON {t}\n    FOR EACH ROW EXECUTE FUNCTION touch_{}();\n",
                    i - 1
                ),
                Some(format!("DROP TRIGGER {t}_touch ON {t};\n")),
                None,
            ),
            4 => (
                format!("seed_{t}"),
                format!(
                    "DO $$\nDECLARE\n    n INT := 0;\nBEGIN\n    INSERT INTO {t} (name)\n        \
                     SELECT 'x' || g FROM generate_series(1, 20) AS g;\n    \
                     GET DIAGNOSTICS n = ROW_COUNT;\n    RAISE NOTICE 'seeded %; rows', n;\nEND\n$$;\n"
                ),
                Some("-- This file should undo anything in `up.sql`\n".to_string()),
                None,
            ),
            5 => (
                format!("mood_{i}"),
                format!(
                    "CREATE TYPE mood_{i} AS ENUM ('calm', 'busy');\nALTER TYPE mood_{i} ADD VALUE 'gone';\n\
                     ALTER TABLE {t} ADD COLUMN mood mood_{i};\n"
                ),
                Some(format!(
                    "ALTER TABLE {t} DROP COLUMN mood;\nDROP TYPE mood_{i};\n"
                )),
                None,
            ),
            6 => {
                history.no_transaction += 1;
                (
                    format!("index_{t}_name"),
                    format!("CREATE INDEX CONCURRENTLY IF NOT EXISTS {t}_name ON {t} (name);\n"),
                    Some(format!("DROP INDEX CONCURRENTLY IF EXISTS {t}_name;\n")),
                    Some("run_in_transaction = false\n"),
                )
            }
            7 => (
                format!("upper_names_{t}"),
                format!("UPDATE {t} SET name = upper(name) WHERE name LIKE 'x%';\n"),
                None,
                None,
            ),
            8 => (
                format!("view_{t}"),
                format!(
                    "CREATE VIEW {t}_names AS\n    SELECT id, name, 'a;b' AS sep FROM {t};\n"
                ),
                Some(format!("DROP VIEW {t}_names;\n")),
                None,
            ),
            9 => (
                format!("check_{t}"),
                format!(
                    "ALTER TABLE {t} ADD CONSTRAINT {t}_name_len CHECK (char_length(name) < 200) NOT VALID;\n\
                     ALTER TABLE {t} VALIDATE CONSTRAINT {t}_name_len;\n"
                ),
                Some(format!("ALTER TABLE {t} DROP CONSTRAINT {t}_name_len;\n")),
                None,
            ),
            10 => (
                format!("count_function_{t}"),
                format!(
                    "COMMENT ON TABLE {t} IS 'rows of cycle {t}; see count_{t}()';\n\
                     CREATE FUNCTION count_{t}() RETURNS bigint LANGUAGE sql AS $body$\n    \
                     SELECT count(*) FROM {t} -- ; not the end\n$body$;\n"
                ),
                Some(format!("DROP FUNCTION count_{t}();\n")),
                None,
            ),
            // Before `ALTER TYPE ... ADD VALUE` could run in a transaction,
            // projects ended diesel's transaction by hand.
            _ if legacy_problems && i % 48 == 23 => {
                history.committed_early.push(t.clone());
                (
                    format!("commit_early_{t}"),
                    format!(
                        "-- ALTER TYPE ... ADD VALUE cannot run in a transaction block\nCOMMIT;\n\
                         INSERT INTO {t} (name) VALUES ('committed early');\nBEGIN;\n"
                    ),
                    Some(format!("DELETE FROM {t} WHERE name = 'committed early';\n")),
                    None,
                )
            }
            _ if legacy_problems && i % 48 == 11 => (
                format!("created_at_index_{t}"),
                format!("CREATE INDEX {t}_created_at ON {t} (created_at);\n"),
                // Years ago someone wrote this; it was never run.
                Some(format!("DROP INDEX CONCURRENTLY IF EXISTS {t}_created_at;\n")),
                None,
            ),
            _ => (
                format!("more_{t}"),
                format!(
                    "ALTER TABLE {t} ADD COLUMN extra_{i} INT NOT NULL DEFAULT 0;\n\
                     UPDATE {t} SET extra_{i} = id % 7;\n"
                ),
                Some(format!("ALTER TABLE {t} DROP COLUMN extra_{i};\n")),
                None,
            ),
        };
        let dir = migrations.join(dir_name(i, &name));
        std::fs::create_dir_all(&dir).unwrap();
        file(&dir, "up.sql", &up, crlf);
        if let Some(down) = &down {
            file(&dir, "down.sql", down, crlf);
            if down.contains("CONCURRENTLY") && meta.is_none() {
                history.concurrently_in_down.push(dir.clone());
            }
        }
        if let Some(meta) = meta {
            file(&dir, "metadata.toml", meta, false);
        }
        history.versions.push(version(i));
    }
    history
}
