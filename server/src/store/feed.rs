//! The change feed: how committed changes reach everything that depends on
//! them (Watch streams, caches).
//!
//! Writers publish a small hint after each committed change; every
//! subscriber receives it and looks in the store for what it needs. A
//! broadcast channel never blocks the sender: a slow subscriber falls
//! behind, gets `Lagged`, and recomputes everything, so no watcher can hold
//! up a rotation or another watcher.
//!
//! The feed belongs to the store because only the store knows who else can
//! change it: for SQLite, only this process ([`LocalFeed`]); for a database
//! shared by replicas, the feed also carries the database's own signal
//! (LISTEN/NOTIFY), so a change made through another replica arrives the
//! same way.

use tokio::sync::broadcast;

/// What changed, as a hint for who needs to look. Every hint carries the
/// revision its change committed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A secret's current version or its metadata changed (rotate,
    /// rollback, update): only views holding it are affected.
    Secret { id: u64, revision: u64 },
    /// A secret was deleted: views holding it lose it, and decrypted copies
    /// of its versions must go.
    SecretDeleted { id: u64, revision: u64 },
    /// Grants or groups changed: any view may be affected.
    Access { revision: u64 },
    /// A client was added: cached authentications are void (no view
    /// changes: a new client belongs to no group).
    ClientAdded { revision: u64 },
    /// A client was removed: cached authentications are void, and a
    /// watcher's client may be gone.
    ClientRemoved { revision: u64 },
    /// Changes up to `revision` may have been missed (a replica's listener
    /// connection dropped): anything may have changed, so every cache is
    /// void and every view is recomputed.
    Resync { revision: u64 },
}

impl Change {
    pub fn revision(&self) -> u64 {
        match *self {
            Change::Secret { revision, .. }
            | Change::SecretDeleted { revision, .. }
            | Change::Access { revision }
            | Change::ClientAdded { revision }
            | Change::ClientRemoved { revision }
            | Change::Resync { revision } => revision,
        }
    }
}

pub trait ChangeFeed: Send + Sync {
    /// Announces a change this process committed.
    fn publish(&self, change: Change);
    /// Every change from now on: this process's and, for a shared store,
    /// other replicas'.
    fn subscribe(&self) -> broadcast::Receiver<Change>;
    /// Whether other replicas' changes are heard now (for health). Always
    /// true for a store no one else writes.
    fn connected(&self) -> bool {
        true
    }
}

/// The feed of a store only this process writes.
pub struct LocalFeed {
    changes: broadcast::Sender<Change>,
}

impl Default for LocalFeed {
    fn default() -> Self {
        // Large enough to ride out bursts; a watcher further behind resyncs.
        let (changes, _) = broadcast::channel(4096);
        LocalFeed { changes }
    }
}

impl ChangeFeed for LocalFeed {
    fn publish(&self, change: Change) {
        // No receivers is fine: nobody is watching.
        let _ = self.changes.send(change);
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}
