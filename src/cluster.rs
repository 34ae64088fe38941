//! Throwaway PostgreSQL clusters, started from the server binaries installed
//! on the machine, for the test suite and for `rollout check`.
//!
//! A [`ThrowawayCluster`] lives in a fresh temporary directory, listens on a
//! free port on 127.0.0.1 only, trusts every local connection and trades
//! durability for speed (`fsync=off`). It is stopped and deleted when dropped
//! and, through a small watchdog shell process, when the process that started
//! it exits without dropping it (a `static`, a panic, a kill).
//!
//! PostgreSQL refuses to run as root. When this process is root, the server
//! programs run as `postgres` (or `nobody` if there is no such user) through
//! `runuser` (or `su`), and the cluster directory is handed to that user.

use std::env;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::url::with_database;

/// Superuser created by initdb; every URL of the cluster connects as it.
const SUPERUSER: &str = "postgres";
/// How long `pg_ctl` waits for the server to start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// How many fresh ports to try when the chosen one gets taken meanwhile.
const PORT_ATTEMPTS: u32 = 5;
/// How many lines of the server log a start error shows.
const LOG_TAIL_LINES: usize = 20;
/// Where Debian and Ubuntu install each major version's server binaries.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";
/// Hands out distinct directory names within this process.
static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// A PostgreSQL cluster created in a temporary directory and removed when dropped.
///
/// The superuser is `postgres` with `trust` authentication; the server
/// listens on `127.0.0.1:`[`port`](Self::port) and on a Unix socket in
/// [`data_dir`](Self::data_dir).
#[derive(Debug)]
pub struct ThrowawayCluster {
    binaries: Binaries,
    runner: Runner,
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    watchdog: Option<Child>,
}

impl ThrowawayCluster {
    /// Finds the server binaries (on `PATH`: `initdb`, `pg_ctl` and
    /// `postgres` in the same directory; otherwise the highest version under
    /// `/usr/lib/postgresql/*/bin`), runs initdb (trust authentication,
    /// superuser `postgres`, UTF8, locale C, `--no-sync`), picks a free port
    /// on 127.0.0.1 and starts the server there, with its Unix socket in the
    /// data directory, `fsync`, `synchronous_commit` and `full_page_writes`
    /// off and `max_connections = 300`. Returns once the server accepts
    /// connections (up to 60 s). If the port is taken before the server
    /// binds it, a new one is tried, a few times.
    ///
    /// A detached watchdog process stops the server and deletes the
    /// directory once this process exits, however it exits.
    pub fn start() -> Result<Self, ClusterError> {
        let binaries = Binaries::find().ok_or(ClusterError::BinariesNotFound)?;
        let (runner, owner) = Runner::detect()?;
        Self::start_with(binaries, runner, owner)
    }

    fn start_with(
        binaries: Binaries,
        runner: Runner,
        owner: Option<Account>,
    ) -> Result<Self, ClusterError> {
        let root = create_root(&temp_base(owner.is_some()))?;
        // From here on, dropping `cluster` (on any error) cleans up.
        let mut cluster = ThrowawayCluster {
            binaries,
            runner,
            data: root.join("data"),
            log: root.join("server.log"),
            root,
            port: 0,
            watchdog: None,
        };
        if let Some(account) = &owner {
            std::os::unix::fs::chown(&cluster.root, Some(account.uid), Some(account.gid)).map_err(
                io_error(format!(
                    "hand {} to user `{}`",
                    cluster.root.display(),
                    account.name
                )),
            )?;
        }
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        cluster.initdb()?;
        cluster.configure()?;

        let mut attempt = 1;
        loop {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => break,
                Err(err) if attempt < PORT_ATTEMPTS && err.is_port_in_use() => {
                    tracing::debug!(port = cluster.port, "port was taken; trying another");
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
        tracing::debug!(
            port = cluster.port,
            data_dir = %cluster.data.display(),
            "started throwaway PostgreSQL cluster"
        );
        Ok(cluster)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    pub fn admin_url(&self) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/postgres", self.port)
    }

    /// URL of the given database on this cluster, as the superuser
    /// (the name is percent-encoded as needed).
    pub fn url_for(&self, database: &str) -> String {
        let admin = self.admin_url();
        with_database(&admin, database).unwrap_or(admin)
    }

    /// The TCP port the server listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory (also where its Unix socket is).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`), as a crash
    /// would; for fault tests. [`start_again`](Self::start_again) restarts it.
    pub fn stop(&self) -> Result<(), ClusterError> {
        let output = self.run_pg_ctl(&self.stop_args())?;
        if output.status.success() {
            Ok(())
        } else {
            Err(ClusterError::CommandFailed {
                command: "pg_ctl stop".to_owned(),
                status: output.status.to_string(),
                output: combined_output(&output),
                hint: "is the server running? `stop` fails if it is already stopped".to_owned(),
            })
        }
    }

    /// Starts the server again after [`stop`](Self::stop), on the same port
    /// and data directory, and waits until it accepts connections.
    pub fn start_again(&self) -> Result<(), ClusterError> {
        self.pg_ctl_start()
    }

    /// Creates database `name` (owned by the superuser) with `psql`, and
    /// returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, ClusterError> {
        check_database_name(name)?;
        self.psql_command(&format!("CREATE DATABASE {}", quote_identifier(name)))?;
        Ok(self.url_for(name))
    }

    /// Drops database `name` if it exists, ending its sessions first
    /// (`DROP DATABASE IF EXISTS ... WITH (FORCE)`), with `psql`.
    pub fn drop_database(&self, name: &str) -> Result<(), ClusterError> {
        check_database_name(name)?;
        self.psql_command(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_identifier(name)
        ))
    }

    fn psql(&self) -> Result<PathBuf, ClusterError> {
        let beside = self.binaries.dir.join("psql");
        if is_executable(&beside) {
            return Ok(beside);
        }
        find_on_path("psql").ok_or(ClusterError::PsqlNotFound)
    }

    fn psql_command(&self, sql: &str) -> Result<(), ClusterError> {
        let mut command = Command::new(self.psql()?);
        command
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.admin_url())
            .arg("-c")
            .arg(sql);
        remove_pg_environment(&mut command);
        let output = run(&mut command, "psql")?;
        if output.status.success() {
            Ok(())
        } else {
            Err(ClusterError::CommandFailed {
                command: format!("psql -c {sql:?}"),
                status: output.status.to_string(),
                output: combined_output(&output),
                hint: String::new(),
            })
        }
    }

    fn initdb(&self) -> Result<(), ClusterError> {
        let args = vec![
            "-D".to_owned(),
            path_string(&self.data),
            "-U".to_owned(),
            SUPERUSER.to_owned(),
            "-A".to_owned(),
            "trust".to_owned(),
            "-E".to_owned(),
            "UTF8".to_owned(),
            "--locale=C".to_owned(),
            "--no-sync".to_owned(),
        ];
        let mut command = self.runner.command(&self.binaries.initdb, &args);
        command.current_dir(&self.root);
        let output = run(&mut command, "initdb")?;
        if output.status.success() {
            return Ok(());
        }
        Err(ClusterError::CommandFailed {
            command: format!(
                "{} -D {}",
                self.binaries.initdb.display(),
                self.data.display()
            ),
            status: output.status.to_string(),
            output: combined_output(&output),
            hint: format!(
                "the directory {} and its parents must be accessible to {}",
                self.root.display(),
                self.runner.describe_user()
            ),
        })
    }

    /// Appends this cluster's settings to `postgresql.conf` (later lines win).
    fn configure(&self) -> Result<(), ClusterError> {
        let conf = self.data.join("postgresql.conf");
        let settings = format!(
            "\n# Throwaway cluster settings (diesel-rollout)\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = {}\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 300\n",
            conf_quote(&path_string(&self.data))
        );
        fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut file| file.write_all(settings.as_bytes()))
            .map_err(io_error(format!("append settings to {}", conf.display())))
    }

    fn stop_args(&self) -> Vec<String> {
        vec![
            "stop".to_owned(),
            "-D".to_owned(),
            path_string(&self.data),
            "-m".to_owned(),
            "immediate".to_owned(),
            "-w".to_owned(),
            "-t".to_owned(),
            PG_CTL_TIMEOUT_SECS.to_owned(),
        ]
    }

    fn run_pg_ctl(&self, args: &[String]) -> Result<Output, ClusterError> {
        let mut command = self.runner.command(&self.binaries.pg_ctl, args);
        command.current_dir(&self.root);
        run(&mut command, "pg_ctl")
    }

    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        let args = vec![
            "start".to_owned(),
            "-D".to_owned(),
            path_string(&self.data),
            "-l".to_owned(),
            path_string(&self.log),
            "-w".to_owned(),
            "-t".to_owned(),
            PG_CTL_TIMEOUT_SECS.to_owned(),
            "-o".to_owned(),
            format!("-p {}", self.port),
        ];
        let output = self.run_pg_ctl(&args)?;
        if output.status.success() {
            return Ok(());
        }
        Err(ClusterError::StartFailed {
            port: self.port,
            output: combined_output(&output),
            log_tail: log_tail(&self.log, LOG_TAIL_LINES),
        })
    }

    /// Spawns `sh` to wait for this process to end, then stop the server and
    /// delete the directory. It runs in its own process group so that a
    /// Ctrl-C aimed at the tests does not kill it before it cleans up.
    fn spawn_watchdog(&self) -> Result<Child, ClusterError> {
        let stop = self
            .runner
            .shell_line(&self.binaries.pg_ctl, &self.stop_args());
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {root}",
            pid = std::process::id(),
            root = sh_quote(&path_string(&self.root)),
        );
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(script)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        remove_pg_environment(&mut command);
        command
            .spawn()
            .map_err(io_error("start the cleanup watchdog (/bin/sh)"))
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            if let Err(err) = self.stop() {
                tracing::debug!(error = %err, "stopping throwaway cluster failed");
            }
        }
        if let Err(err) = fs::remove_dir_all(&self.root) {
            if err.kind() != io::ErrorKind::NotFound {
                tracing::debug!(error = %err, dir = %self.root.display(), "removing throwaway cluster failed");
            }
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

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
    fn is_port_in_use(&self) -> bool {
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

fn io_error(action: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let action = action.into();
    move |source| ClusterError::Io { action, source }
}

/// The server programs of one installation.
#[derive(Debug, Clone)]
struct Binaries {
    dir: PathBuf,
    initdb: PathBuf,
    pg_ctl: PathBuf,
}

impl Binaries {
    fn find() -> Option<Self> {
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

    fn in_dir(dir: &Path) -> Option<Self> {
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
fn versioned_bin_dirs(root: &Path) -> Vec<PathBuf> {
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

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn find_program(name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    find_on_path(name).or_else(|| {
        fallbacks
            .iter()
            .map(PathBuf::from)
            .find(|candidate| is_executable(candidate))
    })
}

/// An entry of /etc/passwd.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Account {
    name: String,
    uid: u32,
    gid: u32,
}

fn lookup_account(passwd: &str, name: &str) -> Option<Account> {
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

fn effective_uid() -> Option<u32> {
    fs::metadata("/proc/self").map(|meta| meta.uid()).ok()
}

/// How the server programs are run.
#[derive(Debug, Clone)]
enum Runner {
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
    fn detect() -> Result<(Runner, Option<Account>), ClusterError> {
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

    fn describe_user(&self) -> String {
        match self {
            Runner::Direct => "the current user".to_owned(),
            Runner::Runuser { user, .. } | Runner::Su { user, .. } => format!("user `{user}`"),
        }
    }

    fn command(&self, program: &Path, args: &[String]) -> Command {
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
    fn shell_line(&self, program: &Path, args: &[String]) -> String {
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

fn command_line(program: &Path, args: &[String]) -> String {
    let mut line = sh_quote(&path_string(program));
    for arg in args {
        line.push(' ');
        line.push_str(&sh_quote(arg));
    }
    line
}

/// Quotes `text` as one word for `sh`.
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Quotes `text` as a postgresql.conf string value.
fn conf_quote(text: &str) -> String {
    format!("'{}'", text.replace('\\', r"\\").replace('\'', "''"))
}

/// Quotes `name` as an SQL identifier.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn check_database_name(name: &str) -> Result<(), ClusterError> {
    if name.is_empty() || name.len() > 63 || name.contains('\0') {
        return Err(ClusterError::InvalidDatabaseName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Paths handled here are checked to be UTF-8 when chosen.
fn path_string(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Keeps the caller's `PG*` variables (PGDATA, PGPORT, PGOPTIONS, ...) from
/// steering the throwaway cluster's programs.
fn remove_pg_environment(command: &mut Command) {
    for (key, _) in env::vars_os() {
        if key.to_str().is_some_and(|key| key.starts_with("PG")) {
            command.env_remove(key);
        }
    }
}

fn run(command: &mut Command, what: &str) -> Result<Output, ClusterError> {
    command.stdin(Stdio::null());
    command.output().map_err(io_error(format!("run {what}")))
}

fn combined_output(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = format!("{}\n{}", stdout.trim(), stderr.trim());
    last_lines(text.trim(), 40)
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

fn log_tail(log: &Path, count: usize) -> String {
    match fs::read(log) {
        Ok(bytes) => last_lines(String::from_utf8_lossy(&bytes).trim_end(), count),
        Err(err) => format!("(could not read {}: {err})", log.display()),
    }
}

/// The directory to create the cluster in. The server's user must be able
/// to reach it: as root, a `TMPDIR` that others can't enter is not used.
fn temp_base(for_other_user: bool) -> PathBuf {
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
fn create_root(base: &Path) -> Result<PathBuf, ClusterError> {
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
fn free_port() -> Result<u16, ClusterError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(io_error("find a free port on 127.0.0.1"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    /// Set in the child process of `watchdog_cleans_up_after_the_process_exits`.
    const CHILD_ENV: &str = "ROLLOUT_CLUSTER_TEST_WATCHDOG_FILE";

    fn psql(cluster: &ThrowawayCluster, url: &str, sql: &str) -> Output {
        let psql = cluster.psql().expect("psql");
        Command::new(psql)
            .args(["-X", "-At", "-c", sql, url])
            .stdin(Stdio::null())
            .output()
            .expect("run psql")
    }

    fn query(cluster: &ThrowawayCluster, url: &str, sql: &str) -> String {
        let output = psql(cluster, url, sql);
        assert!(
            output.status.success(),
            "psql {sql:?} failed: {}",
            combined_output(&output)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    fn accepts_tcp(port: u16) -> bool {
        TcpStream::connect_timeout(
            &(Ipv4Addr::LOCALHOST, port).into(),
            Duration::from_millis(500),
        )
        .is_ok()
    }

    fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        done()
    }

    #[test]
    fn cluster_starts_answers_restarts_and_is_removed_on_drop() {
        let cluster = ThrowawayCluster::start().unwrap_or_else(|err| panic!("{err}"));
        let port = cluster.port();
        assert_ne!(port, 0);
        assert_ne!(port, 5432);
        assert_eq!(
            cluster.admin_url(),
            format!("postgres://postgres@127.0.0.1:{port}/postgres")
        );
        assert_eq!(
            cluster.url_for("app_test"),
            format!("postgres://postgres@127.0.0.1:{port}/app_test")
        );
        let data = cluster.data_dir().to_path_buf();
        let root = cluster.root.clone();
        assert!(data.join("PG_VERSION").is_file());

        let admin = cluster.admin_url();
        assert_eq!(query(&cluster, &admin, "select 1"), "1");
        assert_eq!(
            query(
                &cluster,
                &admin,
                "select string_agg(current_setting(name), ',' order by n) from unnest(array[\
                 'fsync','full_page_writes','listen_addresses','max_connections',\
                 'synchronous_commit','unix_socket_directories','server_encoding',\
                 'lc_collate']) with ordinality as t(name, n)"
            ),
            format!("off,off,127.0.0.1,300,off,{},UTF8,C", data.display())
        );

        // Per-test databases.
        let name = "rollout test \"db\" ä";
        let url = cluster.create_database(name).expect("create database");
        assert_eq!(url, cluster.url_for(name));
        assert_eq!(query(&cluster, &url, "select current_database()"), name);
        assert!(cluster.create_database(name).is_err());
        cluster.drop_database(name).expect("drop database");
        cluster.drop_database(name).expect("drop missing database");
        assert!(!psql(&cluster, &url, "select 1").status.success());
        assert!(matches!(
            cluster.create_database(""),
            Err(ClusterError::InvalidDatabaseName { .. })
        ));

        // Fault injection: stop and start again on the same port.
        cluster.stop().expect("stop");
        assert!(!accepts_tcp(port));
        assert!(!psql(&cluster, &admin, "select 1").status.success());
        assert!(cluster.stop().is_err());

        // A start that fails because the port is taken says so, with the log.
        let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("bind port");
        let err = cluster.start_again().expect_err("port is taken");
        assert!(err.is_port_in_use(), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("last lines of the server log"),
            "{message}"
        );
        assert!(message.contains("Address already in use"), "{message}");
        drop(squatter);

        cluster.start_again().expect("start again");
        assert_eq!(cluster.port(), port);
        assert_eq!(query(&cluster, &admin, "select 1"), "1");

        drop(cluster);
        assert!(!data.exists(), "{} still exists", data.display());
        assert!(!root.exists(), "{} still exists", root.display());
        assert!(!accepts_tcp(port));
    }

    /// Starts a cluster in a child process that exits without dropping it,
    /// and checks that the watchdog stops the server and deletes the files.
    #[test]
    fn watchdog_cleans_up_after_the_process_exits() {
        let module = module_path!();
        let module = module.split_once("::").map_or(module, |(_, rest)| rest);
        let note = env::temp_dir().join(format!(
            "rollout-pg-watchdog-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let output = Command::new(env::current_exe().expect("current exe"))
            .args([
                &format!("{module}::watchdog_child"),
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &note)
            .stdin(Stdio::null())
            .output()
            .expect("run child test process");
        let text = fs::read_to_string(&note).unwrap_or_else(|err| {
            panic!(
                "child wrote no note ({err}); it said: {}",
                combined_output(&output)
            )
        });
        let _ = fs::remove_file(&note);
        let (root, port) = text.trim().rsplit_once('\n').expect("note has two lines");
        let root = PathBuf::from(root);
        let port: u16 = port.parse().expect("port");
        assert!(
            wait_until(Duration::from_secs(30), || !root.exists()),
            "watchdog did not remove {}",
            root.display()
        );
        assert!(wait_until(Duration::from_secs(10), || !accepts_tcp(port)));
    }

    /// The child side of `watchdog_cleans_up_after_the_process_exits`; does
    /// nothing when run as an ordinary test.
    #[test]
    fn watchdog_child() {
        let Some(note) = env::var_os(CHILD_ENV) else {
            return;
        };
        let cluster = ThrowawayCluster::start().unwrap_or_else(|err| panic!("{err}"));
        assert!(accepts_tcp(cluster.port()));
        fs::write(
            &note,
            format!("{}\n{}\n", cluster.root.display(), cluster.port()),
        )
        .expect("write note");
        // Exit without running destructors, as a killed process would.
        std::process::exit(0);
    }

    /// When root, the `su` fallback (used where util-linux `runuser` is
    /// missing) starts and stops a cluster too.
    #[test]
    fn su_fallback_runs_the_server_as_another_user() {
        let Ok((Runner::Runuser { user, .. }, Some(account))) = Runner::detect() else {
            return; // not root
        };
        let Some(su) = find_program("su", &["/bin/su", "/usr/bin/su"]) else {
            return;
        };
        let binaries = Binaries::find().expect("server binaries");
        let cluster =
            ThrowawayCluster::start_with(binaries, Runner::Su { su, user }, Some(account))
                .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(query(&cluster, &cluster.admin_url(), "select 1"), "1");
        let root = cluster.root.clone();
        drop(cluster);
        assert!(!root.exists());
    }

    #[test]
    fn cluster_is_send_and_sync_for_statics() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ThrowawayCluster>();
        assert_send_sync::<ClusterError>();
    }

    #[test]
    fn missing_binaries_message_says_what_to_do() {
        let message = ClusterError::BinariesNotFound.to_string();
        assert!(message.contains("initdb, pg_ctl"));
        assert!(message.contains("apt-get install postgresql"));
        assert!(message.contains("DATABASE_URL"));
    }

    #[test]
    fn start_failure_shows_log_and_detects_port_conflicts() {
        let err = ClusterError::StartFailed {
            port: 4242,
            output: "pg_ctl: could not start server".to_owned(),
            log_tail: "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use"
                .to_owned(),
        };
        assert!(err.is_port_in_use());
        let message = err.to_string();
        assert!(message.contains("127.0.0.1:4242"));
        assert!(message.contains("Address already in use"));
        let other = ClusterError::StartFailed {
            port: 1,
            output: String::new(),
            log_tail: "FATAL:  data directory has wrong ownership".to_owned(),
        };
        assert!(!other.is_port_in_use());
    }

    #[test]
    fn log_tail_keeps_last_lines() {
        let text: Vec<String> = (1..=30).map(|n| format!("line {n}")).collect();
        let tail = last_lines(&text.join("\n"), 20);
        assert!(tail.starts_with("line 11\n"));
        assert!(tail.ends_with("line 30"));
        assert_eq!(last_lines("a\nb", 20), "a\nb");
        assert!(log_tail(Path::new("/nonexistent/server.log"), 20).contains("could not read"));
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(conf_quote(r"/tmp/it's\x"), r"'/tmp/it''s\\x'");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    /// Runs each runner's command and shell line with stand-ins for `su`
    /// and `runuser` that drop the user switch, and checks that awkward
    /// arguments arrive intact.
    #[test]
    fn runner_commands_and_shell_lines_keep_arguments_intact() {
        let dir = env::temp_dir().join(format!(
            "rollout-pg-runner-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("mkdir");
        let fake = |name: &str, body: &str| {
            let path = dir.join(name);
            fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
            path
        };
        // su USER -s /bin/sh -c LINE
        let su = fake("su", r#"shift 3; exec /bin/sh "$@""#);
        // runuser -u USER -- PROGRAM ARGS
        let runuser = fake("runuser", r#"shift 3; exec "$@""#);
        let args = vec![
            "it's".to_owned(),
            "a  b".to_owned(),
            "$HOME \\ `x`".to_owned(),
        ];
        let expected = "it's|a  b|$HOME \\ `x`\n";
        let printf = Path::new("/usr/bin/printf");
        let mut all_args = vec!["%s|%s|%s\\n".to_owned()];
        all_args.extend(args);
        for runner in [
            Runner::Direct,
            Runner::Su {
                su,
                user: "nobody".to_owned(),
            },
            Runner::Runuser {
                runuser,
                user: "nobody".to_owned(),
            },
        ] {
            let output = runner.command(printf, &all_args).output().expect("command");
            assert_eq!(
                String::from_utf8_lossy(&output.stdout),
                expected,
                "{runner:?}"
            );
            let line = runner.shell_line(printf, &all_args);
            let output = Command::new("/bin/sh")
                .arg("-c")
                .arg(&line)
                .output()
                .expect("sh");
            assert_eq!(String::from_utf8_lossy(&output.stdout), expected, "{line}");
        }
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn passwd_lookup() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
                      postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(
            lookup_account(passwd, "postgres"),
            Some(Account {
                name: "postgres".to_owned(),
                uid: 101,
                gid: 104
            })
        );
        assert_eq!(lookup_account(passwd, "nobody").map(|a| a.uid), Some(65534));
        assert_eq!(lookup_account(passwd, "post"), None);
        assert_eq!(lookup_account("broken:line", "broken"), None);
    }

    #[test]
    fn picks_highest_version_directory() {
        let root = env::temp_dir().join(format!(
            "rollout-pg-versions-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        for version in ["9.6", "13", "15", "10", "main", "15.2x"] {
            fs::create_dir_all(root.join(version).join("bin")).expect("mkdir");
        }
        let dirs = versioned_bin_dirs(&root);
        let names: Vec<String> = dirs
            .iter()
            .map(|dir| {
                dir.parent()
                    .and_then(Path::file_name)
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(names, ["15", "13", "10", "9.6"]);
        // Only a directory holding all three programs counts.
        assert!(Binaries::in_dir(&dirs[0]).is_none());
        for program in ["initdb", "pg_ctl", "postgres"] {
            let path = dirs[1].join(program);
            fs::write(&path, "#!/bin/sh\n").expect("write");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        assert_eq!(
            versioned_bin_dirs(&root)
                .iter()
                .find_map(|dir| Binaries::in_dir(dir))
                .map(|b| b.dir),
            Some(dirs[1].clone())
        );
        fs::remove_dir_all(&root).expect("cleanup");
    }
}
