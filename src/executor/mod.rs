//! Running one migration's statements on a connection, in or out of a
//! transaction, recording each attempt and its progress in the ledger. Both
//! tracks run migrations through [`apply`], and `revert` through [`revert`],
//! both one code path; the tracks
//! keep their own policy (locks, ordering, retries, leadership).

use diesel::prelude::*;

use crate::error::{Error, ErrorKind};
use crate::ledger::{self, LedgerRow, Tables};
use crate::lock;
use crate::migration::Migration;
use crate::report::Applied;

mod script;
mod statements;
mod transactional;

use self::script::Script;
pub(crate) use self::script::{Direction, Options};
use self::statements::run_statements;
use self::transactional::run_transactional;

/// Applies `m` on `conn`, its ledger row read first: a transactional
/// migration in one transaction with its ledger rows; a
/// `run_in_transaction = false` one statement by
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
        let row = ledger::row(conn, tables, m.version())?;
        if row.as_ref().is_some_and(|r| r.applied) {
            return Ok(None);
        }
        return run(conn, tables, m, Direction::Up, row.as_ref(), options);
    }
    claimed(conn, tables, m, |conn| {
        // What the caller read may be stale by now: the other track may
        // have applied it, or stopped halfway, while earlier migrations ran.
        let row = ledger::row(conn, tables, m.version())?;
        apply_claimed(conn, tables, m, row.as_ref(), options)
    })
}

/// As [`apply`], for a transactional migration whose ledger `row` the
/// caller read under its track's lock, before the migrations ahead of it
/// ran: what the row cannot show yet, the run itself checks (its version
/// row there meanwhile, or its own lock held).
pub(crate) fn apply_planned(
    conn: &mut PgConnection,
    tables: &Tables,
    m: &Migration,
    row: Option<&LedgerRow>,
    options: &Options<'_>,
) -> Result<Option<Applied>, Error> {
    debug_assert!(m.run_in_transaction());
    run(conn, tables, m, Direction::Up, row, options)
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
    let wanted: Vec<(i64, &Migration)> = migrations
        .iter()
        .filter(|m| !m.run_in_transaction())
        .map(|m| (own_key(tables, m), *m))
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
    let key = own_key(tables, m);
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

/// The refusal to run transactional migration `m` whole while an attempt
/// of it outside a transaction stopped with `done` of `total` statements
/// done: those would run a second time.
fn half_done_error(m: &Migration, script: &Script<'_>, done: i32, total: i32) -> Error {
    Error::new(
        ErrorKind::PartialMigrationChanged,
        format!(
            "{} stopped halfway when it last ran outside a transaction ({done} of {total} \
             statements completed), and is transactional now (`run_in_transaction` in its \
             metadata.toml): run whole, its completed statements would run a second time. \
             Nothing of it ran. Keep `run_in_transaction = false` for this release, so it \
             resumes after them; or undo what they did by hand and record that with `rollout \
             resolve {} --rolled-back`",
            script.what(m),
            m.version()
        ),
    )
    .at(m, None)
}

/// `m`'s own advisory lock ([`lock::claim_key`]).
fn own_key(tables: &Tables, m: &Migration) -> i64 {
    let schema = tables.schema.as_deref().unwrap_or("public");
    lock::claim_key(schema, &tables.migrations_table, m.version())
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
    if m.run_in_transaction() {
        let half_done = row.filter(|r| match direction {
            Direction::Up => r.up_half_done(),
            Direction::Down => r.revert_half_done(),
        });
        if let Some(r) = half_done {
            return Err(half_done_error(
                m,
                &script,
                r.statements_completed.unwrap_or(0),
                r.statements_total.unwrap_or(0),
            ));
        }
    }
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
