//! `rollout plan`: what `up` would do now, without changing anything. Exits
//! 10 when something is pending, so a pipeline can gate on it, and 1 when
//! `up` would refuse or leave the database incomplete.

use diesel_rollout::connect;

use crate::render::{plan_json, plan_text, print_json, print_out};
use crate::{database_url, migrator, Cli, Failure};

/// The exit code when something is pending.
pub(crate) const PENDING: u8 = 10;

#[derive(clap::Args)]
pub(crate) struct Args {}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    let _ = args;
    let m = migrator(cli)?;
    let mut conn = connect(database_url(cli)?)?;
    let plan = m.plan(&mut conn)?;
    if cli.json {
        print_json(&plan_json(&plan));
    } else {
        print_out(&plan_text(&plan));
    }
    Ok(if plan.has_problems() {
        1
    } else if plan.is_empty() {
        0
    } else {
        PENDING
    })
}
