//! Reproductions of paths that broke "exactly once, nothing lost, no secret
//! printed", each against a real PostgreSQL server: where the ledger lives,
//! what a resumed migration re-runs, `requires_deferred` ordering, index
//! names PostgreSQL truncates, lock keys, session settings handed back to a
//! pool, secrets in URLs, and the statement splitter.

mod support;

use diesel::connection::SimpleConnection;
use diesel_rollout::ErrorKind;
use support::{TempSet, TestDb};

/// Statements the splitter once got wrong are applied as PostgreSQL reads
/// them, in both transaction modes.
#[test]
fn the_splitter_agrees_with_postgresql() {
    let db = TestDb::new();
    let set = TempSet::new();
    // A `--` comment ends at a lone `\r`: the ALTER after it must run.
    set.required_no_tx(
        "1_carriage_return",
        "CREATE TABLE a (x int); -- note\rALTER TABLE a ADD COLUMN y int;\n",
    );
    set.required(
        "2_carriage_return_tx",
        "CREATE TABLE b (x int); -- note\rALTER TABLE b ADD COLUMN y int;\n",
    );
    // A multi-action rule: its `;` are inside parentheses.
    set.required(
        "3_rule",
        "CREATE TABLE t (x int);\nCREATE TABLE u (x int);\n\
         CREATE RULE r AS ON INSERT TO t DO ALSO (\n  INSERT INTO u VALUES (1);\n  \
         INSERT INTO u VALUES (2)\n);\n",
    );
    set.required_no_tx(
        "4_rule_no_tx",
        "CREATE TABLE t2 (x int);\n\
         CREATE RULE r2 AS ON INSERT TO t2 DO ALSO (INSERT INTO u VALUES (3); INSERT INTO u VALUES (4));\n",
    );
    // An escape string continued on the next line stays an escape string.
    set.required_no_tx(
        "5_escape_continued",
        "CREATE TABLE s (v text);\nINSERT INTO s VALUES (E'it''s'\n  '\\'; still the string');\n",
    );
    let m = set.migrator();
    let report = m.run_required(&db.url).unwrap();
    assert_eq!(report.applied.len(), 5);
    for table in ["a", "b"] {
        assert_eq!(
            db.count(&format!(
                "SELECT count(*) AS n FROM information_schema.columns \
                 WHERE table_name = '{table}' AND column_name = 'y'"
            )),
            1,
            "the statement after the `\\r`-ended comment of {table} ran"
        );
    }
    let mut c = db.conn();
    c.batch_execute("INSERT INTO t VALUES (0); INSERT INTO t2 VALUES (0)")
        .unwrap();
    assert_eq!(
        db.texts("SELECT x::text AS t FROM u ORDER BY x"),
        ["1", "2", "3", "4"]
    );
    assert_eq!(
        db.texts("SELECT v AS t FROM s"),
        ["it's'; still the string"]
    );
}

/// `COPY ... FROM stdin` would load nothing and be recorded as applied: the
/// set is refused, naming the file and line, before anything runs.
#[test]
fn a_client_copy_is_refused_naming_the_line() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_ok", "CREATE TABLE t (a int);\n");
    let dir = set.required("2_copy", "-- seed\nCOPY t (a) FROM stdin;\n1\n2\n\\.\n");
    let err = diesel_rollout::MigrationSet::from_dirs(&set.required_dir(), &set.deferred_dir())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidMigrationSet);
    let text = err.to_string();
    let at = format!("{}:2:", dir.join("up.sql").display());
    assert!(text.contains(&at), "{text}");
    assert!(text.contains("INSERT ... VALUES"), "{text}");
    // The CLI refuses the same set and applies nothing.
    let out = db
        .rollout()
        .args(["up", "--required-only", "--migrations-dir"])
        .arg(set.required_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&at));
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_class WHERE relname = '__diesel_schema_migrations'"),
        0
    );
}

fn pool(db: &TestDb) -> diesel_rollout::PgPool {
    diesel::r2d2::Pool::builder()
        .max_size(3)
        .min_idle(Some(0))
        .connection_timeout(std::time::Duration::from_secs(10))
        .build(diesel::r2d2::ConnectionManager::new(&db.url))
        .unwrap()
}

/// Deferred runs that give up at once instead of retrying with backoff.
fn once(m: diesel_rollout::Migrator) -> diesel_rollout::Migrator {
    m.deferred_failure_retries(0)
        .deferred_retry(false)
        .deferred_progress_interval(std::time::Duration::from_millis(100))
}

/// `Some(valid)` for an index stored under exactly this name.
fn index_valid(db: &TestDb, name: &str) -> Option<bool> {
    db.texts(&format!(
        "SELECT i.indisvalid::text AS t FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE c.relname = '{name}'"
    ))
    .first()
    .map(|v| v == "true")
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// PostgreSQL stores at most 63 bytes of a name, cut on a character
/// boundary: the catalog checks of the deferred track look for the stored
/// name, for new indexes, invalid leftovers and `REINDEX` leftovers alike.
#[test]
fn index_names_longer_than_63_bytes_are_checked_as_postgresql_stores_them() {
    let db = TestDb::new();
    let set = TempSet::new();
    let long = format!("things_val_{}", "x".repeat(54)); // 65 bytes
    let accents = format!("things_id___{}", "é".repeat(26)); // 64 bytes: cut to 62
    let reindexed = format!("things_grp_{}", "y".repeat(60));
    set.required(
        "1_things",
        &format!(
            "CREATE TABLE things (id int, val int, grp int);\n\
             INSERT INTO things SELECT g, g % 10, g % 7 FROM generate_series(1, 2000) g;\n\
             CREATE INDEX {reindexed} ON things (grp);\n"
        ),
    );
    set.deferred(
        "2_long_names",
        &format!(
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {long} ON things (val, id);\n\
             CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {accents} ON things (id);\n"
        ),
    );
    set.deferred(
        "3_reindex_long",
        &format!("REINDEX INDEX CONCURRENTLY {reindexed};\n"),
    );
    let stored_long = &long[..63];
    let stored_accents = format!("things_id___{}", "é".repeat(25));
    assert_eq!(stored_accents.len(), 62);

    let m = once(set.migrator());
    m.run_required(&db.url).unwrap();

    // A failed build leaves an invalid index under the long name, stored cut.
    let mut c = db.conn();
    c.batch_execute("INSERT INTO things VALUES (1, 1, 1)")
        .unwrap();
    c.batch_execute(&format!(
        "CREATE UNIQUE INDEX CONCURRENTLY {long} ON things (val, id)"
    ))
    .unwrap_err();
    assert_eq!(index_valid(&db, stored_long), Some(false));
    // A REINDEX CONCURRENTLY cancelled halfway leaves `<cut base>_ccnew`.
    let mut writer = db.conn();
    writer
        .batch_execute("BEGIN; INSERT INTO things VALUES (-1, -1, -1)")
        .unwrap();
    let url = db.url.clone();
    let r = reindexed.clone();
    let reindex = std::thread::spawn(move || {
        use diesel::Connection;
        let mut c = diesel::PgConnection::establish(&url).unwrap();
        c.batch_execute(&format!("REINDEX INDEX CONCURRENTLY {r}"))
    });
    wait_until("the reindex to start", || {
        db.count(
            "SELECT count(*) AS n FROM pg_stat_progress_create_index \
             WHERE datname = current_database()",
        ) > 0
    });
    db.conn()
        .batch_execute(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_progress_create_index \
             WHERE datname = current_database()",
        )
        .unwrap();
    assert!(reindex.join().unwrap().is_err());
    drop(writer);
    let leftover = format!("{}_ccnew", &reindexed[..57]);
    assert_eq!(index_valid(&db, &leftover), Some(false));

    // Fix the duplicate; the deferred track drops both leftovers and builds.
    db.conn()
        .batch_execute(
            "DELETE FROM things WHERE ctid = (SELECT max(ctid) FROM things WHERE id = 1)",
        )
        .unwrap();
    let handle = m.start_deferred(pool(&db));
    let end = handle.wait(std::time::Duration::from_secs(60));
    assert!(
        matches!(end, diesel_rollout::DeferredState::Done { .. }),
        "{end:?}"
    );
    assert_eq!(handle.metrics().invalid_indexes_repaired, 2);
    assert_eq!(index_valid(&db, stored_long), Some(true));
    assert_eq!(index_valid(&db, &stored_accents), Some(true));
    assert_eq!(index_valid(&db, &reindexed[..63]), Some(true));
    assert_eq!(index_valid(&db, &leftover), None);
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_index WHERE NOT indisvalid"),
        0
    );
    // Status shows each index under its stored name, valid.
    let status = m.status(&mut db.conn()).unwrap();
    let row = status.iter().find(|r| r.version == "2").unwrap();
    let names: Vec<_> = row
        .indexes
        .iter()
        .map(|i| (i.name.as_str(), i.state.as_str()))
        .collect();
    assert_eq!(
        names,
        [(stored_long, "valid"), (stored_accents.as_str(), "valid")]
    );
}

/// Item 1: a schema created on the search_path after the first deploy
/// (`"$user", public`, the usual fix for PostgreSQL 15's public-schema
/// rights) does not get a second, empty ledger: nothing runs twice, on any
/// path, and the ledger stays where it is.
#[test]
fn the_ledger_stays_where_it_is_when_a_schema_on_the_search_path_appears() {
    let db = TestDb::new();
    db.conn()
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET search_path = app, public",
            db.name
        ))
        .unwrap();
    let set = TempSet::new();
    set.required(
        "1_things",
        "CREATE TABLE things (id int, val int);\n\
         CREATE TABLE IF NOT EXISTS public.effects (v text);\n\
         INSERT INTO public.effects VALUES ('1');\n",
    );
    let first = set.migrator();
    first.run_required(&db.url).unwrap();
    // The ledger went to public: schema app did not exist yet.
    assert_eq!(
        db.texts(
            "SELECT n.nspname::text AS t FROM pg_class c JOIN pg_namespace n \
             ON n.oid = c.relnamespace WHERE c.relname LIKE '\\_\\_diesel%' AND c.relkind = 'r' \
             ORDER BY 1"
        ),
        ["public", "public"]
    );

    // Then the schema appears, and the next release has more to apply.
    db.conn().batch_execute("CREATE SCHEMA app").unwrap();
    set.required(
        "2_more",
        "ALTER TABLE things ADD COLUMN note text;\nINSERT INTO public.effects VALUES ('2');\n",
    );
    set.deferred(
        "3_index",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS things_val_idx ON things (val);\n\
         INSERT INTO public.effects SELECT '3' WHERE NOT EXISTS \
         (SELECT 1 FROM public.effects WHERE v = '3');\n",
    );
    let out = db
        .rollout()
        .args(["-q", "up", "--migrations-dir"])
        .arg(set.required_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        db.texts("SELECT v AS t FROM public.effects ORDER BY v"),
        ["1", "2", "3"],
        "every migration ran exactly once"
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'app'"),
        0,
        "nothing was created in the new schema: no second ledger, no shadow tables"
    );
    let m = set.migrator();
    let mut c = db.conn();
    assert!(m.verify(&mut c).unwrap().is_complete());
    let states: Vec<_> = m
        .status(&mut c)
        .unwrap()
        .into_iter()
        .map(|r| r.state.as_str())
        .collect();
    assert_eq!(states, ["applied", "applied", "applied"]);
    assert_eq!(
        m.run_required(&db.url).unwrap().applied.len(),
        0,
        "the next start finds nothing to do"
    );
}

/// Item 5: the same table, however it is spelled, has one lock and one
/// ledger (the attempts table beside it), and the CLI names a custom ledger.
#[test]
fn one_lock_and_one_ledger_whatever_the_spelling() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_a", "CREATE TABLE a (x int);\n");
    let plain = set.migrator();
    let qualified = set
        .migrator()
        .migrations_table("public.__diesel_schema_migrations")
        .lock_wait_deadline(std::time::Duration::from_millis(600))
        .lock_poll_interval(std::time::Duration::from_millis(50));
    let mut holder = db.conn();
    let key = plain
        .lock_keys(&mut holder, diesel_rollout::Track::Required)
        .unwrap()[0];
    assert_eq!(
        qualified
            .lock_keys(&mut holder, diesel_rollout::Track::Required)
            .unwrap()[0],
        key
    );
    // While the lock of one spelling is held, the other spelling waits.
    holder
        .batch_execute(&format!("SELECT pg_advisory_lock({key})"))
        .unwrap();
    let err = qualified.run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LockTimeout, "{err}");
    holder
        .batch_execute(&format!("SELECT pg_advisory_unlock({key})"))
        .unwrap();
    qualified.run_required(&db.url).unwrap();
    // One attempts table, beside diesel's, and the other spelling agrees.
    assert_eq!(
        db.texts(
            "SELECT relname::text AS t FROM pg_class WHERE relname LIKE '\\_\\_diesel%' \
             AND relkind = 'r' ORDER BY 1"
        ),
        ["__diesel_rollout_attempts", "__diesel_schema_migrations"]
    );
    assert!(plain.verify(&mut db.conn()).unwrap().is_complete());

    // A service with its own ledger table, and the CLI told about it.
    let service = set
        .migrator()
        .migrations_table("svc_ledger")
        .attempts_table("svc_attempts");
    let other = TestDb::new();
    service.run_required(&other.url).unwrap();
    let verify = |args: &[&str], env: Option<(&str, &str)>| {
        let mut c = other.rollout();
        c.args(["verify", "--migrations-dir"])
            .arg(set.required_dir())
            .args(args);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        c.output().unwrap().status.code()
    };
    assert_eq!(verify(&[], None), Some(1), "diesel's table is empty there");
    assert_eq!(
        verify(
            &[
                "--migrations-table",
                "svc_ledger",
                "--attempts-table",
                "svc_attempts"
            ],
            None
        ),
        Some(0)
    );
    assert_eq!(
        verify(&[], Some(("ROLLOUT_MIGRATIONS_TABLE", "svc_ledger"))),
        Some(0)
    );
    let out = other
        .rollout()
        .args(["status", "--json", "--migrations-table", "svc_ledger"])
        .args(["--attempts-table", "svc_attempts", "--migrations-dir"])
        .arg(set.required_dir())
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["state"], "applied", "{rows}");
    assert_eq!(
        other.count("SELECT count(*) AS n FROM pg_class WHERE relname LIKE '\\_\\_diesel%'"),
        0,
        "the CLI created no ledger of its own"
    );
}

/// Sets what a service's connection customizer would: the settings every
/// pooled connection must keep.
#[derive(Debug)]
struct ServiceSettings;

impl diesel::r2d2::CustomizeConnection<diesel::PgConnection, diesel::r2d2::Error>
    for ServiceSettings
{
    fn on_acquire(&self, conn: &mut diesel::PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute("SET statement_timeout = '42s'; SET lock_timeout = '7s'")
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// Item 7: a replica that takes the lock once another one has done the work
/// hands its pooled connection back with the service's own settings.
#[test]
fn a_pooled_connection_goes_back_with_the_services_settings() {
    use diesel::prelude::*;
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_a", "CREATE TABLE a (x int);\n");
    set.migrator().run_required(&db.url).unwrap();
    set.required("2_b", "CREATE TABLE b (x int);\n");
    // Strict mode always takes the lock (it checks drift under it), so the
    // waiter cannot see the work done between two tries and leave without
    // it: the case under test is the one that takes the lock.
    let m = set
        .migrator()
        .strict(true)
        .lock_poll_interval(std::time::Duration::from_millis(20));
    let pool = diesel::r2d2::Pool::builder()
        .max_size(1)
        .connection_customizer(Box::new(ServiceSettings))
        .build(diesel::r2d2::ConnectionManager::<diesel::PgConnection>::new(&db.url))
        .unwrap();

    // "Another replica" applies 2 under the lock, in one transaction with
    // a transaction-level lock: the work and the release become visible at
    // the same instant, so the waiter takes the lock and finds nothing.
    let mut other = db.conn();
    let key = m
        .lock_keys(&mut other, diesel_rollout::Track::Required)
        .unwrap()[0];
    other
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({key}); CREATE TABLE b (x int); \
             INSERT INTO __diesel_schema_migrations (version) VALUES ('2')"
        ))
        .unwrap();
    let waiter = {
        let (m, pool) = (m.clone(), pool.clone());
        std::thread::spawn(move || {
            m.run(&pool)
                .map(|(report, deferred)| (report, deferred.stop()))
        })
    };
    wait_until("the waiter to poll the lock", || {
        db.count(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND query LIKE '%pg_try_advisory_lock%'",
        ) > 0
    });
    other.batch_execute("COMMIT").unwrap();
    let (report, _) = waiter.join().unwrap().unwrap();
    assert!(report.took_lock && report.applied.is_empty(), "{report:?}");

    #[derive(QueryableByName)]
    struct Settings {
        #[diesel(sql_type = diesel::sql_types::Text)]
        statement_timeout: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        lock_timeout: String,
    }
    let mut conn = pool.get().unwrap();
    let s: Settings = diesel::sql_query(
        "SELECT current_setting('statement_timeout') AS statement_timeout, \
         current_setting('lock_timeout') AS lock_timeout",
    )
    .get_result(&mut *conn)
    .unwrap();
    assert_eq!(
        (s.statement_timeout.as_str(), s.lock_timeout.as_str()),
        ("42s", "7s")
    );
}

/// Item 2: whoever holds the track's lock knows that every attempt still
/// `running` is dead, even when the backend pid it recorded is alive (a
/// pooler kept the backend, or PostgreSQL reused the pid): the next run
/// resumes after the last recorded statement instead of starting over.
#[test]
fn a_running_attempt_resumes_where_it_stopped_even_when_its_pid_is_alive() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required(
        "1_tables",
        "CREATE TABLE effects (v text);\nCREATE TABLE gate (open bool);\n",
    );
    set.required_no_tx(
        "2_steps",
        "INSERT INTO effects VALUES ('2a');\n\
         SELECT pg_sleep(CASE WHEN EXISTS (SELECT 1 FROM gate) THEN 0 ELSE 60 END);\n\
         INSERT INTO effects VALUES ('2c');\n",
    );
    let m = set.migrator();
    let url = db.url.clone();
    let run = {
        let m = m.clone();
        std::thread::spawn(move || m.run_required(&url))
    };
    wait_until("statement 2 to run", || {
        db.count(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
             AND state = 'active' AND query LIKE 'SELECT pg_sleep%'",
        ) > 0
    });
    // The process applying it is cut off mid-statement: nothing records
    // the outcome, so its attempt stays `running`.
    db.count(
        "SELECT count(*) AS n FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'SELECT pg_sleep%') t",
    );
    assert!(run.join().unwrap().is_err());
    // Its pid now belongs to a live session (reused, or kept by a pooler).
    let live = db.conn();
    let mut c = db.conn();
    c.batch_execute(
        "UPDATE __diesel_rollout_attempts SET backend_pid = \
         (SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
          AND pid <> pg_backend_pid() LIMIT 1) WHERE outcome = 'running'; \
         INSERT INTO gate VALUES (true)",
    )
    .unwrap();
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_rollout_attempts WHERE outcome = 'running' AND statements_completed = 1"),
        1
    );
    let report = m.run_required(&db.url).unwrap();
    assert_eq!(report.applied.len(), 1);
    assert_eq!(report.applied[0].statements, 2, "resumed at statement 2");
    assert_eq!(
        db.texts("SELECT v AS t FROM effects ORDER BY v"),
        ["2a", "2c"],
        "statement 1 ran exactly once"
    );
    assert_eq!(
        db.texts(
            "SELECT outcome AS t FROM __diesel_rollout_attempts WHERE version = '2' ORDER BY id"
        ),
        ["interrupted", "success"]
    );
    drop(live);
}

/// Item 2: a resume point is a statement index into the split of up.sql;
/// when the split differs from the one recorded (a splitter change in an
/// upgrade), resuming is refused instead of skipping or repeating work.
#[test]
fn a_resume_is_refused_when_the_statement_split_changed() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_tables", "CREATE TABLE effects (v text);\n");
    set.required_no_tx(
        "2_steps",
        "INSERT INTO effects VALUES ('2a');\nSELECT no_such_function();\n\
         INSERT INTO effects VALUES ('2c');\n",
    );
    let m = set.migrator();
    assert_eq!(
        m.run_required(&db.url).unwrap_err().kind(),
        ErrorKind::MigrationFailed
    );
    // As if an earlier release had split the same file into 4 statements.
    db.conn()
        .batch_execute(
            "UPDATE __diesel_rollout_attempts SET statements_total = 4 WHERE version = '2'",
        )
        .unwrap();
    let err = m.run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PartialMigrationChanged, "{err}");
    let text = err.to_string();
    assert!(text.contains("2_steps"), "{text}");
    assert!(text.contains("splits into 3 statements"), "{text}");
    assert_eq!(db.texts("SELECT v AS t FROM effects"), ["2a"]);
}

/// Item 2: an attempts table created by the first release (whose CHECK
/// rejects `retrying`) is upgraded in place under the lock.
#[test]
fn an_attempts_table_of_the_first_release_is_upgraded_in_place() {
    let db = TestDb::new();
    db.conn()
        .batch_execute(
            "CREATE TABLE __diesel_schema_migrations (version VARCHAR(50) PRIMARY KEY NOT NULL, \
             run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP);
             CREATE TABLE __diesel_rollout_attempts (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                version VARCHAR(50) NOT NULL, name TEXT NOT NULL,
                track TEXT NOT NULL CHECK (track IN ('required', 'deferred')),
                checksum TEXT NOT NULL,
                started_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
                finished_at TIMESTAMPTZ,
                outcome TEXT NOT NULL CHECK (outcome IN ('running', 'success', 'failed', 'interrupted')),
                error TEXT, statements_completed INTEGER NOT NULL DEFAULT 0,
                statements_total INTEGER NOT NULL, host TEXT, client_pid INTEGER,
                backend_pid INTEGER NOT NULL DEFAULT pg_backend_pid(),
                application_name TEXT NOT NULL DEFAULT current_setting('application_name'));
             CREATE INDEX ON __diesel_rollout_attempts (version, id);",
        )
        .unwrap();
    let set = TempSet::new();
    set.required(
        "1_things",
        "CREATE TABLE things (val int);\nINSERT INTO things VALUES (1), (1);\n",
    );
    set.deferred(
        "2_unique",
        "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS things_val ON things (val);\n",
    );
    let m = set
        .migrator()
        .deferred_failure_retries(1)
        .deferred_failure_backoff(std::time::Duration::from_millis(10))
        .deferred_retry(false);
    m.run_required(&db.url).unwrap();
    let end = m.run_deferred(pool(&db));
    let diesel_rollout::DeferredState::Failed { error, .. } = end else {
        panic!("{end:?}");
    };
    assert!(error.contains("could not create unique index"), "{error}");
    assert_eq!(
        db.texts(
            "SELECT outcome AS t FROM __diesel_rollout_attempts WHERE version = '2' ORDER BY id"
        ),
        ["retrying", "failed"]
    );
    assert_eq!(
        db.texts("SELECT obj_description('__diesel_rollout_attempts'::regclass, 'pg_class') AS t"),
        ["diesel-rollout attempts v3"]
    );
}

/// An attempts table an earlier release of this series created under the
/// comment "v2", before `operation`, `os_user` and `db_user` existed: status,
/// up and revert work on it, it is upgraded to layout 3, and its old rows do
/// not claim the upgrading role ran them.
#[test]
fn an_attempts_table_commented_v2_without_operation_is_upgraded() {
    let db = TestDb::new();
    db.conn()
        .batch_execute(
            "CREATE TABLE __diesel_schema_migrations (version VARCHAR(50) PRIMARY KEY NOT NULL, \
             run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP);
             CREATE TABLE __diesel_rollout_attempts (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, ledger TEXT,
                version VARCHAR(50) NOT NULL, name TEXT NOT NULL,
                track TEXT NOT NULL CHECK (track IN ('required', 'deferred')),
                checksum TEXT NOT NULL,
                started_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
                finished_at TIMESTAMPTZ,
                outcome TEXT NOT NULL CONSTRAINT diesel_rollout_outcome
                    CHECK (outcome IN ('running', 'success', 'failed', 'retrying', 'interrupted')),
                error TEXT, statements_completed INTEGER NOT NULL DEFAULT 0,
                statements_total INTEGER NOT NULL, host TEXT, client_pid INTEGER,
                backend_pid INTEGER NOT NULL DEFAULT pg_backend_pid(),
                application_name TEXT NOT NULL DEFAULT current_setting('application_name'));
             CREATE INDEX ON __diesel_rollout_attempts (version, id);
             COMMENT ON TABLE __diesel_rollout_attempts IS 'diesel-rollout attempts v2';
             CREATE TABLE things (val int);
             INSERT INTO __diesel_schema_migrations (version) VALUES ('1');",
        )
        .unwrap();
    let set = TempSet::new();
    set.required("1_things", "CREATE TABLE things (val int);\n");
    let more = set.required("2_more", "CREATE TABLE more (val int);\n");
    std::fs::write(more.join("down.sql"), "DROP TABLE more;\n").unwrap();
    let checksum = set
        .migrator()
        .migrations()
        .get("1")
        .unwrap()
        .checksum()
        .to_string();
    db.conn()
        .batch_execute(&format!(
            "INSERT INTO __diesel_rollout_attempts (ledger, version, name, track, checksum, \
             finished_at, outcome, statements_completed, statements_total) \
             VALUES ('public.__diesel_schema_migrations', '1', 'things', 'required', \
             '{checksum}', now(), 'success', 1, 1)"
        ))
        .unwrap();
    let m = set.migrator();
    let status = m.status(&mut db.conn()).unwrap();
    assert_eq!(
        status[0].state,
        diesel_rollout::State::Applied,
        "{status:?}"
    );
    assert_eq!(
        status[1].state,
        diesel_rollout::State::Pending,
        "{status:?}"
    );
    assert_eq!(m.run_required(&db.url).unwrap().applied.len(), 1);
    let report = m
        .revert(&mut db.conn(), diesel_rollout::RevertTarget::Count(1))
        .unwrap();
    assert_eq!(report.reverted.len(), 1);
    assert_eq!(
        db.texts("SELECT obj_description('__diesel_rollout_attempts'::regclass, 'pg_class') AS t"),
        ["diesel-rollout attempts v3"]
    );
    let user = db.texts("SELECT current_user::text AS t").remove(0);
    assert_eq!(
        db.texts(
            "SELECT concat_ws(' ', version, operation, outcome, coalesce(db_user, '-')) AS t \
             FROM __diesel_rollout_attempts ORDER BY id"
        ),
        [
            "1 up success -".to_string(),
            format!("2 up success {user}"),
            format!("2 down success {user}"),
        ]
    );
}

/// The three-migration case of item 3: required R waits for deferred D
/// (`requires_deferred`), an unrelated required R2 comes after R, and a
/// deferred D2 builds on R2's table. The required track stops at R; the
/// deferred track must not wait for R or R2 (that was a deadlock), applies
/// D but not D2; then R, R2, and D2 follow.
fn dependency_set() -> TempSet {
    let set = TempSet::new();
    set.required(
        "0001_things",
        "CREATE TABLE things (id bigint PRIMARY KEY, val int);\n\
         INSERT INTO things SELECT g, g FROM generate_series(1, 100) g;\n",
    );
    set.deferred(
        "0002_things_val",
        "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS things_val_key ON things (val);\n",
    );
    set.required_with(
        "0003_unique_val",
        "ALTER TABLE things ADD CONSTRAINT things_val_key UNIQUE USING INDEX things_val_key;\n",
        "run_in_transaction = true\nrequires_deferred = [\"0002\"]\n",
    );
    set.required(
        "0004_other",
        "CREATE TABLE other (id bigint PRIMARY KEY, at int);\n",
    );
    set.deferred(
        "0005_other_at",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS other_at_idx ON other (at);\n",
    );
    set
}

#[test]
fn a_required_migration_waiting_for_a_deferred_one_does_not_deadlock_the_deploy() {
    let db = TestDb::new();
    let set = dependency_set();
    let m = once(set.migrator());
    let err = m.run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeferredDependency);
    assert!(err.to_string().contains("rollout up"), "{err}");
    let applied: Vec<_> = err
        .report()
        .unwrap()
        .applied
        .iter()
        .map(|a| a.version.as_str())
        .collect();
    assert_eq!(applied, ["0001"]);

    // The deferred track applies D, and only D: D2 waits for R2.
    let end = m.run_deferred(pool(&db));
    assert_eq!(
        end,
        diesel_rollout::DeferredState::Done {
            applied: vec!["0002".into()]
        }
    );
    // Now the required track goes on, then the deferred track finishes.
    let applied: Vec<_> = m
        .run_required(&db.url)
        .unwrap()
        .applied
        .into_iter()
        .map(|a| a.version)
        .collect();
    assert_eq!(applied, ["0003", "0004"]);
    assert_eq!(
        m.run_deferred(pool(&db)),
        diesel_rollout::DeferredState::Done {
            applied: vec!["0005".into()]
        }
    );
}

#[test]
fn rollout_up_applies_a_release_with_a_required_migration_waiting_for_a_deferred_one() {
    let set = dependency_set();
    // `rollout up`, as a new user runs it: everything, in order.
    let db = TestDb::new();
    let out = db
        .rollout()
        .args(["up", "--migrations-dir"])
        .arg(set.required_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let order: Vec<_> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("000")))
        .map(|w| {
            w.trim_end_matches(',')
                .split('_')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(order, ["0001", "0002", "0003", "0004", "0005"], "{stdout}");
    assert!(set.migrator().verify(&mut db.conn()).unwrap().is_complete());
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_constraint WHERE conname = 'things_val_key'"),
        1
    );

    // `rollout deferred` with R and R2 pending applies D instead of
    // sending the user to `up --required-only`, which would fail on R.
    let db = TestDb::new();
    let m = set.migrator();
    assert!(m.run_required(&db.url).is_err());
    let out = db
        .rollout()
        .args(["deferred", "--migrations-dir"])
        .arg(set.required_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("applied 0002_things_val"));
    // And `rollout check` applies the whole set from scratch.
    let out = support::rollout()
        .args(["-q", "check", "--migrations-dir"])
        .arg(set.required_dir())
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pieces of a password a leak could show: runs of letters and digits.
fn pieces(password: &str) -> Vec<&str> {
    password
        .split(|c: char| !c.is_alphanumeric())
        .filter(|p| p.len() >= 2)
        .collect()
}

/// Fails when `out` shows `password`, or a piece of it as a word of its own
/// (a host, a port), or a piece of four characters or more anywhere, or
/// five characters of it in a row.
fn assert_no_secret(what: &str, password: &str, out: &str) {
    assert!(
        !out.contains(password),
        "{what}: the password leaked:\n{out}"
    );
    let chars: Vec<char> = password.chars().collect();
    for start in 0..chars.len() {
        for end in start + 5..=chars.len() {
            let part: String = chars[start..end].iter().collect();
            assert!(
                !out.contains(&part),
                "{what}: `{part}`, part of the password `{password}`, leaked:\n{out}"
            );
        }
    }
    let words: Vec<&str> = out.split(|c: char| !c.is_alphanumeric()).collect();
    for p in pieces(password) {
        assert!(
            !words.contains(&p) && (p.len() < 4 || !out.contains(p)),
            "{what}: `{p}`, a piece of the password `{password}`, leaked:\n{out}"
        );
    }
}

/// Item 6: passwords with `@ / : ? % # &` and spaces, written raw into a
/// URL (where libpq reads them differently and quotes pieces back), in a
/// query string and in a key=value string: no error path shows any of them.
#[test]
fn no_piece_of_a_password_is_printed_on_any_error_path() {
    use diesel::r2d2::{ConnectionManager, Pool};
    let db = TestDb::new();
    let (host, port) = {
        let after = db.url.split('@').nth(1).unwrap();
        let hostport = after.split('/').next().unwrap();
        let (h, p) = hostport.rsplit_once(':').unwrap();
        (h.to_string(), p.to_string())
    };
    let set = TempSet::new();
    set.required("1_a", "CREATE TABLE a (id bigint PRIMARY KEY);\n");
    set.deferred(
        "2_b",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS a_id ON a (id);\n",
    );
    let passwords = [
        "Xy7@Zq9",
        "ab/cd",
        "Lo@ng/Pa:ss?wo#rd&xq yz",
        "sp ace%zzQ",
        "Pw9:Rt4?Mk2",
        "Hq8#Jw3&Vn5",
        "x/y?a#b#c#d",
        "Xy7@Z",
    ];
    let checked = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for pw in passwords {
            let (db, set, host, port, checked) = (&db, &set, &host, &port, &checked);
            scope.spawn(move || {
                let urls = [
                    format!("postgres://postgres:{pw}@{host}:{port}/{}", db.name),
                    format!("postgres://postgres:{pw}@db.invalid/app"),
                    format!(
                        "postgres://postgres@{host}:{port}/{}?password={pw}",
                        db.name
                    ),
                    format!(
                        "host={host} port={port} user=postgres dbname={} password={pw}",
                        db.name
                    ),
                ];
                for url in &urls {
                    let mut outputs = Vec::new();
                    if let Err(e) = diesel_rollout::connect(url) {
                        outputs.push(("connect", e.to_string()));
                    }
                    if let Err(e) = set.migrator().run_required(url) {
                        outputs.push(("run_required", e.to_string()));
                    }
                    let pool = Pool::builder()
                        .max_size(2)
                        .connection_timeout(std::time::Duration::from_millis(300))
                        .build_unchecked(ConnectionManager::new(url.as_str()));
                    for m in [set.migrator(), set.migrator().pool_url(url.as_str())] {
                        let m = once(m);
                        if let Err(e) = m.run(&pool) {
                            outputs.push(("run(&pool)", e.to_string()));
                        }
                        if let diesel_rollout::DeferredState::Reconnecting { error } =
                            m.run_deferred(pool.clone())
                        {
                            outputs.push(("deferred state", error));
                        }
                    }
                    for args in [&["up"][..], &["status"], &["verify"], &["deferred"]] {
                        let out = support::rollout()
                            .env("DATABASE_URL", url)
                            .args(args)
                            .arg("--migrations-dir")
                            .arg(set.required_dir())
                            .output()
                            .unwrap();
                        outputs.push((
                            args[0],
                            format!(
                                "{}{}",
                                String::from_utf8_lossy(&out.stdout),
                                String::from_utf8_lossy(&out.stderr)
                            ),
                        ));
                    }
                    for (what, out) in &outputs {
                        assert_no_secret(&format!("{what} with {url:?}"), pw, out);
                        checked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let checked = checked.into_inner();
    assert!(checked > 100, "{checked} outputs checked");
}

/// Ledgers that share one attempts table (`attempts_table` set alike) never
/// read each other's attempts: a migration of one ledger does not resume
/// where the same version of another one stopped. An attempts table in a
/// schema of its own keeps the fast path; a missing one is named.
#[test]
fn ledgers_sharing_an_attempts_table_keep_their_attempts_apart() {
    let db = TestDb::new();
    db.conn()
        .batch_execute(
            "CREATE SCHEMA a; CREATE SCHEMA b; CREATE SCHEMA audit; CREATE TABLE log (v text)",
        )
        .unwrap();
    let set = TempSet::new();
    set.required("1_start", "SELECT 1;\n");
    // The same file in both sets: statement 2 fails only for ledger b.
    set.required_no_tx(
        "2_steps",
        "INSERT INTO log VALUES ('s1');\n\
         SELECT 1 / (CASE WHEN current_setting('application_name') = 'b' THEN 0 ELSE 1 END);\n\
         INSERT INTO log VALUES ('s3');\n",
    );
    let ledger = |schema: &str| {
        set.migrator()
            .migrations_table(format!("{schema}.ledger"))
            .attempts_table("audit.attempts")
            .application_name(schema)
    };
    let err = ledger("b").run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MigrationFailed, "{err}");
    assert_eq!(db.texts("SELECT v AS t FROM log"), ["s1"]);
    let report = ledger("a").run_required(&db.url).unwrap();
    assert_eq!(report.applied[1].statements, 3, "ledger a ran all of 2");
    assert_eq!(
        db.texts("SELECT v AS t FROM log ORDER BY v"),
        ["s1", "s1", "s3"]
    );
    // Nothing pending for a: one query, no lock.
    assert!(!ledger("a").run_required(&db.url).unwrap().took_lock);
    // b still resumes its own attempt at statement 2 (and fails there again).
    let err = ledger("b").run_required(&db.url).unwrap_err();
    assert!(err.to_string().contains("statement 2 of 3"), "{err}");
    assert_eq!(db.count("SELECT count(*) AS n FROM log WHERE v = 's1'"), 2);

    let err = set
        .migrator()
        .attempts_table("nowhere.attempts")
        .run_required(&db.url)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.to_string()
            .contains("schema `nowhere` of the attempts table `attempts` does not exist"),
        "{err}"
    );
}

/// `rollout up` blocked on a deferred migration goes on when another
/// process applies that deferred migration while it waits.
#[test]
fn rollout_up_goes_on_when_another_leader_applies_what_it_waits_for() {
    let db = TestDb::new();
    let set = dependency_set();
    let m = set.migrator();
    let mut holder = db.conn();
    let key = m
        .lock_keys(&mut holder, diesel_rollout::Track::Deferred)
        .unwrap()[0];
    holder
        .batch_execute(&format!("SELECT pg_advisory_lock({key})"))
        .unwrap();
    let child = db
        .rollout()
        .args(["up", "--migrations-dir"])
        .arg(set.required_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // `up` applied 0001, stopped at 0003 and now waits for the deferred lock.
    wait_until("0001 to be applied", || {
        db.count("SELECT count(*) AS n FROM pg_class WHERE relname = '__diesel_rollout_attempts'")
            == 1
            && db.count("SELECT count(*) AS n FROM __diesel_schema_migrations") == 1
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    // The other leader applies 0002 and lets go.
    holder
        .batch_execute(
            "CREATE UNIQUE INDEX things_val_key ON things (val); \
             INSERT INTO __diesel_schema_migrations (version) VALUES ('0002')",
        )
        .unwrap();
    holder
        .batch_execute(&format!("SELECT pg_advisory_unlock({key})"))
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(set.migrator().verify(&mut db.conn()).unwrap().is_complete());
}

/// The splitter against PostgreSQL itself: random scripts built from
/// statements each inserting one row (strings with `;`, escape strings and
/// their continuation, dollar quotes, comments ended by `\n` or `\r`,
/// quoted identifiers, `DO` blocks), run whole by the server, then split and
/// run one statement at a time: the same rows, as many statements as the
/// server executed.
#[test]
fn the_splitter_counts_the_statements_postgresql_runs() {
    let db = TestDb::new();
    let mut c = db.conn();
    c.batch_execute("CREATE TABLE log (v text)").unwrap();
    let pieces = [
        "INSERT INTO log VALUES ('a;b')",
        "INSERT INTO log VALUES (E'it\\'s;')",
        "INSERT INTO log VALUES ($$x;y$$)",
        "INSERT INTO log VALUES ($tag$ $$ ; $tag$)",
        "INSERT INTO log VALUES ('multi'\n 'line;')",
        "INSERT INTO log VALUES (E'a' -- c;\n '\\'; b')",
        "INSERT INTO log /* ; /* nested; */ */ VALUES ('c')",
        "INSERT INTO log SELECT ';' FROM (SELECT 1) AS \"x;y\"",
        "INSERT INTO log VALUES (U&'\\0041;')",
        "DO $$ BEGIN INSERT INTO log VALUES ('do;'); END $$",
        "INSERT INTO log VALUES ('e' || ';' || (SELECT 'f;'))",
        "-- note;\rINSERT INTO log VALUES ('after a carriage return')",
    ];
    let separators = [";\n", ";", ";\r\n", "; -- c;\n", ";/* x; */\n", ";;\n"];
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    for round in 0..150 {
        let count = 1 + next(6);
        let mut script = String::new();
        for _ in 0..count {
            script.push_str(pieces[next(pieces.len())]);
            script.push_str(separators[next(separators.len())]);
        }
        c.batch_execute("TRUNCATE log").unwrap();
        c.batch_execute(&script)
            .unwrap_or_else(|e| panic!("round {round}: the server refused {script:?}: {e}"));
        let whole = db.texts("SELECT v AS t FROM log ORDER BY v");
        assert_eq!(whole.len(), count, "round {round}: {script:?}");
        let statements = diesel_rollout::split_statements(&script).unwrap();
        assert_eq!(
            statements.len(),
            count,
            "round {round}: {script:?} -> {statements:#?}"
        );
        c.batch_execute("TRUNCATE log").unwrap();
        for s in &statements {
            c.batch_execute(&s.sql)
                .unwrap_or_else(|e| panic!("round {round}: {:?}: {e}", s.sql));
        }
        assert_eq!(
            db.texts("SELECT v AS t FROM log ORDER BY v"),
            whole,
            "round {round}: {script:?}"
        );
    }
}

/// `rollout up --required-only` on `set`, run to the end.
fn required_up(db: &TestDb, set: &TempSet) -> std::process::Output {
    db.rollout()
        .arg("--migrations-dir")
        .arg(set.required_dir())
        .args(["up", "--required-only"])
        .output()
        .unwrap()
}

/// `rollout up --required-only` on `set`, which must succeed: its stderr.
fn required_up_ok(db: &TestDb, set: &TempSet) -> String {
    let out = required_up(db, set);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

/// `rollout -q up --required-only` on `set`, in the background, quiet.
fn spawn_required_up(db: &TestDb, set: &TempSet) -> std::process::Child {
    db.rollout()
        .arg("--migrations-dir")
        .arg(set.required_dir())
        .args(["-q", "up", "--required-only"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// A no-transaction statement and its recorded progress commit together:
/// a client killed while the statement runs (the server finishes it) no
/// longer leaves it done but unrecorded, to be run a second time by the
/// next attempt. An index build, which cannot share a transaction, that
/// finished after its client died counts as done on the next attempt.
#[test]
fn a_client_killed_during_a_no_transaction_statement_runs_it_once() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required(
        "1_effects",
        "CREATE TABLE effects (v text);\nCREATE TABLE t (x int);\n",
    );
    set.required_no_tx(
        "2_backfill",
        "INSERT INTO effects SELECT 'backfill' FROM pg_sleep(1.5);\n\
         CREATE INDEX CONCURRENTLY t_x ON t (x);\n\
         INSERT INTO effects SELECT 'after' FROM pg_sleep(1.5);\n",
    );
    let up = || spawn_required_up(&db, &set);
    let running = |what: &str| {
        db.count(&format!(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
             AND datname = current_database() AND state = 'active' \
             AND query LIKE 'INSERT INTO effects SELECT ''{what}''%'"
        )) > 0
    };
    let kill_when = |what: &str, ready: &dyn Fn() -> bool| {
        let mut child = up();
        wait_until(what, ready);
        child.kill().unwrap();
        child.wait().unwrap();
    };
    let gone = || {
        wait_until("the killed client's backend to finish", || {
            db.advisory_locks() == 0
        })
    };
    // Killed during the first statement.
    kill_when("the backfill to run", &|| running("backfill"));
    gone();
    // Killed while the index build waits for an old snapshot, which is
    // then released: the server finishes the build with nobody to tell.
    let mut blocker = db.conn();
    blocker
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM effects")
        .unwrap();
    kill_when("the index build to wait", &|| {
        db.count(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND datname = current_database() AND query LIKE 'CREATE INDEX CONCURRENTLY t_x%'",
        ) > 0
    });
    blocker.batch_execute("COMMIT").unwrap();
    gone();
    // Killed during the third statement.
    kill_when("the last statement to run", &|| running("after"));
    gone();
    let out = db
        .rollout()
        .arg("--migrations-dir")
        .arg(set.required_dir())
        .args(["up", "--required-only"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        db.texts("SELECT v || ':' || count(*) AS t FROM effects GROUP BY v ORDER BY v"),
        ["after:1", "backfill:1"]
    );
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_index WHERE indexrelid = 't_x'::regclass AND indisvalid"
        ),
        1
    );
}

/// The index build an attempt died in is counted as done only when the
/// index there is the one the statement defines: another index under the
/// same name fails the statement, as PostgreSQL says, rather than being
/// taken for it.
#[test]
fn an_index_of_another_definition_is_not_taken_for_the_interrupted_build() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_t", "CREATE TABLE t (x int, y int);\n");
    set.required_no_tx("2_index", "CREATE INDEX CONCURRENTLY t_x ON t (x);\n");
    let mut blocker = db.conn();
    blocker
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_class")
        .unwrap();
    let mut child = spawn_required_up(&db, &set);
    let building = "FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                    AND datname = current_database() \
                    AND query LIKE 'CREATE INDEX CONCURRENTLY t_x%'";
    wait_until("the index build to wait", || {
        db.count(&format!("SELECT count(*) AS n {building}")) > 0
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // The build is cancelled, and someone makes another index of that name.
    db.count(&format!(
        "SELECT count(*) AS n FROM (SELECT pg_terminate_backend(pid) {building}) k"
    ));
    blocker.batch_execute("COMMIT").unwrap();
    wait_until("the build's backend to go", || db.advisory_locks() == 0);
    db.conn()
        .batch_execute("DROP INDEX IF EXISTS t_x; CREATE INDEX t_x ON t (y)")
        .unwrap();
    let out = db
        .rollout()
        .arg("--migrations-dir")
        .arg(set.required_dir())
        .args(["up", "--required-only"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("already exists") && err.contains("2_index"),
        "{err}"
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_schema_migrations WHERE version = '2'"),
        0
    );
}

/// A no-transaction migration that opens a transaction of its own and
/// fails inside it: the failure is recorded (the attempt is not left
/// `running`), the message counts only what was committed, and the retry
/// resumes there, running each statement once.
#[test]
fn a_failure_inside_a_transaction_the_migration_opened_resumes_where_it_committed() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_log", "CREATE TABLE log (v text);\n");
    set.required_no_tx(
        "2_grouped",
        "INSERT INTO log VALUES ('one');\nBEGIN;\nINSERT INTO log VALUES ('two');\n\
         INSERT INTO later VALUES (1);\nCOMMIT;\nINSERT INTO log VALUES ('three');\n",
    );
    let up = || required_up(&db, &set);
    let out = up();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("up.sql:4")
            && err.contains("Statements 1 to 1 completed")
            && err.contains("resumes at statement 2"),
        "{err}"
    );
    assert_eq!(db.texts("SELECT v AS t FROM log"), ["one"]);
    assert_eq!(
        db.texts(
            "SELECT outcome AS t FROM __diesel_rollout_attempts WHERE version = '2' ORDER BY id"
        ),
        ["failed"]
    );
    assert_eq!(db.advisory_locks(), 0);
    db.conn()
        .batch_execute("CREATE TABLE later (x int)")
        .unwrap();
    let out = up();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        db.texts("SELECT v AS t FROM log ORDER BY v"),
        ["one", "three", "two"]
    );
}

/// A `DROP INDEX CONCURRENTLY` cannot share a transaction with its
/// progress: one the server finished after its client was killed is done,
/// and the next run, `up` or `revert`, goes on after it instead of failing
/// with "does not exist".
#[test]
fn an_index_drop_finished_after_its_client_died_counts_as_done() {
    let db = TestDb::new();
    let set = TempSet::new();
    // The table and its index predate the migrations.
    db.conn()
        .batch_execute("CREATE TABLE t (x int); CREATE INDEX t_x ON t (x)")
        .unwrap();
    set.required("1_effects", "CREATE TABLE effects (v text);\n");
    set.required_no_tx(
        "2_drop",
        "DROP INDEX CONCURRENTLY t_x;\nINSERT INTO effects VALUES ('dropped');\n",
    );
    let index = set.required_no_tx("3_index", "CREATE INDEX CONCURRENTLY t_y ON t (x);\n");
    std::fs::write(index.join("down.sql"), "DROP INDEX CONCURRENTLY t_y;\n").unwrap();
    let rollout = |args: &[&str]| {
        let mut c = db.rollout();
        c.arg("--migrations-dir").arg(set.required_dir()).args(args);
        c
    };
    // The drop waits for a transaction that read the table; the client is
    // killed meanwhile, then the transaction ends and the server finishes
    // the drop with nobody to tell.
    let kill_during = |index: &str, args: &[&str]| {
        let mut blocker = db.conn();
        blocker
            .batch_execute("BEGIN; SELECT count(*) FROM t")
            .unwrap();
        let mut child = rollout(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_until("the drop to wait", || {
            db.count(&format!(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND datname = current_database() \
                 AND query LIKE 'DROP INDEX CONCURRENTLY {index}%'"
            )) > 0
        });
        child.kill().unwrap();
        child.wait().unwrap();
        blocker.batch_execute("COMMIT").unwrap();
        wait_until("the killed client's backend to finish", || {
            db.advisory_locks() == 0
        });
        assert_eq!(
            db.count(&format!(
                "SELECT count(*) AS n FROM pg_class WHERE relname = '{index}'"
            )),
            0,
            "the server finished the drop"
        );
    };
    let ok = |out: std::process::Output| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    kill_during("t_x", &["-q", "up", "--required-only"]);
    let err = ok(rollout(&["up", "--required-only"]).output().unwrap());
    assert!(
        err.contains("drops an index that no longer exists"),
        "{err}"
    );
    assert_eq!(db.texts("SELECT v AS t FROM effects"), ["dropped"]);
    assert_eq!(
        db.texts("SELECT version AS t FROM __diesel_schema_migrations ORDER BY version"),
        ["1", "2", "3"]
    );
    // The same in a revert: its down.sql drops the index.
    kill_during("t_y", &["-q", "revert", "--count", "1"]);
    ok(rollout(&["revert", "--count", "1"]).output().unwrap());
    assert_eq!(
        db.texts("SELECT version AS t FROM __diesel_schema_migrations ORDER BY version"),
        ["1", "2"]
    );
    assert_eq!(db.advisory_locks(), 0);
}

/// An index built without a name (PostgreSQL picks `t_x_idx`) is checked
/// by its definition: an invalid one a failed build left is dropped and
/// built again, not left behind with `t_x_idx1` built beside it. An
/// invalid index of the same definition under a name a migration chose is
/// not taken for that leftover: the migration that repairs it drops it.
#[test]
fn an_unnamed_index_build_left_invalid_is_repaired_by_its_definition() {
    let db = TestDb::new();
    let set = TempSet::new();
    db.conn()
        .batch_execute(
            "CREATE TABLE t (x int, y int); INSERT INTO t VALUES (1, 1), (1, 2); \
             CREATE TABLE effects (v text)",
        )
        .unwrap();
    set.required_no_tx(
        "1_unique",
        "CREATE UNIQUE INDEX CONCURRENTLY ON t (x);\nINSERT INTO effects VALUES ('unique');\n",
    );
    let up = || required_up(&db, &set);
    let indexes = || {
        db.texts(
            "SELECT c.relname || ':' || i.indisvalid AS t FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 't'::regclass \
             ORDER BY 1",
        )
    };
    // The duplicate fails the build, which leaves an invalid index.
    let out = up();
    assert!(!out.status.success());
    assert_eq!(indexes(), ["t_x_idx:false"]);
    // The data fixed, the next run replaces the leftover.
    db.conn()
        .batch_execute("DELETE FROM t WHERE y = 2")
        .unwrap();
    let err = required_up_ok(&db, &set);
    assert!(err.contains("dropping invalid index t_x_idx"), "{err}");
    assert_eq!(indexes(), ["t_x_idx:true"]);
    assert_eq!(db.texts("SELECT v AS t FROM effects"), ["unique"]);

    // A named build that failed long ago, repaired by building it again
    // unnamed and dropping the broken one.
    let mut conn = db.conn();
    conn.batch_execute("INSERT INTO t VALUES (2, 1)").unwrap();
    assert!(conn
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY t_y_broken ON t (y)")
        .is_err());
    conn.batch_execute("DELETE FROM t WHERE x = 2").unwrap();
    set.required_no_tx(
        "2_repair",
        "CREATE UNIQUE INDEX CONCURRENTLY ON t (y);\nDROP INDEX CONCURRENTLY t_y_broken;\n",
    );
    required_up_ok(&db, &set);
    assert_eq!(indexes(), ["t_x_idx:true", "t_y_idx:true"]);
}

/// `DETACH PARTITION ... CONCURRENTLY` runs in two transactions and cannot
/// share one with its progress. One whose backend was terminated between
/// them leaves the partition pending detach, which the next run completes
/// with `FINALIZE` (running the statement again fails "already pending
/// detach"); one the server finished after its client was killed counts as
/// done (running it again fails "is not a partition").
#[test]
fn a_partition_detach_interrupted_halfway_is_completed_once() {
    let db = TestDb::new();
    let set = TempSet::new();
    db.conn()
        .batch_execute(
            "CREATE TABLE effects (v text); \
             CREATE TABLE p (x int) PARTITION BY RANGE (x); \
             CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10); \
             CREATE TABLE p2 PARTITION OF p FOR VALUES FROM (10) TO (20)",
        )
        .unwrap();
    set.required_no_tx(
        "1_detach",
        "ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY;\nINSERT INTO effects VALUES ('p1');\n",
    );
    let partitions = || {
        db.texts(
            "SELECT inhrelid::regclass::text || ':' || inhdetachpending AS t FROM pg_inherits \
             WHERE inhparent = 'p'::regclass ORDER BY 1",
        )
    };
    // The detach's second transaction waits for one that read the table.
    let detach_waiting = |child: &str| {
        let q = format!(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND datname = current_database() \
             AND query LIKE 'ALTER TABLE p DETACH PARTITION {child}%'"
        );
        wait_until("the detach to wait", || db.count(&q) > 0);
    };
    let mut blocker = db.conn();
    blocker
        .batch_execute("BEGIN; SELECT count(*) FROM p")
        .unwrap();
    let mut child = spawn_required_up(&db, &set);
    detach_waiting("p1");
    db.conn()
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'ALTER TABLE p DETACH%'",
        )
        .unwrap();
    child.wait().unwrap();
    blocker.batch_execute("COMMIT").unwrap();
    wait_until("the terminated backend to go", || db.advisory_locks() == 0);
    assert_eq!(partitions(), ["p1:true", "p2:false"]);
    let err = required_up_ok(&db, &set);
    assert!(err.contains("DETACH PARTITION p1 FINALIZE"), "{err}");
    assert_eq!(partitions(), ["p2:false"]);
    assert_eq!(db.texts("SELECT v AS t FROM effects"), ["p1"]);

    // Killed while the second transaction waits, which then goes on.
    set.required_no_tx(
        "2_detach",
        "ALTER TABLE p DETACH PARTITION p2 CONCURRENTLY;\nINSERT INTO effects VALUES ('p2');\n",
    );
    blocker
        .batch_execute("BEGIN; SELECT count(*) FROM p")
        .unwrap();
    let mut child = spawn_required_up(&db, &set);
    detach_waiting("p2");
    child.kill().unwrap();
    child.wait().unwrap();
    blocker.batch_execute("COMMIT").unwrap();
    wait_until("the killed client's backend to finish", || {
        db.advisory_locks() == 0
    });
    assert_eq!(partitions(), Vec::<String>::new(), "the server finished it");
    let err = required_up_ok(&db, &set);
    assert!(
        err.contains("detaches a partition that is detached"),
        "{err}"
    );
    assert_eq!(
        db.texts("SELECT v AS t FROM effects ORDER BY v"),
        ["p1", "p2"]
    );
    assert_eq!(
        db.texts("SELECT version AS t FROM __diesel_schema_migrations ORDER BY version"),
        ["1", "2"]
    );
}

/// `CREATE INDEX CONCURRENTLY IF NOT EXISTS` builds nothing when the name is
/// taken by another table's index (PostgreSQL only notices it). Before, a
/// table with no index at all was taken for "not visible" and the migration
/// was recorded as applied without its index.
#[test]
fn an_index_name_taken_by_another_table_is_not_recorded_as_built() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required(
        "1_tables",
        "CREATE TABLE events (created_at timestamptz);\nCREATE TABLE other (x int);\n\
         CREATE INDEX idx_created ON other (x);\n",
    );
    set.required_no_tx(
        "2_index",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_created ON events (created_at);\n",
    );
    let out = required_up(&db, &set);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("2_index") && err.contains("idx_created") && err.contains("other"),
        "{err}"
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_schema_migrations WHERE version = '2'"),
        0
    );
    // Renamed, it builds and is recorded.
    set.required_no_tx(
        "2_index",
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS events_created_idx ON events (created_at);\n",
    );
    required_up_ok(&db, &set);
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM pg_indexes WHERE tablename = 'events' \
             AND indexname = 'events_created_idx'"
        ),
        1
    );
}

/// A grandfathered transactional migration with a `COMMIT` of its own (an
/// old diesel workaround; the build refuses it in a new migration). Sent
/// whole, the part before the `COMMIT` stayed committed with no ledger row,
/// and the failure's statement-by-statement replay committed the rest
/// again: each run added rows. It now runs statement by statement with its
/// progress recorded, so every statement runs once.
#[test]
fn a_history_migration_with_its_own_commit_runs_each_statement_once() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_a", "CREATE TABLE a (v int);\n");
    set.required(
        "2_old_fix",
        "INSERT INTO a VALUES (1);\nCOMMIT;\nINSERT INTO a VALUES (2);\nINSERT INTO b VALUES (3);\n\
         BEGIN;\n",
    );
    std::fs::write(
        set.required_dir()
            .parent()
            .unwrap()
            .join("diesel-guard.toml"),
        "start_after = \"2\"\n",
    )
    .unwrap();
    #[derive(diesel::QueryableByName)]
    struct Rows {
        #[diesel(sql_type = diesel::sql_types::Text)]
        t: String,
    }
    let rows = || {
        use diesel::RunQueryDsl;
        let mut c = db.conn();
        diesel::sql_query("SELECT coalesce(string_agg(v::text, ',' ORDER BY v), '') AS t FROM a")
            .get_result::<Rows>(&mut c)
            .unwrap()
            .t
    };
    for _ in 0..2 {
        let out = required_up(&db, &set);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("2_old_fix")
                && err.contains("up.sql:4")
                && err.contains("\"b\" does not exist"),
            "{err}"
        );
        assert_eq!(rows(), "1,2", "{err}");
    }
    // The cause fixed, the next run resumes at the statement that failed.
    db.conn().batch_execute("CREATE TABLE b (v int)").unwrap();
    required_up_ok(&db, &set);
    assert_eq!(rows(), "1,2");
    assert_eq!(db.count("SELECT count(*) AS n FROM b"), 1);
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_schema_migrations WHERE version = '2'"),
        1
    );
}

/// A migration that must run outside a transaction, given a connection
/// inside the caller's transaction, is refused before it runs: its own
/// `COMMIT` would have committed the caller's transaction (and a failure's
/// `ROLLBACK` undone the migrations applied before it in that run).
#[test]
fn a_no_transaction_migration_is_refused_inside_the_callers_transaction() {
    use diesel::Connection;
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_t", "CREATE TABLE t (x int);\n");
    set.migrator().run_required_on(&mut db.conn()).unwrap();
    set.required("2_u", "CREATE TABLE u (x int);\n");
    set.required_no_tx(
        "3_fill",
        "INSERT INTO t VALUES (1);\nINSERT INTO t VALUES (2);\n",
    );
    let mut conn = db.conn();
    conn.begin_test_transaction().unwrap();
    let err = set.migrator().run_required_on(&mut conn).unwrap_err();
    assert_eq!(err.kind(), diesel_rollout::ErrorKind::Config, "{err}");
    assert!(
        err.to_string().contains("3_fill") && err.to_string().contains("no transaction open"),
        "{err}"
    );
    // The caller's transaction is still open and usable: the migration
    // before it is in it, and nothing of this one ran.
    assert_eq!(
        support::count_on(&mut conn, "SELECT count(*) AS n FROM u"),
        0
    );
    assert_eq!(
        support::count_on(&mut conn, "SELECT count(*) AS n FROM t"),
        0
    );
    drop(conn);
    // Rolled back with it: nothing of the run is left behind.
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_tables WHERE tablename = 'u'"),
        0
    );
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM __diesel_schema_migrations WHERE version IN ('2', '3')"
        ),
        0
    );
}

/// A replica that waited for the required lock while another applied the
/// required track on a fresh database (no ledger yet, so its first look
/// found nothing) still sees the pending deferred migrations and runs them,
/// instead of reporting "deferred: nothing to apply".
#[test]
fn a_replica_that_waited_on_a_fresh_database_still_runs_the_deferred_track() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_t", "CREATE TABLE t (x int);\n");
    set.deferred("2_t_x", "CREATE INDEX CONCURRENTLY t_x ON t (x);\n");
    let cli = |args: &[&str]| {
        let mut c = db.rollout();
        c.arg("--migrations-dir")
            .arg(set.required_dir())
            .arg("--deferred-dir")
            .arg(set.deferred_dir())
            .args(args);
        c
    };
    // Another replica holds the required lock: this one finds no ledger
    // (a fresh database) and waits. The other applies the required track
    // and keeps the lock a moment longer (the window between its last
    // commit and its unlock), so this one's next look finds nothing
    // pending while the lock is still taken.
    let key = diesel_rollout::lock_key(
        "public",
        "__diesel_schema_migrations",
        diesel_rollout::Track::Required,
    );
    let mut other = db.conn();
    other
        .batch_execute(&format!("SELECT pg_advisory_lock({key})"))
        .unwrap();
    let second = cli(&["--json", "up"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let active = |query: &str| {
        db.count(&format!(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND query LIKE '{query}'"
        ))
    };
    wait_until("the second process to wait for the lock", || {
        // Its report of who holds the lock, sent once it waits.
        active("%Who holds a bigint advisory lock%") > 0
    });
    set.migrator().run_required_on(&mut other).unwrap();
    let out = second.wait_with_output().unwrap();
    other
        .batch_execute(&format!("SELECT pg_advisory_unlock({key})"))
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_schema_migrations WHERE version = '2'"),
        1,
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["deferred"]["applied"].as_array().map(Vec::len),
        Some(1),
        "{json}"
    );
}

/// On a fresh database, a run inside the caller's transaction (a test's
/// `begin_test_transaction`) applies the set there. Before, the first look
/// at a ledger that did not exist yet aborted the caller's transaction, and
/// the run failed with "current transaction is aborted".
#[test]
fn a_run_inside_the_callers_transaction_works_on_a_fresh_database() {
    use diesel::Connection;
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_t", "CREATE TABLE t (x int);\n");
    let mut conn = db.conn();
    conn.begin_test_transaction().unwrap();
    let report = set.migrator().run_required_on(&mut conn).unwrap();
    assert_eq!(report.applied.len(), 1, "{report:?}");
    assert_eq!(
        support::count_on(&mut conn, "SELECT count(*) AS n FROM t"),
        0
    );
    drop(conn);
    // Rolled back with the caller's transaction.
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_tables WHERE tablename = 't'"),
        0
    );
}

/// A transactional migration stopped by `statement_timeout` is not run a
/// second time to find the failing line (PostgreSQL gives no position for a
/// timeout): the replay ran the slow statement, and what it does outside
/// the transaction (here `nextval`), once more, and held its locks as long
/// again. The error still says what happened and that nothing is applied.
#[test]
fn a_timed_out_migration_is_not_run_again_to_find_its_line() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_seq", "CREATE SEQUENCE s;\n");
    set.required(
        "2_slow",
        "SELECT nextval('s');\nCREATE TABLE t (x int);\nSELECT pg_sleep(3);\n",
    );
    let m = set
        .migrator()
        .required_statement_timeout(std::time::Duration::from_millis(700))
        .lock_timeout_retry_deadline(std::time::Duration::ZERO);
    let err = m.run_required(&db.url).unwrap_err();
    let text = err.to_string();
    assert_eq!(err.kind(), ErrorKind::MigrationFailed, "{text}");
    assert!(text.contains("2_slow"), "{text}");
    assert!(text.contains("statement timeout"), "{text}");
    assert!(!text.contains("recording it in the ledger"), "{text}");
    assert!(text.contains("not run again"), "{text}");
    // The sequence moved once: the migration's statements ran once.
    assert_eq!(db.count("SELECT last_value AS n FROM s"), 1);
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_tables WHERE tablename = 't'"),
        0,
        "nothing of 2_slow is applied"
    );
}

/// A lock timeout in a transactional migration is located without running
/// it again: at the statement that needs a lock an older transaction
/// holds, not at an earlier one whose table a reader, queued behind the
/// migration's own lock, was handed at its rollback. The message names
/// that table and line.
#[test]
fn a_lock_timeout_is_located_at_the_statement_that_waited() {
    use std::time::Duration;
    let db = TestDb::new();
    db.conn()
        .batch_execute("CREATE TABLE users (id int); CREATE TABLE orders (id int)")
        .unwrap();
    let set = TempSet::new();
    set.required(
        "1_two_tables",
        "ALTER TABLE users ADD COLUMN x int;\nALTER TABLE orders ADD COLUMN y int;\n",
    );
    // An older transaction that read orders: statement 2 waits for it.
    let mut holder = db.conn();
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM orders")
        .unwrap();
    // Begun well before the migration, as a transaction that holds it up
    // for its whole lock timeout is.
    std::thread::sleep(Duration::from_millis(200));
    // A reader of users that arrives while the migration holds users.
    let reader = {
        let url = db.url.clone();
        std::thread::spawn(move || {
            use diesel::Connection;
            let mut c = diesel::PgConnection::establish(&url).unwrap();
            // Once the migration holds users and waits for orders.
            let started = std::time::Instant::now();
            while support::count_on(
                &mut c,
                "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND datname = current_database() AND pid <> pg_backend_pid() \
                 AND query LIKE '%ALTER TABLE orders ADD COLUMN y%'",
            ) == 0
            {
                assert!(started.elapsed() < Duration::from_secs(30));
                std::thread::sleep(Duration::from_millis(10));
            }
            c.batch_execute("BEGIN; SELECT count(*) FROM users")
                .unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            c.batch_execute("COMMIT").unwrap();
        })
    };
    let m = set
        .migrator()
        .required_lock_timeout(Duration::from_secs(2))
        .lock_timeout_retry_deadline(Duration::ZERO);
    let err = m.run_required(&db.url).unwrap_err();
    reader.join().unwrap();
    let text = err.to_string();
    assert!(text.contains("lock timeout"), "{text}");
    assert!(text.contains("up.sql:2 (probably"), "{text}");
    assert!(text.contains("could not lock table orders"), "{text}");
    assert_eq!(err.migration().and_then(|r| r.line), Some(2), "{text}");
}

/// Two releases of one project: the old has `5_fill` (a slow statement,
/// then another, each leaving a row) on the deferred track, the new on the
/// required one. The old release's required track is applied.
fn moved_to_the_required_track(db: &TestDb) -> (TempSet, TempSet) {
    let (old, new) = two_releases();
    let fill = "INSERT INTO effects SELECT 5 FROM pg_sleep(2);\nINSERT INTO effects VALUES (6);\n";
    old.deferred("5_fill", fill);
    new.required_no_tx("5_fill", fill);
    old.migrator().run_required(&db.url).unwrap();
    (old, new)
}

/// Waits until an attempt of `version` is running.
fn wait_until_running(db: &TestDb, version: &str) {
    let started = std::time::Instant::now();
    while db.count(&format!(
        "SELECT count(*) AS n FROM __diesel_rollout_attempts \
         WHERE version = '{version}' AND outcome = 'running'"
    )) == 0
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no attempt of {version} started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A no-transaction migration moved from the deferred track to the
/// required one in the next release, while the old release's leader still
/// runs it: the new release does not run it alongside (each track takes
/// only its own lock). It waits, as for a lock, finds it applied by the old
/// release, and goes on; each statement's effect happens once. Before, it
/// started the migration over from statement 1 next to the running one.
#[test]
fn a_migration_moved_to_the_other_track_is_not_run_twice_at_once() {
    use diesel::Connection;
    let db = TestDb::new();
    let (old, new) = moved_to_the_required_track(&db);
    let leader = {
        let (url, m) = (db.url.clone(), old.migrator());
        std::thread::spawn(move || {
            let mut c = diesel::PgConnection::establish(&url).unwrap();
            m.run_deferred_on(&mut c).map(|r| r.applied.len())
        })
    };
    wait_until_running(&db, "5");
    let report = new.migrator().run_required(&db.url).unwrap();
    assert!(
        report.applied.iter().all(|a| a.version != "5"),
        "{report:?}"
    );
    assert_eq!(leader.join().unwrap().unwrap(), 1);
    assert_eq!(
        db.texts("SELECT v::text AS t FROM effects ORDER BY v"),
        ["5", "6"]
    );
}

/// The other way round: the new release runs the migration on its required
/// track while the old release's deferred leader looks. The leader waits
/// (a retry, nothing recorded), finds it applied, and is done; each effect
/// once. Before, its retry ran the applied migration again: statement 1 a
/// second time, then a duplicate version row, retried with backoff.
#[test]
fn a_deferred_leader_waits_for_the_required_track_of_a_newer_release() {
    use std::time::Duration;
    let db = TestDb::new();
    let (old, new) = moved_to_the_required_track(&db);
    let required = {
        let (url, m) = (db.url.clone(), new.migrator());
        std::thread::spawn(move || m.run_required(&url).map(|r| r.applied.len()))
    };
    wait_until_running(&db, "5");
    let end = once(old.migrator())
        .deferred_failure_retries(20)
        .deferred_failure_backoff(Duration::from_millis(200))
        .run_deferred(pool(&db));
    assert!(
        matches!(end, diesel_rollout::DeferredState::Done { .. }),
        "{end:?}"
    );
    assert_eq!(required.join().unwrap().unwrap(), 1);
    assert_eq!(
        db.texts("SELECT v::text AS t FROM effects ORDER BY v"),
        ["5", "6"]
    );
}

/// An attempt left `running` on the other track by a client that died
/// behind a session pooler: its backend lives on (the pooler keeps it) but
/// holds no advisory lock any more (`DISCARD ALL`). It does not hold the
/// migration back: the run resumes after the statement it recorded.
#[test]
fn a_running_attempt_whose_backend_holds_no_lock_is_resumed() {
    use diesel::Connection;
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_effects", "CREATE TABLE effects (v int);\n");
    set.required_no_tx(
        "5_fill",
        "INSERT INTO effects VALUES (5);\nINSERT INTO missing VALUES (6);\n",
    );
    let m = set
        .migrator()
        .lock_timeout_retry_deadline(std::time::Duration::ZERO);
    m.run_required(&db.url).unwrap_err();
    // The pooler's backend: alive, idle, no advisory lock.
    let mut kept = diesel::PgConnection::establish(&db.url).unwrap();
    let pid = support::count_on(&mut kept, "SELECT pg_backend_pid()::bigint AS n");
    db.conn()
        .batch_execute(&format!(
            "UPDATE __diesel_rollout_attempts SET outcome = 'running', track = 'deferred', \
             finished_at = NULL, error = NULL, backend_pid = {pid} WHERE version = '5'; \
             CREATE TABLE missing (v int)"
        ))
        .unwrap();
    let report = m.run_required(&db.url).unwrap();
    resumed_at_statement_2(&db, &report);
    drop(kept);
}

/// The new release's required track gets to a migration only after an
/// earlier one waited on a lock; meanwhile the old release's deferred
/// leader, which has it on its track and was running it when the new
/// release planned (so the new release could not take the migration's own
/// lock then), finished it. The new release finds it applied and does not
/// run it again (a no-transaction one reads its row afresh under the
/// migration's own lock; one made transactional as it moved, failing on
/// the version row, finds it applied and reports no failure). Before, it
/// ran it from the row it read when it planned: a no-transaction one's
/// effects twice, a transactional one failed on the duplicate version row.
fn the_other_track_applied_it_meanwhile(no_tx: bool) {
    use diesel::Connection;
    use std::time::Duration;
    let db = TestDb::new();
    db.conn()
        .batch_execute("CREATE TABLE gate (v int); CREATE TABLE gate2 (v int)")
        .unwrap();
    let (old, new) = two_releases();
    let fill =
        "INSERT INTO effects VALUES (5);\nINSERT INTO effects SELECT count(*)::int + 6 FROM gate2;\n";
    new.required(
        "4_gate",
        "INSERT INTO effects SELECT count(*)::int + 4 FROM gate;\n",
    );
    // The deferred track runs outside a transaction; the new release may
    // have made it a transactional one as it moved it.
    old.deferred("5_fill", fill);
    if no_tx {
        new.required_no_tx("5_fill", fill);
    } else {
        new.required("5_fill", fill);
    }
    old.migrator().run_required(&db.url).unwrap();
    let (mut gate, mut gate2) = (db.conn(), db.conn());
    gate.batch_execute("BEGIN; LOCK TABLE gate IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    gate2
        .batch_execute("BEGIN; LOCK TABLE gate2 IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let waiting_on = |what: &str| {
        db.count(&format!(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND datname = current_database() AND pid <> pg_backend_pid() \
             AND query LIKE '%{what}%'"
        )) > 0
    };
    let leader = {
        let (url, m) = (db.url.clone(), old.migrator());
        std::thread::spawn(move || {
            let mut c = diesel::PgConnection::establish(&url).unwrap();
            m.run_deferred_on(&mut c).map(|r| r.applied.len())
        })
    };
    wait_until("the leader to wait at statement 2", || {
        waiting_on("count(*)::int + 6 FROM gate2")
    });
    let required = {
        let url = db.url.clone();
        let m = new
            .migrator()
            .required_lock_timeout(Duration::from_secs(30));
        std::thread::spawn(move || m.run_required(&url))
    };
    wait_until("4_gate to wait for the table", || {
        waiting_on("count(*)::int + 4 FROM gate")
    });
    // The leader finishes 5_fill while the new release waits at 4_gate.
    gate2.batch_execute("COMMIT").unwrap();
    assert_eq!(leader.join().unwrap().unwrap(), 1);
    gate.batch_execute("COMMIT").unwrap();
    let report = required.join().unwrap().unwrap();
    let versions: Vec<_> = report.applied.iter().map(|a| a.version.as_str()).collect();
    assert_eq!(versions, ["4"], "{report:?}");
    each_effect_once_and_no_failure(&db);
}

#[test]
fn a_migration_the_other_track_applied_while_earlier_ones_ran_is_not_run_again() {
    the_other_track_applied_it_meanwhile(true);
}

#[test]
fn a_transactional_migration_the_other_track_applied_meanwhile_is_not_a_failure() {
    the_other_track_applied_it_meanwhile(false);
}

/// How the old release's leader, halfway through `5_fill`, and the new
/// release's refused run of it end.
#[derive(PartialEq)]
enum LeaderRun {
    /// The new release retries until the leader is done.
    Finishes,
    /// The new release has no retries left.
    Outlasts,
    /// The leader's backend is killed before the new release gets there.
    Dies,
}

/// A migration the new release made transactional as it moved it to the
/// required track, reached while the old release's deferred leader is
/// halfway through it outside a transaction: the new release's transaction
/// finds the migration's own lock held as it commits, and rolls back; it
/// tries again (as after a lock timeout) until the leader is done, then
/// finds it applied; or, with no retries left, fails naming the session
/// that runs it, with no failure recorded; or, the leader dead with
/// statement 1 done, rolls back and refuses to run it whole. Before, it
/// ran it at once, and committed first: both runs' effects.
fn transactional_while_the_other_track_runs_it(end: LeaderRun, new_spelling: &str) {
    use diesel::Connection;
    use std::time::Duration;
    let db = TestDb::new();
    db.conn()
        .batch_execute("CREATE TABLE opened (v int); CREATE TABLE gate2 (v int)")
        .unwrap();
    let (old, new) = two_releases();
    let fill =
        "INSERT INTO effects VALUES (5);\nINSERT INTO effects SELECT count(*)::int + 6 FROM gate2;\n";
    // Waits, under no lock, until the test opens it.
    new.required(
        "4_gate",
        "DO $$ BEGIN WHILE NOT EXISTS (SELECT 1 FROM opened) LOOP PERFORM pg_sleep(0.02); \
         END LOOP; END $$;\nINSERT INTO effects VALUES (4);\n",
    );
    old.deferred("5_fill", fill);
    // The same effects, without waiting for the gate the leader waits at.
    new.required(
        new_spelling,
        "INSERT INTO effects VALUES (5);\nINSERT INTO effects VALUES (6);\n",
    );
    old.migrator().run_required(&db.url).unwrap();
    let mut gate2 = db.conn();
    gate2
        .batch_execute("BEGIN; LOCK TABLE gate2 IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let waiting = |event: &str, what: &str| {
        db.count(&format!(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = '{event}' \
             AND datname = current_database() AND pid <> pg_backend_pid() \
             AND query LIKE '%{what}%'"
        )) > 0
    };
    // The new release plans (5_fill pending) and waits at 4_gate ...
    let required = {
        let url = db.url.clone();
        let m = if end == LeaderRun::Outlasts {
            new.migrator().lock_timeout_retry_deadline(Duration::ZERO)
        } else {
            new.migrator()
                .lock_timeout_retry_deadline(Duration::from_secs(60))
        };
        std::thread::spawn(move || m.run_required(&url))
    };
    wait_until("4_gate to wait", || waiting("Timeout", "FROM opened"));
    // ... while the old release's leader starts 5_fill and stops at its
    // statement 2.
    let leader = {
        let (url, m) = (db.url.clone(), old.migrator());
        std::thread::spawn(move || {
            let mut c = diesel::PgConnection::establish(&url).unwrap();
            m.run_deferred_on(&mut c).map(|r| r.applied.len())
        })
    };
    wait_until("the leader to wait at statement 2", || {
        waiting("Lock", "count(*)::int + 6 FROM gate2")
    });
    if end == LeaderRun::Dies {
        db.conn()
            .batch_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND wait_event_type = 'Lock' AND query LIKE '%+ 6 FROM gate2%'",
            )
            .unwrap();
        assert!(leader.join().unwrap().is_err());
        db.conn()
            .batch_execute("INSERT INTO opened VALUES (1)")
            .unwrap();
        let e = required.join().unwrap().unwrap_err();
        let text = e.to_string();
        assert_eq!(
            e.kind(),
            diesel_rollout::ErrorKind::PartialMigrationChanged,
            "{text}"
        );
        assert!(
            text.contains("stopped halfway when it last ran outside a transaction (1 of 2"),
            "{text}"
        );
        assert_eq!(
            db.texts("SELECT v::text AS t FROM effects ORDER BY v"),
            ["4", "5"],
            "statement 1's effect once"
        );
        return;
    }
    db.conn()
        .batch_execute("INSERT INTO opened VALUES (1)")
        .unwrap();
    if end == LeaderRun::Outlasts {
        let e = required.join().unwrap().unwrap_err();
        let text = e.to_string();
        assert!(e.is_lock_timeout(), "{text}");
        assert!(
            text.contains("migration 5_fill is being applied now by another session")
                && text.contains("Nothing of it ran here"),
            "{text}"
        );
        assert_eq!(
            db.texts("SELECT v::text AS t FROM effects ORDER BY v"),
            ["4", "5"],
            "4_gate, and the leader's statement 1 only"
        );
        gate2.batch_execute("COMMIT").unwrap();
        assert_eq!(leader.join().unwrap().unwrap(), 1);
    } else {
        // Refused, it asked who holds the lock (to name it), and sleeps
        // before its retry.
        wait_until("the new release to be refused 5_fill's own lock", || {
            db.count(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE state = 'idle' \
                 AND datname = current_database() \
                 AND query LIKE '%FROM pg_locks l%l.objsubid = 1%'",
            ) > 0
        });
        gate2.batch_execute("COMMIT").unwrap();
        assert_eq!(leader.join().unwrap().unwrap(), 1);
        let report = required.join().unwrap().unwrap();
        let versions: Vec<_> = report.applied.iter().map(|a| a.version.as_str()).collect();
        assert_eq!(versions, ["4"], "{report:?}");
    }
    each_effect_once_and_no_failure(&db);
}

#[test]
fn a_transactional_migration_waits_while_the_other_track_runs_it() {
    transactional_while_the_other_track_runs_it(LeaderRun::Finishes, "5_fill");
}

#[test]
fn a_transactional_migration_the_other_track_runs_is_refused_by_name() {
    transactional_while_the_other_track_runs_it(LeaderRun::Outlasts, "5_fill");
}

#[test]
fn a_transactional_migration_the_other_track_left_half_done_meanwhile_is_refused() {
    transactional_while_the_other_track_runs_it(LeaderRun::Dies, "5_fill");
}

/// As above, the new release spelling the version with a leading zero
/// (`05_fill`): the attempt the dead leader left under the plain spelling
/// refuses it all the same.
#[test]
fn a_respelled_transactional_migration_the_other_track_left_half_done_meanwhile_is_refused() {
    transactional_while_the_other_track_runs_it(LeaderRun::Dies, "05_fill");
}

/// `REINDEX ... CONCURRENTLY` succeeds past indexes it cannot rebuild, and
/// so does the migration: a partitioned table's own index (`ON ONLY`,
/// valid once every partition has one attached), and an index a failed
/// build left invalid, which `REINDEX TABLE CONCURRENTLY` skips. The skipped
/// one is named in a warning with the statement that repairs it. Before,
/// each was reported INVALID after the statement, on every run: the deploy
/// stopped there for good.
#[test]
fn reindex_concurrently_passes_indexes_it_does_not_rebuild() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required(
        "1_tables",
        "CREATE TABLE p (id int, v int) PARTITION BY RANGE (id);\n\
         CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (0) TO (10);\n\
         CREATE INDEX p_v_idx ON ONLY p (v);\n\
         CREATE TABLE t (a int, b int);\n\
         INSERT INTO t VALUES (1, 1), (1, 2);\n\
         CREATE INDEX t_b ON t (b);\n",
    );
    set.migrator().run_required(&db.url).unwrap();
    db.conn()
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY t_a_key ON t (a)")
        .unwrap_err();
    assert_eq!(index_valid(&db, "t_a_key"), Some(false));
    set.required_no_tx(
        "2_reindex",
        "REINDEX TABLE CONCURRENTLY p;\n\
         REINDEX INDEX CONCURRENTLY p_v_idx;\n\
         REINDEX TABLE CONCURRENTLY t;\n\
         REINDEX INDEX CONCURRENTLY t_b;\n",
    );
    let out = db
        .rollout()
        .args(["up", "--required-only", "--migrations-dir"])
        .arg(set.required_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("skipped index public.t_a_key on t, which is INVALID")
            && stderr.contains("REINDEX INDEX CONCURRENTLY \"public\".\"t_a_key\""),
        "{stderr}"
    );
    assert!(!stderr.contains("p_v_idx"), "{stderr}");
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_schema_migrations WHERE version = '2'"),
        1
    );
    assert_eq!(index_valid(&db, "t_b"), Some(true));
    assert_eq!(index_valid(&db, "t_a_key"), Some(false), "left as it was");
}

/// A no-transaction migration stopped halfway, then renamed with a leading
/// zero (`5_fill` → `05_fill`) before the next deploy: the ledger row read
/// under the migration's own lock is found under either spelling, so the
/// run resumes after the statement that completed instead of running it
/// again.
#[test]
fn a_half_applied_migration_renamed_with_a_leading_zero_resumes() {
    let db = TestDb::new();
    let (before, after) = two_releases();
    before.required_no_tx(
        "5_fill",
        "INSERT INTO effects VALUES (5);\nINSERT INTO missing VALUES (6);\n",
    );
    after.required_no_tx(
        "05_fill",
        "INSERT INTO effects VALUES (5);\nINSERT INTO missing VALUES (6);\n",
    );
    let quick = |set: &TempSet| {
        set.migrator()
            .lock_timeout_retry_deadline(std::time::Duration::ZERO)
    };
    quick(&before).run_required(&db.url).unwrap_err();
    db.conn()
        .batch_execute("CREATE TABLE missing (v int)")
        .unwrap();
    let report = quick(&after).run_required(&db.url).unwrap();
    resumed_at_statement_2(&db, &report);
}

/// A no-transaction migration stopped halfway, then made transactional by
/// the next release (to fix it): refused, naming the statements done and
/// the two ways on, with nothing of it run. Before, it ran whole: statement
/// 1's effect twice.
#[test]
fn a_half_applied_migration_made_transactional_is_refused() {
    use diesel_rollout::ErrorKind;
    let db = TestDb::new();
    let (before, after) = two_releases();
    before.required_no_tx(
        "5_fill",
        "INSERT INTO effects VALUES (5);\nINSERT INTO missing VALUES (6);\n",
    );
    after.required(
        "5_fill",
        "INSERT INTO effects VALUES (5);\nINSERT INTO effects VALUES (6);\n",
    );
    let quick = |set: &TempSet| {
        set.migrator()
            .lock_timeout_retry_deadline(std::time::Duration::ZERO)
    };
    quick(&before).run_required(&db.url).unwrap_err();
    let e = quick(&after).run_required(&db.url).unwrap_err();
    let text = e.to_string();
    assert_eq!(e.kind(), ErrorKind::PartialMigrationChanged, "{text}");
    assert!(
        text.contains("stopped halfway when it last ran outside a transaction (1 of 2 statements")
            && text.contains("rollout resolve 5 --rolled-back"),
        "{text}"
    );
    assert_eq!(db.texts("SELECT v::text AS t FROM effects"), ["5"]);
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_schema_migrations WHERE version = '5'"),
        0
    );
    // The dry run says so too.
    let plan = after.migrator().plan(&mut db.conn()).unwrap();
    let step = plan.steps.iter().find(|s| s.version == "5").unwrap();
    assert!(
        matches!(&step.action, diesel_rollout::PlanAction::Refused { reason }
            if reason.contains("is transactional now")),
        "{plan:?}"
    );
}

/// The old release's deferred leader applies `5_fill` while the new
/// release, which renamed it `05_fill` and made it transactional on the
/// required track, runs the migrations ahead of it: the new release's run
/// finds the version there under the other spelling (which its own version
/// row does not collide with) and runs none of it. Before, it ran it again.
#[test]
fn a_renamed_transactional_migration_applied_meanwhile_is_not_run_again() {
    use diesel::Connection;
    let db = TestDb::new();
    db.conn()
        .batch_execute("CREATE TABLE opened (v int)")
        .unwrap();
    let (old, new) = two_releases();
    let fill = "INSERT INTO effects VALUES (5);\nINSERT INTO effects VALUES (6);\n";
    new.required(
        "4_gate",
        "DO $$ BEGIN WHILE NOT EXISTS (SELECT 1 FROM opened) LOOP PERFORM pg_sleep(0.02); \
         END LOOP; END $$;\nINSERT INTO effects VALUES (4);\n",
    );
    old.deferred("5_fill", fill);
    new.required("05_fill", fill);
    old.migrator().run_required(&db.url).unwrap();
    let required = {
        let (url, m) = (db.url.clone(), new.migrator());
        std::thread::spawn(move || m.run_required(&url))
    };
    wait_until("4_gate to wait", || {
        db.count(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Timeout' \
             AND datname = current_database() AND query LIKE '%FROM opened%'",
        ) > 0
    });
    let mut c = diesel::PgConnection::establish(&db.url).unwrap();
    assert_eq!(
        old.migrator()
            .run_deferred_on(&mut c)
            .unwrap()
            .applied
            .len(),
        1
    );
    db.conn()
        .batch_execute("INSERT INTO opened VALUES (1)")
        .unwrap();
    let report = required.join().unwrap().unwrap();
    let versions: Vec<_> = report.applied.iter().map(|a| a.version.as_str()).collect();
    assert_eq!(versions, ["4"], "{report:?}");
    assert_eq!(
        db.texts("SELECT v::text AS t FROM effects ORDER BY v"),
        ["4", "5", "6"],
        "each effect once"
    );
    assert_eq!(
        db.texts("SELECT version AS t FROM __diesel_schema_migrations WHERE version LIKE '%5'"),
        ["5"],
        "one version row"
    );
}

/// `resolve --force` of a migration that a release with it on the other
/// track is running right now (its deferred leader, under the deferred lock
/// only; a plain `resolve` refuses a pending migration anyway):
/// refused while that run holds the migration's own lock, so the next `up`
/// does not start it over beside the running one. Before, the resolution
/// was recorded under the required lock alone.
#[test]
fn resolve_refuses_a_migration_the_other_track_is_running() {
    use diesel::Connection;
    use diesel_rollout::{ErrorKind, Resolution};
    let db = TestDb::new();
    let (old, new) = two_releases();
    let fill = "INSERT INTO effects VALUES (5);\nINSERT INTO effects SELECT 6 FROM pg_sleep(3);\n";
    old.deferred("5_fill", fill);
    new.required_no_tx("5_fill", fill);
    old.migrator().run_required(&db.url).unwrap();
    let leader = {
        let (url, m) = (db.url.clone(), old.migrator());
        std::thread::spawn(move || {
            let mut c = diesel::PgConnection::establish(&url).unwrap();
            m.run_deferred_on(&mut c).map(|r| r.applied.len())
        })
    };
    wait_until("statement 2 to run", || {
        db.count(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
             AND datname = current_database() AND query LIKE 'INSERT INTO effects SELECT 6%'",
        ) > 0
    });
    let err = new
        .migrator()
        .dangerous_resolve_any_state(&mut db.conn(), "5", Resolution::RolledBack, "")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LockTimeout, "{err}");
    assert!(err.to_string().contains("being applied now"), "{err}");
    assert_eq!(leader.join().unwrap().unwrap(), 1);
    assert_eq!(
        db.texts("SELECT v::text AS t FROM effects ORDER BY v"),
        ["5", "6"]
    );
    assert_eq!(
        db.count("SELECT count(*) AS n FROM __diesel_rollout_attempts WHERE operation = 'resolve'"),
        0,
        "no resolution recorded"
    );
}

/// An attempt left `running` by a release that takes no migration's own
/// lock (one before it), whose backend still holds that release's track
/// lock: the migration is not run alongside; the run waits as on a lock
/// timeout. Once that backend has let go, the attempt is resumed after the
/// statement it recorded.
#[test]
fn an_attempt_running_under_a_release_without_the_migrations_own_lock_is_waited_for() {
    use diesel::Connection;
    use diesel_rollout::{ErrorKind, Track};
    let db = TestDb::new();
    let set = TempSet::new();
    set.required("1_effects", "CREATE TABLE effects (v int);\n");
    set.required_no_tx(
        "5_fill",
        "INSERT INTO effects VALUES (5);\nINSERT INTO missing VALUES (6);\n",
    );
    let m = set
        .migrator()
        .lock_timeout_retry_deadline(std::time::Duration::ZERO);
    m.run_required(&db.url).unwrap_err();
    // The older release's leader: alive, holding the deferred lock.
    let mut kept = diesel::PgConnection::establish(&db.url).unwrap();
    let key = m.lock_keys(&mut kept, Track::Deferred).unwrap()[0];
    kept.batch_execute(&format!("SELECT pg_advisory_lock({key})"))
        .unwrap();
    let pid = support::count_on(&mut kept, "SELECT pg_backend_pid()::bigint AS n");
    db.conn()
        .batch_execute(&format!(
            "UPDATE __diesel_rollout_attempts SET outcome = 'running', track = 'deferred', \
             finished_at = NULL, error = NULL, backend_pid = {pid} WHERE version = '5'; \
             CREATE TABLE missing (v int)"
        ))
        .unwrap();
    let err = m.run_required(&db.url).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LockTimeout, "{err}");
    assert!(
        err.to_string().contains(&format!("backend pid {pid}")),
        "{err}"
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM effects"), 1);
    drop(kept);
    wait_until("the older release's backend to let go", || {
        db.advisory_locks() == 0
    });
    let report = m.run_required(&db.url).unwrap();
    resumed_at_statement_2(&db, &report);
}

/// `REINDEX (CONCURRENTLY) INDEX`, PostgreSQL 14's spelling, gets what
/// `REINDEX INDEX CONCURRENTLY` gets: the invalid `_ccnew` leftover of an
/// earlier failed try is dropped before it runs, so leftovers do not pile
/// up (each slowing every write to the table). Before, the option list was
/// not recognised and the leftover stayed.
#[test]
fn reindex_with_the_option_list_drops_an_earlier_tries_leftover() {
    let db = TestDb::new();
    let set = TempSet::new();
    set.required(
        "1_t",
        "CREATE TABLE t (a int, b int);\nINSERT INTO t VALUES (1, 1), (1, 2);\n\
         CREATE INDEX t_b ON t (b);\n",
    );
    set.migrator().run_required(&db.url).unwrap();
    // What a failed REINDEX CONCURRENTLY of t_b leaves: an invalid t_b_ccnew.
    db.conn()
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY t_b_ccnew ON t (a)")
        .unwrap_err();
    assert_eq!(index_valid(&db, "t_b_ccnew"), Some(false));
    set.required_no_tx("2_reindex", "REINDEX (CONCURRENTLY) INDEX t_b;\n");
    let report = set.migrator().run_required(&db.url).unwrap();
    assert_eq!(report.applied.len(), 1, "{report:?}");
    assert_eq!(
        index_valid(&db, "t_b_ccnew"),
        None,
        "the leftover is dropped"
    );
    assert_eq!(index_valid(&db, "t_b"), Some(true));
}

/// As above, with the attempt recorded under another spelling of the
/// version (`5`, by a release before the directory became `05_fill`): it is
/// marked interrupted and resumed all the same, not started over.
#[test]
fn a_dead_running_attempt_under_another_spelling_is_resumed() {
    use diesel::Connection;
    let db = TestDb::new();
    let (before, after) = two_releases();
    let fill = "INSERT INTO effects VALUES (5);\nINSERT INTO missing VALUES (6);\n";
    before.required_no_tx("5_fill", fill);
    after.required_no_tx("05_fill", fill);
    let quick = |set: &TempSet| {
        set.migrator()
            .lock_timeout_retry_deadline(std::time::Duration::ZERO)
    };
    quick(&before).run_required(&db.url).unwrap_err();
    let mut kept = diesel::PgConnection::establish(&db.url).unwrap();
    let pid = support::count_on(&mut kept, "SELECT pg_backend_pid()::bigint AS n");
    db.conn()
        .batch_execute(&format!(
            "UPDATE __diesel_rollout_attempts SET outcome = 'running', track = 'deferred', \
             finished_at = NULL, error = NULL, backend_pid = {pid} WHERE version = '5'; \
             CREATE TABLE missing (v int)"
        ))
        .unwrap();
    let report = quick(&after).run_required(&db.url).unwrap();
    resumed_at_statement_2(&db, &report);
    drop(kept);
}

/// The required track takes the own locks of its pending no-transaction
/// migrations when it plans, so a release that has one on its deferred
/// track does not start it while earlier required migrations run: its
/// leader is refused (a lock timeout, retried later), the required track
/// applies it, each effect once, and no lock is left held afterwards.
#[test]
fn the_required_track_holds_its_pending_migrations_against_the_other_track() {
    use std::time::Duration;
    let db = TestDb::new();
    db.conn()
        .batch_execute("CREATE TABLE gate (v int)")
        .unwrap();
    let (old, new) = two_releases();
    let fill = "INSERT INTO effects VALUES (5);\nINSERT INTO effects VALUES (6);\n";
    old.deferred("5_fill", fill);
    new.required(
        "4_gate",
        "INSERT INTO effects SELECT count(*)::int + 4 FROM gate;\n",
    );
    new.required_no_tx("5_fill", fill);
    old.migrator().run_required(&db.url).unwrap();
    let mut gate = db.conn();
    gate.batch_execute("BEGIN; LOCK TABLE gate IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let required = {
        let url = db.url.clone();
        let m = new
            .migrator()
            .required_lock_timeout(Duration::from_secs(30));
        std::thread::spawn(move || m.run_required(&url))
    };
    wait_until("4_gate to wait for the table", || {
        db.count(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND datname = current_database() AND pid <> pg_backend_pid() \
             AND query LIKE '%count(*)::int + 4 FROM gate%'",
        ) > 0
    });
    let end = once(old.migrator()).run_deferred(pool(&db));
    match &end {
        diesel_rollout::DeferredState::Failed { error, .. } => {
            assert!(error.contains("being applied now"), "{error}")
        }
        other => panic!("the leader ran it: {other:?}"),
    }
    gate.batch_execute("COMMIT").unwrap();
    let report = required.join().unwrap().unwrap();
    let versions: Vec<_> = report.applied.iter().map(|a| a.version.as_str()).collect();
    assert_eq!(versions, ["4", "5"], "{report:?}");
    assert_eq!(
        db.texts("SELECT v::text AS t FROM effects ORDER BY v"),
        ["4", "5", "6"]
    );
    assert_eq!(db.advisory_locks(), 0, "no lock left held");
}

/// Two releases of one project, each starting with `1_effects`.
fn two_releases() -> (TempSet, TempSet) {
    let pair = (TempSet::new(), TempSet::new());
    for set in [&pair.0, &pair.1] {
        set.required("1_effects", "CREATE TABLE effects (v int);\n");
    }
    pair
}

/// `4_gate`'s and `5_fill`'s effects each once, and no attempt of `5_fill`
/// recorded as anything but a success.
fn each_effect_once_and_no_failure(db: &TestDb) {
    assert_eq!(
        db.texts("SELECT v::text AS t FROM effects ORDER BY v"),
        ["4", "5", "6"],
        "each effect once"
    );
    assert_eq!(
        db.count(
            "SELECT count(*) AS n FROM __diesel_rollout_attempts \
             WHERE version = '5' AND outcome <> 'success'"
        ),
        0,
        "no failed attempt of 5_fill is recorded"
    );
}

/// The one migration applied resumed at statement 2: statement 1's row
/// in `effects` is there once.
fn resumed_at_statement_2(db: &TestDb, report: &diesel_rollout::Report) {
    assert_eq!(report.applied.len(), 1, "{report:?}");
    assert_eq!(report.applied[0].statements, 1, "resumed at statement 2");
    assert_eq!(db.count("SELECT count(*) AS n FROM effects"), 1);
}
