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

mod build_cost;
mod harness;
mod history;
mod many;
mod stampede;
mod startup;
mod traffic;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use diesel::connection::SimpleConnection;
use diesel_rollout::cluster::ThrowawayCluster;

use build_cost::build_cost;
use harness::*;
use history::history;
use many::many;
use stampede::{child, stampede};
use startup::startup;
use traffic::traffic;

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
        eprintln!("1/6 start-up with nothing pending");
        startup(&server, &sizes, &mut report);
        flush(&report);
    }
    if run(2) {
        eprintln!("2/6 many migrations from empty");
        many(&server, &sizes, &mut report);
        flush(&report);
    }
    if run(3) {
        eprintln!("3/6 a realistic history from empty");
        history(&server, &sizes, &mut report);
        flush(&report);
    }
    if run(4) {
        eprintln!("4/6 stampede");
        stampede(&server, &sizes, &mut report);
        flush(&report);
    }
    if run(5) {
        eprintln!("5/6 traffic during an index build");
        traffic(&server, &sizes, &mut report, write.then_some(png.as_path()));
        flush(&report);
    }
    if run(6) {
        eprintln!("6/6 build cost");
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
