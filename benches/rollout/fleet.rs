//! Fleet: one release on many databases, `rollout fleet up` at several
//! `--parallel` against the shell loop teams write without it.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use crate::harness::*;

/// The migrations each target gets: tables with a row each, every fifth
/// one with an index, all transactional (a typical release train).
fn write_set(dir: &Path, n: usize) {
    for i in 1..=n {
        let d = dir.join("migrations").join(format!("{i:04}_table_{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut up = format!(
            "CREATE TABLE t_{i} (id bigint PRIMARY KEY, name text NOT NULL, at timestamptz \
             DEFAULT now());\nINSERT INTO t_{i} (id, name) VALUES (1, 'first');\n"
        );
        if i % 5 == 0 {
            up.push_str(&format!("CREATE INDEX t_{i}_name ON t_{i} (name);\n"));
        }
        write_file(&d.join("up.sql"), &up);
        write_file(&d.join("down.sql"), &format!("DROP TABLE t_{i};\n"));
    }
    std::fs::create_dir_all(dir.join("migrations_deferred")).unwrap();
}

/// Per target, summed over the targets: connecting, waiting for locks,
/// and the rest (reading the ledger, applying, recording).
#[derive(Default)]
struct Phases {
    connect: f64,
    lock: f64,
    apply: f64,
}

pub(crate) fn fleet(server: &Server, sizes: &Sizes, report: &mut String) {
    let (n, migrations) = (sizes.fleet_targets, sizes.fleet_migrations);
    let dir = tempfile::tempdir().unwrap();
    write_set(dir.path(), migrations);
    let migrations_dir = dir.path().join("migrations");
    let rollout = env!("CARGO_BIN_EXE_rollout");
    let modes: [(&str, Option<usize>); 4] = [
        ("shell loop over `rollout up`", None),
        ("`rollout fleet up --parallel 1`", Some(1)),
        ("`rollout fleet up --parallel 4`", Some(4)),
        ("`rollout fleet up --parallel 8`", Some(8)),
    ];
    let mut rows = Vec::new();
    for (label, parallel) in modes {
        let dbs: Vec<(String, String)> = (0..n).map(|_| server.database()).collect();
        let targets = dir.path().join("targets.txt");
        let list: String = dbs.iter().map(|(_, url)| format!("{url}\n")).collect();
        write_file(&targets, &list);
        let (out, took) = time(|| match parallel {
            None => Command::new("sh")
                .arg("-c")
                .arg(
                    "while read -r url; do DATABASE_URL=\"$url\" \"$0\" -q up --migrations-dir \
                     \"$1\" || exit 1; done < \"$2\"",
                )
                .arg(rollout)
                .arg(&migrations_dir)
                .arg(&targets)
                .output()
                .unwrap(),
            Some(p) => Command::new(rollout)
                .args(["-q", "--json", "fleet", "up", "--parallel", &p.to_string()])
                .arg("--migrations-dir")
                .arg(&migrations_dir)
                .arg("--targets")
                .arg(&targets)
                .output()
                .unwrap(),
        });
        assert!(
            out.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let phases = parallel.map(|_| {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let mut p = Phases::default();
            for t in v["targets"].as_array().unwrap() {
                assert_eq!(t["applied"].as_array().unwrap().len(), migrations, "{t}");
                let f = |k: &str| t[k].as_f64().unwrap_or(0.0);
                p.connect += f("connect_ms");
                p.lock += f("lock_wait_ms");
                p.apply += f("duration_ms") - f("connect_ms") - f("lock_wait_ms");
            }
            p
        });
        // Every target got every migration, whichever way it ran.
        for (name, url) in &dbs {
            let mut c = diesel::Connection::establish(url).unwrap();
            let applied = scalar_i64(
                &mut c,
                "SELECT count(*) AS n FROM __diesel_schema_migrations",
            );
            assert_eq!(applied as usize, migrations, "{name}");
        }
        for (name, _) in &dbs {
            server.drop_database(name);
        }
        rows.push((label, took, phases));
    }
    let loop_time = rows[0].1;
    writeln!(
        report,
        "## 7. One release on {n} databases\n\n{n} databases (one server), each given the same \
         {migrations} transactional migrations (a table and a row each, an index in every \
         fifth), from empty; one run each. The baseline is the loop a team writes without \
         fleet mode: `rollout up` once per database, one after the other. \"Connect\", \"lock \
         wait\" and \"apply\" are per target, averaged (from `--json`; \"apply\" is the rest: \
         reading the ledger, taking the lock, applying and recording).\n"
    )
    .unwrap();
    writeln!(
        report,
        "| how | total | per target | vs the shell loop | connect | lock wait | apply |\n\
         |---|---|---|---|---|---|---|"
    )
    .unwrap();
    let per = |ms: f64| format!("{:.1} ms", ms / n as f64);
    for (label, took, phases) in &rows {
        let (c, l, a) = match phases {
            Some(p) => (per(p.connect), per(p.lock), per(p.apply)),
            None => ("-".into(), "-".into(), "-".into()),
        };
        writeln!(
            report,
            "| {label} | {} | {} | {:.2}× | {c} | {l} | {a} |",
            ms(*took),
            ms(*took / n as u32),
            took.as_secs_f64() / loop_time.as_secs_f64()
        )
        .unwrap();
    }
    writeln!(
        report,
        "\nThe loop starts a process per database (its start, reading the migration \
         directory, one connection and the pooler check); `fleet up` reads the migrations \
         once and runs N targets at once, each on its own connection, so on this two-core \
         machine the gain flattens once both cores and the server are busy. \"Lock wait\" is \
         the time to take each target's locks (no other process migrates these databases); \
         with more targets at once than cores, each target's own work takes longer, while \
         the whole run takes less.\n"
    )
    .unwrap();
}
