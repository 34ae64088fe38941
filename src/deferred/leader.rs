//! The deferred track's thread: look, lead when the lock is won, retry,
//! and report progress.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::sql_types::Integer;

use crate::catalog;
use crate::deferred::state::{DeferredState, Shared};
use crate::error::{is_connection_error, Error, ErrorKind};
use crate::executor;
use crate::ledger::{self, Ledger, Tables};
use crate::lock;
use crate::migration::normal;
use crate::migrator::Migrator;
use crate::session;
use crate::source::Track;

/// The pool type the deferred track checks its connection out of.
pub type PgPool = Pool<ConnectionManager<PgConnection>>;
type PgPooled = PooledConnection<ConnectionManager<PgConnection>>;

/// Throws a pooled connection away instead of returning it: r2d2 drops a
/// connection whose transaction manager is in error, and closing it
/// releases any session lock it holds.
pub(crate) fn discard(mut conn: PgPooled) {
    AnsiTransactionManager::transaction_manager_status_mut(&mut *conn).set_in_error();
    drop(conn);
}

pub(crate) fn run_background(m: &Migrator, pool: &PgPool, shared: &Shared) -> DeferredState {
    let opts = &m.deferred;
    let mut delay = opts.retry_interval;
    let mut since = Since {
        started: Instant::now(),
        server_epoch: None,
    };
    let mut applied = Vec::new();
    let ledger = match m.ledger() {
        Ok(l) => l,
        Err(e) => {
            return DeferredState::Failed {
                version: None,
                error: e.to_string(),
            }
        }
    };
    loop {
        if shared.stopping() {
            return DeferredState::Stopped;
        }
        let next = match look(m, pool, shared, &ledger, &mut since, &mut applied) {
            Look::Finished(state) => return state,
            Look::Again(state) => state,
        };
        let retry_in = opts.retry.then_some(delay);
        let next = match next {
            DeferredState::NotLeader { holder, .. } => {
                DeferredState::NotLeader { holder, retry_in }
            }
            other => other,
        };
        let Some(wait) = retry_in else {
            return next;
        };
        tracing::debug!(
            retry_in_secs = wait.as_secs_f64(),
            "deferred track: looking again later"
        );
        shared.set(next);
        if shared.pause(wait) {
            return DeferredState::Stopped;
        }
        delay = (delay * 2).min(opts.retry_max_interval.max(opts.retry_interval));
    }
}

enum Look {
    Finished(DeferredState),
    Again(DeferredState),
}

/// When this track started: locally, and on the server's clock (read at
/// the first look), to tell failures recorded since from older ones.
struct Since {
    started: Instant,
    server_epoch: Option<f64>,
}

fn reconnecting(m: &Migrator, e: impl std::fmt::Display) -> DeferredState {
    DeferredState::Reconnecting {
        error: m.redact_pool_error(&e.to_string()),
    }
}

/// One look: check out a connection, see what is pending, try the lock,
/// and lead if it is won.
fn look(
    m: &Migrator,
    pool: &PgPool,
    shared: &Shared,
    ledger: &Ledger,
    since: &mut Since,
    applied: &mut Vec<String>,
) -> Look {
    let mut conn = match pool.get() {
        Ok(c) => c,
        Err(e) => {
            let state = reconnecting(m, format!("no connection from the pool: {e}"));
            tracing::warn!(?state, "deferred track: no connection from the pool");
            return Look::Again(state);
        }
    };
    if since.server_epoch.is_none() {
        match ledger::server_epoch(&mut conn) {
            // The server's clock when this track started.
            Ok(now) => since.server_epoch = Some(now - since.started.elapsed().as_secs_f64()),
            Err(e) => return Look::Again(reconnecting(m, e)),
        }
    }
    let tables = match ledger.resolve(&mut conn) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "deferred track: cannot find the ledger");
            return Look::Again(reconnecting(m, e));
        }
    };
    let rows = match ledger::rows(&mut conn, &tables) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "deferred track: cannot read the ledger");
            return Look::Again(reconnecting(m, e));
        }
    };
    let deferred = m.analyze(&rows, Track::Deferred);
    shared.metrics(|x| x.pending = deferred.pending.len());
    crate::metrics::deferred_pending(deferred.pending.len());
    let plan = m.deferred_plan(&rows);
    if deferred.pending.is_empty() || (plan.waiting_for.is_empty() && plan.runnable.is_empty()) {
        tracing::debug!("deferred track: nothing pending");
        if applied.is_empty() {
            crate::metrics::run(Track::Deferred, "nothing_pending");
        }
        return Look::Finished(DeferredState::Done {
            applied: std::mem::take(applied),
        });
    }
    // Strict mode refuses what `up` refuses: a changed applied migration,
    // a deferred migration older than one applied on this track.
    if let Err(e) = m.check_drift(&deferred, &mut crate::report::Report::default()) {
        tracing::error!(error = %e, "deferred track: strict mode refuses to run");
        return Look::Finished(DeferredState::Failed {
            version: e.migration().map(|r| r.version.clone()),
            error: e.to_string(),
        });
    }
    // A leader (this replica or another) gave up on the next migration since
    // this track started: do not run the same failing build again on every
    // replica. The next start tries again.
    let first = plan
        .runnable
        .first()
        .copied()
        .unwrap_or(deferred.pending[0]);
    if let Some(r) = deferred.rows.get(normal(first.version())) {
        let gave_up_since = r.outcome.as_deref() == Some("failed")
            && r.attempt_checksum
                .as_deref()
                .is_some_and(|c| first.checksum_matches(c))
            && r.finished_epoch
                .zip(since.server_epoch)
                .is_some_and(|(f, s)| f >= s);
        if gave_up_since {
            let error = format!(
                "deferred migration {} failed since this replica started, and its leader gave \
                 up: {}. Fix the cause, then restart a replica or run `rollout deferred`",
                first.dir_name(),
                r.error.as_deref().unwrap_or("no error recorded")
            );
            tracing::warn!("{error}");
            return Look::Finished(DeferredState::Failed {
                version: Some(first.version().to_string()),
                error,
            });
        }
    }
    let required = &plan.waiting_for;
    if !required.is_empty() {
        tracing::info!(
            pending = required.len(),
            "deferred track: waiting for required migrations to be applied first"
        );
        return Look::Again(DeferredState::WaitingForRequired {
            pending: required.len(),
        });
    }
    drop(rows);
    shared.set(DeferredState::WaitingForLock);
    let keys = m.keys(ledger, &tables, Track::Deferred);
    let key = keys[0];
    match lock::try_lock_all(&mut conn, &keys) {
        Ok(true) => {}
        Ok(false) => {
            let holder = lock::holder(&mut conn, &keys).ok().flatten();
            shared.metrics(|x| x.runs_not_leader += 1);
            crate::metrics::run(Track::Deferred, "not_leader");
            match &holder {
                Some(h) => tracing::info!(holder = %h, "deferred track: another session leads"),
                None => tracing::info!("deferred track: another session leads"),
            }
            return Look::Again(DeferredState::NotLeader {
                holder,
                retry_in: None,
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "deferred track: cannot try the lock");
            discard(conn);
            return Look::Again(reconnecting(m, e));
        }
    }
    // Through a pooler in transaction mode, the lock's backend is handed to
    // the next client: a second pooled connection landing on it gives the
    // pooler away.
    let held = lock::held_by_me(&mut conn, key).map(|mine| {
        mine && match (
            lock::backend_pid(&mut conn),
            pool.get_timeout(Duration::from_millis(50)).ok(),
        ) {
            (Ok(me), Some(mut other)) => lock::backend_pid(&mut other).ok() != Some(me),
            _ => true,
        }
    });
    match held {
        Ok(true) => {}
        Ok(false) => {
            let holder = lock::holder(&mut conn, &keys).ok().flatten();
            let _ = lock::unlock_all(&mut conn, &keys);
            discard(conn);
            let e = Error::new(
                ErrorKind::LockNotHeld,
                format!(
                    "the deferred lock was granted but pg_locks does not show it held by this \
                     session's backend: a pooler in transaction mode sits in the way; give the \
                     migrator a pool of direct connections.{}",
                    match holder {
                        Some(h) => format!(
                            " The lock may now be held by the pooler's server connection, {h}, \
                             until the pooler closes it: end it with pg_terminate_backend({})",
                            h.pid
                        ),
                        None => String::new(),
                    }
                ),
            );
            return Look::Finished(DeferredState::Failed {
                version: None,
                error: e.to_string(),
            });
        }
        Err(e) => {
            discard(conn);
            return Look::Again(reconnecting(m, e));
        }
    }
    shared.metrics(|x| x.lock_wait = since.started.elapsed());
    crate::metrics::lock_wait(Track::Deferred, since.started.elapsed());
    tracing::info!(key, "deferred track: this replica leads");

    let result = lead(m, &mut conn, pool, shared, ledger, &tables, applied);
    shared.leader_pid.store(0, Ordering::SeqCst);
    if !matches!(lock::unlock_all(&mut conn, &keys), Ok(true)) {
        tracing::warn!("deferred track: the lock's state is unknown; discarding the connection");
    }
    // Migrations may have changed session settings (SET ROLE, search_path,
    // session_replication_role...): never hand this connection to the
    // service. Closing it also releases the lock whatever happened.
    discard(conn);
    match result {
        Ok(()) => {
            shared.metrics(|x| {
                x.runs_success += 1;
                x.pending = 0;
            });
            crate::metrics::run(Track::Deferred, "success");
            crate::metrics::deferred_pending(0);
            Look::Finished(DeferredState::Done {
                applied: std::mem::take(applied),
            })
        }
        Err(Led::Stopped) => Look::Finished(DeferredState::Stopped),
        Err(Led::Gave(state)) => {
            let state = *state;
            shared.metrics(|x| x.runs_failure += 1);
            crate::metrics::run(Track::Deferred, "failure");
            Look::Finished(state)
        }
        Err(Led::Lost(e)) => {
            tracing::warn!(error = %e, "deferred track: lost the connection while leading; looking again later");
            Look::Again(reconnecting(m, e))
        }
    }
}

enum Led {
    Stopped,
    Gave(Box<DeferredState>),
    Lost(Error),
}

fn lead(
    m: &Migrator,
    conn: &mut PgConnection,
    pool: &PgPool,
    shared: &Shared,
    ledger: &Ledger,
    resolved: &Tables,
    applied: &mut Vec<String>,
) -> Result<(), Led> {
    // Resolved again under the lock: the key came from the first resolution.
    let mut tables = ledger.resolve(conn).map_err(Led::Lost)?;
    if tables.schema != resolved.schema {
        return Err(Led::Lost(Error::new(
            ErrorKind::Database,
            "the migration ledger moved to another schema while taking the deferred lock",
        )));
    }
    let mut setup = || -> Result<i32, Error> {
        ledger::ensure_tables(conn, ledger, &mut tables)?;
        // The connection is discarded after leading: nothing to restore.
        let _replaced = session::Settings::set(conn, &m.session_for(Track::Deferred))?;
        // PostgreSQL 14+: notice a dead client during a long build, so the
        // lock is released and another replica can take over.
        let _ = conn.batch_execute("SET client_connection_check_interval = '5s'");
        // Shown to replicas that find the lock taken; the connection is
        // discarded after leading, so the service never sees the change.
        session::set_application_name(conn, &format!("{} (deferred)", m.app_name()))?;
        #[derive(QueryableByName)]
        struct Pid {
            #[diesel(sql_type = Integer)]
            pid: i32,
        }
        let pid = diesel::sql_query("SELECT pg_backend_pid() AS pid")
            .get_result::<Pid>(conn)
            .map_err(|e| Error::db("reading the backend pid", e))?
            .pid;
        ledger::mark_interrupted(conn, &tables, &[Track::Deferred])?;
        Ok(pid)
    };
    let pid = setup().map_err(|e| {
        if e.connection_unusable() {
            Led::Lost(e)
        } else {
            Led::Gave(Box::new(DeferredState::Failed {
                version: None,
                error: e.to_string(),
            }))
        }
    })?;
    shared.leader_pid.store(pid, Ordering::SeqCst);
    let tables = &tables;

    let rows = ledger::rows(conn, tables).map_err(Led::Lost)?;
    // Strict mode again, on the rows read under the lock.
    let deferred = m.analyze(&rows, Track::Deferred);
    if let Err(e) = m.check_drift(&deferred, &mut crate::report::Report::default()) {
        tracing::error!(error = %e, "deferred track: strict mode refuses to run");
        return Err(Led::Gave(Box::new(DeferredState::Failed {
            version: e.migration().map(|r| r.version.clone()),
            error: e.to_string(),
        })));
    }
    let plan = m.deferred_plan(&rows);
    let required = &plan.waiting_for;
    if let Some(first) = required.first() {
        tracing::info!(
            first = first.dir_name(),
            "deferred track: required migrations pending"
        );
        return Err(Led::Gave(Box::new(DeferredState::WaitingForRequired {
            pending: required.len(),
        })));
    }
    let pending: Vec<_> = plan.runnable.clone();
    let progress_done = AtomicBool::new(false);
    /// Ends the progress monitor however leading ends, panics included
    /// (else the scope would wait for it for ever).
    struct Done<'a>(&'a AtomicBool, &'a Shared);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
            self.1.changed.notify_all();
        }
    }
    std::thread::scope(|scope| {
        scope.spawn(|| monitor(m, pool, shared, pid, &progress_done));
        let _done = Done(&progress_done, shared);
        let result = (|| {
            for migration in pending {
                let mut attempt = 1u32;
                let mut backoff = m.deferred.failure_backoff;
                loop {
                    let set_running = |statement: usize, statements: usize| {
                        let mut inner = shared.lock();
                        let progress = match &inner.state {
                            Some(DeferredState::Running {
                                version, progress, ..
                            }) if version == migration.version() => progress.clone(),
                            _ => None,
                        };
                        inner.state = Some(DeferredState::Running {
                            version: migration.version().to_string(),
                            name: migration.dir_name().to_string(),
                            statement,
                            statements,
                            attempt,
                            progress,
                        });
                        drop(inner);
                        shared.changed.notify_all();
                    };
                    set_running(0, 0);
                    let on_statement =
                        |_: &crate::Migration, i: usize, n: usize| set_running(i + 1, n);
                    let should_stop = || shared.stopping();
                    let on_index_repaired =
                        |_: &str| shared.metrics(|x| x.invalid_indexes_repaired += 1);
                    let options = executor::Options {
                        on_statement: &on_statement,
                        should_stop: &should_stop,
                        on_index_repaired: &on_index_repaired,
                        failure_outcome: if attempt > m.deferred.failure_retries {
                            "failed"
                        } else {
                            "retrying"
                        },
                        poll: Duration::from_secs(2),
                    };
                    let started = Instant::now();
                    // The migration's ledger row is read afresh where it runs.
                    let outcome = executor::apply(conn, tables, migration, &options);
                    match outcome {
                        Ok(None) => {
                            // Applied meanwhile by another session (a release
                            // that has it on the required track).
                            tracing::info!(
                                version = migration.version(),
                                "deferred migration {} was applied by another session",
                                migration.dir_name()
                            );
                            shared.metrics(|x| {
                                x.pending = x.pending.saturating_sub(1);
                                crate::metrics::deferred_pending(x.pending);
                            });
                            break;
                        }
                        Ok(Some(_)) => {
                            shared.metrics(|x| {
                                x.migration_durations
                                    .push((migration.version().to_string(), started.elapsed()));
                                x.pending = x.pending.saturating_sub(1);
                                crate::metrics::deferred_pending(x.pending);
                            });
                            crate::metrics::migration_duration(
                                Track::Deferred,
                                migration.version(),
                                started.elapsed(),
                            );
                            applied.push(migration.version().to_string());
                            break;
                        }
                        Err(e) if e.kind() == ErrorKind::Stopped || shared.stopping() => {
                            tracing::info!("deferred track: stopped ({e})");
                            return Err(Led::Stopped);
                        }
                        Err(e) if e.connection_unusable() || is_lost(conn) => {
                            return Err(Led::Lost(e));
                        }
                        Err(e) if attempt > m.deferred.failure_retries => {
                            tracing::error!(error = %e, attempts = attempt, "deferred track: giving up");
                            return Err(Led::Gave(Box::new(DeferredState::Failed {
                                version: Some(migration.version().to_string()),
                                error: e.to_string(),
                            })));
                        }
                        Err(e) => {
                            tracing::warn!(
                                error = %e,
                                attempt,
                                retry_in_secs = backoff.as_secs_f64(),
                                "deferred migration failed; retrying"
                            );
                            shared.set(DeferredState::Retrying {
                                version: migration.version().to_string(),
                                error: e.to_string(),
                                attempt,
                                retry_in: backoff,
                            });
                            if shared.pause(backoff) {
                                return Err(Led::Stopped);
                            }
                            attempt += 1;
                            backoff = backoff.saturating_mul(2);
                        }
                    }
                }
            }
            Ok(())
        })();
        result
    })
}

fn is_lost(conn: &mut PgConnection) -> bool {
    diesel::sql_query("SELECT 1").execute(conn).is_err()
}

/// Reads the leader's build progress at intervals on a short checkout,
/// when the pool has a connection to spare, and logs it.
fn monitor(m: &Migrator, pool: &PgPool, shared: &Shared, pid: i32, done: &AtomicBool) {
    let every = m.deferred.progress_interval;
    loop {
        let deadline = Instant::now() + every;
        {
            let mut inner = shared.lock();
            while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                inner = shared
                    .changed
                    .wait_timeout(inner, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        if done.load(Ordering::SeqCst) {
            return;
        }
        // A short checkout: it may open a connection while the pool is
        // under its size, and gives up at once when the service uses them all.
        let Ok(mut conn) = pool.get_timeout(Duration::from_millis(50)) else {
            continue;
        };
        let progress = match catalog::builds_in_progress(&mut conn) {
            Ok(builds) => builds
                .into_iter()
                .find(|b| b.pid == pid)
                .map(|b| b.progress),
            Err(e) => {
                if is_connection_error(&e) {
                    discard(conn);
                }
                continue;
            }
        };
        if let Some(p) = &progress {
            tracing::info!(
                index = %p.index_name,
                table = %p.table_name,
                phase = %p.phase,
                blocks_done = p.blocks_done,
                blocks_total = p.blocks_total,
                tuples_done = p.tuples_done,
                tuples_total = p.tuples_total,
                "building {p}"
            );
        }
        let mut inner = shared.lock();
        if let Some(DeferredState::Running { progress: slot, .. }) = &mut inner.state {
            *slot = progress;
        }
        drop(inner);
        shared.changed.notify_all();
    }
}
