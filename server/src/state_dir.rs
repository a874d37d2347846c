//! The state directory: what `server init` creates and `server run` reads.
//!
//! ```text
//! DIR/                0700
//!   master.key        0600  256-bit master key, hex (back it up apart from the
//!                           database); the file provider's (see `key_provider`)
//!   master-key.json         where the master key lives (provider; no secret)
//!   master.key.wrapped 0600 the master key wrapped by a PKCS#11 token (pkcs11)
//!   master.key.next, master.key.wrapped.next
//!                           a rekey's new key until it completes
//!   ca.pem                  the CA certificate clients trust
//!   ca.key            0600  the CA key (signs client certificates)
//!   server.pem, server.key (0600)
//!   admin.pem, admin.key (0600)   the first admin's client identity
//!   secretfs.db (+ -wal, -shm)    SQLite: sealed secrets, clients, groups, audit
//!   database.json           PostgreSQL only: the database's URL without its
//!                           password (see `database`); then there is no secretfs.db
//!   lock              0600  locked by the running server, holds its pid
//!                           (made by `server run`)
//! ```
//!
//! Replicas on one PostgreSQL database share the master key (its provider's
//! files), the CA (ca.pem, ca.key) and admin.pem/admin.key: `server init
//! --join DIR` copies them ([`JOINED_FILES`]) and makes the rest its own.

mod database;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::envelope::MasterKey;
use crate::error::Error;
use crate::key_provider::{KeyOptions, KeySource};
use crate::keys::KeyRing;
use crate::names::check_entity_name;
use crate::pki::Ca;
use crate::store::{NewClient, Store};

pub use database::{choose as choose_database, parse_url, shown, Database, DatabaseOptions};

pub const META_TRUST_DOMAIN: &str = "trust_domain";
pub const META_KEY_CHECK: &str = "master_key_check";

#[derive(Clone, Debug)]
pub struct StateDir {
    pub path: PathBuf,
}

impl StateDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateDir { path: path.into() }
    }
    pub fn master_key(&self) -> PathBuf {
        self.path.join("master.key")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.path.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.path.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.path.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.path.join("server.key")
    }
    pub fn admin_cert(&self) -> PathBuf {
        self.path.join("admin.pem")
    }
    pub fn admin_key(&self) -> PathBuf {
        self.path.join("admin.key")
    }
    pub fn database(&self) -> PathBuf {
        self.path.join("secretfs.db")
    }
    /// PostgreSQL: which database (see [`database`]).
    pub fn database_record(&self) -> PathBuf {
        self.path.join(database::RECORD)
    }
    /// The last entry a sink that cannot be read back (stdout, a FIFO)
    /// exported (see `audit_sink`).
    pub fn audit_sink_record(&self) -> PathBuf {
        self.path.join("audit-sink.exported")
    }
    /// Held by the running server (see `state_lock`).
    pub fn lock_file(&self) -> PathBuf {
        self.path.join("lock")
    }

    /// The CA, from ca.pem and ca.key (the key's text kept in `Zeroizing`).
    pub fn load_ca(&self) -> Result<Ca, Error> {
        let read = |p: PathBuf| {
            fs::read_to_string(&p).map_err(|e| {
                Error::io(
                    format!(
                        "cannot read {} (run this as the server's user, on the server's host)",
                        p.display()
                    ),
                    e,
                )
            })
        };
        let cert = read(self.ca_cert())?;
        let key = Zeroizing::new(read(self.ca_key())?);
        Ca::load(&cert, &key)
    }
}

/// The trust domain the database was made for (`server init`).
pub fn trust_domain(store: &dyn Store) -> Result<String, Error> {
    store
        .get_meta(META_TRUST_DOMAIN)?
        .and_then(|v| String::from_utf8(v).ok())
        .ok_or_else(|| {
            Error::Config(
                "the database does not record its trust domain, or its record was edited without \
                 the master key (`secretfs server verify --state-dir DIR` lists bad rows); \
                 restore the database from a backup"
                    .into(),
            )
        })
}

#[derive(Clone, Debug)]
pub struct InitOptions {
    pub state_dir: PathBuf,
    pub trust_domain: String,
    /// DNS names and IP addresses for the server certificate.
    pub sans: Vec<String>,
    pub admin_name: String,
    /// Where the database is (none: SQLite in the state directory).
    pub database: DatabaseOptions,
    /// `--join DIR`: a copy of a replica's state directory; the new one
    /// shares its master key, CA and admin identity, and the database.
    pub join: Option<PathBuf>,
}

pub fn default_sans() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

fn check_trust_domain(td: &str) -> Result<(), Error> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "trust domain {td:?} is not valid; use lowercase letters, digits, '.', '-' or '_' (e.g. example.org)"
        )))
    }
}

/// `p` made absolute (as it is when that fails), for messages and for
/// comparing paths.
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Writes a new file with the given mode; never overwrites.
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

/// Replaces `path` whole or not at all
/// ([`secretfs_proto::files::replace_file`]: a new exclusive sibling,
/// fsynced, renamed over `path`, the directory fsynced).
pub fn replace_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    secretfs_proto::files::replace_file(path, contents, mode).map_err(replace_error)
}

/// A [`secretfs_proto::files::ReplaceError`] as this crate's error.
pub fn replace_error(e: secretfs_proto::files::ReplaceError) -> Error {
    match e {
        secretfs_proto::files::ReplaceError::Unchanged { path, source } => {
            Error::io(format!("cannot write {}", path.display()), source)
        }
        other => Error::Config(other.to_string()),
    }
}

/// Creates a complete state directory, or nothing: everything is made in a
/// sibling temporary directory and renamed into place at the end.
pub fn init(opts: &InitOptions) -> Result<StateDir, Error> {
    init_with(opts, &KeySource::File)
}

/// [`init`] with the master key kept by `source` (see [`crate::key_provider`]).
/// With `opts.join`, the key is where the copied descriptor says.
pub fn init_with(opts: &InitOptions, source: &KeySource) -> Result<StateDir, Error> {
    init_keys(opts, Keys::New(source))
}

/// `server init --join`: the new replica's master key is where the copied
/// descriptor says, with `keys`' overrides for this host (see
/// [`KeyOptions::resolve`]).
pub fn init_join(opts: &InitOptions, keys: &KeyOptions) -> Result<StateDir, Error> {
    init_keys(opts, Keys::Join(keys))
}

/// Where `init` gets the master key.
#[derive(Clone, Copy)]
enum Keys<'a> {
    /// A new key, kept by this provider.
    New(&'a KeySource),
    /// The joined copy's, with these overrides.
    Join(&'a KeyOptions),
}

fn init_keys(opts: &InitOptions, keys: Keys) -> Result<StateDir, Error> {
    check_trust_domain(&opts.trust_domain)?;
    check_entity_name("client", &opts.admin_name)?;
    let target = &opts.state_dir;
    crate::state_lock::StateLock::check_unlocked(&StateDir::new(target))?;
    if let Ok(mut entries) = fs::read_dir(target) {
        if entries.next().is_some() {
            return Err(Error::Config(format!(
                "state directory {} already exists and is not empty; secretfs never overwrites one. \
                 Run `secretfs server run --state-dir {}` to use it, or pick a new path",
                target.display(),
                target.display()
            )));
        }
    } else if target.exists() {
        return Err(Error::Config(format!(
            "{} exists and is not a directory",
            target.display()
        )));
    }
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent)
        .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
    let file_name = target.file_name().ok_or_else(|| {
        Error::Config(format!(
            "{} is not a usable directory name",
            target.display()
        ))
    })?;
    let tmp = parent.join(format!(
        ".{}.init-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("cannot chmod {}", tmp.display()), e))?;

    let mut made = None;
    let result = fill(&StateDir::new(&tmp), opts, keys, &mut made).and_then(|()| {
        if target.exists() {
            fs::remove_dir(target)
                .map_err(|e| Error::io(format!("cannot replace empty {}", target.display()), e))?;
        }
        fs::rename(&tmp, target).map_err(|e| {
            Error::io(
                format!("cannot move the new state into {}", target.display()),
                e,
            )
        })
    });
    if let Err(e) = result {
        // The master key goes with the temporary directory: the schema
        // made for it goes too, or its key check would name a key that no
        // longer exists.
        let e = match made {
            Some(made) => made.undo(e),
            None => e,
        };
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(StateDir::new(target))
}

/// What `init` made in a PostgreSQL database, undone if it fails later.
struct Made {
    store: Arc<dyn Store>,
    cfg: crate::store::PgConfig,
    /// The key check this init wrote (none yet: nothing but the schema).
    check: Option<Vec<u8>>,
}

impl Made {
    /// Drops the schema this init made, when the database still holds
    /// this init's key check (or none); else, or when the drop fails,
    /// `failed` says what to do by hand.
    fn undo(self, failed: Error) -> Error {
        let Made { store, cfg, check } = self;
        // None: the check was not written yet (nothing else writes to a
        // database this init made the schema of: another init is refused
        // it as not empty, `--join` only reads).
        let ours = store
            .get_meta(META_KEY_CHECK)
            .map(|c| c.is_none() || c == check);
        // Its connections closed before the tables go.
        drop(store);
        let dropped = match ours {
            Ok(true) => crate::store::PgStore::drop_schema(&cfg).map_err(|e| e.to_string()),
            Ok(false) => Err("its key check is not the one this init wrote".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        match dropped {
            Ok(()) => Error::Config(format!(
                "{failed}; the schema this init made in {} was dropped again, nothing was kept",
                cfg.redacted()
            )),
            Err(why) => Error::Config(format!(
                "{failed}; the schema this init made in the database {} could not be dropped ({why}), \
                 and the master key it was made for is gone: make that database empty again before \
                 another init (as a PostgreSQL superuser: `dropdb DBNAME && createdb -O USER DBNAME`, \
                 with the URL's database name and user)",
                cfg.redacted()
            )),
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: fail `init` after the store made its schema.
    static FAIL_AFTER_SCHEMA: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn fill(
    dir: &StateDir,
    opts: &InitOptions,
    keys: Keys,
    made: &mut Option<Made>,
) -> Result<(), Error> {
    let db = database::choose(dir, &opts.database)?;
    let source = match (keys, &opts.join) {
        (Keys::Join(keys), Some(from)) => return join(dir, opts, from, &db, keys),
        (Keys::New(_), Some(from)) => return join(dir, opts, from, &db, &KeyOptions::default()),
        (Keys::Join(_), None) => {
            return Err(Error::InvalidArgument(
                "init_join needs the copy to join (InitOptions::join)".into(),
            ))
        }
        (Keys::New(source), None) => source,
    };
    let master = source.create(dir)?;

    let (ca, ca_key) = Ca::generate(&opts.trust_domain)?;
    write_new(&dir.ca_cert(), ca.cert_pem.as_bytes(), 0o644)?;
    write_new(&dir.ca_key(), ca_key.as_bytes(), 0o600)?;
    server_cert(dir, &ca, opts)?;

    let admin = ca.issue_client(
        &opts.trust_domain,
        &opts.admin_name,
        crate::pki::CLIENT_DAYS,
    )?;
    write_new(&dir.admin_cert(), admin.cert_pem.as_bytes(), 0o644)?;
    write_new(&dir.admin_key(), key_bytes(&admin.key_pem), 0o600)?;

    let keys = KeyRing::new(master);
    // The store refuses a database that is not empty, naming `--join`
    // when it holds a secretfs schema (another replica's).
    let store = db.open(true, keys.clone()).map_err(|e| db.failed(e))?;
    if let Database::Postgres(cfg) = &db {
        *made = Some(Made {
            store: store.clone(),
            cfg: (**cfg).clone(),
            check: None,
        });
        database::record(dir, cfg)?;
    }
    let master = keys.get();
    let master = master.current.master();
    store.put_meta(META_TRUST_DOMAIN, opts.trust_domain.as_bytes())?;
    let check = crate::keys::seal_key_check(master)?;
    if let Some(made) = made {
        // Before the write: a write that fails may have landed.
        made.check = Some(check.clone());
    }
    store.put_meta(META_KEY_CHECK, &check)?;
    store.create_client(
        &NewClient {
            name: opts.admin_name.clone(),
            admin: true,
            cert: Some((admin.serial.clone(), admin.not_after)),
        },
        &crate::store::AuditEntry {
            client: Some(opts.admin_name.clone()),
            detail: format!("certificate {}, admin", admin.serial),
            ..crate::domain::Action::ClientCreate.by("server init")
        },
    )?;
    #[cfg(test)]
    if FAIL_AFTER_SCHEMA.with(|f| f.get()) {
        return Err(Error::Config("failed on purpose after the schema".into()));
    }
    Ok(())
}

/// This server's own certificate, for `opts.sans`.
fn server_cert(dir: &StateDir, ca: &Ca, opts: &InitOptions) -> Result<(), Error> {
    let sans = if opts.sans.is_empty() {
        default_sans()
    } else {
        opts.sans.clone()
    };
    let server = ca.issue_server(&sans)?;
    write_new(&dir.server_cert(), server.cert_pem.as_bytes(), 0o644)?;
    write_new(&dir.server_key(), key_bytes(&server.key_pem), 0o600)
}

/// What replicas share, copied by `server init --join` (those present:
/// the master key's descriptor and the file or wrapped key it names).
pub const JOINED_FILES: [&str; 7] = [
    "master-key.json",
    "master.key",
    "master.key.wrapped",
    "ca.pem",
    "ca.key",
    "admin.pem",
    "admin.key",
];

/// `server init --join FROM`: a replica of the servers on `db`, sharing
/// FROM's master key, CA and admin identity; its own server certificate.
/// Nothing is written to the database: it is only checked (its schema is
/// current, the master key opens its key check).
fn join(
    dir: &StateDir,
    opts: &InitOptions,
    from: &Path,
    db: &Database,
    keys: &KeyOptions,
) -> Result<(), Error> {
    let Database::Postgres(cfg) = db else {
        return Err(Error::InvalidArgument(
            "--join adds a replica on a shared PostgreSQL database; give --database postgres://... (SQLite serves one server only)"
                .into(),
        ));
    };
    let from_dir = StateDir::new(from);
    if !from_dir.ca_key().is_file() {
        return Err(Error::Config(format!(
            "--join {}: not a copy of a secretfs state directory (it has no ca.key); copy a replica's state directory (or at least {}) and give that",
            from.display(),
            JOINED_FILES.join(", ")
        )));
    }
    for next in ["master.key.next", "master.key.wrapped.next"] {
        if from.join(next).exists() {
            return Err(Error::FailedPrecondition(format!(
                "--join {}: a rekey was in progress when it was copied ({next}); wait for `secretfs server rekey --status` to say it is done, copy the state directory again, and retry. Nothing was changed",
                from.display()
            )));
        }
    }
    for name in JOINED_FILES {
        let public = name.ends_with(".pem") || name.ends_with(".json");
        let Some(bytes) = read_copied(&from.join(name), public)? else {
            continue;
        };
        write_new(
            &dir.path.join(name),
            &bytes,
            if public { 0o644 } else { 0o600 },
        )?;
    }
    let ca = dir.load_ca()?;
    server_cert(dir, &ca, opts)?;

    // The descriptor's provider, with this host's overrides (a module at
    // another path, another PIN file).
    let source = keys.resolve(dir)?;
    let master = source.load(dir)?;
    if db.needs_upgrade()? {
        return Err(Error::FailedPrecondition(format!(
            "the database {} was made by an older secretfs: upgrade it first by starting this version's `secretfs server run` on one of its replicas, then join. Nothing was changed",
            cfg.redacted()
        )));
    }
    let keys = KeyRing::new(master);
    let store = db.open(false, keys.clone()).map_err(|e| match e {
        crate::store::StoreError::KeyMismatch => join_mismatch(&source, &from_dir, cfg),
        e => db.failed(e),
    })?;
    // A row sealed under another key reads as absent: no check at all is
    // the same refusal as one that does not open.
    let opens = store
        .get_meta(META_KEY_CHECK)?
        .is_some_and(|check| crate::keys::key_check_opens(keys.get().current.master(), &check));
    if !opens {
        return Err(join_mismatch(&source, &from_dir, cfg));
    }
    trust_domain(store.as_ref())?;
    database::record(dir, cfg)
}

/// A file of the copy `--join` reads: a regular file (not a link, not a
/// FIFO), and a key only its owner can read. None when it is absent.
fn read_copied(path: &Path, public: bool) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let not_regular = || {
        Error::Config(format!(
            "--join: {} is not a regular file (a link, a directory or a device); copy the state \
             directory's files themselves (e.g. with tar) and retry. Nothing was changed",
            path.display()
        ))
    };
    // The name is looked at without following a link, then the file
    // opened is checked to be the one looked at (nothing swapped in
    // between).
    let before = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
    };
    if !before.file_type().is_file() {
        return Err(not_regular());
    }
    let mut f = fs::File::open(path)
        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    let meta = f
        .metadata()
        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    if !meta.is_file() || meta.dev() != before.dev() || meta.ino() != before.ino() {
        return Err(not_regular());
    }
    let mode = meta.mode() & 0o777;
    if !public && mode & 0o077 != 0 {
        return Err(Error::Config(format!(
            "--join: {} holds a key and is readable by others (mode {mode:04o}); whoever could read \
             the copy may have the master key or the CA key. Keep the copy private (copy with \
             umask 077, or `chmod -R go= {}`) and retry. Nothing was changed",
            path.display(),
            path.parent().unwrap_or(Path::new(".")).display()
        )));
    }
    let mut bytes = Zeroizing::new(Vec::new());
    f.read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
    Ok(Some(bytes))
}

fn join_mismatch(source: &KeySource, dir: &StateDir, cfg: &crate::store::PgConfig) -> Error {
    Error::Config(format!(
        "the database {} was made with another master key than the one from {} (copied by --join): join with a copy of a state directory of a replica of this database. Nothing was written",
        cfg.redacted(),
        source.describe(dir)
    ))
}

fn key_bytes(key: &Option<Zeroizing<String>>) -> &[u8] {
    key.as_ref().map(|k| k.as_bytes()).unwrap_or_default()
}

/// A secret given in an environment variable (a PIN, a password), taken
/// out of the process environment once at start ([`TakenEnv::take`]), so
/// no child process and no later getenv (a C library's too) sees it.
pub struct TakenEnv {
    name: &'static str,
    value: std::sync::OnceLock<Option<Zeroizing<String>>>,
}

impl TakenEnv {
    pub const fn new(name: &'static str) -> TakenEnv {
        TakenEnv {
            name,
            value: std::sync::OnceLock::new(),
        }
    }

    /// Reads the variable and removes it. Call from `main` before any
    /// thread starts: changing the environment races other threads'
    /// getenv.
    pub fn take(&self) {
        let _ = self
            .value
            .set(std::env::var(self.name).ok().map(Zeroizing::new));
        std::env::remove_var(self.name);
    }

    /// Its value as taken (or as set now, when it was never taken: tests,
    /// library callers).
    pub fn get(&self) -> Option<Zeroizing<String>> {
        match self.value.get() {
            Some(taken) => taken.clone(),
            None => std::env::var(self.name).ok().map(Zeroizing::new),
        }
    }
}

/// A small secret from a file only its owner can read (a PIN, a
/// password), without its trailing newline. `what` and `flag` name it in
/// errors.
pub fn read_private_file(path: &Path, what: &str, flag: &str) -> Result<Zeroizing<String>, Error> {
    let cannot = |e| {
        Error::io(
            format!("cannot read the {what} file {} ({flag})", path.display()),
            e,
        )
    };
    // One open: the mode checked is the mode of the file read.
    let mut file = fs::File::open(path).map_err(cannot)?;
    let mode = file.metadata().map_err(cannot)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::Config(format!(
            "the {what} file {} is readable by others (mode {mode:04o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let mut text = Zeroizing::new(String::new());
    std::io::Read::read_to_string(&mut file, &mut text).map_err(cannot)?;
    Ok(Zeroizing::new(
        text.trim_end_matches(['\n', '\r']).to_owned(),
    ))
}

/// Loads the master key, refusing a file others can read.
pub fn load_master_key(path: &Path) -> Result<MasterKey, Error> {
    let meta = fs::metadata(path).map_err(|e| {
        Error::io(
            format!(
                "cannot read the master key {} (restore it from your backup; without it the stored secrets cannot be decrypted)",
                path.display()
            ),
            e,
        )
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::Config(format!(
            "the master key {} is readable by others (mode {mode:04o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let text = Zeroizing::new(
        fs::read_to_string(path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?,
    );
    MasterKey::from_hex(&text).ok_or_else(|| {
        Error::Config(format!(
            "{} is not a secretfs master key (expected 64 hex digits); restore the right file from backup",
            path.display()
        ))
    })
}

/// Loads the master key, opens the database under it and proves the two
/// belong together: what `server run` and the commands that work on the
/// state directory beside it (`admin-cert`, `verify`) start from. An
/// upgrade that adopts the rows of an older database (row MACs) checks the
/// key itself before it signs anything.
pub fn open_store(dir: &StateDir) -> Result<(Arc<dyn Store>, Arc<KeyRing>), Error> {
    open_store_with(
        dir,
        &KeyOptions::default(),
        &DatabaseOptions::default(),
        false,
    )
    .map(|o| (o.store, o.keys))
}

/// What [`open_store_with`] opened.
pub struct Opened {
    pub store: Arc<dyn Store>,
    pub keys: Arc<KeyRing>,
    /// Where the master key lives (the descriptor, flags applied).
    pub source: KeySource,
    /// A rekey was in progress when the store was last closed: resume it.
    pub rekey_in_progress: bool,
}

/// [`open_store`] with the provider flags given: the key from its
/// provider, both keys while a rekey is in progress (see [`crate::rekey`]),
/// the database the state directory records (or `db` names, which must be
/// the same). `repair`: the caller holds the state lock (`server run`), so
/// it may finish or discard what an interrupted rekey left in the provider;
/// a command beside a running server must not.
pub fn open_store_with(
    dir: &StateDir,
    opts: &KeyOptions,
    db: &DatabaseOptions,
    repair: bool,
) -> Result<Opened, Error> {
    let db = database::choose(dir, db)?;
    // The upgrade signs rows, chains the audit log and seals the row set:
    // only `server run` (holding the state lock) makes it, never a command
    // beside a server of the older version, which would go on writing
    // unsigned rows into the upgraded database.
    if !repair && db.needs_upgrade()? {
        return Err(Error::FailedPrecondition(format!(
            "the database {} was made by an older secretfs and needs the upgrade `secretfs server run` \
             makes at its start: stop the running server, start this version's `server run --state-dir {}` \
             once, then run this command again. Nothing was changed",
            db.describe(),
            dir.path.display()
        )));
    }
    let mut source = opts.resolve(dir)?;
    // Each key is loaded once (a PKCS#11 login each) and its set built
    // once: the rings below share these sets (see `KeySet::at_epoch`).
    let current = crate::keys::KeySet::new(1, source.load(dir)?);
    let next = source
        .load_next(dir)?
        .map(|k| crate::keys::KeySet::new(2, k));
    // Until the rekey state is read, rows a rekey signed under the key it
    // moves to (its own meta entries among them) must read as good.
    let keys = KeyRing::of(crate::keys::Keys::of(
        Arc::new(current.at_epoch(1)),
        next.as_ref().map(|n| Arc::new(n.at_epoch(2))),
    ));
    let store = db.open(false, keys.clone()).map_err(|e| match e {
        crate::store::StoreError::KeyMismatch => key_mismatch(&source, dir),
        e => db.failed(e),
    })?;
    let (loaded, rekey_in_progress, fix) =
        crate::rekey::keys_at_start(dir, &source, store.as_ref(), &current, next.as_ref())?;
    keys.replace(loaded);
    if repair {
        crate::rekey::repair_at_start(dir, &mut source, store.as_ref(), &keys.get(), fix)?;
    }
    Ok(Opened {
        store,
        keys,
        source,
        rekey_in_progress,
    })
}

/// The refusal when the master key from `source` is not the database's.
pub(crate) fn key_mismatch(source: &KeySource, dir: &StateDir) -> Error {
    Error::Config(format!(
        "the master key from {} does not match this database (it was made with another key); \
         put the right key back (from backup) and start again. Nothing was changed",
        source.describe(dir)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> InitOptions {
        InitOptions {
            state_dir: dir.to_path_buf(),
            trust_domain: "test.local".into(),
            sans: vec![],
            admin_name: "admin".into(),
            database: DatabaseOptions::default(),
            join: None,
        }
    }

    #[test]
    fn init_makes_everything_with_tight_modes_and_refuses_to_reinit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let sd = init(&opts(&dir)).unwrap();
        for (p, mode) in [
            (sd.master_key(), 0o600),
            (sd.ca_key(), 0o600),
            (sd.server_key(), 0o600),
            (sd.admin_key(), 0o600),
        ] {
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                mode,
                "{}",
                p.display()
            );
        }
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let (store, keys) = open_store(&sd).unwrap();
        let check = store.get_meta(META_KEY_CHECK).unwrap().unwrap();
        assert!(crate::keys::key_check_opens(
            keys.get().current.master(),
            &check
        ));
        let err = crate::rekey::keys_at_start(
            &sd,
            &KeySource::File,
            store.as_ref(),
            &crate::keys::KeySet::new(1, MasterKey::generate().unwrap()),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(store.get_client("admin").unwrap().admin);

        let before = fs::read(sd.master_key()).unwrap();
        let err = init(&opts(&dir)).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(fs::read(sd.master_key()).unwrap(), before);
        // No temporary directory left behind.
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn init_into_an_empty_existing_dir_and_bad_trust_domain() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("empty");
        fs::create_dir(&dir).unwrap();
        init(&opts(&dir)).unwrap();
        let mut bad = opts(&tmp.path().join("x"));
        bad.trust_domain = "Bad Domain".into();
        assert!(init(&bad).is_err());
        assert!(!tmp.path().join("x").exists());
    }

    #[test]
    fn the_copy_join_reads_must_be_private_regular_files() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("ca.key");
        write_new(&key, b"key", 0o640).unwrap();
        let err = read_copied(&key, false).unwrap_err().to_string();
        assert!(err.contains("readable by others"), "{err}");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_copied(&key, false).unwrap().unwrap().as_slice(),
            b"key"
        );
        let link = tmp.path().join("master.key");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        let err = read_copied(&link, false).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let pem = tmp.path().join("ca.pem");
        write_new(&pem, b"cert", 0o644).unwrap();
        assert!(read_copied(&pem, true).unwrap().is_some());
        assert!(read_copied(&tmp.path().join("none"), false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn join_takes_the_key_flags_and_refuses_a_copy_others_can_read() {
        let tmp = tempfile::tempdir().unwrap();
        let url = secretfs_pgtest::PgCluster::shared().database();
        let mut first = opts(&tmp.path().join("a"));
        first.database = DatabaseOptions::postgres(&url, None);
        let a = init(&first).unwrap();
        let mut second = opts(&tmp.path().join("b"));
        second.database = DatabaseOptions::postgres(&url, None);
        second.join = Some(a.path.clone());
        // A flag for another provider than the copy's is not ignored.
        let pkcs11 = KeyOptions {
            provider: Some(crate::key_provider::ProviderKind::Pkcs11),
            ..KeyOptions::default()
        };
        let err = init_join(&second, &pkcs11).unwrap_err().to_string();
        assert!(err.contains("--master-key-provider"), "{err}");
        assert!(!second.state_dir.exists());
        fs::set_permissions(a.ca_key(), fs::Permissions::from_mode(0o644)).unwrap();
        let err = init_join(&second, &KeyOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("readable by others"), "{err}");
        assert!(!second.state_dir.exists());
        fs::set_permissions(a.ca_key(), fs::Permissions::from_mode(0o600)).unwrap();
        let b = init_join(&second, &KeyOptions::default()).unwrap();
        assert_eq!(
            fs::read(b.master_key()).unwrap(),
            fs::read(a.master_key()).unwrap()
        );
    }

    #[test]
    fn a_failed_init_on_postgres_drops_the_schema_it_made() {
        let tmp = tempfile::tempdir().unwrap();
        let url = secretfs_pgtest::PgCluster::shared().database();
        let mut o = opts(&tmp.path().join("a"));
        o.database = DatabaseOptions::postgres(&url, None);
        FAIL_AFTER_SCHEMA.with(|f| f.set(true));
        let err = init(&o).unwrap_err().to_string();
        FAIL_AFTER_SCHEMA.with(|f| f.set(false));
        assert!(err.contains("was dropped again"), "{err}");
        assert!(!o.state_dir.exists());
        // The database is empty again: a new init takes it.
        let sd = init(&o).unwrap();
        let opened = open_store_with(&sd, &KeyOptions::default(), &o.database, false).unwrap();
        assert!(opened.store.get_client("admin").unwrap().admin);
    }

    #[test]
    fn master_key_readable_by_others_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("k");
        write_new(
            &p,
            MasterKey::generate().unwrap().to_hex().as_bytes(),
            0o644,
        )
        .unwrap();
        let err = load_master_key(&p).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        let p2 = tmp.path().join("k2");
        write_new(&p2, b"nonsense", 0o600).unwrap();
        assert!(load_master_key(&p2)
            .unwrap_err()
            .to_string()
            .contains("64 hex"));
    }
}
