//! Notices when the client certificate or key files change, so a renewed
//! certificate is used without a remount.
//!
//! Polled (every few seconds) rather than inotify-watched: renewal tools
//! replace files by rename, write them in place, or swap a symlinked
//! directory (Kubernetes secret volumes), and reading two small files is
//! cheap and catches all of these. The contents decide, not the mtime: a
//! copy that keeps the mtime still counts, a touch that changes nothing
//! does not.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::path::PathBuf;

use zeroize::Zeroizing;

/// Where the client's identity lives on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A new certificate and key, read from the files.
pub struct Renewed {
    pub cert_pem: Vec<u8>,
    pub key_pem: Zeroizing<Vec<u8>>,
}

pub struct CredentialWatch {
    files: CredentialFiles,
    /// Keyed hashes of what was last seen (never the key itself): the
    /// hasher's random keys make the digest useless to anyone reading memory.
    hasher: RandomState,
    seen: Option<(u64, u64)>,
    /// Log an unreadable file once, not every poll.
    unreadable: bool,
}

impl CredentialWatch {
    /// `cert_pem`/`key_pem`: what the mount is using now.
    pub fn new(files: CredentialFiles, cert_pem: &[u8], key_pem: &[u8]) -> CredentialWatch {
        let hasher = RandomState::new();
        let seen = Some((hasher.hash_one(cert_pem), hasher.hash_one(key_pem)));
        CredentialWatch {
            files,
            hasher,
            seen,
            unreadable: false,
        }
    }

    /// Reads both files; returns them when either differs from last time.
    pub fn poll(&mut self) -> Option<Renewed> {
        let read = std::fs::read(&self.files.cert)
            .and_then(|c| std::fs::read(&self.files.key).map(|k| (c, Zeroizing::new(k))));
        let (cert_pem, key_pem) = match read {
            Ok(pair) => pair,
            Err(e) => {
                if !self.unreadable {
                    tracing::warn!(
                        cert = %self.files.cert.display(),
                        key = %self.files.key.display(),
                        error = %e,
                        "cannot read the client certificate or key; keeping the one in use"
                    );
                    self.unreadable = true;
                }
                return None;
            }
        };
        self.unreadable = false;
        let now = (
            self.hasher.hash_one(&cert_pem),
            self.hasher.hash_one(&key_pem[..]),
        );
        if self.seen == Some(now) {
            return None;
        }
        self.seen = Some(now);
        Some(Renewed { cert_pem, key_pem })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_changes_once() {
        let dir = tempfile::tempdir().unwrap();
        let files = CredentialFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        std::fs::write(&files.cert, b"cert-1").unwrap();
        std::fs::write(&files.key, b"key-1").unwrap();
        let mut w = CredentialWatch::new(files.clone(), b"cert-1", b"key-1");
        assert!(w.poll().is_none(), "unchanged");
        std::fs::write(&files.key, b"key-2").unwrap();
        let r = w.poll().expect("key changed");
        assert_eq!(r.cert_pem, b"cert-1");
        assert_eq!(&r.key_pem[..], b"key-2");
        assert!(w.poll().is_none(), "reported once");
        std::fs::remove_file(&files.cert).unwrap();
        assert!(w.poll().is_none(), "a missing file keeps the old identity");
        std::fs::write(&files.cert, b"cert-2").unwrap();
        assert!(w.poll().is_some());
    }
}
