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
mod host;
#[cfg(test)]
mod tests;

use std::fs;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use crate::url::with_database;

/// Superuser created by initdb; every URL of the cluster connects as it.
pub use self::host::ClusterError;
use self::host::{
    check_database_name, combined_output, conf_quote, create_root, find_on_path, free_port,
    io_error, is_executable, log_tail, path_string, quote_identifier, remove_pg_environment, run,
    sh_quote, temp_base, Account, Binaries, Runner, PG_CTL_TIMEOUT_SECS,
};

const SUPERUSER: &str = "postgres";
/// How many fresh ports to try when the chosen one gets taken meanwhile.
const PORT_ATTEMPTS: u32 = 5;
/// How many lines of the server log a start error shows.
const LOG_TAIL_LINES: usize = 20;

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
