//! Unit tests of the catalog's statement recognition.

use super::*;

fn ident(s: &str) -> Option<Ident> {
    Some(Ident { folded: s.into() })
}

#[test]
fn recognises_concurrent_index_statements() {
    assert_eq!(
        classify("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS Users_Email ON app.users (email)"),
        Some(IndexOp::Create {
            index: ident("users_email"),
            table: "app.users".into(),
            if_not_exists: true
        })
    );
    assert_eq!(
        classify("create index concurrently \"Odd Name\" on only \"T\" using gin (x)"),
        Some(IndexOp::Create {
            index: ident("Odd Name"),
            table: "\"T\"".into(),
            if_not_exists: false
        })
    );
    assert_eq!(
        classify("CREATE INDEX CONCURRENTLY ON t (a)"),
        Some(IndexOp::Create {
            index: None,
            table: "t".into(),
            if_not_exists: false
        })
    );
    assert_eq!(classify("CREATE INDEX i ON t (a)"), None);
    assert_eq!(
        classify("REINDEX (VERBOSE) INDEX CONCURRENTLY s.I"),
        Some(IndexOp::ReindexIndex {
            index: "s.I".into(),
            name: Ident { folded: "i".into() },
        })
    );
    // PostgreSQL keeps 63 bytes of a name, never half a character.
    let long = format!("things_val_{}", "x".repeat(60));
    assert_eq!(
        classify(&format!("CREATE INDEX CONCURRENTLY {long} ON t (a)")),
        Some(IndexOp::Create {
            index: ident(&long[..63]),
            table: "t".into(),
            if_not_exists: false
        })
    );
    let accents = format!("\"things_val__{}\"", "é".repeat(26));
    assert_eq!(
        classify(&format!("CREATE INDEX CONCURRENTLY {accents} ON t (a)")),
        Some(IndexOp::Create {
            index: ident(&format!("things_val__{}", "é".repeat(25))),
            table: "t".into(),
            if_not_exists: false
        })
    );
    assert_eq!(
        classify("reindex table concurrently t"),
        Some(IndexOp::ReindexTable { table: "t".into() })
    );
    assert_eq!(
        classify("DROP INDEX CONCURRENTLY IF EXISTS app.\"Users_Email\";"),
        Some(IndexOp::Drop {
            index: "app.\"Users_Email\"".into(),
            if_exists: true
        })
    );
    assert_eq!(
        classify("drop index concurrently t_x"),
        Some(IndexOp::Drop {
            index: "t_x".into(),
            if_exists: false
        })
    );
    assert_eq!(classify("DROP INDEX t_x"), None);
    assert_eq!(classify("DROP TABLE t"), None);
    assert_eq!(classify("REINDEX TABLE t"), None);
    // PostgreSQL 14's option list.
    assert_eq!(
        classify("REINDEX (CONCURRENTLY) TABLE t"),
        Some(IndexOp::ReindexTable { table: "t".into() })
    );
    assert_eq!(
        classify("REINDEX (VERBOSE, CONCURRENTLY true) TABLE s.t"),
        Some(IndexOp::ReindexTable {
            table: "s.t".into()
        })
    );
    assert!(matches!(
        classify("reindex (concurrently on) index i"),
        Some(IndexOp::ReindexIndex { .. })
    ));
    assert_eq!(classify("REINDEX (CONCURRENTLY false) TABLE t"), None);
    assert_eq!(
        classify("REINDEX (CONCURRENTLY off, VERBOSE) TABLE t"),
        None
    );
    assert_eq!(
        altered_table("ALTER TABLE IF EXISTS ONLY public.items ADD COLUMN x int"),
        Some("public.items".into())
    );
}

#[test]
fn reindex_leftovers_are_recognised_by_name() {
    let row = |name: &str| IndexRow {
        schema_name: "public".into(),
        index_name: name.into(),
        table_name: "t".into(),
        valid: false,
        definition: String::new(),
        building: false,
        partitioned: false,
    };
    assert!(row("t_a_idx_ccnew").is_reindex_leftover(Some("t_a_idx")));
    assert!(row("t_a_idx_ccold2").is_reindex_leftover(None));
    assert!(!row("t_a_idx_ccnew").is_reindex_leftover(Some("other")));
    assert!(!row("t_a_idx_ccnewx").is_reindex_leftover(None));
    assert!(!row("t_a_idx").is_reindex_leftover(None));
    // A long base is cut so that base + suffix fits in 63 bytes.
    let base = "i".repeat(70);
    assert!(row(&format!("{}_ccnew", &base[..57])).is_reindex_leftover(Some(&base[..63])));
    assert!(row(&format!("{}_ccold12", &base[..55])).is_reindex_leftover(Some(&base)));
    assert!(!row(&format!("{}_ccnew", &base[..56])).is_reindex_leftover(Some(&base)));
}

#[test]
fn an_unnamed_build_is_told_by_a_generated_name_and_its_definition() {
    let row = |name: &str, definition: &str| IndexRow {
        schema_name: "public".into(),
        index_name: name.into(),
        table_name: "t".into(),
        valid: false,
        definition: definition.into(),
        building: false,
        partitioned: false,
    };
    let statement = "CREATE UNIQUE INDEX CONCURRENTLY ON t (email)";
    let printed =
        |name: &str| format!("CREATE UNIQUE INDEX {name} ON public.t USING btree (email)");
    assert!(row("t_email_idx", &printed("t_email_idx")).generated_for(statement));
    assert!(row("t_email_idx12", &printed("t_email_idx12")).generated_for(statement));
    // A constraint's index, or a name a migration chose.
    assert!(!row("t_email_key", &printed("t_email_key")).generated_for(statement));
    assert!(!row("t_email_broken", &printed("t_email_broken")).generated_for(statement));
    // Another definition.
    assert!(!row(
        "t_email_idx",
        "CREATE INDEX t_email_idx ON public.t USING btree (email)"
    )
    .generated_for(statement));
}
