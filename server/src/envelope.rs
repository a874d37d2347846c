//! Envelope encryption of secret content.
//!
//! Each secret version gets its own random 256-bit data key. The content is
//! sealed with AES-256-GCM under that key, and the data key is sealed
//! (wrapped) under the master key. Both seals carry the same associated data,
//! binding the ciphertext to the secret's id, name and version: a row copied
//! to another secret or version, or edited, fails to open.
//!
//! ring does not wipe its expanded key schedule; we keep raw key bytes in
//! `Zeroizing`. A data key's schedule is built only for the one call that
//! seals or opens with it, so it lives on the stack briefly (documented
//! limitation); the master key's is built once and kept (see [`MasterKey`]).

use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

use crate::error::Error;

const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
const CONTEXT_TAG: &[u8] = b"secretfs/v1\0";
const WRAP_TAG: &[u8] = b"secretfs/v1 data-key\0";

/// Secret bytes: wiped on drop, never printed.
pub struct Plaintext(Zeroizing<Vec<u8>>);

impl Plaintext {
    pub fn new(bytes: Vec<u8>) -> Self {
        Plaintext(Zeroizing::new(bytes))
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Hands the bytes to a caller that takes over wiping them (e.g. a
    /// protobuf message that is zeroized after encoding).
    pub fn into_vec(mut self) -> Vec<u8> {
        std::mem::take(&mut *self.0)
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Plaintext({} bytes)", self.0.len())
    }
}

/// The 256-bit master key that wraps every data key.
///
/// Its AES key schedule is built once and kept: ring does not wipe a key
/// schedule when it is dropped, and each schedule holds the key's bytes,
/// so building one per call left a copy of the master key in freed memory
/// after every read.
pub struct MasterKey {
    raw: Zeroizing<[u8; KEY_LEN]>,
    aead: LessSafeKey,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// What a stored version holds: both sealed blobs, each `nonce || ct || tag`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// What the associated data binds a ciphertext to.
#[derive(Clone, Copy, Debug)]
pub struct Binding<'a> {
    pub secret_id: u64,
    pub name: &'a str,
    pub version: u64,
}

impl Binding<'_> {
    fn aad(&self, prefix: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(prefix.len() + 16 + self.name.len());
        aad.extend_from_slice(prefix);
        aad.extend_from_slice(&self.secret_id.to_be_bytes());
        aad.extend_from_slice(&self.version.to_be_bytes());
        // Last, so the fixed-width fields before it keep the encoding unambiguous.
        aad.extend_from_slice(self.name.as_bytes());
        aad
    }
}

fn aead_key(key: &[u8]) -> Result<LessSafeKey, Error> {
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key).map_err(|_| Error::Crypto("bad AES-256 key length"))?,
    ))
}

impl MasterKey {
    fn new(raw: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let aead = aead_key(&raw[..]).expect("32 bytes are an AES-256 key");
        MasterKey { raw, aead }
    }

    /// The key's bytes, for deriving the keys of [`crate::keys`] only.
    pub(crate) fn raw(&self) -> &[u8] {
        &self.raw[..]
    }

    pub fn generate() -> Result<Self, Error> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new()
            .fill(&mut key[..])
            .map_err(|_| Error::Crypto("the system random generator failed"))?;
        Ok(MasterKey::new(key))
    }

    /// The key file's text: 64 hex digits and a newline.
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut digits = Zeroizing::new([0u8; 2 * KEY_LEN]);
        hex::encode_to_slice(&self.raw[..], &mut digits[..]).expect("the buffer fits the key");
        let mut s = Zeroizing::new(String::with_capacity(2 * KEY_LEN + 1));
        s.push_str(std::str::from_utf8(&digits[..]).unwrap_or_default());
        s.push('\n');
        s
    }

    /// A key from exactly 32 raw bytes (a systemd credential, a key the
    /// HSM unwrapped).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let mut raw = Zeroizing::new([0u8; KEY_LEN]);
        if bytes.len() != KEY_LEN {
            return None;
        }
        raw.copy_from_slice(bytes);
        Some(MasterKey::new(raw))
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(text.trim(), &mut bytes[..]).ok()?;
        Some(MasterKey::new(bytes))
    }

    /// Seals `plaintext` for one secret version under a fresh data key.
    pub fn seal(&self, binding: Binding<'_>, plaintext: &[u8]) -> Result<Sealed, Error> {
        let rng = SystemRandom::new();
        let mut data_key = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill(&mut data_key[..])
            .map_err(|_| Error::Crypto("the system random generator failed"))?;
        let ciphertext = seal_with(
            &rng,
            &aead_key(&data_key[..])?,
            &binding.aad(CONTEXT_TAG),
            plaintext,
        )?;
        let wrapped_key = seal_with(&rng, &self.aead, &binding.aad(WRAP_TAG), &data_key[..])?;
        Ok(Sealed {
            wrapped_key,
            ciphertext,
        })
    }

    /// Opens a sealed version; any mismatch (key, binding, altered bytes)
    /// is `Error::Integrity` and never yields bytes.
    pub fn open(&self, binding: Binding<'_>, sealed: &Sealed) -> Result<Plaintext, Error> {
        let integrity = || Error::Integrity {
            name: binding.name.to_owned(),
            version: binding.version,
        };
        let data_key = open_with(&self.aead, &binding.aad(WRAP_TAG), &sealed.wrapped_key)
            .ok_or_else(integrity)?;
        // A wrapped key of the wrong length fails here.
        let data_key = aead_key(&data_key).map_err(|_| integrity())?;
        let plain = open_with(&data_key, &binding.aad(CONTEXT_TAG), &sealed.ciphertext)
            .ok_or_else(integrity)?;
        Ok(Plaintext(plain))
    }
}

impl MasterKey {
    /// Whether a version's wrapped data key opens under this key.
    pub fn opens_wrapped(&self, binding: Binding<'_>, wrapped_key: &[u8]) -> bool {
        open_with(&self.aead, &binding.aad(WRAP_TAG), wrapped_key).is_some()
    }

    /// Moves a version's wrapped data key from `from` to this key (a
    /// rekey): the content is not touched. `Ok(None)`: already wrapped
    /// under this key. A key neither opens is `Error::Integrity`.
    pub fn rewrap(
        &self,
        from: &MasterKey,
        binding: Binding<'_>,
        wrapped_key: &[u8],
    ) -> Result<Option<Vec<u8>>, Error> {
        let aad = binding.aad(WRAP_TAG);
        if open_with(&self.aead, &aad, wrapped_key).is_some() {
            return Ok(None);
        }
        let data_key =
            open_with(&from.aead, &aad, wrapped_key).ok_or_else(|| Error::Integrity {
                name: binding.name.to_owned(),
                version: binding.version,
            })?;
        seal_with(&SystemRandom::new(), &self.aead, &aad, &data_key).map(Some)
    }
}

fn seal_with(
    rng: &SystemRandom,
    key: &LessSafeKey,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce)
        .map_err(|_| Error::Crypto("the system random generator failed"))?;
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_LEN..],
        )
        .map_err(|_| Error::Crypto("AES-GCM sealing failed"))?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

fn open_with(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let nonce = Nonce::try_assume_unique_for_key(&sealed[..NONCE_LEN]).ok()?;
    let mut buf = Zeroizing::new(sealed[NONCE_LEN..].to_vec());
    let len = match key.open_in_place(nonce, Aad::from(aad), &mut buf) {
        Ok(plain) => plain.len(),
        Err(_) => {
            buf.zeroize();
            return None;
        }
    };
    buf.truncate(len);
    Some(buf)
}

/// The binding used for the key-check blob stored at init: proves at start
/// that the master key on disk is the one the database was made with.
pub const KEY_CHECK: Binding<'static> = Binding {
    secret_id: 0,
    name: "secretfs master key check",
    version: 0,
};
pub const KEY_CHECK_PLAINTEXT: &[u8] = b"secretfs master key check v1";

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, id: u64, version: u64) -> Binding<'_> {
        Binding {
            secret_id: id,
            name,
            version,
        }
    }

    #[test]
    fn round_trip() {
        let k = MasterKey::generate().unwrap();
        let sealed = k.seal(b("db/pw", 7, 1), b"hunter2").unwrap();
        assert!(!sealed.ciphertext.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(
            k.open(b("db/pw", 7, 1), &sealed).unwrap().as_bytes(),
            b"hunter2"
        );
        let empty = k.seal(b("e", 1, 1), b"").unwrap();
        assert!(k.open(b("e", 1, 1), &empty).unwrap().is_empty());
    }

    #[test]
    fn each_seal_uses_a_fresh_key_and_nonce() {
        let k = MasterKey::generate().unwrap();
        let a = k.seal(b("x", 1, 1), b"same").unwrap();
        let c = k.seal(b("x", 1, 1), b"same").unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn wrong_master_key_fails() {
        let k = MasterKey::generate().unwrap();
        let other = MasterKey::generate().unwrap();
        let sealed = k.seal(b("x", 1, 1), b"v").unwrap();
        assert!(matches!(
            other.open(b("x", 1, 1), &sealed),
            Err(Error::Integrity { .. })
        ));
    }

    #[test]
    fn tampered_ciphertext_or_key_fails() {
        let k = MasterKey::generate().unwrap();
        let sealed = k.seal(b("x", 1, 1), b"value").unwrap();
        for i in 0..sealed.ciphertext.len() {
            let mut t = sealed.clone();
            t.ciphertext[i] ^= 1;
            assert!(k.open(b("x", 1, 1), &t).is_err(), "byte {i}");
        }
        for i in 0..sealed.wrapped_key.len() {
            let mut t = sealed.clone();
            t.wrapped_key[i] ^= 0x80;
            assert!(k.open(b("x", 1, 1), &t).is_err(), "byte {i}");
        }
        let mut short = sealed.clone();
        short.ciphertext.truncate(5);
        assert!(k.open(b("x", 1, 1), &short).is_err());
    }

    #[test]
    fn swapped_binding_fails() {
        let k = MasterKey::generate().unwrap();
        let sealed = k.seal(b("a", 1, 2), b"v").unwrap();
        assert!(k.open(b("b", 1, 2), &sealed).is_err(), "other name");
        assert!(k.open(b("a", 2, 2), &sealed).is_err(), "other id");
        assert!(k.open(b("a", 1, 1), &sealed).is_err(), "other version");
        // Swapping the data key of one version into another is caught too.
        let other = k.seal(b("a", 1, 3), b"w").unwrap();
        let mixed = Sealed {
            wrapped_key: other.wrapped_key,
            ciphertext: sealed.ciphertext,
        };
        assert!(k.open(b("a", 1, 2), &mixed).is_err());
    }

    #[test]
    fn rewrap_moves_the_data_key_and_keeps_the_content() {
        let old = MasterKey::generate().unwrap();
        let new = MasterKey::generate().unwrap();
        let sealed = old.seal(b("x", 1, 2), b"value").unwrap();
        let moved = new
            .rewrap(&old, b("x", 1, 2), &sealed.wrapped_key)
            .unwrap()
            .unwrap();
        let after = Sealed {
            wrapped_key: moved.clone(),
            ciphertext: sealed.ciphertext.clone(),
        };
        assert_eq!(new.open(b("x", 1, 2), &after).unwrap().as_bytes(), b"value");
        assert!(old.open(b("x", 1, 2), &after).is_err());
        assert_eq!(new.rewrap(&old, b("x", 1, 2), &moved).unwrap(), None);
        assert!(new.rewrap(&old, b("x", 1, 3), &sealed.wrapped_key).is_err());
    }

    #[test]
    fn hex_round_trip_and_debug_hides_key() {
        let k = MasterKey::generate().unwrap();
        let text = k.to_hex();
        assert_eq!(text.len(), 65);
        let k2 = MasterKey::from_hex(&text).unwrap();
        let sealed = k.seal(KEY_CHECK, KEY_CHECK_PLAINTEXT).unwrap();
        assert!(k2.open(KEY_CHECK, &sealed).is_ok());
        assert!(MasterKey::from_hex("zz").is_none());
        assert!(MasterKey::from_hex(&"ab".repeat(31)).is_none());
        assert_eq!(format!("{k:?}"), "MasterKey(..)");
        assert_eq!(
            format!("{:?}", Plaintext::new(b"abc".to_vec())),
            "Plaintext(3 bytes)"
        );
    }
}
