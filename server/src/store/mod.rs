//! Storage: every table behind one trait, so SQL stays in one place and a
//! PostgreSQL implementation can sit beside SQLite later.
//!
//! The store only ever sees sealed content (see `envelope`). Methods that
//! change state write their audit row in the same transaction, so the audit
//! log and the data never disagree. Calls are blocking: async callers use
//! `spawn_blocking`.

mod sqlite;

use std::collections::BTreeMap;

pub use sqlite::SqliteStore;

use crate::envelope::Sealed;
use crate::error::Error;

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

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: u64,
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
pub type SealFn<'a> = &'a mut dyn FnMut(u64, u64) -> Result<Sealed, Error>;

pub trait Store: Send + Sync + 'static {
    /// The change counter: bumped by every change, never decreasing.
    fn revision(&self) -> Result<u64, Error>;

    // -- server metadata (key check, trust domain)
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, Error>;
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), Error>;

    // -- secrets
    fn create_secret(
        &self,
        new: &NewSecret,
        actor: &str,
        seal: SealFn<'_>,
    ) -> Result<SecretRecord, Error>;
    fn rotate_secret(
        &self,
        name: &str,
        size: u64,
        actor: &str,
        seal: SealFn<'_>,
    ) -> Result<SecretRecord, Error>;
    fn rollback_secret(&self, name: &str, version: u64, actor: &str)
        -> Result<SecretRecord, Error>;
    fn delete_secret(&self, name: &str, actor: &str) -> Result<(), Error>;
    fn get_secret(&self, name: &str) -> Result<SecretRecord, Error>;
    fn list_secrets(&self) -> Result<Vec<SecretRecord>, Error>;
    fn list_versions(&self, name: &str) -> Result<Vec<VersionRecord>, Error>;

    // -- clients
    fn create_client(&self, new: &NewClient, actor: &str) -> Result<ClientRecord, Error>;
    fn get_client(&self, name: &str) -> Result<ClientRecord, Error>;
    fn list_clients(&self) -> Result<Vec<ClientRecord>, Error>;
    fn remove_client(&self, name: &str, actor: &str) -> Result<(), Error>;
    /// Whether `serial` was issued to the client (for pinned clients).
    fn client_has_cert(&self, client_id: u64, serial: &str) -> Result<bool, Error>;
    /// Whether `serial` belonged to a removed client (built-in CA only);
    /// such a certificate is refused forever.
    fn serial_revoked(&self, serial: &str) -> Result<bool, Error>;

    // -- groups
    fn create_group(
        &self,
        name: &str,
        description: &str,
        actor: &str,
    ) -> Result<GroupRecord, Error>;
    fn get_group(&self, name: &str) -> Result<GroupRecord, Error>;
    fn list_groups(&self) -> Result<Vec<GroupRecord>, Error>;
    fn remove_group(&self, name: &str, actor: &str) -> Result<(), Error>;
    fn set_group_client(
        &self,
        group: &str,
        client: &str,
        member: bool,
        actor: &str,
    ) -> Result<GroupRecord, Error>;
    fn set_group_secret(
        &self,
        group: &str,
        secret: &str,
        member: bool,
        actor: &str,
    ) -> Result<GroupRecord, Error>;

    // -- access
    /// What the client can read and through which groups.
    fn client_access(&self, client: &str) -> Result<Vec<AccessRecord>, Error>;
    /// Metadata of every secret the client can read, by name.
    fn readable_secrets(&self, client_id: u64) -> Result<Vec<SecretRecord>, Error>;
    /// Sealed current content of the named secrets the client can read (all
    /// of them when `names` is empty). Names it cannot read are returned in
    /// the second list, so the caller can refuse and audit.
    fn read_sealed(
        &self,
        client_id: u64,
        names: &[String],
    ) -> Result<(Vec<SealedSecret>, Vec<String>), Error>;

    /// The secret's current sealed content, if the client can read it (one
    /// read transaction; the Watch fast path after a rotation).
    fn read_one_for_client(
        &self,
        client_id: u64,
        secret_id: u64,
    ) -> Result<Option<SealedSecret>, Error>;

    // -- audit
    fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), Error>;
    fn query_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, Error>;
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
