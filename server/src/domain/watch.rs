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
//!
//! The watchers of one client woken by the same change share its reads
//! and one audit append (`Flights`); each still gets its own diff and
//! its own audit entries. The first event and the recompute after a lag
//! are each watcher's own.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, oneshot, watch as signal};

use super::auth::still_is;
use super::{Caller, Domain, Opened};
use crate::error::Error;
use crate::names::check_secret_name;
use crate::store::{AuditEntry, Change, SealedSecret, SecretRecord, View};

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
    /// Anything may have changed: recompute the whole view. `revision`:
    /// the last change taken; `None` after a lag (changes were missed, so
    /// there is no revision a shared read could be keyed on).
    Everything { revision: Option<u64> },
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
                Wanted::Everything { revision } => match self.everything(revision).await {
                    Ok(delta) => delta,
                    Err(e @ Error::PermissionDenied(_)) => {
                        tracing::info!(client = %self.caller.name(), "watch ended: {e}");
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                },
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
        // The last change taken, and whether any were missed.
        let mut seen = 0;
        let mut lagged = false;
        while ids.is_empty() && !everything {
            let first = tokio::select! {
                r = self.changes.recv() => r,
                _ = self.closing.changed() => return Err(Next::ShuttingDown),
            };
            let mut next = Some(first);
            while let Some(r) = next {
                match &r {
                    // A Resync's revision is not one change's (a gap, a
                    // reconnect, a restored database): like a lag, it keys
                    // no shared read, so no watcher is answered by a read
                    // that began before what it was told.
                    Ok(Change::Resync { .. }) | Err(_) => lagged = true,
                    Ok(change) => seen = seen.max(change.revision()),
                }
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
            Wanted::Everything {
                revision: (!lagged).then_some(seen),
            }
        } else {
            Wanted::Rotated { ids, revision }
        })
    }

    /// The difference between what the client holds and its view now,
    /// from this watcher's own reads (the first event, which must read
    /// after this watcher subscribed, and a recompute after a lag).
    async fn delta(&mut self, initial: bool) -> Result<Delta, Error> {
        let caller = self.caller.clone();
        let snapshot = self.held.clone();
        let (delta, now_held, audit) = self
            .domain
            .run(move |d| {
                let view = d.store.client_view(caller.client.id)?;
                let diff = ViewDiff::new(&view, snapshot);
                let (found, gone) = if diff.changed.is_empty() {
                    (Vec::new(), Vec::new())
                } else {
                    d.store.read_sealed(caller.client.id, &diff.changed)?
                };
                diff.finish(d, caller.name(), &found, &gone, view.revision, false)
            })
            .await?;
        let delta = Delta { initial, ..delta };
        // Audited before the content leaves the server.
        self.domain.audit.append(audit).await?;
        self.held_ids = ids_of(&now_held);
        self.held = now_held;
        Ok(delta)
    }

    /// The recompute after grants or clients changed (as of `revision`):
    /// the client must still be there, then its whole view is diffed.
    /// Watchers of one client woken by the same change share the reads
    /// (see [`Flights`]); after a lag each reads alone.
    async fn everything(&mut self, revision: Option<u64>) -> Result<Option<Delta>, Error> {
        let Some(revision) = revision else {
            return self.everything_alone().await.map(Some);
        };
        let key = FlightKey {
            client_id: self.caller.client.id,
            client_name: self.caller.name().to_owned(),
            asked: Asked::View,
            revision,
        };
        let (reply, answer) = oneshot::channel();
        let rider = Rider {
            caller: self.caller.clone(),
            known: Known::All(self.held.clone()),
            reply,
        };
        if self.domain.flights.board(key.clone(), rider) {
            tokio::spawn(self.domain.clone().fly(key));
        }
        match answer.await {
            Ok(ridden) => Ok(self.apply(ridden?)),
            // The shared read or its audit failed: read alone.
            Err(_) => self.everything_alone().await.map(Some),
        }
    }

    async fn everything_alone(&mut self) -> Result<Delta, Error> {
        let (domain, caller) = (self.domain.clone(), self.caller.clone());
        domain.run(move |d| d.still_allowed(&caller)).await?;
        self.delta(false).await
    }

    /// The fast path after rotations, rollbacks or updates (grants
    /// unchanged): fetch just those secrets, re-checking in the same read
    /// that the client may still read them, and decrypt each version once
    /// for all watchers (a metadata-only change decrypts nothing).
    ///
    /// Watchers of one client woken by the same change share that read
    /// (see [`Flights`]): one store read and one audit append for all of
    /// them, each still with its own decision and its own audit entry.
    async fn rotated(&mut self, mut ids: Vec<u64>, revision: u64) -> Result<Option<Delta>, Error> {
        ids.sort_unstable();
        let key = FlightKey {
            client_id: self.caller.client.id,
            client_name: self.caller.name().to_owned(),
            asked: Asked::Secrets(ids.clone()),
            revision,
        };
        let (reply, answer) = oneshot::channel();
        let rider = Rider {
            caller: self.caller.clone(),
            known: Known::Of(self.known_of(&ids)),
            reply,
        };
        if self.domain.flights.board(key.clone(), rider) {
            tokio::spawn(self.domain.clone().fly(key));
        }
        let ridden = match answer.await {
            Ok(ridden) => ridden?,
            // The shared read or its audit failed: read alone, and get
            // this watcher's own answer (or error).
            Err(_) => self.alone(self.known_of(&ids), revision).await?,
        };
        Ok(self.apply(ridden))
    }

    /// What the client holds of just these secrets (not a copy of all it
    /// holds: this runs for every watcher of a rotated secret).
    fn known_of(&self, ids: &[u64]) -> Vec<(u64, HeldOf)> {
        ids.iter()
            .map(|&id| {
                let held = self
                    .held
                    .iter()
                    .filter(|(_, (held_id, ..))| *held_id == id)
                    .map(|(name, (_, version, digest))| (name.clone(), *version, *digest))
                    .collect();
                (id, held)
            })
            .collect()
    }

    /// [`rotated`](Self::rotated) without company: this watcher's own read
    /// and audit append.
    async fn alone(&self, known: Vec<(u64, HeldOf)>, revision: u64) -> Result<Ridden, Error> {
        let caller = self.caller.clone();
        let (ridden, audit) = self
            .domain
            .run(move |d| {
                let ids: Vec<u64> = known.iter().map(|(id, _)| *id).collect();
                let found = read_found(d, caller.client.id, &ids)?;
                decide(d, caller.name(), &found, known, revision)
            })
            .await?;
        self.domain.audit.append(audit).await?;
        Ok(ridden)
    }

    /// Takes what a fast-path read decided for this watcher into what it
    /// holds; `None` when nothing changed for it.
    fn apply(&mut self, ridden: Ridden) -> Option<Delta> {
        let (delta, now_held) = match ridden {
            Ridden::Of { delta, now_held } => (delta, now_held),
            Ridden::All { delta, now_held } => {
                self.held_ids = ids_of(&now_held);
                self.held = now_held;
                return Some(delta);
            }
        };
        if delta.upserts.is_empty() && delta.removals.is_empty() && delta.meta_updates.is_empty() {
            return None;
        }
        for gone in &delta.removals {
            self.held.remove(gone);
        }
        self.held.extend(now_held);
        // Every id upserted here was asked for because it is held, so it is
        // in `held_ids` already: only a removal changes the set.
        if !delta.removals.is_empty() {
            self.held_ids = ids_of(&self.held);
        }
        Some(delta)
    }
}

/// Per secret id: the (name, version, digest) a watcher holds of it.
type HeldOf = Vec<(String, u64, u64)>;

/// What a shared read decided for one watcher: its delta, and what it
/// holds afterwards.
enum Ridden {
    /// The fast path: what it holds of the read secrets.
    Of {
        delta: Delta,
        now_held: Vec<(String, (u64, u64, u64))>,
    },
    /// A whole view: all it holds.
    All { delta: Delta, now_held: Held },
}

/// What a view changes for one watcher, before any content is read.
struct ViewDiff {
    /// What it holds once the delta is applied (content still to come
    /// for `changed`).
    now_held: Held,
    removals: Vec<String>,
    meta_updates: Vec<SecretRecord>,
    /// Names whose content it needs, in view order.
    changed: Vec<String>,
}

impl ViewDiff {
    fn new(view: &View, held: Held) -> ViewDiff {
        let in_view: HashSet<&str> = view.secrets.iter().map(|s| s.name.as_str()).collect();
        let mut now_held = held;
        let removals: Vec<String> = now_held
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
                Some((id, version, held)) if (*id, *version) == (s.id, s.current_version) => {
                    if *held != digest {
                        *held = digest;
                        meta_updates.push(s.clone());
                    }
                }
                _ => changed.push(s.name.clone()),
            }
        }
        ViewDiff {
            now_held,
            removals,
            meta_updates,
            changed,
        }
    }

    /// The delta, given the sealed content read for (at least) `changed`
    /// and the names of it no longer readable; each content opened is
    /// audited for `actor`. `shared`: the versions are opened for several
    /// watchers (kept in the plaintext cache).
    fn finish(
        self,
        d: &Domain,
        actor: &str,
        found: &[SealedSecret],
        gone: &[String],
        revision: u64,
        shared: bool,
    ) -> Result<(Delta, Held, Vec<AuditEntry>), Error> {
        let ViewDiff {
            mut now_held,
            mut removals,
            meta_updates,
            changed,
        } = self;
        let wanted: HashSet<&str> = changed.iter().map(String::as_str).collect();
        // Deleted or revoked between the two reads.
        for g in gone.iter().filter(|g| wanted.contains(g.as_str())) {
            if now_held.remove(g).is_some() {
                removals.push(g.clone());
            }
        }
        let mut upserts = Vec::with_capacity(changed.len());
        let mut audit = Vec::with_capacity(changed.len());
        for s in found
            .iter()
            .filter(|s| wanted.contains(s.record.name.as_str()))
        {
            let (content, entry) = d.open(actor, s, shared, "watch")?;
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
                record: s.record.clone(),
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
        Ok((delta, now_held, audit))
    }
}

/// Reads `ids` as `client_id` may read them now: per id, its sealed
/// current content, or `None` (deleted, or no longer granted to it).
fn read_found(
    d: &Domain,
    client_id: u64,
    ids: &[u64],
) -> Result<Vec<(u64, Option<SealedSecret>)>, Error> {
    ids.iter()
        .map(|&id| Ok((id, d.store.read_one_for_client(client_id, id)?)))
        .collect()
}

/// One watcher's delta from a read of the secrets it holds (`found`, read
/// for its own client), and the audit entries of the content it gets.
fn decide(
    d: &Domain,
    actor: &str,
    found: &[(u64, Option<SealedSecret>)],
    known: Vec<(u64, HeldOf)>,
    revision: u64,
) -> Result<(Ridden, Vec<AuditEntry>), Error> {
    let mut upserts = Vec::new();
    let mut meta_updates = Vec::new();
    let mut removals = Vec::new();
    let mut audit = Vec::new();
    // What the client holds of these secrets after the delta.
    let mut now_held = Vec::new();
    for (id, held) in known {
        let s = found
            .iter()
            .find(|(found_id, _)| *found_id == id)
            .and_then(|(_, s)| s.as_ref());
        let Some(s) = s else {
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
            // The version it holds is current: at most the metadata
            // changed, and that needs no content.
            if *held_digest != digest {
                now_held.push((s.record.name.clone(), (id, version, digest)));
                meta_updates.push(s.record.clone());
            }
            continue;
        }
        let (content, entry) = d.open(actor, s, true, "watch")?;
        audit.push(entry);
        now_held.push((s.record.name.clone(), (s.record.id, version, digest)));
        upserts.push(Opened {
            record: s.record.clone(),
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
    Ok((Ridden::Of { delta, now_held }, audit))
}

/// Which shared read a watcher may join: the same client (so the same
/// access check: a watcher never rides on another client's read), the
/// same question, woken by the same change (so the read began after that
/// change committed).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct FlightKey {
    client_id: u64,
    client_name: String,
    asked: Asked,
    revision: u64,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Asked {
    /// These secrets (sorted ids), after they changed.
    Secrets(Vec<u64>),
    /// The client's whole view (and that the client is still there),
    /// after grants or clients changed.
    View,
}

/// What a watcher holds, of what it asks about.
enum Known {
    Of(Vec<(u64, HeldOf)>),
    All(Held),
}

/// A watcher waiting for a shared read.
struct Rider {
    caller: Caller,
    known: Known,
    /// Dropped unanswered when the shared read or its audit fails: the
    /// watcher then reads alone.
    reply: oneshot::Sender<Result<Ridden, Error>>,
}

/// Shared fast-path reads in progress, by [`FlightKey`]. A rotation seen
/// by N watchers of one client costs one store read (the access check and
/// the sealed row together, as each would have made it), one decryption
/// and one audit append of N entries, not N of each. A read is shared
/// only while it is in progress: a later change starts a new one.
#[derive(Default)]
pub(super) struct Flights(Mutex<HashMap<FlightKey, Vec<Rider>>>);

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FlightKey, Vec<Rider>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `rider` to the read for `key`; true when it is the first, and
    /// its watcher must start the read.
    fn board(&self, key: FlightKey, rider: Rider) -> bool {
        let mut flights = self.lock();
        let riders = flights.entry(key).or_default();
        riders.push(rider);
        riders.len() == 1
    }

    /// Everyone who joined the read for `key`; later watchers start anew.
    fn depart(&self, key: &FlightKey) -> Vec<Rider> {
        self.lock().remove(key).unwrap_or_default()
    }

    /// How many watchers wait on reads in progress.
    #[cfg(test)]
    pub(super) fn riders(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}

impl Domain {
    /// Makes the shared read for `key`, decides for every watcher that
    /// joined it, appends all their audit entries at once, and answers
    /// each once they are durable. A task of its own: a watcher that goes
    /// away does not end the read the others wait for.
    async fn fly(self: Arc<Self>, key: FlightKey) {
        let revision = key.revision;
        let again = key.clone();
        // Set once the read took its riders (after that, an entry for the
        // key is a newer read's).
        let taken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let took = taken.clone();
        // The other watchers this change woke are runnable now: let them
        // board before the read starts (no wait, just a turn of the
        // scheduler; one who comes late starts a read of its own).
        tokio::task::yield_now().await;
        let done = self
            .run(move |d| match &key.asked {
                Asked::Secrets(ids) => fly_secrets(d, &key, ids, revision, &took),
                Asked::View => fly_view(d, &key, &took),
            })
            .await;
        let (answers, audit) = match done {
            Ok(done) => done,
            Err(e) => {
                // Its riders were dropped (or never taken, and are taken
                // now): each reads alone.
                tracing::debug!(error = %e, "a shared watch read failed; each watcher reads alone");
                if !taken.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(self.flights.depart(&again));
                }
                return;
            }
        };
        if let Err(e) = self.audit.append(audit).await {
            // Each reads alone, and reports its own error.
            tracing::debug!(error = %e, "a shared watch read's audit failed; each watcher reads alone");
            return;
        }
        for (reply, answer) in answers {
            let _ = reply.send(answer);
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        tracing::debug!(client = %self.caller.name(), "watch ended");
    }
}

/// Answers to the riders of a shared read (each its own decision or
/// error), and the audit entries of all the content they get.
type Answers = Vec<(
    oneshot::Sender<Result<Ridden, Error>>,
    Result<Ridden, Error>,
)>;

/// The fast path's shared read: the secrets once, each rider's delta from
/// them.
fn fly_secrets(
    d: &Domain,
    key: &FlightKey,
    ids: &[u64],
    revision: u64,
    taken: &std::sync::atomic::AtomicBool,
) -> Result<(Answers, Vec<AuditEntry>), Error> {
    let found = read_found(d, key.client_id, ids)?;
    // Whoever joined before now is answered by this read: each joined
    // after the change the read followed had committed.
    let riders = d.flights.depart(key);
    taken.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::debug!(
        watchers = riders.len(),
        "one read for the watchers of a change"
    );
    let mut answers = Vec::with_capacity(riders.len());
    let mut audit = Vec::with_capacity(riders.len());
    for rider in riders {
        if rider.reply.is_closed() {
            continue; // Gone: nothing to read or audit for it.
        }
        let Known::Of(known) = rider.known else {
            continue; // Not this question (the key says it is): drop it.
        };
        let answer =
            decide(d, rider.caller.name(), &found, known, revision).map(|(ridden, entries)| {
                audit.extend(entries);
                ridden
            });
        answers.push((rider.reply, answer));
    }
    Ok((answers, audit))
}

/// The recompute's shared reads: the client (still there and enabled?),
/// its view, and the content any rider needs, once; each rider's delta
/// from them.
fn fly_view(
    d: &Domain,
    key: &FlightKey,
    taken: &std::sync::atomic::AtomicBool,
) -> Result<(Answers, Vec<AuditEntry>), Error> {
    let client = match d.store.get_client(&key.client_name) {
        Ok(c) => Some(c),
        Err(crate::store::StoreError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let allowed = client
        .as_ref()
        .is_some_and(|c| c.id == key.client_id && c.enabled);
    let view = if allowed {
        Some(d.store.client_view(key.client_id)?)
    } else {
        None
    };
    let riders = d.flights.depart(key);
    taken.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::debug!(
        watchers = riders.len(),
        "one view read for the watchers of a change"
    );
    let shared = riders.len() > 1;
    let mut answers: Answers = Vec::with_capacity(riders.len());
    let mut diffs = Vec::with_capacity(riders.len());
    for rider in riders {
        if rider.reply.is_closed() {
            continue;
        }
        let Known::All(held) = rider.known else {
            continue;
        };
        match (still_is(&rider.caller, client.as_ref()), &view) {
            (Ok(()), Some(view)) => {
                diffs.push((rider.caller, rider.reply, ViewDiff::new(view, held)))
            }
            (Err(e), _) => answers.push((rider.reply, Err(e))),
            // Allowed by its own check but not by the key's (the same
            // client, so never): dropped unanswered, it reads alone.
            (Ok(()), None) => {}
        }
    }
    let Some(view) = view else {
        return Ok((answers, Vec::new()));
    };
    let names: Vec<String> = diffs
        .iter()
        .flat_map(|(.., diff)| diff.changed.iter().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let (found, gone) = if names.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        d.store.read_sealed(key.client_id, &names)?
    };
    let mut audit = Vec::new();
    for (caller, reply, diff) in diffs {
        let answer = diff
            .finish(d, caller.name(), &found, &gone, view.revision, shared)
            .map(|(delta, now_held, entries)| {
                audit.extend(entries);
                Ridden::All { delta, now_held }
            });
        answers.push((reply, answer));
    }
    Ok((answers, audit))
}
