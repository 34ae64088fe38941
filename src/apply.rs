//! Applying a track's pending migrations in order, each through the
//! executor, under the track's lock: `requires_deferred` ordering, retries
//! on lock timeouts, and the migrations' own locks taken for the run.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use diesel::prelude::*;

use crate::analysis::Analysis;
use crate::error::{Error, ErrorKind};
use crate::executor;
use crate::ledger::{self, LedgerRow, Tables};
use crate::migration::{normal, Migration};
use crate::migrator::Migrator;
use crate::report::{Applied, Report};
use crate::session;
use crate::source::Track;

/// How many own locks of pending no-transaction migrations a run takes
/// before it reads the ledger; any more take theirs one at a time.
const CLAIMED_AT_ONCE: usize = 32;

/// What a track's run applies: the pending migrations in order, the ledger
/// rows they were found from (by normalised version), and those of them
/// whose own locks were held when the rows were read (normalised).
pub(crate) struct Pending<'a> {
    pub migrations: &'a [&'a Migration],
    pub rows: &'a HashMap<&'a str, &'a LedgerRow>,
    pub held: &'a [String],
}

impl Migrator {
    /// Applies what `first` (read under the track's lock) leaves pending,
    /// with the pending no-transaction migrations' own locks taken first
    /// and the ledger read again under them.
    pub(crate) fn apply_fresh(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        first: Analysis<'_>,
        track: Track,
        report: &mut Report,
    ) -> Result<(), Error> {
        // The pending no-transaction migrations' own locks, in one
        // statement, then the ledger read again: their rows cannot change
        // under this run any more (a release that has one on the other
        // track takes its lock too), so none needs a lock or a read of its
        // own. One not free is run the slow way, when its turn comes.
        // At most `CLAIMED_AT_ONCE`: each lock takes a slot of the
        // server's shared lock table (64 per connection by default).
        let no_tx: Vec<&Migration> = first
            .pending
            .iter()
            .filter(|m| !m.run_in_transaction())
            .take(CLAIMED_AT_ONCE)
            .copied()
            .collect();
        let mut claim = executor::claim_all(conn, tables, &no_tx)?;
        let held = std::mem::take(&mut claim.versions);
        let conn: &mut PgConnection = &mut claim;
        let fresh;
        let a = if held.is_empty() {
            first
        } else {
            fresh = ledger::rows(conn, tables)?;
            match self.pending_locked(&fresh, track, report)? {
                Some(a) => a,
                None => return Ok(()),
            }
        };
        // The connection may be the service's (a pooled one): put back what
        // was set before, not the server's defaults.
        let saved = session::Settings::set(conn, &self.session_for(track))?;
        let pending = Pending {
            migrations: &a.pending,
            rows: &a.rows,
            held: &held,
        };
        let applied = self.apply_pending(conn, tables, &pending, track, report);
        let restored = saved.restore(conn);
        applied?;
        restored
    }

    /// Applies `pending` in order on `track`, each added to `report` once
    /// applied; stops at the first failure.
    pub(crate) fn apply_pending(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        pending: &Pending<'_>,
        track: Track,
        report: &mut Report,
    ) -> Result<(), Error> {
        let (rows, held) = (pending.rows, pending.held);
        for &m in pending.migrations {
            for dep in m.requires_deferred() {
                let applied = rows.get(normal(dep)).is_some_and(|r| r.applied);
                if !applied {
                    let dep_name = self
                        .migrations()
                        .get(dep)
                        .map_or_else(|| dep.to_string(), |d| d.dir_name().to_string());
                    let state = match rows.get(normal(dep)) {
                        Some(r) if r.failed() => "failed",
                        Some(r) if r.outcome.as_deref() == Some("running") => "running",
                        _ => "pending",
                    };
                    return Err(Error::new(
                        ErrorKind::DeferredDependency,
                        format!(
                            "migration {} requires deferred migration {dep_name} \
                             (requires_deferred in its metadata.toml), which is not applied yet \
                             ({state}). Required migrations stop here; those before it are \
                             applied. `rollout up` applies both in order (the required track \
                             up to here, then {dep_name}, then the rest); or let the deferred \
                             track apply it (`rollout deferred --wait`, or the replicas of the \
                             previous release) and start again. A deferred migration a \
                             required one depends on belongs in an earlier release",
                            m.dir_name()
                        ),
                    )
                    .at(m, None));
                }
            }
            // Its own lock held since `rows` were read: they are fresh.
            let row = rows.get(normal(m.version())).copied();
            let claimed = held.iter().any(|v| v == normal(m.version()));
            let Some(applied) =
                self.apply_retrying_lock_timeouts(conn, tables, m, row, claimed, track)?
            else {
                continue;
            };
            crate::metrics::migration_duration(track, m.version(), applied.duration);
            report.applied.push(applied);
        }
        Ok(())
    }

    /// Applies one migration; a failure on `lock_timeout` (nothing of the
    /// failed statement applied, the table's lock queue left at once) is
    /// retried with backoff until the lock-timeout retry deadline, each
    /// retry logged with who was in the way. `None` when another session (the
    /// other track's) applied it meanwhile.
    fn apply_retrying_lock_timeouts(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        m: &Migration,
        row: Option<&LedgerRow>,
        claimed: bool,
        track: Track,
    ) -> Result<Option<Applied>, Error> {
        let deadline = Instant::now() + self.lock_retry_deadline;
        let mut backoff = Duration::from_millis(500);
        let mut attempt = 1u32;
        loop {
            let options = executor::Options::plain();
            // The row as planned the first time (read under its own lock,
            // when `claimed`); a retry's is read again (the failed attempt
            // wrote it, or another session ran it meanwhile).
            let result = if claimed && attempt == 1 {
                executor::apply_claimed(conn, tables, m, row, &options)
            } else if claimed {
                ledger::row(conn, tables, m.version()).and_then(|row| {
                    executor::apply_claimed(conn, tables, m, row.as_ref(), &options)
                })
            } else if attempt == 1 && m.run_in_transaction() {
                executor::apply_planned(conn, tables, m, row, &options)
            } else {
                executor::apply(conn, tables, m, &options)
            };
            if let Ok(None) = result {
                tracing::info!(
                    track = %track,
                    version = m.version(),
                    "migration {} was applied by another session meanwhile",
                    m.dir_name()
                );
            }
            match result {
                Err(e) if e.is_lock_timeout() && Instant::now() + backoff < deadline => {
                    tracing::warn!(
                        track = %track,
                        version = m.version(),
                        attempt,
                        retry_in_ms = backoff.as_millis() as u64,
                        error = %e,
                        "migration {} could not take its lock in time; retrying",
                        m.dir_name()
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}
