//! Migrations as the runner sees them, embedded or read from disk, and
//! diesel's `MigrationSource`/`Migration` traits over them.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;

use diesel::connection::BoxableConnection;
use diesel::migration::{
    self, MigrationMetadata, MigrationName, MigrationSource, MigrationVersion,
};
use diesel::pg::Pg;

use crate::error::{Error, MigrationRef};
use crate::source::{self, sql, Track};

/// One migration of a set: its version, track, SQL and metadata.
///
/// Built by the build-time embed (see [`embed`](crate::embed)) or read from
/// disk by [`MigrationSet::from_dirs`].
#[derive(Debug, Clone)]
pub struct Migration {
    version: Cow<'static, str>,
    dir_name: Cow<'static, str>,
    name: Cow<'static, str>,
    track: Track,
    up_sql: Cow<'static, str>,
    up_path: Cow<'static, str>,
    down_sql: Option<Cow<'static, str>>,
    run_in_transaction: bool,
    checksum: Cow<'static, str>,
    /// Earlier checksums of up.sql that still match, comma-separated (one
    /// string rather than a list: an embedded table of a thousand
    /// migrations compiles several times faster without a nested array each).
    alt_checksums: Cow<'static, str>,
    /// `requires_deferred` versions, comma-separated.
    requires_deferred: Cow<'static, str>,
}

impl Migration {
    /// Used by generated code only.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub const fn __embedded(
        version: &'static str,
        dir_name: &'static str,
        name: &'static str,
        track: Track,
        up_sql: &'static str,
        up_path: &'static str,
        down_sql: Option<&'static str>,
        run_in_transaction: bool,
        checksum: &'static str,
        alt_checksums: &'static str,
        requires_deferred: &'static str,
    ) -> Self {
        Migration {
            version: Cow::Borrowed(version),
            dir_name: Cow::Borrowed(dir_name),
            name: Cow::Borrowed(name),
            track,
            up_sql: Cow::Borrowed(up_sql),
            up_path: Cow::Borrowed(up_path),
            down_sql: match down_sql {
                Some(s) => Some(Cow::Borrowed(s)),
                None => None,
            },
            run_in_transaction,
            checksum: Cow::Borrowed(checksum),
            alt_checksums: Cow::Borrowed(alt_checksums),
            requires_deferred: Cow::Borrowed(requires_deferred),
        }
    }

    fn from_files(f: source::MigrationFiles) -> Self {
        Migration {
            version: f.version.into(),
            dir_name: f.dir_name.into(),
            name: f.name.into(),
            track: f.track,
            up_sql: f.up_sql.into(),
            up_path: f.up_path.to_string_lossy().into_owned().into(),
            down_sql: f.down.map(|(_, s)| s.into()),
            run_in_transaction: f.run_in_transaction,
            checksum: f.checksum.into(),
            alt_checksums: f.alt_checksums.join(",").into(),
            requires_deferred: f.requires_deferred.join(",").into(),
        }
    }

    /// The version, all digits (`20240131120000`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The directory name (`2024-01-31-120000_add_users`).
    pub fn dir_name(&self) -> &str {
        &self.dir_name
    }

    /// The name after the version (`add_users`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The track the migration belongs to.
    pub fn track(&self) -> Track {
        self.track
    }

    /// The SQL of `up.sql`.
    pub fn up_sql(&self) -> &str {
        &self.up_sql
    }

    /// The path `up.sql` was read from (at build time for embedded sets).
    pub fn up_path(&self) -> &str {
        &self.up_path
    }

    /// The path of `down.sql` (beside `up.sql`), whether or not it exists.
    pub fn down_path(&self) -> String {
        match self.up_path.strip_suffix("up.sql") {
            Some(dir) => format!("{dir}down.sql"),
            None => format!("{}/../down.sql", self.up_path),
        }
    }

    /// The SQL of `down.sql`, when there is one.
    pub fn down_sql(&self) -> Option<&str> {
        self.down_sql.as_deref()
    }

    /// Whether the migration runs in its own transaction (`false` when its
    /// `metadata.toml` says `run_in_transaction = false`).
    pub fn run_in_transaction(&self) -> bool {
        self.run_in_transaction
    }

    /// Lower-case hex SHA-256 of `up.sql`, line endings read as LF (a CRLF
    /// checkout hashes the same).
    pub fn checksum(&self) -> &str {
        &self.checksum
    }

    /// Whether a checksum recorded in the ledger is this `up.sql`'s: this
    /// release's, or one an earlier release recorded for the same text (its
    /// raw bytes, from an LF or a CRLF checkout).
    pub fn checksum_matches(&self, recorded: &str) -> bool {
        recorded == self.checksum
            || (!recorded.is_empty() && self.alt_checksums.split(',').any(|c| c == recorded))
    }

    /// Deferred versions that must be applied before this required
    /// migration runs (`requires_deferred` in its `metadata.toml`).
    pub fn requires_deferred(&self) -> impl Iterator<Item = &str> {
        self.requires_deferred.split(',').filter(|v| !v.is_empty())
    }
}

/// Every spelling of version `v` with leading zeros, as long as `v` and
/// two characters more, and at least up to 16 (diesel's 14-digit
/// timestamps, and its `00000000000000` initial setup, with room): the
/// values an indexed lookup matches so that `0001` and `1` are one
/// version, as [`normal`] makes them. A handful of values, so the lookup
/// stays a few index probes.
pub(crate) fn spellings(v: &str) -> Vec<String> {
    let longest = v.len().max(14) + 2;
    let n = normal(v);
    let shortest = if n == "0" { "" } else { n };
    let mut all: Vec<String> = (shortest.len().max(1)..=longest.max(shortest.len()))
        .map(|len| format!("{shortest:0>len$}"))
        .collect();
    if !all.iter().any(|s| s == v) {
        all.push(v.to_string());
    }
    all
}

/// The version without leading zeros, so `0001` and `1` match.
pub(crate) fn normal(v: &str) -> &str {
    let t = v.trim_start_matches('0');
    if t.is_empty() {
        "0"
    } else {
        t
    }
}

impl From<&Migration> for MigrationRef {
    fn from(m: &Migration) -> Self {
        MigrationRef {
            version: m.version().to_string(),
            dir_name: m.dir_name().to_string(),
            track: m.track(),
            path: m.up_path().to_string(),
            line: None,
        }
    }
}

/// The migrations of both tracks, ordered by version (numerically).
#[derive(Debug, Clone)]
pub struct MigrationSet {
    migrations: Cow<'static, [Migration]>,
    baseline: Option<Cow<'static, str>>,
}

impl MigrationSet {
    /// Used by generated code only.
    #[doc(hidden)]
    pub const fn __embedded(
        migrations: &'static [Migration],
        baseline: Option<&'static str>,
    ) -> Self {
        MigrationSet {
            migrations: Cow::Borrowed(migrations),
            baseline: match baseline {
                Some(b) => Some(Cow::Borrowed(b)),
                None => None,
            },
        }
    }

    /// A set without migrations: for what needs only the ledger (the newest
    /// applied version, say).
    pub fn empty() -> Self {
        MigrationSet {
            migrations: Cow::Borrowed(&[]),
            baseline: None,
        }
    }

    /// The example set embedded in this crate (`migrations/` and
    /// `migrations_deferred/` of the repository): a small multi-tenant task
    /// tracker. `rollout` uses it when no directory is given.
    pub fn example() -> Self {
        include!(concat!(env!("OUT_DIR"), "/example_migrations.rs"))
    }

    /// Reads and validates a pair of directories at run time, with the same
    /// rules and messages as the build-time embed. A missing `deferred`
    /// directory is an empty track.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidMigrationSet`](crate::ErrorKind::InvalidMigrationSet)
    /// naming every problem found.
    pub fn from_dirs(required: &Path, deferred: &Path) -> Result<Self, Error> {
        let set = source::read_pair(required, deferred).map_err(Error::source_set)?;
        // History's old problems: the build and `rollout lint` show them;
        // every start need not.
        for w in &set.warnings {
            tracing::debug!("{w}");
        }
        Ok(MigrationSet {
            migrations: set
                .migrations
                .into_iter()
                .map(Migration::from_files)
                .collect(),
            baseline: set.baseline.map(Cow::Owned),
        })
    }

    /// The baseline the set was read with (`start_after` of its
    /// `diesel-guard.toml`): migrations at or below it are history, their
    /// old problems warnings.
    pub fn baseline(&self) -> Option<&str> {
        self.baseline.as_deref()
    }

    /// Every migration of both tracks, ordered by version.
    pub fn migrations(&self) -> &[Migration] {
        &self.migrations
    }

    /// The migrations of one track, ordered by version.
    pub fn track(&self, track: Track) -> impl Iterator<Item = &Migration> {
        self.migrations.iter().filter(move |m| m.track == track)
    }

    /// The migration with this version, if the set has it.
    pub fn get(&self, version: &str) -> Option<&Migration> {
        // Sorted by version (the source reader and the embedded table both
        // keep that order), versions unique: a binary search, since the
        // analyses look every ledger row up here.
        self.migrations
            .binary_search_by(|m| source::compare_versions(&m.version, version))
            .ok()
            .map(|i| &self.migrations[i])
    }

    /// The greatest version in either track.
    pub fn newest_version(&self) -> Option<&str> {
        self.migrations.last().map(|m| m.version())
    }
}

impl fmt::Display for Migration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dir_name)
    }
}

impl MigrationName for Migration {
    fn version(&self) -> MigrationVersion<'_> {
        MigrationVersion::from(self.version.as_ref())
    }
}

impl MigrationMetadata for Migration {
    fn run_in_transaction(&self) -> bool {
        self.run_in_transaction
    }
}

/// Runs a script the way this crate does: whole for a transactional
/// migration, statement by statement for a no-transaction one (diesel sends
/// it as one implicit transaction, which `CONCURRENTLY` refuses).
fn execute_script(
    conn: &mut dyn BoxableConnection<Pg>,
    script: &str,
    one_at_a_time: bool,
) -> migration::Result<()> {
    if one_at_a_time {
        for s in sql::split_statements(script)? {
            conn.batch_execute(&s.sql)?;
        }
        Ok(())
    } else {
        Ok(conn.batch_execute(script)?)
    }
}

impl migration::Migration<Pg> for Migration {
    fn run(&self, conn: &mut dyn BoxableConnection<Pg>) -> migration::Result<()> {
        execute_script(conn, &self.up_sql, !self.run_in_transaction)
    }

    fn revert(&self, conn: &mut dyn BoxableConnection<Pg>) -> migration::Result<()> {
        match &self.down_sql {
            Some(down) => execute_script(conn, down, !self.run_in_transaction),
            None => Err(Box::new(
                diesel_migrations::MigrationError::NoMigrationRevertFile,
            )),
        }
    }

    fn metadata(&self) -> &dyn MigrationMetadata {
        self
    }

    fn name(&self) -> &dyn MigrationName {
        self
    }
}

/// Both tracks, ordered by version, so diesel's own `MigrationHarness` (and
/// `diesel migration` tooling built on it) sees the same history. diesel's
/// harness takes no lock: use [`Migrator`](crate::Migrator) to apply them in
/// production.
impl MigrationSource<Pg> for MigrationSet {
    fn migrations(&self) -> migration::Result<Vec<Box<dyn migration::Migration<Pg>>>> {
        Ok(self
            .migrations
            .iter()
            .cloned()
            .map(|m| Box::new(m) as Box<dyn migration::Migration<Pg>>)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::{normal, spellings};

    #[test]
    fn every_spelling_of_a_version_normalises_to_it() {
        let all = spellings("0001");
        assert!(all.contains(&"1".to_string()) && all.contains(&"0001".to_string()));
        assert!(all.iter().all(|s| normal(s) == "1"));
        assert_eq!(all.iter().map(String::len).max(), Some(16));
        let zero = spellings("0");
        assert!(zero.contains(&"0".to_string()) && zero.contains(&"000".to_string()));
        assert!(!zero.contains(&String::new()));
        let long = spellings("20240101120000");
        assert_eq!(long[0], "20240101120000");
        assert!(long.contains(&"020240101120000".to_string()));
        assert_eq!(long.len(), 3, "{long:?}");
        let initial = spellings("00000000000000");
        assert!(initial.contains(&"0".to_string()) && initial.len() == 16);
    }
}
