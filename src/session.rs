//! Connections, and the session settings the runner changes on one that may
//! belong to the service (a pooled one) and puts back as they were: `RESET`
//! would restore the server's defaults, not what the service's connection
//! customizer set.

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_query;
use diesel::sql_types::{Nullable, Text};

use crate::error::{Error, ErrorKind};
use crate::url::redact_url;

/// The settings a session had before [`Settings::set`] changed them.
#[must_use = "restore the session's settings"]
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct Settings {
    #[diesel(sql_type = Text)]
    lock_timeout: String,
    #[diesel(sql_type = Text)]
    statement_timeout: String,
    #[diesel(sql_type = Text)]
    search_path: String,
    #[diesel(sql_type = Text)]
    max_parallel_maintenance_workers: String,
    #[diesel(sql_type = Text)]
    maintenance_work_mem: String,
}

/// What a track's migrations run with (`Migrator::session_for`).
/// `None`: the session's own value, untouched.
#[derive(Debug, Clone)]
pub(crate) struct Wanted {
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    pub search_path: Option<String>,
    pub parallel_workers: Option<u32>,
    pub maintenance_work_mem_mb: Option<u32>,
}

impl Settings {
    /// Sets `lock_timeout` and `statement_timeout` (zero: off) for the
    /// session, and `search_path` (a [`Migrator::schema`]),
    /// `max_parallel_maintenance_workers` and `maintenance_work_mem` when
    /// given, and returns the values they replaced, in one round trip.
    ///
    /// [`Migrator::schema`]: crate::Migrator::schema
    pub(crate) fn set(conn: &mut PgConnection, wanted: &Wanted) -> Result<Settings, Error> {
        sql_query(include_str!("sql/set_timeouts.sql"))
            .bind::<Text, _>(wanted.lock_timeout.as_millis().to_string())
            .bind::<Text, _>(wanted.statement_timeout.as_millis().to_string())
            .bind::<Nullable<Text>, _>(wanted.search_path.as_deref())
            .bind::<Nullable<Text>, _>(wanted.parallel_workers.map(|n| n.to_string()))
            .bind::<Nullable<Text>, _>(wanted.maintenance_work_mem_mb.map(|n| format!("{n}MB")))
            .get_result(conn)
            .map_err(|e| Error::db("setting the session's timeouts", e))
    }

    /// Puts the replaced values back.
    pub(crate) fn restore(self, conn: &mut PgConnection) -> Result<(), Error> {
        sql_query(
            "SELECT set_config('lock_timeout', $1, false), \
             set_config('statement_timeout', $2, false), \
             set_config('search_path', $3, false), \
             set_config('max_parallel_maintenance_workers', $4, false), \
             set_config('maintenance_work_mem', $5, false)",
        )
        .bind::<Text, _>(&self.lock_timeout)
        .bind::<Text, _>(&self.statement_timeout)
        .bind::<Text, _>(&self.search_path)
        .bind::<Text, _>(&self.max_parallel_maintenance_workers)
        .bind::<Text, _>(&self.maintenance_work_mem)
        .execute(conn)
        .map(drop)
        .map_err(|e| Error::db("restoring the session's settings", e).unusable())
    }
}

/// Runs `f` with the session's `search_path` set to `path` (when given),
/// and puts the old one back after, whatever `f` returned.
pub(crate) fn with_search_path<T>(
    conn: &mut PgConnection,
    path: Option<&str>,
    f: impl FnOnce(&mut PgConnection) -> Result<T, Error>,
) -> Result<T, Error> {
    let Some(path) = path else {
        return f(conn);
    };
    #[derive(QueryableByName)]
    struct Old {
        #[diesel(sql_type = Text)]
        old: String,
    }
    // The subquery (kept apart by OFFSET 0) reads the old value first.
    let old: Old = sql_query(
        "SELECT old.v AS old, set_config('search_path', $1, false) AS new \
         FROM (SELECT current_setting('search_path') AS v OFFSET 0) AS old",
    )
    .bind::<Text, _>(path)
    .get_result(conn)
    .map_err(|e| Error::db("setting search_path", e))?;
    let result = f(conn);
    let restored = sql_query("SELECT set_config('search_path', $1, false)")
        .bind::<Text, _>(&old.old)
        .execute(conn)
        .map_err(|e| Error::db("restoring search_path", e).unusable());
    let value = result?;
    restored?;
    Ok(value)
}

/// Sets `application_name`, bound as a value, never pasted into SQL.
pub(crate) fn set_application_name(conn: &mut PgConnection, name: &str) -> Result<(), Error> {
    diesel::sql_query("SELECT set_config('application_name', $1, false)")
        .bind::<Text, _>(name)
        .execute(conn)
        .map(drop)
        .map_err(|e| Error::db("setting application_name", e))
}

/// Opens a connection, with an error that never shows the password.
///
/// # Errors
/// [`ErrorKind::Connection`] naming the redacted URL and the cause.
pub fn connect(database_url: &str) -> Result<PgConnection, Error> {
    connect_showing(database_url, database_url)
}

/// Opens `database_url`, naming `shown` (the URL as the user gave it,
/// before `application_name` was added) in an error.
pub(crate) fn connect_showing(database_url: &str, shown: &str) -> Result<PgConnection, Error> {
    PgConnection::establish(database_url).map_err(|e| {
        let cause = e.to_string();
        // libpq can echo parts of the connection string; scrub the password.
        let cause = crate::url::redact_error(&cause, database_url);
        Error::new(
            ErrorKind::Connection,
            format!(
                "cannot connect to {}: {}. Check the URL, that the server is running and \
                 reachable, and the credentials",
                redact_url(shown),
                cause.trim_end()
            ),
        )
    })
}
