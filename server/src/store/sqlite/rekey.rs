//! A rekey's store side: several metadata entries at once, and moving the
//! wrapped data keys over to the new master key in batches.

use rusqlite::{params, Connection, OptionalExtension};

use crate::keys::Keys;
use crate::rekey::META_CURSOR;
use crate::store::rewrap::{self, cursor_at, cursor_of, rewrap_version};
use crate::store::Result;

/// Sets or deletes several metadata entries, each signed like `put_meta`'s.
pub(super) fn put_metas(
    tx: &Connection,
    keys: &Keys,
    entries: &[(&str, Option<&[u8]>)],
) -> Result<()> {
    for (key, value) in entries {
        match value {
            Some(v) => super::macs::write_meta(tx, keys, key, v)?,
            None => drop(tx.execute("DELETE FROM meta WHERE key = ?1", [key])?),
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
    Ok(cursor_of(blob.as_deref()))
}

/// One batch; see [`crate::store::Store::rewrap_keys`]. A version neither
/// key opens (damaged before the rekey) is left as it is: it did not read
/// before and does not now.
pub(super) fn rewrap(tx: &Connection, keys: &Keys, limit: usize) -> Result<usize> {
    if keys.previous.is_none() {
        return Ok(0);
    }
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
        if let Some(new) = rewrap_version(keys, *id, name, *version, wrapped)? {
            tx.execute(
                "UPDATE secret_versions SET wrapped_key = ?3 WHERE secret_id = ?1 AND version = ?2",
                params![id, version, new],
            )?;
        }
    }
    if let Some((id, version, _, _)) = rows.last() {
        let c = cursor_at(*id, *version);
        put_metas(tx, keys, &[(META_CURSOR, Some(&c))])?;
    }
    Ok(rows.len())
}

/// See [`crate::store::Store::versions_not_opening`].
pub(super) fn not_opening(
    tx: &Connection,
    key: &crate::envelope::MasterKey,
) -> Result<Vec<(String, u64)>> {
    let mut stmt = tx.prepare(
        "SELECT v.secret_id, v.version, s.name, v.wrapped_key
         FROM secret_versions v JOIN secrets s ON s.id = v.secret_id
         ORDER BY v.secret_id, v.version",
    )?;
    let mut rows = stmt.query([])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let (id, version, name): (i64, i64, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
        let wrapped: Vec<u8> = r.get(3)?;
        if !rewrap::opens(key, id, &name, version, &wrapped) {
            out.push((name, version as u64));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Binding, MasterKey, Sealed};
    use crate::keys::{KeyRing, KeySet};
    use crate::store::sqlite::SqliteStore;
    use crate::store::{AuditEntry, NewSecret, Store};

    fn add(store: &SqliteStore, ring: &KeyRing, name: &str, content: &[u8]) {
        let new = NewSecret {
            name: name.into(),
            size: content.len() as u64,
            ..NewSecret::default()
        };
        let audit = AuditEntry {
            actor: "t".into(),
            action: "secret.create".into(),
            allowed: true,
            ..Default::default()
        };
        store
            .create_secret(&new, &audit, &mut |id, version| {
                let binding = Binding {
                    secret_id: id,
                    name,
                    version,
                };
                Ok(ring.get().current.master().seal(binding, content).unwrap())
            })
            .unwrap();
    }

    /// A version row: id, version, name, wrapped key, ciphertext.
    type Row = (i64, i64, String, Vec<u8>, Vec<u8>);

    /// Every version's content, opened under `key` alone.
    fn contents(store: &SqliteStore, key: &MasterKey) -> Vec<Option<Vec<u8>>> {
        let rows: Vec<Row> = store
            .db
            .read(|tx| {
                Ok(tx
                    .prepare(
                        "SELECT v.secret_id, v.version, s.name, v.wrapped_key, v.ciphertext
                         FROM secret_versions v JOIN secrets s ON s.id = v.secret_id ORDER BY 1, 2",
                    )?
                    .query_map([], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })?
                    .collect::<rusqlite::Result<_>>()?)
            })
            .unwrap();
        rows.into_iter()
            .map(|(id, version, name, wrapped_key, ciphertext)| {
                let binding = Binding {
                    secret_id: id as u64,
                    name: &name,
                    version: version as u64,
                };
                key.open(
                    binding,
                    &Sealed {
                        wrapped_key,
                        ciphertext,
                    },
                )
                .ok()
                .map(|p| p.as_bytes().to_vec())
            })
            .collect()
    }

    #[test]
    fn rewrap_moves_every_version_in_batches_from_its_cursor() {
        let old = KeySet::new(1, MasterKey::generate().unwrap());
        let new = KeySet::new(2, MasterKey::generate().unwrap());
        let ring = KeyRing::of(Keys::of(old.at_epoch(1).into(), None));
        let store = SqliteStore::open_in_memory_with(ring.clone()).unwrap();
        for i in 0..6u8 {
            add(&store, &ring, &format!("s{i}"), &[i; 5]);
        }
        assert_eq!(store.rewrap_keys(4).unwrap(), 0, "no rekey, nothing to do");
        let want: Vec<_> = (0..6u8).map(|i| Some(vec![i; 5])).collect();
        assert_eq!(contents(&store, old.master()), want);

        ring.replace(Keys::of(
            new.at_epoch(2).into(),
            Some(old.at_epoch(1).into()),
        ));
        // Written during the rekey: already under the new key.
        add(&store, &ring, "during", b"late");
        assert_eq!(store.rewrap_keys(4).unwrap(), 4);
        let halfway = contents(&store, new.master());
        assert_eq!(halfway.iter().filter(|c| c.is_some()).count(), 5);
        assert_eq!(store.rewrap_keys(4).unwrap(), 3);
        assert_eq!(store.rewrap_keys(4).unwrap(), 0);
        let mut want = want;
        want.push(Some(b"late".to_vec()));
        assert_eq!(contents(&store, new.master()), want);
        assert!(contents(&store, old.master()).iter().all(Option::is_none));
    }

    #[test]
    fn put_metas_sets_and_deletes_together() {
        let store = SqliteStore::open_in_memory().unwrap();
        store
            .put_metas(&[("a", Some(b"1")), ("b", Some(b"2"))])
            .unwrap();
        store.put_metas(&[("a", None), ("b", Some(b"3"))]).unwrap();
        assert_eq!(store.get_meta("a").unwrap(), None);
        assert_eq!(store.get_meta("b").unwrap(), Some(b"3".to_vec()));
    }
}
