//! Secrets, their versions, and what a client may read of them.

use rusqlite::{params, Connection, OptionalExtension};

use super::audit::{record_change, revision};
use super::macs;
use super::rows::{
    self, insert_named, secret_cols, select_granted, select_granted_sealed, select_secrets,
    SEALED_PATH, VIEW_PATH,
};
use crate::envelope::Sealed;
use crate::store::integrity::Checker;
use crate::store::*;

/// The secret, if its row's MAC is good (a bad row is NotFound).
pub(super) fn by_name(tx: &Connection, ck: &Checker<'_>, name: &str) -> Result<SecretRecord> {
    tx.prepare_cached(select_secrets!("WHERE s.name = ?1"))?
        .query_row([name], |r| rows::secret(r, ck))
        .optional()?
        .flatten()
        .ok_or_else(|| StoreError::not_found(Entity::Secret, name))
}

fn insert_version(
    tx: &Connection,
    id: i64,
    version: u64,
    size: u64,
    actor: &str,
    sealed: &Sealed,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO secret_versions (secret_id, version, wrapped_key, ciphertext, size, created_at, created_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![id, version as i64, sealed.wrapped_key, sealed.ciphertext, size as i64, now_s(), actor])?;
    Ok(())
}

/// A secret that would share a path with `name` as file and directory:
/// an ancestor (`db` for `db/password`) or a descendant (`db/password` for
/// `db`). Run inside the creating transaction (the writer's), so no other
/// create can slip in between the check and the insert.
fn conflicting(tx: &Connection, name: &str) -> Result<Option<String>> {
    let mut exact = tx.prepare_cached("SELECT name FROM secrets WHERE name = ?1")?;
    for (i, _) in name.match_indices('/') {
        let ancestor = &name[..i];
        if let Some(found) = exact
            .query_row([ancestor], |r| r.get::<_, String>(0))
            .optional()?
        {
            return Ok(Some(found));
        }
    }
    Ok(tx
        .prepare_cached(DESCENDANT)?
        .query_row([name], |r| r.get(0))
        .optional()?)
}

/// The first secret under `?1/`: a range on the name's unique index (names
/// compare bytewise, and '0' is the byte after '/'), not a scan of the
/// table on every create (nor LIKE: '_' in names is a LIKE wildcard).
const DESCENDANT: &str = "SELECT name FROM secrets WHERE name >= ?1 || '/' AND name < ?1 || '0'
      ORDER BY name LIMIT 1";

pub(super) fn create(
    tx: &Connection,
    ck: &Checker<'_>,
    new: &NewSecret,
    audit: &AuditEntry,
    seal: SealFn<'_>,
) -> Result<Committed<SecretRecord>> {
    if let Some(existing) = conflicting(tx, &new.name)? {
        return Err(StoreError::NameConflict {
            name: new.name.clone(),
            existing,
        });
    }
    let now = now_s();
    let labels = serde_json::to_string(&new.labels).map_err(StoreError::backend)?;
    let inserted = tx.execute(
        "INSERT INTO secrets (name, description, labels, mode, owner, grp, expires_at,
                              current_version, version_count, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, 1, ?8, ?8)",
        params![
            new.name,
            new.description,
            labels,
            new.mode,
            new.owner,
            new.group,
            new.expires_at,
            now
        ],
    );
    insert_named(inserted, Entity::Secret, &new.name)?;
    let id = tx.last_insert_rowid();
    macs::sign(tx, ck.keys, &macs::SECRETS, id)?;
    let sealed = seal(id as u64, 1)?;
    insert_version(tx, id, 1, new.size, &audit.actor, &sealed)?;
    let revision = record_change(
        tx,
        &AuditEntry {
            version: Some(1),
            ..audit.clone()
        },
    )?;
    Ok(Committed {
        value: by_name(tx, ck, &new.name)?,
        revision,
    })
}

pub(super) fn rotate(
    tx: &Connection,
    ck: &Checker<'_>,
    name: &str,
    size: u64,
    expires: Option<Option<i64>>,
    audit: &AuditEntry,
    seal: SealFn<'_>,
) -> Result<Committed<SecretRecord>> {
    let current = by_name(tx, ck, name)?;
    let version = current.version_count + 1;
    let sealed = seal(current.id, version)?;
    insert_version(tx, current.id as i64, version, size, &audit.actor, &sealed)?;
    let now = now_s();
    let expires_at = match expires {
        Some(set) => set,
        None => current.expires_at.filter(|t| *t > now),
    };
    tx.prepare_cached(
        "UPDATE secrets SET current_version = ?2, version_count = ?2, updated_at = ?3, expires_at = ?4
          WHERE id = ?1",
    )?
    .execute(params![current.id as i64, version as i64, now, expires_at])?;
    macs::sign(tx, ck.keys, &macs::SECRETS, current.id as i64)?;
    let mut entry = AuditEntry {
        version: Some(version),
        ..audit.clone()
    };
    if let Some(what) = detail::expiry_moved(expires, current.expires_at, expires_at) {
        entry = entry.with_detail(&what);
    }
    let revision = record_change(tx, &entry)?;
    Ok(Committed {
        value: by_name(tx, ck, name)?,
        revision,
    })
}

pub(super) fn rollback(
    tx: &Connection,
    ck: &Checker<'_>,
    name: &str,
    version: u64,
    audit: &AuditEntry,
) -> Result<Committed<SecretRecord>> {
    let current = by_name(tx, ck, name)?;
    let exists: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM secret_versions WHERE secret_id = ?1 AND version = ?2)",
        params![current.id as i64, version as i64],
        |r| r.get(0),
    )?;
    if !exists {
        return Err(StoreError::NoSuchVersion {
            name: name.to_owned(),
            version,
        });
    }
    tx.execute(
        "UPDATE secrets SET current_version = ?2, updated_at = ?3 WHERE id = ?1",
        params![current.id as i64, version as i64, now_s()],
    )?;
    macs::sign(tx, ck.keys, &macs::SECRETS, current.id as i64)?;
    let revision = record_change(
        tx,
        &AuditEntry {
            version: Some(version),
            detail: detail::rolled_back_from(current.current_version),
            ..audit.clone()
        },
    )?;
    Ok(Committed {
        value: by_name(tx, ck, name)?,
        revision,
    })
}

pub(super) fn update(
    tx: &Connection,
    ck: &Checker<'_>,
    name: &str,
    update: &SecretUpdate,
    check: CheckFn<'_>,
    audit: &AuditEntry,
) -> Result<Committed<SecretRecord>> {
    let mut record = by_name(tx, ck, name)?;
    let changed = update.apply(&mut record);
    check(&record)?;
    if !changed.is_empty() {
        let labels = serde_json::to_string(&record.labels).map_err(StoreError::backend)?;
        tx.prepare_cached(
            "UPDATE secrets SET description = ?2, labels = ?3, mode = ?4, owner = ?5, grp = ?6,
                    expires_at = ?7, updated_at = ?8 WHERE id = ?1",
        )?
        .execute(params![
            record.id as i64,
            record.description,
            labels,
            record.mode,
            record.owner,
            record.group,
            record.expires_at,
            now_s()
        ])?;
        macs::sign(tx, ck.keys, &macs::SECRETS, record.id as i64)?;
    }
    let revision = record_change(
        tx,
        &AuditEntry {
            version: Some(record.current_version),
            ..audit.with_detail(&detail::updated(&changed))
        },
    )?;
    Ok(Committed {
        value: by_name(tx, ck, name)?,
        revision,
    })
}

pub(super) fn delete(tx: &Connection, name: &str, audit: &AuditEntry) -> Result<Committed<u64>> {
    let id = rows::id_by_name(tx, Entity::Secret, name)?;
    let versions: i64 = tx.query_row(
        "SELECT count(*) FROM secret_versions WHERE secret_id = ?1",
        [id],
        |r| r.get(0),
    )?;
    let groups = rows::names(
        tx,
        "SELECT g.name FROM group_secrets gs JOIN groups g ON g.id = gs.group_id
          WHERE gs.secret_id = ?1 ORDER BY g.name",
        id,
    )?;
    tx.execute("DELETE FROM secrets WHERE id = ?1", [id])?;
    let what = detail::secret_deleted(versions, &groups);
    let revision = record_change(tx, &audit.with_detail(&what))?;
    Ok(Committed {
        value: id as u64,
        revision,
    })
}

/// Every secret whose row's MAC is good.
pub(super) fn list(tx: &Connection, ck: &Checker<'_>) -> Result<Vec<SecretRecord>> {
    let mut stmt = tx.prepare_cached(select_secrets!("ORDER BY s.name"))?;
    let rows = stmt.query_map([], |r| rows::secret(r, ck))?;
    let mut out = Vec::new();
    for r in rows {
        out.extend(r?);
    }
    Ok(out)
}

pub(super) fn versions(
    tx: &Connection,
    ck: &Checker<'_>,
    name: &str,
) -> Result<Vec<VersionRecord>> {
    let secret = by_name(tx, ck, name)?;
    let mut stmt = tx.prepare_cached(
        "SELECT version, created_at, created_by, size FROM secret_versions WHERE secret_id = ?1 ORDER BY version",
    )?;
    let rows = stmt.query_map([secret.id as i64], |r| {
        let version = r.get::<_, i64>(0)? as u64;
        Ok(VersionRecord {
            version,
            created_at: r.get(1)?,
            created_by: r.get(2)?,
            size: r.get::<_, i64>(3)? as u64,
            current: version == secret.current_version,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The secrets client `client_id` may read: each through a path whose
/// membership rows are good, and only when the secret's own row is good.
fn readable(tx: &Connection, ck: &Checker<'_>, client_id: u64) -> Result<Vec<SecretRecord>> {
    let mut stmt = tx.prepare_cached(select_granted!("ORDER BY s.name, gs.group_id"))?;
    let mut rows = stmt.query([client_id as i64])?;
    let mut out: Vec<SecretRecord> = Vec::new();
    // A secret held by several groups comes once per group, in a run.
    let mut settled: Option<u64> = None;
    let mut memberships = Default::default();
    while let Some(r) = rows.next()? {
        let id = r.get::<_, i64>(0)? as u64;
        if settled == Some(id) || !rows::path_ok(r, VIEW_PATH, client_id, ck, &mut memberships)? {
            continue;
        }
        settled = Some(id);
        out.extend(rows::secret(r, ck)?);
    }
    Ok(out)
}

pub(super) fn client_view(tx: &Connection, ck: &Checker<'_>, client_id: u64) -> Result<View> {
    Ok(View {
        revision: revision(tx)?,
        secrets: readable(tx, ck, client_id)?,
    })
}

/// The first good path's sealed secret among `rows`.
fn first_granted(
    rows: &mut rusqlite::Rows<'_>,
    client_id: u64,
    ck: &Checker<'_>,
) -> Result<Option<SealedSecret>> {
    let mut memberships = Default::default();
    while let Some(r) = rows.next()? {
        if rows::path_ok(r, SEALED_PATH, client_id, ck, &mut memberships)? {
            return Ok(rows::sealed_secret(r, ck)?);
        }
    }
    Ok(None)
}

pub(super) fn read_sealed(
    tx: &Connection,
    ck: &Checker<'_>,
    client_id: u64,
    names: &[String],
) -> Result<(Vec<SealedSecret>, Vec<String>)> {
    // Named reads cost what they ask for, not the client's whole view.
    let mut stmt = tx.prepare_cached(select_granted_sealed!("WHERE s.name = ?2"))?;
    let mut out = Vec::with_capacity(names.len());
    let mut denied = Vec::new();
    for n in names {
        let mut rows = stmt.query(params![client_id as i64, n])?;
        match first_granted(&mut rows, client_id, ck)? {
            Some(s) => out.push(s),
            None => denied.push(n.clone()),
        }
    }
    Ok((out, denied))
}

pub(super) fn read_one_for_client(
    tx: &Connection,
    ck: &Checker<'_>,
    client_id: u64,
    secret_id: u64,
) -> Result<Option<SealedSecret>> {
    let mut stmt = tx.prepare_cached(select_granted_sealed!("WHERE s.id = ?2"))?;
    let mut rows = stmt.query(params![client_id as i64, secret_id as i64])?;
    first_granted(&mut rows, client_id, ck)
}

/// The names of the secrets group `group_id` holds through good rows.
pub(super) fn of_group(
    tx: &Connection,
    ck: &Checker<'_>,
    group_id: Option<i64>,
) -> Result<Vec<(i64, String)>> {
    macro_rules! held {
        ($where:literal) => {
            concat!(
                "SELECT ",
                secret_cols!(),
                ", gs.group_id, gs.mac FROM group_secrets gs JOIN secrets s ON s.id = gs.secret_id ",
                $where,
                " ORDER BY gs.group_id, s.name"
            )
        };
    }
    // Two statements, so one group's lookup uses the index.
    let mut stmt;
    let mut rows = match group_id {
        Some(id) => {
            stmt = tx.prepare_cached(held!("WHERE gs.group_id = ?1"))?;
            stmt.query([id])?
        }
        None => {
            stmt = tx.prepare_cached(held!(""))?;
            stmt.query([])?
        }
    };
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let gid: i64 = r.get(13)?;
        let mac: Option<Vec<u8>> = r.get(14)?;
        let sid = r.get::<_, i64>(0)? as u64;
        if ck.group_secret_ok(gid as u64, sid, mac.as_deref()) {
            if let Some(s) = rows::secret_at(r, 0, ck)? {
                out.push((gid, s.name));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descendant_check_uses_the_name_index() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::migrate::migrate(&mut conn, &mut |_, _| Ok(())).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {DESCENDANT}"))
            .unwrap()
            .query_map(["db"], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|p| p.contains("USING") && p.contains("INDEX"))
                && !plan.iter().any(|p| p.starts_with("SCAN")),
            "{plan:?}"
        );
    }
}
