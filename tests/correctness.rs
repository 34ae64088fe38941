//! Reproductions of paths that broke "exactly once, nothing lost, no secret
//! printed", each against a real PostgreSQL server: where the ledger lives,
//! what a resumed migration re-runs, `requires_deferred` ordering, index
//! names PostgreSQL truncates, lock keys, session settings handed back to a
//! pool, secrets in URLs, and the statement splitter.

mod support;

use diesel::connection::SimpleConnection;
use diesel_rollout::ErrorKind;
use support::{TempSet, TestDb};

/// Statements the splitter once got wrong are applied as PostgreSQL reads
/// them, in both transaction modes.
#[test]
fn the_splitter_agrees_with_postgresql() {
    let db = TestDb::new();
    let set = TempSet::new();
    // A `--` comment ends at a lone `\r`: the ALTER after it must run.
    set.required_no_tx(
        "1_carriage_return",
        "CREATE TABLE a (x int); -- note\rALTER TABLE a ADD COLUMN y int;\n",
    );
    set.required(
        "2_carriage_return_tx",
        "CREATE TABLE b (x int); -- note\rALTER TABLE b ADD COLUMN y int;\n",
    );
    // A multi-action rule: its `;` are inside parentheses.
    set.required(
        "3_rule",
        "CREATE TABLE t (x int);\nCREATE TABLE u (x int);\n\
         CREATE RULE r AS ON INSERT TO t DO ALSO (\n  INSERT INTO u VALUES (1);\n  \
         INSERT INTO u VALUES (2)\n);\n",
    );
    set.required_no_tx(
        "4_rule_no_tx",
        "CREATE TABLE t2 (x int);\n\
         CREATE RULE r2 AS ON INSERT TO t2 DO ALSO (INSERT INTO u VALUES (3); INSERT INTO u VALUES (4));\n",
    );
    // An escape string continued on the next line stays an escape string.
    set.required_no_tx(
        "5_escape_continued",
        "CREATE TABLE s (v text);\nINSERT INTO s VALUES (E'it''s'\n  '\\'; still the string');\n",
    );
    let m = set.migrator();
    let report = m.run_required(&db.url).unwrap();
    assert_eq!(report.applied.len(), 5);
    for table in ["a", "b"] {
        assert_eq!(
            db.count(&format!(
                "SELECT count(*) AS n FROM information_schema.columns \
                 WHERE table_name = '{table}' AND column_name = 'y'"
            )),
            1,
            "the statement after the `\\r`-ended comment of {table} ran"
        );
    }
    let mut c = db.conn();
    c.batch_execute("INSERT INTO t VALUES (0); INSERT INTO t2 VALUES (0)")
        .unwrap();
    assert_eq!(
        db.texts("SELECT x::text AS t FROM u ORDER BY x"),
        ["1", "2", "3", "4"]
    );
    assert_eq!(
        db.texts("SELECT v AS t FROM s"),
        ["it's'; still the string"]
    );
}

/// `COPY ... FROM stdin` would load nothing and be recorded as applied: the
/// set is refused, naming the file and line, before anything runs.
#[test]
fn a_client_copy_is_refused_naming_the_line() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_ok", "CREATE TABLE t (a int);\n");
    let dir = set.required("2_copy", "-- seed\nCOPY t (a) FROM stdin;\n1\n2\n\\.\n");
    let err = diesel_rollout::MigrationSet::from_dirs(&set.required_dir(), &set.deferred_dir())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidMigrationSet);
    let text = err.to_string();
    let at = format!("{}:2:", dir.join("up.sql").display());
    assert!(text.contains(&at), "{text}");
    assert!(text.contains("INSERT ... VALUES"), "{text}");
    // The CLI refuses the same set and applies nothing.
    let out = db
        .rollout()
        .args(["up", "--required-only", "--migrations-dir"])
        .arg(set.required_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&at));
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_class WHERE relname = '__diesel_schema_migrations'"),
        0
    );
}
