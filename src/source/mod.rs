//! Reading and validating migration directories.
//!
//! This module depends on `std` and `sha2` only. It is compiled three ways: by
//! this crate's own `build.rs` (through `#[path]`), by the library at run time
//! (for `--migrations-dir`), and by a service's build script through
//! [`embed`](crate::embed), so a set is judged by the same code at build time
//! and at run time.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub mod baseline;
pub mod embed;
mod metadata;
pub mod sql;
#[cfg(test)]
mod tests;

#[cfg(feature = "lint")]
pub use self::metadata::parse_metadata;
pub use self::metadata::Metadata;

/// Which of the two tracks a migration belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Track {
    /// Applied at start-up, before the replica reports ready (`migrations/`).
    Required,
    /// Applied in the background after start-up (`migrations_deferred/`).
    Deferred,
}

impl Track {
    /// `"required"` or `"deferred"`, as stored in the ledger.
    pub const fn as_str(self) -> &'static str {
        match self {
            Track::Required => "required",
            Track::Deferred => "deferred",
        }
    }
}

impl fmt::Display for Track {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A migration directory read from disk and validated.
#[derive(Debug, Clone)]
pub struct MigrationFiles {
    /// The version: the part of the directory name before the first `_`,
    /// with `-` removed (`2024-01-31-120000_add_users` gives `20240131120000`).
    pub version: String,
    /// The directory name, as diesel displays it.
    pub dir_name: String,
    /// The part of the directory name after the first `_` (may be empty).
    pub name: String,
    /// The track, from the directory the migration was found in.
    pub track: Track,
    /// The migration directory.
    pub dir: PathBuf,
    /// Path of `up.sql`.
    pub up_path: PathBuf,
    /// Contents of `up.sql`.
    pub up_sql: String,
    /// Path and contents of `down.sql`, when present.
    pub down: Option<(PathBuf, String)>,
    /// Whether the migration runs in a transaction (`true` when there is no
    /// `metadata.toml`).
    pub run_in_transaction: bool,
    /// Lower-case hex SHA-256 of `up.sql` with line endings as LF (see
    /// [`checksum_of_sql`]).
    pub checksum: String,
    /// Other checksums the same `up.sql` was recorded with by earlier
    /// releases (the raw bytes of this checkout, and of a CRLF checkout).
    pub alt_checksums: Vec<String>,
    /// Deferred versions (digits only) that must be applied before this
    /// required migration runs (`requires_deferred` in `metadata.toml`).
    pub requires_deferred: Vec<String>,
}

/// One thing wrong with a migration set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Every path involved.
    pub paths: Vec<PathBuf>,
    /// 1-based line in the first path, when the problem is at a line.
    pub line: Option<usize>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.paths.first(), self.line) {
            (Some(p), Some(line)) => write!(f, "{}:{line}: ", p.display())?,
            (Some(p), None) => write!(f, "{}: ", p.display())?,
            (None, _) => {}
        }
        f.write_str(&self.message)
    }
}

/// Everything wrong with a migration set (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    /// The problems, in the order they were found.
    pub problems: Vec<Problem>,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid migration set ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SourceError {}

/// A pair of directories read and validated.
#[derive(Debug, Clone)]
pub struct ReadSet {
    /// The migrations of both tracks, ordered by version.
    pub migrations: Vec<MigrationFiles>,
    /// Problems of grandfathered migrations (at or below the baseline), which
    /// would be errors in a newer one.
    pub warnings: Vec<Problem>,
    /// The baseline in force: at or below it, migrations are history.
    pub baseline: Option<String>,
}

/// Reads and validates a pair of directories: `required` (must exist) and
/// `deferred` (a missing directory is an empty track), with the baseline
/// of their `diesel-guard.toml` (`start_after`, see [`baseline`]). Returns
/// the migrations of both tracks ordered by version, numerically.
///
/// # Errors
/// Every problem found, each naming its paths and the fix: a version used
/// twice (within a track or across tracks), a version that is not all
/// digits, a missing or empty `up.sql`, a `metadata.toml` that does not
/// parse, has unknown keys or lacks `run_in_transaction`, a deferred
/// migration that would run in a transaction, `CONCURRENTLY` in a migration
/// that runs in a transaction, `COPY ... FROM STDIN`, and problems of
/// `down.sql`. In a migration at or below the baseline, the problems that
/// only matter to a new migration (all of these but a missing `up.sql`, a
/// bad version or a `metadata.toml` that does not parse) are warnings, and
/// `down.sql` is not read for them: it matters to `revert` only.
pub fn read_pair(required: &Path, deferred: &Path) -> Result<ReadSet, SourceError> {
    let baseline = baseline::read(required).map_err(|p| SourceError { problems: vec![p] })?;
    read_pair_with(required, deferred, baseline)
}

/// As [`read_pair`], with the baseline given (`None`: no migration is
/// grandfathered).
///
/// # Errors
/// As [`read_pair`].
pub fn read_pair_with(
    required: &Path,
    deferred: &Path,
    baseline: Option<String>,
) -> Result<ReadSet, SourceError> {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut all = Vec::new();
    let mut found = Found {
        out: &mut all,
        problems: &mut problems,
        warnings: &mut warnings,
        baseline: baseline.as_deref(),
    };
    if required.is_dir() {
        read_track(required, Track::Required, &mut found);
    } else {
        found.problems.push(Problem {
            paths: vec![required.to_path_buf()],
            line: None,
            message: "the required-track migrations directory does not exist: create it \
                      (it may be empty) or point to the right directory"
                .into(),
        });
    }
    if deferred.is_dir() {
        read_track(deferred, Track::Deferred, &mut found);
    } else if deferred.exists() {
        found.problems.push(Problem {
            paths: vec![deferred.to_path_buf()],
            line: None,
            message: "the deferred-track path is not a directory".into(),
        });
    }
    check_duplicates(&all, &mut problems);
    check_dependencies(&all, &mut problems);
    if problems.is_empty() {
        all.sort_by(|a, b| compare_versions(&a.version, &b.version));
        Ok(ReadSet {
            migrations: all,
            warnings,
            baseline,
        })
    } else {
        Err(SourceError { problems })
    }
}

/// Where [`read_track`] puts what it finds.
struct Found<'a> {
    out: &'a mut Vec<MigrationFiles>,
    problems: &'a mut Vec<Problem>,
    warnings: &'a mut Vec<Problem>,
    baseline: Option<&'a str>,
}

/// Orders two all-digit versions numerically (`9` before `10`), whatever
/// their lengths.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Parses a migration directory name into `(version, name)`, the way diesel
/// does: the version is the part before the first `_`, with `-` removed.
///
/// # Errors
/// A message when the version is empty or not all ASCII digits.
pub fn parse_dir_name(dir_name: &str) -> Result<(String, String), String> {
    let (raw, name) = match dir_name.split_once('_') {
        Some((v, n)) => (v, n),
        None => (dir_name, ""),
    };
    let version: String = raw.chars().filter(|c| *c != '-').collect();
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{dir_name}` does not start with a version: the part before the first `_` \
             (with `-` removed) must be all digits, e.g. `2024-01-31-120000_add_users`; \
             rename the directory (`rollout new NAME` creates one with the next version)"
        ));
    }
    Ok((version, name.to_string()))
}

/// `text` without the UTF-8 byte order mark some Windows editors put first,
/// which PostgreSQL would read as part of the first word (`syntax error at
/// or near "CREATE"`, the mark invisible). No file with one can have been
/// applied, so no recorded checksum has it.
fn without_bom(text: String) -> String {
    match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    }
}

/// The checksum of a migration's SQL: the SHA-256 of the text with every
/// CRLF turned into LF, so a checkout with Windows line endings (git's
/// `core.autocrlf`) hashes the same as one without. For an LF file it is
/// the SHA-256 of the file's bytes, as earlier releases recorded it.
pub fn checksum_of_sql(text: &str) -> String {
    checksum(text.replace("\r\n", "\n").as_bytes())
}

/// The checksums an earlier release may have recorded for `text` that
/// differ from [`checksum_of_sql`]: the SHA-256 of its raw bytes, and of
/// the CRLF form a Windows checkout would have had.
pub fn legacy_checksums(text: &str) -> Vec<String> {
    let lf = text.replace("\r\n", "\n");
    let main = checksum(lf.as_bytes());
    let mut out = vec![
        checksum(text.as_bytes()),
        checksum(lf.replace('\n', "\r\n").as_bytes()),
    ];
    out.retain(|c| *c != main);
    out.dedup();
    out
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn checksum(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn read_track(dir: &Path, track: Track, found: &mut Found<'_>) {
    let mut entries = match list_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            found.problems.push(Problem {
                paths: vec![dir.to_path_buf()],
                line: None,
                message: format!("cannot read the directory: {e}"),
            });
            return;
        }
    };
    entries.sort();
    for path in entries {
        if !path.is_dir() {
            continue;
        }
        match read_migration(&path, track, found.baseline) {
            Ok((m, mut w)) => {
                found.out.push(m);
                found.warnings.append(&mut w);
            }
            Err(mut p) => found.problems.append(&mut p),
        }
    }
}

/// Entries of `dir`, skipping hidden ones (as diesel does).
fn list_dir(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        out.push(entry.path());
    }
    Ok(out)
}

fn problem(path: &Path, line: Option<usize>, message: impl Into<String>) -> Problem {
    Problem {
        paths: vec![path.to_path_buf()],
        line,
        message: message.into(),
    }
}

/// Reads one migration directory: the migration and the warnings of a
/// grandfathered one, or every problem.
fn read_migration(
    dir: &Path,
    track: Track,
    baseline: Option<&str>,
) -> Result<(MigrationFiles, Vec<Problem>), Vec<Problem>> {
    let mut problems = Vec::new();
    // Problems that only matter to a new migration: warnings at or below
    // the baseline.
    let mut new_only = Vec::new();
    let dir_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parsed = parse_dir_name(&dir_name).map_err(|m| problem(dir, None, m));
    let grandfathered = match (&parsed, baseline) {
        (Ok((version, _)), Some(b)) => compare_versions(version, b).is_le(),
        _ => false,
    };

    let up_path = dir.join("up.sql");
    let up_sql = match fs::read_to_string(&up_path) {
        Ok(s) => Some(without_bom(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            problems.push(problem(
                &up_path,
                None,
                "missing up.sql: every migration directory needs one with the SQL to apply",
            ));
            None
        }
        Err(e) => {
            problems.push(problem(&up_path, None, format!("cannot read: {e}")));
            None
        }
    };

    let down_path = dir.join("down.sql");
    let down = match fs::read_to_string(&down_path) {
        Ok(s) => Some((down_path, without_bom(s))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            problems.push(problem(&down_path, None, format!("cannot read: {e}")));
            None
        }
    };

    let meta_path = dir.join("metadata.toml");
    let none = Metadata::default();
    let metadata = match fs::read_to_string(&meta_path).map(without_bom) {
        Ok(text) => match metadata::parse_lenient(&text) {
            Ok((m, complaints)) => {
                for (line, msg) in complaints {
                    new_only.push(problem(&meta_path, line, msg));
                }
                m
            }
            Err((line, msg)) => {
                problems.push(problem(&meta_path, line, msg));
                none
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => none,
        Err(e) => {
            problems.push(problem(&meta_path, None, format!("cannot read: {e}")));
            none
        }
    };
    let run_in_transaction = metadata.run_in_transaction;
    if track == Track::Deferred && !metadata.requires_deferred.is_empty() {
        problems.push(problem(
            &meta_path,
            None,
            "`requires_deferred` is for required migrations that must wait for a deferred one; \
             within the deferred track, migrations already run in version order: remove it",
        ));
    }

    if track == Track::Deferred && run_in_transaction && problems.is_empty() {
        problems.push(problem(
            dir,
            None,
            "deferred migrations run outside any transaction, statement by statement: \
             add a metadata.toml containing `run_in_transaction = false` \
             (or move the migration to the required track)",
        ));
    }

    // History that ends or opens a transaction itself (an old workaround,
    // e.g. `COMMIT;` before `ALTER TYPE ... ADD VALUE`) cannot run inside
    // the runner's transaction without leaving part of it committed and
    // unrecorded: it runs statement by statement, each recorded as it
    // completes, as `run_in_transaction = false` says. Decided before the
    // checks below, so they judge the mode it runs in (one warning).
    let own_control = |text: &str| {
        sql::split_statements(text)
            .map(|v| {
                v.iter()
                    .find(|s| sql::is_transaction_control(&s.sql))
                    .map(|s| s.line)
            })
            .ok()
            .flatten()
    };
    // New migrations are refused by the checks instead: look at history only.
    let controlled = (grandfathered && run_in_transaction)
        .then(|| {
            let up = up_sql
                .as_deref()
                .and_then(own_control)
                .map(|l| (&up_path, l));
            up.or_else(|| {
                down.as_ref()
                    .and_then(|(p, t)| own_control(t).map(|l| (p, l)))
            })
        })
        .flatten();
    let run_in_transaction = match controlled {
        Some((path, line)) => {
            new_only.push(problem(
                path,
                Some(line),
                "ends or opens a transaction itself, so the migration runs statement by \
                 statement, each statement recorded as it completes, as if its metadata.toml \
                 said `run_in_transaction = false` (say so there to silence this)",
            ));
            false
        }
        _ => run_in_transaction,
    };
    if let Some(up) = &up_sql {
        check_sql(&up_path, up, run_in_transaction, &mut new_only, true);
    }
    // down.sql matters to `revert` only: history is not held to it.
    if let Some((path, text)) = down.as_ref().filter(|_| !grandfathered) {
        check_sql(path, text, run_in_transaction, &mut new_only, false);
    }

    let (version, name) = match parsed {
        Ok(v) => v,
        Err(p) => {
            problems.insert(0, p);
            problems.append(&mut new_only);
            return Err(problems);
        }
    };
    let warnings = if grandfathered {
        for w in &mut new_only {
            w.message = format!(
                "{} (a warning: the migration is at or below the baseline {}, so it is \
                 history; a newer migration with this problem fails the build)",
                w.message,
                baseline.unwrap_or_default()
            );
        }
        new_only
    } else {
        problems.append(&mut new_only);
        Vec::new()
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let up_sql = up_sql.unwrap_or_default();
    Ok((
        MigrationFiles {
            checksum: checksum_of_sql(&up_sql),
            alt_checksums: legacy_checksums(&up_sql),
            version,
            dir_name,
            name,
            track,
            dir: dir.to_path_buf(),
            up_path,
            up_sql,
            down,
            run_in_transaction,
            requires_deferred: metadata.requires_deferred,
        },
        warnings,
    ))
}

/// Checks one SQL file: it lexes, `up.sql` is not empty, and a transactional
/// migration holds no `CONCURRENTLY`.
fn check_sql(
    path: &Path,
    text: &str,
    run_in_transaction: bool,
    problems: &mut Vec<Problem>,
    is_up: bool,
) {
    let statements = match sql::split_statements(text) {
        Ok(s) => s,
        Err(e) => {
            problems.push(problem(path, Some(e.line), e.message));
            return;
        }
    };
    for s in statements.iter().filter(|s| sql::is_client_copy(&s.sql)) {
        problems.push(problem(
            path,
            Some(s.line),
            "`COPY ... FROM STDIN` / `TO STDOUT` exchanges data with the client (psql sends \
             the lines after the statement), and a migration runner sends SQL only, so it \
             would load nothing: write the rows as `INSERT ... VALUES`, or `COPY ... FROM` a \
             file on the database server",
        ));
    }
    if run_in_transaction {
        if let Some(s) = statements
            .iter()
            .find(|s| sql::is_transaction_control(&s.sql))
        {
            problems.push(problem(
                path,
                Some(s.line),
                "a transaction control statement (`BEGIN`, `COMMIT`, `ROLLBACK`...) in a \
                 migration that runs in its own transaction would end that transaction early \
                 and leave the rest, and the ledger row, outside it: remove it (the runner \
                 opens and commits the transaction), or give the migration \
                 `run_in_transaction = false`",
            ));
        }
    }
    if is_up && statements.is_empty() {
        problems.push(problem(
            path,
            None,
            "up.sql is empty (no SQL statement, only whitespace or comments): \
             write the migration or delete its directory",
        ));
    }
    if run_in_transaction {
        if let Ok(Some(word)) = sql::find_keyword(text, "concurrently") {
            problems.push(problem(
                path,
                Some(word.line),
                "`CONCURRENTLY` cannot run inside a transaction block, and this migration \
                 runs in one: move it to the deferred track (migrations_deferred/, with \
                 `run_in_transaction = false` in metadata.toml), or if it must be required, \
                 give it a metadata.toml with `run_in_transaction = false`",
            ));
        }
    }
}

fn check_dependencies(all: &[MigrationFiles], problems: &mut Vec<Problem>) {
    for m in all {
        for dep in &m.requires_deferred {
            let target = all
                .iter()
                .find(|d| compare_versions(&d.version, dep) == std::cmp::Ordering::Equal);
            match target {
                Some(d)
                    if d.track == Track::Deferred
                        && compare_versions(&d.version, &m.version) != std::cmp::Ordering::Less =>
                {
                    problems.push(Problem {
                        paths: vec![m.dir.join("metadata.toml"), d.dir.clone()],
                        line: None,
                        message: format!(
                            "`requires_deferred` names {dep}, which is newer than this \
                             migration ({}): migrations apply in version order, and a deferred \
                             migration newer than required ones may build on them, so a \
                             required migration can wait only for an older deferred one. Give \
                             the deferred migration an older version, or this one a newer one \
                             (`rollout new NAME`)",
                            m.version
                        ),
                    })
                }
                Some(d) if d.track == Track::Deferred => {}
                Some(d) => problems.push(Problem {
                    paths: vec![m.dir.join("metadata.toml"), d.dir.clone()],
                    line: None,
                    message: format!(
                        "`requires_deferred` names {dep}, which is a required migration: list \
                         only deferred ones (required migrations already run in version order)"
                    ),
                }),
                None => problems.push(Problem {
                    paths: vec![m.dir.join("metadata.toml")],
                    line: None,
                    message: format!(
                        "`requires_deferred` names {dep}, which is not a deferred migration of \
                         this set: fix the version (see `rollout status`)"
                    ),
                }),
            }
        }
    }
}

fn check_duplicates(all: &[MigrationFiles], problems: &mut Vec<Problem>) {
    let mut by_version: BTreeMap<String, Vec<&MigrationFiles>> = BTreeMap::new();
    for m in all {
        let key = m.version.trim_start_matches('0').to_string();
        by_version.entry(key).or_default().push(m);
    }
    for group in by_version.values().filter(|g| g.len() > 1) {
        let where_ = group
            .iter()
            .map(|m| format!("{} ({})", m.dir.display(), m.track))
            .collect::<Vec<_>>()
            .join(", ");
        problems.push(Problem {
            paths: group.iter().map(|m| m.dir.clone()).collect(),
            line: None,
            message: format!(
                "version {} is used by {} migrations: {where_}. Versions must be unique \
                 across both tracks: give all but one a new version \
                 (`rollout new NAME` picks the next free one)",
                group[0].version,
                group.len()
            ),
        });
    }
}
