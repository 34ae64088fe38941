//! The ledger: diesel's `__diesel_schema_migrations` (what is applied) and
//! the harness's attempts table (every attempt, its outcome and progress).
//! All SQL lives in `src/sql/*.sql`.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_query;
use diesel::sql_types::{BigInt, Bool, Double, Integer, Nullable, Text};
use once_cell::sync::Lazy;

use crate::error::{Error, ErrorKind};
use crate::migration::Migration;
use crate::source::Track;

/// The ledger tables as configured: each `name` or `schema.name`, validated.
/// Resolved against a database (see [`Ledger::resolve`]) before anything
/// is written.
#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    /// The migrations table as configured, for messages and the lock key
    /// earlier releases derived from it.
    pub configured: String,
    migrations: Name,
    attempts: Name,
}

/// A validated table name: an optional schema and the table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Name {
    schema: Option<String>,
    table: String,
}

impl Name {
    fn parse(name: &str) -> Result<Self, String> {
        quote_table_name(name)?;
        Ok(match name.split_once('.') {
            Some((schema, table)) => Name {
                schema: Some(schema.to_string()),
                table: table.to_string(),
            },
            None => Name {
                schema: None,
                table: name.to_string(),
            },
        })
    }

    /// Quoted, qualified with `schema` when it has none of its own.
    fn quoted_in(&self, schema: Option<&str>) -> String {
        match self.schema.as_deref().or(schema) {
            Some(s) => format!("{}.{}", quote_ident(s), quote_ident(&self.table)),
            None => quote_ident(&self.table),
        }
    }
}

fn quote_ident(part: &str) -> String {
    format!("\"{part}\"")
}

/// The resolved ledger tables, quoted (qualified with the schema the
/// ledger lives in, except on the fast path), and the SQL that uses them.
#[derive(Debug, Clone)]
pub(crate) struct Tables {
    /// The schema the ledger lives in (`None`: unresolved, the fast path).
    pub schema: Option<String>,
    /// The migrations table's own name.
    pub migrations_table: String,
    /// Whether each table exists (unknown on the fast path: `true`).
    pub migrations_exist: bool,
    pub attempts_exist: bool,
    /// The attempts table's layout version (see `ATTEMPTS_VERSION`).
    pub attempts_version: u32,
    sql: Sql,
}

#[derive(Debug, Clone)]
struct Sql {
    create_migrations: String,
    create_attempts: String,
    upgrade_attempts_v2: String,
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

/// The layout of the attempts table this release writes. 1: the first
/// (no `retrying` outcome); 2: `retrying`, and the version in the table's
/// comment.
pub(crate) const ATTEMPTS_VERSION: u32 = 2;

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
        quoted.push(quote_ident(p));
    }
    Ok(quoted.join("."))
}

impl Ledger {
    /// `attempts`: `None` for the default, `__diesel_rollout_attempts` beside
    /// diesel's table and `<migrations table>_attempts` beside another one,
    /// in the migrations table's schema.
    pub(crate) fn new(migrations: &str, attempts: Option<&str>) -> Result<Self, String> {
        let m = Name::parse(migrations)?;
        let a = match attempts {
            Some(a) => Name::parse(a)?,
            None => Name {
                schema: m.schema.clone(),
                table: if m.table == "__diesel_schema_migrations" {
                    "__diesel_rollout_attempts".to_string()
                } else {
                    format!("{}_attempts", m.table)
                },
            },
        };
        if a.table.len() > 63 {
            return Err(format!(
                "the attempts table name `{}` is longer than 63 bytes: name it with \
                 `attempts_table` (--attempts-table)",
                a.table
            ));
        }
        if m.table == a.table && (m.schema == a.schema || a.schema.is_none()) {
            return Err(format!(
                "the migrations table and the attempts table are both `{migrations}`: \
                 give them different names"
            ));
        }
        Ok(Ledger {
            configured: migrations.to_string(),
            migrations: m,
            attempts: a,
        })
    }

    /// The tables as the fast path reads them: unqualified names resolve on
    /// `search_path`, as [`Ledger::resolve`] does for the migrations table,
    /// and the fast path's query checks that the attempts table it finds
    /// is beside it.
    pub(crate) fn unresolved(&self) -> Tables {
        self.tables(None, true, true, ATTEMPTS_VERSION)
    }

    /// Where the ledger lives in the database `conn` is connected to: the
    /// migrations table's schema when it is configured, else the schema
    /// where PostgreSQL finds the table on `search_path` (`to_regclass`), as
    /// any query of it would, and only when it does not exist yet, the
    /// schema a `CREATE TABLE` would use (`current_schema()`). The attempts
    /// table lives beside it unless configured with a schema of its own.
    /// Every path that reads or writes the ledger under a lock, and
    /// `status` and `verify`, resolve it this way.
    pub(crate) fn resolve(&self, conn: &mut PgConnection) -> Result<Tables, Error> {
        let r = self
            .query_resolution(conn)
            .map_err(|e| Error::db("finding the migration ledger's schema", e))?;
        self.resolved(r)
    }

    fn query_resolution(&self, conn: &mut PgConnection) -> QueryResult<Resolution> {
        sql_query(include_str!("sql/resolve_ledger.sql"))
            .bind::<Text, _>(self.migrations.quoted_in(None))
            .bind::<Nullable<Text>, _>(self.migrations.schema.as_deref())
            .bind::<Nullable<Text>, _>(self.attempts.schema.as_deref())
            .bind::<Text, _>(&self.attempts.table)
            .get_result(conn)
    }

    fn resolved(&self, r: Resolution) -> Result<Tables, Error> {
        let Some(schema) = r.schema else {
            return Err(Error::new(
                ErrorKind::Config,
                match &self.migrations.schema {
                    Some(s) => format!(
                        "schema `{s}` of the migrations table `{}` does not exist: create it, \
                         or name another table",
                        self.configured
                    ),
                    None => format!(
                        "the migrations table `{}` does not exist and no schema on this \
                         session's search_path exists to create it in: create a schema on \
                         the search_path, or qualify the table (`schema.table`)",
                        self.configured
                    ),
                },
            ));
        };
        if !r.attempts_schema_exists {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "schema `{}` of the attempts table `{}` does not exist: create it, or \
                     name another attempts table",
                    self.attempts.schema.as_deref().unwrap_or(&schema),
                    self.attempts.table
                ),
            ));
        }
        let version = match &r.attempts_comment {
            Some(c) => c
                .strip_prefix("diesel-rollout attempts v")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(1),
            None => 1,
        };
        Ok(self.tables(Some(&schema), r.migrations_exist, r.attempts_exist, version))
    }

    fn tables(
        &self,
        schema: Option<&str>,
        migrations_exist: bool,
        attempts_exist: bool,
        attempts_version: u32,
    ) -> Tables {
        let m = self.migrations.quoted_in(schema);
        let a = self.attempts.quoted_in(schema);
        // The ledger attempts belong to, as the SQL value `schema.table`:
        // known once resolved; on the fast path, read from the catalog.
        let ledger = match schema.or(self.migrations.schema.as_deref()) {
            Some(s) => format!("'{}.{}'", s, self.migrations.table),
            None => format!(
                "(SELECT n.nspname || '.' || c.relname FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = '{m}'::regclass)"
            ),
        };
        // Unqualified names on the fast path must resolve side by side.
        let beside = if schema.is_none() && self.attempts.schema.is_none() {
            format!(
                "(SELECT relnamespace FROM pg_class WHERE oid = '{m}'::regclass) \
                 = (SELECT relnamespace FROM pg_class WHERE oid = '{a}'::regclass)"
            )
        } else {
            "true".to_string()
        };
        let r = |t: &str| {
            t.replace("{migrations}", &m)
                .replace("{attempts}", &a)
                .replace("{ledger}", &ledger)
                .replace("{attempts_beside}", &beside)
        };
        Tables {
            schema: self
                .migrations
                .schema
                .clone()
                .or_else(|| schema.map(str::to_string)),
            migrations_table: self.migrations.table.clone(),
            migrations_exist,
            attempts_exist,
            attempts_version,
            sql: Sql {
                create_migrations: r(include_str!("sql/create_migrations_table.sql")),
                create_attempts: r(include_str!("sql/create_attempts_table.sql")),
                upgrade_attempts_v2: r(include_str!("sql/upgrade_attempts_v2.sql")),
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
        }
    }
}

/// What `resolve_ledger.sql` finds.
#[derive(QueryableByName)]
struct Resolution {
    #[diesel(sql_type = Nullable<Text>)]
    schema: Option<String>,
    #[diesel(sql_type = Bool)]
    migrations_exist: bool,
    #[diesel(sql_type = Bool)]
    attempts_schema_exists: bool,
    #[diesel(sql_type = Bool)]
    attempts_exist: bool,
    #[diesel(sql_type = Nullable<Text>)]
    attempts_comment: Option<String>,
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
            statements_total: None,
            attempt_checksum: None,
            applied_checksum: f.applied_checksum,
            finished_epoch: None,
        })
        .collect())
}

/// The ledger rows, working whichever ledger tables exist (and on a
/// read-only session). `t` is resolved.
pub(crate) fn rows(conn: &mut PgConnection, t: &Tables) -> Result<Vec<LedgerRow>, Error> {
    let query = match (t.migrations_exist, t.attempts_exist) {
        (true, true) => &t.sql.ledger_rows,
        (true, false) => &t.sql.applied_only,
        (false, _) => return Ok(Vec::new()),
    };
    sql_query(query)
        .load(conn)
        .map_err(|e| Error::db("reading the migration ledger", e))
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
    if t.migrations_exist && t.attempts_exist && t.attempts_version >= ATTEMPTS_VERSION {
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
            }
            if !now.attempts_exist {
                tracing::info!(schema = ?now.schema, "creating the attempts table");
                c.batch_execute(&now.sql.create_attempts)?;
                now.attempts_exist = true;
                now.attempts_version = ATTEMPTS_VERSION;
            }
            if now.attempts_version < 2 {
                tracing::info!(
                    from = now.attempts_version,
                    to = ATTEMPTS_VERSION,
                    "upgrading the attempts table an earlier release created"
                );
                c.batch_execute(&now.sql.upgrade_attempts_v2)?;
                now.attempts_version = 2;
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

/// Marks every attempt of `track` still `running` as interrupted: under the
/// track's lock, none of them is alive. Call under the track's lock.
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
        assert!(Ledger::new("x", Some("x")).is_err());
        assert!(Ledger::new("s.x", Some("x")).is_err());
        assert!(Ledger::new("s.x", Some("t.x")).is_ok());
    }

    #[test]
    fn the_attempts_table_follows_the_migrations_table() {
        let l = Ledger::new("public.__diesel_schema_migrations", None).unwrap();
        let t = l.tables(Some("elsewhere"), true, true, ATTEMPTS_VERSION);
        assert_eq!(t.schema.as_deref(), Some("public"));
        assert!(t
            .sql
            .insert_version
            .contains("\"public\".\"__diesel_schema_migrations\""));
        assert!(t
            .sql
            .start_attempt
            .contains("\"public\".\"__diesel_rollout_attempts\""));
        let l = Ledger::new("ledger", None).unwrap();
        let t = l.tables(Some("app"), true, true, ATTEMPTS_VERSION);
        assert!(t.sql.start_attempt.contains("\"app\".\"ledger_attempts\""));
        assert!(l
            .unresolved()
            .sql
            .start_attempt
            .contains(" \"ledger_attempts\""));
    }
}
