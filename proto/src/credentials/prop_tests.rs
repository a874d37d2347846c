//! Property tests of checking a client's files (CA, certificate, key)
//! before connecting: whatever a damaged, cut or foreign file holds, the
//! check never panics and either passes or names what is wrong.

use std::sync::OnceLock;

use proptest::prelude::*;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

use super::*;
use crate::prop_support::config;

/// A CA, a client certificate it issued, and that certificate's key (PEM).
fn good() -> &'static [String; 3] {
    static FILES: OnceLock<[String; 3]> = OnceLock::new();
    FILES.get_or_init(|| {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["app".to_owned()]).unwrap();
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        leaf.not_before = now - time::Duration::days(1);
        leaf.not_after = now + time::Duration::days(90);
        let cert_pem = leaf.signed_by(&key, &issuer).unwrap().pem();
        [ca_pem, cert_pem, key.serialize_pem()]
    })
}

/// How one file is spoiled.
#[derive(Debug, Clone)]
enum Damage {
    Flip(Vec<(prop::sample::Index, u8)>),
    Cut(prop::sample::Index),
    Replace(Vec<u8>),
    /// Another of the three files in its place.
    Swap(usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4).prop_map(Damage::Flip),
        2 => any::<prop::sample::Index>().prop_map(Damage::Cut),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(Damage::Replace),
        1 => (0usize..3).prop_map(Damage::Swap),
    ]
}

fn spoil(files: &[String; 3], which: usize, damage: &Damage) -> Vec<u8> {
    let mut bytes = files[which].as_bytes().to_vec();
    match damage {
        Damage::Flip(flips) => {
            for (at, b) in flips {
                let i = at.index(bytes.len());
                bytes[i] = *b;
            }
            bytes
        }
        Damage::Cut(at) => bytes[..at.index(bytes.len())].to_vec(),
        Damage::Replace(other) => other.clone(),
        Damage::Swap(other) => files[*other].as_bytes().to_vec(),
    }
}

fn check(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Vec<FileWarning>, FileError> {
    let file = |path, pem| FileContents {
        path: Path::new(path),
        pem,
    };
    check_client_files(
        &ClientFiles {
            ca: file("ca.pem", ca),
            cert: file("app.pem", cert),
            key: file("app.key", key),
        },
        SystemTime::now(),
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_spoiled_client_files_are_named_never_a_panic(which in 0usize..3, damage in damage()) {
        let files = good();
        let spoiled = spoil(files, which, &damage);
        let mut pems: Vec<&[u8]> = files.iter().map(|f| f.as_bytes()).collect();
        pems[which] = &spoiled;
        if let Err(e) = check(pems[0], pems[1], pems[2]) {
            prop_assert!(!e.to_string().is_empty());
            prop_assert!(!e.explain().is_empty());
            let _ = e.hint();
        }
        let cert = FileContents { path: Path::new("app.pem"), pem: pems[1] };
        let key = FileContents { path: Path::new("app.key"), pem: pems[2] };
        if let Err(e) = key_matches(cert, key) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

#[test]
fn the_undamaged_files_pass() {
    // The property spoils files that pass as they are.
    let [ca, cert, key] = good();
    check(ca.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap();
}
