//! Row mapping and the small lookups every entity's queries share.

use rusqlite::{Connection, OptionalExtension, Row};

use crate::store::integrity::Checker;
use crate::store::mapping::Columns;
use crate::store::{Entity, Result, StoreError};

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

pub(super) use crate::store::mapping::{
    access_at, cert_at, client_at, client_of_group, group_at, group_of_client, path_ok,
    sealed_secret, secret, secret_at,
};

impl Columns for Row<'_> {
    type Error = rusqlite::Error;
    fn int(&self, i: usize) -> rusqlite::Result<i64> {
        self.get(i)
    }
    fn opt_int(&self, i: usize) -> rusqlite::Result<Option<i64>> {
        self.get(i)
    }
    fn small(&self, i: usize) -> rusqlite::Result<u32> {
        self.get(i)
    }
    fn opt_small(&self, i: usize) -> rusqlite::Result<Option<u32>> {
        self.get(i)
    }
    fn flag(&self, i: usize) -> rusqlite::Result<bool> {
        self.get(i)
    }
    fn text(&self, i: usize) -> rusqlite::Result<String> {
        self.get(i)
    }
    fn blob(&self, i: usize) -> rusqlite::Result<Vec<u8>> {
        self.get(i)
    }
    fn opt_blob(&self, i: usize) -> rusqlite::Result<Option<Vec<u8>>> {
        self.get(i)
    }
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
