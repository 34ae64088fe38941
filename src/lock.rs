//! Session advisory locks: keys, waiting without holding a snapshot, who
//! holds the lock, and releasing it on every path.

use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_query;
use diesel::sql_types::{BigInt, Bool, Integer, Text};

use crate::error::{Error, ErrorKind};
use crate::source::Track;

/// The advisory lock key of a track for the ledger table `table` in schema
/// `schema` (as resolved: see [`Migrator::lock_keys`](crate::Migrator::lock_keys)):
/// the first eight bytes of
/// `SHA-256("diesel-rollout:<track>:<table>")` for a table in `public`, and
/// of `SHA-256("diesel-rollout:<track>:<schema>.<table>")` in any other
/// schema, read as a big-endian `i64`. Deterministic, the same however the
/// table is spelled in the configuration, different for the two tracks and
/// for migration sets that keep their ledgers in different tables.
pub fn lock_key(schema: &str, table: &str, track: Track) -> i64 {
    if schema == "public" {
        key_of(table, track)
    } else {
        key_of(&format!("{schema}.{table}"), track)
    }
}

/// The key of `text` (a table name) for `what` (a track, or the ledger's
/// DDL).
fn key_of(text: &str, what: impl std::fmt::Display) -> i64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("diesel-rollout:{what}:{text}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// A migration's own advisory lock, whichever track has it: a session lock
/// while a `run_in_transaction = false` run of it runs, a transaction lock
/// for a transactional one's transaction. Two releases that have the
/// migration on different tracks (each under only its own track's lock)
/// do not run it at once. The version as the ledger compares it (leading
/// zeros dropped).
pub(crate) fn claim_key(schema: &str, table: &str, version: &str) -> i64 {
    key_of(
        &format!("{schema}.{table}:{}", crate::migration::normal(version)),
        "claim",
    )
}

/// The transaction-level advisory lock under which the ledger tables of
/// `schema.table` are created or upgraded, whichever track's lock is held.
pub(crate) fn ledger_ddl_key(schema: &str, table: &str) -> i64 {
    key_of(&format!("{schema}.{table}"), "ledger")
}

/// The keys a run takes for `track`: the key of the resolved table first,
/// then the keys earlier releases derived from the name as configured, so a
/// replica of an earlier release and one of this release exclude each other
/// while a deploy upgrades diesel-rollout, even when the spelling changed
/// with it: for a table in `public`, both `table` and `public.table`; for
/// another schema configured unqualified, `table` too.
pub(crate) fn keys(schema: &str, table: &str, configured: &str, track: Track) -> Vec<i64> {
    let mut keys = vec![lock_key(schema, table, track), key_of(configured, track)];
    if schema == "public" {
        keys.push(key_of(&format!("public.{table}"), track));
    }
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(*k));
    keys
}

/// The session holding an advisory lock.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct LockHolder {
    /// Backend process id.
    #[diesel(sql_type = Integer)]
    pub pid: i32,
    /// Its `application_name` (may be empty).
    #[diesel(sql_type = Text)]
    pub application_name: String,
    /// When its connection started (the lock is at most this old).
    #[diesel(sql_type = Text)]
    pub since: String,
    /// Its client address, or `local`.
    #[diesel(sql_type = Text)]
    pub client: String,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let app = if self.application_name.is_empty() {
            "no application_name"
        } else {
            &self.application_name
        };
        write!(
            f,
            "pid {} ({app}, from {}, connected since {})",
            self.pid, self.client, self.since
        )
    }
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    flag: bool,
}

/// Tries the lock once; never blocks.
pub(crate) fn try_lock(conn: &mut PgConnection, key: i64) -> Result<bool, Error> {
    sql_query("SELECT pg_try_advisory_lock($1) AS flag")
        .bind::<BigInt, _>(key)
        .get_result::<Flag>(conn)
        .map(|f| f.flag)
        .map_err(|e| Error::db("taking the advisory lock", e))
}

/// Tries each key once, in one statement; returns those now held.
pub(crate) fn try_lock_each(conn: &mut PgConnection, keys: &[i64]) -> Result<Vec<i64>, Error> {
    #[derive(QueryableByName)]
    struct Held {
        #[diesel(sql_type = BigInt)]
        k: i64,
    }
    sql_query("SELECT k FROM unnest($1::bigint[]) AS k WHERE pg_try_advisory_lock(k)")
        .bind::<diesel::sql_types::Array<BigInt>, _>(keys)
        .load::<Held>(conn)
        .map(|h| h.into_iter().map(|h| h.k).collect())
        .map_err(|e| Error::db("taking migrations' own locks", e))
}

/// Releases each key, in one statement.
pub(crate) fn unlock_each(conn: &mut PgConnection, keys: &[i64]) -> Result<(), Error> {
    sql_query("SELECT count(*) FILTER (WHERE pg_advisory_unlock(k)) AS flag FROM unnest($1::bigint[]) AS k")
        .bind::<diesel::sql_types::Array<BigInt>, _>(keys)
        .execute(conn)
        .map(|_| ())
        .map_err(|e| Error::db("releasing migrations' own locks", e))
}

/// Tries the keys in order, in one round trip, stopping at the first one
/// another session holds (so of two sessions racing, the one that got the
/// first key gets them all); all or none are held afterwards, errors
/// included (a session lock taken before a statement failed stays held).
pub(crate) fn try_lock_all(conn: &mut PgConnection, keys: &[i64]) -> Result<bool, Error> {
    #[derive(QueryableByName)]
    struct Taken {
        #[diesel(sql_type = Integer)]
        n: i32,
    }
    if keys.is_empty() {
        return Ok(true);
    }
    // CASE tries its conditions in order and stops at the first true one.
    let tries: String = (1..=keys.len())
        .map(|i| format!(" WHEN NOT pg_try_advisory_lock(${i}) THEN {}", i - 1))
        .collect();
    let sql = format!("SELECT CASE{tries} ELSE {} END AS n", keys.len());
    let mut query = sql_query(sql).into_boxed();
    for &key in keys {
        query = query.bind::<BigInt, _>(key);
    }
    let n = match query.get_result::<Taken>(conn) {
        Ok(t) => usize::try_from(t.n).unwrap_or(0).min(keys.len()),
        Err(e) => {
            let _ = unlock_all(conn, keys);
            return Err(Error::db("taking the advisory lock", e));
        }
    };
    if n == keys.len() {
        return Ok(true);
    }
    if n > 0 {
        unlock_all(conn, &keys[..n])?;
    }
    Ok(false)
}

/// Releases every key and wakes the sessions waiting for the first (see
/// [`channel`]), in one round trip; `Ok(false)` when one of them was not
/// held.
pub(crate) fn unlock_all(conn: &mut PgConnection, keys: &[i64]) -> Result<bool, Error> {
    #[derive(QueryableByName)]
    struct Released {
        #[diesel(sql_type = Bool)]
        flag: bool,
    }
    sql_query(include_str!("sql/unlock_notify.sql"))
        .bind::<diesel::sql_types::Array<BigInt>, _>(keys)
        .bind::<Text, _>(channel(keys[0]))
        .get_result::<Released>(conn)
        .map(|r| r.flag)
        .map_err(|e| Error::db("releasing the advisory lock", e))
}

/// The `LISTEN` channel of a lock: the holder notifies it when it lets go,
/// so a waiting replica tries again at once instead of at its next poll.
pub(crate) fn channel(key: i64) -> String {
    format!("diesel_rollout_{:016x}", key as u64)
}

/// Waits up to `d` for a notification on `channel`, reading what the
/// server already sent without a round trip (an idle session in `LISTEN`
/// holds no snapshot). Returns `true` when one came.
fn notified_within(conn: &mut PgConnection, channel: &str, d: Duration) -> bool {
    let until = Instant::now() + d;
    loop {
        let mut woken = false;
        for n in conn.notifications_iter() {
            match n {
                Ok(n) if n.channel == channel => woken = true,
                Ok(_) => {}
                // A broken connection shows on the next query.
                Err(_) => return false,
            }
        }
        if woken {
            return true;
        }
        let now = Instant::now();
        if now >= until {
            return false;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(5)));
    }
}

/// Who holds one of the keys, if anyone (the first key first).
pub(crate) fn holder(conn: &mut PgConnection, keys: &[i64]) -> Result<Option<LockHolder>, Error> {
    for &key in keys {
        let found = sql_query(include_str!("sql/lock_holder.sql"))
            .bind::<BigInt, _>(key)
            .get_result(conn)
            .optional()
            .map_err(|e| Error::db("looking up who holds the advisory lock", e))?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// Whether `pg_locks` shows the lock held by this session's own backend.
/// Through a pooler in transaction mode it is not.
pub(crate) fn held_by_me(conn: &mut PgConnection, key: i64) -> Result<bool, Error> {
    #[derive(QueryableByName)]
    struct Held {
        #[diesel(sql_type = Bool)]
        held: bool,
    }
    sql_query(include_str!("sql/lock_held_by_me.sql"))
        .bind::<BigInt, _>(key)
        .get_result::<Held>(conn)
        .map(|h| h.held)
        .map_err(|e| Error::db("checking that this session holds the advisory lock", e))
}

/// What a pooler in transaction mode means for a migration, after `what`
/// gave it away.
fn pooler_message(what: &str, left: &str) -> String {
    format!(
        "{what}. A connection pooler in transaction mode (PgBouncer, Supavisor, RDS Proxy...) \
         sits between this process and PostgreSQL, and session locks do not work through it. \
         Migrate over a direct connection to the server (or a pooler in session mode).{left}"
    )
}

/// Refuses `conn` when it reaches PostgreSQL through a connection pooler in
/// transaction mode, which hands its server connection, and the session
/// advisory locks taken on it, to other clients between transactions:
/// opens a second connection to `database_url` (as `conn` was opened) and
/// fails when that one is handed the same backend. `up` with a URL does
/// this by itself; call it before [`Migrator::revert`], [`Migrator::redo`]
/// or [`Migrator::resolve`] on a connection opened from a URL, as `rollout`
/// does. A second connection that cannot be opened is not taken for a
/// pooler.
///
/// [`Migrator::revert`]: crate::Migrator::revert
/// [`Migrator::redo`]: crate::Migrator::redo
/// [`Migrator::resolve`]: crate::Migrator::resolve
///
/// # Errors
/// [`ErrorKind::LockNotHeld`] naming the pooler problem; a failed query on
/// `conn` as [`ErrorKind::Connection`] or a database error.
pub fn check_direct(conn: &mut PgConnection, database_url: &str) -> Result<(), Error> {
    let me = backend_pid(conn).map_err(|e| Error::db("reading this session's backend", e))?;
    if second_backend(database_url) == Some(me) {
        return Err(Error::new(
            ErrorKind::LockNotHeld,
            pooler_message(
                "a second connection to the same URL was handed this session's backend",
                "",
            ),
        )
        .unusable());
    }
    Ok(())
}

/// The backend pid a new connection to `database_url` is handed, if it
/// can be opened.
pub(crate) fn second_backend(database_url: &str) -> Option<i32> {
    crate::connect(database_url)
        .ok()
        .and_then(|mut c| backend_pid(&mut c).ok())
}

/// This session's backend pid.
pub(crate) fn backend_pid(conn: &mut PgConnection) -> QueryResult<i32> {
    #[derive(QueryableByName)]
    struct Pid {
        #[diesel(sql_type = Integer)]
        pid: i32,
    }
    sql_query("SELECT pg_backend_pid() AS pid")
        .get_result::<Pid>(conn)
        .map(|p| p.pid)
}

/// A pseudo-random pause in `[0, max)`, different across processes and
/// calls (no cryptographic quality needed).
fn jitter(max: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = u64::from(nanos) ^ (u64::from(std::process::id()) << 20);
    let mixed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16;
    let max_us = u64::try_from(max.as_micros()).unwrap_or(u64::MAX).max(1);
    Duration::from_micros(mixed % max_us)
}

/// How to wait for a lock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wait {
    /// Between two `pg_try_advisory_lock` calls.
    pub poll: Duration,
    /// Between two log lines naming the holder.
    pub report_every: Duration,
    /// Give up after this long.
    pub deadline: Duration,
}

/// A held session advisory lock on a borrowed connection. Released by
/// [`LockGuard::release`], or on drop (panics included) as a last resort.
pub(crate) struct LockGuard<'c> {
    conn: &'c mut PgConnection,
    keys: Vec<i64>,
    held: bool,
}

impl<'c> LockGuard<'c> {
    /// Waits for the lock by polling `pg_try_advisory_lock`, so no statement
    /// (and no snapshot) stays open while waiting: a blocked
    /// `pg_advisory_lock` would stall `CREATE INDEX CONCURRENTLY` elsewhere.
    /// Between tries it asks `still_needed` (one cheap read): when another
    /// process has done the work meanwhile, it stops waiting and returns
    /// `None`, so a stampede of replicas does not file through the lock one
    /// by one to find nothing to do. Returns the guard (or `None`) and how
    /// long it waited.
    pub(crate) fn acquire(
        conn: &'c mut PgConnection,
        keys: Vec<i64>,
        track: Track,
        wait: Wait,
        still_needed: &mut dyn FnMut(&mut PgConnection) -> bool,
    ) -> Result<(Option<Self>, Duration), Error> {
        let start = Instant::now();
        let mut last_report = None::<Instant>;
        let mut attempt = 0u32;
        let key = keys[0];
        let channel = channel(key);
        // Listening from the first miss on: the holder wakes us when it lets go.
        let mut listening = false;
        let stop_listening = |conn: &mut PgConnection, listening: bool| {
            if listening {
                let _ = conn.batch_execute(&format!("UNLISTEN \"{channel}\""));
                conn.notifications_iter().for_each(drop);
            }
        };
        loop {
            if try_lock_all(conn, &keys)? {
                stop_listening(conn, listening);
                let guard = LockGuard {
                    conn,
                    keys,
                    held: true,
                };
                return guard.confirm().map(|g| (Some(g), start.elapsed()));
            }
            if attempt > 0 && !still_needed(conn) {
                stop_listening(conn, listening);
                return Ok((None, start.elapsed()));
            }
            if !listening {
                conn.batch_execute(&format!("LISTEN \"{channel}\""))
                    .map_err(|e| Error::db("listening for the lock's release", e))?;
                listening = true;
                // It may have been released before we listened: look again.
                attempt = attempt.saturating_add(1);
                continue;
            }
            let waited = start.elapsed();
            if last_report.is_none_or(|t: Instant| t.elapsed() >= wait.report_every) {
                let who = holder(conn, &keys)?;
                match &who {
                    Some(h) => tracing::info!(
                        track = %track, key, holder_pid = h.pid,
                        holder_application_name = %h.application_name,
                        holder_since = %h.since, waited_secs = waited.as_secs(),
                        "waiting for the {track} migration lock, held by {h}"
                    ),
                    None => tracing::info!(
                        track = %track, key, waited_secs = waited.as_secs(),
                        "waiting for the {track} migration lock"
                    ),
                }
                last_report = Some(Instant::now());
            }
            if waited >= wait.deadline {
                stop_listening(conn, listening);
                let who = holder(conn, &keys)?
                    .map(|h| format!(", held by {h}"))
                    .unwrap_or_default();
                return Err(Error::new(
                    ErrorKind::LockTimeout,
                    format!(
                        "gave up waiting for the {track} migration lock (advisory lock {key}) \
                         after {}s{who}. Another replica is applying migrations or is stuck: \
                         see `rollout status`, and if that session is dead, end it with \
                         SELECT pg_terminate_backend(pid); or raise the lock wait deadline",
                        waited.as_secs()
                    ),
                ));
            }
            // Woken by the release, or else polling: quickly at first, then
            // at the configured interval, with jitter so a stampede of
            // replicas does not poll in lockstep (a holder that died sends
            // no notification).
            attempt = attempt.saturating_add(1);
            let base = wait.poll.min(Duration::from_millis(25) * attempt);
            notified_within(conn, &channel, base + jitter(base / 2));
        }
    }

    /// Checks `pg_locks` shows the lock held by this backend; through a
    /// pooler in transaction mode it may not.
    fn confirm(mut self) -> Result<Self, Error> {
        if held_by_me(self.conn, self.keys[0])? {
            return Ok(self);
        }
        Err(self.pooler_error(false))
    }

    /// Checks that a second connection, opened by `probe` the way this one
    /// was, gets a different backend: a pooler in transaction mode hands the
    /// backend that took the lock to other clients, and usually to the very
    /// next one. Called before applying anything (not when there is nothing
    /// to do, so waiters leave the lock quickly).
    pub(crate) fn check_not_pooled(
        &mut self,
        probe: &mut dyn FnMut() -> Option<i32>,
    ) -> Result<(), Error> {
        let shared = match (backend_pid(self.conn), probe()) {
            (Ok(me), Some(other)) => me == other,
            _ => false,
        };
        if shared {
            return Err(self.pooler_error(true));
        }
        Ok(())
    }

    /// Releases what it can and explains the pooler problem.
    fn pooler_error(&mut self, shared_backend: bool) -> Error {
        // The unlock may land on another server connection too; try anyway.
        let unlocked = matches!(unlock_all(self.conn, &self.keys), Ok(true));
        self.held = false;
        let left = if unlocked {
            String::new()
        } else {
            match holder(self.conn, &self.keys).ok().flatten() {
                Some(h) => format!(
                    " The lock may still be held by the pooler's server connection, {h}, until \
                     the pooler closes it; end it with SELECT pg_terminate_backend({}).",
                    h.pid
                ),
                None => String::new(),
            }
        };
        let what = format!(
            "the advisory lock {} does not belong to this session alone: {}",
            self.keys[0],
            if shared_backend {
                "a second connection was handed the same backend"
            } else {
                "pg_locks does not show it held by this session's backend"
            }
        );
        Error::new(ErrorKind::LockNotHeld, pooler_message(&what, &left)).unusable()
    }

    /// The key of the resolved ledger table.
    pub(crate) fn key(&self) -> i64 {
        self.keys[0]
    }

    /// Releases the lock.
    ///
    /// # Errors
    /// [`ErrorKind::Unlock`] when the unlock failed or found no lock: the
    /// connection's state is unknown and must be dropped.
    pub(crate) fn release(mut self) -> Result<(), Error> {
        self.held = false;
        match unlock_all(self.conn, &self.keys) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::new(
                ErrorKind::Unlock,
                format!(
                    "advisory lock {} was not held at release: the session changed under us \
                     (a pooler, or a reconnect). Drop this connection",
                    self.keys[0]
                ),
            )),
            Err(e) => Err(Error::new(
                ErrorKind::Unlock,
                format!(
                    "{e}. The session may still hold advisory lock {}: drop this connection \
                     (closing it releases the lock)",
                    self.keys[0]
                ),
            )),
        }
    }
}

impl Deref for LockGuard<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn
    }
}

impl DerefMut for LockGuard<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        // Reached on a panic or an early return without release: leave any
        // transaction the panic interrupted, then unlock.
        let _ = self.conn.batch_execute("ROLLBACK");
        match unlock_all(self.conn, &self.keys) {
            Ok(true) => tracing::warn!(key = self.keys[0], "advisory lock released during unwind"),
            _ => tracing::error!(
                key = self.keys[0],
                "could not release advisory lock during unwind: drop this connection"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        let r = lock_key("public", "__diesel_schema_migrations", Track::Required);
        let d = lock_key("public", "__diesel_schema_migrations", Track::Deferred);
        assert_ne!(r, d);
        assert_eq!(
            r,
            lock_key("public", "__diesel_schema_migrations", Track::Required)
        );
        assert_ne!(r, lock_key("public", "other_ledger", Track::Required));
        assert_ne!(
            r,
            lock_key("app", "__diesel_schema_migrations", Track::Required)
        );
        // The key of a ledger in public is the one earlier releases used
        // for the unqualified name.
        assert_eq!(r, key_of("__diesel_schema_migrations", Track::Required));
        // Either spelling of a table in public takes both earlier keys.
        let both = [
            r,
            key_of("public.__diesel_schema_migrations", Track::Required),
        ];
        for configured in [
            "__diesel_schema_migrations",
            "public.__diesel_schema_migrations",
        ] {
            assert_eq!(
                keys(
                    "public",
                    "__diesel_schema_migrations",
                    configured,
                    Track::Required
                ),
                both
            );
        }
        // Elsewhere: the resolved key, and the bare name's when configured bare.
        let app = lock_key("app", "t", Track::Required);
        assert_eq!(
            keys("app", "t", "t", Track::Required),
            [app, key_of("t", Track::Required)]
        );
        assert_eq!(keys("app", "t", "app.t", Track::Required), [app]);
    }
}
