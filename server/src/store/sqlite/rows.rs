//! Row mapping and the small lookups every entity's queries share.

use rusqlite::{Connection, OptionalExtension, Row};

use crate::envelope::Sealed;
use crate::store::integrity::{Checker, SecretRow};
use crate::store::{ClientAuth, Entity, Result, SealedSecret, SecretRecord, StoreError};

pub(super) use crate::store::columns::{
    client_cols, secret_cols, select_secrets, SEALED_PATH, VIEW_PATH,
};

/// `columns::select_granted` for client `?1`.
macro_rules! select_granted {
    ($($rest:tt)*) => {
        $crate::store::columns::select_granted!("?1"; $($rest)*)
    };
}

/// `columns::select_granted_sealed` for client `?1`.
macro_rules! select_granted_sealed {
    ($($rest:tt)*) => {
        $crate::store::columns::select_granted_sealed!("?1"; $($rest)*)
    };
}

pub(super) use {select_granted, select_granted_sealed};

/// The secret in the 13 columns of [`secret_cols`] from `at`, if its MAC
/// is good (size and version time left 0).
pub(super) fn secret_at(
    row: &Row<'_>,
    at: usize,
    ck: &Checker<'_>,
) -> rusqlite::Result<Option<SecretRecord>> {
    let labels: String = row.get(at + 3)?;
    let record = SecretRecord {
        id: row.get::<_, i64>(at)? as u64,
        name: row.get(at + 1)?,
        description: row.get(at + 2)?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        mode: row.get(at + 4)?,
        owner: row.get(at + 5)?,
        group: row.get(at + 6)?,
        expires_at: row.get(at + 7)?,
        current_version: row.get::<_, i64>(at + 8)? as u64,
        version_count: row.get::<_, i64>(at + 9)? as u64,
        created_at: row.get(at + 10)?,
        updated_at: row.get(at + 11)?,
        size: 0,
        version_created_at: 0,
    };
    let mac: Option<Vec<u8>> = row.get(at + 12)?;
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
pub(super) fn secret(row: &Row<'_>, ck: &Checker<'_>) -> rusqlite::Result<Option<SecretRecord>> {
    let Some(mut record) = secret_at(row, 0, ck)? else {
        return Ok(None);
    };
    record.size = row.get::<_, i64>(13)? as u64;
    record.version_created_at = row.get(14)?;
    Ok(Some(record))
}

/// A row of [`select_granted_sealed`], if the secret's MAC is good.
pub(super) fn sealed_secret(
    row: &Row<'_>,
    ck: &Checker<'_>,
) -> rusqlite::Result<Option<SealedSecret>> {
    let Some(record) = secret(row, ck)? else {
        return Ok(None);
    };
    Ok(Some(SealedSecret {
        record,
        sealed: Sealed {
            wrapped_key: row.get(15)?,
            ciphertext: row.get(16)?,
        },
    }))
}

/// Whether the path at `at` (group id, `group_secrets` MAC,
/// `group_clients` MAC) really links `client_id` to the row's secret.
/// `memberships` remembers each group's `group_clients` verdict for the
/// rest of the query (one row per group, met once per secret).
pub(super) fn path_ok(
    row: &Row<'_>,
    at: usize,
    client_id: u64,
    ck: &Checker<'_>,
    memberships: &mut std::collections::HashMap<u64, bool>,
) -> rusqlite::Result<bool> {
    let secret_id = row.get::<_, i64>(0)? as u64;
    let group_id = row.get::<_, i64>(at)? as u64;
    let member = match memberships.get(&group_id) {
        Some(known) => *known,
        None => {
            let gc: Option<Vec<u8>> = row.get(at + 2)?;
            let ok = ck.group_client_ok(group_id, client_id, gc.as_deref());
            memberships.insert(group_id, ok);
            ok
        }
    };
    if !member {
        return Ok(false);
    }
    let gs: Option<Vec<u8>> = row.get(at + 1)?;
    Ok(ck.group_secret_ok(group_id, secret_id, gs.as_deref()))
}

/// The client in the 7 columns of [`client_cols`] from `at`, and when it
/// was made, if its MAC is good.
pub(super) fn client_at(
    row: &Row<'_>,
    at: usize,
    ck: &Checker<'_>,
) -> rusqlite::Result<Option<(ClientAuth, i64)>> {
    let c = ClientAuth {
        id: row.get::<_, i64>(at)? as u64,
        name: row.get(at + 1)?,
        admin: row.get(at + 2)?,
        enabled: row.get(at + 3)?,
        pinned: row.get(at + 4)?,
    };
    let created_at: i64 = row.get(at + 5)?;
    let mac: Option<Vec<u8>> = row.get(at + 6)?;
    Ok(ck
        .client_ok(&c, created_at, mac.as_deref())
        .then_some((c, created_at)))
}

/// The group in 3 columns (id, name, mac) from `at`, if its MAC is good.
pub(super) fn group_at(
    row: &Row<'_>,
    at: usize,
    ck: &Checker<'_>,
) -> rusqlite::Result<Option<(u64, String)>> {
    let id = row.get::<_, i64>(at)? as u64;
    let name: String = row.get(at + 1)?;
    let mac: Option<Vec<u8>> = row.get(at + 2)?;
    Ok(ck.group_ok(id, &name, mac.as_deref()).then_some((id, name)))
}

/// The id of the named row, if its MAC is good (NotFound when not): what
/// a write that links to or changes a row starts from.
pub(super) fn checked_id(
    tx: &Connection,
    ck: &Checker<'_>,
    kind: Entity,
    name: &str,
) -> Result<i64> {
    let found = match kind {
        Entity::Secret => tx
            .prepare_cached(concat!(
                "SELECT ",
                secret_cols!(),
                " FROM secrets s WHERE s.name = ?1"
            ))?
            .query_row([name], |r| Ok(secret_at(r, 0, ck)?.map(|s| s.id)))
            .optional()?,
        Entity::Client => tx
            .prepare_cached(concat!(
                "SELECT ",
                client_cols!(),
                " FROM clients c WHERE c.name = ?1"
            ))?
            .query_row([name], |r| Ok(client_at(r, 0, ck)?.map(|(c, _)| c.id)))
            .optional()?,
        Entity::Group => tx
            .prepare_cached("SELECT id, name, mac FROM groups WHERE name = ?1")?
            .query_row([name], |r| Ok(group_at(r, 0, ck)?.map(|(id, _)| id)))
            .optional()?,
    };
    found
        .flatten()
        .map(|id| id as i64)
        .ok_or_else(|| StoreError::not_found(kind, name))
}

pub(super) fn id_by_name(tx: &Connection, kind: Entity, name: &str) -> Result<i64> {
    let table = match kind {
        Entity::Secret => "secrets",
        Entity::Client => "clients",
        Entity::Group => "groups",
    };
    tx.query_row(
        &format!("SELECT id FROM {table} WHERE name = ?1"),
        [name],
        |r| r.get(0),
    )
    .optional()?
    .ok_or_else(|| StoreError::not_found(kind, name))
}

pub(super) fn is_unique_violation(err: &rusqlite::Error) -> bool {
    matches!(
        err,
        rusqlite::Error::SqliteFailure(e, _) if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

/// An insert whose unique name may be taken.
pub(super) fn insert_named(
    inserted: rusqlite::Result<usize>,
    kind: Entity,
    name: &str,
) -> Result<()> {
    match inserted {
        Err(e) if is_unique_violation(&e) => Err(StoreError::exists(kind, name)),
        other => other.map(drop).map_err(Into::into),
    }
}

/// The one-column results of `sql` with parameter `id`.
pub(super) fn names(tx: &Connection, sql: &str, id: i64) -> Result<Vec<String>> {
    let mut stmt = tx.prepare_cached(sql)?;
    let rows = stmt.query_map([id], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}
