//! Clients, their certificates, and what they can read (as
//! `sqlite/clients.rs`).

use std::collections::{BTreeMap, HashMap};

use super::audit::record_change;
use super::commit::Tx;
use super::macs::{self, client_mac_cols};
use super::rows::{self, client_cols, insert_named, secret_cols};
use crate::store::integrity::{self, Checker};
use crate::store::*;

/// The client's newest good certificate (serial, not after).
fn newest_cert(tx: &mut Tx<'_>, ck: &Checker<'_>, id: u64) -> Result<Option<(String, i64)>> {
    let rows = tx.query(
        "SELECT serial, not_after, issued_at, mac FROM client_certs WHERE client_id = $1
          ORDER BY issued_at DESC, seq DESC",
        &[&(id as i64)],
    )?;
    for r in &rows {
        if let Some(cert) = rows::cert_at(r, 0, id, ck)? {
            return Ok(Some(cert));
        }
    }
    Ok(None)
}

/// `(client id, group name)` of every good membership of a good group, of
/// one client or (None) all.
fn groups_of(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    client: Option<i64>,
) -> Result<HashMap<i64, Vec<String>>> {
    macro_rules! memberships {
        ($where:literal) => {
            concat!(
                "SELECT g.id, g.name, g.mac, gc.client_id, gc.mac FROM group_clients gc
                   JOIN groups g ON g.id = gc.group_id ",
                $where,
                " ORDER BY gc.client_id, g.name"
            )
        };
    }
    let rows = match client {
        Some(id) => tx.query(memberships!("WHERE gc.client_id = $1"), &[&id])?,
        None => tx.query(memberships!(""), &[])?,
    };
    let mut out: HashMap<i64, Vec<String>> = HashMap::new();
    for r in &rows {
        if let Some((cid, name)) = rows::group_of_client(r, ck)? {
            out.entry(cid).or_default().push(name);
        }
    }
    Ok(out)
}

fn record(c: ClientAuth, created_at: i64) -> ClientRecord {
    ClientRecord {
        id: c.id,
        name: c.name,
        admin: c.admin,
        enabled: c.enabled,
        created_at,
        pinned: c.pinned,
        cert_serial: None,
        cert_not_after: None,
        groups: Vec::new(),
    }
}

/// The client named `name` and when it was made, if its row's MAC is good.
fn named(tx: &mut Tx<'_>, ck: &Checker<'_>, name: &str) -> Result<Option<(ClientAuth, i64)>> {
    match tx.opt(
        concat!(
            "SELECT ",
            client_cols!(),
            " FROM clients c WHERE c.name = $1"
        ),
        &[&name],
    )? {
        Some(r) => rows::client_at(&r, 0, ck),
        None => Ok(None),
    }
}

/// The client, if its row's MAC is good (a bad row is NotFound), with its
/// newest good certificate and its good memberships.
pub(super) fn by_name(tx: &mut Tx<'_>, ck: &Checker<'_>, name: &str) -> Result<ClientRecord> {
    let (c, created_at) =
        named(tx, ck, name)?.ok_or_else(|| StoreError::not_found(Entity::Client, name))?;
    let mut found = record(c, created_at);
    if let Some((serial, not_after)) = newest_cert(tx, ck, found.id)? {
        found.cert_serial = Some(serial);
        found.cert_not_after = Some(not_after);
    }
    found.groups = groups_of(tx, ck, Some(found.id as i64))?
        .remove(&(found.id as i64))
        .unwrap_or_default();
    Ok(found)
}

/// Every client whose row is good, with its groups, in a few queries.
pub(super) fn list(tx: &mut Tx<'_>, ck: &Checker<'_>) -> Result<Vec<ClientRecord>> {
    let mut groups = groups_of(tx, ck, None)?;
    let mut certs: HashMap<i64, (String, i64)> = HashMap::new();
    for r in &tx.query(
        "SELECT client_id, serial, not_after, issued_at, mac FROM client_certs
          ORDER BY client_id, issued_at DESC, seq DESC",
        &[],
    )? {
        let cid: i64 = r.try_get(0)?;
        if certs.contains_key(&cid) {
            continue;
        }
        if let Some(cert) = rows::cert_at(r, 1, cid as u64, ck)? {
            certs.insert(cid, cert);
        }
    }
    let mut out = Vec::new();
    for r in &tx.query(
        concat!("SELECT ", client_cols!(), " FROM clients c ORDER BY c.name"),
        &[],
    )? {
        let Some((c, created_at)) = rows::client_at(r, 0, ck)? else {
            continue;
        };
        let mut c = record(c, created_at);
        let id = c.id as i64;
        if let Some((serial, not_after)) = certs.remove(&id) {
            c.cert_serial = Some(serial);
            c.cert_not_after = Some(not_after);
        }
        c.groups = groups.remove(&id).unwrap_or_default();
        out.push(c);
    }
    Ok(out)
}

/// Inserts a certificate row for client `id`, signed (its MAC input is
/// known before the insert).
fn insert_cert(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    id: i64,
    serial: &str,
    not_after: i64,
    issued_at: i64,
) -> Result<()> {
    let tag = ck
        .keys
        .row_tag(&integrity::client_cert(
            id as u64, serial, not_after, issued_at,
        ))
        .to_vec();
    tx.exec(
        "INSERT INTO client_certs (client_id, serial, not_after, issued_at, mac) VALUES ($1, $2, $3, $4, $5)",
        &[&id, &serial, &not_after, &issued_at, &tag],
    )?;
    Ok(())
}

pub(super) fn create(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    new: &NewClient,
    audit: &AuditEntry,
) -> Result<Committed<ClientRecord>> {
    let now = now_s();
    let inserted = tx.try_one(
        concat!(
            "INSERT INTO clients (name, admin, enabled, pinned, created_at) \
             VALUES ($1, $2, 1, $3, $4) RETURNING ",
            client_mac_cols!()
        ),
        &[
            &new.name,
            &i64::from(new.admin),
            &i64::from(new.cert.is_some()),
            &now,
        ],
    )?;
    let row = insert_named(inserted, Entity::Client, &new.name)?;
    let id: i64 = row.try_get(0)?;
    let expected = integrity::client(
        id as u64,
        &new.name,
        new.admin,
        true,
        new.cert.is_some(),
        now,
    );
    macs::sign_row(tx, ck.keys, &macs::CLIENTS, &row, &expected)?;
    if let Some((serial, not_after)) = &new.cert {
        insert_cert(tx, ck, id, serial, *not_after, now)?;
    }
    let revision = record_change(tx, audit, |revision| Change::ClientAdded { revision })?;
    Ok(Committed {
        value: by_name(tx, ck, &new.name)?,
        revision,
    })
}

pub(super) fn add_cert(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    client_id: u64,
    name: &str,
    serial: &str,
    not_after: i64,
    audit: &AuditEntry,
) -> Result<Committed<ClientRecord>> {
    let id = i64::try_from(client_id).map_err(|_| StoreError::not_found(Entity::Client, name))?;
    let found = match tx.opt(
        concat!(
            "SELECT ",
            client_cols!(),
            " FROM clients c WHERE c.id = $1 AND c.name = $2"
        ),
        &[&id, &name],
    )? {
        Some(r) => rows::client_at(&r, 0, ck)?,
        None => None,
    };
    match found {
        None => return Err(StoreError::not_found(Entity::Client, name)),
        Some((c, _)) if !c.pinned => {
            return Err(StoreError::External {
                name: name.to_owned(),
            })
        }
        Some(_) => {}
    }
    insert_cert(tx, ck, id, serial, not_after, now_s())?;
    let revision = record_change(tx, audit, |revision| Change::ClientAdded { revision })?;
    Ok(Committed {
        value: by_name(tx, ck, name)?,
        revision,
    })
}

/// Removes the client, even one whose row is bad (removing only takes
/// access away); its groups in the detail are the good ones.
pub(super) fn remove(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    name: &str,
    audit: &AuditEntry,
) -> Result<Committed<()>> {
    let id = rows::id_by_name(tx, Entity::Client, name)?;
    let groups = groups_of(tx, ck, Some(id))?.remove(&id).unwrap_or_default();
    tx.exec(
        "INSERT INTO revoked_certs (serial, client, revoked_at) \
         SELECT serial, $2::TEXT, $3::BIGINT FROM client_certs WHERE client_id = $1 \
         ON CONFLICT (serial) DO NOTHING",
        &[&id, &name, &now_s()],
    )?;
    tx.exec("DELETE FROM clients WHERE id = $1", &[&id])?;
    let what = detail::client_removed(&groups);
    Ok(Committed {
        value: (),
        revision: record_change(tx, &audit.with_detail(&what), |revision| {
            Change::ClientRemoved { revision }
        })?,
    })
}

pub(super) fn authenticate(
    tx: &mut Tx<'_>,
    ck: &Checker<'_>,
    name: &str,
    serial: &str,
) -> Result<AuthLookup> {
    let serial_revoked: bool = tx
        .one(
            "SELECT EXISTS (SELECT 1 FROM revoked_certs WHERE serial = $1)",
            &[&serial],
        )?
        .try_get(0)?;
    let client = named(tx, ck, name)?.map(|(c, _)| c);
    let serial_issued = match &client {
        None => false,
        Some(c) => match tx.opt(
            "SELECT not_after, issued_at, mac FROM client_certs WHERE client_id = $1 AND serial = $2",
            &[&(c.id as i64), &serial],
        )? {
            Some(r) => {
                let mac: Option<Vec<u8>> = r.try_get(2)?;
                ck.cert_ok(c.id,
                    serial,
                    r.try_get(0)?,
                    r.try_get(1)?,
                    mac.as_deref(),
                )
            }
            None => false,
        },
    };
    Ok(AuthLookup {
        client,
        serial_issued,
        serial_revoked,
    })
}

/// What the client can read and through which groups: only paths whose
/// every row (membership, grant, group, secret) is good.
pub(super) fn access(tx: &mut Tx<'_>, ck: &Checker<'_>, client: &str) -> Result<Vec<AccessRecord>> {
    let cid = rows::checked_id(tx, ck, Entity::Client, client)?;
    let rows = tx.query(
        concat!(
            "SELECT ",
            secret_cols!(),
            ", g.id, g.name, g.mac, gs.mac, gc.mac FROM group_clients gc
           JOIN group_secrets gs ON gs.group_id = gc.group_id
           JOIN secrets s ON s.id = gs.secret_id
           JOIN groups g ON g.id = gc.group_id
          WHERE gc.client_id = $1 ORDER BY s.name, g.name"
        ),
        &[&cid],
    )?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &rows {
        if let Some((secret, group)) = rows::access_at(r, cid as u64, ck)? {
            out.entry(secret).or_default().push(group);
        }
    }
    Ok(out
        .into_iter()
        .map(|(secret, groups)| AccessRecord { secret, groups })
        .collect())
}
