//! Clients, their certificates, and what they can read.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::audit::record_change;
use super::rows::{self, insert_named};
use crate::store::*;

const CLIENT_COLUMNS: &str = "c.id, c.name, c.admin, c.enabled, c.pinned, c.created_at, \
     (SELECT serial FROM client_certs WHERE client_id = c.id ORDER BY issued_at DESC, rowid DESC LIMIT 1), \
     (SELECT not_after FROM client_certs WHERE client_id = c.id ORDER BY issued_at DESC, rowid DESC LIMIT 1)";

fn client(r: &Row<'_>) -> rusqlite::Result<ClientRecord> {
    Ok(ClientRecord {
        id: r.get::<_, i64>(0)? as u64,
        name: r.get(1)?,
        admin: r.get(2)?,
        enabled: r.get(3)?,
        pinned: r.get(4)?,
        created_at: r.get(5)?,
        cert_serial: r.get(6)?,
        cert_not_after: r.get(7)?,
        groups: Vec::new(),
    })
}

pub(super) fn by_name(tx: &Connection, name: &str) -> Result<ClientRecord> {
    let mut found = tx
        .prepare_cached(&format!(
            "SELECT {CLIENT_COLUMNS} FROM clients c WHERE c.name = ?1"
        ))?
        .query_row([name], client)
        .optional()?
        .ok_or_else(|| StoreError::not_found(Entity::Client, name))?;
    found.groups = rows::names(
        tx,
        "SELECT g.name FROM group_clients gc JOIN groups g ON g.id = gc.group_id WHERE gc.client_id = ?1 ORDER BY g.name",
        found.id as i64,
    )?;
    Ok(found)
}

/// Every client, with its groups, in two queries.
pub(super) fn list(tx: &Connection) -> Result<Vec<ClientRecord>> {
    let mut groups = rows::grouped(
        tx,
        "SELECT gc.client_id, g.name FROM group_clients gc JOIN groups g ON g.id = gc.group_id
          ORDER BY gc.client_id, g.name",
    )?;
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {CLIENT_COLUMNS} FROM clients c ORDER BY c.name"
    ))?;
    let rows = stmt.query_map([], client)?;
    rows.map(|r| {
        let mut c = r?;
        c.groups = groups.remove(&(c.id as i64)).unwrap_or_default();
        Ok(c)
    })
    .collect()
}

pub(super) fn create(
    tx: &Connection,
    new: &NewClient,
    audit: &AuditEntry,
) -> Result<Committed<ClientRecord>> {
    let now = now_s();
    let inserted = tx.execute(
        "INSERT INTO clients (name, admin, enabled, pinned, created_at) VALUES (?1, ?2, 1, ?3, ?4)",
        params![new.name, new.admin, new.cert.is_some(), now],
    );
    insert_named(inserted, Entity::Client, &new.name)?;
    let id = tx.last_insert_rowid();
    if let Some((serial, not_after)) = &new.cert {
        tx.execute(
            "INSERT INTO client_certs (client_id, serial, not_after, issued_at) VALUES (?1, ?2, ?3, ?4)",
            params![id, serial, not_after, now],
        )?;
    }
    let revision = record_change(tx, audit)?;
    Ok(Committed {
        value: by_name(tx, &new.name)?,
        revision,
    })
}

pub(super) fn add_cert(
    tx: &Connection,
    client_id: u64,
    name: &str,
    serial: &str,
    not_after: i64,
    audit: &AuditEntry,
) -> Result<Committed<ClientRecord>> {
    let id = i64::try_from(client_id).map_err(|_| StoreError::not_found(Entity::Client, name))?;
    // The client is checked in the insert itself: the same id (not merely
    // the same name) and still pinned.
    let added = tx.execute(
        "INSERT INTO client_certs (client_id, serial, not_after, issued_at) \
         SELECT id, ?3, ?4, ?5 FROM clients WHERE id = ?1 AND name = ?2 AND pinned = 1",
        params![id, name, serial, not_after, now_s()],
    )?;
    if added == 0 {
        let exists = tx
            .query_row(
                "SELECT 1 FROM clients WHERE id = ?1 AND name = ?2",
                params![id, name],
                |_| Ok(()),
            )
            .optional()?;
        return Err(match exists {
            Some(()) => StoreError::External {
                name: name.to_owned(),
            },
            None => StoreError::not_found(Entity::Client, name),
        });
    }
    let revision = record_change(tx, audit)?;
    Ok(Committed {
        value: by_name(tx, name)?,
        revision,
    })
}

pub(super) fn remove(tx: &Connection, name: &str, audit: &AuditEntry) -> Result<Committed<()>> {
    let ClientRecord { id, groups, .. } = by_name(tx, name)?;
    let id = id as i64;
    tx.execute(
        "INSERT OR IGNORE INTO revoked_certs (serial, client, revoked_at) \
         SELECT serial, ?2, ?3 FROM client_certs WHERE client_id = ?1",
        params![id, name, now_s()],
    )?;
    tx.execute("DELETE FROM clients WHERE id = ?1", [id])?;
    let what = if groups.is_empty() {
        "was in no group".to_owned()
    } else {
        format!("was in groups {}", some_names(&groups, 20))
    };
    Ok(Committed {
        value: (),
        revision: record_change(tx, &audit.with_detail(&what))?,
    })
}

pub(super) fn authenticate(tx: &Connection, name: &str, serial: &str) -> Result<AuthLookup> {
    let serial_revoked = tx
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM revoked_certs WHERE serial = ?1)")?
        .query_row([serial], |r| r.get(0))?;
    // Runs on every auth cache miss: the client and whether it was issued
    // this serial in one query, without the groups and certificates a
    // ClientRecord carries.
    let found = tx
        .prepare_cached(
            "SELECT c.id, c.name, c.admin, c.enabled, c.pinned, \
             EXISTS (SELECT 1 FROM client_certs WHERE client_id = c.id AND serial = ?2) \
             FROM clients c WHERE c.name = ?1",
        )?
        .query_row(params![name, serial], |r| {
            Ok((
                ClientAuth {
                    id: r.get::<_, i64>(0)? as u64,
                    name: r.get(1)?,
                    admin: r.get(2)?,
                    enabled: r.get(3)?,
                    pinned: r.get(4)?,
                },
                r.get(5)?,
            ))
        })
        .optional()?;
    let (client, serial_issued) = match found {
        Some((c, issued)) => (Some(c), issued),
        None => (None, false),
    };
    Ok(AuthLookup {
        client,
        serial_issued,
        serial_revoked,
    })
}

pub(super) fn access(tx: &Connection, client: &str) -> Result<Vec<AccessRecord>> {
    let cid = rows::id_by_name(tx, Entity::Client, client)?;
    let mut stmt = tx.prepare_cached(
        "SELECT s.name, g.name FROM group_clients gc
           JOIN group_secrets gs ON gs.group_id = gc.group_id
           JOIN secrets s ON s.id = gs.secret_id
           JOIN groups g ON g.id = gc.group_id
          WHERE gc.client_id = ?1 ORDER BY s.name, g.name",
    )?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let rows = stmt.query_map([cid], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    for row in rows {
        let (secret, group) = row?;
        out.entry(secret).or_default().push(group);
    }
    Ok(out
        .into_iter()
        .map(|(secret, groups)| AccessRecord { secret, groups })
        .collect())
}
