//! `rollout status`: a row per migration.

use diesel_rollout::connect;

use crate::render::{print_out, status_json, status_table, Colors};
use crate::{database_url, migrator, Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    let _ = args;
    let m = migrator(cli)?;
    let mut conn = connect(database_url(cli)?)?;
    let rows = m.status(&mut conn)?;
    if cli.json {
        print_out(&status_json(&rows));
    } else {
        print_out(&status_table(&rows, Colors::for_stdout()));
    }
    Ok(0)
}
