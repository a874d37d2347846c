//! Protected rows as both stores read them: the columns of
//! [`super::columns`] mapped to records and checked ([`Checker`]) as they
//! are read, over [`Columns`], what each store's row type gives.

use std::collections::HashMap;

use super::integrity::{Checker, SecretRow};
use super::{ClientAuth, SealedSecret, SecretRecord};
use crate::envelope::Sealed;

/// One row of a query, as the mapping reads it: each store's row type,
/// with its own error and its own reading of integers and flags (SQLite's
/// as `rusqlite` types them, PostgreSQL's from `BIGINT`).
pub trait Columns {
    type Error;
    fn int(&self, i: usize) -> Result<i64, Self::Error>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, Self::Error>;
    /// A mode, owner or group id.
    fn small(&self, i: usize) -> Result<u32, Self::Error>;
    fn opt_small(&self, i: usize) -> Result<Option<u32>, Self::Error>;
    fn flag(&self, i: usize) -> Result<bool, Self::Error>;
    fn text(&self, i: usize) -> Result<String, Self::Error>;
    fn blob(&self, i: usize) -> Result<Vec<u8>, Self::Error>;
    fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>, Self::Error>;
}

/// The secret in the 13 columns of `secret_cols` from `at`, if its MAC is
/// good (size and version time left 0).
pub fn secret_at<R: Columns + ?Sized>(
    row: &R,
    at: usize,
    ck: &Checker<'_>,
) -> Result<Option<SecretRecord>, R::Error> {
    let labels = row.text(at + 3)?;
    let record = SecretRecord {
        id: row.int(at)? as u64,
        name: row.text(at + 1)?,
        description: row.text(at + 2)?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        mode: row.small(at + 4)?,
        owner: row.opt_small(at + 5)?,
        group: row.opt_small(at + 6)?,
        expires_at: row.opt_int(at + 7)?,
        current_version: row.int(at + 8)? as u64,
        version_count: row.int(at + 9)? as u64,
        created_at: row.int(at + 10)?,
        updated_at: row.int(at + 11)?,
        size: 0,
        version_created_at: 0,
    };
    let mac = row.opt_blob(at + 12)?;
    let good = ck.secret_ok(
        &SecretRow {
            id: record.id,
            name: &record.name,
            description: &record.description,
            labels: &labels,
            mode: record.mode,
            owner: record.owner,
            grp: record.group,
            expires_at: record.expires_at,
            current_version: record.current_version,
            version_count: record.version_count,
            created_at: record.created_at,
            updated_at: record.updated_at,
        },
        mac.as_deref(),
    );
    Ok(good.then_some(record))
}

/// A row of `select_secrets` (or `select_granted`), if its MAC is good.
pub fn secret<R: Columns + ?Sized>(
    row: &R,
    ck: &Checker<'_>,
) -> Result<Option<SecretRecord>, R::Error> {
    let Some(mut record) = secret_at(row, 0, ck)? else {
        return Ok(None);
    };
    record.size = row.int(13)? as u64;
    record.version_created_at = row.int(14)?;
    Ok(Some(record))
}

/// A row of `select_granted_sealed`, if the secret's MAC is good.
pub fn sealed_secret<R: Columns + ?Sized>(
    row: &R,
    ck: &Checker<'_>,
) -> Result<Option<SealedSecret>, R::Error> {
    let Some(record) = secret(row, ck)? else {
        return Ok(None);
    };
    Ok(Some(SealedSecret {
        record,
        sealed: Sealed {
            wrapped_key: row.blob(15)?,
            ciphertext: row.blob(16)?,
        },
    }))
}

/// Whether the path at `at` (group id, `group_secrets` MAC,
/// `group_clients` MAC) really links `client_id` to the row's secret.
/// `memberships` remembers each group's `group_clients` verdict for the
/// rest of the query (one row per group, met once per secret).
pub fn path_ok<R: Columns + ?Sized>(
    row: &R,
    at: usize,
    client_id: u64,
    ck: &Checker<'_>,
    memberships: &mut HashMap<u64, bool>,
) -> Result<bool, R::Error> {
    let secret_id = row.int(0)? as u64;
    let group_id = row.int(at)? as u64;
    let member = match memberships.get(&group_id) {
        Some(known) => *known,
        None => {
            let gc = row.opt_blob(at + 2)?;
            let ok = ck.group_client_ok(group_id, client_id, gc.as_deref());
            memberships.insert(group_id, ok);
            ok
        }
    };
    if !member {
        return Ok(false);
    }
    let gs = row.opt_blob(at + 1)?;
    Ok(ck.group_secret_ok(group_id, secret_id, gs.as_deref()))
}

/// The client in the 7 columns of `client_cols` from `at`, and when it
/// was made, if its MAC is good.
pub fn client_at<R: Columns + ?Sized>(
    row: &R,
    at: usize,
    ck: &Checker<'_>,
) -> Result<Option<(ClientAuth, i64)>, R::Error> {
    let c = ClientAuth {
        id: row.int(at)? as u64,
        name: row.text(at + 1)?,
        admin: row.flag(at + 2)?,
        enabled: row.flag(at + 3)?,
        pinned: row.flag(at + 4)?,
    };
    let created_at = row.int(at + 5)?;
    let mac = row.opt_blob(at + 6)?;
    Ok(ck
        .client_ok(&c, created_at, mac.as_deref())
        .then_some((c, created_at)))
}

/// The group in 3 columns (id, name, mac) from `at`, if its MAC is good.
pub fn group_at<R: Columns + ?Sized>(
    row: &R,
    at: usize,
    ck: &Checker<'_>,
) -> Result<Option<(u64, String)>, R::Error> {
    let id = row.int(at)? as u64;
    let name = row.text(at + 1)?;
    let mac = row.opt_blob(at + 2)?;
    Ok(ck.group_ok(id, &name, mac.as_deref()).then_some((id, name)))
}
