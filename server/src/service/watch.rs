//! `Secrets.Watch`: one task per stream keeps a client's view in sync.
//!
//! The task remembers what the client holds (name → id, version), starting
//! from the `known` list the client sent. On every relevant change it reads
//! the client's view from the store, and sends exactly the difference:
//! upserts (metadata and content) and removals. Because the diff is against
//! what the client holds, a reconnect transfers only what it missed, and an
//! event is never applied twice. Every content sent is audited as a read.

use std::collections::HashMap;
use std::sync::Arc;

use secretfs_proto::codec::Wipe;
use secretfs_proto::v1;
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use super::secrets::MAX_REPLY_CONTENT;
use super::{blocking, secret_meta, Caller, Shared};
use crate::envelope::Binding;
use crate::error::Error;
use crate::hub::Change;
use crate::names::check_secret_name;
use crate::store::AuditEntry;

/// The most `known` entries a Watch request may carry.
pub const MAX_KNOWN: usize = 100_000;

type Held = HashMap<String, (u64, u64)>;

pub fn parse_known(known: Vec<v1::KnownSecret>) -> Result<Held, Status> {
    if known.len() > MAX_KNOWN {
        return Err(
            Error::InvalidArgument(format!("at most {MAX_KNOWN} known secrets per Watch")).into(),
        );
    }
    let mut held = HashMap::with_capacity(known.len());
    for k in known {
        check_secret_name(&k.name)?;
        held.insert(k.name, (k.id, k.version));
    }
    Ok(held)
}

/// Runs one Watch stream until the client goes away, loses access, or the
/// server shuts down.
pub async fn run(
    shared: Arc<Shared>,
    caller: Caller,
    mut held: Held,
    tx: mpsc::Sender<Result<v1::WatchEvent, Status>>,
) {
    // Subscribed before the first view is read: a change committed in
    // between is seen again, never missed.
    let (mut changes, mut closing) = shared.hub.subscribe();
    let mut initial = true;
    let name = caller.client.name.clone();
    tracing::debug!(client = %name, "watch started");
    // Secrets rotated or rolled back since the last event; `None` means
    // "recompute the whole view".
    let mut only: Option<(Vec<u64>, u64)> = None;
    loop {
        let result = match only.take() {
            Some((ids, revision)) => rotated(&shared, &caller, &mut held, &ids, revision).await,
            None => delta(&shared, &caller, &mut held, initial).await,
        };
        match result {
            Ok(Some(event)) => {
                if !send_parts(&tx, event).await {
                    break;
                }
            }
            Ok(None) => {}
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                break;
            }
        }
        initial = false;
        // Wait for something relevant; take everything queued at once, so a
        // burst of changes costs one recomputation.
        let mut relevant = false;
        let mut access = false;
        let mut ids = Vec::new();
        let mut revision = 0;
        while !relevant {
            let first = tokio::select! {
                r = changes.recv() => r,
                _ = closing.changed() => {
                    let _ = tx.send(Err(Status::unavailable("the server is shutting down; reconnect"))).await;
                    return;
                }
                _ = tx.closed() => return,
            };
            let mut next = Some(first.map_err(Lag::from));
            while let Some(r) = next {
                match r {
                    Ok(Change::Secret { id, revision: r }) => {
                        if held.values().any(|(held_id, _)| *held_id == id) {
                            relevant = true;
                            revision = revision.max(r);
                            if !ids.contains(&id) {
                                ids.push(id);
                            }
                        }
                    }
                    // Missed changes: we cannot know which, recompute all.
                    Ok(Change::Access) | Err(Lag::Lagged) => {
                        relevant = true;
                        access = true;
                    }
                    Err(Lag::Closed) => return,
                }
                next = match changes.try_recv() {
                    Ok(c) => Some(Ok(c)),
                    Err(broadcast::error::TryRecvError::Empty) => None,
                    Err(broadcast::error::TryRecvError::Lagged(_)) => Some(Err(Lag::Lagged)),
                    Err(broadcast::error::TryRecvError::Closed) => Some(Err(Lag::Closed)),
                };
            }
        }
        if !access {
            only = Some((ids, revision));
        }
        if access {
            if let Err(status) = still_allowed(&shared, &caller).await {
                tracing::info!(client = %name, "watch ended: {}", status.message());
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
    }
    tracing::debug!(client = %name, "watch ended");
}

/// Sends `event` in parts (see [`split`]); false when the client is gone.
/// Parts that can no longer be sent are wiped, not just dropped.
async fn send_parts(
    tx: &mpsc::Sender<Result<v1::WatchEvent, Status>>,
    event: v1::WatchEvent,
) -> bool {
    let mut parts = split(event).into_iter();
    for part in parts.by_ref() {
        if let Err(mpsc::error::SendError(unsent)) = tx.send(Ok(part)).await {
            if let Ok(mut unsent) = unsent {
                unsent.wipe();
            }
            parts.for_each(|mut rest| rest.wipe());
            return false;
        }
    }
    true
}

/// Splits an event into messages of at most [`MAX_REPLY_CONTENT`] of
/// content each (one secret is never split), marked `continued` but the
/// last, so a client with gRPC's default 4 MiB receive limit gets any
/// change. Removals ride in the first part; `initial` only on the first.
fn split(event: v1::WatchEvent) -> Vec<v1::WatchEvent> {
    let part = |initial, removals| v1::WatchEvent {
        revision: event.revision,
        initial,
        upserts: Vec::new(),
        removals,
        continued: false,
    };
    let mut parts = Vec::new();
    let mut current = part(event.initial, event.removals);
    let mut size = 0;
    for u in event.upserts {
        if !current.upserts.is_empty() && size + u.content.len() > MAX_REPLY_CONTENT {
            let next = part(false, Vec::new());
            let mut full = std::mem::replace(&mut current, next);
            full.continued = true;
            parts.push(full);
            size = 0;
        }
        size += u.content.len();
        current.upserts.push(u);
    }
    parts.push(current);
    parts
}

enum Lag {
    Lagged,
    Closed,
}

impl From<broadcast::error::RecvError> for Lag {
    fn from(e: broadcast::error::RecvError) -> Lag {
        match e {
            broadcast::error::RecvError::Lagged(_) => Lag::Lagged,
            broadcast::error::RecvError::Closed => Lag::Closed,
        }
    }
}

/// A removed or disabled client's stream ends at once.
async fn still_allowed(shared: &Arc<Shared>, caller: &Caller) -> Result<(), Status> {
    let shared = shared.clone();
    let name = caller.client.name.clone();
    let id = caller.client.id;
    blocking(move || match shared.store.get_client(&name) {
        Ok(c) if c.id == id && c.enabled => Ok(()),
        Ok(c) if c.id == id => Err(Error::PermissionDenied(format!("client \"{name}\" was disabled"))),
        Ok(_) | Err(Error::NotFound { .. }) => Err(Error::PermissionDenied(format!(
            "client \"{name}\" was removed; an operator can add it again with `secretfs client add {name}`"
        ))),
        Err(e) => Err(e),
    })
    .await
}

/// The difference between what the client holds and its view now, or
/// `None` when there is none (except for the initial event, always sent).
async fn delta(
    shared: &Arc<Shared>,
    caller: &Caller,
    held: &mut Held,
    initial: bool,
) -> Result<Option<v1::WatchEvent>, Status> {
    let shared = shared.clone();
    let client_id = caller.client.id;
    let actor = caller.client.name.clone();
    let snapshot: Held = held.clone();
    let audit_log = shared.audit.clone();
    let (event, now_held, audit) = blocking(move || {
        // Read the revision first: the view read after it is at least as new.
        let revision = shared.store.revision()?;
        let view = shared.store.readable_secrets(client_id)?;
        let mut removals: Vec<String> = snapshot
            .keys()
            .filter(|n| !view.iter().any(|s| &s.name == *n))
            .cloned()
            .collect();
        let changed: Vec<String> = view
            .iter()
            .filter(|s| snapshot.get(&s.name) != Some(&(s.id, s.current_version)))
            .map(|s| s.name.clone())
            .collect();
        let mut now_held = snapshot;
        for r in &removals {
            now_held.remove(r);
        }
        let mut upserts = Vec::with_capacity(changed.len());
        let mut audit = Vec::with_capacity(changed.len());
        if !changed.is_empty() {
            let (found, gone) = shared.store.read_sealed(client_id, &changed)?;
            // Deleted or revoked between the two reads.
            for g in gone {
                if now_held.remove(&g).is_some() {
                    removals.push(g);
                }
            }
            for s in found {
                let binding = Binding {
                    secret_id: s.record.id,
                    name: &s.record.name,
                    version: s.record.current_version,
                };
                let plain = shared.master.open(binding, &s.sealed).inspect_err(|_| {
                    tracing::error!(secret = %s.record.name, version = s.record.current_version, "integrity check failed");
                })?;
                audit.push(read_entry(&actor, &s.record.name, s.record.current_version));
                now_held.insert(s.record.name.clone(), (s.record.id, s.record.current_version));
                upserts.push(v1::SecretContent {
                    meta: Some(secret_meta(&s.record)),
                    content: plain.into_vec(),
                });
            }
        }
        removals.sort();
        Ok((
            v1::WatchEvent {
                revision,
                initial,
                upserts,
                removals,
                continued: false,
            },
            now_held,
            audit,
        ))
    })
    .await?;
    // Audited before the content leaves the server.
    audit_log.append(audit).await?;
    *held = now_held;
    if !initial && event.upserts.is_empty() && event.removals.is_empty() {
        return Ok(None);
    }
    Ok(Some(event))
}

fn read_entry(actor: &str, name: &str, version: u64) -> AuditEntry {
    AuditEntry {
        actor: actor.to_owned(),
        action: "secret.read".into(),
        secret: Some(name.to_owned()),
        version: Some(version),
        allowed: true,
        detail: "watch".into(),
        ..Default::default()
    }
}

/// The fast path after rotations or rollbacks (grants unchanged): fetch just
/// those secrets, re-checking in the same read that the client may still
/// read them, and decrypt each version once for all watchers.
async fn rotated(
    shared: &Arc<Shared>,
    caller: &Caller,
    held: &mut Held,
    ids: &[u64],
    revision: u64,
) -> Result<Option<v1::WatchEvent>, Status> {
    let shared2 = shared.clone();
    let client_id = caller.client.id;
    let actor = caller.client.name.clone();
    let ids = ids.to_vec();
    let snapshot = held.clone();
    let (event, updates, audit) = blocking(move || {
        let mut upserts = Vec::new();
        let mut updates = Vec::new();
        let mut audit = Vec::new();
        for id in ids {
            let Some(s) = shared2.store.read_one_for_client(client_id, id)? else {
                // Lost access in between: the Access hint that follows
                // recomputes the whole view and removes it.
                continue;
            };
            let version = s.record.current_version;
            if snapshot.get(&s.record.name) == Some(&(s.record.id, version)) {
                continue;
            }
            let plain = decrypt_shared(&shared2, &s)?;
            audit.push(read_entry(&actor, &s.record.name, version));
            updates.push((s.record.name.clone(), (s.record.id, version)));
            upserts.push(v1::SecretContent {
                meta: Some(secret_meta(&s.record)),
                content: plain.as_bytes().to_vec(),
            });
        }
        Ok((
            v1::WatchEvent {
                revision,
                initial: false,
                upserts,
                removals: Vec::new(),
                continued: false,
            },
            updates,
            audit,
        ))
    })
    .await?;
    if event.upserts.is_empty() {
        return Ok(None);
    }
    shared.audit.append(audit).await?;
    held.extend(updates);
    Ok(Some(event))
}

/// How many decrypted versions the shared cache keeps.
const RECENT_MAX: usize = 64;

fn decrypt_shared(
    shared: &Shared,
    s: &crate::store::SealedSecret,
) -> Result<Arc<crate::envelope::Plaintext>, Error> {
    let key = (s.record.id, s.record.current_version);
    if let Some(p) = shared
        .recent
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
    {
        return Ok(p.clone());
    }
    let binding = Binding {
        secret_id: s.record.id,
        name: &s.record.name,
        version: s.record.current_version,
    };
    let plain = Arc::new(shared.master.open(binding, &s.sealed).inspect_err(|_| {
        tracing::error!(secret = %s.record.name, version = s.record.current_version, "integrity check failed");
    })?);
    let mut recent = shared.recent.lock().unwrap_or_else(|e| e.into_inner());
    if recent.len() >= RECENT_MAX {
        // Dropping wipes them (Plaintext zeroizes).
        recent.clear();
    }
    recent.insert(key, plain.clone());
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert(name: &str, len: usize) -> v1::SecretContent {
        v1::SecretContent {
            meta: Some(v1::SecretMeta {
                name: name.into(),
                ..Default::default()
            }),
            content: vec![7; len],
        }
    }

    #[test]
    fn a_large_event_is_split_into_bounded_parts() {
        let mib = 1 << 20;
        let event = v1::WatchEvent {
            revision: 9,
            initial: true,
            upserts: (0..7).map(|i| upsert(&format!("s{i}"), mib)).collect(),
            removals: vec!["gone".into()],
            continued: false,
        };
        let parts = split(event);
        assert_eq!(parts.len(), 3);
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.revision, 9);
            assert_eq!(p.initial, i == 0);
            assert_eq!(p.continued, i + 1 < parts.len());
            let size: usize = p.upserts.iter().map(|u| u.content.len()).sum();
            assert!(size <= MAX_REPLY_CONTENT, "part {i}: {size}");
        }
        assert_eq!(parts[0].removals, ["gone"]);
        let names: Vec<_> = parts
            .iter()
            .flat_map(|p| &p.upserts)
            .map(|u| u.meta.as_ref().unwrap().name.clone())
            .collect();
        assert_eq!(names, (0..7).map(|i| format!("s{i}")).collect::<Vec<_>>());
    }

    #[test]
    fn a_small_event_is_one_message_and_a_big_secret_is_never_cut() {
        let one = split(v1::WatchEvent {
            upserts: vec![upsert("a", 10), upsert("b", 10)],
            ..Default::default()
        });
        assert_eq!(one.len(), 1);
        assert!(!one[0].continued);
        let big = split(v1::WatchEvent {
            upserts: vec![upsert("a", MAX_REPLY_CONTENT + 1)],
            ..Default::default()
        });
        assert_eq!(big.len(), 1);
        assert_eq!(big[0].upserts[0].content.len(), MAX_REPLY_CONTENT + 1);
    }
}
