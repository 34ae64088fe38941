//! Fleet mode against a real server: fifty databases, fifty schemas, a
//! failing target, a canary, a run killed at a random point and resumed,
//! two overlapping runs. The invariants are the fault suite's: every side
//! effect exactly once per target, no lock left, every target verifies.

mod support;

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel_rollout::{Fleet, Operation, Outcome, Target};
use support::{TempSet, TestDb};

/// Four required migrations (one without a transaction) and one deferred,
/// each leaving a row in `effects` (the deferred one, its index), so a
/// migration applied twice shows.
fn fleet_set() -> TempSet {
    let set = TempSet::new();
    set.required(
        "1_effects",
        "CREATE TABLE effects (version text NOT NULL);\nINSERT INTO effects VALUES ('1');\n",
    );
    set.required(
        "2_widgets",
        "CREATE TABLE widgets (id int);\nINSERT INTO effects VALUES ('2');\n",
    );
    set.required(
        "3_slow",
        "SELECT pg_sleep(0.02);\nINSERT INTO effects VALUES ('3');\n",
    );
    set.required_no_tx(
        "4_index",
        "CREATE INDEX CONCURRENTLY widgets_id ON widgets (id);\nINSERT INTO effects VALUES ('4');\n",
    );
    set.deferred(
        "5_effects_index",
        "CREATE INDEX CONCURRENTLY effects_version ON effects (version);\n",
    );
    set
}

/// A tenant that already has a `widgets` table: `2_widgets` fails there.
fn break_tenant(db: &TestDb) {
    db.conn()
        .batch_execute("CREATE TABLE widgets (id int)")
        .unwrap();
}

fn rollout(set: &TempSet) -> std::process::Command {
    let mut c = support::rollout();
    c.arg("--migrations-dir")
        .arg(set.required_dir())
        .arg("--deferred-dir")
        .arg(set.deferred_dir());
    c
}

fn databases(n: usize) -> Vec<TestDb> {
    (0..n).map(|_| TestDb::new()).collect()
}

fn targets_file(dbs: &[TestDb], extra: &[&str]) -> tempfile::NamedTempFile {
    let mut text = String::from("# tenants, one per line\n\n");
    for db in dbs {
        text.push_str(&db.url);
        text.push('\n');
    }
    for e in extra {
        text.push_str(e);
        text.push('\n');
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every migration applied once in `schema` of `db`: each side effect
/// exactly once, the ledger complete, no advisory lock left.
fn assert_done_once(db: &TestDb, schema: &str) {
    let effects = db.texts(&format!(
        "SELECT version || ':' || count(*) AS t FROM \"{schema}\".effects \
         GROUP BY version ORDER BY version"
    ));
    assert_eq!(
        effects,
        ["1:1", "2:1", "3:1", "4:1"],
        "{} {schema}",
        db.name
    );
    let applied = db.count(&format!(
        "SELECT count(*) AS n FROM \"{schema}\".__diesel_schema_migrations"
    ));
    assert_eq!(applied, 5, "{} {schema}", db.name);
    let valid = db.count(&format!(
        "SELECT count(*) AS n FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = '{schema}' \
         AND c.relname IN ('widgets_id', 'effects_version') AND i.indisvalid"
    ));
    assert_eq!(valid, 2, "{} {schema}", db.name);
}

fn wait_for_no_locks(dbs: &[TestDb]) {
    let start = Instant::now();
    for db in dbs {
        while db.advisory_locks() > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "advisory locks left in {}",
                db.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A line on stderr, which the test harness shows for a failing test.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "fleet: {line}");
}

/// A seed from the clock, printed so a failing run can be repeated with
/// FLEET_SEED.
fn seed() -> u64 {
    let seed = std::env::var("FLEET_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
        });
    say(&format!("FLEET_SEED={seed}"));
    seed
}

#[test]
fn fleet_up_migrates_fifty_databases_and_reports_the_one_that_fails() {
    let set = fleet_set();
    let dbs = databases(50);
    break_tenant(&dbs[17]);
    let unreachable = "postgres://app:Sekr1t@x/y@127.0.0.1:1/gone";
    let file = targets_file(&dbs, &[unreachable]);
    let out = rollout(&set)
        .args(["--json", "fleet", "up", "--parallel", "4", "--keep-going"])
        .arg("--targets")
        .arg(file.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!text(&out).contains("Sekr1t"), "{}", text(&out));
    let v = json(&out);
    let targets = v["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 51);
    assert_eq!(v["summary"]["applied"], 49, "{v:#}");
    assert_eq!(v["summary"]["failed"], 2, "{v:#}");
    assert_eq!(v["summary"]["succeeded"], false);
    let failed = &targets[17];
    assert_eq!(failed["outcome"], "failed");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("2_widgets") && error.contains("up.sql") && error.contains("widgets"),
        "{error}"
    );
    assert_eq!(failed["applied"], serde_json::json!(["1"]));
    assert_eq!(targets[50]["outcome"], "failed");
    // The next step points at the targets list, not at a flag this
    // command did not use.
    let error = targets[50]["error"].as_str().unwrap();
    assert!(
        error.contains("cannot connect to postgres://app:***@127.0.0.1:1/gone: ")
            && error.contains("this target's line of the targets list")
            && !error.contains("DATABASE_URL"),
        "{error}"
    );
    for (i, db) in dbs.iter().enumerate() {
        if i != 17 {
            assert_eq!(targets[i]["outcome"], "applied", "{:#}", targets[i]);
            assert_eq!(targets[i]["applied"].as_array().unwrap().len(), 5);
            assert_done_once(db, "public");
        }
    }
    assert_eq!(dbs[17].texts("SELECT version AS t FROM effects"), ["1"]);

    // The operator fixes the tenant and runs the same command again.
    dbs[17].conn().batch_execute("DROP TABLE widgets").unwrap();
    let file = targets_file(&dbs, &[]);
    let again = rollout(&set)
        .args(["--json", "fleet", "up", "--targets"])
        .arg(file.path())
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    let v = json(&again);
    assert_eq!(v["summary"]["applied"], 1, "{v:#}");
    assert_eq!(v["summary"]["up_to_date"], 49, "{v:#}");
    assert_eq!(
        v["targets"][17]["applied"],
        serde_json::json!(["2", "3", "4", "5"])
    );
    for db in &dbs {
        assert_done_once(db, "public");
    }
    wait_for_no_locks(&dbs);
    let verify = rollout(&set)
        .args(["fleet", "verify", "--targets"])
        .arg(file.path())
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(0), "{}", text(&verify));
    assert!(text(&verify).contains("50 target(s)"), "{}", text(&verify));
}

#[test]
fn fleet_up_migrates_fifty_schemas_of_one_database() {
    let set = fleet_set();
    let (db, schemas) = schema_db(50);
    let query = "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant\\_%' ORDER BY 1;";
    let plan = rollout(&set)
        .args([
            "fleet",
            "plan",
            "--database-url",
            &db.url,
            "--schemas-query",
            query,
        ])
        .output()
        .unwrap();
    assert_eq!(plan.status.code(), Some(10), "{}", text(&plan));
    let out = rollout(&set)
        .args(["--json", "fleet", "up", "--parallel", "8"])
        .args(["--database-url", &db.url, "--schemas-query", query])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["summary"]["applied"], 50, "{v:#}");
    assert!(v["targets"][3]["target"]
        .as_str()
        .unwrap()
        .ends_with("schema tenant_03"));
    for s in &schemas {
        assert_done_once(&db, s);
    }
    // Nothing landed in public: each migration ran with search_path set
    // to its tenant, and the ledger lives beside it.
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'public'"),
        0
    );
    assert_eq!(db.advisory_locks(), 0);
    let status = rollout(&set)
        .args(["--json", "fleet", "status", "--database-url", &db.url])
        .args(["--schemas-query", query])
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    assert_eq!(json(&status)["summary"]["up_to_date"], 50);
    // One tenant on its own, as the summary suggests after a failure.
    let one = rollout(&set)
        .args([
            "--json",
            "--schema",
            "tenant_03",
            "status",
            "--database-url",
            &db.url,
        ])
        .output()
        .unwrap();
    assert_eq!(one.status.code(), Some(0), "{}", text(&one));
    let rows = json(&one);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert!(rows.iter().all(|r| r["state"] == "applied"), "{rows:?}");
    // The index states are read in the tenant's schema.
    let states: Vec<_> = rows
        .iter()
        .flat_map(|r| r["indexes"].as_array().cloned().unwrap_or_default())
        .map(|i| i["state"].clone())
        .collect();
    assert_eq!(states, ["valid", "valid"], "{rows:?}");
    // A ledger table qualified with one schema would be one ledger for
    // every tenant: refused on every target, nothing applied.
    let shared = rollout(&set)
        .args([
            "--json",
            "--migrations-table",
            "public.ledger",
            "fleet",
            "up",
            "--keep-going",
        ])
        .args(["--database-url", &db.url, "--schemas-query", query])
        .output()
        .unwrap();
    assert_eq!(shared.status.code(), Some(1), "{}", text(&shared));
    let v = json(&shared);
    assert_eq!(v["summary"]["failed"], 50, "{v:#}");
    let e = v["targets"][0]["error"].as_str().unwrap();
    assert!(
        e.contains("public.ledger") && e.contains("names a schema"),
        "{e}"
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_tables WHERE tablename = 'ledger'"),
        0
    );
}

#[test]
fn a_fleet_killed_at_a_random_point_resumes_and_applies_nothing_twice() {
    let set = fleet_set();
    let dbs = databases(50);
    let file = targets_file(&dbs, &[]);
    let spawn = || -> Child {
        rollout(&set)
            .args(["-q", "fleet", "up", "--parallel", "4", "--targets"])
            .arg(file.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut rng = seed();
    for _round in 0..2 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let after = Duration::from_millis(100 + (rng >> 33) % 1500);
        let mut child = spawn();
        std::thread::sleep(after);
        let _ = child.kill();
        let _ = child.wait();
        say(&format!("killed after {after:?}"));
    }
    let done: usize = dbs
        .iter()
        .filter(|db| {
            db.count(
                "SELECT count(*) AS n FROM pg_tables WHERE tablename = '__diesel_schema_migrations'",
            ) > 0
        })
        .count();
    say(&format!(
        "{done} of 50 targets touched before the last kill"
    ));
    let out = rollout(&set)
        .args(["--json", "fleet", "up", "--targets"])
        .arg(file.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json(&out)["summary"]["succeeded"], true);
    for db in &dbs {
        assert_done_once(db, "public");
    }
    wait_for_no_locks(&dbs);
}

#[test]
fn two_overlapping_fleet_runs_apply_each_migration_once_per_target() {
    let set = fleet_set();
    let dbs = databases(50);
    let first = targets_file(&dbs[..35], &[]);
    let second = targets_file(&dbs[15..], &[]);
    let run = |file: &tempfile::NamedTempFile| {
        rollout(&set)
            .args(["--json", "fleet", "up", "--parallel", "4", "--targets"])
            .arg(file.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (run(&first), run(&second));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(a.status.code(), Some(0), "{}", text(&a));
    assert_eq!(b.status.code(), Some(0), "{}", text(&b));
    let (a, b) = (json(&a), json(&b));
    // Each of the shared twenty was applied by one run or split between
    // them, never twice: the applied lists of both runs add up to five.
    for i in 15..35 {
        let n = |v: &serde_json::Value, at: usize| {
            v["targets"][at]["applied"].as_array().unwrap().len()
        };
        assert_eq!(n(&a, i) + n(&b, i - 15), 5, "target {i}: {a:#} {b:#}");
    }
    for db in &dbs {
        assert_done_once(db, "public");
    }
    wait_for_no_locks(&dbs);
}

/// One database with `n` tenant schemas, `tenant_00` on.
fn schema_db(n: usize) -> (TestDb, Vec<String>) {
    let db = TestDb::new();
    let schemas: Vec<String> = (0..n).map(|i| format!("tenant_{i:02}")).collect();
    db.conn()
        .batch_execute(
            &schemas
                .iter()
                .map(|s| format!("CREATE SCHEMA {s};"))
                .collect::<String>(),
        )
        .unwrap();
    (db, schemas)
}

/// The query that lists the tenant schemas numbered `from` to `to`.
fn schemas_query(from: usize, to: usize) -> String {
    format!(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant\\_%' \
         AND substr(nspname, 8)::int BETWEEN {from} AND {to} ORDER BY 1"
    )
}

#[test]
fn a_schema_fleet_killed_at_a_random_point_resumes_and_two_overlapping_runs_agree() {
    let set = fleet_set();
    let (db, schemas) = schema_db(50);
    let mut rng = seed();
    rng = rng
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let after = Duration::from_millis(100 + (rng >> 33) % 1200);
    let mut child = rollout(&set)
        .args([
            "-q",
            "fleet",
            "up",
            "--parallel",
            "4",
            "--database-url",
            &db.url,
        ])
        .args(["--schemas-query", &schemas_query(0, 49)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let _ = child.kill();
    let _ = child.wait();
    say(&format!("killed after {after:?}"));
    // Resumed by two overlapping runs at once.
    let run = |from: usize, to: usize| {
        rollout(&set)
            .args([
                "--json",
                "fleet",
                "up",
                "--parallel",
                "4",
                "--database-url",
                &db.url,
            ])
            .args(["--schemas-query", &schemas_query(from, to)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (run(0, 34), run(15, 49));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(a.status.code(), Some(0), "{}", text(&a));
    assert_eq!(b.status.code(), Some(0), "{}", text(&b));
    assert_eq!(json(&a)["targets"].as_array().unwrap().len(), 35);
    for s in &schemas {
        assert_done_once(&db, s);
    }
    wait_for_no_locks(std::slice::from_ref(&db));
}

#[test]
fn a_failing_canary_stops_the_fleet_before_any_other_target() {
    let set = fleet_set();
    let dbs = databases(8);
    break_tenant(&dbs[0]);
    let file = targets_file(&dbs, &[]);
    let out = rollout(&set)
        .args(["fleet", "up", "--canary", "1", "--keep-going", "--targets"])
        .arg(file.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let shown = text(&out);
    assert!(shown.contains("1 failed, 7 skipped"), "{shown}");
    assert!(shown.contains("run the same command"), "{shown}");
    for db in &dbs[1..] {
        assert_eq!(
            db.count(
                "SELECT count(*) AS n FROM pg_tables WHERE tablename = '__diesel_schema_migrations'"
            ),
            0,
            "a skipped target was touched"
        );
    }
}

#[test]
fn without_keep_going_a_failure_starts_no_new_target() {
    let set = fleet_set();
    let dbs = databases(8);
    break_tenant(&dbs[2]);
    let targets = dbs.iter().map(|d| Target::database(&d.url)).collect();
    let report = Fleet::new(set.migrator(), targets)
        .parallel(1)
        .run(Operation::Up, &|_| {});
    assert!(!report.succeeded());
    let outcomes: Vec<_> = report.targets.iter().map(|t| t.outcome).collect();
    assert_eq!(
        &outcomes[..3],
        [Outcome::Applied, Outcome::Applied, Outcome::Failed]
    );
    assert!(
        outcomes[3..].iter().all(|o| *o == Outcome::Skipped),
        "{outcomes:?}"
    );
    assert!(report.targets[3]
        .error
        .as_deref()
        .unwrap()
        .contains("not started"));
}

/// `--targets-query` returns database names on the control server; a
/// connection used with `Migrator::schema` (a pooled one, say) is handed
/// back with its own search_path.
#[test]
fn targets_from_a_query_and_a_schema_on_the_services_connection() {
    use diesel::prelude::*;
    let set = fleet_set();
    let control = TestDb::new();
    let dbs = databases(3);
    control
        .conn()
        .batch_execute(&format!(
            "CREATE TABLE tenants (db text); INSERT INTO tenants VALUES {}",
            dbs.iter()
                .map(|d| format!("('{}')", d.name))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .unwrap();
    let targets = Target::from_query(&control.url, "SELECT db FROM tenants ORDER BY db").unwrap();
    assert_eq!(targets.len(), 3);
    let report = Fleet::new(set.migrator(), targets).run(Operation::Up, &|_| {});
    assert!(report.succeeded(), "{report:?}");
    for db in &dbs {
        assert_done_once(db, "public");
    }

    let db = TestDb::new();
    let mut conn = db.conn();
    conn.batch_execute("CREATE SCHEMA acme; SET search_path = public")
        .unwrap();
    let report = set
        .migrator()
        .schema("acme")
        .run_required_on(&mut conn)
        .unwrap();
    assert_eq!(report.applied.len(), 4, "{report:?}");
    assert_eq!(
        db.count("SELECT count(*) AS n FROM acme.effects WHERE version = '1'"),
        1
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM acme.__diesel_schema_migrations"),
        4
    );
    #[derive(QueryableByName)]
    struct Path {
        #[diesel(sql_type = diesel::sql_types::Text)]
        search_path: String,
    }
    let p: Path = diesel::sql_query("SELECT current_setting('search_path') AS search_path")
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(
        p.search_path, "public",
        "the session's search_path is put back"
    );
}

/// A release whose required migration waits for a deferred one
/// (`requires_deferred`) on every target: fleet `up` goes back and forth
/// between the tracks in the order `rollout up` uses (one shared loop),
/// and each target gets the whole release in order.
#[test]
fn fleet_up_applies_a_required_migration_waiting_for_a_deferred_one_on_every_target() {
    let set = TempSet::new();
    set.required(
        "1_things",
        "CREATE TABLE things (id bigint PRIMARY KEY, val int);\n\
         INSERT INTO things SELECT g, g FROM generate_series(1, 100) g;\n",
    );
    set.deferred(
        "2_things_val",
        "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS things_val_key ON things (val);\n",
    );
    set.required_with(
        "3_unique_val",
        "ALTER TABLE things ADD CONSTRAINT things_val_key UNIQUE USING INDEX things_val_key;\n",
        "run_in_transaction = true\nrequires_deferred = [\"2\"]\n",
    );
    set.required("4_other", "CREATE TABLE other (id bigint, at int);\n");
    set.deferred(
        "5_other_at",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS other_at_idx ON other (at);\n",
    );
    let dbs = databases(6);
    let file = targets_file(&dbs, &[]);
    let out = rollout(&set)
        .args(["--json", "fleet", "up", "--parallel", "3", "--targets"])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v = json(&out);
    for t in v["targets"].as_array().unwrap() {
        assert_eq!(t["outcome"], "applied", "{t:#}");
        assert_eq!(
            t["applied"],
            serde_json::json!(["1", "2", "3", "4", "5"]),
            "{t:#}"
        );
    }
    for db in &dbs {
        assert_eq!(
            db.count("SELECT count(*) AS n FROM pg_constraint WHERE conname = 'things_val_key'"),
            1
        );
        assert!(set.migrator().verify(&mut db.conn()).unwrap().is_complete());
        assert_eq!(db.advisory_locks(), 0);
    }
}

/// Copies the first `n` migration directories of `from` (in version order)
/// into `to`.
fn copy_first(from: &std::path::Path, to: &std::path::Path, n: usize) {
    let mut dirs: Vec<_> = std::fs::read_dir(from)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    for d in dirs.into_iter().take(n) {
        let target = to.join(d.file_name().unwrap());
        std::fs::create_dir_all(&target).unwrap();
        for f in std::fs::read_dir(&d).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, target.join(f.file_name().unwrap())).unwrap();
        }
    }
}

/// A release of a real project's size on a fleet: a generated history of
/// 300 migrations in real shapes (functions, triggers, `DO` blocks, enums,
/// views, no-transaction index builds, CRLF files) taken to tenant
/// databases at different points (empty; migrated by diesel_migrations
/// up to migration 250, as before adopting diesel-rollout) and to tenant
/// schemas of one database, where every unqualified name must land in its
/// schema. A second run finds nothing to do.
#[test]
fn a_fleet_takes_a_300_migration_history_to_databases_and_schemas() {
    use diesel_migrations::{FileBasedMigrations, MigrationHarness};
    const N: usize = 300;
    const OLD: usize = 250;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("migrations");
    let h = support::history::write_with(&dir, N, false);
    assert!(h.no_transaction >= 20);
    let old = root.path().join("old");
    copy_first(&dir, &old, OLD);
    let dbs = databases(4);
    for db in &dbs[2..] {
        db.conn()
            .run_pending_migrations(FileBasedMigrations::from_path(&old).unwrap())
            .unwrap();
    }
    let rollout = |args: &[&str]| {
        support::rollout()
            .arg("--migrations-dir")
            .arg(&dir)
            .args(args)
            .output()
            .unwrap()
    };
    let file = targets_file(&dbs, &[]);
    let path = file.path().to_str().unwrap();
    let out = rollout(&[
        "--json",
        "fleet",
        "up",
        "--parallel",
        "4",
        "--targets",
        path,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    let applied: Vec<usize> = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["applied"].as_array().unwrap().len())
        .collect();
    assert_eq!(applied, [N, N, N - OLD, N - OLD], "{v:#}");
    for db in &dbs {
        let mut conn = db.conn();
        assert_eq!(conn.applied_migrations().unwrap().len(), N, "diesel agrees");
        assert_eq!(db.advisory_locks(), 0);
    }

    let (db, schemas) = schema_db(4);
    let query = schemas_query(0, 3);
    let schema_run = |args: &[&str]| {
        let mut all = vec!["--json", "fleet"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--database-url", &db.url, "--schemas-query", &query]);
        rollout(&all)
    };
    let out = schema_run(&["up", "--parallel", "4"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(json(&out)["summary"]["applied"], 4, "{}", text(&out));
    for s in &schemas {
        assert_eq!(
            db.count(&format!(
                "SELECT count(*) AS n FROM \"{s}\".__diesel_schema_migrations"
            )),
            N as i64
        );
    }
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public'"
        ),
        0,
        "nothing of the history landed in public"
    );
    // Every target verifies, and a second run has nothing to do.
    for out in [
        schema_run(&["verify"]),
        rollout(&["fleet", "verify", "--targets", path]),
    ] {
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    let again = rollout(&["--json", "fleet", "up", "--targets", path]);
    assert_eq!(json(&again)["summary"]["up_to_date"], 4, "{}", text(&again));
    let again = schema_run(&["up"]);
    assert_eq!(json(&again)["summary"]["up_to_date"], 4, "{}", text(&again));
}

/// A required migration that changes its session (`SET
/// session_replication_role = replica`, an old way to load data without
/// triggers) leaves that change on its own connection: the deferred track
/// of `fleet up` runs on a connection of its own, as `rollout up` runs it,
/// and its update fires the audit trigger. Before, it ran on the required
/// track's connection, and no trigger fired on any target.
#[test]
fn fleet_up_runs_the_deferred_track_on_a_connection_of_its_own() {
    let set = TempSet::new();
    set.required(
        "1_audited",
        "CREATE TABLE t (n int);\nINSERT INTO t VALUES (0);\nCREATE TABLE audit (n int);\n\
         CREATE FUNCTION audit_t() RETURNS trigger LANGUAGE plpgsql AS \
         $$BEGIN INSERT INTO audit VALUES (NEW.n); RETURN NEW; END$$;\n\
         CREATE TRIGGER t_audit AFTER UPDATE ON t FOR EACH ROW EXECUTE FUNCTION audit_t();\n\
         SET session_replication_role = replica;\n",
    );
    set.deferred("2_backfill", "UPDATE t SET n = 1;\n");
    let dbs = databases(2);
    let targets = dbs.iter().map(|d| Target::database(&d.url)).collect();
    let report = Fleet::new(set.migrator(), targets).run(Operation::Up, &|_| {});
    assert!(report.succeeded(), "{report:?}");
    for db in &dbs {
        assert_eq!(db.count("SELECT count(*) AS n FROM audit"), 1);
    }
}
