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
mod fleet;
mod harness;
mod history;
mod many;
mod revert;
mod stampede;
mod startup;
mod traffic;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use diesel::connection::SimpleConnection;
use diesel_rollout::cluster::ThrowawayCluster;

use build_cost::build_cost;
use fleet::fleet;
use harness::*;
use history::history;
use many::many;
use revert::revert;
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
    let mut many_ratio = None;
    if run(1) {
        eprintln!("1/8 start-up with nothing pending");
        startup(&server, &sizes, &mut report);
        flush(&report);
    }
    if run(2) {
        eprintln!("2/8 many migrations from empty");
        many_ratio = Some(many(&server, &sizes, &mut report));
        flush(&report);
    }
    let mut history_ratio = None;
    if run(3) {
        eprintln!("3/8 a realistic history from empty");
        history_ratio = Some(history(&server, &sizes, &mut report));
        flush(&report);
    }
    if run(4) {
        eprintln!("4/8 stampede");
        stampede(&server, &sizes, &mut report);
        flush(&report);
    }
    let mut headline = None;
    if run(5) {
        eprintln!("5/8 traffic during an index build");
        headline = Some(traffic(
            &server,
            &sizes,
            &mut report,
            write.then_some(png.as_path()),
        ));
        flush(&report);
    }
    if run(6) {
        eprintln!("6/8 build cost");
        build_cost(&sizes, &mut report);
        flush(&report);
    }
    if run(7) {
        eprintln!("7/8 one release on many databases");
        fleet(&server, &sizes, &mut report);
        flush(&report);
    }
    let mut revert_ratio = None;
    if run(8) {
        eprintln!("8/8 reverting the newest migrations");
        revert_ratio = Some(revert(&server, &sizes, &mut report));
        flush(&report);
    }

    if only.is_none() {
        writeln!(
            report,
            "## Where diesel-rollout loses, and why\n\n\
             Read the ratios in the tables above; on this shared two-core machine a row can \
             move by tens of percent between runs.\n\n\
             - **A start with nothing pending (§1): not a loss.** diesel-rollout sends one \
             query (the applied versions and the checksum each was applied with, from \
             diesel's own table, as a statement prepared once per connection); diesel's \
             harness sends two (`CREATE TABLE IF NOT EXISTS`, then the versions). Over TCP to \
             a separate server that is one round trip against two. The open-connection rows \
             share one connection, so the backend's placement on the two cores does not \
             decide the ratio."
        )
        .unwrap();
        if let Some((total, harness)) = many_ratio {
            writeln!(
                report,
                "- **Many small migrations (§2): {}.** The whole run took {total:.2}× \
                 diesel_migrations' time here, and the harness's own part of it {harness:.2}×. \
                 Each migration is a `CREATE TABLE` and an `INSERT`, whose server time swings by \
                 ±20% between runs and decides the totals; diesel-rollout sends each migration \
                 in one round trip against diesel's four, and pays for an attempt row and a \
                 ledger statement planned each time (diesel prepares its insert once; \
                 `BENCH_PROFILE=1` prints the server time of each statement).",
                if harness <= 1.0 {
                    "not a loss in what the harness adds"
                } else {
                    "a loss"
                }
            )
            .unwrap();
        }
        if let Some(h) = headline {
            writeln!(
                report,
                "- **Index builds cost writers (§5).** p99 during the deferred build is \
                 {:.1}× the idle p99 (its runs {:.1}× to {:.1}×; the idle p99 itself moves \
                 between runs on this shared machine), {} the 3× goal. The floor row, one \
                 backend that only \
                 reads the table for as long and builds nothing, costs the same writers \
                 {:.1}×: three writers and their backends already keep both cores busy, and \
                 one more busy backend takes its share of them. The deferred build is at \
                 {:.2}× the floor; the bare build with the server's 2 parallel workers at \
                 {:.2}×, which is why the deferred session builds without parallel workers \
                 (`deferred_parallel_workers`, default `Some(0)`), paying with a longer build. \
                 The per-phase table shows the cost in every phase of the build, not in one. \
                 The slowest write of a build comes during `index validation: scanning \
                 index`, while the validation's sort spills to disk (the build in \
                 `BufFileWrite`, writers on `LWLock:BufferContent`): {:.0} ms for the deferred \
                 build, {:.0} ms bare (medians of the runs). With \
                 `deferred_maintenance_work_mem(Some(1024))` the sort fits in memory and the \
                 slowest write was {:.0} ms, its p99 ratio {:.1}×; it is off by default, since \
                 each build may then use that much memory.",
                h.deferred,
                h.deferred_spread.0,
                h.deferred_spread.1,
                if h.deferred <= 3.0 {
                    "at or below"
                } else {
                    "above"
                },
                h.floor,
                h.deferred / h.floor.max(1e-9),
                h.bare / h.floor.max(1e-9),
                h.max_deferred,
                h.max_bare,
                h.max_mwm,
                h.deferred_mwm,
            )
            .unwrap();
        }
        writeln!(
            report,
            "- **No-transaction migrations take more round trips.** diesel sends such a file \
             as one batch (an implicit transaction, which PostgreSQL refuses for `CREATE \
             INDEX CONCURRENTLY` with anything else in it); diesel-rollout runs it statement \
             by statement, recording an attempt and sending each statement with its progress \
             (the last one with the version row) in one round trip, one transaction, so no \
             statement is ever done but unrecorded; a statement that cannot run in a \
             transaction (an index build) goes alone, its progress after it, with a one-row \
             catalog question before (is any index of the table invalid?) and after (is this \
             one valid?), the full look at the table's indexes only when one is not valid. \
             (Asked with the full look each time, whose plan alone took about 0.5 ms, the \
             history of §3 was 1.10× diesel's.) In §3's history, 8% of the migrations are of \
             that kind{}.\n",
            history_ratio.map_or(String::new(), |r| format!(
                ", and the whole history took {r:.2}× diesel_migrations' time in this run"
            ))
        )
        .unwrap();
        if let Some((tenth, one)) = revert_ratio {
            writeln!(
                report,
                "- **Reverting (§8): {}.** Reverting the newest tenth of §3's history took \
                 {tenth:.2}× diesel_migrations' time, the newest one alone {one:.2}×: one \
                 revert pays the fixed costs diesel-rollout takes once for any number (the \
                 ledger tables found before and after the lock, both tracks' locks each \
                 checked on this backend, dead attempts marked, the session's timeouts set and \
                 restored: 17 statements against diesel's 6).\n",
                if tenth <= 1.0 && one <= 1.0 {
                    "not a loss"
                } else if tenth <= 1.0 {
                    "a loss for one migration"
                } else {
                    "a loss"
                }
            )
            .unwrap();
        }
        flush(&report);
    }
    if write {
        std::fs::write(root.join("BENCHMARKS.md"), &report).unwrap();
        eprintln!("wrote BENCHMARKS.md and {}", png.display());
    }
}
