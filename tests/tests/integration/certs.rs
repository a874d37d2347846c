//! Certificates over their whole life, as an operator meets them: a client
//! renews itself (old and new both work until the client is removed), an
//! admin issues for another client, break-glass admin certificates minted
//! on the server host, the server's certificate reissued with a new name
//! and served without a restart, every CSR key type really connecting,
//! refused TLS handshakes in the audit log, and expiry shown where an
//! operator looks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secretfs_proto::cert::{to_unix, CertInfo};

use crate::common::*;

#[test]
fn a_client_renews_itself_keeps_its_groups_and_both_certificates_work_until_removed() {
    let s = TestServer::start();
    s.add_secret("db/password", b"hunter2");
    let web = s.add_client("web");
    s.grant("g", &["web"], &["db/password"]);
    let old = copy_identity(&web, &s.tmp.path().join("old"));
    let old_serial = cert_info(&web.cert).serial;

    // No --out: the files the environment points at are replaced in place.
    let r = s
        .cli_as(&web, &["client", "renew", "-o", "json"], None)
        .ok();
    let CertInfo {
        serial: new_serial,
        not_after,
        ..
    } = cert_info(&web.cert);
    assert_ne!(
        new_serial, old_serial,
        "the certificate file was not replaced"
    );
    assert_eq!(r.json()["cert_serial"], new_serial.as_str());
    assert_ne!(
        std::fs::read(&web.key).unwrap(),
        std::fs::read(&old.key).unwrap(),
        "a renewal makes a new key"
    );
    let days = (to_unix(not_after) - now_s()) / 86_400;
    assert!((363..=365).contains(&days), "default lifetime: {days} days");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&web.key).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // Both certificates read the secret, through the same group.
    for who in [&web, &old] {
        let r = s.cli_as(who, &["read", "db/password"], None).ok();
        assert_eq!(r.stdout, "hunter2");
    }
    let me = s.cli_as(&web, &["whoami", "-o", "json"], None).ok().json();
    assert_eq!(me["cert_serial"], new_serial.as_str());
    assert!(me["cert_not_after"].is_string(), "{me}");
    let text = s.cli_as(&old, &["whoami"], None).ok().stdout;
    assert!(
        text.contains(&format!("certificate {old_serial}, expires")),
        "{text}"
    );

    // The newest certificate is the one listed; the groups are the same.
    let d = s
        .cli(&["client", "describe", "web", "-o", "json"])
        .ok()
        .json();
    assert_eq!(d["cert_serial"], new_serial.as_str());
    assert_eq!(d["groups"], serde_json::json!(["g"]));
    let list = s.cli(&["client", "list", "-o", "json"]).ok().json();
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "web")
        .unwrap();
    assert_eq!(listed["cert_not_after"], d["cert_not_after"]);
    assert!(listed["cert_not_after"].is_string(), "{listed}");
    let table = s.cli(&["client", "list"]).ok().stdout;
    assert!(table.contains("CERT EXPIRES"), "{table}");
    let renewals = s.audit_events("client.renew", &["--client", "web"]);
    assert_eq!(renewals.len(), 1, "{renewals:?}");
    assert_eq!(renewals[0]["actor"], "web");
    assert!(renewals[0]["detail"]
        .as_str()
        .unwrap()
        .contains(&new_serial));

    // Removing the client locks out both certificates.
    s.cli(&["client", "remove", "web"]).ok();
    for who in [&web, &old] {
        s.cli_as(who, &["read", "db/password"], None)
            .fails(1, "removed");
    }
}

#[test]
fn an_admin_issues_for_another_client_and_external_clients_are_refused() {
    let s = TestServer::start();
    s.add_client("api");
    s.grant("g", &["api"], &[]);
    let out = s.tmp.path().join("issued");
    let out_s = out.to_str().unwrap();
    s.cli(&["client", "renew", "api", "--days", "7", "--out", out_s])
        .ok();
    let api = Identity::in_dir(&out, "api");
    let CertInfo {
        serial, not_after, ..
    } = cert_info(&api.cert);
    let days = (to_unix(not_after) - now_s()) / 86_400;
    assert!((6..=7).contains(&days), "--days 7 gave {days} days");
    assert_eq!(
        std::fs::read(out.join("ca.pem")).unwrap(),
        std::fs::read(s.state.join("ca.pem")).unwrap()
    );
    let me = s.cli_as(&api, &["whoami", "-o", "json"], None).ok().json();
    assert_eq!(me["client"], "api");
    assert_eq!(me["cert_serial"], serial.as_str());
    // Within 30 days of expiry, the CLI says so on stderr.
    let r = s.cli_as(&api, &["whoami"], None).ok();
    assert!(
        r.stderr.contains("warning: the client certificate") && r.stderr.contains("client renew"),
        "{}",
        r.stderr
    );
    let ev = s.audit_events("client.renew", &["--client", "api"]);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["actor"], "admin");
    let d = s
        .cli(&["client", "describe", "api", "-o", "json"])
        .ok()
        .json();
    assert_eq!(d["groups"], serde_json::json!(["g"]));

    // A non-admin cannot issue for someone else.
    s.cli_as(&api, &["client", "renew", "admin", "--out", out_s], None)
        .fails(1, "not an admin");
    // Lifetimes: 0 and over the cap refused by the CLI, and the cap by the
    // server too for callers that skip the CLI.
    s.cli(&["client", "renew", "api", "--days", "0", "--out", out_s])
        .fails(2, "1..=3650");
    s.cli(&["client", "renew", "api", "--days", "5000", "--out", out_s])
        .fails(2, "1..=3650");
    let key = rcgen::KeyPair::generate().unwrap();
    let csr_pem = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let refused = rt().block_on(async {
        s.admin_client()
            .await
            .renew_client_certificate(secretfs_proto::v1::RenewClientCertificateRequest {
                name: "api".into(),
                csr_pem,
                days: 5000,
            })
            .await
            .unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("at most 3650 days"),
        "{refused:?}"
    );
    // A client whose certificates come from the operator's own CA.
    s.cli(&["client", "add", "ext", "--external"]).ok();
    s.cli(&["client", "renew", "ext", "--out", out_s])
        .fails(1, "external");
    s.cli(&["client", "renew", "nobody", "--out", out_s])
        .fails(1, "not found");
}

#[test]
fn break_glass_admin_certificates_work_against_the_running_server() {
    let s = TestServer::start();
    let out = s.tmp.path().join("glass");
    let state = s.state.to_str().unwrap();
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "admin-cert", "--state-dir", state, "--out"])
        .arg(&out)
        .args(["--name", "root"]);
    let r = run_cmd(cmd, None).ok();
    assert!(r.stdout.contains("export SECRETFS_CERT="), "{}", r.stdout);
    let root = Identity::in_dir(&out, "root");
    let list = s
        .cli_as(&root, &["client", "list", "-o", "json"], None)
        .ok()
        .json();
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    assert!(names.contains(&"root".into()), "{list}");
    let created = s.audit_events("client.create", &["--client", "root"]);
    assert_eq!(created[0]["actor"], "local:admin-cert");

    // The existing admin gets a new certificate beside its old one.
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "admin-cert", "--state-dir", state, "--out"])
        .arg(&out)
        .args(["-o", "json"]);
    let j = run_cmd(cmd, None).ok().json();
    assert_eq!(j["created"], false);
    let admin2 = Identity::in_dir(&out, "admin");
    s.cli_as(&admin2, &["group", "add", "ops"], None).ok();
    s.cli(&["group", "list"]).ok();
    let renewed = s.audit_events("client.renew", &["--client", "admin"]);
    assert_eq!(renewed[0]["actor"], "local:admin-cert");

    // Not for a client that is not an admin.
    s.add_client("web");
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "admin-cert", "--state-dir", state, "--out"])
        .arg(&out)
        .args(["--name", "web"]);
    run_cmd(cmd, None).fails(1, "not an admin");

    // Run as another user than the state directory's owner, the files it
    // writes would not be readable by the server: refused up front.
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&s.state).unwrap());
    std::os::unix::fs::chown(&s.state, Some(owner + 12_345), None).unwrap();
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "admin-cert", "--state-dir", state, "--out"])
        .arg(&out);
    let refused = run_cmd(cmd, None);
    let mut cmd = crate::common::secretfs();
    cmd.args([
        "server",
        "reissue-cert",
        "--san",
        "localhost",
        "--state-dir",
        state,
    ]);
    let refused_too = run_cmd(cmd, None);
    std::os::unix::fs::chown(&s.state, Some(owner), None).unwrap();
    refused.fails(1, &format!("belongs to uid {}", owner + 12_345));
    refused_too.fails(1, "run it as the server's user");
}

#[test]
fn a_reissued_server_certificate_with_a_new_name_is_served_without_a_restart() {
    let mut s = TestServer::start();
    // Listen on every loopback address, so 127.0.0.2 reaches the server.
    s.stop();
    s.restart_on("0.0.0.0:0");
    let port = s.addr.rsplit(':').next().unwrap().to_owned();
    let pid = s.pid();
    let as_admin_at = |host: &str| {
        let mut cmd = s.cmd_as(&s.admin);
        cmd.env("SECRETFS_SERVER", format!("https://{host}:{port}"))
            .args(["whoami"]);
        run_cmd(cmd, None)
    };
    as_admin_at("127.0.0.1").ok();
    as_admin_at("127.0.0.2").fails(1, "server reissue-cert");

    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "reissue-cert", "--state-dir"])
        .arg(&s.state)
        .args([
            "--san",
            "127.0.0.1",
            "--san",
            "127.0.0.2",
            "--san",
            "localhost",
        ]);
    run_cmd(cmd, None).ok();
    assert!(
        eventually(Duration::from_secs(20), || as_admin_at("127.0.0.2").code
            == 0),
        "the new name was not served; log:\n{}",
        s.log()
    );
    as_admin_at("127.0.0.1").ok();
    assert_eq!(s.pid(), pid, "the server was not restarted");
    assert!(
        s.log().contains("server certificate changed on disk"),
        "{}",
        s.log()
    );

    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "reissue-cert", "--state-dir"])
        .arg(&s.state);
    run_cmd(cmd, None).fails(2, "--san");
}

/// A key of `kind` and a CSR for it (signed with openssl's default digest,
/// SHA-256, also for P-384: the case that used to yield a P-256 certificate).
fn key_and_csr(dir: &Path, name: &str, genpkey: &[&str]) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let mut args = vec!["genpkey"];
    args.extend_from_slice(genpkey);
    args.extend_from_slice(&["-out", key.to_str().unwrap()]);
    openssl(&args);
    openssl(&[
        "req",
        "-new",
        "-key",
        key.to_str().unwrap(),
        "-subj",
        &format!("/CN={name}"),
        "-out",
        csr.to_str().unwrap(),
    ]);
    (key, csr)
}

#[test]
fn every_accepted_csr_key_type_connects_and_the_rest_are_refused_with_one_list() {
    let s = TestServer::start();
    let dir = s.tmp.path().join("csr");
    std::fs::create_dir_all(&dir).unwrap();
    let accepted: &[(&str, &[&str])] = &[
        (
            "p256",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        ),
        (
            "p384",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
        ),
        ("ed25519", &["-algorithm", "ED25519"]),
        (
            "rsa2048",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        ),
        (
            "rsa3072",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"],
        ),
    ];
    for (name, genpkey) in accepted {
        let (key, csr) = key_and_csr(&dir, name, genpkey);
        s.cli(&[
            "client",
            "add",
            name,
            "--csr",
            csr.to_str().unwrap(),
            "--out",
            dir.to_str().unwrap(),
        ])
        .ok();
        let who = Identity {
            name: name.to_string(),
            cert: dir.join(format!("{name}.pem")),
            key,
        };
        // A real handshake with the issued certificate and the openssl key.
        let me = s.cli_as(&who, &["whoami", "-o", "json"], None).ok().json();
        assert_eq!(me["client"], *name, "{name}");
        // And a renewal for the same key type through --csr.
        let again = dir.join("again");
        s.cli_as(
            &who,
            &[
                "client",
                "renew",
                "--csr",
                csr.to_str().unwrap(),
                "--out",
                again.to_str().unwrap(),
            ],
            None,
        )
        .ok();
        let renewed = Identity {
            name: name.to_string(),
            cert: again.join(format!("{name}.pem")),
            key: who.key.clone(),
        };
        assert!(
            !again.join(format!("{name}.key")).exists(),
            "--csr writes no key"
        );
        s.cli_as(&renewed, &["whoami"], None).ok();
    }
    let refused: &[(&str, &[&str], &str)] = &[
        (
            "p521",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"],
            "curve",
        ),
        (
            "rsa1024",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
            "1024 bits",
        ),
    ];
    for (name, genpkey, why) in refused {
        let (_, csr) = key_and_csr(&dir, name, genpkey);
        let r = s
            .cli(&[
                "client",
                "add",
                name,
                "--csr",
                csr.to_str().unwrap(),
                "--out",
                dir.to_str().unwrap(),
            ])
            .fails(1, why);
        assert!(
            r.stderr
                .contains("ECDSA P-256, ECDSA P-384, Ed25519, or RSA of 2048 to 8192 bits"),
            "{}",
            r.stderr
        );
        s.cli(&["client", "describe", name]).fails(1, "not found");
    }
    // DSA: a key type with no place in TLS 1.3 at all.
    let params = dir.join("dsa.params");
    openssl(&[
        "genpkey",
        "-genparam",
        "-algorithm",
        "DSA",
        "-pkeyopt",
        "dsa_paramgen_bits:1024",
        "-out",
        params.to_str().unwrap(),
    ]);
    let (_, csr) = key_and_csr(&dir, "dsa", &["-paramfile", params.to_str().unwrap()]);
    s.cli(&[
        "client",
        "add",
        "dsa",
        "--csr",
        csr.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
    ])
    .fails(
        1,
        "ECDSA P-256, ECDSA P-384, Ed25519, or RSA of 2048 to 8192 bits",
    );
}

/// A certificate for `name` from this server's CA that expired years ago.
fn expired_identity(s: &TestServer, dir: &Path, name: &str) -> Identity {
    s.cert_from_state_ca(
        name,
        dir,
        rcgen::date_time_ymd(2020, 1, 1),
        rcgen::date_time_ymd(2021, 1, 1),
    )
}

/// One TLS 1.3 handshake with the server, presenting `who`'s certificate
/// (or none), with no check of our own first: what the server decides is
/// what is tested. The outcome on this side does not matter.
async fn handshake(s: &TestServer, who: Option<&Identity>) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(s.state.join("ca.pem")).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots);
    let config = match who {
        Some(who) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&who.cert)
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_file(&who.key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap().to_owned();
    if let Ok(mut tls) = connector.connect(name, tcp).await {
        // TLS 1.3: the server judges the client's certificate after the
        // client thinks it is done; its alert arrives on the first read.
        let mut byte = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut byte)).await;
    }
}

#[test]
fn refused_tls_handshakes_are_audited_with_the_peer_address_and_the_cause() {
    let s = TestServer::start();
    let dir = s.tmp.path().join("bad");
    // Another CA (of another name): a second state directory's admin.
    let other = s.tmp.path().join("other-state");
    let mut init = crate::common::secretfs();
    init.args([
        "server",
        "init",
        "--trust-domain",
        "other.test",
        "--state-dir",
    ])
    .arg(&other);
    run_cmd(init, None).ok();
    let stranger = Identity::in_dir(&other, "admin");
    let expired = expired_identity(&s, &dir, "old");
    // The server's own certificate is for server authentication only.
    let wrong_usage = Identity::in_dir(&s.state, "server");
    rt().block_on(async {
        for who in [Some(&stranger), Some(&expired), Some(&wrong_usage), None] {
            handshake(&s, who).await;
        }
    });
    // The CLI as the stranger fails too (and is told why on its side).
    assert_ne!(s.cli_as(&stranger, &["whoami"], None).code, 0);

    let wanted = [
        "unknown CA",
        "expired",
        "not for client authentication",
        "no client certificate",
    ];
    let mut events = Vec::new();
    let found = eventually(Duration::from_secs(20), || {
        events = s.audit_events("tls.refused", &[]);
        wanted.iter().all(|w| {
            events
                .iter()
                .any(|e| e["detail"].as_str().unwrap_or("").contains(w))
        })
    });
    assert!(found, "missing causes in {events:#?}");
    for e in &events {
        assert_eq!(e["allowed"], false);
        let detail = e["detail"].as_str().unwrap();
        assert!(detail.starts_with("from 127.0.0.1:"), "{detail}");
        assert!(
            e["actor"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{e}"
        );
    }
}

#[test]
fn a_flood_of_refused_handshakes_is_bounded_in_the_audit_log() {
    let s = TestServer::start();
    let expired = expired_identity(&s, &s.tmp.path().join("flood"), "old");
    rt().block_on(async {
        for _ in 0..25 {
            handshake(&s, Some(&expired)).await;
        }
    });
    // Every refusal reaches the log; at most 10 a minute from one peer
    // reach the audit log.
    assert!(
        eventually(Duration::from_secs(20), || s
            .log()
            .matches("TLS handshake refused")
            .count()
            >= 25),
        "{}",
        s.log()
    );
    assert!(eventually(Duration::from_secs(20), || s
        .audit_events("tls.refused", &[])
        .len()
        >= 10));
    let n = s.audit_events("tls.refused", &[]).len();
    assert_eq!(n, 10, "one peer records at most 10 refusals a minute");
}

#[test]
fn the_server_warns_when_its_certificate_expires_within_30_days() {
    let mut s = TestServer::start();
    assert!(!s.log().contains("expires within 30 days"), "{}", s.log());
    s.stop();
    // A server certificate from the same CA that lasts 10 days.
    let dir = s.tmp.path().join("short");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, csr) = key_and_csr(
        &dir,
        "server",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let ext = dir.join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n",
    )
    .unwrap();
    let cert = dir.join("server.pem");
    let state = |f: &str| s.state.join(f).to_str().unwrap().to_owned();
    openssl(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().unwrap(),
        "-CA",
        &state("ca.pem"),
        "-CAkey",
        &state("ca.key"),
        "-CAcreateserial",
        "-days",
        "10",
        "-extfile",
        ext.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    std::fs::copy(&cert, s.state.join("server.pem")).unwrap();
    std::fs::copy(&key, s.state.join("server.key")).unwrap();
    s.restart_on("127.0.0.1:0");
    s.cli(&["whoami"]).ok();
    assert!(
        eventually(Duration::from_secs(20), || s
            .log()
            .contains("the server certificate expires within 30 days")),
        "{}",
        s.log()
    );
    assert!(s.log().contains("server reissue-cert"), "{}", s.log());
}

#[test]
fn a_client_renews_itself_at_most_10_times_an_hour() {
    let s = TestServer::start();
    let web = s.add_client("web");
    let csr = || {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    };
    rt().block_on(async {
        let mut c = s.secrets_client(&web).await;
        let mut serials = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let r = c
                .renew_certificate(secretfs_proto::v1::RenewCertificateRequest {
                    csr_pem: csr(),
                    days: 1,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(r.not_after - now_s() <= 86_400 + 60);
            serials.insert(r.serial);
        }
        assert_eq!(serials.len(), 10, "each renewal is a new serial");
        let err = c
            .renew_certificate(secretfs_proto::v1::RenewCertificateRequest {
                csr_pem: csr(),
                days: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(
            err.message().contains("10 times in the last hour"),
            "{err:?}"
        );
    });
    // An admin still can.
    s.cli(&[
        "client",
        "renew",
        "web",
        "--out",
        s.tmp.path().join("x").to_str().unwrap(),
    ])
    .ok();
}

// A renewal's bounds: the lifetime presented, and audited refusals.

fn csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

fn renew(days: u32, csr_pem: String) -> secretfs_proto::v1::RenewCertificateRequest {
    secretfs_proto::v1::RenewCertificateRequest { csr_pem, days }
}

#[test]
fn a_client_cannot_renew_itself_for_longer_than_the_certificate_it_presents() {
    let s = TestServer::start();
    let out = s.tmp.path().join("short");
    s.cli(&[
        "client",
        "add",
        "web",
        "--days",
        "7",
        "--out",
        out.to_str().unwrap(),
    ])
    .ok();
    let web = Identity::in_dir(&out, "web");
    rt().block_on(async {
        let mut c = s.secrets_client(&web).await;
        let err = c.renew_certificate(renew(3650, csr())).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(
            err.message()
                .contains("at most as long as the one presented (7 days)"),
            "{err:?}"
        );
        let err = c.renew_certificate(renew(8, csr())).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        // 0 = the same lifetime as the presented certificate; 7 is allowed.
        for days in [0, 7] {
            let r = c
                .renew_certificate(renew(days, csr()))
                .await
                .unwrap()
                .into_inner();
            let left = r.not_after - now_s();
            assert!(
                left > 6 * 86_400 && left <= 7 * 86_400 + 60,
                "{days}: {left}"
            );
        }
        // A bad CSR is refused, and counts.
        let err = c
            .renew_certificate(renew(1, "not a CSR".into()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    });
    let refused: Vec<_> = s
        .audit_events("client.renew", &["--client", "web"])
        .into_iter()
        .filter(|e| e["allowed"] == false)
        .collect();
    let details: Vec<_> = refused
        .iter()
        .map(|e| e["detail"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(
        details
            .iter()
            .any(|d| d.contains("asked for 3650 days, at most 7")),
        "{details:?}"
    );
    assert!(
        details
            .iter()
            .any(|d| d.contains("the CSR cannot be signed")),
        "{details:?}"
    );
    assert!(refused.iter().all(|e| e["actor"] == "web"), "{refused:?}");
    // An admin may still issue it a long one.
    s.cli(&[
        "client",
        "renew",
        "web",
        "--days",
        "3650",
        "--out",
        s.tmp.path().join("x").to_str().unwrap(),
    ])
    .ok();
}

#[test]
fn over_budget_renewals_are_audited_once_an_hour() {
    let s = TestServer::start();
    let web = s.add_client("web");
    rt().block_on(async {
        let mut c = s.secrets_client(&web).await;
        for _ in 0..10 {
            c.renew_certificate(renew(1, csr())).await.unwrap();
        }
        for _ in 0..3 {
            let err = c.renew_certificate(renew(1, csr())).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        }
    });
    let over: Vec<_> = s
        .audit_events("client.renew", &["--client", "web"])
        .into_iter()
        .filter(|e| e["allowed"] == false)
        .collect();
    assert_eq!(over.len(), 1, "{over:?}");
    assert!(
        over[0]["detail"]
            .as_str()
            .unwrap()
            .contains("over the hourly renewal budget"),
        "{over:?}"
    );
}

#[test]
fn bytes_that_are_not_tls_are_not_audited_as_refused_handshakes() {
    use std::io::{Read, Write};
    use std::time::Duration;
    let s = TestServer::start();
    // An HTTP request to the gRPC port, as a scanner would send; the server
    // closes the connection.
    let mut tcp = std::net::TcpStream::connect(&s.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let _ = tcp.read_to_end(&mut Vec::new());
    // Then a real refusal, which is audited after the probe would be.
    rt().block_on(handshake(&s, None));
    let mut events = Vec::new();
    let found = eventually(Duration::from_secs(20), || {
        events = s.audit_events("tls.refused", &[]);
        !events.is_empty()
    });
    assert!(found, "the refused handshake was not audited");
    assert_eq!(events.len(), 1, "{events:#?}");
    assert!(
        events[0]["detail"]
            .as_str()
            .unwrap()
            .contains("no client certificate"),
        "{events:#?}"
    );
}
