//! The crate's one error type.

use std::error::Error as StdError;
use std::fmt;

use diesel::result::{DatabaseErrorKind, Error as DieselError};

use crate::report::Report;
use crate::source::{SourceError, Track};

/// What went wrong, broadly. Match on it to decide what to do; read the
/// [`Error`]'s message to tell a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A migration directory is invalid (see [`SourceError`]).
    InvalidMigrationSet,
    /// The database could not be reached, or the connection broke.
    Connection,
    /// A query of the harness itself (ledger, lock) failed.
    Database,
    /// A migration's SQL failed. Earlier migrations stay applied.
    MigrationFailed,
    /// The advisory lock was not acquired before the configured deadline;
    /// or a no-transaction migration was still being applied by another
    /// session on the other track (a release that has it there) when its
    /// lock-timeout retries ran out.
    LockTimeout,
    /// The advisory lock was granted but is not held by this session's
    /// backend: a pooler in transaction mode sits between us and the server.
    LockNotHeld,
    /// Releasing the advisory lock failed: the connection's state is
    /// unknown and it must be dropped, not reused or returned to a pool.
    Unlock,
    /// Strict mode: the database has applied versions this binary does not
    /// know.
    UnknownVersions,
    /// Strict mode: an applied migration's `up.sql` changed since.
    ChecksumMismatch,
    /// Strict mode: a pending migration is older than one already applied.
    OutOfOrder,
    /// `revert`, `redo` or `resolve` refused before changing anything: the
    /// message names the migration and what to do.
    RevertRefused,
    /// A partly applied no-transaction migration changed since its last
    /// attempt, so resuming it is unsafe.
    PartialMigrationChanged,
    /// The migration's SQL could not be split into statements.
    InvalidSql,
    /// Deferred migrations were asked for while required migrations known
    /// to this binary are pending.
    RequiredPending,
    /// A required migration declares (`requires_deferred`) a deferred one
    /// that is not applied yet.
    DeferredDependency,
    /// The deferred track was stopped (shutdown) before it finished; the
    /// next run resumes where it stopped.
    Stopped,
    /// An option of the [`Migrator`](crate::Migrator) is invalid (a table
    /// name, say).
    Config,
    /// A target of a fleet run is not complete: `verify` found a required
    /// migration missing or failed, or `plan` found that `up` would refuse.
    Incomplete,
}

/// Where in a migration an error happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationRef {
    /// The version.
    pub version: String,
    /// The directory name.
    pub dir_name: String,
    /// The track.
    pub track: Track,
    /// The file (`.../up.sql`).
    pub path: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
}

/// The error of every fallible operation of this crate.
///
/// Its `Display` is one paragraph that says what happened, where (migration,
/// file, line, PostgreSQL's message) and what to do next. It never contains
/// a password.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: String,
    migration: Option<MigrationRef>,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
    report: Option<Box<Report>>,
    unusable: bool,
    lock_timeout: bool,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                migration: None,
                source: None,
                report: None,
                unusable: false,
                lock_timeout: false,
            }),
        }
    }

    /// Marks the error as PostgreSQL's `lock_timeout` cancelling a statement.
    pub(crate) fn lock_timeout(mut self, yes: bool) -> Self {
        self.inner.lock_timeout = yes;
        self
    }

    /// `true` when a migration failed because it could not take a lock
    /// within `lock_timeout` (the table was busy); running it again later
    /// may succeed.
    pub fn is_lock_timeout(&self) -> bool {
        self.inner.lock_timeout
    }

    /// Marks the connection as one to drop (the lock may still be held).
    pub(crate) fn unusable(mut self) -> Self {
        self.inner.unusable = true;
        self
    }

    pub(crate) fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.inner.source = Some(Box::new(source));
        self
    }

    /// Says which migration (and line) the error is about.
    pub(crate) fn at(mut self, m: impl Into<MigrationRef>, line: Option<usize>) -> Self {
        let mut r = m.into();
        r.line = line;
        self.inner.migration = Some(r);
        self
    }

    pub(crate) fn with_report(mut self, report: Report) -> Self {
        self.inner.report = Some(Box::new(report));
        self
    }

    pub(crate) fn source_set(e: SourceError) -> Self {
        Error::new(ErrorKind::InvalidMigrationSet, e.to_string()).with_source(e)
    }

    /// A failed query of the harness itself; `doing` says what it was for.
    pub(crate) fn db(doing: &str, e: DieselError) -> Self {
        let kind = if is_connection_error(&e) {
            ErrorKind::Connection
        } else {
            ErrorKind::Database
        };
        let advice = match &e {
            DieselError::DatabaseError(DatabaseErrorKind::ReadOnlyTransaction, _) => {
                ". The server is read-only (a hot standby, or default_transaction_read_only = on): \
                 apply migrations against the primary; `rollout verify` and `rollout status` \
                 work here"
            }
            _ => "",
        };
        Error::new(kind, format!("{doing}: {}{advice}", describe_db_error(&e)))
    }

    /// The broad kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The migration (version, file, line) the error is about, if any.
    pub fn migration(&self) -> Option<&MigrationRef> {
        self.inner.migration.as_ref()
    }

    /// What was done before the error: migrations applied earlier stay
    /// applied.
    pub fn report(&self) -> Option<&Report> {
        self.inner.report.as_deref()
    }

    /// `true` when the connection used must be dropped rather than reused
    /// (its session may still hold the advisory lock or be mid-transaction).
    pub fn connection_unusable(&self) -> bool {
        self.inner.unusable || matches!(self.inner.kind, ErrorKind::Unlock | ErrorKind::Connection)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.inner.kind)
            .field("message", &self.inner.message)
            .field("migration", &self.inner.migration)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.message)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        // The source's text is already part of the message for the kinds
        // that carry one; expose it for programs, not for printing chains.
        None
    }
}

impl Error {
    /// The underlying cause (a [`SourceError`] for an invalid set), for
    /// programs that want its structure. Its text is already in the message.
    pub fn cause(&self) -> Option<&(dyn StdError + Send + Sync + 'static)> {
        self.inner.source.as_deref()
    }
}

pub(crate) fn is_connection_error(e: &DieselError) -> bool {
    match e {
        DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => true,
        DieselError::DatabaseError(_, info) => {
            let m = info.message();
            m.contains("server closed the connection")
                || m.contains("no connection to the server")
                || m.contains("terminating connection")
                || m.contains("connection to server")
        }
        DieselError::BrokenTransactionManager => true,
        _ => false,
    }
}

/// PostgreSQL's message with its detail and hint, on one line each.
pub(crate) fn describe_db_error(e: &DieselError) -> String {
    match e {
        DieselError::DatabaseError(_, info) => {
            let mut s = info.message().trim_end().to_string();
            if let Some(d) = info.details() {
                s.push_str(&format!(" (detail: {})", d.trim_end()));
            }
            if let Some(h) = info.hint() {
                s.push_str(&format!(" (hint: {})", h.trim_end()));
            }
            s
        }
        other => other.to_string().trim_end().to_string(),
    }
}
