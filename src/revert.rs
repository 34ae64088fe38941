//! What an operator does by hand, under the required track's lock: revert
//! and redo applied migrations with their `down.sql`, and record the outcome
//! of a migration repaired by hand (`resolve`). Every migration still runs
//! through the executor, as `up` runs it.

use diesel::prelude::*;

use crate::catalog;
use crate::error::{Error, ErrorKind};
use crate::executor;
use crate::ledger::{self, Ledger, LedgerRow, Tables};
use crate::lock::{self, LockGuard};
use crate::migration::{normal, Migration};
use crate::migrator::Migrator;
use crate::report::Report;
use crate::session;
use crate::source::{compare_versions, sql, Track};

/// Which applied migrations [`Migrator::revert`] reverts, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RevertTarget {
    /// The newest `n` applied migrations.
    Count(usize),
    /// Every applied migration newer than this version (which stays
    /// applied).
    To(String),
}

/// How a migration repaired by hand ended, for [`Migrator::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resolution {
    /// Its changes are in the database: record it as applied.
    Applied,
    /// Its changes are not (undone, or never made): record it as not
    /// applied, so the next `up` applies it from the start.
    RolledBack,
}

impl Migrator {
    /// Reverts applied migrations, newest first, each with its `down.sql`:
    /// in its own transaction with its ledger rows, or, for `run_in_transaction
    /// = false`, statement by statement with progress recorded (a retry
    /// resumes where it stopped), each recorded in the attempts table. Runs
    /// under the required track's lock, and under the deferred track's too
    /// when a deferred migration is among them. The diesel CLI sees the
    /// result: a reverted version is gone from `__diesel_schema_migrations`.
    ///
    /// Nothing is reverted unless every migration to revert can be:
    ///
    /// # Errors
    /// [`ErrorKind::RevertRefused`], naming the migration and what to do,
    /// when one has no `down.sql` (or one without statements), a `down.sql`
    /// that cannot run (`CONCURRENTLY` in a transactional migration, `COPY
    /// FROM STDIN`, an unterminated string), when an applied version to
    /// revert is not known to this binary (a newer release applied it), or
    /// when a deferred migration's index is being built by another session
    /// or another session leads the deferred track. A failing `down.sql`
    /// stops the revert there ([`ErrorKind::MigrationFailed`]); the error's
    /// report lists what was reverted before it.
    pub fn revert(&self, conn: &mut PgConnection, target: RevertTarget) -> Result<Report, Error> {
        let mut report = Report::default();
        let result = self.with_lock(conn, &mut report, |m, conn, tables, rows| {
            let targets = m.revert_targets(rows, &target)?;
            m.revert_on(conn, tables, rows, &targets)
        });
        match result {
            Ok(reverted) => {
                report.reverted = reverted;
                Ok(report)
            }
            Err((e, reverted)) => {
                report.reverted = reverted;
                Err(e.with_report(report))
            }
        }
    }

    /// Reverts the newest `count` applied migrations, then applies them again
    /// in version order, under one hold of the lock (see
    /// [`Migrator::revert`]).
    ///
    /// # Errors
    /// As [`Migrator::revert`], and a failing `up.sql` as `up` reports it.
    pub fn redo(&self, conn: &mut PgConnection, count: usize) -> Result<Report, Error> {
        let mut report = Report::default();
        let result = self.with_lock(conn, &mut report, |m, conn, tables, rows| {
            let targets = m.revert_targets(rows, &RevertTarget::Count(count))?;
            let reverted = m.revert_on(conn, tables, rows, &targets)?;
            let mut again = Vec::new();
            for v in targets.iter().rev() {
                let Some(mig) = m.migrations().get(v) else {
                    continue;
                };
                let (lt, st) = m.timeouts(mig.track());
                let saved = session::Timeouts::set(conn, lt, st).map_err(|e| (e, Vec::new()))?;
                let applied = executor::apply(conn, tables, mig, None, &executor::Options::plain());
                let restored = saved.restore(conn);
                match applied {
                    Ok(a) => again.push(a),
                    Err(e) => return Err((e, reverted)),
                }
                restored.map_err(|e| (e, Vec::new()))?;
            }
            Ok((reverted, again))
        });
        match result {
            Ok((reverted, again)) => {
                report.reverted = reverted;
                report.applied = again;
                Ok(report)
            }
            Err((e, reverted)) => {
                report.reverted = reverted;
                Err(e.with_report(report))
            }
        }
    }

    /// Records how a migration repaired by hand ended, replacing any
    /// hand-written change to the ledger: [`Resolution::Applied`] records it
    /// as applied (its version row, and its checksum), [`Resolution::RolledBack`]
    /// as not applied, so the next `up` starts it from the first statement.
    /// The attempts table records who (operating-system user, database role,
    /// host) did it and when, with `note`. Under the required lock (and the
    /// deferred one for a deferred migration).
    ///
    /// # Errors
    /// [`ErrorKind::RevertRefused`] when the version is not known to this
    /// binary, or another session leads the deferred track.
    pub fn resolve(
        &self,
        conn: &mut PgConnection,
        version: &str,
        resolution: Resolution,
        note: &str,
    ) -> Result<Report, Error> {
        let m = self.migrations().get(version).ok_or_else(|| {
            refused(format!(
                "version {version} is not a migration this binary knows: resolve it with the \
                 release that has it (`rollout status` lists the versions it knows)"
            ))
        })?;
        let mut report = Report::default();
        let result = self.with_lock_for(conn, &mut report, m.track(), |_, conn, tables, _| {
            let outcome = match resolution {
                Resolution::Applied => "applied",
                Resolution::RolledBack => "rolled_back",
            };
            let note = if note.is_empty() {
                format!("resolved by hand as {}", outcome.replace('_', " "))
            } else {
                note.to_string()
            };
            ledger::record_resolution(conn, tables, m, outcome, &note).map_err(|e| {
                (
                    Error::db("recording the resolution", e).at(m, None),
                    Vec::new(),
                )
            })?;
            tracing::info!(version = m.version(), outcome, "resolved {}", m.dir_name());
            Ok(())
        });
        result.map(|()| report).map_err(|(e, _)| e)
    }

    /// The applied versions `target` names, newest first, each known to
    /// this binary with a `down.sql` that can run.
    fn revert_targets(
        &self,
        rows: &[LedgerRow],
        target: &RevertTarget,
    ) -> Result<Vec<String>, (Error, Vec<crate::Applied>)> {
        let mut applied: Vec<&str> = rows
            .iter()
            .filter(|r| r.applied)
            .map(|r| r.version.as_str())
            .collect();
        applied.sort_by(|a, b| compare_versions(b, a));
        let chosen: Vec<&str> = match target {
            RevertTarget::Count(n) => applied.into_iter().take(*n).collect(),
            RevertTarget::To(v) => applied
                .into_iter()
                .take_while(|a| compare_versions(a, v).is_gt())
                .collect(),
        };
        if chosen.is_empty() {
            return Err((
                refused("nothing to revert: no applied migration matches".to_string()),
                Vec::new(),
            ));
        }
        for v in &chosen {
            let Some(m) = self.migrations().get(v) else {
                return Err((
                    refused(format!(
                        "version {v} is applied, but this binary does not know it (a newer \
                         release applied it): revert it with that release's `rollout revert`, \
                         or undo it by hand and record that with `rollout resolve {v} \
                         --rolled-back` using that release"
                    )),
                    Vec::new(),
                ));
            };
            check_down(m).map_err(|e| (e, Vec::new()))?;
        }
        Ok(chosen.into_iter().map(str::to_string).collect())
    }

    /// Reverts `targets` (newest first) on a connection holding the locks.
    fn revert_on(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        rows: &[LedgerRow],
        targets: &[String],
    ) -> Result<Vec<crate::Applied>, (Error, Vec<crate::Applied>)> {
        // Every refusal before anything changes.
        for v in targets {
            let Some(m) = self.migrations().get(v) else {
                continue;
            };
            if m.track() == Track::Deferred {
                let builds = catalog::builds_in_progress(conn)
                    .map_err(|e| (Error::db("reading index builds in progress", e), Vec::new()))?;
                let indexes = catalog::migration_indexes(conn, m, &builds)
                    .map_err(|e| (Error::db("reading the migration's indexes", e), Vec::new()))?;
                if let Some(i) = indexes
                    .iter()
                    .find(|i| i.state == crate::IndexState::Building)
                {
                    return Err((
                        refused(format!(
                            "deferred migration {} has index {} being built by another session \
                             now: wait for the build (`rollout status` shows its progress), \
                             then revert",
                            m.dir_name(),
                            i.name
                        ))
                        .at(m, None),
                        Vec::new(),
                    ));
                }
            }
        }
        let mut reverted = Vec::new();
        for v in targets {
            let Some(m) = self.migrations().get(v) else {
                continue;
            };
            let row = rows
                .iter()
                .find(|r| normal(&r.version) == normal(m.version()));
            let (lt, st) = self.timeouts(m.track());
            let saved = session::Timeouts::set(conn, lt, st).map_err(|e| (e, Vec::new()))?;
            let result = executor::revert(conn, tables, m, row, &executor::Options::plain());
            let restored = saved.restore(conn);
            match result {
                Ok(done) => reverted.push(done),
                Err(e) => return Err((e, reverted)),
            }
            restored.map_err(|e| (e, Vec::new()))?;
        }
        Ok(reverted)
    }

    /// Runs `f` under the required lock (and the deferred one when
    /// `targets_deferred` says a deferred migration may be touched).
    fn with_lock<T>(
        &self,
        conn: &mut PgConnection,
        report: &mut Report,
        f: impl FnOnce(
            &Migrator,
            &mut PgConnection,
            &Tables,
            &[LedgerRow],
        ) -> Result<T, (Error, Vec<crate::Applied>)>,
    ) -> Result<T, (Error, Vec<crate::Applied>)> {
        let deferred = self.migrations().track(Track::Deferred).next().is_some();
        self.locked(conn, report, deferred, f)
    }

    fn with_lock_for<T>(
        &self,
        conn: &mut PgConnection,
        report: &mut Report,
        track: Track,
        f: impl FnOnce(
            &Migrator,
            &mut PgConnection,
            &Tables,
            &[LedgerRow],
        ) -> Result<T, (Error, Vec<crate::Applied>)>,
    ) -> Result<T, (Error, Vec<crate::Applied>)> {
        self.locked(conn, report, track == Track::Deferred, f)
    }

    fn locked<T>(
        &self,
        conn: &mut PgConnection,
        report: &mut Report,
        deferred_too: bool,
        f: impl FnOnce(
            &Migrator,
            &mut PgConnection,
            &Tables,
            &[LedgerRow],
        ) -> Result<T, (Error, Vec<crate::Applied>)>,
    ) -> Result<T, (Error, Vec<crate::Applied>)> {
        let plain = |e: Error| (e, Vec::new());
        let ledger: Ledger = self.ledger().map_err(plain)?;
        let tables = ledger.resolve(conn).map_err(plain)?;
        let keys = self.keys(&ledger, &tables, Track::Required);
        let deferred_keys = self.keys(&ledger, &tables, Track::Deferred);
        let (guard, waited) =
            LockGuard::acquire(conn, keys, Track::Required, self.wait(), &mut |_| true)
                .map_err(plain)?;
        report.took_lock = true;
        report.lock_wait = waited;
        let Some(mut guard) = guard else {
            return Err(plain(Error::new(
                ErrorKind::LockTimeout,
                "the required lock was not taken",
            )));
        };
        let result = (|| {
            let conn: &mut PgConnection = &mut guard;
            let mut tables = ledger.resolve(conn).map_err(plain)?;
            ledger::ensure_tables(conn, &ledger, &mut tables).map_err(plain)?;
            let held_deferred = if deferred_too {
                if !lock::try_lock_all(conn, &deferred_keys).map_err(plain)? {
                    let who = lock::holder(conn, &deferred_keys)
                        .ok()
                        .flatten()
                        .map_or_else(|| "another session".to_string(), |h| h.to_string());
                    return Err(plain(refused(format!(
                        "{who} leads the deferred track now, and what it runs must not change \
                         under it: wait for it to finish (`rollout deferred --wait`), then \
                         run this again"
                    ))));
                }
                ledger::mark_interrupted(conn, &tables, Track::Deferred).map_err(plain)?;
                true
            } else {
                false
            };
            ledger::mark_interrupted(conn, &tables, Track::Required).map_err(plain)?;
            let rows = ledger::rows(conn, &tables).map_err(plain)?;
            let result = f(self, conn, &tables, &rows);
            if held_deferred && !matches!(lock::unlock_all(conn, &deferred_keys), Ok(true)) {
                tracing::warn!("could not release the deferred lock; dropping the connection");
                return Err(plain(
                    Error::new(ErrorKind::Unlock, "the deferred lock could not be released")
                        .unusable(),
                ));
            }
            result
        })();
        let released = guard.release();
        match (result, released) {
            (Ok(t), Ok(())) => Ok(t),
            (Ok(_), Err(e)) => Err(plain(e)),
            (Err(e), Ok(())) => Err(e),
            (Err((e, done)), Err(_)) => Err((e.unusable(), done)),
        }
    }
}

fn refused(message: String) -> Error {
    Error::new(ErrorKind::RevertRefused, message)
}

/// Whether `m`'s `down.sql` can run: it exists, has statements, and holds
/// nothing that cannot run the way the migration runs.
fn check_down(m: &Migration) -> Result<(), Error> {
    let path = m.down_path();
    let Some(down) = m.down_sql() else {
        return Err(refused(format!(
            "migration {} has no down.sql, so it cannot be reverted: write a down.sql that \
             undoes its up.sql, or undo it by hand and record that with `rollout resolve {} \
             --rolled-back`",
            m.dir_name(),
            m.version()
        ))
        .at(m, None));
    };
    let statements = sql::split_statements(down).map_err(|e| {
        refused(format!(
            "{path}:{}: {} (migration {}): fix down.sql before reverting",
            e.line,
            e.message,
            m.dir_name()
        ))
        .at(m, Some(e.line))
    })?;
    if statements.is_empty() {
        return Err(refused(format!(
            "{path} of migration {} has no statements: reverting it would only forget that it \
             was applied and leave its changes in place. Write the down.sql, or if nothing \
             needs undoing, record it with `rollout resolve {} --rolled-back`",
            m.dir_name(),
            m.version()
        ))
        .at(m, None));
    }
    if let Some(s) = statements.iter().find(|s| sql::is_client_copy(&s.sql)) {
        return Err(refused(format!(
            "{path}:{}: `COPY ... FROM STDIN` in the down.sql of migration {} would load \
             nothing: write the rows as `INSERT ... VALUES`",
            s.line,
            m.dir_name()
        ))
        .at(m, Some(s.line)));
    }
    if m.run_in_transaction() {
        if let Ok(Some(w)) = sql::find_keyword(down, "concurrently") {
            return Err(refused(format!(
                "{path}:{}: the down.sql of migration {} uses CONCURRENTLY, which cannot run in \
                 the transaction this migration runs in: drop CONCURRENTLY from down.sql (a \
                 plain `DROP INDEX` is quick on a small table), or undo it by hand and record \
                 that with `rollout resolve {} --rolled-back`",
                w.line,
                m.dir_name(),
                m.version()
            ))
            .at(m, Some(w.line)));
        }
    }
    Ok(())
}
