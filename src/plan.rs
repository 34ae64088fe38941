//! `plan`: what `up` would do now against a database, read-only: each
//! pending migration in the order `up` runs them, how it runs, its
//! statements and the lock each takes.

use diesel::prelude::*;

use crate::error::Error;
use crate::ledger::{self, LedgerRow};
use crate::lock;
use crate::locks::{self, TableLock};
use crate::migration::{normal, Migration};
use crate::migrator::Migrator;
use crate::revert::RevertTarget;
use crate::source::{sql, Track};

/// What `up` would do now (see [`Migrator::plan`]), or a revert or redo
/// ([`Migrator::plan_revert`], [`Migrator::plan_redo`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Plan {
    /// The pending migrations, in the order `up` would run them (for a
    /// revert, the migrations it reverts, newest first; for a redo, those,
    /// then the same applied again).
    pub steps: Vec<PlanStep>,
    /// What stops `up` or leaves the database incomplete beyond the steps:
    /// strict mode's refusal, a revert that stopped halfway.
    pub problems: Vec<String>,
}

impl Plan {
    /// `true` when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// `true` when `up` would refuse, or the database stays incomplete
    /// after it: a problem, or a step `up` refuses.
    pub fn has_problems(&self) -> bool {
        !self.problems.is_empty()
            || self
                .steps
                .iter()
                .any(|s| matches!(s.action, PlanAction::Refused { .. }))
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
    /// statements already done (in a revert's plan, of its `down.sql`).
    Resume {
        /// Statements already done (the next one is `done + 1`).
        done: usize,
    },
    /// `up` refuses to run it (a half-done migration whose `up.sql` or
    /// statement split changed since): nothing after it runs either. In a
    /// revert's plan, the same for its `down.sql`.
    Refused {
        /// Why, and what to do.
        reason: String,
    },
    /// In a revert's plan ([`Migrator::plan_revert`]): its `down.sql` runs
    /// from the first statement and its version row goes.
    Revert,
}

/// One statement of a planned migration.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PlannedStatement {
    /// 1-based line in `up.sql` (in `down.sql` for a revert step).
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
    /// resumed. Works on a read-only session. An attempt still marked
    /// running counts as one that stopped (`up` resumes it once it holds
    /// the lock, unless its process finishes it first).
    ///
    /// # Errors
    /// When the ledger cannot be read.
    pub fn plan(&self, conn: &mut PgConnection) -> Result<Plan, Error> {
        let rows = self.rows_for_plan(conn)?;
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
            let statements = sql::split_statements(m.up_sql()).unwrap_or_default();
            let action = match row {
                // `up` refuses it (see `executor::run`).
                Some(r) if r.up_half_done() && m.run_in_transaction() => PlanAction::Refused {
                    reason: format!(
                        "it stopped halfway when it last ran outside a transaction ({} \
                         statements done) and is transactional now, so `up` refuses to run it \
                         whole: keep `run_in_transaction = false` so it resumes, or undo what \
                         they did by hand and record that with `rollout resolve {} --rolled-back`",
                        r.statements_completed.unwrap_or(0),
                        m.version()
                    ),
                },
                Some(r) if r.failed() && !m.run_in_transaction() => match r.statements_completed {
                    Some(n) if n > 0 => resume_or_refusal(m, r, n, statements.len()),
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
            let statements = planned(statements, done);
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
        let mut problems = Vec::new();
        let mut scratch = crate::report::Report::default();
        for a in [&required, &deferred] {
            if let Err(e) = self.check_drift(a, &mut scratch) {
                problems.push(format!("`up` refuses: {e}"));
                break;
            }
        }
        for m in self.migrations().migrations() {
            let row = rows
                .iter()
                .find(|r| normal(&r.version) == normal(m.version()));
            if let Some(r) = row.filter(|r| r.revert_half_done()) {
                problems.push(format!(
                    "the revert of {} stopped halfway ({} of its down.sql statements done): \
                     `up` leaves it as it is. Run the revert again (`rollout revert`), or \
                     finish it by hand and record it with `rollout resolve {} --rolled-back`",
                    m.dir_name(),
                    r.statements_completed.unwrap_or(0),
                    m.version()
                ));
            }
        }
        Ok(Plan { steps, problems })
    }
}

/// Statements as a plan shows them, the first `done` marked done.
fn planned(statements: Vec<sql::Statement>, done: usize) -> Vec<PlannedStatement> {
    statements
        .into_iter()
        .enumerate()
        .map(|(i, s)| PlannedStatement {
            line: s.line,
            first_line: s.sql.lines().next().unwrap_or("").trim().to_string(),
            done: i < done,
            locks: locks::of_statement(&s.sql),
        })
        .collect()
}

impl Migrator {
    /// What [`Migrator::revert`] would do now, without changing anything
    /// and without taking a lock (`rollout revert --dry-run`): the
    /// migrations it would revert, newest first, each with its `down.sql`
    /// statements and the locks they take, a revert that stopped halfway
    /// resuming after the statements it did. What would stop the revert
    /// now but may not later (another session leading the deferred track,
    /// an index being built) is a problem of the plan.
    ///
    /// # Errors
    /// What [`Migrator::revert`] refuses before it changes anything (the
    /// same error), and a ledger that cannot be read.
    pub fn plan_revert(
        &self,
        conn: &mut PgConnection,
        target: &RevertTarget,
    ) -> Result<Plan, Error> {
        let rows = self.rows_for_plan(conn)?;
        let targets = self.revert_targets(&rows, target)?;
        self.revert_plan(conn, &rows, &targets)
    }

    /// What [`Migrator::redo`] would do now, without changing anything and
    /// without taking a lock (`rollout redo --dry-run`): the reverts, as
    /// [`Migrator::plan_revert`] gives them, then each migration applied
    /// again, in version order.
    ///
    /// # Errors
    /// As [`Migrator::plan_revert`], and strict mode's refusals.
    pub fn plan_redo(&self, conn: &mut PgConnection, count: usize) -> Result<Plan, Error> {
        let rows = self.rows_for_plan(conn)?;
        let targets = self.revert_targets(&rows, &RevertTarget::Count(count))?;
        self.check_drift_after_revert(&rows, &targets, &mut crate::report::Report::default())?;
        let mut plan = self.revert_plan(conn, &rows, &targets)?;
        for m in targets
            .iter()
            .rev()
            .filter_map(|v| self.migrations().get(v))
        {
            let statements = sql::split_statements(m.up_sql()).unwrap_or_default();
            plan.steps
                .push(step(m, PlanAction::Apply, planned(statements, 0)));
        }
        Ok(plan)
    }

    /// The ledger as a plan reads it: an attempt still marked running
    /// counts as one that stopped.
    fn rows_for_plan(&self, conn: &mut PgConnection) -> Result<Vec<LedgerRow>, Error> {
        let tables = self.ledger()?.resolve(conn)?;
        let mut rows = ledger::rows(conn, &tables)?;
        for r in &mut rows {
            if r.outcome.as_deref() == Some("running") {
                r.outcome = Some("interrupted".into());
            }
        }
        Ok(rows)
    }

    fn revert_plan(
        &self,
        conn: &mut PgConnection,
        rows: &[LedgerRow],
        targets: &[String],
    ) -> Result<Plan, Error> {
        let mut plan = Plan::default();
        if self.has_deferred() {
            let ledger = self.ledger()?;
            let tables = ledger.resolve(conn)?;
            let keys = self.keys(&ledger, &tables, Track::Deferred);
            if let Some(h) = lock::holder(conn, &keys)? {
                plan.problems.push(format!(
                    "{h} leads the deferred track now: the revert is refused until it \
                     finishes (`rollout deferred --wait`)"
                ));
            }
        }
        for m in targets.iter().filter_map(|v| self.migrations().get(v)) {
            if let Some(why) = crate::revert::being_built(conn, m)? {
                plan.problems.push(why);
            }
            let row = rows
                .iter()
                .find(|r| normal(&r.version) == normal(m.version()));
            let down = m.down_sql().unwrap_or_default();
            let statements = sql::split_statements(down).unwrap_or_default();
            let done = row
                .filter(|r| r.revert_half_done())
                .and_then(|r| r.statements_completed)
                .map_or(0, |n| usize::try_from(n).unwrap_or(0));
            let action = match row {
                Some(r) if done > 0 => revert_resume_or_refusal(m, r, done, statements.len()),
                _ => PlanAction::Revert,
            };
            let done = if matches!(action, PlanAction::Resume { .. }) {
                done
            } else {
                0
            };
            plan.steps.push(step(m, action, planned(statements, done)));
        }
        Ok(plan)
    }
}

/// A plan's step for `m`, outside `up`'s ordering (no deferred waits, no
/// out-of-order check).
fn step(m: &Migration, action: PlanAction, statements: Vec<PlannedStatement>) -> PlanStep {
    PlanStep {
        version: m.version().to_string(),
        dir_name: m.dir_name().to_string(),
        track: m.track(),
        transaction: m.run_in_transaction(),
        action,
        waits_for: Vec::new(),
        out_of_order: false,
        statements,
    }
}

/// A revert that stopped after `done` statements of `down.sql`: resumed,
/// unless `down.sql` or its split changed since (the executor's checks).
fn revert_resume_or_refusal(m: &Migration, r: &LedgerRow, done: usize, total: usize) -> PlanAction {
    let down = m.down_sql().unwrap_or_default();
    let same = r.attempt_checksum.as_deref().is_some_and(|c| {
        c == crate::source::checksum_of_sql(down)
            || crate::source::legacy_checksums(down).iter().any(|l| l == c)
    });
    if !same {
        return PlanAction::Refused {
            reason: format!(
                "its revert stopped halfway ({done} statements done) and {} changed since, so \
                 the revert refuses to resume it: restore the file that ran, or finish by hand \
                 and record it with `rollout resolve {} --rolled-back` (or --applied)",
                m.down_path(),
                m.version()
            ),
        };
    }
    if r.statements_total.is_some_and(|n| n as usize != total) {
        return PlanAction::Refused {
            reason: format!(
                "its revert stopped halfway ({done} of {} statements done) and {} splits into \
                 {total} statements now, so the revert refuses to resume it: finish it with \
                 the release that started it, or by hand and record it with `rollout resolve \
                 {} --rolled-back`",
                r.statements_total.unwrap_or(0),
                m.down_path(),
                m.version()
            ),
        };
    }
    PlanAction::Resume { done }
}

/// A no-transaction migration that stopped after `done` statements: `up`
/// resumes it, unless its `up.sql` or its split changed since.
fn resume_or_refusal(m: &Migration, r: &ledger::LedgerRow, done: i32, total: usize) -> PlanAction {
    let path = m.up_path();
    if !r
        .attempt_checksum
        .as_deref()
        .is_some_and(|c| m.checksum_matches(c))
    {
        return PlanAction::Refused {
            reason: format!(
                "it stopped halfway ({done} statements done) and {path} changed since, so \
                 `up` refuses to resume it: restore the file that ran, or finish the work by \
                 hand and record it with `rollout resolve {} --applied` (or --rolled-back)",
                m.version()
            ),
        };
    }
    if r.statements_total.is_some_and(|n| n as usize != total) {
        return PlanAction::Refused {
            reason: format!(
                "it stopped halfway ({done} of {} statements done) and {path} splits into \
                 {total} statements now, so `up` refuses to resume it: finish it with the \
                 release that started it, or by hand and record it with `rollout resolve {} \
                 --applied`",
                r.statements_total.unwrap_or(0),
                m.version()
            ),
        };
    }
    PlanAction::Resume {
        done: usize::try_from(done).unwrap_or(0),
    }
}
