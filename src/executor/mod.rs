//! Running one migration's statements on a connection, in or out of a
//! transaction, recording each attempt and its progress in the ledger. Both
//! tracks run migrations through [`apply`], and `revert` through [`revert`],
//! both one code path; the tracks
//! keep their own policy (locks, ordering, retries, leadership).

use std::time::Instant;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::Error as DieselError;

use crate::error::{describe_db_error, is_connection_error, Error, ErrorKind};
use crate::ledger::{self, LedgerRow, Tables};
use crate::lock;
use crate::locks;
use crate::migration::Migration;
use crate::report::Applied;
use crate::source::sql;

mod script;
mod statements;

use self::script::{error_line, explain_lock_timeout, is_lock_timeout, Script};
pub(crate) use self::script::{Direction, Options};
use self::statements::run_statements;

/// Applies `m` on `conn`: a transactional migration in one transaction
/// with its ledger rows; a `run_in_transaction = false` one statement by
/// statement, with progress recorded after each and resuming after the
/// last statement its latest attempt says completed, under the
/// migration's own lock (see [`lock::claim_key`]), its ledger row read
/// afresh once that is held. Call under the track's lock, with `tables`
/// resolved. `None`: another session applied it meanwhile (a release that
/// has it on the other track), and nothing of it ran here.
pub(crate) fn apply(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    options: &Options<'_>,
) -> Result<Option<Applied>, Error> {
    if m.run_in_transaction() {
        return run(conn, tables, m, Direction::Up, None, options);
    }
    claimed(conn, tables, m, |conn| {
        // What the caller read may be stale by now: the other track may
        // have applied it, or stopped halfway, while earlier migrations ran.
        let row = ledger::row(conn, tables, m.version())?;
        apply_claimed(conn, tables, m, row.as_ref(), options)
    })
}

/// As [`apply`], for a `run_in_transaction = false` migration whose own lock
/// the caller holds ([`claim_all`]) and whose `row` it read after taking
/// it: nobody else can have changed that row since.
pub(crate) fn apply_claimed(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    row: Option<&LedgerRow>,
    options: &Options<'_>,
) -> Result<Option<Applied>, Error> {
    if row.is_some_and(|r| r.applied) {
        return Ok(None);
    }
    run(conn, tables, m, Direction::Up, row, options)
}

/// The own locks ([`lock::claim_key`]) of `migrations`' no-transaction
/// ones, taken in one statement where free, before the caller reads the
/// ledger rows it runs them from: a track's run then needs no lock and no
/// read of its own per migration. Released, all in one statement, when the
/// returned guard drops (panics and errors included). The guard's
/// `versions` are the migrations it holds (normalised).
pub(crate) fn claim_all<'c>(
    conn: &'c mut PgConnection,
    tables: &Tables,
    migrations: &[&Migration],
) -> Result<Claim<'c>, Error> {
    let schema = tables.schema.as_deref().unwrap_or("public");
    let wanted: Vec<(i64, &Migration)> = migrations
        .iter()
        .filter(|m| !m.run_in_transaction())
        .map(|m| {
            (
                lock::claim_key(schema, &tables.migrations_table, m.version()),
                *m,
            )
        })
        .collect();
    let keys: Vec<i64> = wanted.iter().map(|(k, _)| *k).collect();
    let held = if keys.is_empty() {
        Vec::new()
    } else {
        match lock::try_lock_each(conn, &keys) {
            Ok(held) => held,
            Err(e) => {
                // A session lock taken before the statement failed stays
                // held (it does not roll back): let go of every one.
                if let Err(u) = lock::unlock_each(conn, &keys) {
                    tracing::warn!(error = %u, "could not release migrations' own locks");
                }
                return Err(e);
            }
        }
    };
    let versions = wanted
        .iter()
        .filter(|(k, _)| held.contains(k))
        .map(|(_, m)| crate::migration::normal(m.version()).to_string())
        .collect();
    Ok(Claim {
        conn,
        keys: held,
        versions,
    })
}

/// Runs `f` holding `m`'s own advisory lock ([`lock::claim_key`]), which
/// every run of a `run_in_transaction = false` migration holds, on either
/// track, and `rollout resolve` too: refused as a lock timeout while
/// another session holds it.
pub(crate) fn claimed<T>(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    f: impl FnOnce(&mut PgConnection) -> Result<T, Error>,
) -> Result<T, Error> {
    let schema = tables.schema.as_deref().unwrap_or("public");
    let key = lock::claim_key(schema, &tables.migrations_table, m.version());
    if !lock::try_lock(conn, key)? {
        return Err(Error::new(
            ErrorKind::LockTimeout,
            format!(
                "migration {} is being applied now by another session (it holds the \
                 migration's own lock, advisory lock {key}): a release that has it on the \
                 other track runs it under that track's lock. It is not run alongside; wait \
                 for that run to finish (`rollout status`), then run again",
                m.dir_name()
            ),
        )
        .at(m, None)
        .lock_timeout(true));
    }
    let mut claim = Claim {
        conn,
        keys: vec![key],
        versions: Vec::new(),
    };
    f(&mut claim)
}

/// Reverts applied migration `m` with its `down.sql`, the way [`apply`]
/// applies it (in one transaction with its ledger rows, or statement by
/// statement with progress recorded and the same resume), removing its
/// version row. The caller has checked `down.sql` can run, and holds both
/// tracks' locks.
pub(crate) fn revert(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    row: Option<&LedgerRow>,
    options: &Options<'_>,
) -> Result<Applied, Error> {
    run(conn, tables, m, Direction::Down, row, options)?.ok_or_else(|| {
        Error::new(
            ErrorKind::Database,
            format!(
                "the revert of {} found it reverted by another session meanwhile",
                m.dir_name()
            ),
        )
        .at(m, None)
    })
}

/// Migrations' own advisory locks, held while they run; released on drop
/// (panics included).
pub(crate) struct Claim<'c> {
    conn: &'c mut PgConnection,
    keys: Vec<i64>,
    /// The versions held, normalised (for [`claim_all`]).
    pub versions: Vec<String>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        // A broken connection has let go of them already.
        if let Err(e) = lock::unlock_each(self.conn, &self.keys) {
            tracing::warn!(error = %e, "could not release migrations' own locks");
        }
    }
}

impl std::ops::Deref for Claim<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn
    }
}

impl std::ops::DerefMut for Claim<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
    }
}

fn run(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    direction: Direction,
    row: Option<&LedgerRow>,
    options: &Options<'_>,
) -> Result<Option<Applied>, Error> {
    // Running still, once this track marked its own dead attempts: another
    // process runs it now, on the other track (a release that has it
    // there, or an earlier release that takes no migration's own lock),
    // under a lock this one does not take.
    let fresh;
    let row = match row {
        Some(r) if direction == Direction::Up && r.outcome.as_deref() == Some("running") => {
            fresh = running_elsewhere(conn, tables, m, r)?;
            fresh.as_ref()
        }
        _ => row,
    };
    let script = Script::of(m, direction)?;
    // A script with its own `COMMIT` or `BEGIN` never gets here as a
    // transactional one: the build refuses it in a new migration and loads
    // history that has it as `run_in_transaction = false` (source).
    if !m.run_in_transaction() && in_transaction(conn) {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "{} runs outside any transaction (`run_in_transaction = false`), so it cannot \
                 run inside the transaction this connection has open: its statements would \
                 commit or roll back the caller's transaction. Nothing of it ran; run the \
                 migrations on a connection with no transaction open",
                script.what(m)
            ),
        )
        .at(m, None));
    }
    if m.run_in_transaction() {
        run_transactional(conn, tables, m, &script)
    } else {
        run_statements(conn, tables, m, &script, row, options).map(Some)
    }
}

fn run_transactional(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    script: &Script<'_>,
) -> Result<Option<Applied>, Error> {
    let statements = &script.statements(m)?;
    let total = i32::try_from(statements.len()).unwrap_or(i32::MAX);
    let (doing, done) = script.verbs();
    let span = tracing::info_span!(
        "migration",
        version = m.version(),
        name = m.name(),
        track = %m.track(),
        transaction = true
    );
    let _enter = span.enter();
    tracing::info!(statements = total, "{doing} {}", m.dir_name());
    let start = Instant::now();
    let (result, failed_at, stage, failed_line) = if in_transaction(conn) {
        // Inside the caller's transaction: a savepoint per migration, as
        // diesel nests them, statement by statement.
        run_nested(conn, tables, m, script, statements, total)
    } else {
        run_whole(conn, tables, m, script, statements, total)
    };
    let elapsed = start.elapsed();
    match result {
        Ok(()) => {
            tracing::info!(
                duration_ms = elapsed.as_millis() as u64,
                "{done} {}",
                m.dir_name()
            );
            Ok(Some(Applied {
                version: m.version().to_string(),
                dir_name: m.dir_name().to_string(),
                track: m.track(),
                duration: elapsed,
                statements: statements.len(),
            }))
        }
        Err(e) if applied_meanwhile(conn, tables, m, script, &e) => Ok(None),
        Err(e) => {
            let (line, what) = match (failed_at, stage) {
                (Some(s), _) => (
                    Some(failed_line.unwrap_or_else(|| error_line(script.sql, s, &e))),
                    "its SQL".to_string(),
                ),
                // Deferred constraints are checked at COMMIT.
                (None, Stage::Commit) => (None, "COMMIT".to_string()),
                (None, Stage::Ledger) => (None, "recording it in the ledger".to_string()),
                // Guessed comes with its statement.
                (None, Stage::Guessed) => (None, "its SQL".to_string()),
                (None, Stage::Unlocated(why)) => {
                    (None, format!("its SQL or its ledger rows ({why})"))
                }
            };
            let mut pg = describe_db_error(&e);
            let lock_timeout = is_lock_timeout(&e);
            if !is_connection_error(&e) {
                let statement = failed_at.map_or("", |s| s.sql.as_str());
                pg.push_str(&explain_lock_timeout(conn, statement, &e));
                if let Err(le) = ledger::record_failure(
                    conn,
                    tables,
                    m,
                    script.operation(),
                    &pg,
                    total,
                    elapsed.as_secs_f64(),
                ) {
                    tracing::warn!(error = %le, "could not record the failed attempt");
                }
            }
            let at = match line {
                Some(l) if stage == Stage::Guessed => format!(
                    "{}:{l} (probably: the first statement that needs a lock on a table an \
                     older transaction holds)",
                    script.path
                ),
                Some(l) => format!("{}:{l}", script.path),
                None => script.path.clone(),
            };
            tracing::error!(error = %pg, line, "{} failed", script.what(m));
            let (kind, outcome) = if is_connection_error(&e) {
                (
                    ErrorKind::Connection,
                    "The connection broke, so whether its transaction committed is unknown: \
                     `rollout status` tells",
                )
            } else {
                (
                    ErrorKind::MigrationFailed,
                    "It ran in a transaction that was rolled back, so none of it is applied",
                )
            };
            let next = match script.direction {
                Direction::Up => {
                    "migrations before it stay applied. Fix it and deploy again; `rollout \
                     status` shows where the database stands"
                }
                Direction::Down => {
                    "it stays applied, and migrations reverted before it stay reverted. Fix \
                     down.sql (or undo it by hand and record that with `rollout resolve \
                     VERSION --rolled-back`); `rollout status` shows where the database stands"
                }
            };
            Err(Error::new(
                kind,
                format!(
                    "{} (track {}) failed in {what} at {at}: {pg}. {outcome}; {next}",
                    script.what(m),
                    m.track()
                ),
            )
            .at(m, line)
            .lock_timeout(lock_timeout))
        }
    }
}

/// Whether a transactional migration failed because another session
/// applied it meanwhile (a release that has it on the other track, under a
/// lock this one does not take): its version row, or what it creates, was
/// there by the time this one's transaction got to it, and nothing of this
/// run is left (it rolled back). One read, on the failure path only.
fn applied_meanwhile(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    script: &Script<'_>,
    e: &DieselError,
) -> bool {
    if script.direction != Direction::Up || is_connection_error(e) {
        return false;
    }
    let applied = matches!(ledger::row(conn, tables, m.version()), Ok(Some(r)) if r.applied);
    if applied {
        tracing::info!(
            error = %describe_db_error(e),
            "{} failed as another session applied it meanwhile: nothing of this run is left",
            m.dir_name()
        );
    }
    applied
}

/// A migration whose latest attempt is still running on another backend:
/// refused while that backend holds an advisory lock, its track's (as a
/// lock timeout, which the required track retries until its deadline and
/// the deferred leader later); once it does not, its attempt is marked
/// interrupted and read again, so the run resumes after its recorded
/// statements.
fn running_elsewhere(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    r: &LedgerRow,
) -> Result<Option<LedgerRow>, Error> {
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        found: bool,
    }
    let alive = match r.attempt_backend_pid {
        Some(pid) => {
            diesel::sql_query(
                // Alive and still holding its track's advisory lock: a
                // backend a session pooler keeps after its client died has
                // had the lock freed (`DISCARD ALL`), and does not count.
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 \
                 AND locktype = 'advisory' AND granted AND pid <> pg_backend_pid()) AS found",
            )
            .bind::<diesel::sql_types::Integer, _>(pid)
            .get_result::<Found>(conn)
            .map_err(|e| Error::db("looking for the backend of a running attempt", e))?
            .found
        }
        None => false,
    };
    if alive {
        return Err(Error::new(
            ErrorKind::LockTimeout,
            format!(
                "migration {} is being applied now by another session (backend pid {}): \
                 a release that has it on the other track runs it under that track's \
                 lock. It is not run alongside; wait for that run to finish (`rollout \
                 status`), then run again",
                m.dir_name(),
                r.attempt_backend_pid.unwrap_or_default()
            ),
        )
        .at(m, None)
        .lock_timeout(true));
    }
    ledger::mark_interrupted_version(conn, tables, m.version())?;
    ledger::row(conn, tables, m.version())
}

/// Whether the caller's connection is inside a transaction diesel opened.
pub(crate) fn in_transaction(conn: &mut PgConnection) -> bool {
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    AnsiTransactionManager::transaction_manager_status_mut(conn)
        .transaction_depth()
        .ok()
        .flatten()
        .is_some()
}

/// The migration's SQL and its ledger rows in one transaction, sent in one
/// round trip (`BEGIN; script; ledger; COMMIT`). On failure (after a
/// `ROLLBACK`) the statement that failed is found from PostgreSQL's error
/// position; a lock timeout's from the locks other transactions hold; any
/// other, unless a replay would repeat it (see [`not_replayed`]), by
/// running the statements again one at a time in a transaction that is
/// rolled back: nothing of that costs the success path. Returns the
/// result, the statement that failed, where else it failed, and its line.
fn run_whole<'s>(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    script: &Script<'_>,
    statements: &'s [sql::Statement],
    total: i32,
) -> Outcome<'s> {
    const PREFIX: &str = "BEGIN;\n";
    let ledger_sql = match script.direction {
        Direction::Up => ledger::record_success_sql(tables, m, total),
        Direction::Down => ledger::record_revert_sql(tables, m, &script.checksum, total),
    };
    let batch = format!("{PREFIX}{}\n;\n{ledger_sql};\nCOMMIT", script.sql);
    let sent = Instant::now();
    let Err(e) = conn.batch_execute(&batch) else {
        return (Ok(()), None, Stage::Commit, None);
    };
    if is_connection_error(&e) {
        return (Err(e), None, Stage::Unlocated("the connection broke"), None);
    }
    let _ = conn.batch_execute("ROLLBACK");
    // PostgreSQL's position counts characters of the whole batch.
    let position = match &e {
        DieselError::DatabaseError(_, info) => info.statement_position(),
        _ => None,
    }
    .and_then(|p| usize::try_from(p).ok())
    .filter(|p| *p > PREFIX.len());
    let script_chars = script.sql.chars().count();
    if let Some(p) = position {
        let char_offset = p - 1 - PREFIX.len();
        if char_offset < script_chars {
            let byte = script
                .sql
                .char_indices()
                .nth(char_offset)
                .map_or(script.sql.len(), |(b, _)| b);
            let at = statements
                .iter()
                .rev()
                .find(|s| s.offset <= byte)
                .or(statements.first());
            return (
                Err(e),
                at,
                Stage::Ledger,
                Some(sql::line_of_offset(script.sql, byte)),
            );
        }
        // In the ledger statement.
        return (Err(e), None, Stage::Ledger, None);
    }
    if is_lock_timeout(&e) {
        // Not run again (it would wait as long again): probably the first
        // statement that needs a lock on a table that a transaction older
        // than this run holds in a conflicting mode (the readers queued
        // behind the migration's own request came later).
        let waited = sent.elapsed().as_secs_f64();
        let at = statements.iter().find(|s| {
            locks::of_statement(&s.sql).iter().any(|l| {
                held_against(conn, &l.table, locks::conflicting(l.mode), waited).unwrap_or(false)
            })
        });
        let stage = if at.is_some() {
            Stage::Guessed
        } else {
            Stage::Unlocated(NOT_REPLAYED)
        };
        return (Err(e), at, stage, at.map(|s| s.line));
    }
    if let Some(why) = not_replayed(&e) {
        return (Err(e), None, Stage::Unlocated(why), None);
    }
    // No position: find the statement by running them again, rolled back.
    let (mut at, mut line) = (None, None);
    let began = conn.batch_execute("BEGIN").is_ok();
    if began {
        for s in statements {
            if let Err(again) = conn.batch_execute(&s.sql) {
                at = Some(s);
                line = Some(error_line(script.sql, s, &again));
                break;
            }
        }
        let _ = conn.batch_execute("ROLLBACK");
    }
    let stage = if at.is_some() {
        Stage::Ledger
    } else if !began {
        Stage::Unlocated("PostgreSQL gave no position, and the statements could not be run again")
    } else if is_deferred_check(&e) {
        Stage::Commit
    } else {
        Stage::Unlocated(
            "its statements, run again in a transaction that was rolled back, did not fail again",
        )
    };
    (Err(e), at, stage, line)
}

/// How a transactional run ended: the result, the statement that failed,
/// where it failed when not in a statement, and the line of `up.sql` it
/// failed at, when known.
type Outcome<'s> = (
    Result<(), DieselError>,
    Option<&'s sql::Statement>,
    Stage,
    Option<usize>,
);

/// Where a transactional run failed, when no statement of it is known to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Writing its ledger rows.
    Ledger,
    /// At `COMMIT`, after its ledger rows were written (a deferred
    /// constraint).
    Commit,
    /// Somewhere in its SQL or its ledger rows; why it is not known where.
    Unlocated(&'static str),
    /// In the statement given, probably (a lock timeout located by the
    /// locks other transactions hold).
    Guessed,
}

const NOT_REPLAYED: &str = "PostgreSQL gave no position, and after a timeout, a cancel, a \
                            deadlock, a serialization failure or a resource error the \
                            statements are not run again to find it";

/// Why a failure with no position is not located by running the
/// statements again (rolled back): after a timeout or a cancel the replay
/// would hold the same locks, or run as long, a second time (a DBA's
/// `pg_cancel_backend` undone); a deadlock, a serialization failure or the
/// server running out of something may not happen again, so it would find
/// nothing. Matched on PostgreSQL's English messages (diesel does not give
/// the SQLSTATE); under another `lc_messages` these are replayed.
fn not_replayed(e: &DieselError) -> Option<&'static str> {
    let DieselError::DatabaseError(kind, info) = e else {
        return Some("the error did not come from PostgreSQL");
    };
    let m = info.message();
    let transient = [
        "canceling statement due to",
        "deadlock detected",
        "could not obtain lock",
        "could not serialize access",
        "out of memory",
        "out of shared memory",
        "could not extend file",
        "No space left on device",
        "temporary file size exceeds",
    ];
    (matches!(
        kind,
        diesel::result::DatabaseErrorKind::SerializationFailure
    ) || transient.iter().any(|t| m.contains(t)))
    .then_some(NOT_REPLAYED)
}

/// Whether another session's transaction that began more than `secs`
/// seconds ago holds a lock on `table` (as written) in one of `modes`.
fn held_against(
    conn: &mut PgConnection,
    table: &str,
    modes: &[&str],
    secs: f64,
) -> QueryResult<bool> {
    use diesel::sql_types::{Array, Double, Text};
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        found: bool,
    }
    if modes.is_empty() {
        return Ok(false);
    }
    diesel::sql_query(include_str!("../sql/held_against.sql"))
        .bind::<Text, _>(table)
        .bind::<Array<Text>, _>(modes)
        .bind::<Double, _>(secs)
        .get_result::<Found>(conn)
        .map(|f| f.found)
}

/// Whether an error is one PostgreSQL raises at `COMMIT` (a deferred
/// constraint), which running the statements again does not reproduce.
fn is_deferred_check(e: &DieselError) -> bool {
    matches!(
        e,
        DieselError::DatabaseError(
            diesel::result::DatabaseErrorKind::UniqueViolation
                | diesel::result::DatabaseErrorKind::ForeignKeyViolation
                | diesel::result::DatabaseErrorKind::CheckViolation,
            _
        )
    )
}

/// As [`run_whole`], inside the caller's transaction: a savepoint, and the
/// statements one at a time.
fn run_nested<'s>(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    script: &Script<'_>,
    statements: &'s [sql::Statement],
    total: i32,
) -> Outcome<'s> {
    let mut failed_at = None;
    let mut stage = Stage::Ledger;
    let result = conn.transaction::<(), DieselError, _>(|c| {
        for s in statements {
            if let Err(e) = c.batch_execute(&s.sql) {
                failed_at = Some(s);
                return Err(e);
            }
        }
        match script.direction {
            Direction::Up => ledger::record_success(c, tables, m, total)?,
            Direction::Down => ledger::record_revert(c, tables, m, &script.checksum, total)?,
        }
        stage = Stage::Commit;
        Ok(())
    });
    (result, failed_at, stage, None)
}
