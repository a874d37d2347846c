//! verify-full against a real PostgreSQL serving a test CA's certificate.

use super::*;
use secretfs_pgtest::{PgCluster, TlsFiles};
use std::sync::OnceLock;

/// One TLS cluster for these tests, its certificate for localhost and
/// 127.0.0.1.
fn tls_cluster() -> &'static (TlsFiles, PgCluster) {
    static CLUSTER: OnceLock<(TlsFiles, PgCluster)> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let files = TlsFiles::new(&["localhost", "127.0.0.1"]);
        let pg = PgCluster::start(files.options());
        (files, pg)
    })
}

fn config(url: &str) -> tokio_postgres::Config {
    url.parse().unwrap()
}

fn refusal(r: Result<postgres::Client, StoreError>) -> StoreError {
    match r {
        Ok(_) => panic!("connected where verify-full must refuse"),
        Err(e) => e,
    }
}

fn tls_error(e: &StoreError) -> &PgTlsError {
    match e {
        StoreError::Backend(source) => source
            .downcast_ref::<PgTlsError>()
            .unwrap_or_else(|| panic!("not a TLS error: {e}")),
        other => panic!("not a TLS error: {other}"),
    }
}

#[test]
fn verify_full_connects_over_tls_by_name_and_by_address() {
    let (files, pg) = tls_cluster();
    let url = pg.database();
    for host in ["127.0.0.1", "localhost"] {
        let mut cfg = config(&url);
        cfg.host(host);
        let mut c = connect(&cfg, &files.ca).unwrap_or_else(|e| panic!("{host}: {e}"));
        let ssl: bool = c
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(ssl, "{host}: connected without TLS");
    }
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let (_, pg) = tls_cluster();
    let other = TlsFiles::new(&["localhost", "127.0.0.1"]);
    let e = refusal(connect(&config(&pg.database()), &other.ca));
    assert!(matches!(tls_error(&e), PgTlsError::Untrusted { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("not trusted") && text.contains("sslrootcert"),
        "{text}"
    );
}

#[test]
fn a_certificate_for_another_name_is_refused() {
    let (files, pg) = tls_cluster();
    let url = pg.database();
    // The right server, reached by address, under a name its certificate
    // does not have.
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("db.example")
        .hostaddr("127.0.0.1".parse().unwrap())
        .port(pg.port())
        .user(secretfs_pgtest::USER)
        .password(secretfs_pgtest::PASSWORD)
        .dbname(url.rsplit('/').next().unwrap());
    let e = refusal(connect(&cfg, &files.ca));
    assert!(matches!(tls_error(&e), PgTlsError::WrongName { .. }), "{e}");
    assert!(e.to_string().contains("db.example"), "{e}");
}

#[test]
fn a_server_without_tls_is_refused() {
    let (files, _) = tls_cluster();
    let plain = PgCluster::shared();
    let e = refusal(connect(&config(&plain.database()), &files.ca));
    assert!(matches!(tls_error(&e), PgTlsError::NoTls { .. }), "{e}");
    assert!(e.to_string().contains("ssl"), "{e}");
}

#[test]
fn an_unreadable_or_empty_ca_file_is_named() {
    let (_, pg) = tls_cluster();
    let cfg = config(&pg.database());
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let e = refusal(connect(&cfg, &missing));
    assert!(
        matches!(tls_error(&e), PgTlsError::CaUnreadable { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("missing.pem"), "{e}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let e = refusal(connect(&cfg, &empty));
    assert!(matches!(tls_error(&e), PgTlsError::CaInvalid { .. }), "{e}");
}

#[test]
fn a_wrong_password_is_the_servers_refusal_over_tls_and_not_printed() {
    let (files, pg) = tls_cluster();
    let mut cfg = config(&pg.database());
    cfg.password("not-the-password");
    let e = refusal(connect(&cfg, &files.ca));
    let StoreError::Backend(source) = &e else {
        panic!("not the server's refusal: {e}");
    };
    let db = source
        .downcast_ref::<postgres::Error>()
        .and_then(|e| e.as_db_error())
        .unwrap_or_else(|| panic!("not the server's refusal: {e}"));
    assert_eq!(
        db.code(),
        &postgres::error::SqlState::INVALID_PASSWORD,
        "{e}"
    );
    assert!(!format!("{e} {e:?}").contains("not-the-password"), "{e}");
}

/// Through the store's own connect: a wrong password over TLS reads as it
/// does without TLS (the login refused, what to check), not as a bare
/// storage error.
#[test]
fn a_wrong_password_over_tls_is_explained_as_without_tls() {
    let (files, pg) = tls_cluster();
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.database(),
        files.ca.display()
    );
    let cfg = crate::store::PgConfig::parse(
        &url,
        Some(zeroize::Zeroizing::new("not-the-password".to_owned())),
    )
    .unwrap();
    let Err(e) = super::super::conn::connect(&cfg) else {
        panic!("a wrong password was accepted");
    };
    let text = e.to_string();
    assert!(
        text.contains("check the user and the database password"),
        "{text}"
    );
    assert!(!format!("{e} {e:?}").contains("not-the-password"), "{text}");
}
