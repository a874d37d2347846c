//! The PostgreSQL store: the same schema, migrations and behaviour as the
//! SQLite store, for several replicas on one database.
//!
//! SKELETON: the interface the rest of the server is built against while
//! the store is written (issue 13). Every call fails until then.

mod conn;
#[allow(dead_code)] // Until the store starts it (PgStore::open).
mod listen;
#[allow(dead_code)] // SKELETON: used once the store is built.
mod notify;
#[allow(dead_code)] // Until the store connects with it (conn.rs).
mod tls;

use std::sync::Arc;

pub use conn::{is_postgres_url, PgConfig};

use super::*;
use crate::keys::KeyRing;

pub struct PgStore {
    feed: Arc<LocalFeed>,
    #[allow(dead_code)]
    keys: Arc<KeyRing>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgStore")
    }
}

fn not_built() -> StoreError {
    StoreError::Unavailable("the PostgreSQL store is not built yet".into())
}

impl PgStore {
    /// Connects to the database of `cfg`. `create` (`server init`): the
    /// database must be empty, and the schema is made. Otherwise it must
    /// hold a secretfs schema: an older one is brought up to date (only
    /// `server run` passes `create = false` and upgrades; see
    /// [`needs_upgrade`](Self::needs_upgrade)), a newer one is refused.
    /// Starts listening for other replicas' changes (the feed).
    pub fn open(cfg: &PgConfig, create: bool, keys: Arc<KeyRing>) -> Result<PgStore> {
        let _ = (cfg, create);
        let _ = PgStore {
            feed: Arc::new(LocalFeed::default()),
            keys,
        };
        Err(not_built())
    }

    /// Whether the database has migrations this version would run (read
    /// only).
    pub fn needs_upgrade(cfg: &PgConfig) -> Result<bool> {
        let _ = cfg;
        Err(not_built())
    }
}

#[allow(unused_variables)]
impl Store for PgStore {
    fn concurrency(&self) -> usize {
        1
    }
    fn feed(&self) -> Arc<dyn ChangeFeed> {
        self.feed.clone()
    }
    fn revision(&self) -> Result<u64> {
        Err(not_built())
    }
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Err(not_built())
    }
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        Err(not_built())
    }
    fn create_secret(
        &self,
        new: &NewSecret,
        audit: &AuditEntry,
        seal: SealFn<'_>,
    ) -> Result<Committed<SecretRecord>> {
        Err(not_built())
    }
    fn rotate_secret(
        &self,
        name: &str,
        size: u64,
        expires: Option<Option<i64>>,
        audit: &AuditEntry,
        seal: SealFn<'_>,
    ) -> Result<Committed<SecretRecord>> {
        Err(not_built())
    }
    fn update_secret(
        &self,
        name: &str,
        update: &SecretUpdate,
        check: CheckFn<'_>,
        audit: &AuditEntry,
    ) -> Result<Committed<SecretRecord>> {
        Err(not_built())
    }
    fn rollback_secret(
        &self,
        name: &str,
        version: u64,
        audit: &AuditEntry,
    ) -> Result<Committed<SecretRecord>> {
        Err(not_built())
    }
    fn delete_secret(&self, name: &str, audit: &AuditEntry) -> Result<Committed<u64>> {
        Err(not_built())
    }
    fn get_secret(&self, name: &str) -> Result<SecretRecord> {
        Err(not_built())
    }
    fn list_secrets(&self) -> Result<Vec<SecretRecord>> {
        Err(not_built())
    }
    fn list_versions(&self, name: &str) -> Result<Vec<VersionRecord>> {
        Err(not_built())
    }
    fn create_client(
        &self,
        new: &NewClient,
        audit: &AuditEntry,
    ) -> Result<Committed<ClientRecord>> {
        Err(not_built())
    }
    fn get_client(&self, name: &str) -> Result<ClientRecord> {
        Err(not_built())
    }
    fn list_clients(&self) -> Result<Vec<ClientRecord>> {
        Err(not_built())
    }
    fn add_client_cert(
        &self,
        client_id: u64,
        name: &str,
        serial: &str,
        not_after: i64,
        audit: &AuditEntry,
    ) -> Result<Committed<ClientRecord>> {
        Err(not_built())
    }
    fn remove_client(&self, name: &str, audit: &AuditEntry) -> Result<Committed<()>> {
        Err(not_built())
    }
    fn authenticate(&self, name: &str, serial: &str) -> Result<AuthLookup> {
        Err(not_built())
    }
    fn create_group(
        &self,
        name: &str,
        description: &str,
        audit: &AuditEntry,
    ) -> Result<Committed<GroupRecord>> {
        Err(not_built())
    }
    fn get_group(&self, name: &str) -> Result<GroupRecord> {
        Err(not_built())
    }
    fn list_groups(&self) -> Result<Vec<GroupRecord>> {
        Err(not_built())
    }
    fn remove_group(&self, name: &str, audit: &AuditEntry) -> Result<Committed<()>> {
        Err(not_built())
    }
    fn set_group_member(
        &self,
        group: &str,
        member: &Member,
        add: bool,
        audit: &AuditEntry,
    ) -> Result<Committed<MemberChange>> {
        Err(not_built())
    }
    fn client_access(&self, client: &str) -> Result<Vec<AccessRecord>> {
        Err(not_built())
    }
    fn client_view(&self, client_id: u64) -> Result<View> {
        Err(not_built())
    }
    fn read_sealed(
        &self,
        client_id: u64,
        names: &[String],
    ) -> Result<(Vec<SealedSecret>, Vec<String>)> {
        Err(not_built())
    }
    fn read_one_for_client(&self, client_id: u64, secret_id: u64) -> Result<Option<SealedSecret>> {
        Err(not_built())
    }
    fn append_audit(&self, entries: &[AuditEntry]) -> Result<()> {
        Err(not_built())
    }
    fn query_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        Err(not_built())
    }
    fn put_metas(&self, entries: &[(&str, Option<&[u8]>)]) -> Result<()> {
        Err(not_built())
    }
    fn rewrap_keys(&self, limit: usize) -> Result<usize> {
        Err(not_built())
    }
    fn verify_audit(&self) -> Result<audit_chain::AuditVerdict> {
        Err(not_built())
    }
    fn audit_after(&self, after_id: u64, limit: usize) -> Result<Vec<audit_chain::ChainedEntry>> {
        Err(not_built())
    }
    fn audit_head(&self) -> Result<Option<audit_chain::AuditHead>> {
        Err(not_built())
    }
    fn take_bad_rows(&self) -> Vec<BadRow> {
        Vec::new()
    }
    fn verify_rows(&self) -> Result<Vec<BadRow>> {
        Err(not_built())
    }
    fn reseal_rows(&self, limit: usize) -> Result<usize> {
        Err(not_built())
    }
    fn check_row_set(&self) -> Result<Option<BadRow>> {
        Err(not_built())
    }
    fn accept_row_set(&self, audit: &AuditEntry) -> Result<u64> {
        Err(not_built())
    }
    fn versions_not_opening(&self, key: &crate::envelope::MasterKey) -> Result<Vec<(String, u64)>> {
        Err(not_built())
    }
    fn put_metas_audited(
        &self,
        entries: &[(&str, Option<&[u8]>)],
        audit: &AuditEntry,
    ) -> Result<()> {
        Err(not_built())
    }
}
