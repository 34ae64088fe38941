//! Lexical scanning of PostgreSQL scripts (std only).
//!
//! A migration's `up.sql` is split into statements so they can be sent one at
//! a time, and scanned for keywords (such as `CONCURRENTLY`) outside strings,
//! quoted identifiers and comments. The scanner follows PostgreSQL's lexical
//! rules with `standard_conforming_strings = on`:
//!
//! * `-- …` line comments (ended by `\n` or `\r`) and nesting
//!   `/* … /* … */ … */` block comments;
//! * string continuation: `'a'` and `'b'` separated by whitespace holding a
//!   newline are one literal, in the first part's mode;
//! * `'…'` strings (`''` escapes a quote, backslash is literal), including the
//!   `U&'…'`, `B'…'`, `X'…'` and `N'…'` forms;
//! * `E'…'` escape strings, where `\` also escapes the next character;
//! * `"…"` (and `U&"…"`) quoted identifiers with `""` escapes;
//! * `$$…$$` and `$tag$…$tag$` dollar quotes (`$1` is a parameter, and a `$`
//!   inside an identifier such as `a$b` belongs to the identifier);
//! * SQL-standard routine bodies (`CREATE [OR REPLACE] FUNCTION|PROCEDURE …
//!   BEGIN ATOMIC …; …; END`), whose inner semicolons do not end the
//!   statement. This uses the same heuristic as `psql`.
//!
//! All delimiters are ASCII, so every slice taken at a token boundary is at a
//! UTF-8 character boundary; non-ASCII bytes are identifier characters, as in
//! PostgreSQL.

use std::fmt;

/// One SQL statement of a script, as sent to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The statement text, WITHOUT the terminating `;`: it runs from the first
    /// token to the last token, so comments before the first token and after
    /// the last one are dropped, while comments between tokens are kept.
    pub sql: String,
    /// 1-based line in the script where the statement's first token starts
    /// (not where leading whitespace or comments start).
    pub line: usize,
    /// Byte offset in the script of the statement's first token.
    pub offset: usize,
}

/// A word token (unquoted identifier or keyword) outside strings, quoted
/// identifiers and comments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    /// The word as written in the script (case preserved).
    pub text: String,
    /// 1-based line where the word starts.
    pub line: usize,
    /// Byte offset of the word in the script.
    pub offset: usize,
}

/// A construct (string, quoted identifier, dollar quote, block comment) that
/// is not terminated before the end of the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LexError {
    /// What is unterminated, e.g. `unterminated dollar-quoted string $fn$`.
    pub message: String,
    /// 1-based line where the unterminated construct starts.
    pub line: usize,
}

impl fmt::Display for LexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {} starting here", self.line, self.message)
    }
}

impl std::error::Error for LexError {}

/// Splits a script into statements on `;`, ignoring semicolons inside
/// strings, quoted identifiers, comments, dollar quotes, parentheses and
/// `BEGIN ATOMIC` routine bodies, as psql does. Empty statements are skipped; the last statement may lack
/// its `;`.
///
/// # Errors
///
/// A [`LexError`] if a string, quoted identifier, dollar quote or block
/// comment is not terminated.
pub fn split_statements(script: &str) -> Result<Vec<Statement>, LexError> {
    let mut out = Vec::new();
    let mut lines = LineCounter::new(script);
    // Byte span (first token start, last token end) of the current statement.
    let mut current: Option<(usize, usize)> = None;
    let mut body = BodyTracker::default();
    // As psql: a `;` inside parentheses (a multi-action `CREATE RULE ... DO
    // ALSO (...; ...)`) does not end the statement.
    let mut parens = 0usize;
    let mut finish = |span: Option<(usize, usize)>, lines: &mut LineCounter<'_>| {
        if let Some((start, end)) = span {
            out.push(Statement {
                sql: script[start..end].to_owned(),
                line: lines.line_at(start),
                offset: start,
            });
        }
    };
    for token in Lexer::new(script) {
        let token = token?;
        if token.kind == Kind::Semicolon && !body.inside_block() && parens == 0 {
            finish(current.take(), &mut lines);
            body = BodyTracker::default();
            continue;
        }
        match token.kind {
            Kind::Punct(b'(') => parens += 1,
            Kind::Punct(b')') => parens = parens.saturating_sub(1),
            _ => {}
        }
        current.get_or_insert((token.start, token.end)).1 = token.end;
        body.feed(token.kind, &script[token.start..token.end]);
    }
    finish(current, &mut lines);
    Ok(out)
}

/// Words (identifiers/keywords, unquoted) of the script in order.
///
/// # Errors
///
/// A [`LexError`] if a string, quoted identifier, dollar quote or block
/// comment is not terminated.
pub fn words(script: &str) -> Result<Vec<Word>, LexError> {
    let mut lines = LineCounter::new(script);
    let mut out = Vec::new();
    for token in Lexer::new(script) {
        let token = token?;
        if token.kind == Kind::Word {
            out.push(Word {
                text: script[token.start..token.end].to_owned(),
                line: lines.line_at(token.start),
                offset: token.start,
            });
        }
    }
    Ok(out)
}

/// What kind of token a [`SqlToken`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// An unquoted identifier or keyword.
    Word,
    /// A `"quoted"` (or `U&"..."`) identifier.
    QuotedIdent,
    /// `;`
    Semicolon,
    /// Any other single ASCII character (operators, parentheses, `.`, ...).
    Punct(char),
    /// A string, dollar quote, number or `$n` parameter.
    Literal,
}

/// A token of a script, outside comments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlToken {
    /// Its kind.
    pub kind: TokenKind,
    /// The token as written.
    pub text: String,
    /// 1-based line where it starts.
    pub line: usize,
    /// Byte offset in the script.
    pub offset: usize,
}

/// Every token of the script in order, comments skipped.
///
/// # Errors
///
/// A [`LexError`] if a string, quoted identifier, dollar quote or block
/// comment is not terminated.
pub fn tokens(script: &str) -> Result<Vec<SqlToken>, LexError> {
    let mut lines = LineCounter::new(script);
    let mut out = Vec::new();
    for token in Lexer::new(script) {
        let token = token?;
        let text = &script[token.start..token.end];
        let kind = match token.kind {
            Kind::Word => TokenKind::Word,
            Kind::Semicolon => TokenKind::Semicolon,
            Kind::Punct(b) => TokenKind::Punct(char::from(b)),
            Kind::Literal
                if text.starts_with('"')
                    || text.starts_with("U&\"")
                    || text.starts_with("u&\"") =>
            {
                TokenKind::QuotedIdent
            }
            Kind::Literal => TokenKind::Literal,
        };
        out.push(SqlToken {
            kind,
            text: text.to_owned(),
            line: lines.line_at(token.start),
            offset: token.start,
        });
    }
    Ok(out)
}

/// First occurrence of a keyword (case-insensitive, unquoted identifier
/// match) outside strings/comments. The whole script is scanned, so a lexical
/// error anywhere in it is reported even if the keyword occurs earlier.
///
/// # Errors
///
/// A [`LexError`] if a string, quoted identifier, dollar quote or block
/// comment is not terminated.
pub fn find_keyword(script: &str, keyword: &str) -> Result<Option<Word>, LexError> {
    Ok(words(script)?
        .into_iter()
        .find(|w| w.text.eq_ignore_ascii_case(keyword)))
}

/// Whether a statement is a `COPY` that exchanges data with the client
/// (`COPY ... FROM STDIN`, `COPY ... TO STDOUT`): the data of `FROM STDIN`
/// follows the statement in psql's input, which a migration runner does not
/// send, so the copy would load nothing.
#[must_use]
pub fn is_client_copy(statement: &str) -> bool {
    let Ok(t) = tokens(statement) else {
        return false;
    };
    let word = |i: usize, w: &str| {
        t.get(i)
            .is_some_and(|t| t.kind == TokenKind::Word && t.text.eq_ignore_ascii_case(w))
    };
    word(0, "copy")
        && (0..t.len()).any(|i| {
            (word(i, "from") && word(i + 1, "stdin")) || (word(i, "to") && word(i + 1, "stdout"))
        })
}

/// Whether a statement begins or ends a transaction (`BEGIN`, `START
/// TRANSACTION`, `COMMIT`, `END`, `ROLLBACK`, `ABORT`, `COMMIT PREPARED`...);
/// `ROLLBACK TO SAVEPOINT` and `SAVEPOINT` do not.
#[must_use]
pub fn is_transaction_control(statement: &str) -> bool {
    let Ok(t) = tokens(statement) else {
        return false;
    };
    let word = |i: usize, w: &str| {
        t.get(i)
            .is_some_and(|t| t.kind == TokenKind::Word && t.text.eq_ignore_ascii_case(w))
    };
    // `ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] name` stays inside.
    let to_savepoint =
        word(1, "to") || ((word(1, "transaction") || word(1, "work")) && word(2, "to"));
    word(0, "begin")
        || word(0, "commit")
        || word(0, "end")
        || word(0, "abort")
        || (word(0, "start") && word(1, "transaction"))
        || (word(0, "rollback") && !to_savepoint)
}

/// 1-based line number of a byte offset (helper, used to map a server error
/// position to a line). Offsets past the end count as the end of the script;
/// `\r\n` is one line break.
#[must_use]
pub fn line_of_offset(script: &str, offset: usize) -> usize {
    let bytes = script.as_bytes();
    let end = offset.min(bytes.len());
    1 + bytes[..end].iter().filter(|&&b| b == b'\n').count()
}

/// Kinds of significant tokens; whitespace and comments are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Unquoted identifier or keyword.
    Word,
    /// `;`
    Semicolon,
    /// Any other single ASCII character (operators, parentheses, …).
    Punct(u8),
    /// String, quoted identifier, dollar quote, number or `$n` parameter.
    Literal,
}

#[derive(Debug, Clone, Copy)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// Dollar-quote tags are identifier-like but cannot contain `$`.
fn is_tag_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit()
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0B' | b'\x0C')
}

/// Iterator over the significant tokens of a script. After an error it
/// yields nothing more.
struct Lexer<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Lexer { src, pos: 0 }
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.src.as_bytes().get(self.pos + ahead).copied()
    }

    /// Builds an error for a construct starting at `start` and stops the lexer.
    fn error(&mut self, message: String, start: usize) -> LexError {
        self.pos = self.src.len();
        LexError {
            message,
            line: line_of_offset(self.src, start),
        }
    }

    /// Skips whitespace and comments.
    fn skip_trivia(&mut self) -> Result<(), LexError> {
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some(b), _) if is_space(b) => self.pos += 1,
                (Some(b'-'), Some(b'-')) => self.pos = self.comment_end(self.pos),
                (Some(b'/'), Some(b'*')) => self.skip_block_comment()?,
                _ => return Ok(()),
            }
        }
    }

    /// Where a `--` comment starting at `at` ends: at the first `\n` or
    /// `\r` (PostgreSQL ends it at either), which is not part of it.
    fn comment_end(&self, at: usize) -> usize {
        match self.src.as_bytes()[at..]
            .iter()
            .position(|&b| b == b'\n' || b == b'\r')
        {
            Some(i) => at + i,
            None => self.src.len(),
        }
    }

    /// Where a string literal continues after its closing quote, if it
    /// does: PostgreSQL joins `'a'` and `'b'` separated by whitespace that
    /// holds at least one newline (and maybe `--` comments) into one literal,
    /// in the first part's mode (`E'a' \n '\''` is one escape string). Returns
    /// the offset of the continuing quote.
    fn continuation(&self, from: usize) -> Option<usize> {
        let b = self.src.as_bytes();
        let mut i = from;
        // Horizontal whitespace and comments, then a newline.
        loop {
            match b.get(i) {
                Some(b' ' | b'\t' | b'\x0C') => i += 1,
                Some(b'-') if b.get(i + 1) == Some(&b'-') => i = self.comment_end(i),
                Some(b'\n' | b'\r') => break,
                _ => return None,
            }
        }
        // Any whitespace, and comments each ended by a newline.
        loop {
            match b.get(i) {
                Some(&c) if is_space(c) => i += 1,
                Some(b'-') if b.get(i + 1) == Some(&b'-') => {
                    i = self.comment_end(i);
                    if !matches!(b.get(i), Some(b'\n' | b'\r')) {
                        return None;
                    }
                }
                Some(b'\'') => return Some(i),
                _ => return None,
            }
        }
    }

    /// Skips a (possibly nested) block comment starting at `self.pos`.
    fn skip_block_comment(&mut self) -> Result<(), LexError> {
        let start = self.pos;
        self.pos += 2;
        let mut depth = 1usize;
        while depth > 0 {
            match (self.peek(0), self.peek(1)) {
                (None, _) => return Err(self.error("unterminated /* comment".into(), start)),
                (Some(b'/'), Some(b'*')) => {
                    depth += 1;
                    self.pos += 2;
                }
                (Some(b'*'), Some(b'/')) => {
                    depth -= 1;
                    self.pos += 2;
                }
                _ => self.pos += 1,
            }
        }
        Ok(())
    }

    /// Consumes a quoted construct whose opening `quote` is at `self.pos`.
    /// A doubled quote is an escaped quote; with `backslash`, `\` escapes the
    /// next byte (only ASCII bytes matter, so skipping one byte of a
    /// multi-byte character is harmless). `start` is the token start.
    fn quoted(&mut self, quote: u8, backslash: bool, start: usize) -> Result<(), LexError> {
        self.pos += 1;
        loop {
            match self.peek(0) {
                None => {
                    let what = if quote == b'"' {
                        "unterminated quoted identifier"
                    } else {
                        "unterminated quoted string"
                    };
                    return Err(self.error(what.into(), start));
                }
                Some(b'\\') if backslash => self.pos = (self.pos + 2).min(self.src.len()),
                Some(b) if b == quote => {
                    self.pos += 1;
                    if self.peek(0) == Some(quote) {
                        self.pos += 1;
                        continue;
                    }
                    match self.continuation(self.pos).filter(|_| quote == b'\'') {
                        Some(next) => self.pos = next + 1,
                        None => return Ok(()),
                    }
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    /// Handles a `$` at `self.pos`: parameter, dollar quote, or punctuation.
    fn dollar(&mut self) -> Result<Kind, LexError> {
        let start = self.pos;
        let bytes = self.src.as_bytes();
        let mut end = start + 1;
        if bytes.get(end).is_some_and(u8::is_ascii_digit) {
            // Positional parameter `$1`.
            while bytes.get(end).is_some_and(u8::is_ascii_digit) {
                end += 1;
            }
            self.pos = end;
            return Ok(Kind::Literal);
        }
        if bytes.get(end).is_some_and(|&b| is_ident_start(b)) {
            while bytes.get(end).is_some_and(|&b| is_tag_cont(b)) {
                end += 1;
            }
        }
        if bytes.get(end) != Some(&b'$') {
            self.pos = start + 1;
            return Ok(Kind::Punct(b'$'));
        }
        // `start..=end` is `$tag$`, delimited by ASCII `$` on both sides.
        let delim = &self.src[start..=end];
        let body = end + 1;
        match self.src[body..].find(delim) {
            Some(i) => {
                self.pos = body + i + delim.len();
                Ok(Kind::Literal)
            }
            None => {
                let message = format!("unterminated dollar-quoted string {delim}");
                Err(self.error(message, start))
            }
        }
    }

    /// Handles a word, or a string/identifier with a one-word prefix
    /// (`E'`, `B'`, `X'`, `N'`, `U&'`, `U&"`). Because words are consumed
    /// whole, a prefix here is always at a word boundary (`name'x'` is the
    /// word `name` followed by a plain string).
    fn word_or_prefixed(&mut self, first: u8) -> Result<Kind, LexError> {
        let start = self.pos;
        match (first.to_ascii_lowercase(), self.peek(1), self.peek(2)) {
            (b'e', Some(b'\''), _) => {
                self.pos += 1;
                self.quoted(b'\'', true, start)?;
            }
            (b'b' | b'x' | b'n', Some(b'\''), _) => {
                self.pos += 1;
                self.quoted(b'\'', false, start)?;
            }
            (b'u', Some(b'&'), Some(q @ (b'\'' | b'"'))) => {
                self.pos += 2;
                self.quoted(q, false, start)?;
            }
            _ => {
                self.pos += 1;
                while self.peek(0).is_some_and(is_ident_cont) {
                    self.pos += 1;
                }
                return Ok(Kind::Word);
            }
        }
        Ok(Kind::Literal)
    }

    fn next_token(&mut self) -> Result<Option<Token>, LexError> {
        self.skip_trivia()?;
        let start = self.pos;
        let Some(b) = self.peek(0) else {
            return Ok(None);
        };
        let kind = match b {
            b';' => {
                self.pos += 1;
                Kind::Semicolon
            }
            b'\'' | b'"' => {
                self.quoted(b, false, start)?;
                Kind::Literal
            }
            b'$' => self.dollar()?,
            b'0'..=b'9' => {
                // Numbers, including `1.5e3`, `0x1F` and `1_000`.
                self.pos += 1;
                while self
                    .peek(0)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
                {
                    self.pos += 1;
                }
                Kind::Literal
            }
            b if is_ident_start(b) => self.word_or_prefixed(b)?,
            _ => {
                self.pos += 1;
                Kind::Punct(b)
            }
        };
        Ok(Some(Token {
            kind,
            start,
            end: self.pos,
        }))
    }
}

impl Iterator for Lexer<'_> {
    type Item = Result<Token, LexError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_token().transpose()
    }
}

/// Computes line numbers for increasing offsets in one pass.
struct LineCounter<'a> {
    bytes: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> LineCounter<'a> {
    fn new(script: &'a str) -> Self {
        LineCounter {
            bytes: script.as_bytes(),
            pos: 0,
            line: 1,
        }
    }

    /// Line of `offset`; offsets must not decrease between calls.
    fn line_at(&mut self, offset: usize) -> usize {
        let offset = offset.clamp(self.pos, self.bytes.len());
        self.line += self.bytes[self.pos..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.pos = offset;
        self.line
    }
}

/// How far the leading words of a statement match
/// `CREATE [OR REPLACE] FUNCTION|PROCEDURE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Header {
    #[default]
    Start,
    Create,
    CreateOr,
    CreateOrReplace,
    Routine,
    Other,
}

/// psql's heuristic for SQL-standard routine bodies: in a statement starting
/// with `CREATE [OR REPLACE] FUNCTION|PROCEDURE`, outside parentheses, `BEGIN`
/// opens a block, `CASE` opens one when already inside a block, and `END`
/// closes one. Semicolons inside a block do not end the statement.
#[derive(Debug, Default)]
struct BodyTracker {
    header: Header,
    parens: usize,
    depth: usize,
}

impl BodyTracker {
    fn inside_block(&self) -> bool {
        self.depth > 0
    }

    fn feed(&mut self, kind: Kind, text: &str) {
        match kind {
            Kind::Punct(b'(') => self.parens += 1,
            Kind::Punct(b')') => self.parens = self.parens.saturating_sub(1),
            Kind::Word => self.word(&text.to_ascii_lowercase()),
            _ => {}
        }
    }

    fn word(&mut self, w: &str) {
        let routine = matches!(w, "function" | "procedure");
        self.header = match (self.header, w) {
            (Header::Start, "create") => Header::Create,
            (Header::Create, "or") => Header::CreateOr,
            (Header::CreateOr, "replace") => Header::CreateOrReplace,
            (Header::Create | Header::CreateOrReplace, _) if routine => Header::Routine,
            (Header::Routine, _) => Header::Routine,
            _ => Header::Other,
        };
        if self.header != Header::Routine || self.parens > 0 {
            return;
        }
        match w {
            "begin" => self.depth += 1,
            "case" if self.depth > 0 => self.depth += 1,
            "end" => self.depth = self.depth.saturating_sub(1),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqls(script: &str) -> Vec<String> {
        split_statements(script)
            .unwrap()
            .into_iter()
            .map(|s| s.sql)
            .collect()
    }

    fn stmt(sql: &str, line: usize, offset: usize) -> Statement {
        Statement {
            sql: sql.to_owned(),
            line,
            offset,
        }
    }

    #[test]
    fn simple_split_with_lines() {
        let script = "CREATE TABLE a (id int);\n\nALTER TABLE a ADD b text;\n  SELECT 1";
        assert_eq!(
            split_statements(script).unwrap(),
            vec![
                stmt("CREATE TABLE a (id int)", 1, 0),
                stmt("ALTER TABLE a ADD b text", 3, 26),
                stmt("SELECT 1", 4, 54),
            ]
        );
    }

    #[test]
    fn leading_and_trailing_comments_are_dropped() {
        let script = "-- header\n/* x */ SELECT /* in */ 1 -- trailing\n;";
        assert_eq!(
            split_statements(script).unwrap(),
            vec![stmt("SELECT /* in */ 1", 2, 18)]
        );
    }

    #[test]
    fn semicolons_in_quotes_identifiers_and_comments() {
        let script = "SELECT 'a;b''c', \"c;d\"\"--\" -- e;f\nFROM t;\n\
                      /* x; /* y; */ z; */ SELECT 2;";
        assert_eq!(
            sqls(script),
            vec!["SELECT 'a;b''c', \"c;d\"\"--\" -- e;f\nFROM t", "SELECT 2"]
        );
        assert_eq!(split_statements(script).unwrap()[1].line, 3);
    }

    #[test]
    fn escape_strings() {
        // In E'' strings `\'` escapes; in plain strings backslash is literal.
        let script = r"SELECT E'don\'t; stop', e'\\'; SELECT 'back\'; SELECT name'it\'; SELECT 4";
        assert_eq!(
            sqls(script),
            vec![
                r"SELECT E'don\'t; stop', e'\\'",
                r"SELECT 'back\'",
                r"SELECT name'it\'",
                "SELECT 4",
            ]
        );
        let w: Vec<String> = words(script).unwrap().into_iter().map(|w| w.text).collect();
        assert_eq!(w, ["SELECT", "SELECT", "SELECT", "name", "SELECT"]);
    }

    #[test]
    fn prefixed_strings() {
        let script = "SELECT U&'d\\0061t;', B'1010', X'1F;', N'n;'; SELECT U&\"a;b\"";
        assert_eq!(
            sqls(script),
            vec![
                "SELECT U&'d\\0061t;', B'1010', X'1F;', N'n;'",
                "SELECT U&\"a;b\""
            ]
        );
    }

    #[test]
    fn dollar_quoted_function_body() {
        let script = "CREATE FUNCTION f() RETURNS int AS $$\nBEGIN\n  x := 1;\n  RETURN x;\nEND;\n$$ LANGUAGE plpgsql;\nSELECT f();";
        let stmts = split_statements(script).unwrap();
        assert_eq!(stmts.len(), 2);
        assert!(stmts[0].sql.ends_with("END;\n$$ LANGUAGE plpgsql"));
        assert_eq!((stmts[1].sql.as_str(), stmts[1].line), ("SELECT f()", 7));
    }

    #[test]
    fn tagged_dollar_quote_containing_other_tags() {
        let script = "DO $fn$ BEGIN EXECUTE $$ SELECT 1; $$; PERFORM $x$;$x$; END $fn$;\nSELECT 2";
        assert_eq!(
            sqls(script),
            vec![
                "DO $fn$ BEGIN EXECUTE $$ SELECT 1; $$; PERFORM $x$;$x$; END $fn$",
                "SELECT 2"
            ]
        );
    }

    #[test]
    fn positional_parameters_and_dollar_in_identifiers() {
        let script = "PREPARE p AS SELECT $1, a$b$ FROM t WHERE c = $2; EXECUTE p(1, 2)";
        assert_eq!(
            sqls(script),
            vec![
                "PREPARE p AS SELECT $1, a$b$ FROM t WHERE c = $2",
                "EXECUTE p(1, 2)"
            ]
        );
        let w: Vec<String> = words(script).unwrap().into_iter().map(|w| w.text).collect();
        assert!(w.contains(&"a$b$".to_owned()));
    }

    #[test]
    fn begin_atomic_bodies() {
        let script =
            "CREATE OR REPLACE FUNCTION f(x int) RETURNS text\nLANGUAGE sql\nBEGIN ATOMIC\n  \
                      SELECT CASE WHEN x > 0 THEN 'pos' ELSE 'neg' END;\n  SELECT 'done';\nEND;\n\
                      CREATE PROCEDURE p() BEGIN ATOMIC INSERT INTO t VALUES (1); END;\n\
                      BEGIN; SELECT CASE WHEN true THEN 1 END; END;";
        let stmts = split_statements(script).unwrap();
        let got: Vec<(&str, usize)> = stmts.iter().map(|s| (s.sql.as_str(), s.line)).collect();
        assert_eq!(
            got,
            vec![
                (
                    "CREATE OR REPLACE FUNCTION f(x int) RETURNS text\nLANGUAGE sql\nBEGIN ATOMIC\n  \
                     SELECT CASE WHEN x > 0 THEN 'pos' ELSE 'neg' END;\n  SELECT 'done';\nEND",
                    1
                ),
                ("CREATE PROCEDURE p() BEGIN ATOMIC INSERT INTO t VALUES (1); END", 7),
                ("BEGIN", 8),
                ("SELECT CASE WHEN true THEN 1 END", 8),
                ("END", 8),
            ]
        );
        // A `RETURN CASE … END` body (no BEGIN) ends at its semicolon.
        assert_eq!(
            sqls("CREATE FUNCTION g() RETURNS int RETURN CASE WHEN true THEN 1 END; SELECT 1"),
            vec![
                "CREATE FUNCTION g() RETURNS int RETURN CASE WHEN true THEN 1 END",
                "SELECT 1"
            ]
        );
    }

    #[test]
    fn two_concurrent_indexes() {
        let script =
            "CREATE INDEX CONCURRENTLY i1 ON t (a);\nCREATE INDEX CONCURRENTLY i2 ON t (b);\n";
        let stmts = split_statements(script).unwrap();
        assert_eq!(
            stmts,
            vec![
                stmt("CREATE INDEX CONCURRENTLY i1 ON t (a)", 1, 0),
                stmt("CREATE INDEX CONCURRENTLY i2 ON t (b)", 2, 39),
            ]
        );
        let kw = find_keyword(&stmts[1].sql, "concurrently")
            .unwrap()
            .unwrap();
        assert_eq!((kw.line, kw.offset), (1, 13));
    }

    #[test]
    fn empty_scripts_have_no_statements() {
        for script in [
            "",
            "  \n\t",
            ";;",
            " ; ;\n;",
            "-- only\n/* c /* d */ */ ;\n-- end",
        ] {
            assert_eq!(split_statements(script).unwrap(), vec![], "{script:?}");
        }
        assert_eq!(sqls("SELECT 1;;\n;SELECT 2;"), vec!["SELECT 1", "SELECT 2"]);
    }

    #[test]
    fn unterminated_constructs() {
        let cases = [
            ("SELECT 1;\nSELECT 'abc", "unterminated quoted string", 2),
            ("SELECT E'a\\'", "unterminated quoted string", 1),
            ("SELECT\n\"col", "unterminated quoted identifier", 2),
            (
                "\n\nDO $fn$ BEGIN $$ END $$",
                "unterminated dollar-quoted string $fn$",
                3,
            ),
            ("SELECT 1 /* a /* b */\n", "unterminated /* comment", 1),
        ];
        for (script, message, line) in cases {
            let err = split_statements(script).unwrap_err();
            assert_eq!(
                err,
                LexError {
                    message: message.to_owned(),
                    line
                }
            );
            assert_eq!(words(script).unwrap_err(), err);
        }
        let err = find_keyword("SELECT 'x", "select").unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 1: unterminated quoted string starting here"
        );
    }

    #[test]
    fn find_keyword_skips_strings_comments_and_quoted_identifiers() {
        let script = "SELECT 'concurrently', E'\\'concurrently', $$concurrently$$;\n\
                      -- CREATE INDEX CONCURRENTLY\n\
                      /* concurrently /* CONCURRENTLY */ */ SELECT \"concurrently\", not_concurrently;\n\
                      \n\
                      CREATE INDEX Concurrently idx ON t (a);";
        let found = find_keyword(script, "CONCURRENTLY").unwrap().unwrap();
        let offset = script.find("Concurrently").unwrap();
        assert_eq!(
            found,
            Word {
                text: "Concurrently".to_owned(),
                line: 5,
                offset
            }
        );
        assert_eq!(
            find_keyword("SELECT 'concurrently'", "concurrently").unwrap(),
            None
        );
    }

    #[test]
    fn non_ascii_text() {
        let script = "SELECT 'héllo; wörld', \"naïve;col\" FROM tablé;\n\
                      SELECT ünï$x FROM \"日本\" WHERE a = $é$;$é$; SELECT E'\\ü;'";
        assert_eq!(
            sqls(script),
            vec![
                "SELECT 'héllo; wörld', \"naïve;col\" FROM tablé",
                "SELECT ünï$x FROM \"日本\" WHERE a = $é$;$é$",
                "SELECT E'\\ü;'",
            ]
        );
        let w: Vec<String> = words(script).unwrap().into_iter().map(|w| w.text).collect();
        assert_eq!(
            w,
            ["SELECT", "FROM", "tablé", "SELECT", "ünï$x", "FROM", "WHERE", "a", "SELECT"]
        );
        // An offset inside a multi-byte character does not panic.
        assert_eq!(line_of_offset(script, script.find('日').unwrap() + 1), 2);
    }

    #[test]
    fn crlf_line_endings() {
        let script = "SELECT 1;\r\nSELECT 2 -- two\r\n;\r\n\r\nSELECT\r\n  3";
        assert_eq!(
            split_statements(script).unwrap(),
            vec![
                stmt("SELECT 1", 1, 0),
                stmt("SELECT 2", 2, 11),
                stmt("SELECT\r\n  3", 5, 33),
            ]
        );
        assert_eq!(
            find_keyword(script, "select").unwrap().map(|w| w.line),
            Some(1)
        );
    }

    #[test]
    fn a_line_comment_ends_at_a_carriage_return() {
        // A lone `\r` ends a `--` comment in PostgreSQL: the statement after
        // it is not part of the comment.
        assert_eq!(
            sqls("CREATE TABLE a (x int); -- note\rALTER TABLE a ADD y int;"),
            vec!["CREATE TABLE a (x int)", "ALTER TABLE a ADD y int"]
        );
        assert_eq!(
            sqls("SELECT 1 -- c;\r;SELECT 2"),
            vec!["SELECT 1", "SELECT 2"]
        );
    }

    #[test]
    fn semicolons_inside_parentheses_do_not_split() {
        let script = "CREATE RULE r AS ON INSERT TO t DO ALSO (\n  INSERT INTO u VALUES (1);\n  \
                      INSERT INTO u VALUES (2)\n);\nSELECT 1;";
        let stmts = split_statements(script).unwrap();
        assert_eq!(stmts.len(), 2, "{stmts:?}");
        assert!(stmts[0].sql.ends_with("INSERT INTO u VALUES (2)\n)"));
        assert_eq!((stmts[1].sql.as_str(), stmts[1].line), ("SELECT 1", 5));
        // An unbalanced `)` does not stop later statements from splitting.
        assert_eq!(sqls("SELECT 1); SELECT 2"), vec!["SELECT 1)", "SELECT 2"]);
    }

    #[test]
    fn a_continued_escape_string_stays_in_escape_mode() {
        let script = "INSERT INTO t VALUES (E'it''s'\n  '\\'; still the string');\nSELECT 2";
        assert_eq!(
            sqls(script),
            vec![
                "INSERT INTO t VALUES (E'it''s'\n  '\\'; still the string')",
                "SELECT 2"
            ]
        );
        // With a comment between the parts, too.
        assert_eq!(
            sqls("SELECT E'a' -- c\n '\\';x'; SELECT 3"),
            vec!["SELECT E'a' -- c\n '\\';x'", "SELECT 3"]
        );
        // Without a newline the second part is a new (plain) literal.
        assert_eq!(
            sqls("SELECT E'a' '\\'; SELECT 4"),
            vec!["SELECT E'a' '\\'", "SELECT 4"]
        );
    }

    #[test]
    fn transaction_control_is_recognised() {
        for s in [
            "BEGIN",
            "begin transaction isolation level serializable",
            "COMMIT",
            "end",
            "ROLLBACK",
            "abort",
            "START TRANSACTION",
            "COMMIT PREPARED 'x'",
        ] {
            assert!(is_transaction_control(s), "{s}");
        }
        for s in [
            "ROLLBACK TO SAVEPOINT a",
            "rollback to a",
            "SAVEPOINT a",
            "RELEASE a",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
            "DO $$ BEGIN PERFORM 1; END $$",
            "SELECT 'begin'",
        ] {
            assert!(!is_transaction_control(s), "{s}");
        }
    }

    #[test]
    fn client_copies_are_recognised() {
        assert!(is_client_copy("COPY t (a, b) FROM stdin"));
        assert!(is_client_copy("copy t from STDIN with (format csv)"));
        assert!(is_client_copy("COPY (SELECT 1) TO STDOUT"));
        assert!(!is_client_copy("COPY t FROM '/srv/data.csv'"));
        assert!(!is_client_copy("SELECT 'COPY t FROM stdin'"));
        assert!(!is_client_copy("INSERT INTO stdin VALUES (1)"));
    }

    #[test]
    fn line_of_offset_counts_newlines() {
        let script = "a\nb\r\nc";
        assert_eq!(line_of_offset(script, 0), 1);
        assert_eq!(line_of_offset(script, 1), 1);
        assert_eq!(line_of_offset(script, 2), 2);
        assert_eq!(line_of_offset(script, 5), 3);
        assert_eq!(line_of_offset(script, 999), 3);
    }

    #[test]
    fn tokens_tell_quoted_identifiers_from_strings() {
        let t = tokens("CREATE INDEX \"My Idx\" ON s.t ('x'); -- c").unwrap();
        let kinds: Vec<_> = t.iter().map(|t| (t.kind, t.text.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (TokenKind::Word, "CREATE"),
                (TokenKind::Word, "INDEX"),
                (TokenKind::QuotedIdent, "\"My Idx\""),
                (TokenKind::Word, "ON"),
                (TokenKind::Word, "s"),
                (TokenKind::Punct('.'), "."),
                (TokenKind::Word, "t"),
                (TokenKind::Punct('('), "("),
                (TokenKind::Literal, "'x'"),
                (TokenKind::Punct(')'), ")"),
                (TokenKind::Semicolon, ";"),
            ]
        );
    }
}
