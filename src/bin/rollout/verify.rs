//! `rollout verify`: exit 0 when every required migration is applied.

use diesel_rollout::connect;

use crate::render::{print_json, print_out, verify_text};
use crate::{database_url, migrator, Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    let _ = args;
    let m = migrator(cli)?;
    let mut conn = connect(database_url(cli)?)?;
    let v = m.verify(&mut conn)?;
    if cli.json {
        print_json(&serde_json::json!({
            "complete": v.is_complete(),
            "missing": v.missing.iter().map(|(version, gap)| serde_json::json!({"version": version, "gap": gap})).collect::<Vec<_>>(),
            "failed": v.failed.iter().map(|(version, error)| serde_json::json!({"version": version, "error": error})).collect::<Vec<_>>(),
            "unknown": v.unknown,
        }));
    } else {
        print_out(&verify_text(&m, &v));
    }
    Ok(if v.is_complete() { 0 } else { 1 })
}
