//! What the mount knows about its own client certificate: serial and
//! validity (for the status file, the expiry warning and the renewal
//! schedule). Whether a key belongs to it is
//! [`secretfs_proto::credentials::key_matches`] (every key format).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::pem::parse_x509_pem;

/// The leaf certificate of a PEM file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Hex, lower case, as the server records and `whoami` shows it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The subject's common name, if any (used in a renewal's CSR).
    pub common_name: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertError {
    #[error("not a PEM certificate: {0}")]
    NotPem(String),
    #[error("the certificate cannot be parsed: {0}")]
    Parse(String),
}

fn unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

impl CertInfo {
    /// Reads the first certificate of `pem`.
    pub fn parse(pem: &[u8]) -> Result<CertInfo, CertError> {
        let (_, pem) = parse_x509_pem(pem).map_err(|e| CertError::NotPem(e.to_string()))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| CertError::Parse(e.to_string()))?;
        let validity = cert.validity();
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Ok(CertInfo {
            serial: hex(cert.raw_serial()),
            not_before: unix(validity.not_before.timestamp()),
            not_after: unix(validity.not_after.timestamp()),
            common_name,
        })
    }

    /// not_before..not_after.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// When `fraction` of the lifetime has passed.
    pub fn point_in_life(&self, fraction: f64) -> SystemTime {
        self.not_before + self.lifetime().mul_f64(fraction.clamp(0.0, 1.0))
    }

    /// The time left at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 3339 in UTC, to the second: the one time format of the status file
/// and the mount's log lines.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
pub(crate) mod tests {
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
    fn reads_serial_and_validity() {
        let (cert, key) = cert_and_key(29);
        let info = CertInfo::parse(cert.as_bytes()).unwrap();
        assert_eq!(info.serial, "4a01ff");
        assert_eq!(info.common_name.as_deref(), Some("web-1"));
        let days = info.lifetime().as_secs() / 86_400;
        assert_eq!(days, 30);
        let left = info.remaining(SystemTime::now()).as_secs() / 86_400;
        assert_eq!(left, 28, "29 days minus the seconds since");
        assert!(matches!(
            CertInfo::parse(key.as_bytes()),
            Err(CertError::NotPem(_) | CertError::Parse(_))
        ));
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
    fn times_are_rfc3339_utc() {
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
    }
}
