//! The lint gate: diesel-guard's checks on both tracks, plus the track rules
//! diesel-guard does not know, so a migration that would lock a hot table
//! never reaches the required track and one that cannot succeed (or be
//! retried) never reaches the deferred track.
//!
//! Configuration is diesel-guard's `diesel-guard.toml` (`start_after`,
//! `disable_checks`, `warn_checks`, `enable_checks`, `check_down`,
//! `postgres_version`, ...); the track rules' names are accepted in its
//! lists too. `-- safety-assured:start` / `-- safety-assured:end` blocks,
//! `-- diesel-guard:disable NAME` comments and a migration's
//! `disable_checks` in `metadata.toml` silence the track rules as they
//! silence diesel-guard's.

mod finding;
mod rules;

use self::finding::Input;
pub use self::finding::{Finding, Severity};
pub use self::rules::TRACK_RULES;
use self::rules::{
    track_rules, NotNullChecks, Silence, Words, CONCURRENTLY_IN_TRANSACTIONAL_DOWN,
    IDEMPOTENCY_CHECKS, INVALID_SET, REPLACED_GUARD_CHECK, RETRY_UNSAFE,
};

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use diesel_guard::checks::MigrationContext;
use diesel_guard::violation::Severity as GuardSeverity;
use diesel_guard::{Config, SafetyChecker};

use crate::source::{self, compare_versions, parse_dir_name, parse_metadata, sql, Track};

/// Options of a lint run.
#[derive(Debug, Clone, Default)]
pub struct LintOptions {
    /// `diesel-guard.toml` to use. Default: the one beside the migrations
    /// directory, else in the current directory, else diesel-guard's
    /// defaults.
    pub config: Option<PathBuf>,
    /// Rules or checks to report as warnings rather than errors.
    pub warn: Vec<String>,
    /// Treat warnings as errors.
    pub deny_warnings: bool,
}

/// Why the lint could not run (a finding is not an error).
#[derive(Debug)]
pub struct LintError {
    message: String,
}

impl fmt::Display for LintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LintError {}

fn lint_error(message: impl Into<String>) -> LintError {
    LintError {
        message: message.into(),
    }
}

/// Lints a pair of migration directories (a missing deferred directory is
/// an empty track). Findings are ordered by path and line.
///
/// # Errors
/// When `diesel-guard.toml` is invalid or a directory cannot be read.
pub fn lint_dirs(
    required: &Path,
    deferred: &Path,
    options: &LintOptions,
) -> Result<Vec<Finding>, LintError> {
    let (guard_config, own) = load_config(required, options)?;
    let checker = SafetyChecker::with_config(guard_config.clone())
        .map_err(|e| lint_error(format!("diesel-guard configuration: {e}")))?;

    let mut findings = Vec::new();
    let mut inputs = Vec::new();
    for (dir, track) in [(required, Track::Required), (deferred, Track::Deferred)] {
        if dir.is_dir() {
            read_inputs(dir, track, &mut inputs)?;
        }
    }
    // What the runtime would refuse, as findings; what it grandfathers, as
    // warnings.
    let (problems, warnings) =
        match source::read_pair_with(required, deferred, own.baseline.clone()) {
            Ok(set) => (Vec::new(), set.warnings),
            Err(e) => (e.problems, Vec::new()),
        };
    for (p, severity) in problems
        .into_iter()
        .map(|p| (p, Severity::Error))
        .chain(warnings.into_iter().map(|p| (p, Severity::Warning)))
    {
        let path = p.paths.first().cloned().unwrap_or_default();
        // Reported by its own rule below, with its safe alternative.
        if severity == Severity::Error && p.message.starts_with("`CONCURRENTLY` cannot run") {
            continue;
        }
        findings.push(Finding {
            path,
            line: p.line.unwrap_or(1),
            rule: INVALID_SET.into(),
            severity,
            problem: p.message,
            safe_alternative: "fix the migration directory as the message says".into(),
        });
    }
    inputs.sort_by(|a, b| compare_versions(&a.version, &b.version));

    let start_after = own.baseline.clone();
    let mut not_null = NotNullChecks::default();
    for input in &inputs {
        let grandfathered = start_after
            .as_deref()
            .is_some_and(|after| compare_versions(&input.version, after).is_le());
        let Some(up) = &input.up_sql else { continue };
        // Later migrations may rely on what earlier ones validated, so the
        // scan sees every migration, grandfathered or not.
        let statements = match sql::split_statements(up) {
            Ok(s) => s,
            Err(e) => {
                if !grandfathered {
                    findings.push(Finding {
                        path: input.up_path.clone(),
                        line: e.line,
                        rule: INVALID_SET.into(),
                        severity: Severity::Error,
                        problem: e.message,
                        safe_alternative: "close the string, quote or comment".into(),
                    });
                }
                continue;
            }
        };
        let mut local = Vec::new();
        let silence = Silence::of(up, &input.metadata);
        for s in &statements {
            let Ok(tokens) = sql::tokens(&s.sql) else {
                continue;
            };
            let words = Words(&tokens);
            if !grandfathered {
                track_rules(input, s.line, &words, &not_null, &mut local);
            }
            not_null.record(input, &words);
        }
        if let Some((path, down)) = &input.down {
            // Reported for history too (a warning there): `revert` would
            // refuse it.
            if input.metadata.run_in_transaction {
                if let Ok(Some(w)) = sql::find_keyword(down, "concurrently") {
                    let silence = Silence::of(down, &input.metadata);
                    if !silence.covers(CONCURRENTLY_IN_TRANSACTIONAL_DOWN, w.line) {
                        findings.push(Finding {
                            path: path.clone(),
                            line: w.line,
                            rule: CONCURRENTLY_IN_TRANSACTIONAL_DOWN.into(),
                            severity: if grandfathered {
                                Severity::Warning
                            } else {
                                Severity::Error
                            },
                            problem: "down.sql uses CONCURRENTLY, but this migration runs in a \
                                      transaction, so reverting it fails with \"cannot run inside \
                                      a transaction block\""
                                .into(),
                            safe_alternative: "give the migration `run_in_transaction = false` \
                                               (and make each statement of up.sql and down.sql \
                                               safe to retry), or drop CONCURRENTLY from down.sql"
                                .into(),
                        });
                    }
                }
            }
        }
        for (line, rule, problem, alternative) in local {
            if !silence.covers(rule, line) {
                findings.push(Finding {
                    path: input.up_path.clone(),
                    line,
                    rule: rule.into(),
                    severity: Severity::Error,
                    problem,
                    safe_alternative: alternative,
                });
            }
        }
        if grandfathered {
            continue;
        }
        // diesel-guard's checks, with the migration's real context.
        let mut files = vec![(input.up_path.clone(), up.clone())];
        if guard_config.check_down {
            if let Some((p, d)) = &input.down {
                files.push((p.clone(), d.clone()));
            }
        }
        for (path, text) in files {
            findings.extend(guard_findings(
                &checker,
                &guard_config,
                input,
                &path,
                &text,
            )?);
        }
    }

    for f in &mut findings {
        let configured_warning = own.warn.contains(&f.rule) || options.warn.contains(&f.rule);
        if configured_warning && f.severity == Severity::Error {
            f.severity = Severity::Warning;
        }
        if options.deny_warnings {
            f.severity = Severity::Error;
        }
    }
    // The track rule says more (the invalid index a failed build leaves):
    // keep it alone where both fire.
    let retry_lines: HashSet<(PathBuf, usize)> = findings
        .iter()
        .filter(|f| f.rule == RETRY_UNSAFE)
        .map(|f| (f.path.clone(), f.line))
        .collect();
    findings.retain(|f| {
        !(IDEMPOTENCY_CHECKS.contains(&f.rule.as_str())
            && retry_lines.contains(&(f.path.clone(), f.line)))
    });
    findings.retain(|f| !own.disabled.contains(&f.rule));
    if let Some(enabled) = &own.enabled {
        findings.retain(|f| !TRACK_RULES.contains(&f.rule.as_str()) || enabled.contains(&f.rule));
    }
    findings.sort_by(|a, b| (&a.path, a.line, &a.rule).cmp(&(&b.path, b.line, &b.rule)));
    findings.dedup();
    Ok(findings)
}

fn guard_findings(
    checker: &SafetyChecker,
    config: &Config,
    input: &Input,
    path: &Path,
    text: &str,
) -> Result<Vec<Finding>, LintError> {
    let parsed = match diesel_guard::parser::parse_with_metadata(text) {
        Ok(p) => p,
        Err(e) => {
            return Ok(vec![Finding {
                path: path.to_path_buf(),
                line: 1,
                rule: "ParseError".into(),
                severity: Severity::Error,
                problem: format!("PostgreSQL's parser (libpg_query) rejects this file: {e}"),
                safe_alternative: "fix the SQL syntax".into(),
            }])
        }
    };
    let mut disabled = input.metadata.disable_checks.clone();
    if input.metadata.run_in_transaction {
        // The runner applies a transactional migration atomically with its
        // ledger rows: a failure leaves nothing behind, so a retry never
        // meets half of it and idempotency does not matter.
        disabled.extend(IDEMPOTENCY_CHECKS.iter().map(|c| c.to_string()));
    }
    let ctx = MigrationContext {
        run_in_transaction: input.metadata.run_in_transaction,
        no_transaction_hint: "Create metadata.toml in the migration directory with \
                              `run_in_transaction = false`.",
        disabled_checks: disabled,
    }
    .with_disabled_checks(&parsed.disabled_checks);
    let violations = checker.registry().check_stmts_with_context(
        &parsed.stmts,
        &parsed.sql,
        &parsed.ignore_ranges,
        config,
        &ctx,
    );
    Ok(violations
        .into_iter()
        .map(|(line, v)| Finding {
            path: path.to_path_buf(),
            line,
            rule: if v.check_name.is_empty() {
                v.operation.clone()
            } else {
                v.check_name.clone()
            },
            severity: match v.severity {
                GuardSeverity::Warning => Severity::Warning,
                GuardSeverity::Error => Severity::Error,
            },
            problem: v.problem,
            safe_alternative: v.safe_alternative,
        })
        .collect())
}

/// The track rules' share of the configuration.
#[derive(Default)]
struct OwnConfig {
    disabled: HashSet<String>,
    warn: HashSet<String>,
    enabled: Option<HashSet<String>>,
    /// `start_after`, as digits: the baseline.
    baseline: Option<String>,
}

/// Loads `diesel-guard.toml`, moving the track rules' names out of its
/// lists (diesel-guard refuses names it does not know).
fn load_config(required: &Path, options: &LintOptions) -> Result<(Config, OwnConfig), LintError> {
    let candidates = match &options.config {
        Some(p) => vec![p.clone()],
        None => {
            let beside = required
                .parent()
                .map(|p| p.join("diesel-guard.toml"))
                .unwrap_or_else(|| PathBuf::from("diesel-guard.toml"));
            vec![beside, PathBuf::from("diesel-guard.toml")]
        }
    };
    let found = candidates.into_iter().find(|p| p.is_file());
    let mut config = match (&found, &options.config) {
        (Some(path), _) => {
            let utf8 = camino::Utf8Path::from_path(path)
                .ok_or_else(|| lint_error(format!("{} is not UTF-8", path.display())))?;
            Config::load_from_path(utf8)
                .map_err(|e| lint_error(format!("{}: {e}", path.display())))?
        }
        (None, Some(explicit)) => {
            return Err(lint_error(format!(
                "{}: no such file (given with --config)",
                explicit.display()
            )))
        }
        (None, None) => Config::default(),
    };
    // The baseline is applied here, to both diesel-guard's checks and the
    // track rules, with versions compared as numbers; diesel-guard's own
    // filter only takes 14-digit timestamps.
    let baseline = config
        .start_after
        .take()
        .map(|s| s.chars().filter(char::is_ascii_digit).collect::<String>());
    if config.postgres_version.is_none() {
        // Constant defaults stopped rewriting tables in PostgreSQL 11; say
        // so, or every `ADD COLUMN ... DEFAULT 0` is reported.
        config.postgres_version = Some(11);
    }
    let ours = |list: &mut Vec<String>| -> HashSet<String> {
        let (own, guard): (Vec<String>, Vec<String>) = list
            .drain(..)
            .partition(|n| TRACK_RULES.contains(&n.as_str()));
        *list = guard;
        own.into_iter().collect()
    };
    let disabled = ours(&mut config.disable_checks);
    let warn = ours(&mut config.warn_checks);
    let had_enabled = !config.enable_checks.is_empty();
    let enabled = ours(&mut config.enable_checks);
    if had_enabled {
        config
            .enable_checks
            .retain(|c| c.as_str() != REPLACED_GUARD_CHECK);
        if config.enable_checks.is_empty() {
            // Only track rules were enabled: to diesel-guard an empty list
            // means every check, so disable them all instead.
            config.disable_checks = diesel_guard::checks::Registry::builtin_check_names()
                .iter()
                .map(|c| c.to_string())
                .collect();
        }
    } else if !config
        .disable_checks
        .iter()
        .any(|c| c == REPLACED_GUARD_CHECK)
    {
        config.disable_checks.push(REPLACED_GUARD_CHECK.into());
    }
    Ok((
        config,
        OwnConfig {
            disabled,
            warn,
            enabled: had_enabled.then_some(enabled),
            baseline,
        },
    ))
}

fn read_inputs(dir: &Path, track: Track, out: &mut Vec<Input>) -> Result<(), LintError> {
    let entries =
        fs::read_dir(dir).map_err(|e| lint_error(format!("cannot read {}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !path.is_dir() {
            continue;
        }
        // A bad name is reported through the runtime's own validation.
        let Ok((version, _)) = parse_dir_name(&name) else {
            continue;
        };
        let up_path = path.join("up.sql");
        let down_path = path.join("down.sql");
        let metadata = fs::read_to_string(path.join("metadata.toml"))
            .ok()
            .map(|t| parse_metadata(&t).unwrap_or_default())
            .unwrap_or_default();
        out.push(Input {
            version,
            track,
            up_sql: fs::read_to_string(&up_path).ok(),
            down: fs::read_to_string(&down_path).ok().map(|d| (down_path, d)),
            up_path,
            metadata,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::rules::set_not_null;
    use super::*;
    use crate::source::{sql::SqlToken, Metadata};

    fn words(sql: &str) -> Vec<SqlToken> {
        sql::tokens(sql).unwrap()
    }

    #[test]
    fn finds_set_not_null_targets() {
        let t = words("ALTER TABLE ONLY public.users ALTER COLUMN \"Email\" SET NOT NULL");
        assert_eq!(
            set_not_null(&Words(&t)),
            Some(("users".into(), "Email".into()))
        );
        let t = words("alter table users add column x int, alter email set not null");
        assert_eq!(
            set_not_null(&Words(&t)),
            Some(("users".into(), "email".into()))
        );
        let t = words("ALTER TABLE users ALTER COLUMN email DROP NOT NULL");
        assert_eq!(set_not_null(&Words(&t)), None);
    }

    #[test]
    fn silence_reads_blocks_and_disable_comments() {
        let text = "select 1;\n-- safety-assured:start\nvacuum;\n-- safety-assured:end\n\
                    -- diesel-guard:disable RetryUnsafeStatement, X\nselect 2;\n";
        let s = Silence::of(text, &Metadata::default());
        assert!(s.covers("Anything", 3));
        assert!(!s.covers("Anything", 1));
        assert!(s.covers("RetryUnsafeStatement", 6));
        assert!(s.covers("X", 1));
    }
}
