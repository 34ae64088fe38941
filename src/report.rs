//! What a run did, what the database holds, and what `verify` found.

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

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
    /// Migrations reverted by this run (`revert`, `redo`), newest first.
    pub reverted: Vec<Applied>,
    /// Applied versions this binary does not know (a newer binary applied
    /// them). Allowed unless strict mode is on.
    pub unknown: Vec<String>,
    /// Applied versions whose `up.sql` changed since they were applied.
    pub changed: Vec<String>,
    /// Versions applied although older than one applied before them (a
    /// branch merged late). Refused in strict mode above the baseline.
    pub out_of_order: Vec<String>,
    /// Deferred migrations pending when the run read the ledger (the
    /// required track never applies them): zero means the deferred track
    /// has nothing to do.
    pub deferred_pending: usize,
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
    /// `true` at or below the baseline: history, whose old problems are
    /// warnings.
    pub history: bool,
    /// For a no-transaction migration: each named index its statements
    /// create (`CREATE INDEX CONCURRENTLY`), and what the catalog says of it.
    pub indexes: Vec<IndexStatus>,
}

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verification {
    /// Required migrations known to the binary and not applied, with `true`
    /// when the version is below the newest applied one (a gap).
    pub missing: Vec<(String, bool)>,
    /// Required migrations whose latest attempt failed, and migrations of
    /// either track whose revert stopped halfway, with the error.
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

/// Progress of an index build, from `pg_stat_progress_create_index`.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct IndexBuildProgress {
    /// The build's phase (`building index: scanning table`, ...).
    #[diesel(sql_type = Text)]
    pub phase: String,
    /// The index being built (empty until it exists).
    #[diesel(sql_type = Text)]
    pub index_name: String,
    /// The table it is built on.
    #[diesel(sql_type = Text)]
    pub table_name: String,
    /// Blocks processed in the current phase.
    #[diesel(sql_type = BigInt)]
    pub blocks_done: i64,
    /// Blocks to process in the current phase.
    #[diesel(sql_type = BigInt)]
    pub blocks_total: i64,
    /// Tuples processed in the current phase.
    #[diesel(sql_type = BigInt)]
    pub tuples_done: i64,
    /// Tuples to process in the current phase.
    #[diesel(sql_type = BigInt)]
    pub tuples_total: i64,
}

impl IndexBuildProgress {
    /// Percent done in the current phase, from blocks or else tuples.
    pub fn percent(&self) -> Option<f64> {
        if self.blocks_total > 0 {
            Some(100.0 * self.blocks_done as f64 / self.blocks_total as f64)
        } else if self.tuples_total > 0 {
            Some(100.0 * self.tuples_done as f64 / self.tuples_total as f64)
        } else {
            None
        }
    }
}

impl std::fmt::Display for IndexBuildProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = if self.index_name.is_empty() {
            "index"
        } else {
            &self.index_name
        };
        write!(f, "{name} on {}: {}", self.table_name, self.phase)?;
        if let Some(p) = self.percent() {
            write!(f, " ({p:.0}%)")?;
        }
        Ok(())
    }
}

/// What the catalog says of an index a migration creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IndexState {
    /// It exists and is valid.
    Valid,
    /// It exists, is invalid, and nobody is building it (a failed build:
    /// the next run drops and rebuilds it).
    Invalid,
    /// A build of it is in progress.
    Building,
    /// It does not exist.
    Missing,
}

impl IndexState {
    /// `valid`, `invalid`, `building` or `missing`.
    pub fn as_str(self) -> &'static str {
        match self {
            IndexState::Valid => "valid",
            IndexState::Invalid => "invalid",
            IndexState::Building => "building",
            IndexState::Missing => "missing",
        }
    }
}

/// An index a migration creates, and its state in the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IndexStatus {
    /// The index name.
    pub name: String,
    /// The table as the migration names it.
    pub table: String,
    /// Its state.
    pub state: IndexState,
    /// Progress of its build, when building.
    pub progress: Option<IndexBuildProgress>,
}
