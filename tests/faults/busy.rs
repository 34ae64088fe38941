//! A required migration meets a busy table.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;

use crate::support::{fixture, rollout, TestDb};
use crate::{say, text};

/// Another session holds a lock on the table a required migration alters.
/// The migration fails each try on `lock_timeout` naming the table, the
/// retries up to the deadline are logged, the queue behind its lock request
/// drains after each try, and once the table is free it goes through.
#[test]
fn busy_table_fails_fast_and_retries_until_the_deadline() {
    let db = TestDb::new();
    let up = |set: &str, extra: &[&str]| {
        let mut c = rollout();
        c.env("DATABASE_URL", &db.url)
            .arg("--migrations-dir")
            .arg(fixture(set).join("migrations"))
            .args(["up", "--required-only"])
            .args(extra);
        c
    };
    let out = up("busy", &[]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // A long transaction that read the table: ALTER TABLE must wait for it.
    let mut holder = db.conn();
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM busy_items")
        .unwrap();

    // Traffic: a reader that measures how long each query waits, and a
    // sampler of the lock queue on the table.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (url, stop) = (db.url.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut c = PgConnection::establish(&url).unwrap();
            let mut worst = Duration::ZERO;
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                c.batch_execute("SELECT count(*) FROM busy_items").unwrap();
                worst = worst.max(t.elapsed());
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (worst, n)
        })
    };
    let sampler = {
        let (url, stop) = (db.url.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut c = PgConnection::establish(&url).unwrap();
            #[derive(QueryableByName)]
            struct N {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                n: i64,
            }
            let mut max_waiting = 0;
            let mut drained_samples = 0;
            while !stop.load(Ordering::SeqCst) {
                let n = diesel::sql_query(
                    "SELECT count(*) AS n FROM pg_locks \
                     WHERE relation = 'busy_items'::regclass AND NOT granted \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                )
                .get_result::<N>(&mut c)
                .unwrap()
                .n;
                max_waiting = max_waiting.max(n);
                if n == 0 {
                    drained_samples += 1;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            (max_waiting, drained_samples)
        })
    };

    let started = Instant::now();
    let out = up(
        "busy_v2",
        &["--lock-timeout", "300ms", "--lock-retry-deadline", "4s"],
    )
    .output()
    .unwrap();
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (worst_read, reads) = reader.join().unwrap();
    let (max_waiting, drained) = sampler.join().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let retries = t
        .matches("could not take its lock in time; retrying")
        .count();
    assert!(retries >= 2, "retries up to the deadline are logged: {t}");
    assert!(t.contains("lock timeout"), "{t}");
    assert!(t.contains("could not lock table busy_items"), "{t}");
    // The queue behind the ALTER is only ever the ALTER and the reader, and
    // it drains between tries.
    assert!(max_waiting <= 2, "lock queue grew to {max_waiting}");
    assert!(drained > 0);
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_locks \
             WHERE relation = 'busy_items'::regclass AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ),
        0,
        "nothing left waiting on the table"
    );

    drop(holder);
    let out = up("busy_v2", &[]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(db.advisory_locks(), 0);
    say(&format!(
        "busy: lock_timeout=300ms retry_deadline=3s retries_logged={retries} gave_up_after_secs={:.1} \
         max_lock_queue={max_waiting} reader_queries={reads} worst_reader_wait_ms={} \
         then_applied=ok",
        took.as_secs_f64(),
        worst_read.as_millis()
    ));
}
