//! A rekey's store side: several metadata entries at once, and moving the
//! wrapped data keys over to the new master key in batches (as
//! `sqlite/rekey.rs`).

use super::commit::Tx;
use crate::keys::Keys;
use crate::rekey::META_CURSOR;
use crate::store::rewrap::{self, cursor_at, cursor_of, rewrap_version};
use crate::store::Result;

/// Sets or deletes several metadata entries, each signed like `put_meta`'s.
pub(super) fn put_metas(
    tx: &mut Tx<'_>,
    keys: &Keys,
    entries: &[(&str, Option<&[u8]>)],
) -> Result<()> {
    for (key, value) in entries {
        match value {
            Some(v) => super::macs::write_meta(tx, keys, key, v)?,
            None => drop(tx.exec("DELETE FROM meta WHERE key = $1", &[key])?),
        };
    }
    Ok(())
}

fn cursor(tx: &mut Tx<'_>) -> Result<(i64, i64)> {
    let blob: Option<Vec<u8>> = tx
        .opt("SELECT value FROM meta WHERE key = $1", &[&META_CURSOR])?
        .map(|r| r.try_get(0))
        .transpose()?;
    Ok(cursor_of(blob.as_deref()))
}

/// One batch; see [`crate::store::Store::rewrap_keys`].
pub(super) fn rewrap(tx: &mut Tx<'_>, keys: &Keys, limit: usize) -> Result<usize> {
    if keys.previous.is_none() {
        return Ok(0);
    }
    let (after_id, after_version) = cursor(tx)?;
    let rows = tx.query(
        "SELECT v.secret_id, v.version, s.name, v.wrapped_key
         FROM secret_versions v JOIN secrets s ON s.id = v.secret_id
         WHERE (v.secret_id, v.version) > ($1, $2)
         ORDER BY v.secret_id, v.version LIMIT $3",
        &[
            &after_id,
            &after_version,
            &(limit.min(i64::MAX as usize) as i64),
        ],
    )?;
    let mut last = None;
    for r in &rows {
        let (id, version, name, wrapped): (i64, i64, String, Vec<u8>) =
            (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
        if let Some(new) = rewrap_version(keys, id, &name, version, &wrapped)? {
            tx.exec(
                "UPDATE secret_versions SET wrapped_key = $3 WHERE secret_id = $1 AND version = $2",
                &[&id, &version, &new],
            )?;
        }
        last = Some((id, version));
    }
    if let Some((id, version)) = last {
        let c = cursor_at(id, version);
        put_metas(tx, keys, &[(META_CURSOR, Some(&c))])?;
    }
    Ok(rows.len())
}

/// See [`crate::store::Store::versions_not_opening`].
pub(super) fn not_opening(
    tx: &mut Tx<'_>,
    key: &crate::envelope::MasterKey,
) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    tx.each(
        "SELECT v.secret_id, v.version, s.name, v.wrapped_key
         FROM secret_versions v JOIN secrets s ON s.id = v.secret_id
         ORDER BY v.secret_id, v.version",
        &[],
        |r| {
            let (id, version, name): (i64, i64, String) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            let wrapped: Vec<u8> = r.try_get(3)?;
            if !rewrap::opens(key, id, &name, version, &wrapped) {
                out.push((name, version as u64));
            }
            Ok(true)
        },
    )?;
    Ok(out)
}
