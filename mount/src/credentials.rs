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
//! A pair is used only when it passes the check the mount ran on its files
//! at start ([`secretfs_proto::credentials::check_client_files`]): the key
//! belongs to the certificate (any key format: PKCS#8, SEC1, PKCS#1), the
//! certificate is valid now and is a client's. A renewal (ours or another
//! tool's) replaces two files in two steps, and a poll in between sees half
//! of it: that pair is left alone until the next poll, and one warning says
//! why once it has outlasted a poll; a pair that failed is not checked
//! again while the files hold it, and each new failing pair gets its own
//! warning. The pair in use is kept meanwhile.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::time::SystemTime;

use secretfs_proto::cert::CertInfo;
use secretfs_proto::credentials::{check_client_files, ClientFiles, FileContents};

use zeroize::Zeroizing;

/// Where the client's identity lives on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA file (`--ca`), named in messages; its contents are those the
    /// mount connects with.
    pub ca: PathBuf,
}

/// A checked certificate and key, and what the certificate says: read from
/// the files ([`CredentialWatch::poll`]) or renewed
/// ([`crate::sync`]'s renewal). Parsed once, where it is checked.
pub struct Pair {
    pub cert_pem: Vec<u8>,
    pub key_pem: Zeroizing<Vec<u8>>,
    pub info: CertInfo,
}

/// The keyed hashes of a certificate and key.
type Hashes = (u64, u64);

pub struct CredentialWatch {
    files: CredentialFiles,
    /// The CA the mount connects with, for the check of a new pair.
    ca_pem: Vec<u8>,
    /// Keyed hashes of what was last seen (never the key itself): the
    /// hasher's random keys make the digest useless to anyone reading memory.
    hasher: RandomState,
    seen: Option<Hashes>,
    /// Log an unreadable file once, not every poll.
    unreadable: bool,
    /// The last pair that failed the check: not checked again while the
    /// files hold it.
    rejected: Option<Rejected>,
}

/// A pair that failed the check, by its keyed hashes.
struct Rejected {
    seen: Hashes,
    /// Why, for the warning.
    error: String,
    /// Warned once it outlasted one poll (before that it is most likely
    /// half of a replacement).
    warned: bool,
}

impl CredentialWatch {
    /// `cert_pem`/`key_pem`: what the mount is using now.
    pub fn new(
        files: CredentialFiles,
        ca_pem: Vec<u8>,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> CredentialWatch {
        let hasher = RandomState::new();
        let seen = Some((hasher.hash_one(cert_pem), hasher.hash_one(key_pem)));
        CredentialWatch {
            files,
            ca_pem,
            hasher,
            seen,
            unreadable: false,
            rejected: None,
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

    /// Whether the files still hold what the watch last saw (or what the
    /// mount last wrote). A renewal asks this right before it replaces
    /// them: an operator's pair written since must not be overwritten (the
    /// next poll takes it up instead).
    pub fn unchanged_on_disk(&self) -> bool {
        match self.read_hashed() {
            Ok((_, _, now)) => self.seen == Some(now),
            Err(_) => false,
        }
    }

    /// Reads both files, with their keyed hashes.
    fn read_hashed(&self) -> std::io::Result<(Vec<u8>, Zeroizing<Vec<u8>>, Hashes)> {
        let cert_pem = std::fs::read(&self.files.cert)?;
        let key_pem = Zeroizing::new(std::fs::read(&self.files.key)?);
        let hashes = (
            self.hasher.hash_one(&cert_pem),
            self.hasher.hash_one(&key_pem[..]),
        );
        Ok((cert_pem, key_pem, hashes))
    }

    /// Where the pair lives.
    pub fn files(&self) -> &CredentialFiles {
        &self.files
    }

    /// Reads both files; returns them when either differs from last time.
    pub fn poll(&mut self) -> Option<Pair> {
        let (cert_pem, key_pem, now) = match self.read_hashed() {
            Ok(read) => read,
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
        if self.seen == Some(now) {
            return None;
        }
        if let Some(r) = self.rejected.as_mut().filter(|r| r.seen == now) {
            if !r.warned {
                r.warned = true;
                tracing::warn!(
                    error = %r.error,
                    "the client certificate or key files changed but cannot be used; \
                     keeping the pair in use until they can"
                );
            }
            return None;
        }
        let pair = ClientFiles {
            ca: FileContents {
                path: &self.files.ca,
                pem: &self.ca_pem,
            },
            cert: FileContents {
                path: &self.files.cert,
                pem: &cert_pem,
            },
            key: FileContents {
                path: &self.files.key,
                pem: &key_pem,
            },
        };
        let checked = check_client_files(&pair, SystemTime::now())
            .map_err(|e| e.explain())
            .and_then(|_| CertInfo::parse(&cert_pem).map_err(|e| e.to_string()));
        let info = match checked {
            Ok(info) => info,
            Err(error) => {
                // Half of a replacement, most likely: warned about if the
                // next poll still finds it.
                self.rejected = Some(Rejected {
                    seen: now,
                    error,
                    warned: false,
                });
                return None;
            }
        };
        self.rejected = None;
        self.seen = Some(now);
        Some(Pair {
            cert_pem,
            key_pem,
            info,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::renewal::tests::cert_and_key;

    /// A client certificate and its key made by the openssl CLI, as
    /// cert-manager or an operator's script would: `kind` "ec" writes a
    /// SEC1 key (`EC PRIVATE KEY`), "rsa" a PKCS#1 one (`RSA PRIVATE KEY`).
    pub(crate) fn openssl_pair(
        dir: &std::path::Path,
        kind: &str,
        usage: &str,
    ) -> (Vec<u8>, Vec<u8>) {
        let key = dir.join(format!("{kind}.key"));
        let cert = dir.join(format!("{kind}.pem"));
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key_s = key.to_str().unwrap();
        match kind {
            "ec" => run(&[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                key_s,
            ]),
            _ => run(&["genrsa", "-traditional", "-out", key_s, "2048"]),
        }
        run(&[
            "req",
            "-x509",
            "-new",
            "-key",
            key_s,
            "-out",
            cert.to_str().unwrap(),
            "-days",
            "30",
            "-subj",
            "/CN=web-1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            &format!("extendedKeyUsage={usage}"),
        ]);
        (std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())
    }

    fn watch_for(files: &CredentialFiles, cert: &[u8], key: &[u8]) -> CredentialWatch {
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        let (ca, _) = cert_and_key(30);
        CredentialWatch::new(files.clone(), ca.into_bytes(), cert, key)
    }

    #[test]
    fn sec1_and_pkcs1_keys_are_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let files = CredentialFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
            ca: dir.path().join("ca.pem"),
        };
        let (cert1, key1) = cert_and_key(30);
        for kind in ["ec", "rsa"] {
            let mut w = watch_for(&files, cert1.as_bytes(), key1.as_bytes());
            let (cert, key) = openssl_pair(dir.path(), kind, "clientAuth");
            let label = if kind == "ec" {
                "EC PRIVATE KEY"
            } else {
                "RSA PRIVATE KEY"
            };
            assert!(String::from_utf8_lossy(&key).contains(label));
            std::fs::write(&files.cert, &cert).unwrap();
            std::fs::write(&files.key, &key).unwrap();
            let r = w.poll().unwrap_or_else(|| panic!("a {label} pair is used"));
            assert_eq!(r.cert_pem, cert);
        }
    }

    #[test]
    fn a_server_pair_is_not_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let files = CredentialFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
            ca: dir.path().join("ca.pem"),
        };
        let (cert1, key1) = cert_and_key(30);
        let mut w = watch_for(&files, cert1.as_bytes(), key1.as_bytes());
        // A server's certificate: a matching pair, but not for a client.
        let (cert2, key2) = openssl_pair(dir.path(), "ec", "serverAuth");
        std::fs::write(&files.cert, &cert2).unwrap();
        std::fs::write(&files.key, &key2).unwrap();
        assert!(w.poll().is_none(), "not a client certificate");
        assert!(w.poll().is_none(), "still not");
    }

    #[test]
    fn a_rejected_pair_is_checked_once_and_each_new_one_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let files = CredentialFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
            ca: dir.path().join("ca.pem"),
        };
        let (cert1, key1) = cert_and_key(30);
        let mut w = watch_for(&files, cert1.as_bytes(), key1.as_bytes());
        let warned = |w: &CredentialWatch| w.rejected.as_ref().map(|r| r.warned);
        let (cert2, _) = cert_and_key(30);
        std::fs::write(&files.cert, &cert2).unwrap();
        assert!(w.poll().is_none(), "key of another certificate");
        assert_eq!(warned(&w), Some(false), "half a replacement: not yet");
        // Made unreadable to any check: the same pair is not checked again.
        let rejected = w.rejected.as_mut().unwrap();
        rejected.error = "remembered".into();
        assert!(w.poll().is_none());
        assert_eq!(warned(&w), Some(true), "outlasted a poll: warned");
        assert_eq!(w.rejected.as_ref().unwrap().error, "remembered");
        assert!(w.poll().is_none());

        // A different bad pair later: checked and warned about in turn.
        let (cert3, _) = cert_and_key(20);
        std::fs::write(&files.cert, &cert3).unwrap();
        assert!(w.poll().is_none());
        assert_eq!(warned(&w), Some(false), "a new pair, a new warning to come");
        assert_ne!(w.rejected.as_ref().unwrap().error, "remembered");
        assert!(w.poll().is_none());
        assert_eq!(warned(&w), Some(true));

        // A good pair clears it.
        std::fs::write(&files.cert, &cert1).unwrap();
        std::fs::write(&files.key, &key1).unwrap();
        w.written(b"", b"");
        assert!(w.poll().is_some());
        assert_eq!(warned(&w), None);
    }

    #[test]
    fn reports_changes_once_and_only_whole_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let files = CredentialFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
            ca: dir.path().join("ca.pem"),
        };
        let (cert1, key1) = openssl_pair(dir.path(), "ec", "clientAuth");
        let (cert2, key2) = openssl_pair(dir.path(), "rsa", "clientAuth");
        let mut w = watch_for(&files, &cert1, &key1);
        assert!(w.poll().is_none(), "unchanged");
        std::fs::write(&files.key, &key2).unwrap();
        assert!(w.poll().is_none(), "half a replacement is not used");
        std::fs::write(&files.cert, &cert2).unwrap();
        let r = w.poll().expect("both changed");
        assert_eq!(r.cert_pem, cert2);
        assert_eq!(&r.key_pem[..], &key2[..]);
        assert!(w.poll().is_none(), "reported once");
        std::fs::remove_file(&files.cert).unwrap();
        assert!(w.poll().is_none(), "a missing file keeps the old identity");
        std::fs::write(&files.cert, &cert2).unwrap();
        assert!(w.poll().is_none(), "back as it was");

        // An operator's write since the last poll is noticed before a
        // renewal would overwrite it.
        assert!(w.unchanged_on_disk());
        std::fs::write(&files.key, &key1).unwrap();
        assert!(!w.unchanged_on_disk());
        std::fs::write(&files.key, &key2).unwrap();
        assert!(w.unchanged_on_disk());

        // What the mount wrote itself is not news.
        std::fs::write(&files.cert, &cert1).unwrap();
        std::fs::write(&files.key, &key1).unwrap();
        w.written(&cert1, &key1);
        assert!(w.poll().is_none());
    }
}
