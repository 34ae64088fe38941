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

/// What runs under the locks: the migrator, the connection holding them,
/// the resolved ledger (its attempts left running marked interrupted), and
/// the report it fills as work is done (so an error still reports that
/// work). It reads what it needs of the ledger under the locks.
type Locked<'a, T> =
    dyn FnOnce(&Migrator, &mut PgConnection, &Tables, &mut Report) -> Result<T, Error> + 'a;

impl Migrator {
    /// Reverts applied migrations, newest first, each with its `down.sql`:
    /// in its own transaction with its ledger rows, or, for `run_in_transaction
    /// = false`, statement by statement with progress recorded (a retry
    /// resumes where it stopped), each recorded in the attempts table. Runs
    /// under the required track's lock, and under the deferred track's too
    /// when the set has deferred migrations. The diesel CLI sees the
    /// result: a reverted version is gone from `__diesel_schema_migrations`.
    ///
    /// Nothing is reverted unless every migration to revert can be:
    ///
    /// # Errors
    /// [`ErrorKind::RevertRefused`], naming the migration and what to do,
    /// when [`RevertTarget::To`] names a version that is not applied, when
    /// one has no `down.sql` (or one without statements), a `down.sql`
    /// that cannot run (`CONCURRENTLY` in a transactional migration, `COPY
    /// FROM STDIN`, an unterminated string), when an applied version to
    /// revert is not known to this binary (a newer release applied it), or
    /// when a deferred migration's index is being built by another session
    /// or another session leads the deferred track. A failing `down.sql`
    /// stops the revert there ([`ErrorKind::MigrationFailed`]); the error's
    /// report lists what was reverted before it.
    pub fn revert(&self, conn: &mut PgConnection, target: RevertTarget) -> Result<Report, Error> {
        // The deferred lock too, with no deferred track in this binary: a
        // newer release's leader may be running a deferred migration that
        // builds on what this reverts (refused while it leads; once it is
        // dead, its attempt is marked interrupted and the check for
        // half-applied migrations sees it).
        self.locked(
            conn,
            true,
            Box::new(move |m, conn, tables, report| {
                let rows = m.revert_rows(conn, tables, &target)?;
                let targets = m.revert_targets(&rows, &target)?;
                m.revert_on(conn, tables, &rows, &targets, report)
            }),
        )
    }

    /// Reverts the newest `count` applied migrations, then applies them again
    /// in version order the way `up` applies them (`requires_deferred`,
    /// lock-timeout retries, strict mode's checks), under one hold of the
    /// lock (see [`Migrator::revert`]).
    ///
    /// # Errors
    /// As [`Migrator::revert`]; strict mode's refusals (before anything is
    /// reverted); a failing `up.sql` as `up` reports it, with the report
    /// listing what was reverted and what was applied again.
    pub fn redo(&self, conn: &mut PgConnection, count: usize) -> Result<Report, Error> {
        // The deferred lock too, as `revert` takes it.
        self.locked(
            conn,
            true,
            Box::new(move |m, conn, tables, report| {
                // Strict mode's checks read every version.
                let rows = ledger::rows(conn, tables)?;
                let targets = m.revert_targets(&rows, &RevertTarget::Count(count))?;
                m.check_drift_after_revert(&rows, &targets, report)?;
                m.revert_on(conn, tables, &rows, &targets, report)?;
                for v in targets.iter().rev() {
                    let Some(mig) = m.migrations().get(v) else {
                        continue;
                    };
                    // Read again: a migration applied just before may be the
                    // deferred one this one requires.
                    let rows = ledger::rows(conn, tables)?;
                    let by_version = rows.iter().map(|r| (normal(&r.version), r)).collect();
                    let saved = session::Settings::set(conn, &m.session_for(mig.track()))?;
                    let pending = crate::apply::Pending {
                        migrations: &[mig],
                        rows: &by_version,
                        held: &[],
                    };
                    let applied = m.apply_pending(conn, tables, &pending, mig.track(), report);
                    let restored = saved.restore(conn);
                    applied?;
                    restored?;
                }
                Ok(())
            }),
        )
    }

    /// Records how a migration whose latest attempt did not finish (it
    /// failed, or its process died, applying or reverting it) ended once
    /// repaired by hand, replacing any hand-written change to the ledger:
    /// [`Resolution::Applied`] records it as applied (its version row, and
    /// its checksum), [`Resolution::RolledBack`] as not applied, so the next
    /// `up` starts it from the first statement. The attempts table records
    /// who (operating-system user, database role, host) did it and when,
    /// with `note`. Under the required lock (and the deferred one for a
    /// deferred migration).
    ///
    /// # Errors
    /// [`ErrorKind::RevertRefused`] when the version is not known to this
    /// binary, when its latest attempt finished (an applied migration is
    /// reverted with [`Migrator::revert`], a pending one applied by `up`),
    /// or when another session leads the deferred track.
    pub fn resolve(
        &self,
        conn: &mut PgConnection,
        version: &str,
        resolution: Resolution,
        note: &str,
    ) -> Result<Report, Error> {
        self.resolve_with(conn, version, resolution, note, false)
    }

    /// As [`Migrator::resolve`], whatever state the migration is in.
    ///
    /// # Warning
    /// Recording an applied migration as rolled back makes the next `up`
    /// run it again over the changes it already made; recording a pending
    /// one as applied means it never runs. Use it only when the database
    /// is known to match what is recorded (for example, a migration
    /// applied by hand, outside any tool).
    ///
    /// # Errors
    /// As [`Migrator::resolve`], but for the state check.
    pub fn dangerous_resolve_any_state(
        &self,
        conn: &mut PgConnection,
        version: &str,
        resolution: Resolution,
        note: &str,
    ) -> Result<Report, Error> {
        self.resolve_with(conn, version, resolution, note, true)
    }

    fn resolve_with(
        &self,
        conn: &mut PgConnection,
        version: &str,
        resolution: Resolution,
        note: &str,
        any_state: bool,
    ) -> Result<Report, Error> {
        let m = self.migrations().get(version).ok_or_else(|| {
            refused(format!(
                "version {version} is not a migration this binary knows: resolve it with the \
                 release that has it (`rollout status` lists the versions it knows)"
            ))
        })?;
        let deferred = m.track() == Track::Deferred;
        self.locked(
            conn,
            deferred,
            Box::new(move |_, conn, tables, _| {
                let row = ledger::row(conn, tables, m.version())?;
                if !any_state {
                    check_resolvable(m, row.as_ref())?;
                }
                let outcome = match resolution {
                    Resolution::Applied => "applied",
                    Resolution::RolledBack => "rolled_back",
                };
                let note = if note.is_empty() {
                    format!("resolved by hand as {}", outcome.replace('_', " "))
                } else {
                    note.to_string()
                };
                // Not while a release that has it on the other track runs it.
                crate::executor::claimed(conn, tables, m, |conn| {
                    ledger::record_resolution(conn, tables, m, outcome, &note)
                        .map_err(|e| Error::db("recording the resolution", e).at(m, None))
                })?;
                tracing::info!(version = m.version(), outcome, "resolved {}", m.dir_name());
                Ok(())
            }),
        )
    }

    pub(crate) fn has_deferred(&self) -> bool {
        self.migrations().track(Track::Deferred).next().is_some()
    }

    /// The ledger rows a revert of `target` checks, read without the whole
    /// ledger: every applied version (by its migrations-table row alone),
    /// and in full the versions it reverts and each newer one whose apply
    /// stopped with statements done.
    fn revert_rows(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        target: &RevertTarget,
    ) -> Result<Vec<LedgerRow>, Error> {
        let scope = ledger::revert_scope(conn, tables)?;
        let mut rows: Vec<LedgerRow> = scope
            .applied
            .into_iter()
            .map(|v| LedgerRow::applied(v, None))
            .collect();
        let chosen = chosen(&rows, target)?;
        let oldest = chosen.last().copied().unwrap_or_default();
        let mut read: Vec<&str> = chosen.clone();
        read.extend(
            scope
                .stopped
                .iter()
                .map(String::as_str)
                .filter(|v| compare_versions(v, oldest).is_gt()),
        );
        let exact = ledger::rows_of(conn, tables, &read)?;
        let replaced: std::collections::HashSet<String> = exact
            .iter()
            .map(|r| normal(&r.version).to_string())
            .collect();
        rows.retain(|r| !replaced.contains(normal(&r.version)));
        rows.extend(exact);
        Ok(rows)
    }

    /// The applied versions `target` names, newest first, each known to
    /// this binary with a `down.sql` that can run.
    pub(crate) fn revert_targets(
        &self,
        rows: &[LedgerRow],
        target: &RevertTarget,
    ) -> Result<Vec<String>, Error> {
        let chosen = chosen(rows, target)?;
        // A newer migration that stopped halfway resumes after the
        // statements it recorded: reverting what it builds on would leave
        // those statements' work undone while the resume skips them.
        // That holds for one this binary does not know too (a newer
        // release's, after a deploy was rolled back): the ledger says it
        // stopped halfway, which only a no-transaction migration can.
        let oldest = chosen.last().copied().unwrap_or_default();
        for r in rows {
            let known = self.migrations().get(&r.version);
            let half = r.failed()
                && r.statements_completed.unwrap_or(0) > 0
                && known.is_none_or(|m| !m.run_in_transaction());
            if !half || !compare_versions(&r.version, oldest).is_gt() {
                continue;
            }
            let (name, release) = match known {
                Some(m) => (m.dir_name().to_string(), ""),
                None => (
                    format!("version {} (not known to this binary)", r.version),
                    " with the release that has it",
                ),
            };
            let e = refused(format!(
                "migration {name} stopped halfway ({} statements done) and is newer than \
                 {oldest}, which this would revert: its resume would skip work the revert \
                 undoes. Finish it first (`rollout up`{release}, then revert it too), or undo \
                 its statements by hand and record that with `rollout resolve {} \
                 --rolled-back`{release}",
                r.statements_completed.unwrap_or(0),
                r.version
            ));
            return Err(match known {
                Some(m) => e.at(m, None),
                None => e,
            });
        }
        for v in &chosen {
            let Some(m) = self.migrations().get(v) else {
                return Err(refused(format!(
                    "version {v} is applied, but this binary does not know it (a newer \
                     release applied it): revert it with that release's `rollout revert`, \
                     or undo it by hand and record that with `rollout resolve {v} \
                     --rolled-back` using that release"
                )));
            };
            check_down(m, self.revert_empty_down)?;
        }
        Ok(chosen.into_iter().map(str::to_string).collect())
    }

    /// Strict mode's checks as `up` will make them once `targets` are
    /// reverted, so a redo that `up` would refuse reverts nothing.
    pub(crate) fn check_drift_after_revert(
        &self,
        rows: &[LedgerRow],
        targets: &[String],
        report: &mut Report,
    ) -> Result<(), Error> {
        let after: Vec<LedgerRow> = rows
            .iter()
            .cloned()
            .map(|mut r| {
                if targets.iter().any(|t| normal(t) == normal(&r.version)) {
                    r.applied = false;
                    r.applied_checksum = None;
                }
                r
            })
            .collect();
        for track in [Track::Required, Track::Deferred] {
            let a = self.analyze(&after, track);
            self.check_drift(&a, report)?;
        }
        Ok(())
    }

    /// Reverts `targets` (newest first) on a connection holding the locks,
    /// each reverted one added to `report` as it is done.
    fn revert_on(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        rows: &[LedgerRow],
        targets: &[String],
        report: &mut Report,
    ) -> Result<(), Error> {
        // Every refusal before anything changes.
        for v in targets {
            let Some(m) = self.migrations().get(v) else {
                continue;
            };
            if let Some(why) = being_built(conn, m)? {
                return Err(refused(why).at(m, None));
            }
        }
        for v in targets {
            let Some(m) = self.migrations().get(v) else {
                continue;
            };
            let row = rows
                .iter()
                .find(|r| normal(&r.version) == normal(m.version()));
            let saved = session::Settings::set(conn, &self.session_for(m.track()))?;
            let result = executor::revert(conn, tables, m, row, &executor::Options::plain());
            let restored = saved.restore(conn);
            report.reverted.push(result?);
            restored?;
        }
        Ok(())
    }

    /// Runs `f` under the required lock, and the deferred one too when
    /// `deferred_too`; both are released whatever `f` returns. The report
    /// holds what was done even on an error.
    fn locked<T>(
        &self,
        conn: &mut PgConnection,
        deferred_too: bool,
        f: Box<Locked<'_, T>>,
    ) -> Result<Report, Error> {
        let mut report = Report::default();
        let result = self.locked_inner(conn, deferred_too, f, &mut report);
        match result {
            Ok(_) => Ok(report),
            Err(e) => Err(e.with_report(report)),
        }
    }

    fn locked_inner<T>(
        &self,
        conn: &mut PgConnection,
        deferred_too: bool,
        f: Box<Locked<'_, T>>,
        report: &mut Report,
    ) -> Result<T, Error> {
        let ledger: Ledger = self.ledger()?;
        let tables = ledger.resolve(conn)?;
        let keys = self.keys(&ledger, &tables, Track::Required);
        let deferred_keys = self.keys(&ledger, &tables, Track::Deferred);
        let (guard, waited) =
            LockGuard::acquire(conn, keys, Track::Required, self.wait(), &mut |_| true)?;
        report.took_lock = true;
        report.lock_wait = waited;
        let Some(mut guard) = guard else {
            return Err(Error::new(
                ErrorKind::LockTimeout,
                "the required lock was not taken",
            ));
        };
        let result = (|| {
            let conn: &mut PgConnection = &mut guard;
            let resolved = tables;
            let mut tables = ledger.resolve(conn)?;
            crate::migrator::same_schema(&ledger, &resolved, &tables)?;
            ledger::ensure_tables(conn, &ledger, &mut tables)?;
            if !deferred_too {
                ledger::mark_interrupted(conn, &tables, &[Track::Required])?;
                return f(self, conn, &tables, report);
            }
            if !lock::try_lock_all(conn, &deferred_keys)? {
                let who = lock::holder(conn, &deferred_keys)
                    .ok()
                    .flatten()
                    .map_or_else(|| "another session".to_string(), |h| h.to_string());
                return Err(refused(format!(
                    "{who} leads the deferred track now, and what it runs must not change \
                     under it: wait for it to finish (`rollout deferred --wait`), then \
                     run this again"
                )));
            }
            // Everything from here releases the deferred lock on the way
            // out, error or not.
            let result = (|| {
                // Taken on this session's backend, as the required lock was
                // (a pooler in transaction mode may hand out another).
                if !lock::held_by_me(conn, deferred_keys[0])? {
                    return Err(Error::new(
                        ErrorKind::LockNotHeld,
                        "the deferred track's advisory lock was granted but does not belong to \
                         this session's backend: a connection pooler in transaction mode sits \
                         between this process and PostgreSQL. Nothing was changed; connect \
                         directly or through a pooler in session mode",
                    ));
                }
                ledger::mark_interrupted(conn, &tables, &[Track::Deferred, Track::Required])?;
                f(self, conn, &tables, report)
            })();
            if !matches!(lock::unlock_all(conn, &deferred_keys), Ok(true)) {
                tracing::warn!("could not release the deferred lock; dropping the connection");
                let unlock =
                    Error::new(ErrorKind::Unlock, "the deferred lock could not be released")
                        .unusable();
                return Err(match result {
                    Ok(_) => unlock,
                    Err(e) => e.unusable(),
                });
            }
            result
        })();
        let released = guard.release();
        match (result, released) {
            (Ok(t), Ok(())) => Ok(t),
            (Ok(_), Err(e)) => Err(e),
            (Err(e), Ok(())) => Err(e),
            (Err(e), Err(_)) => Err(e.unusable()),
        }
    }
}

/// Whether `row`'s latest attempt left something to resolve: it failed,
/// is waiting for a retry, or its process died, applying or reverting.
fn check_resolvable(m: &Migration, row: Option<&LedgerRow>) -> Result<(), Error> {
    if row.is_some_and(LedgerRow::unfinished) {
        return Ok(());
    }
    let v = m.version();
    let message = match row {
        Some(r) if r.applied => format!(
            "migration {} is applied and its latest attempt finished: there is nothing to \
             resolve. To undo it, revert it (`rollout revert --count N` or `--to VERSION`); if \
             its changes were already undone by hand, `rollout resolve {v} --rolled-back \
             --force` records that, and the next `up` runs it again",
            m.dir_name()
        ),
        _ => format!(
            "migration {} is pending and no attempt of it failed: there is nothing to resolve. \
             `rollout up` applies it; if it was applied by hand, `rollout resolve {v} --applied \
             --force` records that, and `up` never runs it",
            m.dir_name()
        ),
    };
    Err(refused(message).at(m, None))
}

/// The applied versions `target` names, newest first (refused when it
/// names none).
fn chosen<'r>(rows: &'r [LedgerRow], target: &RevertTarget) -> Result<Vec<&'r str>, Error> {
    let mut applied: Vec<&str> = rows
        .iter()
        .filter(|r| r.applied)
        .map(|r| r.version.as_str())
        .collect();
    applied.sort_by(|a, b| compare_versions(b, a));
    // One version, however many spellings the ledger holds (`1` and
    // `01`, from a tool that compares them as text): reverted once.
    applied.dedup_by(|a, b| normal(a) == normal(b));
    let chosen: Vec<&str> = match target {
        RevertTarget::Count(n) => applied.into_iter().take(*n).collect(),
        RevertTarget::To(v) => {
            // The version to stay at must be one that is applied: a
            // typo or a shortened version would otherwise compare below
            // every real one and revert everything.
            if !applied.iter().any(|a| normal(a) == normal(v)) {
                return Err(refused(format!(
                    "version {v} is not an applied migration: --to names the applied \
                         migration to go back to, which stays applied (`rollout status` lists \
                         the applied versions); --count N reverts the newest N"
                )));
            }
            applied
                .into_iter()
                .take_while(|a| normal(a) != normal(v))
                .collect()
        }
    };
    if chosen.is_empty() {
        return Err(refused(match target {
            RevertTarget::To(v) => format!(
                "nothing to revert: {v} is the newest applied migration (`rollout status` \
                     lists them; --to names the one to go back to, which stays applied)"
            ),
            RevertTarget::Count(_) => {
                "nothing to revert: no migration is applied (`rollout status`)".to_string()
            }
        }));
    }
    Ok(chosen)
}

fn refused(message: String) -> Error {
    Error::new(ErrorKind::RevertRefused, message)
}

/// Why `m` cannot be reverted now: a deferred migration whose index
/// another session is building.
pub(crate) fn being_built(conn: &mut PgConnection, m: &Migration) -> Result<Option<String>, Error> {
    if m.track() != Track::Deferred {
        return Ok(None);
    }
    let builds = catalog::builds_in_progress(conn)
        .map_err(|e| Error::db("reading index builds in progress", e))?;
    let indexes = catalog::migration_indexes(conn, m, &builds)
        .map_err(|e| Error::db("reading the migration's indexes", e))?;
    Ok(indexes
        .iter()
        .find(|i| i.state == crate::IndexState::Building)
        .map(|i| {
            format!(
                "deferred migration {} has index {} being built by another session now: wait \
                 for the build (`rollout status` shows its progress), then revert",
                m.dir_name(),
                i.name
            )
        }))
}

/// Whether `m`'s `down.sql` can run: it exists, has statements (or none
/// is allowed, `empty_ok`), and holds nothing that cannot run the way the
/// migration runs.
fn check_down(m: &Migration, empty_ok: bool) -> Result<(), Error> {
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
    if statements.is_empty() && !empty_ok {
        return Err(refused(format!(
            "{path} of migration {} has no statements: reverting it would only forget that it \
             was applied and leave its changes in place, and a later `up` would apply it \
             again over them. Nothing was reverted. Write the down.sql; or, if nothing needs \
             undoing, revert with --allow-empty-down (`Migrator::revert_empty_down`): the \
             version row goes, the schema stays",
            m.dir_name()
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
