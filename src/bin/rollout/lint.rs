//! `rollout lint`: diesel-guard and the track rules on both tracks.

use std::path::PathBuf;

#[cfg(feature = "lint")]
use crate::{failure, render::print_out, sibling_deferred, usage};
use crate::{Cli, Failure};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// diesel-guard.toml to use (default: beside the migrations directory, else ./diesel-guard.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Report this rule or check as a warning, not an error (repeatable).
    #[arg(long, value_name = "RULE")]
    warn: Vec<String>,
    /// Treat warnings as errors.
    #[arg(long)]
    deny_warnings: bool,
}

pub(crate) fn run(cli: &Cli, args: &Args) -> Result<u8, Failure> {
    lint(
        cli,
        cli.json,
        args.config.clone(),
        args.warn.clone(),
        args.deny_warnings,
    )
}

/// The directories to lint: the ones given or found (as every command
/// finds them), else the directories the embedded example set was built
/// from.
#[cfg(feature = "lint")]
pub(crate) fn lint_dirs(cli: &Cli) -> Result<(PathBuf, PathBuf), Failure> {
    Ok(crate::migration_dirs(cli)?.unwrap_or_else(|| {
        let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let deferred = sibling_deferred(&example);
        (example, deferred)
    }))
}

#[cfg(feature = "lint")]
pub(crate) fn lint(
    cli: &Cli,
    json: bool,
    config: Option<PathBuf>,
    warn: Vec<String>,
    deny_warnings: bool,
) -> Result<u8, Failure> {
    let (required, deferred) = lint_dirs(cli)?;
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
    Err(crate::failure(
        "this rollout was built without the `lint` feature (it needs libclang to build): \
         rebuild with default features",
    ))
}
