//! The row set in PostgreSQL: the sealed digest over every protected row
//! (`store::integrity::row_set_h`), kept right by every write job and
//! checked against a full recomputation (as `sqlite/row_set.rs`).
//!
//! Every protected row change, cascades included, is caught by the
//! schema's triggers (`secretfs_row_set_note`), which note the kind and
//! MAC of each row added and removed in the session's own temporary table
//! `row_set_pending` (made on each of the store's connections). At the end
//! of each write batch, in its transaction, [`flush`] folds those shares
//! into the record (a job rolled back to its savepoint takes its notes
//! with it).

use super::audit::revision;
use super::commit::{owned, Tx};
use super::macs;
use super::session::Want;
use crate::keys::{KeySet, Keys, MacKey, MAC_LEN};
use crate::store::integrity::{
    self, cannot_move, checkable, row_set_h, row_set_mismatch, same, xor_into, BadRow,
    RowSetRecord, StoredMac,
};
use crate::store::{Result, StoreError};

fn stored(mac: &Option<Vec<u8>>) -> StoredMac<'_> {
    match mac {
        None => StoredMac::Null,
        Some(b) => StoredMac::Blob(b),
    }
}

/// The record as stored.
pub(super) use crate::store::integrity::StoredRecord as Stored;

const READ: &str = "SELECT sealed FROM row_set WHERE id = 1";

pub(super) fn read(tx: &mut Tx<'_>, keys: &Keys) -> Result<Stored> {
    let sealed = tx.opt(READ, &[])?.map(|r| r.try_get(0)).transpose()?;
    Ok(opened(keys, sealed))
}

fn opened(keys: &Keys, sealed: Option<Vec<u8>>) -> Stored {
    match sealed {
        None => Stored::Missing,
        Some(sealed) => match RowSetRecord::open(keys, &sealed) {
            Some(rec) => Stored::Good(rec),
            None => Stored::Unreadable,
        },
    }
}

const WRITE: &str = "INSERT INTO row_set (id, sealed) VALUES (1, $1)
     ON CONFLICT (id) DO UPDATE SET sealed = excluded.sealed";

/// Writes the record (sent with the job's next round trip).
fn write(tx: &mut Tx<'_>, keys: &Keys, rec: &RowSetRecord) -> Result<()> {
    let sealed = rec.seal(keys).map_err(StoreError::backend)?;
    tx.later_exec(WRITE, owned![sealed])
}

/// Folds the shares of the rows the batch's jobs added and removed into
/// the record. A record that is missing, does not open, or is under a key not
/// held is left as it is (a finding already).
pub(super) fn flush(tx: &mut Tx<'_>, keys: &Keys) -> Result<()> {
    // The record, read in the same round trip as the shares.
    tx.later(READ, Want::Rows, owned![], |job, answer| {
        let rows = answer?.into_rows();
        job.row_set = Some(rows.first().map(|r| r.try_get(0)).transpose()?);
        Ok(())
    })?;
    let pending = tx.query(
        "DELETE FROM pg_temp.row_set_pending RETURNING kind, mac",
        &[],
    )?;
    let sealed = tx.job.row_set.take().flatten();
    if pending.is_empty() {
        return Ok(());
    }
    let Stored::Good(mut rec) = opened(keys, sealed) else {
        return Ok(());
    };
    let Some(set) = keys.set_for(rec.epoch) else {
        return Ok(());
    };
    let mut delta = [0u8; MAC_LEN];
    for r in &pending {
        let kind: String = r.try_get(0)?;
        let mac: Option<Vec<u8>> = r.try_get(1)?;
        xor_into(&mut delta, &row_set_h(set.row_set(), &kind, stored(&mac)));
    }
    xor_into(&mut rec.digest, &delta);
    write(tx, keys, &rec)
}

/// Forgets what was noted outside a write job (the store's own setup).
pub(super) fn forget_pending(tx: &mut Tx<'_>) -> Result<()> {
    tx.exec("DELETE FROM pg_temp.row_set_pending", &[])?;
    Ok(())
}

/// The digest over every protected row as it is now, under each key.
fn compute<const N: usize>(tx: &mut Tx<'_>, keys: [&MacKey; N]) -> Result<[[u8; MAC_LEN]; N]> {
    let mut out = [[0u8; MAC_LEN]; N];
    for table in macs::TABLES {
        let kind = table.name;
        let sql = match kind {
            integrity::META => "SELECT mac FROM meta WHERE key <> 'master_key_check'",
            integrity::CLIENTS => "SELECT mac FROM clients",
            integrity::CLIENT_CERTS => "SELECT mac FROM client_certs",
            integrity::GROUPS => "SELECT mac FROM groups",
            integrity::GROUP_CLIENTS => "SELECT mac FROM group_clients",
            integrity::GROUP_SECRETS => "SELECT mac FROM group_secrets",
            integrity::SECRETS => "SELECT mac FROM secrets",
            other => {
                return Err(StoreError::Backend(
                    format!(
                        "the row set has no query for the protected table {other:?} (a \
                         table was added to the protected ones without one)"
                    )
                    .into(),
                ))
            }
        };
        tx.each(sql, &[], |r| {
            let mac: Option<Vec<u8>> = r.try_get(0)?;
            for (acc, key) in out.iter_mut().zip(keys) {
                xor_into(acc, &row_set_h(key, kind, stored(&mac)));
            }
            Ok(true)
        })?;
    }
    Ok(out)
}

fn good(tx: &mut Tx<'_>, keys: &Keys) -> Result<std::result::Result<RowSetRecord, BadRow>> {
    Ok(checkable(keys, read(tx, keys)?))
}

/// Recomputes the digest and compares: `Ok(record)` when they agree, else
/// the finding. Read only.
pub(super) fn check(
    tx: &mut Tx<'_>,
    keys: &Keys,
) -> Result<std::result::Result<RowSetRecord, BadRow>> {
    let rec = match good(tx, keys)? {
        Ok(rec) => rec,
        Err(finding) => return Ok(Err(finding)),
    };
    let set: &KeySet = keys.set_for(rec.epoch).expect("checked by good()");
    let [now] = compute(tx, [set.row_set()])?;
    Ok(if same(&now, &rec.digest) {
        Ok(rec)
    } else {
        Err(row_set_mismatch(Some(rec.checked_at), None))
    })
}

/// Records that the digest agreed with every row at revision `at`.
pub(super) fn stamp(tx: &mut Tx<'_>, keys: &Keys, at: u64) -> Result<()> {
    if let Stored::Good(mut rec) = read(tx, keys)? {
        if at > rec.checked_at {
            rec.checked_at = at;
            write(tx, keys, &rec)?;
        }
    }
    Ok(())
}

/// A new record over the rows as they are, under the current key: a new
/// database, and an operator's `accept`. Returns the revision.
pub(super) fn sign_all(tx: &mut Tx<'_>, keys: &Keys) -> Result<u64> {
    let [digest] = compute(tx, [keys.current.row_set()])?;
    let at = revision(tx)?;
    write(tx, keys, &RowSetRecord::current(keys, at, digest))?;
    Ok(at)
}

/// At the end of a rekey's reseal: the record moves to the current key's
/// row set key, after a recomputation under its own key agrees.
pub(super) fn move_to_current(tx: &mut Tx<'_>, keys: &Keys) -> Result<()> {
    let rec = match good(tx, keys)? {
        Ok(rec) => rec,
        Err(finding) => return Err(cannot_move(finding)),
    };
    if rec.epoch == keys.current.epoch() {
        return Ok(());
    }
    let old = keys.set_for(rec.epoch).expect("checked by good()");
    let [then, now] = compute(tx, [old.row_set(), keys.current.row_set()])?;
    if !same(&then, &rec.digest) {
        return Err(cannot_move(row_set_mismatch(Some(rec.checked_at), None)));
    }
    let at = revision(tx)?;
    write(tx, keys, &RowSetRecord::current(keys, at, now))
}
