//! Test support for a service's own tests (the `testing` feature): a fresh
//! database per test with the service's migrations already applied, cloned
//! from a template database that is migrated once per test run.
//!
//! ```no_run
//! use diesel_rollout::testing::TestDatabase;
//! use diesel_rollout::MigrationSet;
//!
//! // In a service: `static MIGRATIONS: MigrationSet = diesel_rollout::include_migrations!();`
//! let db = TestDatabase::new(&MigrationSet::example());
//! let mut conn = db.connect();
//! // ... the test; the database is dropped when `db` goes out of scope,
//! // even when the test fails.
//! ```
//!
//! The server is `DATABASE_URL` when set (the role needs `CREATEDB`), or a
//! throwaway cluster started from the PostgreSQL server binaries on the
//! machine, once per test process. The template is named after a digest of
//! the migration set (`diesel_rollout_tpl_<digest>`), so a changed set gets a
//! new template; test processes running at once share it (an advisory lock
//! makes one of them build it). Each test's database is a `CREATE DATABASE
//! ... TEMPLATE` copy: milliseconds, instead of running every migration.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::Bool;

use crate::cluster::ThrowawayCluster;
use crate::error::{Error, ErrorKind};
use crate::url::with_database;
use crate::{MigrationSet, Migrator};

enum Server {
    External(String),
    Throwaway(Box<ThrowawayCluster>),
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
static TEMPLATES: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn admin_url() -> Result<String, Error> {
    let server = SERVER.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Ok(Server::External(url)),
        _ => ThrowawayCluster::start()
            .map(|c| Server::Throwaway(Box::new(c)))
            .map_err(|e| {
                format!(
                    "no DATABASE_URL, and no throwaway PostgreSQL server: {e}. Set DATABASE_URL \
                     to a server where this role may CREATE DATABASE, or install the PostgreSQL \
                     server binaries"
                )
            }),
    });
    match server {
        Ok(Server::External(url)) => Ok(url.clone()),
        Ok(Server::Throwaway(c)) => Ok(c.admin_url()),
        Err(e) => Err(Error::new(ErrorKind::Connection, e.clone())),
    }
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A digest of the set: versions, tracks and checksums.
fn fingerprint(set: &MigrationSet) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for m in set.migrations() {
        h.update(m.version().as_bytes());
        h.update(m.track().as_str().as_bytes());
        h.update(m.checksum().as_bytes());
        h.update(b"\n");
    }
    h.finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The template for `set`, built (both tracks applied) if no process has
/// built it yet.
fn template(admin: &str, set: &MigrationSet) -> Result<String, Error> {
    let fp = fingerprint(set);
    let cache = TEMPLATES.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(name) = cache.get(&fp) {
        return Ok(name.clone());
    }
    let name = format!("diesel_rollout_tpl_{fp}");
    let mut conn = crate::connect(admin)?;
    let key = i64::from_str_radix(&fp[..12], 16).unwrap_or(0);
    let db = |e| Error::db("preparing the template database", e);
    // One process builds it; the others wait here, then find it ready.
    conn.batch_execute(&format!("SELECT pg_advisory_lock({key})"))
        .map_err(db)?;
    let result = (|| {
        #[derive(QueryableByName)]
        struct Ready {
            #[diesel(sql_type = Bool)]
            ready: bool,
        }
        let ready = diesel::sql_query(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1 AND datistemplate) AS ready",
        )
        .bind::<diesel::sql_types::Text, _>(&name)
        .get_result::<Ready>(&mut conn)
        .map_err(db)?
        .ready;
        if !ready {
            // A template not marked ready is a leftover of a build that died.
            conn.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote(&name)
            ))
            .map_err(db)?;
            conn.batch_execute(&format!("CREATE DATABASE {}", quote(&name)))
                .map_err(db)?;
            let url = with_database(admin, &name).ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    "the testing support needs a postgres:// URL in DATABASE_URL",
                )
            })?;
            let migrator = Migrator::new(set.clone());
            let mut target = crate::connect(&url)?;
            migrator.run_required_on(&mut target)?;
            migrator.run_deferred_on(&mut target)?;
            drop(target);
            conn.batch_execute(&format!(
                "ALTER DATABASE {} WITH IS_TEMPLATE true",
                quote(&name)
            ))
            .map_err(db)?;
        }
        Ok(name.clone())
    })();
    let _ = conn.batch_execute(&format!("SELECT pg_advisory_unlock({key})"));
    let name = result?;
    cache.insert(fp, name.clone());
    Ok(name)
}

/// A database of its own for one test, with the migrations applied, dropped
/// when this value is dropped (also when the test panics).
pub struct TestDatabase {
    url: String,
    name: String,
    admin: String,
}

impl TestDatabase {
    /// A fresh copy of the template for `migrations`.
    ///
    /// # Panics
    /// When no server can be reached or the migrations fail: a test cannot
    /// go on without its database, and the message says what to fix.
    pub fn new(migrations: &MigrationSet) -> Self {
        Self::try_new(migrations).unwrap_or_else(|e| panic!("test database: {e}"))
    }

    /// As [`TestDatabase::new`], returning the error.
    ///
    /// # Errors
    /// When no server can be reached, a migration fails, or the database
    /// cannot be created.
    pub fn try_new(migrations: &MigrationSet) -> Result<Self, Error> {
        let admin = admin_url()?;
        let template = template(&admin, migrations)?;
        // The clock too: a database left by a killed run on a long-lived
        // server must not collide with a new one that got the same pid.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() % 1_000_000_000_000);
        let name = format!(
            "diesel_rollout_test_{}_{nanos}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = crate::connect(&admin)?;
        conn.batch_execute(&format!(
            "CREATE DATABASE {} TEMPLATE {}",
            quote(&name),
            quote(&template)
        ))
        .map_err(|e| Error::db("creating the test database from its template", e))?;
        let url = with_database(&admin, &name).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "the testing support needs a postgres:// URL in DATABASE_URL",
            )
        })?;
        Ok(TestDatabase { url, name, admin })
    }

    /// Its connection URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new connection to it.
    ///
    /// # Panics
    /// When the connection fails.
    pub fn connect(&self) -> PgConnection {
        crate::connect(&self.url).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Never panic here: the test may already be unwinding.
        if let Ok(mut conn) = crate::connect(&self.admin) {
            let _ = conn.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote(&self.name)
            ));
        }
    }
}
