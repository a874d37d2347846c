//! The SQLite store: one file, WAL, synchronous=FULL, versioned migrations.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use super::*;

/// Schema migrations, applied in order; `PRAGMA user_version` records how
/// many ran. Append only: never edit a released step.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
-- AUTOINCREMENT: a deleted secret's id is never reused, because the id is
-- part of every ciphertext's associated data.
CREATE TABLE secrets (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT NOT NULL UNIQUE,
    description     TEXT NOT NULL DEFAULT '',
    labels          TEXT NOT NULL DEFAULT '{}',
    mode            INTEGER NOT NULL DEFAULT 0,
    owner           INTEGER,
    grp             INTEGER,
    expires_at      INTEGER,
    current_version INTEGER NOT NULL,
    version_count   INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE TABLE secret_versions (
    secret_id   INTEGER NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
    version     INTEGER NOT NULL,
    wrapped_key BLOB NOT NULL,
    ciphertext  BLOB NOT NULL,
    size        INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    PRIMARY KEY (secret_id, version)
);
CREATE TABLE clients (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL UNIQUE,
    admin      INTEGER NOT NULL,
    enabled    INTEGER NOT NULL DEFAULT 1,
    pinned     INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE client_certs (
    client_id INTEGER NOT NULL REFERENCES clients(id) ON DELETE CASCADE,
    serial    TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    issued_at INTEGER NOT NULL,
    PRIMARY KEY (client_id, serial)
);
CREATE TABLE groups (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL
);
CREATE TABLE group_clients (
    group_id  INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    client_id INTEGER NOT NULL REFERENCES clients(id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, client_id)
);
CREATE INDEX group_clients_by_client ON group_clients(client_id);
CREATE TABLE group_secrets (
    group_id  INTEGER NOT NULL REFERENCES groups(id) ON DELETE CASCADE,
    secret_id INTEGER NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, secret_id)
);
CREATE INDEX group_secrets_by_secret ON group_secrets(secret_id);
CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms   INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    secret  TEXT,
    client  TEXT,
    grp     TEXT,
    version INTEGER,
    allowed INTEGER NOT NULL,
    detail  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX audit_by_time ON audit(at_ms);
CREATE INDEX audit_by_secret ON audit(secret, at_ms);
CREATE INDEX audit_by_actor ON audit(actor, at_ms);
CREATE INDEX audit_by_client ON audit(client, at_ms);
"#,
    r#"
-- A server-wide change counter, bumped in the same transaction as every
-- change, so Watch events can be ordered across restarts.
CREATE TABLE revision (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO revision (id, value) VALUES (1, 0);
"#,
    r#"
-- Serials of built-in-CA certificates whose client was removed: refused
-- forever, whatever client of that name exists later.
CREATE TABLE revoked_certs (
    serial     TEXT PRIMARY KEY,
    client     TEXT NOT NULL,
    revoked_at INTEGER NOT NULL
);
"#,
];

const SECRET_COLUMNS: &str = "s.id, s.name, s.description, s.labels, s.mode, s.owner, s.grp, \
     s.expires_at, s.current_version, s.version_count, s.created_at, s.updated_at, v.size, v.created_at";
const SECRET_FROM: &str =
    "secrets s JOIN secret_versions v ON v.secret_id = s.id AND v.version = s.current_version";

pub struct SqliteStore {
    /// The one connection that writes (SQLite has one writer at a time).
    conn: Mutex<Connection>,
    /// Connections for reads: in WAL mode readers never wait for the
    /// writer, so a read is not queued behind a commit's fsync. Empty for an
    /// in-memory store (one connection is the whole database).
    readers: Vec<Mutex<Connection>>,
    next_reader: std::sync::atomic::AtomicUsize,
    /// Group commit of writes (file stores only; see `write`).
    group: Mutex<GroupCommit>,
    committed: std::sync::Condvar,
    /// Writers waiting for the connection: while there are any, a writer
    /// leaves the transaction open for them instead of committing.
    waiting: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct GroupCommit {
    /// A transaction is open on the writer connection.
    open: bool,
    /// Bumped by every commit; a writer waits for the one after its job.
    epoch: u64,
    /// Epochs whose commit failed, with why (rare; pruned).
    failed: std::collections::BTreeMap<u64, String>,
}

/// Reader connections: a couple per core is plenty on this workload.
const READERS: usize = 4;

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

impl SqliteStore {
    /// Opens (creating when `create`) the database and brings its schema up
    /// to date.
    pub fn open(path: &Path, create: bool) -> Result<Self, Error> {
        use rusqlite::OpenFlags;
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        if create {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        } else if !path.exists() {
            return Err(Error::Config(format!(
                "database {} does not exist; is this a state directory made by `secretfs server init`?",
                path.display()
            )));
        }
        make_private(path, create)?;
        let conn = Connection::open_with_flags(path, flags)
            .map_err(|e| Error::ReadOnly(format!("cannot open {}: {e}", path.display())))?;
        let mut store = Self::setup(conn)?;
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
            store.readers.push(Mutex::new(reader));
        }
        Ok(store)
    }

    /// An in-memory store, for unit tests.
    pub fn open_in_memory() -> Result<Self, Error> {
        Self::setup(Connection::open_in_memory()?)
    }

    fn setup(mut conn: Connection) -> Result<Self, Error> {
        // SQLite falls back to read-only without a word when it cannot
        // write (read-only filesystem, permissions): refuse at start rather
        // than fail on the first change.
        if conn.is_readonly(rusqlite::MAIN_DB)? {
            return Err(Error::ReadOnly(
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
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            readers: Vec::new(),
            next_reader: Default::default(),
            group: Mutex::new(GroupCommit::default()),
            committed: std::sync::Condvar::new(),
            waiting: Default::default(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written
        // (transactions roll back on drop), so a poisoned lock is usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` in a write transaction and returns once it is durable.
    ///
    /// Group commit: a durable commit (an fsync) costs far more than the
    /// statements of one change, so writers that queue while one is working
    /// share its transaction. Each job runs in its own savepoint (a failing
    /// job rolls back alone); the last writer of a burst commits for all,
    /// and every writer returns only after the commit that covers its job.
    /// An in-memory store (tests) has one connection for reads and writes,
    /// so there each write commits at once.
    fn write<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.readers.is_empty() {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = f(&tx)?;
            tx.commit()?;
            return Ok(out);
        }
        self.waiting.fetch_add(1, SeqCst);
        let conn = self.conn();
        self.waiting.fetch_sub(1, SeqCst);
        let epoch = {
            let mut g = self.group.lock().unwrap_or_else(|e| e.into_inner());
            if !g.open {
                conn.execute_batch("BEGIN IMMEDIATE")?;
                g.open = true;
            }
            g.epoch
        };
        conn.execute_batch("SAVEPOINT job")?;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&conn)));
        let keep = matches!(out, Ok(Ok(_)));
        let closed = if keep {
            conn.execute_batch("RELEASE job")
        } else {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")
        };
        if let Err(e) = closed {
            // The transaction is in an unknown state: end it for everyone.
            let _ = conn.execute_batch("ROLLBACK");
            self.finish(epoch, Some(e.to_string()));
            return Err(e.into());
        }
        if self.waiting.load(SeqCst) == 0 {
            let committed = conn.execute_batch("COMMIT");
            if committed.is_err() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            self.finish(epoch, committed.as_ref().err().map(|e| e.to_string()));
            drop(conn);
            committed?;
        } else {
            // Someone is waiting for the connection: it (or the last of the
            // burst) commits our job too.
            drop(conn);
            let mut g = self.group.lock().unwrap_or_else(|e| e.into_inner());
            while g.epoch == epoch {
                g = self.committed.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            if let Some(why) = g.failed.get(&epoch) {
                return Err(Error::Storage(format!("the commit failed: {why}")));
            }
        }
        match out {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Marks `epoch` committed (or failed) and wakes the writers waiting on it.
    fn finish(&self, epoch: u64, failure: Option<String>) {
        let mut g = self.group.lock().unwrap_or_else(|e| e.into_inner());
        g.open = false;
        g.epoch = epoch + 1;
        if let Some(why) = failure {
            g.failed.insert(epoch, why);
        }
        while g.failed.len() > 64 {
            g.failed.pop_first();
        }
        drop(g);
        self.committed.notify_all();
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
        let mut conn = self.reader();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        f(&tx)
    }

    /// A free reader connection if there is one, else the next in turn.
    fn reader(&self) -> MutexGuard<'_, Connection> {
        if self.readers.is_empty() {
            return self.conn();
        }
        for r in &self.readers {
            if let Ok(guard) = r.try_lock() {
                return guard;
            }
        }
        use std::sync::atomic::Ordering;
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        self.readers[i].lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The database and its `-wal`/`-shm` files are readable by the server's
/// user only. SQLite gives `-wal` and `-shm` the mode of the database file,
/// so creating that file 0600 (and fixing one an older version made 0644)
/// covers all three; existing `-wal`/`-shm` files are fixed too.
fn make_private(path: &Path, create: bool) -> Result<(), Error> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if create && !path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
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
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
                Error::io(
                    format!(
                        "{} is readable by other users and cannot be made private (chmod 600 it as its owner)",
                        file.display()
                    ),
                    e,
                )
            })?;
        }
    }
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), Error> {
    let current = conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    if current > MIGRATIONS.len() {
        return Err(Error::Config(format!(
            "the database schema is version {current}, newer than this secretfs understands ({}); run a newer secretfs",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

fn secret_from_row(row: &Row<'_>) -> rusqlite::Result<SecretRecord> {
    let labels: String = row.get(3)?;
    Ok(SecretRecord {
        id: row.get::<_, i64>(0)? as u64,
        name: row.get(1)?,
        description: row.get(2)?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        mode: row.get(4)?,
        owner: row.get(5)?,
        group: row.get(6)?,
        expires_at: row.get(7)?,
        current_version: row.get::<_, i64>(8)? as u64,
        version_count: row.get::<_, i64>(9)? as u64,
        created_at: row.get(10)?,
        updated_at: row.get(11)?,
        size: row.get::<_, i64>(12)? as u64,
        version_created_at: row.get(13)?,
    })
}

fn secret_by_name(tx: &Connection, name: &str) -> Result<SecretRecord, Error> {
    tx.query_row(
        &format!("SELECT {SECRET_COLUMNS} FROM {SECRET_FROM} WHERE s.name = ?1"),
        [name],
        secret_from_row,
    )
    .optional()?
    .ok_or_else(|| Error::not_found("secret", name))
}

fn id_by_name(tx: &Connection, table: &str, kind: &'static str, name: &str) -> Result<i64, Error> {
    tx.query_row(
        &format!("SELECT id FROM {table} WHERE name = ?1"),
        [name],
        |r| r.get(0),
    )
    .optional()?
    .ok_or_else(|| Error::not_found(kind, name))
}

fn audit(tx: &Connection, e: &AuditEntry) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO audit (at_ms, actor, action, secret, client, grp, version, allowed, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            if e.at_ms == 0 { now_ms() } else { e.at_ms },
            e.actor,
            e.action,
            e.secret,
            e.client,
            e.group,
            e.version.map(|v| v as i64),
            e.allowed,
            e.detail
        ],
    )?;
    Ok(())
}

/// Audits a change and bumps the revision, in the caller's transaction.
fn record_change(tx: &Connection, e: &AuditEntry) -> Result<(), Error> {
    audit(tx, e)?;
    tx.execute("UPDATE revision SET value = value + 1 WHERE id = 1", [])?;
    Ok(())
}

fn change(actor: &str, action: &str) -> AuditEntry {
    AuditEntry {
        actor: actor.to_owned(),
        action: action.to_owned(),
        allowed: true,
        ..AuditEntry::default()
    }
}

fn is_unique_violation(err: &rusqlite::Error) -> bool {
    matches!(
        err,
        rusqlite::Error::SqliteFailure(e, _) if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

fn insert_version(
    tx: &Connection,
    id: i64,
    version: u64,
    size: u64,
    actor: &str,
    sealed: &Sealed,
) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO secret_versions (secret_id, version, wrapped_key, ciphertext, size, created_at, created_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![id, version as i64, sealed.wrapped_key, sealed.ciphertext, size as i64, now_s(), actor],
    )?;
    Ok(())
}

fn group_record(tx: &Connection, name: &str) -> Result<GroupRecord, Error> {
    let (id, description, created_at): (i64, String, i64) = tx
        .query_row(
            "SELECT id, description, created_at FROM groups WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?
        .ok_or_else(|| Error::not_found("group", name))?;
    let clients = names(
        tx,
        "SELECT c.name FROM group_clients gc JOIN clients c ON c.id = gc.client_id WHERE gc.group_id = ?1 ORDER BY c.name",
        id,
    )?;
    let secrets = names(
        tx,
        "SELECT s.name FROM group_secrets gs JOIN secrets s ON s.id = gs.secret_id WHERE gs.group_id = ?1 ORDER BY s.name",
        id,
    )?;
    Ok(GroupRecord {
        name: name.to_owned(),
        description,
        created_at,
        clients,
        secrets,
    })
}

/// What a group holds: clients or secrets.
#[derive(Clone, Copy)]
enum Member {
    Client,
    Secret,
}

/// Adds `name` to `group` (or takes it out), audited; adding twice or
/// removing what is not there changes nothing and says so.
fn set_membership(
    tx: &Connection,
    kind: Member,
    group: &str,
    name: &str,
    member: bool,
    actor: &str,
) -> Result<GroupRecord, Error> {
    let (table, entity, link, column) = match kind {
        Member::Client => ("clients", "client", "group_clients", "client_id"),
        Member::Secret => ("secrets", "secret", "group_secrets", "secret_id"),
    };
    let gid = id_by_name(tx, "groups", "group", group)?;
    let id = id_by_name(tx, table, entity, name)?;
    let sql = if member {
        format!("INSERT OR IGNORE INTO {link} (group_id, {column}) VALUES (?1, ?2)")
    } else {
        format!("DELETE FROM {link} WHERE group_id = ?1 AND {column} = ?2")
    };
    let changed = tx.execute(&sql, params![gid, id])?;
    let action = format!("group.{}-{entity}", if member { "add" } else { "remove" });
    let mut entry = AuditEntry {
        group: Some(group.to_owned()),
        detail: if changed == 0 {
            "no change".into()
        } else {
            String::new()
        },
        ..change(actor, &action)
    };
    match kind {
        Member::Client => entry.client = Some(name.to_owned()),
        Member::Secret => entry.secret = Some(name.to_owned()),
    }
    record_change(tx, &entry)?;
    group_record(tx, group)
}

fn names(tx: &Connection, sql: &str, id: i64) -> Result<Vec<String>, Error> {
    let mut stmt = tx.prepare_cached(sql)?;
    let rows = stmt.query_map([id], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn client_record(tx: &Connection, name: &str) -> Result<ClientRecord, Error> {
    let mut client = tx
        .query_row(
            "SELECT id, name, admin, enabled, pinned, created_at FROM clients WHERE name = ?1",
            [name],
            |r| {
                Ok(ClientRecord {
                    id: r.get::<_, i64>(0)? as u64,
                    name: r.get(1)?,
                    admin: r.get(2)?,
                    enabled: r.get(3)?,
                    pinned: r.get(4)?,
                    created_at: r.get(5)?,
                    cert_serial: None,
                    cert_not_after: None,
                    groups: Vec::new(),
                })
            },
        )
        .optional()?
        .ok_or_else(|| Error::not_found("client", name))?;
    let cert: Option<(String, i64)> = tx
        .query_row(
            "SELECT serial, not_after FROM client_certs WHERE client_id = ?1 ORDER BY issued_at DESC, rowid DESC LIMIT 1",
            [client.id as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((serial, not_after)) = cert {
        client.cert_serial = Some(serial);
        client.cert_not_after = Some(not_after);
    }
    client.groups = names(
        tx,
        "SELECT g.name FROM group_clients gc JOIN groups g ON g.id = gc.group_id WHERE gc.client_id = ?1 ORDER BY g.name",
        client.id as i64,
    )?;
    Ok(client)
}

impl Store for SqliteStore {
    fn revision(&self) -> Result<u64, Error> {
        self.read(|tx| {
            Ok(
                tx.query_row("SELECT value FROM revision WHERE id = 1", [], |r| {
                    r.get::<_, i64>(0)
                })? as u64,
            )
        })
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        self.read(|tx| {
            Ok(tx
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()?)
        })
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        self.write(|tx| {
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
        actor: &str,
        seal: SealFn<'_>,
    ) -> Result<SecretRecord, Error> {
        self.write(|tx| {
            let now = now_s();
            let labels =
                serde_json::to_string(&new.labels).map_err(|e| Error::Storage(e.to_string()))?;
            let inserted = tx.execute(
                "INSERT INTO secrets (name, description, labels, mode, owner, grp, expires_at,
                                      current_version, version_count, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 1, 1, ?8, ?8)",
                params![
                    new.name,
                    new.description,
                    labels,
                    new.mode,
                    new.owner,
                    new.group,
                    new.expires_at,
                    now
                ],
            );
            match inserted {
                Err(e) if is_unique_violation(&e) => {
                    return Err(Error::exists("secret", &new.name))
                }
                other => other?,
            };
            let id = tx.last_insert_rowid();
            let sealed = seal(id as u64, 1)?;
            insert_version(tx, id, 1, new.size, actor, &sealed)?;
            record_change(
                tx,
                &AuditEntry {
                    secret: Some(new.name.clone()),
                    version: Some(1),
                    ..change(actor, "secret.create")
                },
            )?;
            secret_by_name(tx, &new.name)
        })
    }

    fn rotate_secret(
        &self,
        name: &str,
        size: u64,
        actor: &str,
        seal: SealFn<'_>,
    ) -> Result<SecretRecord, Error> {
        self.write(|tx| {
            let current = secret_by_name(tx, name)?;
            let version = current.version_count + 1;
            let sealed = seal(current.id, version)?;
            insert_version(tx, current.id as i64, version, size, actor, &sealed)?;
            tx.execute(
                "UPDATE secrets SET current_version = ?2, version_count = ?2, updated_at = ?3 WHERE id = ?1",
                params![current.id as i64, version as i64, now_s()],
            )?;
            record_change(
                tx,
                &AuditEntry {
                    secret: Some(name.to_owned()),
                    version: Some(version),
                    ..change(actor, "secret.rotate")
                },
            )?;
            secret_by_name(tx, name)
        })
    }

    fn rollback_secret(
        &self,
        name: &str,
        version: u64,
        actor: &str,
    ) -> Result<SecretRecord, Error> {
        self.write(|tx| {
            let current = secret_by_name(tx, name)?;
            let exists: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM secret_versions WHERE secret_id = ?1 AND version = ?2)",
                params![current.id as i64, version as i64],
                |r| r.get(0),
            )?;
            if !exists {
                return Err(Error::NoSuchVersion {
                    name: name.to_owned(),
                    version,
                });
            }
            tx.execute(
                "UPDATE secrets SET current_version = ?2, updated_at = ?3 WHERE id = ?1",
                params![current.id as i64, version as i64, now_s()],
            )?;
            record_change(
                tx,
                &AuditEntry {
                    secret: Some(name.to_owned()),
                    version: Some(version),
                    detail: format!("from version {}", current.current_version),
                    ..change(actor, "secret.rollback")
                },
            )?;
            secret_by_name(tx, name)
        })
    }

    fn delete_secret(&self, name: &str, actor: &str) -> Result<(), Error> {
        self.write(|tx| {
            let id = id_by_name(tx, "secrets", "secret", name)?;
            tx.execute("DELETE FROM secrets WHERE id = ?1", [id])?;
            record_change(
                tx,
                &AuditEntry {
                    secret: Some(name.to_owned()),
                    ..change(actor, "secret.delete")
                },
            )
        })
    }

    fn get_secret(&self, name: &str) -> Result<SecretRecord, Error> {
        self.read(|tx| secret_by_name(tx, name))
    }

    fn list_secrets(&self) -> Result<Vec<SecretRecord>, Error> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {SECRET_COLUMNS} FROM {SECRET_FROM} ORDER BY s.name"
            ))?;
            let rows = stmt.query_map([], secret_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn list_versions(&self, name: &str) -> Result<Vec<VersionRecord>, Error> {
        self.read(|tx| {
            let secret = secret_by_name(tx, name)?;
            let mut stmt = tx.prepare_cached(
                "SELECT version, created_at, created_by, size FROM secret_versions WHERE secret_id = ?1 ORDER BY version",
            )?;
            let rows = stmt.query_map([secret.id as i64], |r| {
                let version = r.get::<_, i64>(0)? as u64;
                Ok(VersionRecord {
                    version,
                    created_at: r.get(1)?,
                    created_by: r.get(2)?,
                    size: r.get::<_, i64>(3)? as u64,
                    current: version == secret.current_version,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn create_client(&self, new: &NewClient, actor: &str) -> Result<ClientRecord, Error> {
        self.write(|tx| {
            let now = now_s();
            let inserted = tx.execute(
                "INSERT INTO clients (name, admin, enabled, pinned, created_at) VALUES (?1, ?2, 1, ?3, ?4)",
                params![new.name, new.admin, new.cert.is_some(), now],
            );
            match inserted {
                Err(e) if is_unique_violation(&e) => return Err(Error::exists("client", &new.name)),
                other => other?,
            };
            let id = tx.last_insert_rowid();
            if let Some((serial, not_after)) = &new.cert {
                tx.execute(
                    "INSERT INTO client_certs (client_id, serial, not_after, issued_at) VALUES (?1, ?2, ?3, ?4)",
                    params![id, serial, not_after, now],
                )?;
            }
            record_change(
                tx,
                &AuditEntry {
                    client: Some(new.name.clone()),
                    detail: match (&new.cert, new.admin) {
                        (Some((serial, _)), admin) => format!("certificate {serial}{}", if admin { ", admin" } else { "" }),
                        (None, admin) => format!("external certificate{}", if admin { ", admin" } else { "" }),
                    },
                    ..change(actor, "client.create")
                },
            )?;
            client_record(tx, &new.name)
        })
    }

    fn get_client(&self, name: &str) -> Result<ClientRecord, Error> {
        self.read(|tx| client_record(tx, name))
    }

    fn list_clients(&self) -> Result<Vec<ClientRecord>, Error> {
        self.read(|tx| {
            let all: Vec<String> = {
                let mut stmt = tx.prepare_cached("SELECT name FROM clients ORDER BY name")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            all.iter().map(|n| client_record(tx, n)).collect()
        })
    }

    fn remove_client(&self, name: &str, actor: &str) -> Result<(), Error> {
        self.write(|tx| {
            let id = id_by_name(tx, "clients", "client", name)?;
            tx.execute(
                "INSERT OR IGNORE INTO revoked_certs (serial, client, revoked_at) \
                 SELECT serial, ?2, ?3 FROM client_certs WHERE client_id = ?1",
                params![id, name, now_s()],
            )?;
            tx.execute("DELETE FROM clients WHERE id = ?1", [id])?;
            record_change(
                tx,
                &AuditEntry {
                    client: Some(name.to_owned()),
                    ..change(actor, "client.remove")
                },
            )
        })
    }

    fn client_has_cert(&self, client_id: u64, serial: &str) -> Result<bool, Error> {
        self.read(|tx| {
            Ok(tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM client_certs WHERE client_id = ?1 AND serial = ?2)",
                params![client_id as i64, serial],
                |r| r.get(0),
            )?)
        })
    }

    fn serial_revoked(&self, serial: &str) -> Result<bool, Error> {
        self.read(|tx| {
            Ok(tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM revoked_certs WHERE serial = ?1)",
                [serial],
                |r| r.get(0),
            )?)
        })
    }

    fn create_group(
        &self,
        name: &str,
        description: &str,
        actor: &str,
    ) -> Result<GroupRecord, Error> {
        self.write(|tx| {
            let inserted = tx.execute(
                "INSERT INTO groups (name, description, created_at) VALUES (?1, ?2, ?3)",
                params![name, description, now_s()],
            );
            match inserted {
                Err(e) if is_unique_violation(&e) => return Err(Error::exists("group", name)),
                other => other?,
            };
            record_change(
                tx,
                &AuditEntry {
                    group: Some(name.to_owned()),
                    ..change(actor, "group.create")
                },
            )?;
            group_record(tx, name)
        })
    }

    fn get_group(&self, name: &str) -> Result<GroupRecord, Error> {
        self.read(|tx| group_record(tx, name))
    }

    fn list_groups(&self) -> Result<Vec<GroupRecord>, Error> {
        self.read(|tx| {
            let all: Vec<String> = {
                let mut stmt = tx.prepare_cached("SELECT name FROM groups ORDER BY name")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            all.iter().map(|n| group_record(tx, n)).collect()
        })
    }

    fn remove_group(&self, name: &str, actor: &str) -> Result<(), Error> {
        self.write(|tx| {
            let id = id_by_name(tx, "groups", "group", name)?;
            tx.execute("DELETE FROM groups WHERE id = ?1", [id])?;
            record_change(
                tx,
                &AuditEntry {
                    group: Some(name.to_owned()),
                    ..change(actor, "group.remove")
                },
            )
        })
    }

    fn set_group_client(
        &self,
        group: &str,
        client: &str,
        member: bool,
        actor: &str,
    ) -> Result<GroupRecord, Error> {
        self.write(|tx| set_membership(tx, Member::Client, group, client, member, actor))
    }

    fn set_group_secret(
        &self,
        group: &str,
        secret: &str,
        member: bool,
        actor: &str,
    ) -> Result<GroupRecord, Error> {
        self.write(|tx| set_membership(tx, Member::Secret, group, secret, member, actor))
    }

    fn client_access(&self, client: &str) -> Result<Vec<AccessRecord>, Error> {
        self.read(|tx| {
            let cid = id_by_name(tx, "clients", "client", client)?;
            let mut stmt = tx.prepare_cached(
                "SELECT s.name, g.name FROM group_clients gc
                   JOIN group_secrets gs ON gs.group_id = gc.group_id
                   JOIN secrets s ON s.id = gs.secret_id
                   JOIN groups g ON g.id = gc.group_id
                  WHERE gc.client_id = ?1 ORDER BY s.name, g.name",
            )?;
            let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let rows = stmt.query_map([cid], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            for row in rows {
                let (secret, group) = row?;
                out.entry(secret).or_default().push(group);
            }
            Ok(out
                .into_iter()
                .map(|(secret, groups)| AccessRecord { secret, groups })
                .collect())
        })
    }

    fn readable_secrets(&self, client_id: u64) -> Result<Vec<SecretRecord>, Error> {
        self.read(|tx| readable(tx, client_id))
    }

    fn read_sealed(
        &self,
        client_id: u64,
        names: &[String],
    ) -> Result<(Vec<SealedSecret>, Vec<String>), Error> {
        self.read(|tx| {
            if names.is_empty() {
                let readable = readable(tx, client_id)?;
                let mut stmt = tx.prepare_cached(
                    "SELECT wrapped_key, ciphertext FROM secret_versions WHERE secret_id = ?1 AND version = ?2",
                )?;
                let mut out = Vec::with_capacity(readable.len());
                for record in readable {
                    let sealed = stmt.query_row(
                        params![record.id as i64, record.current_version as i64],
                        |r| {
                            Ok(Sealed {
                                wrapped_key: r.get(0)?,
                                ciphertext: r.get(1)?,
                            })
                        },
                    )?;
                    out.push(SealedSecret { record, sealed });
                }
                return Ok((out, Vec::new()));
            }
            // Named reads cost what they ask for, not the client's whole view.
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {SECRET_COLUMNS}, v.wrapped_key, v.ciphertext FROM {SECRET_FROM}
                  WHERE s.name = ?2 AND EXISTS (
                        SELECT 1 FROM group_clients gc JOIN group_secrets gs ON gs.group_id = gc.group_id
                         WHERE gc.client_id = ?1 AND gs.secret_id = s.id)"
            ))?;
            let mut out = Vec::with_capacity(names.len());
            let mut denied = Vec::new();
            for n in names {
                let found = stmt
                    .query_row(params![client_id as i64, n], |r| {
                        Ok(SealedSecret {
                            record: secret_from_row(r)?,
                            sealed: Sealed {
                                wrapped_key: r.get(14)?,
                                ciphertext: r.get(15)?,
                            },
                        })
                    })
                    .optional()?;
                match found {
                    Some(s) => out.push(s),
                    None => denied.push(n.clone()),
                }
            }
            Ok((out, denied))
        })
    }

    fn read_one_for_client(
        &self,
        client_id: u64,
        secret_id: u64,
    ) -> Result<Option<SealedSecret>, Error> {
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {SECRET_COLUMNS}, v.wrapped_key, v.ciphertext FROM {SECRET_FROM}
                  WHERE s.id = ?2 AND EXISTS (
                        SELECT 1 FROM group_clients gc JOIN group_secrets gs ON gs.group_id = gc.group_id
                         WHERE gc.client_id = ?1 AND gs.secret_id = ?2)"
            ))?;
            Ok(stmt
                .query_row(params![client_id as i64, secret_id as i64], |r| {
                    Ok(SealedSecret {
                        record: secret_from_row(r)?,
                        sealed: Sealed {
                            wrapped_key: r.get(14)?,
                            ciphertext: r.get(15)?,
                        },
                    })
                })
                .optional()?)
        })
    }

    fn append_audit(&self, entries: &[AuditEntry]) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        self.write(|tx| entries.iter().try_for_each(|e| audit(tx, e)))
    }

    fn query_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, Error> {
        self.read(|tx| {
            let limit = if filter.limit == 0 { 1000 } else { filter.limit.min(100_000) };
            // Newest `limit` events, returned oldest first.
            let mut stmt = tx.prepare_cached(
                "SELECT * FROM (
                    SELECT id, at_ms, actor, action, secret, client, grp, version, allowed, detail FROM audit
                     WHERE (?1 IS NULL OR actor = ?1 OR client = ?1)
                       AND (?2 IS NULL OR secret = ?2)
                       AND (?3 IS NULL OR at_ms >= ?3)
                     ORDER BY id DESC LIMIT ?4)
                 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![filter.client, filter.secret, filter.since_ms, limit], |r| {
                Ok(AuditEntry {
                    id: r.get::<_, i64>(0)? as u64,
                    at_ms: r.get(1)?,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    secret: r.get(4)?,
                    client: r.get(5)?,
                    group: r.get(6)?,
                    version: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
                    allowed: r.get(8)?,
                    detail: r.get(9)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}

fn readable(tx: &Connection, client_id: u64) -> Result<Vec<SecretRecord>, Error> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {SECRET_COLUMNS} FROM {SECRET_FROM}
          WHERE s.id IN (SELECT gs.secret_id FROM group_clients gc
                           JOIN group_secrets gs ON gs.group_id = gc.group_id
                          WHERE gc.client_id = ?1)
          ORDER BY s.name"
    ))?;
    let rows = stmt.query_map([client_id as i64], secret_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(tag: u8) -> Sealed {
        Sealed {
            wrapped_key: vec![tag; 60],
            ciphertext: vec![tag; 40],
        }
    }

    fn add(store: &SqliteStore, name: &str) -> SecretRecord {
        let new = NewSecret {
            name: name.into(),
            size: 3,
            ..NewSecret::default()
        };
        store
            .create_secret(&new, "admin", &mut |_, _| Ok(sealed(1)))
            .unwrap()
    }

    fn client(store: &SqliteStore, name: &str) -> ClientRecord {
        store
            .create_client(
                &NewClient {
                    name: name.into(),
                    admin: false,
                    cert: Some((format!("serial-{name}"), 99)),
                },
                "admin",
            )
            .unwrap()
    }

    #[test]
    fn secret_lifecycle() {
        let s = SqliteStore::open_in_memory().unwrap();
        let rec = add(&s, "db/pw");
        assert_eq!(
            (rec.current_version, rec.version_count, rec.size),
            (1, 1, 3)
        );
        assert!(matches!(
            s.create_secret(
                &NewSecret {
                    name: "db/pw".into(),
                    ..Default::default()
                },
                "a",
                &mut |_, _| Ok(sealed(1))
            ),
            Err(Error::AlreadyExists { .. })
        ));
        let mut seen = None;
        let rot = s
            .rotate_secret("db/pw", 5, "admin", &mut |id, v| {
                seen = Some((id, v));
                Ok(sealed(2))
            })
            .unwrap();
        assert_eq!(seen, Some((rec.id, 2)));
        assert_eq!((rot.current_version, rot.size), (2, 5));
        let back = s.rollback_secret("db/pw", 1, "admin").unwrap();
        assert_eq!(
            (back.current_version, back.version_count, back.size),
            (1, 2, 3)
        );
        assert!(matches!(
            s.rollback_secret("db/pw", 9, "a"),
            Err(Error::NoSuchVersion { .. })
        ));
        let versions = s.list_versions("db/pw").unwrap();
        assert_eq!(
            versions
                .iter()
                .map(|v| (v.version, v.current))
                .collect::<Vec<_>>(),
            [(1, true), (2, false)]
        );
        // A failed seal writes nothing.
        assert!(s
            .rotate_secret("db/pw", 1, "a", &mut |_, _| Err(Error::Crypto("boom")))
            .is_err());
        assert_eq!(s.get_secret("db/pw").unwrap().version_count, 2);
        s.delete_secret("db/pw", "admin").unwrap();
        assert!(matches!(s.get_secret("db/pw"), Err(Error::NotFound { .. })));
        // Ids are not reused after a delete.
        assert!(add(&s, "db/pw").id > rec.id);
    }

    #[test]
    fn access_through_groups() {
        let s = SqliteStore::open_in_memory().unwrap();
        add(&s, "a");
        add(&s, "b");
        add(&s, "c");
        let web = client(&s, "web");
        let other = client(&s, "other");
        s.create_group("g1", "", "admin").unwrap();
        s.create_group("g2", "", "admin").unwrap();
        s.set_group_client("g1", "web", true, "admin").unwrap();
        s.set_group_client("g2", "web", true, "admin").unwrap();
        s.set_group_secret("g1", "a", true, "admin").unwrap();
        s.set_group_secret("g2", "a", true, "admin").unwrap();
        s.set_group_secret("g2", "b", true, "admin").unwrap();
        let names: Vec<_> = s
            .readable_secrets(web.id)
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(s.readable_secrets(other.id).unwrap().is_empty());
        let access = s.client_access("web").unwrap();
        assert_eq!(
            access[0],
            AccessRecord {
                secret: "a".into(),
                groups: vec!["g1".into(), "g2".into()]
            }
        );
        let (ok, denied) = s
            .read_sealed(web.id, &["b".into(), "c".into(), "zz".into()])
            .unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(denied, ["c", "zz"]);
        s.set_group_secret("g2", "b", false, "admin").unwrap();
        assert_eq!(s.readable_secrets(web.id).unwrap().len(), 1);
        s.remove_group("g1", "admin").ok();
        s.remove_client("web", "admin").unwrap();
        assert!(matches!(s.get_client("web"), Err(Error::NotFound { .. })));
        assert!(s.readable_secrets(web.id).unwrap().is_empty());
    }

    #[test]
    fn audit_is_written_with_changes_and_filtered() {
        let s = SqliteStore::open_in_memory().unwrap();
        add(&s, "x");
        client(&s, "web");
        s.append_audit(&[AuditEntry {
            actor: "web".into(),
            action: "secret.read".into(),
            secret: Some("x".into()),
            allowed: false,
            ..Default::default()
        }])
        .unwrap();
        let all = s.query_audit(&AuditFilter::default()).unwrap();
        assert_eq!(
            all.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
            ["secret.create", "client.create", "secret.read"]
        );
        let web = s
            .query_audit(&AuditFilter {
                client: Some("web".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(web.len(), 2);
        let x = s
            .query_audit(&AuditFilter {
                secret: Some("x".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(x.len(), 2);
        let future = s
            .query_audit(&AuditFilter {
                since_ms: Some(now_ms() + 60_000),
                ..Default::default()
            })
            .unwrap();
        assert!(future.is_empty());
        let last = s
            .query_audit(&AuditFilter {
                limit: 1,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(last[0].action, "secret.read");
    }

    #[test]
    fn every_change_bumps_the_revision_and_nothing_else_does() {
        let s = SqliteStore::open_in_memory().unwrap();
        let r0 = s.revision().unwrap();
        add(&s, "x");
        let r1 = s.revision().unwrap();
        assert_eq!(r1, r0 + 1);
        s.rotate_secret("x", 1, "a", &mut |_, _| Ok(sealed(3)))
            .unwrap();
        let web = client(&s, "web");
        s.create_group("g", "", "a").unwrap();
        s.set_group_client("g", "web", true, "a").unwrap();
        let r2 = s.revision().unwrap();
        assert_eq!(r2, r1 + 4);
        // Reads, audit of reads and failed changes leave it alone.
        s.read_sealed(web.id, &[]).unwrap();
        s.append_audit(&[AuditEntry {
            actor: "web".into(),
            action: "secret.read".into(),
            ..Default::default()
        }])
        .unwrap();
        assert!(s
            .rotate_secret("missing", 1, "a", &mut |_, _| Ok(sealed(1)))
            .is_err());
        assert!(s
            .rotate_secret("x", 1, "a", &mut |_, _| Err(Error::Crypto("boom")))
            .is_err());
        assert_eq!(s.revision().unwrap(), r2);
    }

    #[test]
    fn concurrent_writes_share_commits_and_a_failing_job_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(SqliteStore::open(&dir.path().join("db"), true).unwrap());
        for t in 0..4 {
            add(&s, &format!("t{t}"));
        }
        let start = s.revision().unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        s.rotate_secret(&format!("t{t}"), 1, "a", &mut |_, _| Ok(sealed(2)))
                            .unwrap();
                        // Failing jobs in the same bursts change nothing.
                        assert!(s
                            .rotate_secret("missing", 1, "a", &mut |_, _| Ok(sealed(1)))
                            .is_err());
                        let boom = s.rotate_secret(&format!("t{t}"), 1, "a", &mut |_, _| {
                            Err(Error::Crypto("boom"))
                        });
                        assert!(boom.is_err(), "iteration {i}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for t in 0..4 {
            let rec = s.get_secret(&format!("t{t}")).unwrap();
            assert_eq!((rec.current_version, rec.version_count), (51, 51));
            assert_eq!(s.list_versions(&format!("t{t}")).unwrap().len(), 51);
        }
        assert_eq!(s.revision().unwrap(), start + 200);
        // 600 writes (200 that commit work, 400 that fail) took fewer commits.
        let commits = s.group.lock().unwrap().epoch;
        assert!(
            commits < 600,
            "{commits} commits for 600 writes: no group commit happened"
        );
        // Nothing is left open: a fresh connection sees all of it.
        drop(s);
        let again = SqliteStore::open(&dir.path().join("db"), false).unwrap();
        assert_eq!(again.get_secret("t3").unwrap().version_count, 51);
    }

    #[test]
    fn migrations_are_recorded_and_rerun_safely() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(SqliteStore::open(&path, true).unwrap());
        let s = SqliteStore::open(&path, false).unwrap();
        let v: i64 = s
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
        let mode: String = s
            .conn()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert!(SqliteStore::open(&dir.path().join("missing"), false).is_err());
        // Reads go to reader connections and see every committed write.
        assert_eq!(s.readers.len(), READERS);
        for i in 0..10 {
            add(&s, &format!("s{i}"));
            assert_eq!(s.get_secret(&format!("s{i}")).unwrap().current_version, 1);
            assert_eq!(s.revision().unwrap(), i + 1);
        }
        let reader = s.reader();
        let ro: bool = reader
            .pragma_query_value(None, "query_only", |r| r.get(0))
            .unwrap();
        assert!(ro);
    }
}
