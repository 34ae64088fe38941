//! A transactional migration's run: its SQL and its ledger rows in one
//! transaction, sent in one round trip, under the migration's own lock;
//! on failure, where in `up.sql` it failed and whether another session has
//! the migration (applied meanwhile, or running it now).

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::Error as DieselError;

use super::script::{error_line, explain_lock_timeout, is_lock_timeout, Script};
use super::{in_transaction, own_key, Direction};
use crate::error::{describe_db_error, is_connection_error, Error, ErrorKind};
use crate::ledger::{self, Tables};
use crate::lock;
use crate::locks;
use crate::migration::Migration;
use crate::report::Applied;
use crate::source::sql;

/// How much older than the batch a transaction holding a lock a statement
/// needs must be to count as what a timed-out statement waited for, beyond
/// one round trip: a transaction that blocked it for the whole lock timeout
/// began well before, while a reader queued behind the migration's own lock
/// may begin a few milliseconds after the batch was sent.
const OLDER_BY: Duration = Duration::from_millis(50);

pub(super) fn run_transactional(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    script: &Script<'_>,
) -> Result<Option<Applied>, Error> {
    let statements = &script.statements(m)?;
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
    let (result, failed_at, stage, failed_line) = if in_transaction(conn) {
        // Inside the caller's transaction: a savepoint per migration, as
        // diesel nests them, statement by statement.
        run_nested(conn, tables, m, script, statements, total)
    } else {
        run_whole(conn, tables, m, script, statements, total)
    };
    let elapsed = start.elapsed();
    match result {
        Ok(()) => {
            tracing::info!(
                duration_ms = elapsed.as_millis() as u64,
                "{done} {}",
                m.dir_name()
            );
            Ok(Some(Applied {
                version: m.version().to_string(),
                dir_name: m.dir_name().to_string(),
                track: m.track(),
                duration: elapsed,
                statements: statements.len(),
            }))
        }
        Err(_) if stage == Stage::Elsewhere => Ok(None),
        Err(_) if matches!(stage, Stage::HalfDone(..)) => {
            let Stage::HalfDone(done, total) = stage else {
                unreachable!()
            };
            Err(super::half_done_error(m, script, done, total))
        }
        Err(_) if matches!(stage, Stage::Claimed(_)) => {
            let Stage::Claimed(pid) = stage else {
                unreachable!()
            };
            let who = pid.map_or_else(String::new, |p| format!("backend pid {p}, "));
            Err(Error::new(
                ErrorKind::LockTimeout,
                format!(
                    "migration {} is being applied now by another session ({who}holding the \
                     migration's own lock): a release that has it on the other track runs it \
                     under that track's lock. Nothing of it ran here; wait for that run to \
                     finish (`rollout status`), then run again",
                    m.dir_name()
                ),
            )
            .at(m, None)
            .lock_timeout(true))
        }
        Err(e) => {
            let (line, what) = match (failed_at, stage) {
                (Some(s), _) => (
                    Some(failed_line.unwrap_or_else(|| error_line(script.sql, s, &e))),
                    "its SQL".to_string(),
                ),
                // Deferred constraints are checked at COMMIT.
                (None, Stage::Commit) => (None, "COMMIT".to_string()),
                (None, Stage::Ledger) => (None, "recording it in the ledger".to_string()),
                // Guessed comes with its statement.
                (None, Stage::Guessed) => (None, "its SQL".to_string()),
                (None, Stage::Unlocated(why)) => {
                    (None, format!("its SQL or its ledger rows ({why})"))
                }
                (None, Stage::Elsewhere | Stage::Claimed(_) | Stage::HalfDone(..)) => {
                    unreachable!("handled above")
                }
            };
            let mut pg = describe_db_error(&e);
            let lock_timeout = is_lock_timeout(&e);
            if !is_connection_error(&e) {
                let statement = failed_at.map_or("", |s| s.sql.as_str());
                pg.push_str(&explain_lock_timeout(conn, statement, &e));
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
                Some(l) if stage == Stage::Guessed => format!(
                    "{}:{l} (probably: the first statement that needs a lock on a table an \
                     older transaction holds)",
                    script.path
                ),
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

/// Whether a transactional run failed, after its rollback, because another
/// session has the migration (a release that has it on the other track,
/// under a lock this one does not take): being run now (its own lock was
/// held), or applied meanwhile (its version row was there, under some
/// spelling, when this run inserted its own). Nothing of this run is left.
/// One read, on the failure path only.
fn not_here(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    script: &Script<'_>,
    e: &DieselError,
) -> Option<Stage> {
    if is_connection_error(e) || script.direction != Direction::Up {
        return None;
    }
    // Refused its own lock; or failed otherwise while another session
    // holds it (its run's effects in the way): either way that run is not
    // this one's to record a failure over.
    let holder = lock::holder(conn, &[own_key(tables, m)]).ok().flatten();
    if ledger::is_claim_refused(tables, e) || holder.is_some() {
        return Some(Stage::Claimed(holder.map(|h| h.pid)));
    }
    match ledger::row(conn, tables, m.version()) {
        Ok(Some(r)) if r.applied => {
            tracing::info!(
                error = %describe_db_error(e),
                "{} failed as another session applied it meanwhile: nothing of this run is left",
                m.dir_name()
            );
            Some(Stage::Elsewhere)
        }
        Ok(Some(r)) if r.up_half_done() => Some(Stage::HalfDone(
            r.statements_completed.unwrap_or(0),
            r.statements_total.unwrap_or(0),
        )),
        _ => None,
    }
}

/// The migration's SQL and its ledger rows in one transaction, sent in one
/// round trip (`BEGIN; script; version row and attempt; COMMIT`, the
/// version row only under the migration's own lock: see
/// [`ledger::record_success_sql`]). On failure (after a
/// `ROLLBACK`) the statement that failed is found from PostgreSQL's error
/// position; a lock timeout's from the locks other transactions hold; any
/// other, unless a replay would repeat it (see [`not_replayed`]), by
/// running the statements again one at a time in a transaction that is
/// rolled back: nothing of that costs the success path. Returns the
/// result, the statement that failed, where else it failed, and its line.
fn run_whole<'s>(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    script: &Script<'_>,
    statements: &'s [sql::Statement],
    total: i32,
) -> Outcome<'s> {
    let prefix = "BEGIN;\n";
    let ledger_sql = match script.direction {
        Direction::Up => ledger::record_success_sql(tables, m, total, own_key(tables, m)),
        Direction::Down => ledger::record_revert_sql(tables, m, &script.checksum, total),
    };
    let batch = format!("{prefix}{}\n;\n{ledger_sql};\nCOMMIT", script.sql);
    let sent = Instant::now();
    let Err(e) = conn.batch_execute(&batch) else {
        return (Ok(()), None, Stage::Commit, None);
    };
    if is_connection_error(&e) {
        return (Err(e), None, Stage::Unlocated("the connection broke"), None);
    }
    let rolling_back = Instant::now();
    let _ = conn.batch_execute("ROLLBACK");
    let round_trip = rolling_back.elapsed();
    if let Some(stage) = not_here(conn, tables, m, script, &e) {
        return (Err(e), None, stage, None);
    }
    // PostgreSQL's position counts characters of the whole batch.
    let position = match &e {
        DieselError::DatabaseError(_, info) => info.statement_position(),
        _ => None,
    }
    .and_then(|p| usize::try_from(p).ok());
    let prefix_chars = prefix.chars().count();
    let script_chars = script.sql.chars().count();
    if let Some(p) = position {
        if p <= prefix_chars {
            return (Err(e), None, Stage::Ledger, None);
        }
        let char_offset = p - 1 - prefix_chars;
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
                Stage::Ledger,
                Some(sql::line_of_offset(script.sql, byte)),
            );
        }
        // In the ledger statement.
        return (Err(e), None, Stage::Ledger, None);
    }
    if is_lock_timeout(&e) {
        // Not run again (it would wait as long again): probably the first
        // statement that needs a lock on a table that a transaction older
        // than this run holds in a conflicting mode (the readers queued
        // behind the migration's own request came later).
        // Older than the batch by a margin: the server reads its clock a
        // round trip (or a scheduling delay) after this process does, and
        // a reader queued behind the migration's own lock began only just
        // after the batch was sent.
        let margin = round_trip + OLDER_BY;
        let at = statements.iter().find(|s| {
            locks::of_statement(&s.sql).iter().any(|l| {
                let older_than = (sent.elapsed() + margin).as_secs_f64();
                held_against(conn, &l.table, locks::conflicting(l.mode), older_than)
                    .unwrap_or(false)
            })
        });
        let stage = if at.is_some() {
            Stage::Guessed
        } else {
            Stage::Unlocated(NOT_REPLAYED)
        };
        return (Err(e), at, stage, at.map(|s| s.line));
    }
    if let Some(why) = not_replayed(&e) {
        return (Err(e), None, Stage::Unlocated(why), None);
    }
    // No position: find the statement by running them again, rolled back.
    let (mut at, mut line) = (None, None);
    let began = conn.batch_execute("BEGIN").is_ok();
    if began {
        for s in statements {
            if let Err(again) = conn.batch_execute(&s.sql) {
                at = Some(s);
                line = Some(error_line(script.sql, s, &again));
                break;
            }
        }
        let _ = conn.batch_execute("ROLLBACK");
    }
    let stage = if at.is_some() {
        Stage::Ledger
    } else if !began {
        Stage::Unlocated("PostgreSQL gave no position, and the statements could not be run again")
    } else if is_deferred_check(&e) {
        Stage::Commit
    } else {
        Stage::Unlocated(
            "its statements, run again in a transaction that was rolled back, did not fail again",
        )
    };
    (Err(e), at, stage, line)
}

/// How a transactional run ended: the result, the statement that failed,
/// where it failed when not in a statement, and the line of `up.sql` it
/// failed at, when known.
type Outcome<'s> = (
    Result<(), DieselError>,
    Option<&'s sql::Statement>,
    Stage,
    Option<usize>,
);

/// Where a transactional run failed, when no statement of it is known to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Writing its ledger rows.
    Ledger,
    /// At `COMMIT`, after its ledger rows were written (a deferred
    /// constraint).
    Commit,
    /// Somewhere in its SQL or its ledger rows; why it is not known where.
    Unlocated(&'static str),
    /// In the statement given, probably (a lock timeout located by the
    /// locks other transactions hold).
    Guessed,
    /// Before any of its SQL: another session applied it meanwhile.
    Elsewhere,
    /// Before any of its SQL: an attempt outside a transaction, by another
    /// session meanwhile, stopped with this many of so many statements done.
    HalfDone(i32, i32),
    /// Before any of its SQL: its own lock was held by another session
    /// (this backend pid, unless it let go since), which runs it now.
    Claimed(Option<i32>),
}

const NOT_REPLAYED: &str = "PostgreSQL gave no position, and after a timeout, a cancel, a \
                            deadlock, a serialization failure or a resource error the \
                            statements are not run again to find it";

/// Why a failure with no position is not located by running the
/// statements again (rolled back): after a timeout or a cancel the replay
/// would hold the same locks, or run as long, a second time (a DBA's
/// `pg_cancel_backend` undone); a deadlock, a serialization failure or the
/// server running out of something may not happen again, so it would find
/// nothing. Matched on PostgreSQL's English messages (diesel does not give
/// the SQLSTATE); under another `lc_messages` these are replayed.
fn not_replayed(e: &DieselError) -> Option<&'static str> {
    let DieselError::DatabaseError(kind, info) = e else {
        return Some("the error did not come from PostgreSQL");
    };
    let m = info.message();
    let transient = [
        "canceling statement due to",
        "deadlock detected",
        "could not obtain lock",
        "could not serialize access",
        "out of memory",
        "out of shared memory",
        "could not extend file",
        "No space left on device",
        "temporary file size exceeds",
    ];
    (matches!(
        kind,
        diesel::result::DatabaseErrorKind::SerializationFailure
    ) || transient.iter().any(|t| m.contains(t)))
    .then_some(NOT_REPLAYED)
}

/// Whether another session's transaction that began more than `secs`
/// seconds ago holds a lock on `table` (as written) in one of `modes`.
fn held_against(
    conn: &mut PgConnection,
    table: &str,
    modes: &[&str],
    secs: f64,
) -> QueryResult<bool> {
    use diesel::sql_types::{Array, Double, Text};
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        found: bool,
    }
    if modes.is_empty() {
        return Ok(false);
    }
    diesel::sql_query(include_str!("../sql/held_against.sql"))
        .bind::<Text, _>(table)
        .bind::<Array<Text>, _>(modes)
        .bind::<Double, _>(secs)
        .get_result::<Found>(conn)
        .map(|f| f.found)
}

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
    let mut stage = Stage::Ledger;
    let result = conn.transaction::<(), DieselError, _>(|c| {
        for s in statements {
            if let Err(e) = c.batch_execute(&s.sql) {
                failed_at = Some(s);
                return Err(e);
            }
        }
        match script.direction {
            Direction::Up => c.batch_execute(&ledger::record_success_sql(
                tables,
                m,
                total,
                own_key(tables, m),
            ))?,
            Direction::Down => ledger::record_revert(c, tables, m, &script.checksum, total)?,
        }
        stage = Stage::Commit;
        Ok(())
    });
    if let Err(e) = &result {
        if let Some(elsewhere) = not_here(conn, tables, m, script, e) {
            return (result, None, elsewhere, None);
        }
    }
    (result, failed_at, stage, None)
}
