//! The one step every change goes through: swap a new snapshot into the
//! tree, rewrite the status file, then tell the kernel what to forget.
//!
//! Notifications are sent after the tree's lock is released: the kernel
//! applies an entry invalidation under the parent directory's lock, which a
//! concurrent lookup holds while it waits for our FUSE thread, and that
//! thread needs the tree's lock. Holding it here would deadlock.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use fuser::{INodeNo, Notifier};

use crate::snapshot::Snapshot;
use crate::status::{self, SyncState};
use crate::sync::{SyncError, SyncEvent};
use crate::tree::{lock, Invalidation, SharedTree};

pub struct Updater {
    tree: SharedTree,
    notifier: Option<Notifier>,
    snapshot: Snapshot,
    state: SyncState,
    /// Skipped names already logged, so each is logged once, not per sync.
    logged_skips: HashSet<String>,
    /// Log an outage once, not on every failed attempt.
    in_outage: bool,
    /// When the connection was lost (monotonic, for `--max-stale`).
    lost_at: Option<Instant>,
}

impl Updater {
    pub fn new(tree: SharedTree, state: SyncState) -> Updater {
        Updater {
            tree,
            notifier: None,
            snapshot: Snapshot::empty(),
            state,
            logged_skips: HashSet::new(),
            in_outage: false,
            lost_at: None,
        }
    }

    /// Fail closed once cut off for longer than `max` (`None`: never).
    pub fn set_max_stale(&mut self, max: Option<Duration>) {
        self.state.max_stale = max;
    }

    /// From now on, changes are also sent to the kernel.
    pub fn set_notifier(&mut self, notifier: Notifier) {
        self.notifier = Some(notifier);
    }

    pub fn on_event(&mut self, event: SyncEvent) {
        match event {
            SyncEvent::Synced { snapshot, revision } => {
                self.state.revision = Some(revision);
                self.synced(snapshot);
            }
            SyncEvent::Error(e) => self.failed(e),
            SyncEvent::Certificate(info) => {
                self.state.cert = Some(info);
                self.publish_status();
            }
        }
    }

    /// A successful sync: show `snap`.
    pub fn synced(&mut self, snap: Snapshot) {
        if self.in_outage {
            tracing::info!(server = %self.state.server, "server reachable again; secrets are current");
            self.in_outage = false;
        }
        if self.state.refused.take().is_some() {
            tracing::info!("the server accepts this client again");
        }
        for s in snap.skipped() {
            if self.logged_skips.insert(s.name.clone()) {
                tracing::warn!(name = %s.name, reason = %s.reason, "secret not shown in the mount");
            }
        }
        if self.state.fail_closed {
            tracing::info!("connected again: secrets are served again");
        }
        self.state.connected = true;
        self.state.last_sync = Some(SystemTime::now());
        self.state.last_error = None;
        self.state.disconnected_since = None;
        self.lost_at = None;
        self.install(snap);
    }

    fn failed(&mut self, err: SyncError) {
        if self.lost_at.is_none() {
            self.lost_at = Some(Instant::now());
            self.state.disconnected_since = Some(SystemTime::now());
        }
        self.state.connected = false;
        self.state.last_error = Some(err.to_string());
        match err {
            SyncError::Refused(message) => {
                if self.state.refused.is_none() {
                    tracing::error!(
                        %message,
                        "the server refused this client; removing every secret from the mount"
                    );
                }
                self.state.refused = Some(message);
                self.wipe();
            }
            other => {
                if !self.in_outage {
                    tracing::warn!(
                        error = %other,
                        secrets = self.snapshot.files().len(),
                        "lost the server; serving the secrets already held and reconnecting"
                    );
                    self.in_outage = true;
                }
                self.publish_status();
            }
        }
    }

    /// When the mount must start failing closed, if it is not already.
    pub fn stale_deadline(&self) -> Option<Instant> {
        match (self.state.fail_closed, self.state.max_stale, self.lost_at) {
            (false, Some(max), Some(lost)) => Some(lost + max),
            _ => None,
        }
    }

    /// Starts failing closed once the deadline has passed: every secret
    /// answers EIO, and the kernel forgets what it cached so that it asks.
    pub fn check_stale(&mut self) {
        if self.stale_deadline().is_none_or(|t| Instant::now() < t) {
            return;
        }
        self.state.fail_closed = true;
        tracing::error!(
            max_stale = ?self.state.max_stale,
            "cut off from the server for longer than --max-stale: secret reads now fail with EIO"
        );
        let now = SystemTime::now();
        let content = status::render(&self.state, &self.snapshot, now);
        let mut inval = {
            let mut tree = lock(&self.tree);
            let mut inval = tree.set_fail_closed(true);
            inval.push(tree.set_status(content, now));
            inval
        };
        self.send(&mut inval);
    }

    fn install(&mut self, snap: Snapshot) {
        let now = SystemTime::now();
        self.state.fail_closed = false;
        let content = status::render(&self.state, &snap, now);
        let mut inval = {
            let mut tree = lock(&self.tree);
            // In the same critical section as the new snapshot: nobody reads
            // the old one in between.
            let mut inval = tree.set_fail_closed(false);
            inval.extend(tree.apply(&snap, now));
            inval.push(tree.set_status(content, now));
            inval
        };
        // The old snapshot's bytes are freed (and wiped) here unless an
        // inode the kernel still holds shares them.
        self.snapshot = snap;
        self.send(&mut inval);
    }

    /// Drops every secret, even ones the kernel still references.
    pub fn wipe(&mut self) {
        let now = SystemTime::now();
        self.snapshot = Snapshot::empty();
        let content = status::render(&self.state, &self.snapshot, now);
        let mut inval = {
            let mut tree = lock(&self.tree);
            let mut inval = tree.wipe(now);
            inval.push(tree.set_status(content, now));
            inval
        };
        self.send(&mut inval);
    }

    /// The caller check's counters, shown from the next status on.
    pub fn set_refused_callers(&mut self, counts: crate::guard::RefusalCounts) {
        self.state.refused_callers = Some(counts);
    }

    /// Rewrites the status file (staleness changes every second).
    pub fn publish_status(&mut self) {
        let now = SystemTime::now();
        let content = status::render(&self.state, &self.snapshot, now);
        let mut inval = vec![lock(&self.tree).set_status(content, now)];
        self.send(&mut inval);
    }

    fn send(&self, inval: &mut Vec<Invalidation>) {
        let Some(notifier) = &self.notifier else {
            return;
        };
        let batch = std::mem::take(inval);
        // A notification can wait on kernel locks; keep the async workers free.
        tokio::task::block_in_place(|| notify(notifier, &batch));
    }
}

/// Sends invalidations; the kernel answers ENOENT (ignored by fuser) for
/// anything it does not have cached.
pub fn notify(notifier: &Notifier, batch: &[Invalidation]) {
    for inv in batch {
        let res = match inv {
            Invalidation::Entry { parent, name } => {
                notifier.inval_entry(INodeNo(*parent), name.as_ref())
            }
            Invalidation::Delete {
                parent,
                child,
                name,
            } => notifier.delete(INodeNo(*parent), INodeNo(*child), name.as_ref()),
            // Offset 0, length 0: attributes and every cached page.
            Invalidation::Inode { ino } => notifier.inval_inode(INodeNo(*ino), 0, 0),
        };
        if let Err(e) = res {
            // ENOTDIR/ENOTEMPTY etc. still invalidate the dentry; log only.
            tracing::debug!(?inv, error = %e, "kernel declined an invalidation");
        }
    }
}
