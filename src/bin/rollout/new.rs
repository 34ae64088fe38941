//! `rollout new`: scaffold a migration with the next version.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use diesel_rollout::{compare_versions, parse_dir_name};

use crate::render::{print_json, print_out};
use crate::{failure, sibling_deferred, usage, Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The migration's name (letters, digits and `_`).
    name: String,
    /// Create it in the deferred track (run_in_transaction = false).
    #[arg(long)]
    deferred: bool,
}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    new_migration(cli, &args.name, args.deferred)
}

/// Days since 1970-01-01 to a civil (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn new_migration(cli: &Cli, name: &str, deferred: bool) -> Result<u8, Failure> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(usage(format!(
            "migration name `{name}` must be letters, digits and `_` only"
        )));
    }
    let req = crate::migration_dirs(cli)?.map_or_else(|| PathBuf::from("migrations"), |(r, _)| r);
    let def = cli
        .deferred_dir
        .clone()
        .unwrap_or_else(|| sibling_deferred(&req));
    // The newest version by directory name only: a scaffolded migration
    // that is still empty must not stop the next `new`.
    let newest = [&req, &def]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| parse_dir_name(&e.file_name().to_string_lossy()).ok())
        .map(|(version, _)| version)
        .max_by(|a, b| compare_versions(a, b));
    if !req.is_dir() {
        return Err(failure(format!(
            "{} does not exist: create the migrations directory first, or pass --migrations-dir",
            req.display()
        )));
    }
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    let stamp = format!(
        "{y:04}{mo:02}{d:02}{:02}{:02}{:02}",
        t / 3600,
        t / 60 % 60,
        t % 60
    );
    let dir_name = match newest.as_deref() {
        Some(newest) if compare_versions(&stamp, newest) != std::cmp::Ordering::Greater => {
            format!("{}_{name}", increment(newest))
        }
        _ => format!(
            "{y:04}-{mo:02}-{d:02}-{:02}{:02}{:02}_{name}",
            t / 3600,
            t / 60 % 60,
            t % 60
        ),
    };
    let dir = if deferred { def } else { req }.join(&dir_name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| failure(format!("cannot create {}: {e}", dir.display())))?;
    let write = |file: &str, body: &str| {
        std::fs::write(dir.join(file), body)
            .map_err(|e| failure(format!("cannot write {}: {e}", dir.join(file).display())))
    };
    if deferred {
        write(
            "up.sql",
            "-- Runs after start-up, outside any transaction, one statement at a time.\n\
             -- CREATE INDEX CONCURRENTLY IF NOT EXISTS ... ;\n",
        )?;
        write("down.sql", "-- DROP INDEX CONCURRENTLY IF EXISTS ... ;\n")?;
        write("metadata.toml", "run_in_transaction = false\n")?;
    } else {
        write(
            "up.sql",
            "-- Runs at start-up, in its own transaction, before the replica is ready.\n",
        )?;
        write("down.sql", "")?;
    }
    if cli.json {
        print_json(&serde_json::json!({
            "created": dir.display().to_string(),
            "track": if deferred { "deferred" } else { "required" },
        }));
    } else {
        print_out(&format!("created {}\n", dir.display()));
    }
    Ok(0)
}

/// `version + 1` on a string of digits of any length.
fn increment(version: &str) -> String {
    let mut digits: Vec<u8> = version.bytes().collect();
    for d in digits.iter_mut().rev() {
        if *d == b'9' {
            *d = b'0';
        } else {
            *d += 1;
            return String::from_utf8(digits).unwrap_or_default();
        }
    }
    format!("1{}", String::from_utf8(digits).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_753), (2024, 1, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn increments_any_length() {
        assert_eq!(increment("20240131120000"), "20240131120001");
        assert_eq!(increment("199"), "200");
        assert_eq!(increment("99"), "100");
    }
}
