//! The server's domain layer: one [`Domain`] owns the store, the master key,
//! the CA, the change feed, the audit log and the caches, and offers every
//! operation the services expose. The gRPC handlers in `service` only
//! translate between protobuf and these types.
//!
//! Three things happen in exactly one place each:
//! - decrypt and audit a read ([`reads`]: `Domain::open`);
//! - after a committed change, invalidate caches and tell watchers
//!   (`Domain::committed`);
//! - decide who a certificate is ([`auth`]).
//!
//! Modules: [`audit`] (the audit actions), [`auth`] (authentication),
//! [`admin`] (operator operations on secrets, clients, groups, the audit
//! log), [`reads`] (what workloads read), [`watch`] (keeping a client's view
//! in sync).

pub mod admin;
pub mod audit;
pub mod auth;
pub mod reads;
pub mod watch;

use std::sync::Arc;

use tokio::sync::{broadcast, watch as signal, Semaphore};

pub use self::audit::Action;
pub use self::auth::{Caller, Peer};
pub use self::reads::{Content, Opened, ReadPage, MAX_REPLY_CONTENT};
pub use self::watch::{Delta, Held, Next, Watcher};

use crate::audit_log::AuditLog;
use crate::auth_cache::AuthCache;
use crate::error::Error;
use crate::keys::KeyRing;
use crate::pki::Ca;
use crate::report_budget::{HandshakeBudget, RenewBudget, ReportBudget};
use crate::store::{Change, ChangeFeed, Store};

pub struct Domain {
    store: Arc<dyn Store>,
    /// The master key and what derives from it; old and new during a rekey.
    keys: Arc<KeyRing>,
    ca: Ca,
    trust_domain: String,
    max_secret_size: usize,
    feed: Arc<dyn ChangeFeed>,
    /// Changes to `true` when the server shuts down.
    closing: signal::Sender<bool>,
    audit: AuditLog,
    /// Recently decrypted versions, shared by Watch streams so a rotation
    /// seen by many watchers is decrypted once.
    plain: Arc<reads::PlainCache>,
    /// Fast-path Watch reads in progress, shared by the watchers of one
    /// client woken by the same change.
    flights: watch::Flights,
    /// Authenticated certificates, dropped by `committed` when clients
    /// change, so a removal takes effect on the very next call.
    auth_cache: Arc<AuthCache>,
    /// What each client may add to the audit log by reporting refusals.
    report_budget: ReportBudget,
    /// What refused TLS handshakes may add to the audit log.
    handshake_budget: HandshakeBudget,
    /// How often a client may renew its own certificate.
    renew_budget: RenewBudget,
    /// Store calls in flight, at most what the store says is useful.
    calls: Semaphore,
    /// The external audit sink, when one is configured (`audit verify`
    /// compares it with the database).
    audit_sink: std::sync::OnceLock<Arc<crate::audit_sink::SinkStatus>>,
    /// The row set finding last reported, so one mismatch is audited once.
    row_set_reported: std::sync::Mutex<Option<crate::store::BadRow>>,
}

/// What the server was configured with.
pub struct Settings {
    pub trust_domain: String,
    pub max_secret_size: usize,
}

impl Domain {
    /// Starts the domain and its audit writer thread; the thread ends once
    /// every handle to the domain is gone (join it to close the store).
    pub fn start(
        store: Arc<dyn Store>,
        keys: Arc<KeyRing>,
        ca: Ca,
        settings: Settings,
    ) -> (Arc<Domain>, std::thread::JoinHandle<()>) {
        let (audit, thread) = AuditLog::start(store.clone());
        let plain = Arc::<reads::PlainCache>::default();
        let auth_cache = Arc::<AuthCache>::default();
        follow_feed(store.feed(), auth_cache.clone(), plain.clone());
        let (closing, _) = signal::channel(false);
        let domain = Domain {
            feed: store.feed(),
            calls: Semaphore::new(store.concurrency().max(1)),
            store,
            keys,
            ca,
            trust_domain: settings.trust_domain,
            max_secret_size: settings.max_secret_size,
            closing,
            audit,
            plain,
            flights: Default::default(),
            auth_cache,
            report_budget: Default::default(),
            handshake_budget: Default::default(),
            renew_budget: Default::default(),
            audit_sink: Default::default(),
            row_set_reported: Default::default(),
        };
        (Arc::new(domain), thread)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The largest secret value accepted (`--max-secret-size`).
    pub fn max_secret_size(&self) -> usize {
        self.max_secret_size
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    /// Records a refused TLS handshake (action "tls.refused") with the
    /// peer's address and the cause, within a budget: past it, refusals are
    /// counted and the count recorded with the next one that fits.
    pub fn tls_refused(&self, remote: std::net::SocketAddr, cause: &str) {
        let Some(dropped_before) = self.handshake_budget.take(remote.ip()) else {
            return;
        };
        let mut entries = Vec::with_capacity(2);
        if dropped_before > 0 {
            entries.push(Action::TlsRefused.refused(
                "tls",
                format!("{dropped_before} earlier refused handshakes were over the audit budget and not recorded"),
            ));
        }
        entries.push(Action::TlsRefused.refused(
            &remote.to_string(),
            format!("from {remote}: {}", crate::names::printable(cause, 300)),
        ));
        let audit = self.audit.clone();
        tokio::spawn(async move {
            let _ = audit.append(entries).await;
        });
    }

    /// Ends every Watch stream (server shutdown), so a graceful shutdown
    /// does not wait for streams that never end by themselves.
    pub fn close(&self) {
        let _ = self.closing.send(true);
    }

    /// Resolves once the server starts shutting down.
    pub fn closing(&self) -> signal::Receiver<bool> {
        self.closing.subscribe()
    }

    fn subscribe(&self) -> (broadcast::Receiver<Change>, signal::Receiver<bool>) {
        (self.feed.subscribe(), self.closing.subscribe())
    }

    /// Runs blocking work (store calls, decryption) off the async threads,
    /// at most as many at once as the store can use: a burst (a rotation
    /// seen by 1,000 watchers) queues here instead of spawning hundreds of
    /// threads that fight over the store's connections.
    async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T, Error>
    where
        F: FnOnce(&Domain) -> Result<T, Error> + Send + 'static,
        T: Send + 'static,
    {
        let _permit = self
            .calls
            .acquire()
            .await
            .map_err(|_| Error::Stopped("the server is shutting down"))?;
        let this = self.clone();
        let out = match tokio::task::spawn_blocking(move || f(&this)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "a store task failed");
                Err(Error::Stopped("internal error; see the server log"))
            }
        };
        self.report_bad_rows().await;
        out
    }

    /// Logs and audits the rows whose MAC failed that the store met (each
    /// once per process): they were treated as absent.
    async fn report_bad_rows(&self) {
        let bad = self.store.take_bad_rows();
        if bad.is_empty() {
            return;
        }
        let entries = bad
            .iter()
            .map(|row| {
                tracing::error!(
                    table = row.table,
                    key = %row.key,
                    "a database row failed its MAC check and is treated as absent: {}; \
                     restore the database from a backup (`secretfs server verify` lists every bad row)",
                    row.what
                );
                Action::IntegrityBadRow.refused(
                    "store",
                    format!("{row}; not served. Restore the database from a backup (`secretfs server verify` lists every bad row)"),
                )
            })
            .collect();
        if let Err(e) = self.audit.append(entries).await {
            tracing::error!(error = %e, "could not audit bad rows");
        }
    }

    /// Checks the row set against every protected row (O(rows), off the
    /// async threads). A mismatch (rows put back, deleted or added without
    /// the key) is logged at error level and audited as
    /// `integrity.set_mismatch` once per finding; serving goes on, since
    /// every row still answers for itself (its MAC).
    pub async fn check_row_set(self: &Arc<Self>) {
        let found = match self.run(|d| Ok(d.store.check_row_set()?)).await {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(error = %e, "could not check the row set");
                return;
            }
        };
        let new = {
            let mut last = self
                .row_set_reported
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let new = found.is_some() && *last != found;
            *last = found.clone();
            new
        };
        let Some(finding) = found.filter(|_| new) else {
            return;
        };
        tracing::error!("the database failed its row set check: {}", finding.what);
        let entry = Action::IntegritySetMismatch.refused("store", finding.what.clone());
        if let Err(e) = self.audit.append(vec![entry]).await {
            tracing::error!(error = %e, "could not audit the row set mismatch");
        }
    }

    /// After every committed change, and only here: caches that depend on
    /// what changed are dropped, then watchers are told. (Changes other
    /// replicas commit reach the caches through [`follow_feed`].)
    fn committed(&self, change: Change) {
        invalidate(&self.auth_cache, &self.plain, Ok(change));
        self.feed.publish(change);
    }
}

/// Drops what `change` makes stale: `Err` is a lagging subscriber, which
/// cannot know what it missed and drops everything.
fn invalidate(
    auth: &AuthCache,
    plain: &reads::PlainCache,
    change: Result<Change, broadcast::error::RecvError>,
) {
    match change {
        Ok(Change::ClientAdded { .. } | Change::ClientRemoved { .. }) => auth.invalidate(),
        // Decrypted versions of it must not outlive it.
        Ok(Change::SecretDeleted { .. }) => plain.clear(),
        Ok(Change::Secret { .. } | Change::Access { .. }) => {}
        Ok(Change::Resync { .. }) | Err(broadcast::error::RecvError::Lagged(_)) => {
            auth.invalidate();
            plain.clear();
        }
        Err(broadcast::error::RecvError::Closed) => {}
    }
}

/// Keeps the caches following every change on the feed, including those
/// other replicas commit (this replica's own changes were already applied
/// in [`Domain::committed`]; applying them twice is harmless). A thread,
/// not a task: the domain may start outside a runtime. It ends when the
/// store's feed closes.
fn follow_feed(feed: Arc<dyn ChangeFeed>, auth: Arc<AuthCache>, plain: Arc<reads::PlainCache>) {
    let mut changes = feed.subscribe();
    drop(feed);
    // Without the thread a replica's caches would miss other replicas'
    // changes (a removed client still admitted): no domain without it, as
    // none without its audit writer.
    std::thread::Builder::new()
        .name("secretfs-cache-follow".into())
        .spawn(move || loop {
            let change = changes.blocking_recv();
            let closed = matches!(change, Err(broadcast::error::RecvError::Closed));
            invalidate(&auth, &plain, change);
            if closed {
                return;
            }
        })
        .expect("spawn the cache follower thread");
}

#[cfg(test)]
pub(crate) mod tests;
