//! The server's own certificate, picked up again when its files change, so
//! `secretfs server reissue-cert` takes effect without a restart.
//!
//! At most once a second, a handshake looks at the identity of
//! `server.pem` and `server.key` (device, inode, size, mtime); when either
//! changed, both are read and checked to fit together before they replace
//! the pair in use. `reissue-cert` replaces each file by rename, key first,
//! so a handshake may see the new key beside the old certificate: that pair
//! does not fit, is ignored, and the next look (after the certificate's
//! rename) finds the whole new pair. A pair that never fits is logged once
//! and the old one keeps serving.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

use crate::error::Error;

/// How often a handshake may look at the files.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What identifies a file's content without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

fn file_id(path: &Path) -> Option<FileId> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileId {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
    })
}

struct Current {
    key: Arc<CertifiedKey>,
    /// The files' identities when last read (whether or not they fitted).
    seen: (Option<FileId>, Option<FileId>),
    checked: Instant,
    not_after: i64,
}

pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<Current>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReloadingCert({})", self.cert_path.display())
    }
}

/// Reads the pair and checks that the key fits the certificate.
fn load(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, i64), Error> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| Error::io(format!("cannot read {}", p.display()), e))
    };
    let cert_pem = read(cert_path)?;
    let key_pem = zeroize::Zeroizing::new(read(key_path)?);
    let certs = crate::tls::read_certs(
        &cert_pem,
        &format!("the server certificate {}", cert_path.display()),
    )?;
    // Taken before the chain moves into the key; a certificate x509-parser
    // cannot read is still served, without expiry warnings.
    let not_after = secretfs_proto::cert::CertInfo::from_der(certs[0].as_ref())
        .map(|info| secretfs_proto::cert::to_unix(info.not_after))
        .unwrap_or(0);
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        Error::Config(format!(
            "cannot read the server key {}: {e}",
            key_path.display()
        ))
    })?;
    let certified = CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        Error::Config(format!(
            "the server certificate and key do not fit together: {e}; reissue both with `secretfs server reissue-cert`"
        ))
    })?;
    Ok((certified, not_after))
}

impl ReloadingCert {
    /// Loads the pair now (a start fails on a bad pair, as it should).
    pub fn open(
        cert_path: PathBuf,
        key_path: PathBuf,
        provider: Arc<CryptoProvider>,
    ) -> Result<ReloadingCert, Error> {
        let seen = (file_id(&cert_path), file_id(&key_path));
        let (key, not_after) = load(&cert_path, &key_path, &provider)?;
        Ok(ReloadingCert {
            current: Mutex::new(Current {
                key: Arc::new(key),
                seen,
                checked: Instant::now(),
                not_after,
            }),
            cert_path,
            key_path,
            provider,
        })
    }

    /// The expiry (unix seconds) of the certificate being served.
    pub fn not_after(&self) -> i64 {
        self.lock().not_after
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Looks at the files now; true when a new pair was taken up.
    pub fn check_now(&self) -> bool {
        let mut current = self.lock();
        self.check(&mut current)
    }

    fn check(&self, current: &mut Current) -> bool {
        current.checked = Instant::now();
        let seen = (file_id(&self.cert_path), file_id(&self.key_path));
        if seen == current.seen {
            return false;
        }
        current.seen = seen;
        match load(&self.cert_path, &self.key_path, &self.provider) {
            Ok((key, not_after)) => {
                current.key = Arc::new(key);
                current.not_after = not_after;
                tracing::info!(
                    cert = %self.cert_path.display(),
                    not_after = %crate::pki::rfc3339(not_after),
                    "the server certificate changed on disk; new connections get the new one"
                );
                true
            }
            Err(e) => {
                // Maybe half-way through a replacement: the next change
                // is looked at again.
                tracing::warn!(error = %e, "the server certificate files changed but cannot be used (yet); still serving the previous certificate");
                false
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.lock();
        if current.checked.elapsed() >= CHECK_EVERY {
            self.check(&mut current);
        }
        Some(current.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Ca;
    use crate::state_dir::replace_file;
    use rustls_pki_types::CertificateDer;

    #[test]
    fn a_replaced_pair_is_taken_up_and_a_mismatched_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
        let (ca, _) = Ca::generate("td").unwrap();
        let write = |issued: &crate::pki::Issued, which: (bool, bool)| {
            if which.1 {
                replace_file(&key, issued.key_pem.as_ref().unwrap().as_bytes(), 0o600).unwrap();
            }
            if which.0 {
                replace_file(&cert, issued.cert_pem.as_bytes(), 0o644).unwrap();
            }
        };
        let first = ca.issue_server(&["localhost".into()]).unwrap();
        write(&first, (true, true));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let r = ReloadingCert::open(cert.clone(), key.clone(), provider).unwrap();
        assert!(!r.check_now(), "nothing changed");
        let second = ca.issue_server(&["127.0.0.2".into()]).unwrap();
        // Half-way: the new key beside the old certificate is not used.
        write(&second, (false, true));
        assert!(!r.check_now());
        let served = |r: &ReloadingCert| r.lock().key.cert[0].to_vec();
        assert_eq!(
            served(&r),
            CertificateDer::from_pem_slice(first.cert_pem.as_bytes())
                .unwrap()
                .to_vec()
        );
        write(&second, (true, false));
        assert!(r.check_now());
        assert_eq!(
            served(&r),
            CertificateDer::from_pem_slice(second.cert_pem.as_bytes())
                .unwrap()
                .to_vec()
        );
        assert_eq!(r.not_after(), second.not_after);
    }
}
