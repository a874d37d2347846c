//! Property tests of CSR signing: a CSR is whatever a caller sends
//! (`client add --csr`, `client renew`, a mount renewing itself), so
//! arbitrary text, PEM around arbitrary DER, and a good CSR damaged
//! anywhere never panic and are signed or refused with a clear error; a
//! CSR for any accepted key type, whatever subject and SANs it asks for,
//! gives a certificate for the requested name and the CSR's own key.

use std::sync::OnceLock;

use proptest::prelude::*;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use x509_parser::prelude::FromDer;

use super::*;
use crate::identity::{identity_from_der, Issuer};
use crate::prop_support::{config, deceptive, pem, text};

const TRUST: &str = "example.org";

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| Ca::generate(TRUST).unwrap().0)
}

/// One key of each accepted kind, made once.
fn keys() -> &'static [KeyPair] {
    static KEYS: OnceLock<Vec<KeyPair>> = OnceLock::new();
    KEYS.get_or_init(|| {
        [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ]
        .into_iter()
        .map(|alg| KeyPair::generate_for(alg).unwrap())
        .collect()
    })
}

/// A CSR by `key` asking for any subject and DNS/URI SANs.
fn csr(key: &KeyPair, cn: &str, sans: &[String]) -> String {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if !cn.is_empty() {
        dn.push(DnType::CommonName, cn);
    }
    params.distinguished_name = dn;
    params.subject_alt_names = sans
        .iter()
        .filter_map(|s| Some(SanType::URI(s.as_str().try_into().ok()?)))
        .collect();
    params.serialize_request(key).unwrap().pem().unwrap()
}

fn good_der() -> &'static [u8] {
    static DER: OnceLock<Vec<u8>> = OnceLock::new();
    DER.get_or_init(|| {
        let pem = csr(&keys()[0], "web-1", &[]);
        let der: CertificateSigningRequestDer<'static> =
            PemObject::from_pem_slice(pem.as_bytes()).unwrap();
        der.as_ref().to_vec()
    })
}

fn cert_der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

fn spki_of_cert(der: &[u8]) -> Vec<u8> {
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    c.public_key().subject_public_key.data.to_vec()
}

fn check_refusal(e: &Error) -> Result<(), TestCaseError> {
    prop_assert!(matches!(e, Error::BadCsr { .. }), "{e:?}");
    let msg = e.to_string();
    prop_assert!(!msg.chars().any(deceptive), "raw control text in {msg:?}");
    prop_assert!(msg.len() < 4096, "a {}-byte message", msg.len());
    Ok(())
}

/// Signs `csr_pem` for `web-1`; a certificate must be for `web-1` and the
/// key of `spki` (when known).
fn sign(csr_pem: &str, spki: Option<&[u8]>) -> Result<(), TestCaseError> {
    match ca().sign_csr(TRUST, "web-1", csr_pem, 1) {
        Ok(issued) => {
            let der = cert_der(&issued.cert_pem);
            let id = identity_from_der(&der, TRUST, Issuer::BuiltIn);
            let name = id.map(|i| i.name).ok();
            prop_assert_eq!(name.as_deref(), Some("web-1"));
            if let Some(spki) = spki {
                prop_assert_eq!(spki_of_cert(&der), spki);
            }
            Ok(())
        }
        Err(e) => check_refusal(&e),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_any_subject_gets_the_requested_name_and_the_csrs_key(
        key in 0usize..3,
        cn in text(),
        sans in prop::collection::vec(text(), 0..3),
    ) {
        let key = &keys()[key];
        let pem = csr(key, &cn, &sans);
        let issued = ca().sign_csr(TRUST, "web-1", &pem, 1);
        prop_assert!(issued.is_ok(), "{:?}", issued.err());
        sign(&pem, Some(key.public_key_raw()))?;
    }

    #[test]
    fn prop_damaged_csrs_are_refused_or_signed_never_a_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        noise in prop::collection::vec(any::<u8>(), 0..300),
        garbage in text(),
    ) {
        let mut flipped = good_der().to_vec();
        for (at, b) in &flips {
            let i = at.index(flipped.len());
            flipped[i] = *b;
        }
        let short = &good_der()[..cut.index(good_der().len())];
        for der in [&flipped[..], short, &noise] {
            sign(&pem("CERTIFICATE REQUEST", der), None)?;
        }
        sign(&garbage, None)?;
    }
}

#[test]
fn an_undamaged_csr_is_signed() {
    // The damaged-CSR property starts from a CSR that is accepted.
    let issued = ca()
        .sign_csr(TRUST, "web-1", &pem("CERTIFICATE REQUEST", good_der()), 1)
        .unwrap();
    assert_eq!(
        spki_of_cert(&cert_der(&issued.cert_pem)),
        keys()[0].public_key_raw()
    );
}
