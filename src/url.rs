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
    match url.find("://") {
        Some(end) if is_scheme(&url[..end]) => redact_uri(url, end + 3),
        _ => redact_key_value(url),
    }
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

/// The password of a connection string, as written and percent-decoded, so
/// text that echoes it (a libpq error, say) can be scrubbed. Empty when
/// there is none.
pub fn passwords(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    let trimmed = url.trim();
    if let Some(rest) = trimmed
        .strip_prefix("postgres://")
        .or_else(|| trimmed.strip_prefix("postgresql://"))
    {
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some(at) = authority.rfind('@') {
            if let Some((_, pw)) = authority[..at].split_once(':') {
                out.push(pw.to_string());
            }
        }
        if let Some(q) = rest.find('?') {
            for pair in rest[q + 1..].split('&') {
                if let Some((k, v)) = pair.split_once('=') {
                    if is_secret_key(k) {
                        out.push(v.to_string());
                    }
                }
            }
        }
    } else {
        // key=value form: the token after `password =`.
        let mut words = trimmed.split_whitespace().peekable();
        while let Some(w) = words.next() {
            if let Some((k, v)) = w.split_once('=') {
                if is_secret_key(k.trim()) {
                    let v = if v.is_empty() {
                        words.next().unwrap_or("")
                    } else {
                        v
                    };
                    out.push(v.trim_matches('\'').to_string());
                }
            }
        }
    }
    let decoded: Vec<String> = out.iter().map(|p| percent_decode(p)).collect();
    out.extend(decoded);
    out.retain(|p| !p.is_empty());
    out.sort();
    out.dedup();
    // Longest first, so a password containing another is replaced whole.
    out.sort_by_key(|p| std::cmp::Reverse(p.len()));
    out
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
    if trimmed.contains("application_name") {
        return Some(trimmed.to_string());
    }
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        if trimmed.contains('#') {
            return None;
        }
        let mut encoded = String::new();
        percent_encode_into(name, &mut encoded);
        let sep = if trimmed.contains('?') { '&' } else { '?' };
        Some(format!("{trimmed}{sep}application_name={encoded}"))
    } else if trimmed.contains('=') {
        let quoted = name.replace('\\', "\\\\").replace('\'', "\\'");
        Some(format!("{trimmed} application_name='{quoted}'"))
    } else {
        None
    }
}

/// `text` with what libpq quotes from a malformed connection string
/// (`invalid percent-encoded token: "..."`, which can be a password)
/// replaced by `***`. For errors whose connection string is not at hand
/// (a pool's).
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

/// `text` (an error message, a log line) with every password of `url`
/// replaced by `***`, and with what libpq quotes from a malformed connection
/// string removed. For messages that may echo a connection string, such as
/// an r2d2 pool's errors.
pub fn redact_error(text: &str, url: &str) -> String {
    scrub_libpq(&scrub(text, url))
}

/// `text` with every password of `url` replaced by `***`.
pub fn scrub(text: &str, url: &str) -> String {
    let mut s = text.to_string();
    for p in passwords(url) {
        s = s.replace(&p, "***");
    }
    s
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
    fn application_name_goes_in_the_url() {
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
