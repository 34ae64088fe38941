//! `ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY` runs in two
//! transactions. Stopped between them (cancelled, or its client gone), it
//! leaves the partition marked pending detach, and the statement run again
//! fails ("already pending detach"): what completes it is `DETACH PARTITION
//! ... FINALIZE`. Finished on the server after its client died, it is done
//! but unrecorded, and run again it fails ("is not a partition"). The
//! catalog (`pg_inherits`) says which.

use diesel::prelude::*;
use diesel::sql_query;
use diesel::sql_types::Text;

use super::{alter_table, is_word, qualified_name};
use crate::source::sql::TokenKind;

/// A `DETACH PARTITION ... CONCURRENTLY`: the tables as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Detach {
    parent: String,
    child: String,
}

/// Where a concurrent detach stands, as `pg_inherits` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DetachState {
    /// Still a partition, not pending: the statement has not run.
    Attached,
    /// Marked pending detach: an earlier run stopped halfway.
    Pending,
    /// Both tables exist and the child is no partition of the parent.
    Detached,
    /// A table is missing (or not visible on the `search_path`).
    Unknown,
}

impl Detach {
    /// What completes a detach that stopped halfway. It may run in a
    /// transaction block, so it goes together with its recorded progress.
    pub(crate) fn finalize_sql(&self) -> String {
        format!(
            "ALTER TABLE {} DETACH PARTITION {} FINALIZE",
            self.parent, self.child
        )
    }

    pub(crate) fn state(&self, conn: &mut PgConnection) -> QueryResult<DetachState> {
        #[derive(QueryableByName)]
        struct S {
            #[diesel(sql_type = Text)]
            state: String,
        }
        let s: S = sql_query(include_str!("../sql/detach_state.sql"))
            .bind::<Text, _>(&self.parent)
            .bind::<Text, _>(&self.child)
            .get_result(conn)?;
        Ok(match s.state.as_str() {
            "attached" => DetachState::Attached,
            "pending" => DetachState::Pending,
            "detached" => DetachState::Detached,
            _ => DetachState::Unknown,
        })
    }
}

/// Recognises `ALTER TABLE [IF EXISTS] [ONLY] parent DETACH PARTITION
/// child CONCURRENTLY`.
pub(crate) fn detach_concurrently(statement: &str) -> Option<Detach> {
    let (t, parent, i) = alter_table(statement)?;
    if !is_word(t.get(i), "detach") || !is_word(t.get(i + 1), "partition") {
        return None;
    }
    let (child, _, i) = qualified_name(&t, i + 2)?;
    let rest = t.get(i + 1..)?;
    (is_word(t.get(i), "concurrently") && rest.iter().all(|x| x.kind == TokenKind::Semicolon))
        .then_some(Detach { parent, child })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_concurrent_detaches() {
        let d = detach_concurrently(
            "alter table if exists only public.\"Events\" detach partition events_2019 concurrently;",
        )
        .unwrap();
        assert_eq!(
            d.finalize_sql(),
            "ALTER TABLE public.\"Events\" DETACH PARTITION events_2019 FINALIZE"
        );
        for not in [
            "ALTER TABLE p DETACH PARTITION c",
            "ALTER TABLE p DETACH PARTITION c FINALIZE",
            "ALTER TABLE p DETACH PARTITION c CONCURRENTLY, ADD COLUMN x int",
            "ALTER INDEX p DETACH PARTITION c CONCURRENTLY",
            "CREATE INDEX CONCURRENTLY ON p (x)",
        ] {
            assert_eq!(detach_concurrently(not), None, "{not}");
        }
    }
}
