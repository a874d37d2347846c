//! What every part of secretfs reads from a certificate, and says about
//! its time: serial and validity ([`CertInfo`]), the one time format
//! ([`rfc3339`]), and the expiry warning ([`expiry_notice`]). The server,
//! the CLI and the mount all use these, so they say the same thing. Also
//! the one way a client's new key and CSR are made ([`new_key_and_csr`]).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use zeroize::Zeroizing;

/// Warn this long before a certificate expires.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// The (first) certificate of a PEM file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Hex, lower case, as the server records and `whoami` shows it.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The subject's common name, if any.
    pub common_name: Option<String>,
    /// The kind of its public key: a renewal makes a new key of the same
    /// kind without reading the private one.
    pub key_kind: KeyKind,
}

/// The public key kinds secretfs can make a key of; `Other` for the rest
/// (RSA, other curves).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    Other,
}

impl KeyKind {
    fn of(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> KeyKind {
        use x509_parser::oid_registry::{
            OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ED25519,
        };
        let alg = &spki.algorithm;
        if alg.algorithm == OID_SIG_ED25519 {
            return KeyKind::Ed25519;
        }
        if alg.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
            return KeyKind::Other;
        }
        match alg.parameters.as_ref().and_then(|p| p.as_oid().ok()) {
            Some(curve) if curve == OID_EC_P256 => KeyKind::EcdsaP256,
            Some(curve) if curve == OID_NIST_EC_P384 => KeyKind::EcdsaP384,
            _ => KeyKind::Other,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertError {
    #[error("not a PEM certificate: {0}")]
    NotPem(String),
    #[error("the certificate cannot be parsed: {0}")]
    Parse(String),
}

/// A new key of `kind` (ECDSA P-256 for [`KeyKind::Other`]: rcgen makes no
/// RSA keys) and a CSR for it naming `common_name`: the key's PEM, the
/// CSR's PEM.
pub fn new_key_and_csr(
    common_name: &str,
    kind: KeyKind,
) -> Result<(Zeroizing<String>, String), rcgen::Error> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256,
        PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
    };
    let alg = match kind {
        KeyKind::EcdsaP384 => &PKCS_ECDSA_P384_SHA384,
        KeyKind::Ed25519 => &PKCS_ED25519,
        KeyKind::EcdsaP256 | KeyKind::Other => &PKCS_ECDSA_P256_SHA256,
    };
    // rcgen's `zeroize` feature: the key's DER is wiped as it is dropped.
    let key = Zeroizing::new(KeyPair::generate_for(alg)?);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let csr_pem = params.serialize_request(&*key)?.pem()?;
    Ok((pkcs8_pem(key.serialized_der()), csr_pem))
}

/// The PKCS#8 PEM of a private key's DER, as rcgen's `serialize_pem`
/// writes it, but without its unwiped copies: the base64 and the PEM go
/// into pre-sized buffers that are wiped as they are dropped.
fn pkcs8_pem(der: &[u8]) -> Zeroizing<String> {
    use base64::Engine;
    const BEGIN: &str = "-----BEGIN PRIVATE KEY-----\n";
    const END: &str = "-----END PRIVATE KEY-----\n";
    const LINE: usize = 64;
    let len = base64::encoded_len(der.len(), true).expect("a key's DER is far from usize::MAX");
    let mut b64 = Zeroizing::new(vec![0u8; len]);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(der, &mut b64[..])
        .expect("the buffer has the encoded length");
    let lines = written.div_ceil(LINE);
    let mut pem = Zeroizing::new(String::with_capacity(
        BEGIN.len() + written + lines + END.len(),
    ));
    pem.push_str(BEGIN);
    for line in b64[..written].chunks(LINE) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str(END);
    pem
}

/// Unix seconds as a time (before 1970 too).
pub fn from_unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// A time as Unix seconds (before 1970: negative).
pub fn to_unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

impl CertInfo {
    /// Reads the first certificate of `pem`.
    pub fn parse(pem: &[u8]) -> Result<CertInfo, CertError> {
        let der =
            CertificateDer::from_pem_slice(pem).map_err(|e| CertError::NotPem(e.to_string()))?;
        CertInfo::from_der(der.as_ref())
    }

    /// Reads a DER certificate (one already taken out of its PEM).
    pub fn from_der(der: &[u8]) -> Result<CertInfo, CertError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| CertError::Parse(e.to_string()))?;
        let validity = cert.validity();
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Ok(CertInfo {
            serial: cert
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            not_before: from_unix(validity.not_before.timestamp()),
            not_after: from_unix(validity.not_after.timestamp()),
            common_name,
            key_kind: KeyKind::of(cert.public_key()),
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

/// RFC 3339 in UTC, to the second: the one time format of messages, logs
/// and the mount's status file. Beyond year 9999: Unix seconds.
pub fn rfc3339(t: SystemTime) -> String {
    rfc3339_unix(to_unix(t))
}

/// [`rfc3339`] of Unix seconds.
pub fn rfc3339_unix(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} (unix seconds)"))
}

/// A certificate that expired, or expires within [`EXPIRY_WARNING`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiryNotice {
    pub expired: bool,
    pub not_after: SystemTime,
    /// Whole days left (0 when expired).
    pub days_left: u64,
}

impl fmt::Display for ExpiryNotice {
    /// "expired at T" or "expires within 30 days, at T (N days left)".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.expired {
            write!(f, "expired at {}", rfc3339(self.not_after))
        } else {
            write!(
                f,
                "expires within {} days, at {} ({} days left)",
                EXPIRY_WARNING.as_secs() / 86_400,
                rfc3339(self.not_after),
                self.days_left
            )
        }
    }
}

/// What to say about a certificate ending at `not_after`, seen at `now`:
/// nothing until the last 30 days, then that it expires, then that it
/// expired.
pub fn expiry_notice(not_after: SystemTime, now: SystemTime) -> Option<ExpiryNotice> {
    match not_after.duration_since(now) {
        Err(_) => Some(ExpiryNotice {
            expired: true,
            not_after,
            days_left: 0,
        }),
        Ok(left) if left < EXPIRY_WARNING => Some(ExpiryNotice {
            expired: false,
            not_after,
            days_left: left.as_secs() / 86_400,
        }),
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_pem_is_rcgens() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            assert_eq!(*pkcs8_pem(key.serialized_der()), key.serialize_pem());
        }
    }

    #[test]
    fn reads_serial_and_validity() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x.test".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "web-1");
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x4a, 0x01, 0xff]));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(29);
        let pem = params.self_signed(&key).unwrap().pem();
        let info = CertInfo::parse(pem.as_bytes()).unwrap();
        assert_eq!(info.serial, "4a01ff");
        assert_eq!(info.common_name.as_deref(), Some("web-1"));
        assert_eq!(info.lifetime().as_secs() / 86_400, 30);
        assert_eq!(info.key_kind, KeyKind::EcdsaP256);
        for (alg, kind) in [
            (&rcgen::PKCS_ECDSA_P384_SHA384, KeyKind::EcdsaP384),
            (&rcgen::PKCS_ED25519, KeyKind::Ed25519),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let pem = params.self_signed(&key).unwrap().pem();
            assert_eq!(CertInfo::parse(pem.as_bytes()).unwrap().key_kind, kind);
        }
        assert!(matches!(
            CertInfo::parse(key.serialize_pem().as_bytes()),
            Err(CertError::NotPem(_))
        ));
    }

    #[test]
    fn one_time_format_and_one_expiry_notice() {
        assert_eq!(rfc3339_unix(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            rfc3339_unix(i64::MAX),
            format!("{} (unix seconds)", i64::MAX)
        );
        let day = 86_400;
        let t = |s: i64| from_unix(s);
        assert_eq!(expiry_notice(t(31 * day), t(0)), None);
        let n = expiry_notice(t(29 * day + 5), t(0)).unwrap();
        assert!(!n.expired);
        assert_eq!(
            n.to_string(),
            "expires within 30 days, at 1970-01-30T00:00:05Z (29 days left)"
        );
        let n = expiry_notice(t(0), t(10)).unwrap();
        assert!(n.expired);
        assert_eq!(n.to_string(), "expired at 1970-01-01T00:00:00Z");
    }
}

#[cfg(test)]
mod prop_tests;
