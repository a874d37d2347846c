//! The baseline for `Secrets.ReadSecrets`: a bare tonic service that answers
//! every `ReadSecrets` with a fixed, pre-built response (the bytes a real
//! secretfs server returned), behind the same TLS setup as the server: TLS
//! 1.3 only, ring, client certificates required and verified against the
//! same CA, handshakes in their own tasks, the peer's identity parsed once
//! per connection. What it lacks is exactly the server's own work:
//! authentication against the store, access checks, decryption and audit.
//!
//! It runs as its own process (`secretfs-bench echo-server`), like the real
//! server, so both sides get the same share of the machine.

use std::convert::Infallible;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use prost::Message;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secretfs_proto::v1::{ReadSecretsRequest, ReadSecretsResponse};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The same rustls configuration as `secretfs-server`'s `tls::server_config`.
fn server_config(cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert?)?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The same accept loop as the server's: handshake per task with a
/// deadline, identity read once per connection.
fn accept_loop(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    trust_domain: String,
) -> mpsc::Receiver<Result<TlsStream<tokio::net::TcpStream>, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, _remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(_) => {
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
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                else {
                    return;
                };
                if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                    let identity = secretfs_server::identity_from_der(
                        cert,
                        &trust_domain,
                        secretfs_server::Issuer::BuiltIn,
                    );
                    std::hint::black_box(&identity);
                }
                let _ = tx.send(Ok(tls)).await;
            });
        }
    });
    rx
}

#[derive(Clone)]
struct Echo {
    reply: Arc<ReadSecretsResponse>,
}

struct EchoMethod(Arc<ReadSecretsResponse>);

impl tonic::server::UnaryService<ReadSecretsRequest> for EchoMethod {
    type Response = ReadSecretsResponse;
    type Future = BoxFuture<tonic::Response<ReadSecretsResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<ReadSecretsRequest>) -> Self::Future {
        let reply = self.0.clone();
        Box::pin(async move {
            std::hint::black_box(request.get_ref().names.len());
            Ok(tonic::Response::new((*reply).clone()))
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let reply = self.reply.clone();
        Box::pin(async move {
            if req.uri().path() != "/secretfs.v1.Secrets/ReadSecrets" {
                let mut response = http::Response::new(tonic::body::Body::default());
                response.headers_mut().insert(
                    tonic::Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                return Ok(response);
            }
            let codec =
                tonic_prost::ProstCodec::<ReadSecretsResponse, ReadSecretsRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec);
            Ok(grpc.unary(EchoMethod(reply), req).await)
        })
    }
}

impl NamedService for Echo {
    const NAME: &'static str = "secretfs.v1.Secrets";
}

/// `secretfs-bench echo-server`: serve until stdin closes; print `addr=...`.
pub fn run(state: &Path, payload: &Path, trust_domain: &str) -> Result<()> {
    let read = |name: &str| std::fs::read(state.join(name)).with_context(|| format!("read {name}"));
    let config = server_config(&read("server.pem")?, &read("server.key")?, &read("ca.pem")?)?;
    let reply = ReadSecretsResponse::decode(&std::fs::read(payload)?[..])?;
    // The server's runtime: tokio's default multi-thread runtime.
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        println!("addr={}", listener.local_addr()?);
        let incoming = accept_loop(listener, config, trust_domain.to_owned());
        let shutdown = async {
            // The parent closes our stdin to stop us.
            let _ = tokio::task::spawn_blocking(|| {
                let mut s = String::new();
                let _ = std::io::stdin().read_line(&mut s);
            })
            .await;
        };
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(Echo {
                reply: Arc::new(reply),
            })
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(incoming),
                shutdown,
            )
            .await?;
        Ok(())
    })
}
