//! The [`Migrator`] and its options, and the required track's policy: the
//! fast path, the lock, ordering, and retries on `lock_timeout`.

use std::time::Duration;

use diesel::prelude::*;

use crate::error::{is_connection_error, Error, ErrorKind};
use crate::ledger::{self, Ledger, Tables};
use crate::lock::{self, LockGuard};
use crate::migration::MigrationSet;
use crate::options::DeferredOptions;
use crate::report::Report;
use crate::session::{self, set_application_name};
use crate::source::Track;

/// Applies a [`MigrationSet`] safely with many replicas: the required track
/// at start-up under a session advisory lock, one migration at a time.
///
/// Options are set by value; every default is given on its setter.
///
/// ```no_run
/// use diesel_rollout::{MigrationSet, Migrator};
///
/// let migrator = Migrator::new(MigrationSet::example());
/// let report = migrator.run_required(&std::env::var("DATABASE_URL")?)?;
/// for m in &report.applied {
///     println!("applied {} in {:?}", m.dir_name, m.duration);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Migrator {
    set: MigrationSet,
    migrations_table: String,
    attempts_table: Option<String>,
    lock_deadline: Duration,
    lock_poll: Duration,
    lock_report_every: Duration,
    lock_timeout: Duration,
    statement_timeout: Duration,
    pub(crate) lock_retry_deadline: Duration,
    deferred_lock_timeout: Duration,
    deferred_statement_timeout: Duration,
    pub(crate) deferred: DeferredOptions,
    strict: bool,
    pub(crate) revert_empty_down: bool,
    application_name: String,
    pool_url: crate::url::PoolRedactor,
    baseline: Option<String>,
    schema: Option<String>,
}

impl Migrator {
    /// A migrator for `set` with the default options.
    pub fn new(set: MigrationSet) -> Self {
        Migrator {
            set,
            migrations_table: "__diesel_schema_migrations".into(),
            attempts_table: None,
            lock_deadline: Duration::from_secs(600),
            lock_poll: Duration::from_millis(200),
            lock_report_every: Duration::from_secs(10),
            lock_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(300),
            lock_retry_deadline: Duration::from_secs(60),
            deferred_lock_timeout: Duration::ZERO,
            deferred_statement_timeout: Duration::ZERO,
            deferred: DeferredOptions::default(),
            strict: false,
            revert_empty_down: false,
            application_name: "diesel-rollout".into(),
            pool_url: crate::url::PoolRedactor::default(),
            baseline: None,
            schema: None,
        }
    }

    /// The table recording applied versions. Default
    /// `__diesel_schema_migrations` (diesel's, so the diesel CLI sees the
    /// same history). Give independent migration sets sharing a database
    /// different tables; the lock keys follow the table name.
    pub fn migrations_table(mut self, name: impl Into<String>) -> Self {
        self.migrations_table = name.into();
        self
    }

    /// The table recording every attempt. Default
    /// `__diesel_rollout_attempts` with the default migrations table, and
    /// `<migrations table>_attempts` with another one, so migration sets
    /// sharing a database keep separate records.
    pub fn attempts_table(mut self, name: impl Into<String>) -> Self {
        self.attempts_table = Some(name.into());
        self
    }

    /// Migrates one schema of the database (a schema per tenant): the
    /// ledger tables given without a schema live in `schema`, and every
    /// migration runs with `search_path` set to it alone, so its
    /// unqualified names land there. The session's own `search_path` is
    /// put back afterwards, before a pooled connection returns to its pool.
    /// The schema must exist. Default: none (the tables resolve on the
    /// session's `search_path`, and migrations run with it unchanged).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// How long to wait for another replica's migration lock before giving
    /// up. Default 10 minutes.
    pub fn lock_wait_deadline(mut self, deadline: Duration) -> Self {
        self.lock_deadline = deadline;
        self
    }

    /// The longest pause between two tries of the lock while waiting
    /// (polling starts at 25 ms and ramps up to it, with jitter). A waiting
    /// replica notices the lock is free within about this long. Default
    /// 200 ms.
    pub fn lock_poll_interval(mut self, interval: Duration) -> Self {
        self.lock_poll = interval.max(Duration::from_millis(1));
        self
    }

    /// How often to log who holds the lock while waiting. Default 10 s.
    pub fn lock_report_interval(mut self, interval: Duration) -> Self {
        self.lock_report_every = interval;
        self
    }

    /// `lock_timeout` for required migrations, so a migration that waits on
    /// a busy table fails fast instead of queueing all traffic behind its
    /// lock request. Zero turns it off. Default 5 s.
    pub fn required_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// How long a required migration that fails on `lock_timeout` is
    /// retried (with backoff from 0.5 s to 10 s, each retry logged) before
    /// the failure is returned. Zero: no retry. Default 60 s.
    pub fn lock_timeout_retry_deadline(mut self, deadline: Duration) -> Self {
        self.lock_retry_deadline = deadline;
        self
    }

    /// `statement_timeout` for required migrations. Zero turns it off.
    /// Default 5 minutes: a required migration must be cheap; move long
    /// work to the deferred track.
    pub fn required_statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// `lock_timeout` for deferred migrations. Zero turns it off. Default
    /// off: `CREATE INDEX CONCURRENTLY` waits for older transactions through
    /// the lock manager, and its weak lock does not block writes while it
    /// queues.
    pub fn deferred_lock_timeout(mut self, timeout: Duration) -> Self {
        self.deferred_lock_timeout = timeout;
        self
    }

    /// `statement_timeout` for deferred migrations. Zero turns it off.
    /// Default off: index builds on large tables can take hours.
    pub fn deferred_statement_timeout(mut self, timeout: Duration) -> Self {
        self.deferred_statement_timeout = timeout;
        self
    }

    /// Strict mode: refuse to run when the database has applied versions
    /// this binary does not know, or an applied migration's `up.sql`
    /// changed. Default off: both are logged as warnings and reported, so
    /// an old binary starts against a newer schema during a rollout.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Lets `revert` and `redo` revert a migration whose `down.sql` has no
    /// statements (diesel's comment-only stub, as data fixes often keep it):
    /// its version row goes and nothing of the schema is undone (diesel
    /// 2.3's harness fails it instead, "Received an empty query"). Default
    /// off: such a revert is refused, since a later `up` applies the
    /// migration again over what it left.
    pub fn revert_empty_down(mut self, allow: bool) -> Self {
        self.revert_empty_down = allow;
        self
    }

    /// The baseline: migrations at or below this version are history. Their
    /// old problems were warnings when the set was embedded, and strict mode
    /// still applies them when a database lacks them (out of order, with a
    /// warning). Default: the baseline the set was embedded with
    /// (`start_after` of its `diesel-guard.toml`), if any.
    pub fn baseline(mut self, version: impl Into<String>) -> Self {
        self.baseline = Some(
            version
                .into()
                .chars()
                .filter(char::is_ascii_digit)
                .collect(),
        );
        self
    }

    /// `application_name` of the connections [`Migrator::run_required`] opens, shown
    /// to replicas waiting for the lock. Default `diesel-rollout`.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// The URL the pool given to [`Migrator::run`] and
    /// [`Migrator::start_deferred`] connects with, used for one thing only:
    /// keeping its password, and every piece of it libpq could quote back,
    /// out of the errors and logs about checking a connection out (r2d2 does
    /// not give a pool's URL out). Without it, such errors hide every value
    /// libpq quotes (host, port, database, user). Default: not set.
    pub fn pool_url(mut self, url: impl Into<String>) -> Self {
        self.pool_url = crate::url::PoolRedactor::new(url);
        self
    }

    pub(crate) fn redact_pool_error(&self, text: &str) -> String {
        self.pool_url.redact(text)
    }

    pub(crate) fn pool_redactor(&self) -> crate::url::PoolRedactor {
        self.pool_url.clone()
    }

    /// The baseline in force (see [`Migrator::baseline`]).
    pub fn baseline_version(&self) -> Option<&str> {
        self.baseline.as_deref().or(self.set.baseline())
    }

    /// The migration set.
    pub fn migrations(&self) -> &MigrationSet {
        &self.set
    }

    /// The advisory lock keys a run of `track` takes in the database of
    /// `conn`: first the key of the ledger table as resolved there (see
    /// [`lock_key`](crate::lock_key)), then, when it differs, the key
    /// earlier releases derived from the table name as configured, which
    /// this release takes too so replicas of both exclude each other during
    /// an upgrade. Read-only.
    ///
    /// # Errors
    /// When the ledger's schema cannot be resolved.
    pub fn lock_keys(&self, conn: &mut PgConnection, track: Track) -> Result<Vec<i64>, Error> {
        let ledger = self.ledger()?;
        let tables = ledger.resolve(conn)?;
        Ok(self.keys(&ledger, &tables, track))
    }

    pub(crate) fn keys(&self, ledger: &Ledger, tables: &Tables, track: Track) -> Vec<i64> {
        lock::keys(
            tables.schema.as_deref().unwrap_or("public"),
            &tables.migrations_table,
            &ledger.configured,
            track,
        )
    }

    pub(crate) fn is_strict(&self) -> bool {
        self.strict
    }

    /// How this migrator waits for a track's lock.
    pub(crate) fn wait(&self) -> lock::Wait {
        lock::Wait {
            poll: self.lock_poll,
            report_every: self.lock_report_every,
            deadline: self.lock_deadline,
        }
    }

    /// The session settings a track's migrations run with, wherever they
    /// run (start-up, the background leader, `revert`, a fleet).
    pub(crate) fn session_for(&self, track: Track) -> session::Wanted {
        let deferred = track == Track::Deferred;
        let (lock_timeout, statement_timeout) = match track {
            Track::Required => (self.lock_timeout, self.statement_timeout),
            Track::Deferred => (self.deferred_lock_timeout, self.deferred_statement_timeout),
        };
        session::Wanted {
            lock_timeout,
            statement_timeout,
            search_path: self.search_path(),
            parallel_workers: self.deferred.parallel_workers.filter(|_| deferred),
            maintenance_work_mem_mb: self.deferred.maintenance_work_mem_mb.filter(|_| deferred),
        }
    }

    pub(crate) fn app_name(&self) -> &str {
        &self.application_name
    }

    pub(crate) fn ledger(&self) -> Result<Ledger, Error> {
        let Some(schema) = &self.schema else {
            return Ledger::new(&self.migrations_table, self.attempts_table.as_deref())
                .map_err(|m| Error::new(ErrorKind::Config, m));
        };
        // Each schema keeps its own ledger: a table qualified with another
        // schema would be one ledger (and one lock) for every tenant.
        let mut tables = vec![&self.migrations_table];
        tables.extend(&self.attempts_table);
        if let Some(t) = tables.into_iter().find(|t| t.contains('.')) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "the ledger table `{t}` names a schema, but this migrator migrates schema \
                     `{schema}`, whose ledger lives in it: give the table without a schema \
                     (`--migrations-table` / `--attempts-table`)"
                ),
            ));
        }
        let in_schema = |t: &str| format!("{schema}.{t}");
        let attempts = self.attempts_table.as_deref().map(in_schema);
        Ledger::new(&in_schema(&self.migrations_table), attempts.as_deref())
            .map_err(|m| Error::new(ErrorKind::Config, m))
    }

    /// The `search_path` migrations run with (see [`Migrator::schema`]), as
    /// a quoted identifier.
    pub(crate) fn search_path(&self) -> Option<String> {
        self.schema
            .as_ref()
            .map(|s| format!("\"{}\"", s.replace('"', "\"\"")))
    }

    /// Opens a dedicated connection, applies the pending required
    /// migrations on it (see [`Migrator::run_required_on`]) and closes it, which
    /// also releases the advisory lock whatever happened.
    ///
    /// # Errors
    /// As [`Migrator::run_required_on`], plus [`ErrorKind::Connection`] when the
    /// database cannot be reached (the URL in the message has no password).
    pub fn run_required(&self, database_url: &str) -> Result<Report, Error> {
        let mut conn = self.connect_named(database_url)?;
        self.run_track(&mut conn, Track::Required, &mut pooler_probe(database_url))
    }

    /// A connection to `database_url` carrying this migrator's
    /// `application_name` (in the startup packet when the URL allows it),
    /// its errors naming the URL as given, without the password.
    pub(crate) fn connect_named(&self, database_url: &str) -> Result<PgConnection, Error> {
        let named = crate::url::with_application_name(database_url, &self.application_name);
        let mut conn =
            session::connect_showing(named.as_deref().unwrap_or(database_url), database_url)?;
        if named.is_none() {
            set_application_name(&mut conn, &self.application_name)?;
        }
        Ok(conn)
    }

    /// Applies the pending required migrations on `conn`, which should be
    /// a connection of its own (not shared with other work while this
    /// runs).
    ///
    /// When nothing is pending this is one query and takes no lock.
    /// Otherwise it waits for the track's session advisory lock (polling,
    /// so no snapshot is held while waiting), re-reads the ledger, and
    /// applies each pending migration in version order, each on its own:
    /// in its own transaction with its ledger rows, or, for
    /// `run_in_transaction = false`, statement by statement with progress
    /// recorded, resuming after the last completed statement on a retry.
    /// It stops at the first failure; earlier migrations stay applied.
    ///
    /// # Errors
    /// [`ErrorKind::MigrationFailed`] with the migration, file, line and
    /// PostgreSQL's message; [`ErrorKind::LockTimeout`],
    /// [`ErrorKind::LockNotHeld`] (a pooler in transaction mode), strict
    /// mode's refusals, and ledger errors. The error's
    /// [`report`](Error::report) tells what was applied before it. When
    /// [`Error::connection_unusable`] is true, drop `conn`.
    pub fn run_required_on(&self, conn: &mut PgConnection) -> Result<Report, Error> {
        self.run_track(conn, Track::Required, &mut || None)
    }

    /// As [`Migrator::run_required_on`], with a way to open a second
    /// connection the same way `conn` was opened (returning its backend
    /// pid), which the pooler check uses.
    pub(crate) fn run_required_probed(
        &self,
        conn: &mut PgConnection,
        probe: &mut dyn FnMut() -> Option<i32>,
    ) -> Result<Report, Error> {
        self.run_track(conn, Track::Required, probe)
    }

    /// Applies the pending deferred migrations on `conn`, in the
    /// foreground, under the deferred track's advisory lock (waiting for
    /// it up to the lock wait deadline). Each runs outside any transaction,
    /// statement by statement, with the deferred timeouts.
    ///
    /// # Errors
    /// As [`Migrator::run_required_on`]; also [`ErrorKind::RequiredPending`] when
    /// required migrations known to this binary are not applied yet.
    pub fn run_deferred_on(&self, conn: &mut PgConnection) -> Result<Report, Error> {
        self.run_track(conn, Track::Deferred, &mut || None)
    }

    /// As [`Migrator::run_deferred_on`], with the pooler check's second
    /// connection (see [`Migrator::run_required_probed`]).
    pub(crate) fn run_deferred_probed(
        &self,
        conn: &mut PgConnection,
        probe: &mut dyn FnMut() -> Option<i32>,
    ) -> Result<Report, Error> {
        self.run_track(conn, Track::Deferred, probe)
    }

    fn run_track(
        &self,
        conn: &mut PgConnection,
        track: Track,
        probe: &mut dyn FnMut() -> Option<i32>,
    ) -> Result<Report, Error> {
        let ledger = self.ledger()?;
        let mut report = Report::default();

        // Inside the caller's transaction, under a savepoint: a ledger not
        // created yet must not leave that transaction aborted.
        let fast = if crate::executor::in_transaction(conn) {
            conn.transaction(|c| ledger::rows_fast(c, &ledger))
        } else {
            ledger::rows_fast(conn, &ledger)
        };
        match fast {
            Ok(rows) => {
                let a = self.analyze(&rows, track);
                report.deferred_pending = self.deferred_pending(&a, track);
                if a.pending.is_empty() {
                    self.check_drift(&a, &mut report)?;
                    tracing::debug!(track = %track, "nothing pending");
                    crate::metrics::run(track, "nothing_pending");
                    return Ok(report);
                }
            }
            Err(e) if is_connection_error(&e) => {
                return Err(Error::db("reading the migration ledger", e));
            }
            // A ledger table is missing: the locked path creates it.
            Err(_) => {}
        }

        let tables = ledger.resolve(conn)?;
        let keys = self.keys(&ledger, &tables, track);
        let wait = lock::Wait {
            poll: self.lock_poll,
            report_every: self.lock_report_every,
            deadline: self.lock_deadline,
        };
        // Strict mode checks drift under the lock, so it always takes it.
        // The last look also tells what the deferred track has left: the
        // first one may have found no ledger at all (a fresh database).
        let mut deferred_left = None;
        let mut still_needed = |c: &mut PgConnection| {
            self.strict
                || match ledger::rows_fast(c, &ledger) {
                    Ok(rows) => {
                        let a = self.analyze(&rows, track);
                        deferred_left = Some(self.deferred_pending(&a, track));
                        !a.pending.is_empty()
                    }
                    Err(_) => true,
                }
        };
        let (guard, waited) = LockGuard::acquire(conn, keys, track, wait, &mut still_needed)?;
        if let Some(n) = deferred_left {
            report.deferred_pending = n;
        }
        let Some(mut guard) = guard else {
            // Another process applied everything while this one waited.
            tracing::info!(
                track = %track,
                waited_ms = waited.as_millis() as u64,
                "another process applied the pending migrations"
            );
            report.lock_wait = waited;
            crate::metrics::lock_wait(track, waited);
            crate::metrics::run(track, "nothing_pending");
            return Ok(report);
        };
        report.took_lock = true;
        report.lock_wait = waited;
        tracing::debug!(
            key = guard.key(),
            waited_ms = waited.as_millis() as u64,
            "took the {track} lock"
        );

        crate::metrics::lock_wait(track, waited);
        let result = self.apply_locked(&mut guard, &ledger, &tables, track, &mut report, probe);
        let released = guard.release();
        crate::metrics::run(
            track,
            if result.is_ok() && released.is_ok() {
                "success"
            } else {
                "failure"
            },
        );
        match (result, released) {
            (Ok(()), Ok(())) => Ok(report),
            (Ok(()), Err(e)) => Err(e.with_report(report)),
            (Err(e), Ok(())) => Err(e.with_report(report)),
            (Err(e), Err(unlock)) => {
                tracing::error!(error = %unlock, "releasing the lock after a failure");
                Err(e.unusable().with_report(report))
            }
        }
    }

    fn apply_locked(
        &self,
        guard: &mut LockGuard<'_>,
        ledger: &Ledger,
        resolved: &Tables,
        track: Track,
        report: &mut Report,
        probe: &mut dyn FnMut() -> Option<i32>,
    ) -> Result<(), Error> {
        let conn: &mut PgConnection = guard;
        // Resolved again under the lock: the lock key came from the first
        // resolution, and the ledger must not have moved since.
        let mut tables = ledger.resolve(conn)?;
        same_schema(ledger, resolved, &tables)?;
        ledger::ensure_tables(conn, ledger, &mut tables)?;
        let tables = &tables;
        let n = ledger::mark_interrupted(conn, tables, &[track])?;
        if n > 0 {
            tracing::warn!(
                attempts = n,
                "found {track}-track attempts left running by a process that is gone: \
                 the next attempt resumes after their last recorded statement"
            );
        }
        let rows = ledger::rows(conn, tables)?;
        let Some(first) = self.pending_locked(&rows, track, report)? else {
            return Ok(());
        };
        // About to change the schema: make sure the lock is really ours.
        guard.check_not_pooled(probe)?;
        self.apply_fresh(guard, tables, first, track, report)
    }
}

/// The ledger resolved again under the lock is where it was when the lock's
/// keys were derived from it.
pub(crate) fn same_schema(ledger: &Ledger, before: &Tables, now: &Tables) -> Result<(), Error> {
    if now.schema == before.schema {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Database,
        format!(
            "the migrations table `{}` resolved to schema {:?}, then to {:?} while taking the \
             lock (a schema or ledger table was created or dropped meanwhile): run again",
            ledger.configured, before.schema, now.schema
        ),
    ))
}

/// A second connection to `database_url`, opened only once the lock is
/// taken, returning its backend pid: it tells a pooler in transaction mode
/// apart from a direct connection.
pub(crate) fn pooler_probe(database_url: &str) -> impl FnMut() -> Option<i32> + '_ {
    move || lock::second_backend(database_url)
}
