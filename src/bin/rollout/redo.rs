//! `rollout redo`: revert the newest applied migrations, then apply them
//! again.

use diesel_rollout::{check_direct, connect};

use crate::render::{print_applied, print_dry_run, print_json, print_reverted, report_json};
use crate::{database_url, migrator, usage, Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// How many of the newest applied migrations to redo [default: 1].
    #[arg(long, short = 'n', value_name = "N", default_value_t = 1)]
    count: usize,
    /// Change nothing: show what would be reverted and applied again, each down.sql's and up.sql's statements with the locks they take. Exits 1 when redo would be refused.
    #[arg(long)]
    dry_run: bool,
    /// Revert a migration whose down.sql has no statements (diesel's stub): its version row goes, nothing is undone. Refused without it.
    #[arg(long)]
    allow_empty_down: bool,
}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    if args.count == 0 {
        return Err(usage("--count must be 1 or more"));
    }
    let m = migrator(cli)?.revert_empty_down(args.allow_empty_down);
    let url = database_url(cli)?;
    let mut conn = connect(url)?;
    if args.dry_run {
        let plan = m.plan_redo(&mut conn, args.count)?;
        return Ok(print_dry_run("redo", &plan, cli.json));
    }
    check_direct(&mut conn, url)?;
    let report = m.redo(&mut conn, args.count)?;
    if cli.json {
        print_json(&report_json(&report));
    } else {
        print_reverted(&report);
        print_applied("redo", &report);
    }
    Ok(0)
}
