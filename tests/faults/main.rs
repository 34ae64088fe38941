//! The fault-injection suite: real `rollout` processes against real
//! PostgreSQL, killed, cut off, restarted, stampeded, put behind PgBouncer,
//! blocked, made read-only, and fed hostile input. Every scenario ends with
//! the same invariants.
//!
//! `cargo test --test faults` runs a short version (what CI runs). The sizes
//! come from the environment, so a long run is one command away:
//!
//! ```sh
//! FAULTS_ROUNDS=50 FAULTS_STAMPEDE=32 FAULTS_STAMPEDE_ROUNDS=10 \
//!     cargo test --release --test faults -- --nocapture --test-threads 1
//! ```
//!
//! `FAULTS_SEED` replays a run (each scenario prints the seed it used).

#[path = "../support/mod.rs"]
mod support;

mod busy;
mod hostile;
mod pooler;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel_rollout::cluster::ThrowawayCluster;
use support::{fixture, TestDb};

/// A number from the environment, or a default.
fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rounds() -> usize {
    env_usize("FAULTS_ROUNDS", 3)
}

/// A small deterministic generator (xorshift), seeded from FAULTS_SEED or
/// the clock, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn new(scenario: &str) -> Self {
        let seed = std::env::var("FAULTS_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
            | 1;
        say(&format!("{scenario}: FAULTS_SEED={seed}"));
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn millis(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.next() % max.max(1))
    }
}

/// A line for FAULTS.md, on stderr (shown with --nocapture).
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "FAULTS {line}");
}

fn faults_dir() -> PathBuf {
    fixture("faults").join("migrations")
}

/// `rollout` against `url` on the faults set, with the given arguments.
fn rollout_on(url: &str, args: &[&str]) -> Command {
    let mut c = support::rollout();
    c.env("DATABASE_URL", url)
        .arg("--migrations-dir")
        .arg(faults_dir())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn spawn_up(url: &str) -> Child {
    rollout_on(url, &["-q", "up"])
        .spawn()
        .expect("spawn rollout")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const ALL: [&str; 6] = ["0001", "0002", "0003", "0004", "0005", "0006"];
const TRANSACTIONAL: [&str; 3] = ["0001", "0002", "0004"];

/// What every scenario checks at its end, with the processes it started
/// gone: nothing half-applied, nothing recorded that did not happen, no
/// lock left; then one more ordinary run completes and `verify` passes,
/// every migration's side effect is there exactly once and every index is
/// valid.
fn invariants(db: &TestDb) {
    // A killed client's backend notices and exits; its session lock goes
    // with it (a backend busy in a statement notices within the client
    // connection check interval).
    wait_until(
        "advisory locks to be released",
        Duration::from_secs(60),
        || db.advisory_locks() == 0,
    );
    let ledger_exists = db
        .count("SELECT count(*) AS n FROM pg_class WHERE relname = '__diesel_schema_migrations'")
        > 0;
    let effects_exist =
        db.count("SELECT count(*) AS n FROM pg_class WHERE relname = 'effects'") > 0;
    if ledger_exists && effects_exist {
        let recorded = db.texts("SELECT version AS t FROM __diesel_schema_migrations");
        let effects = db.texts("SELECT version AS t FROM effects");
        for v in &recorded {
            assert_eq!(
                effects.iter().filter(|e| *e == v).count(),
                1,
                "recorded version {v} must have happened exactly once: {effects:?}"
            );
        }
        for v in TRANSACTIONAL {
            let done = effects.iter().filter(|e| *e == v).count();
            let is_recorded = recorded.iter().any(|r| r == v);
            assert_eq!(
                done,
                usize::from(is_recorded),
                "transactional {v}: side effect {done} times, recorded {is_recorded}"
            );
        }
        for v in &effects {
            assert!(
                effects.iter().filter(|e| *e == v).count() == 1,
                "side effect of {v} happened more than once: {effects:?}"
            );
        }
    }

    let out = rollout_on(&db.url, &["-q", "up"]).output().unwrap();
    assert!(
        out.status.success(),
        "the ordinary run after the faults failed: {}",
        text(&out)
    );
    let out = rollout_on(&db.url, &["verify"]).output().unwrap();
    assert!(
        out.status.success(),
        "verify after the faults: {}",
        text(&out)
    );
    assert_eq!(
        db.texts("SELECT version AS t FROM effects ORDER BY version"),
        ALL,
        "every side effect exactly once"
    );
    assert_eq!(
        db.texts("SELECT version AS t FROM __diesel_schema_migrations ORDER BY version"),
        ALL
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_index WHERE NOT indisvalid"),
        0,
        "no invalid index left"
    );
    assert_eq!(db.advisory_locks(), 0, "no advisory lock left");
}

#[test]
fn kill_at_random_points() {
    let mut rng = Rng::new("kill");
    let kills_per_round = env_usize("FAULTS_KILLS_PER_ROUND", 3);
    let (mut killed_running, mut finished_first) = (0, 0);
    let started = Instant::now();
    for _ in 0..rounds() {
        let db = TestDb::new();
        for _ in 0..kills_per_round {
            let mut child = spawn_up(&db.url);
            std::thread::sleep(rng.millis(2500));
            match child.try_wait().unwrap() {
                Some(_) => finished_first += 1,
                None => {
                    child.kill().unwrap();
                    killed_running += 1;
                }
            }
            child.wait().unwrap();
        }
        invariants(&db);
    }
    say(&format!(
        "kill: rounds={} kills={} killed_mid_run={killed_running} finished_before_kill={finished_first} \
         secs={:.1} invariants=ok",
        rounds(),
        rounds() * kills_per_round,
        started.elapsed().as_secs_f64()
    ));
}

#[test]
fn backend_terminated_at_random_points() {
    let mut rng = Rng::new("terminate");
    let mut terminated = 0;
    let started = Instant::now();
    for _ in 0..rounds() {
        let db = TestDb::new();
        for _ in 0..2 {
            let child = spawn_up(&db.url);
            std::thread::sleep(rng.millis(2500));
            terminated += db.count(
                "SELECT count(*) AS n FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
            );
            let out = child.wait_with_output().unwrap();
            // Killed mid-way it fails; done before it, it succeeded.
            if !out.status.success() {
                let t = text(&out);
                assert!(t.contains("error:"), "{t}");
            }
        }
        invariants(&db);
    }
    say(&format!(
        "terminate: rounds={} backends_terminated={terminated} secs={:.1} invariants=ok",
        rounds(),
        started.elapsed().as_secs_f64()
    ));
}

#[test]
fn server_restarted_during_a_run() {
    let mut rng = Rng::new("restart");
    let cluster = ThrowawayCluster::start().expect("a throwaway cluster of its own");
    let admin = cluster.admin_url();
    // The throwaway cluster trades durability for speed; a crash test needs
    // commits that survive the crash, as on a real server.
    let mut c = diesel_rollout::connect(&admin).unwrap();
    c.batch_execute("ALTER SYSTEM SET synchronous_commit = on")
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    drop(c);
    let started = Instant::now();
    let mut failed_runs = 0;
    for _ in 0..rounds() {
        let db = TestDb::on(&admin);
        let child = spawn_up(&db.url);
        std::thread::sleep(rng.millis(2500));
        cluster.stop().expect("stop -m immediate");
        cluster.start_again().expect("start again");
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            failed_runs += 1;
        }
        invariants(&db);
    }
    say(&format!(
        "restart: rounds={} runs_cut_off={failed_runs} secs={:.1} invariants=ok",
        rounds(),
        started.elapsed().as_secs_f64()
    ));
}

#[test]
fn stampede_of_processes() {
    let n = env_usize("FAULTS_STAMPEDE", 32);
    let stampede_rounds = env_usize("FAULTS_STAMPEDE_ROUNDS", 2);
    let mut pending_secs = Vec::new();
    let mut uptodate_secs = Vec::new();
    for _ in 0..stampede_rounds {
        let db = TestDb::new();
        for (label, secs) in [
            ("pending", &mut pending_secs),
            ("up to date", &mut uptodate_secs),
        ] {
            let start = Instant::now();
            let children: Vec<_> = (0..n).map(|_| spawn_up(&db.url)).collect();
            let mut stdout = String::new();
            for c in children {
                let out = c.wait_with_output().unwrap();
                assert!(out.status.success(), "{label}: {}", text(&out));
                stdout.push_str(&String::from_utf8_lossy(&out.stdout));
            }
            secs.push(start.elapsed().as_secs_f64());
            // Each process prints what it applied: each migration once in
            // all, and nothing the second time.
            for v in ALL {
                let times = stdout.matches(&format!("{v}_")).count();
                let expected = usize::from(label == "pending");
                assert_eq!(
                    times, expected,
                    "{label}: {v} applied {times} times:\n{stdout}"
                );
            }
            assert_eq!(
                db.texts("SELECT version AS t FROM effects ORDER BY version"),
                ALL
            );
        }
        invariants(&db);
    }
    say(&format!(
        "stampede: processes={n} rounds={stampede_rounds} pending_secs={pending_secs:.1?} \
         up_to_date_secs={uptodate_secs:.1?} invariants=ok"
    ));
}
