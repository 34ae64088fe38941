//! PgBouncer in front of the throwaway cluster: transaction pooling is
//! detected and refused, session pooling works.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel_rollout::cluster::ThrowawayCluster;

use crate::support::TestDb;
use crate::{invariants, rollout_on, say, text};

fn pgbouncer_binary() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect(
            "pgbouncer is not installed: `apt-get install pgbouncer` (.ci/run installs it) \
             to run the pooler scenario",
        )
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A PgBouncer process, stopped on drop.
struct Bouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        // Through runuser, killing the child would leave pgbouncer running:
        // stop the daemon by its pid file.
        if let Ok(pid) = std::fs::read_to_string(self._dir.path().join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bouncer {
    fn start(server_port: u16, mode: &str) -> Bouncer {
        let dir = tempfile::Builder::new()
            .prefix("rollout-pgbouncer-")
            .tempdir_in("/tmp")
            .unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(dir.path().join("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host=127.0.0.1 port={server_port}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {}\npool_mode = {mode}\n\
                 default_pool_size = 8\nmax_client_conn = 200\n\
                 ignore_startup_parameters = extra_float_digits,application_name\n\
                 logfile = {}\npidfile = {}\n",
                p("userlist.txt"),
                p("pgbouncer.log"),
                p("pgbouncer.pid"),
            ),
        )
        .unwrap();
        let ini = p("pgbouncer.ini");
        // PgBouncer refuses to run as root.
        let mut cmd = if is_root() {
            Command::new("chown")
                .args(["-R", "postgres", &dir.path().display().to_string()])
                .status()
                .unwrap();
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(pgbouncer_binary())
                .arg(&ini);
            c
        } else {
            let mut c = Command::new(pgbouncer_binary());
            c.arg(&ini);
            c
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "pgbouncer did not start: {}",
                std::fs::read_to_string(dir.path().join("pgbouncer.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Bouncer {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

#[test]
fn pgbouncer_transaction_mode_is_refused_session_mode_works() {
    let cluster = ThrowawayCluster::start().expect("a throwaway cluster");
    let admin = cluster.admin_url();

    let tx = Bouncer::start(cluster.port(), "transaction");
    let db = TestDb::on(&admin);
    let out = rollout_on(&tx.url(&db.name), &["up"]).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("pooler in transaction mode"), "{t}");
    assert!(t.contains("direct connection"), "{t}");
    // Nothing was applied through it.
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_class WHERE relname = 'effects'"),
        0
    );
    drop(tx);

    let session = Bouncer::start(cluster.port(), "session");
    let out = rollout_on(&session.url(&db.name), &["-q", "up"])
        .output()
        .unwrap();
    assert!(out.status.success(), "session mode: {}", text(&out));
    drop(session);
    invariants(&db);

    // revert, redo and resolve are refused through it as up is, before
    // they take a lock or run any down.sql.
    let tx = Bouncer::start(cluster.port(), "transaction");
    let applied = "SELECT count(*) AS n FROM __diesel_schema_migrations";
    let before = db.count(applied);
    for args in [
        &["resolve", "0004", "--rolled-back", "--force"][..],
        &["revert"],
        &["redo"],
    ] {
        let out = rollout_on(&tx.url(&db.name), args).output().unwrap();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {t}");
        assert!(t.contains("pooler in transaction mode"), "{args:?}: {t}");
        assert_eq!(db.count(applied), before, "{args:?} changed nothing");
    }
    drop(tx);
    assert_eq!(db.advisory_locks(), 0);
    say("pgbouncer: transaction_mode=refused(direct-connection message; up, revert, redo, resolve) session_mode=applied invariants=ok");
}

/// A backend query on the cluster itself (not through the pooler).
fn backend_count(db: &TestDb, condition: &str) -> i64 {
    db.count(&format!(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND {condition}"
    ))
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal}");
}

/// A client killed between two statements of a no-transaction migration,
/// behind PgBouncer in session mode: the pooler resets the server
/// connection (`DISCARD ALL` frees the advisory lock) and keeps the backend,
/// so the attempt stays `running` with a live backend pid. The next run
/// must resume after the last recorded statement, not start over.
#[test]
fn a_client_killed_behind_a_session_pooler_resumes_where_it_stopped() {
    let cluster = ThrowawayCluster::start().expect("a throwaway cluster");
    let bouncer = Bouncer::start(cluster.port(), "session");
    let db = TestDb::on(&cluster.admin_url());
    let set = crate::support::TempSet::new();
    set.required("1_effects", "CREATE TABLE effects (v text);\n");
    set.required_no_tx(
        "2_steps",
        "INSERT INTO effects VALUES ('2a');\nSELECT pg_sleep(1.5);\n\
         INSERT INTO effects VALUES ('2c');\n",
    );
    let up = || {
        let mut c = crate::support::rollout();
        c.env("DATABASE_URL", bouncer.url(&db.name))
            .args(["-q", "up", "--required-only", "--migrations-dir"])
            .arg(set.required_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let mut child = up().spawn().unwrap();
    crate::wait_until("statement 2 to run", Duration::from_secs(30), || {
        backend_count(&db, "state = 'active' AND query LIKE 'SELECT pg_sleep%'") == 1
    });
    // Stopped while the server runs statement 2; once the server is idle
    // again (statement 2 done, its result unread), killed.
    signal(&child, "-STOP");
    crate::wait_until("statement 2 to end", Duration::from_secs(30), || {
        backend_count(&db, "state = 'active' AND query LIKE 'SELECT pg_sleep%'") == 0
    });
    child.kill().unwrap();
    let _ = child.wait();
    crate::wait_until(
        "the pooler to reset the server connection",
        Duration::from_secs(30),
        || db.advisory_locks() == 0,
    );
    // The state that used to make the next run start over: `running`, and
    // its backend still alive in the pooler. Statement 2 finished on the
    // server with its progress (one transaction), so two are recorded.
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM __diesel_rollout_attempts a WHERE outcome = 'running' \
             AND statements_completed = 2 \
             AND EXISTS (SELECT 1 FROM pg_stat_activity s WHERE s.pid = a.backend_pid)"
        ),
        1
    );
    let out = up().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        db.texts("SELECT v AS t FROM effects ORDER BY v"),
        ["2a", "2c"],
        "statement 1 ran exactly once"
    );
    assert_eq!(
        db.texts(
            "SELECT outcome AS t FROM __diesel_rollout_attempts WHERE version = '2' ORDER BY id"
        ),
        ["interrupted", "success"]
    );
    assert_eq!(db.advisory_locks(), 0);
    say("pgbouncer: session_mode_client_killed_between_statements=resumed(statement 3) effects_once=ok");
}
