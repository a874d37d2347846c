//! Row mapping and the small lookups every entity's queries share (as
//! `sqlite/rows.rs`).

use postgres::Row;

use super::commit::Tx;
use crate::store::integrity::Checker;
use crate::store::mapping::Columns;
use crate::store::{Entity, Result, StoreError};

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

pub(super) use crate::store::mapping::{
    access_at, cert_at, client_at, client_of_group, group_at, group_of_client, path_ok,
    sealed_secret, secret, secret_at,
};

fn u32_of(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Integers are `BIGINT`: flags are 0 or 1, and a mode, owner or group
/// beyond `u32` reads as `u32::MAX` (its MAC then fails).
impl Columns for Row {
    type Error = StoreError;
    fn int(&self, i: usize) -> Result<i64> {
        Ok(self.try_get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        Ok(self.try_get(i)?)
    }
    fn small(&self, i: usize) -> Result<u32> {
        Ok(u32_of(self.try_get(i)?))
    }
    fn opt_small(&self, i: usize) -> Result<Option<u32>> {
        Ok(self.try_get::<_, Option<i64>>(i)?.map(u32_of))
    }
    fn flag(&self, i: usize) -> Result<bool> {
        Ok(self.try_get::<_, i64>(i)? != 0)
    }
    fn text(&self, i: usize) -> Result<String> {
        Ok(self.try_get(i)?)
    }
    fn blob(&self, i: usize) -> Result<Vec<u8>> {
        Ok(self.try_get(i)?)
    }
    fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>> {
        Ok(self.try_get(i)?)
    }
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
