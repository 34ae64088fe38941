//! What the lint reports, and what it reads.

use std::fmt;
use std::path::PathBuf;

use crate::source::{Metadata, Track};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Blocks: `rollout lint` exits 1 and the build-time lint fails.
    Error,
    /// Reported only.
    Warning,
}

impl Severity {
    /// `error` or `warning`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// One problem the lint found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The file.
    pub path: PathBuf,
    /// 1-based line of the statement.
    pub line: usize,
    /// The rule or diesel-guard check name.
    pub rule: String,
    /// Error or warning.
    pub severity: Severity,
    /// What is wrong.
    pub problem: String,
    /// What to do instead.
    pub safe_alternative: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.path.display(),
            self.line,
            self.rule,
            self.problem
        )?;
        if self.severity == Severity::Warning {
            f.write_str(" (warning)")?;
        }
        for (i, line) in self.safe_alternative.trim().lines().enumerate() {
            if i == 0 {
                write!(f, "\n    safe alternative: {}", line.trim_end())?;
            } else {
                write!(f, "\n    {}", line.trim_end())?;
            }
        }
        Ok(())
    }
}

/// One migration as the lint reads it: leniently, so a set the runtime
/// would refuse is still linted.
pub(crate) struct Input {
    pub version: String,
    pub track: Track,
    pub up_path: PathBuf,
    pub up_sql: Option<String>,
    pub down: Option<(PathBuf, String)>,
    pub metadata: Metadata,
}
