//! The headline: write traffic during an index build.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel_rollout::{DeferredState, MigrationSet, Migrator};

use crate::harness::*;

struct Sample {
    at: f64,
    latency: f64,
}

/// What the summary at the end of the report quotes from section 5: medians
/// over the runs.
pub(crate) struct TrafficSummary {
    /// p99 during the build ÷ idle p99: the deferred build, the same with
    /// more memory, the bare build, the floor.
    pub deferred: f64,
    /// The lowest and highest of the deferred build's runs.
    pub deferred_spread: (f64, f64),
    pub deferred_mwm: f64,
    pub bare: f64,
    pub floor: f64,
    /// The slowest write (ms): the deferred build, with more memory, bare.
    pub max_deferred: f64,
    pub max_mwm: f64,
    pub max_bare: f64,
}

pub(crate) fn traffic(
    server: &Server,
    sizes: &Sizes,
    report: &mut String,
    png: Option<&Path>,
) -> TrafficSummary {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        &dir.path().join("migrations/0001_create_events/up.sql"),
        "CREATE TABLE events (\n    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n    \
         account_id INT NOT NULL,\n    kind INT NOT NULL,\n    payload TEXT NOT NULL,\n    \
         created_at TIMESTAMPTZ NOT NULL DEFAULT now()\n);\n",
    );
    let index = "events (account_id, created_at)";
    write_file(
        &dir.path()
            .join("deferred/migrations/0001_create_events/up.sql"),
        &std::fs::read_to_string(dir.path().join("migrations/0001_create_events/up.sql")).unwrap(),
    );
    write_file(
        &dir.path()
            .join("deferred/migrations_deferred/0002_index_events/up.sql"),
        &format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS events_account_created_idx ON {index};\n"
        ),
    );
    write_file(
        &dir.path()
            .join("deferred/migrations_deferred/0002_index_events/metadata.toml"),
        "run_in_transaction = false\n",
    );
    write_file(
        &dir.path()
            .join("required/migrations/0001_create_events/up.sql"),
        &std::fs::read_to_string(dir.path().join("migrations/0001_create_events/up.sql")).unwrap(),
    );
    write_file(
        &dir.path()
            .join("required/migrations/0002_index_events/up.sql"),
        &format!("CREATE INDEX events_account_created_idx ON {index};\n"),
    );
    std::fs::create_dir_all(dir.path().join("required/migrations_deferred")).unwrap();

    let variants = [
        (
            "deferred `CREATE INDEX CONCURRENTLY` (diesel-rollout)",
            "deferred",
        ),
        (
            "the same, with `deferred_maintenance_work_mem(Some(1024))` (diesel-rollout)",
            "deferred_mwm",
        ),
        (
            "the same `CREATE INDEX CONCURRENTLY` from a bare connection (no harness)",
            "bare",
        ),
        ("plain `CREATE INDEX` in a required migration", "required"),
        (
            "floor: one backend only reading the table, as long as the deferred build (no build)",
            "floor",
        ),
    ];
    let mut results: Vec<Vec<Run<'_>>> = variants.iter().map(|_| Vec::new()).collect();
    // Round by round, so a slow spell of this shared machine hits every
    // variant; the floor runs as long as that round's deferred build.
    for _ in 0..sizes.traffic_runs {
        let mut deferred = Duration::from_secs(5);
        for (i, (label, sub)) in variants.iter().enumerate() {
            let run = one_build(server, sizes, dir.path(), label, sub, index, deferred);
            if *sub == "deferred" {
                deferred = run.built;
            }
            results[i].push(run);
        }
    }
    writeln!(
        report,
        "## 5. Traffic during an index build (the headline)\n\nA table of {} rows; {} \
         connections write to it without pause (alternating single-row `INSERT` and `UPDATE`) \
         while a new release adds the index `{index}`: as a deferred `CREATE INDEX \
         CONCURRENTLY` through this harness (its session sets \
         `max_parallel_maintenance_workers = 0`, the `deferred_parallel_workers` default), the \
         same with `deferred_maintenance_work_mem(Some(1024))` (1 GiB for the build's sorts), \
         as the same statement sent by hand on a bare connection with the server's 2 parallel \
         workers (the A/B that tells the harness's cost from the build's), or as a plain \
         `CREATE INDEX` in a required migration. The floor row builds nothing: one backend \
         reads the same table (`count(*)` in a loop, no parallel workers) for as long as that \
         round's deferred build took, which is the least any build costs writers on this \
         machine (every build reads the table at least once). \"Ready\" is when the replica's \
         start-up call returns. \"Idle p99\" is the same writers' p99 in the {IDLE_SECS} s before the release \
         (the first half second left out), so the ratio is the build's cost to writers.\n\n\
         | build | ready after | index built after | write p50 | write p99 | idle p99 | p99 ÷ \
         idle p99 | write max | writes/s during build | writes/s before |\n\
         |---|---|---|---|---|---|---|---|---|---|",
        sizes.rows, sizes.writers
    )
    .unwrap();
    for runs in &results {
        // Each figure is the median over the runs.
        let med = |f: &dyn Fn(&Run<'_>) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(f).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let sorted = |r: &Run<'_>| {
            let mut d = r.during.clone();
            d.sort_by(|a, b| a.total_cmp(b));
            d
        };
        let p99 = |r: &Run<'_>| percentile(&sorted(r), 0.99);
        writeln!(
            report,
            "| {} | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.1}× | {:.0} ms | {:.0} | {:.0} |",
            runs[0].label,
            ms(Duration::from_secs_f64(med(&|r| r.ready.as_secs_f64()))),
            ms(Duration::from_secs_f64(med(&|r| r.built.as_secs_f64()))),
            med(&|r| percentile(&sorted(r), 0.5)) * 1e3,
            med(&p99) * 1e3,
            med(&|r| r.idle_p99) * 1e3,
            med(&|r| p99(r) / r.idle_p99.max(1e-9)),
            med(&|r| sorted(r).last().copied().unwrap_or(0.0)) * 1e3,
            med(&|r| r.during.len() as f64 / r.window.max(1e-9)),
            med(&|r| r.before_rate)
        )
        .unwrap();
    }
    let ratios = |i: usize| {
        results[i]
            .iter()
            .map(|r| {
                let mut d = r.during.clone();
                d.sort_by(|a, b| a.total_cmp(b));
                format!("{:.1}×", percentile(&d, 0.99) / r.idle_p99.max(1e-9))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(
        report,
        "\nMedians of {} runs each, the variants taking turns; the p99 ÷ idle p99 of each run: \
         {}.",
        sizes.traffic_runs,
        (0..results.len())
            .map(|i| format!("{} {}", short(results[i][0].sub), ratios(i)))
            .collect::<Vec<_>>()
            .join("; ")
    )
    .unwrap();
    let median_ratio = |i: usize| {
        let mut v: Vec<f64> = results[i]
            .iter()
            .map(|r| {
                let mut d = r.during.clone();
                d.sort_by(|a, b| a.total_cmp(b));
                percentile(&d, 0.99) / r.idle_p99.max(1e-9)
            })
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let floor = median_ratio(results.len() - 1).max(1e-9);
    writeln!(
        report,
        "\nMedian p99 ratio against the floor's: {}.",
        (0..results.len() - 1)
            .map(|i| format!(
                "{} {:.2}×",
                short(results[i][0].sub),
                median_ratio(i) / floor
            ))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .unwrap();
    let median_max = |i: usize| {
        let mut v: Vec<f64> = results[i].iter().map(worst).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2] * 1e3
    };
    let summary = TrafficSummary {
        deferred: median_ratio(0),
        deferred_spread: results[0]
            .iter()
            .map(|r| {
                let mut d = r.during.clone();
                d.sort_by(|a, b| a.total_cmp(b));
                percentile(&d, 0.99) / r.idle_p99.max(1e-9)
            })
            .fold((f64::MAX, 0.0_f64), |(lo, hi), x| (lo.min(x), hi.max(x))),
        deferred_mwm: median_ratio(1),
        bare: median_ratio(2),
        floor: median_ratio(results.len() - 1),
        max_deferred: median_max(0),
        max_mwm: median_max(1),
        max_bare: median_max(2),
    };
    phase_table(report, &results);
    let results: Vec<Run<'_>> = results
        .into_iter()
        .map(|mut runs| {
            // The run with the slowest write, for the plot and the table
            // below.
            runs.sort_by(|a, b| worst(a).total_cmp(&worst(b)));
            runs.pop().unwrap()
        })
        .collect();
    if let Some(png) = png {
        plot(png, &results);
        writeln!(
            report,
            "\n![Write latency during the build](docs/bench-index-build.png)\n\nWrite latency \
             over time, all builds on one plot: each point is the longest any write had been \
             waiting in that 100 ms; time 0 is when the release starts.\n"
        )
        .unwrap();
    }
    writeln!(
        report,
        "\n### The slowest write during each concurrent build\n\nA sampler reads \
         `pg_stat_progress_create_index` and `pg_stat_activity` every {SAMPLE_MS} ms during the \
         run. For the slowest write of each build (from its worst run): when it started (seconds after the release), \
         the build's phase and what the writers and the other sessions were doing while it \
         waited.\n\n| build | slowest write | started at | build phase meanwhile | writers \
         waiting on | other sessions running |\n|---|---|---|---|---|---|"
    )
    .unwrap();
    for r in results
        .iter()
        .filter(|r| matches!(r.sub, "deferred" | "deferred_mwm" | "bare"))
    {
        let Some(w) = slowest(r) else {
            continue;
        };
        let (from, to) = (w.at - w.latency, w.at);
        let seen: Vec<&Probe> = r
            .probes
            .iter()
            .filter(|p| p.at >= from && p.at <= to + SAMPLE_MS as f64 / 1e3)
            .collect();
        let join = |f: &dyn Fn(&Probe) -> &str| {
            let mut v: Vec<&str> = seen
                .iter()
                .map(|p| f(p))
                .flat_map(|x| x.split(" | "))
                .filter(|x| !x.is_empty())
                .collect();
            v.sort();
            v.dedup();
            if v.is_empty() {
                "-".to_string()
            } else {
                v.iter()
                    .map(|x| format!("`{}`", x.replace('|', "/")))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        writeln!(
            report,
            "| {} | {:.0} ms | {:.2} s | {} | {} | {} |",
            r.label,
            w.latency * 1e3,
            from - r.start,
            join(&|p| p.phase.as_str()),
            join(&|p| p.writers.as_str()),
            join(&|p| p.others.as_str()),
        )
        .unwrap();
    }
    writeln!(
        report,
        "\nA plain `CREATE INDEX` holds a SHARE lock for the whole build: every write waits for \
         it, the replica is not ready until it ends. The deferred build lets writes through; \
         the replica is ready at once and the index arrives later.\n"
    )
    .unwrap();
    summary
}

/// Where in a concurrent build the writers' p99 comes from: every write of
/// every run, grouped by the build phase the sampler saw when it started.
fn phase_table(report: &mut String, results: &[Vec<Run<'_>>]) {
    writeln!(
        report,
        "\n### Write p99 by build phase\n\nEvery write of every run, grouped by the phase \
         `pg_stat_progress_create_index` showed when the write started (\"-\" is the time the \
         view shows no build: before the statement reaches the server and after it returns); \
         the ratio is against the median idle p99 of the runs.\n\n| build | phase | time in \
         phase | writes | write p99 | p99 ÷ idle p99 |\n|---|---|---|---|---|---|"
    )
    .unwrap();
    for runs in results
        .iter()
        .filter(|r| matches!(r[0].sub, "deferred" | "deferred_mwm" | "bare"))
    {
        let mut idle: Vec<f64> = runs.iter().map(|r| r.idle_p99).collect();
        idle.sort_by(|a, b| a.total_cmp(b));
        let idle = idle[idle.len() / 2].max(1e-9);
        // Phase -> (seconds in it, latencies of the writes started in it),
        // in the order the phases first appear.
        let mut phases: Vec<(String, f64, Vec<f64>)> = Vec::new();
        fn slot(phases: &mut Vec<(String, f64, Vec<f64>)>, phase: &str) -> usize {
            let name = if phase.is_empty() { "-" } else { phase };
            match phases.iter().position(|p| p.0 == name) {
                Some(i) => i,
                None => {
                    phases.push((name.to_string(), 0.0, Vec::new()));
                    phases.len() - 1
                }
            }
        }
        for r in runs {
            let end = r.start + r.window;
            let probes: Vec<&Probe> = r
                .probes
                .iter()
                .filter(|p| p.at >= r.start && p.at <= end)
                .collect();
            for pair in probes.windows(2) {
                let i = slot(&mut phases, &pair[0].phase);
                phases[i].1 += pair[1].at - pair[0].at;
            }
            for s in &r.samples {
                let began = s.at - s.latency;
                if s.at < r.start || began > end {
                    continue;
                }
                // The phase of the last look before the write began.
                let at = probes.partition_point(|p| p.at <= began);
                let phase = at.checked_sub(1).map_or("", |i| probes[i].phase.as_str());
                let i = slot(&mut phases, phase);
                phases[i].2.push(s.latency);
            }
        }
        for (phase, secs, mut lat) in phases {
            if lat.is_empty() {
                continue;
            }
            lat.sort_by(|a, b| a.total_cmp(b));
            let p99 = percentile(&lat, 0.99);
            writeln!(
                report,
                "| {} | `{}` | {secs:.1} s | {} | {:.2} ms | {:.1}× |",
                runs[0].label,
                phase.replace('|', "/"),
                lat.len(),
                p99 * 1e3,
                p99 / idle
            )
            .unwrap();
        }
    }
}

/// A variant's name in one-line summaries.
fn short(sub: &str) -> &'static str {
    match sub {
        "deferred" => "deferred",
        "deferred_mwm" => "deferred with more memory",
        "bare" => "bare",
        "required" => "plain",
        _ => "floor",
    }
}

/// How long the writers run before the release starts.
const IDLE_SECS: u64 = 3;
/// How often the sampler looks at the server.
const SAMPLE_MS: u64 = 20;

struct Run<'a> {
    label: &'a str,
    sub: &'a str,
    ready: Duration,
    built: Duration,
    /// Write latencies (s) between the release's start and the index.
    during: Vec<f64>,
    idle_p99: f64,
    before_rate: f64,
    /// Seconds from the release's start to the index.
    window: f64,
    samples: Vec<Sample>,
    /// When the release started (seconds after the writers did).
    start: f64,
    probes: Vec<Probe>,
}

/// What the sampler saw at one moment.
struct Probe {
    at: f64,
    phase: String,
    writers: String,
    others: String,
}

/// The slowest write that waited during the build.
fn slowest<'r>(r: &'r Run<'_>) -> Option<&'r Sample> {
    r.samples
        .iter()
        .filter(|s| s.at >= r.start && s.at - s.latency <= r.start + r.window)
        .max_by(|a, b| a.latency.total_cmp(&b.latency))
}

fn worst(r: &Run<'_>) -> f64 {
    slowest(r).map_or(0.0, |s| s.latency)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p) as usize)
        .copied()
        .unwrap_or(0.0)
}

fn one_build<'a>(
    server: &Server,
    sizes: &Sizes,
    dir: &Path,
    label: &'a str,
    sub: &'a str,
    index: &str,
    floor: Duration,
) -> Run<'a> {
    let (db, url) = server.database();
    let base = dir.join(if matches!(sub, "bare" | "floor" | "deferred_mwm") {
        "deferred"
    } else {
        sub
    });
    let set = MigrationSet::from_dirs(&base.join("migrations"), &base.join("migrations_deferred"))
        .unwrap();
    let m = Migrator::new(set)
        .required_statement_timeout(Duration::ZERO)
        .deferred_progress_interval(Duration::from_secs(1))
        .deferred_maintenance_work_mem((sub == "deferred_mwm").then_some(1024));
    // The table exists and is filled before the release that adds the index.
    let first = MigrationSet::from_dirs(
        &dir.join("migrations"),
        &dir.join("migrations_deferred_none"),
    )
    .unwrap();
    Migrator::new(first).run_required(&url).unwrap();
    let mut fill = PgConnection::establish(&url).unwrap();
    fill.batch_execute(&format!(
        "INSERT INTO events (account_id, kind, payload) \
         SELECT g % 10000, g % 7, md5(g::text) FROM generate_series(1, {}) AS g",
        sizes.rows
    ))
    .unwrap();
    // On its own: VACUUM cannot run in the implicit transaction of a batch.
    fill.batch_execute("VACUUM ANALYZE events").unwrap();
    fill.batch_execute("CHECKPOINT").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let writers: Vec<_> = (0..sizes.writers)
        .map(|w| {
            let (url, stop) = (url.clone(), Arc::clone(&stop));
            let rows = sizes.rows;
            std::thread::spawn(move || {
                let mut c = PgConnection::establish(&url).unwrap();
                c.batch_execute("SET application_name = 'bench_writer'")
                    .unwrap();
                let mut out = Vec::new();
                let mut i: i64 = w as i64;
                while !stop.load(Ordering::SeqCst) {
                    i += 7919;
                    let s = Instant::now();
                    let sql = if i % 2 == 0 {
                        format!(
                            "INSERT INTO events (account_id, kind, payload) VALUES ({}, 1, 'x')",
                            i % 10000
                        )
                    } else {
                        format!(
                            "UPDATE events SET kind = kind + 1 WHERE id = {}",
                            i % rows + 1
                        )
                    };
                    c.batch_execute(&sql).unwrap();
                    out.push(Sample {
                        at: t0.elapsed().as_secs_f64(),
                        latency: s.elapsed().as_secs_f64(),
                    });
                }
                out
            })
        })
        .collect();
    let sampler = {
        let (url, stop) = (url.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut c = PgConnection::establish(&url).unwrap();
            c.batch_execute("SET application_name = 'bench_sampler'")
                .unwrap();
            let mut out = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let p = probe(&mut c, t0);
                out.push(p);
                std::thread::sleep(Duration::from_millis(SAMPLE_MS));
            }
            out
        })
    };
    // Steady traffic first.
    std::thread::sleep(Duration::from_secs(IDLE_SECS));
    let start = t0.elapsed().as_secs_f64();
    let pool = Pool::builder()
        .max_size(3)
        .build(ConnectionManager::<PgConnection>::new(&url))
        .unwrap();
    let begin = Instant::now();
    let (ready, built) = match sub {
        "deferred" | "deferred_mwm" => {
            let (_, handle) = m.run(&pool).unwrap();
            let ready = begin.elapsed();
            let end = handle.wait(Duration::from_secs(3600));
            assert!(matches!(end, DeferredState::Done { .. }), "{end:?}");
            (ready, begin.elapsed())
        }
        "bare" => {
            let mut c = PgConnection::establish(&url).unwrap();
            c.batch_execute(&format!(
                "CREATE INDEX CONCURRENTLY events_account_created_idx ON {index}"
            ))
            .unwrap();
            (begin.elapsed(), begin.elapsed())
        }
        "floor" => {
            let mut c = PgConnection::establish(&url).unwrap();
            c.batch_execute(&format!(
                "SET max_parallel_workers_per_gather = 0; \
                 DO $$ DECLARE until timestamptz := clock_timestamp() + interval '{} ms'; \
                 BEGIN WHILE clock_timestamp() < until LOOP PERFORM count(*) FROM events; \
                 END LOOP; END $$",
                floor.as_millis()
            ))
            .unwrap();
            (begin.elapsed(), begin.elapsed())
        }
        _ => {
            m.run_required(&url).unwrap();
            (begin.elapsed(), begin.elapsed())
        }
    };
    let end = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let samples: Vec<Sample> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let probes = sampler.join().unwrap();
    // Every write that was waiting at some point of the build, including
    // those a plain build held until its end.
    let during: Vec<f64> = samples
        .iter()
        .filter(|s| s.at >= start && s.at - s.latency <= end)
        .map(|s| s.latency)
        .collect();
    let mut idle: Vec<f64> = samples
        .iter()
        .filter(|s| s.at >= 0.5 && s.at < start)
        .map(|s| s.latency)
        .collect();
    idle.sort_by(|a, b| a.total_cmp(b));
    let before_rate = idle.len() as f64 / (start - 0.5);
    server.drop_database(&db);
    Run {
        label,
        sub,
        ready,
        built,
        during,
        idle_p99: percentile(&idle, 0.99),
        before_rate,
        window: end - start,
        samples,
        start,
        probes,
    }
}

fn probe(c: &mut PgConnection, t0: Instant) -> Probe {
    #[derive(QueryableByName)]
    struct P {
        #[diesel(sql_type = diesel::sql_types::Text)]
        phase: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        writers: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        others: String,
    }
    let p = diesel::sql_query(
        "SELECT \
           coalesce((SELECT string_agg(phase, ' | ') FROM pg_stat_progress_create_index), '') \
             AS phase, \
           coalesce((SELECT string_agg(DISTINCT wait_event_type || ':' || wait_event, ' | ') \
             FROM pg_stat_activity WHERE application_name = 'bench_writer' \
             AND state = 'active' AND wait_event IS NOT NULL), '') AS writers, \
           coalesce((SELECT string_agg(left(regexp_replace(query, '\\s+', ' ', 'g'), 50) \
             || coalesce(' (' || wait_event || ')', ''), ' | ') \
             FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND application_name NOT IN ('bench_writer', 'bench_sampler') \
             AND state = 'active'), '') AS others",
    )
    .get_result::<P>(c)
    .unwrap();
    Probe {
        at: t0.elapsed().as_secs_f64(),
        phase: p.phase,
        writers: p.writers,
        others: p.others,
    }
}

fn plot(png: &Path, results: &[Run<'_>]) {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .expect("DejaVuSans.ttf (Debian: fonts-dejavu-core) to label the plot");
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| "font")
        .unwrap();
    std::fs::create_dir_all(png.parent().unwrap()).unwrap();
    let series: Vec<(String, Vec<(f64, f64)>)> = results
        .iter()
        .map(|r| {
            let (label, samples, start) = (r.label, &r.samples, r.start);
            // Each 100 ms bucket shows the longest a write had been waiting
            // by the end of the bucket (or when it finished): a write
            // blocked for a second climbs through ten buckets instead of
            // appearing only when it completes.
            let mut buckets: std::collections::BTreeMap<i64, f64> = Default::default();
            for s in samples {
                let (begin, end) = (s.at - s.latency - start, s.at - start);
                let mut b = (begin * 10.0).floor() as i64;
                while (b as f64) / 10.0 < end {
                    let bucket_end = (b + 1) as f64 / 10.0;
                    let waited = (end.min(bucket_end) - begin) * 1e3;
                    let e = buckets.entry(b).or_insert(0.0);
                    *e = e.max(waited);
                    b += 1;
                }
            }
            (
                label.replace('`', ""),
                buckets
                    .into_iter()
                    .map(|(b, v)| (b as f64 / 10.0, v))
                    .collect(),
            )
        })
        .collect();
    let xmax = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let root = BitMapBackend::new(png, (1200, 600)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let mut chart = ChartBuilder::on(&root)
        .caption("Write latency while the index is built", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-2.0..xmax, (0.1..ymax * 1.5).log_scale())
        .unwrap();
    chart
        .configure_mesh()
        .x_desc("seconds since the release started")
        .y_desc("longest write wait in each 100 ms (ms, log)")
        .label_style(("sans-serif", 14))
        .draw()
        .unwrap();
    for (i, (label, points)) in series.iter().enumerate() {
        let color = [BLUE, RGBColor(230, 140, 0), RED, BLACK, RGBColor(0, 160, 0)][i % 5];
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1.max(0.1))),
                color.stroke_width(2),
            ))
            .unwrap()
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .unwrap();
    root.present().unwrap();
}
