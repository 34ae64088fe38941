//! Where the deferred track stands, shared between its thread and the
//! [`DeferredHandle`](crate::DeferredHandle).

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::lock::LockHolder;
use crate::report::IndexBuildProgress;

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
    /// [`Migrator::deferred_retry`](crate::Migrator::deferred_retry) is off).
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
    /// Stopped by [`DeferredHandle::stop`](crate::DeferredHandle::stop) before finishing.
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
pub(crate) struct Inner {
    pub state: Option<DeferredState>,
    pub finished: bool,
    pub metrics: DeferredMetrics,
}

#[derive(Default)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    pub changed: Condvar,
    pub stop: AtomicBool,
    pub leader_pid: AtomicI32,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set(&self, state: DeferredState) {
        self.lock().state = Some(state);
        self.changed.notify_all();
    }

    pub(crate) fn finish(&self, state: DeferredState) {
        let mut inner = self.lock();
        inner.state = Some(state);
        inner.finished = true;
        drop(inner);
        self.changed.notify_all();
    }

    pub(crate) fn metrics(&self, f: impl FnOnce(&mut DeferredMetrics)) {
        f(&mut self.lock().metrics);
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps up to `d`, waking early when asked to stop. Returns `true`
    /// when stopping.
    pub(crate) fn pause(&self, d: Duration) -> bool {
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
