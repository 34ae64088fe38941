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
    say("pgbouncer: transaction_mode=refused(direct-connection message) session_mode=applied invariants=ok");
}
