//! `rollout redo`: revert the newest applied migrations, then apply them
//! again.

use diesel_rollout::{check_direct, connect};

use crate::render::{print_applied, print_json, print_reverted, report_json};
use crate::{database_url, migrator, usage, Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// How many of the newest applied migrations to redo [default: 1].
    #[arg(long, value_name = "N", default_value_t = 1)]
    count: usize,
}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    if args.count == 0 {
        return Err(usage("--count must be 1 or more"));
    }
    let m = migrator(cli)?;
    let url = database_url(cli)?;
    let mut conn = connect(url)?;
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
