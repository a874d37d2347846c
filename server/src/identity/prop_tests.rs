//! Property tests of reading an identity from a client certificate: the
//! certificate comes from the TLS layer, verified against a CA, but an
//! operator's CA may sign whatever its users ask for, so any CN and any
//! URI SANs must give the identity a reference model names, or a clear
//! refusal; arbitrary or damaged DER never panics.

use proptest::prelude::*;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

use super::*;
use crate::prop_support::{config, deceptive, text};

const TRUST: &str = "example.org";

fn key() -> &'static KeyPair {
    static KEY: std::sync::OnceLock<KeyPair> = std::sync::OnceLock::new();
    KEY.get_or_init(|| KeyPair::generate().unwrap())
}

fn cert(cn: Option<&str>, uris: &[String]) -> Vec<u8> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if let Some(cn) = cn {
        dn.push(DnType::CommonName, cn);
    }
    params.distinguished_name = dn;
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI(u.as_str().try_into().expect("ASCII")))
        .collect();
    params.self_signed(key()).unwrap().der().to_vec()
}

/// The documented rule: exactly one `spiffe://` URI decides (trust domain
/// ours, path `client/NAME`, NAME a valid client name); with none, the
/// CN, if it is a valid client name.
fn model(cn: Option<&str>, uris: &[String]) -> Option<(String, IdentitySource)> {
    let spiffe: Vec<&String> = uris.iter().filter(|u| u.starts_with("spiffe://")).collect();
    let valid = |n: &str| check_entity_name("client", n).is_ok();
    match spiffe[..] {
        [] => cn
            .filter(|n| valid(n))
            .map(|n| (n.to_owned(), IdentitySource::CommonName)),
        [uri] => uri
            .strip_prefix(&format!("spiffe://{TRUST}/client/"))
            .filter(|n| valid(n))
            .map(|n| (n.to_owned(), IdentitySource::Spiffe)),
        _ => None,
    }
}

/// ASCII text (URIs are IA5Strings), often shaped like a SPIFFE id.
fn uri() -> impl Strategy<Value = String> {
    let ascii = prop::collection::vec(0u8..0x80, 0..40)
        .prop_map(|b| b.into_iter().map(char::from).collect::<String>());
    let domain = prop_oneof![
        Just(TRUST.to_owned()),
        Just("other.org".to_owned()),
        ascii.clone()
    ];
    let name = prop_oneof![Just("web-1".to_owned()), ascii.clone()];
    let path = prop_oneof![
        name.clone().prop_map(|n| format!("client/{n}")),
        name,
        Just("client/".to_owned()),
    ];
    prop_oneof![
        3 => (domain, path).prop_map(|(d, p)| format!("spiffe://{d}/{p}")),
        1 => Just("https://example.org/x".to_owned()),
        1 => ascii,
    ]
}

fn cn() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![Just("web-1".to_owned()), text()])
}

fn check_clear(e: &Error) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert!(!msg.chars().any(deceptive), "raw control text in {msg:?}");
    prop_assert!(msg.len() < 2048, "a {}-byte message", msg.len());
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_identity_follows_the_rule(cn in cn(), uris in prop::collection::vec(uri(), 0..3)) {
        // rcgen refuses an empty CN value; such a certificate has no CN.
        let cn = cn.filter(|c| !c.is_empty());
        let der = cert(cn.as_deref(), &uris);
        let got = identity_from_der(&der, TRUST, Issuer::External);
        let want = model(cn.as_deref(), &uris);
        match (&got, want) {
            (Ok(id), Some((name, source))) => {
                prop_assert_eq!(&id.name, &name);
                prop_assert_eq!(id.source, source);
                prop_assert_eq!(id.issuer, Issuer::External);
            }
            (Err(e), None) => check_clear(e)?,
            (got, want) => prop_assert!(false, "got {:?}, the rule says {:?}", got, want),
        }
    }

    #[test]
    fn prop_damaged_or_arbitrary_der_never_panics(
        at in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        noise in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let good = cert(Some("web-1"), &[format!("spiffe://{TRUST}/client/web-1")]);
        let mut flipped = good.clone();
        for (i, b) in &at {
            let i = i.index(flipped.len());
            flipped[i] = *b;
        }
        let short = &good[..cut.index(good.len())];
        for der in [&flipped[..], short, &noise] {
            match identity_from_der(der, TRUST, Issuer::BuiltIn) {
                Ok(id) => prop_assert!(check_entity_name("client", &id.name).is_ok()),
                Err(e) => check_clear(&e)?,
            }
        }
    }
}
