//! Fixes from the server review of issue 11, end to end: a client renewing
//! itself cannot stretch its certificate's lifetime, and refused renewals
//! are in the audit log (bounded by the renewal budget).

use crate::common::*;

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

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
    let web = Identity {
        name: "web".into(),
        cert: out.join("web.pem"),
        key: out.join("web.key"),
    };
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
    rt().block_on(crate::certs::handshake(&s, None));
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
