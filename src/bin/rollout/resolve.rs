//! `rollout resolve`: record how a migration repaired by hand ended.

use diesel_rollout::{check_direct, connect, Resolution};

use crate::render::{print_json, print_out};
use crate::{database_url, migrator, usage, Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The migration's version.
    version: String,
    /// Its changes are in the database: record it as applied.
    #[arg(long, conflicts_with = "rolled_back")]
    applied: bool,
    /// Its changes are not in the database: record it as not applied, so `up` runs it from the start.
    #[arg(long)]
    rolled_back: bool,
    /// Resolve even when the latest attempt finished (dangerous: an applied migration recorded as rolled back runs again on the next `up`; a pending one recorded as applied never runs).
    #[arg(long)]
    force: bool,
    /// Why, recorded with who and when.
    #[arg(long, value_name = "TEXT", default_value = "")]
    note: String,
}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    let resolution = match (args.applied, args.rolled_back) {
        (true, false) => Resolution::Applied,
        (false, true) => Resolution::RolledBack,
        _ => return Err(usage("say how it ended: --applied or --rolled-back")),
    };
    let version: String = args.version.chars().filter(|c| *c != '-').collect();
    let m = migrator(cli)?;
    let url = database_url(cli)?;
    let mut conn = connect(url)?;
    check_direct(&mut conn, url)?;
    if args.force {
        m.dangerous_resolve_any_state(&mut conn, &version, resolution, &args.note)?;
    } else {
        m.resolve(&mut conn, &version, resolution, &args.note)?;
    }
    let name = m
        .migrations()
        .get(&version)
        .map_or(version.clone(), |x| x.dir_name().to_string());
    let how = if args.applied {
        "applied"
    } else {
        "rolled back"
    };
    if cli.json {
        print_json(&serde_json::json!({ "version": version, "resolved": how }));
    } else {
        print_out(&format!(
            "resolved {name} as {how} (recorded in the attempts table with who and when)\n"
        ));
    }
    Ok(0)
}
