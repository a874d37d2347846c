//! The mount renews its own client certificate, so a mount that runs for
//! years never finds itself locked out by an expired certificate.
//!
//! - When: at 2/3 of the certificate's lifetime (not_before..not_after of
//!   the certificate in use) plus a random 0-10% of it, then again for each
//!   new one (`--no-renew`: never). A failed attempt
//!   is retried with a backoff (30 s doubling to 30 min); the mount keeps
//!   serving with the certificate it has.
//! - How: a new key made here (of the kind the certificate's key is, where we can
//!   make it, else ECDSA P-256), a CSR, `Secrets.RenewCertificate` over the
//!   connection authenticated by the current certificate; the lifetime asked
//!   for is the current one's, in whole days.
//! - The files: replaced by [`secretfs_proto::files::replace_pair`] (both
//!   written and fsynced first, then two renames back to back, the old key
//!   put back if the second fails). Between the renames a reader sees the
//!   new key with the old certificate: every reader of ours checks that the
//!   key belongs to the certificate before using a pair
//!   ([`crate::credentials`] waits for the next poll). A crash exactly
//!   between them leaves a mismatched pair: the next start refuses it with
//!   that message. Temporary files a crash left are removed at start.
//! - Files that cannot be written (read-only volume, Kubernetes secret):
//!   the new certificate is used from memory only, and the log says so;
//!   a restart falls back to what the files hold.
//! - 30 days before expiry, once the planned renewal time has passed
//!   (renewal failing or off), a warning is logged, again every day.
//! - Due by either clock: the monotonic one stops while the machine is
//!   suspended, the wall clock does not.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::backoff::{random_fraction, Backoff};
use secretfs_proto::cert::{expiry_notice, rfc3339, CertInfo, ExpiryNotice, KeyKind};

/// When in a certificate's life it is renewed ...
pub const RENEW_AT: f64 = 2.0 / 3.0;
/// ... plus up to this part of its life, at random.
pub const JITTER: f64 = 0.1;
const WARN_EVERY: Duration = Duration::from_secs(86_400);
const RETRY_FIRST: Duration = Duration::from_secs(30);
const RETRY_CAP: Duration = Duration::from_secs(30 * 60);

/// A key and the CSR for it.
pub struct Request {
    pub key_pem: Zeroizing<Vec<u8>>,
    pub csr_pem: String,
}

/// Makes a key of the kind the certificate in use has (where rcgen can
/// make one, else ECDSA P-256) and a CSR for it. The private key in use is
/// not read for this: each copy of it is one more to wipe.
pub fn new_request(kind: KeyKind, common_name: &str) -> Result<Request, String> {
    let (mut key, csr_pem) = secretfs_proto::cert::new_key_and_csr(common_name, kind)
        .map_err(|e| format!("cannot make a key and its CSR: {e}"))?;
    // Moved, not copied: the one buffer is wiped as `key_pem` is dropped.
    let key_pem = Zeroizing::new(std::mem::take(&mut *key).into_bytes());
    Ok(Request { key_pem, csr_pem })
}

/// The lifetime to ask for: the current certificate's, in whole days
/// (at least 1).
pub fn days_like(info: &CertInfo) -> u32 {
    let days = (info.lifetime().as_secs_f64() / 86_400.0).round();
    days.clamp(1.0, f64::from(u32::MAX)) as u32
}

/// The renewal clock of the certificate in use, which it owns: every
/// certificate put in use gets a new one.
pub struct Schedule {
    cert: CertInfo,
    due: Instant,
    retry: Backoff,
    next_warning: Instant,
    /// False with `--no-renew`: only the expiry warning.
    enabled: bool,
    /// `due` on the wall clock as well: the monotonic clock stops while
    /// the machine is suspended (or a VM paused), the wall clock does not.
    due_wall: SystemTime,
    /// When this certificate's renewal was planned (wall clock): the
    /// expiry warning waits for it, so a short-lived certificate (always
    /// within 30 days of its end) is not warned about while all is well.
    planned: SystemTime,
}

impl Schedule {
    #[cfg(test)]
    pub fn new(cert: CertInfo, first_after: Option<Duration>) -> Schedule {
        Schedule::with_renewal(cert, first_after, true)
    }

    /// The renewal of `cert` is due at 2/3 of its life plus a random 0-10%
    /// of it, or after `first_after` (the hidden `--renew-after`, given for
    /// the first certificate only). The jitter keeps replicas that share
    /// one client (and one certificate) from all asking at the same moment;
    /// the server allows a client only a few self-renewals an hour. When
    /// that time has passed already (a restart late in the certificate's
    /// life), within a random part of the same span, or of a quarter of the
    /// time left if shorter. `enabled` false (`--no-renew`): never due; the
    /// expiry warning stays.
    pub fn with_renewal(cert: CertInfo, first_after: Option<Duration>, enabled: bool) -> Schedule {
        let due = match first_after {
            Some(after) => Instant::now() + after,
            None => {
                let span = cert.lifetime().mul_f64(JITTER);
                let due = cert.point_in_life(RENEW_AT) + span.mul_f64(random_fraction());
                match due.duration_since(SystemTime::now()) {
                    Ok(_) => at(due),
                    Err(_) => {
                        let span = span.min(cert.remaining(SystemTime::now()) / 4);
                        Instant::now() + span.mul_f64(random_fraction())
                    }
                }
            }
        };
        let due_wall = SystemTime::now() + due.saturating_duration_since(Instant::now());
        let renew_at = enabled.then(|| rfc3339(due_wall));
        tracing::info!(
            serial = %cert.serial,
            not_after = %rfc3339(cert.not_after),
            renew_at = renew_at.as_deref().unwrap_or("never (--no-renew)"),
            "client certificate in use"
        );
        let mut s = Schedule {
            cert,
            due,
            retry: Backoff::new(RETRY_FIRST, RETRY_CAP),
            next_warning: Instant::now(),
            enabled,
            due_wall,
            planned: due_wall,
        };
        s.warn_if_expiring();
        s
    }

    /// The certificate this schedule is for.
    pub fn cert(&self) -> &CertInfo {
        &self.cert
    }

    /// The same certificate, never renewed (the server cannot): only the
    /// expiry warning.
    pub fn never(self) -> Schedule {
        Schedule::with_renewal(self.cert, None, false)
    }

    /// Whether a renewal is due, by either clock.
    pub fn due(&self) -> bool {
        self.enabled && (Instant::now() >= self.due || SystemTime::now() >= self.due_wall)
    }

    /// An attempt failed: the next one after a backoff. Returns the delay.
    pub fn failed(&mut self) -> Duration {
        let delay = self.retry.next_delay();
        self.due = Instant::now() + delay;
        self.due_wall = SystemTime::now() + delay;
        delay
    }

    /// Whether to warn at `now`: within 30 days of the end, and past the
    /// planned renewal (which has not happened, or this is a new schedule).
    fn expiring(&self, now: SystemTime) -> Option<ExpiryNotice> {
        expiry_notice(self.cert.not_after, now).filter(|_| now >= self.planned)
    }

    /// Logs a warning when the certificate expires within 30 days and was
    /// not renewed when planned, once a day.
    pub fn warn_if_expiring(&mut self) {
        if Instant::now() < self.next_warning {
            return;
        }
        if let Some(notice) = self.expiring(SystemTime::now()) {
            self.next_warning = Instant::now() + WARN_EVERY;
            tracing::warn!(
                serial = %self.cert.serial,
                "the mount's client certificate {notice}; it renews itself (watch for renewal \
                 errors) or issue a new one with `secretfs client renew`"
            );
        }
    }
}

/// A wall-clock time as a monotonic instant (now, if it has passed).
fn at(t: SystemTime) -> Instant {
    Instant::now() + t.duration_since(SystemTime::now()).unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use rcgen::PublicKeyData;

    use super::*;

    /// A self-signed certificate valid `days` from now, and its key.
    pub fn cert_and_key(days: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x.test".into()]).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "web-1");
        params.distinguished_name = dn;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x4a, 0x01, 0xff]));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(days);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn two_thirds_of_a_thirty_day_life() {
        let (cert, _) = cert_and_key(29);
        let info = CertInfo::parse(cert.as_bytes()).unwrap();
        let left = info.remaining(SystemTime::now()).as_secs() / 86_400;
        assert_eq!(left, 28, "29 days minus the seconds since");
        let two_thirds = info.point_in_life(2.0 / 3.0);
        assert_eq!(
            two_thirds
                .duration_since(info.not_before)
                .unwrap()
                .as_secs(),
            20 * 86_400
        );
    }

    #[test]
    fn a_request_is_a_csr_for_a_new_key_of_the_same_kind() {
        let (cert, key) = cert_and_key(30);
        let kind = CertInfo::parse(cert.as_bytes()).unwrap().key_kind;
        let req = new_request(kind, "web-1").unwrap();
        assert!(req
            .csr_pem
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert_ne!(&req.key_pem[..], key.as_bytes(), "a new key");
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem).unwrap();
        let new_key = rcgen::KeyPair::from_pem(std::str::from_utf8(&req.key_pem).unwrap()).unwrap();
        assert_eq!(parsed.public_key.der_bytes(), new_key.public_key_raw());
        assert_eq!(new_key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
        let kind_of = |req: Request| {
            rcgen::KeyPair::from_pem(std::str::from_utf8(&req.key_pem).unwrap())
                .unwrap()
                .algorithm()
        };
        let p384 = new_request(KeyKind::EcdsaP384, "web-1").unwrap();
        assert_eq!(kind_of(p384), &rcgen::PKCS_ECDSA_P384_SHA384);
        let ed = new_request(KeyKind::Ed25519, "web-1").unwrap();
        assert_eq!(kind_of(ed), &rcgen::PKCS_ED25519);
        // A kind rcgen cannot make (RSA): P-256.
        let other = new_request(KeyKind::Other, "web-1").unwrap();
        assert_eq!(kind_of(other), &rcgen::PKCS_ECDSA_P256_SHA256);
    }

    #[test]
    fn renewal_is_due_at_two_thirds_and_backs_off() {
        let (cert, _) = cert_and_key(29); // valid from a day ago, 30 days
        let info = CertInfo::parse(cert.as_bytes()).unwrap();
        assert_eq!(days_like(&info), 30);
        let s = Schedule::new(info.clone(), None);
        assert!(!s.due(), "day 1 of 30 is before 2/3");
        // 2/3 of 30 days is day 20 (19 days from now), plus up to 3 days.
        let left = s.due.saturating_duration_since(Instant::now()).as_secs();
        assert!((19 * 86_400 - 60..=22 * 86_400).contains(&left), "{left}");
        let dues: std::collections::BTreeSet<_> = (0..8)
            .map(|_| {
                Schedule::new(info.clone(), None)
                    .due
                    .saturating_duration_since(Instant::now())
                    .as_secs()
                    / 60
            })
            .collect();
        assert!(dues.len() > 1, "jittered: {dues:?}");

        let (old, _) = cert_and_key(0); // a day old, expires now: past 2/3
        let mut s = Schedule::new(CertInfo::parse(old.as_bytes()).unwrap(), None);
        assert!(s.due(), "past its end: at once");
        let d = s.failed();
        assert!(d >= RETRY_FIRST / 2 && d <= RETRY_FIRST, "{d:?}");
        assert!(!s.due(), "not again before the backoff");

        // Suspended or paused: the monotonic clock stood still.
        let mut s = Schedule::new(info.clone(), None);
        s.due_wall = SystemTime::now() - Duration::from_secs(1);
        assert!(s.due(), "the wall clock says it is time");

        // A week-long certificate is always within 30 days of its end:
        // warned about only once its renewal is overdue.
        let (week, _) = cert_and_key(6);
        let week = CertInfo::parse(week.as_bytes()).unwrap();
        let s = Schedule::new(week, None);
        assert_eq!(s.expiring(SystemTime::now()), None, "day 1 of 7");
        let notice = s.expiring(s.planned + Duration::from_secs(1)).unwrap();
        assert!(
            notice.to_string().starts_with("expires within 30 days"),
            "{notice}"
        );

        let s = Schedule::with_renewal(info.clone(), Some(Duration::ZERO), false);
        assert!(!s.due(), "--no-renew: never");
        let s = Schedule::new(info.clone(), Some(Duration::ZERO));
        assert!(s.due(), "--renew-after 0s: at once");
        assert!(!s.never().due(), "the server cannot renew it: never");
        // The next certificate's schedule is made without it.
        let s = Schedule::new(info, None);
        assert!(!s.due(), "--renew-after applies to the first renewal only");
    }
}
