//! Row mapping and the small lookups every entity's queries share (as
//! `sqlite/rows.rs`).

use postgres::Row;

use super::commit::Tx;
use crate::envelope::Sealed;
use crate::store::integrity::{Checker, SecretRow};
use crate::store::{ClientAuth, Entity, Result, SealedSecret, SecretRecord, StoreError};

pub(super) use crate::store::columns::{
    client_cols, secret_cols, select_secrets, SEALED_PATH, VIEW_PATH,
};

/// `columns::select_granted` for client `$1`.
macro_rules! select_granted {
    ($($rest:tt)*) => {
        $crate::store::columns::select_granted!("$1"; $($rest)*)
    };
}

/// `columns::select_granted_sealed` for client `$1`.
macro_rules! select_granted_sealed {
    ($($rest:tt)*) => {
        $crate::store::columns::select_granted_sealed!("$1"; $($rest)*)
    };
}

pub(super) use {select_granted, select_granted_sealed};

fn u32_of(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The secret in the 13 columns of [`secret_cols`] from `at`, if its MAC
/// is good (size and version time left 0).
pub(super) fn secret_at(row: &Row, at: usize, ck: &Checker<'_>) -> Result<Option<SecretRecord>> {
    let labels: String = row.try_get(at + 3)?;
    let record = SecretRecord {
        id: row.try_get::<_, i64>(at)? as u64,
        name: row.try_get(at + 1)?,
        description: row.try_get(at + 2)?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        mode: u32_of(row.try_get(at + 4)?),
        owner: row.try_get::<_, Option<i64>>(at + 5)?.map(u32_of),
        group: row.try_get::<_, Option<i64>>(at + 6)?.map(u32_of),
        expires_at: row.try_get(at + 7)?,
        current_version: row.try_get::<_, i64>(at + 8)? as u64,
        version_count: row.try_get::<_, i64>(at + 9)? as u64,
        created_at: row.try_get(at + 10)?,
        updated_at: row.try_get(at + 11)?,
        size: 0,
        version_created_at: 0,
    };
    let mac: Option<Vec<u8>> = row.try_get(at + 12)?;
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

/// A row of [`select_secrets`] (or [`select_granted`]), if its MAC is good.
pub(super) fn secret(row: &Row, ck: &Checker<'_>) -> Result<Option<SecretRecord>> {
    let Some(mut record) = secret_at(row, 0, ck)? else {
        return Ok(None);
    };
    record.size = row.try_get::<_, i64>(13)? as u64;
    record.version_created_at = row.try_get(14)?;
    Ok(Some(record))
}

/// A row of [`select_granted_sealed`], if the secret's MAC is good.
pub(super) fn sealed_secret(row: &Row, ck: &Checker<'_>) -> Result<Option<SealedSecret>> {
    let Some(record) = secret(row, ck)? else {
        return Ok(None);
    };
    Ok(Some(SealedSecret {
        record,
        sealed: Sealed {
            wrapped_key: row.try_get(15)?,
            ciphertext: row.try_get(16)?,
        },
    }))
}

/// Whether the path at `at` (group id, `group_secrets` MAC,
/// `group_clients` MAC) really links `client_id` to the row's secret.
pub(super) fn path_ok(
    row: &Row,
    at: usize,
    client_id: u64,
    ck: &Checker<'_>,
    memberships: &mut std::collections::HashMap<u64, bool>,
) -> Result<bool> {
    let secret_id = row.try_get::<_, i64>(0)? as u64;
    let group_id = row.try_get::<_, i64>(at)? as u64;
    let member = match memberships.get(&group_id) {
        Some(known) => *known,
        None => {
            let gc: Option<Vec<u8>> = row.try_get(at + 2)?;
            let ok = ck.group_client_ok(group_id, client_id, gc.as_deref());
            memberships.insert(group_id, ok);
            ok
        }
    };
    if !member {
        return Ok(false);
    }
    let gs: Option<Vec<u8>> = row.try_get(at + 1)?;
    Ok(ck.group_secret_ok(group_id, secret_id, gs.as_deref()))
}

/// `Checker::group_secret_ok`, kept for `secrets.rs` (the writer path's
/// file) until it calls the `Checker` itself.
pub(super) fn group_secret_ok(
    ck: &Checker<'_>,
    group: u64,
    secret: u64,
    mac: Option<&[u8]>,
) -> bool {
    ck.group_secret_ok(group, secret, mac)
}

/// The client in the 7 columns of [`client_cols`] from `at`, and when it
/// was made, if its MAC is good.
pub(super) fn client_at(
    row: &Row,
    at: usize,
    ck: &Checker<'_>,
) -> Result<Option<(ClientAuth, i64)>> {
    let c = ClientAuth {
        id: row.try_get::<_, i64>(at)? as u64,
        name: row.try_get(at + 1)?,
        admin: row.try_get::<_, i64>(at + 2)? != 0,
        enabled: row.try_get::<_, i64>(at + 3)? != 0,
        pinned: row.try_get::<_, i64>(at + 4)? != 0,
    };
    let created_at: i64 = row.try_get(at + 5)?;
    let mac: Option<Vec<u8>> = row.try_get(at + 6)?;
    Ok(ck
        .client_ok(&c, created_at, mac.as_deref())
        .then_some((c, created_at)))
}

/// The group in 3 columns (id, name, mac) from `at`, if its MAC is good.
pub(super) fn group_at(row: &Row, at: usize, ck: &Checker<'_>) -> Result<Option<(u64, String)>> {
    let id = row.try_get::<_, i64>(at)? as u64;
    let name: String = row.try_get(at + 1)?;
    let mac: Option<Vec<u8>> = row.try_get(at + 2)?;
    Ok(ck.group_ok(id, &name, mac.as_deref()).then_some((id, name)))
}

/// The id of the named row, if its MAC is good (NotFound when not).
pub(super) fn checked_id(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    kind: Entity,
    name: &str,
) -> Result<i64> {
    let found = match kind {
        Entity::Secret => tx
            .opt(
                concat!(
                    "SELECT ",
                    secret_cols!(),
                    " FROM secrets s WHERE s.name = $1"
                ),
                &[&name],
            )?
            .map(|r| Ok::<_, StoreError>(secret_at(&r, 0, ck)?.map(|s| s.id)))
            .transpose()?,
        Entity::Client => tx
            .opt(
                concat!(
                    "SELECT ",
                    client_cols!(),
                    " FROM clients c WHERE c.name = $1"
                ),
                &[&name],
            )?
            .map(|r| Ok::<_, StoreError>(client_at(&r, 0, ck)?.map(|(c, _)| c.id)))
            .transpose()?,
        Entity::Group => tx
            .opt("SELECT id, name, mac FROM groups WHERE name = $1", &[&name])?
            .map(|r| Ok::<_, StoreError>(group_at(&r, 0, ck)?.map(|(id, _)| id)))
            .transpose()?,
    };
    found
        .flatten()
        .map(|id| id as i64)
        .ok_or_else(|| StoreError::not_found(kind, name))
}

pub(super) fn id_by_name(tx: &mut Tx<'_>, kind: Entity, name: &str) -> Result<i64> {
    let row = match kind {
        Entity::Secret => tx.opt("SELECT id FROM secrets WHERE name = $1", &[&name])?,
        Entity::Client => tx.opt("SELECT id FROM clients WHERE name = $1", &[&name])?,
        Entity::Group => tx.opt("SELECT id FROM groups WHERE name = $1", &[&name])?,
    };
    match row {
        Some(r) => Ok(r.try_get(0)?),
        None => Err(StoreError::not_found(kind, name)),
    }
}

/// An insert whose unique name may be taken (the `{table}_name_key`
/// constraint): AlreadyExists; any other error as it is.
pub(super) fn insert_named<T>(
    inserted: std::result::Result<T, postgres::Error>,
    kind: Entity,
    name: &str,
) -> Result<T> {
    match inserted {
        Err(e)
            if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION)
                && e.as_db_error()
                    .and_then(|d| d.constraint())
                    .is_some_and(|c| c.ends_with("_name_key")) =>
        {
            Err(StoreError::exists(kind, name))
        }
        other => Ok(other?),
    }
}

/// The one-column text results of `sql` with parameter `id`.
pub(super) fn names(tx: &mut Tx<'_>, sql: &'static str, id: i64) -> Result<Vec<String>> {
    tx.query(sql, &[&id])?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
}
