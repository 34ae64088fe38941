//! Test support: a PostgreSQL server (DATABASE_URL, or a throwaway cluster
//! started once per test binary) and a fresh database per test, dropped
//! even when the test fails.

#![allow(dead_code)]

pub mod history;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_rollout::cluster::ThrowawayCluster;
use diesel_rollout::{with_database, MigrationSet, Migrator};

enum Server {
    External(String),
    Throwaway(Box<ThrowawayCluster>),
}

impl Server {
    fn admin_url(&self) -> String {
        match self {
            Server::External(url) => url.clone(),
            Server::Throwaway(c) => c.admin_url(),
        }
    }
}

static SERVER: OnceLock<Server> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn server() -> &'static Server {
    SERVER.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Server::External(url),
        _ => Server::Throwaway(Box::new(ThrowawayCluster::start().unwrap_or_else(|e| {
            panic!(
                "no DATABASE_URL and no throwaway PostgreSQL server: {e}\n\
                 Install the PostgreSQL server binaries (Debian: apt-get install postgresql) \
                 or set DATABASE_URL to a server where this user may CREATE DATABASE"
            )
        }))),
    })
}

/// A database of its own for one test, dropped on drop.
pub struct TestDb {
    pub url: String,
    pub name: String,
    admin_url: String,
}

impl TestDb {
    pub fn new() -> Self {
        Self::on(&server().admin_url())
    }

    /// A fresh database on the server at `admin_url`.
    pub fn on(admin_url: &str) -> Self {
        let admin_url = admin_url.to_string();
        let name = format!(
            "rollout_test_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = PgConnection::establish(&admin_url).expect("connect to the test server");
        diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .expect("create the test database");
        let url = with_database(&admin_url, &name).expect("a postgres:// URL");
        TestDb {
            url,
            name,
            admin_url,
        }
    }

    pub fn conn(&self) -> PgConnection {
        PgConnection::establish(&self.url).expect("connect to the test database")
    }

    /// A scalar bigint query.
    pub fn count(&self, sql: &str) -> i64 {
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        diesel::sql_query(sql)
            .get_result::<N>(&mut self.conn())
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .n
    }

    /// A column of text.
    pub fn texts(&self, sql: &str) -> Vec<String> {
        #[derive(QueryableByName)]
        struct T {
            #[diesel(sql_type = Text)]
            t: String,
        }
        diesel::sql_query(sql)
            .load::<T>(&mut self.conn())
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .into_iter()
            .map(|r| r.t)
            .collect()
    }

    /// Advisory locks held in this database.
    pub fn advisory_locks(&self) -> i64 {
        self.count(
            "SELECT count(*) AS n FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
             WHERE l.locktype = 'advisory' AND d.datname = current_database()",
        )
    }

    /// `rollout` with DATABASE_URL pointing at this database.
    pub fn rollout(&self) -> Command {
        let mut c = rollout();
        c.env("DATABASE_URL", &self.url);
        c
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Never panic here: a panic while a failed test unwinds aborts.
        if let Ok(mut admin) = PgConnection::establish(&self.admin_url) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .execute(&mut admin);
        }
    }
}

/// A scalar bigint query on a connection.
pub fn count_on(conn: &mut PgConnection, sql: &str) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    diesel::sql_query(sql)
        .get_result::<N>(conn)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .n
}

/// The `rollout` binary, without DATABASE_URL from the environment.
pub fn rollout() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rollout"));
    c.env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .env_remove("MIGRATION_DIRECTORY");
    c
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn fixture_set(name: &str) -> MigrationSet {
    let dir = fixture(name);
    MigrationSet::from_dirs(&dir.join("migrations"), &dir.join("migrations_deferred"))
        .expect("valid fixture")
}

pub fn migrator(name: &str) -> Migrator {
    Migrator::new(fixture_set(name))
}

/// A migration set written by the test into a temporary directory:
/// `migrations/` and `migrations_deferred/`.
pub struct TempSet {
    dir: tempfile::TempDir,
}

impl TempSet {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::create_dir(dir.path().join("migrations")).unwrap();
        std::fs::create_dir(dir.path().join("migrations_deferred")).unwrap();
        TempSet { dir }
    }

    pub fn required_dir(&self) -> PathBuf {
        self.dir.path().join("migrations")
    }

    pub fn deferred_dir(&self) -> PathBuf {
        self.dir.path().join("migrations_deferred")
    }

    fn write(&self, base: PathBuf, dir_name: &str, up: &str, metadata: Option<&str>) -> PathBuf {
        let dir = base.join(dir_name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("up.sql"), up).unwrap();
        if let Some(meta) = metadata {
            std::fs::write(dir.join("metadata.toml"), meta).unwrap();
        }
        dir
    }

    /// A transactional required migration.
    pub fn required(&self, dir_name: &str, up: &str) -> PathBuf {
        self.write(self.required_dir(), dir_name, up, None)
    }

    /// A required migration with `run_in_transaction = false`.
    pub fn required_no_tx(&self, dir_name: &str, up: &str) -> PathBuf {
        self.write(
            self.required_dir(),
            dir_name,
            up,
            Some("run_in_transaction = false\n"),
        )
    }

    /// A required migration with this `metadata.toml`.
    pub fn required_with(&self, dir_name: &str, up: &str, metadata: &str) -> PathBuf {
        self.write(self.required_dir(), dir_name, up, Some(metadata))
    }

    /// A deferred migration.
    pub fn deferred(&self, dir_name: &str, up: &str) -> PathBuf {
        self.write(
            self.deferred_dir(),
            dir_name,
            up,
            Some("run_in_transaction = false\n"),
        )
    }

    /// The set as it is on disk now.
    pub fn set(&self) -> MigrationSet {
        MigrationSet::from_dirs(&self.required_dir(), &self.deferred_dir())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn migrator(&self) -> Migrator {
        Migrator::new(self.set())
    }
}
