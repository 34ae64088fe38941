//! Revert, redo, resolve and plan where they meet the rest of the harness:
//! the out-of-order check across the two tracks, the deferred lock on every
//! error path, a revert that stops halfway, what `plan` predicts against
//! what `up` does, and `redo` applying the way `up` applies.

mod support;

use diesel::connection::SimpleConnection;
use diesel_rollout::{ErrorKind, PlanAction, RevertTarget, Track};
use support::{TempSet, TestDb};

/// Reverting the newest migration is refused: its message.
fn refused_revert(m: &diesel_rollout::Migrator, db: &TestDb) -> String {
    let err = m
        .revert(&mut db.conn(), RevertTarget::Count(1))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RevertRefused, "{err}");
    err.to_string()
}

fn down(dir: &std::path::Path, sql: &str) {
    std::fs::write(dir.join("down.sql"), sql).unwrap();
}

/// One no-transaction migration creating tables t1 and t2, with this
/// down.sql, applied to `db`.
fn two_tables_applied(db: &TestDb, down_sql: &str) -> (TempSet, diesel_rollout::Migrator) {
    let set = TempSet::new();
    let one = set.required_no_tx(
        "1_tables",
        "CREATE TABLE t1 (id int);\nCREATE TABLE t2 (id int);\n",
    );
    down(&one, down_sql);
    let m = set.migrator();
    m.run_required(&db.url).unwrap();
    (set, m)
}

/// The tracks interleave by design: a deferred migration older than the
/// newest required one is the normal order, not a branch merged late.
#[test]
fn deferred_migrations_behind_required_ones_are_in_order() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("10_things", "CREATE TABLE things (id BIGINT, v INT);\n");
    set.deferred(
        "20_things_v",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS things_v ON things (v);\n",
    );
    set.required("30_more", "CREATE TABLE more (id BIGINT);\n");
    let m = set.migrator().strict(true);
    let report = m.run_required(&db.url).unwrap();
    assert_eq!(report.applied.len(), 2);
    let plan = m.plan(&mut db.conn()).unwrap();
    assert_eq!(plan.steps.len(), 1);
    assert!(!plan.steps[0].out_of_order, "{plan:?}");
    assert!(!plan.has_problems(), "{plan:?}");
    let report = m.run_deferred_on(&mut db.conn()).unwrap();
    assert_eq!(report.applied.len(), 1);
    assert!(report.out_of_order.is_empty(), "{report:?}");

    // Within a track the check still holds: a late deferred migration is
    // refused by strict mode's background leader as by `run_deferred_on`...
    set.deferred(
        "15_late_index",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS more_id ON more (id);\n",
    );
    let m = set.migrator().strict(true);
    let pool = diesel::r2d2::Pool::builder()
        .max_size(2)
        .build(diesel::r2d2::ConnectionManager::new(&db.url))
        .unwrap();
    let state = m.run_deferred(pool);
    let diesel_rollout::DeferredState::Failed { version, error } = state else {
        panic!("{state:?}");
    };
    assert_eq!(version.as_deref(), Some("15"), "{error}");
    assert!(
        error.contains("15_late_index is pending but older"),
        "{error}"
    );
    let err = m.run_deferred_on(&mut db.conn()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfOrder, "{err}");
    std::fs::remove_dir_all(set.deferred_dir().join("15_late_index")).unwrap();

    // ... and a late required migration.
    set.required("25_late", "CREATE TABLE late (id BIGINT);\n");
    let m = set.migrator().strict(true);
    let err = m.run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfOrder, "{err}");
    let plan = m.plan(&mut db.conn()).unwrap();
    assert!(plan.steps[0].out_of_order);
    assert!(plan.has_problems(), "{plan:?}");
}

/// Every way out of a revert that holds the deferred lock releases it: here
/// the session is read-only, so recording anything fails after both locks
/// are taken.
#[test]
fn a_revert_that_fails_under_the_deferred_lock_releases_it() {
    let db = TestDb::new();
    let set = TempSet::new();
    let one = set.required("1_things", "CREATE TABLE things (id BIGINT);\n");
    down(&one, "DROP TABLE things;\n");
    set.deferred(
        "2_index",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS things_id ON things (id);\n",
    );
    let m = set.migrator();
    m.run_required(&db.url).unwrap();
    m.run_deferred_on(&mut db.conn()).unwrap();
    let mut conn = db.conn();
    conn.batch_execute("SET default_transaction_read_only = on")
        .unwrap();
    let err = m.revert(&mut conn, RevertTarget::Count(1)).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    assert_eq!(
        support::count_on(
            &mut conn,
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' \
             AND pid = pg_backend_pid()"
        ),
        0,
        "the session still holds an advisory lock after {err}"
    );
    assert_eq!(db.advisory_locks(), 0);
}

/// A no-transaction revert that stops halfway leaves the schema between
/// the two sides: `verify` fails and `plan` exits 1, both naming it; the
/// revert run again resumes where it stopped.
#[test]
fn a_revert_stopped_halfway_fails_verify_and_plan_until_it_is_finished() {
    let db = TestDb::new();
    let set = TempSet::new();
    let one = set.required_no_tx(
        "1_tables",
        "CREATE TABLE t1 (id int);\nCREATE TABLE t2 (id int);\nCREATE TABLE t3 (id int);\n",
    );
    down(
        &one,
        "DROP TABLE t3;\nSELECT revert_gate();\nDROP TABLE t2;\nDROP TABLE t1;\n",
    );
    let m = set.migrator();
    m.run_required(&db.url).unwrap();
    let err = m
        .revert(&mut db.conn(), RevertTarget::Count(1))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MigrationFailed, "{err}");
    let v = m.verify(&mut db.conn()).unwrap();
    assert!(!v.is_complete(), "{v:?}");
    assert!(v.failed[0].1.contains("revert stopped halfway"), "{v:?}");
    let out = db
        .rollout()
        .args(["verify", "--migrations-dir"])
        .arg(set.required_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = db
        .rollout()
        .args(["plan", "--migrations-dir"])
        .arg(set.required_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("the revert of 1_tables stopped halfway (1 of"),
        "{text}"
    );
    // A dry run of the revert says it resumes at statement 2.
    let plan = m
        .plan_revert(&mut db.conn(), &RevertTarget::Count(1))
        .unwrap();
    assert_eq!(plan.steps[0].action, PlanAction::Resume { done: 1 });
    let done: Vec<bool> = plan.steps[0].statements.iter().map(|s| s.done).collect();
    assert_eq!(done, [true, false, false, false]);
    db.conn()
        .batch_execute("CREATE FUNCTION revert_gate() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        .unwrap();
    let report = m.revert(&mut db.conn(), RevertTarget::Count(1)).unwrap();
    assert_eq!(report.reverted.len(), 1);
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_tables WHERE tablename IN ('t1', 't2', 't3')"),
        0
    );
    m.run_required(&db.url).unwrap();
    assert!(m.verify(&mut db.conn()).unwrap().is_complete());
}

/// `plan` says what `up` will do: an attempt left running by a process that
/// died is resumed, not applied from the start; a half-done migration whose
/// up.sql changed is refused (exit 1), as `up` refuses it; strict mode's
/// refusal is a problem.
#[test]
fn plan_predicts_resumes_and_refusals_as_up_makes_them() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_base", "CREATE TABLE base (id int);\n");
    let two = set.required_no_tx(
        "2_steps",
        "CREATE TABLE s1 (id int);\nSELECT plan_gate();\nCREATE TABLE s3 (id int);\n",
    );
    let m = set.migrator();
    m.run_required(&db.url).unwrap_err();
    let resume = |plan: &diesel_rollout::Plan| plan.steps[0].action.clone();
    assert_eq!(
        resume(&m.plan(&mut db.conn()).unwrap()),
        PlanAction::Resume { done: 1 }
    );
    // The process died mid-attempt: its row still says running.
    db.conn()
        .batch_execute(
            "UPDATE __diesel_rollout_attempts SET outcome = 'running', finished_at = NULL \
             WHERE version = '2'",
        )
        .unwrap();
    assert_eq!(
        resume(&m.plan(&mut db.conn()).unwrap()),
        PlanAction::Resume { done: 1 }
    );

    // up.sql changed since: up refuses to resume, and plan says so.
    std::fs::write(
        two.join("up.sql"),
        "CREATE TABLE s1 (id int);\nSELECT plan_gate();\nCREATE TABLE s3 (id bigint);\n",
    )
    .unwrap();
    let m = set.migrator();
    let plan = m.plan(&mut db.conn()).unwrap();
    let PlanAction::Refused { reason } = resume(&plan) else {
        panic!("{plan:?}");
    };
    assert!(reason.contains("2_steps/up.sql changed since"), "{reason}");
    assert!(plan.has_problems());
    let out = db
        .rollout()
        .args(["plan", "--migrations-dir"])
        .arg(set.required_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = m.run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PartialMigrationChanged, "{err}");

    // Strict mode refuses a changed applied migration: a problem too.
    std::fs::write(
        two.join("up.sql"),
        "CREATE TABLE s1 (id int);\nSELECT plan_gate();\nCREATE TABLE s3 (id int);\n",
    )
    .unwrap();
    std::fs::write(
        set.required_dir().join("1_base/up.sql"),
        "CREATE TABLE base (id bigint);\n",
    )
    .unwrap();
    let plan = set.migrator().strict(true).plan(&mut db.conn()).unwrap();
    assert!(
        plan.problems.iter().any(|p| p.contains("`up` refuses")),
        "{plan:?}"
    );
    assert!(set.migrator().strict(true).run_required(&db.url).is_err());
    assert!(!set.migrator().plan(&mut db.conn()).unwrap().has_problems());
}

/// `redo` applies again the way `up` applies: strict mode refuses before
/// anything is reverted, a required migration finds the deferred one it
/// requires applied just before it, and a failure reports both what was
/// reverted and what was applied again.
#[test]
fn redo_applies_again_the_way_up_does() {
    let db = TestDb::new();
    let set = TempSet::new();
    let one = set.required("1_things", "CREATE TABLE things (id BIGINT, v INT);\n");
    down(&one, "DROP TABLE things;\n");
    let two = set.deferred(
        "2_things_v",
        "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS things_v ON things (v);\n",
    );
    down(&two, "DROP INDEX CONCURRENTLY IF EXISTS things_v;\n");
    let three = set.required_with(
        "3_constraint",
        "ALTER TABLE things ADD CONSTRAINT things_v_key UNIQUE USING INDEX things_v;\n",
        "run_in_transaction = true\nrequires_deferred = [\"2\"]\n",
    );
    down(
        &three,
        "ALTER TABLE things DROP CONSTRAINT things_v_key;\n\
         CREATE UNIQUE INDEX things_v ON things (v);\n",
    );
    let m = set.migrator();
    let report = m.run_required(&db.url).unwrap_err();
    assert_eq!(report.kind(), ErrorKind::DeferredDependency);
    m.run_deferred_on(&mut db.conn()).unwrap();
    m.run_required(&db.url).unwrap();

    // Redo both: 3 and 2 reverted, then 2 and 3 applied again, in order.
    let report = m.redo(&mut db.conn(), 2).unwrap();
    let versions =
        |a: &[diesel_rollout::Applied]| a.iter().map(|x| x.version.clone()).collect::<Vec<_>>();
    assert_eq!(versions(&report.reverted), ["3", "2"]);
    assert_eq!(versions(&report.applied), ["2", "3"]);
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_constraint WHERE conname = 'things_v_key'"),
        1
    );

    // Strict mode with a changed applied migration: refused, nothing
    // reverted.
    std::fs::write(
        one.join("up.sql"),
        "CREATE TABLE things (id BIGINT, v BIGINT);\n",
    )
    .unwrap();
    let err = set
        .migrator()
        .strict(true)
        .redo(&mut db.conn(), 1)
        .unwrap_err();
    assert!(err.to_string().contains("1_things"), "{err}");
    assert!(err.report().unwrap().reverted.is_empty());
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_schema_migrations"),
        3
    );
    std::fs::write(
        one.join("up.sql"),
        "CREATE TABLE things (id BIGINT, v INT);\n",
    )
    .unwrap();

    // A down.sql that leaves its table behind: 4 comes back, 5 fails; the
    // report says both.
    let four = set.required("4_extra", "CREATE TABLE extra (id int);\n");
    down(&four, "DROP TABLE extra;\n");
    let five = set.required("5_more", "CREATE TABLE more (id int);\n");
    down(&five, "SELECT 1;\n");
    let m = set.migrator();
    m.run_required(&db.url).unwrap();
    let err = m.redo(&mut db.conn(), 2).unwrap_err();
    let report = err.report().unwrap();
    assert_eq!(versions(&report.reverted), ["5", "4"]);
    assert_eq!(versions(&report.applied), ["4"], "{err}");
    assert_eq!(err.kind(), ErrorKind::MigrationFailed, "{err}");
    assert!(err.to_string().contains("\"more\" already exists"), "{err}");
    let status = m.status(&mut db.conn()).unwrap();
    let state = |v: &str| status.iter().find(|s| s.version == v).unwrap().state;
    assert_eq!(state("4"), diesel_rollout::State::Applied);
    assert_eq!(state("5"), diesel_rollout::State::Failed);
}

/// A transactional revert that fails undoes nothing: the migration stays
/// applied and whole, so `verify` passes, `status` says nothing was undone,
/// and nothing points at `resolve --rolled-back` (which would run it again).
#[test]
fn a_failed_transactional_revert_leaves_the_migration_whole() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_things", "CREATE TABLE things (id int);\n");
    let two = set.required("2_rows", "INSERT INTO things VALUES (1), (2);\n");
    down(&two, "DELETE FROM things;\nDROP TABLE nope;\n");
    let m = set.migrator();
    m.run_required(&db.url).unwrap();
    let err = m
        .revert(&mut db.conn(), RevertTarget::Count(1))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MigrationFailed, "{err}");
    assert_eq!(db.count("SELECT count(*) AS n FROM things"), 2);
    let v = m.verify(&mut db.conn()).unwrap();
    assert!(v.is_complete(), "{v:?}");
    let plan = m.plan(&mut db.conn()).unwrap();
    assert!(!plan.has_problems(), "{plan:?}");
    let status = m.status(&mut db.conn()).unwrap();
    let error = status[1].error.clone().unwrap_or_default();
    assert!(
        error.starts_with("revert failed, nothing undone"),
        "{error}"
    );
}

/// A no-transaction revert killed partway (its attempt still `running`, no
/// lock taken since) fails `verify` and `plan`: part of its down.sql ran.
#[test]
fn a_revert_killed_partway_fails_verify() {
    let db = TestDb::new();
    let (_set, m) = two_tables_applied(&db, "DROP TABLE t2;\nDROP TABLE t1;\n");
    // As a revert killed after its first statement leaves it.
    db.conn()
        .batch_execute(
            "DROP TABLE t2; \
             INSERT INTO __diesel_rollout_attempts (ledger, version, name, track, operation, \
             checksum, outcome, statements_completed, statements_total) \
             VALUES ('public.__diesel_schema_migrations', '1', 'tables', 'required', 'down', \
             'x', 'running', 1, 2)",
        )
        .unwrap();
    let v = m.verify(&mut db.conn()).unwrap();
    assert!(!v.is_complete(), "{v:?}");
    assert!(v.failed[0].1.contains("revert stopped halfway"), "{v:?}");
    assert!(m.plan(&mut db.conn()).unwrap().has_problems());
}

/// A newer migration that stopped halfway resumes after the statements it
/// recorded; reverting what it builds on first is refused, naming it.
#[test]
fn revert_refuses_to_undo_what_a_half_applied_migration_builds_on() {
    let db = TestDb::new();
    let set = TempSet::new();
    let one = set.required(
        "1_things",
        "CREATE TABLE things (id int);\nINSERT INTO things VALUES (1), (1);\n",
    );
    down(&one, "DROP TABLE things;\n");
    set.required_no_tx(
        "2_indexes",
        "CREATE INDEX things_id ON things (id);\nCREATE UNIQUE INDEX things_id_key ON things (id);\n",
    );
    let m = set.migrator();
    let err = m.run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MigrationFailed, "{err}");
    let text = refused_revert(&m, &db);
    assert!(
        text.contains("migration 2_indexes stopped halfway (1 statements done)"),
        "{text}"
    );
    assert!(text.contains("rollout resolve 2 --rolled-back"), "{text}");
    assert_eq!(db.count("SELECT count(*) AS n FROM things"), 2);
    let err = m.redo(&mut db.conn(), 1).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RevertRefused, "{err}");
}

/// An attempts table commented "v2" that already has every column (as
/// some earlier builds made it) is read as it is, operations included, not
/// with the first layout's query.
#[test]
fn an_attempts_table_commented_v2_with_every_column_is_read_whole() {
    let db = TestDb::new();
    let (_set, m) = two_tables_applied(&db, "DROP TABLE t2;\nSELECT gate();\nDROP TABLE t1;\n");
    m.revert(&mut db.conn(), RevertTarget::Count(1))
        .unwrap_err();
    db.conn()
        .batch_execute("COMMENT ON TABLE __diesel_rollout_attempts IS 'diesel-rollout attempts v2'")
        .unwrap();
    let v = m.verify(&mut db.conn()).unwrap();
    assert!(!v.is_complete(), "{v:?}");
    assert!(v.failed[0].1.contains("revert stopped halfway"), "{v:?}");
}

/// A deploy rolled back to a release with no deferred track: its `revert`
/// must not undo what a newer release's deferred migration builds on while
/// that release's leader runs it (refused while it leads), nor after the
/// leader died halfway (its attempt left `running`, which the revert marks
/// interrupted under the deferred lock, and refuses). Before, a binary with
/// no deferred migrations took no deferred lock and saw neither.
#[test]
fn a_release_without_a_deferred_track_does_not_revert_under_a_newer_deferred_run() {
    let db = TestDb::new();
    let old = TempSet::new();
    let t = old.required("1_t", "CREATE TABLE t (x int);\n");
    down(&t, "DROP TABLE t;\n");
    old.migrator().run_required(&db.url).unwrap();
    let mut leader = db.conn();
    leader
        .batch_execute(&format!(
            "SELECT pg_advisory_lock({})",
            diesel_rollout::lock_key("public", "__diesel_schema_migrations", Track::Deferred)
        ))
        .unwrap();
    let err = old
        .migrator()
        .revert(&mut db.conn(), RevertTarget::Count(1))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RevertRefused, "{err}");
    assert!(
        err.to_string().contains("leads the deferred track"),
        "{err}"
    );
    // The leader dies at its statement 2.
    drop(leader);
    db.conn()
        .batch_execute(
            "INSERT INTO __diesel_rollout_attempts (ledger, version, name, track, operation, \
             checksum, outcome, statements_completed, statements_total) \
             VALUES ('public.__diesel_schema_migrations', '2', 'backfill', 'deferred', 'up', \
             'x', 'running', 1, 2)",
        )
        .unwrap();
    let err = old.migrator().redo(&mut db.conn(), 1).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.kind(), ErrorKind::RevertRefused, "{text}");
    assert!(
        text.contains("version 2 (not known to this binary) stopped halfway (1 statements done)"),
        "{text}"
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM t"),
        0,
        "t is still there"
    );
}

/// A deploy rolled back to the release before: its `revert` must not undo
/// what a newer release's no-transaction migration, stopped halfway, builds
/// on, though this binary does not know that migration. Before, it checked
/// only the migrations it knew: the table went, and the newer release's
/// resume then skipped the statement whose work the revert had undone.
#[test]
fn an_old_release_does_not_revert_under_a_newer_half_applied_migration() {
    let db = TestDb::new();
    let new = TempSet::new();
    let old = TempSet::new();
    for set in [&new, &old] {
        let t = set.required("1_t", "CREATE TABLE t (x int);\n");
        down(&t, "DROP TABLE t;\n");
    }
    new.required_no_tx(
        "2_fill",
        "INSERT INTO t VALUES (1);\nINSERT INTO missing VALUES (1);\n",
    );
    let err = new.migrator().run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MigrationFailed, "{err}");

    let err = old
        .migrator()
        .revert(&mut db.conn(), RevertTarget::Count(1))
        .unwrap_err();
    let text = err.to_string();
    assert_eq!(err.kind(), ErrorKind::RevertRefused, "{text}");
    assert!(
        text.contains("version 2 (not known to this binary)"),
        "{text}"
    );
    assert!(
        text.contains("stopped halfway (1 statements done)"),
        "{text}"
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM t"),
        1,
        "t is still there"
    );

    // The newer release, redeployed once the cause is fixed, finishes it
    // with statement 1's row in place.
    db.conn()
        .batch_execute("CREATE TABLE missing (x int)")
        .unwrap();
    new.migrator().run_required(&db.url).unwrap();
    assert_eq!(db.count("SELECT count(*) AS n FROM t"), 1);
    assert_eq!(db.count("SELECT count(*) AS n FROM missing"), 1);
}

/// A team renames `1_x` to `01_x` so the directories sort (diesel orders
/// versions as strings): `1` and `01` are one version to every read, and
/// now to every write. Before, revert ran down.sql but deleted no row (it
/// matched `01` exactly against the ledger's `1`), so the next revert ran
/// down.sql again, and `resolve --rolled-back` recorded nothing.
#[test]
fn a_version_renamed_with_leading_zeros_is_reverted_once() {
    let db = TestDb::new();
    db.conn()
        .batch_execute("CREATE TABLE log (what text)")
        .unwrap();
    let first = TempSet::new();
    first.required("1_x", "CREATE TABLE x (id int);\n");
    first.migrator().run_required(&db.url).unwrap();

    let renamed = TempSet::new();
    let dir = renamed.required("01_x", "CREATE TABLE x (id int);\n");
    down(&dir, "DROP TABLE x;\nINSERT INTO log VALUES ('down');\n");
    let m = renamed.migrator();
    let report = m.revert(&mut db.conn(), RevertTarget::Count(1)).unwrap();
    assert_eq!(report.reverted.len(), 1, "{report:?}");
    let err = m
        .revert(&mut db.conn(), RevertTarget::Count(1))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RevertRefused, "{err}");
    assert_eq!(db.texts("SELECT what AS t FROM log"), ["down"]);
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_schema_migrations"),
        0
    );
    // Applied again under the new spelling, it is one applied version.
    m.run_required(&db.url).unwrap();
    let status = m.status(&mut db.conn()).unwrap();
    assert_eq!(status.len(), 1, "one version: {status:?}");
    assert_eq!(
        status[0].state,
        diesel_rollout::State::Applied,
        "{status:?}"
    );
    assert!(!status[0].changed, "{status:?}");
}

/// The versions of a plan's steps, or of a report's reverted migrations.
fn versions<'a>(v: impl Iterator<Item = &'a String>) -> Vec<String> {
    v.cloned().collect()
}

/// On a generated 300-migration history (CRLF files, no-transaction
/// builds, missing and empty down.sql files), a dry run of revert and redo
/// changes nothing and says what the real one then does: the same
/// migrations in the same order with as many statements, or the same
/// refusal, word for word.
#[test]
fn a_dry_run_says_what_revert_and_redo_then_do_on_a_long_history() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let required = dir.path().join("migrations");
    let deferred = dir.path().join("migrations_deferred");
    std::fs::create_dir_all(&deferred).unwrap();
    support::history::write_with(&required, 300, false);
    let m = diesel_rollout::Migrator::new(
        diesel_rollout::MigrationSet::from_dirs(&required, &deferred).unwrap(),
    );
    m.run_required(&db.url).unwrap();
    let state = || {
        (
            db.count("SELECT count(*) AS n FROM __diesel_schema_migrations"),
            db.count("SELECT count(*) AS n FROM __diesel_rollout_attempts"),
            db.advisory_locks(),
        )
    };
    let (mut agreed, mut refused) = (0, 0);
    for k in [1, 2, 3, 5, 8, 13, 21, 34, 55] {
        let before = state();
        let planned = m.plan_revert(&mut db.conn(), &RevertTarget::Count(k));
        assert_eq!(
            state(),
            before,
            "a dry run of revert --count {k} changed nothing"
        );
        let real = m.revert(&mut db.conn(), RevertTarget::Count(k));
        match (planned, real) {
            (Ok(plan), Ok(report)) => {
                assert_eq!(
                    versions(plan.steps.iter().map(|s| &s.version)),
                    versions(report.reverted.iter().map(|a| &a.version)),
                    "--count {k}"
                );
                for (s, a) in plan.steps.iter().zip(&report.reverted) {
                    assert_eq!(s.action, PlanAction::Revert, "{}", s.dir_name);
                    assert_eq!(s.statements.len(), a.statements, "{}", s.dir_name);
                }
                agreed += 1;
                m.run_required(&db.url).unwrap();
            }
            (Err(p), Err(r)) => {
                assert_eq!(p.kind(), r.kind(), "--count {k}");
                assert_eq!(p.to_string(), r.to_string(), "--count {k}");
                refused += 1;
            }
            (p, r) => panic!("--count {k}: the dry run gave {p:?}, the revert {r:?}"),
        }
        assert_eq!(state().0, 300, "all applied again after --count {k}");
    }
    assert!(
        agreed > 0 && refused > 0,
        "agreed {agreed}, refused {refused}"
    );

    // redo: the reverts, then the same applied again in version order.
    let before = state();
    let plan = m.plan_redo(&mut db.conn(), 1).unwrap();
    assert_eq!(state(), before);
    let report = m.redo(&mut db.conn(), 1).unwrap();
    let mut expected = versions(report.reverted.iter().map(|a| &a.version));
    expected.extend(versions(report.applied.iter().map(|a| &a.version)));
    assert_eq!(versions(plan.steps.iter().map(|s| &s.version)), expected);
    assert_eq!(plan.steps[1].action, PlanAction::Apply);

    // The CLI: text and JSON, nothing changed, exit 0.
    let before = state();
    let out = db
        .rollout()
        .args(["revert", "--dry-run", "--migrations-dir"])
        .arg(&required)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("dry run, nothing changed"), "{text}");
    assert!(text.contains("reverted: its down.sql runs"), "{text}");
    let out = db
        .rollout()
        .args(["--json", "redo", "--dry-run", "--migrations-dir"])
        .arg(&required)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["dry_run"], "redo", "{json}");
    assert_eq!(json["steps"][0]["action"], "revert", "{json}");
    assert_eq!(json["steps"][1]["action"], "apply", "{json}");
    assert_eq!(state(), before, "the CLI's dry runs changed nothing");
    // `up --dry-run` is `plan`: nothing pending here.
    let out = db
        .rollout()
        .args(["up", "--dry-run", "--migrations-dir"])
        .arg(&required)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing pending"));
}

/// A `down.sql` with only a comment (diesel's stub, kept by a data fix):
/// `revert` refuses it, naming the way on, and with `revert_empty_down`
/// (`--allow-empty-down`) reverts it: the version row goes, the data
/// stays. `revert --all` (diesel's habit) then reverts the rest.
/// Before, the refusal's advice (`resolve --rolled-back`) was itself
/// refused for an applied migration.
#[test]
fn a_comment_only_down_sql_is_reverted_when_allowed() {
    let db = TestDb::new();
    let set = TempSet::new();
    let t = set.required("1_t", "CREATE TABLE t (x int);\n");
    down(&t, "DROP TABLE t;\n");
    let fix = set.required("2_fix", "INSERT INTO t VALUES (1);\n");
    down(&fix, "-- This file should undo anything in `up.sql`\r\n");
    set.required("3_more", "INSERT INTO t VALUES (2);\n");
    down(
        &set.required_dir().join("3_more"),
        "DELETE FROM t WHERE x = 2;\n",
    );
    set.migrator().run_required(&db.url).unwrap();
    let err = set
        .migrator()
        .revert(&mut db.conn(), RevertTarget::Count(2))
        .unwrap_err();
    let text = err.to_string();
    assert_eq!(err.kind(), ErrorKind::RevertRefused, "{text}");
    assert!(
        text.contains("2_fix") && text.contains("--allow-empty-down"),
        "{text}"
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM t"),
        2,
        "nothing reverted"
    );
    let report = set
        .migrator()
        .revert_empty_down(true)
        .revert(&mut db.conn(), RevertTarget::Count(2))
        .unwrap();
    let reverted: Vec<_> = report.reverted.iter().map(|a| a.version.as_str()).collect();
    assert_eq!(reverted, ["3", "2"]);
    assert_eq!(
        db.count("SELECT count(*) AS n FROM t"),
        1,
        "2_fix's row stays"
    );
    let out = db
        .rollout()
        .args(["revert", "--all", "--migrations-dir"])
        .arg(set.required_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_schema_migrations"),
        0
    );
}

/// On a generated 300-migration history, a revert reads only what it
/// checks, and still finds what the whole ledger would show: a newer
/// no-transaction migration stopped halfway refuses it, and once that
/// attempt is resolved by hand (its stopped attempt no longer the latest),
/// the revert goes ahead, undoing only the newest applied migration, as the
/// dry run (which reads the whole ledger) says it will.
#[test]
fn a_long_history_revert_sees_a_newer_stopped_migration_until_it_is_resolved() {
    let db = TestDb::new();
    let set = TempSet::new();
    let history = support::history::write_with(&set.required_dir(), 300, false);
    let newest = history.versions.last().unwrap().clone();
    let stopped = support::history::version(300);
    set.required_no_tx(
        &support::history::dir_name(300, "stopped"),
        "CREATE TABLE stopped_here (id int);\nSELECT 1/0;\n",
    );
    let m = set.migrator();
    let err = m.run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MigrationFailed, "{err}");
    let applied = || db.count("SELECT count(*) AS n FROM __diesel_schema_migrations");
    assert_eq!(applied(), 300);

    let text = refused_revert(&m, &db);
    assert!(
        text.contains(&format!(
            "stopped halfway (1 statements done) and is newer than {newest}"
        )),
        "{text}"
    );
    assert_eq!(applied(), 300, "a refused revert reverted nothing");

    db.conn().batch_execute("DROP TABLE stopped_here").unwrap();
    m.resolve(
        &mut db.conn(),
        &stopped,
        diesel_rollout::Resolution::RolledBack,
        "",
    )
    .unwrap();
    let plan = m
        .plan_revert(&mut db.conn(), &RevertTarget::Count(1))
        .unwrap();
    let report = m.revert(&mut db.conn(), RevertTarget::Count(1)).unwrap();
    assert_eq!(
        versions(report.reverted.iter().map(|a| &a.version)),
        vec![newest.clone()]
    );
    assert_eq!(
        versions(plan.steps.iter().map(|s| &s.version)),
        vec![newest]
    );
    assert_eq!(applied(), 299);
}

/// The track's keys are taken all or none: with only a later one (the key
/// an earlier release derives from the qualified name) held by another
/// session, a revert is refused and leaves this session holding nothing,
/// nor is anything reverted; once that key is free, it reverts.
#[test]
fn a_lock_key_held_elsewhere_leaves_none_of_the_others_held() {
    let db = TestDb::new();
    let set = TempSet::new();
    let one = set.required("1_a", "CREATE TABLE a (x int);\n");
    down(&one, "DROP TABLE a;\n");
    let m = set.migrator();
    m.run_required(&db.url).unwrap();
    let mut holder = db.conn();
    let keys = m.lock_keys(&mut holder, Track::Deferred).unwrap();
    assert!(keys.len() > 1, "{keys:?}");
    holder
        .batch_execute(&format!(
            "SELECT pg_advisory_lock({})",
            keys[keys.len() - 1]
        ))
        .unwrap();
    let mut conn = db.conn();
    let err = m.revert(&mut conn, RevertTarget::Count(1)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RevertRefused, "{err}");
    assert!(
        err.to_string().contains("leads the deferred track"),
        "{err}"
    );
    assert_eq!(
        db.advisory_locks(),
        1,
        "only the other session's key is held"
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_schema_migrations"),
        1
    );
    holder
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .unwrap();
    let report = m.revert(&mut conn, RevertTarget::Count(1)).unwrap();
    assert_eq!(report.reverted.len(), 1);
    assert_eq!(db.advisory_locks(), 0);
}
