//! The PostgreSQL store: the same schema, migrations and behaviour as the
//! SQLite store, for several replicas on one database.
//!
//! - `conn`: the URL, its TLS policy, the password, driver errors.
//! - `commit`: the pool of connections for reads, the writer connection
//!   and its group commit (each job: the revision row's lock first, the
//!   audit chain, the row set and the notification at the end), retries.
//! - `migrate` and `migrations/*.sql`: the schema, append only.
//! - `rows`: row mapping shared by the queries.
//! - `secrets`, `clients`, `groups`, `audit`: the queries of each entity.
//! - `macs`: row MACs; `row_set`: the sealed digest over every protected
//!   row; `rekey`: a rekey's store side.
//! - `notify`: the NOTIFY payload; `listen` (replicas stream): the feed.
//!
//! Each file mirrors its namesake in `store/sqlite/`, so the two can be
//! compared query by query.

mod audit;
mod clients;
mod commit;
mod conn;
mod groups;
mod listen;
mod macs;
mod migrate;
mod notify;
mod rekey;
mod row_set;
mod rows;
mod secrets;
mod session;
mod tls;

use std::sync::Arc;

pub use conn::{is_postgres_url, PgConfig};

use self::commit::{Pool, Write, POOL_SIZE};
use super::*;
use crate::keys::KeyRing;
use integrity::{BadRow, BadRowLog, Checker};

pub struct PgStore {
    pool: Pool,
    /// Where committed changes are announced: this process's own at once,
    /// and every replica's through the database's LISTEN/NOTIFY
    /// (`listen.rs`).
    feed: Arc<dyn ChangeFeed>,
    keys: Arc<KeyRing>,
    bad_rows: BadRowLog,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.pool.cfg().redacted())
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database of `cfg`. `create` (`server init`): the
    /// database must be empty, and the schema is made. Otherwise it must
    /// hold a secretfs schema: an older one is brought up to date (only
    /// `server run` passes `create = false` and upgrades; see
    /// [`needs_upgrade`](Self::needs_upgrade)), a newer one is refused.
    /// Blocking: call it off the async threads.
    pub fn open(cfg: &PgConfig, create: bool, keys: Arc<KeyRing>) -> Result<PgStore> {
        let pool = Pool::new(cfg.clone());
        {
            let mut conn = pool.get()?;
            migrate::open(conn.client(), create, &keys.get(), cfg.redacted())?;
        }
        // Listening starts at the revision the store opens at: changes
        // from here on, from any replica, reach this process's feed.
        let revision = pool.read(audit::revision)?;
        let feed = listen::PgFeed::for_store(cfg, revision)?;
        Ok(PgStore {
            pool,
            feed,
            keys,
            bad_rows: BadRowLog::default(),
        })
    }

    /// Whether the database has migrations this version would run (read
    /// only; false for a database without a secretfs schema).
    pub fn needs_upgrade(cfg: &PgConfig) -> Result<bool> {
        let mut client = conn::connect(cfg)?;
        migrate::needs_upgrade(&mut client)
    }

    /// Drops the schema [`open`](Self::open) with `create` made: `server
    /// init` undoing its own work when a step after it failed (its key
    /// check is the one this init wrote, or none yet). Not for a database
    /// in use: every table and what is in it is gone. Blocking.
    pub fn drop_schema(cfg: &PgConfig) -> Result<()> {
        let mut client = conn::connect(cfg)?;
        migrate::drop_all(&mut client)
    }

    /// Runs `f` with this operation's keys (taken once) and the bad-row log.
    fn checked<T>(&self, f: impl FnOnce(&Checker<'_>) -> T) -> T {
        let keys = self.keys.get();
        f(&Checker {
            keys: &keys,
            log: &self.bad_rows,
        })
    }

    /// A change (the next revision), with the checker.
    fn change<T>(
        &self,
        f: impl FnMut(&mut commit::Tx<'_>, &Checker<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut f = f;
        self.checked(|ck| self.pool.write(ck.keys, Write::Change, |tx| f(tx, ck)))
    }

    fn read<T>(
        &self,
        mut f: impl FnMut(&mut commit::Tx<'_>, &Checker<'_>) -> Result<T>,
    ) -> Result<T> {
        self.checked(|ck| self.pool.read(|tx| f(tx, ck)))
    }
}

impl Store for PgStore {
    fn concurrency(&self) -> usize {
        POOL_SIZE
    }

    fn feed(&self) -> Arc<dyn ChangeFeed> {
        self.feed.clone()
    }

    fn revision(&self) -> Result<u64> {
        self.pool.read(audit::revision)
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.read(|tx, ck| {
            let found = tx.opt("SELECT value, mac FROM meta WHERE key = $1", &[&key])?;
            let Some(r) = found else {
                return Ok(None);
            };
            let value: Vec<u8> = r.try_get(0)?;
            let mac: Option<Vec<u8>> = r.try_get(1)?;
            let good = key == integrity::META_UNSIGNED
                || ck.ok(
                    integrity::META,
                    || format!("key={key}"),
                    &integrity::meta(key, &value),
                    mac.as_deref(),
                );
            Ok(good.then_some(value))
        })
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        let keys = self.keys.get();
        self.pool.write(&keys, Write::Locked, |tx| {
            macs::write_meta(tx, &keys, key, value)
        })
    }

    fn create_secret(
        &self,
        new: &NewSecret,
        audit: &AuditEntry,
        seal: SealFn<'_>,
    ) -> Result<Committed<SecretRecord>> {
        self.change(|tx, ck| secrets::create(tx, ck, new, audit, &mut *seal))
    }

    fn rotate_secret(
        &self,
        name: &str,
        size: u64,
        expires: Option<Option<i64>>,
        audit: &AuditEntry,
        seal: SealFn<'_>,
    ) -> Result<Committed<SecretRecord>> {
        // The secret is read first on a connection of the pool, off the
        // revision row's lock, so the writer makes the rotation in one
        // round trip; should it have changed meanwhile, the rotation is
        // made again, reading it under the lock.
        self.checked(|ck| {
            let seen = self.pool.read_one(|tx| secrets::seen(tx, ck, name))?;
            let mut rotate = |seen: Option<&secrets::Seen>| {
                self.pool.write(ck.keys, Write::Change, |tx| {
                    secrets::rotate(tx, ck, name, size, expires, audit, &mut *seal, seen)
                })
            };
            match rotate(Some(&seen)) {
                Err(e) if secrets::is_stale(&e) => rotate(None),
                done => done,
            }
        })
    }

    fn update_secret(
        &self,
        name: &str,
        update: &SecretUpdate,
        check: CheckFn<'_>,
        audit: &AuditEntry,
    ) -> Result<Committed<SecretRecord>> {
        self.change(|tx, ck| secrets::update(tx, ck, name, update, check, audit))
    }

    fn rollback_secret(
        &self,
        name: &str,
        version: u64,
        audit: &AuditEntry,
    ) -> Result<Committed<SecretRecord>> {
        self.change(|tx, ck| secrets::rollback(tx, ck, name, version, audit))
    }

    fn delete_secret(&self, name: &str, audit: &AuditEntry) -> Result<Committed<u64>> {
        self.change(|tx, _| secrets::delete(tx, name, audit))
    }

    fn get_secret(&self, name: &str) -> Result<SecretRecord> {
        self.read(|tx, ck| secrets::by_name(tx, ck, name))
    }

    fn list_secrets(&self) -> Result<Vec<SecretRecord>> {
        self.read(secrets::list)
    }

    fn list_versions(&self, name: &str) -> Result<Vec<VersionRecord>> {
        self.read(|tx, ck| secrets::versions(tx, ck, name))
    }

    fn create_client(
        &self,
        new: &NewClient,
        audit: &AuditEntry,
    ) -> Result<Committed<ClientRecord>> {
        self.change(|tx, ck| clients::create(tx, ck, new, audit))
    }

    fn get_client(&self, name: &str) -> Result<ClientRecord> {
        self.read(|tx, ck| clients::by_name(tx, ck, name))
    }

    fn list_clients(&self) -> Result<Vec<ClientRecord>> {
        self.read(clients::list)
    }

    fn add_client_cert(
        &self,
        client_id: u64,
        name: &str,
        serial: &str,
        not_after: i64,
        audit: &AuditEntry,
    ) -> Result<Committed<ClientRecord>> {
        self.change(|tx, ck| clients::add_cert(tx, ck, client_id, name, serial, not_after, audit))
    }

    fn remove_client(&self, name: &str, audit: &AuditEntry) -> Result<Committed<()>> {
        self.change(|tx, ck| clients::remove(tx, ck, name, audit))
    }

    fn authenticate(&self, name: &str, serial: &str) -> Result<AuthLookup> {
        self.read(|tx, ck| clients::authenticate(tx, ck, name, serial))
    }

    fn create_group(
        &self,
        name: &str,
        description: &str,
        audit: &AuditEntry,
    ) -> Result<Committed<GroupRecord>> {
        self.change(|tx, ck| groups::create(tx, ck, name, description, audit))
    }

    fn get_group(&self, name: &str) -> Result<GroupRecord> {
        self.read(|tx, ck| groups::by_name(tx, ck, name))
    }

    fn list_groups(&self) -> Result<Vec<GroupRecord>> {
        self.read(groups::list)
    }

    fn remove_group(&self, name: &str, audit: &AuditEntry) -> Result<Committed<()>> {
        self.change(|tx, ck| groups::remove(tx, ck, name, audit))
    }

    fn set_group_member(
        &self,
        group: &str,
        member: &Member,
        add: bool,
        audit: &AuditEntry,
    ) -> Result<Committed<MemberChange>> {
        self.change(|tx, ck| groups::set_member(tx, ck, group, member, add, audit))
    }

    fn client_access(&self, client: &str) -> Result<Vec<AccessRecord>> {
        self.read(|tx, ck| clients::access(tx, ck, client))
    }

    fn client_view(&self, client_id: u64) -> Result<View> {
        self.read(|tx, ck| secrets::client_view(tx, ck, client_id))
    }

    fn read_sealed(
        &self,
        client_id: u64,
        names: &[String],
    ) -> Result<(Vec<SealedSecret>, Vec<String>)> {
        self.read(|tx, ck| secrets::read_sealed(tx, ck, client_id, names))
    }

    fn read_one_for_client(&self, client_id: u64, secret_id: u64) -> Result<Option<SealedSecret>> {
        self.read(|tx, ck| secrets::read_one_for_client(tx, ck, client_id, secret_id))
    }

    fn append_audit(&self, entries: &[AuditEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let keys = self.keys.get();
        self.pool.write(&keys, Write::AuditOnly, |tx| {
            entries.iter().try_for_each(|e| audit::insert(tx, e))
        })
    }

    fn query_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        self.pool.read(|tx| audit::query(tx, filter))
    }

    fn put_metas(&self, entries: &[(&str, Option<&[u8]>)]) -> Result<()> {
        let keys = self.keys.get();
        self.pool.write(&keys, Write::Locked, |tx| {
            rekey::put_metas(tx, &keys, entries)
        })
    }

    fn rewrap_keys(&self, limit: usize) -> Result<usize> {
        // The keys are taken inside the write, after the revision row's
        // lock: every write that began before the ring was replaced (and
        // may have sealed under the old key) has committed by then.
        let outer = self.keys.get();
        self.pool.write(&outer, Write::Locked, |tx| {
            rekey::rewrap(tx, &self.keys.get(), limit)
        })
    }

    fn verify_audit(&self) -> Result<audit_chain::AuditVerdict> {
        let keys = self.keys.get();
        self.pool.read(|tx| audit::verify(tx, &keys))
    }

    fn audit_after(&self, after_id: u64, limit: usize) -> Result<Vec<audit_chain::ChainedEntry>> {
        self.pool.read(|tx| audit::after(tx, after_id, limit))
    }

    fn audit_head(&self) -> Result<Option<audit_chain::AuditHead>> {
        self.pool.read(audit::head)
    }

    fn take_bad_rows(&self) -> Vec<BadRow> {
        self.bad_rows.take()
    }

    fn verify_rows(&self) -> Result<Vec<BadRow>> {
        let keys = self.keys.get();
        self.pool.read(|tx| {
            let mut bad = macs::verify(tx, &keys)?;
            if let Err(finding) = row_set::check(tx, &keys)? {
                bad.push(finding);
            }
            Ok(bad)
        })
    }

    fn reseal_rows(&self, limit: usize) -> Result<usize> {
        let keys = self.keys.get();
        self.pool.write(&keys, Write::Locked, |tx| {
            let done = macs::reseal(tx, &keys, limit)?;
            if done == 0 && keys.previous.is_some() {
                row_set::move_to_current(tx, &keys)?;
            }
            Ok(done)
        })
    }

    fn check_row_set(&self) -> Result<Option<BadRow>> {
        let keys = self.keys.get();
        let (found, at) = self
            .pool
            .read(|tx| Ok((row_set::check(tx, &keys)?, audit::revision(tx)?)))?;
        match found {
            Ok(_) => {
                self.pool
                    .write(&keys, Write::Locked, |tx| row_set::stamp(tx, &keys, at))?;
                Ok(None)
            }
            Err(finding) => Ok(Some(finding)),
        }
    }

    fn accept_row_set(&self, audit: &AuditEntry) -> Result<u64> {
        let keys = self.keys.get();
        self.pool.write(&keys, Write::Locked, |tx| {
            let at = row_set::sign_all(tx, &keys)?;
            audit::insert(
                tx,
                &audit.with_detail(&crate::store::detail::row_set_accepted(at)),
            )?;
            Ok(at)
        })
    }

    fn versions_not_opening(&self, key: &crate::envelope::MasterKey) -> Result<Vec<(String, u64)>> {
        self.pool.read(|tx| rekey::not_opening(tx, key))
    }

    fn put_metas_audited(
        &self,
        entries: &[(&str, Option<&[u8]>)],
        audit: &AuditEntry,
    ) -> Result<()> {
        let keys = self.keys.get();
        self.pool.write(&keys, Write::Locked, |tx| {
            rekey::put_metas(tx, &keys, entries)?;
            audit::insert(tx, audit)
        })
    }

    fn other_replicas(&self) -> Result<Vec<String>> {
        // Every replica holds one listener session, named; this process's
        // own is one of them while it is connected.
        let mut others: Vec<String> = self.pool.read(|tx| {
            tx.query(
                "SELECT coalesce(host(client_addr), 'a local socket') FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = $1 \
                 ORDER BY backend_start",
                &[&listen::APPLICATION_NAME],
            )?
            .iter()
            .map(|r| r.try_get::<_, String>(0).map_err(StoreError::from))
            .collect()
        })?;
        if self.feed.connected() && !others.is_empty() {
            // Which one is ours does not matter: they are counted.
            others.pop();
        }
        Ok(others)
    }
}

#[cfg(test)]
mod tests;
