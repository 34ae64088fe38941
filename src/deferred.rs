//! The deferred track: applied in the background after start-up, on a
//! connection checked out of the service's r2d2 pool, by whichever replica
//! wins `pg_try_advisory_lock`. Every other replica carries on serving and
//! looks again later, so when a leader dies another one finishes the work.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::sql_types::Integer;

use crate::catalog::{self, IndexBuildProgress};
use crate::error::{is_connection_error, Error, ErrorKind};
use crate::ledger::{self, Ledger, Tables};
use crate::lock::{self, LockHolder};
use crate::migrator::{apply_statements, normal, Hooks, Migrator};
use crate::session;
use crate::source::Track;

/// The pool type the deferred track checks its connection out of.
pub type PgPool = Pool<ConnectionManager<PgConnection>>;
type PgPooled = PooledConnection<ConnectionManager<PgConnection>>;

/// What [`DeferredHandle::stop`] does with a statement that is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Cancel it with `pg_cancel_backend` (an index build left invalid is
    /// dropped and rebuilt by the next run).
    Cancel,
    /// Let it finish, then stop before the next statement.
    Finish,
}

/// Options of the deferred track; set through [`Migrator`]'s `deferred_*`
/// setters.
#[derive(Debug, Clone)]
pub(crate) struct DeferredOptions {
    retry: bool,
    retry_interval: Duration,
    retry_max_interval: Duration,
    failure_retries: u32,
    failure_backoff: Duration,
    stop_mode: StopMode,
    progress_interval: Duration,
}

impl Default for DeferredOptions {
    fn default() -> Self {
        DeferredOptions {
            retry: true,
            retry_interval: Duration::from_secs(30),
            retry_max_interval: Duration::from_secs(600),
            failure_retries: 3,
            failure_backoff: Duration::from_secs(30),
            stop_mode: StopMode::Cancel,
            progress_interval: Duration::from_secs(10),
        }
    }
}

impl Migrator {
    /// Whether a replica that cannot go on now (another session leads,
    /// required migrations are pending, no connection) looks again later
    /// (`true`), or stops at once in that state (`false`, what `rollout
    /// deferred` does without `--wait`). Default `true`.
    pub fn deferred_retry(mut self, retry: bool) -> Self {
        self.deferred.retry = retry;
        self
    }

    /// First pause before a replica that is not the leader (or found
    /// required migrations pending) looks again; it doubles after each try,
    /// up to [`Migrator::deferred_retry_max_interval`]. It stops looking
    /// once nothing is pending. Default 30 s.
    pub fn deferred_retry_interval(mut self, interval: Duration) -> Self {
        self.deferred.retry_interval = interval;
        self
    }

    /// Longest pause between two looks of a non-leader. Default 10 min.
    pub fn deferred_retry_max_interval(mut self, interval: Duration) -> Self {
        self.deferred.retry_max_interval = interval;
        self
    }

    /// How many times the leader retries a failed deferred migration before
    /// giving up, with a pause of [`Migrator::deferred_failure_backoff`]
    /// doubling each time. Default 3.
    pub fn deferred_failure_retries(mut self, retries: u32) -> Self {
        self.deferred.failure_retries = retries;
        self
    }

    /// First pause before the leader retries a failed deferred migration.
    /// Default 30 s.
    pub fn deferred_failure_backoff(mut self, backoff: Duration) -> Self {
        self.deferred.failure_backoff = backoff;
        self
    }

    /// What stopping does with a running statement. Default
    /// [`StopMode::Cancel`].
    pub fn deferred_stop_mode(mut self, mode: StopMode) -> Self {
        self.deferred.stop_mode = mode;
        self
    }

    /// How often the progress of a running index build is read and logged.
    /// Default 10 s.
    pub fn deferred_progress_interval(mut self, interval: Duration) -> Self {
        self.deferred.progress_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Starts the deferred track in a background thread and returns at
    /// once; the service reports ready without waiting for it.
    ///
    /// The thread checks a connection out of `pool` and keeps it for the
    /// whole run (it counts against the pool's size). It tries the deferred
    /// track's advisory lock once: the winner applies the pending deferred
    /// migrations, outside any transaction, statement by statement, with the
    /// catalog checks on index builds; a replica that does not win returns
    /// the connection and looks again later, with backoff, until nothing is
    /// pending. A deferred migration never starts while required migrations
    /// known to this binary are pending. Progress of index builds is read
    /// on a second, short checkout, skipped when the service uses them all.
    pub fn start_deferred(&self, pool: PgPool) -> DeferredHandle {
        let shared = Arc::new(Shared::default());
        let migrator = self.clone();
        let thread_shared = Arc::clone(&shared);
        let thread_pool = pool.clone();
        let thread = std::thread::Builder::new()
            .name("diesel-rollout-deferred".into())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_background(&migrator, &thread_pool, &thread_shared)
                }));
                let end = match outcome {
                    Ok(state) => state,
                    Err(_) => DeferredState::Failed {
                        version: None,
                        error: "the deferred track's thread panicked".into(),
                    },
                };
                thread_shared.finish(end);
            })
            .ok();
        if thread.is_none() {
            shared.finish(DeferredState::Failed {
                version: None,
                error: "could not start the deferred track's thread".into(),
            });
        }
        DeferredHandle {
            shared,
            thread,
            pool,
            stop_mode: self.deferred.stop_mode,
            redactor: self.pool_redactor(),
        }
    }

    /// The start-up call of a service: applies the required track on a
    /// connection checked out of `pool` (blocking, as
    /// [`Migrator::run_required_on`]), then starts the deferred track in the
    /// background (as [`Migrator::start_deferred`]) and returns at once.
    /// Report ready when this returns `Ok`, whatever the deferred track is
    /// doing.
    ///
    /// # Errors
    /// As [`Migrator::run_required_on`]; the deferred track is not started.
    /// The connection used is discarded, not returned to the pool: its state
    /// is unknown, or a failed migration may have changed its settings.
    pub fn run(&self, pool: &PgPool) -> Result<(crate::Report, DeferredHandle), Error> {
        let mut conn = pool.get().map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!(
                    "cannot check a connection out of the pool: {}",
                    self.redact_pool_error(&e.to_string())
                ),
            )
        })?;
        let mut probe = || {
            pool.get_timeout(Duration::from_secs(2))
                .ok()
                .and_then(|mut c| lock::backend_pid(&mut c).ok())
        };
        match self.run_required_probed(&mut conn, &mut probe) {
            Ok(report) => {
                if report.applied.is_empty() {
                    drop(conn);
                } else {
                    // The migrations may have changed session settings.
                    discard(conn);
                }
                Ok((report, self.start_deferred(pool.clone())))
            }
            Err(e) => {
                // Its state is unknown, or a failed migration may have
                // changed session settings: never hand it to the service.
                discard(conn);
                Err(e)
            }
        }
    }

    /// Applies the deferred track in the foreground: as
    /// [`Migrator::start_deferred`], waiting for it to finish.
    pub fn run_deferred(&self, pool: PgPool) -> DeferredState {
        let handle = self.start_deferred(pool);
        handle.wait(Duration::MAX);
        handle.state()
    }
}

/// Where the deferred track stands.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum DeferredState {
    /// The thread has not looked yet.
    NotStarted,
    /// Required migrations known to this binary are pending; deferred ones
    /// wait for them.
    WaitingForRequired {
        /// How many required migrations are pending.
        pending: usize,
    },
    /// Trying the deferred lock.
    WaitingForLock,
    /// Another session leads; this replica looks again later (unless
    /// [`Migrator::deferred_retry`] is off).
    NotLeader {
        /// Who holds the lock, when known.
        holder: Option<LockHolder>,
        /// When this replica looks again (`None`: it does not).
        retry_in: Option<Duration>,
    },
    /// This replica leads and is applying a migration.
    Running {
        /// The version being applied.
        version: String,
        /// Its directory name.
        name: String,
        /// The statement running (1-based).
        statement: usize,
        /// Statements in the migration.
        statements: usize,
        /// Try number for this migration (1 = first).
        attempt: u32,
        /// Progress of the index build running, if any.
        progress: Option<IndexBuildProgress>,
    },
    /// The connection or a query of the harness failed; this replica looks
    /// again later.
    Reconnecting {
        /// What failed.
        error: String,
    },
    /// A migration failed; the leader tries it again after a pause.
    Retrying {
        /// The version that failed.
        version: String,
        /// Its error.
        error: String,
        /// Tries so far.
        attempt: u32,
        /// Pause before the next try.
        retry_in: Duration,
    },
    /// Nothing is pending any more.
    Done {
        /// Versions this replica applied.
        applied: Vec<String>,
    },
    /// Gave up: this replica, or another one since this one started,
    /// exhausted its retries. The next start (a restart, the next deploy,
    /// `rollout deferred`) tries again.
    Failed {
        /// The migration that failed, when one did.
        version: Option<String>,
        /// The error.
        error: String,
    },
    /// Stopped by [`DeferredHandle::stop`] before finishing.
    Stopped,
}

/// Counters and timings of the deferred track, for the service to expose.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeferredMetrics {
    /// Runs that applied everything pending.
    pub runs_success: u64,
    /// Runs that gave up on a failure.
    pub runs_failure: u64,
    /// Looks that found another session leading.
    pub runs_not_leader: u64,
    /// Time from start until this replica took the lock (zero if it never
    /// did).
    pub lock_wait: Duration,
    /// Duration of each deferred migration this replica applied.
    pub migration_durations: Vec<(String, Duration)>,
    /// Deferred migrations pending at the last look.
    pub pending: usize,
    /// Invalid indexes found and dropped to be rebuilt.
    pub invalid_indexes_repaired: u64,
}

#[derive(Default)]
struct Inner {
    state: Option<DeferredState>,
    finished: bool,
    metrics: DeferredMetrics,
}

#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
    changed: Condvar,
    stop: AtomicBool,
    leader_pid: AtomicI32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, state: DeferredState) {
        self.lock().state = Some(state);
        self.changed.notify_all();
    }

    fn finish(&self, state: DeferredState) {
        let mut inner = self.lock();
        inner.state = Some(state);
        inner.finished = true;
        drop(inner);
        self.changed.notify_all();
    }

    fn metrics(&self, f: impl FnOnce(&mut DeferredMetrics)) {
        f(&mut self.lock().metrics);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps up to `d`, waking early when asked to stop. Returns `true`
    /// when stopping.
    fn pause(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut inner = self.lock();
        while !self.stopping() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            inner = self
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        self.stopping()
    }
}

/// The running deferred track. Dropping it stops the track as
/// [`DeferredHandle::stop`] does.
pub struct DeferredHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    pool: PgPool,
    stop_mode: StopMode,
    redactor: crate::url::PoolRedactor,
}

impl std::fmt::Debug for DeferredHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredHandle")
            .field("state", &self.state())
            .finish()
    }
}

impl DeferredHandle {
    /// The current state.
    pub fn state(&self) -> DeferredState {
        self.shared
            .lock()
            .state
            .clone()
            .unwrap_or(DeferredState::NotStarted)
    }

    /// Counters and timings so far.
    pub fn metrics(&self) -> DeferredMetrics {
        self.shared.lock().metrics.clone()
    }

    /// `true` once the track will do nothing more.
    pub fn is_finished(&self) -> bool {
        self.shared.lock().finished
    }

    /// Waits until the track is finished or `timeout` passes, and returns
    /// the state then.
    pub fn wait(&self, timeout: Duration) -> DeferredState {
        let deadline = Instant::now().checked_add(timeout);
        let mut inner = self.shared.lock();
        while !inner.finished {
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => break,
                },
                None => Duration::from_secs(3600),
            };
            inner = self
                .shared
                .changed
                .wait_timeout(inner, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        inner.state.clone().unwrap_or(DeferredState::NotStarted)
    }

    /// Waits for the next change of state, up to `timeout`, and returns
    /// the state then.
    pub fn wait_for_change(&self, timeout: Duration) -> DeferredState {
        let inner = self.shared.lock();
        let inner = if inner.finished {
            inner
        } else {
            self.shared
                .changed
                .wait_timeout(inner, timeout)
                .unwrap_or_else(|p| p.into_inner())
                .0
        };
        inner.state.clone().unwrap_or(DeferredState::NotStarted)
    }

    /// Stops the track for shutdown and waits for its thread: a running
    /// statement is cancelled or allowed to finish, per
    /// [`Migrator::deferred_stop_mode`]; the lock is released and the
    /// connection returned to the pool. Returns the final state.
    pub fn stop(mut self) -> DeferredState {
        self.stop_now();
        self.state()
    }

    fn stop_now(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        let Some(thread) = self.thread.take() else {
            return;
        };
        // A cancel can arrive between two statements and miss the next
        // one: send it again until the thread is gone.
        while !thread.is_finished() {
            if self.stop_mode == StopMode::Cancel {
                let pid = self.shared.leader_pid.load(Ordering::SeqCst);
                if pid != 0 {
                    match self.pool.get_timeout(Duration::from_secs(2)) {
                        Ok(mut conn) => {
                            let r = diesel::sql_query("SELECT pg_cancel_backend($1)")
                                .bind::<Integer, _>(pid)
                                .execute(&mut conn);
                            tracing::info!(
                                pid,
                                ok = r.is_ok(),
                                "cancelling the running deferred statement"
                            );
                        }
                        Err(e) => tracing::warn!(
                            error = %self.redactor.redact(&e.to_string()),
                            "no pooled connection to cancel the deferred statement with; trying again"
                        ),
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let _ = thread.join();
    }
}

impl Drop for DeferredHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop_now();
        }
    }
}

/// Throws a pooled connection away instead of returning it: r2d2 drops a
/// connection whose transaction manager is in error, and closing it
/// releases any session lock it holds.
fn discard(mut conn: PgPooled) {
    AnsiTransactionManager::transaction_manager_status_mut(&mut *conn).set_in_error();
    drop(conn);
}

fn run_background(m: &Migrator, pool: &PgPool, shared: &Shared) -> DeferredState {
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
            && r.attempt_checksum.as_deref() == Some(first.checksum())
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
    let (lock_timeout, statement_timeout) = m.deferred_timeouts();
    // Resolved again under the lock: the key came from the first resolution.
    let mut tables = ledger.resolve(conn).map_err(Led::Lost)?;
    if tables.schema != resolved.schema {
        return Err(Led::Lost(Error::new(
            ErrorKind::Database,
            "the migration ledger moved to another schema while taking the deferred lock",
        )));
    }
    let mut setup = || -> Result<i32, Error> {
        ledger::ensure_tables(conn, &mut tables)?;
        // The connection is discarded after leading: nothing to restore.
        let _replaced = session::Timeouts::set(conn, lock_timeout, statement_timeout)?;
        // PostgreSQL 14+: notice a dead client during a long build, so the
        // lock is released and another replica can take over.
        let _ = conn.batch_execute("SET client_connection_check_interval = '5s'");
        // Shown to replicas that find the lock taken; the connection is
        // discarded after leading, so the service never sees the change.
        crate::migrator::set_application_name(conn, &format!("{} (deferred)", m.app_name()))?;
        #[derive(QueryableByName)]
        struct Pid {
            #[diesel(sql_type = Integer)]
            pid: i32,
        }
        let pid = diesel::sql_query("SELECT pg_backend_pid() AS pid")
            .get_result::<Pid>(conn)
            .map_err(|e| Error::db("reading the backend pid", e))?
            .pid;
        ledger::mark_interrupted(conn, &tables, Track::Deferred)?;
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
                    let hooks = Hooks {
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
                    // Re-read the row: it tells where a retry resumes.
                    let rows = ledger::rows(conn, tables).map_err(Led::Lost)?;
                    let row = rows
                        .iter()
                        .find(|r| normal(&r.version) == normal(migration.version()));
                    let started = Instant::now();
                    let outcome = apply_statements(conn, tables, migration, row, &hooks);
                    match outcome {
                        Ok(_) => {
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
