//! Applying a realistic history: a generated diesel history in the shapes
//! real projects have (tables, columns and indexes, functions, triggers,
//! `DO` blocks, enum changes, views, check constraints, data fixes,
//! no-transaction index builds), from empty, both harnesses.

use std::fmt::Write as _;

use diesel::prelude::*;
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use diesel_rollout::{MigrationSet, Migrator};

use crate::harness::*;

#[path = "../../tests/support/history.rs"]
#[allow(dead_code)]
pub(crate) mod generated;

/// Returns diesel-rollout's total ÷ diesel_migrations' (the median runs).
pub(crate) fn history(server: &Server, sizes: &Sizes, report: &mut String) -> f64 {
    let n = sizes.history;
    let dir = tempfile::tempdir().unwrap();
    let required = dir.path().join("migrations");
    let h = generated::write_with(&required, n, false);
    let deferred = dir.path().join("migrations_deferred");
    std::fs::create_dir_all(&deferred).unwrap();
    let ours = Migrator::new(MigrationSet::from_dirs(&required, &deferred).unwrap());
    let (mut ours_t, mut diesel_t) = (Vec::new(), Vec::new());
    let (mut ours_s, mut diesel_s) = (0, 0);
    let (mut ours_db, mut diesel_db) = (None, None);
    for run in 0..sizes.many_runs {
        for which in in_turn(run) {
            let (db, url) = server.database();
            if which == "ours" {
                let ((_, t), s) =
                    server.statements(&db, || time(|| ours.run_required(&url).unwrap()));
                ours_t.push(t);
                ours_s = s;
                if std::env::var_os("BENCH_PROFILE").is_some() {
                    eprintln!("diesel-rollout, {}:", ms(t));
                    crate::many::profile(server, &db);
                }
                if run == 0 {
                    // Kept for the no-op start below.
                    ours_db = Some((db, url));
                    continue;
                }
            } else {
                let files = FileBasedMigrations::from_path(&required).unwrap();
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
                if std::env::var_os("BENCH_PROFILE").is_some() {
                    eprintln!("diesel_migrations, {}:", ms(t));
                    crate::many::profile(server, &db);
                }
                if run == 0 {
                    diesel_db = Some((db, url));
                    continue;
                }
            }
            server.drop_database(&db);
        }
    }
    let (o, d) = (median(ours_t), median(diesel_t));
    writeln!(
        report,
        "## 3. Applying a realistic history of {n} migrations from empty\n\nA generated diesel \
         history in the shapes real projects have: tables, columns and indexes, `plpgsql` \
         functions with `$$` bodies, triggers, `DO` blocks, enum changes, views, check \
         constraints added `NOT VALID` and validated, data fixes, and {} `run_in_transaction = \
         false` index builds (the generator is `tests/support/history.rs`, also used by the \
         adoption tests). Median of {} runs, the two harnesses alternating.\n\n| harness | \
         total | per migration | vs diesel_migrations | statements per migration |\n|---|---|---|---|---|",
        h.no_transaction, sizes.many_runs
    )
    .unwrap();
    both_rows(report, (d, diesel_s), (o, ours_s), n);
    // A replica's start once all of it is applied: nothing pending, on an
    // open connection, the two in turn.
    let (ours_db, ours_url) = ours_db.unwrap();
    let (diesel_db, diesel_url) = diesel_db.unwrap();
    let mut oc = PgConnection::establish(&ours_url).unwrap();
    let mut dc = PgConnection::establish(&diesel_url).unwrap();
    // diesel's harness gets the same in-memory set (it is a
    // `MigrationSource`), so neither reads the directory.
    let set = ours.migrations().clone();
    let [d_noop, o_noop] = interleaved(
        sizes.startup_iters,
        &mut [
            &mut || {
                dc.run_pending_migrations(set.clone()).unwrap();
            },
            &mut || {
                ours.run_required_on(&mut oc).unwrap();
            },
        ],
    );
    writeln!(
        report,
        "\nThen, with all {n} applied, a start with nothing pending on an open connection \
         (median of {} rounds, the two in turn): diesel_migrations {}, diesel-rollout {} \
         ({:.2}×); both given the same migration set in memory.",
        sizes.startup_iters,
        us(d_noop),
        us(o_noop),
        o_noop.as_secs_f64() / d_noop.as_secs_f64()
    )
    .unwrap();
    drop((oc, dc));
    server.drop_database(&ours_db);
    server.drop_database(&diesel_db);
    writeln!(
        report,
        "\nBoth send a transactional migration's file in one round trip with its ledger row; \
         diesel-rollout also writes an attempt row and checks for a half-done run (in the \
         same round trip as the version row) \
         and takes its advisory lock once for the whole run. A no-transaction migration is \
         sent statement by statement by both (diesel as one batch, which a single statement \
         is), diesel-rollout recording its progress.\n"
    )
    .unwrap();
    o.as_secs_f64() / d.as_secs_f64()
}
