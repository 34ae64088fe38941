//! Reverting the newest migrations of a realistic history that is all
//! applied: diesel_migrations' `revert_last_migration` once per migration
//! (what `diesel migration revert -n N` does) against one
//! `Migrator::revert`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use diesel::prelude::*;
use diesel_migrations::MigrationHarness;
use diesel_rollout::{MigrationSet, Migrator, RevertTarget};

use crate::harness::*;
use crate::history::generated;

/// Returns diesel-rollout's time ÷ diesel_migrations' (the median runs),
/// reverting the newest tenth and the newest one.
pub(crate) fn revert(server: &Server, sizes: &Sizes, report: &mut String) -> (f64, f64) {
    let n = sizes.history;
    let count = (n / 10).max(2);
    let dir = tempfile::tempdir().unwrap();
    let required = dir.path().join("migrations");
    generated::write_with(&required, n, false);
    let stubbed = stub_missing_downs(&required, count);
    let deferred = dir.path().join("migrations_deferred");
    std::fs::create_dir_all(&deferred).unwrap();
    let ours = Migrator::new(MigrationSet::from_dirs(&required, &deferred).unwrap());
    // diesel's harness gets the set in memory (it is a `MigrationSource`),
    // so it does not read the directory again for each revert.
    let set = ours.migrations().clone();
    // The newest one (`diesel migration revert`'s default, the everyday
    // case, where fixed costs show), with more runs; then the newest tenth.
    let one = measure(server, &ours, &set, n, 1, sizes.many_runs * 3);
    let (diesel, ours_m) = measure(server, &ours, &set, n, count, sizes.many_runs);
    let (o, d) = (ours_m.0, diesel.0);
    writeln!(
        report,
        "## 8. Reverting the newest {count} of {n} applied migrations\n\nThe history of §3, \
         all applied; then the newest {count} reverted with their `down.sql`: \
         diesel_migrations' `revert_last_migration` called {count} times (as `diesel \
         migration revert -n {count}` does) with the migrations in memory, diesel-rollout's \
         `revert` once, on an open connection. {stubbed} of them had no `down.sql` or a comment-only one in the generated \
         history (diesel's harness fails that with \"Received an empty query\"; \
         diesel-rollout refuses it unless `revert_empty_down(true)`) and were given `SELECT 1`. \
         Median of {} runs, the two harnesses alternating.\n\n\
         | harness | total | per migration | vs diesel_migrations | statements per migration |\n\
         |---|---|---|---|---|",
        sizes.many_runs
    )
    .unwrap();
    both_rows(report, diesel, ours_m, count);
    writeln!(
        report,
        "\nThe newest one alone, median of {} runs:\n\n| harness | total | per migration | vs \
         diesel_migrations | statements per migration |\n|---|---|---|---|---|",
        sizes.many_runs * 3
    )
    .unwrap();
    both_rows(report, one.0, one.1, 1);
    writeln!(
        report,
        "\ndiesel's harness reads every applied version to find the newest each time and \
         runs each `down.sql` in a transaction with its ledger delete, four round trips. \
         diesel-rollout takes its locks and reads what the revert checks once (every applied \
         version, and in full only the versions it reverts and any newer one stopped \
         halfway), then sends each transactional `down.sql` with its ledger rows (the \
         version row deleted, a `down` attempt recorded) in one round trip. Alone, the newest \
         one pays diesel-rollout's fixed costs: finding the ledger tables before and after \
         the lock, both tracks' locks each checked on this backend, marking dead attempts, \
         and setting and restoring the session's timeouts (`BENCH_PROFILE=1` prints the \
         server time of each statement).\n"
    )
    .unwrap();
    (
        o.as_secs_f64() / d.as_secs_f64(),
        one.1 .0.as_secs_f64() / one.0 .0.as_secs_f64(),
    )
}

/// Reverts the newest `count` of `n` applied migrations with each harness,
/// `runs` times in turn, each from a fresh database with all applied; the
/// median (time, statements) of diesel_migrations and of diesel-rollout.
fn measure(
    server: &Server,
    ours: &Migrator,
    set: &MigrationSet,
    n: usize,
    count: usize,
    runs: usize,
) -> ((Duration, i64), (Duration, i64)) {
    let (mut ours_t, mut diesel_t) = (Vec::new(), Vec::new());
    let (mut ours_s, mut diesel_s) = (0, 0);
    for run in 0..runs {
        for which in in_turn(run) {
            let (db, url) = server.database();
            // Both from the same applied state: diesel-rollout's ledger, which
            // diesel's harness reads as its own.
            ours.run_required(&url).unwrap();
            let mut conn = PgConnection::establish(&url).unwrap();
            if which == "ours" {
                let ((report, t), s) = server.statements(&db, || {
                    time(|| ours.revert(&mut conn, RevertTarget::Count(count)).unwrap())
                });
                assert_eq!(report.reverted.len(), count);
                ours_t.push(t);
                ours_s = s;
                if std::env::var_os("BENCH_PROFILE").is_some() && run == 0 {
                    eprintln!("diesel-rollout, reverting {count}, {}:", ms(t));
                    crate::many::profile(server, &db);
                }
            } else {
                let ((_, t), s) = server.statements(&db, || {
                    time(|| {
                        for _ in 0..count {
                            conn.revert_last_migration(set.clone()).unwrap();
                        }
                    })
                });
                diesel_t.push(t);
                diesel_s = s;
            }
            let left = scalar_i64(
                &mut conn,
                "SELECT count(*) AS n FROM __diesel_schema_migrations",
            );
            assert_eq!(left as usize, n - count, "{which} reverted {count}");
            drop(conn);
            server.drop_database(&db);
        }
    }
    ((median(diesel_t), diesel_s), (median(ours_t), ours_s))
}

/// Gives each of the newest `count` migrations whose `down.sql` is missing
/// or comment-only one that runs a no-op statement (diesel's harness fails
/// a comment-only one with "Received an empty query"); returns how many.
fn stub_missing_downs(migrations: &Path, count: usize) -> usize {
    let mut dirs: Vec<_> = std::fs::read_dir(migrations)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    let mut stubbed = 0;
    for d in dirs.iter().rev().take(count) {
        let down = d.join("down.sql");
        let body = std::fs::read_to_string(&down).unwrap_or_default();
        let empty = body
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with("--"));
        if empty {
            write_file(&down, "-- nothing to undo\nSELECT 1;\n");
            stubbed += 1;
        }
    }
    stubbed
}
