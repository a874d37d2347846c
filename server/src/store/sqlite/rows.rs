//! Row mapping and the small lookups every entity's queries share.

use rusqlite::{Connection, OptionalExtension, Row};

use crate::envelope::Sealed;
use crate::store::{Entity, Result, SealedSecret, SecretRecord, StoreError};

/// `SELECT` of secrets with their current version's size and time, as
/// [`secret`] maps them; the rest of the query follows. Macros rather than
/// consts so queries are `concat!`ed at compile time, not formatted per call.
macro_rules! select_secrets {
    ($($rest:tt)*) => {
        concat!(
            "SELECT s.id, s.name, s.description, s.labels, s.mode, s.owner, s.grp, \
             s.expires_at, s.current_version, s.version_count, s.created_at, s.updated_at, \
             v.size, v.created_at FROM secrets s \
             JOIN secret_versions v ON v.secret_id = s.id AND v.version = s.current_version ",
            $($rest)*
        )
    };
}

/// As [`select_secrets`], with the current version's sealed content, as
/// [`sealed_secret`] maps it.
macro_rules! select_sealed {
    ($($rest:tt)*) => {
        concat!(
            "SELECT s.id, s.name, s.description, s.labels, s.mode, s.owner, s.grp, \
             s.expires_at, s.current_version, s.version_count, s.created_at, s.updated_at, \
             v.size, v.created_at, v.wrapped_key, v.ciphertext FROM secrets s \
             JOIN secret_versions v ON v.secret_id = s.id AND v.version = s.current_version ",
            $($rest)*
        )
    };
}

/// The ids of the secrets client `?1` may read, through any group.
macro_rules! granted_to_client {
    () => {
        "(SELECT gs.secret_id FROM group_clients gc \
           JOIN group_secrets gs ON gs.group_id = gc.group_id WHERE gc.client_id = ?1)"
    };
}

pub(super) use {granted_to_client, select_sealed, select_secrets};

pub(super) fn secret(row: &Row<'_>) -> rusqlite::Result<SecretRecord> {
    let labels: String = row.get(3)?;
    Ok(SecretRecord {
        id: row.get::<_, i64>(0)? as u64,
        name: row.get(1)?,
        description: row.get(2)?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        mode: row.get(4)?,
        owner: row.get(5)?,
        group: row.get(6)?,
        expires_at: row.get(7)?,
        current_version: row.get::<_, i64>(8)? as u64,
        version_count: row.get::<_, i64>(9)? as u64,
        created_at: row.get(10)?,
        updated_at: row.get(11)?,
        size: row.get::<_, i64>(12)? as u64,
        version_created_at: row.get(13)?,
    })
}

/// A row of [`select_sealed`].
pub(super) fn sealed_secret(row: &Row<'_>) -> rusqlite::Result<SealedSecret> {
    Ok(SealedSecret {
        record: secret(row)?,
        sealed: Sealed {
            wrapped_key: row.get(14)?,
            ciphertext: row.get(15)?,
        },
    })
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

/// `(key, name)` pairs grouped by key, in order: one query instead of one
/// per row.
pub(super) fn grouped(
    tx: &Connection,
    sql: &str,
) -> Result<std::collections::HashMap<i64, Vec<String>>> {
    let mut stmt = tx.prepare_cached(sql)?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
    let mut out: std::collections::HashMap<i64, Vec<String>> = Default::default();
    for row in rows {
        let (key, name) = row?;
        out.entry(key).or_default().push(name);
    }
    Ok(out)
}
