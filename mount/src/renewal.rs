//! The mount renews its own client certificate, so a mount that runs for
//! years never finds itself locked out by an expired certificate.
//!
//! - When: at 2/3 of the certificate's lifetime (not_before..not_after of
//!   the certificate in use), then again for each new one. A failed attempt
//!   is retried with a backoff (30 s doubling to 30 min); the mount keeps
//!   serving with the certificate it has.
//! - How: a new key made here (same algorithm as the old one where we can
//!   make it, else ECDSA P-256), a CSR, `Secrets.RenewCertificate` over the
//!   connection authenticated by the current certificate; the lifetime asked
//!   for is the current one's, in whole days.
//! - The files: replaced by write-to-temporary, fsync, rename, in the same
//!   directory; the key first (0600), then the certificate, then the
//!   directories are fsynced. Two renames are not one atomic step: between
//!   them a reader sees the new key with the old certificate. Every reader
//!   of ours checks that the key belongs to the certificate before using a
//!   pair ([`crate::credentials`] waits for the next poll), so the window
//!   (two renames) is never used. A crash exactly between them leaves a
//!   mismatched pair: the next start refuses it with that message.
//! - Files that cannot be written (read-only volume, Kubernetes secret):
//!   the new certificate is used from memory only, and the log says so;
//!   a restart falls back to what the files hold.
//! - 30 days before expiry (renewal failing, or a short-lived certificate)
//!   a warning is logged, again every day.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::backoff::Backoff;
use crate::certificate::{rfc3339, CertInfo};

/// When in a certificate's life it is renewed.
pub const RENEW_AT: f64 = 2.0 / 3.0;
/// Warn this long before expiry.
pub const WARN_BEFORE: Duration = Duration::from_secs(30 * 86_400);
const WARN_EVERY: Duration = Duration::from_secs(86_400);
const RETRY_FIRST: Duration = Duration::from_secs(30);
const RETRY_CAP: Duration = Duration::from_secs(30 * 60);

/// A key and the CSR for it.
pub struct Request {
    pub key_pem: Zeroizing<Vec<u8>>,
    pub csr_pem: String,
}

/// Makes a key like `current_key_pem`'s (where rcgen can make one) and a
/// CSR for it.
pub fn new_request(current_key_pem: &[u8], common_name: &str) -> Result<Request, String> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256,
        PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
    };
    let alg = std::str::from_utf8(current_key_pem)
        .ok()
        .and_then(|pem| KeyPair::from_pem(pem).ok())
        .map(|k| k.algorithm())
        .filter(|a| {
            [
                &PKCS_ECDSA_P256_SHA256,
                &PKCS_ECDSA_P384_SHA384,
                &PKCS_ED25519,
            ]
            .contains(a)
        })
        .unwrap_or(&PKCS_ECDSA_P256_SHA256);
    let key = KeyPair::generate_for(alg).map_err(|e| format!("cannot make a key: {e}"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| format!("cannot make the CSR: {e}"))?;
    let key_pem = Zeroizing::new(Zeroizing::new(key.serialize_pem()).as_bytes().to_vec());
    Ok(Request { key_pem, csr_pem })
}

/// The lifetime to ask for: the current certificate's, in whole days
/// (at least 1).
pub fn days_like(info: &CertInfo) -> u32 {
    let days = (info.lifetime().as_secs_f64() / 86_400.0).round();
    days.clamp(1.0, f64::from(u32::MAX)) as u32
}

/// The renewal clock of the certificate in use.
pub struct Schedule {
    due: Instant,
    retry: Backoff,
    /// The hidden `--renew-after`: the first renewal this long after start.
    first_after: Option<Duration>,
    next_warning: Instant,
}

impl Schedule {
    pub fn new(info: &CertInfo, first_after: Option<Duration>) -> Schedule {
        let mut s = Schedule {
            due: Instant::now(),
            retry: Backoff::new(RETRY_FIRST, RETRY_CAP),
            first_after,
            next_warning: Instant::now(),
        };
        s.reset(info);
        s.warn_if_expiring(info);
        s
    }

    /// A new certificate is in use: its renewal is due at 2/3 of its life
    /// (or after `--renew-after`, for the first one).
    pub fn reset(&mut self, info: &CertInfo) {
        self.retry.reset();
        self.due = match self.first_after.take() {
            Some(after) => Instant::now() + after,
            None => at(info.point_in_life(RENEW_AT)),
        };
        self.next_warning = Instant::now();
        tracing::info!(
            serial = %info.serial,
            not_after = %rfc3339(info.not_after),
            renew_at = %rfc3339(SystemTime::now() + self.due.saturating_duration_since(Instant::now())),
            "client certificate in use"
        );
    }

    pub fn due(&self) -> bool {
        Instant::now() >= self.due
    }

    /// An attempt failed: the next one after a backoff. Returns the delay.
    pub fn failed(&mut self) -> Duration {
        let delay = self.retry.next_delay();
        self.due = Instant::now() + delay;
        delay
    }

    /// Logs a warning when `info` expires within 30 days, once a day.
    pub fn warn_if_expiring(&mut self, info: &CertInfo) {
        if Instant::now() < self.next_warning {
            return;
        }
        self.next_warning = Instant::now() + WARN_EVERY;
        let left = info.remaining(SystemTime::now());
        if left < WARN_BEFORE {
            tracing::warn!(
                serial = %info.serial,
                not_after = %rfc3339(info.not_after),
                days_left = left.as_secs() / 86_400,
                "the mount's client certificate expires within 30 days; it renews itself \
                 (watch for renewal errors) or issue a new one with `secretfs client renew`"
            );
        }
    }
}

/// A wall-clock time as a monotonic instant (now, if it has passed).
fn at(t: SystemTime) -> Instant {
    Instant::now() + t.duration_since(SystemTime::now()).unwrap_or_default()
}

/// Replaces `key` then `cert` (see the module docs for the order).
pub fn replace_pair(
    cert: &Path,
    cert_pem: &[u8],
    key: &Path,
    key_pem: &[u8],
) -> std::io::Result<()> {
    // The certificate keeps its mode (it may be shared, 0644); the key is 0600.
    let cert_mode = std::fs::metadata(cert).map_or(0o644, |m| m.permissions().mode() & 0o777);
    let old_key = Zeroizing::new(std::fs::read(key)?);
    replace_file(key, key_pem, 0o600)?;
    if let Err(e) = replace_file(cert, cert_pem, cert_mode) {
        // The certificate may live elsewhere: put the old key back, so the
        // files stay a working pair.
        if let Err(undo) = replace_file(key, &old_key, 0o600) {
            tracing::error!(
                key = %key.display(),
                error = %undo,
                "cannot put the old key back: the key file no longer matches the certificate \
                 file; the mount keeps working from memory, but fix the files before a restart \
                 (secretfs client renew)"
            );
        }
        return Err(e);
    }
    Ok(())
}

/// Writes `path` whole or not at all: a temporary file beside it, fsynced,
/// renamed over it, and the directory fsynced.
fn replace_file(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.renew-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        // create_new: never follows or reuses whatever sits at that name.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have taken bits the old file had.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use rcgen::PublicKeyData;

    use super::*;
    use crate::certificate::tests::cert_and_key;

    #[test]
    fn a_request_is_a_csr_for_a_new_key_of_the_same_kind() {
        let (_, key) = cert_and_key(30);
        let req = new_request(key.as_bytes(), "web-1").unwrap();
        assert!(req
            .csr_pem
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert_ne!(&req.key_pem[..], key.as_bytes(), "a new key");
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem).unwrap();
        let new_key = rcgen::KeyPair::from_pem(std::str::from_utf8(&req.key_pem).unwrap()).unwrap();
        assert_eq!(parsed.public_key.der_bytes(), new_key.public_key_raw());
        assert_eq!(new_key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
        // Unreadable old key: P-256.
        assert!(new_request(b"junk", "web-1").is_ok());
    }

    #[test]
    fn renewal_is_due_at_two_thirds_and_backs_off() {
        let (cert, _) = cert_and_key(29); // valid from a day ago, 30 days
        let info = CertInfo::parse(cert.as_bytes()).unwrap();
        assert_eq!(days_like(&info), 30);
        let s = Schedule::new(&info, None);
        assert!(!s.due(), "day 1 of 30 is before 2/3");
        let left = s.due.saturating_duration_since(Instant::now()).as_secs();
        assert!((19 * 86_400 - 60..=19 * 86_400).contains(&left), "{left}");

        let (old, _) = cert_and_key(0); // a day old, expires now: past 2/3
        let mut s = Schedule::new(&CertInfo::parse(old.as_bytes()).unwrap(), None);
        assert!(s.due());
        let d = s.failed();
        assert!(d >= RETRY_FIRST / 2 && d <= RETRY_FIRST, "{d:?}");
        assert!(!s.due(), "not again before the backoff");

        let mut s = Schedule::new(&info, Some(Duration::ZERO));
        assert!(s.due(), "--renew-after 0s: at once");
        s.reset(&info);
        assert!(!s.due(), "--renew-after applies to the first renewal only");
    }

    #[test]
    fn files_are_replaced_whole_with_private_key_modes() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.key");
        std::fs::write(&cert, b"old cert").unwrap();
        std::fs::set_permissions(&cert, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::write(&key, b"old key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        replace_pair(&cert, b"new cert", &key, b"new key").unwrap();
        assert_eq!(std::fs::read(&cert).unwrap(), b"new cert");
        assert_eq!(std::fs::read(&key).unwrap(), b"new key");
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&cert).unwrap().mode() & 0o777, 0o640);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "no temporary file left");

        let gone = dir.path().join("missing/k.key");
        assert!(replace_pair(&cert, b"x", &gone, b"y").is_err());
        assert_eq!(
            std::fs::read(&cert).unwrap(),
            b"new cert",
            "key first: nothing replaced"
        );

        // The certificate cannot be written: the old key comes back.
        let elsewhere = dir.path().join("missing/c.pem");
        assert!(replace_pair(&elsewhere, b"x", &key, b"newer key").is_err());
        assert_eq!(std::fs::read(&key).unwrap(), b"new key");
    }
}
