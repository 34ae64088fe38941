//! What every benchmark shares: sizes, the server, timing and formatting.

use std::path::Path;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_rollout::with_database;

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Size {
    Smoke,
    Quick,
    Full,
}

pub(crate) struct Sizes {
    pub startup_iters: usize,
    pub many: usize,
    pub many_runs: usize,
    pub history: usize,
    pub stampede: usize,
    pub stampede_runs: usize,
    pub rows: i64,
    pub writers: usize,
    pub traffic_runs: usize,
    pub build_migrations: usize,
    pub fleet_targets: usize,
    pub fleet_migrations: usize,
}

impl Size {
    pub(crate) fn sizes(self) -> Sizes {
        match self {
            Size::Smoke => Sizes {
                startup_iters: 5,
                many: 20,
                many_runs: 1,
                history: 24,
                stampede: 4,
                stampede_runs: 1,
                rows: 20_000,
                writers: 2,
                traffic_runs: 1,
                build_migrations: 0,
                fleet_targets: 4,
                fleet_migrations: 5,
            },
            Size::Quick => Sizes {
                startup_iters: 30,
                many: 200,
                many_runs: 3,
                history: 300,
                stampede: 16,
                stampede_runs: 3,
                rows: 500_000,
                writers: 3,
                traffic_runs: 1,
                build_migrations: 200,
                fleet_targets: 50,
                fleet_migrations: 20,
            },
            Size::Full => Sizes {
                startup_iters: 50,
                many: 500,
                many_runs: 3,
                history: 1000,
                stampede: 16,
                stampede_runs: 3,
                rows: 3_000_000,
                writers: 3,
                traffic_runs: 3,
                build_migrations: 1000,
                fleet_targets: 200,
                fleet_migrations: 20,
            },
        }
    }
}

pub(crate) struct Server {
    pub admin: String,
    pub next: std::cell::Cell<u32>,
}

impl Server {
    pub(crate) fn admin_conn(&self) -> PgConnection {
        PgConnection::establish(&self.admin).unwrap()
    }

    /// A fresh database; returns (name, url).
    pub(crate) fn database(&self) -> (String, String) {
        let n = self.next.get();
        self.next.set(n + 1);
        let name = format!("bench_{n}");
        self.admin_conn()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let url = with_database(&self.admin, &name).unwrap();
        (name, url)
    }

    pub(crate) fn drop_database(&self, name: &str) {
        let _ = self
            .admin_conn()
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
    }

    /// Statements the server ran for `database` while `f` ran, from
    /// pg_stat_statements.
    pub(crate) fn statements<T>(&self, database: &str, f: impl FnOnce() -> T) -> (T, i64) {
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

    /// As [`Server::statements`], plus the server time (ms) spent in the
    /// statements whose text starts with one of `own` (the migrations' own
    /// SQL, the same for every harness), so what is left of the wall time
    /// is the harness's.
    pub(crate) fn statements_own_time<T>(
        &self,
        database: &str,
        own: &[&str],
        f: impl FnOnce() -> T,
    ) -> (T, i64, f64) {
        let mut own_ms = 0.0;
        let (out, n) = self.statements(database, || {
            let out = f();
            let like = own
                .iter()
                .map(|p| format!("query LIKE '{p}%'"))
                .collect::<Vec<_>>()
                .join(" OR ");
            own_ms = scalar_f64(
                &mut self.admin_conn(),
                &format!(
                    "SELECT coalesce(sum(total_exec_time + total_plan_time), 0)::float8 AS x \
                     FROM pg_stat_statements \
                     WHERE dbid = (SELECT oid FROM pg_database WHERE datname = '{database}') \
                     AND ({like})"
                ),
            );
            out
        });
        (out, n, own_ms)
    }
}

/// Which harness goes first in run `run`: they take turns, so drift on a
/// shared machine (and whatever follows creating a database) evens out.
pub(crate) fn in_turn(run: usize) -> [&'static str; 2] {
    if run % 2 == 0 {
        ["ours", "diesel"]
    } else {
        ["diesel", "ours"]
    }
}

pub(crate) fn scalar_i64(conn: &mut PgConnection, sql: &str) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    diesel::sql_query(sql).get_result::<N>(conn).unwrap().n
}

pub(crate) fn scalar_f64(conn: &mut PgConnection, sql: &str) -> f64 {
    #[derive(QueryableByName)]
    struct X {
        #[diesel(sql_type = diesel::sql_types::Double)]
        x: f64,
    }
    diesel::sql_query(sql).get_result::<X>(conn).unwrap().x
}

pub(crate) fn scalar_text(conn: &mut PgConnection, sql: &str) -> String {
    #[derive(QueryableByName)]
    struct T {
        #[diesel(sql_type = Text)]
        t: String,
    }
    diesel::sql_query(sql).get_result::<T>(conn).unwrap().t
}

pub(crate) fn machine() -> String {
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

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub(crate) fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Calls of each closure per round in [`interleaved`].
pub(crate) const BURST: usize = 5;

/// Runs each of `runs` [`BURST`] times per round, in turn, for `rounds`
/// rounds (after one warm-up call each); the median call of each.
pub(crate) fn interleaved<const N: usize>(
    rounds: usize,
    runs: &mut [&mut dyn FnMut(); N],
) -> [Duration; N] {
    for r in runs.iter_mut() {
        r();
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds * BURST); N];
    for _ in 0..rounds {
        for (i, r) in runs.iter_mut().enumerate() {
            // A short burst each, so every one runs with its server backend
            // awake (which one had to wake up otherwise decided the result).
            for _ in 0..BURST {
                times[i].push(time(&mut *r).1);
            }
        }
    }
    let mut out = [Duration::ZERO; N];
    for (o, t) in out.iter_mut().zip(times) {
        *o = median(t);
    }
    out
}

pub(crate) fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed())
}

pub(crate) fn write_file(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
}

/// The two rows of a "harness | total | per migration | vs
/// diesel_migrations | statements per migration" table: diesel's and ours,
/// each (total time, statements), over `n` migrations.
pub(crate) fn both_rows(
    report: &mut String,
    diesel: (Duration, i64),
    ours: (Duration, i64),
    n: usize,
) {
    use std::fmt::Write as _;
    for (what, (t, s)) in [("diesel_migrations", diesel), ("diesel-rollout", ours)] {
        writeln!(
            report,
            "| {what} | {} | {} | {:.2}× | {:.1} |",
            ms(t),
            us(t / n as u32),
            t.as_secs_f64() / diesel.0.as_secs_f64(),
            s as f64 / n as f64
        )
        .unwrap();
    }
}
