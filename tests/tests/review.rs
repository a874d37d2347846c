//! Regression tests for the outside review's findings on the server and
//! CLI (issue 9): each reproduces an attack or misuse that worked before.

mod common;

use std::path::{Path, PathBuf};

use common::{run_cmd, Identity, TestServer};

/// A CA of the operator's own (bring-your-own PKI), made in the test.
struct ExternalCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: PathBuf,
}

impl ExternalCa {
    fn new(dir: &Path) -> ExternalCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "operator ca");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.join("ext-ca.pem");
        std::fs::write(&pem, cert.pem()).unwrap();
        ExternalCa {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    /// A client certificate from this CA carrying `uri` as its SAN and,
    /// when given, a chosen serial.
    fn issue(&self, dir: &Path, tag: &str, uri: &str, serial: Option<Vec<u8>>) -> Identity {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = serial.map(|s| rcgen::SerialNumber::from_slice(&s));
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let out = Identity {
            name: tag.into(),
            cert: dir.join(format!("{tag}.pem")),
            key: dir.join(format!("{tag}.key")),
        };
        std::fs::write(&out.cert, cert.pem()).unwrap();
        std::fs::write(&out.key, key.serialize_pem()).unwrap();
        out
    }
}

/// The serial and SPIFFE id of a certificate file.
fn serial_and_uri(cert: &Path) -> (Vec<u8>, String) {
    use x509_parser::prelude::*;
    let pem = std::fs::read(cert).unwrap();
    let (_, pem) = parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    let uri = cert
        .subject_alternative_name()
        .unwrap()
        .expect("a SAN")
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .expect("a URI SAN");
    (cert.tbs_certificate.raw_serial().to_vec(), uri)
}

#[test]
fn an_external_ca_certificate_with_the_admins_serial_is_not_the_admin() {
    let tmp = tempfile::tempdir().unwrap();
    let ext = ExternalCa::new(tmp.path());
    let s = TestServer::start_with(&["--client-ca", ext.pem.to_str().unwrap()]);
    let (serial, uri) = serial_and_uri(&s.admin.cert);
    // Serials are public (in every certificate, in `client describe`).
    let forged = ext.issue(tmp.path(), "forged-admin", &uri, Some(serial));
    let r = s.cli_as(&forged, &["secret", "list"], None);
    assert_ne!(r.code, 0, "a forged admin certificate was accepted");
    assert!(
        r.stderr.contains("not issued"),
        "the refusal names the problem: {}",
        r.stderr
    );
    // The same for a workload client made by the built-in CA.
    let web = s.add_client("web");
    let (serial, uri) = serial_and_uri(&web.cert);
    let forged = ext.issue(tmp.path(), "forged-web", &uri, Some(serial));
    assert_ne!(s.cli_as(&forged, &["whoami"], None).code, 0);
    // The real ones still work, and the refusals are audited.
    s.cli_as(&web, &["whoami"], None).ok();
    let audit = s.cli(&["audit", "-o", "json"]).ok().json();
    let refused = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "auth" && e["allowed"] == false)
        .count();
    assert!(refused >= 2, "{audit}");
}

#[test]
fn an_external_client_accepts_its_own_ca_but_not_the_built_in_one() {
    let tmp = tempfile::tempdir().unwrap();
    let ext = ExternalCa::new(tmp.path());
    let s = TestServer::start_with(&["--client-ca", ext.pem.to_str().unwrap()]);
    // A built-in-CA client, removed, then re-added as external: its old
    // built-in certificate stays refused forever.
    let web = s.add_client("web");
    s.cli_as(&web, &["whoami"], None).ok();
    s.cli(&["client", "remove", "web"]).ok();
    s.cli(&["client", "add", "web", "--external"]).ok();
    let r = s.cli_as(&web, &["whoami"], None);
    assert_ne!(
        r.code, 0,
        "a removed client's certificate came back to life"
    );
    // Its certificate from the operator's CA is the way in.
    let td = s.cli(&["whoami", "-o", "json"]).ok().json()["trust_domain"]
        .as_str()
        .unwrap()
        .to_owned();
    let own = ext.issue(
        tmp.path(),
        "web-ext",
        &format!("spiffe://{td}/client/web"),
        None,
    );
    let who = s.cli_as(&own, &["whoami", "-o", "json"], None).ok().json();
    assert_eq!(who["client"], "web");
}

#[test]
fn a_removed_built_in_client_stays_refused_when_re_added() {
    let s = TestServer::start();
    let web = s.add_client("web");
    let old = Identity {
        name: "web".into(),
        cert: s.tmp.path().join("old-web.pem"),
        key: s.tmp.path().join("old-web.key"),
    };
    std::fs::copy(&web.cert, &old.cert).unwrap();
    std::fs::copy(&web.key, &old.key).unwrap();
    s.cli(&["client", "remove", "web"]).ok();
    std::fs::remove_file(&web.cert).unwrap();
    std::fs::remove_file(&web.key).unwrap();
    let new = s.add_client("web");
    s.cli_as(&new, &["whoami"], None).ok();
    let mut cmd = s.cmd_as(&old);
    cmd.arg("whoami");
    assert_ne!(run_cmd(cmd, None).code, 0);
}
