//! `rollout deferred`, and the deferred track in the foreground for
//! `rollout up`.

use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel_rollout::{connect, redact_error, DeferredState, Migrator};

use crate::render::{print_json, print_out, Progress, RedactingHandler};
use crate::{database_url, failure, migrator, Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Wait for the session holding the deferred lock instead of exiting 3.
    #[arg(long)]
    wait: bool,
}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    let m = migrator(cli)?;
    let url = database_url(cli)?;
    // A clear error for an unreachable database before the pool.
    drop(connect(url)?);
    let (code, value) = foreground(&m, url, args.wait, false, cli)?;
    if cli.json {
        print_json(&value);
    }
    Ok(code)
}

/// Runs the deferred track in the foreground on a pool of two connections
/// (one leads, one reads build progress), showing what it does.
/// With `required_blocked` (the required track stopped on a migration that
/// waits for a deferred one), required migrations found pending end the
/// deferred phase instead of failing it: the required track goes on next.
pub(crate) fn foreground(
    m: &Migrator,
    url: &str,
    wait: bool,
    required_blocked: bool,
    cli: &Cli,
) -> Result<(u8, serde_json::Value), Failure> {
    let quiet = cli.quiet || cli.json;
    let pool = Pool::builder()
        .max_size(2)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(10))
        .error_handler(Box::new(RedactingHandler(url.to_string())))
        .build(ConnectionManager::<PgConnection>::new(url))
        .map_err(|e| {
            failure(format!(
                "cannot create a connection pool: {}",
                redact_error(&e.to_string(), url)
            ))
        })?;
    let handle = m
        .clone()
        .deferred_retry(wait)
        .deferred_retry_interval(Duration::from_secs(1))
        .deferred_retry_max_interval(Duration::from_secs(5))
        .deferred_failure_retries(0)
        .deferred_progress_interval(Duration::from_secs(1))
        .pool_url(url)
        .start_deferred(pool);
    let mut progress = Progress::new(quiet);
    // Waiting for another leader is bounded by --lock-wait, and a database
    // that stays unreachable by a minute.
    let deadline = Instant::now() + cli.lock_wait.unwrap_or(Duration::from_secs(600));
    let mut unreachable_since = None::<Instant>;
    loop {
        let state = handle.wait_for_change(Duration::from_secs(1));
        progress.show(&state);
        if handle.is_finished() {
            break;
        }
        let give_up = match &state {
            DeferredState::NotLeader { holder, .. } if Instant::now() >= deadline => Some(format!(
                "gave up waiting for {} to finish the deferred track (--lock-wait)",
                holder
                    .as_ref()
                    .map_or_else(|| "another session".to_string(), |h| h.to_string())
            )),
            DeferredState::Reconnecting { error } => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                (since.elapsed() >= Duration::from_secs(60)).then(|| error.clone())
            }
            _ => {
                unreachable_since = None;
                None
            }
        };
        if let Some(message) = give_up {
            handle.stop();
            progress.finish();
            return Err(failure(message));
        }
        if let DeferredState::WaitingForRequired { pending } = state {
            handle.stop();
            progress.finish();
            if required_blocked {
                return Ok((
                    0,
                    serde_json::json!({ "state": "waiting_for_required", "applied": [] }),
                ));
            }
            // Required migrations this binary knows are missing although the
            // required track was just applied, or was never applied: waiting
            // would not fix either.
            return Err(failure(format!(
                "{pending} required migration(s) are not applied, and deferred migrations never \
                 run before them: run `rollout up --required-only` first (if it just succeeded, \
                 the server lost those commits: check `rollout status`)"
            )));
        }
    }
    progress.finish();
    let text = !cli.json;
    match handle.state() {
        DeferredState::Done { applied } => {
            let names: Vec<_> = applied
                .iter()
                .map(|v| m.migrations().get(v).map_or(v.as_str(), |x| x.dir_name()))
                .collect();
            if text && names.is_empty() {
                print_out("deferred: nothing to apply\n");
            } else if text {
                print_out(&format!("deferred: applied {}\n", names.join(", ")));
            }
            Ok((0, serde_json::json!({ "state": "done", "applied": names })))
        }
        DeferredState::NotLeader { holder, .. } => {
            let who = holder
                .as_ref()
                .map_or_else(|| "another session".to_string(), |h| h.to_string());
            if text {
                print_out(&format!(
                    "deferred: the deferred lock is held by {who}, which is applying the deferred \
                     track; run with --wait to wait for it\n"
                ));
            }
            Ok((
                3,
                serde_json::json!({
                    "state": "not_leader",
                    "holder": holder.map(|h| serde_json::json!({
                        "pid": h.pid,
                        "application_name": h.application_name,
                        "since": h.since,
                        "client": h.client,
                    })),
                }),
            ))
        }
        DeferredState::Failed { error, .. } => Err(failure(error)),
        DeferredState::WaitingForRequired { pending } => Err(failure(format!(
            "{pending} required migration(s) are not applied yet, and deferred migrations never \
             run before them: run `rollout up --required-only` first"
        ))),
        DeferredState::Reconnecting { error } => Err(failure(error)),
        DeferredState::Stopped => Err(failure("the deferred track stopped before finishing")),
        other => Err(failure(format!("the deferred track ended as {other:?}"))),
    }
}
