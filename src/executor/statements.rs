//! A `run_in_transaction = false` migration: one statement at a time, its
//! progress recorded after each, resuming where an earlier attempt stopped.

use std::time::Instant;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;

use super::script::{
    error_line, explain_lock_timeout, is_lock_timeout, Direction, Options, Script,
};
use crate::catalog;
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
