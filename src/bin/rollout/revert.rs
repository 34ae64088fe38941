//! `rollout revert`: revert applied migrations with their down.sql, newest
//! first.

use diesel_rollout::{check_direct, connect, RevertTarget};

use crate::render::{print_dry_run, print_json, print_reverted, report_json};
use crate::{database_url, migrator, usage, Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// How many of the newest applied migrations to revert [default: 1].
    #[arg(long, short = 'n', value_name = "N", conflicts_with_all = ["to", "all"])]
    count: Option<usize>,
    /// Revert every applied migration, newest first (as `diesel migration revert --all`).
    #[arg(long, conflicts_with = "to")]
    all: bool,
    /// Revert every applied migration newer than VERSION (VERSION stays applied).
    #[arg(long, value_name = "VERSION")]
    to: Option<String>,
    /// Change nothing: show what would be reverted, newest first, each down.sql's statements with the locks they take. Exits 1 when the revert would be refused.
    #[arg(long)]
    dry_run: bool,
    /// Revert a migration whose down.sql has no statements (diesel's stub): its version row goes, nothing is undone. Refused without it.
    #[arg(long)]
    allow_empty_down: bool,
}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    let target = match (&args.to, args.count) {
        (Some(v), _) => RevertTarget::To(v.chars().filter(|c| *c != '-').collect()),
        (None, Some(0)) => return Err(usage("--count must be 1 or more")),
        (None, _) if args.all => RevertTarget::Count(usize::MAX),
        (None, n) => RevertTarget::Count(n.unwrap_or(1)),
    };
    let m = migrator(cli)?.revert_empty_down(args.allow_empty_down);
    let url = database_url(cli)?;
    let mut conn = connect(url)?;
    if args.dry_run {
        let plan = m.plan_revert(&mut conn, &target)?;
        return Ok(print_dry_run("revert", &plan, cli.json));
    }
    check_direct(&mut conn, url)?;
    let report = m.revert(&mut conn, target)?;
    if cli.json {
        print_json(&report_json(&report));
    } else {
        print_reverted(&report);
    }
    Ok(0)
}
