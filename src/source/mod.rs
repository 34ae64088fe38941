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

pub mod sql;

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
    /// Lower-case hex SHA-256 of `up.sql`.
    pub checksum: String,
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

/// Reads and validates a pair of directories: `required` (must exist) and
/// `deferred` (a missing directory is an empty track). Returns the
/// migrations of both tracks ordered by version, numerically.
///
/// # Errors
/// Every problem found, each naming its paths and the fix: a version used
/// twice (within a track or across tracks), a version that is not all
/// digits, a missing or empty `up.sql`, a `metadata.toml` that does not
/// parse, has unknown keys or lacks `run_in_transaction`, a deferred
/// migration that would run in a transaction, and `CONCURRENTLY` in a
/// migration that runs in a transaction.
pub fn read_pair(required: &Path, deferred: &Path) -> Result<Vec<MigrationFiles>, SourceError> {
    let mut problems = Vec::new();
    let mut all = Vec::new();
    if required.is_dir() {
        read_track(required, Track::Required, &mut all, &mut problems);
    } else {
        problems.push(Problem {
            paths: vec![required.to_path_buf()],
            line: None,
            message: "the required-track migrations directory does not exist: create it \
                      (it may be empty) or point to the right directory"
                .into(),
        });
    }
    if deferred.is_dir() {
        read_track(deferred, Track::Deferred, &mut all, &mut problems);
    } else if deferred.exists() {
        problems.push(Problem {
            paths: vec![deferred.to_path_buf()],
            line: None,
            message: "the deferred-track path is not a directory".into(),
        });
    }
    check_duplicates(&all, &mut problems);
    check_dependencies(&all, &mut problems);
    if problems.is_empty() {
        all.sort_by(|a, b| compare_versions(&a.version, &b.version));
        Ok(all)
    } else {
        Err(SourceError { problems })
    }
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

fn read_track(
    dir: &Path,
    track: Track,
    out: &mut Vec<MigrationFiles>,
    problems: &mut Vec<Problem>,
) {
    let mut entries = match list_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(Problem {
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
        match read_migration(&path, track) {
            Ok(m) => out.push(m),
            Err(mut p) => problems.append(&mut p),
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

fn read_migration(dir: &Path, track: Track) -> Result<MigrationFiles, Vec<Problem>> {
    let mut problems = Vec::new();
    let dir_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parsed = parse_dir_name(&dir_name).map_err(|m| problem(dir, None, m));

    let up_path = dir.join("up.sql");
    let up_sql = match fs::read_to_string(&up_path) {
        Ok(s) => Some(s),
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
        Ok(s) => Some((down_path, s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            problems.push(problem(&down_path, None, format!("cannot read: {e}")));
            None
        }
    };

    let meta_path = dir.join("metadata.toml");
    let none = Metadata::default();
    let metadata = match fs::read_to_string(&meta_path) {
        Ok(text) => parse_metadata(&text).unwrap_or_else(|(line, msg)| {
            problems.push(problem(&meta_path, line, msg));
            none
        }),
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

    if let Some(up) = &up_sql {
        check_sql(&up_path, up, run_in_transaction, &mut problems, true);
    }
    if let Some((path, text)) = &down {
        check_sql(path, text, run_in_transaction, &mut problems, false);
    }

    let (version, name) = match parsed {
        Ok(v) => v,
        Err(p) => {
            problems.insert(0, p);
            return Err(problems);
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let up_sql = up_sql.unwrap_or_default();
    Ok(MigrationFiles {
        checksum: checksum(up_sql.as_bytes()),
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
    })
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

/// What a migration's `metadata.toml` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// Whether the migration runs in a transaction.
    pub run_in_transaction: bool,
    /// Versions (digits only) of deferred migrations that must be applied
    /// before this required migration runs.
    pub requires_deferred: Vec<String>,
    /// diesel-guard checks disabled for this migration (diesel-guard's own
    /// per-migration key).
    pub disable_checks: Vec<String>,
}

impl Default for Metadata {
    /// What no `metadata.toml` means: a transactional migration.
    fn default() -> Self {
        Metadata {
            run_in_transaction: true,
            requires_deferred: Vec::new(),
            disable_checks: Vec::new(),
        }
    }
}

/// Parses an array of strings (`["a", 'b']`) spanning one or more lines.
fn parse_string_array<'a>(
    first: &str,
    lines: &mut impl Iterator<Item = (usize, &'a str)>,
) -> Option<Vec<String>> {
    let mut value = first.to_string();
    while value.starts_with('[') && !value.contains(']') {
        let (_, more) = lines.next()?;
        value.push(' ');
        value.push_str(strip_toml_comment(more).trim());
    }
    let inner = value.strip_prefix('[')?.strip_suffix(']')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            item.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| item.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .map(str::to_string)
        })
        .collect()
}

/// Parses `metadata.toml`. Accepts the subset of TOML the keys need:
/// `key = value` lines (an array may span lines), comments and blank
/// lines. Keys: `run_in_transaction` (required), `requires_deferred` and
/// diesel-guard's `disable_checks`.
///
/// # Errors
/// `(line, message)` for the first problem.
pub fn parse_metadata(text: &str) -> Result<Metadata, (Option<usize>, String)> {
    let mut run_in_transaction = None;
    let mut requires_deferred = None;
    let mut disable_checks = None;
    let mut lines = text.lines().enumerate();
    while let Some((i, raw)) = lines.next() {
        let line_no = i + 1;
        let line = strip_toml_comment(raw).trim();
        if line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err((
                Some(line_no),
                format!(
                    "cannot parse `{}`: expected `key = value` (accepted: \
                     `run_in_transaction = true|false`, `requires_deferred = [\"VERSION\", ...]`)",
                    raw.trim()
                ),
            ));
        };
        let key = key.trim().trim_matches('"');
        let value = value.trim().to_string();
        match key {
            "run_in_transaction" => {
                if run_in_transaction.is_some() {
                    return Err((
                        Some(line_no),
                        "`run_in_transaction` is set twice".to_string(),
                    ));
                }
                run_in_transaction = Some(match value.as_str() {
                    "true" => true,
                    "false" => false,
                    other => {
                        return Err((
                            Some(line_no),
                            format!(
                                "`run_in_transaction` must be `true` or `false`, not `{other}`"
                            ),
                        ))
                    }
                });
            }
            "requires_deferred" => {
                if requires_deferred.is_some() {
                    return Err((
                        Some(line_no),
                        "`requires_deferred` is set twice".to_string(),
                    ));
                }
                let bad = || {
                    (
                        Some(line_no),
                        "`requires_deferred` must be an array of version strings, e.g. \
                         `requires_deferred = [\"2024-01-31-120000\"]`"
                            .to_string(),
                    )
                };
                let items = parse_string_array(&value, &mut lines).ok_or_else(bad)?;
                let mut versions = Vec::new();
                for v in items {
                    let digits: String = v.chars().filter(|c| *c != '-').collect();
                    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                        return Err((
                            Some(line_no),
                            format!("`requires_deferred` lists `{v}`, which is not a version"),
                        ));
                    }
                    versions.push(digits);
                }
                requires_deferred = Some(versions);
            }
            "disable_checks" => {
                if disable_checks.is_some() {
                    return Err((Some(line_no), "`disable_checks` is set twice".to_string()));
                }
                disable_checks = Some(
                    parse_string_array(&value, &mut lines).ok_or((
                        Some(line_no),
                        "`disable_checks` must be an array of check names, e.g. \
                     `disable_checks = [\"AddColumnCheck\"]`"
                            .to_string(),
                    ))?,
                );
            }
            other => {
                return Err((
                    Some(line_no),
                    format!(
                        "unknown key `{other}`: the keys accepted are `run_in_transaction`, \
                         `requires_deferred` and `disable_checks`; remove it or fix its spelling"
                    ),
                ))
            }
        }
    }
    let run_in_transaction = run_in_transaction.ok_or((
        None,
        "metadata.toml exists but does not set `run_in_transaction`: diesel reads a missing \
         key as false and diesel-guard as true, so say which you mean, \
         `run_in_transaction = false` or `run_in_transaction = true`"
            .to_string(),
    ))?;
    Ok(Metadata {
        run_in_transaction,
        requires_deferred: requires_deferred.unwrap_or_default(),
        disable_checks: disable_checks.unwrap_or_default(),
    })
}

fn strip_toml_comment(line: &str) -> &str {
    // A `#` inside a basic or literal string is not a comment.
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '#') => return &line[..i],
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
    }
    line
}

fn check_dependencies(all: &[MigrationFiles], problems: &mut Vec<Problem>) {
    for m in all {
        for dep in &m.requires_deferred {
            let target = all
                .iter()
                .find(|d| compare_versions(&d.version, dep) == std::cmp::Ordering::Equal);
            match target {
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

/// Generates Rust source for the migrations of a validated pair: an
/// expression of type `MigrationSet`, with bodies pulled in by
/// `include_str!`. `krate` is the path of this crate as the generated code
/// sees it (`crate` inside it, `::diesel_rollout` outside).
pub fn generate(migrations: &[MigrationFiles], krate: &str) -> String {
    let mut out = String::new();
    out.push_str("// @generated by diesel-rollout's build-time embed. Do not edit.\n");
    out.push_str(&format!(
        "{{\n    static MIGRATIONS: &[{krate}::Migration] = &[\n"
    ));
    for m in migrations {
        let track = match m.track {
            Track::Required => "Required",
            Track::Deferred => "Deferred",
        };
        let up_path = absolute(&m.up_path);
        let down = match &m.down {
            Some((p, _)) => format!(
                "::core::option::Option::Some(include_str!({:?}))",
                absolute(p)
            ),
            None => "::core::option::Option::None".to_string(),
        };
        let requires = m
            .requires_deferred
            .iter()
            .map(|v| format!("::std::borrow::Cow::Borrowed({v:?})"))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "        {krate}::Migration::__embedded({:?}, {:?}, {:?}, {krate}::Track::{track}, \
             include_str!({up_path:?}), {up_path:?}, {down}, {}, {:?}, &[{requires}]),\n",
            m.version, m.dir_name, m.name, m.run_in_transaction, m.checksum,
        ));
    }
    out.push_str(&format!(
        "    ];\n    {krate}::MigrationSet::__embedded(MIGRATIONS)\n}}\n"
    ));
    out
}

fn absolute(path: &Path) -> String {
    fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// The lines a build script prints so that cargo re-runs it when anything
/// in either directory changes, including a new migration directory.
pub fn rerun_if_changed(required: &Path, deferred: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for dir in [required, deferred] {
        lines.push(format!("cargo:rerun-if-changed={}", dir.display()));
        if let Ok(entries) = list_dir(dir) {
            let mut entries = entries;
            entries.sort();
            for e in entries {
                lines.push(format!("cargo:rerun-if-changed={}", e.display()));
                if let Ok(files) = list_dir(&e) {
                    let mut files = files;
                    files.sort();
                    for f in files {
                        lines.push(format!("cargo:rerun-if-changed={}", f.display()));
                    }
                }
            }
        }
    }
    lines
}

/// The build-script side of embedding: validates the pair, prints the
/// `cargo:rerun-if-changed` lines and writes the generated table to
/// `out_file`.
///
/// # Errors
/// The validation problems, or an I/O error writing the file (as a problem).
pub fn embed_to(
    required: &Path,
    deferred: &Path,
    out_file: &Path,
    krate: &str,
) -> Result<Vec<String>, SourceError> {
    let lines = rerun_if_changed(required, deferred);
    let migrations = read_pair(required, deferred)?;
    let code = generate(&migrations, krate);
    // Write only when changed, so an unchanged set does not force a rebuild.
    if fs::read_to_string(out_file).ok().as_deref() != Some(code.as_str()) {
        fs::write(out_file, code).map_err(|e| SourceError {
            problems: vec![problem(out_file, None, format!("cannot write: {e}"))],
        })?;
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tree(tempfile::TempDir);

    impl Tree {
        fn new() -> Self {
            let t = Tree(tempfile::tempdir().unwrap());
            fs::create_dir(t.req()).unwrap();
            fs::create_dir(t.def()).unwrap();
            t
        }
        fn req(&self) -> PathBuf {
            self.0.path().join("migrations")
        }
        fn def(&self) -> PathBuf {
            self.0.path().join("migrations_deferred")
        }
        fn add(&self, track: Track, dir: &str, files: &[(&str, &str)]) -> PathBuf {
            let base = match track {
                Track::Required => self.req(),
                Track::Deferred => self.def(),
            };
            let d = base.join(dir);
            fs::create_dir_all(&d).unwrap();
            for (name, body) in files {
                fs::write(d.join(name), body).unwrap();
            }
            d
        }
        fn read(&self) -> Result<Vec<MigrationFiles>, SourceError> {
            read_pair(&self.req(), &self.def())
        }
    }

    const NO_TX: (&str, &str) = ("metadata.toml", "run_in_transaction = false\n");

    #[test]
    fn versions_follow_diesel_and_order_numerically() {
        assert_eq!(
            parse_dir_name("2024-01-31-120000_add_users").unwrap(),
            ("20240131120000".to_string(), "add_users".to_string())
        );
        assert_eq!(parse_dir_name("7").unwrap().0, "7");
        assert!(parse_dir_name("v1_x").is_err());
        assert!(parse_dir_name("_x").is_err());
        let t = Tree::new();
        t.add(Track::Required, "10_b", &[("up.sql", "select 1;")]);
        t.add(Track::Required, "9_a", &[("up.sql", "select 1;")]);
        t.add(Track::Deferred, "11_c", &[("up.sql", "select 1;"), NO_TX]);
        let got: Vec<_> = t.read().unwrap().into_iter().map(|m| m.version).collect();
        assert_eq!(got, ["9", "10", "11"]);
    }

    #[test]
    fn duplicate_version_across_tracks_names_both_paths() {
        let t = Tree::new();
        let a = t.add(
            Track::Required,
            "2024-01-01-000000_a",
            &[("up.sql", "select 1;")],
        );
        let b = t.add(
            Track::Deferred,
            "20240101000000_b",
            &[("up.sql", "select 1;"), NO_TX],
        );
        let err = t.read().unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].paths.len(), 2);
        let text = err.to_string();
        assert!(text.contains(&a.display().to_string()), "{text}");
        assert!(text.contains(&b.display().to_string()), "{text}");
        assert!(
            text.contains("version 20240101000000 is used by 2"),
            "{text}"
        );
    }

    #[test]
    fn missing_and_empty_up_sql() {
        let t = Tree::new();
        t.add(Track::Required, "1_a", &[("down.sql", "select 1;")]);
        t.add(Track::Required, "2_b", &[("up.sql", "  -- nothing\n")]);
        let text = t.read().unwrap_err().to_string();
        assert!(text.contains("1_a/up.sql: missing up.sql"), "{text}");
        assert!(text.contains("2_b/up.sql: up.sql is empty"), "{text}");
    }

    #[test]
    fn metadata_must_parse_and_name_run_in_transaction() {
        let t = Tree::new();
        t.add(
            Track::Required,
            "1_a",
            &[("up.sql", "select 1;"), ("metadata.toml", "# nothing\n")],
        );
        t.add(
            Track::Required,
            "2_b",
            &[
                ("up.sql", "select 1;"),
                ("metadata.toml", "run_in_transaction = true\nfoo = 1\n"),
            ],
        );
        t.add(
            Track::Required,
            "3_c",
            &[("up.sql", "select 1;"), ("metadata.toml", "[table\n")],
        );
        t.add(
            Track::Required,
            "4_d",
            &[
                ("up.sql", "select 1;"),
                ("metadata.toml", "run_in_transaction = \"no\""),
            ],
        );
        let text = t.read().unwrap_err().to_string();
        assert!(
            text.contains(
                "1_a/metadata.toml: metadata.toml exists but does not set `run_in_transaction`"
            ),
            "{text}"
        );
        assert!(
            text.contains("2_b/metadata.toml:2: unknown key `foo`"),
            "{text}"
        );
        assert!(text.contains("3_c/metadata.toml:1: cannot parse"), "{text}");
        assert!(
            text.contains("4_d/metadata.toml:1: `run_in_transaction` must be"),
            "{text}"
        );
    }

    #[test]
    fn concurrently_in_a_transactional_migration_names_the_line() {
        let t = Tree::new();
        t.add(
            Track::Required,
            "1_a",
            &[(
                "up.sql",
                "-- CONCURRENTLY in a comment is fine\nselect 'concurrently';\n\ncreate index concurrently i on t (a);\n",
            )],
        );
        let text = t.read().unwrap_err().to_string();
        assert!(
            text.contains("1_a/up.sql:4: `CONCURRENTLY` cannot run"),
            "{text}"
        );

        let ok = Tree::new();
        ok.add(
            Track::Required,
            "1_a",
            &[("up.sql", "create index concurrently i on t (a);"), NO_TX],
        );
        assert!(ok.read().is_ok());
    }

    #[test]
    fn deferred_migrations_must_opt_out_of_transactions() {
        let t = Tree::new();
        t.add(Track::Deferred, "1_a", &[("up.sql", "analyze;")]);
        let text = t.read().unwrap_err().to_string();
        assert!(
            text.contains("deferred migrations run outside any transaction"),
            "{text}"
        );
    }

    #[test]
    fn missing_required_dir_is_an_error_missing_deferred_is_empty() {
        let t = tempfile::tempdir().unwrap();
        let err = read_pair(&t.path().join("nope"), &t.path().join("nope2")).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
        fs::create_dir(t.path().join("m")).unwrap();
        assert!(read_pair(&t.path().join("m"), &t.path().join("nope2"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn checksum_is_sha256_hex() {
        assert_eq!(
            checksum(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn generated_code_embeds_every_migration() {
        let t = Tree::new();
        t.add(
            Track::Required,
            "1_a",
            &[("up.sql", "select 1;"), ("down.sql", "select 2;")],
        );
        t.add(Track::Deferred, "2_b", &[("up.sql", "select 1;"), NO_TX]);
        let code = generate(&t.read().unwrap(), "crate");
        assert_eq!(code.matches("crate::Migration::__embedded(").count(), 2);
        assert!(code.contains("crate::Track::Deferred"));
        assert!(code.contains("1_a/down.sql"));
        let lines = rerun_if_changed(&t.req(), &t.def());
        assert!(lines.iter().any(|l| l.ends_with("/migrations_deferred")));
        assert!(lines.iter().any(|l| l.ends_with("2_b/metadata.toml")));
    }

    #[test]
    fn requires_deferred_is_parsed_and_checked() {
        let t = Tree::new();
        t.add(
            Track::Deferred,
            "2024-01-02-000000_idx",
            &[("up.sql", "analyze;"), NO_TX],
        );
        t.add(
            Track::Required,
            "3_uses_idx",
            &[
                ("up.sql", "select 1;"),
                (
                    "metadata.toml",
                    "run_in_transaction = true\nrequires_deferred = [\n  \"2024-01-02-000000\", # the index\n]\n",
                ),
            ],
        );
        let set = t.read().unwrap();
        let m = set.iter().find(|m| m.version == "3").unwrap();
        assert_eq!(m.requires_deferred, ["20240102000000"]);
        assert!(generate(&set, "crate").contains("Cow::Borrowed(\"20240102000000\")"));

        let bad = Tree::new();
        bad.add(Track::Required, "1_a", &[("up.sql", "select 1;")]);
        bad.add(
            Track::Required,
            "2_b",
            &[
                ("up.sql", "select 1;"),
                (
                    "metadata.toml",
                    "run_in_transaction = true\nrequires_deferred = [\"1\", \"9\"]\n",
                ),
            ],
        );
        bad.add(
            Track::Deferred,
            "3_c",
            &[
                ("up.sql", "analyze;"),
                (
                    "metadata.toml",
                    "run_in_transaction = false\nrequires_deferred = []\n",
                ),
            ],
        );
        bad.add(
            Track::Required,
            "4_d",
            &[
                ("up.sql", "select 1;"),
                (
                    "metadata.toml",
                    "run_in_transaction = true\nrequires_deferred = \"1\"\n",
                ),
            ],
        );
        let text = bad.read().unwrap_err().to_string();
        assert!(
            text.contains("names 1, which is a required migration"),
            "{text}"
        );
        assert!(
            text.contains("names 9, which is not a deferred migration"),
            "{text}"
        );
        assert!(
            text.contains("4_d/metadata.toml:2: `requires_deferred` must be an array"),
            "{text}"
        );
    }
}
