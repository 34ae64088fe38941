//! `rollout baseline`: adopt an existing history. Migrations at or below
//! the baseline are history: their old problems are warnings, the lint skips
//! them, and a new migration with the same problem still fails the build.

use std::path::PathBuf;

use diesel_rollout::{connect, set_baseline, MigrationSet};

use crate::render::{print_json, print_out};
use crate::{failure, migrator_for, sibling_deferred, usage, Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The baseline (default: the newest version recorded in the database).
    version: Option<String>,
}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    let required =
        crate::migration_dirs(cli)?.map_or_else(|| PathBuf::from("migrations"), |(r, _)| r);
    if !required.is_dir() {
        return Err(usage(format!(
            "{} is not a directory: `rollout baseline` writes the baseline beside the \
             migrations directory; pass --migrations-dir DIR",
            required.display()
        )));
    }
    let version = match &args.version {
        Some(v) => {
            let digits: String = v.chars().filter(|c| *c != '-' && *c != '_').collect();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(usage(format!(
                    "`{v}` is not a version: give the version of the newest migration to \
                     grandfather (e.g. 2024-01-31-120000)"
                )));
            }
            digits
        }
        None => {
            let url = cli.database_url.as_deref().ok_or_else(|| {
                usage(
                    "no version and no database: give the baseline version, or a database \
                     (--database-url or DATABASE_URL) whose newest applied migration is it",
                )
            })?;
            // The set may not be valid yet: that is what the baseline is for.
            let m = migrator_for(cli, MigrationSet::empty());
            let mut conn = connect(url)?;
            m.newest_applied(&mut conn)?.ok_or_else(|| {
                failure(
                    "the database records no applied migration: give the baseline version \
                     (the newest migration whose old problems to grandfather)",
                )
            })?
        }
    };
    let path = set_baseline(&required, &version)
        .map_err(|e| failure(format!("cannot write the baseline: {e}")))?;
    // What the set looks like with it.
    let deferred = cli
        .deferred_dir
        .clone()
        .unwrap_or_else(|| sibling_deferred(&required));
    let set = MigrationSet::from_dirs(&required, &deferred)?;
    let history = set
        .migrations()
        .iter()
        .filter(|m| diesel_rollout::compare_versions(m.version(), &version).is_le())
        .count();
    if cli.json {
        print_json(&serde_json::json!({
            "baseline": version,
            "config": path.display().to_string(),
            "history": history,
            "newer": set.migrations().len() - history,
        }));
    } else {
        print_out(&format!(
            "baseline {version}: {history} migration(s) at or below it are history (their old \
             problems are warnings, the lint skips them), {} newer one(s) are held to every \
             rule; wrote `start_after = \"{version}\"` to {}\n",
            set.migrations().len() - history,
            path.display()
        ));
    }
    Ok(0)
}
