//! Where the master key comes from: a file in the state directory (the
//! default), a systemd credential, or a PKCS#11 token that wraps it.
//!
//! `server init` picks the provider and records it in the state directory's
//! `master-key.json` (no secret in it); `server run`, `admin-cert` and the
//! other commands that open the state directory read it back, and flags can
//! override its fields (a moved module, another PIN file).
//!
//! Only the file provider ever writes an unwrapped key, to its own 0600
//! `master.key`. A systemd credential is made by the operator
//! (`systemd-creds encrypt`) and only read here; a token's AES key wraps the
//! master key (AES-GCM in the token) into `master.key.wrapped`, which is
//! useless without the token and its PIN.
//!
//! A rekey keeps the next key beside the current one until it completes:
//! `master.key.next`, `master.key.wrapped.next`, or (systemd, whose
//! credentials are read-only) the name of a second credential recorded in
//! the descriptor. [`KeySource::commit_next`] makes it the key.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::envelope::MasterKey;
use crate::error::Error;
use crate::state_dir::{replace_file, StateDir};

/// The descriptor's file name in the state directory.
pub const DESCRIPTOR: &str = "master-key.json";
/// The systemd credential name used when none is given.
pub const DEFAULT_CREDENTIAL: &str = "secretfs-master-key";
/// The environment variable holding the token's user PIN (or use a PIN file).
pub const PIN_ENV: &str = "SECRETFS_PKCS11_PIN";
/// What systemd sets to the directory of the service's credentials.
pub const CREDENTIALS_ENV: &str = "CREDENTIALS_DIRECTORY";

const WRAP_MAGIC: &[u8] = b"SFW1";
const WRAP_AAD: &[u8] = b"secretfs/v1 master key";
const GCM_IV: usize = 12;

/// Which provider a flag asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderKind {
    File,
    Systemd,
    Pkcs11,
}

impl ProviderKind {
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::File => "file",
            ProviderKind::Systemd => "systemd",
            ProviderKind::Pkcs11 => "pkcs11",
        }
    }
}

/// Where this state directory's master key lives (the descriptor's content).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
pub enum KeySource {
    /// `master.key`, 64 hex digits, mode 0600.
    File,
    /// `$CREDENTIALS_DIRECTORY/<credential>`.
    Systemd {
        credential: String,
        /// The credential a rekey in progress moves to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next_credential: Option<String>,
    },
    /// An AES key labelled `key` in the token labelled `token` of `module`
    /// wraps the master key into `master.key.wrapped`.
    Pkcs11 {
        module: PathBuf,
        token: String,
        key: String,
        /// Where the PIN is read from (else [`PIN_ENV`]); the PIN itself is
        /// never recorded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pin_file: Option<PathBuf>,
    },
}

/// The provider flags of `server init`, `run`, `admin-cert` and `rekey`.
#[derive(Clone, Debug, Default)]
pub struct KeyOptions {
    pub provider: Option<ProviderKind>,
    pub credential: Option<String>,
    pub pkcs11_module: Option<PathBuf>,
    pub pkcs11_token: Option<String>,
    pub pkcs11_key: Option<String>,
    pub pkcs11_pin_file: Option<PathBuf>,
}

impl KeyOptions {
    fn kind(&self) -> ProviderKind {
        self.provider.unwrap_or(if self.pkcs11_module.is_some() {
            ProviderKind::Pkcs11
        } else if self.credential.is_some() {
            ProviderKind::Systemd
        } else {
            ProviderKind::File
        })
    }

    /// The source `server init` records: from the flags alone.
    pub fn for_init(&self) -> Result<KeySource, Error> {
        Ok(match self.kind() {
            ProviderKind::File => KeySource::File,
            ProviderKind::Systemd => KeySource::Systemd {
                credential: self
                    .credential
                    .clone()
                    .unwrap_or_else(|| DEFAULT_CREDENTIAL.into()),
                next_credential: None,
            },
            ProviderKind::Pkcs11 => {
                let need = |v: &Option<String>, flag: &str| {
                    v.clone().ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "the pkcs11 master key provider needs {flag}"
                        ))
                    })
                };
                KeySource::Pkcs11 {
                    module: self.pkcs11_module.clone().ok_or_else(|| {
                        Error::InvalidArgument(
                            "the pkcs11 master key provider needs --pkcs11-module PATH (SoftHSM2: /usr/lib/softhsm/libsofthsm2.so)".into(),
                        )
                    })?,
                    token: need(&self.pkcs11_token, "--pkcs11-token LABEL")?,
                    key: need(&self.pkcs11_key, "--pkcs11-key LABEL")?,
                    pin_file: self.pkcs11_pin_file.clone(),
                }
            }
        })
    }

    /// The source of an existing state directory: its descriptor (none:
    /// the file provider, as before providers existed), with the flags
    /// given overriding its fields.
    pub fn resolve(&self, dir: &StateDir) -> Result<KeySource, Error> {
        let mut source = KeySource::read(dir)?;
        if let Some(kind) = self.provider {
            if kind != source.kind() {
                return Err(Error::Config(format!(
                    "this state directory's master key is kept by the {} provider ({}), not {}; \
                     drop --master-key-provider (a different provider would not find the key)",
                    source.kind().name(),
                    dir.path.join(DESCRIPTOR).display(),
                    kind.name()
                )));
            }
        }
        match &mut source {
            KeySource::File => {}
            KeySource::Systemd { credential, .. } => {
                // The descriptor names the credential a rekey moved to; an
                // override naming another (an old unit's environment) would
                // load a retired key.
                if let Some(c) = self.credential.as_ref().filter(|c| *c != credential) {
                    return Err(Error::Config(format!(
                        "this state directory's master key is the systemd credential {credential} ({}), \
                         but --master-key-credential / SECRETFS_MASTER_KEY_CREDENTIAL asks for {c}; a rekey moves the key \
                         to a new credential and records it there. Drop the override (and load {credential} in the unit)",
                        dir.path.join(DESCRIPTOR).display()
                    )));
                }
            }
            KeySource::Pkcs11 {
                module,
                token,
                key,
                pin_file,
            } => {
                match &self.pkcs11_module {
                    Some(v) => module.clone_from(v),
                    // Whoever can write the descriptor must not be able
                    // to load code into the server: only a module only
                    // root can change is taken from it.
                    None => check_module_path(module, &dir.path.join(DESCRIPTOR))?,
                }
                if let Some(v) = &self.pkcs11_token {
                    token.clone_from(v);
                }
                if let Some(v) = &self.pkcs11_key {
                    key.clone_from(v);
                }
                if let Some(v) = &self.pkcs11_pin_file {
                    *pin_file = Some(v.clone());
                }
            }
        }
        Ok(source)
    }
}

/// A PKCS#11 module path read from the descriptor: absolute, and it and
/// every directory above it owned by root and not group/world-writable.
fn check_module_path(module: &Path, descriptor: &Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: String| {
        Err(Error::Config(format!(
            "the PKCS#11 module {} named in {} {why}: a module is code the server loads, so it must be \
             an absolute path only root can change. Install it so, or give --pkcs11-module PATH",
            module.display(),
            descriptor.display()
        )))
    };
    if !module.is_absolute() {
        return refuse("is not an absolute path".into());
    }
    for p in module.ancestors() {
        let meta = match fs::metadata(p) {
            Ok(m) => m,
            Err(e) => return refuse(format!("cannot be checked ({}: {e})", p.display())),
        };
        if meta.uid() != 0 {
            return refuse(format!("is not safe: {} is not owned by root", p.display()));
        }
        // A sticky directory (/tmp) still lets others rename and create.
        if meta.mode() & 0o022 != 0 {
            return refuse(format!(
                "is not safe: {} is writable by group or others (mode {:04o})",
                p.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

fn descriptor(dir: &StateDir) -> PathBuf {
    dir.path.join(DESCRIPTOR)
}
fn file_next(dir: &StateDir) -> PathBuf {
    dir.path.join("master.key.next")
}
/// The token-wrapped master key.
pub fn wrapped(dir: &StateDir) -> PathBuf {
    dir.path.join("master.key.wrapped")
}
fn wrapped_next(dir: &StateDir) -> PathBuf {
    dir.path.join("master.key.wrapped.next")
}

impl KeySource {
    pub fn kind(&self) -> ProviderKind {
        match self {
            KeySource::File => ProviderKind::File,
            KeySource::Systemd { .. } => ProviderKind::Systemd,
            KeySource::Pkcs11 { .. } => ProviderKind::Pkcs11,
        }
    }

    /// The descriptor in `dir`; none means the file provider.
    pub fn read(dir: &StateDir) -> Result<KeySource, Error> {
        let path = descriptor(dir);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::Config(format!(
                    "{} is not a secretfs master key descriptor ({e}); restore it from backup",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeySource::File),
            Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
        }
    }

    /// Records this source as the directory's descriptor (atomically).
    pub fn write(&self, dir: &StateDir) -> Result<(), Error> {
        let mut text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Config(format!("cannot encode the key descriptor: {e}")))?;
        text.push(b'\n');
        replace_file(&descriptor(dir), &text, 0o644)
    }

    /// Where the key is, for messages.
    pub fn describe(&self, dir: &StateDir) -> String {
        match self {
            KeySource::File => dir.master_key().display().to_string(),
            KeySource::Systemd { credential, .. } => format!("systemd credential {credential}"),
            KeySource::Pkcs11 { token, key, .. } => {
                format!(
                    "PKCS#11 token {token:?} key {key:?} ({})",
                    wrapped(dir).display()
                )
            }
        }
    }

    /// `server init`: makes (file, pkcs11) or reads (systemd) the first key
    /// and records the descriptor.
    pub fn create(&self, dir: &StateDir) -> Result<MasterKey, Error> {
        let key = match self {
            KeySource::File => {
                let key = MasterKey::generate()?;
                crate::state_dir::write_new(&dir.master_key(), key.to_hex().as_bytes(), 0o600)?;
                key
            }
            KeySource::Systemd { credential, .. } => read_credential(credential)?,
            KeySource::Pkcs11 { .. } => {
                let key = MasterKey::generate()?;
                let blob = Token::open(self)?.wrap(&key, true)?;
                crate::state_dir::write_new(&wrapped(dir), &blob, 0o600)?;
                key
            }
        };
        self.write(dir)?;
        Ok(key)
    }

    /// The current master key.
    pub fn load(&self, dir: &StateDir) -> Result<MasterKey, Error> {
        match self {
            KeySource::File => crate::state_dir::load_master_key(&dir.master_key()),
            KeySource::Systemd { credential, .. } => read_credential(credential),
            KeySource::Pkcs11 { .. } => Token::open(self)?.unwrap(&read_blob(&wrapped(dir))?),
        }
    }

    /// A rekey's next key, stored where [`load_next`](Self::load_next)
    /// finds it after a crash. systemd: read from `next_credential` (the
    /// operator made it); the others make a new random key.
    pub fn create_next(
        &mut self,
        dir: &StateDir,
        next_credential: Option<&str>,
    ) -> Result<MasterKey, Error> {
        match self {
            KeySource::File => {
                let key = MasterKey::generate()?;
                create_only(&file_next(dir), key.to_hex().as_bytes())?;
                Ok(key)
            }
            KeySource::Systemd {
                credential,
                next_credential: next,
            } => {
                let name = next_credential.ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "the master key is the systemd credential {credential}, which the server cannot replace: \
                         make a new one (systemd-creds encrypt), load it with a second LoadCredentialEncrypted= line, \
                         restart, and pass its name with --new-credential"
                    ))
                })?;
                if name == credential {
                    return Err(Error::InvalidArgument(format!(
                        "--new-credential {name} is the credential in use; give the new one's name"
                    )));
                }
                let key = read_credential(name)?;
                *next = Some(name.to_owned());
                self.write(dir)?;
                Ok(key)
            }
            KeySource::Pkcs11 { .. } => {
                let key = MasterKey::generate()?;
                let blob = Token::open(self)?.wrap(&key, false)?;
                create_only(&wrapped_next(dir), &blob)?;
                Ok(key)
            }
        }
    }

    /// The next key a rekey left, if any.
    pub fn load_next(&self, dir: &StateDir) -> Result<Option<MasterKey>, Error> {
        match self {
            KeySource::File => {
                let p = file_next(dir);
                if p.exists() {
                    crate::state_dir::load_master_key(&p).map(Some)
                } else {
                    Ok(None)
                }
            }
            KeySource::Systemd {
                next_credential, ..
            } => next_credential.as_deref().map(read_credential).transpose(),
            KeySource::Pkcs11 { .. } => {
                let p = wrapped_next(dir);
                if p.exists() {
                    Token::open(self)?.unwrap(&read_blob(&p)?).map(Some)
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// The rekey is done: the next key becomes the key, the old one is
    /// gone from the state directory (file: renamed over; pkcs11: the
    /// wrapped blob renamed over; systemd: the descriptor names the new
    /// credential, and the old one can be dropped from the unit).
    pub fn commit_next(&mut self, dir: &StateDir) -> Result<(), Error> {
        match self {
            KeySource::File => rename(&file_next(dir), &dir.master_key()),
            KeySource::Pkcs11 { .. } => rename(&wrapped_next(dir), &wrapped(dir)),
            KeySource::Systemd {
                credential,
                next_credential,
            } => {
                if let Some(next) = next_credential.take() {
                    *credential = next;
                    self.write(dir)?;
                }
                Ok(())
            }
        }
    }

    /// Whether a next key is there (a rekey's, or one left behind).
    pub fn has_next(&self, dir: &StateDir) -> bool {
        match self {
            KeySource::File => fs::symlink_metadata(file_next(dir)).is_ok(),
            KeySource::Pkcs11 { .. } => fs::symlink_metadata(wrapped_next(dir)).is_ok(),
            KeySource::Systemd {
                next_credential, ..
            } => next_credential.is_some(),
        }
    }

    /// Puts aside a next key no recorded rekey uses (one that crashed
    /// before it began). Key material is never deleted on the word of the
    /// database: the file is renamed to `<name>.unused-<unix time>` (mode
    /// kept, 0600) and the new name returned, for the operator to remove
    /// once sure. systemd: the descriptor forgets the credential's name
    /// (the credential itself is the operator's).
    pub fn set_aside_next(&mut self, dir: &StateDir) -> Result<Option<String>, Error> {
        let path = match self {
            KeySource::File => file_next(dir),
            KeySource::Pkcs11 { .. } => wrapped_next(dir),
            KeySource::Systemd {
                next_credential, ..
            } => {
                let name = next_credential.take();
                if name.is_some() {
                    self.write(dir)?;
                }
                return Ok(name.map(|n| format!("systemd credential {n}")));
            }
        };
        if fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut aside = path.clone().into_os_string();
        aside.push(format!(".unused-{now}"));
        let aside = PathBuf::from(aside);
        if fs::symlink_metadata(&aside).is_ok() {
            return Err(Error::Config(format!(
                "cannot put {} aside: {} exists; move one of them away and start again",
                path.display(),
                aside.display()
            )));
        }
        rename(&path, &aside)?;
        Ok(Some(aside.display().to_string()))
    }
}

/// Creates `path` with `contents` (0600) whole, and never over an existing
/// file: written to a sibling first, then hard-linked into place (which
/// fails when `path` exists).
fn create_only(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    crate::state_dir::write_new(&tmp, contents, 0o600)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::FailedPrecondition(format!(
                "{} already exists (a new master key an earlier rekey made); nothing was overwritten. \
                 Restart the server to finish or set aside that rekey, then ask again",
                path.display()
            ))
        } else {
            Error::io(format!("cannot create {}", path.display()), e)
        }
    })?;
    if let Some(parent) = path.parent() {
        let _ = fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Renames `from` over `to` and fsyncs the directory, so the rename
/// survives a crash.
fn rename(from: &Path, to: &Path) -> Result<(), Error> {
    if !from.exists() {
        // Already renamed by an earlier, interrupted completion.
        return Ok(());
    }
    fs::rename(from, to).map_err(|e| {
        Error::io(
            format!("cannot rename {} to {}", from.display(), to.display()),
            e,
        )
    })?;
    if let Some(parent) = to.parent() {
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("cannot sync {}", parent.display()), e))?;
    }
    Ok(())
}

fn read_blob(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|e| {
        Error::io(
            format!(
                "cannot read the wrapped master key {} (restore it from backup; the token alone cannot recover it)",
                path.display()
            ),
            e,
        )
    })
}

/// A systemd credential: 64 hex digits (a trailing newline is fine) or
/// exactly 32 raw bytes.
fn read_credential(name: &str) -> Result<MasterKey, Error> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(Error::InvalidArgument(format!(
            "{name:?} is not a credential name (no '/', not empty)"
        )));
    }
    let dir = std::env::var_os(CREDENTIALS_ENV).ok_or_else(|| {
        Error::Config(format!(
            "the master key is the systemd credential {name}, but ${CREDENTIALS_ENV} is not set: \
             run the server from its systemd unit with LoadCredentialEncrypted={name}:/etc/credstore.encrypted/{name} \
             (or, for `server init` and other commands, under systemd-run -p LoadCredentialEncrypted=...)"
        ))
    })?;
    let path = Path::new(&dir).join(name);
    let bytes = Zeroizing::new(fs::read(&path).map_err(|e| {
        Error::io(
            format!(
                "cannot read the systemd credential {name} ({}); check the unit's LoadCredentialEncrypted={name}:... line",
                path.display()
            ),
            e,
        )
    })?);
    let key = if bytes.len() == 32 {
        MasterKey::from_bytes(&bytes)
    } else {
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(MasterKey::from_hex)
    };
    key.ok_or_else(|| {
        Error::Config(format!(
            "the systemd credential {name} is not a master key (expected 64 hex digits or 32 raw bytes); \
             make it with `openssl rand -hex 32 | systemd-creds encrypt --name={name} - /etc/credstore.encrypted/{name}`"
        ))
    })
}

/// The process's context for `module`: loaded and `C_Initialize`d once,
/// never finalized (a module stays loaded once used, and a second
/// `C_Initialize` of a module already loaded, as under `LD_PRELOAD`, fails).
fn context(module: &Path) -> Result<cryptoki::context::Pkcs11, Error> {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::error::RvError;
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut contexts = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(ctx) = contexts.get(module) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(module).map_err(|e| {
        Error::Config(format!(
            "cannot load the PKCS#11 module {} ({e}); check --pkcs11-module (SoftHSM2's is /usr/lib/softhsm/libsofthsm2.so)",
            module.display()
        ))
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(Error::Config(format!(
                "PKCS#11: cannot initialize the module {}: {e}",
                module.display()
            )))
        }
    }
    contexts.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// An open, logged-in session on the token that holds the wrapping key.
struct Token {
    session: cryptoki::session::Session,
    key: Option<cryptoki::object::ObjectHandle>,
    label: String,
    // Dropped after the session.
    _ctx: cryptoki::context::Pkcs11,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// [`PIN_ENV`], taken out of the environment at start.
static TAKEN_PIN: crate::state_dir::TakenEnv = crate::state_dir::TakenEnv::new(PIN_ENV);

/// Reads [`PIN_ENV`] once and removes it from the process environment (see
/// [`crate::state_dir::TakenEnv`]).
pub fn take_pin_from_environment() {
    TAKEN_PIN.take();
}

fn pin(pin_file: &Option<PathBuf>) -> Result<Zeroizing<String>, Error> {
    if let Some(p) = pin_file {
        return crate::state_dir::read_private_file(p, "PKCS#11 PIN", "--pkcs11-pin-file");
    }
    match TAKEN_PIN.get() {
        Some(v) => Ok(v),
        None => Err(Error::Config(format!(
            "the PKCS#11 token needs its user PIN: give --pkcs11-pin-file FILE or set {PIN_ENV}"
        ))),
    }
}

impl Token {
    fn open(source: &KeySource) -> Result<Token, Error> {
        use cryptoki::error::RvError;
        use cryptoki::object::{Attribute, ObjectClass};
        use cryptoki::session::UserType;
        let KeySource::Pkcs11 {
            module,
            token,
            key,
            pin_file,
        } = source
        else {
            return Err(Error::Config("not a PKCS#11 key source".into()));
        };
        let pin = pin(pin_file)?;
        let p11 = |what: &str| {
            let what = what.to_owned();
            move |e: cryptoki::error::Error| Error::Config(format!("PKCS#11: {what}: {e}"))
        };
        let ctx = context(module)?;
        let mut labels = Vec::new();
        let mut found = None;
        for slot in ctx
            .get_slots_with_token()
            .map_err(p11("cannot list the tokens"))?
        {
            let info = ctx
                .get_token_info(slot)
                .map_err(p11("cannot read a token's label"))?;
            let label = info.label().trim_end().to_owned();
            if label == *token {
                found = Some(slot);
                break;
            }
            labels.push(label);
        }
        let slot = found.ok_or_else(|| {
            Error::Config(format!(
                "no PKCS#11 token labelled {token:?} in {} (tokens there: {}); check --pkcs11-token",
                module.display(),
                if labels.is_empty() {
                    "none".to_owned()
                } else {
                    labels.join(", ")
                }
            ))
        })?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(p11("cannot open a session"))?;
        let auth = cryptoki::types::AuthPin::from(pin.as_str().to_owned());
        match session.login(UserType::User, Some(&auth)) {
            // Another session of this process is logged in already.
            Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(cryptoki::error::Error::Pkcs11(RvError::PinIncorrect, _)) => {
                return Err(Error::Config(format!(
                    "the PKCS#11 PIN is wrong for token {token:?}; check --pkcs11-pin-file or {PIN_ENV} \
                     (the token locks the PIN after a few wrong tries). Nothing was changed"
                )))
            }
            Err(cryptoki::error::Error::Pkcs11(RvError::PinLocked, _)) => {
                return Err(Error::Config(format!(
                    "the PKCS#11 token {token:?}'s user PIN is locked; unlock it with the security officer PIN (softhsm2-util / your HSM's tool)"
                )))
            }
            Err(e) => return Err(p11("cannot log in to the token")(e)),
        }
        let handles = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(key.as_bytes().to_vec()),
            ])
            .map_err(p11("cannot search the token"))?;
        let handle = match handles.as_slice() {
            [one] => Some(*one),
            [] => None,
            _ => {
                return Err(Error::Config(format!(
                    "{} secret keys are labelled {key:?} in token {token:?}; give the wrapping key a unique label",
                    handles.len()
                )))
            }
        };
        Ok(Token {
            session,
            key: handle,
            label: key.clone(),
            _ctx: ctx,
        })
    }

    fn require_key(&self) -> Result<cryptoki::object::ObjectHandle, Error> {
        let Some(key) = self.key else {
            return Err(Error::Config(
                "the master key's wrapping key is not in the PKCS#11 token (check --pkcs11-key and --pkcs11-token; \
                 `server init` creates it when missing, but only for a new state directory)"
                    .into(),
            ));
        };
        Ok(key)
    }

    /// Creates the token's AES-256 wrapping key (labelled as configured):
    /// sensitive, never extractable, kept in the token.
    fn create_key(&mut self) -> Result<(), Error> {
        let label = self.label.clone();
        use cryptoki::mechanism::Mechanism;
        use cryptoki::object::{Attribute, KeyType, ObjectClass};
        let handle = self
            .session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                ],
            )
            .map_err(|e| {
                Error::Config(format!(
                    "PKCS#11: cannot create the AES wrapping key {label:?} in the token: {e}"
                ))
            })?;
        self.key = Some(handle);
        Ok(())
    }

    /// `SFW1 || iv || AES-GCM(master key)` under the token's key.
    /// `create`: make the token's key first when it is missing.
    fn wrap(mut self, key: &MasterKey, create: bool) -> Result<Vec<u8>, Error> {
        use cryptoki::mechanism::aead::GcmParams;
        use cryptoki::mechanism::Mechanism;
        if self.key.is_none() && create {
            self.create_key()?;
        }
        let handle = self.require_key()?;
        let mut iv = [0u8; GCM_IV];
        SystemRandom::new()
            .fill(&mut iv)
            .map_err(|_| Error::Crypto("the system random generator failed"))?;
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, WRAP_AAD, 128.into())
            .map_err(|e| Error::Config(format!("PKCS#11: AES-GCM parameters: {e}")))?;
        let sealed = self
            .session
            .encrypt(&Mechanism::AesGcm(params), handle, key.raw())
            .map_err(|e| {
                Error::Config(format!(
                    "PKCS#11: the token cannot wrap the master key with AES-GCM ({e}); it must allow CKM_AES_GCM encryption with the key"
                ))
            })?;
        let mut out = Vec::with_capacity(WRAP_MAGIC.len() + GCM_IV + sealed.len());
        out.extend_from_slice(WRAP_MAGIC);
        out.extend_from_slice(&iv);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    fn unwrap(self, blob: &[u8]) -> Result<MasterKey, Error> {
        use cryptoki::mechanism::aead::GcmParams;
        use cryptoki::mechanism::Mechanism;
        let handle = self.require_key()?;
        let body = blob
            .strip_prefix(WRAP_MAGIC)
            .filter(|b| b.len() > GCM_IV)
            .ok_or_else(|| {
                Error::Config("the wrapped master key (master.key.wrapped) is damaged; restore it from backup".into())
            })?;
        let mut iv = [0u8; GCM_IV];
        iv.copy_from_slice(&body[..GCM_IV]);
        let params = GcmParams::new(&mut iv, WRAP_AAD, 128.into())
            .map_err(|e| Error::Config(format!("PKCS#11: AES-GCM parameters: {e}")))?;
        let plain = Zeroizing::new(
            self.session
                .decrypt(&Mechanism::AesGcm(params), handle, &body[GCM_IV..])
                .map_err(|e| {
                    Error::Config(format!(
                        "the PKCS#11 token's key cannot unwrap master.key.wrapped ({e}): it is not the key that wrapped it \
                         (check --pkcs11-key and --pkcs11-token) or the file is damaged. Nothing was changed"
                    ))
                })?,
        );
        MasterKey::from_bytes(&plain).ok_or_else(|| {
            Error::Config("the unwrapped master key has the wrong length; restore master.key.wrapped from backup".into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_picks_the_provider_the_flags_imply_and_run_keeps_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        assert_eq!(KeyOptions::default().for_init().unwrap(), KeySource::File);
        assert_eq!(
            KeySource::read(&dir).unwrap(),
            KeySource::File,
            "no descriptor"
        );
        let pkcs11 = KeyOptions {
            pkcs11_module: Some("/m.so".into()),
            pkcs11_token: Some("t".into()),
            pkcs11_key: Some("k".into()),
            ..Default::default()
        };
        let source = pkcs11.for_init().unwrap();
        assert_eq!(source.kind(), ProviderKind::Pkcs11);
        let err = KeyOptions {
            pkcs11_key: None,
            ..pkcs11.clone()
        }
        .for_init()
        .unwrap_err();
        assert!(err.to_string().contains("--pkcs11-key"), "{err}");
        source.write(&dir).unwrap();
        assert_eq!(KeySource::read(&dir).unwrap(), source);
        // A flag overrides one field; another provider is refused.
        let moved = KeyOptions {
            pkcs11_module: Some("/elsewhere.so".into()),
            ..Default::default()
        }
        .resolve(&dir)
        .unwrap();
        assert!(
            matches!(moved, KeySource::Pkcs11 { ref module, ref token, .. }
            if module == Path::new("/elsewhere.so") && token == "t")
        );
        let err = KeyOptions {
            provider: Some(ProviderKind::File),
            ..Default::default()
        }
        .resolve(&dir)
        .unwrap_err();
        assert!(err.to_string().contains("pkcs11 provider"), "{err}");
        let systemd = KeyOptions {
            credential: Some("c".into()),
            ..Default::default()
        };
        assert_eq!(
            systemd.for_init().unwrap(),
            KeySource::Systemd {
                credential: "c".into(),
                next_credential: None
            }
        );
        fs::write(dir.path.join(DESCRIPTOR), "{\"provider\":\"tape\"}").unwrap();
        assert!(KeySource::read(&dir)
            .unwrap_err()
            .to_string()
            .contains("restore it from backup"));
    }

    #[test]
    fn a_module_named_by_the_descriptor_must_be_one_only_root_can_change() {
        use std::os::unix::fs::PermissionsExt;
        let descriptor = Path::new("/state/master-key.json");
        let why = |p: &Path| {
            check_module_path(p, descriptor)
                .map(|()| String::new())
                .unwrap_or_else(|e| e.to_string())
        };
        // Root's own files pass (the tests run as root; /bin/sh stands in
        // for a module, this only checks where it lives).
        assert_eq!(why(Path::new("/bin/sh")), "");
        let err = why(Path::new("lib/softhsm2.so"));
        assert!(
            err.contains("not an absolute path") && err.contains("--pkcs11-module"),
            "{err}"
        );
        let tmp = tempfile::tempdir().unwrap();
        let module = tmp.path().join("evil.so");
        fs::write(&module, b"").unwrap();
        fs::set_permissions(&module, fs::Permissions::from_mode(0o666)).unwrap();
        let err = why(&module);
        assert!(err.contains("writable by group or others"), "{err}");
        fs::set_permissions(&module, fs::Permissions::from_mode(0o644)).unwrap();
        // /tmp above it is world-writable.
        let err = why(&module);
        assert!(
            err.contains("writable by group or others") && err.contains("master-key.json"),
            "{err}"
        );
        let err = why(Path::new("/nonexistent/x.so"));
        assert!(err.contains("cannot be checked"), "{err}");
        // Via the descriptor: refused; a flag still overrides.
        let dir = StateDir::new(tmp.path());
        KeySource::Pkcs11 {
            module: module.clone(),
            token: "t".into(),
            key: "k".into(),
            pin_file: None,
        }
        .write(&dir)
        .unwrap();
        let err = KeyOptions::default().resolve(&dir).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        KeyOptions {
            pkcs11_module: Some(module),
            ..Default::default()
        }
        .resolve(&dir)
        .unwrap();
    }

    #[test]
    fn a_credential_override_naming_another_than_the_descriptor_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        KeySource::Systemd {
            credential: "key-2".into(),
            next_credential: None,
        }
        .write(&dir)
        .unwrap();
        let with = |c: &str| KeyOptions {
            credential: Some(c.into()),
            ..Default::default()
        };
        let err = with("key-1").resolve(&dir).unwrap_err().to_string();
        assert!(
            err.contains("master-key.json")
                && err.contains("Drop the override")
                && err.contains("--master-key-credential"),
            "{err}"
        );
        assert!(with("key-2").resolve(&dir).is_ok());
    }

    #[test]
    fn a_pin_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("pin");
        fs::write(&p, "1234\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let err = pin(&Some(p.clone())).unwrap_err().to_string();
        assert!(
            err.contains("readable by others") && err.contains("chmod 600"),
            "{err}"
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(pin(&Some(p)).unwrap().as_str(), "1234");
    }

    #[test]
    fn the_pin_variable_is_taken_out_of_the_environment_and_still_used() {
        // No other test of this crate sets the variable.
        std::env::set_var(PIN_ENV, "4321");
        take_pin_from_environment();
        assert!(std::env::var_os(PIN_ENV).is_none());
        assert_eq!(pin(&None).unwrap().as_str(), "4321");
    }

    #[test]
    fn credential_names_cannot_leave_the_directory() {
        for bad in ["", "../x", "a/b", ".."] {
            let err = read_credential(bad).unwrap_err().to_string();
            assert!(err.contains("not a credential name"), "{bad}: {err}");
        }
    }
}
