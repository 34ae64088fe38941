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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use diesel_guard::checks::MigrationContext;
use diesel_guard::violation::Severity as GuardSeverity;
use diesel_guard::{Config, SafetyChecker};

use crate::source::{
    self, compare_versions, parse_dir_name, parse_metadata,
    sql::{self, SqlToken, TokenKind},
    Metadata, Track,
};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Blocks: `rollout lint` exits 1 and the build-time lint fails.
    Error,
    /// Reported only.
    Warning,
}

impl Severity {
    /// `error` or `warning`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// One problem the lint found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The file.
    pub path: PathBuf,
    /// 1-based line of the statement.
    pub line: usize,
    /// The rule or diesel-guard check name.
    pub rule: String,
    /// Error or warning.
    pub severity: Severity,
    /// What is wrong.
    pub problem: String,
    /// What to do instead.
    pub safe_alternative: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.path.display(),
            self.line,
            self.rule,
            self.problem
        )?;
        if self.severity == Severity::Warning {
            f.write_str(" (warning)")?;
        }
        for (i, line) in self.safe_alternative.trim().lines().enumerate() {
            if i == 0 {
                write!(f, "\n    safe alternative: {}", line.trim_end())?;
            } else {
                write!(f, "\n    {}", line.trim_end())?;
            }
        }
        Ok(())
    }
}

/// The names of the track rules, for configuration.
pub const TRACK_RULES: &[&str] = &[
    CONCURRENT_IN_REQUIRED,
    CONCURRENTLY_IN_TRANSACTION,
    RETRY_UNSAFE,
    CONCURRENTLY_IN_TRANSACTIONAL_DOWN,
    NON_TRANSACTIONAL_IN_TRANSACTION,
    SET_NOT_NULL,
    INVALID_SET,
];

const CONCURRENT_IN_REQUIRED: &str = "ConcurrentBuildInRequiredTrack";
const CONCURRENTLY_IN_TRANSACTION: &str = "ConcurrentlyInTransaction";
const RETRY_UNSAFE: &str = "RetryUnsafeStatement";
const CONCURRENTLY_IN_TRANSACTIONAL_DOWN: &str = "ConcurrentlyInTransactionalDown";
const NON_TRANSACTIONAL_IN_TRANSACTION: &str = "NonTransactionalStatementInTransaction";
const SET_NOT_NULL: &str = "SetNotNullWithoutValidatedCheck";
const INVALID_SET: &str = "InvalidMigrationSet";

/// diesel-guard's check that [`SET_NOT_NULL`] replaces: it flags every
/// `SET NOT NULL`, even one a validated `CHECK (col IS NOT NULL)` makes cheap.
const REPLACED_GUARD_CHECK: &str = "AddNotNullCheck";

/// diesel-guard's checks that a statement is safe to run twice. They only
/// matter where a retry can meet a half-applied migration: no-transaction
/// ones.
const IDEMPOTENCY_CHECKS: &[&str] = &[
    "IdempotencyAlterCheck",
    "IdempotencyCreateCheck",
    "IdempotencyDropCheck",
    "IdempotencyIndexCheck",
];

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

/// One migration as the lint reads it: leniently, so a set the runtime
/// would refuse is still linted.
struct Input {
    version: String,
    track: Track,
    up_path: PathBuf,
    up_sql: Option<String>,
    down: Option<(PathBuf, String)>,
    metadata: Metadata,
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
    // What the runtime would refuse, as findings.
    if let Err(e) = source::read_pair(required, deferred) {
        for p in e.problems {
            let path = p.paths.first().cloned().unwrap_or_default();
            // Reported by its own rule below, with its safe alternative.
            if p.message.starts_with("`CONCURRENTLY` cannot run") {
                continue;
            }
            findings.push(Finding {
                path,
                line: p.line.unwrap_or(1),
                rule: INVALID_SET.into(),
                severity: Severity::Error,
                problem: p.message,
                safe_alternative: "fix the migration directory as the message says".into(),
            });
        }
    }
    inputs.sort_by(|a, b| compare_versions(&a.version, &b.version));

    let start_after = guard_config
        .start_after
        .as_deref()
        .map(|s| s.chars().filter(char::is_ascii_digit).collect::<String>());
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
            if input.metadata.run_in_transaction && !grandfathered {
                if let Ok(Some(w)) = sql::find_keyword(down, "concurrently") {
                    let silence = Silence::of(down, &input.metadata);
                    if !silence.covers(CONCURRENTLY_IN_TRANSACTIONAL_DOWN, w.line) {
                        findings.push(Finding {
                            path: path.clone(),
                            line: w.line,
                            rule: CONCURRENTLY_IN_TRANSACTIONAL_DOWN.into(),
                            severity: Severity::Error,
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

/// Lines and rules silenced by `safety-assured` blocks,
/// `-- diesel-guard:disable` comments and `disable_checks`.
struct Silence {
    ranges: Vec<(usize, usize)>,
    disabled: HashSet<String>,
}

impl Silence {
    fn of(text: &str, metadata: &Metadata) -> Self {
        let mut ranges = Vec::new();
        let mut disabled: HashSet<String> = metadata.disable_checks.iter().cloned().collect();
        let mut open = None;
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            let Some(comment) = t.strip_prefix("--") else {
                continue;
            };
            let c = comment.trim();
            if c.eq_ignore_ascii_case("safety-assured:start") {
                open = Some(i + 1);
            } else if c.eq_ignore_ascii_case("safety-assured:end") {
                if let Some(start) = open.take() {
                    ranges.push((start, i + 1));
                }
            } else if let Some(rest) = c
                .get(..21)
                .filter(|p| p.eq_ignore_ascii_case("diesel-guard:disable "))
                .map(|_| &c[21..])
            {
                disabled.extend(rest.split(',').map(|n| n.trim().to_string()));
            }
        }
        Silence { ranges, disabled }
    }

    fn covers(&self, rule: &str, line: usize) -> bool {
        self.disabled.contains(rule) || self.ranges.iter().any(|(s, e)| *s < line && line < *e)
    }
}

/// The words of a statement, lower-cased, with their token positions.
struct Words<'a>(&'a [SqlToken]);

impl Words<'_> {
    fn word(&self, i: usize) -> Option<String> {
        self.0
            .get(i)
            .filter(|t| t.kind == TokenKind::Word)
            .map(|t| t.text.to_ascii_lowercase())
    }

    fn is(&self, i: usize, w: &str) -> bool {
        self.word(i).as_deref() == Some(w)
    }

    fn starts(&self, words: &[&str]) -> bool {
        words.iter().enumerate().all(|(i, w)| self.is(i, w))
    }

    fn has(&self, w: &str) -> bool {
        (0..self.0.len()).any(|i| self.is(i, w))
    }

    /// Index of the first occurrence of the word sequence.
    fn find(&self, words: &[&str]) -> Option<usize> {
        (0..self.0.len()).find(|&i| words.iter().enumerate().all(|(k, w)| self.is(i + k, w)))
    }

    /// An identifier (word or quoted) at `i`, folded as PostgreSQL does.
    fn ident(&self, i: usize) -> Option<String> {
        let t = self.0.get(i)?;
        match t.kind {
            TokenKind::Word => Some(t.text.to_ascii_lowercase()),
            TokenKind::QuotedIdent if t.text.starts_with('"') && t.text.len() >= 2 => {
                Some(t.text[1..t.text.len() - 1].replace("\"\"", "\""))
            }
            _ => None,
        }
    }

    /// A possibly qualified name at `i`: its last part, and the index after.
    fn name(&self, mut i: usize) -> Option<(String, usize)> {
        loop {
            let part = self.ident(i)?;
            i += 1;
            if self
                .0
                .get(i)
                .is_some_and(|t| t.kind == TokenKind::Punct('.'))
            {
                i += 1;
            } else {
                return Some((part, i));
            }
        }
    }
}

type Local = Vec<(usize, &'static str, String, String)>;

fn is_create_index_concurrently(w: &Words<'_>) -> bool {
    w.starts(&["create", "index", "concurrently"])
        || w.starts(&["create", "unique", "index", "concurrently"])
}

fn track_rules(
    input: &Input,
    line: usize,
    w: &Words<'_>,
    not_null: &NotNullChecks,
    out: &mut Local,
) {
    let concurrent_build = is_create_index_concurrently(w)
        || (w.is(0, "reindex") && w.has("concurrently"))
        || w.starts(&["refresh", "materialized", "view", "concurrently"])
        || (w.starts(&["alter", "table"]) && w.find(&["validate", "constraint"]).is_some());
    if input.track == Track::Required && concurrent_build {
        out.push((
            line,
            CONCURRENT_IN_REQUIRED,
            "a long concurrent build (index build, REINDEX CONCURRENTLY, VALIDATE CONSTRAINT, \
             REFRESH MATERIALIZED VIEW CONCURRENTLY) in the required track runs before the \
             replica is ready and delays readiness for as long as it takes"
                .into(),
            "move the statement to a migration in migrations_deferred/ (run_in_transaction = \
             false); if a required migration relies on its result, list the deferred version \
             in that migration's `requires_deferred`"
                .into(),
        ));
    }
    if input.metadata.run_in_transaction && w.has("concurrently") {
        out.push((
            line,
            CONCURRENTLY_IN_TRANSACTION,
            "CONCURRENTLY cannot run inside a transaction block, and this migration runs in one \
             (no metadata.toml, or `run_in_transaction = true`)"
                .into(),
            "put the statement in a deferred migration (migrations_deferred/, with \
             `run_in_transaction = false` in metadata.toml)"
                .into(),
        ));
    }
    if !input.metadata.run_in_transaction {
        if is_create_index_concurrently(w) {
            let at = if w.is(1, "unique") { 4 } else { 3 };
            let if_not_exists = w.is(at, "if") && w.is(at + 1, "not") && w.is(at + 2, "exists");
            let named = !w.is(at, "on");
            if !named {
                out.push((
                    line,
                    RETRY_UNSAFE,
                    "CREATE INDEX CONCURRENTLY without an index name: a retry after a crash \
                     builds a second index under a new generated name, and the invalid one a \
                     failed build leaves cannot be found and repaired"
                        .into(),
                    "name the index: CREATE INDEX CONCURRENTLY IF NOT EXISTS name ON ...".into(),
                ));
            } else if !if_not_exists {
                out.push((
                    line,
                    RETRY_UNSAFE,
                    "CREATE INDEX CONCURRENTLY without IF NOT EXISTS: this migration runs \
                     outside a transaction, so a retry after a crash finds the index and fails \
                     with \"already exists\""
                        .into(),
                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS name ON ... (the runner drops an \
                     invalid leftover before the statement and checks the index is valid after \
                     it, which IF NOT EXISTS alone would not)"
                        .into(),
                ));
            }
        }
        if w.starts(&["drop", "index", "concurrently"]) && !w.is(3, "if") {
            out.push((
                line,
                RETRY_UNSAFE,
                "DROP INDEX CONCURRENTLY without IF EXISTS: a retry after a crash fails with \
                 \"does not exist\""
                    .into(),
                "DROP INDEX CONCURRENTLY IF EXISTS name".into(),
            ));
        }
    }
    if input.metadata.run_in_transaction {
        let non_tx = if w.is(0, "vacuum") {
            Some("VACUUM")
        } else if w.starts(&["create", "database"]) {
            Some("CREATE DATABASE")
        } else if w.starts(&["drop", "database"]) {
            Some("DROP DATABASE")
        } else if w.starts(&["alter", "system"]) {
            Some("ALTER SYSTEM")
        } else if w.starts(&["create", "tablespace"]) {
            Some("CREATE TABLESPACE")
        } else if w.starts(&["drop", "tablespace"]) {
            Some("DROP TABLESPACE")
        } else if w.is(0, "reindex") && (w.has("database") || w.has("system")) {
            Some("REINDEX DATABASE/SYSTEM")
        } else {
            None
        };
        if let Some(what) = non_tx {
            out.push((
                line,
                NON_TRANSACTIONAL_IN_TRANSACTION,
                format!(
                    "{what} cannot run inside a transaction block, and this migration runs in one"
                ),
                "move it to a deferred migration (run_in_transaction = false); VACUUM and \
                 ANALYZE belong in the deferred track"
                    .into(),
            ));
        }
    }
    if let Some((table, column)) = set_not_null(w) {
        if !not_null.validated(input, &table, &column) {
            out.push((
                line,
                SET_NOT_NULL,
                format!(
                    "SET NOT NULL on {table}.{column} scans the whole table under an ACCESS \
                     EXCLUSIVE lock, blocking reads and writes, unless a validated CHECK \
                     ({column} IS NOT NULL) already exists"
                ),
                format!(
                    "1. a required migration: ALTER TABLE {table} ADD CONSTRAINT \
                     {table}_{column}_not_null CHECK ({column} IS NOT NULL) NOT VALID;\n\
                     2. a deferred migration: ALTER TABLE {table} VALIDATE CONSTRAINT \
                     {table}_{column}_not_null;\n\
                     3. a later required migration with `requires_deferred` naming step 2: \
                     ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL; (PostgreSQL 12+ \
                     skips the scan) and then DROP CONSTRAINT {table}_{column}_not_null"
                ),
            ));
        }
    }
}

/// `ALTER TABLE t ALTER [COLUMN] c SET NOT NULL` → (t, c).
fn set_not_null(w: &Words<'_>) -> Option<(String, String)> {
    if !w.starts(&["alter", "table"]) {
        return None;
    }
    let mut i = 2;
    if w.is(i, "if") && w.is(i + 1, "exists") {
        i += 2;
    }
    if w.is(i, "only") {
        i += 1;
    }
    let (table, mut i) = w.name(i)?;
    // Several actions may follow, separated by commas.
    while i < w.0.len() {
        if w.is(i, "alter") {
            let mut j = i + 1;
            if w.is(j, "column") {
                j += 1;
            }
            if let Some(column) = w.ident(j) {
                if w.is(j + 1, "set") && w.is(j + 2, "not") && w.is(j + 3, "null") {
                    return Some((table, column));
                }
            }
        }
        i += 1;
    }
    None
}

/// Validated `CHECK (col IS NOT NULL)` constraints seen so far.
#[derive(Default)]
struct NotNullChecks {
    /// Constraint name → (table, column, version that added it NOT VALID).
    pending: HashMap<String, (String, String)>,
    /// (table, column) → (version, track) of the validation.
    validated: HashMap<(String, String), (String, Track)>,
}

impl NotNullChecks {
    fn record(&mut self, input: &Input, w: &Words<'_>) {
        if !w.starts(&["alter", "table"]) {
            return;
        }
        let mut i = 2;
        if w.is(i, "if") && w.is(i + 1, "exists") {
            i += 2;
        }
        if w.is(i, "only") {
            i += 1;
        }
        let Some((table, _)) = w.name(i) else { return };
        if let Some(at) = w.find(&["add", "constraint"]) {
            let Some(name) = w.ident(at + 2) else { return };
            // CHECK ( column IS NOT NULL )
            let check = at + 3;
            let t = w.0;
            let column = (w.is(check, "check")
                && t.get(check + 1)
                    .is_some_and(|p| p.kind == TokenKind::Punct('('))
                && w.is(check + 3, "is")
                && w.is(check + 4, "not")
                && w.is(check + 5, "null")
                && t.get(check + 6)
                    .is_some_and(|p| p.kind == TokenKind::Punct(')')))
            .then(|| w.ident(check + 2))
            .flatten();
            if let Some(column) = column {
                if w.find(&["not", "valid"]).is_some_and(|n| n > check + 6) {
                    self.pending.insert(name, (table, column));
                } else {
                    self.validated
                        .insert((table, column), (input.version.clone(), input.track));
                }
            }
        } else if let Some(at) = w.find(&["validate", "constraint"]) {
            if let Some(name) = w.ident(at + 2) {
                if let Some(key) = self.pending.remove(&name) {
                    self.validated
                        .insert(key, (input.version.clone(), input.track));
                }
            }
        }
    }

    /// Whether a validated check covers (table, column) for `input`: it was
    /// validated by a required migration before it, or by a deferred one it
    /// lists in `requires_deferred` (otherwise nothing makes the deferred
    /// validation happen first).
    fn validated(&self, input: &Input, table: &str, column: &str) -> bool {
        match self.validated.get(&(table.to_string(), column.to_string())) {
            Some((_, Track::Required)) => true,
            Some((version, Track::Deferred)) => {
                input.track == Track::Deferred
                    || input
                        .metadata
                        .requires_deferred
                        .iter()
                        .any(|d| compare_versions(d, version) == std::cmp::Ordering::Equal)
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
