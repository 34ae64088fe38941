//! What a run did, what the database holds, and what `verify` found.

use std::time::Duration;

use crate::source::Track;

/// A migration applied by a run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Applied {
    /// The version.
    pub version: String,
    /// The directory name.
    pub dir_name: String,
    /// The track.
    pub track: Track,
    /// How long it took.
    pub duration: Duration,
    /// Statements sent (for a resumed no-transaction migration, only those
    /// sent by this run).
    pub statements: usize,
}

/// What a run of the required track did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// Migrations applied by this run, in order.
    pub applied: Vec<Applied>,
    /// Applied versions this binary does not know (a newer binary applied
    /// them). Allowed unless strict mode is on.
    pub unknown: Vec<String>,
    /// Applied versions whose `up.sql` changed since they were applied.
    pub changed: Vec<String>,
    /// Whether the run took the advisory lock (`false` on the fast path,
    /// when nothing was pending).
    pub took_lock: bool,
    /// Time spent waiting for the advisory lock.
    pub lock_wait: Duration,
}

/// The state of one migration, as `rollout status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum State {
    /// Recorded in `__diesel_schema_migrations`.
    Applied,
    /// Known to this binary, not applied, and not failed.
    Pending,
    /// Not applied, and its latest attempt failed or was interrupted.
    Failed,
    /// Applied, but not known to this binary.
    Unknown,
}

impl State {
    /// `applied`, `pending`, `failed` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Applied => "applied",
            State::Pending => "pending",
            State::Failed => "failed",
            State::Unknown => "unknown",
        }
    }
}

/// One row of the status: a migration known to the binary or recorded in the
/// database.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationStatus {
    /// The version.
    pub version: String,
    /// The track (`None` for an unknown version never attempted by this
    /// harness).
    pub track: Option<Track>,
    /// The name after the version (empty when unknown).
    pub name: String,
    /// The state.
    pub state: State,
    /// When it was applied (`YYYY-MM-DD HH:MM:SS`, the server's `run_on`).
    pub applied_at: Option<String>,
    /// The latest attempt's error, for a failed migration.
    pub error: Option<String>,
    /// Statements completed by the latest attempt of a failed
    /// no-transaction migration.
    pub statements_completed: Option<i32>,
    /// `true` when applied and its `up.sql` changed since.
    pub changed: bool,
    /// For a no-transaction migration: each named index its statements
    /// create (`CREATE INDEX CONCURRENTLY`), and what the catalog says of it.
    pub indexes: Vec<crate::catalog::IndexStatus>,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verification {
    /// Required migrations known to the binary and not applied, with `true`
    /// when the version is below the newest applied one (a gap).
    pub missing: Vec<(String, bool)>,
    /// Required migrations whose latest attempt failed, with its error.
    pub failed: Vec<(String, String)>,
    /// Applied versions unknown to the binary (not a failure).
    pub unknown: Vec<String>,
}

impl Verification {
    /// `true` when every required migration is applied and none failed.
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty() && self.failed.is_empty()
    }
}
