//! Row MACs in PostgreSQL: signing a row a write just made, and the
//! whole-table walks (`verify_rows`, `reseal_rows`). What each MAC covers
//! is `store::integrity`'s. (No adoption: a PostgreSQL database has had
//! row MACs from its first schema.)
//!
//! Rows are addressed by `ctid` in the walks (SQLite's rowid): a walk
//! reads and re-signs within one transaction that holds the revision
//! row's lock, so no write of ours moves a row in between.

use postgres::Row;

use super::commit::{owned, Tx};
use crate::keys::{Keys, MacInput};
use crate::store::integrity::{self, BadRow, SecretRow, META_ROWS_AUTHENTICATED};
use crate::store::{Result, StoreError};

pub(super) struct Table {
    pub name: &'static str,
    /// Every row: the MAC'd columns, `ctid::text`, `mac`.
    select: &'static str,
    /// Sets `mac = $1` of the row with `ctid = $2`.
    set_mac: &'static str,
    /// Sets `mac = $1` of the row with `id = $2`.
    set_mac_id: &'static str,
    /// Index of `ctid` in the selects; `mac` follows it.
    at: usize,
    input: fn(&Row) -> Result<Option<MacInput>>,
    key: fn(&Row) -> Result<String>,
}

/// The MAC'd columns of `secrets`, `clients` and `groups`, as their
/// [`Table`]s read them: what a write's `RETURNING` gives [`sign_row`].
macro_rules! secret_mac_cols {
    () => {
        "id, name, description, labels, mode, owner, grp, expires_at, current_version, \
         version_count, created_at, updated_at"
    };
}
macro_rules! client_mac_cols {
    () => {
        "id, name, admin, enabled, pinned, created_at"
    };
}
macro_rules! group_mac_cols {
    () => {
        "id, name"
    };
}
pub(super) use {client_mac_cols, group_mac_cols, secret_mac_cols};

macro_rules! table {
    ($name:expr, $table:literal, $cols:expr, at: $at:expr, input: $input:expr, key: $key:expr $(,)?) => {
        Table {
            name: $name,
            select: concat!("SELECT ", $cols, ", ctid::text, mac FROM ", $table),
            set_mac: concat!(
                "UPDATE ",
                $table,
                " SET mac = $1 WHERE ctid = ($2::text)::tid"
            ),
            set_mac_id: concat!("UPDATE ", $table, " SET mac = $1 WHERE id = $2"),
            at: $at,
            input: $input,
            key: $key,
        }
    };
}

fn id(r: &Row, i: usize) -> Result<u64> {
    Ok(r.try_get::<_, i64>(i)? as u64)
}

fn flag(r: &Row, i: usize) -> Result<bool> {
    Ok(r.try_get::<_, i64>(i)? != 0)
}

fn u32_of(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

pub(super) const CLIENTS: Table = table!(
    integrity::CLIENTS,
    "clients",
    client_mac_cols!(),
    at: 6,
    input: |r| {
        Ok(Some(integrity::client(
            id(r, 0)?,
            &r.try_get::<_, String>(1)?,
            flag(r, 2)?,
            flag(r, 3)?,
            flag(r, 4)?,
            r.try_get(5)?,
        )))
    },
    key: |r| Ok(format!("id={}", id(r, 0)?)),
);

pub(super) const CLIENT_CERTS: Table = table!(
    integrity::CLIENT_CERTS,
    "client_certs",
    "client_id, serial, not_after, issued_at",
    at: 4,
    input: |r| {
        Ok(Some(integrity::client_cert(
            id(r, 0)?,
            &r.try_get::<_, String>(1)?,
            r.try_get(2)?,
            r.try_get(3)?,
        )))
    },
    key: |r| Ok(format!("client_id={} serial={}", id(r, 0)?, r.try_get::<_, String>(1)?)),
);

pub(super) const GROUPS: Table = table!(
    integrity::GROUPS,
    "groups",
    group_mac_cols!(),
    at: 2,
    input: |r| Ok(Some(integrity::group(id(r, 0)?, &r.try_get::<_, String>(1)?))),
    key: |r| Ok(format!("id={}", id(r, 0)?)),
);

pub(super) const GROUP_CLIENTS: Table = table!(
    integrity::GROUP_CLIENTS,
    "group_clients",
    "group_id, client_id",
    at: 2,
    input: |r| Ok(Some(integrity::group_client(id(r, 0)?, id(r, 1)?))),
    key: |r| Ok(format!("group_id={} client_id={}", id(r, 0)?, id(r, 1)?)),
);

pub(super) const GROUP_SECRETS: Table = table!(
    integrity::GROUP_SECRETS,
    "group_secrets",
    "group_id, secret_id",
    at: 2,
    input: |r| Ok(Some(integrity::group_secret(id(r, 0)?, id(r, 1)?))),
    key: |r| Ok(format!("group_id={} secret_id={}", id(r, 0)?, id(r, 1)?)),
);

pub(super) const SECRETS: Table = table!(
    integrity::SECRETS,
    "secrets",
    secret_mac_cols!(),
    at: 12,
    input: |r| {
        let (name, description, labels): (String, String, String) =
            (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
        Ok(Some(integrity::secret(&SecretRow {
            id: id(r, 0)?,
            name: &name,
            description: &description,
            labels: &labels,
            mode: u32_of(r.try_get(4)?),
            owner: r.try_get::<_, Option<i64>>(5)?.map(u32_of),
            grp: r.try_get::<_, Option<i64>>(6)?.map(u32_of),
            expires_at: r.try_get(7)?,
            current_version: id(r, 8)?,
            version_count: id(r, 9)?,
            created_at: r.try_get(10)?,
            updated_at: r.try_get(11)?,
        })))
    },
    key: |r| Ok(format!("id={}", id(r, 0)?)),
);

pub(super) const META: Table = table!(
    integrity::META,
    "meta",
    "key, value",
    at: 2,
    input: |r| {
        let key: String = r.try_get(0)?;
        if key == integrity::META_UNSIGNED {
            return Ok(None);
        }
        Ok(Some(integrity::meta(&key, &r.try_get::<_, Vec<u8>>(1)?)))
    },
    key: |r| Ok(format!("key={}", r.try_get::<_, String>(0)?)),
);

pub(super) const TABLES: [&Table; 7] = [
    &META,
    &CLIENTS,
    &CLIENT_CERTS,
    &GROUPS,
    &GROUP_CLIENTS,
    &GROUP_SECRETS,
    &SECRETS,
];

/// Sets a metadata entry with its MAC (none for the one unsigned entry,
/// the master key check): the one place a `meta` row is written.
pub(super) fn write_meta(tx: &mut Tx<'_>, keys: &Keys, key: &str, value: &[u8]) -> Result<()> {
    let mac = (key != integrity::META_UNSIGNED)
        .then(|| keys.row_tag(&integrity::meta(key, value)).to_vec());
    tx.exec(
        "INSERT INTO meta (key, value, mac) VALUES ($1, $2, $3)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, mac = excluded.mac",
        &[&key, &value, &mac],
    )?;
    Ok(())
}

/// Signs the row a write just made or changed as the server bound it
/// (`expected`), never as the database gave it back: a trigger added after
/// the store opened (by anyone with the TRIGGER privilege) could change a
/// row as it is written, and a MAC over `RETURNING` would vouch for that.
/// When the `RETURNING` of the table's MAC'd columns differs, the write is
/// refused (the transaction is rolled back: nothing is written).
pub(super) fn sign_row(
    tx: &mut Tx<'_>,
    keys: &Keys,
    table: &Table,
    row: &Row,
    expected: &MacInput,
) -> Result<()> {
    as_written(table, row, expected)?;
    let tag = keys.row_tag(expected).to_vec();
    let row_id: i64 = row.try_get(0)?;
    tx.later_exec(table.set_mac_id, owned![tag, row_id])
}

/// Checks a row a write returned is as the server wrote it.
pub(super) fn as_written(table: &Table, row: &Row, expected: &MacInput) -> Result<()> {
    let returned = (table.input)(row).ok().flatten();
    if returned.as_ref() != Some(expected) {
        let key = (table.key)(row).unwrap_or_else(|_| "?".into());
        return Err(StoreError::Check(
            format!(
                "the {} row {key} came back from the database other than the server wrote \
                 it: a trigger that is not secretfs's changes rows as they are written (list \
                 the table's triggers, e.g. `\\d {}` in psql, and drop it after review); \
                 nothing was written",
                table.name, table.name
            )
            .into(),
        ));
    }
    Ok(())
}

/// Every row of every protected table whose MAC fails under the current
/// and the previous key, and a missing adoption marker.
pub(super) fn verify(tx: &mut Tx<'_>, keys: &Keys) -> Result<Vec<BadRow>> {
    let mut bad = Vec::new();
    for table in TABLES {
        tx.each(table.select, &[], |r| {
            let mac: Option<Vec<u8>> = r.try_get(table.at + 1)?;
            match (table.input)(r) {
                Ok(None) => {}
                Ok(Some(input)) => {
                    if !mac.as_deref().is_some_and(|m| keys.row_ok(&input, m)) {
                        bad.push(BadRow {
                            table: table.name,
                            key: (table.key)(r)?,
                            what: integrity::what(mac.as_deref()),
                        });
                    }
                }
                Err(_) => bad.push(BadRow {
                    table: table.name,
                    key: format!("ctid={}", r.try_get::<_, String>(table.at)?),
                    what: "a column holds a value out of range (the row was edited without \
                           the master key)"
                        .into(),
                }),
            }
            Ok(true)
        })?;
    }
    let marker = tx.opt(
        "SELECT value FROM meta WHERE key = $1",
        &[&META_ROWS_AUTHENTICATED],
    )?;
    if marker.is_none() {
        bad.push(BadRow {
            table: integrity::META,
            key: format!("key={META_ROWS_AUTHENTICATED}"),
            what: "missing: the record that this database's rows are authenticated was deleted"
                .into(),
        });
    }
    Ok(bad)
}

/// Re-signs under the current key up to `limit` rows whose MAC is good only
/// under the previous key; returns how many.
pub(super) fn reseal(tx: &mut Tx<'_>, keys: &Keys, limit: usize) -> Result<usize> {
    let Some(previous) = &keys.previous else {
        return Ok(0);
    };
    let mut done = 0;
    for table in TABLES {
        let mut todo: Vec<(String, Vec<u8>)> = Vec::new();
        tx.each(table.select, &[], |r| {
            if done + todo.len() >= limit {
                return Ok(false);
            }
            let mac: Option<Vec<u8>> = r.try_get(table.at + 1)?;
            if let (Ok(Some(input)), Some(m)) = ((table.input)(r), mac.as_deref()) {
                if !keys.current.rows().verify(&input, m) && previous.rows().verify(&input, m) {
                    todo.push((r.try_get(table.at)?, keys.row_tag(&input).to_vec()));
                }
            }
            Ok(true)
        })?;
        for (ctid, tag) in todo {
            tx.exec(table.set_mac, &[&tag, &ctid])?;
            done += 1;
        }
        if done >= limit {
            break;
        }
    }
    Ok(done)
}

/// The marker that this database's rows are authenticated (written when
/// it is made).
pub(super) fn put_marker(tx: &mut Tx<'_>, keys: &Keys) -> Result<()> {
    write_meta(tx, keys, META_ROWS_AUTHENTICATED, b"1")
}
