//! A rekey's store side: several metadata entries at once, and moving the
//! wrapped data keys over to the new master key in batches.

use rusqlite::{params, Connection, OptionalExtension};

use crate::envelope::Binding;
use crate::keys::Keys;
use crate::store::{Result, StoreError};

/// Where the last batch stopped: `secret_id || version`, big-endian.
pub(crate) const META_CURSOR: &str = "rekey_cursor";

pub(super) fn put_metas(tx: &Connection, entries: &[(&str, Option<&[u8]>)]) -> Result<()> {
    for (key, value) in entries {
        match value {
            Some(v) => tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, v],
            )?,
            None => tx.execute("DELETE FROM meta WHERE key = ?1", [key])?,
        };
    }
    Ok(())
}

fn cursor(tx: &Connection) -> Result<(i64, i64)> {
    let blob: Option<Vec<u8>> = tx
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [META_CURSOR],
            |r| r.get(0),
        )
        .optional()?;
    Ok(match blob {
        Some(b) if b.len() == 16 => (
            i64::from_be_bytes(b[..8].try_into().unwrap_or_default()),
            i64::from_be_bytes(b[8..].try_into().unwrap_or_default()),
        ),
        _ => (-1, -1),
    })
}

/// One batch; see [`crate::store::Store::rewrap_keys`]. A version neither
/// key opens (damaged before the rekey) is left as it is: it did not read
/// before and does not now.
pub(super) fn rewrap(tx: &Connection, keys: &Keys, limit: usize) -> Result<usize> {
    let Some(previous) = &keys.previous else {
        return Ok(0);
    };
    let (after_id, after_version) = cursor(tx)?;
    let rows: Vec<(i64, i64, String, Vec<u8>)> = tx
        .prepare(
            "SELECT v.secret_id, v.version, s.name, v.wrapped_key
             FROM secret_versions v JOIN secrets s ON s.id = v.secret_id
             WHERE (v.secret_id, v.version) > (?1, ?2)
             ORDER BY v.secret_id, v.version LIMIT ?3",
        )?
        .query_map(
            params![after_id, after_version, limit.min(i64::MAX as usize) as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?
        .collect::<rusqlite::Result<_>>()?;
    for (id, version, name, wrapped) in &rows {
        let binding = Binding {
            secret_id: *id as u64,
            name,
            version: *version as u64,
        };
        match keys
            .current
            .master()
            .rewrap(previous.master(), binding, wrapped)
        {
            Ok(Some(new)) => {
                tx.execute(
                    "UPDATE secret_versions SET wrapped_key = ?3 WHERE secret_id = ?1 AND version = ?2",
                    params![id, version, new],
                )?;
            }
            Ok(None) => {}
            Err(crate::error::Error::Integrity { .. }) => {
                tracing::warn!(secret = %name, version, "rekey: this version's data key opens under neither master key; left as it was");
            }
            Err(e) => return Err(StoreError::Seal(Box::new(e))),
        }
    }
    if let Some((id, version, _, _)) = rows.last() {
        let mut c = id.to_be_bytes().to_vec();
        c.extend_from_slice(&version.to_be_bytes());
        put_metas(tx, &[(META_CURSOR, Some(&c))])?;
    }
    Ok(rows.len())
}
