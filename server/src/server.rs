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
use tonic::codec::CompressionEncoding;
use tonic::service::interceptor::InterceptedService;

use crate::cert_reload::ReloadingCert;
use crate::limits::LimitLayer;

use crate::domain::{Domain, Settings};
use crate::error::Error;
use crate::service::{AdminService, SecretsService};
use crate::state_dir::{open_store_with, trust_domain, StateDir};
use crate::state_lock::StateLock;
use crate::tls;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
pub const DEFAULT_MAX_SECRET_SIZE: usize = 1024 * 1024;
/// The largest `--max-secret-size`: one secret must fit in one reply.
pub const MAX_SECRET_SIZE_LIMIT: usize = crate::domain::MAX_REPLY_CONTENT;
/// Room for the protobuf framing around the largest allowed secret.
const MESSAGE_SLACK: usize = 64 * 1024;
/// Calls in flight on one connection (a mount holds one Watch and makes a
/// few unary calls; the CLI one call at a time).
const MAX_CONCURRENT_STREAMS: u32 = 256;

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub max_secret_size: usize,
    /// Extra CA bundles whose client certificates are accepted (bring your
    /// own PKI). Our own CA is always trusted.
    pub client_ca: Vec<PathBuf>,
    /// A plain-text listener serving only `grpc.health.v1.Health` (for
    /// probes that speak no TLS, such as Kubernetes' gRPC probe).
    pub health_listen: Option<SocketAddr>,
    /// Open connections at most; `None` = as many as the file descriptor
    /// limit allows (less a reserve for the database and logs).
    pub max_connections: Option<usize>,
    /// Where the master key lives: flags over the state directory's
    /// descriptor (see [`crate::key_provider`]).
    pub keys: crate::key_provider::KeyOptions,
    /// `--database` and its password: the state directory's record (or
    /// SQLite) when no URL is given.
    pub database: crate::state_dir::DatabaseOptions,
    /// Secret versions re-wrapped per transaction during a rekey.
    pub rekey_batch: usize,
    /// Pause between a rekey's batches (spares a busy server's disk).
    pub rekey_pause: Duration,
    /// The external JSON-lines audit sink (`--audit-log`), if any.
    pub audit_log: Option<crate::audit_sink::SinkOptions>,
    /// How often the row set is checked while running (it is also checked
    /// at start).
    pub integrity_check: Duration,
}

/// A server that has checked its state and bound its port, ready to serve.
pub struct Server {
    listener: TcpListener,
    health_listener: Option<TcpListener>,
    max_connections: usize,
    /// Ends once every handle to the shared state is gone; joined at
    /// shutdown so the database is closed (and checkpointed) cleanly. It
    /// holds the state lock until it has ended.
    audit_thread: AuditThread,
    domain: Arc<Domain>,
    tls: tls::ClientTrust,
    /// The served certificate (for the expiry warnings).
    server_cert: Arc<ReloadingCert>,
    ca_not_after: i64,
    state_dir: PathBuf,
    rekey: Arc<crate::rekey::Rekeyer>,
    /// The external audit sink: requests are refused while it cannot write.
    audit_sink: Option<Arc<crate::audit_sink::SinkStatus>>,
    /// Its exporter thread, drained at shutdown.
    audit_sink_thread: Option<std::thread::JoinHandle<()>>,
    integrity_check: Duration,
}

/// The audit writer thread and the state directory's lock, released only
/// once the thread has ended (joined at shutdown, or, when the server is
/// dropped without that or the join times out, by a thread that waits for
/// it): a second server must not start while this one's writer still
/// writes to the database. (When the process exits, the kernel releases
/// the lock with the writer.)
struct AuditThread {
    handle: Option<std::thread::JoinHandle<()>>,
    lock: Option<StateLock>,
}

impl AuditThread {
    fn new(handle: std::thread::JoinHandle<()>, lock: StateLock) -> AuditThread {
        AuditThread {
            handle: Some(handle),
            lock: Some(lock),
        }
    }

    /// Waits for the thread, then releases the lock.
    fn join(mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.lock.take();
    }
}

impl Drop for AuditThread {
    fn drop(&mut self) {
        let (Some(handle), lock) = (self.handle.take(), self.lock.take()) else {
            return;
        };
        // The writer ends once the shared state is dropped, which may be
        // after this (a field dropped later): wait for it elsewhere.
        let waited = std::thread::Builder::new()
            .name("secretfs-unlock".into())
            .spawn(move || {
                let _ = handle.join();
                drop(lock);
            });
        if let Err(e) = waited {
            tracing::warn!(error = %e, "cannot wait for the audit writer; the state lock is released now");
        }
    }
}

/// What to say about a certificate expiring at `not_after` (Unix seconds),
/// seen at `now`: [`secretfs_proto::cert::expiry_notice`], with `what`.
fn expiry_notice(what: &str, not_after: i64, now: i64) -> Option<(bool, String)> {
    use secretfs_proto::cert::{expiry_notice, from_unix};
    expiry_notice(from_unix(not_after), from_unix(now)).map(|n| (n.expired, format!("{what} {n}")))
}

fn warn_expiry(what: &str, not_after: i64, fix: &str) {
    match expiry_notice(what, not_after, crate::store::now_s()) {
        Some((true, text)) => tracing::error!("{text}; {fix}"),
        Some((false, text)) => tracing::warn!("{text}; {fix}"),
        None => {}
    }
}

/// Follows the audit sink: NOT_SERVING (overall and for both services)
/// while it cannot write.
async fn sink_health(
    mut serving: tokio::sync::watch::Receiver<bool>,
    health: tonic_health::server::HealthReporter,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    let mut first = true;
    loop {
        // The state as it is first (it may have failed before serving
        // began), then each change.
        if !std::mem::take(&mut first) {
            tokio::select! {
                changed = serving.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = closing.changed() => return,
            }
        }
        let status = if *serving.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if *closing.borrow() {
            return;
        }
        health.set_service_status("", status).await;
        health
            .set_service_status(
                <AdminServer<AdminService> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        health
            .set_service_status(
                <SecretsServer<SecretsService> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
    }
}

/// Warns about the server's certificate and the CA at start and then daily.
async fn expiry_warnings(
    cert: Arc<ReloadingCert>,
    ca_not_after: i64,
    state_dir: PathBuf,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        cert.check_now();
        warn_expiry(
            "the server certificate",
            cert.not_after(),
            &format!(
                "issue a new one with `secretfs server reissue-cert --state-dir {} --san HOST ...` (taken up without a restart)",
                state_dir.display()
            ),
        );
        warn_expiry(
            "the CA certificate",
            ca_not_after,
            "every certificate it signed stops working with it; plan a new state directory (`server init`) and move clients and secrets over",
        );
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(86_400)) => {}
            _ = closing.changed() => return,
        }
    }
}

/// Checks the row set every `every` while serving (see
/// [`Domain::check_row_set`]).
async fn integrity_checks(
    domain: std::sync::Weak<Domain>,
    every: Duration,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = closing.changed() => return,
        }
        let Some(domain) = domain.upgrade() else {
            return;
        };
        domain.check_row_set().await;
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::io(format!("cannot read {}", path.display()), e))
}

/// Descriptors kept for everything but client connections (database,
/// WAL, logs, blocking threads).
const FD_RESERVE: u64 = 64;

/// Raises the soft descriptor limit to the hard one (systemd starts
/// services at a soft 1,024) and fits the connection cap under it.
fn connection_limit(wanted: Option<usize>) -> Result<usize, Error> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    // rustix says `None` for RLIM_INFINITY.
    let limit = getrlimit(Resource::Nofile);
    let (cur, max) = (
        limit.current.unwrap_or(u64::MAX),
        limit.maximum.unwrap_or(u64::MAX),
    );
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    let cur = if cur < max && setrlimit(Resource::Nofile, raised).is_ok() {
        max
    } else {
        cur
    };
    let room = cur.saturating_sub(FD_RESERVE).min(1 << 20) as usize;
    match wanted {
        Some(0) => Err(Error::Config(
            "--max-connections 0 would refuse every client; give at least 1".into(),
        )),
        Some(n) if n > room => Err(Error::Config(format!(
            "--max-connections {n} is over what the file descriptor limit allows ({room}); \
             raise the limit (LimitNOFILE= in the systemd unit, ulimit -n) or lower --max-connections"
        ))),
        Some(n) => Ok(n),
        None if room == 0 => Err(Error::Config(format!(
            "the file descriptor limit ({}) leaves no room for client connections; raise it (ulimit -n, LimitNOFILE=)",
            cur
        ))),
        None => Ok(room),
    }
}

impl Server {
    /// Loads the state directory, checks the master key against the
    /// database, and binds. Fails before serving anything if any of that is
    /// wrong.
    pub async fn open(opts: RunOptions) -> Result<Server, Error> {
        if opts.max_secret_size > MAX_SECRET_SIZE_LIMIT {
            return Err(Error::Config(format!(
                "--max-secret-size {} is over {MAX_SECRET_SIZE_LIMIT} bytes (3 MiB), the most one reply carries \
                 so that clients with gRPC's default 4 MiB message limit can read every secret; pick a smaller value",
                opts.max_secret_size
            )));
        }
        let dir = StateDir::new(&opts.state_dir);
        if !dir.path.is_dir() {
            return Err(Error::Config(format!(
                "state directory {} does not exist; create one with `secretfs server init --state-dir {}`",
                dir.path.display(),
                dir.path.display()
            )));
        }
        // Before anything is read: a second server must not get further.
        let state_lock = StateLock::acquire(&dir)?;
        crate::harden::protect_process();
        for key in [dir.ca_key(), dir.server_key(), dir.admin_key()] {
            if let Some(warning) = secretfs_proto::credentials::key_permissions(&key) {
                tracing::warn!("{warning}");
            }
        }
        let ca = dir.load_ca()?;
        let provider = tls::provider();
        let server_cert = Arc::new(ReloadingCert::open(
            dir.server_cert(),
            dir.server_key(),
            provider.clone(),
        )?);
        let extra: Vec<Vec<u8>> = opts
            .client_ca
            .iter()
            .map(|p| read(p))
            .collect::<Result<_, _>>()?;
        let extra: Vec<&[u8]> = extra.iter().map(|v| v.as_slice()).collect();
        let tls = tls::server_config(
            server_cert.clone(),
            ca.cert_pem.as_bytes(),
            &extra,
            provider,
        )?;

        let listener = TcpListener::bind(opts.listen).await.map_err(|e| {
            Error::io(
                format!("cannot listen on {} (is another server running there? pick another with --listen)", opts.listen),
                e,
            )
        })?;
        let health_listener = match opts.health_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                Error::io(
                    format!("cannot listen on {addr} for health checks (--health-listen)"),
                    e,
                )
            })?),
            None => None,
        };
        if rustix::process::geteuid().is_root() {
            tracing::warn!(
                "running as root: the server needs no privilege; run it as a dedicated user"
            );
        }
        let max_connections = connection_limit(opts.max_connections)?;
        // Every call on the store runs off the async threads (PostgreSQL's
        // blocking client must not be driven from one); what fails here
        // drops the store on this blocking thread too.
        let opening = dir.clone();
        let key_options = opts.keys.clone();
        let database = opts.database.clone();
        let audit_log = opts.audit_log.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let opened = open_store_with(&opening, &key_options, &database, true)?;
            // Rows put back, deleted or added without the key: refused
            // before anything is served (O(rows), read only but for the
            // revision it agreed at).
            if let Some(finding) = opened.store.check_row_set()? {
                return Err(Error::Config(format!(
                    "the database failed its row set check: {}. Nothing was changed; \
                     `secretfs server verify --state-dir {}` lists what else is wrong",
                    finding.what,
                    opening.path.display()
                )));
            }
            let trust_domain = trust_domain(opened.store.as_ref())?;
            // Checked against the database before anything is served: a
            // sink ahead of the database's audit log refuses the start.
            let sink = match audit_log {
                Some(mut sink) => {
                    sink.resume_file = Some(opening.audit_sink_record());
                    Some(crate::audit_sink::start(&opened.store, sink)?)
                }
                None => None,
            };
            crate::domain::audit::check_audit_head(opened.store.as_ref(), &opened.keys.get());
            Ok::<_, Error>((opened, trust_domain, sink))
        })
        .await
        .map_err(|_| Error::Stopped("opening the database failed; see the server log"))??;
        let (opened, trust_domain, sink) = opened;
        let (audit_sink, audit_sink_thread) = match sink {
            Some((status, exporter)) => (Some(status), Some(exporter)),
            None => (None, None),
        };
        let crate::state_dir::Opened {
            store,
            keys,
            source,
            rekey_in_progress,
        } = opened;
        let settings = Settings {
            trust_domain,
            max_secret_size: opts.max_secret_size,
        };
        let ca_not_after = ca.not_after;
        let rekey = crate::rekey::Rekeyer::new(
            dir.clone(),
            source,
            store.clone(),
            keys.clone(),
            opts.rekey_batch,
            opts.rekey_pause,
        );
        let (domain, audit_thread) = Domain::start(store, keys, ca, settings);
        if let Some(sink) = &audit_sink {
            domain.set_audit_sink(sink.clone());
        }
        if rekey_in_progress {
            rekey.resume();
        }
        Ok(Server {
            listener,
            health_listener,
            max_connections,
            audit_thread: AuditThread::new(audit_thread, state_lock),
            domain,
            tls,
            server_cert,
            ca_not_after,
            state_dir: opts.state_dir.clone(),
            rekey,
            audit_sink,
            audit_sink_thread,
            integrity_check: opts.integrity_check,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The plain-text health listener's address, when there is one.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_listener.as_ref()?.local_addr().ok()
    }

    pub fn trust_domain(&self) -> &str {
        self.domain.trust_domain()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets calls in
    /// flight finish, and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let addr = self.local_addr();
        // Twice the limit, so a value somewhat over it reaches the handler and
        // gets the clear "over the limit" error, while memory stays bounded.
        let max = self.domain.max_secret_size().saturating_mul(2).max(4 << 20) + MESSAGE_SLACK;
        let incoming = tls::accept_loop(
            self.listener,
            self.tls,
            self.domain.trust_domain().to_owned(),
            self.max_connections,
            {
                // Weak: the listener must not keep the domain (and so the
                // database) open after shutdown.
                let domain = Arc::downgrade(&self.domain);
                Arc::new(move |remote, cause: &str| {
                    if let Some(domain) = domain.upgrade() {
                        domain.tls_refused(remote, cause)
                    }
                })
            },
        );
        tokio::spawn(integrity_checks(
            Arc::downgrade(&self.domain),
            self.integrity_check,
            self.domain.closing(),
        ));
        tokio::spawn(expiry_warnings(
            self.server_cert.clone(),
            self.ca_not_after,
            self.state_dir.clone(),
            self.domain.closing(),
        ));
        let domain = self.domain.clone();
        let close_watches = move || domain.close();
        let admin = AdminServer::new(AdminService::new(self.domain.clone(), self.rekey.clone()))
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(max + 1)
            .max_encoding_message_size(usize::MAX);
        let secrets = SecretsServer::new(SecretsService::new(self.domain.clone()))
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(max + 1)
            .max_encoding_message_size(usize::MAX);
        // Vault's rule: while the audit sink cannot write, every call is
        // refused, and the health service says NOT_SERVING.
        let sink = self.audit_sink.clone();
        let refuse_without_sink =
            move |req: tonic::Request<()>| match sink.as_ref().and_then(|s| s.refusal()) {
                Some(why) => {
                    let mut refused = tonic::Status::unavailable(why);
                    // Tells the CLI this is no connection problem.
                    refused
                        .metadata_mut()
                        .insert("secretfs-audit-sink", "failed".parse().expect("ASCII"));
                    Err(refused)
                }
                None => Ok(req),
            };
        let admin = InterceptedService::new(admin, refuse_without_sink.clone());
        let secrets = InterceptedService::new(secrets, refuse_without_sink);
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<AdminServer<AdminService>>().await;
        health.set_serving::<SecretsServer<SecretsService>>().await;
        if let Some(sink) = &self.audit_sink {
            tokio::spawn(sink_health(
                sink.serving(),
                health.clone(),
                self.domain.closing(),
            ));
        }
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(secretfs_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| Error::Config(format!("cannot set up server reflection: {e}")))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| Error::Config(format!("cannot set up server reflection: {e}")))?;
        if let Some(listener) = self.health_listener {
            let addr = listener.local_addr().ok();
            let service = health_service.clone();
            let mut closing = self.domain.closing();
            tokio::spawn(async move {
                let served = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async move {
                            let _ = closing.changed().await;
                        },
                    )
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "the health listener stopped");
                }
            });
            if let Some(addr) = addr {
                tracing::info!("gRPC health service listening on {addr} (plain text, health only)");
            }
        }
        tracing::info!(%addr, trust_domain = %self.domain.trust_domain(), "secretfs server listening (mutual TLS 1.3)");
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            // h2 answers headers over its limit with a 431 or a GOAWAY that
            // ends every call on the connection: give it room, and refuse
            // big metadata ourselves with a gRPC status (limits.rs).
            .http2_max_header_list_size(1 << 20)
            .layer(LimitLayer { max_message: max })
            .add_service(admin)
            .add_service(secrets)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(ReceiverStream::new(incoming), async move {
                shutdown.await;
                health
                    .set_not_serving::<SecretsServer<SecretsService>>()
                    .await;
                health.set_not_serving::<AdminServer<AdminService>>().await;
                // Watch streams never end by themselves: end them, or the
                // graceful shutdown would wait for them forever.
                close_watches();
            })
            .await
            .map_err(|e| Error::Config(format!("the server stopped: {e}")))?;
        // The sink writes what the last calls committed, then ends.
        if let (Some(sink), Some(thread)) = (&self.audit_sink, self.audit_sink_thread) {
            sink.stop();
            let drained = tokio::task::spawn_blocking(move || thread.join());
            if tokio::time::timeout(Duration::from_secs(5), drained)
                .await
                .is_err()
            {
                tracing::warn!(
                    "the audit sink did not finish within 5 s; it catches up at the next start"
                );
            }
        }
        // A rekey's batches stop at the next one (it resumes at start).
        self.rekey.stop();
        // Off the async threads: the last handle on the store may go here,
        // and PostgreSQL's blocking client closes by driving its own runtime.
        let (domain, rekey) = (self.domain, self.rekey);
        let _ = tokio::task::spawn_blocking(move || drop((domain, rekey))).await;
        // Watch tasks still finishing hold the shared state for a moment;
        // do not wait on them for long.
        // Waits for the writer and only then releases the state lock, even
        // when the wait below gives up.
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

#[cfg(test)]
mod tests {
    use super::expiry_notice;

    #[test]
    fn the_state_lock_is_held_until_the_audit_writer_ends() {
        use super::{AuditThread, StateLock};
        let tmp = tempfile::tempdir().unwrap();
        let dir = crate::state_dir::StateDir::new(tmp.path());
        let writer = |rx: std::sync::mpsc::Receiver<()>| {
            std::thread::spawn(move || {
                let _ = rx.recv();
            })
        };
        // Dropped without a join (serve returned early, or never ran).
        let (tx, rx) = std::sync::mpsc::channel();
        let audit = AuditThread::new(writer(rx), StateLock::acquire(&dir).unwrap());
        drop(audit);
        assert!(
            StateLock::check_unlocked(&dir).is_err(),
            "released while the writer still runs"
        );
        drop(tx);
        let mut waited = 0;
        while StateLock::check_unlocked(&dir).is_err() {
            waited += 1;
            assert!(waited < 1000, "never released after the writer ended");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Joined: released once the writer is done.
        let (tx, rx) = std::sync::mpsc::channel();
        let audit = AuditThread::new(writer(rx), StateLock::acquire(&dir).unwrap());
        drop(tx);
        audit.join();
        StateLock::check_unlocked(&dir).unwrap();
    }

    #[test]
    fn expiry_is_told_within_30_days_and_after() {
        let day = 86_400;
        assert!(expiry_notice("x", 100 * day, 0).is_none());
        assert!(expiry_notice("x", 31 * day, 0).is_none());
        let (expired, text) = expiry_notice("the CA certificate", 29 * day + 5, 0).unwrap();
        assert!(
            !expired && text.contains("within 30 days") && text.contains("29 days left"),
            "{text}"
        );
        let (expired, text) = expiry_notice("x", 0, 10).unwrap();
        assert!(
            expired && text.contains("expired at 1970-01-01T00:00:00Z"),
            "{text}"
        );
    }
}
