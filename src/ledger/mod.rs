//! The ledger: diesel's `__diesel_schema_migrations` (what is applied) and
//! the harness's attempts table (every attempt, its outcome and progress).
//! All SQL lives in `src/sql/*.sql`; the tables' names and SQL in
//! `tables.rs`.

mod read;
mod tables;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_query;
use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Nullable, Text};
use once_cell::sync::Lazy;

use crate::error::{Error, ErrorKind};
use crate::migration::Migration;
use crate::source::Track;

pub(crate) use self::read::{revert_scope, row, rows, rows_fast, rows_of};
pub(crate) use self::tables::{Ledger, Tables, ATTEMPTS_VERSION};

/// One version as the ledger knows it.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct LedgerRow {
    #[diesel(sql_type = Text)]
    pub version: String,
    #[diesel(sql_type = Bool)]
    pub applied: bool,
    #[diesel(sql_type = Nullable<Text>)]
    pub applied_at: Option<String>,
    /// What the latest attempt did: `up`, `down` (a revert) or `resolve`.
    #[diesel(sql_type = Nullable<Text>)]
    pub operation: Option<String>,
    /// Outcome of the latest attempt (`running`, `success`, `failed`,
    /// `retrying`, `interrupted`; a resolution `applied` or `rolled_back`),
    /// when the harness attempted it.
    #[diesel(sql_type = Nullable<Text>)]
    pub outcome: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub error: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    pub statements_completed: Option<i32>,
    /// Statements the latest attempt split `up.sql` into.
    #[diesel(sql_type = Nullable<Integer>)]
    pub statements_total: Option<i32>,
    #[diesel(sql_type = Nullable<Text>)]
    pub attempt_checksum: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub applied_checksum: Option<String>,
    /// When the latest attempt finished (server clock, Unix seconds).
    #[diesel(sql_type = Nullable<Double>)]
    pub finished_epoch: Option<f64>,
    /// The backend the latest attempt ran on (none before layout 3).
    #[diesel(sql_type = Nullable<Integer>)]
    pub attempt_backend_pid: Option<i32>,
}

impl LedgerRow {
    /// An applied version, known by its migrations-table row alone.
    pub(crate) fn applied(version: String, applied_checksum: Option<String>) -> LedgerRow {
        LedgerRow {
            version,
            applied: true,
            applied_at: None,
            operation: None,
            outcome: None,
            error: None,
            statements_completed: None,
            statements_total: None,
            attempt_checksum: None,
            applied_checksum,
            finished_epoch: None,
            attempt_backend_pid: None,
        }
    }

    /// Not applied, and the latest attempt, to apply it, did not succeed.
    pub(crate) fn failed(&self) -> bool {
        !self.applied && self.is("up") && self.unfinished()
    }

    /// Applied, and the latest attempt, to revert it, did not succeed: a
    /// no-transaction revert stopped halfway.
    pub(crate) fn revert_failed(&self) -> bool {
        self.applied && self.is("down") && self.unfinished()
    }

    /// Applied, and a revert of it outside a transaction stopped, or is
    /// running, with some of its down.sql done: the schema is neither side.
    /// A transactional revert that failed undid nothing (its transaction
    /// rolled back, and it records no statement done), nor did one that
    /// failed on its first statement. Whatever the migration's metadata
    /// says now: the attempt may be an older release's.
    pub(crate) fn revert_half_done(&self) -> bool {
        self.applied && self.is("down") && self.half_done()
    }

    /// Not applied, and an attempt to apply it outside a transaction
    /// stopped, or is running, with some of its up.sql done (see
    /// [`LedgerRow::revert_half_done`]).
    pub(crate) fn up_half_done(&self) -> bool {
        !self.applied && self.is("up") && self.half_done()
    }

    fn half_done(&self) -> bool {
        (self.unfinished() || self.outcome.as_deref() == Some("running"))
            && self.statements_completed.unwrap_or(0) > 0
    }

    /// The latest attempt was this operation (`up` for rows written before
    /// operations were recorded).
    pub(crate) fn is(&self, operation: &str) -> bool {
        self.operation.as_deref().unwrap_or("up") == operation
    }

    /// The latest attempt, of any operation, did not finish: it failed, is
    /// to be retried, or its process died.
    pub(crate) fn unfinished(&self) -> bool {
        matches!(
            self.outcome.as_deref(),
            Some("failed" | "retrying" | "interrupted")
        )
    }
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// The name of this machine, recorded with each attempt.
static HOST: Lazy<String> = Lazy::new(|| {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
});

/// The operating-system user running this process, recorded with each
/// attempt (who resolved a migration by hand, say).
static OS_USER: Lazy<Option<String>> = Lazy::new(|| {
    ["USER", "USERNAME", "LOGNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
});

fn client_pid() -> i32 {
    i32::try_from(std::process::id()).unwrap_or(-1)
}

/// The server's clock, Unix seconds.
pub(crate) fn server_epoch(conn: &mut PgConnection) -> QueryResult<f64> {
    #[derive(QueryableByName)]
    struct Now {
        #[diesel(sql_type = Double)]
        now: f64,
    }
    sql_query("SELECT extract(epoch FROM now())::float8 AS now")
        .get_result::<Now>(conn)
        .map(|n| n.now)
}

/// Creates the ledger tables that are missing, and brings an attempts
/// table an earlier release created up to this release's layout. Call
/// under a track's lock, with `t` resolved; `t` then says both tables exist.
/// The two tracks can get here at once (a deferred leader while the
/// required track is blocked), so the DDL runs in one transaction under a
/// transaction-level advisory lock of the ledger, after reading again what
/// exists.
pub(crate) fn ensure_tables(
    conn: &mut PgConnection,
    ledger: &Ledger,
    t: &mut Tables,
) -> Result<(), Error> {
    if t.migrations_exist
        && t.migrations_checksum
        && t.attempts_exist
        && t.attempts_version >= ATTEMPTS_VERSION
    {
        return Ok(());
    }
    let schema = t.schema.clone().unwrap_or_default();
    let key = crate::lock::ledger_ddl_key(&schema, &t.migrations_table);
    let now = conn
        .transaction(|c| {
            sql_query("SELECT pg_advisory_xact_lock($1)")
                .bind::<BigInt, _>(key)
                .execute(c)?;
            let mut now = match ledger.resolved(ledger.query_resolution(c)?) {
                Ok(now) => now,
                Err(_) => return Ok(None),
            };
            if !now.migrations_exist {
                tracing::info!(table = %now.migrations_table, schema = ?now.schema, "creating the migrations table");
                c.batch_execute(&now.sql.create_migrations)?;
                now.migrations_exist = true;
                now.set_migrations_checksum(true);
            }
            if !now.attempts_exist {
                tracing::info!(schema = ?now.schema, "creating the attempts table");
                c.batch_execute(&now.sql.create_attempts)?;
                now.attempts_exist = true;
                now.attempts_version = ATTEMPTS_VERSION;
                now.attempts_operations = true;
            }
            if now.attempts_version < ATTEMPTS_VERSION {
                tracing::info!(
                    from = now.attempts_version,
                    to = ATTEMPTS_VERSION,
                    "upgrading the attempts table an earlier release created"
                );
                c.batch_execute(&now.sql.upgrade_attempts)?;
                now.attempts_version = ATTEMPTS_VERSION;
                now.attempts_operations = true;
            }
            if !now.migrations_checksum {
                tracing::info!(table = %now.migrations_table, "adding the checksum column to the migrations table");
                c.batch_execute(&now.sql.add_checksum_column)?;
                if now.attempts_exist && now.attempts_version >= ATTEMPTS_VERSION {
                    c.batch_execute(&now.sql.backfill_checksums)?;
                }
                now.set_migrations_checksum(true);
            }
            Ok(Some(now))
        })
        .map_err(|e| Error::db("creating or upgrading the ledger tables", e))?;
    match now {
        Some(now) if now.schema == t.schema => {
            *t = now;
            Ok(())
        }
        _ => Err(Error::new(
            ErrorKind::Database,
            format!(
                "the migrations table `{}` moved to another schema while its tables were \
                 being created: run again",
                ledger.configured
            ),
        )),
    }
}

/// Marks every attempt of `tracks` still `running` as interrupted: under
/// a track's lock, none of them is alive. Call under the tracks' locks.
pub(crate) fn mark_interrupted(
    conn: &mut PgConnection,
    t: &Tables,
    tracks: &[Track],
) -> Result<usize, Error> {
    let tracks: Vec<&str> = tracks.iter().map(|t| t.as_str()).collect();
    sql_query(&t.sql.mark_interrupted)
        .bind::<Array<Text>, _>(tracks)
        .bind::<Nullable<Text>, _>(None::<&str>)
        .execute(conn)
        .map_err(|e| Error::db("marking interrupted attempts", e))
}

/// Marks the running attempt of `version` interrupted: one whose backend
/// is gone, left by the other track.
pub(crate) fn mark_interrupted_version(
    conn: &mut PgConnection,
    t: &Tables,
    version: &str,
) -> Result<usize, Error> {
    sql_query(&t.sql.mark_interrupted)
        .bind::<Array<Text>, _>(Vec::<&str>::new())
        .bind::<Nullable<Text>, _>(Some(version))
        .execute(conn)
        .map_err(|e| Error::db("marking an interrupted attempt", e))
}

/// Records a started attempt (autocommit) and returns its id.
pub(crate) fn start_attempt(
    conn: &mut PgConnection,
    t: &Tables,
    m: &Migration,
    op: Operation<'_>,
    completed: i32,
    total: i32,
) -> QueryResult<i64> {
    let row: Id = sql_query(&t.sql.start_attempt)
        .bind::<Text, _>(m.version())
        .bind::<Text, _>(m.name())
        .bind::<Text, _>(m.track().as_str())
        .bind::<Text, _>(op.checksum)
        .bind::<Integer, _>(completed)
        .bind::<Integer, _>(total)
        .bind::<Text, _>(HOST.as_str())
        .bind::<Integer, _>(client_pid())
        .bind::<Text, _>(op.name)
        .bind::<Nullable<Text>, _>(OS_USER.as_deref())
        .get_result(conn)?;
    Ok(row.id)
}

/// What an attempt does to a migration, and the checksum of the script it
/// runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Operation<'a> {
    /// `up` or `down`.
    pub name: &'static str,
    /// Of up.sql for `up`, of down.sql for `down`.
    pub checksum: &'a str,
}

/// Records a transactional revert as done (the version row removed and a
/// successful `down` attempt, in one statement), inside its transaction.
pub(crate) fn record_revert(
    conn: &mut PgConnection,
    t: &Tables,
    m: &Migration,
    down_checksum: &str,
    statements: i32,
) -> QueryResult<()> {
    sql_query(&t.sql.record_revert)
        .bind::<Text, _>(m.version())
        .bind::<Text, _>(m.name())
        .bind::<Text, _>(m.track().as_str())
        .bind::<Text, _>(down_checksum)
        .bind::<Integer, _>(statements)
        .bind::<Text, _>(HOST.as_str())
        .bind::<Integer, _>(client_pid())
        .bind::<Nullable<Text>, _>(OS_USER.as_deref())
        .execute(conn)
        .map(drop)
}

/// Records a migration's outcome decided by hand: `applied` adds its
/// version row, `rolled_back` removes it; the attempt says who and why.
pub(crate) fn record_resolution(
    conn: &mut PgConnection,
    t: &Tables,
    m: &Migration,
    outcome: &str,
    note: &str,
) -> QueryResult<()> {
    sql_query(&t.sql.record_resolution)
        .bind::<Text, _>(m.version())
        .bind::<Text, _>(m.name())
        .bind::<Text, _>(m.track().as_str())
        .bind::<Text, _>(m.checksum())
        .bind::<Text, _>(outcome)
        .bind::<Text, _>(note)
        .bind::<Text, _>(HOST.as_str())
        .bind::<Integer, _>(client_pid())
        .bind::<Nullable<Text>, _>(OS_USER.as_deref())
        .execute(conn)
        .map(drop)
}

/// Records statements completed by an attempt.
pub(crate) fn progress(conn: &mut PgConnection, t: &Tables, id: i64, done: i32) -> QueryResult<()> {
    sql_query(&t.sql.progress)
        .bind::<BigInt, _>(id)
        .bind::<Integer, _>(done)
        .execute(conn)
        .map(drop)
}

/// How `mark_interrupted.sql` begins the error of an attempt whose process
/// died while it ran (a clean stop records another).
pub(crate) const DIED: &str = "interrupted: the process applying it";

/// How an attempt is recorded whose `CREATE INDEX CONCURRENTLY IF NOT
/// EXISTS` finished but whose check against the catalog could not be made
/// (cancelled, say): the next attempt runs it again, a no-op once the index
/// is there, and checks it.
pub(crate) const UNCONFIRMED: &str = "interrupted: the index statement finished but could not be \
                                      checked";

/// What [`progress`] runs, as text, to go in the same round trip as the
/// statement it records.
pub(crate) fn progress_sql(t: &Tables, id: i64, done: i32) -> String {
    inline(&t.sql.progress, &[id.to_string(), done.to_string()])
}

/// The statements an attempt has recorded as completed (fewer than it
/// sent when a transaction the migration opened itself was rolled back).
pub(crate) fn attempt_progress(conn: &mut PgConnection, t: &Tables, id: i64) -> QueryResult<i32> {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = Integer)]
        n: i32,
    }
    sql_query(&t.sql.attempt_progress)
        .bind::<BigInt, _>(id)
        .get_result::<N>(conn)
        .map(|r| r.n)
}

/// Closes an attempt as `success` or `failed`.
pub(crate) fn finish_attempt(
    conn: &mut PgConnection,
    t: &Tables,
    id: i64,
    outcome: &str,
    error: Option<&str>,
) -> QueryResult<()> {
    sql_query(&t.sql.finish_attempt)
        .bind::<BigInt, _>(id)
        .bind::<Text, _>(outcome)
        .bind::<Nullable<Text>, _>(error)
        .execute(conn)
        .map(drop)
}

/// A value for SQL sent whole (no parameters): an escape string, read the
/// same whatever `standard_conforming_strings` a migration left set.
fn literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `sql` with its parameters `$1`, `$2`, ... replaced by `values`, in one
/// pass (this is on every migration's success path); a `$` inside a quoted
/// literal or identifier (a table name) is left alone.
fn inline(sql: &str, values: &[String]) -> String {
    let mut out = String::with_capacity(sql.len() + values.iter().map(String::len).sum::<usize>());
    let bytes = sql.as_bytes();
    let (mut copied, mut i) = (0, 0);
    let mut quote = None;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => quote = Some(b),
            None if b == b'$' => {
                let digits = bytes[i + 1..]
                    .iter()
                    .take_while(|d| d.is_ascii_digit())
                    .count();
                let n: usize = sql[i + 1..i + 1 + digits].parse().unwrap_or(0);
                if let Some(v) = n.checked_sub(1).and_then(|k| values.get(k)) {
                    out.push_str(&sql[copied..i]);
                    out.push_str(v);
                    i += 1 + digits;
                    copied = i;
                    continue;
                }
            }
            None => {}
        }
        i += 1;
    }
    out.push_str(&sql[copied..]);
    out
}

/// Records transactional migration `m` as applied, inside its transaction,
/// after its SQL: the text to send in the same round trip
/// (`record_success.sql`, after `other_spelling.sql` when `m`'s version has
/// leading zeros). Its version row, only under the migration's own lock
/// `key` (tried once, [`is_claim_refused`] tells the refusal), and a
/// successful attempt; fails, rolling the transaction back, when the other
/// track applied it under its plain spelling or died halfway in it
/// meanwhile.
pub(crate) fn record_success_sql(t: &Tables, m: &Migration, statements: i32, key: i64) -> String {
    let plain = crate::migration::normal(m.version());
    let record = inline(
        &t.sql.record_success,
        &[
            literal(m.version()),
            literal(m.name()),
            literal(m.track().as_str()),
            literal(m.checksum()),
            statements.to_string(),
            literal(HOST.as_str()),
            client_pid().to_string(),
            OS_USER.as_deref().map_or("NULL".into(), literal),
            key.to_string(),
            if plain == m.version() {
                literal(plain)
            } else {
                format!("{}, {}", literal(m.version()), literal(plain))
            },
        ],
    );
    if plain == m.version() {
        record
    } else {
        format!(
            "{};\n{record}",
            inline(&t.sql.other_spelling, &[literal(plain)])
        )
    }
}

/// The version row of `m`, as text.
fn insert_version_sql(t: &Tables, m: &Migration) -> String {
    inline(
        &t.sql.insert_version,
        &[literal(m.version()), literal(m.checksum())],
    )
}

/// Whether `e` is the refusal of [`record_success_sql`] to take a lock
/// another session holds: its NULL version row.
pub(crate) fn is_claim_refused(t: &Tables, e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error as E};
    let table = t.migrations_table.rsplit('.').next().unwrap_or_default();
    matches!(e, E::DatabaseError(DatabaseErrorKind::NotNullViolation, info)
        if info.column_name() == Some("version")
            && info.table_name().is_some_and(|n| n == table.trim_matches('"')))
}

/// How a no-transaction migration's attempt `id` ends once its last
/// statement ran, as one batch in one round trip: in a transaction, its
/// version row inserted (`up`) or deleted (`down`), the last statement's
/// progress (`total` done) and the attempt closed as a success.
pub(crate) fn finish_statements_sql(
    t: &Tables,
    m: &Migration,
    up: bool,
    id: i64,
    total: i32,
) -> String {
    let version = if up {
        insert_version_sql(t, m)
    } else {
        inline(&t.sql.delete_version, &[literal(m.version())])
    };
    let finish = inline(
        &t.sql.finish_attempt,
        &[id.to_string(), literal("success"), "NULL".to_string()],
    );
    let progress = inline(&t.sql.progress, &[id.to_string(), total.to_string()]);
    format!("BEGIN;\n{version};\n{progress};\n{finish};\nCOMMIT")
}

/// What [`record_revert`] runs, as text (see [`record_success_sql`]).
pub(crate) fn record_revert_sql(
    t: &Tables,
    m: &Migration,
    down_checksum: &str,
    statements: i32,
) -> String {
    inline(
        &t.sql.record_revert,
        &[
            literal(m.version()),
            literal(m.name()),
            literal(m.track().as_str()),
            literal(down_checksum),
            statements.to_string(),
            literal(HOST.as_str()),
            client_pid().to_string(),
            OS_USER.as_deref().map_or("NULL".into(), literal),
        ],
    )
}

/// Records a failed transactional attempt, after its rollback.
pub(crate) fn record_failure(
    conn: &mut PgConnection,
    t: &Tables,
    m: &Migration,
    op: Operation<'_>,
    error: &str,
    statements: i32,
    elapsed_secs: f64,
) -> QueryResult<()> {
    sql_query(&t.sql.record_failure)
        .bind::<Text, _>(m.version())
        .bind::<Text, _>(m.name())
        .bind::<Text, _>(m.track().as_str())
        .bind::<Text, _>(op.checksum)
        .bind::<Text, _>(error)
        .bind::<Integer, _>(statements)
        .bind::<Text, _>(HOST.as_str())
        .bind::<Integer, _>(client_pid())
        .bind::<Double, _>(elapsed_secs)
        .bind::<Text, _>(op.name)
        .bind::<Nullable<Text>, _>(OS_USER.as_deref())
        .execute(conn)
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_sent_whole_are_escaped_and_placed() {
        assert_eq!(literal("it's a \\ test"), "E'it\\'s a \\\\ test'");
        assert_eq!(
            inline(
                "VALUES ($1, $10, $2)",
                &(1..=10).map(|i| i.to_string()).collect::<Vec<_>>()
            ),
            "VALUES (1, 10, 2)"
        );
        // A table named with `$1` in it, a parameter past the values, and
        // a value that itself reads `$2`: none is replaced.
        assert_eq!(
            inline(
                "INSERT INTO \"t$1\" VALUES ($1, '$2', $3)",
                &["E'$2'".to_string(), "x".to_string()]
            ),
            "INSERT INTO \"t$1\" VALUES (E'$2', '$2', $3)"
        );
    }
}
