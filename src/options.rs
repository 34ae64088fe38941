//! Options of the [`Migrator`](crate::Migrator) that the tracks share.

use std::time::Duration;

/// What [`DeferredHandle::stop`](crate::DeferredHandle::stop) does with a statement that is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Cancel it with `pg_cancel_backend` (an index build left invalid is
    /// dropped and rebuilt by the next run).
    Cancel,
    /// Let it finish, then stop before the next statement.
    Finish,
}

/// Options of the deferred track; set through the `deferred_*` setters of
/// [`Migrator`](crate::Migrator).
#[derive(Debug, Clone)]
pub(crate) struct DeferredOptions {
    pub retry: bool,
    pub retry_interval: Duration,
    pub retry_max_interval: Duration,
    pub failure_retries: u32,
    pub failure_backoff: Duration,
    pub stop_mode: StopMode,
    pub progress_interval: Duration,
    pub parallel_workers: Option<u32>,
    pub maintenance_work_mem_mb: Option<u32>,
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
            parallel_workers: Some(0),
            maintenance_work_mem_mb: None,
        }
    }
}
