//! The deferred track: applied in the background after start-up, on a
//! connection checked out of the service's r2d2 pool, by whichever replica
//! wins `pg_try_advisory_lock`. Every other replica carries on serving and
//! looks again later, so when a leader dies another one finishes the work.

mod leader;
mod state;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::Integer;

use crate::error::{Error, ErrorKind};
use crate::lock;
use crate::migrator::Migrator;
use crate::options::StopMode;

pub use self::leader::PgPool;
use self::leader::{discard, run_background};
use self::state::Shared;
pub use self::state::{DeferredMetrics, DeferredState};

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

    /// `max_parallel_maintenance_workers` for the deferred session: how
    /// many extra processes an index build may start. `None` keeps the
    /// server's setting (PostgreSQL's default is 2). Default `Some(0)`: a
    /// background build runs in its one backend and leaves the other cores
    /// to the traffic it must not slow (on 2 cores, in three full runs of
    /// BENCHMARKS.md §5, what a deferred build did to the writers' p99 was
    /// 0.94×, 0.38× and 1.15× what one backend merely reading the table
    /// did, the same build with the server's 2 workers 1.44×, 1.17× and
    /// 1.66×; the build about 1.4× longer). Raise it where cores are spare
    /// and the build's length matters more.
    pub fn deferred_parallel_workers(mut self, workers: Option<u32>) -> Self {
        self.deferred.parallel_workers = workers.map(|n| n.min(1024));
        self
    }

    /// `maintenance_work_mem` for the deferred session, in MiB. `None`
    /// (the default) keeps the server's setting (PostgreSQL's default is
    /// 64 MiB). The slowest writes during a `CREATE INDEX CONCURRENTLY`
    /// come while its validation sorts more than fits and spills to disk
    /// (`BufFileWrite`), writers waiting on `LWLock:BufferContent`: with
    /// enough for the sort (1 GiB for 3 million rows of two columns) the
    /// slowest write during the build fell from 380 ms to 13 ms, from 350
    /// ms to 10 ms and from 545 ms to 10 ms in three full runs of
    /// BENCHMARKS.md §5 (medians of their runs); the writers' p99 did not
    /// fall reliably. Each build may use this much memory.
    pub fn deferred_maintenance_work_mem(mut self, mib: Option<u32>) -> Self {
        self.deferred.maintenance_work_mem_mb = mib.map(|n| n.clamp(1, 2_097_151));
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
