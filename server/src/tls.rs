//! The mutual-TLS listener: TLS 1.3 only, a client certificate from a
//! trusted CA required on every connection, and the client's identity read
//! once per connection and handed to every request on it.
//!
//! tonic's own TLS server cannot restrict the protocol version, so we run
//! the handshakes ourselves (each in its own task, with a deadline, so a slow
//! or silent peer never holds up the accept loop) and feed finished streams
//! to tonic.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use crate::error::Error;
use crate::identity::{identity_from_der, Issuer, PeerIdentity};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request knows about its connection; found in its extensions.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The identity in the client certificate, or why it could not be read.
    pub identity: Arc<Result<PeerIdentity, String>>,
}

pub struct PeerStream {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn read_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Config(format!("cannot read {what}: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Config(format!("{what} holds no PEM certificate")));
    }
    Ok(certs)
}

/// What the listener trusts: the TLS configuration (our CA plus any the
/// operator brings), and a verifier for our CA alone, which tells which CA
/// issued a connection's certificate.
#[derive(Clone)]
pub struct ClientTrust {
    pub config: Arc<ServerConfig>,
    built_in: Arc<dyn ClientCertVerifier>,
}

impl ClientTrust {
    /// Which CA issued `chain` (already verified against all trusted CAs by
    /// the handshake). Verifying against the built-in CA alone, rather than
    /// comparing issuer names, is what makes an operator CA unable to pass
    /// for ours: names and serials can be copied, our CA's signature cannot.
    fn issuer(&self, chain: &[CertificateDer<'static>]) -> Issuer {
        match chain.split_first() {
            Some((leaf, intermediates))
                if self
                    .built_in
                    .verify_client_cert(leaf, intermediates, UnixTime::now())
                    .is_ok() =>
            {
                Issuer::BuiltIn
            }
            _ => Issuer::External,
        }
    }
}

fn verifier(
    pems: &[&[u8]],
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    let mut roots = RootCertStore::empty();
    for pem in pems {
        for cert in read_certs(pem, "the client CA bundle")? {
            roots.add(cert).map_err(|e| {
                Error::Config(format!("a client CA certificate is not usable: {e}"))
            })?;
        }
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::Config(format!("cannot set up client certificate checks: {e}")))
}

/// Builds the rustls configuration: TLS 1.3, client certificates required
/// and verified against our CA (`built_in_ca_pem`) and the operator's
/// (`external_ca_pems`).
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    built_in_ca_pem: &[u8],
    external_ca_pems: &[&[u8]],
) -> Result<ClientTrust, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut all = vec![built_in_ca_pem];
    all.extend_from_slice(external_ca_pems);
    let any_trusted = verifier(&all, &provider)?;
    let built_in = verifier(&[built_in_ca_pem], &provider)?;
    let certs = read_certs(cert_pem, "the server certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| Error::Config(format!("cannot read the server key: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(format!("TLS 1.3 is not available: {e}")))?
        .with_client_cert_verifier(any_trusted)
        .with_single_cert(certs, key)
        .map_err(|e| {
            Error::Config(format!(
                "the server certificate and key do not fit together: {e}"
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(ClientTrust {
        config: Arc::new(config),
        built_in,
    })
}

/// Accepts connections until the returned receiver is dropped; yields
/// streams whose handshake finished.
pub fn accept_loop(
    listener: TcpListener,
    trust: ClientTrust,
    trust_domain: String,
) -> mpsc::Receiver<Result<PeerStream, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(trust.config.clone());
    let trust = Arc::new(trust);
    let trust_domain: Arc<str> = trust_domain.into();
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let trust_domain = trust_domain.clone();
            let trust = trust.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let identity = match tls.get_ref().1.peer_certificates() {
                    Some(chain) if !chain.is_empty() => {
                        identity_from_der(&chain[0], &trust_domain, trust.issuer(chain))
                            .map_err(|e| e.to_string())
                    }
                    _ => Err("no client certificate was presented".to_owned()),
                };
                let info = PeerInfo {
                    remote: Some(remote),
                    identity: Arc::new(identity),
                };
                let _ = tx.send(Ok(PeerStream { inner: tls, info })).await;
            });
        }
    });
    rx
}
