//! A `run_in_transaction = false` migration: one statement at a time, its
//! progress recorded after each, resuming where an earlier attempt stopped.

use std::time::Instant;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;

use super::script::{
    error_line, explain_lock_timeout, is_lock_timeout, Direction, Options, Script,
};
use crate::catalog;
use crate::catalog::partition::DetachState;
use crate::error::{describe_db_error, is_connection_error, Error, ErrorKind};
use crate::ledger::{self, LedgerRow, Tables};
use crate::migration::Migration;
use crate::report::Applied;

/// A `run_in_transaction = false` migration: one statement at a time,
/// progress recorded after each, resuming after the last completed one.
pub(super) fn run_statements(
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
    let mut recorded_end = false;
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
        let last = i + 1 == statements.len();
        // Before a concurrent index statement: wait for a build still
        // running (an earlier attempt's among them) and drop an invalid
        // leftover, so what follows sees how that build ended.
        let prepared = match &op {
            Some(op) => catalog::prepare(conn, op, &s.sql, m, s.line, &checks),
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
        // The statement an attempt was running when its process died may
        // have finished on the server after the client was gone: an index
        // it was building that now exists, valid, one it was dropping that
        // is gone, or a partition it was detaching that is detached, is
        // done.
        let died_here = row.is_some_and(|r| {
            unfinished(r)
                && r.outcome.as_deref() == Some("interrupted")
                && r.error.as_deref().is_some_and(|e| {
                    e.starts_with(ledger::DIED) || e.starts_with(ledger::UNCONFIRMED)
                })
                && r.statements_completed.unwrap_or(0) as usize == i
                && r.attempt_checksum
                    .as_deref()
                    .is_some_and(|c| script.matches(m, c))
        });
        let detach = catalog::partition::detach_concurrently(&s.sql);
        let detach_state = detach.as_ref().and_then(|d| d.state(conn).ok());
        let found = if !died_here {
            None
        } else if let Some(op) = &op {
            catalog::finished::by_dead_attempt(conn, op, &s.sql)
                .ok()
                .flatten()
        } else {
            (detach_state == Some(DetachState::Detached))
                .then_some("detaches a partition that is detached")
        };
        if let Some(found) = found {
            tracing::warn!(
                statement = i + 1,
                line = s.line,
                "statement {} of {} {found}: the attempt whose process died at this \
                 statement finished it after its client went away; counting it as done",
                i + 1,
                m.dir_name()
            );
            if !last {
                ledger::progress(conn, tables, id, (i + 1) as i32)
                    .map_err(|e| Error::db("recording progress", e).at(m, Some(s.line)))?;
            }
            continue;
        }
        // A detach stopped halfway (by anyone: PostgreSQL lets only one
        // run on a table at a time) is completed, not started again.
        let finalize = detach
            .filter(|_| detach_state == Some(DetachState::Pending))
            .map(|d| d.finalize_sql());
        if let Some(f) = &finalize {
            tracing::warn!(
                statement = i + 1,
                line = s.line,
                "statement {} of {}: the partition is pending detach (an earlier detach stopped \
                 halfway); completing it with `{f}`",
                i + 1,
                m.dir_name()
            );
        }
        let sql = finalize.as_deref().unwrap_or(&s.sql);
        // A statement that can run in a transaction goes with its progress
        // (the last one with the version row) in one round trip, which
        // PostgreSQL runs as one transaction: a client that dies between
        // the two can no longer leave it done but not recorded, to be run
        // again by the next attempt.
        let mut together = op.is_none() && in_one_transaction(sql);
        let mut sent = if together {
            let record = if last {
                ledger::finish_statements_sql(
                    tables,
                    m,
                    script.direction == Direction::Up,
                    id,
                    total,
                )
            } else {
                ledger::progress_sql(tables, id, (i + 1) as i32)
            };
            conn.batch_execute(&format!("{sql}\n;\n{record}"))
        } else {
            conn.batch_execute(sql)
        };
        if together && sent.as_ref().is_err_and(refused_in_a_transaction) {
            // A command PostgreSQL (or an extension's, which the list above
            // cannot know) refuses in a transaction block is refused before
            // it does anything: send it alone.
            tracing::debug!(statement = i + 1, "refused in a transaction: sent alone");
            let _ = conn.batch_execute("ROLLBACK");
            together = false;
            sent = conn.batch_execute(sql);
        }
        if let Err(e) = sent {
            // A failure inside a transaction block (the last statement's
            // own BEGIN, or one the migration opened) leaves it open and
            // aborted: end it, so the failure can be recorded. Otherwise
            // PostgreSQL has rolled back already (a warning, swallowed).
            let _ = conn.batch_execute("ROLLBACK");
            let mut pg = describe_db_error(&e);
            let lock_timeout = is_lock_timeout(&e);
            let line = error_line(script.sql, s, &e);
            // What stays done is what was recorded: a transaction the
            // migration opened itself took its statements' progress with it.
            let mut completed = i;
            // A shutdown cancels the running statement (`StopMode::Cancel`):
            // that is a stop, which the next run (this replica's or
            // another's) resumes, not a failure a leader gives up on.
            let stopping = (hooks.should_stop)();
            if !is_connection_error(&e) {
                if let Ok(n) = ledger::attempt_progress(conn, tables, id) {
                    completed = usize::try_from(n).unwrap_or(i).min(i);
                }
                pg.push_str(&explain_lock_timeout(conn, &s.sql, &e));
                let (outcome, why) = if stopping {
                    ("interrupted", format!("stopped by shutdown: {pg}"))
                } else {
                    (hooks.failure_outcome, pg.clone())
                };
                if let Err(le) = ledger::finish_attempt(conn, tables, id, outcome, Some(&why)) {
                    tracing::warn!(error = %le, "could not record the failed attempt");
                }
            }
            tracing::error!(error = %pg, statement = i + 1, line, "{} failed", script.what(m));
            let kind = if is_connection_error(&e) {
                ErrorKind::Connection
            } else if stopping {
                ErrorKind::Stopped
            } else {
                ErrorKind::MigrationFailed
            };
            return Err(Error::new(
                kind,
                format!(
                    "{} (track {}, no transaction) failed at {}:{line}, statement {} of \
                     {total}: {pg}. {}; the next run resumes at statement {}. {}; `rollout \
                     status` shows where it stopped",
                    script.what(m),
                    m.track(),
                    script.path,
                    i + 1,
                    match completed {
                        0 => "No statement of it completed".to_string(),
                        n => format!("Statements 1 to {n} completed and stay {done}"),
                    },
                    completed + 1,
                    match completed {
                        0 => format!("Fix the cause, or {}, and run again", script.path),
                        n => format!(
                            "Fix the cause and run again, leaving {} as it is: the resume \
                             checks it is the file statements 1 to {n} ran from, and refuses \
                             an edited one. If the statement itself is wrong, undo statements \
                             1 to {n} by hand, record that with `rollout resolve {} {}`, \
                             then fix it",
                            script.path,
                            m.version(),
                            match script.direction {
                                Direction::Up => "--rolled-back",
                                Direction::Down => "--applied",
                            }
                        ),
                    }
                ),
            )
            .at(m, Some(line))
            .lock_timeout(lock_timeout));
        }
        if let Some(op) = &op {
            let mut confirmed = catalog::confirm(conn, op, &s.sql, m, s.line);
            // A check that could not be made (a shutdown's cancel landing on
            // it): the statement's success proves its work done, but for
            // `IF NOT EXISTS`, which may have skipped an invalid index; that
            // one is left to the next attempt's look.
            let not_a_verdict = confirmed
                .as_ref()
                .is_err_and(|e| e.kind() != ErrorKind::MigrationFailed);
            let if_not_exists = matches!(
                op,
                catalog::IndexOp::Create {
                    if_not_exists: true,
                    ..
                }
            );
            if not_a_verdict && !if_not_exists {
                if let Err(e) = &confirmed {
                    tracing::warn!(
                        statement = i + 1,
                        error = %e,
                        "statement {} of {} succeeded; its check against the catalog could \
                         not be made, and its success is taken as done",
                        i + 1,
                        m.dir_name()
                    );
                }
                confirmed = Ok(());
            }
            if confirmed.is_ok() {
                for name in dropped.take() {
                    crate::metrics::invalid_index("repaired");
                    (hooks.on_index_repaired)(&name);
                }
            }
            if let Err(e) = confirmed {
                // A verdict (the index is invalid, or was never built) is a
                // failure; an `IF NOT EXISTS` build whose check could not be
                // made is left to the next attempt, which runs it again (a
                // no-op once the index is there) and checks it.
                let (outcome, why) = if not_a_verdict {
                    ("interrupted", format!("{}: {e}", ledger::UNCONFIRMED))
                } else {
                    (hooks.failure_outcome, e.to_string())
                };
                if let Err(le) = ledger::finish_attempt(conn, tables, id, outcome, Some(&why)) {
                    tracing::warn!(error = %le, "could not record the failed attempt");
                }
                return Err(e);
            }
        }
        if together {
            recorded_end |= last;
            continue;
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
    if recorded_end {
        // Sent with the last statement.
    } else if let Err(e) = conn.batch_execute(&finish) {
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

/// Whether a statement can run inside a transaction block, so it can be
/// sent with its progress as one implicit transaction. Not: transaction
/// control, `CALL` and a `DO` block that may commit, anything
/// `CONCURRENTLY`, and the commands PostgreSQL refuses in a transaction
/// block.
fn in_one_transaction(statement: &str) -> bool {
    let Ok(tokens) = crate::source::sql::tokens(statement) else {
        return false;
    };
    let word = |i: usize| {
        tokens
            .get(i)
            .filter(|t| t.kind == crate::source::sql::TokenKind::Word)
            .map(|t| t.text.to_ascii_lowercase())
            .unwrap_or_default()
    };
    let words: Vec<String> = (0..tokens.len()).map(word).collect();
    if words.iter().any(|w| w == "concurrently") {
        return false;
    }
    let alone = [
        "begin",
        "start",
        "commit",
        "end",
        "rollback",
        "abort",
        "savepoint",
        "release",
        "prepare",
        "call",
        "vacuum",
        "cluster",
        "reindex",
        "discard",
        "checkpoint",
    ];
    let first = words.first().map(String::as_str).unwrap_or("");
    let second = words.get(1).map(String::as_str).unwrap_or("");
    if first.is_empty() || alone.contains(&first) {
        return false;
    }
    // `SET LOCAL` and `SET TRANSACTION` would reach the progress write in
    // the same transaction (a read-only one, another role).
    if first == "set" && matches!(second, "local" | "transaction" | "session") {
        return false;
    }
    if first == "do" {
        // A `DO` block may commit (a backfill in batches), or call a
        // procedure that does: only one whose body says neither can share
        // a transaction.
        let body = tokens
            .iter()
            .filter(|t| t.kind == crate::source::sql::TokenKind::Literal)
            .map(|t| t.text.to_ascii_lowercase())
            .collect::<String>();
        return !["commit", "rollback", "call", "concurrently"]
            .iter()
            .any(|w| body.contains(w));
    }
    !matches!(
        (first, second),
        (
            "create" | "drop",
            "database" | "tablespace" | "subscription"
        ) | ("alter", "database" | "system" | "subscription")
    )
}

/// Whether PostgreSQL refused a statement because it ran in a transaction
/// block or a multi-statement query (`PreventInTransactionBlock`, SQLSTATE
/// 25001, which diesel does not expose: matched on the server's English
/// message).
fn refused_in_a_transaction(e: &diesel::result::Error) -> bool {
    match e {
        diesel::result::Error::DatabaseError(_, info) => {
            let m = info.message();
            m.contains("cannot run inside a transaction block")
                || m.contains("cannot be executed within a pipeline")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{in_one_transaction, refused_in_a_transaction};

    /// A server error with a message, as diesel reports one.
    struct Message(&'static str);

    impl diesel::result::DatabaseErrorInformation for Message {
        fn message(&self) -> &str {
            self.0
        }
        fn details(&self) -> Option<&str> {
            None
        }
        fn hint(&self) -> Option<&str> {
            None
        }
        fn table_name(&self) -> Option<&str> {
            None
        }
        fn column_name(&self) -> Option<&str> {
            None
        }
        fn constraint_name(&self) -> Option<&str> {
            None
        }
        fn statement_position(&self) -> Option<i32> {
            None
        }
    }

    fn server_error(message: &'static str) -> diesel::result::Error {
        diesel::result::Error::DatabaseError(
            diesel::result::DatabaseErrorKind::Unknown,
            Box::new(Message(message)),
        )
    }

    /// PostgreSQL's own messages (as `psql -c "VACUUM t; SELECT 1"` prints
    /// them), and TimescaleDB's for a continuous aggregate.
    #[test]
    fn a_refusal_in_a_transaction_is_recognised() {
        for m in [
            "VACUUM cannot run inside a transaction block",
            "CREATE INDEX CONCURRENTLY cannot run inside a transaction block",
            "CREATE MATERIALIZED VIEW ... WITH DATA cannot run inside a transaction block",
            "CREATE DATABASE cannot be executed within a pipeline",
        ] {
            assert!(refused_in_a_transaction(&server_error(m)), "{m}");
        }
        for m in [
            "relation \"t\" already exists",
            "VACUUM cannot be executed from a function",
            "current transaction is aborted, commands ignored until end of transaction block",
        ] {
            assert!(!refused_in_a_transaction(&server_error(m)), "{m}");
        }
    }

    #[test]
    fn what_shares_a_transaction_with_its_progress() {
        for s in [
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET x = 1",
            "ALTER TABLE t ADD COLUMN y int",
            "CREATE TABLE t (x int)",
            "SELECT pg_sleep(1)",
            "DO $$ BEGIN UPDATE t SET x = 2; END $$",
            "REFRESH MATERIALIZED VIEW v",
            "SET lock_timeout = '1s'",
        ] {
            assert!(in_one_transaction(s), "{s}");
        }
        for s in [
            "CREATE INDEX CONCURRENTLY i ON t (x)",
            "DROP INDEX CONCURRENTLY IF EXISTS i",
            "REINDEX INDEX CONCURRENTLY i",
            "ALTER TABLE p DETACH PARTITION c CONCURRENTLY",
            "VACUUM t",
            "vacuum analyze t",
            "BEGIN",
            "COMMIT",
            "SAVEPOINT a",
            "CALL backfill()",
            "DO $$ BEGIN LOOP EXIT WHEN true; COMMIT; END LOOP; END $$",
            "DO $$ BEGIN CALL p(); END $$",
            "CREATE DATABASE x",
            "DROP TABLESPACE x",
            "ALTER SYSTEM SET work_mem = '1MB'",
            "CREATE SUBSCRIPTION s CONNECTION 'x' PUBLICATION p",
            "CLUSTER t USING i",
            "DISCARD ALL",
            "SET LOCAL ROLE app",
            "SET TRANSACTION READ ONLY",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "",
        ] {
            assert!(!in_one_transaction(s), "{s}");
        }
    }
}
