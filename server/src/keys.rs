//! The keys the server holds, all from the master key.
//!
//! - The master key itself wraps every data key (see [`envelope`]).
//! - A row key (HKDF-SHA256, label [`ROW_LABEL`]) MACs every row that
//!   decides access or what is served, so an edit of the database made
//!   without the master key is detected.
//! - An audit key (label [`AUDIT_LABEL`]) chains the audit log: each entry's
//!   MAC covers the entry and the previous entry's MAC.
//!
//! The server holds them in a [`KeyRing`]: one current [`KeySet`] and,
//! while a rekey runs, the previous one too. Everything written is signed
//! or wrapped under the current set; a MAC or a wrapped key is accepted
//! under either, so a rekey can move rows over one batch at a time and a
//! crash part-way leaves a store that still reads.
//!
//! ring does not wipe an HMAC key's state; like the master key's AES key
//! schedule (see [`envelope::MasterKey`]), each derived key is built once
//! and kept for the life of its set.
//!
//! [`envelope`]: crate::envelope
//! [`envelope::MasterKey`]: crate::envelope::MasterKey

use std::fmt;
use std::sync::{Arc, RwLock};

use ring::{hkdf, hmac};

use crate::envelope::{Binding, MasterKey, Plaintext, Sealed};
use crate::error::Error;

/// HKDF info for the row MAC key.
pub const ROW_LABEL: &[u8] = b"secretfs/v1 row mac";
/// HKDF info for the audit chain key.
pub const AUDIT_LABEL: &[u8] = b"secretfs/v1 audit chain";
/// HKDF info for the row set key: the digest over every protected row
/// (`store::integrity::row_set_h`), a key apart from the row MAC key.
pub const ROW_SET_LABEL: &[u8] = b"secretfs/v1 row set";
const HKDF_SALT: &[u8] = b"secretfs/v1 hkdf";

/// Length of every MAC this module makes (HMAC-SHA256).
pub const MAC_LEN: usize = 32;

/// An HMAC-SHA256 key derived from the master key for one purpose. A
/// clone copies the key's state: clone only to keep a retired audit key
/// in the next ring (see [`Keys::retired_audit`]).
#[derive(Clone)]
pub struct MacKey(hmac::Key);

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MacKey(..)")
    }
}

impl MacKey {
    fn derive(master: &MasterKey, label: &[u8]) -> MacKey {
        MacKey::from_bytes(&MacKey::derive_bytes(master, label)[..])
    }

    /// The derived key's bytes (every derived key is made from these; a
    /// retired audit key is kept as them, sealed).
    fn derive_bytes(master: &MasterKey, label: &[u8]) -> zeroize::Zeroizing<[u8; MAC_LEN]> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(master.raw());
        let info = [label];
        let mut out = zeroize::Zeroizing::new([0u8; MAC_LEN]);
        prk.expand(&info, hmac::HMAC_SHA256)
            .and_then(|okm| okm.fill(&mut out[..]))
            .expect("HKDF-SHA256 can make one SHA-256 block");
        out
    }

    /// A key from the bytes [`KeySet::audit_bytes`] gave (a retired
    /// epoch's audit key, loaded from the store).
    pub fn from_bytes(bytes: &[u8]) -> MacKey {
        MacKey(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    pub fn tag(&self, input: &MacInput) -> [u8; MAC_LEN] {
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(hmac::sign(&self.0, &input.buf).as_ref());
        out
    }

    /// Constant-time check of `tag` against `input`.
    pub fn verify(&self, input: &MacInput, tag: &[u8]) -> bool {
        hmac::verify(&self.0, &input.buf, tag).is_ok()
    }
}

/// The canonical encoding of what a MAC covers: a kind (which table or
/// record, so a tag of one kind never passes as another) and then each
/// field with its length, so no two field lists encode alike. Every backend
/// builds the same input from the same values.
#[derive(Clone, PartialEq, Eq)]
pub struct MacInput {
    buf: Vec<u8>,
}

impl fmt::Debug for MacInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacInput({} bytes)", self.buf.len())
    }
}

impl MacInput {
    pub fn new(kind: &str) -> MacInput {
        let mut input = MacInput {
            buf: Vec::with_capacity(64),
        };
        input.field(kind.as_bytes());
        input
    }

    fn field(&mut self, bytes: &[u8]) {
        self.buf
            .extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        self.buf.extend_from_slice(bytes);
    }

    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.field(v);
        self
    }
    pub fn str(self, v: &str) -> Self {
        self.bytes(v.as_bytes())
    }
    pub fn u64(self, v: u64) -> Self {
        self.bytes(&v.to_be_bytes())
    }
    pub fn i64(self, v: i64) -> Self {
        self.bytes(&v.to_be_bytes())
    }
    pub fn bool(self, v: bool) -> Self {
        self.bytes(&[u8::from(v)])
    }
    /// `None` and every `Some` encode differently.
    pub fn opt_i64(self, v: Option<i64>) -> Self {
        match v {
            Some(v) => self.bytes(&[&[1u8][..], &v.to_be_bytes()].concat()),
            None => self.bytes(&[0u8]),
        }
    }
    /// `None` and every `Some` (even `Some("")`) encode differently.
    pub fn opt_str(self, v: Option<&str>) -> Self {
        match v {
            Some(v) => self.bytes(&[&[1u8][..], v.as_bytes()].concat()),
            None => self.bytes(&[0u8]),
        }
    }
}

/// One master key and the keys derived from it. The epoch counts master
/// keys: 1 for the key `server init` made, one more for each rekey. Audit
/// entries record the epoch whose key chained them, so the chain stays
/// verifiable across a rekey (see [`Keys::retired_audit`]).
pub struct KeySet {
    epoch: u32,
    /// Built once per master key and shared (see [`KeySet::at_epoch`]):
    /// rings before and after a rekey starts or ends hold the same keys,
    /// never rebuilt copies left behind in freed memory.
    derived: Arc<Derived>,
}

struct Derived {
    master: MasterKey,
    rows: MacKey,
    audit: MacKey,
    row_set: MacKey,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeySet(..)")
    }
}

impl KeySet {
    pub fn new(epoch: u32, master: MasterKey) -> KeySet {
        KeySet {
            epoch,
            derived: Arc::new(Derived {
                rows: MacKey::derive(&master, ROW_LABEL),
                audit: MacKey::derive(&master, AUDIT_LABEL),
                row_set: MacKey::derive(&master, ROW_SET_LABEL),
                master,
            }),
        }
    }

    /// The same keys under `epoch` (shared, not rebuilt): a key loaded
    /// before the store says which epoch it is.
    pub fn at_epoch(&self, epoch: u32) -> KeySet {
        KeySet {
            epoch,
            derived: self.derived.clone(),
        }
    }
    /// The key of the digest over every protected row (replay detection).
    pub fn row_set(&self) -> &MacKey {
        &self.derived.row_set
    }
    pub fn epoch(&self) -> u32 {
        self.epoch
    }
    pub fn master(&self) -> &MasterKey {
        &self.derived.master
    }
    pub fn rows(&self) -> &MacKey {
        &self.derived.rows
    }
    pub fn audit(&self) -> &MacKey {
        &self.derived.audit
    }
    /// The audit key's bytes: kept, sealed under the next master key, when
    /// a rekey retires this set (see [`Keys::retired_audit`]).
    pub fn audit_bytes(&self) -> zeroize::Zeroizing<[u8; MAC_LEN]> {
        MacKey::derive_bytes(self.master(), AUDIT_LABEL)
    }
}

/// What the server signs and checks with: the current key set, the
/// previous one while a rekey moves rows over, and the audit keys of
/// epochs before those (kept sealed in the store under the current master
/// key, so old audit entries stay verifiable after their master key is
/// gone).
#[derive(Debug)]
pub struct Keys {
    pub current: Arc<KeySet>,
    pub previous: Option<Arc<KeySet>>,
    pub retired_audit: std::collections::BTreeMap<u32, MacKey>,
}

impl Keys {
    /// Keys of epoch 1 (a store `server init` made, never rekeyed).
    pub fn new(master: MasterKey) -> Keys {
        Keys::new_at(1, master)
    }

    /// Keys of `epoch`, no rekey in progress.
    pub fn new_at(epoch: u32, master: MasterKey) -> Keys {
        Keys::of(Arc::new(KeySet::new(epoch, master)), None)
    }

    /// Keys of sets already built (shared with the ring they replace), no
    /// retired audit keys.
    pub fn of(current: Arc<KeySet>, previous: Option<Arc<KeySet>>) -> Keys {
        Keys {
            current,
            previous,
            retired_audit: Default::default(),
        }
    }

    /// The audit key of `epoch`, if this server holds it.
    pub fn audit_for(&self, epoch: u32) -> Option<&MacKey> {
        self.sets()
            .find(|k| k.epoch == epoch)
            .map(|k| k.audit())
            .or_else(|| self.retired_audit.get(&epoch))
    }

    fn sets(&self) -> impl Iterator<Item = &KeySet> {
        std::iter::once(&*self.current).chain(self.previous.as_deref())
    }

    /// The key set of `epoch`, if this server holds it (the current or
    /// the previous one).
    pub fn set_for(&self, epoch: u32) -> Option<&KeySet> {
        self.sets().find(|k| k.epoch == epoch)
    }

    /// A row's MAC, under the current key.
    pub fn row_tag(&self, input: &MacInput) -> [u8; MAC_LEN] {
        self.current.rows().tag(input)
    }

    /// Whether a row's MAC is good under the current or the previous key.
    pub fn row_ok(&self, input: &MacInput, tag: &[u8]) -> bool {
        self.sets().any(|k| k.rows().verify(input, tag))
    }

    /// Opens a sealed version under the current or the previous master key.
    pub fn open(&self, binding: Binding<'_>, sealed: &Sealed) -> Result<Plaintext, Error> {
        match self.current.master().open(binding, sealed) {
            Err(e) => match &self.previous {
                Some(prev) => prev.master().open(binding, sealed).map_err(|_| e),
                None => Err(e),
            },
            ok => ok,
        }
    }
}

/// The binding of the master key check a database made or upgraded by
/// this version holds: a check under [`crate::envelope::KEY_CHECK`] (v1)
/// marks a database from before row MACs and the audit chain, the only
/// kind whose rows and entries are adopted (see [`key_check_state`]).
pub const KEY_CHECK_V2: Binding<'static> = Binding {
    secret_id: 0,
    name: "secretfs master key check v2",
    version: 2,
};
pub const KEY_CHECK_V2_PLAINTEXT: &[u8] =
    b"secretfs master key check v2: rows authenticated, audit chained";

/// What a database's master key check is under a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheckState {
    /// A check from before the upgrade (v1): the database's rows and audit
    /// entries were never authenticated; migrations 0004-0006 adopt them,
    /// once, and replace this check with a v2 one.
    PreUpgrade,
    /// The check of a database made or upgraded by this version (v2).
    Upgraded,
    /// The check does not open under the key (another key, or damaged).
    NoMatch,
}

/// A stored `wrapped key || ciphertext` blob (the master key check, a
/// retired audit key) as sealed parts; `None` when too short.
pub fn split_sealed(blob: &[u8]) -> Option<Sealed> {
    // The wrapped data key is a fixed 12 + 32 + 16 bytes.
    (blob.len() >= KEY_CHECK_WRAPPED).then(|| Sealed {
        wrapped_key: blob[..KEY_CHECK_WRAPPED].to_vec(),
        ciphertext: blob[KEY_CHECK_WRAPPED..].to_vec(),
    })
}

/// What `blob` (the database's master key check: the wrapped data key,
/// then the ciphertext) is under `master`. The one function every reader
/// of the key check goes through: a v1 check is good only for a database
/// whose schema predates the upgrade, a v2 check only for one after it.
pub fn key_check_state(master: &MasterKey, blob: &[u8]) -> KeyCheckState {
    use crate::envelope::{KEY_CHECK, KEY_CHECK_PLAINTEXT};
    let Some(sealed) = split_sealed(blob) else {
        return KeyCheckState::NoMatch;
    };
    if matches!(master.open(KEY_CHECK_V2, &sealed), Ok(p) if p.as_bytes() == KEY_CHECK_V2_PLAINTEXT)
    {
        KeyCheckState::Upgraded
    } else if matches!(master.open(KEY_CHECK, &sealed), Ok(p) if p.as_bytes() == KEY_CHECK_PLAINTEXT)
    {
        KeyCheckState::PreUpgrade
    } else {
        KeyCheckState::NoMatch
    }
}

/// [`key_check_state`] under any master key `keys` holds (the current one
/// first).
pub fn key_check_state_any(keys: &Keys, blob: &[u8]) -> KeyCheckState {
    let mut state = KeyCheckState::NoMatch;
    for set in keys.sets() {
        match key_check_state(set.master(), blob) {
            KeyCheckState::NoMatch => {}
            found => {
                state = found;
                break;
            }
        }
    }
    state
}

/// Whether `blob` is `master`'s key check as a database made or upgraded
/// by this version holds it (v2). A v1 check does not pass: it belongs
/// only in a database whose schema predates the upgrade.
pub fn key_check_opens(master: &MasterKey, blob: &[u8]) -> bool {
    key_check_state(master, blob) == KeyCheckState::Upgraded
}

/// The key check for `master` that `server init`, the upgrade and a rekey
/// write (v2).
pub fn seal_key_check(master: &MasterKey) -> Result<Vec<u8>, Error> {
    Ok(join_sealed(
        master.seal(KEY_CHECK_V2, KEY_CHECK_V2_PLAINTEXT)?,
    ))
}

/// The stored `wrapped key || ciphertext` blob of `sealed` (the inverse of
/// [`split_sealed`]).
pub fn join_sealed(sealed: Sealed) -> Vec<u8> {
    [sealed.wrapped_key, sealed.ciphertext].concat()
}

/// The key check a database from before the upgrade holds (v1): only for
/// tests and fixtures that make such a database.
pub fn pre_upgrade_key_check(master: &MasterKey) -> Result<Vec<u8>, Error> {
    use crate::envelope::{KEY_CHECK, KEY_CHECK_PLAINTEXT};
    Ok(join_sealed(master.seal(KEY_CHECK, KEY_CHECK_PLAINTEXT)?))
}

/// Length of the wrapped data key at the head of the key check.
pub const KEY_CHECK_WRAPPED: usize = 60;

/// The keys in use, replaced whole when a rekey starts or ends.
#[derive(Debug)]
pub struct KeyRing(RwLock<Arc<Keys>>);

impl KeyRing {
    pub fn new(master: MasterKey) -> Arc<KeyRing> {
        KeyRing::of(Keys::new(master))
    }

    /// A ring holding `keys`.
    pub fn of(keys: Keys) -> Arc<KeyRing> {
        Arc::new(KeyRing(RwLock::new(Arc::new(keys))))
    }

    /// A ring with a fresh random key (tests, benchmarks).
    pub fn generate() -> Result<Arc<KeyRing>, Error> {
        Ok(KeyRing::new(MasterKey::generate()?))
    }

    /// The keys as they are now; hold the `Arc` for one operation, so a
    /// replacement mid-way cannot mix two sets in one write.
    pub fn get(&self) -> Arc<Keys> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, keys: Keys) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_differ_by_purpose_and_master() {
        let a = Keys::new(MasterKey::generate().unwrap());
        let b = Keys::new(MasterKey::generate().unwrap());
        let input = MacInput::new("clients").u64(1).str("app").bool(false);
        let tag = a.row_tag(&input);
        assert!(a.row_ok(&input, &tag));
        assert!(!b.row_ok(&input, &tag), "another master key");
        assert_ne!(a.current.audit().tag(&input), tag, "another purpose");
        let mut bad = tag;
        bad[0] ^= 1;
        assert!(!a.row_ok(&input, &bad));
        assert!(!a.row_ok(&input, &tag[..16]), "a truncated tag");
    }

    #[test]
    fn encoding_is_unambiguous() {
        let t = |i: MacInput| Keys::new(MasterKey::from_hex(&"11".repeat(32)).unwrap()).row_tag(&i);
        assert_ne!(
            t(MacInput::new("k").str("ab").str("c")),
            t(MacInput::new("k").str("a").str("bc"))
        );
        assert_ne!(
            t(MacInput::new("k").opt_i64(None)),
            t(MacInput::new("k").opt_i64(Some(0)))
        );
        assert_ne!(t(MacInput::new("a").u64(1)), t(MacInput::new("b").u64(1)));
    }

    #[test]
    fn previous_keys_are_accepted_during_a_rekey() {
        let old = MasterKey::from_hex(&"22".repeat(32)).unwrap();
        let before = Keys::new(MasterKey::from_hex(&"22".repeat(32)).unwrap());
        let input = MacInput::new("grant").u64(3).u64(4);
        let old_tag = before.row_tag(&input);
        let sealed = before
            .current
            .master()
            .seal(crate::envelope::KEY_CHECK, b"x")
            .unwrap();
        let during = Keys::of(
            Arc::new(KeySet::new(2, MasterKey::generate().unwrap())),
            Some(Arc::new(KeySet::new(1, old))),
        );
        assert!(during.audit_for(1).is_some() && during.audit_for(2).is_some());
        assert!(during.audit_for(3).is_none());
        assert!(during.row_ok(&input, &old_tag));
        assert_ne!(
            during.row_tag(&input),
            old_tag,
            "new writes use the new key"
        );
        assert_eq!(
            during
                .open(crate::envelope::KEY_CHECK, &sealed)
                .unwrap()
                .as_bytes(),
            b"x"
        );
        let after = Keys::new(MasterKey::generate().unwrap());
        assert!(!after.row_ok(&input, &old_tag));
        // A retired audit key kept as bytes verifies what the live one made.
        let old_set = KeySet::new(1, MasterKey::from_hex(&"22".repeat(32)).unwrap());
        let kept = MacKey::from_bytes(&old_set.audit_bytes()[..]);
        let tag = old_set.audit().tag(&input);
        assert!(kept.verify(&input, &tag));
    }

    #[test]
    fn key_check_versions_are_told_apart() {
        let k = MasterKey::generate().unwrap();
        let other = MasterKey::generate().unwrap();
        let v1 = pre_upgrade_key_check(&k).unwrap();
        let v2 = seal_key_check(&k).unwrap();
        assert_eq!(key_check_state(&k, &v1), KeyCheckState::PreUpgrade);
        assert_eq!(key_check_state(&k, &v2), KeyCheckState::Upgraded);
        assert_eq!(key_check_state(&other, &v2), KeyCheckState::NoMatch);
        assert_eq!(key_check_state(&k, &v2[..10]), KeyCheckState::NoMatch);
        assert!(key_check_opens(&k, &v2) && !key_check_opens(&k, &v1));
    }
}
