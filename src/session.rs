//! Session settings the runner changes on a connection that may belong to
//! the service (a pooled one), and puts back as they were: `RESET` would
//! restore the server's defaults, not what the service's connection
//! customizer set.

use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_query;
use diesel::sql_types::Text;

use crate::error::Error;

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
