//! A service embeds its own two directories with one call in its
//! `build.rs`: the embed works, a new migration directory triggers a
//! rebuild, and an invalid set fails the build with a clear message.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn write(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
}

fn cargo(service: &Path, args: &[&str]) -> Output {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Command::new(env!("CARGO"))
        .args(args)
        .args(["--quiet", "--offline"])
        .current_dir(service)
        // Its own target directory (the suite's is locked by this run),
        // kept between runs so only the first one compiles diesel.
        .env("CARGO_TARGET_DIR", root.join("target/embed-test"))
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo")
}

/// A service crate in `dir`, depending on this crate: `runtime` features
/// for its code (`None`: no runtime dependency), `build` features for its
/// build script, which embeds `migrations` and `migrations_deferred`.
fn service_crate(dir: &Path, runtime: Option<&str>, build: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let name = dir.file_name().unwrap().to_string_lossy();
    let dep = format!(
        "{{ path = {:?}, default-features = false",
        root.to_string_lossy()
    );
    let runtime = runtime
        .map(|f| format!("[dependencies]\ndiesel-rollout = {dep}, features = [{f}] }}\n\n"))
        .unwrap_or_default();
    write(
        &dir.join("Cargo.toml"),
        &format!(
            "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             {runtime}[build-dependencies]\ndiesel-rollout = {dep}, features = [{build}] }}\n"
        ),
    );
    // The same versions as this crate, so cargo needs no network.
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    write(
        &dir.join("build.rs"),
        "fn main() {\n    diesel_rollout::embed(\"migrations\", \"migrations_deferred\");\n}\n",
    );
}

#[test]
fn a_service_embeds_its_directories_in_one_build_script_call() {
    let tmp = tempfile::tempdir().unwrap();
    let svc = tmp.path().join("svc");
    service_crate(&svc, Some("\"runtime\""), "");
    write(
        &svc.join("src/main.rs"),
        "use std::io::Write;\n\
         static MIGRATIONS: diesel_rollout::MigrationSet = diesel_rollout::include_migrations!();\n\
         fn main() {\n    let mut out = std::io::stdout().lock();\n    \
         for m in MIGRATIONS.migrations() {\n        \
         writeln!(out, \"{} {} {} {}\", m.version(), m.track(), m.name(), m.checksum()).unwrap();\n    }\n}\n",
    );
    write(
        &svc.join("migrations/2024-01-01-000000_create_users/up.sql"),
        "CREATE TABLE users (id INT);\n",
    );

    let out = cargo(&svc, &["run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        stdout,
        format!(
            "20240101000000 required create_users {}\n",
            diesel_rollout_checksum("CREATE TABLE users (id INT);\n")
        )
    );

    // A new migration directory, and no other change, rebuilds.
    write(
        &svc.join("migrations_deferred/2024-02-01-000000_index_users/up.sql"),
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS users_id_idx ON users (id);\n",
    );
    write(
        &svc.join("migrations_deferred/2024-02-01-000000_index_users/metadata.toml"),
        "run_in_transaction = false\n",
    );
    let out = cargo(&svc, &["run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("20240201000000 deferred index_users"),
        "the new migration must be embedded: {stdout}"
    );

    // A version used in both tracks fails the build, naming both paths.
    write(
        &svc.join("migrations/20240201000000_add_email/up.sql"),
        "ALTER TABLE users ADD COLUMN email TEXT;\n",
    );
    let out = cargo(&svc, &["build"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("version 20240201000000 is used by 2 migrations"),
        "{stderr}"
    );
    assert!(
        stderr.contains("migrations/20240201000000_add_email (required)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("migrations_deferred/2024-02-01-000000_index_users (deferred)"),
        "{stderr}"
    );
}

#[test]
fn with_the_lint_feature_an_unsafe_required_migration_fails_the_build() {
    let tmp = tempfile::tempdir().unwrap();
    let svc = tmp.path().join("svc_lint");
    service_crate(&svc, None, "\"lint\"");
    write(&svc.join("src/main.rs"), "fn main() {}\n");
    write(
        &svc.join("migrations/2024-01-01-000000_create_orders/up.sql"),
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, total BIGINT);\n",
    );
    let out = cargo(&svc, &["build"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A type change rewrites the table under an exclusive lock.
    write(
        &svc.join("migrations/2024-01-02-000000_widen_total/up.sql"),
        "-- widen\nALTER TABLE orders ALTER COLUMN total TYPE NUMERIC;\n",
    );
    let out = cargo(&svc, &["build"]);
    assert!(!out.status.success(), "the unsafe migration must not build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("2024-01-02-000000_widen_total/up.sql:2: AlterColumnTypeCheck"),
        "{stderr}"
    );

    // Marked safe by a person, it builds.
    write(
        &svc.join("migrations/2024-01-02-000000_widen_total/up.sql"),
        "-- safety-assured:start\nALTER TABLE orders ALTER COLUMN total TYPE NUMERIC;\n\
         -- safety-assured:end\n",
    );
    let out = cargo(&svc, &["build"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn diesel_rollout_checksum(body: &str) -> String {
    // The checksum is SHA-256 of up.sql; check it against sha256sum when
    // the tool is there, otherwise against the library's own function.
    match Command::new("sha256sum")
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(body.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        }
        Err(_) => panic!("sha256sum (coreutils) is needed by this test"),
    }
}
