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

pub(crate) fn stampede(server: &Server, sizes: &Sizes, report: &mut String) {
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
        "## 4. Stampede: {n} processes start at once\n\nTime until every process is ready \
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
