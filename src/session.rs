//! Connections, and the session settings the runner changes on one that may
//! belong to the service (a pooled one) and puts back as they were: `RESET`
//! would restore the server's defaults, not what the service's connection
//! customizer set.

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_query;
use diesel::sql_types::Text;

use crate::error::{Error, ErrorKind};
use crate::url::redact_url;

/// The timeouts a session had before [`Timeouts::set`] changed them.
#[must_use = "restore the session's timeouts"]
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct Timeouts {
    #[diesel(sql_type = Text)]
    lock_timeout: String,
    #[diesel(sql_type = Text)]
    statement_timeout: String,
}

impl Timeouts {
    /// Sets `lock_timeout` and `statement_timeout` (zero: off) for the
    /// session and returns the values they replaced.
    pub(crate) fn set(
        conn: &mut PgConnection,
        lock_timeout: Duration,
        statement_timeout: Duration,
    ) -> Result<Timeouts, Error> {
        sql_query(include_str!("sql/set_timeouts.sql"))
            .bind::<Text, _>(lock_timeout.as_millis().to_string())
            .bind::<Text, _>(statement_timeout.as_millis().to_string())
            .get_result(conn)
            .map_err(|e| Error::db("setting the session's timeouts", e))
    }

    /// Puts the replaced values back.
    pub(crate) fn restore(self, conn: &mut PgConnection) -> Result<(), Error> {
        sql_query(
            "SELECT set_config('lock_timeout', $1, false), \
             set_config('statement_timeout', $2, false)",
        )
        .bind::<Text, _>(&self.lock_timeout)
        .bind::<Text, _>(&self.statement_timeout)
        .execute(conn)
        .map(drop)
        .map_err(|e| Error::db("restoring the session's timeouts", e).unusable())
    }
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
    PgConnection::establish(database_url).map_err(|e| {
        let cause = e.to_string();
        // libpq can echo parts of the connection string; scrub the password.
        let cause = crate::url::redact_error(&cause, database_url);
        Error::new(
            ErrorKind::Connection,
            format!(
                "cannot connect to {}: {}. Check the URL (--database-url or DATABASE_URL), \
                 that the server is running and reachable, and the credentials",
                redact_url(database_url),
                cause.trim_end()
            ),
        )
    })
}
