//! Reading and validating migration directories, on directories written
//! by the tests.

use super::embed::{generate, rerun_if_changed};
use super::*;

struct Tree(tempfile::TempDir);

impl Tree {
    fn new() -> Self {
        let t = Tree(tempfile::tempdir().unwrap());
        fs::create_dir(t.req()).unwrap();
        fs::create_dir(t.def()).unwrap();
        t
    }
    fn req(&self) -> PathBuf {
        self.0.path().join("migrations")
    }
    fn def(&self) -> PathBuf {
        self.0.path().join("migrations_deferred")
    }
    fn add(&self, track: Track, dir: &str, files: &[(&str, &str)]) -> PathBuf {
        let base = match track {
            Track::Required => self.req(),
            Track::Deferred => self.def(),
        };
        let d = base.join(dir);
        fs::create_dir_all(&d).unwrap();
        for (name, body) in files {
            fs::write(d.join(name), body).unwrap();
        }
        d
    }
    fn read(&self) -> Result<Vec<MigrationFiles>, SourceError> {
        self.read_set().map(|s| s.migrations)
    }
    fn read_set(&self) -> Result<ReadSet, SourceError> {
        read_pair(&self.req(), &self.def())
    }
}

const NO_TX: (&str, &str) = ("metadata.toml", "run_in_transaction = false\n");

/// A byte order mark (as some Windows editors save) is not part of the SQL
/// or the checksum, in any of the three files.
#[test]
fn a_byte_order_mark_is_left_out() {
    let t = Tree::new();
    let body = "CREATE TABLE t (id int);\r\n";
    t.add(
        Track::Required,
        "1_bom",
        &[
            ("up.sql", &format!("\u{feff}{body}")),
            ("down.sql", "\u{feff}DROP TABLE t;\n"),
            ("metadata.toml", "\u{feff}run_in_transaction = false\n"),
        ],
    );
    let m = t.read().unwrap().remove(0);
    assert_eq!(m.up_sql, body);
    assert_eq!(m.checksum, checksum_of_sql(body));
    assert!(!m.run_in_transaction, "metadata.toml read past the mark");
}

#[test]
fn versions_follow_diesel_and_order_numerically() {
    assert_eq!(
        parse_dir_name("2024-01-31-120000_add_users").unwrap(),
        ("20240131120000".to_string(), "add_users".to_string())
    );
    assert_eq!(parse_dir_name("7").unwrap().0, "7");
    assert!(parse_dir_name("v1_x").is_err());
    assert!(parse_dir_name("_x").is_err());
    let t = Tree::new();
    t.add(Track::Required, "10_b", &[("up.sql", "select 1;")]);
    t.add(Track::Required, "9_a", &[("up.sql", "select 1;")]);
    t.add(Track::Deferred, "11_c", &[("up.sql", "select 1;"), NO_TX]);
    let got: Vec<_> = t.read().unwrap().into_iter().map(|m| m.version).collect();
    assert_eq!(got, ["9", "10", "11"]);
}

#[test]
fn duplicate_version_across_tracks_names_both_paths() {
    let t = Tree::new();
    let a = t.add(
        Track::Required,
        "2024-01-01-000000_a",
        &[("up.sql", "select 1;")],
    );
    let b = t.add(
        Track::Deferred,
        "20240101000000_b",
        &[("up.sql", "select 1;"), NO_TX],
    );
    let err = t.read().unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].paths.len(), 2);
    let text = err.to_string();
    assert!(text.contains(&a.display().to_string()), "{text}");
    assert!(text.contains(&b.display().to_string()), "{text}");
    assert!(
        text.contains("version 20240101000000 is used by 2"),
        "{text}"
    );
}

#[test]
fn missing_and_empty_up_sql() {
    let t = Tree::new();
    t.add(Track::Required, "1_a", &[("down.sql", "select 1;")]);
    t.add(Track::Required, "2_b", &[("up.sql", "  -- nothing\n")]);
    let text = t.read().unwrap_err().to_string();
    assert!(text.contains("1_a/up.sql: missing up.sql"), "{text}");
    assert!(text.contains("2_b/up.sql: up.sql is empty"), "{text}");
}

#[test]
fn metadata_must_parse_and_name_run_in_transaction() {
    let t = Tree::new();
    t.add(
        Track::Required,
        "1_a",
        &[("up.sql", "select 1;"), ("metadata.toml", "# nothing\n")],
    );
    t.add(
        Track::Required,
        "2_b",
        &[
            ("up.sql", "select 1;"),
            ("metadata.toml", "run_in_transaction = true\nfoo = 1\n"),
        ],
    );
    t.add(
        Track::Required,
        "3_c",
        &[("up.sql", "select 1;"), ("metadata.toml", "[table\n")],
    );
    t.add(
        Track::Required,
        "4_d",
        &[
            ("up.sql", "select 1;"),
            ("metadata.toml", "run_in_transaction = \"no\""),
        ],
    );
    let text = t.read().unwrap_err().to_string();
    assert!(
        text.contains(
            "1_a/metadata.toml: metadata.toml exists but does not set `run_in_transaction`"
        ),
        "{text}"
    );
    assert!(
        text.contains("2_b/metadata.toml:2: unknown key `foo`"),
        "{text}"
    );
    assert!(text.contains("3_c/metadata.toml:1: cannot parse"), "{text}");
    assert!(
        text.contains("4_d/metadata.toml:1: `run_in_transaction` must be"),
        "{text}"
    );
}

#[test]
fn concurrently_in_a_transactional_migration_names_the_line() {
    let t = Tree::new();
    t.add(
        Track::Required,
        "1_a",
        &[(
            "up.sql",
            "-- CONCURRENTLY in a comment is fine\nselect 'concurrently';\n\ncreate index concurrently i on t (a);\n",
        )],
    );
    let text = t.read().unwrap_err().to_string();
    assert!(
        text.contains("1_a/up.sql:4: `CONCURRENTLY` cannot run"),
        "{text}"
    );

    let ok = Tree::new();
    ok.add(
        Track::Required,
        "1_a",
        &[("up.sql", "create index concurrently i on t (a);"), NO_TX],
    );
    assert!(ok.read().is_ok());
}

#[test]
fn deferred_migrations_must_opt_out_of_transactions() {
    let t = Tree::new();
    t.add(Track::Deferred, "1_a", &[("up.sql", "analyze;")]);
    let text = t.read().unwrap_err().to_string();
    assert!(
        text.contains("deferred migrations run outside any transaction"),
        "{text}"
    );
}

#[test]
fn missing_required_dir_is_an_error_missing_deferred_is_empty() {
    let t = tempfile::tempdir().unwrap();
    let err = read_pair(&t.path().join("nope"), &t.path().join("nope2")).unwrap_err();
    assert!(err.to_string().contains("does not exist"));
    fs::create_dir(t.path().join("m")).unwrap();
    assert!(read_pair(&t.path().join("m"), &t.path().join("nope2"))
        .unwrap()
        .migrations
        .is_empty());
}

#[test]
fn checksum_is_sha256_hex() {
    assert_eq!(
        checksum(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn generated_code_embeds_every_migration() {
    let t = Tree::new();
    t.add(
        Track::Required,
        "1_a",
        &[("up.sql", "select 1;"), ("down.sql", "select 2;")],
    );
    t.add(Track::Deferred, "2_b", &[("up.sql", "select 1;"), NO_TX]);
    let code = generate(&t.read_set().unwrap(), "crate");
    assert_eq!(code.matches("crate::Migration::__embedded(").count(), 2);
    assert!(code.contains("crate::Track::Deferred"));
    assert!(code.contains("1_a/down.sql"));
    let lines = rerun_if_changed(&t.req(), &t.def());
    assert!(lines.iter().any(|l| l.ends_with("/migrations_deferred")));
    assert!(lines.iter().any(|l| l.ends_with("2_b/metadata.toml")));
}

#[test]
fn requires_deferred_is_parsed_and_checked() {
    let t = Tree::new();
    t.add(
        Track::Deferred,
        "2024-01-02-000000_idx",
        &[("up.sql", "analyze;"), NO_TX],
    );
    t.add(
        Track::Required,
        "2024-01-03-000000_uses_idx",
        &[
            ("up.sql", "select 1;"),
            (
                "metadata.toml",
                "run_in_transaction = true\nrequires_deferred = [\n  \"2024-01-02-000000\", # the index\n]\n",
            ),
        ],
    );
    let set = t.read_set().unwrap();
    let m = set
        .migrations
        .iter()
        .find(|m| m.version == "20240103000000")
        .unwrap();
    assert_eq!(m.requires_deferred, ["20240102000000"]);
    assert!(generate(&set, "crate").contains(", \"20240102000000\"),\n"));

    let bad = Tree::new();
    bad.add(Track::Required, "1_a", &[("up.sql", "select 1;")]);
    bad.add(
        Track::Required,
        "2_b",
        &[
            ("up.sql", "select 1;"),
            (
                "metadata.toml",
                "run_in_transaction = true\nrequires_deferred = [\"1\", \"9\"]\n",
            ),
        ],
    );
    bad.add(
        Track::Deferred,
        "3_c",
        &[
            ("up.sql", "analyze;"),
            (
                "metadata.toml",
                "run_in_transaction = false\nrequires_deferred = []\n",
            ),
        ],
    );
    bad.add(
        Track::Required,
        "4_d",
        &[
            ("up.sql", "select 1;"),
            (
                "metadata.toml",
                "run_in_transaction = true\nrequires_deferred = \"1\"\n",
            ),
        ],
    );
    bad.add(Track::Deferred, "8_later", &[("up.sql", "analyze;"), NO_TX]);
    bad.add(
        Track::Required,
        "7_waits_for_a_newer_one",
        &[
            ("up.sql", "select 1;"),
            (
                "metadata.toml",
                "run_in_transaction = true\nrequires_deferred = [\"8\"]\n",
            ),
        ],
    );
    let text = bad.read().unwrap_err().to_string();
    assert!(
        text.contains("names 8, which is newer than this migration (7)"),
        "{text}"
    );
    assert!(
        text.contains("names 1, which is a required migration"),
        "{text}"
    );
    assert!(
        text.contains("names 9, which is not a deferred migration"),
        "{text}"
    );
    assert!(
        text.contains("4_d/metadata.toml:2: `requires_deferred` must be an array"),
        "{text}"
    );
}

#[test]
fn history_at_or_below_the_baseline_warns_where_a_new_migration_fails() {
    let t = Tree::new();
    // What old diesel histories hold: CONCURRENTLY in a transactional
    // down.sql, metadata without the key, an unknown key, an empty up.sql.
    t.add(
        Track::Required,
        "1_old_index",
        &[
            ("up.sql", "create index i on t (a);"),
            ("down.sql", "drop index concurrently i;"),
        ],
    );
    t.add(
        Track::Required,
        "2_old_meta",
        &[
            ("up.sql", "select 1;"),
            ("metadata.toml", "# no key\nrun_in_tx = true\n"),
        ],
    );
    t.add(
        Track::Required,
        "3_old_empty",
        &[("up.sql", "-- nothing\n")],
    );
    // Newer than the baseline: the same down.sql problem.
    t.add(
        Track::Required,
        "4_new",
        &[
            ("up.sql", "create index j on t (a);"),
            ("down.sql", "drop index concurrently j;"),
        ],
    );
    let err = read_pair_with(&t.req(), &t.def(), None)
        .unwrap_err()
        .to_string();
    for dir in [
        "1_old_index/down.sql",
        "2_old_meta",
        "3_old_empty",
        "4_new/down.sql",
    ] {
        assert!(err.contains(dir), "{dir}: {err}");
    }
    let err = read_pair_with(&t.req(), &t.def(), Some("3".into()))
        .unwrap_err()
        .to_string();
    assert_eq!(err.matches("\n  - ").count(), 1, "{err}");
    assert!(err.contains("4_new/down.sql:1: `CONCURRENTLY`"), "{err}");
    fs::remove_dir_all(t.req().join("4_new")).unwrap();
    let set = read_pair_with(&t.req(), &t.def(), Some("3".into())).unwrap();
    assert_eq!(set.migrations.len(), 3);
    // diesel's reading of a metadata.toml without the key: no transaction.
    assert!(!set.migrations[1].run_in_transaction);
    let warnings: Vec<String> = set.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings
        .iter()
        .all(|w| w.contains("at or below the baseline 3")));
    assert!(
        !warnings.iter().any(|w| w.contains("down.sql")),
        "{warnings:?}"
    );
    // The baseline comes from diesel-guard.toml beside the directory.
    fs::write(
        t.0.path().join("diesel-guard.toml"),
        "start_after = \"3\"\n",
    )
    .unwrap();
    assert_eq!(t.read_set().unwrap().baseline.as_deref(), Some("3"));
}

#[test]
fn line_endings_do_not_change_a_checksum() {
    let lf = "create table t (a int);\nselect 1;\n";
    let crlf = lf.replace('\n', "\r\n");
    assert_eq!(checksum_of_sql(lf), checksum_of_sql(&crlf));
    // What an earlier release recorded for an LF file stays valid.
    assert_eq!(checksum_of_sql(lf), checksum(lf.as_bytes()));
    assert!(legacy_checksums(lf).is_empty() || legacy_checksums(lf) == [checksum(crlf.as_bytes())]);
    // And for a CRLF checkout: the raw bytes it hashed.
    assert!(legacy_checksums(lf).contains(&checksum(crlf.as_bytes())));
    assert!(legacy_checksums(&crlf).contains(&checksum(crlf.as_bytes())));
}

/// Without a `diesel-guard.toml`, the build script watches the migration
/// directories only (naming the crate's directory would have cargo scan
/// `target/` and re-run it on every build); writing a baseline touches the
/// required directory, so the next build embeds it, and names the file.
#[test]
fn the_build_script_watches_the_migrations_and_a_new_baseline() {
    let t = Tree::new();
    t.add(Track::Required, "1_a", &[("up.sql", "select 1;")]);
    let watched = |lines: &[String]| -> Vec<std::path::PathBuf> {
        lines
            .iter()
            .map(|l| l.strip_prefix("cargo:rerun-if-changed=").unwrap().into())
            .collect()
    };
    let lines = rerun_if_changed(&t.req(), &t.def());
    for p in watched(&lines) {
        assert!(p.starts_with(t.req()) || p.starts_with(t.def()), "{p:?}");
    }
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    std::fs::File::open(t.req())
        .unwrap()
        .set_modified(old)
        .unwrap();
    let config = crate::source::baseline::set(&t.req(), "1").unwrap();
    let mtime = std::fs::metadata(t.req()).unwrap().modified().unwrap();
    assert!(mtime > old);
    let lines = rerun_if_changed(&t.req(), &t.def());
    assert!(watched(&lines).contains(&config), "{lines:?}");
}
