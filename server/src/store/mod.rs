//! Storage: every table behind one trait, so a second backend (PostgreSQL)
//! can sit beside SQLite without the rest of the server knowing.
//!
//! The contract every backend keeps, and [`conformance`] checks:
//! - The store only ever sees sealed content (see `envelope`).
//! - Every change runs in one transaction with its audit entry, which the
//!   caller builds and passes in (the store only stamps what it alone
//!   knows: the version it allocated, whether a membership changed), and
//!   bumps the revision; a write returns the revision it committed at
//!   ([`Committed`]). A failed change writes nothing.
//! - Reads a caller acts on come whole from one transaction: a client's
//!   view with its revision ([`View`]), an authentication's facts
//!   ([`AuthLookup`]).
//! - Errors are [`StoreError`]s, never a driver's type.
//! - Calls are blocking; async callers run at most [`Store::concurrency`]
//!   of them at once, off the async threads.
//! - Committed changes are announced on the store's [`ChangeFeed`].
//! - Every row that decides access or what is served carries a MAC under
//!   the row key ([`integrity`]), written in the change's transaction; a
//!   read treats a row whose MAC fails as absent (never a grant) and
//!   reports it once ([`Store::take_bad_rows`]).

pub mod audit_chain;
mod columns;
mod detail;
mod error;
mod feed;
pub mod integrity;
mod mapping;
mod postgres;
mod rewrap;
mod sqlite;

#[cfg(test)]
pub(crate) mod conformance;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use error::{Entity, StoreError};
pub use feed::{Change, ChangeFeed, LocalFeed};
pub use integrity::BadRow;
pub use postgres::{is_postgres_url, PgConfig, PgStore};
pub use sqlite::SqliteStore;

use crate::envelope::Sealed;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRecord {
    pub id: u64,
    pub name: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    /// 0 means "the mount's default".
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub expires_at: Option<i64>,
    pub current_version: u64,
    pub version_count: u64,
    pub created_at: i64,
    pub updated_at: i64,
    /// Size of the current version's plaintext.
    pub size: u64,
    pub version_created_at: i64,
}

impl SecretRecord {
    /// A digest of the metadata [`SecretUpdate`] can change: what a
    /// watcher holds is compared by it (with id and version), so a
    /// metadata-only change reaches mounts. Stable across restarts and
    /// backends; never 0 (0 is "unknown" on the wire).
    pub fn meta_digest(&self) -> u64 {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        // Length-prefixed fields: no two metadata sets encode alike.
        let mut field = |bytes: &[u8]| {
            ctx.update(&(bytes.len() as u64).to_be_bytes());
            ctx.update(bytes);
        };
        field(self.description.as_bytes());
        field(&(self.labels.len() as u64).to_be_bytes());
        for (k, v) in &self.labels {
            field(k.as_bytes());
            field(v.as_bytes());
        }
        field(&self.mode.to_be_bytes());
        let opt = |v: Option<i64>| match v {
            Some(v) => [&[1u8][..], &v.to_be_bytes()].concat(),
            None => vec![0u8],
        };
        field(&opt(self.owner.map(i64::from)));
        field(&opt(self.group.map(i64::from)));
        field(&opt(self.expires_at));
        let d = ctx.finish();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d.as_ref()[..8]);
        u64::from_be_bytes(first).max(1)
    }
}

/// A metadata change (`secret update`): `None` keeps a field. Labels:
/// `clear_labels` drops them all, then `remove_labels` go and
/// `set_labels` are added or overwritten.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretUpdate {
    pub description: Option<String>,
    pub clear_labels: bool,
    pub remove_labels: Vec<String>,
    pub set_labels: BTreeMap<String, String>,
    pub mode: Option<u32>,
    pub owner: Option<Option<u32>>,
    pub group: Option<Option<u32>>,
    pub expires_at: Option<Option<i64>>,
}

impl SecretUpdate {
    /// True when the update names no change at all.
    pub fn is_empty(&self) -> bool {
        *self == SecretUpdate::default()
    }

    /// Applies the update to `r` and says what changed, for the audit
    /// entry (names and attributes, never a label's value or the
    /// description's text: they may be long). Empty when nothing changed.
    pub fn apply(&self, r: &mut SecretRecord) -> Vec<String> {
        let mut changed = Vec::new();
        if let Some(d) = &self.description {
            if *d != r.description {
                r.description = d.clone();
                changed.push("description".to_owned());
            }
        }
        let before = r.labels.clone();
        if self.clear_labels {
            r.labels.clear();
        }
        for k in &self.remove_labels {
            r.labels.remove(k);
        }
        for (k, v) in &self.set_labels {
            r.labels.insert(k.clone(), v.clone());
        }
        let mut label_changes = Vec::new();
        for k in before.keys().filter(|k| !r.labels.contains_key(*k)) {
            label_changes.push(format!("-{k}"));
        }
        for (k, v) in &r.labels {
            match before.get(k) {
                None => label_changes.push(format!("+{k}")),
                Some(old) if old != v => label_changes.push(format!("~{k}")),
                Some(_) => {}
            }
        }
        if !label_changes.is_empty() {
            changed.push(format!("labels {}", label_changes.join(" ")));
        }
        let shown_mode = |m: u32| {
            if m == 0 {
                "default".to_owned()
            } else {
                format!("{m:04o}")
            }
        };
        if let Some(m) = self.mode {
            if m != r.mode {
                changed.push(format!("mode {} -> {}", shown_mode(r.mode), shown_mode(m)));
                r.mode = m;
            }
        }
        let shown_id = |v: Option<u32>| v.map_or("default".to_owned(), |v| v.to_string());
        if let Some(o) = self.owner {
            if o != r.owner {
                changed.push(format!("owner {} -> {}", shown_id(r.owner), shown_id(o)));
                r.owner = o;
            }
        }
        if let Some(g) = self.group {
            if g != r.group {
                changed.push(format!("group {} -> {}", shown_id(r.group), shown_id(g)));
                r.group = g;
            }
        }
        if let Some(e) = self.expires_at {
            if e != r.expires_at {
                changed.push(format!(
                    "expiry {} -> {}",
                    shown_expiry(r.expires_at),
                    shown_expiry(e)
                ));
                r.expires_at = e;
            }
        }
        changed
    }
}

/// An expiry in an audit detail: RFC 3339 UTC (as `client.renew` shows
/// certificate expiry), or "none".
pub fn shown_expiry(t: Option<i64>) -> String {
    t.map_or("none".to_owned(), crate::pki::rfc3339)
}

/// At most `max` names joined with ", ", then how many more there were:
/// removal details stay bounded whatever a group holds.
pub fn some_names(names: &[String], max: usize) -> String {
    let mut out = names
        .iter()
        .take(max)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > max {
        out.push_str(&format!(" and {} more", names.len() - max));
    }
    out
}

#[derive(Clone, Debug, Default)]
pub struct NewSecret {
    pub name: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub expires_at: Option<i64>,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionRecord {
    pub version: u64,
    pub created_at: i64,
    pub created_by: String,
    pub size: u64,
    pub current: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRecord {
    pub id: u64,
    pub name: String,
    pub admin: bool,
    pub enabled: bool,
    pub created_at: i64,
    /// Issued by our CA: only certificates whose serial we recorded count.
    /// False for clients whose certificates come from the operator's own PKI.
    pub pinned: bool,
    pub cert_serial: Option<String>,
    pub cert_not_after: Option<i64>,
    pub groups: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct NewClient {
    pub name: String,
    pub admin: bool,
    /// `Some((serial, not_after))` for a certificate we issued.
    pub cert: Option<(String, i64)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRecord {
    pub name: String,
    pub description: String,
    pub created_at: i64,
    pub clients: Vec<String>,
    pub secrets: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessRecord {
    pub secret: String,
    pub groups: Vec<String>,
}

/// One readable secret with its current sealed content.
#[derive(Clone, Debug)]
pub struct SealedSecret {
    pub record: SecretRecord,
    pub sealed: Sealed,
}

/// A client's whole view, read in one transaction: the secrets it can read
/// (by name) and the revision the read saw.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub revision: u64,
    pub secrets: Vec<SecretRecord>,
}

/// What authentication decides on about a client, and all an
/// authenticated caller carries: none of it changes without the auth
/// cache being invalidated (unlike a client's groups or certificates).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientAuth {
    pub id: u64,
    pub name: String,
    pub admin: bool,
    pub enabled: bool,
    /// As [`ClientRecord::pinned`].
    pub pinned: bool,
}

/// The facts an authentication decides on, read in one transaction.
#[derive(Clone, Debug, Default)]
pub struct AuthLookup {
    /// The registered client of the certificate's name, if any.
    pub client: Option<ClientAuth>,
    /// The serial was recorded for that client (certificates we issued).
    pub serial_issued: bool,
    /// The serial belonged to a removed client (certificates we issued).
    pub serial_revoked: bool,
}

/// What a group holds, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Member {
    Client(String),
    Secret(String),
}

/// A group after a membership change, and whether a member was actually
/// added or taken out (adding twice or removing what is not there changes
/// no view).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberChange {
    pub group: GroupRecord,
    pub changed: bool,
}

/// A write's result and the revision it committed at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed<T> {
    pub value: T,
    pub revision: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: u64,
    /// 0 = stamped with the time it is written.
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub secret: Option<String>,
    pub client: Option<String>,
    pub group: Option<String>,
    pub version: Option<u64>,
    pub allowed: bool,
    pub detail: String,
}

impl AuditEntry {
    /// This entry with `more` added to its detail (after a "; "), for what
    /// only the store knows: what a removal took with it, what an update
    /// changed.
    pub fn with_detail(&self, more: &str) -> AuditEntry {
        AuditEntry {
            detail: if self.detail.is_empty() {
                more.to_owned()
            } else {
                format!("{}; {more}", self.detail)
            },
            ..self.clone()
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// Events where this client acted or was acted upon.
    pub client: Option<String>,
    pub secret: Option<String>,
    pub since_ms: Option<i64>,
    /// An exact action, or `PREFIX.*` for every action starting `PREFIX.`.
    pub action: Option<String>,
    /// Only allowed (true) or only refused (false) events.
    pub allowed: Option<bool>,
    /// Only events after this id, oldest first (the first `limit` of them)
    /// instead of the newest `limit`.
    pub after_id: Option<u64>,
    pub limit: u32,
}

/// Seals one version once the store knows the secret's id and version number.
pub type SealFn<'a> = &'a mut dyn FnMut(u64, u64) -> Result<Sealed>;

/// Checks a changed record before it is written (e.g. the label limits on
/// the merged set); an error (`StoreError::Check`) writes nothing.
pub type CheckFn<'a> = &'a dyn Fn(&SecretRecord) -> Result<()>;

pub trait Store: Send + Sync + 'static {
    /// How many calls are worth running at once: more only queue on the
    /// store's connections.
    fn concurrency(&self) -> usize;
    /// Where committed changes are announced.
    fn feed(&self) -> Arc<dyn ChangeFeed>;

    /// The change counter: bumped by every change, never decreasing.
    fn revision(&self) -> Result<u64>;

    // -- server metadata (key check, trust domain)
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>>;
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<()>;

    // -- secrets. `audit` is the change's entry; the store stamps the
    // version it wrote (and a rollback's previous version).
    //
    // A name that would be a file and a directory at once in a mount
    // (`db` beside `db/password`, either way round) is refused with
    // `StoreError::NameConflict`, checked in the creating transaction so
    // two concurrent creates cannot both pass.
    fn create_secret(
        &self,
        new: &NewSecret,
        audit: &AuditEntry,
        seal: SealFn<'_>,
    ) -> Result<Committed<SecretRecord>>;
    /// A new version. `expires`: `Some` sets the expiry (`Some(None)`
    /// clears it); `None` keeps it unless it has passed, which clears it
    /// (it described the content being replaced). The store adds what it
    /// did to the expiry to the entry's detail.
    fn rotate_secret(
        &self,
        name: &str,
        size: u64,
        expires: Option<Option<i64>>,
        audit: &AuditEntry,
        seal: SealFn<'_>,
    ) -> Result<Committed<SecretRecord>>;
    /// Changes metadata without a new version; the store writes what
    /// changed into the entry's detail ("no change" when nothing did).
    fn update_secret(
        &self,
        name: &str,
        update: &SecretUpdate,
        check: CheckFn<'_>,
        audit: &AuditEntry,
    ) -> Result<Committed<SecretRecord>>;
    fn rollback_secret(
        &self,
        name: &str,
        version: u64,
        audit: &AuditEntry,
    ) -> Result<Committed<SecretRecord>>;
    /// Returns the deleted secret's id. The entry's detail records what
    /// went: how many versions, and the groups that held it.
    fn delete_secret(&self, name: &str, audit: &AuditEntry) -> Result<Committed<u64>>;
    fn get_secret(&self, name: &str) -> Result<SecretRecord>;
    fn list_secrets(&self) -> Result<Vec<SecretRecord>>;
    fn list_versions(&self, name: &str) -> Result<Vec<VersionRecord>>;

    // -- clients
    fn create_client(&self, new: &NewClient, audit: &AuditEntry)
        -> Result<Committed<ClientRecord>>;
    fn get_client(&self, name: &str) -> Result<ClientRecord>;
    fn list_clients(&self) -> Result<Vec<ClientRecord>>;
    /// Pins one more certificate we issued (`serial`, valid until
    /// `not_after`) to the client with id `client_id` (named `name`),
    /// beside those it already has (renewal): the client's groups and
    /// other certificates are kept. The client is looked up by id in the
    /// write itself, so a client removed (and perhaps re-added under the
    /// same name) since the caller looked is NotFound, and one registered
    /// as external is `External`.
    fn add_client_cert(
        &self,
        client_id: u64,
        name: &str,
        serial: &str,
        not_after: i64,
        audit: &AuditEntry,
    ) -> Result<Committed<ClientRecord>>;
    /// Removes the client; the serials issued to it are refused forever.
    /// The entry's detail records the groups it was in.
    fn remove_client(&self, name: &str, audit: &AuditEntry) -> Result<Committed<()>>;
    /// What deciding whether certificate `serial` authenticates client
    /// `name` needs.
    fn authenticate(&self, name: &str, serial: &str) -> Result<AuthLookup>;

    // -- groups. Adding a member twice or removing one that is not there
    // changes nothing, and the store says so in the entry's detail.
    fn create_group(
        &self,
        name: &str,
        description: &str,
        audit: &AuditEntry,
    ) -> Result<Committed<GroupRecord>>;
    fn get_group(&self, name: &str) -> Result<GroupRecord>;
    fn list_groups(&self) -> Result<Vec<GroupRecord>>;
    /// The entry's detail records the clients and secrets it held.
    fn remove_group(&self, name: &str, audit: &AuditEntry) -> Result<Committed<()>>;
    /// Adds `member` to `group` (`add`), or takes it out.
    fn set_group_member(
        &self,
        group: &str,
        member: &Member,
        add: bool,
        audit: &AuditEntry,
    ) -> Result<Committed<MemberChange>>;

    // -- access
    /// What the client can read and through which groups.
    fn client_access(&self, client: &str) -> Result<Vec<AccessRecord>>;
    /// Metadata of every secret the client can read, by name, and the
    /// revision, from one transaction.
    fn client_view(&self, client_id: u64) -> Result<View>;
    /// Sealed current content of the named secrets the client can read.
    /// Names it cannot read are returned in the second list, so the caller
    /// can refuse and audit.
    fn read_sealed(
        &self,
        client_id: u64,
        names: &[String],
    ) -> Result<(Vec<SealedSecret>, Vec<String>)>;
    /// The secret's current sealed content, if the client can read it (one
    /// read transaction; the Watch fast path after a rotation).
    fn read_one_for_client(&self, client_id: u64, secret_id: u64) -> Result<Option<SealedSecret>>;

    // -- audit
    fn append_audit(&self, entries: &[AuditEntry]) -> Result<()>;
    fn query_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>>;

    // -- rekey (stream "keys")
    /// Sets (`Some`) or deletes (`None`) several metadata entries in one
    /// transaction: a rekey's start and end each change several at once.
    fn put_metas(&self, entries: &[(&str, Option<&[u8]>)]) -> Result<()>;
    /// Moves up to `limit` secret versions' wrapped data keys from the
    /// previous master key to the current one (content untouched), going on
    /// from where the last call stopped (a cursor kept in the same
    /// transaction, so a crash resumes there). Returns the versions looked
    /// at; 0 when every one has been. Without a previous key, 0.
    fn rewrap_keys(&self, limit: usize) -> Result<usize>;
    // ---- audit stream (issue 12): the audit hash chain. Every audit
    // insert is chained (and the head row moved) in its own transaction.
    /// Walks the whole chain (streaming, never the whole log in memory)
    /// and reports the first break.
    fn verify_audit(&self) -> Result<audit_chain::AuditVerdict>;
    /// Up to `limit` entries after `after_id`, oldest first, with their
    /// chain values (for the external sink).
    fn audit_after(&self, after_id: u64, limit: usize) -> Result<Vec<audit_chain::ChainedEntry>>;
    /// The head row, if there is one.
    fn audit_head(&self) -> Result<Option<audit_chain::AuditHead>>;
    // -- integrity (rows). Every row that decides access or what is served
    // carries a MAC ([`integrity`]); reads treat a row whose MAC fails as
    // absent and remember it here, once per row per process.
    /// The bad rows reads met since the last call, for the caller to log
    /// and audit.
    fn take_bad_rows(&self) -> Vec<BadRow>;
    /// Every bad row of every protected table (read only).
    fn verify_rows(&self) -> Result<Vec<BadRow>>;
    /// Re-signs under the current key up to `limit` rows whose MAC is good
    /// only under the previous one (a rekey); returns how many (0: every
    /// row is under the current key). Rows good under neither are left
    /// alone (`verify_rows` lists them).
    fn reseal_rows(&self, limit: usize) -> Result<usize>;
    // The row set (stream "replay"): a sealed digest over every protected
    // row, kept by every write in its transaction, so a row put back
    // (replayed with its old MAC), deleted or added without the key is
    // detected; `verify_rows` lists a mismatch as a row of table
    // `integrity::ROW_SET`.
    /// Recomputes the row set (O(rows)) and compares; when it agrees,
    /// records the revision it was checked at. `Some`: the finding.
    fn check_row_set(&self) -> Result<Option<BadRow>>;
    /// Takes the rows as they are as the row set (an operator's decision
    /// after reviewing a mismatch), with `audit` (the store adds the
    /// revision to its detail) in the same transaction; returns the
    /// revision.
    fn accept_row_set(&self, audit: &AuditEntry) -> Result<u64>;
    // -- rekey fixes (stream "fixkeys")
    /// Every secret version (name, version) whose wrapped data key does
    /// not open under `key` (read only, O(versions)): what a rekey could
    /// not move, or what still needs the old key.
    fn versions_not_opening(&self, key: &crate::envelope::MasterKey) -> Result<Vec<(String, u64)>>;
    /// [`put_metas`](Store::put_metas) and `audit` in one transaction: a
    /// rekey's start and end are audited exactly when they happen.
    fn put_metas_audited(
        &self,
        entries: &[(&str, Option<&[u8]>)],
        audit: &AuditEntry,
    ) -> Result<()>;
    // -- replicas (issue 13)
    /// Other server processes serving this database now (replicas), each
    /// described by where it connects from: what must not run while a
    /// rekey changes the master key under them. Empty for a store only
    /// this process opens.
    fn other_replicas(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn now_s() -> i64 {
    now_ms() / 1000
}
