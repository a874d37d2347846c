//! Groups and their members (clients and secrets).

use rusqlite::{params, Connection, OptionalExtension};

use super::audit::record_change;
use super::rows::{self, insert_named};
use crate::store::*;

pub(super) fn by_name(tx: &Connection, name: &str) -> Result<GroupRecord> {
    let (id, description, created_at): (i64, String, i64) = tx
        .prepare_cached("SELECT id, description, created_at FROM groups WHERE name = ?1")?
        .query_row([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?
        .ok_or_else(|| StoreError::not_found(Entity::Group, name))?;
    Ok(GroupRecord {
        name: name.to_owned(),
        description,
        created_at,
        clients: rows::names(
            tx,
            "SELECT c.name FROM group_clients gc JOIN clients c ON c.id = gc.client_id WHERE gc.group_id = ?1 ORDER BY c.name",
            id,
        )?,
        secrets: rows::names(
            tx,
            "SELECT s.name FROM group_secrets gs JOIN secrets s ON s.id = gs.secret_id WHERE gs.group_id = ?1 ORDER BY s.name",
            id,
        )?,
    })
}

/// Every group with its members, in three queries.
pub(super) fn list(tx: &Connection) -> Result<Vec<GroupRecord>> {
    let mut clients = rows::grouped(
        tx,
        "SELECT gc.group_id, c.name FROM group_clients gc JOIN clients c ON c.id = gc.client_id
          ORDER BY gc.group_id, c.name",
    )?;
    let mut secrets = rows::grouped(
        tx,
        "SELECT gs.group_id, s.name FROM group_secrets gs JOIN secrets s ON s.id = gs.secret_id
          ORDER BY gs.group_id, s.name",
    )?;
    let mut stmt =
        tx.prepare_cached("SELECT id, name, description, created_at FROM groups ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get(2)?,
            r.get(3)?,
        ))
    })?;
    rows.map(|r| {
        let (id, name, description, created_at) = r?;
        Ok(GroupRecord {
            name,
            description,
            created_at,
            clients: clients.remove(&id).unwrap_or_default(),
            secrets: secrets.remove(&id).unwrap_or_default(),
        })
    })
    .collect()
}

pub(super) fn create(
    tx: &Connection,
    name: &str,
    description: &str,
    audit: &AuditEntry,
) -> Result<Committed<GroupRecord>> {
    let inserted = tx.execute(
        "INSERT INTO groups (name, description, created_at) VALUES (?1, ?2, ?3)",
        params![name, description, now_s()],
    );
    insert_named(inserted, Entity::Group, name)?;
    let revision = record_change(tx, audit)?;
    Ok(Committed {
        value: by_name(tx, name)?,
        revision,
    })
}

pub(super) fn remove(tx: &Connection, name: &str, audit: &AuditEntry) -> Result<Committed<()>> {
    let held = by_name(tx, name)?;
    tx.execute("DELETE FROM groups WHERE name = ?1", [name])?;
    let list = |what: &str, names: &[String]| match names.len() {
        0 => format!("no {what}s"),
        1 => format!("1 {what} ({})", some_names(names, 20)),
        n => format!("{n} {what}s ({})", some_names(names, 20)),
    };
    let what = format!(
        "removed with {} and {}",
        list("client", &held.clients),
        list("secret", &held.secrets)
    );
    Ok(Committed {
        value: (),
        revision: record_change(tx, &audit.with_detail(&what))?,
    })
}

/// Adds `name` (a client or a secret) to `group`, or takes it out;
/// adding twice or removing what is not there changes nothing: the
/// audit entry says so, and `changed` is false.
pub(super) fn set_member(
    tx: &Connection,
    group: &str,
    member: &Member,
    add: bool,
    audit: &AuditEntry,
) -> Result<Committed<MemberChange>> {
    let (entity, link, column, name) = match member {
        Member::Client(name) => (Entity::Client, "group_clients", "client_id", name),
        Member::Secret(name) => (Entity::Secret, "group_secrets", "secret_id", name),
    };
    let gid = rows::id_by_name(tx, Entity::Group, group)?;
    let id = rows::id_by_name(tx, entity, name)?;
    let sql = if add {
        format!("INSERT OR IGNORE INTO {link} (group_id, {column}) VALUES (?1, ?2)")
    } else {
        format!("DELETE FROM {link} WHERE group_id = ?1 AND {column} = ?2")
    };
    let changed = tx.execute(&sql, params![gid, id])? > 0;
    let mut entry = audit.clone();
    if !changed {
        entry.detail = "no change".into();
    }
    let revision = record_change(tx, &entry)?;
    Ok(Committed {
        value: MemberChange {
            group: by_name(tx, group)?,
            changed,
        },
        revision,
    })
}
