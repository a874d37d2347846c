//! `secretfs server verify`, offline: every authenticated row and the row
//! set checked, and an operator's acceptance of the rows as they are after
//! reviewing a row set mismatch.

use crate::domain::Action;
use crate::error::Error;
use crate::key_provider::KeyOptions;
use crate::state_dir::{open_store_with, DatabaseOptions, StateDir};
use crate::state_lock::StateLock;
use crate::store::BadRow;

/// Who the audit log names for an acceptance.
pub const LOCAL_VERIFY: &str = "local:verify";

/// Every bad row, and the row set's finding (read only; beside a running
/// server too).
pub fn verify(
    dir: &StateDir,
    keys: &KeyOptions,
    db: &DatabaseOptions,
) -> Result<Vec<BadRow>, Error> {
    let opened = open_store_with(dir, keys, db, false)?;
    Ok(opened.store.verify_rows()?)
}

/// Takes the rows as they are as the row set, audited as
/// `integrity.accept` with the revision; returns it. Only with the server
/// stopped (it holds the state lock): a running server keeps its own view
/// of the row set.
pub fn accept(dir: &StateDir, keys: &KeyOptions, db: &DatabaseOptions) -> Result<u64, Error> {
    let _lock = StateLock::acquire(dir)?;
    let opened = open_store_with(dir, keys, db, false)?;
    Ok(opened
        .store
        .accept_row_set(&Action::IntegrityAccept.by(LOCAL_VERIFY))?)
}
