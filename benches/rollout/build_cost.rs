//! Build cost: embedding many migrations.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::*;

pub(crate) fn build_cost(sizes: &Sizes, report: &mut String) {
    let n = sizes.build_migrations;
    if n == 0 {
        writeln!(report, "## 6. Build cost\n\nSkipped at this size.\n").unwrap();
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let work = root.join("target/bench-build");
    let target = work.join("target");
    let dep = format!(
        "{{ path = {:?}, default-features = false",
        root.to_string_lossy()
    );
    let crates = [
        (
            "diesel-rollout (`embed` in build.rs)",
            "ours",
            format!(
                "[dependencies]\ndiesel-rollout = {dep}, features = [\"runtime\"] }}\n\n\
                 [build-dependencies]\ndiesel-rollout = {dep} }}\n"
            ),
            "fn main() {\n    diesel_rollout::embed(\"migrations\", \"migrations_deferred\");\n}\n",
            "static M: diesel_rollout::MigrationSet = diesel_rollout::include_migrations!();\n\
             fn main() { print!(\"{}\", M.migrations().len()) }\n",
        ),
        (
            "diesel_migrations (`embed_migrations!`)",
            "diesel",
            "[dependencies]\ndiesel = { version = \"2.3\", default-features = false, features = [\"postgres\"] }\n\
             diesel_migrations = { version = \"2.3\", default-features = false, features = [\"postgres\"] }\n"
                .to_string(),
            "",
            "use diesel::migration::MigrationSource;\n\
             use diesel_migrations::{embed_migrations, EmbeddedMigrations};\n\
             const M: EmbeddedMigrations = embed_migrations!(\"migrations\");\n\
             fn main() { print!(\"{}\", MigrationSource::<diesel::pg::Pg>::migrations(&M).unwrap().len()) }\n",
        ),
    ];
    writeln!(
        report,
        "## 6. Build cost of {n} embedded migrations\n\nA crate embedding {n} migrations, \
         release profile, dependencies already built: \"build\" is `cargo build` of the crate \
         itself after its code and migrations changed. \"Rebuild\" is whether adding one \
         migration directory, and nothing else, makes `cargo build` embed it.\n\n| harness | \
         build | binary size | add one migration: rebuild | embedded after adding |\n|---|---|---|---|---|"
    )
    .unwrap();
    for (label, name, deps, build_rs, main_rs) in crates {
        let dir = work.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        write_file(
            &dir.join("Cargo.toml"),
            &format!("[package]\nname = \"bench_{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n{deps}\n[workspace]\n"),
        );
        std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
        if !build_rs.is_empty() {
            write_file(&dir.join("build.rs"), build_rs);
        }
        write_file(&dir.join("src/main.rs"), main_rs);
        std::fs::create_dir_all(dir.join("migrations_deferred")).unwrap();
        let add = |i: usize| {
            write_file(
                &dir.join(format!(
                    "migrations/{:014}_m{i}/up.sql",
                    20240101000000u64 + i as u64
                )),
                &format!("CREATE TABLE t_{i} (id INT PRIMARY KEY);\n"),
            );
        };
        add(1);
        let cargo = || {
            let mut c = Command::new(env!("CARGO"));
            c.args(["build", "--release", "--quiet", "--offline"])
                .current_dir(&dir)
                .env("CARGO_TARGET_DIR", &target);
            c
        };
        // Dependencies first, so the timing below is the crate alone.
        assert!(cargo().status().unwrap().success());
        for i in 2..=n {
            add(i);
        }
        // Touch the code too, so both harnesses rebuild the crate here.
        write_file(&dir.join("src/main.rs"), &format!("{main_rs}// {n}\n"));
        let (status, built) = time(|| cargo().status().unwrap());
        assert!(status.success());
        let bin = target.join(format!("release/bench_{name}"));
        let size = std::fs::metadata(&bin).unwrap().len();
        let count = |bin: &Path| {
            let out = Command::new(bin).output().unwrap();
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
        };
        let before = count(&bin);
        assert_eq!(before, n, "{label}: embedded {before} of {n}");
        add(n + 1);
        let (_, rebuilt) = time(|| cargo().status().unwrap());
        let after = count(&bin);
        writeln!(
            report,
            "| {label} | {} | {:.1} MiB | {} ({}) | {after} of {} |",
            ms(built),
            size as f64 / 1048576.0,
            if after == n + 1 { "yes" } else { "**no**" },
            ms(rebuilt),
            n + 1
        )
        .unwrap();
    }
    writeln!(
        report,
        "\n`embed_migrations!` reads the directory at macro expansion and tells cargo about no \
         new directory, so a migration added without touching Rust code is not embedded until \
         something else forces a rebuild; diesel-rollout's `embed` prints \
         `cargo:rerun-if-changed` for both folders and every file.\n"
    )
    .unwrap();
}
