//! The built-in certificate authority: the CA itself, the server's
//! certificate, and client certificates signed from CSRs.
//!
//! Client certificates carry the identity as a SPIFFE URI SAN
//! (`spiffe://TRUST_DOMAIN/client/NAME`) and the name as CN, are for client
//! authentication only, and get a random serial that the store records, so a
//! removed and re-added client's old certificate does not work for the new one.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::error::Error;

pub const CA_DAYS: i64 = 3650;
pub const SERVER_DAYS: i64 = 825;
pub const CLIENT_DAYS: u32 = 365;
pub const MAX_CLIENT_DAYS: u32 = 3650;

/// A freshly made certificate (and its key, when we generated it).
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: Option<Zeroizing<String>>,
    pub serial: String,
    pub not_after: i64,
}

/// The CA, loaded from its PEM files, able to sign.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    /// The CA certificate's notAfter (unix seconds): when everything it
    /// signed stops working.
    pub not_after: i64,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca(..)")
    }
}

fn pki(what: &str, e: rcgen::Error) -> Error {
    Error::Pki {
        what: what.to_owned(),
        source: e,
    }
}

fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Crypto("the system random generator failed"))?;
    // Positive and without a leading zero byte, so its DER form is exactly
    // these 16 bytes and the hex we record matches what a parser reads back.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// How far before its issue a certificate of ours is valid from: a little
/// slack for clocks that are slightly behind ours.
pub const NOT_BEFORE_SLACK_S: i64 = 300;

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::seconds(NOT_BEFORE_SLACK_S);
    params.not_after = now + Duration::days(days);
}

fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Unix seconds as an RFC 3339 UTC time, for messages and logs
/// ([`secretfs_proto::cert::rfc3339_unix`]: one format everywhere).
pub fn rfc3339(secs: i64) -> String {
    secretfs_proto::cert::rfc3339_unix(secs)
}

pub fn spiffe_id(trust_domain: &str, client: &str) -> String {
    format!("spiffe://{trust_domain}/client/{client}")
}

impl Ca {
    /// Makes a new CA; returns it and its key's PEM (to be stored 0600).
    pub fn generate(trust_domain: &str) -> Result<(Ca, Zeroizing<String>), Error> {
        let key = KeyPair::generate().map_err(|e| pki("generating the CA key", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("secretfs CA ({trust_domain})"));
        dn.push(DnType::OrganizationName, "secretfs");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial()?);
        validity(&mut params, CA_DAYS);
        let cert = params
            .self_signed(&key)
            .map_err(|e| pki("signing the CA certificate", e))?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        let cert_pem = cert.pem();
        let ca = Ca::load(&cert_pem, &key_pem)?;
        Ok((ca, key_pem))
    }

    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, Error> {
        use rustls_pki_types::{pem::PemObject, CertificateDer};
        let unreadable = || {
            pki(
                "reading the CA certificate",
                rcgen::Error::CouldNotParseCertificate,
            )
        };
        let key = KeyPair::from_pem(key_pem).map_err(|e| pki("reading the CA key", e))?;
        // The PEM is decoded once, for the issuer and for the expiry.
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| unreadable())?;
        let not_after = secretfs_proto::cert::CertInfo::from_der(der.as_ref())
            .map_err(|_| unreadable())?
            .not_after;
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| pki("reading the CA certificate", e))?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_owned(),
            not_after: secretfs_proto::cert::to_unix(not_after),
        })
    }

    /// The server's certificate for the given DNS names and IP addresses.
    pub fn issue_server(&self, sans: &[String]) -> Result<Issued, Error> {
        let key = KeyPair::generate().map_err(|e| pki("generating the server key", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "secretfs server");
        params.distinguished_name = dn;
        for san in sans {
            let san = san.trim();
            let entry = match san.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if is_dns_name(san) => SanType::DnsName(
                    san.try_into()
                        .map_err(|e| Error::InvalidArgument(format!("--san {san:?}: {e}")))?,
                ),
                Err(_) => {
                    return Err(Error::InvalidArgument(format!(
                        "--san {san:?} is neither an IP address nor a DNS name (letters, digits, '-' and '.', e.g. secrets.internal)"
                    )))
                }
            };
            params.subject_alt_names.push(entry);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        validity(&mut params, SERVER_DAYS);
        let not_after = params.not_after.unix_timestamp();
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| pki("signing the server certificate", e))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Some(Zeroizing::new(key.serialize_pem())),
            serial: hex::encode(serial.to_bytes()),
            not_after,
        })
    }

    fn client_params(
        trust_domain: &str,
        name: &str,
        days: u32,
    ) -> Result<(CertificateParams, SerialNumber), Error> {
        let days = if days == 0 { CLIENT_DAYS } else { days };
        if days > MAX_CLIENT_DAYS {
            return Err(Error::InvalidArgument(format!(
                "--days {days} is too long; client certificates last at most {MAX_CLIENT_DAYS} days"
            )));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let uri = spiffe_id(trust_domain, name);
        params.subject_alt_names =
            vec![SanType::URI(uri.as_str().try_into().map_err(|e| {
                Error::InvalidArgument(format!("bad SPIFFE id {uri}: {e}"))
            })?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        validity(&mut params, days as i64);
        Ok((params, serial))
    }

    /// A client certificate with a key generated here (used by `server init`
    /// for the first admin, whose key is written straight into the state dir).
    pub fn issue_client(&self, trust_domain: &str, name: &str, days: u32) -> Result<Issued, Error> {
        let key = KeyPair::generate().map_err(|e| pki("generating a client key", e))?;
        let (params, serial) = Self::client_params(trust_domain, name, days)?;
        let not_after = params.not_after.unix_timestamp();
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| pki("signing the client certificate", e))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Some(Zeroizing::new(key.serialize_pem())),
            serial: hex::encode(serial.to_bytes()),
            not_after,
        })
    }

    /// Signs a client's CSR. Only the CSR's public key is used: the subject
    /// and SANs come from the name the admin asked for, never from the CSR.
    pub fn sign_csr(
        &self,
        trust_domain: &str,
        name: &str,
        csr_pem: &str,
        days: u32,
    ) -> Result<Issued, Error> {
        let key = csr_key(csr_pem)?;
        let (params, serial) = Self::client_params(trust_domain, name, days)?;
        let not_after = params.not_after.unix_timestamp();
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| pki("signing the client certificate", e))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: None,
            serial: hex::encode(serial.to_bytes()),
            not_after,
        })
    }
}

/// The key types a client certificate may carry: the ones rustls (ring)
/// verifies in a TLS 1.3 handshake. Anything else would be signed into a
/// certificate no handshake accepts.
pub const ACCEPTED_KEYS: &str = "ECDSA P-256, ECDSA P-384, Ed25519, or RSA of 2048 to 8192 bits";

const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 8192;

/// A CSR's public key with the algorithm its certificate must name.
///
/// rcgen takes the key's algorithm from the CSR's *signature* algorithm,
/// so a P-384 key in a CSR signed with ecdsa-with-SHA256 came out as a
/// P-256 key (the P-256 curve OID around a P-384 point), and a P-521 key
/// was signed although no handshake can use it. The key type is read from
/// the SubjectPublicKeyInfo itself instead.
struct CsrKey {
    alg: &'static rcgen::SignatureAlgorithm,
    raw: Vec<u8>,
}

impl rcgen::PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

fn bad_csr(why: impl std::fmt::Display) -> Error {
    Error::BadCsr {
        why: why.to_string(),
    }
}

/// Reads and checks a CSR (its signature proves the requester holds the
/// key) and returns its key, refusing key types a handshake cannot use.
fn csr_key(csr_pem: &str) -> Result<CsrKey, Error> {
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
        OID_SIG_ED25519,
    };
    use x509_parser::prelude::FromDer;
    use x509_parser::public_key::PublicKey;

    let der = rustls_pki_types::pem::PemObject::from_pem_slice(csr_pem.as_bytes())
        .map(|d: rustls_pki_types::CertificateSigningRequestDer<'static>| d)
        .map_err(|e| bad_csr(format!("it could not be read ({e})")))?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| bad_csr(format!("it could not be parsed ({e})")))?;
    let spki = &csr.certification_request_info.subject_pki;
    let raw = spki.subject_public_key.data.to_vec();
    let oid = &spki.algorithm.algorithm;
    let alg: &'static rcgen::SignatureAlgorithm = if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Some(c) if c == OID_NIST_EC_P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Some(c) => return Err(bad_csr(format!("its key is on elliptic curve {c}, which TLS clients here cannot use (P-521 and others are not verified by rustls)"))),
            None => return Err(bad_csr("its elliptic-curve key names no named curve")),
        }
    } else if *oid == OID_SIG_ED25519 {
        &rcgen::PKCS_ED25519
    } else if *oid == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa_bits(rsa.modulus),
            _ => return Err(bad_csr("its RSA key cannot be read")),
        };
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(bad_csr(format!("its RSA key has {bits} bits")));
        }
        &rcgen::PKCS_RSA_SHA256
    } else {
        return Err(bad_csr(format!("its key type ({oid}) is not supported")));
    };
    // The key type is fine; the CSR's self-signature must prove its
    // holder has the private key (rcgen verifies it).
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
        rcgen::Error::UnsupportedSignatureAlgorithm => bad_csr(
            "its signature algorithm is not supported (sign it with SHA-256, SHA-384 or SHA-512)",
        ),
        e => bad_csr(format!("its signature does not verify ({e})")),
    })?;
    Ok(CsrKey { alg, raw })
}

/// The size of an RSA modulus in bits (DER integers may carry leading zeros).
fn rsa_bits(modulus: &[u8]) -> usize {
    let m = match modulus.iter().position(|&b| b != 0) {
        Some(i) => &modulus[i..],
        None => return 0,
    };
    m.len() * 8 - m[0].leading_zeros() as usize
}

/// Makes a key and a CSR for `name` (the CLI's side of `client add`).
pub fn new_csr(name: &str) -> Result<(Zeroizing<String>, String), Error> {
    secretfs_proto::cert::new_key_and_csr(name, secretfs_proto::cert::KeyKind::EcdsaP256)
        .map_err(|e| pki("making a key and its CSR", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{identity_from_der, IdentitySource, Issuer};

    fn der(pem: &str) -> Vec<u8> {
        use rustls_pki_types::{pem::PemObject, CertificateDer};
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn csr_signing_uses_the_requested_name_not_the_csr_subject() {
        let (ca, _key) = Ca::generate("example.org").unwrap();
        let (_k, csr) = new_csr("evil-admin").unwrap();
        let issued = ca.sign_csr("example.org", "web-1", &csr, 30).unwrap();
        let id = identity_from_der(&der(&issued.cert_pem), "example.org", Issuer::BuiltIn).unwrap();
        assert_eq!(id.name, "web-1");
        assert_eq!(id.source, IdentitySource::Spiffe);
        assert_eq!(id.serial, issued.serial);
        assert!(ca.sign_csr("example.org", "x", "not a csr", 30).is_err());
        assert!(ca
            .sign_csr("example.org", "x", &csr, MAX_CLIENT_DAYS + 1)
            .is_err());
    }

    /// The SubjectPublicKeyInfo of a CSR or certificate, as DER.
    fn spki_of_cert(pem: &str) -> Vec<u8> {
        use x509_parser::prelude::FromDer;
        let der = der(pem);
        let (_, c) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
        c.tbs_certificate.subject_pki.raw.to_vec()
    }

    #[test]
    fn every_accepted_key_type_keeps_its_key_exactly() {
        let (ca, _) = Ca::generate("td").unwrap();
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let csr = CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap();
            let issued = ca.sign_csr("td", "web", &csr, 1).unwrap();
            assert_eq!(
                spki_of_cert(&issued.cert_pem),
                rcgen::PublicKeyData::subject_public_key_info(&key),
                "{alg:?}"
            );
        }
    }

    #[test]
    fn rsa_sizes_are_counted_in_bits() {
        assert_eq!(rsa_bits(&[0x00, 0x80, 0, 0]), 24);
        assert_eq!(rsa_bits(&[0x01, 0, 0]), 17);
        assert_eq!(rsa_bits(&[0; 3]), 0);
        let Err(err) = Ca::generate("td")
            .unwrap()
            .0
            .sign_csr("td", "x", "not a csr", 1)
        else {
            panic!("garbage was signed")
        };
        let err = err.to_string();
        assert!(err.contains(ACCEPTED_KEYS), "{err}");
    }

    #[test]
    fn server_cert_takes_dns_and_ip_sans() {
        let (ca, _) = Ca::generate("td").unwrap();
        let issued = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into(), "::1".into()])
            .unwrap();
        assert!(issued.key_pem.is_some());
        assert!(ca.issue_server(&["bad name!".into()]).is_err());
    }

    #[test]
    fn a_loaded_ca_knows_its_expiry() {
        let (ca, key) = Ca::generate("td").unwrap();
        let loaded = Ca::load(&ca.cert_pem, &key).unwrap();
        assert_eq!(
            loaded.not_after,
            secretfs_proto::cert::to_unix(
                secretfs_proto::cert::CertInfo::parse(ca.cert_pem.as_bytes())
                    .unwrap()
                    .not_after
            )
        );
        let days = (loaded.not_after - crate::store::now_s()) / 86_400;
        assert!((CA_DAYS - 1..=CA_DAYS).contains(&days), "{days}");
        assert!(Ca::load("not a certificate", &key).is_err());
    }
}

#[cfg(test)]
mod prop_tests;
