//! What the commands print: tables, JSON, the progress of the deferred
//! track, colour on terminals.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use diesel_rollout::{redact_error, DeferredState, MigrationStatus, Migrator};

/// `applied NAME (N ms)` per migration, or that there was nothing to do.
pub(crate) fn print_applied(track: &str, report: &diesel_rollout::Report) {
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

/// `reverted NAME (N ms)` per migration.
pub(crate) fn print_reverted(report: &diesel_rollout::Report) {
    let mut s = String::new();
    for a in &report.reverted {
        s.push_str(&format!(
            "reverted {} ({} ms)\n",
            a.dir_name,
            a.duration.as_millis()
        ));
    }
    print_out(&s);
}

/// The plan as text: a block per pending migration.
pub(crate) fn plan_text(plan: &diesel_rollout::Plan) -> String {
    let mut out = if plan.is_empty() && plan.has_problems() {
        "nothing pending, but the database is not where `rollout up` leaves it:\n".to_string()
    } else if plan.is_empty() {
        "nothing pending: `rollout up` would do nothing\n".to_string()
    } else {
        format!(
            "{} pending migration(s), in the order `rollout up` would run them:\n",
            plan.steps.len()
        )
    };
    out.push_str(&steps_text(plan));
    out
}

/// A revert's or a redo's plan (`--dry-run`): printed, or as JSON; exits 1
/// when something would stop it now.
pub(crate) fn print_dry_run(command: &str, plan: &diesel_rollout::Plan, json: bool) -> u8 {
    if json {
        let mut v = plan_json(plan);
        v["dry_run"] = serde_json::json!(command);
        print_json(&v);
    } else {
        let reverts = plan
            .steps
            .iter()
            .filter(|s| !matches!(s.action, diesel_rollout::PlanAction::Apply))
            .count();
        let mut out = format!(
            "dry run, nothing changed: `rollout {command}` would revert {reverts} migration(s), \
             newest first{}:\n",
            if command == "redo" {
                ", then apply them again in version order"
            } else {
                ""
            }
        );
        out.push_str(&steps_text(plan));
        print_out(&out);
    }
    u8::from(plan.has_problems())
}

/// A plan's problems and steps, each step with its statements.
fn steps_text(plan: &diesel_rollout::Plan) -> String {
    use diesel_rollout::PlanAction;
    let mut out = String::new();
    for p in &plan.problems {
        out.push_str(&format!("\nproblem: {p}\n"));
    }
    for step in &plan.steps {
        let mode = if step.transaction {
            "in a transaction"
        } else {
            "statement by statement, no transaction"
        };
        out.push_str(&format!("\n{} ({}, {mode})", step.dir_name, step.track));
        match &step.action {
            PlanAction::Apply => {}
            PlanAction::Retry { error } => {
                out.push_str(&format!("\n  retried: the last attempt failed: {error}"))
            }
            PlanAction::Resume { done } => out.push_str(&format!(
                "\n  resumed at statement {}: {done} done by an earlier attempt",
                done + 1
            )),
            PlanAction::Refused { reason } => out.push_str(&format!("\n  refused: {reason}")),
            PlanAction::Revert => {
                out.push_str("\n  reverted: its down.sql runs and its version row goes")
            }
            _ => {}
        }
        if !step.waits_for.is_empty() {
            out.push_str(&format!(
                "\n  waits for deferred {} (requires_deferred)",
                step.waits_for.join(", ")
            ));
        }
        if step.out_of_order {
            out.push_str("\n  out of order: older than a migration already applied");
        }
        out.push('\n');
        for s in &step.statements {
            let locks = s
                .locks
                .iter()
                .map(|l| format!("{} on {}", l.mode, l.table))
                .collect::<Vec<_>>()
                .join("; ");
            out.push_str(&format!(
                "  {}line {:>4}  {:<60}  {locks}\n",
                if s.done { "(done) " } else { "" },
                s.line,
                truncate(&s.first_line, 60)
            ));
        }
    }
    out
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut t: String = text.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// The plan as JSON.
pub(crate) fn plan_json(plan: &diesel_rollout::Plan) -> serde_json::Value {
    use diesel_rollout::PlanAction;
    serde_json::json!({
        "pending": plan.steps.len(),
        "problems": plan.problems,
        "steps": plan.steps.iter().map(|step| {
            let (action, detail) = match &step.action {
                PlanAction::Apply => ("apply", serde_json::Value::Null),
                PlanAction::Retry { error } => ("retry", serde_json::json!(error)),
                PlanAction::Resume { done } => ("resume", serde_json::json!(done)),
                PlanAction::Refused { reason } => ("refused", serde_json::json!(reason)),
                PlanAction::Revert => ("revert", serde_json::Value::Null),
                _ => ("apply", serde_json::Value::Null),
            };
            serde_json::json!({
                "version": step.version,
                "name": step.dir_name,
                "track": step.track.as_str(),
                "transaction": step.transaction,
                "action": action,
                "detail": detail,
                "waits_for": step.waits_for,
                "out_of_order": step.out_of_order,
                "statements": step.statements.iter().map(|s| serde_json::json!({
                    "line": s.line,
                    "first_line": s.first_line,
                    "done": s.done,
                    "locks": s.locks.iter().map(|l| serde_json::json!({
                        "mode": l.mode,
                        "table": l.table,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
    })
}

/// What a track's run applied, whether it succeeded or not.
pub(crate) fn report_of(
    result: &Result<diesel_rollout::Report, diesel_rollout::Error>,
) -> Option<&diesel_rollout::Report> {
    match result {
        Ok(r) => Some(r),
        Err(e) => e.report(),
    }
}

pub(crate) fn print_json(value: &serde_json::Value) {
    print_out(&format!("{value:#}\n"));
}

pub(crate) fn report_json(report: &diesel_rollout::Report) -> serde_json::Value {
    serde_json::json!({
        "applied": report.applied.iter().map(|a| serde_json::json!({
            "version": a.version,
            "name": a.dir_name,
            "track": a.track.as_str(),
            "duration_ms": a.duration.as_millis() as u64,
            "statements": a.statements,
        })).collect::<Vec<_>>(),
        "reverted": report.reverted.iter().map(|a| serde_json::json!({
            "version": a.version,
            "name": a.dir_name,
            "track": a.track.as_str(),
            "duration_ms": a.duration.as_millis() as u64,
            "statements": a.statements,
        })).collect::<Vec<_>>(),
        "unknown": report.unknown,
        "changed": report.changed,
        "out_of_order": report.out_of_order,
        "took_lock": report.took_lock,
        "lock_wait_ms": report.lock_wait.as_millis() as u64,
    })
}

/// ANSI colours for a stream, or none: only on a terminal, and never with
/// NO_COLOR set.
#[derive(Clone, Copy)]
pub(crate) struct Colors(bool);

impl Colors {
    pub(crate) fn for_stdout() -> Self {
        Colors(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
    }

    pub(crate) fn state(self, state: &str, text: &str) -> String {
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

/// Logs the pool's connection errors without the password (r2d2's own
/// handler would log libpq's text, which can quote the URL).
#[derive(Debug)]
pub(crate) struct RedactingHandler(pub String);

impl diesel::r2d2::HandleError<diesel::r2d2::Error> for RedactingHandler {
    fn handle_error(&self, error: diesel::r2d2::Error) {
        tracing::warn!("{}", redact_error(&error.to_string(), &self.0));
    }
}

/// What the foreground deferred track shows on stderr: a progress bar for
/// index builds on a terminal, a line per change otherwise.
pub(crate) struct Progress {
    quiet: bool,
    bar: Option<indicatif::ProgressBar>,
    last: String,
}

impl Progress {
    pub(crate) fn new(quiet: bool) -> Self {
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

    pub(crate) fn show(&mut self, state: &DeferredState) {
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

    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// One line for a deferred state (empty for states not worth showing).
pub(crate) fn describe(state: &DeferredState) -> String {
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

pub(crate) fn print_out(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}

pub(crate) fn verify_text(m: &Migrator, v: &diesel_rollout::Verification) -> String {
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

pub(crate) fn status_json(rows: &[MigrationStatus]) -> String {
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

pub(crate) fn status_table(rows: &[MigrationStatus], colors: Colors) -> String {
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
