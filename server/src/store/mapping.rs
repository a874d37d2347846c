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
    let good = ck.secret_ok(&SecretRow::of(&record, &labels), mac.as_deref());
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

/// A certificate of client `client_id` in 4 columns (serial, not_after,
/// issued_at, mac) from `at`: its serial and expiry, if its MAC is good.
pub fn cert_at<R: Columns + ?Sized>(
    row: &R,
    at: usize,
    client_id: u64,
    ck: &Checker<'_>,
) -> Result<Option<(String, i64)>, R::Error> {
    let (serial, not_after, issued_at) = (row.text(at)?, row.int(at + 1)?, row.int(at + 2)?);
    let mac = row.opt_blob(at + 3)?;
    Ok(ck
        .cert_ok(client_id, &serial, not_after, issued_at, mac.as_deref())
        .then_some((serial, not_after)))
}

/// A client's membership (g.id, g.name, g.mac, gc.client_id, gc.mac): the
/// client's id and the group's name, if the membership and then the group
/// are good.
pub fn group_of_client<R: Columns + ?Sized>(
    row: &R,
    ck: &Checker<'_>,
) -> Result<Option<(i64, String)>, R::Error> {
    let cid = row.int(3)?;
    let mac = row.opt_blob(4)?;
    let gid = row.int(0)? as u64;
    if !ck.group_client_ok(gid, cid as u64, mac.as_deref()) {
        return Ok(None);
    }
    Ok(group_at(row, 0, ck)?.map(|(_, name)| (cid, name)))
}

/// A group's member (`client_cols`, gc.group_id, gc.mac): the group's id
/// and the client's name, if the membership and then the client are good.
pub fn client_of_group<R: Columns + ?Sized>(
    row: &R,
    ck: &Checker<'_>,
) -> Result<Option<(i64, String)>, R::Error> {
    let gid = row.int(7)?;
    let mac = row.opt_blob(8)?;
    let cid = row.int(0)? as u64;
    if !ck.group_client_ok(gid as u64, cid, mac.as_deref()) {
        return Ok(None);
    }
    Ok(client_at(row, 0, ck)?.map(|(c, _)| (gid, c.name)))
}

/// A path by which client `client_id` reads a secret (`secret_cols`,
/// g.id, g.name, g.mac, gs.mac, gc.mac): the secret's and the group's
/// names, if every row of it (membership, grant, group, secret) is good.
pub fn access_at<R: Columns + ?Sized>(
    row: &R,
    client_id: u64,
    ck: &Checker<'_>,
) -> Result<Option<(String, String)>, R::Error> {
    let gid = row.int(13)? as u64;
    let sid = row.int(0)? as u64;
    let gs = row.opt_blob(16)?;
    let gc = row.opt_blob(17)?;
    if !ck.group_client_ok(gid, client_id, gc.as_deref())
        || !ck.group_secret_ok(gid, sid, gs.as_deref())
    {
        return Ok(None);
    }
    let Some((_, group)) = group_at(row, 13, ck)? else {
        return Ok(None);
    };
    Ok(secret_at(row, 0, ck)?.map(|secret| (secret.name, group)))
}
