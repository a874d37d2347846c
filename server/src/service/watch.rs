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

use secretfs_proto::v1;
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

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
    loop {
        match delta(&shared, &caller, &mut held, initial).await {
            Ok(Some(event)) => {
                if tx.send(Ok(event)).await.is_err() {
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
        while !relevant {
            let first = tokio::select! {
                r = changes.recv() => r,
                _ = closing.changed() => {
                    let _ = tx.send(Err(Status::unavailable("the server is shutting down; reconnect"))).await;
                    return;
                }
                _ = tx.closed() => return,
            };
            let mut next = Some(first);
            while let Some(r) = next {
                match r {
                    Ok(Change::Secret { id }) => {
                        relevant |= held.values().any(|(held_id, _)| *held_id == id)
                    }
                    Ok(Change::Access) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        relevant = true;
                        access = true;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
                next = changes.try_recv().ok().map(Ok);
            }
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
    let (event, now_held) = blocking(move || {
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
        if !changed.is_empty() {
            let (found, gone) = shared.store.read_sealed(client_id, &changed)?;
            // Deleted or revoked between the two reads.
            for g in gone {
                if now_held.remove(&g).is_some() {
                    removals.push(g);
                }
            }
            let mut audit = Vec::with_capacity(found.len());
            for s in found {
                let binding = Binding {
                    secret_id: s.record.id,
                    name: &s.record.name,
                    version: s.record.current_version,
                };
                let plain = shared.master.open(binding, &s.sealed).inspect_err(|_| {
                    tracing::error!(secret = %s.record.name, version = s.record.current_version, "integrity check failed");
                })?;
                audit.push(AuditEntry {
                    actor: actor.clone(),
                    action: "secret.read".into(),
                    secret: Some(s.record.name.clone()),
                    version: Some(s.record.current_version),
                    allowed: true,
                    detail: "watch".into(),
                    ..Default::default()
                });
                now_held.insert(s.record.name.clone(), (s.record.id, s.record.current_version));
                upserts.push(v1::SecretContent {
                    meta: Some(secret_meta(&s.record)),
                    content: plain.into_vec(),
                });
            }
            shared.store.append_audit(&audit)?;
        }
        removals.sort();
        Ok((
            v1::WatchEvent {
                revision,
                initial,
                upserts,
                removals,
            },
            now_held,
        ))
    })
    .await?;
    *held = now_held;
    if !initial && event.upserts.is_empty() && event.removals.is_empty() {
        return Ok(None);
    }
    Ok(Some(event))
}
