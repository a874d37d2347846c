//! Schema migrations, applied in order; `PRAGMA user_version` records how
//! many ran. Append only: never edit a released step.

use rusqlite::{Connection, TransactionBehavior};

use crate::store::{Result, StoreError};

pub(super) const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_schema.sql"),
    include_str!("migrations/0002_revision.sql"),
    include_str!("migrations/0003_revoked_certs.sql"),
    ROW_MACS,
    AUDIT_CHAIN,
    ROW_SET,
];

/// The step that adds row MACs: the rows already there are adopted
/// (MAC'd) in its own transaction, and only there (see `macs::adopt`).
pub(super) const ROW_MACS: &str = include_str!("migrations/0004_row_macs.sql");
/// The step that adds the audit chain (its entries are chained in the same
/// transaction: see `sqlite::audit::adopt`).
pub(super) const AUDIT_CHAIN: &str = include_str!("migrations/0005_audit_chain.sql");
/// The step that adds the row set: its digest is computed over the rows
/// already there in its own transaction, and only there (see
/// `row_set::start`).
pub(super) const ROW_SET: &str = include_str!("migrations/0006_row_set.sql");

/// Runs the steps not yet run; `after_step` runs in each step's
/// transaction, after its SQL (a step that needs the keys), told which
/// step by its SQL.
pub(super) fn migrate(
    conn: &mut Connection,
    after_step: &mut dyn FnMut(&str, &Connection) -> Result<()>,
) -> Result<()> {
    let current = conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    if current > MIGRATIONS.len() {
        return Err(StoreError::NewerSchema {
            found: current as u64,
            known: MIGRATIONS.len() as u64,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        after_step(sql, &tx)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}
