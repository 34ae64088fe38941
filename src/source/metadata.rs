//! `metadata.toml`: the subset of TOML its keys need, parsed with std only.

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

/// A problem at a line of `metadata.toml` (`None`: the file as a whole).
pub(crate) type Complaint = (Option<usize>, String);

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
#[cfg(feature = "lint")]
pub fn parse_metadata(text: &str) -> Result<Metadata, (Option<usize>, String)> {
    match parse_lenient(text)? {
        (m, complaints) if complaints.is_empty() => Ok(m),
        (_, mut complaints) => Err(complaints.remove(0)),
    }
}

/// As [`parse_metadata`], with what a new migration may not have but an old
/// one may (an unknown key, no `run_in_transaction`) returned as complaints
/// beside the metadata, read as diesel reads it (no `run_in_transaction`:
/// `false`; unknown keys ignored).
///
/// # Errors
/// `(line, message)` when the file does not parse.
pub(crate) fn parse_lenient(text: &str) -> Result<(Metadata, Vec<Complaint>), Complaint> {
    let mut complaints = Vec::new();
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
            other => complaints.push((
                Some(line_no),
                format!(
                    "unknown key `{other}`: the keys accepted are `run_in_transaction`, \
                     `requires_deferred` and `disable_checks`; remove it or fix its spelling"
                ),
            )),
        }
    }
    let run_in_transaction = match run_in_transaction {
        Some(r) => r,
        None => {
            complaints.push((
                None,
                "metadata.toml exists but does not set `run_in_transaction`: diesel reads a \
                 missing key as false and diesel-guard as true, so say which you mean, \
                 `run_in_transaction = false` or `run_in_transaction = true`"
                    .to_string(),
            ));
            // diesel's reading, which applied it.
            false
        }
    };
    Ok((
        Metadata {
            run_in_transaction,
            requires_deferred: requires_deferred.unwrap_or_default(),
            disable_checks: disable_checks.unwrap_or_default(),
        },
        complaints,
    ))
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
