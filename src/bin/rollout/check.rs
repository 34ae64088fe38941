//! `rollout check`: everything from scratch on a scratch database.

#[cfg(feature = "lint")]
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use diesel::prelude::*;
use diesel_rollout::cluster::ThrowawayCluster;
use diesel_rollout::{
    connect, redact_url, run_foreground, with_database, Error, Foreground, Report, Track,
};

use crate::render::{
    print_json, print_out, report_json, status_json, status_table, verify_text, Colors,
};
#[cfg(feature = "lint")]
use crate::sibling_deferred;
use crate::{failure, usage, Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    let _ = args;
    check(cli)
}

/// Both tracks in the order `rollout up` runs them ([`run_foreground`]),
/// each on a connection of its own, as `up` runs them: what a required
/// migration leaves in its session (a role, `session_replication_role`)
/// does not reach the deferred track.
struct Scratch<'a> {
    m: &'a diesel_rollout::Migrator,
    url: &'a str,
    required: Report,
    deferred: Report,
}

impl Foreground for Scratch<'_> {
    type Error = Error;

    fn required(&mut self) -> Result<Report, Error> {
        let result = self.m.run_required(self.url);
        let report = crate::render::report_of(&result);
        if let Some(r) = report {
            self.required.applied.extend(r.applied.iter().cloned());
        }
        result
    }

    fn deferred(&mut self, _required_blocked: bool) -> Result<usize, Error> {
        let d = self.m.run_deferred_on(&mut connect(self.url)?)?;
        let applied = d.applied.len();
        self.deferred.applied.extend(d.applied);
        Ok(applied)
    }
}

/// The scratch database while it exists (admin URL, name), for whichever
/// comes first: [`ScratchDb`]'s drop, or a Ctrl-C or SIGTERM.
static SCRATCH: Mutex<Option<(String, String)>> = Mutex::new(None);
/// Set by the first Ctrl-C or SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// What a failed drop of the scratch database left, and how to finish it.
static LEFT: Mutex<Option<String>> = Mutex::new(None);

/// Drops the scratch database of `rollout check`, whatever happened.
struct ScratchDb;

impl Drop for ScratchDb {
    fn drop(&mut self) {
        drop_scratch();
    }
}

/// Drops the scratch database once. The lock is held until the drop is
/// done, so `check` (its [`ScratchDb`] drop) waits for an interrupt's
/// drop instead of exiting under it. A drop that fails is logged with the
/// statement that finishes it, and remembered for the interrupted message.
fn drop_scratch() {
    let mut scratch = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    let Some((admin_url, name)) = scratch.take() else {
        return;
    };
    let dropped = connect(&admin_url)
        .map_err(|e| e.to_string())
        .and_then(|mut conn| {
            diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut conn)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = dropped {
        let left = format!(
            "the scratch database {name} could not be dropped ({e}): drop it with \
             `DROP DATABASE \"{name}\"`"
        );
        tracing::warn!("{left}");
        *LEFT.lock().unwrap_or_else(|e| e.into_inner()) = Some(left);
    }
}

/// A Ctrl-C or SIGTERM: the scratch database is dropped at once (on a
/// thread of its own, so that a second signal still exits at once), which
/// ends the sessions applying migrations to it, so the run stops where it
/// is; `check` then exits 130.
fn on_interrupt() {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        std::process::exit(130);
    }
    tracing::warn!("interrupted: dropping the scratch database");
    std::thread::spawn(drop_scratch);
}

/// `rollout check` lints first the set it applies: the directories given,
/// or those the embedded set was built from, when they are on disk.
fn lint_before_check(cli: &Cli) -> Result<(), Failure> {
    #[cfg(feature = "lint")]
    {
        let (required, deferred) = crate::migration_dirs(cli)?.unwrap_or_else(|| {
            let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("migrations");
            let deferred = sibling_deferred(&example);
            (example, deferred)
        });
        if !required.is_dir() {
            tracing::warn!(dir = %required.display(), "lint skipped: the migrations directory is not on this machine");
            return Ok(());
        }
        let findings = diesel_rollout::lint_dirs(
            &required,
            &deferred,
            &diesel_rollout::LintOptions::default(),
        )
        .map_err(|e| failure(e.to_string()))?;
        let errors: Vec<_> = findings
            .iter()
            .filter(|f| f.severity == diesel_rollout::Severity::Error)
            .collect();
        for f in &findings {
            tracing::warn!("{f}");
        }
        if !errors.is_empty() {
            return Err(failure(format!(
                "the lint found {} error(s) (shown above; `rollout lint` lists them): fix them \
                 before applying",
                errors.len()
            )));
        }
        tracing::info!(findings = findings.len(), "lint passed");
    }
    #[cfg(not(feature = "lint"))]
    let _ = cli;
    Ok(())
}

fn check(cli: &Cli) -> Result<u8, Failure> {
    // Only fails when a handler is set already, which nothing else does.
    let _ = ctrlc::set_handler(on_interrupt);
    let result = check_scratch(cli);
    if INTERRUPTED.load(Ordering::SeqCst) {
        // An interrupt's drop may still run: wait for it.
        drop_scratch();
        let left = LEFT.lock().unwrap_or_else(|e| e.into_inner()).take();
        return Err(Failure {
            code: 130,
            message: match left {
                Some(left) => {
                    format!("`rollout check` was interrupted: it stopped where it was, but {left}")
                }
                None => "`rollout check` was interrupted: it stopped where it was, and its \
                         scratch database is dropped (nothing else was touched)"
                    .to_string(),
            },
        });
    }
    result
}

fn check_scratch(cli: &Cli) -> Result<u8, Failure> {
    lint_before_check(cli)?;
    let migrator = crate::migrator_for(cli, crate::migration_set_or_example(cli)?);
    let started = Instant::now();
    let cluster;
    let admin_url = match &cli.database_url {
        Some(url) => url.clone(),
        None => {
            tracing::info!("no database given: starting a throwaway PostgreSQL server");
            cluster = ThrowawayCluster::start().map_err(|e| failure(e.to_string()))?;
            cluster.admin_url()
        }
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!("rollout_check_{}_{nanos}", std::process::id());
    let url = with_database(&admin_url, &name).ok_or_else(|| {
        usage(format!(
            "`rollout check` needs a postgres:// URL to create its scratch database on, not {}",
            redact_url(&admin_url)
        ))
    })?;
    {
        let mut admin = connect(&admin_url)?;
        // Under the lock, so an interrupt either came before (and is seen
        // here) or waits for it and then drops it.
        let mut scratch = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Ok(130);
        }
        diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .map_err(|e| {
                failure(format!(
                    "cannot create the scratch database {name} on {}: {e}. `rollout check` \
                     needs a role allowed to CREATE DATABASE",
                    redact_url(&admin_url)
                ))
            })?;
        *scratch = Some((admin_url.clone(), name.clone()));
    }
    let _scratch = ScratchDb;
    tracing::info!(database = %name, "applying every migration from scratch");
    let mut tracks = Scratch {
        m: &migrator,
        url: &url,
        required: Report::default(),
        deferred: Report::default(),
    };
    run_foreground(&mut tracks)?;
    let Scratch {
        required, deferred, ..
    } = tracks;
    let mut conn = connect(&url)?;
    let verification = migrator.verify(&mut conn)?;
    let rows = migrator.status(&mut conn)?;
    let pending_deferred = rows
        .iter()
        .filter(|r| r.track == Some(Track::Deferred) && r.state.as_str() != "applied")
        .count();
    let complete = verification.is_complete() && pending_deferred == 0;
    if cli.json {
        let mut status: serde_json::Value =
            serde_json::from_str(&status_json(&rows)).unwrap_or_default();
        print_json(&serde_json::json!({
            "complete": complete,
            "required": report_json(&required),
            "deferred": report_json(&deferred),
            "elapsed_ms": started.elapsed().as_millis() as u64,
            "status": status.take(),
        }));
        return Ok(if complete { 0 } else { 1 });
    }
    let mut out = status_table(&rows, Colors::for_stdout());
    out.push_str(&format!(
        "\napplied {} required and {} deferred migrations in {} ms; verify: {}\n",
        required.applied.len(),
        deferred.applied.len(),
        started.elapsed().as_millis(),
        if complete { "complete" } else { "INCOMPLETE" }
    ));
    print_out(&out);
    if complete {
        Ok(0)
    } else {
        print_out(&verify_text(&migrator, &verification));
        Ok(1)
    }
}
