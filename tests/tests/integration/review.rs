//! Regression tests for the outside review's findings on the server and
//! CLI (issue 9): each reproduces an attack or misuse that worked before.

use std::path::{Path, PathBuf};

use crate::common::{cert_info, copy_identity, now_ms, rt, run_cmd, Identity, TestServer};
use secretfs_proto::v1::{self, secrets_client::SecretsClient};

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
    /// when given, a chosen serial (lower-case hex, as `client describe`
    /// and `cert_info` show it).
    fn issue(&self, dir: &Path, tag: &str, uri: &str, serial: Option<&str>) -> Identity {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = serial.map(|hex| {
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            rcgen::SerialNumber::from_slice(&bytes)
        });
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let out = Identity::in_dir(dir, tag);
        std::fs::write(&out.cert, cert.pem()).unwrap();
        std::fs::write(&out.key, key.serialize_pem()).unwrap();
        out
    }
}

/// The SPIFFE id (URI SAN) of a certificate file.
fn spiffe_id(cert: &Path) -> String {
    use x509_parser::prelude::*;
    let pem = std::fs::read(cert).unwrap();
    let (_, pem) = parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .expect("a SAN")
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .expect("a URI SAN")
}

#[test]
fn an_external_ca_certificate_with_the_admins_serial_is_not_the_admin() {
    let tmp = tempfile::tempdir().unwrap();
    let ext = ExternalCa::new(tmp.path());
    let s = TestServer::start_with(&["--client-ca", ext.pem.to_str().unwrap()]);
    let (serial, uri) = (cert_info(&s.admin.cert).serial, spiffe_id(&s.admin.cert));
    // Serials are public (in every certificate, in `client describe`).
    let forged = ext.issue(tmp.path(), "forged-admin", &uri, Some(&serial));
    let r = s.cli_as(&forged, &["secret", "list"], None);
    assert_ne!(r.code, 0, "a forged admin certificate was accepted");
    assert!(
        r.stderr.contains("not issued"),
        "the refusal names the problem: {}",
        r.stderr
    );
    // The same for a workload client made by the built-in CA.
    let web = s.add_client("web");
    let (serial, uri) = (cert_info(&web.cert).serial, spiffe_id(&web.cert));
    let forged = ext.issue(tmp.path(), "forged-web", &uri, Some(&serial));
    assert_ne!(s.cli_as(&forged, &["whoami"], None).code, 0);
    // The real ones still work, and the refusals are audited.
    s.cli_as(&web, &["whoami"], None).ok();
    let auth = s.audit_events("auth", &[]);
    let refused = auth.iter().filter(|e| e["allowed"] == false).count();
    assert!(refused >= 2, "{auth:?}");
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
    let old = copy_identity(&web, &s.tmp.path().join("old"));
    s.cli(&["client", "remove", "web"]).ok();
    std::fs::remove_file(&web.cert).unwrap();
    std::fs::remove_file(&web.key).unwrap();
    let new = s.add_client("web");
    s.cli_as(&new, &["whoami"], None).ok();
    let mut cmd = s.cmd_as(&old);
    cmd.arg("whoami");
    assert_ne!(run_cmd(cmd, None).code, 0);
}

#[test]
fn refusal_reports_get_the_servers_time_and_a_bounded_budget() {
    let s = TestServer::start();
    let app = s.add_client("app");
    // The SQLite file's growth is measured too (on SQLite only).
    let sqlite = s.database.is_none();
    let before = if sqlite {
        std::fs::metadata(s.db()).unwrap().len()
    } else {
        0
    };
    let refusal = |at_ms: i64| v1::Refusal {
        at_ms,
        pid: 4242,
        uid: 1000,
        // Long fields are cut, not stored whole.
        cgroup: "0::/user.slice/".to_owned() + &"\u{1b}x".repeat(1_000),
        path: "a".into(),
        reason: "not in container web".into(),
    };
    let start = now_ms();
    let (first, flood) = rt().block_on(async {
        let mut c = s.secrets_client(&app).await;
        let first = c
            .report_refusals(v1::ReportRefusalsRequest {
                refusals: vec![
                    refusal(0),
                    refusal(1),
                    refusal(32503680000000),
                    refusal(i64::MAX),
                ],
            })
            .await;
        let mut flood = Vec::new();
        for _ in 0..10 {
            let r = c
                .report_refusals(v1::ReportRefusalsRequest {
                    refusals: (0..1000).map(|_| refusal(0)).collect(),
                })
                .await;
            flood.push(r.err().map(|e| e.code()));
        }
        (first, flood)
    });
    first.unwrap();
    assert!(
        flood
            .iter()
            .all(|c| *c == Some(tonic::Code::ResourceExhausted)),
        "a flood is told it is over budget: {flood:?}"
    );
    let rows = s.audit_events("mount.refused", &[]);
    // The checks below hold for every row, so they must have rows to check.
    assert!(
        rows.len() >= 4,
        "the first report's 4 refusals were not recorded: {rows:?}"
    );
    assert!(
        rows.len() <= 200,
        "10 x 1000 reports recorded {} rows",
        rows.len()
    );
    for r in &rows {
        let at = r["at_ms"].as_i64().unwrap();
        assert!(
            at >= start - 60_000 && at <= now_ms() + 60_000,
            "the server stamps the time: {r}"
        );
        assert_eq!(r["actor"], "app");
        assert!(r["detail"].as_str().unwrap().len() <= 1024, "{r}");
    }
    if !sqlite {
        return;
    }
    let after = std::fs::metadata(s.db()).unwrap().len()
        + std::fs::metadata(s.state.join("secretfs.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    assert!(
        after - before < 4 << 20,
        "the database grew by {} bytes",
        after - before
    );
}

#[test]
fn times_the_cli_cannot_format_are_refused_and_never_crash_the_cli() {
    if crate::common::sqlite_only("writes out-of-range times into the SQLite file") {
        return;
    }
    let s = TestServer::start();
    s.add_secret("db/password", b"x");
    let refused = rt().block_on(async {
        let mut admin = s.admin_client().await;
        admin
            .create_secret(v1::CreateSecretRequest {
                name: "far".into(),
                content: b"x".to_vec(),
                expires_at: Some(1 << 62),
                ..Default::default()
            })
            .await
            .expect_err("an expiry beyond year 9999")
    });
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("year 9999"), "{refused:?}");
    // Whatever the server returns (an older server, an edited database),
    // the CLI prints it.
    let db = rusqlite::Connection::open(s.db()).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    db.execute("UPDATE secrets SET expires_at = ?1", [1i64 << 62])
        .unwrap();
    db.execute("UPDATE audit SET at_ms = ?1", [i64::MAX])
        .unwrap();
    drop(db);
    // Signed as a server holding the master key would (an edit without it
    // is a bad row, not served at all: see integrity.rs).
    crate::integrity::resign_secret(&s, "db/password");
    for args in [
        &["secret", "list"][..],
        &["secret", "describe", "db/password"],
        &["audit"],
        &["secret", "list", "-o", "json"],
        &["audit", "-o", "json"],
    ] {
        let r = s.cli(args);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
    }
}

#[test]
fn descriptions_cannot_carry_terminal_escapes() {
    if crate::common::sqlite_only("writes an escape into the SQLite file behind the server's back")
    {
        return;
    }
    let s = TestServer::start();
    s.cli_in(
        &[
            "secret",
            "add",
            "x",
            "--description",
            "\u{1b}[2J\u{1b}[31mred",
        ],
        b"v",
    )
    .fails(1, "control character");
    s.cli(&["group", "add", "g", "--description", "a\rb"])
        .fails(1, "control character");
    // One stored by other means is printed escaped.
    s.add_secret("y", b"v");
    let db = rusqlite::Connection::open(s.db()).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    db.execute(
        "UPDATE secrets SET description = ?1",
        ["\u{1b}]0;pwned\u{7}\u{1b}[31mred"],
    )
    .unwrap();
    drop(db);
    // Signed as a server holding the master key would (see integrity.rs).
    crate::integrity::resign_secret(&s, "y");
    for args in [&["secret", "describe", "y"][..], &["secret", "list"]] {
        let out = s.cli(args).ok();
        assert!(
            !out.stdout.contains('\u{1b}') && !out.stdout.contains('\u{7}'),
            "{args:?} printed a raw escape: {:?}",
            out.stdout
        );
    }
}

#[test]
fn the_database_files_are_private() {
    if crate::common::sqlite_only("checks the SQLite file's and WAL's modes") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mut s = TestServer::start();
    s.add_secret("x", b"v");
    let state = s.state.clone();
    let mode = |name: &str| {
        std::fs::metadata(state.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    for f in ["secretfs.db", "secretfs.db-wal", "secretfs.db-shm"] {
        assert_eq!(mode(f), 0o600, "{f}");
    }
    // A state directory made by an older version is fixed at start.
    s.stop();
    for f in ["secretfs.db", "secretfs.db-wal", "secretfs.db-shm"] {
        let p = s.state.join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    s.restart_on("127.0.0.1:0");
    s.add_secret("y", b"v");
    for f in ["secretfs.db", "secretfs.db-wal", "secretfs.db-shm"] {
        assert_eq!(mode(f), 0o600, "{f} after a restart");
    }
}

#[test]
fn the_servers_memory_is_locked_against_swap() {
    // The tests run as root (CAP_IPC_LOCK), where the server must lock.
    let s = TestServer::start();
    s.add_secret("x", b"v");
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
    let locked_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmLck in /proc/PID/status");
    assert!(locked_kb > 0, "nothing locked: {status}");
}

#[test]
fn idle_connections_cannot_crowd_out_a_real_client() {
    // systemd's default: 1,024 descriptors. Here fewer, for a quick test.
    let s = TestServer::start_wrapped(&["prlimit", "--nofile=300:300"], &[]);
    let addr: std::net::SocketAddr = s.addr.parse().unwrap();
    // Idle TCP connections that never start a TLS handshake.
    let idle: Vec<_> = (0..400)
        .filter_map(|_| std::net::TcpStream::connect(addr).ok())
        .collect();
    assert!(idle.len() >= 300, "only {} connections opened", idle.len());
    std::thread::sleep(std::time::Duration::from_millis(300));
    // A real client gets in well before the idle ones' handshakes time
    // out (10 s): the oldest handshakes are dropped to make room.
    let who = rt().block_on(async {
        let mut config = s.connect_config(&s.admin);
        config.connect_timeout = std::time::Duration::from_secs(5);
        let channel = secretfs_proto::connect(&config)
            .await
            .map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(v1::Empty {});
        req.set_timeout(std::time::Duration::from_secs(5));
        SecretsClient::new(channel)
            .who_am_i(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| e.to_string())
    });
    assert_eq!(who.expect("the real client was served").client, "admin");
    drop(idle);
}
