//! The required-track runner against a real PostgreSQL server.

mod support;

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel_rollout::{ErrorKind, State};
use support::{fixture, migrator, TestDb};

fn effects(db: &TestDb) -> Vec<String> {
    db.texts(
        "SELECT version || ':' || count(*) AS t FROM effects GROUP BY version ORDER BY version",
    )
}

#[test]
fn applies_from_empty_then_a_second_run_does_nothing() {
    let db = TestDb::new();
    let m = migrator("counted");

    let report = m.run_required(&db.url).unwrap();
    let applied: Vec<_> = report.applied.iter().map(|a| a.version.as_str()).collect();
    assert_eq!(applied, ["0001", "0002", "0003", "0010"]);
    assert!(report.took_lock);
    assert_eq!(effects(&db), ["0001:1", "0002:1", "0003:1", "0010:1"]);
    // diesel's table has the same history, so the diesel CLI agrees.
    assert_eq!(
        db.texts("SELECT version AS t FROM __diesel_schema_migrations ORDER BY version"),
        ["0001", "0002", "0003", "0010"]
    );
    // The no-transaction migration's two concurrent builds and $$ body ran.
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE c.relname IN ('items_label_idx', 'items_label_lower_idx') AND i.indisvalid"
        ),
        2
    );
    assert_eq!(db.count("SELECT item_count() AS n"), 0);

    let again = m.run_required(&db.url).unwrap();
    assert!(again.applied.is_empty());
    assert!(!again.took_lock, "nothing pending must not take the lock");
    assert_eq!(effects(&db), ["0001:1", "0002:1", "0003:1", "0010:1"]);
    // The deferred migration is not part of the required run.
    let status = m.status(&mut db.conn()).unwrap();
    let deferred = status.iter().find(|s| s.version == "0011").unwrap();
    assert_eq!(deferred.state, State::Pending);
    assert_eq!(db.advisory_locks(), 0);
}

#[test]
fn eight_processes_racing_apply_each_migration_exactly_once() {
    let db = TestDb::new();
    let dir = fixture("counted");
    let children: Vec<_> = (0..8)
        .map(|_| {
            db.rollout()
                .args(["-q", "up", "--migrations-dir"])
                .arg(dir.join("migrations"))
                .output_spawn()
        })
        .collect();
    let mut applied_by = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "rollout up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        applied_by.push(stdout.matches("applied 0").count());
    }
    // `up` applies both tracks: each migration once, across all processes.
    assert_eq!(
        effects(&db),
        ["0001:1", "0002:1", "0003:1", "0010:1", "0011:1"]
    );
    assert_eq!(applied_by.iter().sum::<usize>(), 5, "{applied_by:?}");
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_rollout_attempts WHERE outcome = 'success'"),
        5
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_rollout_attempts WHERE outcome <> 'success'"),
        0
    );
    assert_eq!(db.advisory_locks(), 0);
}

trait SpawnPiped {
    fn output_spawn(&mut self) -> std::process::Child;
}

impl SpawnPiped for std::process::Command {
    fn output_spawn(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn rollout")
    }
}

#[test]
fn a_failure_mid_set_keeps_earlier_migrations_and_leaves_nothing_of_the_failed_one() {
    let db = TestDb::new();
    let m = migrator("fails_midway");
    let err = m.run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MigrationFailed);
    let at = err.migration().unwrap();
    assert_eq!(at.version, "2");
    assert_eq!(at.line, Some(5));
    let text = err.to_string();
    assert!(text.contains("2_broken/up.sql:5"), "{text}");
    assert!(text.contains("no_such_column"), "{text}");
    let report = err.report().unwrap();
    assert_eq!(report.applied.len(), 1);
    assert_eq!(report.applied[0].version, "1");

    assert_eq!(db.count("SELECT count(*) AS n FROM widgets"), 0);
    // Statement 1 of the failed migration ran, but its transaction rolled back.
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_class WHERE relname IN ('gadgets', 'never_reached')"
        ),
        0
    );
    let states: Vec<_> = m
        .status(&mut db.conn())
        .unwrap()
        .into_iter()
        .map(|s| (s.version, s.state))
        .collect();
    assert_eq!(
        states,
        [
            ("1".to_string(), State::Applied),
            ("2".to_string(), State::Failed),
            ("3".to_string(), State::Pending)
        ]
    );
    assert_eq!(
        db.texts("SELECT error AS t FROM __diesel_rollout_attempts WHERE outcome = 'failed'")
            .len(),
        1
    );
    assert_eq!(
        db.advisory_locks(),
        0,
        "the lock must be released after a failure"
    );
}

#[test]
fn a_failed_no_transaction_migration_resumes_after_its_last_completed_statement() {
    let db = TestDb::new();
    let m = migrator("no_tx_fails");
    let err = m.run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MigrationFailed);
    assert_eq!(err.migration().unwrap().line, Some(2));
    assert!(err.to_string().contains("statement 2 of 3"), "{err}");
    // The advice matches what the resume accepts: the file as it ran.
    assert!(
        err.to_string().contains("refuses an edited one")
            && err.to_string().contains("--rolled-back`, then fix it"),
        "{err}"
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_class WHERE relname = 'step_one'"),
        1
    );
    let status = m.status(&mut db.conn()).unwrap();
    assert_eq!(status[0].state, State::Failed);
    assert_eq!(status[0].statements_completed, Some(1));
    assert_eq!(db.advisory_locks(), 0);

    // Fix the cause; the retry must not run statement 1 again (it would
    // fail: step_one exists).
    diesel::sql_query("CREATE TABLE step_two_target (id INT)")
        .execute(&mut db.conn())
        .unwrap();
    let report = m.run_required(&db.url).unwrap();
    assert_eq!(report.applied.len(), 1);
    assert_eq!(report.applied[0].statements, 2);
    assert_eq!(db.count("SELECT count(*) AS n FROM step_two_target"), 1);
    assert_eq!(m.status(&mut db.conn()).unwrap()[0].state, State::Applied);
}

#[test]
fn an_unknown_applied_version_is_reported_not_an_error_unless_strict() {
    let db = TestDb::new();
    let m = migrator("counted");
    m.run_required(&db.url).unwrap();
    diesel::sql_query("INSERT INTO __diesel_schema_migrations (version) VALUES ('9999')")
        .execute(&mut db.conn())
        .unwrap();

    let report = m.run_required(&db.url).unwrap();
    assert_eq!(report.unknown, ["9999"]);
    let status = m.status(&mut db.conn()).unwrap();
    let last = status.last().unwrap();
    assert_eq!(
        (last.version.as_str(), last.state),
        ("9999", State::Unknown)
    );
    assert!(m.verify(&mut db.conn()).unwrap().is_complete());

    let err = m.clone().strict(true).run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownVersions);
    assert!(err.to_string().contains("9999"), "{err}");
}

#[test]
fn verify_names_a_gap_and_works_on_a_read_only_session() {
    let db = TestDb::new();
    let m = migrator("counted");

    // Read-only and empty: verify reports everything missing, no error.
    diesel::sql_query(format!(
        "ALTER DATABASE \"{}\" SET default_transaction_read_only = on",
        db.name
    ))
    .execute(&mut db.conn())
    .unwrap();
    let v = m.verify(&mut db.conn()).unwrap();
    assert_eq!(v.missing.len(), 4);
    let err = m.run_required(&db.url).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    assert_eq!(db.advisory_locks(), 0);

    let mut rw = db.conn();
    rw.batch_execute("SET default_transaction_read_only = off")
        .unwrap();
    rw.batch_execute(&format!(
        "ALTER DATABASE \"{}\" SET default_transaction_read_only = off",
        db.name
    ))
    .unwrap();
    m.run_required(&db.url).unwrap();
    diesel::sql_query("DELETE FROM __diesel_schema_migrations WHERE version = '0002'")
        .execute(&mut db.conn())
        .unwrap();
    diesel::sql_query(format!(
        "ALTER DATABASE \"{}\" SET default_transaction_read_only = on",
        db.name
    ))
    .execute(&mut db.conn())
    .unwrap();

    let v = m.verify(&mut db.conn()).unwrap();
    assert!(!v.is_complete());
    assert_eq!(v.missing, [("0002".to_string(), true)]);

    let out = db
        .rollout()
        .args(["verify", "--migrations-dir"])
        .arg(fixture("counted").join("migrations"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("missing: 0002_create_items (a gap"),
        "{stdout}"
    );
}

#[test]
fn a_held_lock_is_waited_for_and_its_holder_named() {
    let db = TestDb::new();
    let m = migrator("counted")
        .lock_wait_deadline(Duration::from_millis(800))
        .lock_poll_interval(Duration::from_millis(50));
    let mut holder = db.conn();
    let key = m
        .lock_keys(&mut holder, diesel_rollout::Track::Required)
        .unwrap()[0];
    holder
        .batch_execute(&format!(
            "SET application_name = 'other-replica'; SELECT pg_advisory_lock({key})"
        ))
        .unwrap();

    let err = m.run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LockTimeout);
    assert!(err.to_string().contains("other-replica"), "{err}");
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_class WHERE relname = 'effects'"),
        0
    );

    diesel::sql_query(format!("SELECT pg_advisory_unlock({key})"))
        .execute(&mut holder)
        .unwrap();
    assert_eq!(m.run_required(&db.url).unwrap().applied.len(), 4);
}

#[test]
fn an_edited_applied_migration_warns_and_strict_mode_refuses() {
    let db = TestDb::new();
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("counted");
    copy_dir(&src, tmp.path());
    let set = |root: &std::path::Path| {
        diesel_rollout::MigrationSet::from_dirs(
            &root.join("migrations"),
            &root.join("migrations_deferred"),
        )
        .unwrap()
    };
    diesel_rollout::Migrator::new(set(tmp.path()))
        .run_required(&db.url)
        .unwrap();
    let up = tmp.path().join("migrations/0001_create_effects/up.sql");
    let body = std::fs::read_to_string(&up).unwrap();
    std::fs::write(&up, body + "\n-- edited after it was applied\n").unwrap();

    let m = diesel_rollout::Migrator::new(set(tmp.path()));
    let report = m.run_required(&db.url).unwrap();
    assert_eq!(report.changed, ["0001"]);
    let err = m.strict(true).run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ChecksumMismatch);
    assert!(err.to_string().contains("0001_create_effects"), "{err}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn ledger_tables_are_configurable_so_two_sets_share_a_database() {
    let db = TestDb::new();
    let a = migrator("fails_midway");
    let b = migrator("counted").migrations_table("other_schema_migrations");
    let mut c = db.conn();
    assert_ne!(
        a.lock_keys(&mut c, diesel_rollout::Track::Required)
            .unwrap(),
        b.lock_keys(&mut c, diesel_rollout::Track::Required)
            .unwrap()
    );
    b.run_required(&db.url).unwrap();
    assert_eq!(
        db.count("SELECT count(*) AS n FROM other_schema_migrations"),
        4
    );
    for table in ["__diesel_schema_migrations", "__diesel_rollout_attempts"] {
        assert_eq!(
            db.count(&format!(
                "SELECT count(*) AS n FROM pg_class WHERE relname = '{table}'"
            )),
            0
        );
    }
    let bad = migrator("counted").migrations_table("x; drop table y");
    assert_eq!(
        bad.run_required(&db.url).unwrap_err().kind(),
        ErrorKind::Config
    );
}

#[test]
fn diesel_harness_sees_the_same_history_and_runs_no_transaction_migrations() {
    use diesel_migrations::MigrationHarness;

    // diesel's own harness applies the set through the MigrationSource
    // impl; the no-transaction migration's two CONCURRENTLY statements
    // are sent one at a time (diesel alone sends them as one batch, which
    // PostgreSQL refuses inside its implicit transaction).
    let db = TestDb::new();
    let set = support::fixture_set("counted");
    let mut conn = db.conn();
    let applied = conn.run_pending_migrations(set.clone()).unwrap();
    assert_eq!(applied.len(), 5);
    assert_eq!(
        effects(&db),
        ["0001:1", "0002:1", "0003:1", "0010:1", "0011:1"]
    );

    // And what diesel recorded, diesel-rollout reads as applied.
    let m = migrator("counted");
    assert!(m.run_required(&db.url).unwrap().applied.is_empty());
    assert!(m.verify(&mut db.conn()).unwrap().is_complete());

    // The other way round: what diesel-rollout applied, diesel sees.
    let db2 = TestDb::new();
    m.run_required(&db2.url).unwrap();
    let mut conn2 = db2.conn();
    let versions: Vec<String> = conn2
        .applied_migrations()
        .unwrap()
        .into_iter()
        .map(|v| v.to_string())
        .collect();
    assert_eq!(versions.len(), 4);
    assert!(
        conn2.has_pending_migration(set).unwrap(),
        "0011 is deferred, so still pending"
    );
}

/// A transactional migration is sent whole; when PostgreSQL's error has no
/// position (a constraint violation), the failing statement is still
/// named, and nothing of the migration is left.
#[test]
fn a_failure_without_a_position_still_names_its_line() {
    let db = TestDb::new();
    let set = support::TempSet::new();
    set.required(
        "1_fill",
        "CREATE TABLE t (a INT NOT NULL);\nINSERT INTO t VALUES (1);\n\n-- the bad row\nINSERT INTO t VALUES (NULL);\n",
    );
    let err = set.migrator().run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MigrationFailed);
    assert_eq!(err.migration().unwrap().line, Some(5), "{err}");
    assert!(err.to_string().contains("1_fill/up.sql:5"), "{err}");
    assert!(err.to_string().contains("null value"), "{err}");
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_class WHERE relname = 't'"),
        0,
        "rolled back whole"
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_rollout_attempts WHERE outcome = 'failed'"),
        1
    );
}

/// The holder wakes waiting replicas when it lets go (a notification on
/// the lock's channel), and a waiter leaves no `LISTEN` behind on its
/// connection.
#[test]
fn releasing_the_lock_wakes_waiters_and_waiters_stop_listening() {
    let db = TestDb::new();
    let set = support::TempSet::new();
    set.required(
        "1_slow",
        "SELECT pg_sleep(2);\nCREATE TABLE a (id BIGINT PRIMARY KEY);\n",
    );
    let m = set.migrator();
    let mut listener = db.conn();
    let key = m
        .lock_keys(&mut listener, diesel_rollout::Track::Required)
        .unwrap()[0];
    let channel = format!("diesel_rollout_{:016x}", key as u64);
    listener
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .unwrap();
    // A waiter on a connection of its own, started while the holder works.
    let holder = {
        let (m, url) = (m.clone(), db.url.clone());
        std::thread::spawn(move || m.run_required(&url))
    };
    // The holder has the lock (not a fixed pause: a loaded machine may
    // take longer to connect).
    let started = std::time::Instant::now();
    while db.advisory_locks() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the holder never took the lock"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut waiter_conn = db.conn();
    let report = m.run_required_on(&mut waiter_conn).unwrap();
    assert!(
        report.applied.is_empty() && report.lock_wait > Duration::ZERO,
        "{report:?}"
    );
    assert_eq!(holder.join().unwrap().unwrap().applied.len(), 1);
    diesel::sql_query("SELECT 1")
        .execute(&mut listener)
        .unwrap();
    let woken = listener
        .notifications_iter()
        .filter_map(Result::ok)
        .filter(|n| n.channel == channel)
        .count();
    assert!(woken >= 1, "the release notified the lock's channel");
    assert_eq!(
        support::count_on(
            &mut waiter_conn,
            "SELECT count(*) AS n FROM pg_listening_channels()"
        ),
        0,
        "the waiter's connection listens to nothing any more"
    );
}
