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
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use crate::cert_reload::ReloadingCert;
use crate::error::Error;
use crate::identity::{identity_from_der, Issuer, PeerIdentity};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections still in their TLS handshake (not yet authenticated) at
/// once; beyond it, the oldest is dropped to make room.
const MAX_HANDSHAKES: usize = 128;

/// Handshakes in progress, oldest first, each with the means to end it.
#[derive(Default)]
struct Handshakes {
    next: u64,
    pending: std::collections::BTreeMap<u64, tokio::sync::oneshot::Sender<()>>,
}

impl Handshakes {
    fn start(&mut self) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.next += 1;
        self.pending.insert(self.next, tx);
        (self.next, rx)
    }

    /// Ends the oldest handshake still in progress; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        match self.pending.pop_first() {
            Some((_, stop)) => {
                let _ = stop.send(());
                true
            }
            None => false,
        }
    }
}

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
    /// This connection's place under the connection cap, given back when
    /// the connection ends.
    _slot: tokio::sync::OwnedSemaphorePermit,
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

/// The PEM certificates in `pem` (at least one); `what` names the file
/// in errors.
pub(crate) fn read_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
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

/// The one crypto provider the server uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls configuration: TLS 1.3, the server's certificate
/// from `cert` (reloaded when its files change), client certificates
/// required and verified against our CA (`built_in_ca_pem`) and the
/// operator's (`external_ca_pems`).
pub fn server_config(
    cert: Arc<ReloadingCert>,
    built_in_ca_pem: &[u8],
    external_ca_pems: &[&[u8]],
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<ClientTrust, Error> {
    let mut all = vec![built_in_ca_pem];
    all.extend_from_slice(external_ca_pems);
    let any_trusted = verifier(&all, &provider)?;
    let built_in = verifier(&[built_in_ca_pem], &provider)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Config(format!("TLS 1.3 is not available: {e}")))?
        .with_client_cert_verifier(any_trusted)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(ClientTrust {
        config: Arc::new(config),
        built_in,
    })
}

/// Told of every handshake the TLS layer refused that is worth an audit
/// entry (see [`refusal_cause`]), with the peer and why.
pub type OnRefused = Arc<dyn Fn(SocketAddr, &str) + Send + Sync>;

/// Why a handshake failed, in an operator's words, when the TLS layer
/// refused it; `None` for a peer that only went away (a port probe, a
/// reset) or that did not speak TLS at all (an HTTP request, a scanner):
/// those are logged, not audited, and take nothing from the tls.refused
/// budget.
pub fn refusal_cause(err: &io::Error) -> Option<String> {
    use rustls::CertificateError as C;
    let tls = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match tls {
        rustls::Error::NoCertificatesPresented => "no client certificate was presented".into(),
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => {
                "client certificate from an unknown CA (not this server's CA or a --client-ca)"
                    .into()
            }
            C::Expired | C::ExpiredContext { .. } => format!("client certificate expired ({c})"),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("client certificate not valid yet ({c})")
            }
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                format!("wrong usage: the certificate is not for client authentication ({c})")
            }
            C::BadSignature => "client certificate from an unknown CA (its issuer is named like a trusted CA, but the signature does not verify: another CA of the same name?)".into(),
            other => format!("client certificate refused: {other}"),
        },
        rustls::Error::PeerIncompatible(why) => {
            format!("incompatible TLS client (TLS 1.3 is required): {why:?}")
        }
        // Not TLS, or not a TLS handshake: a probe, not a client.
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => return None,
        rustls::Error::AlertReceived(alert) => format!(
            "the client refused the server's certificate ({alert:?} ALERT); check the server \
             certificate's names (`secretfs server reissue-cert`)"
        ),
        other => format!("handshake failed: {other}"),
    })
}

/// Accepts connections until the returned receiver is dropped; yields
/// streams whose handshake finished. Refused handshakes are logged, and
/// those with a [`refusal_cause`] are passed to `on_refused`.
///
/// At most `max_connections` are open at once (authenticated or not). When
/// the cap is reached, or too many handshakes are in progress, the oldest
/// connection still in its handshake is dropped for the newcomer: idle or
/// slow unauthenticated connections cannot crowd out real clients. With no
/// handshake to drop, the newcomer is refused.
pub fn accept_loop(
    listener: TcpListener,
    trust: ClientTrust,
    trust_domain: String,
    max_connections: usize,
    on_refused: OnRefused,
) -> mpsc::Receiver<Result<PeerStream, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(trust.config.clone());
    let trust = Arc::new(trust);
    let trust_domain: Arc<str> = trust_domain.into();
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let handshakes = Arc::new(std::sync::Mutex::new(Handshakes::default()));
    let evict_oldest = |h: &std::sync::Mutex<Handshakes>| {
        h.lock().unwrap_or_else(|e| e.into_inner()).evict_oldest()
    };
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
            let too_many_handshakes = handshakes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pending
                .len()
                >= MAX_HANDSHAKES;
            if too_many_handshakes {
                evict_oldest(&handshakes);
            }
            let slot = match slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) if evict_oldest(&handshakes) => {
                    // The evicted handshake gives its slot back as it ends.
                    match tokio::time::timeout(
                        Duration::from_millis(500),
                        slots.clone().acquire_owned(),
                    )
                    .await
                    {
                        Ok(Ok(slot)) => slot,
                        _ => continue,
                    }
                }
                Err(_) => {
                    tracing::warn!(%remote, max_connections, "connection refused: the server is at its connection limit (--max-connections)");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let trust_domain = trust_domain.clone();
            let trust = trust.clone();
            let handshakes = handshakes.clone();
            let on_refused = on_refused.clone();
            let (id, evicted) = handshakes.lock().unwrap_or_else(|e| e.into_inner()).start();
            tokio::spawn(async move {
                let done = tokio::select! {
                    r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => Some(r),
                    _ = evicted => None,
                };
                handshakes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pending
                    .remove(&id);
                let tls = match done {
                    Some(Ok(Ok(tls))) => tls,
                    Some(Ok(Err(e))) => {
                        tracing::info!(%remote, error = %e, "TLS handshake refused");
                        if let Some(cause) = refusal_cause(&e) {
                            on_refused(remote, &cause);
                        }
                        return;
                    }
                    Some(Err(_)) => {
                        tracing::info!(%remote, "TLS handshake timed out");
                        return;
                    }
                    None => {
                        tracing::info!(%remote, "TLS handshake dropped to make room for a new connection");
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
                let _ = tx
                    .send(Ok(PeerStream {
                        inner: tls,
                        info,
                        _slot: slot,
                    }))
                    .await;
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_handshake_is_evicted_first() {
        let mut h = Handshakes::default();
        let (_, mut first) = h.start();
        let (_, mut second) = h.start();
        assert!(h.evict_oldest());
        assert!(first.try_recv().is_ok(), "the oldest is told to stop");
        assert!(second.try_recv().is_err(), "the newer one goes on");
        assert!(h.evict_oldest());
        assert!(!h.evict_oldest());
    }

    fn cause(e: rustls::Error) -> Option<String> {
        refusal_cause(&io::Error::new(io::ErrorKind::InvalidData, e))
    }

    #[test]
    fn bytes_that_are_not_tls_are_logged_not_audited() {
        use rustls::{ContentType, HandshakeType, InvalidMessage};
        // What an HTTP GET or a scanner yields.
        assert_eq!(
            cause(rustls::Error::InvalidMessage(
                InvalidMessage::InvalidContentType
            )),
            None
        );
        assert_eq!(
            cause(rustls::Error::InappropriateMessage {
                expect_types: vec![ContentType::Handshake],
                got_type: ContentType::ApplicationData,
            }),
            None
        );
        assert_eq!(
            cause(rustls::Error::InappropriateHandshakeMessage {
                expect_types: vec![HandshakeType::ClientHello],
                got_type: HandshakeType::Finished,
            }),
            None
        );
        assert!(cause(rustls::Error::NoCertificatesPresented).is_some());
    }

    #[test]
    fn an_alert_says_the_client_refused_the_server_certificate() {
        let why = cause(rustls::Error::AlertReceived(
            rustls::AlertDescription::BadCertificate,
        ))
        .unwrap();
        assert!(
            why.contains("the client refused the server's certificate"),
            "{why}"
        );
        assert!(why.contains("secretfs server reissue-cert"), "{why}");
    }
}
