//! Read-only views of a database against a migration set: `status` and
//! `verify`. Both work on a hot standby.

use diesel::prelude::*;

use crate::catalog;
use crate::error::Error;
use crate::ledger;
use crate::migration::normal;
use crate::migrator::Migrator;
use crate::report::{MigrationStatus, State, Verification};
use crate::source::{compare_versions, Track};

impl Migrator {
    /// A row per migration known to the binary or recorded in the
    /// database, ordered by version. Read-only.
    ///
    /// # Errors
    /// When the ledger cannot be read.
    pub fn status(&self, conn: &mut PgConnection) -> Result<Vec<MigrationStatus>, Error> {
        // The indexes are looked up as the migrations name them: in the
        // migrator's schema, when it has one.
        crate::session::with_search_path(conn, self.search_path().as_deref(), |conn| {
            self.status_rows(conn)
        })
    }

    fn status_rows(&self, conn: &mut PgConnection) -> Result<Vec<MigrationStatus>, Error> {
        let tables = self.ledger()?.resolve(conn)?;
        let rows = ledger::rows(conn, &tables)?;
        let a = self.analyze(&rows, Track::Required);
        let builds = catalog::builds_in_progress(conn)
            .map_err(|e| Error::db("reading index builds in progress", e))?;
        let mut out = Vec::new();
        for m in self.migrations().migrations() {
            let indexes = if m.run_in_transaction() {
                Vec::new()
            } else {
                catalog::migration_indexes(conn, m, &builds)
                    .map_err(|e| Error::db("reading the indexes of a migration", e))?
            };
            let row = a.rows.get(normal(m.version())).copied();
            let state = match row {
                Some(r) if r.applied => State::Applied,
                Some(r) if r.failed() => State::Failed,
                _ => State::Pending,
            };
            // A revert that failed leaves the migration applied, with the
            // revert's error (and, halfway through, its progress) shown.
            let half_done = row.is_some_and(|r| r.revert_half_done());
            let revert_failed = half_done || row.is_some_and(|r| r.revert_failed());
            let unfinished = state == State::Failed || revert_failed;
            out.push(MigrationStatus {
                version: m.version().to_string(),
                track: Some(m.track()),
                name: m.name().to_string(),
                state,
                applied_at: row.and_then(|r| r.applied_at.clone()),
                error: row.filter(|_| unfinished).map(|r| {
                    let e = r.error.clone().unwrap_or_else(|| "interrupted".into());
                    if half_done {
                        format!("revert stopped halfway: {e}")
                    } else if revert_failed {
                        format!("revert failed, nothing undone: {e}")
                    } else {
                        e
                    }
                }),
                statements_completed: row
                    .filter(|_| (state == State::Failed || half_done) && !m.run_in_transaction())
                    .and_then(|r| r.statements_completed),
                changed: a.changed.iter().any(|c| c.version() == m.version()),
                history: self
                    .baseline_version()
                    .is_some_and(|b| compare_versions(m.version(), b).is_le()),
                indexes,
            });
        }
        for v in &a.unknown {
            let row = a.rows.get(normal(v)).copied();
            out.push(MigrationStatus {
                version: v.to_string(),
                track: None,
                name: String::new(),
                state: State::Unknown,
                applied_at: row.and_then(|r| r.applied_at.clone()),
                error: None,
                statements_completed: None,
                changed: false,
                history: false,
                indexes: Vec::new(),
            });
        }
        out.sort_by(|a, b| compare_versions(&a.version, &b.version));
        Ok(out)
    }

    /// Checks that every required migration known to the binary is
    /// applied and none has failed. Read-only: works on a hot standby or a
    /// session with `default_transaction_read_only = on`.
    ///
    /// # Errors
    /// When the ledger cannot be read (an incomplete database is not an
    /// error: see [`Verification::is_complete`]).
    pub fn verify(&self, conn: &mut PgConnection) -> Result<Verification, Error> {
        let tables = self.ledger()?.resolve(conn)?;
        let rows = ledger::rows(conn, &tables)?;
        let a = self.analyze(&rows, Track::Required);
        let newest_applied = rows
            .iter()
            .filter(|r| r.applied)
            .map(|r| r.version.as_str())
            .max_by(|a, b| compare_versions(a, b));
        let mut v = Verification {
            unknown: a.unknown.iter().map(|s| s.to_string()).collect(),
            ..Verification::default()
        };
        for m in a.pending {
            match a.rows.get(normal(m.version())) {
                Some(r) if r.failed() => v.failed.push((
                    m.version().to_string(),
                    r.error.clone().unwrap_or_else(|| "failed".into()),
                )),
                _ => {
                    let gap = newest_applied.is_some_and(|n| {
                        compare_versions(m.version(), n) == std::cmp::Ordering::Less
                    });
                    v.missing.push((m.version().to_string(), gap));
                }
            }
        }
        // A revert that stopped halfway left an applied migration partly
        // undone (either track): the schema matches neither side.
        for m in self.migrations().migrations() {
            if let Some(r) = a
                .rows
                .get(normal(m.version()))
                .filter(|r| r.revert_half_done())
            {
                v.failed.push((
                    m.version().to_string(),
                    format!(
                        "its revert stopped halfway ({} of its down.sql statements done): {}. \
                         Run the revert again (`rollout revert`), or finish it by hand and record \
                         it with `rollout resolve {} --rolled-back`",
                        r.statements_completed.unwrap_or(0),
                        r.error.as_deref().unwrap_or("interrupted"),
                        m.version()
                    ),
                ));
            }
        }
        v.failed.sort_by(|(a, _), (b, _)| compare_versions(a, b));
        Ok(v)
    }

    /// The newest version recorded as applied in the database of `conn`
    /// (whichever release or tool applied it), `None` when there is none:
    /// what `rollout baseline` takes when no version is given. Read-only.
    ///
    /// # Errors
    /// When the ledger cannot be read.
    pub fn newest_applied(&self, conn: &mut PgConnection) -> Result<Option<String>, Error> {
        let tables = self.ledger()?.resolve(conn)?;
        let rows = ledger::rows(conn, &tables)?;
        Ok(rows
            .into_iter()
            .filter(|r| r.applied)
            .map(|r| r.version)
            .max_by(|a, b| compare_versions(a, b)))
    }
}
