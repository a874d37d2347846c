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

mod error;
mod feed;
mod sqlite;

#[cfg(test)]
pub(crate) mod conformance;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use error::{Entity, StoreError};
pub use feed::{Change, ChangeFeed, LocalFeed};
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

/// The facts an authentication decides on, read in one transaction.
#[derive(Clone, Debug, Default)]
pub struct AuthLookup {
    /// The registered client of the certificate's name, if any.
    pub client: Option<ClientRecord>,
    /// The serial was recorded for that client (certificates we issued).
    pub serial_issued: bool,
    /// The serial belonged to a removed client (certificates we issued).
    pub serial_revoked: bool,
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

#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// Events where this client acted or was acted upon.
    pub client: Option<String>,
    pub secret: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: u32,
}

/// Seals one version once the store knows the secret's id and version number.
pub type SealFn<'a> = &'a mut dyn FnMut(u64, u64) -> Result<Sealed>;

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
    fn create_secret(
        &self,
        new: &NewSecret,
        audit: &AuditEntry,
        seal: SealFn<'_>,
    ) -> Result<Committed<SecretRecord>>;
    fn rotate_secret(
        &self,
        name: &str,
        size: u64,
        audit: &AuditEntry,
        seal: SealFn<'_>,
    ) -> Result<Committed<SecretRecord>>;
    fn rollback_secret(
        &self,
        name: &str,
        version: u64,
        audit: &AuditEntry,
    ) -> Result<Committed<SecretRecord>>;
    /// Returns the deleted secret's id.
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
    /// `not_after`) to an existing client, beside those it already has
    /// (renewal): the client's groups and other certificates are kept.
    fn add_client_cert(
        &self,
        name: &str,
        serial: &str,
        not_after: i64,
        audit: &AuditEntry,
    ) -> Result<Committed<ClientRecord>>;
    /// Removes the client; the serials issued to it are refused forever.
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
    fn remove_group(&self, name: &str, audit: &AuditEntry) -> Result<Committed<()>>;
    fn set_group_client(
        &self,
        group: &str,
        client: &str,
        member: bool,
        audit: &AuditEntry,
    ) -> Result<Committed<GroupRecord>>;
    fn set_group_secret(
        &self,
        group: &str,
        secret: &str,
        member: bool,
        audit: &AuditEntry,
    ) -> Result<Committed<GroupRecord>>;

    // -- access
    /// What the client can read and through which groups.
    fn client_access(&self, client: &str) -> Result<Vec<AccessRecord>>;
    /// Metadata of every secret the client can read, by name, and the
    /// revision, from one transaction.
    fn client_view(&self, client_id: u64) -> Result<View>;
    /// Sealed current content of the named secrets the client can read (all
    /// of them when `names` is empty). Names it cannot read are returned in
    /// the second list, so the caller can refuse and audit.
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
