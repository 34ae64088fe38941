//! PostgreSQL schema migrations for services that run many replicas and
//! deploy by rolling update.
//!
//! Migrations use diesel's layout (`VERSION_name/up.sql`, `down.sql`,
//! `metadata.toml`) in two directories:
//!
//! - `migrations/`, the **required** track, applied at start-up under a
//!   session advisory lock: one replica applies, the others wait (without
//!   holding a snapshot) and then find nothing to do. Each migration runs on
//!   its own, in its own transaction unless its `metadata.toml` says
//!   `run_in_transaction = false`, in which case its statements are sent one
//!   at a time and a retry resumes after the last completed one.
//! - `migrations_deferred/`, the **deferred** track (`CREATE INDEX
//!   CONCURRENTLY` and friends), applied after start-up, in the background,
//!   by whichever replica wins `pg_try_advisory_lock`; readiness never waits
//!   for it.
//!
//! # A tour
//!
//! **Embed** the service's migrations at build time. In its `Cargo.toml`:
//!
//! ```toml
//! [dependencies]
//! diesel-rollout = "0.1"
//!
//! [build-dependencies]
//! diesel-rollout = { version = "0.1", default-features = false }  # add features = ["lint"] to lint at build time
//! ```
//!
//! In its `build.rs`, one call validates both directories (failing the
//! build with a message naming every problem) and embeds them:
//!
//! ```no_run
//! // build.rs
//! diesel_rollout::embed("migrations", "migrations_deferred");
//! ```
//!
//! and the code includes the table it wrote:
//! `static MIGRATIONS: MigrationSet = diesel_rollout::include_migrations!();`
//! (the examples below use [`MigrationSet::example`], the set this crate
//! ships, instead).
//!
//! **Start up**: [`Migrator::run`] applies the required track on a
//! connection from the service's pool, blocking, then starts the deferred
//! track in the background and returns; report ready then.
//!
//! ```no_run
//! use diesel::r2d2::{ConnectionManager, Pool};
//! use diesel::PgConnection;
//! use diesel_rollout::{MigrationSet, Migrator};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = Pool::builder()
//!     .max_size(10)
//!     .build(ConnectionManager::<PgConnection>::new(std::env::var("DATABASE_URL")?))?;
//! let migrator = Migrator::new(MigrationSet::example());
//! let (report, deferred) = migrator.run(&pool)?;
//! tracing::info!(applied = report.applied.len(), "ready");
//! // ... serve; `deferred.state()` and `deferred.metrics()` can back an endpoint.
//! // At shutdown: cancel a running build and release the lock.
//! deferred.stop();
//! # Ok(())
//! # }
//! ```
//!
//! **Inspect**: [`Migrator::status`] gives a row per migration (with the
//! state of each index a deferred migration builds), [`Migrator::verify`]
//! tells whether every required migration is applied; both are read-only and
//! work on a hot standby.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let migrator = diesel_rollout::Migrator::new(diesel_rollout::MigrationSet::example());
//! let mut conn = diesel_rollout::connect(&std::env::var("DATABASE_URL")?)?;
//! for row in migrator.status(&mut conn)? {
//!     println!("{} {} {}", row.version, row.name, row.state.as_str());
//! }
//! if !migrator.verify(&mut conn)?.is_complete() {
//!     std::process::exit(1);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! **Errors** ([`Error`]) name the migration, file and line, PostgreSQL's
//! message and the next step, never a password, and carry the partial
//! [`Report`]. **Metrics** go through the `metrics` facade ([`metrics`]);
//! **logs** through `tracing`: a span per migration (version, name, track)
//! and events for the lock wait (naming who holds the lock), each migration
//! applied, each failure and the progress of index builds. The library never
//! prints.
//!
//! # Features
//!
//! - `runtime` (default): the runner. Without it only [`embed`] is left,
//!   for build scripts.
//! - `cli` (default): the `rollout` binary and [`cluster`], a throwaway
//!   PostgreSQL server.
//! - `lint` (default): the lint gate ([`lint_dirs`], `rollout lint`, and the
//!   build-time lint in [`embed`]); needs libclang to build.
//! - `testing` (default): [`testing::TestDatabase`], a migrated database per
//!   test, cloned from a template.
//! - `static`: libpq and OpenSSL built from source, for a static `rollout`.

#[cfg(feature = "runtime")]
mod analysis;
#[cfg(feature = "runtime")]
mod apply;
#[cfg(feature = "runtime")]
mod catalog;
#[cfg(feature = "runtime")]
mod deferred;
#[cfg(feature = "runtime")]
mod error;
#[cfg(feature = "runtime")]
mod executor;
#[cfg(feature = "runtime")]
mod fleet;
#[cfg(feature = "runtime")]
mod foreground;
#[cfg(feature = "runtime")]
mod inspect;
#[cfg(feature = "runtime")]
mod ledger;
#[cfg(feature = "lint")]
mod lint;
#[cfg(feature = "runtime")]
mod lock;
#[cfg(feature = "runtime")]
mod locks;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
mod migration;
#[cfg(feature = "runtime")]
mod migrator;
#[cfg(feature = "runtime")]
mod options;
#[cfg(feature = "runtime")]
mod plan;
#[cfg(feature = "runtime")]
mod report;
#[cfg(feature = "runtime")]
mod revert;
#[cfg(feature = "runtime")]
mod session;
// Without the runtime, only the embed uses these; the rest is unused.
#[cfg_attr(not(feature = "runtime"), allow(dead_code))]
mod source;
#[cfg(feature = "runtime")]
mod url;

#[cfg(any(feature = "cli", feature = "testing"))]
pub mod cluster;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "runtime")]
pub use crate::deferred::{DeferredHandle, DeferredMetrics, DeferredState, PgPool};
#[cfg(feature = "runtime")]
pub use crate::error::{Error, ErrorKind, MigrationRef};
#[cfg(feature = "runtime")]
pub use crate::fleet::{Fleet, FleetReport, Operation, Outcome, Target, TargetReport};
#[cfg(feature = "runtime")]
pub use crate::foreground::{run_foreground, Foreground};
#[cfg(feature = "lint")]
pub use crate::lint::{lint_dirs, Finding, LintError, LintOptions, Severity, TRACK_RULES};
#[cfg(feature = "runtime")]
pub use crate::lock::{check_direct, lock_key, LockHolder};
#[cfg(feature = "runtime")]
pub use crate::locks::TableLock;
#[cfg(feature = "runtime")]
pub use crate::migration::{Migration, MigrationSet};
#[cfg(feature = "runtime")]
pub use crate::migrator::Migrator;
#[cfg(feature = "runtime")]
pub use crate::options::StopMode;
#[cfg(feature = "runtime")]
pub use crate::plan::{Plan, PlanAction, PlanStep, PlannedStatement};
#[cfg(feature = "runtime")]
pub use crate::report::{
    Applied, IndexBuildProgress, IndexState, IndexStatus, MigrationStatus, Report, State,
    Verification,
};
#[cfg(feature = "runtime")]
pub use crate::revert::{Resolution, RevertTarget};
#[cfg(feature = "runtime")]
pub use crate::session::connect;
pub use crate::source::baseline::set as set_baseline;
pub use crate::source::sql::{split_statements, LexError, Statement};
pub use crate::source::{
    checksum as checksum_of_bytes, checksum_of_sql, compare_versions, parse_dir_name, Problem,
    SourceError, Track,
};
#[cfg(feature = "runtime")]
pub use crate::url::{redact_error, redact_url, with_database};

use std::path::{Path, PathBuf};

/// The file, in `OUT_DIR`, that [`embed`] writes and
/// [`include_migrations!`] reads.
pub const EMBED_FILE: &str = "diesel_rollout_migrations.rs";

/// Embeds a service's two migration directories; call it from the
/// service's `build.rs`. Relative paths are taken from the package's root.
///
/// With the `lint` feature, it also lints both directories (diesel-guard
/// and the track rules, see [`lint_dirs`]) and fails the build on any
/// error-level finding, printing warnings as cargo warnings.
///
/// It validates both directories with the same rules as the runtime, prints
/// `cargo:rerun-if-changed` for both folders and every file in them (so a
/// new migration directory triggers a rebuild), and writes the table that
/// [`include_migrations!`] includes. A missing `deferred` directory is an
/// empty track.
///
/// # Panics
/// Never: on an invalid set it prints every problem and exits the build
/// script with status 1, which fails the build with that message. Use
/// [`try_embed`] to handle the error yourself.
#[allow(clippy::print_stderr, clippy::print_stdout)]
pub fn embed(required: impl AsRef<Path>, deferred: impl AsRef<Path>) {
    if let Err(e) = try_embed(required, deferred) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// As [`embed`], returning the problems instead of failing the build.
///
/// # Errors
/// Every problem of the set, each naming its paths and the fix.
#[allow(clippy::print_stdout)]
pub fn try_embed(
    required: impl AsRef<Path>,
    deferred: impl AsRef<Path>,
) -> Result<(), SourceError> {
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_default();
    let out_dir = std::env::var_os("OUT_DIR")
        .map(PathBuf::from)
        .ok_or_else(|| SourceError {
            problems: vec![Problem {
                paths: Vec::new(),
                line: None,
                message: "OUT_DIR is not set: call diesel_rollout::embed from a build script"
                    .into(),
            }],
        })?;
    let (required, deferred) = (root.join(required), root.join(deferred));
    let lines = source::embed::embed_to(
        &required,
        &deferred,
        &out_dir.join(EMBED_FILE),
        "::diesel_rollout",
    )?;
    for line in lines {
        println!("{line}");
    }
    #[cfg(feature = "lint")]
    {
        // The configuration's rerun line is among `lines` already.
        let findings =
            lint::lint_dirs(&required, &deferred, &LintOptions::default()).map_err(|e| {
                SourceError {
                    problems: vec![Problem {
                        paths: vec![required.clone()],
                        line: None,
                        message: format!("the migration lint could not run: {e}"),
                    }],
                }
            })?;
        let mut problems = Vec::new();
        for f in findings {
            match f.severity {
                Severity::Warning => {
                    println!("cargo:warning={}", f.to_string().replace('\n', " "));
                }
                Severity::Error => problems.push(Problem {
                    paths: vec![f.path.clone()],
                    line: Some(f.line),
                    message: format!(
                        "{}: {} (safe alternative: {})",
                        f.rule,
                        f.problem,
                        f.safe_alternative.trim().replace('\n', " ")
                    ),
                }),
            }
        }
        if !problems.is_empty() {
            return Err(SourceError { problems });
        }
    }
    Ok(())
}

/// The [`MigrationSet`] that [`embed`] wrote in the build script, as a
/// constant expression:
/// `static MIGRATIONS: MigrationSet = diesel_rollout::include_migrations!();`
#[macro_export]
macro_rules! include_migrations {
    () => {
        include!(concat!(env!("OUT_DIR"), "/diesel_rollout_migrations.rs"))
    };
}
