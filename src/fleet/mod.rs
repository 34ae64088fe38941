//! Fleet mode: one migration set applied to many databases or schemas
//! (a database or a schema per tenant, shards), each exactly as one
//! database is: its own advisory lock, fast path, ledger and deferred track
//! (run in the foreground). The fleet keeps no state of its own: each
//! target's ledger is the truth, so a run killed halfway and started again
//! finishes the rest and re-applies nothing.

mod targets;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use diesel::PgConnection;

use crate::error::{Error, ErrorKind};
use crate::migrator::Migrator;
use crate::report::{Report, State};

pub use self::targets::Target;

/// What a fleet run does on each target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operation {
    /// Apply the required track, then the deferred track in the
    /// foreground (as `rollout up`).
    Up,
    /// Read each target's status (as `rollout status`).
    Status,
    /// Check every required migration is applied (as `rollout verify`).
    Verify,
    /// What `up` would do, changing nothing (as `rollout plan`).
    Plan,
}

impl Operation {
    /// `up`, `status`, `verify` or `plan`.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Up => "up",
            Operation::Status => "status",
            Operation::Verify => "verify",
            Operation::Plan => "plan",
        }
    }
}

/// How one target ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// `up` applied at least one migration.
    Applied,
    /// Nothing to do: everything this binary knows is applied.
    UpToDate,
    /// `status` or `plan`: something is pending (not a failure).
    Pending,
    /// The target failed (see the error): `up` stopped on it, it could not
    /// be reached, `verify` found it incomplete, or `plan` found that `up`
    /// would refuse.
    Failed,
    /// Not started: a canary or (without keep-going) an earlier target
    /// failed.
    Skipped,
}

impl Outcome {
    /// `applied`, `up_to_date`, `pending`, `failed` or `skipped`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::UpToDate => "up_to_date",
            Outcome::Pending => "pending",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
        }
    }

    /// Whether the target counts as a success (everything but failed and
    /// skipped).
    pub fn is_success(self) -> bool {
        !matches!(self, Outcome::Failed | Outcome::Skipped)
    }
}

/// What happened on one target.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TargetReport {
    /// The target's place in the list (from 0).
    pub index: usize,
    /// The target, its password redacted.
    pub target: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Versions applied by this run, in order (`up`).
    pub applied: Vec<String>,
    /// Versions not applied yet (`status`, `plan`, `verify`; `up` when it
    /// stopped).
    pub pending: Vec<String>,
    /// The whole time spent on the target.
    pub duration: Duration,
    /// Of which opening the connection.
    pub connect: Duration,
    /// Of which waiting for the target's advisory locks.
    pub lock_wait: Duration,
    /// Why it failed or was skipped, never with a password.
    pub error: Option<String>,
}

impl TargetReport {
    fn new(index: usize, target: &Target) -> Self {
        TargetReport {
            index,
            target: target.label(),
            outcome: Outcome::Skipped,
            applied: Vec::new(),
            pending: Vec::new(),
            duration: Duration::ZERO,
            connect: Duration::ZERO,
            lock_wait: Duration::ZERO,
            error: None,
        }
    }
}

/// What a fleet run did, target by target, in the targets' order.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FleetReport {
    /// The operation run.
    pub operation: Operation,
    /// One report per target, in the targets' order.
    pub targets: Vec<TargetReport>,
    /// The whole run.
    pub duration: Duration,
}

impl FleetReport {
    /// Whether every target succeeded.
    pub fn succeeded(&self) -> bool {
        self.targets.iter().all(|t| t.outcome.is_success())
    }

    /// How many targets ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.targets.iter().filter(|t| t.outcome == outcome).count()
    }
}

/// Runs one [`Migrator`]'s migrations on many targets, a few at a time.
///
/// ```no_run
/// use diesel_rollout::{Fleet, MigrationSet, Migrator, Operation, Target};
///
/// let targets = Target::parse_list("postgres://app@db/tenant_1\npostgres://app@db/tenant_2\n")?;
/// let report = Fleet::new(Migrator::new(MigrationSet::example()), targets)
///     .parallel(4)
///     .canary(1)
///     .run(Operation::Up, &|t| eprintln!("{}: {}", t.target, t.outcome.as_str()));
/// assert!(report.succeeded());
/// # Ok::<(), diesel_rollout::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Fleet {
    migrator: Migrator,
    targets: Vec<Target>,
    parallel: usize,
    canary: usize,
    keep_going: bool,
}

impl Fleet {
    /// A fleet of `targets` for `migrator`'s migrations (its options apply
    /// to every target; a schema target adds [`Migrator::schema`]).
    pub fn new(migrator: Migrator, targets: Vec<Target>) -> Self {
        Fleet {
            migrator,
            targets,
            parallel: 4,
            canary: 0,
            keep_going: false,
        }
    }

    /// How many targets run at once. Default 4.
    pub fn parallel(mut self, n: usize) -> Self {
        self.parallel = n.max(1);
        self
    }

    /// Runs the first `k` targets before any other, and stops (the rest
    /// skipped) if one of them fails, even with keep-going. Default 0.
    pub fn canary(mut self, k: usize) -> Self {
        self.canary = k;
        self
    }

    /// Goes on with the other targets after one fails, instead of starting
    /// no new one (those running finish). Default false.
    pub fn keep_going(mut self, keep_going: bool) -> Self {
        self.keep_going = keep_going;
        self
    }

    /// The targets.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Runs `operation` on every target, calling `on_target` as each ends
    /// (from the worker that ran it), and returns every target's report.
    /// A target that fails is a failed report, never a panic or an early
    /// return: [`FleetReport::succeeded`] tells whether all went well.
    pub fn run(
        &self,
        operation: Operation,
        on_target: &(dyn Fn(&TargetReport) + Sync),
    ) -> FleetReport {
        let start = Instant::now();
        let reports: Vec<Mutex<Option<TargetReport>>> =
            self.targets.iter().map(|_| Mutex::new(None)).collect();
        let canary = self.canary.min(self.targets.len());
        let stop = AtomicBool::new(false);
        if canary > 0 {
            tracing::info!(canary, "running the canary targets first");
            self.run_range(operation, 0..canary, &reports, &stop, true, on_target);
        }
        if !stop.load(Ordering::SeqCst) {
            let stop_on_failure = !self.keep_going;
            let rest = canary..self.targets.len();
            self.run_range(operation, rest, &reports, &stop, stop_on_failure, on_target);
        } else {
            tracing::error!("a canary target failed: no other target is started");
        }
        let targets = reports
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .unwrap_or_else(|| {
                        let mut skipped = TargetReport::new(i, &self.targets[i]);
                        skipped.error = Some(
                            "not started: an earlier target failed (run again once it is \
                             fixed; targets already done are skipped by their ledgers)"
                                .into(),
                        );
                        on_target(&skipped);
                        skipped
                    })
            })
            .collect();
        FleetReport {
            operation,
            targets,
            duration: start.elapsed(),
        }
    }

    /// Runs the targets in `range`, `parallel` at a time; when
    /// `stop_on_failure`, a failure starts no new target.
    fn run_range(
        &self,
        operation: Operation,
        range: std::ops::Range<usize>,
        reports: &[Mutex<Option<TargetReport>>],
        stop: &AtomicBool,
        stop_on_failure: bool,
        on_target: &(dyn Fn(&TargetReport) + Sync),
    ) {
        let next = AtomicUsize::new(range.start);
        let workers = self.parallel.min(range.len()).max(1);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= range.end {
                        return;
                    }
                    let report = self.run_one(operation, i);
                    if !report.outcome.is_success() && stop_on_failure {
                        stop.store(true, Ordering::SeqCst);
                    }
                    on_target(&report);
                    *reports[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
                });
            }
        });
    }

    fn run_one(&self, operation: Operation, index: usize) -> TargetReport {
        let target = &self.targets[index];
        let mut report = TargetReport::new(index, target);
        let span = tracing::info_span!("target", target = %report.target);
        let _entered = span.enter();
        let start = Instant::now();
        let m = target.migrator(&self.migrator);
        let mut connected = false;
        let result = m.connect_named(target.url()).and_then(|mut conn| {
            connected = true;
            report.connect = start.elapsed();
            match operation {
                Operation::Up => up(&m, target, &mut conn, &mut report),
                Operation::Status => status(&m, &mut conn, &mut report),
                Operation::Verify => verify(&m, &mut conn, &mut report),
                Operation::Plan => plan(&m, &mut conn, &mut report),
            }
        });
        report.duration = start.elapsed();
        match result {
            Ok(outcome) => report.outcome = outcome,
            Err(e) => {
                tracing::error!(error = %e, "target failed");
                report.outcome = Outcome::Failed;
                let mut error = e.to_string();
                if !connected {
                    error.push_str(
                        ". The URL is this target's line of the targets list (or row of the \
                         targets query)",
                    );
                }
                report.error = Some(error);
            }
        }
        report
    }
}

impl Target {
    /// The migrator for this target: `base`, in the target's schema.
    fn migrator(&self, base: &Migrator) -> Migrator {
        match self.schema_name() {
            Some(s) => base.clone().schema(s),
            None => base.clone(),
        }
    }
}

/// Both tracks in the foreground, in the order [`run_foreground`] gives
/// (as `rollout up`): the required track on the target's connection, the
/// deferred one on a connection of its own.
///
/// [`run_foreground`]: crate::run_foreground
fn up(
    m: &Migrator,
    target: &Target,
    conn: &mut PgConnection,
    report: &mut TargetReport,
) -> Result<Outcome, Error> {
    struct OnTarget<'a, P> {
        m: &'a Migrator,
        url: &'a str,
        conn: &'a mut PgConnection,
        probe: P,
        report: &'a mut TargetReport,
    }
    impl<P: FnMut() -> Option<i32>> OnTarget<'_, P> {
        fn add(&mut self, r: Option<&Report>) {
            if let Some(r) = r {
                let applied = r.applied.iter().map(|a| a.version.clone());
                self.report.applied.extend(applied);
                self.report.lock_wait += r.lock_wait;
            }
        }
    }
    impl<P: FnMut() -> Option<i32>> crate::Foreground for OnTarget<'_, P> {
        type Error = Error;
        fn required(&mut self) -> Result<Report, Error> {
            let r = self.m.run_required_probed(self.conn, &mut self.probe);
            self.add(r.as_ref().ok().or_else(|| r.as_ref().err()?.report()));
            r
        }
        fn deferred(&mut self, _required_blocked: bool) -> Result<usize, Error> {
            // On a connection of its own, as `rollout up` and a service run
            // it: session state a required migration left behind (a role,
            // `session_replication_role = replica`) stays with that one.
            let mut conn = self.m.connect_named(self.url)?;
            let r = self.m.run_deferred_probed(&mut conn, &mut self.probe);
            self.add(r.as_ref().ok().or_else(|| r.as_ref().err()?.report()));
            r.map(|d| d.applied.len())
        }
    }
    let mut on = OnTarget {
        m,
        url: target.url(),
        conn,
        probe: crate::migrator::pooler_probe(target.url()),
        report,
    };
    if let Err(e) = crate::run_foreground(&mut on) {
        if e.kind() != ErrorKind::DeferredDependency {
            on.report.pending = pending_after(m, on.conn);
        }
        return Err(e);
    }
    Ok(if report.applied.is_empty() {
        Outcome::UpToDate
    } else {
        Outcome::Applied
    })
}

/// What is still pending on a target `up` stopped on (best effort: the
/// connection may be gone).
fn pending_after(m: &Migrator, conn: &mut PgConnection) -> Vec<String> {
    m.status(conn)
        .map(|rows| {
            rows.into_iter()
                .filter(|r| matches!(r.state, State::Pending | State::Failed))
                .map(|r| r.version)
                .collect()
        })
        .unwrap_or_default()
}

fn status(
    m: &Migrator,
    conn: &mut PgConnection,
    report: &mut TargetReport,
) -> Result<Outcome, Error> {
    let rows = m.status(conn)?;
    report.pending = rows
        .iter()
        .filter(|r| matches!(r.state, State::Pending | State::Failed))
        .map(|r| r.version.clone())
        .collect();
    let failed: Vec<_> = rows.iter().filter(|r| r.state == State::Failed).collect();
    if let Some(f) = failed.first() {
        report.error = Some(format!(
            "{} migration(s) failed (first: {}): {}",
            failed.len(),
            f.version,
            f.error
                .as_deref()
                .unwrap_or("see `rollout status` on this target")
        ));
    }
    Ok(if report.pending.is_empty() {
        Outcome::UpToDate
    } else {
        Outcome::Pending
    })
}

fn verify(
    m: &Migrator,
    conn: &mut PgConnection,
    report: &mut TargetReport,
) -> Result<Outcome, Error> {
    let v = m.verify(conn)?;
    report.pending = v
        .missing
        .iter()
        .map(|(version, _)| version.clone())
        .collect();
    report
        .pending
        .extend(v.failed.iter().map(|(version, _)| version.clone()));
    if v.is_complete() {
        return Ok(Outcome::UpToDate);
    }
    let mut why = Vec::new();
    if !v.missing.is_empty() {
        why.push(format!(
            "{} required migration(s) not applied",
            v.missing.len()
        ));
    }
    if let Some((version, error)) = v.failed.first() {
        why.push(format!("{version} failed: {error}"));
    }
    Err(Error::new(
        ErrorKind::Incomplete,
        format!(
            "incomplete: {}. Run `rollout fleet up` again",
            why.join("; ")
        ),
    ))
}

fn plan(
    m: &Migrator,
    conn: &mut PgConnection,
    report: &mut TargetReport,
) -> Result<Outcome, Error> {
    let p = m.plan(conn)?;
    report.pending = p.steps.iter().map(|s| s.version.clone()).collect();
    if p.has_problems() {
        return Err(Error::new(
            ErrorKind::Incomplete,
            format!("`up` would not finish here: {}", p.problems.join("; ")),
        ));
    }
    Ok(if p.is_empty() {
        Outcome::UpToDate
    } else {
        Outcome::Pending
    })
}
