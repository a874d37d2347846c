//! TLS to PostgreSQL as libpq's `sslmode=verify-full`: TLS is required, the
//! server's certificate must chain to the CA in `sslrootcert`, and must
//! name the host connected to.
//!
//! rustls with the process's one crypto provider (ring) through
//! `tokio-postgres-rustls` (see docs/decisions.md, "The PostgreSQL store").
//! The connector is wrapped to learn whether the server agreed to TLS at
//! all, so each failure is told apart by type, not by message text.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use postgres::config::SslMode;
use postgres::tls::{MakeTlsConnect, TlsConnect};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::session::Pipelined;
use crate::store::StoreError;

/// Why a verify-full connection was refused on our side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgTlsError {
    #[error("cannot read the CA certificate for PostgreSQL {path} ({source}): sslrootcert must name a readable PEM file holding the CA that signed the database server's certificate")]
    CaUnreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate ({why}): sslrootcert must name the PEM file of the CA that signed the database server's certificate")]
    CaInvalid { path: String, why: String },
    #[error("the PostgreSQL server's certificate is not trusted: {why}; point sslrootcert at the CA that issued it (now {path})")]
    Untrusted { path: String, why: String },
    #[error("the PostgreSQL server's certificate does not name {host} (sslmode=verify-full checks the host name): connect with a host name the certificate names, or have one issued for {host}")]
    WrongName { host: String },
    #[error("the PostgreSQL server at {host} does not offer TLS, which sslmode=verify-full requires: turn ssl on in its postgresql.conf (with a server certificate), or connect to one that has it")]
    NoTls { host: String },
    #[error("TLS with the PostgreSQL server at {host} failed: {why}")]
    Handshake { host: String, why: String },
}

/// Connects to `config`'s server over TLS, verifying its certificate
/// against the CA in the PEM file `root_ca` and its host name.
pub(super) fn connect(
    config: &tokio_postgres::Config,
    root_ca: &Path,
) -> Result<postgres::Client, StoreError> {
    let (config, tls, progress, host) = verified(config, root_ca)?;
    postgres::Config::from(config)
        .connect(tls)
        .map_err(|e| classify(e, &host, root_ca, &progress))
}

/// As [`connect`], a session that pipelines, on `rt`.
pub(super) fn connect_pipelined(
    config: &tokio_postgres::Config,
    root_ca: &Path,
    rt: tokio::runtime::Runtime,
) -> Result<Pipelined, StoreError> {
    let (config, tls, progress, host) = verified(config, root_ca)?;
    Pipelined::connect(rt, config.connect(tls)).map_err(|e| classify(e, &host, root_ca, &progress))
}

/// What a verify-full connection is made with: `config` requiring TLS,
/// the connector trusting only `root_ca`, its progress, and the host name
/// the certificate must name.
fn verified(
    config: &tokio_postgres::Config,
    root_ca: &Path,
) -> Result<
    (
        tokio_postgres::Config,
        Tracked<MakeRustlsConnect>,
        Arc<Progress>,
        String,
    ),
    StoreError,
> {
    let connector = connector(root_ca).map_err(backend)?;
    let progress = Arc::new(Progress::default());
    let mut config = config.clone();
    config.ssl_mode(SslMode::Require);
    let host = host_of(&config);
    let tls = Tracked {
        inner: connector,
        progress: progress.clone(),
    };
    Ok((config, tls, progress, host))
}

fn backend(e: PgTlsError) -> StoreError {
    StoreError::Backend(Box::new(e))
}

/// The rustls client configuration trusting only `root_ca`.
fn connector(root_ca: &Path) -> Result<MakeRustlsConnect, PgTlsError> {
    let path = root_ca.display().to_string();
    let pem = std::fs::read(root_ca).map_err(|source| PgTlsError::CaUnreadable {
        path: path.clone(),
        source,
    })?;
    let invalid = |why: String| PgTlsError::CaInvalid {
        path: path.clone(),
        why,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| invalid(e.to_string()))?;
        roots.add(cert).map_err(|e| invalid(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid("no CERTIFICATE block".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgTlsError::Handshake {
            host: String::new(),
            why: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// The host name the certificate is checked against (the first host; the
/// store connects to one).
fn host_of(config: &tokio_postgres::Config) -> String {
    match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    }
}

/// A failed connection, told apart by type: rustls's verdict on the
/// certificate, the server's own refusal, the network, or (the server
/// never reached the handshake) no TLS at all.
fn classify(e: postgres::Error, host: &str, root_ca: &Path, progress: &Progress) -> StoreError {
    if e.as_db_error().is_some() {
        // The server's own refusal (password, database, role): the store
        // explains those, from the error itself.
        return StoreError::Backend(Box::new(e));
    }
    let mut io = None;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(inner) = err.downcast_ref::<std::io::Error>() {
            if let Some(tls) = inner
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
            {
                return backend(from_rustls(tls, host, root_ca));
            }
            io.get_or_insert(inner);
        }
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return backend(from_rustls(tls, host, root_ca));
        }
        source = err.source();
    }
    if let Some(io) = io {
        return StoreError::Unavailable(format!("cannot reach PostgreSQL at {host}: {io}"));
    }
    // Reached a server (no network error), asked it for TLS, and the
    // handshake never began: the server said no.
    if progress.asked.load(Ordering::SeqCst) && !progress.offered.load(Ordering::SeqCst) {
        return backend(PgTlsError::NoTls { host: host.into() });
    }
    backend(PgTlsError::Handshake {
        host: host.into(),
        why: e.to_string(),
    })
}

fn from_rustls(e: &rustls::Error, host: &str, root_ca: &Path) -> PgTlsError {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::NotValidForName)
        | rustls::Error::InvalidCertificate(C::NotValidForNameContext { .. }) => {
            PgTlsError::WrongName { host: host.into() }
        }
        rustls::Error::InvalidCertificate(why) => PgTlsError::Untrusted {
            path: root_ca.display().to_string(),
            why: match why {
                C::UnknownIssuer => "it is not signed by the CA in sslrootcert".into(),
                other => format!("{other:?}"),
            },
        },
        other => PgTlsError::Handshake {
            host: host.into(),
            why: other.to_string(),
        },
    }
}

/// How far a connection got: `asked`, a connection to a host was about to
/// be made (its configuration was accepted); `offered`, the server said
/// yes to TLS (the handshake starts only then).
#[derive(Default)]
struct Progress {
    asked: AtomicBool,
    offered: AtomicBool,
}

/// The connector, noting the [`Progress`].
struct Tracked<T> {
    inner: T,
    progress: Arc<Progress>,
}

impl<S, T: MakeTlsConnect<S>> MakeTlsConnect<S> for Tracked<T> {
    type Stream = T::Stream;
    type TlsConnect = Tracked<T::TlsConnect>;
    type Error = T::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        self.progress.asked.store(true, Ordering::SeqCst);
        Ok(Tracked {
            inner: self.inner.make_tls_connect(domain)?,
            progress: self.progress.clone(),
        })
    }
}

impl<S, T: TlsConnect<S>> TlsConnect<S> for Tracked<T> {
    type Stream = T::Stream;
    type Error = T::Error;
    type Future = T::Future;

    fn connect(self, stream: S) -> Self::Future {
        self.progress.offered.store(true, Ordering::SeqCst);
        self.inner.connect(stream)
    }
}

#[cfg(test)]
mod tests;
