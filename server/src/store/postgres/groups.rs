//! Groups and their members (as `sqlite/groups.rs`).

use std::collections::HashMap;

use super::audit::record_change;
use super::commit::Tx;
use super::macs::{self, group_mac_cols};
use super::rows::{self, client_cols, insert_named};
use super::secrets;
use crate::store::integrity::{self, Checker, Link};
use crate::store::*;

fn clients_of(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    group: Option<i64>,
) -> Result<HashMap<i64, Vec<String>>> {
    macro_rules! members {
        ($where:literal) => {
            concat!(
                "SELECT ",
                client_cols!(),
                ", gc.group_id, gc.mac FROM group_clients gc JOIN clients c ON c.id = gc.client_id ",
                $where,
                " ORDER BY gc.group_id, c.name"
            )
        };
    }
    let rows = match group {
        Some(id) => tx.query(members!("WHERE gc.group_id = $1"), &[&id])?,
        None => tx.query(members!(""), &[])?,
    };
    let mut out: HashMap<i64, Vec<String>> = HashMap::new();
    for r in &rows {
        if let Some((gid, name)) = rows::client_of_group(r, ck)? {
            out.entry(gid).or_default().push(name);
        }
    }
    Ok(out)
}

fn secrets_of(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    group: Option<i64>,
) -> Result<HashMap<i64, Vec<String>>> {
    let mut out: HashMap<i64, Vec<String>> = HashMap::new();
    for (gid, name) in secrets::of_group(tx, ck, group)? {
        out.entry(gid).or_default().push(name);
    }
    Ok(out)
}

/// The good clients and secrets of group `id` (whatever its own row).
fn members_of(tx: &mut Tx<'_>, ck: &Checker<'_>, id: i64) -> Result<(Vec<String>, Vec<String>)> {
    let clients = clients_of(tx, ck, Some(id))?
        .remove(&id)
        .unwrap_or_default();
    let secrets = secrets_of(tx, ck, Some(id))?
        .remove(&id)
        .unwrap_or_default();
    Ok((clients, secrets))
}

/// The group, if its row's MAC is good (a bad row is NotFound), with its
/// good members.
pub(super) fn by_name(tx: &mut Tx<'_>, ck: &Checker<'_>, name: &str) -> Result<GroupRecord> {
    let found = match tx.opt(
        "SELECT id, name, mac, description, created_at FROM groups WHERE name = $1",
        &[&name],
    )? {
        Some(r) => match rows::group_at(&r, 0, ck)? {
            Some((id, _)) => Some((id as i64, r.try_get::<_, String>(3)?, r.try_get(4)?)),
            None => None,
        },
        None => None,
    };
    let (id, description, created_at): (i64, String, i64) =
        found.ok_or_else(|| StoreError::not_found(Entity::Group, name))?;
    let (clients, secrets) = members_of(tx, ck, id)?;
    Ok(GroupRecord {
        name: name.to_owned(),
        description,
        created_at,
        clients,
        secrets,
    })
}

/// Every good group with its good members, in three queries.
pub(super) fn list(tx: &mut Tx<'_>, ck: &Checker<'_>) -> Result<Vec<GroupRecord>> {
    let mut clients = clients_of(tx, ck, None)?;
    let mut secrets = secrets_of(tx, ck, None)?;
    let mut out = Vec::new();
    for r in &tx.query(
        "SELECT id, name, mac, description, created_at FROM groups ORDER BY name",
        &[],
    )? {
        let Some((id, name)) = rows::group_at(r, 0, ck)? else {
            continue;
        };
        let id = id as i64;
        out.push(GroupRecord {
            name,
            description: r.try_get(3)?,
            created_at: r.try_get(4)?,
            clients: clients.remove(&id).unwrap_or_default(),
            secrets: secrets.remove(&id).unwrap_or_default(),
        });
    }
    Ok(out)
}

pub(super) fn create(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    name: &str,
    description: &str,
    audit: &AuditEntry,
) -> Result<Committed<GroupRecord>> {
    let inserted = tx.try_one(
        concat!(
            "INSERT INTO groups (name, description, created_at) VALUES ($1, $2, $3) RETURNING ",
            group_mac_cols!()
        ),
        &[&name, &description, &now_s()],
    )?;
    let row = insert_named(inserted, Entity::Group, name)?;
    let id: i64 = row.try_get(0)?;
    let expected = integrity::group(id as u64, name);
    macs::sign_row(tx, ck.keys, &macs::GROUPS, &row, &expected)?;
    let revision = record_change(tx, audit, |revision| Change::Access { revision })?;
    Ok(Committed {
        value: by_name(tx, ck, name)?,
        revision,
    })
}

/// Removes the group, even one whose row is bad (removing only takes
/// access away); the detail names its good members.
pub(super) fn remove(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    name: &str,
    audit: &AuditEntry,
) -> Result<Committed<()>> {
    let id = rows::id_by_name(tx, Entity::Group, name)?;
    let (clients, secrets) = members_of(tx, ck, id)?;
    tx.exec("DELETE FROM groups WHERE id = $1", &[&id])?;
    let what = detail::group_removed(&clients, &secrets);
    Ok(Committed {
        value: (),
        revision: record_change(tx, &audit.with_detail(&what), |revision| Change::Access {
            revision,
        })?,
    })
}

/// The membership rows, `[clients, secrets]` as [`Link::of`] takes them.
static LINKS: [Link; 2] = [
    Link {
        member: Entity::Client,
        input: integrity::group_client,
        select_mac: "SELECT mac FROM group_clients WHERE group_id = $1 AND client_id = $2",
        insert: "INSERT INTO group_clients (group_id, client_id, mac) VALUES ($1, $2, $3)",
        delete: "DELETE FROM group_clients WHERE group_id = $1 AND client_id = $2",
    },
    Link {
        member: Entity::Secret,
        input: integrity::group_secret,
        select_mac: "SELECT mac FROM group_secrets WHERE group_id = $1 AND secret_id = $2",
        insert: "INSERT INTO group_secrets (group_id, secret_id, mac) VALUES ($1, $2, $3)",
        delete: "DELETE FROM group_secrets WHERE group_id = $1 AND secret_id = $2",
    },
];

/// Adds `name` (a client or a secret) to `group`, or takes it out;
/// adding twice or removing what is not there changes nothing: the
/// audit entry says so, and `changed` is false.
pub(super) fn set_member(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    group: &str,
    member: &Member,
    add: bool,
    audit: &AuditEntry,
) -> Result<Committed<MemberChange>> {
    let (link, name) = Link::of(&LINKS, member);
    let changed = if add {
        // Links are made only between good rows.
        let gid = rows::checked_id(tx, ck, Entity::Group, group)?;
        let id = rows::checked_id(tx, ck, link.member, name)?;
        // A row already there that is bad (added without the key) is
        // replaced by the operator's own.
        let existing: Option<Option<Vec<u8>>> = tx
            .opt(link.select_mac, &[&gid, &id])?
            .map(|r| r.try_get(0))
            .transpose()?;
        let input = (link.input)(gid as u64, id as u64);
        let good = existing
            .as_ref()
            .map(|mac| mac.as_deref().is_some_and(|m| ck.keys.row_ok(&input, m)));
        match good {
            Some(true) => false,
            bad_or_none => {
                if bad_or_none.is_some() {
                    tx.exec(link.delete, &[&gid, &id])?;
                }
                let tag = ck.keys.row_tag(&input).to_vec();
                tx.exec(link.insert, &[&gid, &id, &tag])?;
                true
            }
        }
    } else {
        // Taking a member out only removes access: rows are found by name
        // whatever their MACs.
        let gid = rows::id_by_name(tx, Entity::Group, group)?;
        let id = rows::id_by_name(tx, link.member, name)?;
        tx.exec(link.delete, &[&gid, &id])? > 0
    };
    let mut entry = audit.clone();
    if !changed {
        entry.detail = detail::NO_CHANGE.into();
    }
    let revision = record_change(tx, &entry, |revision| Change::Access { revision })?;
    Ok(Committed {
        value: MemberChange {
            group: by_name(tx, ck, group)?,
            changed,
        },
        revision,
    })
}
