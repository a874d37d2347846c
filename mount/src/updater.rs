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

/// How long a move to another server may take before it is reported as an
/// outage (status `connected: false`): the status never says connected for
/// longer than this after the stream in use broke, unless a server is
/// serving again.
pub const MOVE_GRACE: Duration = Duration::from_secs(1);

pub struct Updater {
    tree: SharedTree,
    notifier: Option<Notifier>,
    snapshot: Snapshot,
    state: SyncState,
    /// Skipped names already logged, so each is logged once, not per sync.
    logged_skips: HashSet<String>,
    /// Log an outage once, not on every failed attempt.
    in_outage: bool,
    /// When the connection was lost (monotonic, for `--max-stale`); set
    /// too while a move is under way.
    lost_at: Option<Instant>,
    /// A move under way: since when (wall clock, for the status), and why
    /// the server in use was left.
    moving: Option<(SystemTime, SyncError)>,
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
            moving: None,
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
            SyncEvent::Moving(e) => self.moving(e),
            SyncEvent::Serving(server) => self.state.server_in_use = Some(server),
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
        self.moving = None;
        self.install(snap);
    }

    /// The server in use failed and another is being tried: the files
    /// stay, the status stays connected for now, but the stale clock runs
    /// from this moment (`--max-stale` counts from the break, not from
    /// the end of the move).
    fn moving(&mut self, err: SyncError) {
        if !self.state.connected {
            // Already an outage: one more failed attempt.
            self.state.last_error = Some(err.to_string());
            return;
        }
        if self.lost_at.is_none() {
            self.lost_at = Some(Instant::now());
        }
        if self.moving.is_none() {
            self.moving = Some((SystemTime::now(), err));
        }
    }

    /// When a move under way becomes an outage, if one is.
    pub fn move_deadline(&self) -> Option<Instant> {
        match (&self.moving, self.lost_at) {
            (Some(_), Some(lost)) => Some(lost + MOVE_GRACE),
            _ => None,
        }
    }

    /// Reports the outage once a move has taken longer than [`MOVE_GRACE`].
    pub fn check_moving(&mut self) {
        if self.move_deadline().is_none_or(|t| Instant::now() < t) {
            return;
        }
        if let Some((_, err)) = self.moving.take() {
            self.failed(err);
        }
    }

    fn failed(&mut self, err: SyncError) {
        let moving_since = self.moving.take().map(|(since, _)| since);
        if self.lost_at.is_none() {
            self.lost_at = Some(Instant::now());
        }
        if self.state.disconnected_since.is_none() {
            self.state.disconnected_since = Some(moving_since.unwrap_or_else(SystemTime::now));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Defaults, Tree};
    use std::sync::{Arc, Mutex};

    fn updater(max_stale: Option<Duration>) -> Updater {
        let defaults = Defaults {
            uid: 0,
            gid: 0,
            mode: 0o400,
            force: Default::default(),
        };
        let tree = Arc::new(Mutex::new(Tree::new(defaults, SystemTime::now())));
        let mut u = Updater::new(
            tree,
            SyncState {
                server: "https://a:1,https://b:1".into(),
                ..SyncState::default()
            },
        );
        u.set_max_stale(max_stale);
        u.synced(Snapshot::empty());
        u
    }

    /// A move starts the `--max-stale` clock at once, keeps the status
    /// connected for the grace, and is an outage after it.
    #[test]
    fn a_move_starts_the_stale_clock_and_becomes_an_outage_after_the_grace() {
        let mut u = updater(Some(Duration::from_secs(5)));
        assert!(u.stale_deadline().is_none());
        let before = Instant::now();
        u.on_event(SyncEvent::Moving(SyncError::Unreachable("reset".into())));
        let stale = u
            .stale_deadline()
            .expect("the stale clock runs during a move");
        assert!(stale >= before + Duration::from_secs(5));
        assert!(stale <= Instant::now() + Duration::from_secs(5));
        assert!(
            u.state.connected,
            "connected while the move may still succeed"
        );
        let deadline = u.move_deadline().expect("a move has a deadline");
        assert!(deadline <= Instant::now() + MOVE_GRACE);

        u.check_moving();
        if Instant::now() < deadline {
            assert!(u.state.connected, "not before the grace");
        }
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        u.check_moving();
        assert!(!u.state.connected, "an outage once the grace passed");
        assert!(u.state.disconnected_since.is_some());
        assert!(u.move_deadline().is_none());
        assert_eq!(u.stale_deadline(), Some(stale), "counted from the break");
    }

    /// A move that succeeds within the grace is no outage; the server in
    /// use is shown.
    #[test]
    fn a_move_that_succeeds_clears_the_clock() {
        let mut u = updater(Some(Duration::from_secs(5)));
        u.on_event(SyncEvent::Moving(SyncError::Unreachable("reset".into())));
        u.on_event(SyncEvent::Serving("https://b:1".into()));
        u.on_event(SyncEvent::Synced {
            snapshot: Snapshot::empty(),
            revision: 2,
        });
        assert!(u.state.connected);
        assert!(u.stale_deadline().is_none() && u.move_deadline().is_none());
        assert_eq!(u.state.server_in_use.as_deref(), Some("https://b:1"));
    }
}
