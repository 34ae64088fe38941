//! What is pending on each track, what changed since it was applied, and
//! what the deferred track may run: read from the ledger, decided here.

use std::collections::HashMap;

use crate::error::{Error, ErrorKind};
use crate::ledger::LedgerRow;
use crate::migration::{normal, Migration};
use crate::migrator::Migrator;
use crate::report::Report;
use crate::source::{compare_versions, Track};

impl Migrator {
    /// What `rows` leave pending on `track`, drift checked (into `report`);
    /// `None` when nothing is.
    pub(crate) fn pending_locked<'a>(
        &'a self,
        rows: &'a [LedgerRow],
        track: Track,
        report: &mut Report,
    ) -> Result<Option<Analysis<'a>>, Error> {
        let a = self.analyze(rows, track);
        report.deferred_pending = self.deferred_pending(&a, track);
        self.check_drift(&a, report)?;
        let mut a = a;
        if track == Track::Deferred {
            let plan = self.deferred_plan(rows);
            let required = plan.waiting_for;
            a.pending = plan.runnable;
            if let Some(first) = required.first() {
                return Err(Error::new(
                    ErrorKind::RequiredPending,
                    format!(
                        "{} required migration(s) known to this binary are not applied yet \
                         (first: {}): deferred migrations never run before them. Apply the \
                         required track first (`rollout up --required-only`)",
                        required.len(),
                        first.dir_name()
                    ),
                ));
            }
        }
        if a.pending.is_empty() {
            tracing::info!(track = %track, "another process applied the pending migrations");
            return Ok(None);
        }
        Ok(Some(a))
    }

    pub(crate) fn analyze<'a>(&'a self, rows: &'a [LedgerRow], track: Track) -> Analysis<'a> {
        let by_version: HashMap<&str, &LedgerRow> =
            rows.iter().map(|r| (normal(&r.version), r)).collect();
        let mut pending = Vec::new();
        let mut changed = Vec::new();
        for m in self.migrations().migrations() {
            match by_version.get(normal(m.version())) {
                Some(r)
                    if r.applied
                        && r.applied_checksum
                            .as_deref()
                            .is_some_and(|c| !m.checksum_matches(c)) =>
                {
                    changed.push(m)
                }
                Some(r) if r.applied => {}
                _ if m.track() == track => pending.push(m),
                _ => {}
            }
        }
        let mut unknown: Vec<&str> = rows
            .iter()
            .filter(|r| r.applied && self.migrations().get(&r.version).is_none())
            .map(|r| r.version.as_str())
            .collect();
        unknown.sort_by(|a, b| compare_versions(a, b));
        // Out of order within the track: the tracks interleave by design
        // (every deferred migration older than the newest required one
        // runs after it).
        let newest = rows
            .iter()
            .filter(|r| {
                r.applied
                    && self
                        .migrations()
                        .get(&r.version)
                        .is_some_and(|m| m.track() == track)
            })
            .map(|r| r.version.as_str())
            .max_by(|a, b| compare_versions(a, b));
        let out_of_order = pending
            .iter()
            .copied()
            .filter(|m| newest.is_some_and(|n| compare_versions(m.version(), n).is_lt()))
            .collect();
        Analysis {
            pending,
            changed,
            unknown,
            out_of_order,
            rows: by_version,
        }
    }

    /// How many deferred migrations `a` (an analysis of `track`) leaves
    /// pending, without analysing the ledger a second time.
    pub(crate) fn deferred_pending(&self, a: &Analysis<'_>, track: Track) -> usize {
        if track == Track::Deferred {
            return a.pending.len();
        }
        self.migrations()
            .track(Track::Deferred)
            .filter(|m| !a.rows.get(normal(m.version())).is_some_and(|r| r.applied))
            .count()
    }

    /// What the deferred track may do now (see [`DeferredPlan`]).
    pub(crate) fn deferred_plan<'a>(&'a self, rows: &'a [LedgerRow]) -> DeferredPlan<'a> {
        let deferred = self.analyze(rows, Track::Deferred).pending;
        let required = self.analyze(rows, Track::Required).pending;
        let is_pending_deferred =
            |v: &str| deferred.iter().any(|d| normal(d.version()) == normal(v));
        // The first required migration that waits for a pending deferred one
        // blocks itself and, by order, every required migration after it.
        let blocked_at = required
            .iter()
            .position(|r| r.requires_deferred().any(is_pending_deferred));
        let (waiting_for, blocked) = required.split_at(blocked_at.unwrap_or(required.len()));
        let runnable = match blocked.first() {
            None => deferred,
            Some(b) => deferred
                .into_iter()
                .filter(|d| {
                    compare_versions(d.version(), b.version()) == std::cmp::Ordering::Less
                        || b.requires_deferred()
                            .any(|v| normal(v) == normal(d.version()))
                })
                .collect(),
        };
        DeferredPlan {
            waiting_for: waiting_for.to_vec(),
            runnable,
        }
    }

    /// Unknown applied versions and changed `up.sql`: warnings, or errors
    /// in strict mode.
    pub(crate) fn check_drift(&self, a: &Analysis<'_>, report: &mut Report) -> Result<(), Error> {
        report.unknown = a.unknown.iter().map(|s| s.to_string()).collect();
        report.changed = a.changed.iter().map(|m| m.version().to_string()).collect();
        report.out_of_order = a
            .out_of_order
            .iter()
            .map(|m| m.version().to_string())
            .collect();
        for m in &a.out_of_order {
            let history = self
                .baseline_version()
                .is_some_and(|b| compare_versions(m.version(), b).is_le());
            if self.is_strict() && !history {
                return Err(Error::new(
                    ErrorKind::OutOfOrder,
                    format!(
                        "migration {} is pending but older than a migration already applied \
                         (a branch merged late): strict mode refuses to apply it out of order. \
                         Give it a version newer than every applied one (rename its directory; \
                         `rollout new NAME` picks the next version), or run without --strict \
                         to apply it with a warning",
                        m.dir_name()
                    ),
                )
                .at(*m, None));
            }
            tracing::warn!(
                version = m.version(),
                "migration {} is older than a migration already applied (a branch merged \
                 late): applying it out of order",
                m.dir_name()
            );
        }
        if !a.unknown.is_empty() {
            let list = a.unknown.join(", ");
            if self.is_strict() {
                return Err(Error::new(
                    ErrorKind::UnknownVersions,
                    format!(
                        "the database has applied migrations this binary does not know: {list}. \
                         A newer binary applied them. Strict mode refuses to run; deploy the \
                         newer binary, or turn strict mode off to allow old binaries during a \
                         rollout"
                    ),
                ));
            }
            tracing::warn!(
                versions = %list,
                "the database has applied migrations this binary does not know \
                 (a newer binary applied them); carrying on"
            );
        }
        for m in &a.changed {
            if self.is_strict() {
                return Err(Error::new(
                    ErrorKind::ChecksumMismatch,
                    format!(
                        "{} of applied migration {} changed since it was applied (its SHA-256 \
                         is now {}). Applied migrations must not be edited: restore the \
                         original and add a new migration for the change",
                        m.up_path(),
                        m.dir_name(),
                        m.checksum()
                    ),
                )
                .at(*m, None));
            }
            tracing::warn!(
                version = m.version(),
                path = m.up_path(),
                "up.sql of an applied migration changed since it was applied; \
                 add a new migration instead of editing an applied one"
            );
        }
        Ok(())
    }
}

/// What the deferred track may do now. A deferred migration never runs
/// before a pending required migration older than it, since it may build on
/// what that one creates, except when the required migration waits for it:
/// the first pending required migration that names a pending deferred one
/// in `requires_deferred` is blocked, and so is every required migration
/// after it (the required track applies in order). Blocked ones never hold
/// the deferred track back, which would wait for ever.
pub(crate) struct DeferredPlan<'a> {
    /// Pending required migrations the deferred track waits for: those
    /// before the first blocked one.
    pub waiting_for: Vec<&'a Migration>,
    /// Pending deferred migrations it may apply once those are applied, in
    /// version order: those older than the first blocked required
    /// migration, and those it names.
    pub runnable: Vec<&'a Migration>,
}

pub(crate) struct Analysis<'a> {
    /// Migrations of the track not applied, in version order.
    pub pending: Vec<&'a Migration>,
    /// Applied migrations whose `up.sql` changed.
    pub changed: Vec<&'a Migration>,
    /// Applied versions the set does not have.
    pub unknown: Vec<&'a str>,
    /// Pending migrations older than the newest applied version.
    pub out_of_order: Vec<&'a Migration>,
    pub rows: HashMap<&'a str, &'a LedgerRow>,
}
