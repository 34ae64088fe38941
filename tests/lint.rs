//! The lint gate: a fixture per rule, the safe shapes passing,
//! grandfathering, safety-assured blocks and the JSON output.

mod support;

use std::path::Path;

use diesel_rollout::{lint_dirs, Finding, LintOptions, Severity};
use support::{fixture, rollout};

fn lint(name: &str) -> Vec<Finding> {
    let dir = fixture(name);
    lint_dirs(
        &dir.join("migrations"),
        &dir.join("migrations_deferred"),
        &LintOptions::default(),
    )
    .unwrap()
}

/// (rule, file relative to the fixture, line) of each finding.
fn summary(name: &str) -> Vec<(String, String, usize)> {
    let root = fixture(name);
    lint(name)
        .into_iter()
        .map(|f| {
            let rel = f.path.strip_prefix(&root).unwrap_or(&f.path).to_path_buf();
            (f.rule, rel.display().to_string(), f.line)
        })
        .collect()
}

fn has(found: &[(String, String, usize)], rule: &str, file: &str, line: usize) -> bool {
    found
        .iter()
        .any(|(r, f, l)| r == rule && f == file && *l == line)
}

#[test]
fn a_concurrent_build_in_the_required_track() {
    let found = summary("lint_concurrent_in_required");
    assert_eq!(
        found,
        [(
            "ConcurrentBuildInRequiredTrack".to_string(),
            "migrations/2024-01-02-000000_index_orders/up.sql".to_string(),
            2
        )]
    );
}

#[test]
fn concurrently_in_a_transactional_migration() {
    let found = summary("lint_concurrently_in_transaction");
    assert!(
        has(
            &found,
            "ConcurrentlyInTransaction",
            "migrations_deferred/2024-01-02-000000_index_orders/up.sql",
            3
        ),
        "{found:?}"
    );
}

#[test]
fn statements_that_fail_when_retried() {
    let found = summary("lint_retry_unsafe");
    let file = "migrations_deferred/2024-01-02-000000_index_orders/up.sql";
    for line in [2, 3, 4] {
        assert!(has(&found, "RetryUnsafeStatement", file, line), "{found:?}");
    }
    assert_eq!(
        found.len(),
        3,
        "no duplicate idempotency findings: {found:?}"
    );
    let f = &lint("lint_retry_unsafe")[0];
    assert!(
        f.safe_alternative.contains("IF NOT EXISTS"),
        "{}",
        f.safe_alternative
    );
}

#[test]
fn concurrently_in_the_down_sql_of_a_transactional_migration() {
    assert_eq!(
        summary("lint_concurrently_in_down"),
        [(
            "ConcurrentlyInTransactionalDown".to_string(),
            "migrations/2024-01-01-000000_create_orders/down.sql".to_string(),
            1
        )]
    );
}

#[test]
fn a_statement_that_cannot_run_in_a_transaction() {
    assert_eq!(
        summary("lint_non_transactional"),
        [(
            "NonTransactionalStatementInTransaction".to_string(),
            "migrations/2024-01-02-000000_vacuum_orders/up.sql".to_string(),
            2
        )]
    );
}

#[test]
fn set_not_null_without_a_validated_check() {
    let found = summary("lint_set_not_null");
    assert_eq!(
        found,
        [(
            "SetNotNullWithoutValidatedCheck".to_string(),
            "migrations/2024-01-02-000000_require_email/up.sql".to_string(),
            1
        )]
    );
    let f = &lint("lint_set_not_null")[0];
    assert!(
        f.safe_alternative.contains("NOT VALID"),
        "{}",
        f.safe_alternative
    );
    assert!(f.safe_alternative.contains("requires_deferred"));
}

#[test]
fn table_rewrites_and_long_locks_in_the_required_track() {
    let found = summary("lint_rewrites");
    let file = "migrations/2024-01-02-000000_rewrites/up.sql";
    for (rule, line) in [
        ("GeneratedColumnCheck", 1),
        ("AlterColumnTypeCheck", 2),
        ("AddForeignKeyCheck", 3),
        ("AddCheckConstraintCheck", 4),
        ("AddColumnCheck", 5),
    ] {
        assert!(has(&found, rule, file, line), "{rule} at {line}: {found:?}");
    }
}

#[test]
fn the_safe_shapes_pass() {
    assert_eq!(summary("lint_passes"), []);
}

#[test]
fn the_crates_own_migrations_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let findings = lint_dirs(
        &root.join("migrations"),
        &root.join("migrations_deferred"),
        &LintOptions::default(),
    )
    .unwrap();
    assert!(findings.is_empty(), "{findings:#?}");
}

#[test]
fn start_after_grandfathers_older_migrations() {
    assert_eq!(
        summary("lint_start_after"),
        [(
            "NonTransactionalStatementInTransaction".to_string(),
            "migrations/2024-02-01-000000_new_vacuum/up.sql".to_string(),
            1
        )]
    );
}

#[test]
fn a_safety_assured_block_silences_both_kinds_of_rule() {
    assert_eq!(
        summary("lint_safety_assured"),
        [(
            "AlterColumnTypeCheck".to_string(),
            "migrations/2024-01-02-000000_small_table/up.sql".to_string(),
            6
        )]
    );
}

#[test]
fn warnings_are_configurable() {
    let dir = fixture("lint_non_transactional");
    let options = LintOptions {
        warn: vec!["NonTransactionalStatementInTransaction".into()],
        ..LintOptions::default()
    };
    let findings = lint_dirs(
        &dir.join("migrations"),
        &dir.join("migrations_deferred"),
        &options,
    )
    .unwrap();
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].severity, Severity::Warning);

    let out = rollout()
        .args(["lint", "--warn", "NonTransactionalStatementInTransaction"])
        .arg("--migrations-dir")
        .arg(dir.join("migrations"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "warnings alone do not fail");
}

#[test]
fn the_cli_prints_path_line_rule_and_json() {
    let dir = fixture("lint_retry_unsafe");
    let out = rollout()
        .arg("lint")
        .arg("--migrations-dir")
        .arg(dir.join("migrations"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().unwrap();
    assert!(
        first.ends_with(
            "migrations_deferred/2024-01-02-000000_index_orders/up.sql:2: RetryUnsafeStatement: \
             CREATE INDEX CONCURRENTLY without IF NOT EXISTS: this migration runs outside a \
             transaction, so a retry after a crash finds the index and fails with \"already \
             exists\""
        ),
        "{first}"
    );
    assert!(stdout
        .lines()
        .nth(1)
        .unwrap()
        .starts_with("    safe alternative: "));

    let out = rollout()
        .args(["lint", "--json", "--migrations-dir"])
        .arg(dir.join("migrations"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 3);
    for item in items {
        let obj = item.as_object().unwrap();
        let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "line",
                "path",
                "problem",
                "rule",
                "safe_alternative",
                "severity"
            ]
        );
        assert!(obj["line"].is_u64());
        assert_eq!(obj["severity"], "error");
    }

    let ok = rollout()
        .args(["lint", "--migrations-dir"])
        .arg(fixture("lint_passes").join("migrations"))
        .output()
        .unwrap();
    assert_eq!(ok.status.code(), Some(0));
}

#[test]
fn enabling_only_track_rules_turns_diesel_guard_off() {
    let dir = fixture("lint_rewrites");
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("diesel-guard.toml");
    std::fs::write(
        &config,
        "framework = \"diesel\"\nenable_checks = [\"RetryUnsafeStatement\"]\n",
    )
    .unwrap();
    let findings = lint_dirs(
        &dir.join("migrations"),
        &dir.join("migrations_deferred"),
        &LintOptions {
            config: Some(config),
            ..LintOptions::default()
        },
    )
    .unwrap();
    assert!(
        findings.is_empty(),
        "only the enabled rule runs: {findings:#?}"
    );
}
