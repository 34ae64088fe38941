//! A fleet's targets: databases from a file or a query on a control
//! database, or schemas of one database from a query.

use diesel::prelude::*;
use diesel::sql_query;
use diesel::sql_types::Text;

use crate::error::{Error, ErrorKind};
use crate::session::connect;
use crate::url::redact_url;

/// One database, or one schema of a database, that a fleet migrates.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    url: String,
    schema: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

impl Target {
    /// A database, by its URL or libpq `key=value` connection string.
    pub fn database(url: impl Into<String>) -> Self {
        Target {
            url: url.into(),
            schema: None,
        }
    }

    /// A schema of the database at `url`: its ledger tables live in it and
    /// its migrations run with `search_path` set to it (see
    /// [`Migrator::schema`](crate::Migrator::schema)).
    pub fn schema(url: impl Into<String>, schema: impl Into<String>) -> Self {
        Target {
            url: url.into(),
            schema: Some(schema.into()),
        }
    }

    /// The connection string.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The schema, for a schema target.
    pub fn schema_name(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// How the target is shown: its URL with the password redacted, and
    /// its schema.
    pub fn label(&self) -> String {
        match &self.schema {
            Some(s) => format!("{} schema {s}", redact_url(&self.url)),
            None => redact_url(&self.url),
        }
    }

    /// Databases listed one per line (a URL or a `key=value` connection
    /// string), blank lines and lines starting with `#` ignored.
    ///
    /// # Errors
    /// [`ErrorKind::Config`] naming the line of a target listed twice (it
    /// would be migrated twice at once), or when the list is empty.
    pub fn parse_list(text: &str) -> Result<Vec<Target>, Error> {
        let mut targets: Vec<(usize, Target)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let t = Target::database(line);
            if let Some((first, _)) = targets.iter().find(|(_, seen)| *seen == t) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "line {} lists {} again (first on line {first}): remove one",
                        i + 1,
                        t.label()
                    ),
                ));
            }
            targets.push((i + 1, t));
        }
        if targets.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "the targets list has no target: one database URL or connection string per \
                 line (`#` starts a comment)",
            ));
        }
        Ok(targets.into_iter().map(|(_, t)| t).collect())
    }

    /// The databases a query on the control database at `control_url`
    /// returns, from its first column: a URL or connection string as it is,
    /// or a database name on the control database's server (same user,
    /// host and options).
    ///
    /// # Errors
    /// [`ErrorKind::Connection`] or [`ErrorKind::Database`] (the query
    /// failed), [`ErrorKind::Config`] when it returns no row or a NULL.
    pub fn from_query(control_url: &str, query: &str) -> Result<Vec<Target>, Error> {
        let values = first_column(control_url, query, "--targets-query")?;
        let mut targets = Vec::new();
        for v in values {
            let t = if v.contains("://") || v.contains('=') {
                Target::database(v)
            } else {
                Target::database(on_same_server(control_url, &v)?)
            };
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        Ok(targets)
    }

    /// The schemas of the database at `url` that a query on it returns,
    /// from its first column.
    ///
    /// # Errors
    /// As [`Target::from_query`].
    pub fn schemas_from_query(url: &str, query: &str) -> Result<Vec<Target>, Error> {
        let mut targets: Vec<Target> = Vec::new();
        for s in first_column(url, query, "--schemas-query")? {
            let t = Target::schema(url, s);
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        Ok(targets)
    }
}

/// The text of the first column of every row `query` returns.
fn first_column(url: &str, query: &str, what: &str) -> Result<Vec<String>, Error> {
    #[derive(QueryableByName)]
    struct Value {
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        value: Option<String>,
    }
    let query = query.trim().trim_end_matches(';');
    let mut conn = connect(url)?;
    // The alias names the first column whatever the query calls it.
    let rows = sql_query(format!(
        "SELECT q.value::text AS value FROM ({query}\n) AS q(value)"
    ))
    .load::<Value>(&mut conn)
    .map_err(|e| Error::db(&format!("running {what}"), e))?;
    let mut values = Vec::with_capacity(rows.len());
    for (i, r) in rows.into_iter().enumerate() {
        match r.value.map(|v| v.trim().to_string()) {
            Some(v) if !v.is_empty() => values.push(v),
            _ => {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!("{what} returned NULL or an empty value in row {}", i + 1),
                ))
            }
        }
    }
    if values.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{what} returned no row: there is no target"),
        ));
    }
    Ok(values)
}

/// The connection string for `database` on the server of `control_url`.
fn on_same_server(control_url: &str, database: &str) -> Result<String, Error> {
    if let Some(url) = crate::url::with_database(control_url, database) {
        return Ok(url);
    }
    if !control_url.contains("://") {
        // libpq's key=value form: a later dbname overrides the first.
        let quoted = database.replace('\\', "\\\\").replace('\'', "\\'");
        return Ok(format!("{} dbname='{quoted}'", control_url.trim()));
    }
    Err(Error::new(
        ErrorKind::Config,
        format!(
            "cannot name database `{database}` on the server of {}: return full URLs from the \
             query instead",
            redact_url(control_url)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_skip_comments_and_refuse_repeats() {
        let t = Target::parse_list(
            "# tenants\n\npostgres://app:pw@db/t1\n  postgres://app:pw@db/t2  \n# done\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].url(), "postgres://app:pw@db/t2");
        assert!(!t[0].label().contains("pw"), "{}", t[0].label());
        let e = Target::parse_list("postgres://db/t1\npostgres://db/t2\npostgres://db/t1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("line 1"), "{e}");
        assert!(Target::parse_list("# nothing\n\n").is_err());
    }

    #[test]
    fn database_names_join_the_control_server() {
        assert_eq!(
            on_same_server("postgres://app:pw@db:5433/control?sslmode=require", "t 1").unwrap(),
            "postgres://app:pw@db:5433/t%201?sslmode=require"
        );
        assert_eq!(
            on_same_server("host=db user=app dbname=control", "o'k").unwrap(),
            "host=db user=app dbname=control dbname='o\\'k'"
        );
    }
}
