//! `plan`: what `up` would do now against a database, read-only: each
//! pending migration in the order `up` runs them, how it runs, its
//! statements and the lock each takes.

use diesel::prelude::*;

use crate::error::Error;
use crate::ledger;
use crate::locks::{self, TableLock};
use crate::migration::{normal, Migration};
use crate::migrator::Migrator;
use crate::source::{sql, Track};

/// What `up` would do now (see [`Migrator::plan`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Plan {
    /// The pending migrations, in the order `up` would run them.
    pub steps: Vec<PlanStep>,
}

impl Plan {
    /// `true` when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// How `up` would run one pending migration.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PlanStep {
    /// The version.
    pub version: String,
    /// The directory name.
    pub dir_name: String,
    /// The track.
    pub track: Track,
    /// In a transaction (`false`: statement by statement).
    pub transaction: bool,
    /// What happens to it.
    pub action: PlanAction,
    /// Deferred migrations it waits for (`requires_deferred`) that are not
    /// applied yet.
    pub waits_for: Vec<String>,
    /// Older than a migration already applied (a branch merged late).
    pub out_of_order: bool,
    /// Its statements.
    pub statements: Vec<PlannedStatement>,
}

/// Whether a pending migration runs for the first time, again, or from
/// where it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlanAction {
    /// Never attempted, or rolled back: runs from the first statement.
    Apply,
    /// A transactional migration whose last attempt failed: runs again
    /// whole.
    Retry {
        /// The last attempt's error.
        error: String,
    },
    /// A no-transaction migration that stopped halfway: resumes after the
    /// statements already done.
    Resume {
        /// Statements already done (the next one is `done + 1`).
        done: usize,
    },
}

/// One statement of a planned migration.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PlannedStatement {
    /// 1-based line in `up.sql`.
    pub line: usize,
    /// Its first line of text.
    pub first_line: String,
    /// Already done by an earlier attempt (skipped on a resume).
    pub done: bool,
    /// The table locks it takes (an estimate from its text).
    pub locks: Vec<TableLock>,
}

impl Migrator {
    /// What `up` would do now against the database of `conn`, without
    /// changing it and without taking a lock: each pending migration of
    /// both tracks, in the order `up` would run them (required migrations
    /// first, a deferred one a required one waits for before it), with its
    /// statements, the lock each takes, and whether it would be retried or
    /// resumed. Works on a read-only session.
    ///
    /// # Errors
    /// When the ledger cannot be read.
    pub fn plan(&self, conn: &mut PgConnection) -> Result<Plan, Error> {
        let tables = self.ledger()?.resolve(conn)?;
        let rows = ledger::rows(conn, &tables)?;
        let required = self.analyze(&rows, Track::Required);
        let deferred = self.analyze(&rows, Track::Deferred);
        let plan = self.deferred_plan(&rows);
        // As `up` goes: the required track up to what waits for a deferred
        // migration, the deferred migrations the deferred track may run,
        // then the rest of each.
        let mut order: Vec<&Migration> = plan.waiting_for.clone();
        order.extend(plan.runnable.iter().copied());
        for m in required.pending.iter().chain(deferred.pending.iter()) {
            if !order.iter().any(|o| o.version() == m.version()) {
                order.push(m);
            }
        }
        let pending_deferred = |v: &str| {
            deferred
                .pending
                .iter()
                .any(|d| normal(d.version()) == normal(v))
        };
        let mut steps = Vec::new();
        for m in order {
            let row = rows
                .iter()
                .find(|r| normal(&r.version) == normal(m.version()));
            let action = match row {
                Some(r) if r.failed() && !m.run_in_transaction() => match r.statements_completed {
                    Some(n) if n > 0 => PlanAction::Resume { done: n as usize },
                    _ => PlanAction::Retry {
                        error: r.error.clone().unwrap_or_default(),
                    },
                },
                Some(r) if r.failed() => PlanAction::Retry {
                    error: r.error.clone().unwrap_or_default(),
                },
                _ => PlanAction::Apply,
            };
            let done = match action {
                PlanAction::Resume { done } => done,
                _ => 0,
            };
            let statements = sql::split_statements(m.up_sql())
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, s)| PlannedStatement {
                    line: s.line,
                    first_line: s.sql.lines().next().unwrap_or("").trim().to_string(),
                    done: i < done,
                    locks: locks::of_statement(&s.sql),
                })
                .collect();
            steps.push(PlanStep {
                version: m.version().to_string(),
                dir_name: m.dir_name().to_string(),
                track: m.track(),
                transaction: m.run_in_transaction(),
                action,
                waits_for: m
                    .requires_deferred()
                    .filter(|d| pending_deferred(d))
                    .map(str::to_string)
                    .collect(),
                out_of_order: required
                    .out_of_order
                    .iter()
                    .chain(deferred.out_of_order.iter())
                    .any(|o| o.version() == m.version()),
                statements,
            });
        }
        Ok(Plan { steps })
    }
}
