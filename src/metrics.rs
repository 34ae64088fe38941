//! Metrics through the `metrics` facade, so any exporter works (Prometheus,
//! StatsD, ...). Without a recorder installed they cost next to nothing.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `diesel_rollout_runs_total` | counter | `track` (`required`, `deferred`), `outcome` (`success`, `failure`, `nothing_pending`, `not_leader`) |
//! | `diesel_rollout_lock_wait_seconds` | histogram | `track` |
//! | `diesel_rollout_migration_duration_seconds` | histogram | `track`, `version` |
//! | `diesel_rollout_deferred_pending` | gauge | |
//! | `diesel_rollout_invalid_indexes_total` | counter | `action` (`found`: an invalid index left by a failed build was dropped to be rebuilt; `repaired`: the rebuild finished valid) |

use std::time::Duration;

use crate::source::Track;

/// Counter: runs of a track by outcome.
pub const RUNS_TOTAL: &str = "diesel_rollout_runs_total";
/// Histogram: seconds spent waiting for a track's advisory lock.
pub const LOCK_WAIT_SECONDS: &str = "diesel_rollout_lock_wait_seconds";
/// Histogram: seconds a migration took to apply.
pub const MIGRATION_DURATION_SECONDS: &str = "diesel_rollout_migration_duration_seconds";
/// Gauge: deferred migrations pending at the last look.
pub const DEFERRED_PENDING: &str = "diesel_rollout_deferred_pending";
/// Counter: invalid indexes found (and dropped) and repaired.
pub const INVALID_INDEXES_TOTAL: &str = "diesel_rollout_invalid_indexes_total";

pub(crate) fn run(track: Track, outcome: &'static str) {
    ::metrics::counter!(RUNS_TOTAL, "track" => track.as_str(), "outcome" => outcome).increment(1);
}

pub(crate) fn lock_wait(track: Track, waited: Duration) {
    ::metrics::histogram!(LOCK_WAIT_SECONDS, "track" => track.as_str())
        .record(waited.as_secs_f64());
}

pub(crate) fn migration_duration(track: Track, version: &str, took: Duration) {
    ::metrics::histogram!(
        MIGRATION_DURATION_SECONDS,
        "track" => track.as_str(),
        "version" => version.to_string()
    )
    .record(took.as_secs_f64());
}

pub(crate) fn deferred_pending(n: usize) {
    ::metrics::gauge!(DEFERRED_PENDING).set(n as f64);
}

pub(crate) fn invalid_index(action: &'static str) {
    ::metrics::counter!(INVALID_INDEXES_TOTAL, "action" => action).increment(1);
}
