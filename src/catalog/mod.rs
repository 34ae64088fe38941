//! The catalog, not the ledger, is the truth for index builds.
//!
//! A failed `CREATE INDEX CONCURRENTLY` leaves an invalid index behind, and a
//! retry with `IF NOT EXISTS` would skip it and report success. Before such a
//! statement the runner drops an invalid leftover that no session is still
//! building (waiting for one that is), and after it checks the index exists
//! and is valid. Leftovers of a failed `REINDEX CONCURRENTLY` (`*_ccnew`,
//! `*_ccold`) are handled the same way.

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_query;
use diesel::sql_types::{Bool, Integer, Text};

use crate::error::{Error, ErrorKind};
use crate::migration::Migration;
use crate::report::{IndexBuildProgress, IndexState, IndexStatus};
use crate::source::sql::{self, SqlToken, TokenKind};

mod confirm;
pub(crate) mod finished;
pub(crate) mod partition;

pub(crate) use self::confirm::confirm;

/// An identifier as written and as PostgreSQL folds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ident {
    /// The name PostgreSQL stores (`Foo` → `foo`, `"Foo"` → `Foo`).
    pub folded: String,
}

impl Ident {
    fn from_token(t: &SqlToken) -> Option<Self> {
        let name = match t.kind {
            TokenKind::Word => t.text.to_ascii_lowercase(),
            TokenKind::QuotedIdent if t.text.starts_with('"') && t.text.len() >= 2 => {
                t.text[1..t.text.len() - 1].replace("\"\"", "\"")
            }
            _ => return None,
        };
        Some(Ident {
            folded: truncate_identifier(&name, MAX_IDENTIFIER_BYTES).to_string(),
        })
    }
}

/// The longest name PostgreSQL stores: `NAMEDATALEN - 1` bytes.
pub(crate) const MAX_IDENTIFIER_BYTES: usize = 63;

/// `name` cut to at most `max` bytes without splitting a UTF-8 character,
/// as PostgreSQL truncates identifiers (and the base of the names it
/// chooses, such as `REINDEX CONCURRENTLY`'s `*_ccnew`).
pub(crate) fn truncate_identifier(name: &str, max: usize) -> &str {
    if name.len() <= max {
        return name;
    }
    let mut end = max;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// An index operation the runner checks against the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IndexOp {
    /// `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name ON table`.
    Create {
        index: Option<Ident>,
        /// The table as written (`s.t`, `"T"`), for `to_regclass`.
        table: String,
        if_not_exists: bool,
    },
    /// `REINDEX INDEX CONCURRENTLY name`.
    ReindexIndex {
        /// As written, for `to_regclass`.
        index: String,
        /// The index's own name, as stored.
        name: Ident,
    },
    /// `REINDEX TABLE CONCURRENTLY name`.
    ReindexTable { table: String },
    /// `DROP INDEX CONCURRENTLY [IF EXISTS] name` (one index: PostgreSQL
    /// drops only one at a time concurrently).
    Drop {
        /// As written, for `to_regclass`.
        index: String,
        if_exists: bool,
    },
}

fn is_word(t: Option<&SqlToken>, w: &str) -> bool {
    t.is_some_and(|t| t.kind == TokenKind::Word && t.text.eq_ignore_ascii_case(w))
}

/// A possibly qualified name starting at `i`: its text as written and the
/// last part. Returns the index after it.
fn qualified_name(t: &[SqlToken], mut i: usize) -> Option<(String, Ident, usize)> {
    let mut text = String::new();
    let mut last;
    loop {
        let tok = t.get(i)?;
        last = Ident::from_token(tok)?;
        text.push_str(&tok.text);
        i += 1;
        if t.get(i).is_some_and(|p| p.kind == TokenKind::Punct('.')) {
            text.push('.');
            i += 1;
        } else {
            return Some((text, last, i));
        }
    }
}

/// Whether `CREATE [UNIQUE] INDEX ... ON table <rest>` and its
/// `pg_get_indexdef` have the same uniqueness and text after the table.
pub(crate) fn same_definition(statement: &str, printed: &str) -> bool {
    let (Some(ours), Some(theirs)) = (index_tail(statement), index_tail(printed)) else {
        return false;
    };
    ours == theirs
}

/// Uniqueness and the normalised text after the table name of a `CREATE
/// INDEX` (its method made explicit: `btree` when not given).
fn index_tail(statement: &str) -> Option<(bool, String)> {
    let t = sql::tokens(statement).ok()?;
    let unique = is_word(t.get(1), "unique");
    let mut i = t.iter().position(|x| is_word(Some(x), "on"))? + 1;
    if is_word(t.get(i), "only") {
        i += 1;
    }
    i += 1;
    while t.get(i).is_some_and(|x| x.kind == TokenKind::Punct('.')) {
        i += 2;
    }
    let mut rest = String::new();
    if is_word(t.get(i), "using") {
        i += 1;
    } else {
        rest.push_str("btree");
    }
    for x in t.get(i..)? {
        if x.kind == TokenKind::Semicolon {
            break;
        }
        // As PostgreSQL prints them: unquoted words folded, quotes only
        // where a name needs them, literals as written.
        match x.kind {
            TokenKind::Word => rest.push_str(&x.text.to_lowercase()),
            TokenKind::QuotedIdent => match Ident::from_token(x) {
                Some(n)
                    if n.folded
                        .bytes()
                        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_')) =>
                {
                    rest.push_str(&n.folded)
                }
                _ => rest.push_str(&x.text),
            },
            _ => rest.push_str(&x.text),
        }
    }
    Some((unique, rest))
}

/// Recognises the concurrent index operations of a statement.
pub(crate) fn classify(statement: &str) -> Option<IndexOp> {
    let t = sql::tokens(statement).ok()?;
    if is_word(t.first(), "create") {
        let mut i = 1;
        if is_word(t.get(i), "unique") {
            i += 1;
        }
        if !is_word(t.get(i), "index") {
            return None;
        }
        i += 1;
        if !is_word(t.get(i), "concurrently") {
            return None;
        }
        i += 1;
        let mut if_not_exists = false;
        if is_word(t.get(i), "if")
            && is_word(t.get(i + 1), "not")
            && is_word(t.get(i + 2), "exists")
        {
            if_not_exists = true;
            i += 3;
        }
        let mut index = None;
        if !is_word(t.get(i), "on") {
            index = Ident::from_token(t.get(i)?);
            i += 1;
        }
        if !is_word(t.get(i), "on") {
            return None;
        }
        i += 1;
        if is_word(t.get(i), "only") {
            i += 1;
        }
        let (table, _, _) = qualified_name(&t, i)?;
        return Some(IndexOp::Create {
            index,
            table,
            if_not_exists,
        });
    }
    if is_word(t.first(), "drop") {
        if !is_word(t.get(1), "index") || !is_word(t.get(2), "concurrently") {
            return None;
        }
        let mut i = 3;
        let if_exists = is_word(t.get(i), "if") && is_word(t.get(i + 1), "exists");
        if if_exists {
            i += 2;
        }
        let (index, _, _) = qualified_name(&t, i)?;
        return Some(IndexOp::Drop { index, if_exists });
    }
    if is_word(t.first(), "reindex") {
        let mut i = 1;
        // `REINDEX (CONCURRENTLY [boolean], ...)`, the option list of
        // PostgreSQL 14 on, as well as the keyword after the kind.
        let mut concurrently = false;
        if t.get(i).is_some_and(|p| p.kind == TokenKind::Punct('(')) {
            while t.get(i).is_some_and(|p| p.kind != TokenKind::Punct(')')) {
                if is_word(t.get(i), "concurrently") {
                    let value = t.get(i + 1).map(|v| v.text.to_ascii_lowercase());
                    concurrently = !matches!(value.as_deref(), Some("false" | "off" | "0"));
                }
                i += 1;
            }
            i += 1;
        }
        let kind = t.get(i)?.text.to_ascii_lowercase();
        i += 1;
        if is_word(t.get(i), "concurrently") {
            concurrently = true;
            i += 1;
        }
        if !concurrently {
            return None;
        }
        let (text, last, _) = qualified_name(&t, i)?;
        return match kind.as_str() {
            "index" => Some(IndexOp::ReindexIndex {
                index: text,
                name: last,
            }),
            "table" => Some(IndexOp::ReindexTable { table: text }),
            _ => None,
        };
    }
    None
}

/// The table an `ALTER TABLE` statement changes, for messages.
pub(crate) fn altered_table(statement: &str) -> Option<String> {
    alter_table(statement).map(|(_, name, _)| name)
}

/// `ALTER TABLE [IF EXISTS] [ONLY] name ...`: its tokens, the table as
/// written and the index after it.
fn alter_table(statement: &str) -> Option<(Vec<SqlToken>, String, usize)> {
    let t = sql::tokens(statement).ok()?;
    if !(is_word(t.first(), "alter") && is_word(t.get(1), "table")) {
        return None;
    }
    let mut i = 2;
    if is_word(t.get(i), "if") && is_word(t.get(i + 1), "exists") {
        i += 2;
    }
    if is_word(t.get(i), "only") {
        i += 1;
    }
    let (name, _, i) = qualified_name(&t, i)?;
    Some((t, name, i))
}

/// One index of a table, as the catalog sees it.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct IndexRow {
    #[diesel(sql_type = Text)]
    pub schema_name: String,
    #[diesel(sql_type = Text)]
    pub index_name: String,
    #[diesel(sql_type = Text)]
    pub table_name: String,
    #[diesel(sql_type = Bool)]
    pub valid: bool,
    /// As PostgreSQL prints it (`pg_get_indexdef`).
    #[diesel(sql_type = Text)]
    pub definition: String,
    #[diesel(sql_type = Bool)]
    pub building: bool,
    /// A partitioned table's own index (`relkind` `I`): valid once every
    /// partition has one attached.
    #[diesel(sql_type = Bool)]
    pub partitioned: bool,
}

impl IndexRow {
    /// Whether this could be what the unnamed `CREATE INDEX` `statement`
    /// built: its definition, under a name PostgreSQL generates
    /// (`<table>_<columns>_idx[N]`; a constraint's `_key` or `_pkey`, or
    /// any name a migration chose, is not).
    fn generated_for(&self, statement: &str) -> bool {
        let base = self
            .index_name
            .trim_end_matches(|c: char| c.is_ascii_digit());
        base.ends_with("_idx") && same_definition(statement, &self.definition)
    }

    fn quoted(&self) -> String {
        format!(
            "\"{}\".\"{}\"",
            self.schema_name.replace('"', "\"\""),
            self.index_name.replace('"', "\"\"")
        )
    }

    /// Whether this is what a failed `REINDEX CONCURRENTLY` of index `of`
    /// (any index, with `None`) leaves: `<base>_ccnew[N]` or
    /// `<base>_ccold[N]`, where PostgreSQL cuts the base so the whole name
    /// fits in 63 bytes.
    fn is_reindex_leftover(&self, of: Option<&str>) -> bool {
        let Some(pos) = self
            .index_name
            .rfind("_ccnew")
            .or_else(|| self.index_name.rfind("_ccold"))
        else {
            return false;
        };
        let suffix = &self.index_name[pos + 6..];
        let room = MAX_IDENTIFIER_BYTES.saturating_sub(self.index_name.len() - pos);
        suffix.bytes().all(|b| b.is_ascii_digit())
            && of.is_none_or(|base| self.index_name[..pos] == *truncate_identifier(base, room))
    }
}

/// Every index of `table` (as written), empty when the table does not exist.
pub(crate) fn table_indexes(conn: &mut PgConnection, table: &str) -> QueryResult<Vec<IndexRow>> {
    sql_query(include_str!("../sql/table_indexes.sql"))
        .bind::<Text, _>(table)
        .load(conn)
}

/// Whether a relation answers to `name` (as written, on the session's
/// `search_path`).
pub(crate) fn relation_exists(conn: &mut PgConnection, name: &str) -> QueryResult<bool> {
    sql_query("SELECT to_regclass($1) IS NOT NULL AS found")
        .bind::<Text, _>(name)
        .get_result::<Found>(conn)
        .map(|e| e.found)
}

/// A yes-or-no answer from the catalog.
#[derive(QueryableByName)]
struct Found {
    #[diesel(sql_type = Bool)]
    found: bool,
}

/// Whether `table` (as written) has an index that is not valid (being
/// built, or left by a failed build). Asked before [`table_indexes`], whose
/// plan alone costs ten times this query: an index statement with nothing
/// to wait for or repair, the usual case, pays only this.
fn has_invalid_index(conn: &mut PgConnection, table: &str) -> QueryResult<bool> {
    sql_query(include_str!("../sql/invalid_index.sql"))
        .bind::<Text, _>(table)
        .get_result::<Found>(conn)
        .map(|e| e.found)
}

/// Whether `table` (as written) has a valid index named `name` (as stored).
fn has_valid_index(conn: &mut PgConnection, table: &str, name: &str) -> QueryResult<bool> {
    sql_query(include_str!("../sql/valid_index.sql"))
        .bind::<Text, _>(table)
        .bind::<Text, _>(name)
        .get_result::<Found>(conn)
        .map(|e| e.found)
}

fn table_of_index(conn: &mut PgConnection, index: &str) -> QueryResult<Option<String>> {
    #[derive(QueryableByName)]
    struct T {
        #[diesel(sql_type = Text)]
        table_name: String,
    }
    sql_query(include_str!("../sql/index_table.sql"))
        .bind::<Text, _>(index)
        .get_result::<T>(conn)
        .optional()
        .map(|t| t.map(|t| t.table_name))
}

/// What the checks need from the runner: whether to stop waiting.
pub(crate) struct Checks<'a> {
    pub should_stop: &'a dyn Fn() -> bool,
    pub on_repaired: &'a dyn Fn(&str),
    pub poll: Duration,
}

/// An index build running now in this database: who runs it, and its
/// progress.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct RunningBuild {
    #[diesel(sql_type = Integer)]
    pub pid: i32,
    #[diesel(sql_type = Text)]
    pub application_name: String,
    #[diesel(sql_type = Text)]
    pub command: String,
    /// The index's own name, unquoted (empty until it exists).
    #[diesel(sql_type = Text)]
    pub index_relname: String,
    #[diesel(embed)]
    pub progress: IndexBuildProgress,
}

/// The state of every named index the statements of `m` create.
pub(crate) fn migration_indexes(
    conn: &mut PgConnection,
    m: &Migration,
    builds: &[RunningBuild],
) -> QueryResult<Vec<IndexStatus>> {
    let mut out = Vec::new();
    let Ok(statements) = sql::split_statements(m.up_sql()) else {
        return Ok(out);
    };
    for s in statements {
        let Some(IndexOp::Create {
            index: Some(index),
            table,
            ..
        }) = classify(&s.sql)
        else {
            continue;
        };
        let rows = table_indexes(conn, &table)?;
        let row = rows.iter().find(|r| r.index_name == index.folded);
        let build = builds.iter().find(|b| b.index_relname == index.folded);
        let state = match row {
            Some(r) if r.valid => IndexState::Valid,
            Some(r) if r.building => IndexState::Building,
            Some(_) => IndexState::Invalid,
            None => IndexState::Missing,
        };
        out.push(IndexStatus {
            name: index.folded.clone(),
            table,
            state,
            progress: build
                .filter(|_| state == IndexState::Building)
                .map(|b| b.progress.clone()),
        });
    }
    Ok(out)
}

pub(crate) fn builds_in_progress(conn: &mut PgConnection) -> QueryResult<Vec<RunningBuild>> {
    sql_query(include_str!("../sql/builds_in_progress.sql")).load(conn)
}

fn catalog_error(m: &Migration, line: usize, e: diesel::result::Error) -> Error {
    Error::db("checking the index in the catalog", e).at(m, Some(line))
}

/// Picks the indexes a statement cares about.
type Matcher = Box<dyn Fn(&IndexRow) -> bool>;

/// Before a concurrent index statement: wait for builds still running,
/// and drop invalid leftovers nobody is building.
pub(crate) fn prepare(
    conn: &mut PgConnection,
    op: &IndexOp,
    statement: &str,
    m: &Migration,
    line: usize,
    checks: &Checks<'_>,
) -> Result<(), Error> {
    let (table, wanted): (String, Matcher) = match op {
        IndexOp::Create {
            index: Some(index),
            table,
            ..
        } => {
            let name = index.folded.clone();
            (
                table.clone(),
                Box::new(move |r: &IndexRow| r.index_name == name),
            )
        }
        // PostgreSQL names it: its leftover is an index of the same
        // definition under a name PostgreSQL generates.
        IndexOp::Create {
            index: None, table, ..
        } => {
            let statement = statement.to_string();
            (
                table.clone(),
                Box::new(move |r: &IndexRow| r.generated_for(&statement)),
            )
        }
        IndexOp::Drop { .. } => return Ok(()),
        IndexOp::ReindexIndex { index, name } => {
            let Some(table) = table_of_index(conn, index).map_err(|e| catalog_error(m, line, e))?
            else {
                return Ok(());
            };
            let base = name.folded.clone();
            (
                table,
                Box::new(move |r: &IndexRow| r.is_reindex_leftover(Some(&base))),
            )
        }
        IndexOp::ReindexTable { table } => (
            table.clone(),
            Box::new(|r: &IndexRow| r.is_reindex_leftover(None)),
        ),
    };
    if !has_invalid_index(conn, &table).map_err(|e| catalog_error(m, line, e))? {
        return Ok(());
    }
    let started = Instant::now();
    let mut logged = None::<Instant>;
    loop {
        let rows = table_indexes(conn, &table).map_err(|e| catalog_error(m, line, e))?;
        let mut waiting = false;
        for r in rows.iter().filter(|r| wanted(r) && !r.valid) {
            if r.building {
                waiting = true;
                if logged.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(30)) {
                    tracing::info!(
                        index = %r.index_name,
                        table = %r.table_name,
                        waited_secs = started.elapsed().as_secs(),
                        "another session is still building index {}: waiting for it, not dropping it",
                        r.index_name
                    );
                    logged = Some(Instant::now());
                }
            } else {
                tracing::warn!(
                    index = %r.index_name,
                    table = %r.table_name,
                    "dropping invalid index {} left by a failed build, to rebuild it",
                    r.index_name
                );
                conn.batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {}", r.quoted()))
                    .map_err(|e| {
                        Error::db(&format!("dropping the invalid index {}", r.quoted()), e)
                            .at(m, Some(line))
                    })?;
                (checks.on_repaired)(&r.index_name);
            }
        }
        if !waiting {
            return Ok(());
        }
        if (checks.should_stop)() {
            return Err(Error::new(
                ErrorKind::Stopped,
                "stopped while waiting for another session's index build",
            )
            .at(m, Some(line)));
        }
        std::thread::sleep(checks.poll);
    }
}

#[cfg(test)]
mod tests;
