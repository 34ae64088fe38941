//! Benchmarks of diesel-rollout against the baseline users would otherwise
//! use, diesel_migrations' `MigrationHarness`, in the same run against the
//! same server (a throwaway cluster with `pg_stat_statements`).
//!
//! ```sh
//! cargo bench --bench rollout -- --write      # full run; writes BENCHMARKS.md and docs/bench-index-build.png
//! cargo bench --bench rollout -- --quick      # smaller sizes, a few minutes
//! cargo bench --bench rollout -- --smoke      # tiny sizes: keeps the code building and running (CI)
//! ```
//!
//! Nothing here passes or fails on a time: it measures and reports. Times
//! are medians over several runs, with ratios against the baseline measured
//! in the same run.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::{BigInt, Text};
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use diesel_rollout::cluster::ThrowawayCluster;
use diesel_rollout::{with_database, DeferredState, MigrationSet, Migrator};

#[derive(Clone, Copy, PartialEq)]
enum Size {
    Smoke,
    Quick,
    Full,
}

struct Sizes {
    startup_iters: usize,
    many: usize,
    many_runs: usize,
    stampede: usize,
    stampede_runs: usize,
    rows: i64,
    writers: usize,
    build_migrations: usize,
}

impl Size {
    fn sizes(self) -> Sizes {
        match self {
            Size::Smoke => Sizes {
                startup_iters: 5,
                many: 20,
                many_runs: 1,
                stampede: 4,
                stampede_runs: 1,
                rows: 20_000,
                writers: 2,
                build_migrations: 0,
            },
            Size::Quick => Sizes {
                startup_iters: 30,
                many: 200,
                many_runs: 3,
                stampede: 16,
                stampede_runs: 3,
                rows: 500_000,
                writers: 3,
                build_migrations: 200,
            },
            Size::Full => Sizes {
                startup_iters: 50,
                many: 500,
                many_runs: 3,
                stampede: 16,
                stampede_runs: 3,
                rows: 3_000_000,
                writers: 3,
                build_migrations: 1000,
            },
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        std::process::exit(child(&args[2], &args[3], Path::new(&args[4])));
    }
    let size = if args.iter().any(|a| a == "--smoke") {
        Size::Smoke
    } else if args.iter().any(|a| a == "--quick") {
        Size::Quick
    } else {
        Size::Full
    };
    let write = args.iter().any(|a| a == "--write");
    // `--only 2` runs one section (while working on it).
    let only: Option<u32> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok());
    let run = |n: u32| only.is_none_or(|o| o == n);
    let sizes = size.sizes();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));

    let cluster = ThrowawayCluster::start().expect("a throwaway PostgreSQL cluster");
    let conf = cluster.data_dir().join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str(
        "shared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track = top\n",
    );
    std::fs::write(&conf, text).unwrap();
    cluster.stop().unwrap();
    cluster.start_again().unwrap();
    let server = Server {
        admin: cluster.admin_url(),
        next: std::cell::Cell::new(0),
    };
    server
        .admin_conn()
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .unwrap();

    let mut report = String::new();
    let version: String = scalar_text(&mut server.admin_conn(), "SELECT version() AS t");
    writeln!(report, "# Benchmarks\n").unwrap();
    writeln!(
        report,
        "diesel-rollout against diesel_migrations' `MigrationHarness` (the baseline), in one run, \
         against one throwaway PostgreSQL cluster started by the benchmark (`fsync = off`, so \
         times exclude disk flushes for both). Reproduce with:\n\n```sh\ncargo bench --bench \
         rollout -- --write\n```\n"
    )
    .unwrap();
    writeln!(report, "- Machine: {}", machine()).unwrap();
    writeln!(report, "- PostgreSQL: {version}").unwrap();
    writeln!(
        report,
        "- Size: {}\n",
        match size {
            Size::Smoke => "smoke (tiny; not meaningful)",
            Size::Quick => "quick",
            Size::Full => "full",
        }
    )
    .unwrap();

    let png = root.join("docs/bench-index-build.png");
    // Each section is printed as soon as it is measured.
    let mut printed = 0;
    let mut flush = |report: &String| {
        print!("{}", &report[printed..]);
        printed = report.len();
    };
    flush(&report);
    if run(1) {
        eprintln!("1/5 start-up with nothing pending");
        startup(&server, &sizes, &mut report);
        flush(&report);
    }
    if run(2) {
        eprintln!("2/5 many migrations from empty");
        many(&server, &sizes, &mut report);
        flush(&report);
    }
    if run(3) {
        eprintln!("3/5 stampede");
        stampede(&server, &sizes, &mut report);
        flush(&report);
    }
    if run(4) {
        eprintln!("4/5 traffic during an index build");
        traffic(&server, &sizes, &mut report, write.then_some(png.as_path()));
        flush(&report);
    }
    if run(5) {
        eprintln!("5/5 build cost");
        build_cost(&sizes, &mut report);
        flush(&report);
    }

    if only.is_none() {
        writeln!(
            report,
            "## Where diesel-rollout loses, and why\n\n\
             - **Start-up with nothing pending.** One query instead of two, but it also reads \
             the attempts table, to warn on every start when an applied migration's `up.sql` \
             was edited (the checksum check). On a fresh backend, opening that second table \
             and its index costs a fraction of a millisecond more than diesel's read of one \
             table (measured apart: ~0.6 ms for a plain read of the versions, ~1.4 ms with the \
             checksum). Open question: move the checksum check off the start-up path (to \
             `verify`, `status` and runs that apply something)? It is kept for now: the \
             absolute cost is about a millisecond per replica start, next to several for the \
             connection itself.\n\
             - **Stampede with a migration pending.** Waiting replicas poll \
             `pg_try_advisory_lock` (every 25 ms rising to 200 ms, with jitter) instead of \
             blocking in `pg_advisory_lock`, because a blocked waiter holds a snapshot that \
             stalls `CREATE INDEX CONCURRENTLY` elsewhere; they notice the release up to one \
             poll interval later, and meanwhile check whether the work is done so they never \
             file through the lock one by one. diesel_migrations is faster here only because \
             it does not wait: 15 of its 16 processes fail.\n\
             - **Build cost.** `embed` validates every directory at build time (versions, \
             metadata, `CONCURRENTLY` in transactions, statement splitting) and writes a table \
             with a checksum per migration: a few hundred milliseconds more than \
             `embed_migrations!` for 1,000 migrations, in exchange for a build that notices a \
             new migration at all.\n"
        )
        .unwrap();
        flush(&report);
    }
    if write {
        std::fs::write(root.join("BENCHMARKS.md"), &report).unwrap();
        eprintln!("wrote BENCHMARKS.md and {}", png.display());
    }
}

struct Server {
    admin: String,
    next: std::cell::Cell<u32>,
}

impl Server {
    fn admin_conn(&self) -> PgConnection {
        PgConnection::establish(&self.admin).unwrap()
    }

    /// A fresh database; returns (name, url).
    fn database(&self) -> (String, String) {
        let n = self.next.get();
        self.next.set(n + 1);
        let name = format!("bench_{n}");
        self.admin_conn()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let url = with_database(&self.admin, &name).unwrap();
        (name, url)
    }

    fn drop_database(&self, name: &str) {
        let _ = self
            .admin_conn()
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    }

    /// Statements the server ran for `database` while `f` ran, from
    /// pg_stat_statements.
    fn statements<T>(&self, database: &str, f: impl FnOnce() -> T) -> (T, i64) {
        let mut admin = self.admin_conn();
        admin
            .batch_execute("SELECT pg_stat_statements_reset()")
            .unwrap();
        let out = f();
        let n = scalar_i64(
            &mut admin,
            &format!(
                "SELECT coalesce(sum(calls), 0)::bigint AS n FROM pg_stat_statements \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = '{database}')"
            ),
        );
        (out, n)
    }
}

fn scalar_i64(conn: &mut PgConnection, sql: &str) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    diesel::sql_query(sql).get_result::<N>(conn).unwrap().n
}

fn scalar_text(conn: &mut PgConnection, sql: &str) -> String {
    #[derive(QueryableByName)]
    struct T {
        #[diesel(sql_type = Text)]
        t: String,
    }
    diesel::sql_query(sql).get_result::<T>(conn).unwrap().t
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find(|l| l.starts_with("MemTotal")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
        })
        .map_or_else(|| "?".into(), |kb| format!("{} GiB", kb / 1024 / 1024));
    format!("{cpu}, {cores} cores, {mem} (shared and noisy: read ratios, not absolutes)")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed())
}

// ---------------------------------------------------------------- 1

fn startup(server: &Server, sizes: &Sizes, report: &mut String) {
    let set = MigrationSet::example();
    let ours = Migrator::new(set.clone());
    let (ours_db, ours_url) = server.database();
    ours.run_required(&ours_url).unwrap();
    let mut c = PgConnection::establish(&ours_url).unwrap();
    ours.run_deferred_on(&mut c).unwrap();
    let (diesel_db, diesel_url) = server.database();
    PgConnection::establish(&diesel_url)
        .unwrap()
        .run_pending_migrations(set.clone())
        .unwrap();

    let n = sizes.startup_iters;
    let mut rows = Vec::new();
    // On an open connection.
    let mut oc = PgConnection::establish(&ours_url).unwrap();
    let mut dc = PgConnection::establish(&diesel_url).unwrap();
    let floor_open = median(
        (0..n)
            .map(|_| time(|| oc.batch_execute("SELECT 1").unwrap()).1)
            .collect(),
    );
    let ours_open = median(
        (0..n)
            .map(|_| time(|| ours.run_required_on(&mut oc).unwrap()).1)
            .collect(),
    );
    let diesel_open = median(
        (0..n)
            .map(|_| time(|| dc.run_pending_migrations(set.clone()).unwrap()).1)
            .collect(),
    );
    let (_, ours_open_stmts) =
        server.statements(&ours_db, || ours.run_required_on(&mut oc).unwrap());
    let (_, diesel_open_stmts) = server.statements(&diesel_db, || {
        dc.run_pending_migrations(set.clone()).unwrap()
    });
    let (_, floor_stmts) = server.statements(&ours_db, || oc.batch_execute("SELECT 1").unwrap());
    rows.push(("`SELECT 1` (floor)", floor_open, floor_stmts));
    rows.push((
        "diesel_migrations `run_pending_migrations`",
        diesel_open,
        diesel_open_stmts,
    ));
    rows.push((
        "diesel-rollout `run_required_on`",
        ours_open,
        ours_open_stmts,
    ));

    // Connecting included, as a replica starts.
    let floor_cold = median(
        (0..n)
            .map(|_| {
                time(|| {
                    PgConnection::establish(&ours_url)
                        .unwrap()
                        .batch_execute("SELECT 1")
                        .unwrap()
                })
                .1
            })
            .collect(),
    );
    let ours_cold = median(
        (0..n)
            .map(|_| time(|| ours.run_required(&ours_url).unwrap()).1)
            .collect(),
    );
    let diesel_cold = median(
        (0..n)
            .map(|_| {
                time(|| {
                    PgConnection::establish(&diesel_url)
                        .unwrap()
                        .run_pending_migrations(set.clone())
                        .unwrap()
                        .len()
                })
                .1
            })
            .collect(),
    );
    let (_, ours_cold_stmts) =
        server.statements(&ours_db, || ours.run_required(&ours_url).unwrap());
    let (_, diesel_cold_stmts) = server.statements(&diesel_db, || {
        PgConnection::establish(&diesel_url)
            .unwrap()
            .run_pending_migrations(set.clone())
            .unwrap()
            .len()
    });
    let (_, floor_cold_stmts) = server.statements(&ours_db, || {
        PgConnection::establish(&ours_url)
            .unwrap()
            .batch_execute("SELECT 1")
            .unwrap()
    });

    writeln!(
        report,
        "## 1. Start-up when nothing is pending\n\nThe cost every replica pays on every restart, \
         with the example set ({} migrations) applied. Median of {n} runs; statements counted \
         with `pg_stat_statements` (`track = top`, utility statements included).\n",
        set.migrations().len()
    )
    .unwrap();
    writeln!(
        report,
        "| on an open connection | time | vs diesel_migrations | statements |\n|---|---|---|---|"
    )
    .unwrap();
    for (what, d, stmts) in &rows {
        writeln!(
            report,
            "| {what} | {} | {:.2}× | {stmts} |",
            us(*d),
            d.as_secs_f64() / diesel_open.as_secs_f64()
        )
        .unwrap();
    }
    writeln!(
        report,
        "\n| connecting included | time | vs diesel_migrations | statements |\n|---|---|---|---|"
    )
    .unwrap();
    for (what, d, stmts) in [
        ("connect + `SELECT 1` (floor)", floor_cold, floor_cold_stmts),
        (
            "connect + diesel_migrations",
            diesel_cold,
            diesel_cold_stmts,
        ),
        (
            "diesel-rollout `run_required(url)`",
            ours_cold,
            ours_cold_stmts,
        ),
    ] {
        writeln!(
            report,
            "| {what} | {} | {:.2}× | {stmts} |",
            us(d),
            d.as_secs_f64() / diesel_cold.as_secs_f64()
        )
        .unwrap();
    }
    writeln!(
        report,
        "\ndiesel's harness runs `CREATE TABLE IF NOT EXISTS __diesel_schema_migrations` and reads \
         the versions on every call; diesel-rollout's fast path is one query (the applied \
         versions and the checksum each was applied with) and takes no lock. Connecting, \
         diesel runs two `SET`s of its own for both; `run_required` passes its \
         `application_name` in the connection URL (no extra round trip) so waiting replicas \
         can name the holder.\n"
    )
    .unwrap();
    server.drop_database(&ours_db);
    server.drop_database(&diesel_db);
}

// ---------------------------------------------------------------- 2

fn write_file(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
}

fn many_dir(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 1..=n {
        write_file(
            &dir.path().join(format!("migrations/{i:05}_table_{i}/up.sql")),
            &format!("CREATE TABLE t_{i} (id INT PRIMARY KEY, v TEXT);\nINSERT INTO t_{i} VALUES (1, 'x');\n"),
        );
        write_file(
            &dir.path()
                .join(format!("migrations/{i:05}_table_{i}/down.sql")),
            &format!("DROP TABLE t_{i};\n"),
        );
    }
    std::fs::create_dir_all(dir.path().join("migrations_deferred")).unwrap();
    dir
}

fn many(server: &Server, sizes: &Sizes, report: &mut String) {
    let n = sizes.many;
    let dir = many_dir(n);
    let set = MigrationSet::from_dirs(
        &dir.path().join("migrations"),
        &dir.path().join("migrations_deferred"),
    )
    .unwrap();
    let ours = Migrator::new(set);
    let (mut ours_t, mut diesel_t) = (Vec::new(), Vec::new());
    let (mut ours_s, mut diesel_s) = (0, 0);
    for _ in 0..sizes.many_runs {
        let (db, url) = server.database();
        let ((_, t), s) = server.statements(&db, || time(|| ours.run_required(&url).unwrap()));
        ours_t.push(t);
        ours_s = s;
        if std::env::var_os("BENCH_PROFILE").is_some() {
            profile(server, &db);
        }
        server.drop_database(&db);

        let (db, url) = server.database();
        let files = FileBasedMigrations::from_path(dir.path().join("migrations")).unwrap();
        let ((_, t), s) = server.statements(&db, || {
            time(|| {
                PgConnection::establish(&url)
                    .unwrap()
                    .run_pending_migrations(files)
                    .unwrap()
                    .len()
            })
        });
        diesel_t.push(t);
        diesel_s = s;
        server.drop_database(&db);
    }
    let (o, d) = (median(ours_t), median(diesel_t));
    writeln!(
        report,
        "## 2. Applying {n} small migrations from empty\n\nEach creates a table and inserts a \
         row. Median of {} runs.\n\n| harness | total | per migration | vs diesel_migrations | \
         statements per migration |\n|---|---|---|---|---|",
        sizes.many_runs
    )
    .unwrap();
    for (what, t, s) in [
        ("diesel_migrations", d, diesel_s),
        ("diesel-rollout", o, ours_s),
    ] {
        writeln!(
            report,
            "| {what} | {} | {} | {:.2}× | {:.1} |",
            ms(t),
            us(t / n as u32),
            t.as_secs_f64() / d.as_secs_f64(),
            s as f64 / n as f64
        )
        .unwrap();
    }
    writeln!(
        report,
        "\ndiesel-rollout sends each statement of a migration on its own (to name the failing \
         line) and writes the version row and an attempt row in one statement, inside the \
         migration's transaction; diesel sends the file in one batch and writes the version \
         row. Runs of this section vary by ±20% on this machine.\n"
    )
    .unwrap();
}

/// The statements that took the most server time in `database` (to see
/// where a harness spends it): set BENCH_PROFILE=1.
fn profile(server: &Server, database: &str) {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        q: String,
        #[diesel(sql_type = BigInt)]
        calls: i64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        ms: f64,
    }
    let rows: Vec<Row> = diesel::sql_query(format!(
        "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90) AS q, calls, total_exec_time + total_plan_time AS ms \
         FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = '{database}') \
         ORDER BY ms DESC LIMIT 12"
    ))
    .load(&mut server.admin_conn())
    .unwrap();
    for r in rows {
        eprintln!("{:>8.2} ms {:>6} calls  {}", r.ms, r.calls, r.q);
    }
}

// ---------------------------------------------------------------- 3

/// Child mode: apply one harness to `url` and exit (0 ok, 1 failed).
fn child(which: &str, url: &str, dir: &Path) -> i32 {
    let result = match which {
        "ours" => {
            let set =
                MigrationSet::from_dirs(&dir.join("migrations"), &dir.join("migrations_deferred"));
            set.map_err(|e| e.to_string()).and_then(|set| {
                Migrator::new(set)
                    .run_required(url)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        }
        _ => PgConnection::establish(url)
            .map_err(|e| e.to_string())
            .and_then(|mut c| {
                let files = FileBasedMigrations::from_path(dir.join("migrations"))
                    .map_err(|e| e.to_string())?;
                c.run_pending_migrations(files)
                    .map(drop)
                    .map_err(|e| e.to_string())
            }),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{which}: {e}");
            1
        }
    }
}

fn stampede(server: &Server, sizes: &Sizes, report: &mut String) {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        &dir.path().join("migrations/0001_create_effects/up.sql"),
        "CREATE TABLE effects (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, version TEXT NOT NULL);\n",
    );
    std::fs::create_dir_all(dir.path().join("migrations_deferred")).unwrap();
    let slow = dir.path().join("migrations/0002_slow/up.sql");
    let exe = std::env::current_exe().unwrap();
    let n = sizes.stampede;
    writeln!(
        report,
        "## 3. Stampede: {n} processes start at once\n\nTime until every process is ready \
         (exited), median of {} runs; how many applied the pending migration (a `pg_sleep(2)` \
         and an insert), and how many failed.\n\n| case | harness | all ready after | applied \
         it | failed |\n|---|---|---|---|---|",
        sizes.stampede_runs
    )
    .unwrap();
    for pending in [false, true] {
        for which in ["diesel", "ours"] {
            let mut times = Vec::new();
            let (mut applied, mut failed) = (0, 0);
            for _ in 0..sizes.stampede_runs {
                let (db, url) = server.database();
                let _ = std::fs::remove_dir_all(slow.parent().unwrap());
                // Everything applied first, by the harness under test.
                assert_eq!(child(which, &url, dir.path()), 0);
                write_file(
                    &slow,
                    "SELECT pg_sleep(2);\nINSERT INTO effects (version) VALUES ('0002');\n",
                );
                if !pending {
                    assert_eq!(child(which, &url, dir.path()), 0);
                }
                let start = Instant::now();
                let children: Vec<_> = (0..n)
                    .map(|_| {
                        Command::new(&exe)
                            .args(["--child", which, &url])
                            .arg(dir.path())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .unwrap()
                    })
                    .collect();
                let mut fails = 0;
                for mut c in children {
                    if !c.wait().unwrap().success() {
                        fails += 1;
                    }
                }
                times.push(start.elapsed());
                let mut conn = PgConnection::establish(&url).unwrap();
                applied = scalar_i64(
                    &mut conn,
                    "SELECT count(*) AS n FROM effects WHERE version = '0002'",
                ) - i64::from(!pending);
                failed = fails;
                drop(conn);
                server.drop_database(&db);
            }
            writeln!(
                report,
                "| {} | {} | {} | {} | {failed} |",
                if pending {
                    "one pending (~2 s)"
                } else {
                    "nothing pending"
                },
                if which == "ours" {
                    "diesel-rollout"
                } else {
                    "diesel_migrations"
                },
                ms(median(times)),
                if pending {
                    applied.to_string()
                } else {
                    "-".into()
                },
            )
            .unwrap();
        }
    }
    writeln!(
        report,
        "\ndiesel_migrations takes no lock: with a migration pending, several processes apply \
         it at once (the side effect happens more than once) and the ones that lose the race \
         on the version row fail. diesel-rollout's processes wait on the advisory lock without \
         holding a snapshot, one applies, the rest find nothing to do.\n"
    )
    .unwrap();
}

// ---------------------------------------------------------------- 4

struct Sample {
    at: f64,
    latency: f64,
}

fn traffic(server: &Server, sizes: &Sizes, report: &mut String, png: Option<&Path>) {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        &dir.path().join("migrations/0001_create_events/up.sql"),
        "CREATE TABLE events (\n    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n    \
         account_id INT NOT NULL,\n    kind INT NOT NULL,\n    payload TEXT NOT NULL,\n    \
         created_at TIMESTAMPTZ NOT NULL DEFAULT now()\n);\n",
    );
    let index = "events (account_id, created_at)";
    write_file(
        &dir.path()
            .join("deferred/migrations/0001_create_events/up.sql"),
        &std::fs::read_to_string(dir.path().join("migrations/0001_create_events/up.sql")).unwrap(),
    );
    write_file(
        &dir.path()
            .join("deferred/migrations_deferred/0002_index_events/up.sql"),
        &format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS events_account_created_idx ON {index};\n"
        ),
    );
    write_file(
        &dir.path()
            .join("deferred/migrations_deferred/0002_index_events/metadata.toml"),
        "run_in_transaction = false\n",
    );
    write_file(
        &dir.path()
            .join("required/migrations/0001_create_events/up.sql"),
        &std::fs::read_to_string(dir.path().join("migrations/0001_create_events/up.sql")).unwrap(),
    );
    write_file(
        &dir.path()
            .join("required/migrations/0002_index_events/up.sql"),
        &format!("CREATE INDEX events_account_created_idx ON {index};\n"),
    );
    std::fs::create_dir_all(dir.path().join("required/migrations_deferred")).unwrap();

    let mut results = Vec::new();
    for (label, sub) in [
        (
            "deferred `CREATE INDEX CONCURRENTLY` (diesel-rollout)",
            "deferred",
        ),
        ("plain `CREATE INDEX` in a required migration", "required"),
    ] {
        let (db, url) = server.database();
        let base = dir.path().join(sub);
        let set =
            MigrationSet::from_dirs(&base.join("migrations"), &base.join("migrations_deferred"))
                .unwrap();
        let m = Migrator::new(set)
            .required_statement_timeout(Duration::ZERO)
            .deferred_progress_interval(Duration::from_secs(1));
        // The table exists and is filled before the release that adds the index.
        let first = MigrationSet::from_dirs(
            &dir.path().join("migrations"),
            &dir.path().join("migrations_deferred_none"),
        )
        .unwrap();
        Migrator::new(first).run_required(&url).unwrap();
        let mut fill = PgConnection::establish(&url).unwrap();
        fill.batch_execute(&format!(
            "INSERT INTO events (account_id, kind, payload) \
             SELECT g % 10000, g % 7, md5(g::text) FROM generate_series(1, {}) AS g",
            sizes.rows
        ))
        .unwrap();
        // On its own: VACUUM cannot run in the implicit transaction of a batch.
        fill.batch_execute("VACUUM ANALYZE events").unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let writers: Vec<_> = (0..sizes.writers)
            .map(|w| {
                let (url, stop) = (url.clone(), Arc::clone(&stop));
                let rows = sizes.rows;
                std::thread::spawn(move || {
                    let mut c = PgConnection::establish(&url).unwrap();
                    let mut out = Vec::new();
                    let mut i: i64 = w as i64;
                    while !stop.load(Ordering::SeqCst) {
                        i += 7919;
                        let s = Instant::now();
                        let sql = if i % 2 == 0 {
                            format!(
                                "INSERT INTO events (account_id, kind, payload) VALUES ({}, 1, 'x')",
                                i % 10000
                            )
                        } else {
                            format!("UPDATE events SET kind = kind + 1 WHERE id = {}", i % rows + 1)
                        };
                        c.batch_execute(&sql).unwrap();
                        out.push(Sample {
                            at: t0.elapsed().as_secs_f64(),
                            latency: s.elapsed().as_secs_f64(),
                        });
                    }
                    out
                })
            })
            .collect();
        // Steady traffic first.
        std::thread::sleep(Duration::from_secs(2));
        let start = t0.elapsed().as_secs_f64();
        let pool = Pool::builder()
            .max_size(3)
            .build(ConnectionManager::<PgConnection>::new(&url))
            .unwrap();
        let begin = Instant::now();
        let (ready, built) = if sub == "deferred" {
            let (_, handle) = m.run(&pool).unwrap();
            let ready = begin.elapsed();
            let end = handle.wait(Duration::from_secs(3600));
            assert!(matches!(end, DeferredState::Done { .. }), "{end:?}");
            (ready, begin.elapsed())
        } else {
            m.run_required(&url).unwrap();
            (begin.elapsed(), begin.elapsed())
        };
        let end = t0.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::SeqCst);
        let samples: Vec<Sample> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        let during: Vec<f64> = samples
            .iter()
            .filter(|s| s.at >= start && s.at <= end)
            .map(|s| s.latency)
            .collect();
        let before = samples.iter().filter(|s| s.at < start).count() as f64 / start;
        results.push((
            label,
            ready,
            built,
            during,
            before,
            end - start,
            samples,
            start,
        ));
        server.drop_database(&db);
    }

    writeln!(
        report,
        "## 4. Traffic during an index build (the headline)\n\nA table of {} rows; {} \
         connections write to it without pause (alternating single-row `INSERT` and `UPDATE`) \
         while a new release adds the index `{index}`, either as a deferred `CREATE INDEX \
         CONCURRENTLY` through this harness or as a plain `CREATE INDEX` in a required \
         migration. \"Ready\" is when the replica's start-up call returns.\n\n| build | ready \
         after | index built after | write p50 | write p99 | write max | writes/s during build \
         | writes/s before |\n|---|---|---|---|---|---|---|---|",
        sizes.rows, sizes.writers
    )
    .unwrap();
    for (label, ready, built, during, before, window, _, _) in &results {
        let mut d = during.clone();
        d.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| {
            d.get(((d.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        writeln!(
            report,
            "| {label} | {} | {} | {:.2} ms | {:.2} ms | {:.0} ms | {:.0} | {:.0} |",
            ms(*ready),
            ms(*built),
            pct(0.5) * 1e3,
            pct(0.99) * 1e3,
            d.last().copied().unwrap_or(0.0) * 1e3,
            d.len() as f64 / window.max(1e-9),
            before
        )
        .unwrap();
    }
    if let Some(png) = png {
        plot(png, &results);
        writeln!(
            report,
            "\n![Write latency during the build](docs/bench-index-build.png)\n\nWrite latency \
             over time, both builds on one plot: each point is the longest any write had been \
             waiting in that 100 ms; time 0 is when the release starts.\n"
        )
        .unwrap();
    }
    writeln!(
        report,
        "\nA plain `CREATE INDEX` holds a SHARE lock for the whole build: every write waits for \
         it, the replica is not ready until it ends. The deferred build lets writes through; \
         the replica is ready at once and the index arrives later. The concurrent build \
         shows one spike of a few hundred milliseconds near its end; its cause is not \
         pinned down here (two cores shared by the build, the writers and the server), and \
         stays an open question.\n"
    )
    .unwrap();
}

type Result4<'a> = (
    &'a str,
    Duration,
    Duration,
    Vec<f64>,
    f64,
    f64,
    Vec<Sample>,
    f64,
);

fn plot(png: &Path, results: &[Result4<'_>]) {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .expect("DejaVuSans.ttf (Debian: fonts-dejavu-core) to label the plot");
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| "font")
        .unwrap();
    std::fs::create_dir_all(png.parent().unwrap()).unwrap();
    let series: Vec<(String, Vec<(f64, f64)>)> = results
        .iter()
        .map(|(label, _, _, _, _, _, samples, start)| {
            // Each 100 ms bucket shows the longest a write had been waiting
            // by the end of the bucket (or when it finished): a write
            // blocked for a second climbs through ten buckets instead of
            // appearing only when it completes.
            let mut buckets: std::collections::BTreeMap<i64, f64> = Default::default();
            for s in samples {
                let (begin, end) = (s.at - s.latency - start, s.at - start);
                let mut b = (begin * 10.0).floor() as i64;
                while (b as f64) / 10.0 < end {
                    let bucket_end = (b + 1) as f64 / 10.0;
                    let waited = (end.min(bucket_end) - begin) * 1e3;
                    let e = buckets.entry(b).or_insert(0.0);
                    *e = e.max(waited);
                    b += 1;
                }
            }
            (
                label.replace('`', ""),
                buckets
                    .into_iter()
                    .map(|(b, v)| (b as f64 / 10.0, v))
                    .collect(),
            )
        })
        .collect();
    let xmax = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let root = BitMapBackend::new(png, (1200, 600)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let mut chart = ChartBuilder::on(&root)
        .caption("Write latency while the index is built", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-2.0..xmax, (0.1..ymax * 1.5).log_scale())
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("seconds since the release started")
        .y_desc("longest write wait in each 100 ms (ms, log)")
        .label_style(("sans-serif", 14))
        .draw()
        .unwrap();
    for (i, (label, points)) in series.iter().enumerate() {
        let color = if i == 0 { BLUE } else { RED };
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1.max(0.1))),
                color.stroke_width(2),
            ))
            .unwrap()
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .unwrap();
    root.present().unwrap();
}

// ---------------------------------------------------------------- 5

fn build_cost(sizes: &Sizes, report: &mut String) {
    let n = sizes.build_migrations;
    if n == 0 {
        writeln!(report, "## 5. Build cost\n\nSkipped at this size.\n").unwrap();
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = root.join("target/bench-build");
    let target = work.join("target");
    let dep = format!(
        "{{ path = {:?}, default-features = false",
        root.to_string_lossy()
    );
    let crates = [
        (
            "diesel-rollout (`embed` in build.rs)",
            "ours",
            format!(
                "[dependencies]\ndiesel-rollout = {dep}, features = [\"runtime\"] }}\n\n\
                 [build-dependencies]\ndiesel-rollout = {dep} }}\n"
            ),
            "fn main() {\n    diesel_rollout::embed(\"migrations\", \"migrations_deferred\");\n}\n",
            "static M: diesel_rollout::MigrationSet = diesel_rollout::include_migrations!();\n\
             fn main() { print!(\"{}\", M.migrations().len()) }\n",
        ),
        (
            "diesel_migrations (`embed_migrations!`)",
            "diesel",
            "[dependencies]\ndiesel = { version = \"2.3\", default-features = false, features = [\"postgres\"] }\n\
             diesel_migrations = { version = \"2.3\", default-features = false, features = [\"postgres\"] }\n"
                .to_string(),
            "",
            "use diesel::migration::MigrationSource;\n\
             use diesel_migrations::{embed_migrations, EmbeddedMigrations};\n\
             const M: EmbeddedMigrations = embed_migrations!(\"migrations\");\n\
             fn main() { print!(\"{}\", MigrationSource::<diesel::pg::Pg>::migrations(&M).unwrap().len()) }\n",
        ),
    ];
    writeln!(
        report,
        "## 5. Build cost of {n} embedded migrations\n\nA crate embedding {n} migrations, \
         release profile, dependencies already built: \"build\" is `cargo build` of the crate \
         itself after its code and migrations changed. \"Rebuild\" is whether adding one \
         migration directory, and nothing else, makes `cargo build` embed it.\n\n| harness | \
         build | binary size | add one migration: rebuild | embedded after adding |\n|---|---|---|---|---|"
    )
    .unwrap();
    for (label, name, deps, build_rs, main_rs) in crates {
        let dir = work.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        write_file(
            &dir.join("Cargo.toml"),
            &format!("[package]\nname = \"bench_{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n{deps}\n[workspace]\n"),
        );
        std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
        if !build_rs.is_empty() {
            write_file(&dir.join("build.rs"), build_rs);
        }
        write_file(&dir.join("src/main.rs"), main_rs);
        std::fs::create_dir_all(dir.join("migrations_deferred")).unwrap();
        let add = |i: usize| {
            write_file(
                &dir.join(format!(
                    "migrations/{:014}_m{i}/up.sql",
                    20240101000000u64 + i as u64
                )),
                &format!("CREATE TABLE t_{i} (id INT PRIMARY KEY);\n"),
            );
        };
        add(1);
        let cargo = || {
            let mut c = Command::new(env!("CARGO"));
            c.args(["build", "--release", "--quiet", "--offline"])
                .current_dir(&dir)
                .env("CARGO_TARGET_DIR", &target);
            c
        };
        // Dependencies first, so the timing below is the crate alone.
        assert!(cargo().status().unwrap().success());
        for i in 2..=n {
            add(i);
        }
        // Touch the code too, so both harnesses rebuild the crate here.
        write_file(&dir.join("src/main.rs"), &format!("{main_rs}// {n}\n"));
        let (status, built) = time(|| cargo().status().unwrap());
        assert!(status.success());
        let bin = target.join(format!("release/bench_{name}"));
        let size = std::fs::metadata(&bin).unwrap().len();
        let count = |bin: &Path| {
            let out = Command::new(bin).output().unwrap();
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
        };
        let before = count(&bin);
        assert_eq!(before, n, "{label}: embedded {before} of {n}");
        add(n + 1);
        let (_, rebuilt) = time(|| cargo().status().unwrap());
        let after = count(&bin);
        writeln!(
            report,
            "| {label} | {} | {:.1} MiB | {} ({}) | {after} of {} |",
            ms(built),
            size as f64 / 1048576.0,
            if after == n + 1 { "yes" } else { "**no**" },
            ms(rebuilt),
            n + 1
        )
        .unwrap();
    }
    writeln!(
        report,
        "\n`embed_migrations!` reads the directory at macro expansion and tells cargo about no \
         new directory, so a migration added without touching Rust code is not embedded until \
         something else forces a rebuild; diesel-rollout's `embed` prints \
         `cargo:rerun-if-changed` for both folders and every file.\n"
    )
    .unwrap();
}
