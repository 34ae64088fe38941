//! The baseline: the version at or below which migrations are history
//! (grandfathered). It is kept as `start_after` in `diesel-guard.toml`, the
//! lint's own configuration, so one setting serves the build, the runtime
//! and the lint.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::Problem;

/// diesel-guard's configuration file, which holds `start_after`.
pub const CONFIG_FILE: &str = "diesel-guard.toml";

/// Where the configuration of the migrations in `required` is: beside the
/// directory (in its parent) when the file exists there, else in the
/// current directory when it exists there; `None` when neither exists.
pub fn config_path(required: &Path) -> Option<PathBuf> {
    let beside = required
        .parent()
        .map(|p| p.join(CONFIG_FILE))
        .filter(|p| p.is_file());
    beside.or_else(|| Some(PathBuf::from(CONFIG_FILE)).filter(|p| p.is_file()))
}

/// Sets the baseline of the migrations in `required` to `version`: writes
/// `start_after` into their `diesel-guard.toml` (the existing one, else a new
/// one beside the directory), keeping the rest of the file. Returns the
/// file's path.
///
/// # Errors
/// When the file cannot be read or written.
pub fn set(required: &Path, version: &str) -> io::Result<PathBuf> {
    let path = config_path_for_writing(required);
    write(&path, version)?;
    // A build script embedding these migrations watches the directory, not
    // a config file that did not exist: a newer mtime makes cargo embed
    // the baseline at the next build. Best effort.
    if let Ok(dir) = fs::File::open(required) {
        let _ = dir.set_modified(std::time::SystemTime::now());
    }
    Ok(path)
}

/// Where `rollout baseline` writes: the existing file, else a new one beside
/// the migrations directory.
pub fn config_path_for_writing(required: &Path) -> PathBuf {
    config_path(required).unwrap_or_else(|| {
        required
            .parent()
            .map_or_else(|| PathBuf::from(CONFIG_FILE), |p| p.join(CONFIG_FILE))
    })
}

/// The baseline of the migrations in `required`: `start_after` of their
/// `diesel-guard.toml`, as digits. `None` without a file or the key.
///
/// # Errors
/// When the file cannot be read or its `start_after` is not a version.
pub fn read(required: &Path) -> Result<Option<String>, Problem> {
    let Some(path) = config_path(required) else {
        return Ok(None);
    };
    let text = fs::read_to_string(&path).map_err(|e| Problem {
        paths: vec![path.clone()],
        line: None,
        message: format!("cannot read: {e}"),
    })?;
    parse_start_after(&text).map_err(|(line, message)| Problem {
        paths: vec![path],
        line: Some(line),
        message,
    })
}

/// `start_after` of a `diesel-guard.toml`, with `-` and `_` removed
/// (`2024_01_31_120000` gives `20240131120000`).
///
/// # Errors
/// `(line, message)` when the value is not a quoted version.
pub fn parse_start_after(text: &str) -> Result<Option<String>, (usize, String)> {
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key.trim() != "start_after" {
            continue;
        }
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        let digits: String = value.chars().filter(|c| *c != '-' && *c != '_').collect();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err((
                i + 1,
                format!(
                    "`start_after = {}` is not a version: write the version of the newest \
                     migration to grandfather, e.g. `start_after = \"2024-01-31-120000\"` \
                     (`rollout baseline` writes it)",
                    value
                ),
            ));
        }
        return Ok(Some(digits));
    }
    Ok(None)
}

/// Sets `start_after = "VERSION"` in the configuration file at `path`,
/// replacing an earlier `start_after` line and keeping everything else,
/// creating the file when there is none.
///
/// # Errors
/// When the file cannot be read or written.
pub fn write(path: &Path, version: &str) -> io::Result<()> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let line = format!(
        "# Migrations at or below this version are history (diesel-rollout's baseline):\n\
         # their old problems are warnings, and the lint skips them.\nstart_after = \"{version}\""
    );
    let mut replaced = false;
    let mut out: Vec<String> = Vec::new();
    for l in text.lines() {
        let key = l.split('=').next().unwrap_or("").trim();
        if key == "start_after" && !l.trim_start().starts_with('#') {
            if !replaced {
                out.push(format!("start_after = \"{version}\""));
                replaced = true;
            }
        } else {
            out.push(l.to_string());
        }
    }
    if !replaced {
        if out.is_empty() {
            // diesel-guard requires the framework in its file.
            out.push("framework = \"diesel\"".to_string());
        }
        if out.last().is_some_and(|l| !l.trim().is_empty()) {
            out.push(String::new());
        }
        out.push(line);
    }
    fs::write(path, out.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_after_is_read_and_written_in_place() {
        assert_eq!(parse_start_after("").unwrap(), None);
        assert_eq!(
            parse_start_after("framework = \"diesel\"\nstart_after = \"2024_01_31_120000\" # x\n")
                .unwrap(),
            Some("20240131120000".into())
        );
        assert_eq!(
            parse_start_after("start_after = \"soon\"").unwrap_err().0,
            1
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        write(&path, "20240101000000").unwrap();
        assert_eq!(
            parse_start_after(&fs::read_to_string(&path).unwrap()).unwrap(),
            Some("20240101000000".into())
        );
        fs::write(
            &path,
            "framework = \"diesel\"\nstart_after = \"1\"\ndisable_checks = [\"X\"]\n",
        )
        .unwrap();
        write(&path, "0300").unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "framework = \"diesel\"\nstart_after = \"0300\"\ndisable_checks = [\"X\"]\n"
        );
    }
}
