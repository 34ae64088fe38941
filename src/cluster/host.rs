//! What the cluster needs from the machine (the server binaries, an
//! unprivileged account to run them as when this process is root, commands,
//! directories and a free port) and why that can fail.

use std::env;
use std::fmt;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

/// Superuser created by initdb; every URL of the cluster connects as it.
/// Where Debian and Ubuntu install each major version's server binaries.
pub(crate) const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";
/// Hands out distinct directory names within this process.
pub(crate) static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// How long `pg_ctl` waits for the server to start or stop, in seconds.
pub(crate) const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Why a throwaway cluster could not be set up or operated.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClusterError {
    /// No `initdb`/`pg_ctl`/`postgres` on `PATH` or under `/usr/lib/postgresql`.
    BinariesNotFound,
    /// This process is root, and there is no unprivileged account or no
    /// `runuser`/`su` to run the server with.
    NoUnprivilegedUser {
        /// What is missing.
        reason: String,
    },
    /// A file or process operation failed.
    Io {
        /// What was being done, e.g. "create directory /tmp/x".
        action: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A PostgreSQL program exited with an error.
    CommandFailed {
        /// The command, shortened.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed.
        output: String,
        /// What to check, or empty.
        hint: String,
    },
    /// The server did not start (or did not accept connections in time).
    StartFailed {
        /// The port it was to listen on.
        port: u16,
        /// What `pg_ctl start` printed.
        output: String,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// `psql` (for creating and dropping databases) was not found.
    PsqlNotFound,
    /// A database name that PostgreSQL would reject.
    InvalidDatabaseName {
        /// The name.
        name: String,
    },
}

impl ClusterError {
    pub(crate) fn is_port_in_use(&self) -> bool {
        match self {
            ClusterError::StartFailed { log_tail, .. } => {
                log_tail.contains("Address already in use")
                    || log_tail.contains("could not bind IPv4 address")
                    || log_tail.contains("could not create any TCP/IP sockets")
            }
            _ => false,
        }
    }
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::BinariesNotFound => write!(
                f,
                "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under \
                 {DEBIAN_PG_ROOT}/*/bin: install the PostgreSQL server package \
                 (Debian: `apt-get install postgresql`) or set DATABASE_URL to a server \
                 you can create databases on"
            ),
            ClusterError::NoUnprivilegedUser { reason } => write!(
                f,
                "running as root, and PostgreSQL refuses to run as root, but {reason}: \
                 create a `postgres` user (Debian's postgresql package does) and install \
                 util-linux `runuser`, run as an ordinary user, or set DATABASE_URL to a \
                 server you can create databases on"
            ),
            ClusterError::Io { action, source } => write!(f, "could not {action}: {source}"),
            ClusterError::CommandFailed {
                command,
                status,
                output,
                hint,
            } => {
                write!(f, "`{command}` failed ({status})")?;
                if !hint.is_empty() {
                    write!(f, "; {hint}")?;
                }
                if !output.is_empty() {
                    write!(f, "\n{output}")?;
                }
                Ok(())
            }
            ClusterError::StartFailed {
                port,
                output,
                log_tail,
            } => {
                write!(
                    f,
                    "the throwaway PostgreSQL server did not start on 127.0.0.1:{port} \
                     within {PG_CTL_TIMEOUT_SECS}s; see the server log below, or set \
                     DATABASE_URL to a server you can create databases on"
                )?;
                if !output.is_empty() {
                    write!(f, "\npg_ctl: {output}")?;
                }
                if log_tail.is_empty() {
                    write!(f, "\n(the server log is empty)")
                } else {
                    write!(f, "\nlast lines of the server log:\n{log_tail}")
                }
            }
            ClusterError::PsqlNotFound => write!(
                f,
                "psql not found next to the server binaries or on PATH: install the \
                 PostgreSQL client package (Debian: `apt-get install postgresql-client`)"
            ),
            ClusterError::InvalidDatabaseName { name } => write!(
                f,
                "invalid database name {name:?}: use 1 to 63 bytes and no NUL character"
            ),
        }
    }
}

impl std::error::Error for ClusterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClusterError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub(crate) fn io_error(action: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let action = action.into();
    move |source| ClusterError::Io { action, source }
}

/// The server programs of one installation.
#[derive(Debug, Clone)]
pub(crate) struct Binaries {
    pub dir: PathBuf,
    pub initdb: PathBuf,
    pub pg_ctl: PathBuf,
}

impl Binaries {
    pub(crate) fn find() -> Option<Self> {
        let from_path = env::var_os("PATH").and_then(|path| {
            env::split_paths(&path)
                .filter(|dir| dir.is_absolute())
                .find_map(|dir| Self::in_dir(&dir))
        });
        from_path.or_else(|| {
            versioned_bin_dirs(Path::new(DEBIAN_PG_ROOT))
                .iter()
                .find_map(|dir| Self::in_dir(dir))
        })
    }

    pub(crate) fn in_dir(dir: &Path) -> Option<Self> {
        let initdb = dir.join("initdb");
        let pg_ctl = dir.join("pg_ctl");
        let all_there = [&initdb, &pg_ctl, &dir.join("postgres")]
            .iter()
            .all(|program| is_executable(program));
        // Non-UTF-8 paths could not be quoted for the watchdog's shell.
        (all_there && dir.to_str().is_some()).then(|| Binaries {
            dir: dir.to_path_buf(),
            initdb,
            pg_ctl,
        })
    }
}

/// `ROOT/*/bin` directories whose `*` is a version number, highest first.
pub(crate) fn versioned_bin_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = name
                .to_str()?
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

pub(crate) fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub(crate) fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

pub(crate) fn find_program(name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    find_on_path(name).or_else(|| {
        fallbacks
            .iter()
            .map(PathBuf::from)
            .find(|candidate| is_executable(candidate))
    })
}

/// An entry of /etc/passwd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

pub(crate) fn lookup_account(passwd: &str, name: &str) -> Option<Account> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.trim().parse().ok()?;
        let gid = fields.next()?.trim().parse().ok()?;
        Some(Account {
            name: name.to_owned(),
            uid,
            gid,
        })
    })
}

pub(crate) fn effective_uid() -> Option<u32> {
    fs::metadata("/proc/self").map(|meta| meta.uid()).ok()
}

/// How the server programs are run.
#[derive(Debug, Clone)]
pub(crate) enum Runner {
    /// As this process's user.
    Direct,
    /// As `user`, through util-linux `runuser -u USER -- PROGRAM ARGS`.
    Runuser { runuser: PathBuf, user: String },
    /// As `user`, through `su USER -s /bin/sh -c 'PROGRAM ARGS'`.
    Su { su: PathBuf, user: String },
}

impl Runner {
    /// Picks how to run the server, and for root the account that will own
    /// the cluster directory.
    pub(crate) fn detect() -> Result<(Runner, Option<Account>), ClusterError> {
        if effective_uid() != Some(0) {
            return Ok((Runner::Direct, None));
        }
        let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
        let account = lookup_account(&passwd, "postgres")
            .or_else(|| lookup_account(&passwd, "nobody"))
            .ok_or_else(|| ClusterError::NoUnprivilegedUser {
                reason: "/etc/passwd has neither a `postgres` nor a `nobody` user".to_owned(),
            })?;
        let user = account.name.clone();
        let runner = if let Some(runuser) =
            find_program("runuser", &["/usr/sbin/runuser", "/sbin/runuser"])
        {
            Runner::Runuser { runuser, user }
        } else if let Some(su) = find_program("su", &["/bin/su", "/usr/bin/su"]) {
            Runner::Su { su, user }
        } else {
            return Err(ClusterError::NoUnprivilegedUser {
                reason: "neither `runuser` nor `su` was found".to_owned(),
            });
        };
        Ok((runner, Some(account)))
    }

    pub(crate) fn describe_user(&self) -> String {
        match self {
            Runner::Direct => "the current user".to_owned(),
            Runner::Runuser { user, .. } | Runner::Su { user, .. } => format!("user `{user}`"),
        }
    }

    pub(crate) fn command(&self, program: &Path, args: &[String]) -> Command {
        let mut command = match self {
            Runner::Direct => {
                let mut command = Command::new(program);
                command.args(args);
                command
            }
            Runner::Runuser { runuser, user } => {
                let mut command = Command::new(runuser);
                command
                    .arg("-u")
                    .arg(user)
                    .arg("--")
                    .arg(program)
                    .args(args);
                command
            }
            Runner::Su { su, user } => {
                let mut command = Command::new(su);
                command
                    .arg(user)
                    .arg("-s")
                    .arg("/bin/sh")
                    .arg("-c")
                    .arg(format!("exec {}", command_line(program, args)));
                command
            }
        };
        remove_pg_environment(&mut command);
        command
    }

    /// The same command as [`Runner::command`], as a line for `sh`.
    pub(crate) fn shell_line(&self, program: &Path, args: &[String]) -> String {
        let line = command_line(program, args);
        match self {
            Runner::Direct => line,
            Runner::Runuser { runuser, user } => format!(
                "{} -u {} -- {line}",
                sh_quote(&path_string(runuser)),
                sh_quote(user)
            ),
            Runner::Su { su, user } => format!(
                "{} {} -s /bin/sh -c {}",
                sh_quote(&path_string(su)),
                sh_quote(user),
                sh_quote(&format!("exec {line}"))
            ),
        }
    }
}

pub(crate) fn command_line(program: &Path, args: &[String]) -> String {
    let mut line = sh_quote(&path_string(program));
    for arg in args {
        line.push(' ');
        line.push_str(&sh_quote(arg));
    }
    line
}

/// Quotes `text` as one word for `sh`.
pub(crate) fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Quotes `text` as a postgresql.conf string value.
pub(crate) fn conf_quote(text: &str) -> String {
    format!("'{}'", text.replace('\\', r"\\").replace('\'', "''"))
}

/// Quotes `name` as an SQL identifier.
pub(crate) fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(crate) fn check_database_name(name: &str) -> Result<(), ClusterError> {
    if name.is_empty() || name.len() > 63 || name.contains('\0') {
        return Err(ClusterError::InvalidDatabaseName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Paths handled here are checked to be UTF-8 when chosen.
pub(crate) fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Keeps the caller's `PG*` variables (PGDATA, PGPORT, PGOPTIONS, ...) from
/// steering the throwaway cluster's programs.
pub(crate) fn remove_pg_environment(command: &mut Command) {
    for (key, _) in env::vars_os() {
        if key.to_str().is_some_and(|key| key.starts_with("PG")) {
            command.env_remove(key);
        }
    }
}

pub(crate) fn run(command: &mut Command, what: &str) -> Result<Output, ClusterError> {
    command.stdin(Stdio::null());
    command.output().map_err(io_error(format!("run {what}")))
}

pub(crate) fn combined_output(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = format!("{}\n{}", stdout.trim(), stderr.trim());
    last_lines(text.trim(), 40)
}

pub(crate) fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

pub(crate) fn log_tail(log: &Path, count: usize) -> String {
    match fs::read(log) {
        Ok(bytes) => last_lines(String::from_utf8_lossy(&bytes).trim_end(), count),
        Err(err) => format!("(could not read {}: {err})", log.display()),
    }
}

/// The directory to create the cluster in. The server's user must be able
/// to reach it: as root, a `TMPDIR` that others can't enter is not used.
pub(crate) fn temp_base(for_other_user: bool) -> PathBuf {
    let base = env::temp_dir();
    let usable = base.to_str().is_some()
        && base.is_absolute()
        && (!for_other_user
            || base.ancestors().all(|dir| {
                fs::metadata(dir)
                    .map(|meta| meta.mode() & 0o001 != 0)
                    .unwrap_or(false)
            }));
    if usable {
        base
    } else {
        PathBuf::from("/tmp")
    }
}

/// Creates a new, private directory under `base`. Its name is short, as the
/// server's Unix socket path in it must stay under ~100 bytes.
pub(crate) fn create_root(base: &Path) -> Result<PathBuf, ClusterError> {
    let pid = std::process::id();
    loop {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("rollout-pg-{pid}-{n}"));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists && n < 10_000 => continue,
            Err(err) => {
                return Err(ClusterError::Io {
                    action: format!("create directory {}", dir.display()),
                    source: err,
                })
            }
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> Result<u16, ClusterError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(io_error("find a free port on 127.0.0.1"))
}
