//! The ledger: diesel's `__diesel_schema_migrations` (what is applied) and
//! the harness's attempts table (every attempt, its outcome and progress).
//! All SQL lives in `src/sql/*.sql`.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_query;
use diesel::sql_types::{BigInt, Bool, Double, Integer, Nullable, Text};
use once_cell::sync::Lazy;

use crate::error::Error;
use crate::migration::Migration;
use crate::source::Track;

/// Table names, validated and quoted.
#[derive(Debug, Clone)]
pub(crate) struct Tables {
    /// As given (`__diesel_schema_migrations`), for lock keys and messages.
    pub migrations_name: String,
    attempts_name: String,
    sql: Sql,
    migrations_regclass: String,
    attempts_regclass: String,
}

#[derive(Debug, Clone)]
struct Sql {
    create_migrations: String,
    create_attempts: String,
    ledger_rows: String,
    applied_fast: String,
    applied_only: String,
    mark_interrupted: String,
    start_attempt: String,
    record_success: String,
    record_failure: String,
    progress: String,
    finish_attempt: String,
    insert_version: String,
}

/// Quotes a table name (`name` or `schema.name`) as an SQL identifier.
///
/// # Errors
/// When a part is empty, longer than 63 bytes, or not a plain identifier.
pub(crate) fn quote_table_name(name: &str) -> Result<String, String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 {
        return Err(format!(
            "table name `{name}` has more than one `.`: use `table` or `schema.table`"
        ));
    }
    let mut quoted = Vec::new();
    for p in parts {
        let ok = !p.is_empty()
            && p.len() <= 63
            && p.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(format!(
                "table name `{name}` is not a plain identifier: use letters, digits and `_` \
                 (at most 63 bytes per part), starting with a letter or `_`"
            ));
        }
        quoted.push(format!("\"{p}\""));
    }
    Ok(quoted.join("."))
}

impl Tables {
    pub(crate) fn new(migrations: &str, attempts: &str) -> Result<Self, String> {
        let m = quote_table_name(migrations)?;
        let a = quote_table_name(attempts)?;
        if m == a {
            return Err(format!(
                "the migrations table and the attempts table are both `{migrations}`: \
                 give them different names"
            ));
        }
        let r = |t: &str| t.replace("{migrations}", &m).replace("{attempts}", &a);
        Ok(Tables {
            migrations_name: migrations.to_string(),
            attempts_name: attempts.to_string(),
            migrations_regclass: m.clone(),
            attempts_regclass: a.clone(),
            sql: Sql {
                create_migrations: r(include_str!("sql/create_migrations_table.sql")),
                create_attempts: r(include_str!("sql/create_attempts_table.sql")),
                ledger_rows: r(include_str!("sql/ledger_rows.sql")),
                applied_fast: r(include_str!("sql/applied_fast.sql")),
                applied_only: r(include_str!("sql/applied_only.sql")),
                mark_interrupted: r(include_str!("sql/mark_interrupted.sql")),
                start_attempt: r(include_str!("sql/start_attempt.sql")),
                record_success: r(include_str!("sql/record_success.sql")),
                record_failure: r(include_str!("sql/record_failure.sql")),
                progress: r(include_str!("sql/progress.sql")),
                finish_attempt: r(include_str!("sql/finish_attempt.sql")),
                insert_version: r(include_str!("sql/insert_version.sql")),
            },
        })
    }
}

impl Tables {
    /// The same tables, qualified with the schema they resolve to now.
    /// Called before any migration runs: a migration that changes
    /// `search_path` must not send the harness's own ledger writes elsewhere.
    pub(crate) fn pinned(&self, conn: &mut PgConnection) -> Result<Tables, Error> {
        #[derive(QueryableByName)]
        struct Schema {
            #[diesel(sql_type = Nullable<Text>)]
            schema: Option<String>,
        }
        let schema = sql_query("SELECT current_schema() AS schema")
            .get_result::<Schema>(conn)
            .map_err(|e| Error::db("reading the current schema", e))?
            .schema;
        let qualify = |name: &str, schema: &str| {
            if name.contains('.') {
                name.to_string()
            } else {
                format!("{schema}.{name}")
            }
        };
        let pinned = schema.and_then(|s| {
            Tables::new(
                &qualify(&self.migrations_name, &s),
                &qualify(&self.attempts_name, &s),
            )
            .ok()
        });
        Ok(match pinned {
            Some(mut t) => {
                // Lock keys and messages keep the name as configured.
                t.migrations_name = self.migrations_name.clone();
                t
            }
            // No schema on the search path, or one that needs quoting: as is.
            None => self.clone(),
        })
    }
}

/// One version as the ledger knows it.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct LedgerRow {
    #[diesel(sql_type = Text)]
    pub version: String,
    #[diesel(sql_type = Bool)]
    pub applied: bool,
    #[diesel(sql_type = Nullable<Text>)]
    pub applied_at: Option<String>,
    /// Outcome of the latest attempt (`running`, `success`, `failed`,
    /// `interrupted`), when the harness attempted it.
    #[diesel(sql_type = Nullable<Text>)]
    pub outcome: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub error: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    pub statements_completed: Option<i32>,
    #[diesel(sql_type = Nullable<Text>)]
    pub attempt_checksum: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub applied_checksum: Option<String>,
    /// When the latest attempt finished (server clock, Unix seconds).
    #[diesel(sql_type = Nullable<Double>)]
    pub finished_epoch: Option<f64>,
}

impl LedgerRow {
    /// Not applied, and the latest attempt did not succeed.
    pub(crate) fn failed(&self) -> bool {
        !self.applied
            && matches!(
                self.outcome.as_deref(),
                Some("failed" | "retrying" | "interrupted")
            )
    }
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = Bool)]
    migrations: bool,
    #[diesel(sql_type = Bool)]
    attempts: bool,
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

/// Which ledger tables exist.
pub(crate) fn tables_exist(conn: &mut PgConnection, t: &Tables) -> Result<(bool, bool), Error> {
    let e: Exists = sql_query(include_str!("sql/tables_exist.sql"))
        .bind::<Text, _>(&t.migrations_regclass)
        .bind::<Text, _>(&t.attempts_regclass)
        .get_result(conn)
        .map_err(|e| Error::db("checking for the ledger tables", e))?;
    Ok((e.migrations, e.attempts))
}

/// The fast path's single query: applied versions and their checksums
/// only. Fails when a ledger table is missing.
pub(crate) fn rows_fast(conn: &mut PgConnection, t: &Tables) -> QueryResult<Vec<LedgerRow>> {
    #[derive(QueryableByName)]
    struct Fast {
        #[diesel(sql_type = Text)]
        version: String,
        #[diesel(sql_type = Nullable<Text>)]
        applied_checksum: Option<String>,
    }
    let rows: Vec<Fast> = sql_query(&t.sql.applied_fast).load(conn)?;
    Ok(rows
        .into_iter()
        .map(|f| LedgerRow {
            version: f.version,
            applied: true,
            applied_at: None,
            outcome: None,
            error: None,
            statements_completed: None,
            attempt_checksum: None,
            applied_checksum: f.applied_checksum,
            finished_epoch: None,
        })
        .collect())
}

/// The ledger rows, working whichever ledger tables exist (and on a
/// read-only session).
pub(crate) fn rows(conn: &mut PgConnection, t: &Tables) -> Result<Vec<LedgerRow>, Error> {
    let query = match tables_exist(conn, t)? {
        (true, true) => &t.sql.ledger_rows,
        (true, false) => &t.sql.applied_only,
        (false, _) => return Ok(Vec::new()),
    };
    sql_query(query)
        .load(conn)
        .map_err(|e| Error::db("reading the migration ledger", e))
}

/// Creates the ledger tables that are missing. Call under the lock.
pub(crate) fn ensure_tables(conn: &mut PgConnection, t: &Tables) -> Result<(), Error> {
    let (migrations, attempts) = tables_exist(conn, t)?;
    if !migrations {
        tracing::info!(table = %t.migrations_name, "creating the migrations table");
        conn.batch_execute(&t.sql.create_migrations)
            .map_err(|e| Error::db("creating the migrations table", e))?;
    }
    if !attempts {
        tracing::info!("creating the attempts table");
        conn.batch_execute(&t.sql.create_attempts)
            .map_err(|e| Error::db("creating the attempts table", e))?;
    }
    Ok(())
}

/// Marks attempts of `track` left `running` by a dead process. Call under
/// the track's lock.
pub(crate) fn mark_interrupted(
    conn: &mut PgConnection,
    t: &Tables,
    track: Track,
) -> Result<usize, Error> {
    sql_query(&t.sql.mark_interrupted)
        .bind::<Text, _>(track.as_str())
        .execute(conn)
        .map_err(|e| Error::db("marking interrupted attempts", e))
}

/// Records a started attempt (autocommit) and returns its id.
pub(crate) fn start_attempt(
    conn: &mut PgConnection,
    t: &Tables,
    m: &Migration,
    completed: i32,
    total: i32,
) -> QueryResult<i64> {
    let row: Id = sql_query(&t.sql.start_attempt)
        .bind::<Text, _>(m.version())
        .bind::<Text, _>(m.name())
        .bind::<Text, _>(m.track().as_str())
        .bind::<Text, _>(m.checksum())
        .bind::<Integer, _>(completed)
        .bind::<Integer, _>(total)
        .bind::<Text, _>(HOST.as_str())
        .bind::<Integer, _>(client_pid())
        .get_result(conn)?;
    Ok(row.id)
}

/// Records statements completed by an attempt.
pub(crate) fn progress(conn: &mut PgConnection, t: &Tables, id: i64, done: i32) -> QueryResult<()> {
    sql_query(&t.sql.progress)
        .bind::<BigInt, _>(id)
        .bind::<Integer, _>(done)
        .execute(conn)
        .map(drop)
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

/// Records the version as applied (inside the migration's transaction for
/// a transactional one).
pub(crate) fn insert_version(
    conn: &mut PgConnection,
    t: &Tables,
    version: &str,
) -> QueryResult<()> {
    sql_query(&t.sql.insert_version)
        .bind::<Text, _>(version)
        .execute(conn)
        .map(drop)
}

/// Records a transactional migration as applied (its version row and a
/// successful attempt, in one statement), inside its transaction.
pub(crate) fn record_success(
    conn: &mut PgConnection,
    t: &Tables,
    m: &Migration,
    statements: i32,
) -> QueryResult<()> {
    sql_query(&t.sql.record_success)
        .bind::<Text, _>(m.version())
        .bind::<Text, _>(m.name())
        .bind::<Text, _>(m.track().as_str())
        .bind::<Text, _>(m.checksum())
        .bind::<Integer, _>(statements)
        .bind::<Text, _>(HOST.as_str())
        .bind::<Integer, _>(client_pid())
        .execute(conn)
        .map(drop)
}

/// Records a failed transactional attempt, after its rollback.
pub(crate) fn record_failure(
    conn: &mut PgConnection,
    t: &Tables,
    m: &Migration,
    error: &str,
    statements: i32,
    elapsed_secs: f64,
) -> QueryResult<()> {
    sql_query(&t.sql.record_failure)
        .bind::<Text, _>(m.version())
        .bind::<Text, _>(m.name())
        .bind::<Text, _>(m.track().as_str())
        .bind::<Text, _>(m.checksum())
        .bind::<Text, _>(error)
        .bind::<Integer, _>(statements)
        .bind::<Text, _>(HOST.as_str())
        .bind::<Integer, _>(client_pid())
        .bind::<Double, _>(elapsed_secs)
        .execute(conn)
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_quoted_or_refused() {
        assert_eq!(quote_table_name("__x").unwrap(), "\"__x\"");
        assert_eq!(
            quote_table_name("app.ledger").unwrap(),
            "\"app\".\"ledger\""
        );
        assert!(quote_table_name("a;drop").is_err());
        assert!(quote_table_name("a.b.c").is_err());
        assert!(quote_table_name("").is_err());
        assert!(quote_table_name("1abc").is_err());
        assert!(Tables::new("x", "x").is_err());
    }
}
