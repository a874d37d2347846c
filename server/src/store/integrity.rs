//! Authenticated rows: what each protected row's MAC covers, the same for
//! every backend.
//!
//! A row that decides access or what is served carries a MAC
//! (`Keys::row_tag`, HMAC-SHA256 under the HKDF row key) over its
//! meaningful columns and its identity (the ids that make it this row and
//! not another), with one kind per table so a tag of one table never passes
//! for another's. A backend builds the [`MacInput`] with the functions
//! here from the values it stores, writes the tag in the same transaction
//! as the row, and checks it on every read that decides something: a row
//! whose MAC fails is absent (never a grant) and is reported as a
//! [`BadRow`].
//!
//! Covered (the tables whose edit could grant, escalate or roll back):
//! `clients`, `client_certs`, `groups`, `group_clients`, `group_secrets`,
//! `secrets` and the `meta` rows other than the master key check (which
//! is itself sealed under the master key). Not covered, on purpose:
//! `secret_versions` (content, its data key and its identity are sealed
//! together under the master key: an edited or swapped version does not
//! open), `revoked_certs` (a row there only refuses; deleting one admits
//! nobody, since a pinned client's certificate must also be recorded under
//! its own id), `revision` (a counter) and `audit` (its own chain).
//! The kind `token_bindings` is reserved for the bindings of tokens to
//! clients (not built yet): a future `token_bindings` table gets its own kind.
//!
//! A MAC proves a row was written with the key, not that it is still
//! current: an old copy put back passes. The row set ([`row_set_h`],
//! [`RowSetRecord`]) closes that: a sealed digest over every protected
//! row's MAC, moved by each write and compared whole with the rows, so a
//! row put back, deleted or added without the key is a finding
//! ([`ROW_SET`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::keys::{Keys, MacInput, MacKey, MAC_LEN};

pub const CLIENTS: &str = "clients";
pub const CLIENT_CERTS: &str = "client_certs";
pub const GROUPS: &str = "groups";
pub const GROUP_CLIENTS: &str = "group_clients";
pub const GROUP_SECRETS: &str = "group_secrets";
pub const SECRETS: &str = "secrets";
pub const META: &str = "meta";

/// The meta key whose presence (with a good MAC) says the rows of this
/// database were adopted (MAC'd) when it was upgraded to authenticated
/// rows, or that it was made with them.
pub const META_ROWS_AUTHENTICATED: &str = "rows_authenticated";
/// The meta row that is not MAC'd: the master key check is sealed under
/// the master key itself, and a wrong key must still be told apart from
/// a damaged row.
pub const META_UNSIGNED: &str = crate::state_dir::META_KEY_CHECK;

pub fn client(
    id: u64,
    name: &str,
    admin: bool,
    enabled: bool,
    pinned: bool,
    created_at: i64,
) -> MacInput {
    MacInput::new(CLIENTS)
        .u64(id)
        .str(name)
        .bool(admin)
        .bool(enabled)
        .bool(pinned)
        .i64(created_at)
}

pub fn client_cert(client_id: u64, serial: &str, not_after: i64, issued_at: i64) -> MacInput {
    MacInput::new(CLIENT_CERTS)
        .u64(client_id)
        .str(serial)
        .i64(not_after)
        .i64(issued_at)
}

pub fn group(id: u64, name: &str) -> MacInput {
    MacInput::new(GROUPS).u64(id).str(name)
}

pub fn group_client(group_id: u64, client_id: u64) -> MacInput {
    MacInput::new(GROUP_CLIENTS).u64(group_id).u64(client_id)
}

pub fn group_secret(group_id: u64, secret_id: u64) -> MacInput {
    MacInput::new(GROUP_SECRETS).u64(group_id).u64(secret_id)
}

/// A kind of membership row (`group_clients`, `group_secrets`): what it
/// links a group to, its MAC input, and a backend's statements that read
/// one's `mac`, add one (with its `mac`) and delete one, each by group id
/// then member id.
pub struct Link {
    pub member: crate::store::Entity,
    pub input: fn(u64, u64) -> MacInput,
    pub select_mac: &'static str,
    pub insert: &'static str,
    pub delete: &'static str,
}

impl Link {
    /// The link for `member` among a backend's `[clients, secrets]`
    /// links, and the member's name.
    pub fn of<'m>(
        links: &'static [Link; 2],
        member: &'m crate::store::Member,
    ) -> (&'static Link, &'m str) {
        match member {
            crate::store::Member::Client(name) => (&links[0], name),
            crate::store::Member::Secret(name) => (&links[1], name),
        }
    }
}

/// A `secrets` row as stored. `labels` is the labels' JSON exactly as
/// stored (a `BTreeMap` serialized: keys in order, so one set of labels
/// has one text).
#[derive(Clone, Copy, Debug)]
pub struct SecretRow<'a> {
    pub id: u64,
    pub name: &'a str,
    pub description: &'a str,
    pub labels: &'a str,
    pub mode: u32,
    pub owner: Option<u32>,
    pub grp: Option<u32>,
    pub expires_at: Option<i64>,
    pub current_version: u64,
    pub version_count: u64,
    pub created_at: i64,
    pub updated_at: i64,
}

impl<'a> SecretRow<'a> {
    /// The row of `r`, its labels as stored (`labels`, JSON): the one
    /// list of what a secret's MAC covers, for every record at hand.
    pub fn of(r: &'a crate::store::SecretRecord, labels: &'a str) -> SecretRow<'a> {
        SecretRow {
            id: r.id,
            name: &r.name,
            description: &r.description,
            labels,
            mode: r.mode,
            owner: r.owner,
            grp: r.group,
            expires_at: r.expires_at,
            current_version: r.current_version,
            version_count: r.version_count,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

pub fn secret(r: &SecretRow<'_>) -> MacInput {
    MacInput::new(SECRETS)
        .u64(r.id)
        .str(r.name)
        .str(r.description)
        .str(r.labels)
        .u64(u64::from(r.mode))
        .opt_i64(r.owner.map(i64::from))
        .opt_i64(r.grp.map(i64::from))
        .opt_i64(r.expires_at)
        .u64(r.current_version)
        .u64(r.version_count)
        .i64(r.created_at)
        .i64(r.updated_at)
}

pub fn meta(key: &str, value: &[u8]) -> MacInput {
    MacInput::new(META).str(key).bytes(value)
}

/// The finding's table name when the row set digest does not match
/// (rows put back, deleted or added without the key): not one row.
pub const ROW_SET: &str = "row_set";

/// What the sealed row set record is bound to (secret ids start at 1).
pub const ROW_SET_BINDING: crate::envelope::Binding<'static> = crate::envelope::Binding {
    secret_id: 0,
    name: "secretfs row set",
    version: 0,
};

/// A `mac` column's value as stored, whatever its type: what a row
/// contributes to the row set.
#[derive(Clone, Copy, Debug)]
pub enum StoredMac<'a> {
    Null,
    Blob(&'a [u8]),
    Text(&'a [u8]),
    Integer(i64),
    Real(f64),
}

/// One row's share of the row set digest: HMAC under the row set key over
/// the row's kind and its MAC as stored. A row's MAC covers its identity
/// and columns, so two good rows never share one; the digest is the XOR
/// of every share, so a write moves it by the shares of the rows it
/// removes and adds.
pub fn row_set_h(key: &MacKey, kind: &str, mac: StoredMac<'_>) -> [u8; MAC_LEN] {
    let input = MacInput::new(ROW_SET).str(kind);
    let input = match mac {
        StoredMac::Null => input.u64(0),
        StoredMac::Blob(b) => input.u64(1).bytes(b),
        StoredMac::Text(b) => input.u64(2).bytes(b),
        StoredMac::Integer(v) => input.u64(3).i64(v),
        StoredMac::Real(v) => input.u64(4).u64(v.to_bits()),
    };
    key.tag(&input)
}

pub fn xor_into(acc: &mut [u8; MAC_LEN], h: &[u8; MAC_LEN]) {
    for (a, b) in acc.iter_mut().zip(h) {
        *a ^= b;
    }
}

/// The sealed row set record: the digest over every protected row, the
/// key epoch whose row set key made it, the revision it was last signed in
/// full at (`written_at`: informational, nothing reads it; the write jobs
/// that fold a change into the digest leave it) and the revision at which
/// a full recomputation last agreed with it.
/// Sealed (AES-GCM under the master key): whoever reads the database
/// never sees the digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowSetRecord {
    pub epoch: u32,
    pub written_at: u64,
    pub checked_at: u64,
    pub digest: [u8; MAC_LEN],
}

const ROW_SET_FORMAT: u8 = 1;
const ROW_SET_LEN: usize = 1 + 4 + 8 + 8 + MAC_LEN;

impl RowSetRecord {
    /// A record of `digest` under the current key, written and checked
    /// at revision `at`.
    pub fn current(keys: &Keys, at: u64, digest: [u8; MAC_LEN]) -> RowSetRecord {
        RowSetRecord {
            epoch: keys.current.epoch(),
            written_at: at,
            checked_at: at,
            digest,
        }
    }

    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>, crate::error::Error> {
        let mut plain = Vec::with_capacity(ROW_SET_LEN);
        plain.push(ROW_SET_FORMAT);
        plain.extend_from_slice(&self.epoch.to_be_bytes());
        plain.extend_from_slice(&self.written_at.to_be_bytes());
        plain.extend_from_slice(&self.checked_at.to_be_bytes());
        plain.extend_from_slice(&self.digest);
        let sealed = keys.current.master().seal(ROW_SET_BINDING, &plain)?;
        Ok([sealed.wrapped_key, sealed.ciphertext].concat())
    }

    /// The record, if it opens under a key this server holds.
    pub fn open(keys: &Keys, blob: &[u8]) -> Option<RowSetRecord> {
        let at = crate::keys::KEY_CHECK_WRAPPED;
        if blob.len() < at {
            return None;
        }
        let sealed = crate::envelope::Sealed {
            wrapped_key: blob[..at].to_vec(),
            ciphertext: blob[at..].to_vec(),
        };
        let plain = keys.open(ROW_SET_BINDING, &sealed).ok()?;
        let p = plain.as_bytes();
        if p.len() != ROW_SET_LEN || p[0] != ROW_SET_FORMAT {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(p[i..i + 8].try_into().expect("8 bytes"));
        Some(RowSetRecord {
            epoch: u32::from_be_bytes(p[1..5].try_into().expect("4 bytes")),
            written_at: u64_at(5),
            checked_at: u64_at(13),
            digest: p[21..].try_into().expect("32 bytes"),
        })
    }
}

/// The row set record as read from a backend.
pub enum StoredRecord {
    Missing,
    /// It does not open under any key this server holds (edited, or
    /// sealed under a key no longer held).
    Unreadable,
    Good(RowSetRecord),
}

/// The record, if it can be checked: there, opening, and under a key
/// epoch this server holds (`keys.set_for(rec.epoch)` is then `Some`);
/// else the finding.
pub fn checkable(keys: &Keys, stored: StoredRecord) -> Result<RowSetRecord, BadRow> {
    match stored {
        StoredRecord::Missing => Err(row_set_mismatch(
            None,
            Some("the row set record was deleted"),
        )),
        StoredRecord::Unreadable => Err(row_set_mismatch(
            None,
            Some("the row set record does not open under the master key"),
        )),
        StoredRecord::Good(rec) if keys.set_for(rec.epoch).is_none() => Err(row_set_mismatch(
            Some(rec.checked_at),
            Some("the row set record is under a master key epoch this server does not hold"),
        )),
        StoredRecord::Good(rec) => Ok(rec),
    }
}

/// Whether two digests are equal, in time that does not depend on where
/// they differ.
pub fn same(a: &[u8; MAC_LEN], b: &[u8; MAC_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A rekey's end refused because the row set is a finding.
pub fn cannot_move(finding: BadRow) -> crate::store::StoreError {
    crate::store::StoreError::Check(
        format!(
            "the rekey cannot finish: {}; then ask for the rekey again",
            finding.what
        )
        .into(),
    )
}

/// The finding when the row set does not agree: rows were put back,
/// deleted or added without the key; which ones cannot be told.
pub fn row_set_mismatch(checked_at: Option<u64>, why: Option<&str>) -> BadRow {
    let since = match checked_at {
        Some(r) => format!("since revision {r}"),
        None => "at some point".to_owned(),
    };
    let why = why.map(|w| format!(" ({w})")).unwrap_or_default();
    BadRow {
        table: ROW_SET,
        key: match checked_at {
            Some(r) => format!("checked_at={r}"),
            None => "record".to_owned(),
        },
        what: format!(
            "rows were put back, deleted or added without the key {since}{why}; which ones \
             cannot be told: restore from a backup, or after review accept the current rows \
             with `secretfs server verify --accept`"
        ),
    }
}

/// A row whose MAC failed (or is missing): named by table and key, never
/// by content.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct BadRow {
    pub table: &'static str,
    /// The row's identity, e.g. `id=3` or `group_id=1 client_id=2`.
    pub key: String,
    /// What is wrong, e.g. "MAC does not match".
    pub what: String,
}

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} row {}: {}", self.table, self.key, self.what)
    }
}

/// How many distinct bad rows a process remembers having reported: past
/// that, a bad row is still absent but no longer reported again and again.
const REMEMBERED: usize = 10_000;

/// Bad rows met by reads, each reported once per process, waiting for the
/// domain to log and audit them ([`crate::store::Store::take_bad_rows`]).
#[derive(Debug, Default)]
pub struct BadRowLog {
    any: AtomicBool,
    inner: Mutex<BadRowInner>,
}

#[derive(Debug, Default)]
struct BadRowInner {
    seen: HashSet<(&'static str, String)>,
    pending: Vec<BadRow>,
}

impl BadRowLog {
    pub fn report(&self, row: BadRow) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.seen.len() >= REMEMBERED || !g.seen.insert((row.table, row.key.clone())) {
            return;
        }
        g.pending.push(row);
        self.any.store(true, Ordering::Release);
    }

    /// The bad rows reported since the last call.
    pub fn take(&self) -> Vec<BadRow> {
        if !self.any.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()).pending)
    }
}

/// The keys of one operation and where bad rows go: what a read checks
/// rows with.
pub struct Checker<'a> {
    pub keys: &'a Keys,
    pub log: &'a BadRowLog,
}

impl Checker<'_> {
    /// Whether `mac` is good for `input`; when not, the row (`table`,
    /// `key()`) is reported.
    pub fn ok(
        &self,
        table: &'static str,
        key: impl FnOnce() -> String,
        input: &MacInput,
        mac: Option<&[u8]>,
    ) -> bool {
        let good = mac.is_some_and(|m| self.keys.row_ok(input, m));
        if !good {
            self.log.report(BadRow {
                table,
                key: key(),
                what: what(mac),
            });
        }
        good
    }

    /// Whether a `clients` row's MAC is good (reported when not).
    pub fn client_ok(
        &self,
        c: &crate::store::ClientAuth,
        created_at: i64,
        mac: Option<&[u8]>,
    ) -> bool {
        let id = c.id;
        self.ok(
            CLIENTS,
            || format!("id={id}"),
            &client(c.id, &c.name, c.admin, c.enabled, c.pinned, created_at),
            mac,
        )
    }

    /// Whether a `client_certs` row's MAC is good (reported when not).
    pub fn cert_ok(
        &self,
        client_id: u64,
        serial: &str,
        not_after: i64,
        issued_at: i64,
        mac: Option<&[u8]>,
    ) -> bool {
        self.ok(
            CLIENT_CERTS,
            || format!("client_id={client_id} serial={serial}"),
            &client_cert(client_id, serial, not_after, issued_at),
            mac,
        )
    }

    /// Whether a `groups` row's MAC is good (reported when not).
    pub fn group_ok(&self, id: u64, name: &str, mac: Option<&[u8]>) -> bool {
        self.ok(GROUPS, || format!("id={id}"), &group(id, name), mac)
    }

    /// Whether a `group_clients` row's MAC is good (reported when not).
    pub fn group_client_ok(&self, group_id: u64, client_id: u64, mac: Option<&[u8]>) -> bool {
        self.ok(
            GROUP_CLIENTS,
            || format!("group_id={group_id} client_id={client_id}"),
            &group_client(group_id, client_id),
            mac,
        )
    }

    /// Whether a `group_secrets` row's MAC is good (reported when not).
    pub fn group_secret_ok(&self, group_id: u64, secret_id: u64, mac: Option<&[u8]>) -> bool {
        self.ok(
            GROUP_SECRETS,
            || format!("group_id={group_id} secret_id={secret_id}"),
            &group_secret(group_id, secret_id),
            mac,
        )
    }

    /// Whether a `secrets` row's MAC is good (reported when not).
    pub fn secret_ok(&self, row: &SecretRow<'_>, mac: Option<&[u8]>) -> bool {
        let id = row.id;
        self.ok(SECRETS, || format!("id={id}"), &secret(row), mac)
    }
}

/// Why a row is bad, in words.
pub fn what(mac: Option<&[u8]>) -> String {
    match mac {
        None => "no MAC (the row was added or edited without the master key)".into(),
        Some(_) => "MAC does not match (the row was added or edited without the master key)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::MasterKey;

    #[test]
    fn each_kind_and_field_changes_the_tag() {
        let keys = Keys::new(MasterKey::generate().unwrap());
        let t = |i: MacInput| keys.row_tag(&i);
        assert_ne!(
            t(client(1, "a", false, true, true, 0)),
            t(client(1, "a", true, true, true, 0))
        );
        assert_ne!(t(group_client(1, 2)), t(group_secret(1, 2)));
        assert_ne!(t(group_client(1, 2)), t(group_client(2, 1)));
        let row = SecretRow {
            id: 1,
            name: "db",
            description: "",
            labels: "{}",
            mode: 0o400,
            owner: None,
            grp: None,
            expires_at: None,
            current_version: 2,
            version_count: 2,
            created_at: 1,
            updated_at: 1,
        };
        assert_ne!(
            t(secret(&row)),
            t(secret(&SecretRow {
                current_version: 1,
                ..row
            }))
        );
        assert_ne!(
            t(secret(&row)),
            t(secret(&SecretRow {
                owner: Some(0),
                ..row
            }))
        );
    }

    #[test]
    fn bad_rows_are_reported_once_each() {
        let log = BadRowLog::default();
        let row = |k: &str| BadRow {
            table: CLIENTS,
            key: k.into(),
            what: "x".into(),
        };
        log.report(row("id=1"));
        log.report(row("id=1"));
        log.report(row("id=2"));
        assert_eq!(log.take().len(), 2);
        log.report(row("id=1"));
        assert!(log.take().is_empty());
    }
}
