//! `rollout up`: the required track, then the deferred track in the
//! foreground, going back and forth while a required migration waits for a
//! deferred one.

use diesel_rollout::ErrorKind;

use crate::render::{print_applied, print_json, print_out, report_json};
use crate::{database_url, migrator, Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Stop after the required track.
    #[arg(long)]
    required_only: bool,
}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    let m = migrator(cli)?;
    let url = database_url(cli)?;
    let mut required = Vec::new();
    let mut deferred_runs = Vec::new();
    let mut last_blocked = None;
    // A required migration that waits for a deferred one stops the
    // required track; the deferred track then applies what it
    // waits for, and the required track goes on.
    loop {
        let (report, blocked) = match m.run_required(url) {
            Ok(report) => (report, None),
            Err(e) if e.kind() == ErrorKind::DeferredDependency && !args.required_only => {
                let report = e.report().cloned().unwrap_or_default();
                (report, Some(e))
            }
            Err(e) => return Err(e.into()),
        };
        if !cli.json {
            print_applied("required", &report);
        }
        let report_deferred_pending = report.deferred_pending;
        required.push(report_json(&report));
        if args.required_only {
            if cli.json {
                print_json(&serde_json::json!({ "required": required[0] }));
            }
            return Ok(0);
        }
        // Nothing deferred pending: no pool, no thread, no second look.
        let (code, value) = if blocked.is_none() && report_deferred_pending == 0 {
            if !cli.json {
                print_out("deferred: nothing to apply\n");
            }
            (0, serde_json::json!({ "state": "done", "applied": [] }))
        } else {
            crate::deferred::foreground(&m, url, true, blocked.is_some(), cli)?
        };
        let progress = value["applied"].as_array().is_some_and(|a| !a.is_empty());
        deferred_runs.push(value);
        // Go on while the deferred track applied something, or while
        // the required track got further (another process may have
        // applied what it waited for).
        let at = blocked
            .as_ref()
            .and_then(|e| e.migration().map(|m| m.version.clone()));
        match blocked {
            Some(e) if code != 0 || (!progress && last_blocked == at) => return Err(e.into()),
            Some(_) => {
                tracing::info!(
                    "the deferred migrations the required track waited for are \
                         applied: going on with the required track"
                );
                last_blocked = at;
            }
            None => {
                if cli.json {
                    let one = |v: Vec<serde_json::Value>| {
                        if v.len() == 1 {
                            v.into_iter().next().unwrap_or_default()
                        } else {
                            serde_json::Value::Array(v)
                        }
                    };
                    print_json(&serde_json::json!({
                        "required": one(required),
                        "deferred": one(deferred_runs),
                    }));
                }
                return Ok(code);
            }
        }
    }
}
