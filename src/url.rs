//! Small, dependency-free helpers for PostgreSQL connection strings.
//!
//! Two forms are understood: URLs (`postgres://user:pass@host:port/db?k=v`,
//! also `postgresql://`) and libpq key=value strings
//! (`host=localhost password='s3cret' dbname=app`).

/// What replaces a password in [`redact_url`]'s output.
const REDACTED: &str = "***";

/// Connection parameters whose values are secrets.
const SECRET_KEYS: [&str; 2] = ["password", "sslpassword"];

fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS
        .iter()
        .any(|secret| key.eq_ignore_ascii_case(secret))
}

/// Returns `url` with any password replaced by `***`
/// (`postgres://user:secret@host/db` becomes `postgres://user:***@host/db`).
///
/// Also handles libpq key=value connection strings (`password=secret` and
/// `password='quoted secret'` become `password=***`) and the query parameters
/// `?password=...` / `&sslpassword=...`. When in doubt it hides more rather
/// than less, and it never panics, whatever the input.
pub fn redact_url(url: &str) -> String {
    let structural = match url.find("://") {
        Some(end) if is_scheme(&url[..end]) => redact_uri(url, end + 3),
        _ => redact_key_value(url),
    };
    // A password with a raw `/` or `@` can leave pieces where the structure
    // says a host or port is: hide those too.
    scrub(&structural, url)
}

/// Replaces the database name in a `postgres://` or `postgresql://` URL,
/// keeping user, password, host(s), port and query string.
///
/// The name is percent-encoded as needed. An empty `database` removes the
/// database from the URL (libpq then uses the user name). Returns `None` for
/// key=value strings, other schemes, and URLs it can't parse with certainty
/// (whitespace, or an `@` outside the user-info part).
pub fn with_database(url: &str, database: &str) -> Option<String> {
    let scheme_end = url.find("://")?;
    let scheme = &url[..scheme_end];
    if !(scheme.eq_ignore_ascii_case("postgres") || scheme.eq_ignore_ascii_case("postgresql")) {
        return None;
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    let prefix = &url[..scheme_end + 3];
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let after_authority = &rest[authority_end..];
    let path_end = after_authority
        .find(['?', '#'])
        .unwrap_or(after_authority.len());
    let path = &after_authority[..path_end];
    let tail = &after_authority[path_end..];

    // A raw '@' anywhere but once in the authority means a password or
    // database name that was not percent-encoded: the split above can't be
    // trusted, so refuse rather than produce a wrong URL.
    if authority.matches('@').count() > 1 || path.contains('@') {
        return None;
    }

    let mut out = String::with_capacity(url.len() + database.len());
    out.push_str(prefix);
    out.push_str(authority);
    if !database.is_empty() {
        out.push('/');
        percent_encode_into(database, &mut out);
    }
    out.push_str(tail);
    Some(out)
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode_into(text: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in text.as_bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
}

/// RFC 3986 scheme: a letter, then letters, digits, `+`, `-`, `.`.
fn is_scheme(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Whether `head` (the part of a URL after `scheme://`, up to the first `/`)
/// reads as a plain host list without user info: `host`, `host:5432`,
/// `[::1]:5432`, `h1:5432,h2`, optionally followed by `?query`.
fn is_plain_host_list(head: &str) -> bool {
    let hosts = match head.find(['?', '#']) {
        Some(end) => &head[..end],
        None => head,
    };
    hosts.split(',').all(|entry| {
        let (host, port) = if let Some(inner) = entry.strip_prefix('[') {
            match inner.find(']') {
                Some(close) => (&inner[..close], &inner[close + 1..]),
                None => return false,
            }
        } else {
            match entry.find(':') {
                Some(colon) => (&entry[..colon], &entry[colon..]),
                None => (entry, ""),
            }
        };
        let host_ok = host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '%' | ':'));
        let port_ok = match port.strip_prefix(':') {
            Some(digits) => digits.chars().all(|c| c.is_ascii_digit()),
            None => port.is_empty(),
        };
        host_ok && port_ok
    })
}

/// Redacts a URL whose authority starts at byte `start`.
fn redact_uri(url: &str, start: usize) -> String {
    let rest = &url[start..];
    let head = &rest[..rest.find('/').unwrap_or(rest.len())];

    // Where the user info ends. libpq takes the `@` before the first `/`;
    // the last one is used here so that a raw `@` in a password is hidden too.
    // A raw `/` in a password puts the `@` after the first `/`: if what comes
    // before that `/` is not a plain host list, take the last `@` anywhere.
    let at = match head.rfind('@') {
        Some(at) => Some(at),
        None if !is_plain_host_list(head) => rest.rfind('@'),
        None => None,
    };

    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..start]);
    let after_userinfo = match at {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(REDACTED);
                }
                None => out.push_str(userinfo),
            }
            out.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };

    match after_userinfo.find('?') {
        Some(question) => {
            out.push_str(&after_userinfo[..=question]);
            out.push_str(&redact_query(&after_userinfo[question + 1..]));
        }
        None => out.push_str(after_userinfo),
    }
    out
}

/// Redacts `password=` style parameters of a URL query string. The whole rest
/// of the string is treated as the query (a `#` in a password is hidden too).
fn redact_query(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for (index, pair) in query.split('&').enumerate() {
        if index > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((key, _)) if is_secret_key(key) => {
                out.push_str(key);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
    }
    out
}

/// Redacts a libpq key=value connection string. Values may be bare (with
/// backslash escapes) or single-quoted (with `\'` and `\\` escapes); spaces
/// around `=` are allowed; keys are words (`[A-Za-z0-9_]+`). Text that doesn't
/// parse is kept unless it mentions a password, in which case it is replaced
/// by `***`.
fn redact_key_value(text: &str) -> String {
    let bytes = text.as_bytes();
    let len = bytes.len();
    let mut out = String::with_capacity(len);
    let mut i = 0;
    loop {
        let blank_start = i;
        while i < len && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        out.push_str(&text[blank_start..i]);
        if i >= len {
            break;
        }

        let key_start = i;
        while i < len && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &text[key_start..i];
        let mut j = i;
        while j < len && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        let key_is_word = !key.is_empty()
            && key
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
        if !key_is_word || j >= len || bytes[j] != b'=' {
            let unparsed = &text[key_start..];
            if unparsed.to_ascii_lowercase().contains("password") {
                out.push_str(REDACTED);
            } else {
                out.push_str(unparsed);
            }
            break;
        }
        j += 1;
        while j < len && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        out.push_str(&text[key_start..j]);

        // Every stop below is at an ASCII byte or the end, so slicing at `j`
        // stays on a char boundary even after skipping an escaped byte.
        let value_start = j;
        if j < len && bytes[j] == b'\'' {
            j += 1;
            while j < len {
                match bytes[j] {
                    b'\\' => j += 2,
                    b'\'' => {
                        j += 1;
                        break;
                    }
                    _ => j += 1,
                }
            }
        } else {
            while j < len && !bytes[j].is_ascii_whitespace() {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
        }
        let value_end = j.min(len);
        if is_secret_key(key) {
            out.push_str(REDACTED);
            if value_end < len && !bytes[value_end].is_ascii_whitespace() {
                // Something like `password='a''b'`: not valid, but part of
                // the secret may follow, so hide everything after it.
                break;
            }
        } else {
            out.push_str(&text[value_start..value_end]);
        }
        i = value_end;
    }
    out
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
        let mut value = String::new();
        if j < bytes.len() && bytes[j] == b'\'' {
            j += 1;
            while j < bytes.len() && bytes[j] != b'\'' {
                if bytes[j] == b'\\' {
                    j += 1;
                }
                if let Some(c) = text.get(j..).and_then(|t| t.chars().next()) {
                    value.push(c);
                    j += c.len_utf8();
                } else {
                    break;
                }
            }
            j += 1;
        } else {
            while j < bytes.len() && !bytes[j].is_ascii_whitespace() {
                if bytes[j] == b'\\' {
                    j += 1;
                }
                if let Some(c) = text.get(j..).and_then(|t| t.chars().next()) {
                    value.push(c);
                    j += c.len_utf8();
                } else {
                    break;
                }
            }
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

/// Redacts the errors of a pool: with the URL it connects with when it is
/// known, else hiding every value libpq quotes (see [`scrub_unknown`]).
#[derive(Clone, Default)]
pub(crate) struct PoolRedactor(Option<String>);

impl std::fmt::Debug for PoolRedactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(url) => write!(f, "PoolRedactor({})", redact_url(url)),
            None => f.write_str("PoolRedactor(unknown URL)"),
        }
    }
}

impl PoolRedactor {
    pub(crate) fn new(url: impl Into<String>) -> Self {
        PoolRedactor(Some(url.into()))
    }

    pub(crate) fn redact(&self, text: &str) -> String {
        match &self.0 {
            Some(url) => redact_error(text, url),
            None => scrub_unknown(&scrub_libpq(text)),
        }
    }
}

fn percent_decode(text: &str) -> String {
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

/// `url` with `application_name` set, unless it sets one already: sent in
/// the startup packet, it costs no round trip. `None` when the URL is not
/// one this can extend safely.
pub fn with_application_name(url: &str, name: &str) -> Option<String> {
    let trimmed = url.trim();
    if trimmed.contains("application_name=") {
        return Some(trimmed.to_string());
    }
    if let Some(rest) = trimmed
        .strip_prefix("postgres://")
        .or_else(|| trimmed.strip_prefix("postgresql://"))
    {
        if trimmed.contains('#') {
            return None;
        }
        // The query starts where libpq starts it: at the first `?` after the
        // user info, which libpq ends at the first `@` before any `/` (a
        // password may hold a raw `?`).
        let after_userinfo = match rest.find(['@', '/']) {
            Some(at) if rest.as_bytes()[at] == b'@' => at + 1,
            _ => 0,
        };
        let mut encoded = String::new();
        percent_encode_into(name, &mut encoded);
        let sep = if trimmed.ends_with(['?', '&']) {
            ""
        } else if rest[after_userinfo..].contains('?') {
            "&"
        } else {
            "?"
        };
        Some(format!("{trimmed}{sep}application_name={encoded}"))
    } else if trimmed.contains('=') {
        // A value ending in an odd run of `\` would escape the space.
        let slashes = trimmed.len() - trimmed.trim_end_matches('\\').len();
        if slashes % 2 == 1 {
            return None;
        }
        let quoted = name.replace('\\', "\\\\").replace('\'', "\\'");
        Some(format!("{trimmed} application_name='{quoted}'"))
    } else {
        None
    }
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
    fn redacts_url_passwords() {
        assert_eq!(
            redact_url("postgres://user:secret@host/db"),
            "postgres://user:***@host/db"
        );
        assert_eq!(
            redact_url(
                "postgresql://app:p%40ss%3Aw%2Fo!rd$@db.example.com:5433/app?sslmode=require"
            ),
            "postgresql://app:***@db.example.com:5433/app?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://u:%F0%9F%94%91@[::1]:5432/db"),
            "postgres://u:***@[::1]:5432/db"
        );
        assert_eq!(
            redact_url("postgres://u:pw@h1:5432,h2:5433/db"),
            "postgres://u:***@h1:5432,h2:5433/db"
        );
        // Empty password still counts as one.
        assert_eq!(redact_url("postgres://u:@h/db"), "postgres://u:***@h/db");
    }

    #[test]
    fn redacts_unencoded_special_characters_in_passwords() {
        assert_eq!(
            redact_url("postgres://u:p@ss@host:5432/db"),
            "postgres://u:***@host:5432/db"
        );
        assert_eq!(
            redact_url("postgres://u:p/ss@host/db"),
            "postgres://u:***@host/db"
        );
        assert_eq!(
            redact_url("postgres://u:p?ss#x@host/db"),
            "postgres://u:***@host/db"
        );
        let redacted = redact_url("postgres://u:pa ss wörd@host/db");
        assert!(!redacted.contains("wörd"), "{redacted}");
    }

    #[test]
    fn leaves_urls_without_password_alone() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/postgres",
            "postgres://host/db",
            "postgres://host:5432/db",
            "postgres://[::1]:5432/db?sslmode=disable",
            "postgres:///db?host=/var/run/postgresql",
            "postgres://h1,h2:5433/db",
            "postgres://host",
            "postgres://",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn redacts_password_query_parameters() {
        assert_eq!(
            redact_url("postgres://u@host/db?sslmode=require&password=secret&application_name=x"),
            "postgres://u@host/db?sslmode=require&password=***&application_name=x"
        );
        assert_eq!(
            redact_url("postgresql:///db?host=/tmp&PASSWORD=s%26cret&sslpassword=k"),
            "postgresql:///db?host=/tmp&PASSWORD=***&sslpassword=***"
        );
        assert_eq!(
            redact_url("postgres://u:pw@host/db?password=other"),
            "postgres://u:***@host/db?password=***"
        );
        assert_eq!(
            redact_url("postgres://host?password=a#b"),
            "postgres://host?password=***"
        );
    }

    #[test]
    fn redacts_key_value_strings() {
        assert_eq!(
            redact_url("host=localhost port=5432 password=secret dbname=app"),
            "host=localhost port=5432 password=*** dbname=app"
        );
        // `''` is no escape in libpq; whatever follows the value is hidden.
        assert_eq!(
            redact_url("host=localhost password='it''s a secret' user=me"),
            "host=localhost password=***"
        );
        assert_eq!(
            redact_url("user=me password='se cret \\' quote' dbname=x"),
            "user=me password=*** dbname=x"
        );
        assert_eq!(
            redact_url("user=me   password = 'a b'  sslpassword=c\\ d host=h"),
            "user=me   password = ***  sslpassword=*** host=h"
        );
        assert_eq!(redact_url("password=secret"), "password=***");
        assert_eq!(redact_url("Password=secret"), "Password=***");
        assert_eq!(redact_url("dbname=app"), "dbname=app");
        assert_eq!(redact_url(""), "");
    }

    #[test]
    fn redacts_password_in_unparseable_key_value_text() {
        assert_eq!(redact_url("host=h password secret"), "host=h ***");
        assert_eq!(redact_url("password='unterminated"), "password=***");
        assert_eq!(redact_url("just some text"), "just some text");
        assert!(!redact_url("host=h password").contains("password"));
    }

    #[test]
    fn never_panics_on_garbage() {
        let samples = [
            "postgres://u:pä\\ss@hö/db?password=x&y",
            "://@@@::??##",
            "postgres://:@",
            "postgres://@",
            "x://é@é:é/é?é=é&password=é",
            "password='é\\é",
            "password=\\",
            "password=é\\",
            "key='\\",
            "= = = '",
            "'''\\\\\\",
            "ü=ü password=ü",
            "postgres://[::1",
            "postgres://[::1]:x/db",
            "\u{0}\u{7f}password\u{1}=\u{2}",
        ];
        for sample in samples {
            for (index, _) in sample.char_indices().chain([(sample.len(), ' ')]) {
                for part in [&sample[..index], &sample[index..]] {
                    let redacted = redact_url(part);
                    let _ = with_database(part, "db");
                    let _ = with_database(part, "");
                    if part.contains("password=x") {
                        assert!(!redacted.contains("password=x"), "{part} -> {redacted}");
                    }
                }
            }
        }
    }

    #[test]
    fn replaces_database() {
        assert_eq!(
            with_database("postgres://u:p%40ss@host:5433/old", "new").as_deref(),
            Some("postgres://u:p%40ss@host:5433/new")
        );
        assert_eq!(
            with_database("postgres://u@host/old", "new").as_deref(),
            Some("postgres://u@host/new")
        );
        assert_eq!(
            with_database(
                "postgresql://host/old?sslmode=disable&application_name=a",
                "new"
            )
            .as_deref(),
            Some("postgresql://host/new?sslmode=disable&application_name=a")
        );
        assert_eq!(
            with_database("postgres://host:5432/", "new").as_deref(),
            Some("postgres://host:5432/new")
        );
        assert_eq!(
            with_database("postgres://host:5432", "new").as_deref(),
            Some("postgres://host:5432/new")
        );
        assert_eq!(
            with_database("postgres://host?sslmode=require", "new").as_deref(),
            Some("postgres://host/new?sslmode=require")
        );
        assert_eq!(
            with_database("postgres://host/old/", "new").as_deref(),
            Some("postgres://host/new")
        );
        assert_eq!(
            with_database("postgres://[::1]:5432/old#frag", "new").as_deref(),
            Some("postgres://[::1]:5432/new#frag")
        );
        assert_eq!(
            with_database("postgres://h1:1,h2:2/old", "new").as_deref(),
            Some("postgres://h1:1,h2:2/new")
        );
        assert_eq!(
            with_database("postgres:///old?host=/var/run/postgresql", "new").as_deref(),
            Some("postgres:///new?host=/var/run/postgresql")
        );
        assert_eq!(
            with_database("POSTGRES://host/old", "new").as_deref(),
            Some("POSTGRES://host/new")
        );
    }

    #[test]
    fn encodes_database_names() {
        assert_eq!(
            with_database("postgres://host/old", "my db/ä?#").as_deref(),
            Some("postgres://host/my%20db%2F%C3%A4%3F%23")
        );
        assert_eq!(
            with_database("postgres://host/old", "rollout_test-1.x~").as_deref(),
            Some("postgres://host/rollout_test-1.x~")
        );
        assert_eq!(
            with_database("postgres://u@host:1/old?x=1", "").as_deref(),
            Some("postgres://u@host:1?x=1")
        );
    }

    #[test]
    fn refuses_what_it_cannot_parse() {
        assert_eq!(with_database("host=localhost dbname=old", "new"), None);
        assert_eq!(with_database("mysql://host/old", "new"), None);
        assert_eq!(with_database("not a url", "new"), None);
        assert_eq!(with_database("postgres://u:p/w@host/old", "new"), None);
        assert_eq!(with_database("postgres://u:p@w@host/old", "new"), None);
        assert_eq!(with_database("postgres://host/o ld", "new"), None);
        assert_eq!(with_database("", "new"), None);
    }

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
        assert_eq!(redact_url(url), "postgres://localhost:***@127.0.0.1/app");
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

    #[test]
    fn application_name_keeps_urls_libpq_accepts() {
        assert_eq!(
            with_application_name("postgres://u@h/db?", "x").as_deref(),
            Some("postgres://u@h/db?application_name=x")
        );
        assert_eq!(
            with_application_name("postgres://u@h/db?sslmode=disable&", "x").as_deref(),
            Some("postgres://u@h/db?sslmode=disable&application_name=x")
        );
        // The space appended after a trailing `\` would be escaped: set it
        // after connecting instead.
        assert_eq!(with_application_name("host=h password=a\\", "x"), None);
        assert!(with_application_name("host=h password=a\\\\", "x").is_some());
    }

    #[test]
    fn application_name_goes_in_the_url() {
        // A raw `?` in the password is not the query: libpq reads the user
        // info up to the first `@`.
        assert_eq!(
            with_application_name("postgres://u:p?w@h/db", "x").as_deref(),
            Some("postgres://u:p?w@h/db?application_name=x")
        );
        assert_eq!(
            with_application_name("postgres://u@h/db", "diesel rollout").as_deref(),
            Some("postgres://u@h/db?application_name=diesel%20rollout")
        );
        assert_eq!(
            with_application_name("postgres://u@h/db?sslmode=require", "x").as_deref(),
            Some("postgres://u@h/db?sslmode=require&application_name=x")
        );
        assert_eq!(
            with_application_name("postgres://u@h/db?application_name=mine", "x").as_deref(),
            Some("postgres://u@h/db?application_name=mine")
        );
        assert_eq!(
            with_application_name("host=h dbname=d", "it's").as_deref(),
            Some("host=h dbname=d application_name='it\\'s'")
        );
    }
}
