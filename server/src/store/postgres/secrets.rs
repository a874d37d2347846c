//! Secrets, their versions, and what a client may read of them (as
//! `sqlite/secrets.rs`).

use super::audit::{record_change, revision};
use super::commit::{owned, Tx};
use super::macs::{self, secret_mac_cols};
use super::rows::{
    self, insert_named, secret_cols, select_granted, select_granted_sealed, select_secrets,
    SEALED_PATH, VIEW_PATH,
};
use super::session::Want;
use crate::envelope::Sealed;
use crate::store::integrity::Checker;
use crate::store::*;

/// The secret, if its row's MAC is good (a bad row is NotFound).
pub(super) fn by_name(tx: &mut Tx<'_>, ck: &Checker<'_>, name: &str) -> Result<SecretRecord> {
    match tx.opt(select_secrets!("WHERE s.name = $1"), &[&name])? {
        Some(r) => rows::secret(&r, ck)?,
        None => None,
    }
    .ok_or_else(|| StoreError::not_found(Entity::Secret, name))
}

/// Inserts a version made at `at` (sent with the job's next round trip).
fn insert_version(
    tx: &mut Tx<'_>,
    id: i64,
    version: u64,
    size: u64,
    actor: &str,
    sealed: &Sealed,
    at: i64,
) -> Result<()> {
    tx.later_exec(
        "INSERT INTO secret_versions (secret_id, version, wrapped_key, ciphertext, size, created_at, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        owned![
            id,
            version as i64,
            sealed.wrapped_key.clone(),
            sealed.ciphertext.clone(),
            size as i64,
            at,
            actor.to_owned(),
        ],
    )
}

/// A secret that would share a path with `name` as file and directory:
/// an ancestor or a descendant. Run in the creating transaction, which
/// holds the revision row's lock, so no other create can slip in between
/// the check and the insert.
fn conflicting(tx: &mut Tx<'_>, name: &str) -> Result<Option<String>> {
    for (i, _) in name.match_indices('/') {
        let ancestor = &name[..i];
        if let Some(r) = tx.opt("SELECT name FROM secrets WHERE name = $1", &[&ancestor])? {
            return Ok(Some(r.try_get(0)?));
        }
    }
    Ok(match tx.opt(DESCENDANT, &[&name])? {
        Some(r) => Some(r.try_get(0)?),
        None => None,
    })
}

/// The first secret under `$1/`: a range on the name's unique index
/// (names compare bytewise, COLLATE "C", and '0' is the byte after '/').
const DESCENDANT: &str =
    "SELECT name FROM secrets WHERE name >= $1::TEXT || '/' AND name < $1::TEXT || '0'
      ORDER BY name LIMIT 1";

pub(super) fn create(
    tx: &mut Tx<'_>,
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
    let inserted = tx.try_one(
        concat!(
            "INSERT INTO secrets (name, description, labels, mode, owner, grp, expires_at,
                              current_version, version_count, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 1, 1, $8, $8) RETURNING ",
            secret_mac_cols!()
        ),
        &[
            &new.name,
            &new.description,
            &labels,
            &i64::from(new.mode),
            &new.owner.map(i64::from),
            &new.group.map(i64::from),
            &new.expires_at,
            &now,
        ],
    )?;
    let row = insert_named(inserted, Entity::Secret, &new.name)?;
    let id: i64 = row.try_get(0)?;
    let written = SecretRecord {
        id: id as u64,
        name: new.name.clone(),
        description: new.description.clone(),
        labels: new.labels.clone(),
        mode: new.mode,
        owner: new.owner,
        group: new.group,
        expires_at: new.expires_at,
        current_version: 1,
        version_count: 1,
        created_at: now,
        updated_at: now,
        size: new.size,
        version_created_at: now,
    };
    let expected = integrity::secret(&integrity::SecretRow::of(&written, &labels));
    macs::sign_row(tx, ck.keys, &macs::SECRETS, &row, &expected)?;
    let sealed = seal(id as u64, 1)?;
    insert_version(tx, id, 1, new.size, &audit.actor, &sealed, now)?;
    let revision = record_change(
        tx,
        &AuditEntry {
            version: Some(1),
            ..audit.clone()
        },
        |revision| Change::Secret {
            id: id as u64,
            revision,
        },
    )?;
    // The record as written (its row came back so, or the job failed).
    Ok(Committed {
        value: written,
        revision,
    })
}

/// Signs a `secrets` row an update made as the server meant it
/// (`expected`: the row as read, MAC checked, with the update's columns).
fn sign_secret(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    row: &::postgres::Row,
    expected: &SecretRecord,
) -> Result<()> {
    macs::sign_row(tx, ck.keys, &macs::SECRETS, row, &mac_input(expected)?)
}

/// What a `secrets` row's MAC covers.
fn mac_input(expected: &SecretRecord) -> Result<crate::keys::MacInput> {
    let labels = serde_json::to_string(&expected.labels).map_err(StoreError::backend)?;
    Ok(integrity::secret(&integrity::SecretRow::of(
        expected, &labels,
    )))
}

/// A secret as read before a change, and its row's MAC: the change's
/// UPDATE finds the row only if it is still so.
pub(super) struct Seen {
    record: SecretRecord,
    mac: Vec<u8>,
}

/// The secret `name` as it is now (its MAC checked), for a change made on
/// the writer without reading it again (see [`rotate`]).
pub(super) fn seen(tx: &mut Tx<'_>, ck: &Checker<'_>, name: &str) -> Result<Seen> {
    let row = tx.opt(select_secrets!("WHERE s.name = $1"), &[&name])?;
    let not_found = || StoreError::not_found(Entity::Secret, name);
    let row = row.ok_or_else(not_found)?;
    let record = rows::secret(&row, ck)?.ok_or_else(not_found)?;
    let mac: Option<Vec<u8>> = row.try_get(12)?;
    Ok(Seen {
        record,
        mac: mac.ok_or_else(not_found)?,
    })
}

/// The secret changed between a [`Seen`] read and the change: the change
/// wrote nothing, and is made again reading it under the lock.
#[derive(Debug, thiserror::Error)]
#[error("the secret changed since it was read")]
struct Stale;

/// Whether `e` is [`rotate`]'s "changed since it was read".
pub(super) fn is_stale(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend(b) if b.is::<Stale>())
}

/// A new version. With `seen` (the secret read before, off the lock) a
/// rotation is one round trip on the writer: every statement is sent
/// together, the UPDATE finds the row only if its MAC is still the one
/// read (else the job fails as [`is_stale`], nothing written), and the
/// row must come back as written. Without, the secret is read first
/// under the lock. The record returned is the one written.
#[allow(clippy::too_many_arguments)]
pub(super) fn rotate(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    name: &str,
    size: u64,
    expires: Option<Option<i64>>,
    audit: &AuditEntry,
    seal: SealFn<'_>,
    seen: Option<&Seen>,
) -> Result<Committed<SecretRecord>> {
    let (current, guard) = match seen {
        Some(seen) => (seen.record.clone(), Some(seen.mac.clone())),
        None => (by_name(tx, ck, name)?, None),
    };
    let version = current.version_count + 1;
    let sealed = seal(current.id, version)?;
    let now = now_s();
    let expires_at = match expires {
        Some(set) => set,
        None => current.expires_at.filter(|t| *t > now),
    };
    let written = SecretRecord {
        current_version: version,
        version_count: version,
        updated_at: now,
        expires_at,
        size,
        version_created_at: now,
        ..current.clone()
    };
    let input = mac_input(&written)?;
    let tag = ck.keys.row_tag(&input).to_vec();
    let guarded = guard.is_some();
    // First: a stale row fails here, before the version's insert (which
    // would then collide) is checked.
    tx.later(
        concat!(
            "UPDATE secrets SET current_version = $2, version_count = $2, updated_at = $3, \
             expires_at = $4, mac = $5 WHERE id = $1 AND ($6::BYTEA IS NULL OR mac = $6) \
             RETURNING ",
            secret_mac_cols!()
        ),
        Want::Rows,
        owned![
            current.id as i64,
            version as i64,
            now,
            expires_at,
            tag,
            guard
        ],
        move |_, answer| {
            let mut rows = answer?.into_rows();
            match rows.pop() {
                None if guarded => Err(StoreError::Backend(Box::new(Stale))),
                Some(row) if rows.is_empty() => macs::as_written(&macs::SECRETS, &row, &input),
                _ => Err(StoreError::Backend(
                    "the secret's UPDATE did not touch exactly its row".into(),
                )),
            }
        },
    )?;
    insert_version(
        tx,
        current.id as i64,
        version,
        size,
        &audit.actor,
        &sealed,
        now,
    )?;
    let mut entry = AuditEntry {
        version: Some(version),
        ..audit.clone()
    };
    if let Some(what) = detail::expiry_moved(expires, current.expires_at, expires_at) {
        entry = entry.with_detail(&what);
    }
    let id = current.id;
    let revision = record_change(tx, &entry, |revision| Change::Secret { id, revision })?;
    Ok(Committed {
        value: written,
        revision,
    })
}

pub(super) fn rollback(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    name: &str,
    version: u64,
    audit: &AuditEntry,
) -> Result<Committed<SecretRecord>> {
    let current = by_name(tx, ck, name)?;
    let exists: bool = tx
        .one(
            "SELECT EXISTS (SELECT 1 FROM secret_versions WHERE secret_id = $1 AND version = $2)",
            &[&(current.id as i64), &(version as i64)],
        )?
        .try_get(0)?;
    if !exists {
        return Err(StoreError::NoSuchVersion {
            name: name.to_owned(),
            version,
        });
    }
    let now = now_s();
    let row = tx.one(
        concat!(
            "UPDATE secrets SET current_version = $2, updated_at = $3 WHERE id = $1 RETURNING ",
            secret_mac_cols!()
        ),
        &[&(current.id as i64), &(version as i64), &now],
    )?;
    let expected = SecretRecord {
        current_version: version,
        updated_at: now,
        ..current.clone()
    };
    sign_secret(tx, ck, &row, &expected)?;
    let id = current.id;
    let revision = record_change(
        tx,
        &AuditEntry {
            version: Some(version),
            detail: detail::rolled_back_from(current.current_version),
            ..audit.clone()
        },
        |revision| Change::Secret { id, revision },
    )?;
    Ok(Committed {
        value: by_name(tx, ck, name)?,
        revision,
    })
}

pub(super) fn update(
    tx: &mut Tx<'_>,
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
        let now = now_s();
        let row = tx.one(
            concat!(
                "UPDATE secrets SET description = $2, labels = $3, mode = $4, owner = $5, \
                 grp = $6, expires_at = $7, updated_at = $8 WHERE id = $1 RETURNING ",
                secret_mac_cols!()
            ),
            &[
                &(record.id as i64),
                &record.description,
                &labels,
                &i64::from(record.mode),
                &record.owner.map(i64::from),
                &record.group.map(i64::from),
                &record.expires_at,
                &now,
            ],
        )?;
        let expected = SecretRecord {
            updated_at: now,
            ..record.clone()
        };
        sign_secret(tx, ck, &row, &expected)?;
    }
    let id = record.id;
    let revision = record_change(
        tx,
        &AuditEntry {
            version: Some(record.current_version),
            ..audit.with_detail(&detail::updated(&changed))
        },
        |revision| Change::Secret { id, revision },
    )?;
    Ok(Committed {
        value: by_name(tx, ck, name)?,
        revision,
    })
}

pub(super) fn delete(tx: &mut Tx<'_>, name: &str, audit: &AuditEntry) -> Result<Committed<u64>> {
    let id = rows::id_by_name(tx, Entity::Secret, name)?;
    let versions: i64 = tx
        .one(
            "SELECT count(*) FROM secret_versions WHERE secret_id = $1",
            &[&id],
        )?
        .try_get(0)?;
    let groups = rows::names(
        tx,
        "SELECT g.name FROM group_secrets gs JOIN groups g ON g.id = gs.group_id
          WHERE gs.secret_id = $1 ORDER BY g.name",
        id,
    )?;
    tx.exec("DELETE FROM secrets WHERE id = $1", &[&id])?;
    let what = detail::secret_deleted(versions, &groups);
    let revision = record_change(tx, &audit.with_detail(&what), |revision| {
        Change::SecretDeleted {
            id: id as u64,
            revision,
        }
    })?;
    Ok(Committed {
        value: id as u64,
        revision,
    })
}

/// Every secret whose row's MAC is good.
pub(super) fn list(tx: &mut Tx<'_>, ck: &Checker<'_>) -> Result<Vec<SecretRecord>> {
    let mut out = Vec::new();
    for r in tx.query(select_secrets!("ORDER BY s.name"), &[])? {
        out.extend(rows::secret(&r, ck)?);
    }
    Ok(out)
}

pub(super) fn versions(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    name: &str,
) -> Result<Vec<VersionRecord>> {
    let secret = by_name(tx, ck, name)?;
    tx.query(
        "SELECT version, created_at, created_by, size FROM secret_versions WHERE secret_id = $1 ORDER BY version",
        &[&(secret.id as i64)],
    )?
    .iter()
    .map(|r| {
        let version = r.try_get::<_, i64>(0)? as u64;
        Ok(VersionRecord {
            version,
            created_at: r.try_get(1)?,
            created_by: r.try_get(2)?,
            size: r.try_get::<_, i64>(3)? as u64,
            current: version == secret.current_version,
        })
    })
    .collect()
}

/// The secrets client `client_id` may read: each through a path whose
/// membership rows are good, and only when the secret's own row is good.
fn readable(tx: &mut Tx<'_>, ck: &Checker<'_>, client_id: u64) -> Result<Vec<SecretRecord>> {
    let rows = tx.query(
        select_granted!("ORDER BY s.name, gs.group_id"),
        &[&(client_id as i64)],
    )?;
    let mut out: Vec<SecretRecord> = Vec::new();
    let mut settled: Option<u64> = None;
    let mut memberships = Default::default();
    for r in &rows {
        let id = r.try_get::<_, i64>(0)? as u64;
        if settled == Some(id) || !rows::path_ok(r, VIEW_PATH, client_id, ck, &mut memberships)? {
            continue;
        }
        settled = Some(id);
        out.extend(rows::secret(r, ck)?);
    }
    Ok(out)
}

pub(super) fn client_view(tx: &mut Tx<'_>, ck: &Checker<'_>, client_id: u64) -> Result<View> {
    Ok(View {
        revision: revision(tx)?,
        secrets: readable(tx, ck, client_id)?,
    })
}

/// The first good path's sealed secret among `rows`.
fn first_granted(
    rows: &[::postgres::Row],
    client_id: u64,
    ck: &Checker<'_>,
) -> Result<Option<SealedSecret>> {
    let mut memberships = Default::default();
    for r in rows {
        if rows::path_ok(r, SEALED_PATH, client_id, ck, &mut memberships)? {
            return rows::sealed_secret(r, ck);
        }
    }
    Ok(None)
}

pub(super) fn read_sealed(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    client_id: u64,
    names: &[String],
) -> Result<(Vec<SealedSecret>, Vec<String>)> {
    let mut out = Vec::with_capacity(names.len());
    let mut denied = Vec::new();
    for n in names {
        let rows = tx.query(
            select_granted_sealed!("WHERE s.name = $2"),
            &[&(client_id as i64), n],
        )?;
        match first_granted(&rows, client_id, ck)? {
            Some(s) => out.push(s),
            None => denied.push(n.clone()),
        }
    }
    Ok((out, denied))
}

pub(super) fn read_one_for_client(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    client_id: u64,
    secret_id: u64,
) -> Result<Option<SealedSecret>> {
    let rows = tx.query(
        select_granted_sealed!("WHERE s.id = $2"),
        &[&(client_id as i64), &(secret_id as i64)],
    )?;
    first_granted(&rows, client_id, ck)
}

/// The names of the secrets group `group_id` holds through good rows.
pub(super) fn of_group(
    tx: &mut Tx<'_>,
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
    let rows = match group_id {
        Some(id) => tx.query(held!("WHERE gs.group_id = $1"), &[&id])?,
        None => tx.query(held!(""), &[])?,
    };
    let mut out = Vec::new();
    for r in &rows {
        let gid: i64 = r.try_get(13)?;
        let mac: Option<Vec<u8>> = r.try_get(14)?;
        let sid = r.try_get::<_, i64>(0)? as u64;
        if ck.group_secret_ok(gid as u64, sid, mac.as_deref()) {
            if let Some(s) = rows::secret_at(r, 0, ck)? {
                out.push((gid, s.name));
            }
        }
    }
    Ok(out)
}
