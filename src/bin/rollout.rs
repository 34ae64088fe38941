//! `rollout`: apply, inspect and verify diesel-rollout migrations.
//!
//! Exit codes: 0 success, 1 failure (including an incomplete `verify`),
//! 2 usage error.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel_rollout::cluster::ThrowawayCluster;
use diesel_rollout::{
    compare_versions, connect, parse_dir_name, redact_error, redact_url, with_database,
    DeferredState, ErrorKind, MigrationSet, MigrationStatus, Migrator, Report, Track,
};

const EXAMPLES: &str = "\
Examples:
  rollout check                                  apply the embedded example set to a throwaway server
  DATABASE_URL=postgres://app@db/app rollout up  apply pending required migrations
  rollout status --json                          every migration and its state, as JSON
  rollout verify                                 exit 1 unless every required migration is applied
  rollout deferred --wait                        apply the deferred track, waiting for another leader
  rollout new add_orders --migrations-dir migrations

Exit codes: 0 success, 1 failure, 2 usage error,
3 another session holds the deferred lock (`rollout deferred` without --wait).";

/// Schema migrations for PostgreSQL services deployed by rolling update.
#[derive(Parser)]
#[command(name = "rollout", version, about, after_help = EXAMPLES)]
struct Cli {
    /// PostgreSQL connection URL (also read from DATABASE_URL).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    /// Required-track migrations directory, instead of the embedded example set.
    #[arg(long, global = true, value_name = "DIR")]
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
    /// [default: __diesel_rollout_attempts beside diesel's table, else <TABLE>_attempts].
    #[arg(
        long,
        env = "ROLLOUT_ATTEMPTS_TABLE",
        global = true,
        value_name = "TABLE"
    )]
    attempts_table: Option<String>,

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

#[derive(Subcommand)]
enum Command {
    /// Show every migration known to this binary or recorded in the database.
    Status,
    /// Apply the pending required migrations, then the deferred ones in the
    /// foreground, showing the progress of index builds. If another session
    /// is applying the deferred track, wait for it.
    Up {
        /// Stop after the required track.
        #[arg(long)]
        required_only: bool,
    },
    /// Apply only the deferred migrations, in the foreground. Exits 3 when
    /// another session holds the deferred lock, unless --wait.
    Deferred {
        /// Wait for the session holding the deferred lock instead of exiting 3.
        #[arg(long)]
        wait: bool,
    },
    /// Exit 0 when every required migration is applied and none failed, 1 otherwise.
    Verify,
    /// Lint both tracks: diesel-guard's checks plus the track rules. Exits 1
    /// when any finding is an error.
    Lint {
        /// diesel-guard.toml to use (default: beside the migrations directory, else ./diesel-guard.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Report this rule or check as a warning, not an error (repeatable).
        #[arg(long, value_name = "RULE")]
        warn: Vec<String>,
        /// Treat warnings as errors.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Create a migration directory with the next version.
    New {
        /// The migration's name (letters, digits and `_`).
        name: String,
        /// Create it in the deferred track (run_in_transaction = false).
        #[arg(long)]
        deferred: bool,
    },
    /// Apply everything from scratch to a scratch database, verify, and show the status.
    ///
    /// Without a database URL it starts a throwaway PostgreSQL server from the
    /// server binaries on this machine; with one, it creates and drops a
    /// scratch database there.
    Check,
}

/// An error for the user, with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl From<diesel_rollout::Error> for Failure {
    fn from(e: diesel_rollout::Error) -> Self {
        Failure {
            code: 1,
            message: e.to_string(),
        }
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
    let cli = Cli::parse();
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

fn migration_set(cli: &Cli) -> Result<MigrationSet, Failure> {
    match (&cli.migrations_dir, &cli.deferred_dir) {
        (None, None) => Ok(MigrationSet::example()),
        (Some(req), def) => {
            let def = def.clone().unwrap_or_else(|| sibling_deferred(req));
            Ok(MigrationSet::from_dirs(req, &def)?)
        }
        (None, Some(_)) => Err(usage(
            "--deferred-dir needs --migrations-dir too (the embedded set is used as a whole)",
        )),
    }
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
    let mut m = Migrator::new(migration_set(cli)?)
        .strict(cli.strict)
        .application_name("rollout");
    if let Some(t) = &cli.migrations_table {
        m = m.migrations_table(t);
    }
    if let Some(t) = &cli.attempts_table {
        m = m.attempts_table(t);
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
    Ok(m)
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

fn run(cli: &Cli) -> Result<u8, Failure> {
    match &cli.command {
        Command::Status => {
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
        Command::Up { required_only } => {
            let m = migrator(cli)?;
            let url = database_url(cli)?;
            let mut required = Vec::new();
            let mut deferred_runs = Vec::new();
            let mut last_blocked = None;
            // A required migration that waits for a deferred one stops the
            // required track; the deferred track then applies what it
            // waits for, and the required track goes on.
            loop {
                let (report, blocked) = match m.run_required(url) {
                    Ok(report) => (report, None),
                    Err(e) if e.kind() == ErrorKind::DeferredDependency && !*required_only => {
                        let report = e.report().cloned().unwrap_or_default();
                        (report, Some(e))
                    }
                    Err(e) => return Err(e.into()),
                };
                if !cli.json {
                    print_applied("required", &report);
                }
                required.push(report_json(&report));
                if *required_only {
                    if cli.json {
                        print_json(&serde_json::json!({ "required": required[0] }));
                    }
                    return Ok(0);
                }
                let (code, value) = deferred(&m, url, true, blocked.is_some(), cli)?;
                let progress = value["applied"].as_array().is_some_and(|a| !a.is_empty());
                deferred_runs.push(value);
                // Go on while the deferred track applied something, or while
                // the required track got further (another process may have
                // applied what it waited for).
                let at = blocked
                    .as_ref()
                    .and_then(|e| e.migration().map(|m| m.version.clone()));
                match blocked {
                    Some(e) if code != 0 || (!progress && last_blocked == at) => {
                        return Err(e.into())
                    }
                    Some(_) => {
                        tracing::info!(
                            "the deferred migrations the required track waited for are \
                             applied: going on with the required track"
                        );
                        last_blocked = at;
                    }
                    None => {
                        if cli.json {
                            let one = |v: Vec<serde_json::Value>| {
                                if v.len() == 1 {
                                    v.into_iter().next().unwrap_or_default()
                                } else {
                                    serde_json::Value::Array(v)
                                }
                            };
                            print_json(&serde_json::json!({
                                "required": one(required),
                                "deferred": one(deferred_runs),
                            }));
                        }
                        return Ok(code);
                    }
                }
            }
        }
        Command::Deferred { wait } => {
            let m = migrator(cli)?;
            let url = database_url(cli)?;
            // A clear error for an unreachable database before the pool.
            drop(connect(url)?);
            let (code, value) = deferred(&m, url, *wait, false, cli)?;
            if cli.json {
                print_json(&value);
            }
            Ok(code)
        }
        Command::Verify => {
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
        Command::New { name, deferred } => new_migration(cli, name, *deferred),
        Command::Lint {
            config,
            warn,
            deny_warnings,
        } => lint(cli, cli.json, config.clone(), warn.clone(), *deny_warnings),
        Command::Check => check(cli),
    }
}

/// `applied NAME (N ms)` per migration, or that there was nothing to do.
fn print_applied(track: &str, report: &diesel_rollout::Report) {
    if report.applied.is_empty() {
        print_out(&format!("{track}: nothing to apply\n"));
        return;
    }
    let mut s = String::new();
    for a in &report.applied {
        s.push_str(&format!(
            "applied {} ({} ms)\n",
            a.dir_name,
            a.duration.as_millis()
        ));
    }
    print_out(&s);
}

fn print_json(value: &serde_json::Value) {
    print_out(&format!("{value:#}\n"));
}

fn report_json(report: &diesel_rollout::Report) -> serde_json::Value {
    serde_json::json!({
        "applied": report.applied.iter().map(|a| serde_json::json!({
            "version": a.version,
            "name": a.dir_name,
            "track": a.track.as_str(),
            "duration_ms": a.duration.as_millis() as u64,
            "statements": a.statements,
        })).collect::<Vec<_>>(),
        "unknown": report.unknown,
        "changed": report.changed,
        "took_lock": report.took_lock,
        "lock_wait_ms": report.lock_wait.as_millis() as u64,
    })
}

/// ANSI colours for a stream, or none: only on a terminal, and never with
/// NO_COLOR set.
#[derive(Clone, Copy)]
struct Colors(bool);

impl Colors {
    fn for_stdout() -> Self {
        Colors(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
    }

    fn state(self, state: &str, text: &str) -> String {
        if !self.0 {
            return text.to_string();
        }
        let code = match state {
            "applied" => "32",
            "pending" => "33",
            "failed" => "31;1",
            "unknown" => "35",
            _ => return text.to_string(),
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

/// Runs the deferred track in the foreground on a pool of two connections
/// (one leads, one reads build progress), showing what it does.
/// With `required_blocked` (the required track stopped on a migration that
/// waits for a deferred one), required migrations found pending end the
/// deferred phase instead of failing it: the required track goes on next.
fn deferred(
    m: &Migrator,
    url: &str,
    wait: bool,
    required_blocked: bool,
    cli: &Cli,
) -> Result<(u8, serde_json::Value), Failure> {
    let quiet = cli.quiet || cli.json;
    let pool = Pool::builder()
        .max_size(2)
        .min_idle(Some(0))
        .connection_timeout(Duration::from_secs(10))
        .error_handler(Box::new(RedactingHandler(url.to_string())))
        .build(ConnectionManager::<PgConnection>::new(url))
        .map_err(|e| {
            failure(format!(
                "cannot create a connection pool: {}",
                redact_error(&e.to_string(), url)
            ))
        })?;
    let handle = m
        .clone()
        .deferred_retry(wait)
        .deferred_retry_interval(Duration::from_secs(1))
        .deferred_retry_max_interval(Duration::from_secs(5))
        .deferred_failure_retries(0)
        .deferred_progress_interval(Duration::from_secs(1))
        .pool_url(url)
        .start_deferred(pool);
    let mut progress = Progress::new(quiet);
    // Waiting for another leader is bounded by --lock-wait, and a database
    // that stays unreachable by a minute.
    let deadline = Instant::now() + cli.lock_wait.unwrap_or(Duration::from_secs(600));
    let mut unreachable_since = None::<Instant>;
    loop {
        let state = handle.wait_for_change(Duration::from_secs(1));
        progress.show(&state);
        if handle.is_finished() {
            break;
        }
        let give_up = match &state {
            DeferredState::NotLeader { holder, .. } if Instant::now() >= deadline => Some(format!(
                "gave up waiting for {} to finish the deferred track (--lock-wait)",
                holder
                    .as_ref()
                    .map_or_else(|| "another session".to_string(), |h| h.to_string())
            )),
            DeferredState::Reconnecting { error } => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                (since.elapsed() >= Duration::from_secs(60)).then(|| error.clone())
            }
            _ => {
                unreachable_since = None;
                None
            }
        };
        if let Some(message) = give_up {
            handle.stop();
            progress.finish();
            return Err(failure(message));
        }
        if let DeferredState::WaitingForRequired { pending } = state {
            handle.stop();
            progress.finish();
            if required_blocked {
                return Ok((
                    0,
                    serde_json::json!({ "state": "waiting_for_required", "applied": [] }),
                ));
            }
            // Required migrations this binary knows are missing although the
            // required track was just applied, or was never applied: waiting
            // would not fix either.
            return Err(failure(format!(
                "{pending} required migration(s) are not applied, and deferred migrations never \
                 run before them: run `rollout up --required-only` first (if it just succeeded, \
                 the server lost those commits: check `rollout status`)"
            )));
        }
    }
    progress.finish();
    let text = !cli.json;
    match handle.state() {
        DeferredState::Done { applied } => {
            let names: Vec<_> = applied
                .iter()
                .map(|v| m.migrations().get(v).map_or(v.as_str(), |x| x.dir_name()))
                .collect();
            if text && names.is_empty() {
                print_out("deferred: nothing to apply\n");
            } else if text {
                print_out(&format!("deferred: applied {}\n", names.join(", ")));
            }
            Ok((0, serde_json::json!({ "state": "done", "applied": names })))
        }
        DeferredState::NotLeader { holder, .. } => {
            let who = holder
                .as_ref()
                .map_or_else(|| "another session".to_string(), |h| h.to_string());
            if text {
                print_out(&format!(
                    "deferred: the deferred lock is held by {who}, which is applying the deferred \
                     track; run with --wait to wait for it\n"
                ));
            }
            Ok((
                3,
                serde_json::json!({
                    "state": "not_leader",
                    "holder": holder.map(|h| serde_json::json!({
                        "pid": h.pid,
                        "application_name": h.application_name,
                        "since": h.since,
                        "client": h.client,
                    })),
                }),
            ))
        }
        DeferredState::Failed { error, .. } => Err(failure(error)),
        DeferredState::WaitingForRequired { pending } => Err(failure(format!(
            "{pending} required migration(s) are not applied yet, and deferred migrations never \
             run before them: run `rollout up --required-only` first"
        ))),
        DeferredState::Reconnecting { error } => Err(failure(error)),
        DeferredState::Stopped => Err(failure("the deferred track stopped before finishing")),
        other => Err(failure(format!("the deferred track ended as {other:?}"))),
    }
}

/// Logs the pool's connection errors without the password (r2d2's own
/// handler would log libpq's text, which can quote the URL).
#[derive(Debug)]
struct RedactingHandler(String);

impl diesel::r2d2::HandleError<diesel::r2d2::Error> for RedactingHandler {
    fn handle_error(&self, error: diesel::r2d2::Error) {
        tracing::warn!("{}", redact_error(&error.to_string(), &self.0));
    }
}

/// What the foreground deferred track shows on stderr: a progress bar for
/// index builds on a terminal, a line per change otherwise.
struct Progress {
    quiet: bool,
    bar: Option<indicatif::ProgressBar>,
    last: String,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(100);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {msg}\n  [{bar:40}] {pos:>3}% ({elapsed})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            quiet,
            bar,
            last: String::new(),
        }
    }

    fn show(&mut self, state: &DeferredState) {
        if self.quiet {
            return;
        }
        let line = describe(state);
        if let Some(bar) = &self.bar {
            if !line.is_empty() {
                bar.set_message(line);
            }
            let percent = match state {
                DeferredState::Running {
                    progress: Some(p), ..
                } => p.percent().unwrap_or(0.0),
                DeferredState::Running {
                    statement,
                    statements,
                    ..
                } if *statements > 0 => 100.0 * (*statement as f64 - 1.0) / *statements as f64,
                _ => 0.0,
            };
            bar.set_position(percent.clamp(0.0, 100.0) as u64);
        } else if !line.is_empty() && line != self.last {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "deferred: {line}");
            self.last = line;
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// One line for a deferred state (empty for states not worth showing).
fn describe(state: &DeferredState) -> String {
    match state {
        DeferredState::WaitingForRequired { pending } => {
            format!("waiting: {pending} required migration(s) are not applied yet")
        }
        DeferredState::NotLeader {
            holder,
            retry_in: Some(_),
        } => format!(
            "{} is applying the deferred track; waiting for it",
            holder
                .as_ref()
                .map_or_else(|| "another session".to_string(), |h| h.to_string())
        ),
        DeferredState::Running {
            name,
            statement,
            statements,
            progress,
            ..
        } => {
            let mut s = format!("applying {name}");
            if *statements > 0 {
                s.push_str(&format!(" (statement {statement} of {statements})"));
            }
            if let Some(p) = progress {
                s.push_str(&format!(": building {p}"));
            }
            s
        }
        DeferredState::Reconnecting { error } => format!("looking again later: {error}"),
        DeferredState::Retrying {
            version,
            error,
            retry_in,
            ..
        } => format!(
            "{version} failed, retrying in {}s: {error}",
            retry_in.as_secs()
        ),
        _ => String::new(),
    }
}

fn print_out(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}

fn verify_text(m: &Migrator, v: &diesel_rollout::Verification) -> String {
    let name = |version: &str| {
        m.migrations()
            .get(version)
            .map_or_else(|| version.to_string(), |m| m.dir_name().to_string())
    };
    let mut s = String::new();
    if v.is_complete() {
        s.push_str("complete: every required migration is applied\n");
    }
    for (version, gap) in &v.missing {
        s.push_str(&format!(
            "missing: {}{}\n",
            name(version),
            if *gap {
                " (a gap: older than the newest applied migration)"
            } else {
                ""
            }
        ));
    }
    for (version, error) in &v.failed {
        s.push_str(&format!("failed: {}: {error}\n", name(version)));
    }
    for version in &v.unknown {
        s.push_str(&format!(
            "unknown: {version} is applied but not known to this binary (not an error)\n"
        ));
    }
    s
}

fn status_json(rows: &[MigrationStatus]) -> String {
    let items: Vec<_> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "version": r.version,
                "track": r.track.map(|t| t.as_str()),
                "name": r.name,
                "state": r.state.as_str(),
                "applied_at": r.applied_at,
                "error": r.error,
                "statements_completed": r.statements_completed,
                "changed": r.changed,
                "indexes": r.indexes.iter().map(|i| serde_json::json!({
                    "name": i.name,
                    "table": i.table,
                    "state": i.state.as_str(),
                    "phase": i.progress.as_ref().map(|p| p.phase.clone()),
                    "percent": i.progress.as_ref().and_then(|p| p.percent()),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    format!("{:#}\n", serde_json::Value::Array(items))
}

fn status_table(rows: &[MigrationStatus], colors: Colors) -> String {
    let header = ["VERSION", "TRACK", "NAME", "STATE", "APPLIED AT", "INDEXES"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let mut state = r.state.as_str().to_string();
            if r.changed {
                state.push_str(" (edited)");
            }
            if let Some(n) = r.statements_completed {
                state.push_str(&format!(" ({n} statements done)"));
            }
            [
                r.version.clone(),
                r.track.map_or("-", |t| t.as_str()).to_string(),
                if r.name.is_empty() {
                    "-".into()
                } else {
                    r.name.clone()
                },
                state,
                r.applied_at.clone().unwrap_or_else(|| "-".into()),
                r.indexes
                    .iter()
                    .map(|i| match i.progress.as_ref().and_then(|p| p.percent()) {
                        Some(p) => format!("{} {} {p:.0}%", i.name, i.state.as_str()),
                        None => format!("{} {}", i.name, i.state.as_str()),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    // Pad first, colour after, so escape codes never break the alignment.
    let line = |cols: [&str; 6], state: Option<&str>| {
        let mut s = String::new();
        for (i, c) in cols.iter().enumerate() {
            let cell = if i + 1 == cols.len() {
                c.to_string()
            } else {
                format!("{c:<w$}  ", w = width[i])
            };
            match state {
                Some(st) if i == 3 => s.push_str(&colors.state(st, &cell)),
                _ => s.push_str(&cell),
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header, None);
    for (row, r) in cells.iter().zip(rows) {
        out.push_str(&line(
            [&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]],
            Some(r.state.as_str()),
        ));
    }
    for r in rows.iter().filter(|r| r.error.is_some()) {
        out.push_str(&format!(
            "\n{} failed: {}\n",
            r.version,
            r.error.as_deref().unwrap_or_default()
        ));
    }
    out
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
    let req = cli
        .migrations_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("migrations"));
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

/// Drops the scratch database of `rollout check`, whatever happened.
struct ScratchDb {
    admin_url: String,
    name: String,
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        if let Ok(mut conn) = connect(&self.admin_url) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn);
        }
    }
}

/// The directories to lint: the ones given, else `./migrations` when it
/// exists, else the directories the embedded example set was built from.
#[cfg(feature = "lint")]
fn lint_dirs(cli: &Cli) -> (PathBuf, PathBuf) {
    let required = cli.migrations_dir.clone().unwrap_or_else(|| {
        let here = PathBuf::from("migrations");
        if here.is_dir() {
            here
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("migrations")
        }
    });
    let deferred = cli
        .deferred_dir
        .clone()
        .unwrap_or_else(|| sibling_deferred(&required));
    (required, deferred)
}

#[cfg(feature = "lint")]
fn lint(
    cli: &Cli,
    json: bool,
    config: Option<PathBuf>,
    warn: Vec<String>,
    deny_warnings: bool,
) -> Result<u8, Failure> {
    let (required, deferred) = lint_dirs(cli);
    if !required.is_dir() {
        return Err(usage(format!(
            "{} is not a directory: pass --migrations-dir DIR",
            required.display()
        )));
    }
    let options = diesel_rollout::LintOptions {
        config,
        warn,
        deny_warnings,
    };
    let findings = diesel_rollout::lint_dirs(&required, &deferred, &options)
        .map_err(|e| failure(e.to_string()))?;
    let errors = findings
        .iter()
        .filter(|f| f.severity == diesel_rollout::Severity::Error)
        .count();
    if json {
        let items: Vec<_> = findings
            .iter()
            .map(|f| {
                serde_json::json!({
                    "path": f.path.display().to_string(),
                    "line": f.line,
                    "rule": f.rule,
                    "severity": f.severity.as_str(),
                    "problem": f.problem,
                    "safe_alternative": f.safe_alternative,
                })
            })
            .collect();
        print_out(&format!("{:#}\n", serde_json::Value::Array(items)));
    } else {
        let mut out = String::new();
        for f in &findings {
            out.push_str(&format!("{f}\n\n"));
        }
        out.push_str(&format!(
            "{} finding(s), {errors} error(s) in {} and {}\n",
            findings.len(),
            required.display(),
            deferred.display()
        ));
        print_out(&out);
    }
    Ok(if errors > 0 { 1 } else { 0 })
}

#[cfg(not(feature = "lint"))]
fn lint(_: &Cli, _: bool, _: Option<PathBuf>, _: Vec<String>, _: bool) -> Result<u8, Failure> {
    Err(failure(
        "this rollout was built without the `lint` feature (it needs libclang to build): \
         rebuild with default features",
    ))
}

/// `rollout check` lints first the set it applies: the directories given,
/// or those the embedded set was built from, when they are on disk.
fn lint_before_check(cli: &Cli) -> Result<(), Failure> {
    #[cfg(feature = "lint")]
    {
        let required = cli
            .migrations_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("migrations"));
        let deferred = cli
            .deferred_dir
            .clone()
            .unwrap_or_else(|| sibling_deferred(&required));
        if !required.is_dir() {
            tracing::warn!(dir = %required.display(), "lint skipped: the migrations directory is not on this machine");
            return Ok(());
        }
        let findings = diesel_rollout::lint_dirs(
            &required,
            &deferred,
            &diesel_rollout::LintOptions::default(),
        )
        .map_err(|e| failure(e.to_string()))?;
        let errors: Vec<_> = findings
            .iter()
            .filter(|f| f.severity == diesel_rollout::Severity::Error)
            .collect();
        for f in &findings {
            tracing::warn!("{f}");
        }
        if !errors.is_empty() {
            return Err(failure(format!(
                "the lint found {} error(s) (shown above; `rollout lint` lists them): fix them \
                 before applying",
                errors.len()
            )));
        }
        tracing::info!(findings = findings.len(), "lint passed");
    }
    #[cfg(not(feature = "lint"))]
    let _ = cli;
    Ok(())
}

fn check(cli: &Cli) -> Result<u8, Failure> {
    lint_before_check(cli)?;
    let migrator = migrator(cli)?;
    let started = Instant::now();
    let cluster;
    let admin_url = match &cli.database_url {
        Some(url) => url.clone(),
        None => {
            tracing::info!("no database given: starting a throwaway PostgreSQL server");
            cluster = ThrowawayCluster::start().map_err(|e| failure(e.to_string()))?;
            cluster.admin_url()
        }
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!("rollout_check_{}_{nanos}", std::process::id());
    let url = with_database(&admin_url, &name).ok_or_else(|| {
        usage(format!(
            "`rollout check` needs a postgres:// URL to create its scratch database on, not {}",
            redact_url(&admin_url)
        ))
    })?;
    {
        let mut admin = connect(&admin_url)?;
        diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .map_err(|e| {
                failure(format!(
                    "cannot create the scratch database {name} on {}: {e}. `rollout check` \
                     needs a role allowed to CREATE DATABASE",
                    redact_url(&admin_url)
                ))
            })?;
    }
    let _scratch = ScratchDb {
        admin_url: admin_url.clone(),
        name: name.clone(),
    };
    tracing::info!(database = %name, "applying every migration from scratch");
    let mut conn = connect(&url)?;
    let (mut required, mut deferred) = (Report::default(), Report::default());
    let mut last_blocked = None;
    loop {
        let blocked = match migrator.run_required_on(&mut conn) {
            Ok(r) => {
                required.applied.extend(r.applied);
                None
            }
            Err(e) if e.kind() == ErrorKind::DeferredDependency => {
                if let Some(r) = e.report() {
                    required.applied.extend(r.applied.iter().cloned());
                }
                Some(e)
            }
            Err(e) => return Err(e.into()),
        };
        let d = migrator.run_deferred_on(&mut conn)?;
        let progress = !d.applied.is_empty();
        deferred.applied.extend(d.applied);
        let at = blocked
            .as_ref()
            .and_then(|e| e.migration().map(|m| m.version.clone()));
        match blocked {
            Some(e) if !progress && last_blocked == at => return Err(e.into()),
            Some(_) => last_blocked = at,
            None => break,
        }
    }
    let verification = migrator.verify(&mut conn)?;
    let rows = migrator.status(&mut conn)?;
    let pending_deferred = rows
        .iter()
        .filter(|r| r.track == Some(Track::Deferred) && r.state.as_str() != "applied")
        .count();
    let complete = verification.is_complete() && pending_deferred == 0;
    if cli.json {
        let mut status: serde_json::Value =
            serde_json::from_str(&status_json(&rows)).unwrap_or_default();
        print_json(&serde_json::json!({
            "complete": complete,
            "required": report_json(&required),
            "deferred": report_json(&deferred),
            "elapsed_ms": started.elapsed().as_millis() as u64,
            "status": status.take(),
        }));
        return Ok(if complete { 0 } else { 1 });
    }
    let mut out = status_table(&rows, Colors::for_stdout());
    out.push_str(&format!(
        "\napplied {} required and {} deferred migrations in {} ms; verify: {}\n",
        required.applied.len(),
        deferred.applied.len(),
        started.elapsed().as_millis(),
        if complete { "complete" } else { "INCOMPLETE" }
    ));
    print_out(&out);
    if complete {
        Ok(0)
    } else {
        print_out(&verify_text(&migrator, &verification));
        Ok(1)
    }
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
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn increments_any_length() {
        assert_eq!(increment("20240131120000"), "20240131120001");
        assert_eq!(increment("199"), "200");
        assert_eq!(increment("99"), "100");
    }
}
