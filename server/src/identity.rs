//! Who is calling: the identity in a client certificate, and the check that
//! the client exists, is enabled, and (for certificates we issued) presents
//! a certificate we issued to it.

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::error::Error;
use crate::names::{check_entity_name, printable};

/// How much of a refused SPIFFE id an error quotes.
const MAX_SHOWN_URI: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// `spiffe://TRUST_DOMAIN/client/NAME` URI SAN.
    Spiffe,
    /// The subject CN, for certificates from the operator's own PKI that
    /// carry no URI SAN.
    CommonName,
}

/// Which CA vouched for a client certificate. A serial means something
/// only together with its issuer: serials are public (in every certificate,
/// in `client describe`), and any CA can write any serial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Issuer {
    /// The server's built-in CA (checked by verifying the certificate
    /// against that CA alone, not by comparing names).
    BuiltIn,
    /// One of the operator's CAs (`server run --client-ca`).
    External,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub name: String,
    /// Lowercase hex of the certificate's serial.
    pub serial: String,
    pub source: IdentitySource,
    pub issuer: Issuer,
    /// The certificate's notBefore (unix seconds).
    pub not_before: i64,
    /// The certificate's notAfter (unix seconds).
    pub not_after: i64,
}

/// Reads the client identity from a DER certificate, already verified by
/// the TLS layer, which also found which CA issued it.
pub fn identity_from_der(
    der: &[u8],
    trust_domain: &str,
    issuer: Issuer,
) -> Result<PeerIdentity, Error> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| {
        Error::Unauthenticated(format!("the client certificate cannot be parsed: {e}"))
    })?;
    let serial = hex::encode(cert.tbs_certificate.raw_serial());
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();

    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("spiffe://") {
                    uris.push(*uri);
                }
            }
        }
    }
    if let Some(uri) = uris.first() {
        if uris.len() > 1 {
            return Err(Error::Unauthenticated(
                "the client certificate carries more than one SPIFFE id; issue it with exactly one"
                    .into(),
            ));
        }
        let rest = &uri["spiffe://".len()..];
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        // Quoted escaped and cut short: a CA may have signed any text into
        // the URI, and the message reaches the client's terminal.
        let shown = printable(uri, MAX_SHOWN_URI);
        if domain != trust_domain {
            return Err(Error::Unauthenticated(format!(
                "the client certificate's SPIFFE id {shown} is for trust domain \"{}\", this server serves {trust_domain:?}",
                printable(domain, MAX_SHOWN_URI)
            )));
        }
        let name = path.strip_prefix("client/").ok_or_else(|| {
            Error::Unauthenticated(format!(
                "the client certificate's SPIFFE id {shown} is not of the form spiffe://{trust_domain}/client/NAME"
            ))
        })?;
        check_entity_name("client", name)
            .map_err(|e| Error::Unauthenticated(format!("SPIFFE id {shown}: {e}")))?;
        return Ok(PeerIdentity {
            name: name.to_owned(),
            serial,
            source: IdentitySource::Spiffe,
            issuer,
            not_before,
            not_after,
        });
    }

    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| {
            Error::Unauthenticated(
                "the client certificate has neither a SPIFFE URI SAN nor a subject CN naming the client".into(),
            )
        })?;
    check_entity_name("client", cn)
        .map_err(|e| Error::Unauthenticated(format!("certificate CN: {e}")))?;
    Ok(PeerIdentity {
        name: cn.to_owned(),
        serial,
        source: IdentitySource::CommonName,
        issuer,
        not_before,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn cert(cn: Option<&str>, uris: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        params.distinguished_name = dn;
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn spiffe_id_wins_over_cn() {
        let id = identity_from_der(
            &cert(Some("other"), &["spiffe://td/client/web"]),
            "td",
            Issuer::BuiltIn,
        )
        .unwrap();
        assert_eq!(
            (id.name.as_str(), id.source),
            ("web", IdentitySource::Spiffe)
        );
    }

    #[test]
    fn cn_when_no_uri_san() {
        let id = identity_from_der(&cert(Some("legacy-app"), &[]), "td", Issuer::BuiltIn).unwrap();
        assert_eq!(
            (id.name.as_str(), id.source),
            ("legacy-app", IdentitySource::CommonName)
        );
    }

    #[test]
    fn refusals() {
        for (c, why) in [
            (cert(None, &["spiffe://other/client/web"]), "trust domain"),
            (cert(None, &["spiffe://td/workload/web"]), "form"),
            (cert(None, &["spiffe://td/client/a/b"]), "client"),
            (
                cert(None, &["spiffe://td/client/a", "spiffe://td/client/b"]),
                "more than one",
            ),
            (cert(None, &[]), "neither"),
            (cert(Some("bad name"), &[]), "CN"),
        ] {
            let err = identity_from_der(&c, "td", Issuer::BuiltIn)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{why}: {err}");
        }
        assert!(identity_from_der(b"garbage", "td", Issuer::BuiltIn).is_err());
    }

    #[test]
    fn a_refused_spiffe_id_is_quoted_escaped() {
        // Found by the property tests: the id was quoted raw, so a NUL, a
        // newline or an escape sequence signed into it reached the
        // client's terminal.
        for (uri, shown) in [
            ("spiffe://td/client/\0", "spiffe://td/client/\\0"),
            ("spiffe://td/client/a\nb", "spiffe://td/client/a\\nb"),
            (
                "spiffe://t\u{1b}[2J/client/a",
                "spiffe://t\\u{1b}[2J/client/a",
            ),
            ("spiffe://td/x\r", "spiffe://td/x\\r"),
        ] {
            let err = identity_from_der(&cert(None, &[uri]), "td", Issuer::BuiltIn)
                .unwrap_err()
                .to_string();
            assert!(!err.chars().any(char::is_control), "{err:?}");
            assert!(err.contains(shown), "{shown}: {err}");
        }
        let long = format!("spiffe://td/client/{}", "\n".repeat(1000));
        let err = identity_from_der(&cert(None, &[&long]), "td", Issuer::BuiltIn)
            .unwrap_err()
            .to_string();
        assert!(err.len() < 1000, "{} bytes", err.len());
    }
}

#[cfg(test)]
mod prop_tests;
