//! Connection strings: redacting them, and changing their database or
//! `application_name`.
//!
//! Two forms are understood: URLs (`postgres://user:pass@host:port/db?k=v`,
//! also `postgresql://`), read and rewritten with the `url` crate, and libpq
//! key=value strings (`host=localhost password='s3cret' dbname=app`), which
//! no crate parses. A URL is rewritten only when the `url` crate reads it the
//! way libpq does (it gives the text back unchanged); one it would read
//! differently (a raw `@`, `/`, `?` or `#` in the password) is left alone
//! and only redacted, generously. What libpq makes of a password lives in
//! [`secrets`].

mod secrets;

pub(crate) use self::secrets::scrub_unknown;
use self::secrets::{is_scheme, is_secret_key};
pub use self::secrets::{redact_error, scrub, scrub_libpq};

/// What replaces a password in [`redact_url`]'s output.
const REDACTED: &str = "***";

/// Stands in for a list of hosts (`h1:5432,h2:5433`), which libpq accepts and
/// the `url` crate does not, while the rest of the URL is parsed.
const HOSTS: &str = "diesel-rollout-hosts.invalid";

/// A `postgres://` URL as the `url` crate reads it, when that is how libpq
/// reads it too.
struct PgUrl {
    url: url::Url,
    /// The host list that [`HOSTS`] stands in for.
    hosts: Option<String>,
}

impl PgUrl {
    /// `None` for key=value strings, other schemes (libpq knows only
    /// `postgres://` and `postgresql://`, in lower case), text with
    /// whitespace, and URLs the `url` crate would read differently from
    /// libpq or not give back unchanged.
    fn parse(text: &str) -> Option<PgUrl> {
        let rest = text
            .strip_prefix("postgres://")
            .or_else(|| text.strip_prefix("postgresql://"))?;
        // libpq has no fragments: a `#` is part of a value to it.
        if text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '#')
        {
            return None;
        }
        // libpq ends the user info at the first `@` before any `/`; the url
        // crate at the last `@` before the first `/`, `?` or `#`. Agreeing
        // means at most one `@`, and none after a `/`, `?` or `#`.
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if rest.matches('@').count() > 1 || rest[authority_end..].contains('@') {
            return None;
        }
        let (userinfo, hostlist) = match rest[..authority_end].rfind('@') {
            Some(at) => (&rest[..=at], &rest[at + 1..authority_end]),
            None => ("", &rest[..authority_end]),
        };
        let scheme = &text[..text.len() - rest.len()];
        let (candidate, hosts) = if hostlist.contains(',') {
            let swapped = format!("{scheme}{userinfo}{HOSTS}{}", &rest[authority_end..]);
            (swapped, Some(hostlist.to_string()))
        } else {
            (text.to_string(), None)
        };
        let url = url::Url::parse(&candidate).ok()?;
        (url.as_str() == candidate).then_some(PgUrl { url, hosts })
    }

    fn into_string(self) -> String {
        let text = self.url.to_string();
        match self.hosts {
            Some(hosts) => text.replacen(HOSTS, &hosts, 1),
            None => text,
        }
    }
}

/// Returns `url` with any password replaced by `***`
/// (`postgres://user:secret@host/db` becomes `postgres://user:***@host/db`).
///
/// Also handles libpq key=value connection strings (`password=secret` and
/// `password='quoted secret'` become `password=***`) and the query parameters
/// `?password=...` / `&sslpassword=...`. When in doubt it hides more rather
/// than less, and it never panics, whatever the input.
pub fn redact_url(url: &str) -> String {
    let structural = match PgUrl::parse(url) {
        Some(mut parsed) => {
            if parsed.url.password().is_some() {
                // `***` needs no escaping in the user info.
                let _ = parsed.url.set_password(Some(REDACTED));
            }
            if let Some(query) = parsed.url.query() {
                let redacted = redact_query(query);
                parsed.url.set_query(Some(&redacted));
            }
            parsed.into_string()
        }
        None => match url.find("://") {
            Some(end) if is_scheme(&url[..end]) => redact_unparsed_uri(url, end + 3),
            _ => redact_key_value(url),
        },
    };
    // A password with a raw `/` or `@` can leave pieces where the structure
    // says a host or port is: hide those too.
    scrub(&structural, url)
}

/// A URL libpq and the `url` crate would read differently: everything up to
/// the last `@` is user info (a raw `@`, `/`, `?` or `#` in a password
/// included), and everything after the user name in it is hidden.
fn redact_unparsed_uri(url: &str, start: usize) -> String {
    let rest = &url[start..];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..start]);
    let after = match rest.rfind('@') {
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
    match after.find('?') {
        Some(q) => {
            out.push_str(&after[..=q]);
            out.push_str(&redact_query(&after[q + 1..]));
        }
        None => out.push_str(after),
    }
    out
}

/// Redacts `password=` style parameters of a URL query string. The whole rest
/// of the string is treated as the query (a `#` in a password is hidden too).
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if is_secret_key(key) => format!("{key}={REDACTED}"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Replaces the database name in a `postgres://` or `postgresql://` URL,
/// keeping user, password, host(s), port and the rest of the query string.
/// A `dbname` query parameter, which libpq lets override the path, is
/// removed: left in, it would connect to the database it names, not to
/// `database`.
///
/// The name is percent-encoded as needed. An empty `database` removes the
/// database from the URL (libpq then uses the user name). Returns `None` for
/// key=value strings, other schemes, and URLs it can't rewrite with
/// certainty (whitespace, or a raw `@`, `/`, `?` or `#` in the password).
pub fn with_database(url: &str, database: &str) -> Option<String> {
    let mut parsed = PgUrl::parse(url)?;
    let mut path = String::new();
    if !database.is_empty() {
        path.push('/');
        percent_encode_into(database, &mut path);
    }
    parsed.url.set_path(&path);
    if let Some(query) = parsed.url.query().map(str::to_string) {
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let key = pair.split('=').next().unwrap_or("");
                secrets::percent_decode(key) != "dbname"
            })
            .collect();
        if kept.len() != query.split('&').count() {
            let kept = kept.join("&");
            parsed
                .url
                .set_query((!kept.is_empty()).then_some(kept.as_str()));
        }
    }
    Some(parsed.into_string())
}

/// `url` with `application_name` set, unless it sets one already: sent in
/// the startup packet, it costs no round trip. `None` when the string is not
/// one this can extend safely (the caller then sets it after connecting).
pub fn with_application_name(url: &str, name: &str) -> Option<String> {
    let trimmed = url.trim();
    let mut encoded = String::new();
    percent_encode_into(name, &mut encoded);
    if let Some(mut parsed) = PgUrl::parse(trimmed) {
        let query = parsed.url.query().unwrap_or("").to_string();
        if query
            .split('&')
            .any(|p| p.split('=').next() == Some("application_name"))
        {
            return Some(trimmed.to_string());
        }
        let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
        let added = format!("application_name={encoded}");
        pairs.push(&added);
        parsed.url.set_query(Some(&pairs.join("&")));
        return Some(parsed.into_string());
    }
    if trimmed.contains("://") {
        return None;
    }
    if !trimmed.contains('=') {
        return None;
    }
    if trimmed
        .split_whitespace()
        .any(|w| w.starts_with("application_name="))
    {
        return Some(trimmed.to_string());
    }
    // A value ending in an odd run of `\` would escape the space.
    let slashes = trimmed.len() - trimmed.trim_end_matches('\\').len();
    if slashes % 2 == 1 {
        return None;
    }
    let quoted = name.replace('\\', "\\\\").replace('\'', "\\'");
    Some(format!("{trimmed} application_name='{quoted}'"))
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
    fn a_misread_password_is_hidden_where_libpq_would_put_it() {
        // No user info to libpq (a `/` comes first): `12` would be a port.
        assert_eq!(
            redact_url("postgres://localhost:12/cd@127.0.0.1/app"),
            "postgres://localhost:***@127.0.0.1/app"
        );
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
            with_database("postgres://[::1]:5432/old", "new").as_deref(),
            Some("postgres://[::1]:5432/new")
        );
        // libpq reads no fragment: `#frag` is part of the database name.
        assert_eq!(with_database("postgres://[::1]:5432/old#frag", "new"), None);
        assert_eq!(
            with_database("postgres://h1:1,h2:2/old", "new").as_deref(),
            Some("postgres://h1:1,h2:2/new")
        );
        assert_eq!(
            with_database("postgres:///old?host=/var/run/postgresql", "new").as_deref(),
            Some("postgres:///new?host=/var/run/postgresql")
        );
        // libpq knows the schemes in lower case only.
        assert_eq!(with_database("POSTGRES://host/old", "new"), None);
        // A `dbname` parameter would win over the path: it goes.
        assert_eq!(
            with_database("postgres://h/old?dbname=real&sslmode=require", "new").as_deref(),
            Some("postgres://h/new?sslmode=require")
        );
        assert_eq!(
            with_database("postgres:///?host=/run/postgresql&db%6Eame=real", "new").as_deref(),
            Some("postgres:///new?host=/run/postgresql")
        );
        assert_eq!(
            with_database("postgres://h/?dbname=real", "new").as_deref(),
            Some("postgres://h/new")
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
        // A raw `?` in the password: the url crate would read a query there,
        // libpq would not. Left alone; the runner sets the name after
        // connecting.
        assert_eq!(
            with_application_name("postgres://u:p?w@h/db", "x").as_deref(),
            None
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
