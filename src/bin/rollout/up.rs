//! `rollout up`: both tracks in the foreground, in the order the library's
//! `run_foreground` gives (the one `rollout fleet up` uses): the required
//! track, then the deferred track with its progress shown, going back and
//! forth while a required migration waits for a deferred one.

use diesel_rollout::{run_foreground, Error, Foreground, Migrator, Report};

use crate::render::{print_applied, print_json, print_out, report_json};
use crate::{database_url, migrator, Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Stop after the required track.
    #[arg(long)]
    required_only: bool,
    /// Change nothing: show what `up` would do, as `rollout plan` does (the same output and exit codes).
    #[arg(long)]
    dry_run: bool,
}

/// Each track run as the CLI does it: the required track on a connection
/// of its own, the deferred track through a handle whose progress is
/// shown. What each run did is printed as it ends, or kept for `--json`.
struct Tracks<'a> {
    cli: &'a Cli,
    m: &'a Migrator,
    url: &'a str,
    required: Vec<serde_json::Value>,
    deferred: Vec<serde_json::Value>,
    /// The deferred track's exit code (3: another session holds its lock).
    code: u8,
}

impl Foreground for Tracks<'_> {
    type Error = Failure;

    fn required(&mut self) -> Result<Report, Error> {
        let result = self.m.run_required(self.url);
        let report = crate::render::report_of(&result);
        if let Some(r) = report {
            // A failed run prints what it applied before the failure, and
            // never "nothing to apply": the error follows on stderr.
            if !self.cli.json && (result.is_ok() || !r.applied.is_empty()) {
                print_applied("required", r);
            }
            self.required.push(report_json(r));
        }
        result
    }

    fn deferred(&mut self, required_blocked: bool) -> Result<usize, Failure> {
        let (code, value) =
            crate::deferred::foreground(self.m, self.url, true, required_blocked, self.cli)?;
        self.code = self.code.max(code);
        let applied = value["applied"].as_array().map_or(0, Vec::len);
        self.deferred.push(value);
        Ok(applied)
    }
}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    if args.dry_run {
        return crate::plan::run(cli, &crate::plan::Args {});
    }
    let m = migrator(cli)?;
    let url = database_url(cli)?;
    if args.required_only {
        let report = m.run_required(url)?;
        if cli.json {
            print_json(&serde_json::json!({ "required": report_json(&report) }));
        } else {
            print_applied("required", &report);
        }
        return Ok(0);
    }
    let mut on = Tracks {
        cli,
        m: &m,
        url,
        required: Vec::new(),
        deferred: Vec::new(),
        code: 0,
    };
    run_foreground(&mut on)?;
    // Nothing deferred pending: no pool, no thread, no second look.
    if on.deferred.is_empty() {
        if !cli.json {
            print_out("deferred: nothing to apply\n");
        }
        on.deferred
            .push(serde_json::json!({ "state": "done", "applied": [] }));
    }
    if cli.json {
        let one = |v: Vec<serde_json::Value>| {
            if v.len() == 1 {
                v.into_iter().next().unwrap_or_default()
            } else {
                serde_json::Value::Array(v)
            }
        };
        print_json(&serde_json::json!({
            "required": one(on.required),
            "deferred": one(on.deferred),
        }));
    }
    Ok(on.code)
}
