//! The `testing` feature: a database per test, cloned from a template
//! migrated once.

mod support;

use diesel_rollout::testing::TestDatabase;

#[test]
fn each_test_gets_its_own_migrated_database_and_it_is_dropped() {
    let set = support::fixture_set("counted");
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let set = set.clone();
            std::thread::spawn(move || {
                let db = TestDatabase::new(&set);
                let name = db.name().to_string();
                let mut conn = db.connect();
                // Migrated (both tracks), and its own: writes stay here.
                let applied = support::count_on(
                    &mut conn,
                    "SELECT count(*) AS n FROM __diesel_schema_migrations",
                );
                diesel::connection::SimpleConnection::batch_execute(
                    &mut conn,
                    "INSERT INTO effects (version) VALUES ('mine')",
                )
                .unwrap();
                let mine = support::count_on(
                    &mut conn,
                    "SELECT count(*) AS n FROM effects WHERE version = 'mine'",
                );
                drop(conn);
                (name, applied, mine, db)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut names: Vec<_> = results.iter().map(|r| r.0.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 4, "a database each");
    for (_, applied, mine, _) in &results {
        assert_eq!(*applied, 5, "both tracks applied");
        assert_eq!(*mine, 1, "no test sees another's rows");
    }
    // Look at the server's catalog from one more test database.
    let observer = TestDatabase::new(&set);
    let mut conn = observer.connect();
    let templates = support::count_on(
        &mut conn,
        "SELECT count(*) AS n FROM pg_database \
         WHERE datname LIKE 'diesel_rollout_tpl_%' AND datistemplate",
    );
    assert!(templates >= 1, "a template database, marked as one");
    drop(results);
    for name in names {
        assert_eq!(
            support::count_on(
                &mut conn,
                &format!("SELECT count(*) AS n FROM pg_database WHERE datname = '{name}'")
            ),
            0,
            "{name} is dropped with its TestDatabase"
        );
    }
}
