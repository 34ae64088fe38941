//! The deferred track against a real PostgreSQL server: background leader,
//! replicas that are not the leader, takeover, and the catalog checks.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel_rollout::{DeferredState, ErrorKind, IndexState, Migrator, PgPool};
use support::{fixture, migrator, TestDb};

fn pool(db: &TestDb, size: u32) -> PgPool {
    Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(10))
        .build(ConnectionManager::<PgConnection>::new(&db.url))
        .unwrap()
}

/// Quick retries, so tests do not wait for production backoffs.
fn fast(m: Migrator) -> Migrator {
    m.deferred_retry_interval(Duration::from_millis(200))
        .deferred_retry_max_interval(Duration::from_millis(500))
        .deferred_failure_backoff(Duration::from_millis(100))
        .deferred_progress_interval(Duration::from_millis(100))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn index_valid(db: &TestDb, name: &str) -> Option<bool> {
    let rows = db.texts(&format!(
        "SELECT i.indisvalid::text AS t FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE c.relname = '{name}'"
    ));
    rows.first().map(|v| v == "true")
}

fn invalid_indexes(db: &TestDb) -> i64 {
    db.count("SELECT count(*) AS n FROM pg_index WHERE NOT indisvalid")
}

fn building(db: &TestDb) -> bool {
    db.count(
        "SELECT count(*) AS n FROM pg_stat_progress_create_index \
         WHERE datname = current_database()",
    ) > 0
}

/// Holds a write on `things` open, so a concurrent index build waits.
fn hold_writer(db: &TestDb) -> PgConnection {
    let mut c = db.conn();
    c.batch_execute("BEGIN; INSERT INTO things (val, grp) VALUES (-1, 0)")
        .unwrap();
    c
}

#[test]
fn run_returns_while_a_slow_deferred_migration_is_still_running() {
    let db = TestDb::new();
    let pool = pool(&db, 3);
    let m = fast(migrator("deferred_build"));
    let (report, handle) = m.run(&pool).unwrap();
    assert_eq!(report.applied.len(), 1);
    // The deferred migration sleeps 1.5 s before building: ready before it.
    assert!(
        !handle.is_finished(),
        "ready before the deferred track ends"
    );
    wait_until(
        "the deferred migration to run",
        Duration::from_secs(10),
        || matches!(handle.state(), DeferredState::Running { .. }),
    );
    let end = handle.wait(Duration::from_secs(60));
    assert_eq!(
        end,
        DeferredState::Done {
            applied: vec!["0002".into()]
        }
    );
    assert_eq!(index_valid(&db, "things_val_idx"), Some(true));
    let metrics = handle.metrics();
    assert_eq!(metrics.runs_success, 1);
    assert_eq!(metrics.migration_durations.len(), 1);
    assert_eq!(metrics.pending, 0);
    drop(handle);
    assert_eq!(db.advisory_locks(), 0);
}

#[test]
fn eight_replicas_one_leads_the_others_report_not_leader_at_once() {
    let db = TestDb::new();
    let dir = fixture("deferred_build");
    fast(migrator("deferred_build"))
        .run_required(&db.url)
        .unwrap();
    // The leader's build waits for this writer, so every other replica,
    // however late it starts on a loaded machine, finds it leading.
    let writer = hold_writer(&db);
    let start = Instant::now();
    let mut children: Vec<(Child, Instant)> = (0..8)
        .map(|_| {
            let c = db
                .rollout()
                .args(["-q", "deferred", "--migrations-dir"])
                .arg(dir.join("migrations"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (c, Instant::now())
        })
        .collect();
    wait_until(
        "the 7 other replicas to exit",
        Duration::from_secs(60),
        || {
            children
                .iter_mut()
                .filter_map(|(c, _)| c.try_wait().unwrap())
                .count()
                >= 7
        },
    );
    drop(writer);
    let mut leaders = 0;
    let mut not_leaders = 0;
    for (child, _) in children {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        match out.status.code() {
            Some(0) => {
                assert!(stdout.contains("applied 0002_index_things_val"), "{stdout}");
                leaders += 1;
            }
            Some(3) => {
                assert!(
                    stdout.contains("the deferred lock is held by pid"),
                    "{stdout}"
                );
                not_leaders += 1;
            }
            other => panic!(
                "unexpected exit {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    assert_eq!((leaders, not_leaders), (1, 7));
    assert!(start.elapsed() < Duration::from_secs(90));
    assert_eq!(db.texts("SELECT version AS t FROM effects"), ["0002"]);
    assert_eq!(index_valid(&db, "things_val_idx"), Some(true));
    assert_eq!(db.advisory_locks(), 0);
}

#[test]
fn a_killed_leader_is_taken_over_and_the_index_ends_valid() {
    let db = TestDb::new();
    let dir = fixture("deferred_build");
    migrator("deferred_build").run_required(&db.url).unwrap();
    let writer = hold_writer(&db);

    let rollout = |wait: bool| -> Child {
        let mut c: Command = db.rollout();
        c.args(["-q", "deferred", "--migrations-dir"])
            .arg(dir.join("migrations"));
        if wait {
            c.arg("--wait");
        }
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut leader = rollout(false);
    wait_until(
        "the leader to start building",
        Duration::from_secs(20),
        || building(&db),
    );
    let follower = rollout(true);
    std::thread::sleep(Duration::from_millis(300));
    leader.kill().unwrap();
    leader.wait().unwrap();
    // The leader's backend notices its client is gone (client connection
    // check) and aborts the build, leaving an invalid index.
    wait_until(
        "the dead leader's build to end",
        Duration::from_secs(30),
        || !building(&db),
    );
    assert_eq!(index_valid(&db, "things_val_idx"), Some(false));
    drop(writer); // roll the blocking write back

    let out = follower.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(index_valid(&db, "things_val_idx"), Some(true));
    assert_eq!(invalid_indexes(&db), 0);
    assert_eq!(db.texts("SELECT version AS t FROM effects"), ["0002"]);
    assert_eq!(db.advisory_locks(), 0);
}

#[test]
fn a_terminated_leader_backend_retries_and_repairs_the_invalid_index() {
    let db = TestDb::new();
    let pool = pool(&db, 3);
    let m = fast(migrator("deferred_build"));
    m.run_required(&db.url).unwrap();
    let writer = hold_writer(&db);
    let handle = m.start_deferred(pool);
    wait_until("the build to start", Duration::from_secs(20), || {
        building(&db)
    });
    db.conn()
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_progress_create_index \
             WHERE datname = current_database()",
        )
        .unwrap();
    wait_until("the build to end", Duration::from_secs(20), || {
        !building(&db)
    });
    drop(writer);
    let end = handle.wait(Duration::from_secs(60));
    assert!(matches!(end, DeferredState::Done { .. }), "{end:?}");
    assert_eq!(index_valid(&db, "things_val_idx"), Some(true));
    assert_eq!(invalid_indexes(&db), 0);
    assert_eq!(handle.metrics().invalid_indexes_repaired, 1);
    drop(handle);
    assert_eq!(db.advisory_locks(), 0);
}

#[test]
fn a_failed_unique_build_is_recorded_then_dropped_and_rebuilt_after_the_fix() {
    let db = TestDb::new();
    let pool = pool(&db, 2);
    let m = fast(migrator("deferred_unique")).deferred_failure_retries(0);
    m.run_required(&db.url).unwrap();

    let end = m.run_deferred(pool.clone());
    match &end {
        DeferredState::Failed { version, error } => {
            assert_eq!(version.as_deref(), Some("0002"));
            assert!(error.contains("could not create unique index"), "{error}");
            assert!(error.contains("0002_unique_things_grp/up.sql:2"), "{error}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(index_valid(&db, "things_grp_key"), Some(false));
    let status = m.status(&mut db.conn()).unwrap();
    let row = status.iter().find(|s| s.version == "0002").unwrap();
    assert_eq!(row.state, diesel_rollout::State::Failed);
    assert_eq!(row.indexes[0].state, IndexState::Invalid);
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM __diesel_rollout_attempts \
             WHERE version = '0002' AND outcome = 'failed'"
        ),
        1
    );

    // Fix the data; the next run drops the invalid index and rebuilds it
    // (IF NOT EXISTS alone would skip it and call it done).
    db.conn()
        .batch_execute(
            "DELETE FROM things WHERE id NOT IN (SELECT min(id) FROM things GROUP BY grp)",
        )
        .unwrap();
    let handle = m.start_deferred(pool);
    let end = handle.wait(Duration::from_secs(60));
    assert!(matches!(end, DeferredState::Done { .. }), "{end:?}");
    assert_eq!(handle.metrics().invalid_indexes_repaired, 1);
    assert_eq!(index_valid(&db, "things_grp_key"), Some(true));
    assert_eq!(invalid_indexes(&db), 0);
}

#[test]
fn with_a_pool_of_two_the_service_still_gets_a_connection() {
    let db = TestDb::new();
    let pool = pool(&db, 2);
    let m = fast(migrator("deferred_build"));
    m.run_required(&db.url).unwrap();
    let handle = m.start_deferred(pool.clone());
    wait_until(
        "the deferred migration to run",
        Duration::from_secs(10),
        || matches!(handle.state(), DeferredState::Running { .. }),
    );
    let mut conn = pool
        .get_timeout(Duration::from_secs(2))
        .expect("the service gets a connection while the deferred track runs");
    conn.batch_execute("SELECT 1").unwrap();
    assert!(pool.state().connections <= 2);
    let sessions = db.count(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
         AND backend_type = 'client backend'",
    );
    assert!(sessions <= 2, "{sessions} sessions for a pool of 2");
    drop(conn);
    let end = handle.wait(Duration::from_secs(60));
    assert!(matches!(end, DeferredState::Done { .. }), "{end:?}");
}

#[test]
fn a_required_migration_blocked_by_a_deferred_build_fails_fast_naming_both() {
    let db = TestDb::new();
    let pool = pool(&db, 3);
    let v1 = fast(migrator("deferred_build"));
    v1.run_required(&db.url).unwrap();
    let writer = hold_writer(&db);
    let handle = v1.start_deferred(pool);
    wait_until("the build to start", Duration::from_secs(20), || {
        building(&db)
    });
    // The build now waits for the open write, holding its lock on things.
    let v2 = migrator("deferred_build_v2")
        .required_lock_timeout(Duration::from_millis(300))
        .lock_timeout_retry_deadline(Duration::ZERO);
    let started = Instant::now();
    let err = v2.run_required(&db.url).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(err.kind(), ErrorKind::MigrationFailed);
    let text = err.to_string();
    assert!(text.contains("lock timeout"), "{text}");
    assert!(text.contains("could not lock table things"), "{text}");
    assert!(text.contains("things_val_idx"), "{text}");
    assert!(text.contains("CREATE INDEX CONCURRENTLY"), "{text}");
    drop(writer);
    let end = handle.wait(Duration::from_secs(60));
    assert!(matches!(end, DeferredState::Done { .. }), "{end:?}");
    // Once the build is done, the required migration goes through.
    assert_eq!(v2.run_required(&db.url).unwrap().applied.len(), 1);
}

#[test]
fn deferred_migrations_wait_for_required_ones() {
    let db = TestDb::new();
    let pool = pool(&db, 2);
    let m = fast(migrator("deferred_build")).deferred_retry(true);
    let handle = m.start_deferred(pool.clone());
    wait_until(
        "the deferred track to look",
        Duration::from_secs(10),
        || matches!(handle.state(), DeferredState::WaitingForRequired { .. }),
    );
    assert_eq!(
        handle.state(),
        DeferredState::WaitingForRequired { pending: 1 }
    );
    // Once the required track is applied, the retry picks the work up.
    m.run_required(&db.url).unwrap();
    let end = handle.wait(Duration::from_secs(60));
    assert!(matches!(end, DeferredState::Done { .. }), "{end:?}");
}

#[test]
fn stopping_cancels_the_running_build_and_releases_everything() {
    let db = TestDb::new();
    let pool = pool(&db, 3);
    let m = fast(migrator("deferred_build"));
    m.run_required(&db.url).unwrap();
    let writer = hold_writer(&db);
    let handle = m.start_deferred(pool.clone());
    wait_until("the build to start", Duration::from_secs(20), || {
        building(&db)
    });
    // The build's progress shows in the handle's state.
    wait_until("progress in the state", Duration::from_secs(10), || {
        matches!(
            handle.state(),
            DeferredState::Running { progress: Some(ref p), .. }
                if p.table_name == "things"
                    && p.index_name == "things_val_idx"
                    && p.phase.starts_with("waiting for")
        )
    });
    let started = Instant::now();
    assert_eq!(handle.stop(), DeferredState::Stopped);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!building(&db));
    drop(writer);
    assert_eq!(db.advisory_locks(), 0);
    // The next start picks up where it stopped.
    let end = m.run_deferred(pool);
    assert!(matches!(end, DeferredState::Done { .. }), "{end:?}");
    assert_eq!(index_valid(&db, "things_val_idx"), Some(true));
}

#[test]
fn a_required_migration_waits_for_the_deferred_one_it_declares() {
    let db = TestDb::new();
    let pool = pool(&db, 2);
    let m = fast(migrator("requires_deferred"));

    let err = m.run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeferredDependency);
    let text = err.to_string();
    assert!(
        text.contains(
            "0003_unique_val_constraint requires deferred migration 0002_index_things_val"
        ),
        "{text}"
    );
    assert!(text.contains("rollout deferred --wait"), "{text}");
    assert_eq!(err.report().unwrap().applied.len(), 1, "0001 stays applied");
    assert_eq!(db.advisory_locks(), 0);

    // The deferred track is not held back by the migration waiting for it.
    let end = m.run_deferred(pool);
    assert!(matches!(end, DeferredState::Done { .. }), "{end:?}");
    let report = m.run_required(&db.url).unwrap();
    assert_eq!(report.applied[0].version, "0003");
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_constraint WHERE conname = 'things_val_key'"),
        1
    );
}

#[test]
fn reindex_leftovers_are_cleaned_and_other_concurrent_work_runs() {
    let db = TestDb::new();
    let pool = pool(&db, 2);
    let m = fast(migrator("deferred_kinds"));
    m.run_required(&db.url).unwrap();

    // A REINDEX CONCURRENTLY cancelled halfway leaves an invalid *_ccnew.
    let writer = hold_writer(&db);
    let url = db.url.clone();
    let reindex = std::thread::spawn(move || {
        let mut c = PgConnection::establish(&url).unwrap();
        c.batch_execute("REINDEX INDEX CONCURRENTLY things_val_idx")
    });
    wait_until("the reindex to start", Duration::from_secs(20), || {
        building(&db)
    });
    db.conn()
        .batch_execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_progress_create_index \
             WHERE datname = current_database()",
        )
        .unwrap();
    assert!(reindex.join().unwrap().is_err());
    drop(writer);
    assert_eq!(index_valid(&db, "things_val_idx_ccnew"), Some(false));

    let handle = m.start_deferred(pool);
    let end = handle.wait(Duration::from_secs(60));
    assert!(matches!(end, DeferredState::Done { .. }), "{end:?}");
    assert_eq!(handle.metrics().invalid_indexes_repaired, 1);
    assert_eq!(invalid_indexes(&db), 0);
    assert_eq!(index_valid(&db, "things_val_idx"), Some(true));
    assert_eq!(index_valid(&db, "things_old_idx"), None);
    assert_eq!(
        db.texts(
            "SELECT convalidated::text AS t FROM pg_constraint WHERE conname = 'things_grp_fk'"
        ),
        ["true"]
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM group_counts"), 100);
}

#[test]
fn replicas_do_not_rerun_a_build_another_leader_gave_up_on() {
    let db = TestDb::new();
    let pool = pool(&db, 4);
    let m = fast(migrator("deferred_unique")).deferred_failure_retries(0);
    m.run_required(&db.url).unwrap();
    // Two replicas start while a third session holds the deferred lock.
    let mut holder = db.conn();
    let key = m
        .lock_keys(&mut holder, diesel_rollout::Track::Deferred)
        .unwrap()[0];
    holder
        .batch_execute(&format!("SELECT pg_advisory_lock({key})"))
        .unwrap();
    let a = m.start_deferred(pool.clone());
    let b = m.start_deferred(pool.clone());
    wait_until(
        "both replicas to find another leader",
        Duration::from_secs(10),
        || {
            matches!(a.state(), DeferredState::NotLeader { .. })
                && matches!(b.state(), DeferredState::NotLeader { .. })
        },
    );
    holder
        .batch_execute(&format!("SELECT pg_advisory_unlock({key})"))
        .unwrap();
    for h in [&a, &b] {
        let end = h.wait(Duration::from_secs(60));
        assert!(matches!(end, DeferredState::Failed { .. }), "{end:?}");
    }
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM __diesel_rollout_attempts \
             WHERE version = '0002' AND outcome = 'failed'"
        ),
        1,
        "one leader ran the failing build; the other replica did not run it again"
    );
}

#[test]
fn a_leader_pausing_between_retries_is_not_taken_for_one_that_gave_up() {
    let db = TestDb::new();
    let pool = pool(&db, 4);
    let m = fast(migrator("deferred_unique"))
        .deferred_failure_retries(1)
        .deferred_failure_backoff(Duration::from_secs(6));
    m.run_required(&db.url).unwrap();
    let leader = m.start_deferred(pool.clone());
    wait_until(
        "the leader's first failure",
        Duration::from_secs(20),
        || matches!(leader.state(), DeferredState::Retrying { .. }),
    );
    // Another replica starts during the leader's pause: it must keep
    // waiting, not conclude the leader gave up.
    let other = m.start_deferred(pool.clone());
    wait_until(
        "the other replica to find the leader",
        Duration::from_secs(10),
        || matches!(other.state(), DeferredState::NotLeader { .. }),
    );
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM __diesel_rollout_attempts \
             WHERE version = '0002' AND outcome = 'retrying'"
        ),
        1
    );
    // The leader's last try fails for good; the other replica then sees a
    // leader that gave up and does not run the build again.
    for h in [&leader, &other] {
        let end = h.wait(Duration::from_secs(60));
        assert!(matches!(end, DeferredState::Failed { .. }), "{end:?}");
    }
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM __diesel_rollout_attempts \
             WHERE version = '0002' AND outcome IN ('failed', 'retrying')"
        ),
        2,
        "the leader's two tries, and nothing from the other replica"
    );
}

#[test]
fn a_failed_start_up_never_hands_its_connection_to_the_service() {
    let db = TestDb::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("migrations/0001_sets_then_fails");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("up.sql"),
        "SET search_path TO nowhere;\nSELECT no_such_function();\n",
    )
    .unwrap();
    std::fs::write(dir.join("metadata.toml"), "run_in_transaction = false\n").unwrap();
    let set = diesel_rollout::MigrationSet::from_dirs(
        &tmp.path().join("migrations"),
        &tmp.path().join("migrations_deferred"),
    )
    .unwrap();
    // A pool of one: the service gets whatever connection start-up used.
    let pool = pool(&db, 1);
    let err = Migrator::new(set).run(&pool).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MigrationFailed);
    let mut conn = pool.get().unwrap();
    #[derive(QueryableByName)]
    struct Path {
        #[diesel(sql_type = diesel::sql_types::Text)]
        search_path: String,
    }
    let path = diesel::sql_query("SHOW search_path")
        .get_result::<Path>(&mut conn)
        .unwrap()
        .search_path;
    assert_ne!(path, "nowhere", "the migration's SET leaked into the pool");
    assert_eq!(db.advisory_locks(), 0);
}

/// Deferred migrations run with the deferred session settings however they
/// run, in the foreground on the caller's connection (which gets its own
/// values back afterwards) or by the background leader: no parallel
/// maintenance workers by default, and the `maintenance_work_mem` asked for.
#[test]
fn deferred_builds_run_with_the_deferred_session_settings_foreground_and_background() {
    let db = TestDb::new();
    let set = support::TempSet::new();
    set.required(
        "1_seen",
        "CREATE TABLE seen (how text, workers text, mem text);\n",
    );
    let record = |how: &str| {
        format!(
            "INSERT INTO seen SELECT '{how}', current_setting('max_parallel_maintenance_workers'), \
             current_setting('maintenance_work_mem');\n"
        )
    };
    set.deferred("2_foreground", &record("foreground"));
    let m = || fast(set.migrator()).deferred_maintenance_work_mem(Some(200));
    let mut conn = db.conn();
    conn.batch_execute(
        "SET max_parallel_maintenance_workers = 3; SET maintenance_work_mem = '70MB'",
    )
    .unwrap();
    m().run_required_on(&mut conn).unwrap();
    m().run_deferred_on(&mut conn).unwrap();
    #[derive(QueryableByName)]
    struct S {
        #[diesel(sql_type = diesel::sql_types::Text)]
        t: String,
    }
    let own: S = diesel::sql_query(
        "SELECT current_setting('max_parallel_maintenance_workers') || ' ' || \
         current_setting('maintenance_work_mem') AS t",
    )
    .get_result(&mut conn)
    .unwrap();
    assert_eq!(
        own.t, "3 70MB",
        "the caller's connection got its settings back"
    );

    set.deferred("3_background", &record("background"));
    let handle = m().start_deferred(pool(&db, 2));
    let end = handle.wait(Duration::from_secs(60));
    assert!(matches!(end, DeferredState::Done { .. }), "{end:?}");
    // The server's own workers setting kept, when asked.
    set.deferred("4_server_workers", &record("server workers"));
    let mut other = db.conn();
    m().deferred_parallel_workers(None)
        .run_deferred_on(&mut other)
        .unwrap();
    let server = db.texts("SELECT current_setting('max_parallel_maintenance_workers') AS t");
    assert_eq!(
        db.texts("SELECT how || ' ' || workers || ' ' || mem AS t FROM seen ORDER BY how"),
        [
            "background 0 200MB".to_string(),
            "foreground 0 200MB".to_string(),
            format!("server workers {} 200MB", server[0])
        ]
    );
}

/// A leader stopped on its last allowed attempt (a rolling update stops
/// the old replica mid-build) records the cancel as a stop, not a failure:
/// the replica that started meanwhile takes the build over and finishes
/// it. Before, the cancel was recorded `failed`, and the other replica took
/// it for a leader that gave up.
#[test]
fn a_leader_stopped_on_its_last_attempt_is_taken_over() {
    let db = TestDb::new();
    let m = fast(migrator("deferred_build")).deferred_failure_retries(0);
    m.run_required(&db.url).unwrap();
    let writer = hold_writer(&db);
    let old = m.start_deferred(pool(&db, 2));
    wait_until("the build to start", Duration::from_secs(20), || {
        building(&db)
    });
    let new = m.start_deferred(pool(&db, 2));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(old.stop(), DeferredState::Stopped);
    // The old leader's attempt (the first) is a stop, not a failure.
    assert_eq!(
        db.texts(
            "SELECT outcome AS t FROM __diesel_rollout_attempts \
             WHERE version = '0002' ORDER BY id LIMIT 1"
        ),
        ["interrupted"]
    );
    drop(writer);
    let end = new.wait(Duration::from_secs(60));
    assert!(matches!(end, DeferredState::Done { .. }), "{end:?}");
    assert_eq!(index_valid(&db, "things_val_idx"), Some(true));
    assert_eq!(db.advisory_locks(), 0);
}
