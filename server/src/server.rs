//! `server run`: load and check the state directory, bind, serve until told
//! to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secretfs_proto::v1::admin_server::AdminServer;
use secretfs_proto::v1::secrets_server::SecretsServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::Error;
use crate::pki::Ca;
use crate::service::{AdminService, SecretsService, Shared};
use crate::state_dir::{load_master_key, verify_master_key, StateDir, META_TRUST_DOMAIN};
use crate::store::{SqliteStore, Store};
use crate::tls;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
pub const DEFAULT_MAX_SECRET_SIZE: usize = 1024 * 1024;
/// Room for the protobuf framing around the largest allowed secret.
const MESSAGE_SLACK: usize = 64 * 1024;

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub max_secret_size: usize,
    /// Extra CA bundles whose client certificates are accepted (bring your
    /// own PKI). Our own CA is always trusted.
    pub client_ca: Vec<PathBuf>,
}

/// A server that has checked its state and bound its port, ready to serve.
pub struct Server {
    listener: TcpListener,
    /// Ends once every handle to the shared state is gone; joined at
    /// shutdown so the database is closed (and checkpointed) cleanly.
    audit_thread: std::thread::JoinHandle<()>,
    shared: Arc<Shared>,
    tls: tls::ClientTrust,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))
}

impl Server {
    /// Loads the state directory, checks the master key against the
    /// database, and binds. Fails before serving anything if any of that is
    /// wrong.
    pub async fn open(opts: RunOptions) -> Result<Server, Error> {
        let dir = StateDir::new(&opts.state_dir);
        if !dir.path.is_dir() {
            return Err(Error::Config(format!(
                "state directory {} does not exist; create one with `secretfs server init --state-dir {}`",
                dir.path.display(),
                dir.path.display()
            )));
        }
        let master = load_master_key(&dir.master_key())?;
        let db = dir.database();
        let store = tokio::task::spawn_blocking(move || SqliteStore::open(&db, false))
            .await
            .map_err(|e| Error::Storage(e.to_string()))??;
        verify_master_key(&store, &master, &dir.master_key())?;
        let trust_domain = store
            .get_meta(META_TRUST_DOMAIN)?
            .and_then(|v| String::from_utf8(v).ok())
            .ok_or_else(|| Error::Config("the database does not record its trust domain".into()))?;

        let ca_cert = read(&dir.ca_cert())?;
        let ca_key = zeroize::Zeroizing::new(read(&dir.ca_key())?);
        let ca = Ca::load(
            &String::from_utf8_lossy(&ca_cert),
            &String::from_utf8_lossy(&ca_key),
        )?;
        let server_cert = read(&dir.server_cert())?;
        let server_key = zeroize::Zeroizing::new(read(&dir.server_key())?);
        let extra: Vec<Vec<u8>> = opts
            .client_ca
            .iter()
            .map(|p| read(p))
            .collect::<Result<_, _>>()?;
        let extra: Vec<&[u8]> = extra.iter().map(|v| v.as_slice()).collect();
        let tls = tls::server_config(&server_cert, &server_key, &ca_cert, &extra)?;

        let listener = TcpListener::bind(opts.listen).await.map_err(|e| {
            Error::io(
                format!("cannot listen on {} (is another server running there? pick another with --listen)", opts.listen),
                e,
            )
        })?;
        if unsafe { libc::geteuid() } == 0 {
            tracing::warn!(
                "running as root: the server needs no privilege; run it as a dedicated user"
            );
        }
        let store: Arc<dyn Store> = Arc::new(store);
        let (audit, audit_thread) = crate::audit_log::AuditLog::start(store.clone());
        Ok(Server {
            listener,
            audit_thread,
            shared: Arc::new(Shared {
                audit,
                recent: Default::default(),
                auth_cache: Default::default(),
                report_budget: Default::default(),
                store,
                master,
                ca,
                trust_domain,
                max_secret_size: opts.max_secret_size,
                hub: crate::hub::Hub::new(),
            }),
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn trust_domain(&self) -> &str {
        &self.shared.trust_domain
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets calls in
    /// flight finish, and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let addr = self.local_addr();
        // Twice the limit, so a value somewhat over it reaches the handler and
        // gets the clear "over the limit" error, while memory stays bounded.
        let max = self.shared.max_secret_size.saturating_mul(2).max(4 << 20) + MESSAGE_SLACK;
        let incoming = tls::accept_loop(self.listener, self.tls, self.shared.trust_domain.clone());
        let shared = self.shared.clone();
        let hub = move || shared.hub.close();
        let admin = AdminServer::new(AdminService::new(self.shared.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX);
        let secrets = SecretsServer::new(SecretsService::new(self.shared.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX);
        tracing::info!(%addr, trust_domain = %self.shared.trust_domain, "secretfs server listening (mutual TLS 1.3)");
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(admin)
            .add_service(secrets)
            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), async move {
                shutdown.await;
                // Watch streams never end by themselves: end them, or the
                // graceful shutdown would wait for them forever.
                hub();
            })
            .await
            .map_err(|e| Error::Config(format!("the server stopped: {e}")))?;
        drop(self.shared);
        // Watch tasks still finishing hold the shared state for a moment;
        // do not wait on them for long.
        let audit_thread = self.audit_thread;
        let joined = tokio::task::spawn_blocking(move || audit_thread.join());
        if tokio::time::timeout(Duration::from_secs(5), joined)
            .await
            .is_err()
        {
            tracing::warn!(
                "the database was not closed within 5 s; it is consistent either way (WAL)"
            );
        }
        tracing::info!("secretfs server stopped");
        Ok(())
    }
}
