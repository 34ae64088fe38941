//! `rollout fleet up|status|verify|plan`: one command on many databases or
//! schemas, a few at a time, with a canary and a summary.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use diesel_rollout::{Fleet, FleetReport, Operation, Outcome, Target, TargetReport};

use crate::render::{print_json, print_out};
use crate::{failure, migrator, usage, Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    operation: Op,
}

#[derive(clap::Subcommand)]
enum Op {
    /// Apply both tracks on every target, as `rollout up` does on one.
    Up(Targets),
    /// Show each target's pending and failed migrations.
    Status(Targets),
    /// Exit 0 when every target has every required migration applied.
    Verify(Targets),
    /// What `up` would do on each target. Exits 10 when something is pending.
    Plan(Targets),
}

#[derive(clap::Args)]
#[group(id = "source", required = true, multiple = false)]
struct Source {
    /// A file listing the target databases, one URL or connection string per line
    /// (`#` starts a comment line).
    #[arg(long, value_name = "FILE", group = "source")]
    targets: Option<PathBuf>,

    /// SQL run on --database-url (the control database) returning one target per row: a URL,
    /// or a database name on the same server.
    #[arg(long, value_name = "SQL", group = "source")]
    targets_query: Option<String>,

    /// SQL run on --database-url returning one schema per row: each schema is a target, its
    /// ledger tables in it and its migrations run with search_path set to it.
    #[arg(long, value_name = "SQL", group = "source")]
    schemas_query: Option<String>,
}

#[derive(clap::Args)]
struct Targets {
    #[command(flatten)]
    source: Source,

    /// How many targets run at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    parallel: usize,

    /// Run the first K targets first, and start no other if one of them fails.
    #[arg(long, value_name = "K", default_value_t = 0)]
    canary: usize,

    /// Go on with the other targets after one fails (default: start no new target).
    #[arg(long)]
    keep_going: bool,
}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    let (operation, opts) = match &args.operation {
        Op::Up(t) => (Operation::Up, t),
        Op::Status(t) => (Operation::Status, t),
        Op::Verify(t) => (Operation::Verify, t),
        Op::Plan(t) => (Operation::Plan, t),
    };
    if opts.parallel == 0 {
        return Err(usage("--parallel must be at least 1"));
    }
    if cli.schema.is_some() && opts.source.schemas_query.is_some() {
        return Err(usage(
            "--schema names one schema and --schemas-query many: give one of them",
        ));
    }
    let targets = targets(cli, &opts.source)?;
    let fleet = Fleet::new(migrator(cli)?, targets)
        .parallel(opts.parallel)
        .canary(opts.canary)
        .keep_going(opts.keep_going);
    let bar = progress(cli, fleet.targets().len());
    let on_target = |t: &TargetReport| {
        if let Some(bar) = &bar {
            bar.inc(1);
            if !cli.json {
                bar.suspend(|| print_out(&target_line(t)));
            }
        } else if !cli.json {
            print_out(&target_line(t));
        }
    };
    let report = fleet.run(operation, &on_target);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if cli.json {
        print_json(&fleet_json(&report));
    } else {
        print_out(&summary(&report));
    }
    Ok(if !report.succeeded() {
        1
    } else if operation == Operation::Plan && report.count(Outcome::Pending) > 0 {
        crate::plan::PENDING
    } else {
        0
    })
}

fn targets(cli: &Cli, source: &Source) -> Result<Vec<Target>, Failure> {
    let control = || {
        cli.database_url.as_deref().ok_or_else(|| {
            usage(
                "--targets-query and --schemas-query run on the control database: pass \
                 --database-url URL or set DATABASE_URL",
            )
        })
    };
    Ok(
        match (
            &source.targets,
            &source.targets_query,
            &source.schemas_query,
        ) {
            (Some(file), _, _) => {
                // A connection string given for the file is not printed.
                let shown = diesel_rollout::redact_url(&file.display().to_string());
                let text = std::fs::read_to_string(file)
                    .map_err(|e| failure(format!("cannot read the targets file {shown}: {e}")))?;
                Target::parse_list(&text).map_err(|e| failure(format!("{shown}: {e}")))?
            }
            (_, Some(query), _) => Target::from_query(control()?, query)?,
            (_, _, Some(query)) => Target::schemas_from_query(control()?, query)?,
            _ => {
                return Err(usage(
                    "give --targets FILE, --targets-query SQL or --schemas-query SQL",
                ))
            }
        },
    )
}

/// A bar across targets on a terminal.
fn progress(cli: &Cli, n: usize) -> Option<indicatif::ProgressBar> {
    (!cli.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(n as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} targets [{bar:40}] {pos}/{len} ({elapsed}, about {eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    })
}

fn target_line(t: &TargetReport) -> String {
    let took = format!("{} ms", t.duration.as_millis());
    let what = match t.outcome {
        Outcome::Applied => format!("applied {} ({})", t.applied.len(), t.applied.join(", ")),
        Outcome::UpToDate => "up to date".to_string(),
        Outcome::Pending => {
            let mut s = format!("{} pending ({})", t.pending.len(), t.pending.join(", "));
            if let Some(e) = &t.error {
                s.push_str(&format!("; {e}"));
            }
            s
        }
        _ => t.error.clone().unwrap_or_default(),
    };
    let status = match t.outcome {
        Outcome::Failed => "FAILED ",
        Outcome::Pending if t.error.is_some() => "failed ",
        Outcome::Skipped => "skipped",
        _ => "ok     ",
    };
    format!("{status} {}: {what} [{took}]\n", t.target)
}

fn summary(r: &FleetReport) -> String {
    let mut s = format!(
        "\nfleet {}: {} target(s) in {:.1} s: {} applied, {} up to date, {} pending, {} failed, \
         {} skipped\n",
        r.operation.as_str(),
        r.targets.len(),
        r.duration.as_secs_f64(),
        r.count(Outcome::Applied),
        r.count(Outcome::UpToDate),
        r.count(Outcome::Pending),
        r.count(Outcome::Failed),
        r.count(Outcome::Skipped),
    );
    let failed: Vec<_> = r
        .targets
        .iter()
        .filter(|t| t.outcome == Outcome::Failed)
        .collect();
    if !failed.is_empty() {
        s.push_str("failed:\n");
        for t in &failed {
            s.push_str(&format!(
                "  {}: {}\n",
                t.target,
                t.error.as_deref().unwrap_or("")
            ));
        }
        s.push_str(
            "Fix each failed target (see `rollout status` on it: DATABASE_URL=<its URL>, and \
             --schema NAME for a schema), then run the same command again: every target's own \
             ledger says what is done, so nothing is applied twice.\n",
        );
    }
    s
}

fn fleet_json(r: &FleetReport) -> serde_json::Value {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    serde_json::json!({
        "operation": r.operation.as_str(),
        "targets": r.targets.iter().map(|t| serde_json::json!({
            "target": t.target,
            "outcome": t.outcome.as_str(),
            "applied": t.applied,
            "pending": t.pending,
            "duration_ms": ms(t.duration),
            "connect_ms": ms(t.connect),
            "lock_wait_ms": ms(t.lock_wait),
            "error": t.error,
        })).collect::<Vec<_>>(),
        "summary": {
            "targets": r.targets.len(),
            "succeeded": r.succeeded(),
            "applied": r.count(Outcome::Applied),
            "up_to_date": r.count(Outcome::UpToDate),
            "pending": r.count(Outcome::Pending),
            "failed": r.count(Outcome::Failed),
            "skipped": r.count(Outcome::Skipped),
            "duration_ms": ms(r.duration),
        },
    })
}
