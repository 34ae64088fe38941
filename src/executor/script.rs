//! What runs and how: the script of a migration in one direction (up.sql or
//! down.sql, how it is named, checked and recorded), what a track plugs in,
//! and what both ways of running share to explain a failure.

use std::time::Duration;

use diesel::prelude::*;
use diesel::result::Error as DieselError;

use crate::catalog;
use crate::error::{Error, ErrorKind};
use crate::ledger;
use crate::migration::Migration;
use crate::source::sql;

/// What a track plugs into a run of one migration.
pub(crate) struct Options<'a> {
    /// Called before each statement with its 0-based index and the total.
    pub on_statement: &'a dyn Fn(&Migration, usize, usize),
    /// Polled between statements and while waiting for another build.
    pub should_stop: &'a dyn Fn() -> bool,
    /// Called with the name of each invalid index dropped and rebuilt
    /// valid.
    pub on_index_repaired: &'a dyn Fn(&str),
    /// The outcome a failed attempt is recorded with: `failed`, or
    /// `retrying` when the leader will try again (so other replicas do not
    /// take it for a give-up).
    pub failure_outcome: &'static str,
    /// How often to look again at a build another session is running.
    pub poll: Duration,
}

impl Options<'static> {
    /// A plain run: no progress callbacks, never stopped early, a failure
    /// recorded as `failed`.
    pub(crate) fn plain() -> Self {
        Options {
            on_statement: &|_, _, _| {},
            should_stop: &|| false,
            on_index_repaired: &|_| {},
            failure_outcome: "failed",
            poll: Duration::from_secs(2),
        }
    }
}

/// Which way a migration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// `up.sql`, recorded as applied.
    Up,
    /// `down.sql`, recorded as reverted (the version row goes).
    Down,
}

/// The script of a migration that runs, and how it is named and recorded.
pub(super) struct Script<'m> {
    pub(super) direction: Direction,
    pub(super) sql: &'m str,
    pub(super) path: String,
    /// Recorded with the attempt; a resume checks it is still the same file.
    pub(super) checksum: String,
    pub(super) legacy_checksums: Vec<String>,
}

impl<'m> Script<'m> {
    pub(super) fn of(m: &'m Migration, direction: Direction) -> Result<Self, Error> {
        Ok(match direction {
            Direction::Up => Script {
                direction,
                sql: m.up_sql(),
                path: m.up_path().to_string(),
                checksum: m.checksum().to_string(),
                legacy_checksums: Vec::new(),
            },
            Direction::Down => {
                let sql = m.down_sql().ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!("migration {} has no down.sql", m.dir_name()),
                    )
                    .at(m, None)
                })?;
                Script {
                    direction,
                    sql,
                    path: m.down_path(),
                    checksum: crate::source::checksum_of_sql(sql),
                    legacy_checksums: crate::source::legacy_checksums(sql),
                }
            }
        })
    }

    pub(super) fn operation(&self) -> ledger::Operation<'_> {
        ledger::Operation {
            name: match self.direction {
                Direction::Up => "up",
                Direction::Down => "down",
            },
            checksum: &self.checksum,
        }
    }

    pub(super) fn matches(&self, m: &Migration, recorded: &str) -> bool {
        match self.direction {
            Direction::Up => m.checksum_matches(recorded),
            Direction::Down => {
                recorded == self.checksum || self.legacy_checksums.iter().any(|c| c == recorded)
            }
        }
    }

    pub(super) fn statements(&self, m: &Migration) -> Result<Vec<sql::Statement>, Error> {
        sql::split_statements(self.sql).map_err(|e| {
            Error::new(
                ErrorKind::InvalidSql,
                format!(
                    "{}:{}: {} (migration {})",
                    self.path,
                    e.line,
                    e.message,
                    m.dir_name()
                ),
            )
            .at(m, Some(e.line))
        })
    }

    /// `applying` / `reverting`, `applied` / `reverted`.
    pub(super) fn verbs(&self) -> (&'static str, &'static str) {
        match self.direction {
            Direction::Up => ("applying", "applied"),
            Direction::Down => ("reverting", "reverted"),
        }
    }

    /// `migration X` or `the revert of migration X`.
    pub(super) fn what(&self, m: &Migration) -> String {
        match self.direction {
            Direction::Up => format!("migration {}", m.dir_name()),
            Direction::Down => format!("the revert of migration {}", m.dir_name()),
        }
    }
}

/// 1-based line in the script of PostgreSQL's error position (a 1-based
/// character index into the statement), or of the statement's start.
pub(super) fn error_line(script: &str, stmt: &sql::Statement, e: &DieselError) -> usize {
    let pos = match e {
        DieselError::DatabaseError(_, info) => info.statement_position(),
        _ => None,
    };
    match pos.and_then(|p| usize::try_from(p).ok()).filter(|p| *p > 0) {
        Some(p) => {
            let byte = stmt
                .sql
                .char_indices()
                .nth(p - 1)
                .map_or(stmt.sql.len(), |(b, _)| b);
            sql::line_of_offset(script, stmt.offset + byte)
        }
        None => stmt.line,
    }
}
/// Whether PostgreSQL cancelled the statement on `lock_timeout`.
pub(super) fn is_lock_timeout(e: &DieselError) -> bool {
    matches!(e, DieselError::DatabaseError(_, info) if info.message().contains("lock timeout"))
}

/// When a statement failed on `lock_timeout`, says who is in the way: the
/// table it alters, and any index build running now.
pub(super) fn explain_lock_timeout(
    conn: &mut PgConnection,
    statement: &str,
    e: &DieselError,
) -> String {
    if !is_lock_timeout(e) {
        return String::new();
    }
    let mut out = String::new();
    if let Some(table) = catalog::altered_table(statement) {
        out.push_str(&format!(". It could not lock table {table} in time"));
    } else {
        out.push_str(". It could not take a lock in time");
    }
    let builds = catalog::builds_in_progress(conn).unwrap_or_default();
    if builds.is_empty() {
        out.push_str(
            ": another session holds a conflicting lock (see pg_locks). It failed fast instead of \
             queueing traffic behind its lock request; run it again when the table is quiet",
        );
    } else {
        let list = builds
            .iter()
            .map(|b| {
                format!(
                    "pid {} ({}) running {} of index {} on {} ({})",
                    b.pid,
                    if b.application_name.is_empty() {
                        "no application_name"
                    } else {
                        &b.application_name
                    },
                    b.command,
                    if b.progress.index_name.is_empty() {
                        "?"
                    } else {
                        &b.progress.index_name
                    },
                    b.progress.table_name,
                    b.progress.phase
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        out.push_str(&format!(
            ": an index build holds the table: {list}. A deferred build keeps its table \
             locked against schema changes until it finishes; deploy this migration after \
             the build is done, or move the build after this migration"
        ));
    }
    out
}
