//! Start-up cost: nothing pending, on an open connection and connecting.

use std::fmt::Write as _;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel_migrations::MigrationHarness;
use diesel_rollout::{MigrationSet, Migrator};

use crate::harness::*;

pub(crate) fn startup(server: &Server, sizes: &Sizes, report: &mut String) {
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
    // On an open connection: the three on one connection (ours, where
    // diesel's harness finds the same versions applied), so they share one
    // server backend and its place on the machine's two cores (with a
    // backend each, which backend shared a core with the client decided
    // the row). Measured in turns, round after round, so a noisy moment on
    // this shared machine hits all of them.
    let shared = std::cell::RefCell::new(PgConnection::establish(&ours_url).unwrap());
    const LEDGER_READ: &str = "SELECT version FROM __diesel_schema_migrations";
    let [floor_open, ledger_open, diesel_open, ours_open] = interleaved(
        n,
        &mut [
            &mut || shared.borrow_mut().batch_execute("SELECT 1").unwrap(),
            &mut || shared.borrow_mut().batch_execute(LEDGER_READ).unwrap(),
            &mut || {
                shared
                    .borrow_mut()
                    .run_pending_migrations(set.clone())
                    .unwrap();
            },
            &mut || {
                ours.run_required_on(&mut shared.borrow_mut()).unwrap();
            },
        ],
    );
    let mut oc = shared.into_inner();
    let (_, ours_open_stmts) =
        server.statements(&ours_db, || ours.run_required_on(&mut oc).unwrap());
    let (_, diesel_open_stmts) =
        server.statements(&ours_db, || oc.run_pending_migrations(set.clone()).unwrap());
    let (_, floor_stmts) = server.statements(&ours_db, || oc.batch_execute("SELECT 1").unwrap());
    let (_, ledger_stmts) = server.statements(&ours_db, || oc.batch_execute(LEDGER_READ).unwrap());
    let rows = vec![
        ("`SELECT 1` (floor)", floor_open, floor_stmts),
        (
            "`SELECT version FROM __diesel_schema_migrations` (the job's floor)",
            ledger_open,
            ledger_stmts,
        ),
        (
            "diesel_migrations `run_pending_migrations`",
            diesel_open,
            diesel_open_stmts,
        ),
        (
            "diesel-rollout `run_required_on`",
            ours_open,
            ours_open_stmts,
        ),
    ];

    // Connecting included, as a replica starts.
    // Two floors: the least a connection costs, and the least a start-up
    // check of any harness costs (it must read the ledger, which a fresh
    // backend has to look up in the catalog first).
    let [floor_cold, ledger_cold, diesel_cold, ours_cold] = interleaved(
        n,
        &mut [
            &mut || {
                PgConnection::establish(&ours_url)
                    .unwrap()
                    .batch_execute("SELECT 1")
                    .unwrap()
            },
            &mut || {
                PgConnection::establish(&ours_url)
                    .unwrap()
                    .batch_execute(LEDGER_READ)
                    .unwrap()
            },
            &mut || {
                PgConnection::establish(&diesel_url)
                    .unwrap()
                    .run_pending_migrations(set.clone())
                    .unwrap();
            },
            &mut || {
                ours.run_required(&ours_url).unwrap();
            },
        ],
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
    let (_, ledger_cold_stmts) = server.statements(&ours_db, || {
        PgConnection::establish(&ours_url)
            .unwrap()
            .batch_execute(LEDGER_READ)
            .unwrap()
    });
    writeln!(
        report,
        "## 1. Start-up when nothing is pending\n\nThe cost every replica pays on every restart, \
         with the example set ({} migrations) applied. Median call of {n} rounds, each round calling every row of a table in turn, {BURST} calls each (so noise on this shared machine hits them all, and each runs with its server backend awake); on an open connection, all on one connection (diesel's harness finds the same versions applied there), so they share one server backend; statements counted \
         with `pg_stat_statements` (`track = top`, utility statements included).\n",
        set.migrations().len()
    )
    .unwrap();
    writeln!(
        report,
        "| on an open connection | time | vs diesel_migrations | vs `SELECT 1` | vs ledger read | statements |\n|---|---|---|---|---|---|"
    )
    .unwrap();
    for (what, d, stmts) in &rows {
        writeln!(
            report,
            "| {what} | {} | {:.2}× | {:.2}× | {:.2}× | {stmts} |",
            us(*d),
            d.as_secs_f64() / diesel_open.as_secs_f64(),
            d.as_secs_f64() / floor_open.as_secs_f64(),
            d.as_secs_f64() / ledger_open.as_secs_f64()
        )
        .unwrap();
    }
    writeln!(
        report,
        "\n| connecting included | time | vs diesel_migrations | vs connect + `SELECT 1` | vs connect + ledger read | statements |\n|---|---|---|---|---|---|"
    )
    .unwrap();
    for (what, d, stmts) in [
        ("connect + `SELECT 1` (floor)", floor_cold, floor_cold_stmts),
        (
            "connect + `SELECT version FROM __diesel_schema_migrations` (the job's floor)",
            ledger_cold,
            ledger_cold_stmts,
        ),
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
            "| {what} | {} | {:.2}× | {:.2}× | {:.2}× | {stmts} |",
            us(d),
            d.as_secs_f64() / diesel_cold.as_secs_f64(),
            d.as_secs_f64() / floor_cold.as_secs_f64(),
            d.as_secs_f64() / ledger_cold.as_secs_f64()
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
         can name the holder. Reading a table costs a fresh backend more than `SELECT 1`: it \
         looks the table up in the catalog first (cold caches), which every harness pays; the \
         ledger-read row is that floor.\n"
    )
    .unwrap();
    server.drop_database(&ours_db);
    server.drop_database(&diesel_db);
}
