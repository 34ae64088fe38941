//! Applying many migrations to an empty database.

use std::fmt::Write as _;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use diesel_rollout::{MigrationSet, Migrator};

use crate::harness::*;

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

/// Returns diesel-rollout's total and harness time ÷ diesel_migrations'.
pub(crate) fn many(server: &Server, sizes: &Sizes, report: &mut String) -> (f64, f64) {
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
    // Wall time less the server's time in the migrations' own statements.
    let (mut ours_h, mut diesel_h) = (Vec::new(), Vec::new());
    let own = ["CREATE TABLE t_", "INSERT INTO t_"];
    let harness = |t: std::time::Duration, own_ms: f64| {
        t.saturating_sub(std::time::Duration::from_secs_f64(own_ms / 1000.0))
    };
    for run in 0..sizes.many_runs {
        for which in in_turn(run) {
            let (db, url) = server.database();
            if which == "ours" {
                let ((_, t), s, own_ms) = server
                    .statements_own_time(&db, &own, || time(|| ours.run_required(&url).unwrap()));
                ours_t.push(t);
                ours_h.push(harness(t, own_ms));
                ours_s = s;
                if std::env::var_os("BENCH_PROFILE").is_some() {
                    profile(server, &db);
                }
            } else {
                let files = FileBasedMigrations::from_path(dir.path().join("migrations")).unwrap();
                let ((_, t), s, own_ms) = server.statements_own_time(&db, &own, || {
                    time(|| {
                        PgConnection::establish(&url)
                            .unwrap()
                            .run_pending_migrations(files)
                            .unwrap()
                            .len()
                    })
                });
                diesel_t.push(t);
                diesel_h.push(harness(t, own_ms));
                diesel_s = s;
            }
            server.drop_database(&db);
        }
    }
    let (o, d) = (median(ours_t), median(diesel_t));
    let (oh, dh) = (median(ours_h), median(diesel_h));
    writeln!(
        report,
        "## 2. Applying {n} small migrations from empty\n\nEach creates a table and inserts a \
         row. Median of {} runs, the two harnesses alternating. \"Harness time\" is the wall \
         time less the server's time in the migrations' own statements (`CREATE TABLE`, \
         `INSERT`, from `pg_stat_statements`): what each harness adds, without the \
         run-to-run swing of `CREATE TABLE` itself.\n\n| harness | total | per migration | vs \
         diesel_migrations | harness time per migration | vs diesel_migrations | statements \
         per migration |\n|---|---|---|---|---|---|---|",
        sizes.many_runs
    )
    .unwrap();
    for (what, t, h, s) in [
        ("diesel_migrations", d, dh, diesel_s),
        ("diesel-rollout", o, oh, ours_s),
    ] {
        writeln!(
            report,
            "| {what} | {} | {} | {:.2}× | {} | {:.2}× | {:.1} |",
            ms(t),
            us(t / n as u32),
            t.as_secs_f64() / d.as_secs_f64(),
            us(h / n as u32),
            h.as_secs_f64() / dh.as_secs_f64(),
            s as f64 / n as f64
        )
        .unwrap();
    }
    writeln!(
        report,
        "\ndiesel-rollout sends a transactional migration in one round trip, `BEGIN; up.sql; \
         ledger rows; COMMIT` (the version row, a check and an attempt row: three short \
         statements, so more statements than diesel but fewer round trips), and finds \
         the failing line only after a failure, from PostgreSQL's error position or a \
         rolled-back replay; diesel_migrations sends `BEGIN`, the file, its version row and \
         `COMMIT` as four. The totals of this section vary by ±20% between runs on this \
         machine, most of it in `CREATE TABLE`.\n"
    )
    .unwrap();
    (
        o.as_secs_f64() / d.as_secs_f64(),
        oh.as_secs_f64() / dh.as_secs_f64(),
    )
}

/// The statements that took the most server time in `database` (to see
/// where a harness spends it): set BENCH_PROFILE=1.
pub(crate) fn profile(server: &Server, database: &str) {
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
    let all = scalar_f64(
        &mut server.admin_conn(),
        &format!(
            "SELECT coalesce(sum(total_exec_time + total_plan_time), 0)::float8 AS x \
             FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = '{database}')"
        ),
    );
    eprintln!("{all:>8.2} ms in all");
}
