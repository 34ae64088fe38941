//! After a concurrent index statement reported success: what the catalog
//! says it left.

use diesel::prelude::*;

use super::{
    catalog_error, has_invalid_index, has_valid_index, relation_exists, table_indexes,
    table_of_index, IndexOp,
};
use crate::error::{Error, ErrorKind};
use crate::migration::Migration;

/// After a concurrent index statement: the index exists and is valid, and
/// no `REINDEX` leftovers remain.
pub(crate) fn confirm(
    conn: &mut PgConnection,
    op: &IndexOp,
    statement: &str,
    m: &Migration,
    line: usize,
) -> Result<(), Error> {
    let fail = |what: String| {
        Error::new(
            ErrorKind::MigrationFailed,
            format!(
                "migration {} at {}:{line}: {what}. The statement reported success, but the \
                 catalog says otherwise; the next run drops the invalid index and builds it \
                 again",
                m.dir_name(),
                m.up_path()
            ),
        )
        .at(m, Some(line))
    };
    match op {
        IndexOp::Create {
            index: Some(index),
            table,
            if_not_exists,
        } => {
            if has_valid_index(conn, table, &index.folded).map_err(|e| catalog_error(m, line, e))? {
                return Ok(());
            }
            let rows = table_indexes(conn, table).map_err(|e| catalog_error(m, line, e))?;
            match rows.iter().find(|r| r.index_name == index.folded) {
                Some(r) if r.valid => Ok(()),
                Some(r) => Err(fail(format!(
                    "index {} on {} is INVALID{}",
                    r.index_name,
                    r.table_name,
                    if *if_not_exists {
                        " (IF NOT EXISTS skipped an invalid index)"
                    } else {
                        ""
                    }
                ))),
                None => {
                    // IF NOT EXISTS skips the build when the name is taken
                    // by any relation of the schema: another table's index.
                    let quoted = format!("\"{}\"", index.folded.replace('"', "\"\""));
                    let elsewhere =
                        table_of_index(conn, &quoted).map_err(|e| catalog_error(m, line, e))?;
                    if let Some(other) = elsewhere {
                        return Err(Error::new(
                            ErrorKind::MigrationFailed,
                            format!(
                                "migration {} at {}:{line}: index {} was not built on {table}: \
                                 an index of that name already exists on {other}, so IF NOT \
                                 EXISTS skipped the statement. Give the new index another \
                                 name (or drop the other one) and deploy again",
                                m.dir_name(),
                                m.up_path(),
                                index.folded
                            ),
                        )
                        .at(m, Some(line)));
                    }
                    // The table is not visible under that name (search_path):
                    // nothing to check against.
                    if rows.is_empty()
                        && !relation_exists(conn, table).map_err(|e| catalog_error(m, line, e))?
                    {
                        return Ok(());
                    }
                    Err(fail(format!(
                        "index {} does not exist on {table}",
                        index.folded
                    )))
                }
            }
        }
        IndexOp::Create {
            index: None, table, ..
        } => {
            // The leftovers were dropped before it: an invalid one now is
            // the one it built.
            if !has_invalid_index(conn, table).map_err(|e| catalog_error(m, line, e))? {
                return Ok(());
            }
            let rows = table_indexes(conn, table).map_err(|e| catalog_error(m, line, e))?;
            match rows.iter().find(|r| !r.valid && r.generated_for(statement)) {
                Some(r) => Err(fail(format!(
                    "index {} it built on {} is INVALID",
                    r.index_name, r.table_name
                ))),
                None => Ok(()),
            }
        }
        IndexOp::Drop { .. } => Ok(()),
        IndexOp::ReindexIndex { index, name } => {
            let Some(table) = table_of_index(conn, index).map_err(|e| catalog_error(m, line, e))?
            else {
                return Ok(());
            };
            if has_valid_index(conn, &table, &name.folded).map_err(|e| catalog_error(m, line, e))? {
                return Ok(());
            }
            // Only the index it rebuilt: another index of the table being
            // built, or left invalid, is not this statement's doing.
            let rows = table_indexes(conn, &table).map_err(|e| catalog_error(m, line, e))?;
            match rows.iter().find(|r| r.index_name == name.folded) {
                // A partitioned table's own index is valid once every
                // partition has one attached, which REINDEX does not do.
                Some(r) if !r.valid && !r.partitioned => Err(fail(format!(
                    "index {} on {} is INVALID after REINDEX CONCURRENTLY",
                    r.index_name, r.table_name
                ))),
                _ => Ok(()),
            }
        }
        IndexOp::ReindexTable { table } => {
            warn_skipped(conn, table, m, line)?;
            Ok(())
        }
    }
}

/// `REINDEX TABLE CONCURRENTLY` skips an index that is invalid (PostgreSQL
/// warns "cannot reindex invalid index ... concurrently, skipping") and
/// succeeds: such an index was invalid before the statement, and stays so.
/// That is not a failure of the migration, which did what PostgreSQL does
/// (and what it did under diesel); failing would stop every deploy at this
/// statement. Each one is logged with the statement that repairs it. A
/// partitioned table's own index, valid only once every partition has one
/// attached, is not reported.
fn warn_skipped(
    conn: &mut PgConnection,
    table: &str,
    m: &Migration,
    line: usize,
) -> Result<(), Error> {
    if !has_invalid_index(conn, table).map_err(|e| catalog_error(m, line, e))? {
        return Ok(());
    }
    let rows = table_indexes(conn, table).map_err(|e| catalog_error(m, line, e))?;
    for r in rows
        .iter()
        .filter(|r| !r.valid && !r.building && !r.partitioned)
    {
        tracing::warn!(
            migration = m.dir_name(),
            index = %r.index_name,
            "{}:{line}: REINDEX TABLE CONCURRENTLY skipped index {}.{} on {}, which is INVALID \
             (a failed build's leftover). It stays invalid: rebuild it with `REINDEX INDEX \
             CONCURRENTLY \"{}\".\"{}\"` or drop it",
            m.up_path(),
            r.schema_name,
            r.index_name,
            r.table_name,
            r.schema_name.replace('"', "\"\""),
            r.index_name.replace('"', "\"\"")
        );
    }
    Ok(())
}
