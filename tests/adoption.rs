//! Adopting an existing diesel project: a generated history of 300
//! migrations in real projects' shapes, applied first by diesel_migrations'
//! own harness, then taken over (baseline, status, a new migration, plan,
//! revert, redo, resolve, out-of-order versions), and each refusal of
//! `revert` with what it says to do.

mod support;

use std::path::Path;
use std::process::Output;

use diesel::connection::SimpleConnection;
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use diesel_rollout::{ErrorKind, MigrationSet, Migrator, RevertTarget};
use support::{history, TestDb};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `rollout ARGS --migrations-dir DIR` against `db`.
fn rollout(db: &TestDb, dir: &Path, args: &[&str]) -> Output {
    db.rollout()
        .args(args)
        .arg("--migrations-dir")
        .arg(dir)
        .output()
        .unwrap()
}

fn add(dir: &Path, name: &str, up: &str, down: Option<&str>, meta: Option<&str>) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("up.sql"), up).unwrap();
    if let Some(down) = down {
        std::fs::write(d.join("down.sql"), down).unwrap();
    }
    if let Some(meta) = meta {
        std::fs::write(d.join("metadata.toml"), meta).unwrap();
    }
}

/// What diesel's own harness says is applied.
fn diesel_applied(db: &TestDb) -> Vec<String> {
    let mut c = db.conn();
    let mut v: Vec<String> = c
        .applied_migrations()
        .unwrap()
        .into_iter()
        .map(|v| v.to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn a_history_applied_by_diesel_is_adopted_in_one_step() {
    const N: usize = 300;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("migrations");
    let h = history::write(&dir, N);
    assert!(h.concurrently_in_down.len() >= 6 && h.no_transaction >= 20);
    let db = TestDb::new();

    // diesel_migrations applies the history, as the project always did.
    let diesel_set = FileBasedMigrations::from_path(&dir).unwrap();
    db.conn().run_pending_migrations(diesel_set).unwrap();
    assert_eq!(diesel_applied(&db).len(), N);

    // Before the baseline: the old down.sql problem blocks everything,
    // naming the file.
    let out = rollout(&db, &dir, &["up"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let first = h.concurrently_in_down[0].join("down.sql");
    assert!(
        text(&out).contains(&first.display().to_string()),
        "{}",
        text(&out)
    );

    // Adoption in one step: the newest applied version is the baseline.
    let out = rollout(&db, &dir, &["baseline"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("{N} migration(s) at or below it")),
        "{}",
        text(&out)
    );
    let config = std::fs::read_to_string(root.path().join("diesel-guard.toml")).unwrap();
    assert!(
        config.contains(&format!("start_after = \"{}\"", h.versions[N - 1])),
        "{config}"
    );

    // Every migration applied, and a start with no warning.
    let out = rollout(&db, &dir, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), N);
    assert!(rows
        .iter()
        .all(|r| r["state"] == "applied" && r["changed"] == false));
    for args in [&["up"][..], &["verify"], &["lint"]] {
        let out = rollout(&db, &dir, args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        assert!(!text(&out).contains("WARN"), "{args:?}: {}", text(&out));
    }
    assert!(text(&rollout(&db, &dir, &["up"])).contains("required: nothing to apply"));

    // A new tenant gets the whole history from rollout. The migrations that
    // commit diesel's transaction themselves run statement by statement,
    // each statement once, as diesel ran them.
    let tenant = TestDb::new();
    let out = rollout(&tenant, &dir, &["up"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(diesel_applied(&tenant).len(), N);
    assert!(!h.committed_early.is_empty());
    for t in &h.committed_early {
        let early = format!("SELECT count(*) AS n FROM {t} WHERE name = 'committed early'");
        assert_eq!((db.count(&early), tenant.count(&early)), (1, 1), "{t}");
    }

    // A new migration: planned (exit 10), applied, then nothing pending.
    add(
        &dir,
        &history::dir_name(N + 1, "create_orders"),
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, total INT NOT NULL);\n",
        Some("DROP TABLE orders;\n"),
        None,
    );
    let out = rollout(&db, &dir, &["plan", "--json"]);
    assert_eq!(out.status.code(), Some(10), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["pending"], 1);
    assert_eq!(plan["steps"][0]["version"], history::version(N + 1));
    assert_eq!(
        plan["steps"][0]["statements"][0]["locks"][0]["mode"],
        "ACCESS EXCLUSIVE"
    );
    let out = rollout(&db, &dir, &["up"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("applied 2020-01-01-000301_create_orders"),
        "{}",
        text(&out)
    );
    assert_eq!(rollout(&db, &dir, &["plan"]).status.code(), Some(0));

    // A new migration with the old problem fails as before.
    let bad = history::dir_name(N + 2, "bad_down");
    add(
        &dir,
        &bad,
        "CREATE INDEX orders_total ON orders (total);\n",
        Some("DROP INDEX CONCURRENTLY orders_total;\n"),
        None,
    );
    let err = MigrationSet::from_dirs(&dir, &root.path().join("migrations_deferred")).unwrap_err();
    assert!(
        err.to_string().contains(&format!("{bad}/down.sql:1")),
        "{err}"
    );
    std::fs::remove_dir_all(dir.join(&bad)).unwrap();

    // Revert: the new one goes; status and diesel agree it is pending.
    let out = rollout(&db, &dir, &["revert"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("reverted 2020-01-01-000301_create_orders"),
        "{}",
        text(&out)
    );
    assert!(!diesel_applied(&db).contains(&history::version(N + 1)));
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_class WHERE relname = 'orders'"),
        0
    );
    let out = rollout(&db, &dir, &["status", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().last().unwrap()["state"], "pending");

    // Redo: reverted and applied again (here after `up` puts it back).
    assert!(rollout(&db, &dir, &["up"]).status.success());
    let out = rollout(&db, &dir, &["redo"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("reverted 2020-01-01-000301_create_orders"));
    assert!(text(&out).contains("applied 2020-01-01-000301_create_orders"));
    assert_eq!(
        db.texts(&format!(
            "SELECT operation || ':' || outcome AS t FROM __diesel_rollout_attempts \
             WHERE version = '{}' ORDER BY id",
            history::version(N + 1)
        )),
        [
            "up:success",
            "down:success",
            "up:success",
            "down:success",
            "up:success"
        ]
    );

    // Out of order: newer than the baseline, older than the newest applied.
    let late = history::dir_name(N, "late_branch");
    add(
        &dir,
        &late,
        "CREATE TABLE late (id BIGINT PRIMARY KEY);\n",
        Some("DROP TABLE late;\n"),
        None,
    );
    let out = rollout(&db, &dir, &["--strict", "up"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("migration {late} is pending but older")),
        "{}",
        text(&out)
    );
    let out = rollout(&db, &dir, &["up"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "migration {late} is older than a migration already applied"
        )),
        "{}",
        text(&out)
    );

    // Resolve: a no-transaction migration stops halfway, is repaired by
    // hand, and its outcome is recorded instead of a DELETE.
    let half = history::dir_name(N + 3, "half");
    add(
        &dir,
        &half,
        "CREATE TABLE IF NOT EXISTS half (id BIGINT PRIMARY KEY);\nSELECT no_such_function();\n",
        None,
        Some("run_in_transaction = false\n"),
    );
    let out = rollout(&db, &dir, &["up", "--required-only"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let out = rollout(
        &db,
        &dir,
        &[
            "resolve",
            &history::version(N + 3),
            "--rolled-back",
            "--note",
            "dropped half by hand",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = rollout(&db, &dir, &["status", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["version"] == history::version(N + 3))
        .unwrap()
        .clone();
    assert_eq!(row["state"], "pending", "{row}");
    assert_eq!(
        db.texts(&format!(
            "SELECT outcome || ' ' || error || ' ' || coalesce(db_user, '?') AS t \
             FROM __diesel_rollout_attempts WHERE version = '{}' AND operation = 'resolve'",
            history::version(N + 3)
        )),
        ["rolled_back dropped half by hand postgres"]
    );
    // Recorded as rolled back, it is pending with nothing left to
    // resolve: a second resolve is refused unless forced (as for a
    // migration applied by hand, outside any tool).
    let out = rollout(
        &db,
        &dir,
        &["resolve", &history::version(N + 3), "--applied"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("is pending and no attempt of it failed"),
        "{}",
        text(&out)
    );
    assert!(!diesel_applied(&db).contains(&history::version(N + 3)));
    let out = rollout(
        &db,
        &dir,
        &["resolve", &history::version(N + 3), "--applied", "--force"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(diesel_applied(&db).contains(&history::version(N + 3)));
    assert!(rollout(&db, &dir, &["verify"]).status.success());

    // A healthy applied migration is not resolved as rolled back: the next
    // `up` would run it again over its own changes.
    let healthy = history::version(N + 1);
    let out = rollout(&db, &dir, &["resolve", &healthy, "--rolled-back"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("is applied and its latest attempt finished"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("rollout revert"), "{}", text(&out));
    assert!(diesel_applied(&db).contains(&healthy));
    let out = rollout(&db, &dir, &["plan"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// Each refusal of `revert` names the migration and what to do, and
/// reverts nothing.
#[test]
fn revert_refuses_what_it_cannot_undo_naming_the_migration_and_the_next_step() {
    let db = TestDb::new();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("migrations");
    std::fs::create_dir_all(&dir).unwrap();
    let deferred = root.path().join("migrations_deferred");
    let set = || MigrationSet::from_dirs(&dir, &deferred).unwrap();
    add(
        &dir,
        "1_things",
        "CREATE TABLE things (id BIGINT PRIMARY KEY, v INT);\n",
        Some("DROP TABLE things;\n"),
        None,
    );
    add(
        &dir,
        "2_no_down",
        "CREATE TABLE a (id BIGINT PRIMARY KEY);\n",
        None,
        None,
    );
    Migrator::new(set()).run_required(&db.url).unwrap();
    let refused = |target: RevertTarget| {
        let err = Migrator::new(set())
            .revert(&mut db.conn(), target)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RevertRefused, "{err}");
        err.to_string()
    };
    // No down.sql: name it, say how to go on.
    let text = refused(RevertTarget::Count(2));
    assert!(
        text.contains("migration 2_no_down has no down.sql"),
        "{text}"
    );
    assert!(text.contains("rollout resolve 2 --rolled-back"), "{text}");
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_schema_migrations"),
        2
    );

    // --to a version that is not applied (a typo, a shortened version)
    // reverts nothing, rather than everything.
    for v in ["0", "2025", "3"] {
        let text = refused(RevertTarget::To(v.into()));
        assert!(
            text.contains(&format!("version {v} is not an applied migration")),
            "{text}"
        );
    }
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_schema_migrations"),
        2
    );

    // An empty down.sql would only forget the migration.
    std::fs::write(
        dir.join("2_no_down/down.sql"),
        "-- This file should undo anything in `up.sql`\n",
    )
    .unwrap();
    let text = refused(RevertTarget::Count(1));
    assert!(
        text.contains("down.sql of migration 2_no_down has no statements"),
        "{text}"
    );

    // CONCURRENTLY in the down.sql of a transactional migration (history
    // may hold it: the baseline lets it through up, never through revert).
    std::fs::write(
        root.path().join("diesel-guard.toml"),
        "start_after = \"9\"\n",
    )
    .unwrap();
    add(
        &dir,
        "3_index",
        "CREATE INDEX things_v ON things (v);\n",
        Some("DROP INDEX CONCURRENTLY things_v;\n"),
        None,
    );
    std::fs::write(dir.join("2_no_down/down.sql"), "DROP TABLE a;\n").unwrap();
    Migrator::new(set()).run_required(&db.url).unwrap();
    let text = refused(RevertTarget::To("1".into()));
    assert!(text.contains("3_index/down.sql:1"), "{text}");
    assert!(text.contains("drop CONCURRENTLY from down.sql"), "{text}");
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_schema_migrations"),
        3
    );

    // A version applied by a newer release than this binary.
    db.conn()
        .batch_execute("INSERT INTO __diesel_schema_migrations (version) VALUES ('4')")
        .unwrap();
    let text = refused(RevertTarget::Count(1));
    assert!(
        text.contains("version 4 is applied, but this binary does not know it"),
        "{text}"
    );
    assert!(text.contains("that release's `rollout revert`"), "{text}");

    // The CLI says the same and exits 1.
    let out = db
        .rollout()
        .args(["revert", "--migrations-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("version 4 is applied"));
}

/// A deferred migration whose index another session is building is not
/// reverted.
#[test]
fn revert_refuses_a_deferred_migration_another_session_is_building() {
    let db = TestDb::new();
    let set = support::TempSet::new();
    set.required(
        "1_things",
        "CREATE TABLE things (id BIGINT PRIMARY KEY, v INT);\n\
         INSERT INTO things SELECT g, g FROM generate_series(1, 2000) g;\n",
    );
    set.deferred(
        "2_index",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS things_v ON things (v);\n",
    );
    std::fs::write(
        set.deferred_dir().join("2_index/down.sql"),
        "DROP INDEX CONCURRENTLY IF EXISTS things_v;\n",
    )
    .unwrap();
    let m = set.migrator();
    m.run_required(&db.url).unwrap();
    m.run_deferred_on(&mut db.conn()).unwrap();
    // Another session leads the deferred track.
    let mut leader = db.conn();
    let key = m
        .lock_keys(&mut leader, diesel_rollout::Track::Deferred)
        .unwrap()[0];
    leader
        .batch_execute(&format!("SELECT pg_advisory_lock({key})"))
        .unwrap();
    let err = m
        .revert(&mut db.conn(), RevertTarget::Count(1))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RevertRefused, "{err}");
    assert!(
        err.to_string().contains("leads the deferred track now"),
        "{err}"
    );
    assert!(err.to_string().contains("rollout deferred --wait"), "{err}");
    leader
        .batch_execute(&format!("SELECT pg_advisory_unlock({key})"))
        .unwrap();
    // Free again: reverted, statement by statement, the index gone.
    let report = m.revert(&mut db.conn(), RevertTarget::Count(1)).unwrap();
    assert_eq!(report.reverted[0].version, "2");
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_class WHERE relname = 'things_v'"),
        0
    );
}

/// Line endings do not make an applied migration "edited", and checksums
/// an earlier release recorded from a CRLF checkout stay valid.
#[test]
fn crlf_and_lf_checkouts_agree_on_what_is_applied() {
    let db = TestDb::new();
    let set = support::TempSet::new();
    set.required(
        "1_a",
        "CREATE TABLE a (id BIGINT PRIMARY KEY);\nINSERT INTO a VALUES (1);\n",
    );
    set.migrator().run_required(&db.url).unwrap();
    let up = set.required_dir().join("1_a/up.sql");
    let lf = std::fs::read_to_string(&up).unwrap();
    std::fs::write(&up, lf.replace('\n', "\r\n")).unwrap();
    let crlf = set.migrator();
    assert!(crlf
        .status(&mut db.conn())
        .unwrap()
        .iter()
        .all(|r| !r.changed));
    crlf.clone().strict(true).run_required(&db.url).unwrap();
    // An earlier release on Windows recorded the raw bytes of the CRLF file.
    let raw = diesel_rollout::checksum_of_bytes(lf.replace('\n', "\r\n").as_bytes());
    db.conn()
        .batch_execute(&format!(
            "UPDATE __diesel_rollout_attempts SET checksum = '{raw}' WHERE version = '1'"
        ))
        .unwrap();
    std::fs::write(&up, &lf).unwrap();
    let lf_set = set.migrator().strict(true);
    assert!(lf_set
        .status(&mut db.conn())
        .unwrap()
        .iter()
        .all(|r| !r.changed));
    lf_set.run_required(&db.url).unwrap();
    // A real edit still shows.
    std::fs::write(&up, "CREATE TABLE a (id BIGINT PRIMARY KEY);\n").unwrap();
    assert!(set.migrator().status(&mut db.conn()).unwrap()[0].changed);
}
