//! The track rules: what diesel-guard does not know about the two tracks.

use std::collections::{HashMap, HashSet};

use crate::lint::finding::Input;
use crate::source::{
    compare_versions,
    sql::{SqlToken, TokenKind},
    Metadata, Track,
};

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

pub(crate) const CONCURRENT_IN_REQUIRED: &str = "ConcurrentBuildInRequiredTrack";
pub(crate) const CONCURRENTLY_IN_TRANSACTION: &str = "ConcurrentlyInTransaction";
pub(crate) const RETRY_UNSAFE: &str = "RetryUnsafeStatement";
pub(crate) const CONCURRENTLY_IN_TRANSACTIONAL_DOWN: &str = "ConcurrentlyInTransactionalDown";
pub(crate) const NON_TRANSACTIONAL_IN_TRANSACTION: &str = "NonTransactionalStatementInTransaction";
pub(crate) const SET_NOT_NULL: &str = "SetNotNullWithoutValidatedCheck";
pub(crate) const INVALID_SET: &str = "InvalidMigrationSet";

/// diesel-guard's check that [`SET_NOT_NULL`] replaces: it flags every
/// `SET NOT NULL`, even one a validated `CHECK (col IS NOT NULL)` makes cheap.
pub(crate) const REPLACED_GUARD_CHECK: &str = "AddNotNullCheck";

/// diesel-guard's checks that a statement is safe to run twice. They only
/// matter where a retry can meet a half-applied migration: no-transaction
/// ones.
pub(crate) const IDEMPOTENCY_CHECKS: &[&str] = &[
    "IdempotencyAlterCheck",
    "IdempotencyCreateCheck",
    "IdempotencyDropCheck",
    "IdempotencyIndexCheck",
];

/// Lines and rules silenced by `safety-assured` blocks,
/// `-- diesel-guard:disable` comments and `disable_checks`.
pub(crate) struct Silence {
    ranges: Vec<(usize, usize)>,
    disabled: HashSet<String>,
}

impl Silence {
    pub(crate) fn of(text: &str, metadata: &Metadata) -> Self {
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

    pub(crate) fn covers(&self, rule: &str, line: usize) -> bool {
        self.disabled.contains(rule) || self.ranges.iter().any(|(s, e)| *s < line && line < *e)
    }
}

/// The words of a statement, lower-cased, with their token positions.
pub(crate) struct Words<'a>(pub &'a [SqlToken]);

impl Words<'_> {
    pub(crate) fn word(&self, i: usize) -> Option<String> {
        self.0
            .get(i)
            .filter(|t| t.kind == TokenKind::Word)
            .map(|t| t.text.to_ascii_lowercase())
    }

    pub(crate) fn is(&self, i: usize, w: &str) -> bool {
        self.word(i).as_deref() == Some(w)
    }

    pub(crate) fn starts(&self, words: &[&str]) -> bool {
        words.iter().enumerate().all(|(i, w)| self.is(i, w))
    }

    pub(crate) fn has(&self, w: &str) -> bool {
        (0..self.0.len()).any(|i| self.is(i, w))
    }

    /// Index of the first occurrence of the word sequence.
    pub(crate) fn find(&self, words: &[&str]) -> Option<usize> {
        (0..self.0.len()).find(|&i| words.iter().enumerate().all(|(k, w)| self.is(i + k, w)))
    }

    /// An identifier (word or quoted) at `i`, folded as PostgreSQL does.
    pub(crate) fn ident(&self, i: usize) -> Option<String> {
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
    pub(crate) fn name(&self, mut i: usize) -> Option<(String, usize)> {
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

pub(crate) fn is_create_index_concurrently(w: &Words<'_>) -> bool {
    w.starts(&["create", "index", "concurrently"])
        || w.starts(&["create", "unique", "index", "concurrently"])
}

pub(crate) fn track_rules(
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
                     cannot tell the index an earlier attempt finished from one that was there \
                     before, so it builds a second one under a new generated name; an invalid \
                     leftover is found only by comparing definitions, which fails where \
                     PostgreSQL prints it differently (a WHERE clause, a cast); `rollout status` \
                     cannot show its state"
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
pub(crate) fn set_not_null(w: &Words<'_>) -> Option<(String, String)> {
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
pub(crate) struct NotNullChecks {
    /// Constraint name → (table, column, version that added it NOT VALID).
    pending: HashMap<String, (String, String)>,
    /// (table, column) → (version, track) of the validation.
    validated: HashMap<(String, String), (String, Track)>,
}

impl NotNullChecks {
    pub(crate) fn record(&mut self, input: &Input, w: &Words<'_>) {
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
    pub(crate) fn validated(&self, input: &Input, table: &str, column: &str) -> bool {
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
