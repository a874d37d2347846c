//! Change fan-out to Watch streams.
//!
//! Writers publish a small hint after each committed change; every Watch
//! stream's task receives it and recomputes its own client's view from the
//! store. A broadcast channel never blocks the sender: a slow or dead
//! watcher falls behind, gets `Lagged`, and recomputes everything, so no
//! watcher can hold up a rotation or another watcher.

use tokio::sync::{broadcast, watch};

/// What changed, as a hint for who needs to look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A secret's current version changed (rotate, rollback): only views
    /// holding it are affected. `revision` was read after the commit, so it
    /// is at least this change's (read once here, not once per watcher).
    Secret { id: u64, revision: u64 },
    /// Grants or clients changed: any view may be affected, and a watcher's
    /// client may be gone.
    Access,
}

pub struct Hub {
    changes: broadcast::Sender<Change>,
    closing: watch::Sender<bool>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Hub {
        // Large enough to ride out bursts; a watcher further behind resyncs.
        let (changes, _) = broadcast::channel(4096);
        let (closing, _) = watch::channel(false);
        Hub { changes, closing }
    }

    pub fn publish(&self, change: Change) {
        // No receivers is fine: nobody is watching.
        let _ = self.changes.send(change);
    }

    pub fn subscribe(&self) -> (broadcast::Receiver<Change>, watch::Receiver<bool>) {
        (self.changes.subscribe(), self.closing.subscribe())
    }

    /// Ends every Watch stream (server shutdown), so graceful shutdown does
    /// not wait for streams that never end by themselves.
    /// Changes to `true` when the server shuts down.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    pub fn close(&self) {
        let _ = self.closing.send(true);
    }
}
