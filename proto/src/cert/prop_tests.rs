//! Property tests of reading certificates: the CLI and the mount read
//! certificates from files and from the server, so arbitrary or damaged
//! PEM and DER never panic and give a clear error; what a certificate
//! says (serial, validity, CN, key kind) reads back exactly; times convert
//! both ways without a panic anywhere in i64.

use std::sync::OnceLock;

use proptest::prelude::*;
use rcgen::{CertificateParams, DnType, KeyPair, SerialNumber};

use super::*;
use crate::prop_support::config;

/// The times an X.509 certificate can carry: years 0 to 9999.
const FIRST: i64 = -62_167_219_200;
const LAST: i64 = 253_402_300_799;

fn keys() -> &'static [(KeyPair, KeyKind)] {
    static KEYS: OnceLock<Vec<(KeyPair, KeyKind)>> = OnceLock::new();
    KEYS.get_or_init(|| {
        [
            (&rcgen::PKCS_ECDSA_P256_SHA256, KeyKind::EcdsaP256),
            (&rcgen::PKCS_ECDSA_P384_SHA384, KeyKind::EcdsaP384),
            (&rcgen::PKCS_ED25519, KeyKind::Ed25519),
        ]
        .into_iter()
        .map(|(alg, kind)| (KeyPair::generate_for(alg).unwrap(), kind))
        .collect()
    })
}

fn odt(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap()
}

/// A certificate with the given serial, validity, CN and key.
fn cert(serial: &[u8], not_before: i64, not_after: i64, cn: Option<&str>, key: usize) -> String {
    let mut params = CertificateParams::default();
    params.serial_number = Some(SerialNumber::from_slice(serial));
    params.not_before = odt(not_before);
    params.not_after = odt(not_after);
    // Not rcgen's default subject: exactly the CN asked for.
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.self_signed(&keys()[key].0).unwrap().pem()
}

fn good_pem() -> &'static str {
    static PEM: OnceLock<String> = OnceLock::new();
    PEM.get_or_init(|| cert(&[0x4a, 1], 1_700_000_000, 1_800_000_000, Some("web-1"), 0))
}

fn clear(e: &CertError) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert!(!msg.is_empty());
    prop_assert!(msg.len() < 2048, "a {}-byte message", msg.len());
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_what_a_certificate_says_reads_back(
        // A positive serial whose first byte keeps DER from padding it.
        serial in (1u8..0x80, prop::collection::vec(any::<u8>(), 0..19))
            .prop_map(|(first, rest)| [vec![first], rest].concat()),
        not_before in FIRST..=LAST,
        not_after in FIRST..=LAST,
        cn in prop::option::of("[^\u{0}]{1,40}"),
        key in 0usize..3,
    ) {
        let pem = cert(&serial, not_before, not_after, cn.as_deref(), key);
        let info = CertInfo::parse(pem.as_bytes()).unwrap();
        prop_assert_eq!(&info.serial, &hex(&serial));
        prop_assert_eq!(to_unix(info.not_before), not_before);
        prop_assert_eq!(to_unix(info.not_after), not_after);
        prop_assert_eq!(&info.common_name, &cn);
        prop_assert_eq!(info.key_kind, keys()[key].1);
        // And what is said about it never panics.
        let _ = info.lifetime();
        let _ = info.point_in_life(2.0 / 3.0);
        let _ = info.remaining(SystemTime::now());
        let _ = expiry_notice(info.not_after, SystemTime::now()).map(|n| n.to_string());
    }

    #[test]
    fn prop_damaged_certificates_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        noise in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let der = CertificateDer::from_pem_slice(good_pem().as_bytes()).unwrap().as_ref().to_vec();
        let mut flipped = der.clone();
        for (at, b) in &flips {
            let i = at.index(flipped.len());
            flipped[i] = *b;
        }
        let short = &der[..cut.index(der.len())];
        for bytes in [&flipped[..], short, &noise] {
            if let Err(e) = CertInfo::from_der(bytes) {
                clear(&e)?;
            }
            if let Err(e) = CertInfo::parse(bytes) {
                clear(&e)?;
            }
        }
        let mut pem = good_pem().as_bytes().to_vec();
        for (at, b) in &flips {
            let i = at.index(pem.len());
            pem[i] = *b;
        }
        if let Err(e) = CertInfo::parse(&pem) {
            clear(&e)?;
        }
    }

    #[test]
    fn prop_times_convert_without_panic(secs in any::<i64>(), now in any::<i64>()) {
        let t = from_unix(secs);
        if (FIRST..=LAST).contains(&secs) {
            prop_assert_eq!(to_unix(t), secs);
            let text = rfc3339_unix(secs);
            let back = time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339);
            prop_assert_eq!(back.map(|t| t.unix_timestamp()).ok(), Some(secs), "{}", text);
        }
        let _ = rfc3339(t);
        let _ = expiry_notice(t, from_unix(now)).map(|n| n.to_string());
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
