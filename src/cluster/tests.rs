//! The throwaway cluster against the server binaries of this machine.

use super::host::*;
use super::*;
use std::env;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
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

pub(crate) fn accepts_tcp(port: u16) -> bool {
    TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(500),
    )
    .is_ok()
}

pub(crate) fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
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
pub(crate) fn cluster_starts_answers_restarts_and_is_removed_on_drop() {
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
pub(crate) fn watchdog_cleans_up_after_the_process_exits() {
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
pub(crate) fn watchdog_child() {
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
pub(crate) fn su_fallback_runs_the_server_as_another_user() {
    let Ok((Runner::Runuser { user, .. }, Some(account))) = Runner::detect() else {
        return; // not root
    };
    let Some(su) = find_program("su", &["/bin/su", "/usr/bin/su"]) else {
        return;
    };
    let binaries = Binaries::find().expect("server binaries");
    let cluster = ThrowawayCluster::start_with(binaries, Runner::Su { su, user }, Some(account))
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(query(&cluster, &cluster.admin_url(), "select 1"), "1");
    let root = cluster.root.clone();
    drop(cluster);
    assert!(!root.exists());
}

#[test]
pub(crate) fn cluster_is_send_and_sync_for_statics() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ThrowawayCluster>();
    assert_send_sync::<ClusterError>();
}

#[test]
pub(crate) fn missing_binaries_message_says_what_to_do() {
    let message = ClusterError::BinariesNotFound.to_string();
    assert!(message.contains("initdb, pg_ctl"));
    assert!(message.contains("apt-get install postgresql"));
    assert!(message.contains("DATABASE_URL"));
}

#[test]
pub(crate) fn start_failure_shows_log_and_detects_port_conflicts() {
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
pub(crate) fn log_tail_keeps_last_lines() {
    let text: Vec<String> = (1..=30).map(|n| format!("line {n}")).collect();
    let tail = last_lines(&text.join("\n"), 20);
    assert!(tail.starts_with("line 11\n"));
    assert!(tail.ends_with("line 30"));
    assert_eq!(last_lines("a\nb", 20), "a\nb");
    assert!(log_tail(Path::new("/nonexistent/server.log"), 20).contains("could not read"));
}

#[test]
pub(crate) fn quoting() {
    assert_eq!(sh_quote("/tmp/a b"), "'/tmp/a b'");
    assert_eq!(sh_quote("it's"), r"'it'\''s'");
    assert_eq!(conf_quote(r"/tmp/it's\x"), r"'/tmp/it''s\\x'");
    assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
}

/// Runs each runner's command and shell line with stand-ins for `su`
/// and `runuser` that drop the user switch, and checks that awkward
/// arguments arrive intact.
#[test]
pub(crate) fn runner_commands_and_shell_lines_keep_arguments_intact() {
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
pub(crate) fn passwd_lookup() {
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
pub(crate) fn picks_highest_version_directory() {
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
