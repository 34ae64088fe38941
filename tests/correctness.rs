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

fn pool(db: &TestDb) -> diesel_rollout::PgPool {
    diesel::r2d2::Pool::builder()
        .max_size(3)
        .min_idle(Some(0))
        .connection_timeout(std::time::Duration::from_secs(10))
        .build(diesel::r2d2::ConnectionManager::new(&db.url))
        .unwrap()
}

/// Deferred runs that give up at once instead of retrying with backoff.
fn once(m: diesel_rollout::Migrator) -> diesel_rollout::Migrator {
    m.deferred_failure_retries(0)
        .deferred_retry(false)
        .deferred_progress_interval(std::time::Duration::from_millis(100))
}

/// `Some(valid)` for an index stored under exactly this name.
fn index_valid(db: &TestDb, name: &str) -> Option<bool> {
    db.texts(&format!(
        "SELECT i.indisvalid::text AS t FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE c.relname = '{name}'"
    ))
    .first()
    .map(|v| v == "true")
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// PostgreSQL stores at most 63 bytes of a name, cut on a character
/// boundary: the catalog checks of the deferred track look for the stored
/// name, for new indexes, invalid leftovers and `REINDEX` leftovers alike.
#[test]
fn index_names_longer_than_63_bytes_are_checked_as_postgresql_stores_them() {
    let db = TestDb::new();
    let set = TempSet::new();
    let long = format!("things_val_{}", "x".repeat(54)); // 65 bytes
    let accents = format!("things_id___{}", "é".repeat(26)); // 64 bytes: cut to 62
    let reindexed = format!("things_grp_{}", "y".repeat(60));
    set.required(
        "1_things",
        &format!(
            "CREATE TABLE things (id int, val int, grp int);\n\
             INSERT INTO things SELECT g, g % 10, g % 7 FROM generate_series(1, 2000) g;\n\
             CREATE INDEX {reindexed} ON things (grp);\n"
        ),
    );
    set.deferred(
        "2_long_names",
        &format!(
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {long} ON things (val, id);\n\
             CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {accents} ON things (id);\n"
        ),
    );
    set.deferred(
        "3_reindex_long",
        &format!("REINDEX INDEX CONCURRENTLY {reindexed};\n"),
    );
    let stored_long = &long[..63];
    let stored_accents = format!("things_id___{}", "é".repeat(25));
    assert_eq!(stored_accents.len(), 62);

    let m = once(set.migrator());
    m.run_required(&db.url).unwrap();

    // A failed build leaves an invalid index under the long name, stored cut.
    let mut c = db.conn();
    c.batch_execute("INSERT INTO things VALUES (1, 1, 1)")
        .unwrap();
    c.batch_execute(&format!(
        "CREATE UNIQUE INDEX CONCURRENTLY {long} ON things (val, id)"
    ))
    .unwrap_err();
    assert_eq!(index_valid(&db, stored_long), Some(false));
    // A REINDEX CONCURRENTLY cancelled halfway leaves `<cut base>_ccnew`.
    let mut writer = db.conn();
    writer
        .batch_execute("BEGIN; INSERT INTO things VALUES (-1, -1, -1)")
        .unwrap();
    let url = db.url.clone();
    let r = reindexed.clone();
    let reindex = std::thread::spawn(move || {
        use diesel::Connection;
        let mut c = diesel::PgConnection::establish(&url).unwrap();
        c.batch_execute(&format!("REINDEX INDEX CONCURRENTLY {r}"))
    });
    wait_until("the reindex to start", || {
        db.count(
            "SELECT count(*) AS n FROM pg_stat_progress_create_index \
             WHERE datname = current_database()",
        ) > 0
    });
    db.conn()
        .batch_execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_progress_create_index \
             WHERE datname = current_database()",
        )
        .unwrap();
    assert!(reindex.join().unwrap().is_err());
    drop(writer);
    let leftover = format!("{}_ccnew", &reindexed[..57]);
    assert_eq!(index_valid(&db, &leftover), Some(false));

    // Fix the duplicate; the deferred track drops both leftovers and builds.
    db.conn()
        .batch_execute(
            "DELETE FROM things WHERE ctid = (SELECT max(ctid) FROM things WHERE id = 1)",
        )
        .unwrap();
    let handle = m.start_deferred(pool(&db));
    let end = handle.wait(std::time::Duration::from_secs(60));
    assert!(
        matches!(end, diesel_rollout::DeferredState::Done { .. }),
        "{end:?}"
    );
    assert_eq!(handle.metrics().invalid_indexes_repaired, 2);
    assert_eq!(index_valid(&db, stored_long), Some(true));
    assert_eq!(index_valid(&db, &stored_accents), Some(true));
    assert_eq!(index_valid(&db, &reindexed[..63]), Some(true));
    assert_eq!(index_valid(&db, &leftover), None);
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_index WHERE NOT indisvalid"),
        0
    );
    // Status shows each index under its stored name, valid.
    let status = m.status(&mut db.conn()).unwrap();
    let row = status.iter().find(|r| r.version == "2").unwrap();
    let names: Vec<_> = row
        .indexes
        .iter()
        .map(|i| (i.name.as_str(), i.state.as_str()))
        .collect();
    assert_eq!(
        names,
        [(stored_long, "valid"), (stored_accents.as_str(), "valid")]
    );
}
