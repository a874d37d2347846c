//! The SQLite store: one file, WAL, synchronous=FULL, versioned migrations.
//!
//! - `commit`: the writer connection with group commit, and the readers.
//! - `migrate` and `migrations/*.sql`: the schema, append only.
//! - `rows`: row mapping shared by the queries.
//! - `secrets`, `clients`, `groups`, `audit`: the queries of each entity.

mod audit;
mod clients;
mod commit;
mod groups;
mod migrate;
mod rekey;
mod rows;
mod secrets;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use self::commit::{Connections, READERS};
use super::*;
use crate::keys::KeyRing;

pub struct SqliteStore {
    db: Connections,
    feed: Arc<LocalFeed>,
    /// Row MACs and the audit chain are made and checked with these.
    keys: Arc<KeyRing>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> StoreError {
        use rusqlite::ffi::ErrorCode;
        match err.sqlite_error_code() {
            Some(
                ErrorCode::ReadOnly
                | ErrorCode::CannotOpen
                | ErrorCode::DiskFull
                | ErrorCode::PermissionDenied,
            ) => StoreError::Unwritable(Box::new(err)),
            _ => StoreError::backend(err),
        }
    }
}

impl SqliteStore {
    /// Opens (creating when `create`) the database and brings its schema up
    /// to date.
    pub fn open(path: &Path, create: bool, keys: Arc<KeyRing>) -> Result<Self> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        } else if !path.exists() {
            return Err(StoreError::Missing {
                path: path.to_owned(),
            });
        }
        make_private(path, create)?;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| {
            StoreError::Unwritable(format!("cannot open {}: {e}", path.display()).into())
        })?;
        let writer = Self::setup(conn, &keys)?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let reader = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            reader.busy_timeout(Duration::from_secs(5))?;
            // Belt and braces: these connections never write.
            reader.pragma_update(None, "query_only", "ON")?;
            // Reads of a large store should come from memory, not pread:
            // map up to 1 GiB of the file and keep 32 MiB of pages cached.
            reader.pragma_update(None, "mmap_size", 1i64 << 30)?;
            reader.pragma_update(None, "cache_size", -32 * 1024)?;
            readers.push(reader);
        }
        Ok(Self::with(Connections::new(writer, readers), keys))
    }

    /// An in-memory store under a random key, for unit tests.
    pub fn open_in_memory() -> Result<Self> {
        let keys = KeyRing::generate().map_err(StoreError::backend)?;
        Self::open_in_memory_with(keys)
    }

    /// An in-memory store under `keys`, for unit tests.
    pub fn open_in_memory_with(keys: Arc<KeyRing>) -> Result<Self> {
        let conn = Self::setup(Connection::open_in_memory()?, &keys)?;
        Ok(Self::with(Connections::new(conn, Vec::new()), keys))
    }

    fn with(mut db: Connections, keys: Arc<KeyRing>) -> Self {
        // Every write job ends by chaining the audit entries it inserted.
        let ring = keys.clone();
        db.after_job(Box::new(move |tx| audit::chain_pending(tx, &ring.get())));
        SqliteStore {
            db,
            feed: Arc::new(LocalFeed::default()),
            keys,
        }
    }

    fn setup(mut conn: Connection, keys: &KeyRing) -> Result<Connection> {
        // SQLite falls back to read-only without a word when it cannot
        // write (read-only filesystem, permissions): refuse at start rather
        // than fail on the first change.
        if conn.is_readonly(rusqlite::MAIN_DB)? {
            return Err(StoreError::Unwritable(
                "SQLite could open it only read-only".into(),
            ));
        }
        conn.busy_timeout(Duration::from_secs(5))?;
        // WAL + FULL: a commit that returned is on disk, and readers never
        // block the writer. secure_delete overwrites freed pages (they only
        // ever held ciphertext, but there is no reason to keep it).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "secure_delete", "ON")?;
        migrate::migrate_with(&mut conn, &mut |sql, tx| {
            if sql == migrate::AUDIT_CHAIN {
                // Chain the entries made before chaining, once, under the
                // verified key: a later open never adopts anything.
                check_key(tx, &keys.get())?;
                audit::adopt(tx, &keys.get())?;
            }
            Ok(())
        })?;
        audit::setup_writer(&conn)?;
        Ok(conn)
    }
}

/// Before the audit log is chained under `keys`: the database's master key
/// check must open under them (a store with entries and no check is refused).
fn check_key(tx: &Connection, keys: &crate::keys::Keys) -> Result<()> {
    use crate::envelope::{Sealed, KEY_CHECK, KEY_CHECK_PLAINTEXT};
    let blob: Option<Vec<u8>> = tx
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [crate::state_dir::META_KEY_CHECK],
            |r| r.get(0),
        )
        .optional()?;
    let refuse = |why: &str| {
        Err(StoreError::Check(
            format!("cannot chain the audit log at this upgrade: {why}; nothing was changed")
                .into(),
        ))
    };
    let Some(blob) = blob else {
        let entries: i64 = tx.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))?;
        return if entries == 0 {
            Ok(())
        } else {
            refuse("the database has no master key check")
        };
    };
    // The wrapped data key is a fixed 12 + 32 + 16 bytes (see state_dir).
    const WRAPPED: usize = 60;
    if blob.len() < WRAPPED {
        return refuse("the database's master key check is damaged");
    }
    let sealed = Sealed {
        wrapped_key: blob[..WRAPPED].to_vec(),
        ciphertext: blob[WRAPPED..].to_vec(),
    };
    match keys.open(KEY_CHECK, &sealed) {
        Ok(p) if p.as_bytes() == KEY_CHECK_PLAINTEXT => Ok(()),
        _ => refuse("the master key does not match this database (put the right master.key back)"),
    }
}

/// The database and its `-wal`/`-shm` files are readable by the server's
/// user only. SQLite gives `-wal` and `-shm` the mode of the database file,
/// so creating that file 0600 (and fixing one an older version made 0644)
/// covers all three; existing `-wal`/`-shm` files are fixed too.
fn make_private(path: &Path, create: bool) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |context: String| move |source| StoreError::Io { context, source };
    if create && !path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io(format!("cannot create {}", path.display())))?;
    }
    let sidecar = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        std::path::PathBuf::from(name)
    };
    let (wal, shm) = (sidecar("-wal"), sidecar("-shm"));
    for file in [path, wal.as_path(), shm.as_path()] {
        let Ok(meta) = std::fs::metadata(file) else {
            continue;
        };
        if meta.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).map_err(io(
                format!(
                    "{} is readable by other users and cannot be made private (chmod 600 it as its owner)",
                    file.display()
                ),
            ))?;
        }
    }
    Ok(())
}

impl Store for SqliteStore {
    fn concurrency(&self) -> usize {
        // Two calls per reader connection (writes share one connection
        // and commit in groups): more threads only queue on the locks.
        2 * READERS
    }

    fn feed(&self) -> Arc<dyn ChangeFeed> {
        self.feed.clone()
    }

    fn revision(&self) -> Result<u64> {
        self.db.read(audit::revision)
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.db.read(|tx| {
            Ok(tx
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()?)
        })
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.db.write(|tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
            Ok(())
        })
    }

    fn create_secret(
        &self,
        new: &NewSecret,
        audit: &AuditEntry,
        seal: SealFn<'_>,
    ) -> Result<Committed<SecretRecord>> {
        self.db.write(|tx| secrets::create(tx, new, audit, seal))
    }

    fn rotate_secret(
        &self,
        name: &str,
        size: u64,
        expires: Option<Option<i64>>,
        audit: &AuditEntry,
        seal: SealFn<'_>,
    ) -> Result<Committed<SecretRecord>> {
        self.db
            .write(|tx| secrets::rotate(tx, name, size, expires, audit, seal))
    }

    fn update_secret(
        &self,
        name: &str,
        update: &SecretUpdate,
        check: CheckFn<'_>,
        audit: &AuditEntry,
    ) -> Result<Committed<SecretRecord>> {
        self.db
            .write(|tx| secrets::update(tx, name, update, check, audit))
    }

    fn rollback_secret(
        &self,
        name: &str,
        version: u64,
        audit: &AuditEntry,
    ) -> Result<Committed<SecretRecord>> {
        self.db
            .write(|tx| secrets::rollback(tx, name, version, audit))
    }

    fn delete_secret(&self, name: &str, audit: &AuditEntry) -> Result<Committed<u64>> {
        self.db.write(|tx| secrets::delete(tx, name, audit))
    }

    fn get_secret(&self, name: &str) -> Result<SecretRecord> {
        self.db.read(|tx| secrets::by_name(tx, name))
    }

    fn list_secrets(&self) -> Result<Vec<SecretRecord>> {
        self.db.read(secrets::list)
    }

    fn list_versions(&self, name: &str) -> Result<Vec<VersionRecord>> {
        self.db.read(|tx| secrets::versions(tx, name))
    }

    fn create_client(
        &self,
        new: &NewClient,
        audit: &AuditEntry,
    ) -> Result<Committed<ClientRecord>> {
        self.db.write(|tx| clients::create(tx, new, audit))
    }

    fn add_client_cert(
        &self,
        client_id: u64,
        name: &str,
        serial: &str,
        not_after: i64,
        audit: &AuditEntry,
    ) -> Result<Committed<ClientRecord>> {
        self.db
            .write(|tx| clients::add_cert(tx, client_id, name, serial, not_after, audit))
    }

    fn get_client(&self, name: &str) -> Result<ClientRecord> {
        self.db.read(|tx| clients::by_name(tx, name))
    }

    fn list_clients(&self) -> Result<Vec<ClientRecord>> {
        self.db.read(clients::list)
    }

    fn remove_client(&self, name: &str, audit: &AuditEntry) -> Result<Committed<()>> {
        self.db.write(|tx| clients::remove(tx, name, audit))
    }

    fn authenticate(&self, name: &str, serial: &str) -> Result<AuthLookup> {
        self.db.read(|tx| clients::authenticate(tx, name, serial))
    }

    fn create_group(
        &self,
        name: &str,
        description: &str,
        audit: &AuditEntry,
    ) -> Result<Committed<GroupRecord>> {
        self.db
            .write(|tx| groups::create(tx, name, description, audit))
    }

    fn get_group(&self, name: &str) -> Result<GroupRecord> {
        self.db.read(|tx| groups::by_name(tx, name))
    }

    fn list_groups(&self) -> Result<Vec<GroupRecord>> {
        self.db.read(groups::list)
    }

    fn remove_group(&self, name: &str, audit: &AuditEntry) -> Result<Committed<()>> {
        self.db.write(|tx| groups::remove(tx, name, audit))
    }

    fn set_group_member(
        &self,
        group: &str,
        member: &Member,
        add: bool,
        audit: &AuditEntry,
    ) -> Result<Committed<MemberChange>> {
        self.db
            .write(|tx| groups::set_member(tx, group, member, add, audit))
    }

    fn client_access(&self, client: &str) -> Result<Vec<AccessRecord>> {
        self.db.read(|tx| clients::access(tx, client))
    }

    fn client_view(&self, client_id: u64) -> Result<View> {
        self.db.read(|tx| secrets::client_view(tx, client_id))
    }

    fn read_sealed(
        &self,
        client_id: u64,
        names: &[String],
    ) -> Result<(Vec<SealedSecret>, Vec<String>)> {
        self.db
            .read(|tx| secrets::read_sealed(tx, client_id, names))
    }

    fn read_one_for_client(&self, client_id: u64, secret_id: u64) -> Result<Option<SealedSecret>> {
        self.db
            .read(|tx| secrets::read_one_for_client(tx, client_id, secret_id))
    }

    fn append_audit(&self, entries: &[AuditEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.db
            .write(|tx| entries.iter().try_for_each(|e| audit::insert(tx, e)))
    }

    fn query_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        self.db.read(|tx| audit::query(tx, filter))
    }

    fn put_metas(&self, entries: &[(&str, Option<&[u8]>)]) -> Result<()> {
        self.db.write(|tx| rekey::put_metas(tx, entries))
    }

    fn rewrap_keys(&self, limit: usize) -> Result<usize> {
        // The keys are taken inside the write: every seal of a write that
        // began before the ring was replaced has committed (one writer)
        // before the first batch runs, so no old-key version is missed.
        self.db
            .write(|tx| rekey::rewrap(tx, &self.keys.get(), limit))
    }

    fn verify_audit(&self) -> Result<audit_chain::AuditVerdict> {
        let keys = self.keys.get();
        self.db.read(|tx| audit::verify(tx, &keys))
    }

    fn audit_after(&self, after_id: u64, limit: usize) -> Result<Vec<audit_chain::ChainedEntry>> {
        self.db.read(|tx| audit::after(tx, after_id, limit))
    }

    fn audit_head(&self) -> Result<Option<audit_chain::AuditHead>> {
        self.db.read(audit::head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[test]
    fn conforms_in_memory() {
        conformance::run(&|| Box::new(SqliteStore::open_in_memory().unwrap()));
    }

    #[test]
    fn conforms_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let n = std::sync::atomic::AtomicUsize::new(0);
        conformance::run(&|| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::new(
                SqliteStore::open(
                    &dir.path().join(format!("db{i}")),
                    true,
                    KeyRing::generate().unwrap(),
                )
                .unwrap(),
            )
        });
    }

    #[test]
    fn concurrent_writes_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(
            SqliteStore::open(&dir.path().join("db"), true, KeyRing::generate().unwrap()).unwrap(),
        );
        conformance::concurrent_writes(s.clone());
        // 600 writes (200 that commit work, 400 that fail) took fewer commits.
        let commits = s.db.commits();
        assert!(
            commits < 600,
            "{commits} commits for 600 writes: no group commit happened"
        );
        // Nothing is left open: a fresh connection sees all of it.
        drop(s);
        let again =
            SqliteStore::open(&dir.path().join("db"), false, KeyRing::generate().unwrap()).unwrap();
        assert_eq!(again.get_secret("t3").unwrap().version_count, 51);
    }

    #[test]
    fn migrations_are_recorded_and_rerun_safely() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(SqliteStore::open(&path, true, KeyRing::generate().unwrap()).unwrap());
        let s = SqliteStore::open(&path, false, KeyRing::generate().unwrap()).unwrap();
        let v: i64 =
            s.db.writer()
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
        assert_eq!(v as usize, migrate::MIGRATIONS.len());
        let mode: String =
            s.db.writer()
                .pragma_query_value(None, "journal_mode", |r| r.get(0))
                .unwrap();
        assert_eq!(mode, "wal");
        assert!(matches!(
            SqliteStore::open(
                &dir.path().join("missing"),
                false,
                KeyRing::generate().unwrap()
            ),
            Err(StoreError::Missing { .. })
        ));
        // Reads go to reader connections and see every committed write.
        assert_eq!(s.db.readers(), READERS);
        let reader = s.db.reader();
        let ro: bool = reader
            .pragma_query_value(None, "query_only", |r| r.get(0))
            .unwrap();
        assert!(ro);
        drop(reader);
        // A newer schema is refused, naming both versions.
        s.db.writer()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        drop(s);
        match SqliteStore::open(&path, false, KeyRing::generate().unwrap()) {
            Err(e @ StoreError::NewerSchema { found: 99, .. }) => {
                assert!(e.to_string().contains("run a newer secretfs"))
            }
            other => panic!("expected NewerSchema, got {other:?}"),
        }
    }
}
