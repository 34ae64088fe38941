//! The example service (examples/service.rs): ready as soon as the required
//! track is applied, while a slow deferred migration is still running.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use support::{fixture, TestDb};

/// The example binary cargo built beside this test.
fn example_binary() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let dir = deps.parent().unwrap().parent().unwrap().join("examples");
    let bin = dir.join("service");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds the examples (run `cargo build --examples`)",
        bin.display()
    );
    bin
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let code = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (code, body)
}

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn readyz_is_200_while_the_deferred_migration_still_runs() {
    let db = TestDb::new();
    // The deferred migration sleeps 1.5 s before its index build; an open
    // write taken meanwhile makes the build wait, so it is still running
    // when we look.
    let dir = fixture("deferred_build");
    // And a snapshot older than the build, taken before the service starts:
    // the build waits for it too, however slowly this machine gets to the
    // writer above.
    let mut snapshot = db.conn();
    snapshot
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .unwrap();
    let mut child = Command::new(example_binary())
        .env("DATABASE_URL", &db.url)
        .env("MIGRATIONS_DIR", &dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let service = Service(child);
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .to_string();

    assert_eq!(get(&addr, "/livez").0, 200, "alive from the start");
    wait_until("the required track (readyz 200)", || {
        get(&addr, "/readyz").0 == 200
    });
    // The required migration created `things`; hold a write on it.
    let mut writer = db.conn();
    writer
        .batch_execute("BEGIN; INSERT INTO things (val, grp) VALUES (-1, 0)")
        .unwrap();
    wait_until("the deferred build to start", || {
        get(&addr, "/migrations").1.contains(r#""state":"running""#)
            && db.count(
                "SELECT count(*) AS n FROM pg_stat_progress_create_index \
                 WHERE datname = current_database()",
            ) > 0
    });
    let (code, body) = get(&addr, "/readyz");
    assert_eq!(code, 200, "ready while the deferred build runs: {body}");
    let (code, body) = get(&addr, "/migrations");
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["deferred"]["state"], "running", "{json}");
    assert_eq!(json["deferred"]["version"], "0002");
    let pending = json["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["version"] == "0002")
        .unwrap();
    assert_eq!(pending["state"], "pending");

    drop(writer);
    drop(snapshot);
    wait_until("the deferred track to finish", || {
        get(&addr, "/migrations").1.contains(r#""state":"done""#)
    });
    let json: serde_json::Value = serde_json::from_str(&get(&addr, "/migrations").1).unwrap();
    let built = json["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["version"] == "0002")
        .unwrap()
        .clone();
    assert_eq!(built["state"], "applied", "{json}");
    assert_eq!(built["indexes"][0]["state"], "valid");
    drop(service);
}
