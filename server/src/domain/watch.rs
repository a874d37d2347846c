//! Keeping a client's view in sync (`Secrets.Watch`).
//!
//! A [`Watcher`] remembers what the client holds (name → id, version,
//! metadata digest), starting from what the client says it holds. On every
//! relevant change it reads the client's view from the store and yields
//! exactly the difference: upserts (metadata and content), metadata
//! updates (a held version whose metadata changed: no content, so no read
//! is audited) and removals. Because the
//! diff is against what the client holds, a reconnect transfers only what
//! it missed, and an event is never applied twice. Every content yielded is
//! audited as a read before it is handed out.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{broadcast, watch as signal};

use super::{Caller, Domain, Opened};
use crate::error::Error;
use crate::names::check_secret_name;
use crate::store::{Change, SecretRecord};

/// The most entries a client may say it holds.
pub const MAX_KNOWN: usize = 100_000;

/// What a client holds: name → (secret id, version, metadata digest; 0 =
/// unknown).
pub type Held = HashMap<String, (u64, u64, u64)>;

/// Checks what a client says it holds: (name, id, version, digest).
pub fn held(known: impl ExactSizeIterator<Item = (String, u64, u64, u64)>) -> Result<Held, Error> {
    if known.len() > MAX_KNOWN {
        return Err(Error::InvalidArgument(format!(
            "at most {MAX_KNOWN} known secrets per Watch"
        )));
    }
    let mut held = HashMap::with_capacity(known.len());
    for (name, id, version, digest) in known {
        check_secret_name(&name)?;
        held.insert(name, (id, version, digest));
    }
    Ok(held)
}

/// A change to what the client holds.
pub struct Delta {
    pub revision: u64,
    /// The first event of a stream (sent even when empty).
    pub initial: bool,
    pub upserts: Vec<Opened>,
    /// Held versions whose metadata changed (no content).
    pub meta_updates: Vec<SecretRecord>,
    /// Names the client must drop, sorted.
    pub removals: Vec<String>,
}

/// What [`Watcher::next`] found.
pub enum Next {
    Event(Delta),
    /// The server is shutting down; the client should reconnect.
    ShuttingDown,
    /// The change feed ended.
    Closed,
}

pub struct Watcher {
    domain: Arc<Domain>,
    caller: Caller,
    held: Held,
    /// The ids in `held`, so each change in the feed is matched in O(1)
    /// (a client may hold 100,000 names); rebuilt whenever `held` loses
    /// an id or gains a new one.
    held_ids: HashSet<u64>,
    changes: broadcast::Receiver<Change>,
    closing: signal::Receiver<bool>,
    started: bool,
}

impl Domain {
    /// A watcher of `caller`'s view, which holds `held`. Subscribed before
    /// the first view is read: a change committed in between is seen again,
    /// never missed.
    pub fn watch(self: &Arc<Self>, caller: Caller, held: Held) -> Watcher {
        let (changes, closing) = self.subscribe();
        tracing::debug!(client = %caller.name(), "watch started");
        Watcher {
            domain: self.clone(),
            caller,
            held_ids: ids_of(&held),
            held,
            changes,
            closing,
            started: false,
        }
    }
}

fn ids_of(held: &Held) -> HashSet<u64> {
    held.values().map(|&(id, ..)| id).collect()
}

/// What a burst of changes asks a watcher to do.
enum Wanted {
    /// These held secrets changed version or metadata (as of `revision`).
    Rotated { ids: Vec<u64>, revision: u64 },
    /// Anything may have changed: recompute the whole view.
    Everything,
}

impl Watcher {
    /// The next event: the initial view first, then each relevant change.
    /// An error ends the stream (the client lost access, or the store
    /// failed).
    pub async fn next(&mut self) -> Result<Next, Error> {
        if !self.started {
            self.started = true;
            // The initial event is sent even when empty.
            return Ok(Next::Event(self.delta(true).await?));
        }
        loop {
            let wanted = match self.wait().await {
                Ok(w) => w,
                Err(stop) => return Ok(stop),
            };
            let event = match wanted {
                Wanted::Rotated { ids, revision } => self.rotated(ids, revision).await?,
                Wanted::Everything => {
                    let (domain, caller) = (self.domain.clone(), self.caller.clone());
                    if let Err(e) = domain.run(move |d| d.still_allowed(&caller)).await {
                        tracing::info!(client = %self.caller.name(), "watch ended: {e}");
                        return Err(e);
                    }
                    Some(self.delta(false).await?)
                }
            };
            if let Some(event) = event.filter(|e| {
                !e.upserts.is_empty() || !e.removals.is_empty() || !e.meta_updates.is_empty()
            }) {
                return Ok(Next::Event(event));
            }
        }
    }

    /// Waits for something relevant; takes everything queued at once, so a
    /// burst of changes costs one recomputation.
    async fn wait(&mut self) -> Result<Wanted, Next> {
        let mut ids = Vec::new();
        let mut revision = 0;
        let mut everything = false;
        while ids.is_empty() && !everything {
            let first = tokio::select! {
                r = self.changes.recv() => r,
                _ = self.closing.changed() => return Err(Next::ShuttingDown),
            };
            let mut next = Some(first);
            while let Some(r) = next {
                match r {
                    Ok(
                        Change::Secret { id, revision: r }
                        | Change::SecretDeleted { id, revision: r },
                    ) => {
                        if self.held_ids.contains(&id) {
                            revision = revision.max(r);
                            if !ids.contains(&id) {
                                ids.push(id);
                            }
                        }
                    }
                    // A new client belongs to no group: no view changes.
                    Ok(Change::ClientAdded { .. }) => {}
                    // Missed changes: we cannot know which, recompute all.
                    Ok(
                        Change::Access { .. }
                        | Change::ClientRemoved { .. }
                        | Change::Resync { .. },
                    )
                    | Err(broadcast::error::RecvError::Lagged(_)) => everything = true,
                    Err(broadcast::error::RecvError::Closed) => return Err(Next::Closed),
                }
                next = match self.changes.try_recv() {
                    Ok(c) => Some(Ok(c)),
                    Err(broadcast::error::TryRecvError::Empty) => None,
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Some(Err(broadcast::error::RecvError::Lagged(n)))
                    }
                    Err(broadcast::error::TryRecvError::Closed) => {
                        Some(Err(broadcast::error::RecvError::Closed))
                    }
                };
            }
        }
        Ok(if everything {
            Wanted::Everything
        } else {
            Wanted::Rotated { ids, revision }
        })
    }

    /// The difference between what the client holds and its view now.
    async fn delta(&mut self, initial: bool) -> Result<Delta, Error> {
        let caller = self.caller.clone();
        let snapshot = self.held.clone();
        let (delta, now_held, audit) = self
            .domain
            .run(move |d| {
                let view = d.store.client_view(caller.client.id)?;
                let in_view: HashSet<&str> = view.secrets.iter().map(|s| s.name.as_str()).collect();
                let mut now_held = snapshot;
                let mut removals: Vec<String> = now_held
                    .keys()
                    .filter(|n| !in_view.contains(n.as_str()))
                    .cloned()
                    .collect();
                for r in &removals {
                    now_held.remove(r);
                }
                let mut changed = Vec::new();
                let mut meta_updates = Vec::new();
                for s in &view.secrets {
                    let digest = s.meta_digest();
                    match now_held.get_mut(&s.name) {
                        Some((id, version, held))
                            if (*id, *version) == (s.id, s.current_version) =>
                        {
                            if *held != digest {
                                *held = digest;
                                meta_updates.push(s.clone());
                            }
                        }
                        _ => changed.push(s.name.clone()),
                    }
                }
                let mut upserts = Vec::with_capacity(changed.len());
                let mut audit = Vec::with_capacity(changed.len());
                if !changed.is_empty() {
                    let (found, gone) = d.store.read_sealed(caller.client.id, &changed)?;
                    // Deleted or revoked between the two reads.
                    for g in gone {
                        if now_held.remove(&g).is_some() {
                            removals.push(g);
                        }
                    }
                    for s in found {
                        let (content, entry) = d.open(caller.name(), &s, false, "watch")?;
                        audit.push(entry);
                        now_held.insert(
                            s.record.name.clone(),
                            (
                                s.record.id,
                                s.record.current_version,
                                s.record.meta_digest(),
                            ),
                        );
                        upserts.push(Opened {
                            record: s.record,
                            content,
                        });
                    }
                }
                removals.sort();
                let delta = Delta {
                    revision: view.revision,
                    initial,
                    upserts,
                    meta_updates,
                    removals,
                };
                Ok((delta, now_held, audit))
            })
            .await?;
        // Audited before the content leaves the server.
        self.domain.audit.append(audit).await?;
        self.held_ids = ids_of(&now_held);
        self.held = now_held;
        Ok(delta)
    }

    /// The fast path after rotations, rollbacks or updates (grants
    /// unchanged): fetch just those secrets, re-checking in the same read
    /// that the client may still read them, and decrypt each version once
    /// for all watchers (a metadata-only change decrypts nothing).
    async fn rotated(&mut self, ids: Vec<u64>, revision: u64) -> Result<Option<Delta>, Error> {
        let caller = self.caller.clone();
        // What the client holds of just these secrets (not a copy of all
        // it holds: this runs for every watcher of a rotated secret).
        // Per id: the (name, version, digest) held of it.
        type HeldOf = Vec<(String, u64, u64)>;
        let known: Vec<(u64, HeldOf)> = ids
            .into_iter()
            .map(|id| {
                let held = self
                    .held
                    .iter()
                    .filter(|(_, (held_id, ..))| *held_id == id)
                    .map(|(name, (_, version, digest))| (name.clone(), *version, *digest))
                    .collect();
                (id, held)
            })
            .collect();
        let (delta, audit, now_held) = self
            .domain
            .run(move |d| {
                let mut upserts = Vec::new();
                let mut meta_updates = Vec::new();
                let mut removals = Vec::new();
                let mut audit = Vec::new();
                // What the client holds of these secrets after the delta.
                let mut now_held = Vec::new();
                for (id, held) in known {
                    let Some(s) = d.store.read_one_for_client(caller.client.id, id)? else {
                        // Deleted, or access lost in between.
                        removals.extend(held.into_iter().map(|(name, ..)| name));
                        continue;
                    };
                    let version = s.record.current_version;
                    let digest = s.record.meta_digest();
                    let held_now = held
                        .iter()
                        .find(|(name, v, _)| *name == s.record.name && *v == version);
                    if let Some((_, _, held_digest)) = held_now {
                        // The version it holds is current: at most the
                        // metadata changed, and that needs no content.
                        if *held_digest != digest {
                            now_held.push((s.record.name.clone(), (id, version, digest)));
                            meta_updates.push(s.record);
                        }
                        continue;
                    }
                    let (content, entry) = d.open(caller.name(), &s, true, "watch")?;
                    audit.push(entry);
                    now_held.push((s.record.name.clone(), (s.record.id, version, digest)));
                    upserts.push(Opened {
                        record: s.record,
                        content,
                    });
                }
                removals.sort();
                let delta = Delta {
                    revision,
                    initial: false,
                    upserts,
                    meta_updates,
                    removals,
                };
                Ok((delta, audit, now_held))
            })
            .await?;
        if delta.upserts.is_empty() && delta.removals.is_empty() && delta.meta_updates.is_empty() {
            return Ok(None);
        }
        self.domain.audit.append(audit).await?;
        for gone in &delta.removals {
            self.held.remove(gone);
        }
        self.held.extend(now_held);
        // Every id upserted here was asked for because it is held, so it is
        // in `held_ids` already: only a removal changes the set.
        if !delta.removals.is_empty() {
            self.held_ids = ids_of(&self.held);
        }
        Ok(Some(delta))
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        tracing::debug!(client = %self.caller.name(), "watch ended");
    }
}
