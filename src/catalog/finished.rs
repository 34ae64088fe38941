//! What a statement may have finished on the server after its client was
//! gone. A concurrent index statement cannot share a transaction with its
//! recorded progress, so an attempt whose process died while one ran may
//! have left it done but unrecorded. Running it again would fail ("already
//! exists", "does not exist"): the catalog says whether it is done.

use diesel::prelude::*;
use diesel::sql_query;
use diesel::sql_types::Text;

use super::{same_definition, IndexOp};

/// Whether the statement an attempt died at is done, as the catalog shows
/// it: the index a named `CREATE INDEX CONCURRENTLY` builds exists, valid
/// and as the statement defines it, or the index a `DROP INDEX
/// CONCURRENTLY` drops is gone. Returns what was found, for the log.
/// Statements that need no help (`IF [NOT] EXISTS`, `REINDEX`) and a
/// state that does not prove the statement done give `None`: the
/// statement runs again as written.
pub(crate) fn by_dead_attempt(
    conn: &mut PgConnection,
    op: &IndexOp,
    statement: &str,
) -> QueryResult<Option<&'static str>> {
    match op {
        IndexOp::Create { .. } => Ok(built(conn, op, statement)?
            .then_some("builds an index that exists, valid and as the statement defines it")),
        IndexOp::Drop {
            index,
            if_exists: false,
        } => Ok(gone(conn, index)?.then_some("drops an index that no longer exists")),
        _ => Ok(None),
    }
}

/// Whether no relation answers to `index` (as written, on the session's
/// `search_path`). A `DROP INDEX CONCURRENTLY` interrupted halfway leaves
/// the index in the catalog (invalid): that is not gone, and the statement
/// runs again to finish the drop.
fn gone(conn: &mut PgConnection, index: &str) -> QueryResult<bool> {
    super::relation_exists(conn, index).map(|e| !e)
}

/// Whether a named `CREATE INDEX CONCURRENTLY` (without `IF NOT EXISTS`,
/// which needs no help) is already done: its index exists on its table,
/// valid, with the definition `statement` gives, compared with what
/// PostgreSQL prints for it (`pg_get_indexdef`) but for case, spaces and
/// quotes. A definition it prints differently (casts, parentheses added)
/// counts as not built, and the statement runs as written.
fn built(conn: &mut PgConnection, op: &IndexOp, statement: &str) -> QueryResult<bool> {
    // Unnamed, it cannot be told from an index of the same definition
    // that was there before (a constraint's, or one a later statement
    // drops): it runs again, at worst building a second index.
    let IndexOp::Create {
        index: Some(index),
        table,
        if_not_exists: false,
    } = op
    else {
        return Ok(false);
    };
    #[derive(QueryableByName)]
    struct Def {
        #[diesel(sql_type = Text)]
        def: String,
    }
    let def: Option<Def> = sql_query(
        "SELECT pg_get_indexdef(c.oid) AS def FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = to_regclass($1) AND c.relname = $2 AND i.indisvalid",
    )
    .bind::<Text, _>(table)
    .bind::<Text, _>(&index.folded)
    .get_result(conn)
    .optional()?;
    Ok(def.is_some_and(|d| same_definition(statement, &d.def)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_definitions_compare_as_postgresql_prints_them() {
        let same = [
            (
                "CREATE UNIQUE INDEX CONCURRENTLY i1 ON t (a DESC, b) INCLUDE (c)",
                "CREATE UNIQUE INDEX i1 ON public.t USING btree (a DESC, b) INCLUDE (c)",
            ),
            (
                "create index concurrently i2 on only \"s\".t using HASH (b);",
                "CREATE INDEX i2 ON s.t USING hash (b)",
            ),
            (
                "CREATE INDEX CONCURRENTLY \"I4\" ON t (lower(b))",
                "CREATE INDEX \"I4\" ON public.t USING btree (lower(b))",
            ),
            (
                "CREATE INDEX CONCURRENTLY i5 ON t (\"email\", \"Name\", Kind)",
                "CREATE INDEX i5 ON public.t USING btree (email, \"Name\", kind)",
            ),
        ];
        for (ours, printed) in same {
            assert!(same_definition(ours, printed), "{ours}");
        }
        let different = [
            (
                "CREATE INDEX CONCURRENTLY t_idx ON t (a)",
                "CREATE INDEX t_idx ON public.t USING btree (b)",
            ),
            (
                "CREATE INDEX CONCURRENTLY t_idx ON t (a)",
                "CREATE UNIQUE INDEX t_idx ON public.t USING btree (a)",
            ),
            (
                "CREATE INDEX CONCURRENTLY t_idx ON t (a)",
                "CREATE INDEX t_idx ON public.t USING hash (a)",
            ),
            (
                "CREATE INDEX CONCURRENTLY t_idx ON t (\"Email\")",
                "CREATE INDEX t_idx ON public.t USING btree (email)",
            ),
            // Printed with parentheses added: not recognised, so it runs.
            (
                "CREATE INDEX CONCURRENTLY i3 ON t (a) WHERE c > 0",
                "CREATE INDEX i3 ON public.t USING btree (a) WHERE (c > 0)",
            ),
        ];
        for (ours, printed) in different {
            assert!(!same_definition(ours, printed), "{ours} / {printed}");
        }
    }
}
