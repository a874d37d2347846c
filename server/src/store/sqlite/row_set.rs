//! The row set in SQLite: the sealed digest over every protected row
//! (`store::integrity::row_set_h`), kept right by every write job and
//! checked against a full recomputation.
//!
//! Every protected row change on the writer connection, cascades
//! included, is caught by TEMP triggers (they live in the server's own
//! connection only; nothing in the database file changes) that note the
//! kind and MAC of each row added and removed in `temp.row_set_pending`.
//! At the end of each write job (`Connections::after_job`), [`flush`]
//! folds those shares into the record: one row read and written per job,
//! O(rows touched). So no write path (a cascade, a future query) can
//! forget it.

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension};

use super::audit::revision;
use super::macs;
use crate::keys::{KeySet, Keys, MacKey, MAC_LEN};
use crate::store::integrity::{
    self, cannot_move, checkable, row_set_h, row_set_mismatch, same, xor_into, BadRow,
    RowSetRecord, StoredMac,
};

/// The record as stored.
pub(super) use crate::store::integrity::StoredRecord as Stored;
use crate::store::{Result, StoreError};

/// Which rows of `table` are in the set (SQL over `row`, `old` or `new`):
/// the master key check (`meta`) is left out, as it is of row MACs.
fn member(table: &str, row: &str) -> String {
    if table == "meta" {
        format!("{row}.key <> '{}'", integrity::META_UNSIGNED)
    } else {
        "1".to_owned()
    }
}

/// The pending table and the triggers that fill it, on the writer
/// connection (after the migrations).
pub(super) fn setup_writer(conn: &Connection) -> Result<()> {
    // REPLACE deletes fire delete triggers only with this on.
    conn.pragma_update(None, "recursive_triggers", "ON")?;
    let mut sql = String::from(
        "CREATE TEMP TABLE IF NOT EXISTS row_set_pending (kind TEXT NOT NULL, mac);\n",
    );
    // The protected tables (`macs::TABLES`), each named by its kind.
    for (kind, table) in macs::TABLES.map(|t| (t.name, t.name)) {
        let push = |row: &str| {
            format!("INSERT INTO row_set_pending (kind, mac) VALUES ('{kind}', {row}.mac);")
        };
        sql.push_str(&format!(
            "CREATE TEMP TRIGGER IF NOT EXISTS row_set_{table}_ins AFTER INSERT ON main.{table}
               WHEN {} BEGIN {} END;
             CREATE TEMP TRIGGER IF NOT EXISTS row_set_{table}_del AFTER DELETE ON main.{table}
               WHEN {} BEGIN {} END;
             CREATE TEMP TRIGGER IF NOT EXISTS row_set_{table}_upd_old AFTER UPDATE ON main.{table}
               WHEN {} AND (old.mac IS NOT new.mac OR {}) BEGIN {} END;
             CREATE TEMP TRIGGER IF NOT EXISTS row_set_{table}_upd_new AFTER UPDATE ON main.{table}
               WHEN {} AND (old.mac IS NOT new.mac OR {}) BEGIN {} END;\n",
            member(table, "new"),
            push("new"),
            member(table, "old"),
            push("old"),
            member(table, "old"),
            key_changed(table),
            push("old"),
            member(table, "new"),
            key_changed(table),
            push("new"),
        ));
    }
    conn.execute_batch(&sql)?;
    Ok(())
}

/// An update that moves a `meta` row in or out of the set changes it even
/// with the same MAC.
fn key_changed(table: &str) -> &'static str {
    if table == "meta" {
        "old.key IS NOT new.key"
    } else {
        "0"
    }
}

/// Forgets what was noted outside a write job (tests that edit rows on the
/// writer connection as someone without the key would).
#[cfg(test)]
pub(super) fn forget_pending(conn: &Connection) {
    conn.execute_batch("DELETE FROM temp.row_set_pending")
        .unwrap();
}

fn stored(v: ValueRef<'_>) -> StoredMac<'_> {
    match v {
        ValueRef::Null => StoredMac::Null,
        ValueRef::Blob(b) => StoredMac::Blob(b),
        ValueRef::Text(b) => StoredMac::Text(b),
        ValueRef::Integer(i) => StoredMac::Integer(i),
        ValueRef::Real(f) => StoredMac::Real(f),
    }
}

pub(super) fn read(tx: &Connection, keys: &Keys) -> Result<Stored> {
    let blob: Option<Option<Vec<u8>>> = tx
        .query_row("SELECT sealed FROM row_set WHERE id = 1", [], |r| {
            Ok(r.get::<_, Vec<u8>>(0).ok())
        })
        .optional()?;
    Ok(match blob {
        None => Stored::Missing,
        Some(None) => Stored::Unreadable,
        Some(Some(b)) => match RowSetRecord::open(keys, &b) {
            Some(rec) => Stored::Good(rec),
            None => Stored::Unreadable,
        },
    })
}

fn write(tx: &Connection, keys: &Keys, rec: &RowSetRecord) -> Result<()> {
    let sealed = rec.seal(keys).map_err(StoreError::backend)?;
    tx.prepare_cached(
        "INSERT INTO row_set (id, sealed) VALUES (1, ?1)
         ON CONFLICT (id) DO UPDATE SET sealed = excluded.sealed",
    )?
    .execute(params![sealed])?;
    Ok(())
}

/// Folds the shares of the rows this job added and removed into the
/// record. A record that is missing, does not open, or is under a key not
/// held is left as it is: it is a finding already (`check`), and only an
/// operator's `accept` makes a new one.
pub(super) fn flush(tx: &Connection, keys: &Keys) -> Result<()> {
    let mut delta = [0u8; MAC_LEN];
    let mut any = false;
    let record = {
        let mut stmt = tx.prepare_cached("SELECT kind, mac FROM temp.row_set_pending")?;
        let mut rows = stmt.query([])?;
        let mut record = None;
        while let Some(r) = rows.next()? {
            if record.is_none() {
                record = Some(read(tx, keys)?);
            }
            let Some(Stored::Good(rec)) = &record else {
                continue;
            };
            let Some(set) = keys.set_for(rec.epoch) else {
                continue;
            };
            let kind: String = r.get(0)?;
            xor_into(
                &mut delta,
                &row_set_h(set.row_set(), &kind, stored(r.get_ref(1)?)),
            );
            any = true;
        }
        record
    };
    let Some(record) = record else {
        return Ok(());
    };
    tx.prepare_cached("DELETE FROM temp.row_set_pending")?
        .execute([])?;
    if let (true, Stored::Good(mut rec)) = (any, record) {
        // `written_at` stays as it was: nothing reads it, and a query for
        // the revision on every write job is not worth it.
        xor_into(&mut rec.digest, &delta);
        write(tx, keys, &rec)?;
    }
    Ok(())
}

/// The digest over every protected row as it is now, under each key.
fn compute<const N: usize>(tx: &Connection, keys: [&MacKey; N]) -> Result<[[u8; MAC_LEN]; N]> {
    let mut out = [[0u8; MAC_LEN]; N];
    for (kind, table) in macs::TABLES.map(|t| (t.name, t.name)) {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT mac FROM {table} WHERE {}",
            member(table, table)
        ))?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let mac = stored(r.get_ref(0)?);
            for (acc, key) in out.iter_mut().zip(keys) {
                xor_into(acc, &row_set_h(key, kind, mac));
            }
        }
    }
    Ok(out)
}

/// The record and the key set it is under, or the finding.
fn good(tx: &Connection, keys: &Keys) -> Result<std::result::Result<RowSetRecord, BadRow>> {
    Ok(checkable(keys, read(tx, keys)?))
}

/// Recomputes the digest and compares: `Ok(record)` when they agree, else
/// the finding. Read only.
pub(super) fn check(
    tx: &Connection,
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
pub(super) fn stamp(tx: &Connection, keys: &Keys, at: u64) -> Result<()> {
    if let Stored::Good(mut rec) = read(tx, keys)? {
        if at > rec.checked_at {
            rec.checked_at = at;
            write(tx, keys, &rec)?;
        }
    }
    Ok(())
}

/// A new record over the rows as they are, under the current key: the
/// migration that adds the row set, and an operator's `accept`. Returns
/// the revision.
pub(super) fn sign_all(tx: &Connection, keys: &Keys) -> Result<u64> {
    let [digest] = compute(tx, [keys.current.row_set()])?;
    let at = revision(tx)?;
    write(tx, keys, &RowSetRecord::current(keys, at, digest))?;
    Ok(at)
}

/// The migration's step: the digest of the rows already there, once,
/// after the master key opens the database's key check (rows are taken
/// as they are only under the key the database was made with).
pub(super) fn start(tx: &Connection, keys: &Keys) -> Result<()> {
    // The adoption's own record (written by the migration before this
    // one, also on a new database) is not a row to vouch for.
    let rows: i64 = macs::TABLES.iter().try_fold(0i64, |n, t| {
        let table = t.name;
        tx.query_row(
            &format!(
                "SELECT count(*) FROM {table} WHERE {} AND {}",
                member(table, table),
                if table == integrity::META {
                    "key <> ?1"
                } else {
                    "?1 IS NOT NULL"
                }
            ),
            [integrity::META_ROWS_AUTHENTICATED],
            |r| r.get::<_, i64>(0),
        )
        .map(|c| n + c)
    })?;
    super::adoption_key_check(tx, keys, rows > 0)?;
    let at = sign_all(tx, keys)?;
    if rows > 0 {
        tracing::warn!(
            rows,
            revision = at,
            "row set: the rows of this database were taken as they are, once; from now on a \
             row put back, deleted or added without the master key is detected"
        );
    }
    Ok(())
}

/// At the end of a rekey's reseal (every row under the current key): the
/// record moves to the current key's row set key, after a recomputation
/// under its own key agrees (a rekey must not take rows put back without
/// the key as good). A record already under the current key is left.
pub(super) fn move_to_current(tx: &Connection, keys: &Keys) -> Result<()> {
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
