//! The ledger's tables as configured and as resolved in a database, and
//! the SQL that uses them (from `src/sql/*.sql`).

use diesel::prelude::*;
use diesel::sql_query;
use diesel::sql_types::{Bool, Nullable, Text};

use crate::error::{Error, ErrorKind};

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
    /// Whether the migrations table has the `checksum` column.
    pub migrations_checksum: bool,
    pub attempts_exist: bool,
    /// The attempts table's layout version (see `ATTEMPTS_VERSION`).
    pub attempts_version: u32,
    /// Whether the attempts table has the `operation` and `ledger` columns
    /// `ledger_rows.sql` reads (else `ledger_rows_v1.sql` is used): some
    /// tables commented "v2" have them, some do not.
    pub attempts_operations: bool,
    pub(crate) sql: Sql,
}

#[derive(Debug, Clone)]
pub(crate) struct Sql {
    pub create_migrations: String,
    pub create_attempts: String,
    pub upgrade_attempts: String,
    pub add_checksum_column: String,
    pub backfill_checksums: String,
    pub ledger_rows: String,
    pub ledger_row: String,
    pub revert_scope: String,
    pub ledger_rows_v1: String,
    pub applied_only: String,
    pub mark_interrupted: String,
    pub start_attempt: String,
    pub record_success: String,
    pub other_spelling: String,
    pub record_failure: String,
    pub progress: String,
    pub finish_attempt: String,
    pub attempt_progress: String,
    pub insert_version: String,
    pub delete_version: String,
    pub record_revert: String,
    pub record_resolution: String,
}

/// The layout of the attempts table this release writes. 1: the first
/// (no `retrying` outcome); 2: `retrying`, and the version in the table's
/// comment (tables commented "v2" differ: some lack `ledger`, all lack
/// `operation`, `os_user` and `db_user`); 3: every column of
/// `create_attempts_table.sql`.
pub(crate) const ATTEMPTS_VERSION: u32 = 3;

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

    /// The tables with unqualified names, which resolve on `search_path`.
    #[cfg(test)]
    pub(crate) fn unresolved(&self) -> Tables {
        self.tables(None, true, true, ATTEMPTS_VERSION)
    }

    /// The fast path's one query (`applied_fast.sql`, the migrations table
    /// unqualified, so it resolves on `search_path` as [`Ledger::resolve`]
    /// does), built alone rather than with every statement of the ledger.
    pub(crate) fn fast_query(&self) -> String {
        include_str!("../sql/applied_fast.sql")
            .replace("{migrations}", &self.migrations.quoted_in(None))
    }

    /// Whether the migrations table is diesel's own, unqualified: the fast
    /// path can then use a statement diesel prepares once per connection.
    pub(crate) fn is_diesels(&self) -> bool {
        self.migrations.schema.is_none() && self.migrations.table == "__diesel_schema_migrations"
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

    pub(crate) fn query_resolution(&self, conn: &mut PgConnection) -> QueryResult<Resolution> {
        sql_query(include_str!("../sql/resolve_ledger.sql"))
            .bind::<Text, _>(self.migrations.quoted_in(None))
            .bind::<Nullable<Text>, _>(self.migrations.schema.as_deref())
            .bind::<Nullable<Text>, _>(self.attempts.schema.as_deref())
            .bind::<Text, _>(&self.attempts.table)
            .get_result(conn)
    }

    pub(crate) fn resolved(&self, r: Resolution) -> Result<Tables, Error> {
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
        let mut t = self.tables(Some(&schema), r.migrations_exist, r.attempts_exist, version);
        t.set_migrations_checksum(r.migrations_checksum);
        t.attempts_operations = r.attempts_operations;
        Ok(t)
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
        let r = |t: &str| {
            without_comment_lines(t)
                .replace("{migrations_checksum}", "m.checksum")
                .replace("{migrations}", &m)
                .replace("{attempts}", &a)
                .replace("{ledger}", &ledger)
        };
        Tables {
            schema: self
                .migrations
                .schema
                .clone()
                .or_else(|| schema.map(str::to_string)),
            migrations_table: self.migrations.table.clone(),
            migrations_exist,
            migrations_checksum: true,
            attempts_exist,
            attempts_version,
            attempts_operations: attempts_version >= ATTEMPTS_VERSION,
            sql: Sql {
                create_migrations: r(include_str!("../sql/create_migrations_table.sql")),
                create_attempts: r(include_str!("../sql/create_attempts_table.sql")),
                upgrade_attempts: r(include_str!("../sql/upgrade_attempts.sql")),
                add_checksum_column: r(include_str!("../sql/add_checksum_column.sql")),
                backfill_checksums: r(include_str!("../sql/backfill_checksums.sql")),
                ledger_rows: r(include_str!("../sql/ledger_rows.sql")),
                ledger_row: r(include_str!("../sql/ledger_row.sql")),
                revert_scope: r(include_str!("../sql/revert_scope.sql")),
                ledger_rows_v1: r(include_str!("../sql/ledger_rows_v1.sql")),
                applied_only: r(include_str!("../sql/applied_only.sql")),
                mark_interrupted: r(include_str!("../sql/mark_interrupted.sql")),
                start_attempt: r(include_str!("../sql/start_attempt.sql")),
                record_success: r(include_str!("../sql/record_success.sql")),
                other_spelling: r(include_str!("../sql/other_spelling.sql")),
                record_failure: r(include_str!("../sql/record_failure.sql")),
                progress: r(include_str!("../sql/progress.sql")),
                finish_attempt: r(include_str!("../sql/finish_attempt.sql")),
                attempt_progress: r(include_str!("../sql/attempt_progress.sql")),
                insert_version: r(include_str!("../sql/insert_version.sql")),
                delete_version: r(include_str!("../sql/delete_version.sql")),
                record_revert: r(include_str!("../sql/record_revert.sql")),
                record_resolution: r(include_str!("../sql/record_resolution.sql")),
            },
        }
    }
}

impl Tables {
    /// Records whether the migrations table has its `checksum` column; the
    /// queries that read it fall back to the attempts without it.
    pub(crate) fn set_migrations_checksum(&mut self, present: bool) {
        if self.migrations_checksum != present {
            self.migrations_checksum = present;
            if !present {
                for q in [&mut self.sql.ledger_rows, &mut self.sql.ledger_row] {
                    *q = q.replace("coalesce(m.checksum, ", "coalesce(NULL::text, ");
                }
            }
        }
    }
}

/// `sql` without its whole-line `--` comments, which would otherwise be
/// sent (and parsed by the server) with every statement.
fn without_comment_lines(sql: &str) -> String {
    sql.lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What `resolve_ledger.sql` finds.
#[derive(QueryableByName)]
pub(crate) struct Resolution {
    #[diesel(sql_type = Nullable<Text>)]
    schema: Option<String>,
    #[diesel(sql_type = Bool)]
    migrations_exist: bool,
    #[diesel(sql_type = Bool)]
    migrations_checksum: bool,
    #[diesel(sql_type = Bool)]
    attempts_schema_exists: bool,
    #[diesel(sql_type = Bool)]
    attempts_exist: bool,
    #[diesel(sql_type = Nullable<Text>)]
    attempts_comment: Option<String>,
    #[diesel(sql_type = Bool)]
    attempts_operations: bool,
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
