//! `rollout`: apply, inspect and verify diesel-rollout migrations.
//!
//! Exit codes: 0 success, 1 failure (including an incomplete `verify`),
//! 2 usage error, 3 another session holds the deferred lock.
//!
//! Each command is a module with its `Args` and `run`; `render` prints.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use diesel_rollout::{MigrationSet, Migrator};

mod render;

/// Declares the subcommands: each is a module with `Args` and `run`.
/// Adding a command is a new module and one entry here.
macro_rules! commands {
    ($($(#[$doc:meta])* $variant:ident => $module:ident,)*) => {
        $(mod $module;)*

        #[derive(Subcommand)]
        enum Command {
            $($(#[$doc])* $variant($module::Args),)*
        }

        fn run(cli: &Cli) -> Result<u8, Failure> {
            match &cli.command {
                $(Command::$variant(args) => $module::run(cli, args),)*
            }
        }
    };
}

commands! {
    /// Show every migration known to this binary or recorded in the database.
    Status => status,
    /// Apply the pending required migrations, then the deferred ones in the
    /// foreground, showing the progress of index builds. If another session
    /// is applying the deferred track, wait for it.
    Up => up,
    /// Apply only the deferred migrations, in the foreground. Exits 3 when
    /// another session holds the deferred lock, unless --wait.
    Deferred => deferred,
    /// Exit 0 when every required migration is applied and none failed, 1 otherwise.
    Verify => verify,
    /// Lint both tracks: diesel-guard's checks plus the track rules. Exits 1
    /// when any finding is an error.
    Lint => lint,
    /// Create a migration directory with the next version.
    New => new,
    /// Show what `up` would do now, without changing anything: each pending migration, its
    /// statements and the locks they take. Exits 10 when something is pending, 0 when not, 1
    /// when `up` would refuse or a revert stopped halfway.
    Plan => plan,
    /// Revert applied migrations with their down.sql, newest first (one by default).
    Revert => revert,
    /// Revert the newest applied migrations, then apply them again.
    Redo => redo,
    /// Record how a failed or half-applied migration repaired by hand ended.
    Resolve => resolve,
    /// Adopt an existing history: migrations at or below VERSION (default: the newest applied
    /// in the database) are history, their old problems warnings; writes `start_after` to
    /// diesel-guard.toml.
    Baseline => baseline,
    /// Run up, status, verify or plan on many databases or schemas (--targets FILE,
    /// --targets-query SQL, --schemas-query SQL), --parallel N at a time, with a --canary.
    Fleet => fleet,
    /// Apply everything from scratch to a scratch database, verify, and show the status.
    ///
    /// Without a database URL it starts a throwaway PostgreSQL server from the
    /// server binaries on this machine; with one, it creates and drops a
    /// scratch database there.
    Check => check,
}

const EXAMPLES: &str = "\
Examples:
  rollout check                                  apply the migrations to a throwaway server
  DATABASE_URL=postgres://app@db/app rollout up  apply pending migrations (diesel.toml or ./migrations)
  rollout status --json                          every migration and its state, as JSON
  rollout verify                                 exit 1 unless every required migration is applied
  rollout deferred --wait                        apply the deferred track, waiting for another leader
  rollout new add_orders                         scaffold migrations/VERSION_add_orders
  rollout baseline                               adopt a database migrated by diesel
  rollout plan                                   what `up` would do; exit 10 when something is pending
  rollout revert --count 2                       revert the two newest applied migrations
  rollout fleet up --targets tenants.txt --canary 1   migrate every tenant database

Exit codes: 0 success, 1 failure, 2 usage error,
3 another session holds the deferred lock (`rollout deferred` without --wait),
10 `rollout plan` / `rollout fleet plan`: something is pending (1: `up` would refuse).";

/// Schema migrations for PostgreSQL services deployed by rolling update.
#[derive(Parser)]
#[command(name = "rollout", version, about, after_help = EXAMPLES)]
struct Cli {
    /// PostgreSQL connection URL (also read from DATABASE_URL).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    /// Required-track migrations directory. Default, as diesel's CLI finds it: diesel.toml's
    /// `[migrations_directory] dir`, else `migrations`, in this directory or the nearest one
    /// above it. Only `rollout check` falls back to the example set embedded in this binary.
    #[arg(
        long,
        visible_alias = "migration-dir",
        env = "MIGRATION_DIRECTORY",
        global = true,
        value_name = "DIR"
    )]
    migrations_dir: Option<PathBuf>,

    /// Deferred-track migrations directory (default: `migrations_deferred` beside --migrations-dir).
    #[arg(long, global = true, value_name = "DIR")]
    deferred_dir: Option<PathBuf>,

    /// The table recording applied versions, `table` or `schema.table`, as the service's
    /// `Migrator::migrations_table` [default: __diesel_schema_migrations].
    #[arg(
        long,
        env = "ROLLOUT_MIGRATIONS_TABLE",
        global = true,
        value_name = "TABLE"
    )]
    migrations_table: Option<String>,

    /// The table recording every attempt, as the service's `Migrator::attempts_table`
    /// [default: __diesel_rollout_attempts beside diesel's table, else TABLE_attempts].
    #[arg(
        long,
        env = "ROLLOUT_ATTEMPTS_TABLE",
        global = true,
        value_name = "TABLE"
    )]
    attempts_table: Option<String>,

    /// Migrate one schema (a schema per tenant): the ledger tables live in it and migrations run
    /// with search_path set to it, as the service's `Migrator::schema`.
    #[arg(long, env = "ROLLOUT_SCHEMA", global = true, value_name = "SCHEMA")]
    schema: Option<String>,

    /// Refuse applied versions this binary does not know and edited applied migrations.
    #[arg(long, global = true)]
    strict: bool,

    /// lock_timeout for required migrations (e.g. 500ms, 5s; 0 turns it off) [default: 5s].
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    lock_timeout: Option<Duration>,

    /// How long a required migration failing on lock_timeout is retried [default: 60s].
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    lock_retry_deadline: Option<Duration>,

    /// How long to wait for another process's migration lock [default: 10min].
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    lock_wait: Option<Duration>,

    /// Print the result as JSON on stdout (every command that reports).
    #[arg(long, global = true)]
    json: bool,

    /// Less logging (warnings and errors only), and no progress display.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,

    /// More logging (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

/// An error for the user, with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl From<diesel_rollout::Error> for Failure {
    fn from(e: diesel_rollout::Error) -> Self {
        // What was done before the error stays done: say so.
        let mut message = e.to_string();
        if e.kind() == diesel_rollout::ErrorKind::Connection
            && message.starts_with("cannot connect")
        {
            message.push_str(" (the URL comes from --database-url or DATABASE_URL)");
        }
        if let Some(r) = e.report() {
            let names = |a: &[diesel_rollout::Applied]| {
                a.iter()
                    .map(|x| x.dir_name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if !r.reverted.is_empty() {
                message.push_str(&format!(
                    "\nreverted before the error: {}",
                    names(&r.reverted)
                ));
            }
            if !r.applied.is_empty() {
                message.push_str(&format!(
                    "\napplied before the error: {}",
                    names(&r.applied)
                ));
            }
        }
        Failure { code: 1, message }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn failure(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // clap quotes the arguments it refuses: a connection string
            // given where none is taken (`rollout status $DATABASE_URL`)
            // must not be printed with its password.
            let text = std::env::args().fold(e.to_string(), |text, arg| {
                diesel_rollout::redact_error(&text, &arg)
            });
            let _ = write!(std::io::stderr().lock(), "{text}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&cli);
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn init_tracing(cli: &Cli) {
    let level = if cli.quiet {
        "warn"
    } else {
        match cli.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// The migration set the command runs: the directories given, else the
/// ones found as diesel's CLI finds them ([`found_migrations_dir`]).
/// Without either, an error naming how to give them: the set embedded in
/// this binary is an example schema, not a service's (`rollout check`
/// alone falls back to it, [`migration_set_or_example`]).
fn migration_set(cli: &Cli) -> Result<MigrationSet, Failure> {
    let (req, def) = migration_dirs(cli)?.ok_or_else(|| {
        usage(
            "no migrations directory: none given (--migrations-dir DIR, or \
             MIGRATION_DIRECTORY), and no diesel.toml `[migrations_directory]` or \
             `migrations` directory here or in a directory above. `rollout check` runs the \
             example set embedded in this binary",
        )
    })?;
    Ok(MigrationSet::from_dirs(&req, &def)?)
}

/// As [`migration_set`], falling back to the example set embedded in this
/// binary when no directory is given or found.
fn migration_set_or_example(cli: &Cli) -> Result<MigrationSet, Failure> {
    match migration_dirs(cli)? {
        Some((req, def)) => Ok(MigrationSet::from_dirs(&req, &def)?),
        None => {
            tracing::info!(
                "no migrations directory given or found here: using the example set embedded \
                 in this binary"
            );
            Ok(MigrationSet::example())
        }
    }
}

/// The required and deferred directories: those given, else the found
/// one and the `migrations_deferred` beside it; `None` when none is
/// given or found.
pub(crate) fn migration_dirs(cli: &Cli) -> Result<Option<(PathBuf, PathBuf)>, Failure> {
    let required = match (&cli.migrations_dir, &cli.deferred_dir) {
        (Some(req), _) => req.clone(),
        (None, def) => match found_migrations_dir()? {
            Some(found) => {
                tracing::debug!(dir = %found.display(), "migrations directory found");
                found
            }
            None if def.is_some() => {
                return Err(usage(
                    "--deferred-dir needs --migrations-dir too (no migrations directory was \
                     found here)",
                ))
            }
            None => return Ok(None),
        },
    };
    let deferred = cli
        .deferred_dir
        .clone()
        .unwrap_or_else(|| sibling_deferred(&required));
    Ok(Some((required, deferred)))
}

/// The migrations directory of the project the command runs in, found as
/// diesel's CLI finds it: in this directory, then each one above it, a
/// `diesel.toml` with `[migrations_directory] dir` (relative to that file),
/// else a `migrations` directory.
fn found_migrations_dir() -> Result<Option<PathBuf>, Failure> {
    let Ok(here) = std::env::current_dir() else {
        return Ok(None);
    };
    for dir in here.ancestors() {
        let config = dir.join("diesel.toml");
        if config.is_file() {
            let text = std::fs::read_to_string(&config)
                .map_err(|e| failure(format!("cannot read {}: {e}", config.display())))?;
            let table: toml::Table = text
                .parse()
                .map_err(|e| failure(format!("{} is not valid TOML: {e}", config.display())))?;
            let configured = table
                .get("migrations_directory")
                .and_then(|m| m.get("dir"))
                .and_then(|d| d.as_str());
            if let Some(d) = configured {
                return Ok(Some(dir.join(d)));
            }
        }
        let plain = dir.join("migrations");
        if plain.is_dir() {
            return Ok(Some(plain));
        }
    }
    Ok(None)
}

/// `migrations_deferred` beside the required directory.
fn sibling_deferred(required: &std::path::Path) -> PathBuf {
    required
        .parent()
        .unwrap_or_else(|| std::path::Path::new("."))
        .join("migrations_deferred")
}

fn database_url(cli: &Cli) -> Result<&str, Failure> {
    cli.database_url
        .as_deref()
        .ok_or_else(|| usage("no database given: pass --database-url URL or set DATABASE_URL"))
}

fn migrator(cli: &Cli) -> Result<Migrator, Failure> {
    Ok(migrator_for(cli, migration_set(cli)?))
}

/// A migrator for `set` with the options the command line gives.
fn migrator_for(cli: &Cli, set: MigrationSet) -> Migrator {
    let mut m = Migrator::new(set)
        .strict(cli.strict)
        .application_name("rollout");
    if let Some(t) = &cli.migrations_table {
        m = m.migrations_table(t);
    }
    if let Some(t) = &cli.attempts_table {
        m = m.attempts_table(t);
    }
    if let Some(s) = &cli.schema {
        m = m.schema(s);
    }
    if let Some(d) = cli.lock_timeout {
        m = m.required_lock_timeout(d);
    }
    if let Some(d) = cli.lock_retry_deadline {
        m = m.lock_timeout_retry_deadline(d);
    }
    if let Some(d) = cli.lock_wait {
        m = m.lock_wait_deadline(d);
    }
    m
}

/// `250ms`, `5s`, `2min`, `1h`, or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 500ms, 5s, 2min)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`: use ms, s, min or h"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{text}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
