//! Row MACs in SQLite: signing a row a write just made, and the whole-table
//! walks (`verify_rows`, `reseal_rows`, the adoption of an upgraded
//! database). What each MAC covers is `store::integrity`'s.

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::keys::{Keys, MacInput};
use crate::store::integrity::{self, BadRow, SecretRow, META_ROWS_AUTHENTICATED};
use crate::store::{Result, StoreError};

/// One protected table: static SQL over its MAC'd columns followed by
/// `rowid` and `mac`, how a row becomes its MAC input (`None`: a row that
/// is not signed) and its key (for reports only).
pub(super) struct Table {
    pub name: &'static str,
    /// Every row.
    select: &'static str,
    /// The row with `rowid = ?1`.
    select_one: &'static str,
    /// Sets `mac = ?1` of the row with `rowid = ?2`.
    set_mac: &'static str,
    /// Index of `rowid` in the selects; `mac` follows it.
    at: usize,
    input: fn(&Row<'_>) -> rusqlite::Result<Option<MacInput>>,
    key: fn(&Row<'_>) -> rusqlite::Result<String>,
}

/// A [`Table`] with its SQL put together at compile time from the table
/// (a literal equal to `$name`) and its MAC'd columns.
macro_rules! table {
    ($name:expr, $table:literal, $cols:literal, at: $at:expr, input: $input:expr, key: $key:expr $(,)?) => {
        Table {
            name: $name,
            select: concat!("SELECT ", $cols, ", rowid, mac FROM ", $table),
            select_one: concat!(
                "SELECT ",
                $cols,
                ", rowid, mac FROM ",
                $table,
                " WHERE rowid = ?1"
            ),
            set_mac: concat!("UPDATE ", $table, " SET mac = ?1 WHERE rowid = ?2"),
            at: $at,
            input: $input,
            key: $key,
        }
    };
}

pub(super) const CLIENTS: Table = table!(
    integrity::CLIENTS,
    "clients",
    "id, name, admin, enabled, pinned, created_at",
    at: 6,
    input: |r| {
        Ok(Some(integrity::client(
            r.get::<_, i64>(0)? as u64,
            &r.get::<_, String>(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        )))
    },
    key: |r| Ok(format!("id={}", r.get::<_, i64>(0)? as u64)),
);

pub(super) const CLIENT_CERTS: Table = table!(
    integrity::CLIENT_CERTS,
    "client_certs",
    "client_id, serial, not_after, issued_at",
    at: 4,
    input: |r| {
        Ok(Some(integrity::client_cert(
            r.get::<_, i64>(0)? as u64,
            &r.get::<_, String>(1)?,
            r.get(2)?,
            r.get(3)?,
        )))
    },
    key: |r| {
        Ok(format!(
            "client_id={} serial={}",
            r.get::<_, i64>(0)? as u64,
            r.get::<_, String>(1)?
        ))
    },
);

pub(super) const GROUPS: Table = table!(
    integrity::GROUPS,
    "groups",
    "id, name",
    at: 2,
    input: |r| {
        Ok(Some(integrity::group(
            r.get::<_, i64>(0)? as u64,
            &r.get::<_, String>(1)?,
        )))
    },
    key: |r| Ok(format!("id={}", r.get::<_, i64>(0)? as u64)),
);

pub(super) const GROUP_CLIENTS: Table = table!(
    integrity::GROUP_CLIENTS,
    "group_clients",
    "group_id, client_id",
    at: 2,
    input: |r| {
        Ok(Some(integrity::group_client(
            r.get::<_, i64>(0)? as u64,
            r.get::<_, i64>(1)? as u64,
        )))
    },
    key: |r| {
        Ok(format!(
            "group_id={} client_id={}",
            r.get::<_, i64>(0)? as u64,
            r.get::<_, i64>(1)? as u64
        ))
    },
);

pub(super) const GROUP_SECRETS: Table = table!(
    integrity::GROUP_SECRETS,
    "group_secrets",
    "group_id, secret_id",
    at: 2,
    input: |r| {
        Ok(Some(integrity::group_secret(
            r.get::<_, i64>(0)? as u64,
            r.get::<_, i64>(1)? as u64,
        )))
    },
    key: |r| {
        Ok(format!(
            "group_id={} secret_id={}",
            r.get::<_, i64>(0)? as u64,
            r.get::<_, i64>(1)? as u64
        ))
    },
);

pub(super) const SECRETS: Table = table!(
    integrity::SECRETS,
    "secrets",
    "id, name, description, labels, mode, owner, grp, expires_at, current_version, \
     version_count, created_at, updated_at",
    at: 12,
    input: |r| {
        let (name, description, labels): (String, String, String) =
            (r.get(1)?, r.get(2)?, r.get(3)?);
        Ok(Some(integrity::secret(&SecretRow {
            id: r.get::<_, i64>(0)? as u64,
            name: &name,
            description: &description,
            labels: &labels,
            mode: r.get(4)?,
            owner: r.get(5)?,
            grp: r.get(6)?,
            expires_at: r.get(7)?,
            current_version: r.get::<_, i64>(8)? as u64,
            version_count: r.get::<_, i64>(9)? as u64,
            created_at: r.get(10)?,
            updated_at: r.get(11)?,
        })))
    },
    key: |r| Ok(format!("id={}", r.get::<_, i64>(0)? as u64)),
);

pub(super) const META: Table = table!(
    integrity::META,
    "meta",
    "key, value",
    at: 2,
    input: |r| {
        let key: String = r.get(0)?;
        if key == integrity::META_UNSIGNED {
            return Ok(None);
        }
        Ok(Some(integrity::meta(&key, &meta_value(r, 1)?)))
    },
    key: |r| Ok(format!("key={}", r.get::<_, String>(0)?)),
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
pub(super) fn write_meta(tx: &Connection, keys: &Keys, key: &str, value: &[u8]) -> Result<()> {
    let mac = (key != integrity::META_UNSIGNED)
        .then(|| keys.row_tag(&integrity::meta(key, value)).to_vec());
    tx.execute(
        "INSERT INTO meta (key, value, mac) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, mac = excluded.mac",
        params![key, value, mac],
    )?;
    Ok(())
}

/// A meta value as bytes, whether stored as a blob or (edited by hand) as
/// text.
pub(super) fn meta_value(r: &Row<'_>, i: usize) -> rusqlite::Result<Vec<u8>> {
    use rusqlite::types::ValueRef;
    match r.get_ref(i)? {
        ValueRef::Blob(b) | ValueRef::Text(b) => Ok(b.to_vec()),
        other => Err(rusqlite::Error::InvalidColumnType(
            i,
            "value".into(),
            other.data_type(),
        )),
    }
}

/// Calls `f(input, mac, rowid)` for every signed row that `sql` (one of
/// `table`'s selects, with `?1` bound to `arg` if given) selects.
fn scan(
    tx: &Connection,
    table: &Table,
    sql: &str,
    arg: Option<i64>,
    mut f: impl FnMut(MacInput, Option<Vec<u8>>, i64) -> Result<()>,
) -> Result<()> {
    scan_all(tx, table, sql, arg, |r, mac, rowid| {
        match (table.input)(r) {
            Ok(Some(input)) => f(input, mac, rowid),
            Ok(None) => Ok(()),
            Err(e) => Err(e.into()),
        }
    })
}

/// As [`scan`], handing on every row as it is (a row whose columns cannot
/// be read, a value of the wrong type put there by hand, does not stop it).
fn scan_all(
    tx: &Connection,
    table: &Table,
    sql: &str,
    arg: Option<i64>,
    mut f: impl FnMut(&Row<'_>, Option<Vec<u8>>, i64) -> Result<()>,
) -> Result<()> {
    let mut stmt = tx.prepare_cached(sql)?;
    let mut rows = match arg {
        Some(a) => stmt.query([a])?,
        None => stmt.query([])?,
    };
    while let Some(r) = rows.next()? {
        let rowid: i64 = r.get(table.at)?;
        // A mac that is not a blob is as good as none.
        let mac = r.get::<_, Option<Vec<u8>>>(table.at + 1).unwrap_or(None);
        f(r, mac, rowid)?;
    }
    Ok(())
}

fn set_mac(tx: &Connection, table: &Table, rowid: i64, mac: &[u8]) -> Result<()> {
    tx.prepare_cached(table.set_mac)?
        .execute(params![mac, rowid])?;
    Ok(())
}

/// Signs the row of `table` with this `rowid` (one a write of this
/// transaction just made or checked) under the current key.
pub(super) fn sign(tx: &Connection, keys: &Keys, table: &Table, rowid: i64) -> Result<()> {
    let mut found = None;
    scan(tx, table, table.select_one, Some(rowid), |input, _, _| {
        found = Some(keys.row_tag(&input));
        Ok(())
    })?;
    match found {
        Some(tag) => set_mac(tx, table, rowid, &tag),
        // The meta row that is not signed.
        None => Ok(()),
    }
}

/// Every row of every protected table whose MAC fails under the current
/// and the previous key, and a missing adoption marker.
pub(super) fn verify(tx: &Connection, keys: &Keys) -> Result<Vec<BadRow>> {
    let mut bad = Vec::new();
    for table in TABLES {
        scan_all(tx, table, table.select, None, |r, mac, rowid| {
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
                    key: format!("rowid={rowid}"),
                    what: "a column holds a value of the wrong type (the row was edited without \
                           the master key)"
                        .into(),
                }),
            }
            Ok(())
        })?;
    }
    let marker: Option<Vec<u8>> = tx
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [META_ROWS_AUTHENTICATED],
            |r| r.get(0),
        )
        .optional()?;
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
pub(super) fn reseal(tx: &Connection, keys: &Keys, limit: usize) -> Result<usize> {
    let Some(previous) = &keys.previous else {
        return Ok(0);
    };
    let mut done = 0;
    for table in TABLES {
        let mut todo = Vec::new();
        scan(tx, table, table.select, None, |input, mac, rowid| {
            if done + todo.len() < limit {
                if let Some(m) = mac.as_deref() {
                    if !keys.current.rows().verify(&input, m) && previous.rows().verify(&input, m) {
                        todo.push((rowid, keys.row_tag(&input)));
                    }
                }
            }
            Ok(())
        })?;
        for (rowid, tag) in todo {
            set_mac(tx, table, rowid, &tag)?;
            done += 1;
        }
        if done >= limit {
            break;
        }
    }
    Ok(done)
}

/// The adoption: signs every row of a database that had no row MACs, once,
/// in the transaction of the migration that added them.
///
/// Run only by that migration (a database at that schema or later never
/// adopts again, whatever MACs are NULLed or rows deleted), and refused
/// when the database already carries a good adoption marker (its schema
/// was put back to an older version) or when the master key does not
/// open the database's key check (rows are signed only under the key the
/// database was made with).
pub(super) fn adopt(tx: &Connection, keys: &Keys) -> Result<()> {
    let marker: Option<(Vec<u8>, Option<Vec<u8>>)> = tx
        .query_row(
            "SELECT value, mac FROM meta WHERE key = ?1",
            [META_ROWS_AUTHENTICATED],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((value, Some(mac))) = marker {
        if keys.row_ok(&integrity::meta(META_ROWS_AUTHENTICATED, &value), &mac) {
            return Err(StoreError::Backend(
                "this database's rows were already authenticated, yet its schema is older: \
                 it was tampered with; restore it from a backup"
                    .into(),
            ));
        }
    }
    let mut rows = 0usize;
    for table in TABLES {
        scan(tx, table, table.select, None, |_, _, _| {
            rows += 1;
            Ok(())
        })?;
    }
    super::adoption_key_check(tx, keys, rows > 0)?;
    let mut signed = 0usize;
    for table in TABLES {
        let mut todo = Vec::new();
        scan(tx, table, table.select, None, |input, _, rowid| {
            todo.push((rowid, keys.row_tag(&input)));
            Ok(())
        })?;
        for (rowid, tag) in todo {
            set_mac(tx, table, rowid, &tag)?;
            signed += 1;
        }
    }
    put_marker(tx, keys)?;
    if signed > 0 {
        tracing::warn!(
            rows = signed,
            "authenticated rows: the rows of this database (made before row MACs) were signed \
             once under the master key; from now on an edit made without the key is detected"
        );
    }
    Ok(())
}

fn put_marker(tx: &Connection, keys: &Keys) -> Result<()> {
    write_meta(tx, keys, META_ROWS_AUTHENTICATED, b"1")
}
