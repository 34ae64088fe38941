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

pub(crate) fn traffic(server: &Server, sizes: &Sizes, report: &mut String, png: Option<&Path>) {
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

    let mut results = Vec::new();
    for (label, sub) in [
        (
            "deferred `CREATE INDEX CONCURRENTLY` (diesel-rollout)",
            "deferred",
        ),
        ("plain `CREATE INDEX` in a required migration", "required"),
    ] {
        let (db, url) = server.database();
        let base = dir.path().join(sub);
        let set =
            MigrationSet::from_dirs(&base.join("migrations"), &base.join("migrations_deferred"))
                .unwrap();
        let m = Migrator::new(set)
            .required_statement_timeout(Duration::ZERO)
            .deferred_progress_interval(Duration::from_secs(1));
        // The table exists and is filled before the release that adds the index.
        let first = MigrationSet::from_dirs(
            &dir.path().join("migrations"),
            &dir.path().join("migrations_deferred_none"),
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

        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let writers: Vec<_> = (0..sizes.writers)
            .map(|w| {
                let (url, stop) = (url.clone(), Arc::clone(&stop));
                let rows = sizes.rows;
                std::thread::spawn(move || {
                    let mut c = PgConnection::establish(&url).unwrap();
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
                            format!("UPDATE events SET kind = kind + 1 WHERE id = {}", i % rows + 1)
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
        // Steady traffic first.
        std::thread::sleep(Duration::from_secs(2));
        let start = t0.elapsed().as_secs_f64();
        let pool = Pool::builder()
            .max_size(3)
            .build(ConnectionManager::<PgConnection>::new(&url))
            .unwrap();
        let begin = Instant::now();
        let (ready, built) = if sub == "deferred" {
            let (_, handle) = m.run(&pool).unwrap();
            let ready = begin.elapsed();
            let end = handle.wait(Duration::from_secs(3600));
            assert!(matches!(end, DeferredState::Done { .. }), "{end:?}");
            (ready, begin.elapsed())
        } else {
            m.run_required(&url).unwrap();
            (begin.elapsed(), begin.elapsed())
        };
        let end = t0.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::SeqCst);
        let samples: Vec<Sample> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        let during: Vec<f64> = samples
            .iter()
            .filter(|s| s.at >= start && s.at <= end)
            .map(|s| s.latency)
            .collect();
        let before = samples.iter().filter(|s| s.at < start).count() as f64 / start;
        results.push((
            label,
            ready,
            built,
            during,
            before,
            end - start,
            samples,
            start,
        ));
        server.drop_database(&db);
    }

    writeln!(
        report,
        "## 5. Traffic during an index build (the headline)\n\nA table of {} rows; {} \
         connections write to it without pause (alternating single-row `INSERT` and `UPDATE`) \
         while a new release adds the index `{index}`, either as a deferred `CREATE INDEX \
         CONCURRENTLY` through this harness or as a plain `CREATE INDEX` in a required \
         migration. \"Ready\" is when the replica's start-up call returns.\n\n| build | ready \
         after | index built after | write p50 | write p99 | write max | writes/s during build \
         | writes/s before |\n|---|---|---|---|---|---|---|---|",
        sizes.rows, sizes.writers
    )
    .unwrap();
    for (label, ready, built, during, before, window, _, _) in &results {
        let mut d = during.clone();
        d.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| {
            d.get(((d.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        writeln!(
            report,
            "| {label} | {} | {} | {:.2} ms | {:.2} ms | {:.0} ms | {:.0} | {:.0} |",
            ms(*ready),
            ms(*built),
            pct(0.5) * 1e3,
            pct(0.99) * 1e3,
            d.last().copied().unwrap_or(0.0) * 1e3,
            d.len() as f64 / window.max(1e-9),
            before
        )
        .unwrap();
    }
    if let Some(png) = png {
        plot(png, &results);
        writeln!(
            report,
            "\n![Write latency during the build](docs/bench-index-build.png)\n\nWrite latency \
             over time, both builds on one plot: each point is the longest any write had been \
             waiting in that 100 ms; time 0 is when the release starts.\n"
        )
        .unwrap();
    }
    writeln!(
        report,
        "\nA plain `CREATE INDEX` holds a SHARE lock for the whole build: every write waits for \
         it, the replica is not ready until it ends. The deferred build lets writes through; \
         the replica is ready at once and the index arrives later. The concurrent build \
         shows one spike of a few hundred milliseconds near its end; its cause is not \
         pinned down here (two cores shared by the build, the writers and the server), and \
         stays an open question.\n"
    )
    .unwrap();
}

type Result4<'a> = (
    &'a str,
    Duration,
    Duration,
    Vec<f64>,
    f64,
    f64,
    Vec<Sample>,
    f64,
);

fn plot(png: &Path, results: &[Result4<'_>]) {
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
        .map(|(label, _, _, _, _, _, samples, start)| {
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
        let color = if i == 0 { BLUE } else { RED };
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
