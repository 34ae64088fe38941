//! Hostile input, read-only servers, and secrets: no password in any error
//! or log line at any level.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use diesel::connection::SimpleConnection;
use diesel_rollout::cluster::ThrowawayCluster;
use diesel_rollout::{MigrationSet, Migrator};

use crate::support::{fixture, rollout, TestDb};
use crate::{rollout_on, say, text, ALL};

const SECRET: &str = "Wr0ng-or-right_pa55";

/// A cluster of its own, with a role that must give a password.
fn password_cluster() -> (ThrowawayCluster, String) {
    let cluster = ThrowawayCluster::start().expect("a throwaway cluster");
    let hba = cluster.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all app_user 127.0.0.1/32 scram-sha-256\n{old}"),
    )
    .unwrap();
    let admin = cluster.admin_url();
    let mut c = diesel_rollout::connect(&admin).unwrap();
    c.batch_execute(&format!(
        "CREATE ROLE app_user LOGIN CREATEDB PASSWORD '{SECRET}'; SELECT pg_reload_conf()"
    ))
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    (cluster, admin)
}

fn assert_no_secret(what: &str, out: &str) {
    assert!(!out.contains(SECRET), "{what}: the password leaked:\n{out}");
}

#[test]
fn hostile_connections_and_no_password_anywhere() {
    let (cluster, admin) = password_cluster();
    let port = cluster.port();
    let db = TestDb::on(&admin);
    diesel_rollout::connect(&admin)
        .unwrap()
        .batch_execute(&format!("ALTER DATABASE \"{}\" OWNER TO app_user", db.name))
        .unwrap();
    let good = format!("postgres://app_user:{SECRET}@127.0.0.1:{port}/{}", db.name);
    let cases = [
        (
            "connection refused",
            format!("postgres://app_user:{SECRET}@127.0.0.1:1/app"),
            "cannot connect",
        ),
        (
            "unknown host",
            format!("postgres://app_user:{SECRET}@no-such-host.invalid/app"),
            "cannot connect",
        ),
        (
            "wrong password",
            format!("postgres://app_user:x{SECRET}@127.0.0.1:{port}/{}", db.name),
            "password authentication failed",
        ),
        (
            "bad URL syntax",
            format!("postgres://app_user:{SECRET}@[::1/app"),
            "cannot connect",
        ),
        (
            "bad percent-encoding",
            format!("postgres://app_user:{SECRET}%zz@127.0.0.1:{port}/app"),
            "cannot connect",
        ),
        (
            "key=value string",
            format!("host=127.0.0.1 port=1 user=app_user password={SECRET} dbname=app"),
            "cannot connect",
        ),
    ];
    for (what, url, expect) in &cases {
        for cmd in [
            &["-vv", "up"][..],
            &["-vv", "status"],
            &["-vv", "verify"],
            &["-vv", "deferred"],
        ] {
            let out = rollout_on(url, cmd).output().unwrap();
            let t = text(&out);
            assert_eq!(out.status.code(), Some(1), "{what} {cmd:?}: {t}");
            assert!(
                t.contains(expect),
                "{what} {cmd:?}: expected `{expect}`: {t}"
            );
            assert_no_secret(&format!("{what} {cmd:?}"), &t);
        }
    }
    // The real work, at trace level, with a password in the URL.
    for cmd in [
        &["-vv", "up"][..],
        &["-vv", "status"],
        &["-vv", "verify"],
        &["-vv", "check"],
    ] {
        let out = rollout_on(&good, cmd).output().unwrap();
        let t = text(&out);
        assert!(out.status.success(), "{cmd:?}: {t}");
        assert_no_secret(&format!("{cmd:?}"), &t);
    }

    // In a service: the library's tracing output at every level.
    let captured = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = {
        let captured = Arc::clone(&captured);
        move || Capture(Arc::clone(&captured))
    };
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(writer)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let set = MigrationSet::from_dirs(
            &fixture("faults").join("migrations"),
            &fixture("faults").join("migrations_deferred"),
        )
        .unwrap();
        let m = Migrator::new(set);
        let bad = format!("postgres://app_user:x{SECRET}@127.0.0.1:{port}/{}", db.name);
        let e = m.run_required(&bad).unwrap_err();
        assert_no_secret("library error", &e.to_string());
        let db2 = TestDb::on(&admin);
        diesel_rollout::connect(&admin)
            .unwrap()
            .batch_execute(&format!(
                "ALTER DATABASE \"{}\" OWNER TO app_user",
                db2.name
            ))
            .unwrap();
        let url2 = format!("postgres://app_user:{SECRET}@127.0.0.1:{port}/{}", db2.name);
        let report = m.run_required(&url2).unwrap();
        assert_eq!(report.applied.len(), 4);
    });
    let logs = String::from_utf8_lossy(&captured.lock().unwrap()).into_owned();
    assert!(logs.contains("applied 0004_alter_items"), "{logs}");
    assert_no_secret("tracing output", &logs);
    say(&format!(
        "secrets: hostile_urls={} commands_per_url=4 successful_commands=4 trace_lines={} \
         password_seen=0",
        cases.len(),
        logs.lines().count()
    ));
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
}

#[test]
fn hostile_migrations() {
    let db = TestDb::new();
    let tmp = tempfile::tempdir().unwrap();
    let req = tmp.path().join("migrations");

    // A syntax error: the message names the file and line.
    write(
        &req.join("0001_ok/up.sql"),
        "CREATE TABLE t (id INT PRIMARY KEY);\n",
    );
    write(
        &req.join("0002_typo/up.sql"),
        "-- a typo on line 3\nINSERT INTO t VALUES (1);\nCREATE TABLE u (id INT,);\n",
    );
    let run = |args: &[&str]| {
        let mut c = rollout();
        c.env("DATABASE_URL", &db.url)
            .arg("--migrations-dir")
            .arg(&req)
            .args(args);
        c.output().unwrap()
    };
    let out = run(&["up", "--required-only"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("0002_typo/up.sql:3"), "{t}");
    assert!(t.contains("syntax error"), "{t}");
    assert_eq!(
        db.count("SELECT count(*) AS n FROM t"),
        0,
        "nothing of 0002 applied"
    );

    // Fixed: it applies. Then edited after it was applied: a warning, and
    // strict mode refuses.
    write(
        &req.join("0002_typo/up.sql"),
        "INSERT INTO t VALUES (1);\nCREATE TABLE u (id INT);\n",
    );
    assert!(run(&["up", "--required-only"]).status.success());
    write(
        &req.join("0002_typo/up.sql"),
        "INSERT INTO t VALUES (1);\nCREATE TABLE u (id BIGINT);\n",
    );
    let out = run(&["up", "--required-only"]);
    assert!(out.status.success());
    assert!(
        text(&out).contains("changed since it was applied"),
        "{}",
        text(&out)
    );
    let out = run(&["--strict", "up", "--required-only"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("0002_typo/up.sql of applied migration"),
        "{}",
        text(&out)
    );

    // A partially applied no-transaction migration resumes after the last
    // completed statement.
    write(
        &req.join("0003_partial/up.sql"),
        "CREATE TABLE IF NOT EXISTS p1 (id INT);\nINSERT INTO missing_table VALUES (1);\nCREATE TABLE p3 (id INT);\n",
    );
    write(
        &req.join("0003_partial/metadata.toml"),
        "run_in_transaction = false\n",
    );
    let out = run(&["up", "--required-only"]);
    assert!(text(&out).contains("statement 2 of 3"), "{}", text(&out));
    db.conn()
        .batch_execute("CREATE TABLE missing_table (id INT)")
        .unwrap();
    let out = run(&["up", "--required-only"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("resuming 0003_partial after statement 1"),
        "{}",
        text(&out)
    );

    // A migration set older than the database still starts.
    std::fs::remove_dir_all(req.join("0003_partial")).unwrap();
    let out = run(&["up", "--required-only"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("does not know"), "{}", text(&out));
    let out = run(&["status"]);
    assert!(
        text(&out).contains("0003     -         -     unknown"),
        "{}",
        text(&out)
    );

    // A gap in the applied versions: verify names it.
    db.conn()
        .batch_execute("DELETE FROM __diesel_schema_migrations WHERE version = '0001'")
        .unwrap();
    let out = run(&["verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("missing: 0001_ok (a gap"),
        "{}",
        text(&out)
    );
    say("hostile: syntax_error=file:line edited=warn/strict-refused partial=resumed older_set=starts gap=named");
}

#[test]
fn read_only_server() {
    let db = TestDb::new();
    let out = rollout_on(&db.url, &["-q", "up"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    db.conn()
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET default_transaction_read_only = on",
            db.name
        ))
        .unwrap();
    for cmd in ["verify", "status"] {
        let out = rollout_on(&db.url, &[cmd]).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", text(&out));
    }
    // Up to date: `up` is the one-query fast path, which reads only.
    assert!(rollout_on(&db.url, &["-q", "up"])
        .output()
        .unwrap()
        .status
        .success());
    // With something pending it fails, saying why.
    let empty = TestDb::new();
    empty
        .conn()
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET default_transaction_read_only = on",
            empty.name
        ))
        .unwrap();
    let out = rollout_on(&empty.url, &["up"]).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("The server is read-only"), "{t}");
    assert!(t.contains("apply migrations against the primary"), "{t}");
    assert_eq!(empty.advisory_locks(), 0);
    let out = rollout_on(&empty.url, &["verify"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("missing: 0001_create_tables"));
    assert_eq!(ALL.len(), 6);
    say("read-only: verify=ok status=ok up(up-to-date)=ok up(pending)=refused-with-message");
}
