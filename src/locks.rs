//! Which table-level lock a statement takes, and on what, read from its
//! tokens as PostgreSQL's documentation of each command describes it. For
//! `rollout plan`: an estimate from the SQL text, not a promise (a function
//! or a `DO` block can take any lock).

use crate::source::sql::{self, SqlToken, TokenKind};

/// A lock a statement takes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TableLock {
    /// The lock mode (`ACCESS EXCLUSIVE`, `SHARE`, ...), or what is known
    /// instead (`none`, `unknown`).
    pub mode: &'static str,
    /// The table (as written), or what else it is on.
    pub table: String,
}

/// The modes, as `pg_locks` names them, that conflict with `mode` (as
/// [`TableLock`] names it): PostgreSQL's table of conflicting lock modes.
/// Empty for `none` and `unknown`.
pub(crate) fn conflicting(mode: &str) -> &'static [&'static str] {
    const ALL: [&str; 8] = [
        "AccessShareLock",
        "RowShareLock",
        "RowExclusiveLock",
        "ShareUpdateExclusiveLock",
        "ShareLock",
        "ShareRowExclusiveLock",
        "ExclusiveLock",
        "AccessExclusiveLock",
    ];
    match mode {
        "ACCESS SHARE" => &ALL[7..],
        "ROW SHARE" => &ALL[6..],
        "ROW EXCLUSIVE" => &ALL[4..],
        "SHARE UPDATE EXCLUSIVE" => &ALL[3..],
        "SHARE" => &[
            "RowExclusiveLock",
            "ShareUpdateExclusiveLock",
            "ShareRowExclusiveLock",
            "ExclusiveLock",
            "AccessExclusiveLock",
        ],
        "SHARE ROW EXCLUSIVE" => &ALL[2..],
        "EXCLUSIVE" => &ALL[1..],
        "ACCESS EXCLUSIVE" => &ALL,
        _ => &[],
    }
}

/// How strong each mode is, for the strongest of several actions.
const MODES: [&str; 8] = [
    "ACCESS SHARE",
    "ROW SHARE",
    "ROW EXCLUSIVE",
    "SHARE UPDATE EXCLUSIVE",
    "SHARE",
    "SHARE ROW EXCLUSIVE",
    "EXCLUSIVE",
    "ACCESS EXCLUSIVE",
];

fn strength(mode: &str) -> usize {
    MODES.iter().position(|m| *m == mode).unwrap_or(0)
}

struct Words<'a> {
    t: &'a [SqlToken],
}

impl Words<'_> {
    fn is(&self, i: usize, w: &str) -> bool {
        self.t
            .get(i)
            .is_some_and(|t| t.kind == TokenKind::Word && t.text.eq_ignore_ascii_case(w))
    }

    fn seq(&self, i: usize, words: &[&str]) -> bool {
        words.iter().enumerate().all(|(k, w)| self.is(i + k, w))
    }

    /// Skips `IF EXISTS`, `IF NOT EXISTS` and `ONLY` at `i`.
    fn skip_noise(&self, mut i: usize) -> usize {
        loop {
            if self.seq(i, &["if", "not", "exists"]) {
                i += 3;
            } else if self.seq(i, &["if", "exists"]) {
                i += 2;
            } else if self.is(i, "only") {
                i += 1;
            } else {
                return i;
            }
        }
    }

    /// A possibly qualified name at `i`, and the index after it.
    fn name(&self, mut i: usize) -> Option<(String, usize)> {
        let mut text = String::new();
        loop {
            let t = self.t.get(i)?;
            if !matches!(t.kind, TokenKind::Word | TokenKind::QuotedIdent) {
                return (!text.is_empty()).then_some((text, i));
            }
            text.push_str(&t.text);
            i += 1;
            if self
                .t
                .get(i)
                .is_some_and(|p| p.kind == TokenKind::Punct('.'))
            {
                text.push('.');
                i += 1;
            } else {
                return Some((text, i));
            }
        }
    }

    /// The position of the first `word` at or after `i`, outside
    /// parentheses.
    fn find(&self, from: usize, word: &str) -> Option<usize> {
        let mut depth = 0usize;
        for i in from..self.t.len() {
            match self.t[i].kind {
                TokenKind::Punct('(') => depth += 1,
                TokenKind::Punct(')') => depth = depth.saturating_sub(1),
                _ if depth == 0 && self.is(i, word) => return Some(i),
                _ => {}
            }
        }
        None
    }

    /// Every table after `REFERENCES` anywhere in the statement.
    fn referenced(&self) -> Vec<String> {
        (0..self.t.len())
            .filter(|&i| self.is(i, "references"))
            .filter_map(|i| self.name(i + 1).map(|(n, _)| n))
            .collect()
    }
}

fn lock(mode: &'static str, table: impl Into<String>) -> TableLock {
    TableLock {
        mode,
        table: table.into(),
    }
}

/// The locks `statement` takes, strongest first for each object.
pub(crate) fn of_statement(statement: &str) -> Vec<TableLock> {
    let Ok(tokens) = sql::tokens(statement) else {
        return vec![lock("unknown", "(does not lex)")];
    };
    let w = Words { t: &tokens };
    let first = |i: usize, word: &str| w.is(i, word);
    let table_at = |i: usize| w.name(w.skip_noise(i)).map(|(n, _)| n).unwrap_or_default();
    let fk = |mut out: Vec<TableLock>| {
        for r in w.referenced() {
            out.push(lock("SHARE ROW EXCLUSIVE", r));
        }
        out
    };

    if first(0, "create") {
        let mut i = 1;
        for noise in [
            "or",
            "replace",
            "unique",
            "temporary",
            "temp",
            "unlogged",
            "materialized",
        ] {
            if w.is(i, noise) {
                i += 1;
            }
        }
        if w.is(i, "table") {
            return fk(vec![lock(
                "ACCESS EXCLUSIVE",
                format!("{} (new)", table_at(i + 1)),
            )]);
        }
        if w.is(i, "index") {
            let concurrently = w.is(i + 1, "concurrently");
            let on = w.find(i, "on").unwrap_or(i);
            let mode = if concurrently {
                "SHARE UPDATE EXCLUSIVE"
            } else {
                "SHARE"
            };
            return vec![lock(mode, table_at(on + 1))];
        }
        if w.is(i, "trigger") || w.seq(i, &["constraint", "trigger"]) {
            let on = w.find(i, "on").unwrap_or(i);
            return vec![lock("SHARE ROW EXCLUSIVE", table_at(on + 1))];
        }
        if w.is(i, "rule") {
            let to = w.find(i, "to").unwrap_or(i);
            return vec![lock("ACCESS EXCLUSIVE", table_at(to + 1))];
        }
        if w.is(i, "view") {
            return vec![lock("none", "(a view: catalog only)")];
        }
        return vec![lock("none", "(catalog only)")];
    }
    if first(0, "alter") {
        if w.is(1, "table") {
            let table = table_at(2);
            let mut mode = "SHARE UPDATE EXCLUSIVE";
            let mut i = 2;
            // Each action, separated by commas at depth 0.
            let mut depth = 0usize;
            let mut action_start = true;
            while i < tokens.len() {
                match tokens[i].kind {
                    TokenKind::Punct('(') => depth += 1,
                    TokenKind::Punct(')') => depth = depth.saturating_sub(1),
                    TokenKind::Punct(',') if depth == 0 => action_start = true,
                    TokenKind::Word if depth == 0 && action_start => {
                        let action = alter_action(&w, i);
                        if let Some(a) = action {
                            if strength(a) > strength(mode) {
                                mode = a;
                            }
                            action_start = false;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            let mut out = vec![lock(mode, table)];
            if w.find(2, "foreign").is_some() || w.find(2, "references").is_some() {
                out = fk(out);
            }
            return out;
        }
        if w.is(1, "index") {
            return vec![lock(
                "SHARE UPDATE EXCLUSIVE",
                format!("index {}", table_at(2)),
            )];
        }
        return vec![lock("none", "(catalog only)")];
    }
    if first(0, "drop") {
        if w.is(1, "table") {
            let (mut i, mut out) = (w.skip_noise(2), Vec::new());
            while let Some((n, next)) = w.name(i) {
                out.push(lock("ACCESS EXCLUSIVE", n));
                if tokens
                    .get(next)
                    .is_some_and(|t| t.kind == TokenKind::Punct(','))
                {
                    i = next + 1;
                } else {
                    break;
                }
            }
            return out;
        }
        if w.is(1, "index") {
            return if w.is(2, "concurrently") {
                vec![lock(
                    "SHARE UPDATE EXCLUSIVE",
                    format!("the table of index {}", table_at(3)),
                )]
            } else {
                vec![lock(
                    "ACCESS EXCLUSIVE",
                    format!("the table of index {}", table_at(2)),
                )]
            };
        }
        if w.is(1, "trigger") || w.is(1, "rule") {
            let on = w.find(2, "on").unwrap_or(2);
            return vec![lock("ACCESS EXCLUSIVE", table_at(on + 1))];
        }
        return vec![lock("none", "(catalog only)")];
    }
    if first(0, "insert") || first(0, "merge") {
        let into = w.find(1, "into").unwrap_or(1);
        return vec![lock("ROW EXCLUSIVE", table_at(into + 1))];
    }
    if first(0, "update") {
        return vec![lock("ROW EXCLUSIVE", table_at(1))];
    }
    if first(0, "delete") {
        let from = w.find(1, "from").unwrap_or(1);
        return vec![lock("ROW EXCLUSIVE", table_at(from + 1))];
    }
    if first(0, "truncate") {
        let i = if w.is(1, "table") { 2 } else { 1 };
        return vec![lock("ACCESS EXCLUSIVE", table_at(i))];
    }
    if first(0, "refresh") {
        return if w.is(3, "concurrently") {
            vec![lock("EXCLUSIVE", table_at(4))]
        } else {
            vec![lock("ACCESS EXCLUSIVE", table_at(3))]
        };
    }
    if first(0, "reindex") {
        let concurrently = w.find(1, "concurrently").is_some();
        let mode = if concurrently {
            "SHARE UPDATE EXCLUSIVE"
        } else {
            "SHARE"
        };
        let last = tokens.len().saturating_sub(1);
        let name = (1..=last)
            .rev()
            .find_map(|i| {
                w.name(i)
                    .filter(|(_, end)| *end == tokens.len())
                    .map(|(n, _)| n)
            })
            .unwrap_or_default();
        return vec![lock(mode, name)];
    }
    if first(0, "vacuum") || first(0, "analyze") || first(0, "analyse") {
        return vec![lock(
            "SHARE UPDATE EXCLUSIVE",
            "(each table it names, or all)",
        )];
    }
    if first(0, "cluster") {
        return vec![lock("ACCESS EXCLUSIVE", table_at(1))];
    }
    if first(0, "lock") {
        let i = if w.is(1, "table") { 2 } else { 1 };
        let table = table_at(i);
        let mode = MODES
            .iter()
            .rev()
            .find(|m| {
                let parts: Vec<&str> = m.split(' ').collect();
                (0..tokens.len()).any(|k| w.seq(k, &parts) && w.is(k + parts.len(), "mode"))
            })
            .copied()
            .unwrap_or("ACCESS EXCLUSIVE");
        return vec![lock(mode, table)];
    }
    if first(0, "comment") {
        return vec![lock("SHARE UPDATE EXCLUSIVE", table_at(3))];
    }
    if first(0, "select") || first(0, "with") || first(0, "values") {
        return vec![lock("ACCESS SHARE", "(what it reads)")];
    }
    if first(0, "do") || first(0, "call") {
        return vec![lock("unknown", "(code: whatever it runs takes)")];
    }
    vec![lock("none", "(no table lock)")]
}

/// The lock one `ALTER TABLE` action at `i` takes, when `i` starts one.
fn alter_action(w: &Words<'_>, i: usize) -> Option<&'static str> {
    let word = w.t.get(i)?.text.to_ascii_lowercase();
    Some(match word.as_str() {
        "validate" => "SHARE UPDATE EXCLUSIVE",
        "add" if w.find(i, "foreign").is_some_and(|f| f <= i + 4) => "SHARE ROW EXCLUSIVE",
        "enable" | "disable" if w.is(i + 1, "trigger") => "SHARE ROW EXCLUSIVE",
        "set"
            if w.is(i + 1, "statistics")
                || w.t
                    .get(i + 1)
                    .is_some_and(|t| t.kind == TokenKind::Punct('(')) =>
        {
            "SHARE UPDATE EXCLUSIVE"
        }
        "alter" if w.find(i, "statistics").is_some_and(|s| s <= i + 4) => "SHARE UPDATE EXCLUSIVE",
        "cluster" | "attach" => "SHARE UPDATE EXCLUSIVE",
        "detach" if w.find(i, "concurrently").is_some() => "SHARE UPDATE EXCLUSIVE",
        "add" | "alter" | "drop" | "rename" | "set" | "reset" | "inherit" | "no" | "owner"
        | "replica" | "force" | "of" | "not" | "detach" | "enable" | "disable" => {
            "ACCESS EXCLUSIVE"
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PostgreSQL's conflict table is symmetric, and only SHARE and the
    /// weaker row modes leave themselves out.
    #[test]
    fn the_conflict_table_is_postgresqls() {
        let pg = |m: &str| {
            m.split(' ')
                .map(|w| format!("{}{}", &w[..1], w[1..].to_lowercase()))
                .collect::<String>()
                + "Lock"
        };
        for a in MODES {
            for b in MODES {
                assert_eq!(
                    conflicting(a).contains(&pg(b).as_str()),
                    conflicting(b).contains(&pg(a).as_str()),
                    "{a} / {b}"
                );
            }
        }
        let selfish: Vec<&str> = MODES
            .into_iter()
            .filter(|m| conflicting(m).contains(&pg(m).as_str()))
            .collect();
        assert_eq!(
            selfish,
            [
                "SHARE UPDATE EXCLUSIVE",
                "SHARE ROW EXCLUSIVE",
                "EXCLUSIVE",
                "ACCESS EXCLUSIVE"
            ]
        );
        assert!(conflicting("unknown").is_empty());
    }

    fn modes(sql: &str) -> Vec<(String, String)> {
        of_statement(sql)
            .into_iter()
            .map(|l| (l.mode.to_string(), l.table))
            .collect()
    }

    fn one(mode: &str, table: &str) -> Vec<(String, String)> {
        vec![(mode.to_string(), table.to_string())]
    }

    #[test]
    fn statements_name_their_lock_and_table() {
        assert_eq!(
            modes("CREATE INDEX i ON orders (a)"),
            one("SHARE", "orders")
        );
        assert_eq!(
            modes("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON ONLY app.orders (a)"),
            one("SHARE UPDATE EXCLUSIVE", "app.orders")
        );
        assert_eq!(
            modes("ALTER TABLE orders ADD COLUMN note text"),
            one("ACCESS EXCLUSIVE", "orders")
        );
        assert_eq!(
            modes("ALTER TABLE orders VALIDATE CONSTRAINT c"),
            one("SHARE UPDATE EXCLUSIVE", "orders")
        );
        assert_eq!(
            modes("ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (u) REFERENCES users (id) NOT VALID"),
            vec![
                ("SHARE ROW EXCLUSIVE".to_string(), "orders".to_string()),
                ("SHARE ROW EXCLUSIVE".to_string(), "users".to_string())
            ]
        );
        assert_eq!(
            modes("ALTER TABLE t SET (fillfactor = 70), ADD COLUMN x int"),
            one("ACCESS EXCLUSIVE", "t")
        );
        assert_eq!(
            modes("CREATE TABLE IF NOT EXISTS items (id bigint)"),
            one("ACCESS EXCLUSIVE", "items (new)")
        );
        assert_eq!(
            modes("INSERT INTO log VALUES (1)"),
            one("ROW EXCLUSIVE", "log")
        );
        assert_eq!(modes("UPDATE ONLY t SET a = 1"), one("ROW EXCLUSIVE", "t"));
        assert_eq!(
            modes("DROP INDEX CONCURRENTLY IF EXISTS i"),
            one("SHARE UPDATE EXCLUSIVE", "the table of index i")
        );
        assert_eq!(
            modes("CREATE TRIGGER tr BEFORE UPDATE ON t FOR EACH ROW EXECUTE FUNCTION f()"),
            one("SHARE ROW EXCLUSIVE", "t")
        );
        assert_eq!(
            modes("REFRESH MATERIALIZED VIEW CONCURRENTLY mv"),
            one("EXCLUSIVE", "mv")
        );
        assert_eq!(modes("LOCK TABLE t IN SHARE MODE"), one("SHARE", "t"));
        assert_eq!(
            modes("CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql"),
            one("none", "(catalog only)")
        );
        assert_eq!(modes("DO $$ BEGIN PERFORM 1; END $$")[0].0, "unknown");
    }
}
