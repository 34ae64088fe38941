//! Reading the ledger: every version's row, one version's, a few
//! versions' (by the indexes on version), and the fast path's applied
//! versions alone.

use diesel::prelude::*;
use diesel::sql_query;
use diesel::sql_types::{Array, Bool, Nullable, Text};

use super::{Ledger, LedgerRow, Tables};
use crate::error::Error;
use crate::migration::{normal, spellings};

mod diesels {
    diesel::table! {
        /// diesel's ledger, as the fast path reads it.
        __diesel_schema_migrations (version) {
            version -> Text,
            checksum -> Nullable<Text>,
        }
    }
}

/// The fast path's single query: applied versions and their checksums
/// only, from the migrations table alone. For diesel's own table, a
/// statement diesel prepares once per connection and reuses. Fails when
/// the table (or its checksum column) is missing.
pub(crate) fn rows_fast(conn: &mut PgConnection, ledger: &Ledger) -> QueryResult<Vec<LedgerRow>> {
    #[derive(QueryableByName)]
    struct Fast {
        #[diesel(sql_type = Text)]
        version: String,
        #[diesel(sql_type = Nullable<Text>)]
        applied_checksum: Option<String>,
    }
    let rows: Vec<(String, Option<String>)> = if ledger.is_diesels() {
        use self::diesels::__diesel_schema_migrations::dsl::*;
        __diesel_schema_migrations
            .select((version, checksum))
            .load(conn)?
    } else {
        sql_query(ledger.fast_query())
            .load::<Fast>(conn)?
            .into_iter()
            .map(|f| (f.version, f.applied_checksum))
            .collect()
    };
    Ok(rows
        .into_iter()
        .map(|(version, checksum)| LedgerRow::applied(version, checksum))
        .collect())
}

/// The ledger rows, working whichever ledger tables exist (and on a
/// read-only session). `t` is resolved.
pub(crate) fn rows(conn: &mut PgConnection, t: &Tables) -> Result<Vec<LedgerRow>, Error> {
    let query = match (t.migrations_exist, t.attempts_exist) {
        (true, true) if !t.attempts_operations => &t.sql.ledger_rows_v1,
        (true, true) => {
            return sql_query(&t.sql.ledger_rows)
                .bind::<Nullable<Array<Text>>, _>(None::<Vec<String>>)
                .load(conn)
                .map_err(|e| Error::db("reading the migration ledger", e))
        }
        (true, false) => &t.sql.applied_only,
        (false, _) => return Ok(Vec::new()),
    };
    sql_query(query)
        .load(conn)
        .map_err(|e| Error::db("reading the migration ledger", e))
}

/// The ledger row of one version (as [`rows`] would give it, `01` and `1`
/// one version), read by the tables' indexes rather than the whole ledger:
/// whether it is applied, and where an attempt of it resumes. `t` is
/// resolved.
pub(crate) fn row(
    conn: &mut PgConnection,
    t: &Tables,
    version: &str,
) -> Result<Option<LedgerRow>, Error> {
    if !(t.migrations_exist && t.attempts_exist && t.attempts_operations) {
        let rows = rows(conn, t)?;
        return Ok(rows
            .into_iter()
            .find(|r| normal(&r.version) == normal(version)));
    }
    sql_query(&t.sql.ledger_row)
        .bind::<Array<Text>, _>(spellings(version))
        .get_result(conn)
        .optional()
        .map_err(|e| Error::db("reading the migration ledger", e))
}

/// What a revert chooses from, read in one query without the whole
/// ledger: every applied version, and every version with an attempt to
/// apply it that stopped with statements done (a superset of those whose
/// latest attempt did; [`rows_of`] reads which).
#[derive(Debug, Default)]
pub(crate) struct RevertScope {
    pub applied: Vec<String>,
    pub stopped: Vec<String>,
}

/// Reads the [`RevertScope`]. `t` is resolved, with both tables in this
/// release's layout (as under a track's lock once the tables are ensured).
pub(crate) fn revert_scope(conn: &mut PgConnection, t: &Tables) -> Result<RevertScope, Error> {
    #[derive(QueryableByName)]
    struct Scoped {
        #[diesel(sql_type = Text)]
        version: String,
        #[diesel(sql_type = Bool)]
        applied: bool,
    }
    let found: Vec<Scoped> = sql_query(&t.sql.revert_scope)
        .load(conn)
        .map_err(|e| Error::db("reading the migration ledger", e))?;
    let mut scope = RevertScope::default();
    for s in found {
        if s.applied {
            scope.applied.push(s.version);
        } else {
            scope.stopped.push(s.version);
        }
    }
    Ok(scope)
}

/// The ledger rows of `versions` (each however the ledger spells it), as
/// [`rows`] gives them, read by the tables' indexes. `t` is resolved, both
/// tables in this release's layout.
pub(crate) fn rows_of(
    conn: &mut PgConnection,
    t: &Tables,
    versions: &[&str],
) -> Result<Vec<LedgerRow>, Error> {
    if versions.is_empty() {
        return Ok(Vec::new());
    }
    let all: Vec<String> = versions.iter().flat_map(|v| spellings(v)).collect();
    sql_query(&t.sql.ledger_rows)
        .bind::<Nullable<Array<Text>>, _>(Some(all))
        .load(conn)
        .map_err(|e| Error::db("reading the migration ledger", e))
}
