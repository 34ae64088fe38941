//! Running one migration's statements on a connection, in or out of a
//! transaction, recording each attempt and its progress in the ledger. Both
//! tracks run migrations through [`apply`], and `revert` through [`revert`],
//! both one code path; the tracks
//! keep their own policy (locks, ordering, retries, leadership).

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::Error as DieselError;

use crate::catalog;
use crate::error::{describe_db_error, is_connection_error, Error, ErrorKind};
use crate::ledger::{self, LedgerRow, Tables};
use crate::migration::Migration;
use crate::report::Applied;
use crate::source::sql;

/// What a track plugs into a run of one migration.
pub(crate) struct Options<'a> {
    /// Called before each statement with its 0-based index and the total.
    pub on_statement: &'a dyn Fn(&Migration, usize, usize),
    /// Polled between statements and while waiting for another build.
    pub should_stop: &'a dyn Fn() -> bool,
    /// Called with the name of each invalid index dropped and rebuilt
    /// valid.
    pub on_index_repaired: &'a dyn Fn(&str),
    /// The outcome a failed attempt is recorded with: `failed`, or
    /// `retrying` when the leader will try again (so other replicas do not
    /// take it for a give-up).
    pub failure_outcome: &'static str,
    /// How often to look again at a build another session is running.
    pub poll: Duration,
}

impl Options<'static> {
    /// A plain run: no progress callbacks, never stopped early, a failure
    /// recorded as `failed`.
    pub(crate) fn plain() -> Self {
        Options {
            on_statement: &|_, _, _| {},
            should_stop: &|| false,
            on_index_repaired: &|_| {},
            failure_outcome: "failed",
            poll: Duration::from_secs(2),
        }
    }
}

/// Which way a migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// `up.sql`, recorded as applied.
    Up,
    /// `down.sql`, recorded as reverted (the version row goes).
    Down,
}

/// The script of a migration that runs, and how it is named and recorded.
struct Script<'m> {
    direction: Direction,
    sql: &'m str,
    path: String,
    /// Recorded with the attempt; a resume checks it is still the same file.
    checksum: String,
    legacy_checksums: Vec<String>,
}

impl<'m> Script<'m> {
    fn of(m: &'m Migration, direction: Direction) -> Result<Self, Error> {
        Ok(match direction {
            Direction::Up => Script {
                direction,
                sql: m.up_sql(),
                path: m.up_path().to_string(),
                checksum: m.checksum().to_string(),
                legacy_checksums: Vec::new(),
            },
            Direction::Down => {
                let sql = m.down_sql().ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!("migration {} has no down.sql", m.dir_name()),
                    )
                    .at(m, None)
                })?;
                Script {
                    direction,
                    sql,
                    path: m.down_path(),
                    checksum: crate::source::checksum_of_sql(sql),
                    legacy_checksums: crate::source::legacy_checksums(sql),
                }
            }
        })
    }

    fn operation(&self) -> ledger::Operation<'_> {
        ledger::Operation {
            name: match self.direction {
                Direction::Up => "up",
                Direction::Down => "down",
            },
            checksum: &self.checksum,
        }
    }

    fn matches(&self, m: &Migration, recorded: &str) -> bool {
        match self.direction {
            Direction::Up => m.checksum_matches(recorded),
            Direction::Down => {
                recorded == self.checksum || self.legacy_checksums.iter().any(|c| c == recorded)
            }
        }
    }

    fn statements(&self, m: &Migration) -> Result<Vec<sql::Statement>, Error> {
        sql::split_statements(self.sql).map_err(|e| {
            Error::new(
                ErrorKind::InvalidSql,
                format!(
                    "{}:{}: {} (migration {})",
                    self.path,
                    e.line,
                    e.message,
                    m.dir_name()
                ),
            )
            .at(m, Some(e.line))
        })
    }

    /// `applying` / `reverting`, `applied` / `reverted`.
    fn verbs(&self) -> (&'static str, &'static str) {
        match self.direction {
            Direction::Up => ("applying", "applied"),
            Direction::Down => ("reverting", "reverted"),
        }
    }

    /// `migration X` or `the revert of migration X`.
    fn what(&self, m: &Migration) -> String {
        match self.direction {
            Direction::Up => format!("migration {}", m.dir_name()),
            Direction::Down => format!("the revert of migration {}", m.dir_name()),
        }
    }
}

/// Applies `m` on `conn`: a transactional migration in one transaction
/// with its ledger rows; a `run_in_transaction = false` one statement by
/// statement, with progress recorded after each and resuming after the last
/// statement `row` (its latest attempt) says completed. Call under the
/// track's lock, with `tables` resolved.
pub(crate) fn apply(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    row: Option<&LedgerRow>,
    options: &Options<'_>,
) -> Result<Applied, Error> {
    run(conn, tables, m, Direction::Up, row, options)
}

/// Reverts applied migration `m` with its `down.sql`, the way [`apply`]
/// applies it (in one transaction with its ledger rows, or statement by
/// statement with progress recorded and the same resume), removing its
/// version row. The caller has checked `down.sql` can run.
pub(crate) fn revert(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    row: Option<&LedgerRow>,
    options: &Options<'_>,
) -> Result<Applied, Error> {
    run(conn, tables, m, Direction::Down, row, options)
}

fn run(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    direction: Direction,
    row: Option<&LedgerRow>,
    options: &Options<'_>,
) -> Result<Applied, Error> {
    let script = Script::of(m, direction)?;
    if m.run_in_transaction() {
        run_transactional(conn, tables, m, &script)
    } else {
        run_statements(conn, tables, m, &script, row, options)
    }
}

/// 1-based line in the script of PostgreSQL's error position (a 1-based
/// character index into the statement), or of the statement's start.
fn error_line(script: &str, stmt: &sql::Statement, e: &DieselError) -> usize {
    let pos = match e {
        DieselError::DatabaseError(_, info) => info.statement_position(),
        _ => None,
    };
    match pos.and_then(|p| usize::try_from(p).ok()).filter(|p| *p > 0) {
        Some(p) => {
            let byte = stmt
                .sql
                .char_indices()
                .nth(p - 1)
                .map_or(stmt.sql.len(), |(b, _)| b);
            sql::line_of_offset(script, stmt.offset + byte)
        }
        None => stmt.line,
    }
}

fn run_transactional(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    script: &Script<'_>,
) -> Result<Applied, Error> {
    let statements = script.statements(m)?;
    let total = i32::try_from(statements.len()).unwrap_or(i32::MAX);
    let (doing, done) = script.verbs();
    let span = tracing::info_span!(
        "migration",
        version = m.version(),
        name = m.name(),
        track = %m.track(),
        transaction = true
    );
    let _enter = span.enter();
    tracing::info!(statements = total, "{doing} {}", m.dir_name());
    let start = Instant::now();
    let (result, failed_at, recorded, failed_line) = if in_transaction(conn) {
        // Inside the caller's transaction: a savepoint per migration, as
        // diesel nests them, statement by statement.
        run_nested(conn, tables, m, script, &statements, total)
    } else {
        run_whole(conn, tables, m, script, &statements, total)
    };
    let elapsed = start.elapsed();
    match result {
        Ok(()) => {
            tracing::info!(
                duration_ms = elapsed.as_millis() as u64,
                "{done} {}",
                m.dir_name()
            );
            Ok(Applied {
                version: m.version().to_string(),
                dir_name: m.dir_name().to_string(),
                track: m.track(),
                duration: elapsed,
                statements: statements.len(),
            })
        }
        Err(e) => {
            let (line, what) = match (failed_at, recorded) {
                (Some(s), _) => (
                    Some(failed_line.unwrap_or_else(|| error_line(script.sql, s, &e))),
                    "its SQL",
                ),
                // Deferred constraints are checked at COMMIT.
                (None, true) => (None, "COMMIT"),
                (None, false) => (None, "recording it in the ledger"),
            };
            let mut pg = describe_db_error(&e);
            let lock_timeout = is_lock_timeout(&e);
            if !is_connection_error(&e) {
                if let Some(s) = failed_at {
                    pg.push_str(&explain_lock_timeout(conn, &s.sql, &e));
                }
                if let Err(le) = ledger::record_failure(
                    conn,
                    tables,
                    m,
                    script.operation(),
                    &pg,
                    total,
                    elapsed.as_secs_f64(),
                ) {
                    tracing::warn!(error = %le, "could not record the failed attempt");
                }
            }
            let at = match line {
                Some(l) => format!("{}:{l}", script.path),
                None => script.path.clone(),
            };
            tracing::error!(error = %pg, line, "{} failed", script.what(m));
            let (kind, outcome) = if is_connection_error(&e) {
                (
                    ErrorKind::Connection,
                    "The connection broke, so whether its transaction committed is unknown: \
                     `rollout status` tells",
                )
            } else {
                (
                    ErrorKind::MigrationFailed,
                    "It ran in a transaction that was rolled back, so none of it is applied",
                )
            };
            let next = match script.direction {
                Direction::Up => {
                    "migrations before it stay applied. Fix it and deploy again; `rollout \
                     status` shows where the database stands"
                }
                Direction::Down => {
                    "it stays applied, and migrations reverted before it stay reverted. Fix \
                     down.sql (or undo it by hand and record that with `rollout resolve \
                     VERSION --rolled-back`); `rollout status` shows where the database stands"
                }
            };
            Err(Error::new(
                kind,
                format!(
                    "{} (track {}) failed in {what} at {at}: {pg}. {outcome}; {next}",
                    script.what(m),
                    m.track()
                ),
            )
            .at(m, line)
            .lock_timeout(lock_timeout))
        }
    }
}

/// Whether the caller's connection is inside a transaction diesel opened.
fn in_transaction(conn: &mut PgConnection) -> bool {
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    AnsiTransactionManager::transaction_manager_status_mut(conn)
        .transaction_depth()
        .ok()
        .flatten()
        .is_some()
}

/// The migration's SQL and its ledger rows in one transaction, sent in one
/// round trip (`BEGIN; script; ledger; COMMIT`). On failure (after a
/// `ROLLBACK`) the statement that failed is found from PostgreSQL's error
/// position, or else by running the statements again one at a time in a
/// transaction that is rolled back: nothing of that costs the success path.
/// Returns the result, the statement that failed, and whether the ledger
/// rows were written (a failure then is at `COMMIT`).
fn run_whole<'s>(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    script: &Script<'_>,
    statements: &'s [sql::Statement],
    total: i32,
) -> Outcome<'s> {
    const PREFIX: &str = "BEGIN;\n";
    let ledger_sql = match script.direction {
        Direction::Up => ledger::record_success_sql(tables, m, total),
        Direction::Down => ledger::record_revert_sql(tables, m, &script.checksum, total),
    };
    let batch = format!("{PREFIX}{}\n;\n{ledger_sql};\nCOMMIT", script.sql);
    let Err(e) = conn.batch_execute(&batch) else {
        return (Ok(()), None, true, None);
    };
    if is_connection_error(&e) {
        return (Err(e), None, false, None);
    }
    let _ = conn.batch_execute("ROLLBACK");
    // PostgreSQL's position counts characters of the whole batch.
    let position = match &e {
        DieselError::DatabaseError(_, info) => info.statement_position(),
        _ => None,
    }
    .and_then(|p| usize::try_from(p).ok())
    .filter(|p| *p > PREFIX.len());
    let script_chars = script.sql.chars().count();
    if let Some(p) = position {
        let char_offset = p - 1 - PREFIX.len();
        if char_offset < script_chars {
            let byte = script
                .sql
                .char_indices()
                .nth(char_offset)
                .map_or(script.sql.len(), |(b, _)| b);
            let at = statements
                .iter()
                .rev()
                .find(|s| s.offset <= byte)
                .or(statements.first());
            return (
                Err(e),
                at,
                false,
                Some(sql::line_of_offset(script.sql, byte)),
            );
        }
        // In the ledger statement.
        return (Err(e), None, false, None);
    }
    // No position: find the statement by running them again, rolled back.
    let (mut at, mut line) = (None, None);
    if conn.batch_execute("BEGIN").is_ok() {
        for s in statements {
            if let Err(again) = conn.batch_execute(&s.sql) {
                at = Some(s);
                line = Some(error_line(script.sql, s, &again));
                break;
            }
        }
        let _ = conn.batch_execute("ROLLBACK");
    }
    let recorded = at.is_none() && is_deferred_check(&e);
    (Err(e), at, recorded, line)
}

/// How a transactional run ended: the result, the statement that failed,
/// whether the ledger rows were written (a failure then is at `COMMIT`),
/// and the line of `up.sql` it failed at, when known.
type Outcome<'s> = (
    Result<(), DieselError>,
    Option<&'s sql::Statement>,
    bool,
    Option<usize>,
);

/// Whether an error is one PostgreSQL raises at `COMMIT` (a deferred
/// constraint), which running the statements again does not reproduce.
fn is_deferred_check(e: &DieselError) -> bool {
    matches!(
        e,
        DieselError::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation
                | diesel::result::DatabaseErrorKind::ForeignKeyViolation
                | diesel::result::DatabaseErrorKind::CheckViolation,
            _
        )
    )
}

/// As [`run_whole`], inside the caller's transaction: a savepoint, and the
/// statements one at a time.
fn run_nested<'s>(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    script: &Script<'_>,
    statements: &'s [sql::Statement],
    total: i32,
) -> Outcome<'s> {
    let mut failed_at = None;
    let mut recorded = false;
    let result = conn.transaction::<(), DieselError, _>(|c| {
        for s in statements {
            if let Err(e) = c.batch_execute(&s.sql) {
                failed_at = Some(s);
                return Err(e);
            }
        }
        match script.direction {
            Direction::Up => ledger::record_success(c, tables, m, total)?,
            Direction::Down => ledger::record_revert(c, tables, m, &script.checksum, total)?,
        }
        recorded = true;
        Ok(())
    });
    (result, failed_at, recorded, None)
}

/// Whether PostgreSQL cancelled the statement on `lock_timeout`.
fn is_lock_timeout(e: &DieselError) -> bool {
    matches!(e, DieselError::DatabaseError(_, info) if info.message().contains("lock timeout"))
}

/// When a statement failed on `lock_timeout`, says who is in the way: the
/// table it alters, and any index build running now.
fn explain_lock_timeout(conn: &mut PgConnection, statement: &str, e: &DieselError) -> String {
    if !is_lock_timeout(e) {
        return String::new();
    }
    let mut out = String::new();
    if let Some(table) = catalog::altered_table(statement) {
        out.push_str(&format!(" It could not lock table {table} in time"));
    } else {
        out.push_str(" It could not take a lock in time");
    }
    let builds = catalog::builds_in_progress(conn).unwrap_or_default();
    if builds.is_empty() {
        out.push_str(
            ": another session holds a conflicting lock (see pg_locks). It failed fast instead of \
             queueing traffic behind its lock request; run it again when the table is quiet",
        );
    } else {
        let list = builds
            .iter()
            .map(|b| {
                format!(
                    "pid {} ({}) running {} of index {} on {} ({})",
                    b.pid,
                    if b.application_name.is_empty() {
                        "no application_name"
                    } else {
                        &b.application_name
                    },
                    b.command,
                    if b.progress.index_name.is_empty() {
                        "?"
                    } else {
                        &b.progress.index_name
                    },
                    b.progress.table_name,
                    b.progress.phase
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        out.push_str(&format!(
            ": an index build holds the table: {list}. A deferred build keeps its table \
             locked against schema changes until it finishes; deploy this migration after \
             the build is done, or move the build after this migration"
        ));
    }
    out
}

/// A `run_in_transaction = false` migration: one statement at a time,
/// progress recorded after each, resuming after the last completed one.
fn run_statements(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    script: &Script<'_>,
    row: Option<&LedgerRow>,
    hooks: &Options<'_>,
) -> Result<Applied, Error> {
    let statements = script.statements(m)?;
    let total = i32::try_from(statements.len()).unwrap_or(i32::MAX);
    let (doing, done) = script.verbs();
    let unfinished = |r: &LedgerRow| match script.direction {
        Direction::Up => r.failed(),
        Direction::Down => r.revert_failed(),
    };
    let resolve = match script.direction {
        Direction::Up => "rollout resolve VERSION --applied (or --rolled-back)",
        Direction::Down => "rollout resolve VERSION --rolled-back (or --applied)",
    };
    let resume = match row {
        Some(r) if unfinished(r) && r.statements_completed.unwrap_or(0) > 0 => {
            if !r
                .attempt_checksum
                .as_deref()
                .is_some_and(|c| script.matches(m, c))
            {
                return Err(Error::new(
                    ErrorKind::PartialMigrationChanged,
                    format!(
                        "{} (no transaction) stopped halfway ({} of its statements completed) \
                         and {} changed since, so resuming it is unsafe. Restore the file that \
                         ran, or finish the work by hand and record it with `{resolve}`",
                        script.what(m),
                        r.statements_completed.unwrap_or(0),
                        script.path
                    ),
                )
                .at(m, None));
            }
            if r.statements_total.is_some_and(|n| n != total) {
                return Err(Error::new(
                    ErrorKind::PartialMigrationChanged,
                    format!(
                        "{} (no transaction) stopped halfway ({} of {} statements completed), \
                         and {} splits into {total} statements now: the split changed (an \
                         upgrade of diesel-rollout splits some SQL differently), so resuming \
                         could skip or repeat statements. Finish it with the release that \
                         started it, or check which statements ran, finish by hand and record \
                         it with `{resolve}`",
                        script.what(m),
                        r.statements_completed.unwrap_or(0),
                        r.statements_total.unwrap_or(0),
                        script.path
                    ),
                )
                .at(m, None));
            }
            usize::try_from(r.statements_completed.unwrap_or(0)).unwrap_or(0)
        }
        _ => 0,
    };
    let span = tracing::info_span!(
        "migration",
        version = m.version(),
        name = m.name(),
        track = %m.track(),
        transaction = false
    );
    let _enter = span.enter();
    if resume > 0 {
        tracing::info!(
            completed = resume,
            statements = total,
            "resuming {} after statement {resume}",
            match script.direction {
                Direction::Up => m.dir_name().to_string(),
                Direction::Down => format!("the revert of {}", m.dir_name()),
            }
        );
    } else {
        tracing::info!(
            statements = total,
            "{doing} {} statement by statement",
            m.dir_name()
        );
    }
    let start = Instant::now();
    let id = ledger::start_attempt(conn, tables, m, script.operation(), resume as i32, total)
        .map_err(|e| Error::db("recording the attempt", e))?;
    let dropped = std::cell::RefCell::new(Vec::<String>::new());
    let on_dropped = |name: &str| {
        dropped.borrow_mut().push(name.to_string());
        crate::metrics::invalid_index("found");
    };
    let checks = catalog::Checks {
        should_stop: hooks.should_stop,
        on_repaired: &on_dropped,
        poll: hooks.poll,
    };
    for (i, s) in statements.iter().enumerate().skip(resume) {
        if (hooks.should_stop)() {
            let why = format!("stopped by shutdown before statement {}", i + 1);
            if let Err(le) = ledger::finish_attempt(conn, tables, id, "interrupted", Some(&why)) {
                tracing::warn!(error = %le, "could not record the interrupted attempt");
            }
            return Err(Error::new(
                ErrorKind::Stopped,
                format!(
                    "{} stopped before statement {} of {total}: the next run resumes there",
                    script.what(m),
                    i + 1
                ),
            )
            .at(m, Some(s.line)));
        }
        (hooks.on_statement)(m, i, statements.len());
        tracing::debug!(statement = i + 1, line = s.line, "executing");
        let op = catalog::classify(&s.sql);
        let prepared = match &op {
            Some(op) => catalog::prepare(conn, op, m, s.line, &checks),
            None => Ok(()),
        };
        if let Err(e) = prepared {
            let outcome = if e.kind() == ErrorKind::Stopped {
                "interrupted"
            } else {
                hooks.failure_outcome
            };
            if let Err(le) = ledger::finish_attempt(conn, tables, id, outcome, Some(&e.to_string()))
            {
                tracing::warn!(error = %le, "could not record the failed attempt");
            }
            return Err(e);
        }
        if let Err(e) = conn.batch_execute(&s.sql) {
            let mut pg = describe_db_error(&e);
            let lock_timeout = is_lock_timeout(&e);
            let line = error_line(script.sql, s, &e);
            if !is_connection_error(&e) {
                pg.push_str(&explain_lock_timeout(conn, &s.sql, &e));
                if let Err(le) =
                    ledger::finish_attempt(conn, tables, id, hooks.failure_outcome, Some(&pg))
                {
                    tracing::warn!(error = %le, "could not record the failed attempt");
                }
            }
            tracing::error!(error = %pg, statement = i + 1, line, "{} failed", script.what(m));
            let kind = if is_connection_error(&e) {
                ErrorKind::Connection
            } else {
                ErrorKind::MigrationFailed
            };
            return Err(Error::new(
                kind,
                format!(
                    "{} (track {}, no transaction) failed at {}:{line}, statement {} of \
                     {total}: {pg}. Statements 1 to {i} completed and stay {done}; the next \
                     run resumes at statement {}. Fix the cause (or the statement, if it never \
                     ran) and run again; `rollout status` shows where it stopped",
                    script.what(m),
                    m.track(),
                    script.path,
                    i + 1,
                    i + 1
                ),
            )
            .at(m, Some(line))
            .lock_timeout(lock_timeout));
        }
        if let Some(op) = &op {
            let confirmed = catalog::confirm(conn, op, m, s.line);
            if confirmed.is_ok() {
                for name in dropped.take() {
                    crate::metrics::invalid_index("repaired");
                    (hooks.on_index_repaired)(&name);
                }
            }
            if let Err(e) = confirmed {
                if let Err(le) = ledger::finish_attempt(
                    conn,
                    tables,
                    id,
                    hooks.failure_outcome,
                    Some(&e.to_string()),
                ) {
                    tracing::warn!(error = %le, "could not record the failed attempt");
                }
                return Err(e);
            }
        }
        // The last statement's progress goes with the end of the attempt,
        // in the same round trip (and the same transaction).
        if i + 1 < statements.len() {
            ledger::progress(conn, tables, id, (i + 1) as i32)
                .map_err(|e| Error::db("recording progress", e).at(m, Some(s.line)))?;
        }
    }
    // The version row and the attempt's success in one round trip.
    let finish =
        ledger::finish_statements_sql(tables, m, script.direction == Direction::Up, id, total);
    if let Err(e) = conn.batch_execute(&finish) {
        // A failure inside the batch leaves its transaction open and
        // aborted: end it, so the connection is usable and nothing of it
        // is half-recorded.
        let _ = conn.batch_execute("ROLLBACK");
        return Err(Error::db(&format!("recording the migration as {done}"), e).at(m, None));
    }
    let elapsed = start.elapsed();
    tracing::info!(
        duration_ms = elapsed.as_millis() as u64,
        "{done} {}",
        m.dir_name()
    );
    Ok(Applied {
        version: m.version().to_string(),
        dir_name: m.dir_name().to_string(),
        track: m.track(),
        duration: elapsed,
        statements: statements.len() - resume,
    })
}
