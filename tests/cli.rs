//! The `rollout` command line, as a user runs it.

mod support;

use std::process::Output;

use support::{fixture, rollout, TestDb};

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Each invalid set is refused before any connection, naming the file,
/// the line where there is one, and the fix.
#[test]
fn every_bad_input_fixture_is_refused_with_its_path_and_fix() {
    let cases: &[(&str, &[&str])] = &[
        (
            "bad_duplicate_across_tracks",
            &[
                "version 20240501120000 is used by 2 migrations",
                "migrations/2024-05-01-120000_add_orders (required)",
                "migrations_deferred/20240501120000_index_orders (deferred)",
                "rollout new NAME",
            ],
        ),
        (
            "bad_non_digit_version",
            &["migrations/v2_add_orders: `v2_add_orders` does not start with a version"],
        ),
        ("bad_missing_up", &["1_add_orders/up.sql: missing up.sql"]),
        ("bad_empty_up", &["1_add_orders/up.sql: up.sql is empty"]),
        (
            "bad_metadata_unknown_key",
            &["1_add_orders/metadata.toml:2: unknown key `run_in_transation`"],
        ),
        (
            "bad_metadata_without_key",
            &["1_add_orders/metadata.toml: metadata.toml exists but does not set `run_in_transaction`"],
        ),
        (
            "bad_metadata_unparseable",
            &["1_add_orders/metadata.toml:1: cannot parse `run_in_transaction: false`"],
        ),
        (
            "bad_concurrently_in_transaction",
            &[
                "1_add_orders/up.sql:3: `CONCURRENTLY` cannot run inside a transaction block",
                "move it to the deferred track",
            ],
        ),
    ];
    for (name, expected) in cases {
        let dir = fixture(name);
        let out = rollout()
            .args([
                "status",
                "--database-url",
                "postgres://nobody@127.0.0.1:1/none",
            ])
            .arg("--migrations-dir")
            .arg(dir.join("migrations"))
            .output()
            .unwrap();
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        for e in *expected {
            assert!(stderr.contains(e), "{name}: expected `{e}` in:\n{stderr}");
        }
        assert!(
            !stderr.contains("cannot connect"),
            "{name}: validated before connecting"
        );
    }
}

#[test]
fn up_status_json_and_verify() {
    let db = TestDb::new();
    let dir = fixture("counted").join("migrations");

    let out = db
        .rollout()
        .arg("verify")
        .arg("--migrations-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).0.contains("missing: 0001_create_effects"));

    let out = db
        .rollout()
        .args(["-q", "up", "--required-only", "--migrations-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.contains("deferred"), "{stdout}");
    assert!(
        stdout.contains("applied 0003_index_items_no_tx"),
        "{stdout}"
    );

    let out = db
        .rollout()
        .args(["status", "--json", "--migrations-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 5);
    for row in rows {
        for key in ["version", "track", "name", "state"] {
            assert!(row.get(key).is_some(), "{key} missing in {row}");
        }
    }
    assert_eq!(rows[0]["state"], "applied");
    assert_eq!(rows[0]["track"], "required");
    assert_eq!(rows[4]["version"], "0011");
    assert_eq!(rows[4]["track"], "deferred");
    assert_eq!(rows[4]["state"], "pending");

    let out = db
        .rollout()
        .arg("status")
        .arg("--migrations-dir")
        .arg(&dir)
        .output()
        .unwrap();
    let (stdout, _) = text(&out);
    let header = stdout.lines().next().unwrap();
    assert!(header.starts_with("VERSION  TRACK     NAME"), "{stdout}");
    assert!(
        stdout.contains("0002     required  create_items"),
        "{stdout}"
    );

    let out = db
        .rollout()
        .arg("verify")
        .arg("--migrations-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    assert!(text(&out).0.contains("complete"));
}

#[test]
fn new_scaffolds_the_next_version_in_either_track() {
    let tmp = tempfile::tempdir().unwrap();
    let req = tmp.path().join("migrations");
    std::fs::create_dir_all(req.join("99999999999999_far_future")).unwrap();
    std::fs::write(req.join("99999999999999_far_future/up.sql"), "SELECT 1;").unwrap();

    let out = rollout()
        .args(["new", "add_orders", "--migrations-dir"])
        .arg(&req)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out).1);
    assert!(req.join("100000000000000_add_orders/up.sql").exists());

    let out = rollout()
        .args(["new", "index_orders", "--deferred", "--migrations-dir"])
        .arg(&req)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out).1);
    let dir = tmp
        .path()
        .join("migrations_deferred/100000000000001_index_orders");
    assert_eq!(
        std::fs::read_to_string(dir.join("metadata.toml")).unwrap(),
        "run_in_transaction = false\n"
    );

    let out = rollout()
        .args(["new", "bad name", "--migrations-dir"])
        .arg(&req)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_password_never_appears_in_errors() {
    let secret = "s3cr3t-Pa55";
    let urls = [
        format!("postgres://alice:{secret}@127.0.0.1:1/app"),
        format!("postgres://alice:{secret}@no-such-host.invalid/app"),
        format!("postgres://alice:{secret}@127.0.0.1:1/app?sslmode=bogus"),
        format!("host=127.0.0.1 port=1 user=alice password={secret} dbname=app"),
        format!("postgres://alice:{secret}@[::1/app"),
    ];
    for url in &urls {
        for cmd in ["up", "status", "verify"] {
            let out = rollout()
                .args(["-v", cmd, "--database-url", url])
                .output()
                .unwrap();
            let (stdout, stderr) = text(&out);
            assert_eq!(out.status.code(), Some(1), "{cmd} {url}: {stderr}");
            assert!(stderr.contains("error:"), "{stderr}");
            // The next step names where the URL came from.
            if url.contains("127.0.0.1:1/app") && !url.contains("sslmode") {
                assert!(
                    stderr.contains("cannot connect")
                        && stderr.contains("--database-url or DATABASE_URL"),
                    "{cmd} {url}: {stderr}"
                );
            }
            assert!(
                !stderr.contains(secret) && !stdout.contains(secret),
                "password leaked by `{cmd}` for {url}:\n{stderr}"
            );
        }
    }
}

/// Without --migrations-dir, every command finds the project's migrations
/// as diesel's CLI does: diesel.toml's `[migrations_directory] dir`, else
/// `migrations`, here or in a directory above; with neither, it refuses
/// instead of applying the example set embedded in the binary (which only
/// `rollout check` falls back to). Before, `rollout up` in a diesel project
/// applied the example schema to its database.
#[test]
fn commands_find_the_projects_migrations_as_diesel_does() {
    let db = TestDb::new();
    let project = tempfile::tempdir().unwrap();
    let plain = project.path().join("plain");
    std::fs::create_dir_all(plain.join("migrations/2024-01-01-000000_create_x")).unwrap();
    std::fs::write(
        plain.join("migrations/2024-01-01-000000_create_x/up.sql"),
        "CREATE TABLE x (id int);\r\n",
    )
    .unwrap();
    std::fs::create_dir_all(plain.join("src")).unwrap();
    let out = db
        .rollout()
        .args(["up", "--required-only"])
        .current_dir(plain.join("src"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out).1);
    let configured = project.path().join("configured");
    std::fs::create_dir_all(configured.join("db/changes/2024-02-01-000000_create_y")).unwrap();
    std::fs::write(
        configured.join("db/changes/2024-02-01-000000_create_y/up.sql"),
        "CREATE TABLE y (id int);\n",
    )
    .unwrap();
    std::fs::create_dir_all(configured.join("migrations")).unwrap();
    std::fs::write(
        configured.join("diesel.toml"),
        "[print_schema]\nfile = \"src/schema.rs\"\n\n[migrations_directory]\ndir = \"db/changes\"\n",
    )
    .unwrap();
    let out = db
        .rollout()
        .args(["status"])
        .current_dir(&configured)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("create_y"), "{stdout}");
    let empty = tempfile::tempdir().unwrap();
    let out = db
        .rollout()
        .args(["up"])
        .current_dir(empty.path())
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no migrations directory"), "{stderr}");
    let applied = db.texts("SELECT version AS t FROM __diesel_schema_migrations ORDER BY 1");
    assert_eq!(
        applied,
        ["20240101000000"],
        "only the project's own migration"
    );
    // A failing `up` does not say "nothing to apply" on stdout.
    std::fs::create_dir_all(plain.join("migrations/2024-01-02-000000_bad")).unwrap();
    std::fs::write(
        plain.join("migrations/2024-01-02-000000_bad/up.sql"),
        "SELEC 1;\n",
    )
    .unwrap();
    let out = db
        .rollout()
        .args(["up"])
        .current_dir(&plain)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stdout.contains("nothing to apply"), "{stdout}");
    assert!(stderr.contains("up.sql:1"), "{stderr}");
}

/// A connection string given where the command takes none (`rollout
/// status $DATABASE_URL`), or for the fleet's targets file: the usage
/// error and the unreadable file are reported without its password.
#[test]
fn a_password_in_a_misplaced_argument_is_not_echoed() {
    let secret = "s3cr3t-Pa55";
    let url = format!("postgres://alice:{secret}@127.0.0.1:1/app");
    let keywords = format!("host=127.0.0.1 user=alice password={secret}");
    for args in [
        vec!["status", url.as_str()],
        vec!["up", "--required-only", keywords.as_str()],
        vec!["fleet", "status", "--targets", url.as_str()],
    ] {
        let out = rollout().args(&args).output().unwrap();
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("error"), "{args:?}: {stderr}");
        assert!(
            !stderr.contains(secret) && !stdout.contains(secret),
            "password echoed for {args:?}:\n{stderr}"
        );
    }
}

#[test]
fn deferred_without_wait_does_not_hang_on_pending_required_migrations() {
    let db = TestDb::new();
    let out = db
        .rollout()
        .args(["-q", "deferred", "--migrations-dir"])
        .arg(fixture("counted").join("migrations"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("rollout up --required-only"),
        "{}",
        text(&out).1
    );
}

#[test]
fn missing_database_url_is_a_usage_error() {
    let out = rollout().arg("up").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("DATABASE_URL"));
}

#[test]
fn check_applies_the_embedded_set_in_a_scratch_database_and_drops_it() {
    let db = TestDb::new();
    let child = db
        .rollout()
        .arg("check")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The scratch database is named after the process, so other tests'
    // `check` runs on the same server do not count.
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("applied 6 required and 3 deferred migrations"),
        "{stdout}"
    );
    assert!(stdout.contains("verify: complete"), "{stdout}");
    assert!(stdout.contains("create_audit_events"), "{stdout}");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) AS n FROM pg_database WHERE datname ~ '^rollout_check_{pid}_[0-9]+$'"
        )),
        0,
        "the scratch database is dropped"
    );
}

/// `rollout check` stopped by SIGTERM (a CI job cancelled) while a
/// migration runs: it exits 130 saying so, and leaves no scratch database
/// behind. Before, the database stayed on the server, one per cancel.
#[test]
fn check_stopped_by_a_signal_drops_its_scratch_database() {
    use std::time::{Duration, Instant};
    let db = TestDb::new();
    let set = support::TempSet::new();
    set.required("1_slow", "SELECT pg_sleep(60);\n");
    let child = db
        .rollout()
        .args(["check", "--migrations-dir"])
        .arg(set.required_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let sleeping = format!(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname ~ '^rollout_check_{pid}_[0-9]+$' AND query LIKE '%pg_sleep(60)%'"
    );
    let started = Instant::now();
    while db.count(&sleeping) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the migration never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) AS n FROM pg_database WHERE datname ~ '^rollout_check_{pid}_[0-9]+$'"
        )),
        0,
        "the scratch database is dropped"
    );
}

/// A `dbname` parameter in the URL, which libpq lets override the path,
/// does not take `check` to that database: before, the scratch database was
/// created, and the migrations applied to the one the parameter named.
#[test]
fn check_with_a_dbname_parameter_stays_in_its_scratch_database() {
    let db = TestDb::new();
    let sep = if db.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}dbname={}", db.url, db.name);
    let out = rollout()
        .env("DATABASE_URL", &url)
        .arg("check")
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_tables WHERE tablename = '__diesel_schema_migrations'"
        ),
        0,
        "nothing was applied to the database the parameter names"
    );
}

#[test]
fn check_without_a_database_starts_its_own_server() {
    let out = rollout().arg("check").output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("verify: complete"), "{stdout}");
    assert!(
        stderr.contains("starting a throwaway PostgreSQL server"),
        "{stderr}"
    );
}

#[test]
fn every_reporting_command_speaks_json() {
    let db = TestDb::new();
    let dir = fixture("counted").join("migrations");
    let json = |args: &[&str]| -> serde_json::Value {
        let out = db
            .rollout()
            .args(["--json", "--migrations-dir"])
            .arg(&dir)
            .args(args)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
    };
    let up = json(&["up"]);
    assert_eq!(
        up["required"]["applied"].as_array().unwrap().len(),
        4,
        "{up}"
    );
    assert_eq!(up["deferred"]["state"], "done");
    assert_eq!(up["deferred"]["applied"][0], "0011_index_item_note");
    let again = json(&["deferred"]);
    assert_eq!(again["state"], "done");
    assert_eq!(again["applied"].as_array().unwrap().len(), 0);
    assert_eq!(json(&["verify"])["complete"], true);
    assert_eq!(json(&["status"]).as_array().unwrap().len(), 5);
    // `check` on the embedded example set (the counted fixture does not
    // pass the lint `check` runs first).
    let out = db.rollout().args(["--json", "check"]).output().unwrap();
    let check: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(check["complete"], true, "{check}");
    assert_eq!(check["status"].as_array().unwrap().len(), 9);
    assert_eq!(check["required"]["applied"].as_array().unwrap().len(), 6);

    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("migrations")).unwrap();
    let out = rollout()
        .args(["--json", "new", "add_x", "--migrations-dir"])
        .arg(tmp.path().join("migrations"))
        .output()
        .unwrap();
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["track"], "required");
    assert!(created["created"].as_str().unwrap().ends_with("_add_x"));
}
