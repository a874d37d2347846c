//! Notices when the client certificate or key files change, so a renewed
//! certificate is used without a remount.
//!
//! Polled (every few seconds) rather than inotify-watched: renewal tools
//! replace files by rename, write them in place, or swap a symlinked
//! directory (Kubernetes secret volumes), and reading two small files is
//! cheap and catches all of these. The contents decide, not the mtime: a
//! copy that keeps the mtime still counts, a touch that changes nothing
//! does not.
//!
//! A pair is used only when the key belongs to the certificate: a renewal
//! (ours or another tool's) replaces two files in two steps, and a poll in
//! between sees half of it. That pair is left alone until the next poll.

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
    /// Log a mismatched pair once it has outlasted one poll.
    mismatched: u32,
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
            mismatched: 0,
        }
    }

    /// The files now hold what the mount itself wrote (a renewal): not a
    /// change to react to.
    pub fn written(&mut self, cert_pem: &[u8], key_pem: &[u8]) {
        self.seen = Some((
            self.hasher.hash_one(cert_pem),
            self.hasher.hash_one(key_pem),
        ));
    }

    /// Where the pair lives.
    pub fn files(&self) -> &CredentialFiles {
        &self.files
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
        let pair = crate::certificate::CertInfo::parse(&cert_pem)
            .and_then(|info| info.check_key(&key_pem));
        if let Err(e) = pair {
            // Half of a replacement, most likely: look again next time.
            self.mismatched += 1;
            if self.mismatched == 2 {
                tracing::warn!(
                    cert = %self.files.cert.display(),
                    key = %self.files.key.display(),
                    error = %e,
                    "the client certificate or key files changed but cannot be used together;                      keeping the pair in use"
                );
            }
            return None;
        }
        self.mismatched = 0;
        self.seen = Some(now);
        Some(Renewed { cert_pem, key_pem })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::certificate::tests::cert_and_key;

    #[test]
    fn reports_changes_once_and_only_whole_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let files = CredentialFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        let (cert1, key1) = cert_and_key(30);
        let (cert2, key2) = cert_and_key(30);
        std::fs::write(&files.cert, &cert1).unwrap();
        std::fs::write(&files.key, &key1).unwrap();
        let mut w = CredentialWatch::new(files.clone(), cert1.as_bytes(), key1.as_bytes());
        assert!(w.poll().is_none(), "unchanged");
        std::fs::write(&files.key, &key2).unwrap();
        assert!(w.poll().is_none(), "half a replacement is not used");
        std::fs::write(&files.cert, &cert2).unwrap();
        let r = w.poll().expect("both changed");
        assert_eq!(r.cert_pem, cert2.as_bytes());
        assert_eq!(&r.key_pem[..], key2.as_bytes());
        assert!(w.poll().is_none(), "reported once");
        std::fs::remove_file(&files.cert).unwrap();
        assert!(w.poll().is_none(), "a missing file keeps the old identity");
        std::fs::write(&files.cert, &cert2).unwrap();
        assert!(w.poll().is_none(), "back as it was");

        // What the mount wrote itself is not news.
        std::fs::write(&files.cert, &cert1).unwrap();
        std::fs::write(&files.key, &key1).unwrap();
        w.written(cert1.as_bytes(), key1.as_bytes());
        assert!(w.poll().is_none());
    }
}
