//! The metrics the harness emits through the `metrics` facade, read back
//! with a debugging recorder (one test: the recorder is process-wide).

mod support;

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel_rollout::metrics::{
    DEFERRED_PENDING, INVALID_INDEXES_TOTAL, LOCK_WAIT_SECONDS, MIGRATION_DURATION_SECONDS,
    RUNS_TOTAL,
};
use diesel_rollout::DeferredState;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::{migrator, TestDb};

/// A metric: name, sorted labels, value.
type Metric = (String, Vec<(String, String)>, DebugValue);

/// What was recorded so far.
fn read(snapshotter: &Snapshotter) -> Vec<Metric> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let mut labels: Vec<_> = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            labels.sort();
            (key.name().to_string(), labels, value)
        })
        .collect()
}

fn counter(all: &[Metric], name: &str, labels: &[(&str, &str)]) -> u64 {
    all.iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| match v {
            DebugValue::Counter(c) => *c,
            _ => 0,
        })
        .sum()
}

fn samples(all: &[Metric], name: &str, track: &str) -> usize {
    all.iter()
        .filter(|(n, l, _)| n == name && l.iter().any(|(k, v)| k == "track" && v == track))
        .map(|(_, _, v)| match v {
            DebugValue::Histogram(h) => h.len(),
            _ => 0,
        })
        .sum()
}

#[test]
fn runs_lock_waits_durations_pending_and_repaired_indexes() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    // Required track: one run that applies four migrations, then one that
    // finds nothing pending.
    let db = TestDb::new();
    let m = migrator("counted");
    m.run_required(&db.url).unwrap();
    m.run_required(&db.url).unwrap();
    let all = read(&snapshotter);
    assert_eq!(
        counter(
            &all,
            RUNS_TOTAL,
            &[("track", "required"), ("outcome", "success")]
        ),
        1
    );
    assert_eq!(
        counter(
            &all,
            RUNS_TOTAL,
            &[("track", "required"), ("outcome", "nothing_pending")]
        ),
        1
    );
    assert_eq!(samples(&all, MIGRATION_DURATION_SECONDS, "required"), 4);
    assert_eq!(samples(&all, LOCK_WAIT_SECONDS, "required"), 1);

    // Deferred track: a unique build fails on duplicates, the data is
    // fixed, and the next run finds the invalid index and repairs it.
    let db = TestDb::new();
    let pool = Pool::builder()
        .max_size(2)
        .build(ConnectionManager::<PgConnection>::new(&db.url))
        .unwrap();
    let m = migrator("deferred_unique")
        .deferred_failure_retries(0)
        .deferred_retry_interval(Duration::from_millis(100));
    m.run_required(&db.url).unwrap();
    assert!(matches!(
        m.run_deferred(pool.clone()),
        DeferredState::Failed { .. }
    ));
    db.conn()
        .batch_execute(
            "DELETE FROM things WHERE id NOT IN (SELECT min(id) FROM things GROUP BY grp)",
        )
        .unwrap();
    assert!(matches!(m.run_deferred(pool), DeferredState::Done { .. }));
    let all = read(&snapshotter);
    assert_eq!(
        counter(
            &all,
            RUNS_TOTAL,
            &[("track", "deferred"), ("outcome", "failure")]
        ),
        1
    );
    assert_eq!(
        counter(
            &all,
            RUNS_TOTAL,
            &[("track", "deferred"), ("outcome", "success")]
        ),
        1
    );
    assert_eq!(
        counter(&all, INVALID_INDEXES_TOTAL, &[("action", "found")]),
        1
    );
    assert_eq!(
        counter(&all, INVALID_INDEXES_TOTAL, &[("action", "repaired")]),
        1
    );
    assert_eq!(samples(&all, MIGRATION_DURATION_SECONDS, "deferred"), 1);
    let pending = all
        .iter()
        .find(|(n, _, _)| n == DEFERRED_PENDING)
        .map(|(_, _, v)| v);
    assert!(
        matches!(pending, Some(DebugValue::Gauge(g)) if g.into_inner() == 0.0),
        "{pending:?}"
    );
}
