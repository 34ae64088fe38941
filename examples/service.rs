//! A small synchronous HTTP service that migrates the way a replica should
//! during a rolling deploy:
//!
//! - `/livez` answers 200 from the first moment, migrating or not (the
//!   process is alive; do not restart it);
//! - `/readyz` answers 503 until the required track is applied, then 200,
//!   whatever the deferred track is doing;
//! - `/migrations` answers JSON: every migration's state, and the deferred
//!   track's state, progress and counters.
//!
//! ```sh
//! cargo run --example service                       # a throwaway server, the example set
//! DATABASE_URL=postgres://... MIGRATIONS_DIR=path/with/migrations_dirs \
//!     cargo run --example service -- --port 8080
//! ```
//!
//! It prints `listening on http://ADDR` once it serves. `--port 0` (the
//! default) picks a free port.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::r2d2::{ConnectionManager, Pool};
use diesel::PgConnection;
use diesel_rollout::cluster::ThrowawayCluster;
use diesel_rollout::{DeferredHandle, DeferredState, MigrationSet, Migrator, PgPool};
use tiny_http::{Header, Response, Server};

/// Where start-up stands.
enum Phase {
    Migrating,
    Ready(DeferredHandle),
    Failed(String),
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let port = std::env::args()
        .skip_while(|a| a != "--port")
        .nth(1)
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(0);

    // A database: DATABASE_URL, or a throwaway server for trying it out.
    let (url, _cluster) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let cluster = ThrowawayCluster::start().expect("start a throwaway PostgreSQL");
            (cluster.admin_url(), Some(cluster))
        }
    };
    let set = match std::env::var_os("MIGRATIONS_DIR").map(PathBuf::from) {
        Some(dir) => {
            MigrationSet::from_dirs(&dir.join("migrations"), &dir.join("migrations_deferred"))
                .unwrap_or_else(|e| {
                    eprintln!("{e}");
                    std::process::exit(1)
                })
        }
        None => MigrationSet::example(),
    };
    // pool_url: so errors about checking a connection out never show the
    // password (r2d2 does not give a pool's URL out).
    let migrator = Migrator::new(set)
        .application_name("example-service")
        .pool_url(&url);
    // r2d2 logs connection errors, which can echo parts of the URL: log
    // them without the password instead.
    let pool: PgPool = Pool::builder()
        .max_size(4)
        .min_idle(Some(0))
        .error_handler(Box::new(RedactingHandler(url.clone())))
        .build(ConnectionManager::<PgConnection>::new(&url))
        .expect("a connection pool");

    // Serve first, so the liveness probe answers while migrating.
    let server = Server::http(("127.0.0.1", port)).expect("bind the HTTP port");
    let phase = Arc::new(Mutex::new(Phase::Migrating));
    {
        let (phase, pool, migrator) = (Arc::clone(&phase), pool.clone(), migrator.clone());
        std::thread::spawn(move || {
            // Blocks until the required track is applied (here or by another
            // replica), then starts the deferred track in the background.
            let next = match migrator.run(&pool) {
                Ok((report, deferred)) => {
                    tracing::info!(applied = report.applied.len(), "ready");
                    Phase::Ready(deferred)
                }
                Err(e) => {
                    tracing::error!("{e}");
                    Phase::Failed(e.to_string())
                }
            };
            *phase.lock().unwrap() = next;
        });
    }
    println!("listening on http://{}", server.server_addr());
    let _ = std::io::stdout().flush();

    for request in server.incoming_requests() {
        let (code, body, json) = match request.url() {
            "/livez" => (200, "ok\n".to_string(), false),
            "/readyz" => match &*phase.lock().unwrap() {
                Phase::Ready(_) => (200, "ready\n".into(), false),
                Phase::Migrating => (503, "applying required migrations\n".into(), false),
                Phase::Failed(e) => (503, format!("required migrations failed: {e}\n"), false),
            },
            "/migrations" => (200, migrations_json(&migrator, &pool, &phase, &url), true),
            _ => (404, "not found\n".into(), false),
        };
        let mut response = Response::from_string(body).with_status_code(code);
        if json {
            response.add_header(
                Header::from_bytes("Content-Type", "application/json").expect("a valid header"),
            );
        }
        let _ = request.respond(response);
    }
}

/// Logs the pool's connection errors without the password.
#[derive(Debug)]
struct RedactingHandler(String);

impl diesel::r2d2::HandleError<diesel::r2d2::Error> for RedactingHandler {
    fn handle_error(&self, error: diesel::r2d2::Error) {
        tracing::warn!(
            "{}",
            diesel_rollout::redact_error(&error.to_string(), &self.0)
        );
    }
}

fn migrations_json(migrator: &Migrator, pool: &PgPool, phase: &Mutex<Phase>, url: &str) -> String {
    let rows = pool
        .get_timeout(Duration::from_secs(2))
        .map_err(|e| diesel_rollout::redact_error(&e.to_string(), url))
        .and_then(|mut c| migrator.status(&mut c).map_err(|e| e.to_string()));
    let migrations = match rows {
        Ok(rows) => serde_json::Value::Array(
            rows.iter()
                .map(|r| {
                    serde_json::json!({
                        "version": r.version,
                        "track": r.track.map(|t| t.as_str()),
                        "name": r.name,
                        "state": r.state.as_str(),
                        "applied_at": r.applied_at,
                        "indexes": r.indexes.iter().map(|i| serde_json::json!({
                            "name": i.name,
                            "state": i.state.as_str(),
                            "percent": i.progress.as_ref().and_then(|p| p.percent()),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        ),
        Err(e) => serde_json::json!({ "error": e }),
    };
    let deferred = match &*phase.lock().unwrap() {
        Phase::Migrating => serde_json::json!({ "state": "not_started" }),
        Phase::Failed(_) => serde_json::json!({ "state": "not_started" }),
        Phase::Ready(handle) => {
            let m = handle.metrics();
            let mut state = deferred_state(&handle.state());
            state["runs_success"] = m.runs_success.into();
            state["runs_failure"] = m.runs_failure.into();
            state["runs_not_leader"] = m.runs_not_leader.into();
            state["pending"] = m.pending.into();
            state["invalid_indexes_repaired"] = m.invalid_indexes_repaired.into();
            state
        }
    };
    serde_json::json!({ "migrations": migrations, "deferred": deferred }).to_string()
}

fn deferred_state(state: &DeferredState) -> serde_json::Value {
    match state {
        DeferredState::NotStarted => serde_json::json!({ "state": "not_started" }),
        DeferredState::WaitingForRequired { pending } => {
            serde_json::json!({ "state": "waiting_for_required", "pending_required": pending })
        }
        DeferredState::WaitingForLock => serde_json::json!({ "state": "waiting_for_lock" }),
        DeferredState::NotLeader { holder, .. } => serde_json::json!({
            "state": "not_leader",
            "holder": holder.as_ref().map(|h| h.to_string()),
        }),
        DeferredState::Running {
            version,
            name,
            statement,
            statements,
            progress,
            ..
        } => serde_json::json!({
            "state": "running",
            "version": version,
            "name": name,
            "statement": statement,
            "statements": statements,
            "phase": progress.as_ref().map(|p| p.phase.clone()),
            "percent": progress.as_ref().and_then(|p| p.percent()),
        }),
        DeferredState::Retrying { version, error, .. } => {
            serde_json::json!({ "state": "retrying", "version": version, "error": error })
        }
        DeferredState::Reconnecting { error } => {
            serde_json::json!({ "state": "reconnecting", "error": error })
        }
        DeferredState::Done { applied } => {
            serde_json::json!({ "state": "done", "applied": applied })
        }
        DeferredState::Failed { version, error } => {
            serde_json::json!({ "state": "failed", "version": version, "error": error })
        }
        DeferredState::Stopped => serde_json::json!({ "state": "stopped" }),
        _ => serde_json::json!({ "state": "unknown" }),
    }
}
