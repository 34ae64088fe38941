//! A stampede of replicas starting at once.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use diesel::prelude::*;
use diesel_migrations::{FileBasedMigrations, MigrationHarness};
use diesel_rollout::{MigrationSet, Migrator};

use crate::harness::*;

/// Child mode: apply one harness to `url` and exit (0 ok, 1 failed).
pub(crate) fn child(which: &str, url: &str, dir: &Path) -> i32 {
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

/// The harnesses a stampede runs: (label, child mode).
const HARNESSES: [(&str, &str); 4] = [
    ("diesel_migrations", "diesel"),
    ("diesel-rollout `run_required`", "ours"),
    ("`rollout up --required-only`", "cli-required"),
    ("`rollout up`", "cli-up"),
];

/// One process of a stampede.
fn spawn(exe: &Path, which: &str, url: &str, dir: &Path) -> std::process::Child {
    let mut c = match which {
        "cli-required" | "cli-up" => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_rollout"));
            c.arg("-q").arg("up");
            if which == "cli-required" {
                c.arg("--required-only");
            }
            c.arg("--migrations-dir")
                .arg(dir.join("migrations"))
                .env("DATABASE_URL", url);
            c
        }
        _ => {
            let mut c = Command::new(exe);
            c.args(["--child", which, url]).arg(dir);
            c
        }
    };
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

pub(crate) fn stampede(server: &Server, sizes: &Sizes, report: &mut String) {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        &dir.path().join("migrations/0001_create_effects/up.sql"),
        "CREATE TABLE effects (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         version TEXT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());\n",
    );
    std::fs::create_dir_all(dir.path().join("migrations_deferred")).unwrap();
    let slow = dir.path().join("migrations/0002_slow/up.sql");
    let exe = std::env::current_exe().unwrap();
    let n = sizes.stampede;
    writeln!(
        report,
        "## 4. Stampede: {n} processes start at once\n\nTime until every process is ready \
         (exited), median of {} runs ({} with nothing pending); with a migration pending (a `pg_sleep(2)`, then an \
         insert stamped with the server's clock), how long after the migration's end the \
         last process was ready, how many applied it, and how many failed.\n\n| case | \
         harness | all ready after | last ready after the migration's end | applied it | \
         failed |\n|---|---|---|---|---|---|",
        sizes.stampede_runs,
        sizes.stampede_runs * 3
    )
    .unwrap();
    for pending in [false, true] {
        for (label, which) in HARNESSES {
            let mut times = Vec::new();
            let mut after_end = Vec::new();
            let (mut applied, mut failed) = (0, 0);
            // A start with nothing pending is short and noisy: more runs.
            let runs = sizes.stampede_runs * if pending { 1 } else { 3 };
            for _ in 0..runs {
                let (db, url) = server.database();
                let _ = std::fs::remove_dir_all(slow.parent().unwrap());
                // Everything applied first, by the harness under test.
                let setup = if which == "diesel" { "diesel" } else { "ours" };
                assert_eq!(child(setup, &url, dir.path()), 0);
                write_file(
                    &slow,
                    "SELECT pg_sleep(2);\nINSERT INTO effects (version) VALUES ('0002');\n",
                );
                if !pending {
                    assert_eq!(child(setup, &url, dir.path()), 0);
                }
                let start = Instant::now();
                let children: Vec<_> = (0..n)
                    .map(|_| spawn(&exe, which, &url, dir.path()))
                    .collect();
                let mut fails = 0;
                for mut c in children {
                    if !c.wait().unwrap().success() {
                        fails += 1;
                    }
                }
                let done = std::time::SystemTime::now();
                times.push(start.elapsed());
                let mut conn = PgConnection::establish(&url).unwrap();
                if pending {
                    // Same machine, same clock: the server's stamp of the
                    // migration's last statement against the last exit.
                    let end = scalar_f64(
                        &mut conn,
                        "SELECT extract(epoch FROM max(at))::float8 AS x FROM effects \
                         WHERE version = '0002'",
                    );
                    let done = done
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs_f64();
                    after_end.push(std::time::Duration::from_secs_f64((done - end).max(0.0)));
                }
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
                "| {} | {label} | {} | {} | {} | {failed} |",
                if pending {
                    "one pending (~2 s)"
                } else {
                    "nothing pending"
                },
                ms(median(times)),
                if pending {
                    ms(median(after_end))
                } else {
                    "-".into()
                },
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
         holding a snapshot (`LISTEN`ing on the lock's channel; the holder's unlock notifies \
         in the same round trip), one applies, the rest find nothing to do. The CLI rows are \
         the `rollout` binary started {n} times (process start, argument parsing, reading the \
         migrations directory included); `rollout up` also runs the deferred phase, which has \
         nothing to do here.\n"
    )
    .unwrap();
}
