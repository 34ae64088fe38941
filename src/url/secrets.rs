//! How libpq reads a connection string, and what of it is secret: the
//! passwords and the pieces of them libpq can quote back when it misreads a
//! password with a raw `@`, `/`, `?`, `#`, `&` or space. Hand-written on
//! purpose: this is libpq's reading, which no URL crate shares.

/// Connection parameters whose values are secrets.
const SECRET_KEYS: [&str; 2] = ["password", "sslpassword"];

pub(crate) fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS
        .iter()
        .any(|secret| key.eq_ignore_ascii_case(secret))
}

/// RFC 3986 scheme: a letter, then letters, digits, `+`, `-`, `.`.
pub(crate) fn is_scheme(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// What of a connection string is secret: each way its password can be
/// read (libpq's way and the more generous ones, for a password with a raw
/// `@`, `/`, `?` or `#`), as written and percent-decoded, and the pieces
/// libpq can quote back on its own when it splits a password it misreads
/// (`Xy7@Zq9` gives the host `Zq9@...`, `ab/cd` the port `ab`).
#[derive(Debug, Default)]
pub(crate) struct Secrets {
    /// Whole passwords (as written and decoded) and their raw pieces,
    /// longest first.
    pieces: Vec<String>,
}

/// Where libpq splits a connection string.
fn is_delimiter(c: char) -> bool {
    matches!(
        c,
        '@' | '/' | ':' | '?' | '#' | '&' | '=' | ',' | '\'' | '"' | '\\'
    ) || c.is_whitespace()
}

pub(crate) fn secrets(url: &str) -> Secrets {
    let mut whole = Vec::new();
    let trimmed = url.trim();
    match trimmed.find("://") {
        Some(end) if is_scheme(&trimmed[..end]) => {
            let rest = &trimmed[end + 3..];
            // Any `@` may end the user info: a raw `@` in a password makes
            // libpq end it at the first one, a person at the last one.
            for (at, _) in rest.match_indices('@') {
                if let Some((_, pw)) = rest[..at].split_once(':') {
                    whole.push(pw.to_string());
                }
            }
            let mut search = rest;
            while let Some(q) = search.find(['?', '&']) {
                search = &search[q + 1..];
                if let Some((k, v)) = search.split_once('=') {
                    if is_secret_key(k) {
                        let mut parts = v.split('&');
                        let first = parts.next().unwrap_or(v);
                        whole.push(first.to_string());
                        // A raw `&` in it: what follows, up to the next
                        // `key=`, is the password's too.
                        let mut generous = first.to_string();
                        for part in parts.take_while(|p| !p.contains('=')) {
                            generous.push('&');
                            generous.push_str(part);
                        }
                        whole.push(generous);
                    }
                }
            }
        }
        _ => key_value_secrets(trimmed, &mut whole),
    }
    // libpq splits a connection string before it decodes it: the pieces it
    // can quote back come from the raw text. The decoded passwords count
    // whole.
    let mut pieces: Vec<String> = whole
        .iter()
        .flat_map(|p| p.split(is_delimiter).chain(std::iter::once(p.as_str())))
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let decoded: Vec<String> = whole.iter().map(|p| percent_decode(p)).collect();
    pieces.extend(decoded);
    pieces.retain(|p| !p.is_empty());
    pieces.sort();
    pieces.dedup();
    // Longest first, so a password containing another is replaced whole.
    pieces.sort_by_key(|p| std::cmp::Reverse(p.len()));
    Secrets { pieces }
}

/// The value of each `password` / `sslpassword` of a key=value string: as
/// libpq reads it (quoted, with `\` escapes), and, generously, up to the
/// next `key=` (a value with a raw space).
fn key_value_secrets(text: &str, out: &mut Vec<String>) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let Some(eq) = text[i..].find('=').map(|e| i + e) else {
            break;
        };
        let key = text[..eq]
            .trim_end()
            .rsplit(|c: char| c.is_whitespace())
            .next()
            .unwrap_or("");
        let mut j = eq + 1;
        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        let start = j;
        let quoted = j < bytes.len() && bytes[j] == b'\'';
        if quoted {
            j += 1;
        }
        // A value runs to the closing quote, or to white space when bare;
        // `\` escapes the next character either way.
        let mut value = String::new();
        while j < bytes.len()
            && !(if quoted {
                bytes[j] == b'\''
            } else {
                bytes[j].is_ascii_whitespace()
            })
        {
            if bytes[j] == b'\\' {
                j += 1;
            }
            match text.get(j..).and_then(|t| t.chars().next()) {
                Some(c) => {
                    value.push(c);
                    j += c.len_utf8();
                }
                None => break,
            }
        }
        if quoted {
            j += 1;
        }
        if is_secret_key(key) {
            out.push(value);
            // Up to the next ` key=`, or the end.
            let tail = text.get(start..).unwrap_or("");
            let generous = match tail.find('=') {
                Some(next_eq) => {
                    let before = tail[..next_eq].trim_end();
                    match before.rfind(char::is_whitespace) {
                        Some(ws) => &tail[..ws],
                        None => tail,
                    }
                }
                None => tail,
            };
            out.push(generous.trim().trim_matches('\'').to_string());
        }
        i = j.max(eq + 1);
    }
}

pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() && text.is_char_boundary(i + 3) {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` with what libpq quotes from a malformed connection string
/// (`invalid percent-encoded token: "..."`, which can be a password)
/// replaced by `***`. For errors whose connection string is not at hand
/// (a pool's): see [`scrub_unknown`] for connection errors.
pub fn scrub_libpq(text: &str) -> String {
    const MARKERS: [&str; 2] = [
        "invalid percent-encoded token: \"",
        "invalid URI query parameter: \"",
    ];
    let mut out = text.to_string();
    for marker in MARKERS {
        let mut from = 0;
        while let Some(pos) = out[from..].find(marker) {
            let start = from + pos + marker.len();
            let Some(len) = out[start..].find('"') else {
                break;
            };
            out.replace_range(start..start + len, "***");
            from = start + 3;
        }
    }
    out
}

/// A connection error whose connection string is not known (r2d2 does not
/// give a pool's out): libpq quotes parts of the connection string back
/// (host, port, database, user), and with a password it misread those can be
/// pieces of the password, so every quoted value and the port are hidden.
pub(crate) fn scrub_unknown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        match rest.find('"') {
            Some(close) => {
                out.push_str("***\"");
                rest = &rest[close + 1..];
            }
            None => {
                out.push_str("***");
                rest = "";
            }
        }
    }
    out.push_str(rest);
    hide_after(&out, "port ", |c: char| c.is_ascii_alphanumeric())
}

/// `text` with the run of `keep` characters after each `marker` hidden.
fn hide_after(text: &str, marker: &str, keep: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find(marker) {
        let start = pos + marker.len();
        out.push_str(&rest[..start]);
        let len = rest[start..]
            .find(|c: char| !keep(c))
            .unwrap_or(rest.len() - start);
        if len > 0 {
            out.push_str("***");
        }
        rest = &rest[start + len..];
    }
    out.push_str(rest);
    out
}

/// `text` (an error message, a log line) with every password of `url`
/// replaced by `***`, and every piece of it libpq could quote back, and with
/// what libpq quotes from a malformed connection string removed. For
/// messages that may echo a connection string, such as an r2d2 pool's
/// errors.
pub fn redact_error(text: &str, url: &str) -> String {
    scrub_libpq(&scrub(text, url))
}

/// `text` with every password of `url`, and every piece of one libpq could
/// quote back, replaced by `***`: a quoted value (`"..."`, as libpq quotes
/// hosts, ports, tokens and names) in which a password or a piece of one
/// stands as a token of its own (`"Zq9@db.invalid"`, `"ab"`); and, outside
/// quotes, a password or a piece of two characters or more (or a digit)
/// standing as a word of its own (an unquoted port). A piece inside a longer
/// word (`pass` in `password`) is left alone.
pub fn scrub(text: &str, url: &str) -> String {
    scrub_secrets(text, &secrets(url))
}

pub(crate) fn scrub_secrets(text: &str, secrets: &Secrets) -> String {
    if secrets.pieces.is_empty() {
        return text.to_string();
    }
    // Quoted values holding a piece as a token.
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let Some(close) = rest.find('"') else {
            break;
        };
        let value = &rest[..close];
        let secret = secrets
            .pieces
            .iter()
            .any(|p| find_token(value, p).is_some());
        out.push_str(if secret { "***" } else { value });
        out.push('"');
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    let mut s = out;
    for p in &secrets.pieces {
        let chars = p.chars().count();
        if chars >= 2 || p.chars().all(|c| c.is_ascii_digit()) {
            s = replace_tokens(&s, p);
        }
    }
    s
}

/// The first occurrence of `needle` in `text` that is not part of a longer
/// word: the characters around it, if any, are not letters or digits.
fn find_token(text: &str, needle: &str) -> Option<usize> {
    let is_word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    let mut from = 0;
    while let Some(pos) = text[from..].find(needle).map(|p| from + p) {
        let end = pos + needle.len();
        if !is_word(text[..pos].chars().last()) && !is_word(text[end..].chars().next()) {
            return Some(pos);
        }
        // Step over one character, keeping to character boundaries.
        from = pos + text[pos..].chars().next().map_or(1, char::len_utf8);
    }
    None
}

/// `text` with each occurrence of `needle` that is not part of a longer
/// word replaced by `***`.
fn replace_tokens(text: &str, needle: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = find_token(rest, needle) {
        out.push_str(&rest[..pos]);
        out.push_str("***");
        rest = &rest[pos + needle.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_quotes_are_scrubbed_without_the_url() {
        assert_eq!(
            scrub_libpq("invalid percent-encoded token: \"Zx%9kq\" and more"),
            "invalid percent-encoded token: \"***\" and more"
        );
        assert_eq!(scrub_libpq("nothing here"), "nothing here");
    }

    #[test]
    fn every_piece_of_a_misread_password_is_scrubbed() {
        // libpq ends the user info at the first `@`: the rest of the
        // password becomes part of the host, and is quoted back.
        let url = "postgres://app:Xy7@Zq9@db.invalid/app";
        let libpq = "could not translate host name \"Zq9@db.invalid\" to address";
        assert_eq!(
            scrub(libpq, url),
            "could not translate host name \"***\" to address"
        );
        // A raw `/` ends the authority: the password's first half is a port.
        let url = "postgres://app:ab/cd@127.0.0.1/app";
        assert_eq!(
            scrub(
                "invalid integer value \"ab\" for connection option \"port\"",
                url
            ),
            "invalid integer value \"***\" for connection option \"port\""
        );
        // One-character pieces glued to the rest of what libpq quotes.
        let url = "postgres://app:x/y?a#b#c#d@127.0.0.1:5432/app";
        assert_eq!(
            scrub(
                "invalid URI query parameter: \"a#b#c#d@127.0.0.1:5432/app\"",
                url
            ),
            "invalid URI query parameter: \"***\""
        );
        let url = "postgres://app:Xy7@Z@127.0.0.1/app";
        assert_eq!(
            scrub(
                "could not translate host name \"Z@127.0.0.1\" to address",
                url
            ),
            "could not translate host name \"***\" to address"
        );
        // A percent-encoded password is not split: libpq decodes it after
        // splitting, so the messages of an ordinary URL stay whole.
        let url = "postgres://app:pass%40word@db.internal/app";
        let text = "connection to server at \"db.internal\" (10.0.0.1), port 5432 failed: \
                    FATAL:  password authentication failed for user \"app\"";
        assert_eq!(scrub(text, url), text);
        let url = "postgres://app:s3cret%2Fdb.internal@db.internal/app";
        assert_eq!(scrub(text, url), text);
        // Unquoted, as a word of its own; not inside other words.
        let url = "postgres://localhost:12/cd@127.0.0.1/app";
        assert_eq!(
            scrub("at \"localhost\", port 12 failed; 123 and a12", url),
            "at \"localhost\", port *** failed; 123 and a12"
        );
        // key=value with a raw space: libpq quotes the second word.
        let kv = "host=h password=a bcd dbname=x";
        assert_eq!(
            scrub("missing \"=\" after \"bcd\" in connection info string", kv),
            "missing \"=\" after \"***\" in connection info string"
        );
        // Query-string passwords, raw `&` and `#` included.
        let q = "postgres://h/db?password=s3c&r#et&sslmode=require";
        assert_eq!(
            scrub("invalid URI query parameter: \"r#et\"", q),
            "invalid URI query parameter: \"***\""
        );
        // Without the URL, every quoted value and the port go.
        assert_eq!(
            scrub_unknown("connection to server at \"h\" (1.2.3.4), port 12 failed: \"x"),
            "connection to server at \"***\" (1.2.3.4), port *** failed: \"***"
        );
    }
}
