//! secretfs mount: a container's secrets as read-only files that live only
//! in this process's locked memory, served over FUSE and kept in sync with
//! the server.
//!
//! The parts, from the inside out:
//! - `secret_bytes`: the mlocked, zeroize-on-drop buffer holding content.
//! - `snapshot`: the secrets shown at one moment; screens names the
//!   filesystem cannot show (dot-names, file/directory conflicts).
//! - `tree`: the pure core. Inodes (one per secret version), lookup/getattr/
//!   read/readdir answers, lookup counting, and the list of kernel
//!   invalidations when a new snapshot is applied. Unit-tested without FUSE.
//! - `status`: the JSON at `.secretfs/status`.
//! - `fuse`: the thin `fuser::Filesystem` adapter over the tree; the only
//!   place that calls `reply.*`.
//! - `watch`: the pure core of live sync: the mirror of the server's view,
//!   and the checks every `Watch` event passes before it is applied whole.
//! - `sync`: the gRPC side: one `Secrets.Watch` stream kept open, with
//!   backoff, reconnects, the periodic full resync and certificate reload
//!   (`backoff`, `credentials`).
//! - `updater`: applies a snapshot or error to the tree, then notifies the
//!   kernel (outside the tree lock); fails closed after `--max-stale`.
//! - `mount`: mountpoint checks, stale-mount clearing, mount and unmount.
//! - `static_mount`: [`StaticMount`], a fixed set of secrets mounted through
//!   the same adapter without a server (end-to-end tests, benchmarks).
//! - `renewal`: the client certificate's expiry warning and its renewal at
//!   2/3 of its life (new key, CSR, files replaced, new connection; no
//!   remount); its serial and expiry (status, warnings) are read by
//!   [`secretfs_proto::cert`], as the server and the CLI read them.
//! - `notify`: sd_notify (`READY=1` after the first sync and mount,
//!   `STOPPING=1`, why it failed) for systemd and `mount --background`.
//!
//! - `caller` + `guard`: the optional caller check (`--container`,
//!   `--allow-cgroup`): the calling process's cgroup must place it in the
//!   container; refusals are counted in the status and reported to the server.
//! - `privileges`: keep only CAP_SYS_ADMIN and CAP_IPC_LOCK and set
//!   no_new_privs while the process has one thread ([`drop_privileges`]);
//!   before mounting, check that every thread holds just that.
//!
//! [`run`] ties them together: first sync (the Watch's initial event),
//! mount, apply events until shutdown, unmount.

mod backoff;
mod credentials;
mod error;
mod fuse;
mod mount;
mod notify;
#[cfg(test)]
mod prop_support;
mod renewal;
mod secret_bytes;
mod snapshot;
mod static_mount;
mod status;
mod sync;
mod tree;
mod updater;
mod watch;

mod caller;
mod guard;
mod privileges;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use secretfs_proto::channel::{
    collapse, connect_to, list_failures, try_in_order, ChannelError, ConnectFailure, KeepAlive,
    NoneAnswered, Tried,
};
use secretfs_proto::servers::{Endpoints, ServerList};
use secretfs_proto::ConnectConfig;
use tokio::sync::mpsc;

pub use credentials::CredentialFiles;
pub use error::MountError;
pub use notify::Notify;
pub use privileges::{
    drop_privileges, verify_every_thread, Capability, DroppedReport, PrivilegeError, MOUNT_KEEPS,
};
pub use static_mount::{StaticMount, StaticSecret};
pub use tree::Force;

use crate::backoff::Backoff;
use crate::credentials::CredentialWatch;
use crate::snapshot::Snapshot;
use crate::status::SyncState;
use crate::sync::{Live, SecretsSource, SyncError};
use crate::tree::{Defaults, Tree};
use crate::updater::Updater;
use crate::watch::Mirror;
use secretfs_proto::cert::{rfc3339, CertInfo};

/// How long shutdown waits for open files to close before aborting.
const UNMOUNT_GRACE: Duration = Duration::from_secs(2);

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// An existing, empty directory.
    pub mountpoint: PathBuf,
    pub connect: ConnectConfig,
    /// Owner, group and mode of secrets that do not set their own; the
    /// owner and group also own the directories (mode 0555) and the status
    /// file (mode 0440).
    pub default_uid: u32,
    pub default_gid: u32,
    pub default_mode: u32,
    /// Interval of the full resync, a safety net: changes arrive over the
    /// Watch stream as they commit.
    pub refresh: Duration,
    /// How long to try for the first sync before giving up.
    pub start_timeout: Duration,
    /// Once cut off from the server longer than this, secret reads fail
    /// with EIO until it is back. `None`: serve what is held indefinitely.
    pub max_stale: Option<Duration>,
    /// The files `connect`'s certificate and key came from: read again
    /// when they change, so a renewed certificate needs no remount.
    pub credentials: Option<CredentialFiles>,
    /// The caller check (`--container`, `--allow-cgroup`): only processes
    /// in these containers or cgroups may look up, open or list secrets.
    pub callers: Option<CallerRules>,
    /// What [`drop_privileges`] kept, when the caller dropped privileges
    /// before starting any thread: before mounting, every thread must hold
    /// exactly that, or `run` fails without mounting. `None` where the process also does
    /// other work (`dev`) and keeps its privileges.
    pub privileges: Option<DroppedReport>,
    /// Owner, group and mode every secret file gets, whatever the secret says.
    pub force: Force,
    /// Create the mountpoint (mode 0755, with its parents) when missing.
    pub create_mountpoint: bool,
    /// Renew the client certificate at about 2/3 of its life. On by default
    /// (`--no-renew`: off; the expiry warning stays).
    pub renew: bool,
    /// The first renewal this long after start instead (tests).
    pub renew_after: Option<Duration>,
    /// Tell a supervisor when the mount is ready and when it stops.
    pub notify: Option<Notify>,
}

/// Who may use the mount, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct CallerRules {
    pub container_ids: Vec<String>,
    pub allow_cgroups: Vec<String>,
    /// Let anyone read `.secretfs/status` (`--public-status`). By default
    /// the caller check guards it like the secrets: it names them.
    pub public_status: bool,
}

impl MountOptions {
    /// Defaults: files 0400 owned by root, full resync every 10 min, start
    /// timeout 30 s, no `max_stale`, no certificate reload.
    pub fn new(mountpoint: impl Into<PathBuf>, connect: ConnectConfig) -> MountOptions {
        MountOptions {
            mountpoint: mountpoint.into(),
            connect,
            default_uid: 0,
            default_gid: 0,
            default_mode: 0o400,
            refresh: Duration::from_secs(600),
            start_timeout: Duration::from_secs(30),
            max_stale: None,
            credentials: None,
            callers: None,
            privileges: None,
            force: Force::default(),
            create_mountpoint: false,
            renew: true,
            renew_after: None,
            notify: None,
        }
    }
}

/// Mounts after the first successful sync, serves until `shutdown`
/// resolves, then unmounts (lazy detach if busy).
///
/// Must be called from inside a tokio multi-thread runtime.
pub async fn run(
    opts: MountOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), MountError> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {}
        _ => return Err(MountError::NoRuntime),
    }
    forbid_core_dumps();
    let guard = match &opts.callers {
        None => None,
        Some(rules) => {
            let policy =
                caller::CallerPolicy::new(rules.container_ids.clone(), rules.allow_cgroups.clone())
                    .map_err(|e| MountError::CallerRule(e.to_string()))?;
            if !policy.any_process_matches() {
                tracing::warn!(
                    containers = ?rules.container_ids,
                    cgroups = ?rules.allow_cgroups,
                    "no running process matches the caller check yet; everyone is refused until one does"
                );
            }
            Some(Arc::new(guard::Guard::new(policy, rules.public_status)))
        }
    };
    mount::check_fuse()?;
    if opts.create_mountpoint {
        mount::create_mountpoint(&opts.mountpoint)?;
    }
    let path = mount::prepare_mountpoint(&opts.mountpoint)?;
    tokio::pin!(shutdown);
    if let Some(files) = &opts.credentials {
        // A renewal that crashed before its renames left key material in
        // temporary files beside the key.
        for file in [&files.key, &files.cert] {
            for stale in secretfs_proto::files::remove_stale_temporaries(file) {
                tracing::info!(file = %stale.display(), "removed a temporary file an interrupted renewal left");
            }
        }
    }

    let server = opts.connect.server.clone();
    let first = tokio::select! {
        r = first_sync(&opts) => r?,
        () = &mut shutdown => return Ok(()),
    };
    let FirstSync {
        source,
        mirror,
        stream,
        snapshot,
        identity,
        endpoints,
    } = first;

    let defaults = Defaults {
        uid: opts.default_uid,
        gid: opts.default_gid,
        mode: opts.default_mode,
        force: opts.force,
    };
    let cert = match CertInfo::parse(&opts.connect.cert_pem) {
        Ok(info) => Some(info),
        Err(error) => {
            tracing::warn!(%error, "cannot read the client certificate's serial and expiry; it will not be renewed");
            None
        }
    };
    let tree = Arc::new(Mutex::new(Tree::new(defaults, SystemTime::now())));
    let mut updater = Updater::new(
        tree.clone(),
        SyncState {
            identity,
            server: server.clone(),
            server_in_use: Some(endpoints.current().to_string()),
            revision: Some(mirror.revision()),
            cert: cert.clone(),
            force: opts.force,
            ..SyncState::default()
        },
    );
    updater.set_max_stale(opts.max_stale);
    updater.synced(snapshot.clone());

    // The first sync may have taken a while: check again right before mounting.
    mount::prepare_mountpoint(&path)?;
    if let Some(report) = &opts.privileges {
        // Nothing is served until every thread holds only what was kept.
        // The runtime's threads exist now; every later one (the blocking
        // pool's, fuser's) is made by one of these and copies its sets.
        let threads = privileges::verify_every_thread(report)?;
        tracing::debug!(threads, "every thread holds only the kept capabilities");
    }
    let fs = fuse::SecretFs::with_guard(tree.clone(), guard.clone());
    let mount_path = path.clone();
    let mounted = tokio::task::spawn_blocking(move || mount::mount(fs, &mount_path))
        .await
        .map_err(|e| MountError::Mount {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })??;
    updater.set_notifier(mounted.notifier());
    tracing::info!(
        path = %path.display(),
        secrets = snapshot.files().len(),
        caller_check = guard.is_some(),
        cert_not_after = cert.as_ref().map(|c| rfc3339(c.not_after)),
        "mounted"
    );
    if let Some(notify) = &opts.notify {
        notify.ready(&format!(
            "mounted at {} with {} secrets",
            path.display(),
            snapshot.files().len()
        ));
    }
    let (connection, connection_rx) = tokio::sync::watch::channel(source.clone());
    let reporter = guard
        .clone()
        .map(|g| tokio::spawn(report_refusals(g, connection_rx)));

    let credentials = opts.credentials.clone().map(|files| {
        CredentialWatch::new(
            files,
            opts.connect.ca_pem.clone(),
            &opts.connect.cert_pem,
            &opts.connect.key_pem,
        )
    });
    let live = Live {
        source,
        mirror,
        stream: Some(stream),
        connect: opts.connect.clone(),
        in_use: endpoints.current().clone(),
        serving: endpoints.current().clone(),
        endpoints,
        credentials,
        refresh: opts.refresh,
        renewal: cert.map(|c| renewal::Schedule::with_renewal(c, opts.renew_after, opts.renew)),
        renew: opts.renew,
        renewing: None,
        connection,
    };
    let (tx, mut rx) = mpsc::channel(4);
    let syncer = tokio::spawn(sync::live_loop(live, tx));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Precise, not at the next tick: `--max-stale` is a promise.
        let stale = at(updater.stale_deadline());
        // A move that has not brought a server within the grace is an
        // outage: precise too.
        let moved = at(updater.move_deadline());
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(event) = rx.recv() => updater.on_event(event),
            () = stale => updater.check_stale(),
            () = moved => updater.check_moving(),
            _ = tick.tick() => {
                if let Some(g) = &guard {
                    updater.set_refused_callers(g.counts());
                }
                updater.publish_status()
            }
        }
    }

    syncer.abort();
    if let Some(r) = reporter {
        r.abort();
    }
    tracing::info!(path = %path.display(), "shutting down");
    if let Some(notify) = &opts.notify {
        notify.stopping();
    }
    tokio::task::spawn_blocking(move || mounted.unmount(UNMOUNT_GRACE))
        .await
        .ok();
    // Whatever the kernel still references, no secret outlives `run`.
    updater.wipe();
    Ok(())
}

/// Sleeps until `deadline`; never without one.
async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Sends the caller check's refusals to the server's audit log, batched
/// once a second; a failed report is logged and dropped (the counts stay in
/// the status file). Never on the read path.
/// It uses the Watch's connection (`connection` follows renewals and new
/// credential files): one TLS connection, no copy of the key of its own.
async fn report_refusals(
    guard: Arc<guard::Guard>,
    connection: tokio::sync::watch::Receiver<SecretsSource>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let refusals = guard.take_outbox();
        if refusals.is_empty() {
            continue;
        }
        let n = refusals.len();
        let refusals = refusals.into_iter().map(refusal_to_proto).collect();
        let mut source = connection.borrow().clone();
        if let Err(e) = source.report_refusals(refusals).await {
            tracing::warn!(refusals = n, error = %e.message(), "could not report refused callers to the server");
        }
    }
}

fn refusal_to_proto(r: guard::Refusal) -> secretfs_proto::v1::Refusal {
    secretfs_proto::v1::Refusal {
        at_ms: r
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0),
        pid: r.pid,
        uid: r.uid,
        cgroup: r.cgroup.unwrap_or_default(),
        path: r.path,
        reason: r.reason,
    }
}

struct FirstSync {
    source: SecretsSource,
    mirror: Mirror,
    stream: tonic::Streaming<secretfs_proto::v1::WatchEvent>,
    snapshot: Snapshot,
    identity: Option<String>,
    endpoints: Endpoints,
}

/// Connects and syncs, retrying unreachable servers until `start_timeout`.
/// A refused client or TLS failure does not get better by waiting: fail at once.
async fn first_sync(opts: &MountOptions) -> Result<FirstSync, MountError> {
    let server = opts.connect.server.clone();
    let deadline = Instant::now() + opts.start_timeout;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let mut reason = String::from("no answer");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MountError::StartTimeout {
                server,
                timeout: humantime::format_duration(opts.start_timeout).to_string(),
                reason,
            });
        }
        match tokio::time::timeout(left, try_first_sync(&opts.connect)).await {
            Ok(Ok(first)) => return Ok(first),
            Ok(Err(Attempt::Fatal(e))) => return Err(e),
            Ok(Err(Attempt::Retry(r))) => {
                tracing::info!(server = %server, reason = %r, "server not reachable yet; retrying");
                reason = r;
            }
            Err(_) => continue, // deadline hit mid-attempt: report on the next turn
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(backoff.next_delay().min(left)).await;
    }
}

enum Attempt {
    Retry(String),
    Fatal(MountError),
}

/// The first sync from the first endpoint that gives it, in order: one that
/// cannot be reached or used, or answers with a failure of its own
/// (UNAVAILABLE, INTERNAL, a bad event, ...), is passed over; an answer
/// every replica would give (this client refused; not found, a bad
/// request) ends the attempt.
async fn try_first_sync(cfg: &ConnectConfig) -> Result<FirstSync, Attempt> {
    let server = cfg.server.clone();
    let list = ServerList::parse(&server)
        .map_err(|e| Attempt::Fatal(MountError::Connect(e.to_string())))?;
    let (targets, unresolved) = list.resolve(cfg.connect_timeout).await;
    // Certificate trouble on every endpoint (and every name resolved) is
    // fatal: waiting will not fix it.
    let tls_only = AtomicBool::new(unresolved.is_empty() && !targets.is_empty());
    let failed = unresolved.into_iter().map(|u| u.error).collect();
    let found = try_in_order(&targets, failed, |target| {
        let tls_only = &tls_only;
        async move {
            let channel =
                match connect_to(cfg, &target, Some(sync::RPC_TIMEOUT), KeepAlive::MOUNT).await {
                    Ok(c) => c,
                    // Our own key, certificate or CA cannot be used: the
                    // same at every address, and waiting will not fix it.
                    Err(e @ ChannelError::Tls(_)) => {
                        return Tried::Stop(Attempt::Fatal(MountError::Connect(e.to_string())))
                    }
                    Err(e) => {
                        // Unusable addresses too: that endpoint's failure.
                        if !e.is_tls() {
                            tls_only.store(false, Ordering::Relaxed);
                        }
                        return Tried::Next(e);
                    }
                };
            let mut source = SecretsSource::new(channel);
            let mut mirror = Mirror::new();
            match source.first_sync(&mut mirror).await {
                Ok((stream, snapshot)) => Tried::Done((source, mirror, stream, snapshot)),
                Err(SyncError::Refused(message)) => {
                    Tried::Stop(Attempt::Fatal(MountError::ClientRefused {
                        server: target.to_string(),
                        message,
                    }))
                }
                Err(e) if e.moves_on() => {
                    if !matches!(e, SyncError::TlsRefused(_)) {
                        tls_only.store(false, Ordering::Relaxed);
                    }
                    Tried::Next(ChannelError::Connect {
                        server: target.to_string(),
                        reason: e.to_string(),
                        failure: ConnectFailure::Other,
                    })
                }
                Err(e) => Tried::Stop(Attempt::Retry(format!("{target}: {e}"))),
            }
        }
    })
    .await;
    let found = match found {
        Ok(found) => found,
        Err(NoneAnswered::Stopped(attempt)) => return Err(attempt),
        Err(NoneAnswered::Failed(failed)) => {
            let reason = match collapse(failed) {
                ChannelError::Connect { reason, .. } => reason,
                other => other.to_string(),
            };
            return Err(if tls_only.load(Ordering::Relaxed) {
                Attempt::Fatal(MountError::TlsRefused { server, reason })
            } else {
                Attempt::Retry(reason)
            });
        }
    };
    let target = &targets[found.at];
    if !found.passed_over.is_empty() {
        tracing::info!(
            server = %target,
            passed_over = %list_failures(&found.passed_over),
            "synced from a server after passing over others that failed"
        );
    }
    let (mut source, mirror, stream, snapshot) = found.value;
    // Only for the status page: a server without WhoAmI is fine.
    let identity = match source.whoami().await {
        Ok(name) => Some(name),
        Err(e) => {
            tracing::debug!(error = %e, "WhoAmI failed; status will show no identity");
            None
        }
    };
    Ok(FirstSync {
        source,
        mirror,
        stream,
        snapshot,
        identity,
        endpoints: Endpoints::new(list, targets.clone(), target),
    })
}

/// Keeps secrets out of core dumps and away from ptrace by other users.
fn forbid_core_dumps() {
    use rustix::process::{set_dumpable_behavior, DumpableBehavior};
    if let Err(error) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        tracing::warn!(%error, "cannot mark the process non-dumpable");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::task::{Context, Poll};
    use tonic::body::Body;
    use tonic::codegen::http;

    /// Answers every call with INTERNAL: a replica whose store is broken.
    #[derive(Clone)]
    struct Broken;

    impl tonic::server::NamedService for Broken {
        const NAME: &'static str = "secretfs.v1.Secrets";
    }

    impl tonic::codegen::Service<http::Request<Body>> for Broken {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            std::future::ready(Ok(
                tonic::Status::internal("the store is broken").into_http()
            ))
        }
    }

    /// A CA, and a certificate and key it signed for `names`.
    fn leaf(issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    async fn broken_server(cert: &str, key: &str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key));
        let server = tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(Broken);
        tokio::spawn(
            server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    /// A server that answers INTERNAL is that server's failure: the first
    /// sync goes on to the next, and names both when neither serves.
    #[tokio::test]
    async fn the_first_sync_passes_over_a_server_that_answers_internal() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let (server_cert, server_key) = leaf(&issuer, &["127.0.0.1"]);
        let (client_cert, client_key) = leaf(&issuer, &["app"]);
        let a = broken_server(&server_cert, &server_key).await;
        let b = broken_server(&server_cert, &server_key).await;
        let cfg = ConnectConfig {
            server: format!("{a},{b}"),
            ca_pem: ca_pem.into_bytes(),
            cert_pem: client_cert.into_bytes(),
            key_pem: zeroize::Zeroizing::new(client_key.into_bytes()),
            connect_timeout: Duration::from_secs(10),
        };
        let attempt = tokio::time::timeout(Duration::from_secs(60), try_first_sync(&cfg))
            .await
            .expect("the first sync is bounded");
        match attempt {
            Ok(_) => panic!("neither server serves"),
            Err(Attempt::Fatal(e)) => panic!("not fatal: {e}"),
            Err(Attempt::Retry(reason)) => {
                for addr in [a, b] {
                    assert!(reason.contains(&addr.to_string()), "names {addr}: {reason}");
                }
                assert!(reason.contains("the store is broken"), "{reason}");
            }
        }
    }
}
