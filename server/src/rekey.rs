//! Online rekey: moving to a new master key while serving.
//!
//! 1. Start: the provider stores the next key where a restart finds it
//!    ([`KeySource::create_next`]); one store transaction records "rekey to
//!    epoch N+1" and a key check for the new key; the ring becomes
//!    `{ current: new, previous: old }`, so every write from then on uses
//!    the new key and reads accept both. Audited `server.rekey`.
//! 2. Batches: every version's data key is re-wrapped
//!    ([`Store::rewrap_keys`], a cursor in the store), then row MACs are
//!    resealed (the rows stream's hook, [`reseal_rows`]).
//! 3. Finish: one transaction makes the new key's check the key check,
//!    records epoch N+1, keeps every retired audit key sealed under the new
//!    key (`audit_key.<epoch>`) and clears the rekey entries; the ring drops
//!    the old key; the provider's next key becomes the key (file rename,
//!    directory fsynced). Audited `server.rekey`.
//!
//! A kill at any point leaves a store that starts: [`keys_at_start`] loads
//! both keys while a rekey is recorded, and the server resumes it; a next
//! key no rekey recorded is discarded; a finished rekey whose provider step
//! did not happen is completed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::envelope::{Binding, MasterKey, Sealed};
use crate::error::Error;
use crate::key_provider::KeySource;
use crate::keys::{KeyRing, KeySet, Keys, MacKey};
use crate::state_dir::{StateDir, META_KEY_CHECK};
use crate::store::Store;

/// The epoch of the current master key (absent: 1, never rekeyed).
pub const META_EPOCH: &str = "key_epoch";
/// The epoch a rekey in progress moves to (absent: no rekey).
pub const META_REKEY_TO: &str = "rekey_to";
/// The key check of the key a rekey in progress moves to.
pub const META_REKEY_CHECK: &str = "rekey_key_check";
const META_CURSOR: &str = "rekey_cursor";

/// Versions re-wrapped per transaction unless told otherwise.
pub const DEFAULT_BATCH: usize = 500;

fn audit_key_meta(epoch: u32) -> String {
    format!("audit_key.{epoch}")
}

fn audit_key_binding(epoch: u32) -> Binding<'static> {
    Binding {
        secret_id: 0,
        name: "secretfs retired audit key",
        version: u64::from(epoch),
    }
}

/// `wrapped key || ciphertext`, as the key check is stored.
fn flat(s: &Sealed) -> Vec<u8> {
    let mut blob = s.wrapped_key.clone();
    blob.extend_from_slice(&s.ciphertext);
    blob
}

fn unflat(blob: &[u8]) -> Option<Sealed> {
    // The wrapped data key is a fixed 12 + 32 + 16 bytes.
    const WRAPPED: usize = 60;
    (blob.len() >= WRAPPED).then(|| Sealed {
        wrapped_key: blob[..WRAPPED].to_vec(),
        ciphertext: blob[WRAPPED..].to_vec(),
    })
}

/// The key check blob for `key` (what `server init` stores).
pub fn key_check(key: &MasterKey) -> Result<Vec<u8>, Error> {
    crate::keys::seal_key_check(key)
}

/// Whether `blob` is `key`'s key check.
pub fn key_matches(blob: &[u8], key: &MasterKey) -> bool {
    crate::keys::key_check_opens(key, blob)
}

fn epoch_of(store: &dyn Store, key: &str) -> Result<Option<u32>, Error> {
    match store.get_meta(key)? {
        None => Ok(None),
        Some(v) => Ok(Some(u32::from_be_bytes(v.as_slice().try_into().map_err(
            |_| Error::Config(format!("the database's {key} entry is damaged")),
        )?))),
    }
}

/// The keys to start with, from the provider's current (and next) key and
/// what the store records; `true` when a rekey is in progress (resume it).
/// Repairs what a crash between the store and the provider left.
pub fn keys_at_start(
    dir: &StateDir,
    source: &mut KeySource,
    store: &dyn Store,
    current: MasterKey,
    repair: bool,
) -> Result<(Keys, bool), Error> {
    let check = store.get_meta(META_KEY_CHECK)?.ok_or_else(|| {
        Error::Config(
            "the database has no master key check; it was not made by `secretfs server init`"
                .into(),
        )
    })?;
    let epoch = epoch_of(store, META_EPOCH)?.unwrap_or(1);
    let mismatch = || {
        Error::Config(format!(
            "the master key from {} does not match this database (it was made with another key); \
             put the right key back (from backup) and start again. Nothing was changed",
            source.describe(dir)
        ))
    };
    let next = source.load_next(dir)?;
    let (keys, in_progress) = if let Some(to) = epoch_of(store, META_REKEY_TO)? {
        if !key_matches(&check, &current) {
            return Err(mismatch());
        }
        let next = next.ok_or_else(|| {
            Error::Config(format!(
                "a rekey to master key epoch {to} is in progress but its new key is missing from {} \
                 (master.key.next, master.key.wrapped.next or the new systemd credential); restore it from backup",
                source.describe(dir)
            ))
        })?;
        let next_check = store.get_meta(META_REKEY_CHECK)?.unwrap_or_default();
        if !key_matches(&next_check, &next) {
            return Err(Error::Config(format!(
                "a rekey to master key epoch {to} is in progress but the new key found does not match it; restore the right one from backup"
            )));
        }
        (
            Keys {
                current: KeySet::new(to, next),
                previous: Some(KeySet::new(epoch, current)),
                retired_audit: Default::default(),
            },
            true,
        )
    } else if key_matches(&check, &current) {
        if next.is_some() && repair {
            // A rekey that stopped before the store recorded it.
            source.discard_next(dir)?;
        }
        (Keys::new_at(epoch, current), false)
    } else {
        // A rekey that completed in the store but not in the provider.
        match next {
            Some(next) if key_matches(&check, &next) => {
                if repair {
                    source.commit_next(dir)?;
                }
                tracing::info!("completed the last step of a finished rekey: the new master key is now the key");
                (Keys::new_at(epoch, next), false)
            }
            _ => return Err(mismatch()),
        }
    };
    let mut keys = keys;
    keys.retired_audit = load_retired(store, &keys)?;
    Ok((keys, in_progress))
}

/// Every earlier epoch's audit key the store keeps (sealed under the
/// current key, or the previous one while a rekey runs).
fn load_retired(
    store: &dyn Store,
    keys: &Keys,
) -> Result<std::collections::BTreeMap<u32, MacKey>, Error> {
    let oldest_held = keys
        .previous
        .as_ref()
        .map_or(keys.current.epoch(), |p| p.epoch());
    let mut out = std::collections::BTreeMap::new();
    for epoch in 1..oldest_held {
        if let Some(bytes) = open_retired(store, keys, epoch)? {
            out.insert(epoch, MacKey::from_bytes(bytes.as_bytes()));
        }
    }
    Ok(out)
}

fn open_retired(
    store: &dyn Store,
    keys: &Keys,
    epoch: u32,
) -> Result<Option<crate::envelope::Plaintext>, Error> {
    let Some(blob) = store.get_meta(&audit_key_meta(epoch))? else {
        return Ok(None);
    };
    let sealed = unflat(&blob).ok_or_else(|| {
        Error::Config(format!(
            "the database's retired audit key of epoch {epoch} is damaged"
        ))
    })?;
    keys.open(audit_key_binding(epoch), &sealed)
        .map(Some)
        .map_err(|_| {
            Error::Config(format!(
                "the database's retired audit key of epoch {epoch} opens under neither master key"
            ))
        })
}

/// Where a rekey stands, for `server rekey` and its status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RekeyStatus {
    /// The epoch of the key writes use now.
    pub epoch: u32,
    /// Old and new keys are both in use, or the provider's last step (the
    /// rename of the next key) has not happened yet.
    pub in_progress: bool,
    /// Versions looked at by this server's run of the batches.
    pub rewrapped: u64,
    /// Why the last run stopped, if it failed (it resumes at the next start).
    pub error: Option<String>,
}

/// Runs rekeys for a serving server.
pub struct Rekeyer {
    dir: StateDir,
    source: Mutex<KeySource>,
    store: Arc<dyn Store>,
    keys: Arc<KeyRing>,
    batch: usize,
    pause: Duration,
    state: Mutex<State>,
    stopping: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct State {
    running: bool,
    rewrapped: u64,
    error: Option<String>,
}

impl std::fmt::Debug for Rekeyer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rekeyer(..)")
    }
}

impl Rekeyer {
    pub fn new(
        dir: StateDir,
        source: KeySource,
        store: Arc<dyn Store>,
        keys: Arc<KeyRing>,
        batch: usize,
        pause: Duration,
    ) -> Arc<Rekeyer> {
        Arc::new(Rekeyer {
            dir,
            source: Mutex::new(source),
            store,
            keys,
            batch: batch.max(1),
            pause,
            state: Mutex::default(),
            stopping: Default::default(),
        })
    }

    /// The server is shutting down: stop after the batch running now.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn stopped(&self) -> Result<(), Error> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Stopped(
                "the server is shutting down; the rekey resumes at the next start",
            ));
        }
        Ok(())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self) -> RekeyStatus {
        let keys = self.keys.get();
        let s = self.state();
        RekeyStatus {
            epoch: keys.current.epoch(),
            // Until the run has also made the provider's next key the key.
            in_progress: keys.previous.is_some() || s.running,
            rewrapped: s.rewrapped,
            error: s.error.clone(),
        }
    }

    /// Starts a rekey to a new key and runs its batches on a thread of its
    /// own; returns the new epoch. `actor` is audited. A rekey left in
    /// progress by a failed run is resumed instead.
    pub fn start(
        self: &Arc<Self>,
        actor: &str,
        new_credential: Option<&str>,
    ) -> Result<u32, Error> {
        let mut state = self.state();
        let keys = self.keys.get();
        if !state.running && keys.previous.is_some() {
            // A run that stopped on an error: asking again resumes it.
            state.running = true;
            state.error = None;
            drop(state);
            self.spawn();
            return Ok(keys.current.epoch());
        }
        if state.running {
            return Err(Error::FailedPrecondition(format!(
                "a rekey to master key epoch {} is already in progress; wait for it (`secretfs server rekey --status`)",
                keys.current.epoch()
            )));
        }
        let from = keys.current.epoch();
        let to = from + 1;
        let next = {
            let mut source = self.source.lock().unwrap_or_else(|e| e.into_inner());
            source.create_next(&self.dir, new_credential)?
        };
        let check = key_check(&next)?;
        let to_bytes = to.to_be_bytes();
        self.store.put_metas(&[
            (META_REKEY_TO, Some(&to_bytes)),
            (META_REKEY_CHECK, Some(&check)),
            (META_CURSOR, None),
        ])?;
        let old = KeySet::new(from, keys.current.master().clone_key());
        let retired = load_retired(self.store.as_ref(), &keys)?;
        self.keys.replace(Keys {
            current: KeySet::new(to, next),
            previous: Some(old),
            retired_audit: retired,
        });
        self.audit(actor, format!("started: master key epoch {from} to {to}"));
        state.running = true;
        state.rewrapped = 0;
        state.error = None;
        drop(state);
        self.spawn();
        Ok(to)
    }

    /// Resumes a rekey a stopped server left in progress.
    pub fn resume(self: &Arc<Self>) {
        let mut state = self.state();
        if state.running || self.keys.get().previous.is_none() {
            return;
        }
        state.running = true;
        drop(state);
        tracing::info!(
            epoch = self.keys.get().current.epoch(),
            "resuming the master key rekey a stopped server left in progress"
        );
        self.spawn();
    }

    fn spawn(self: &Arc<Self>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("secretfs-rekey".into())
            .spawn(move || {
                let result = me.run();
                let mut state = me.state();
                state.running = false;
                if let Err(e) = result {
                    tracing::error!(error = %e, "the master key rekey stopped; it resumes at the next start");
                    state.error = Some(e.to_string());
                }
            });
        if let Err(e) = spawned {
            let mut state = self.state();
            state.running = false;
            state.error = Some(format!("cannot start the rekey thread: {e}"));
        }
    }

    fn run(&self) -> Result<(), Error> {
        loop {
            self.stopped()?;
            let n = self.store.rewrap_keys(self.batch)?;
            if n == 0 {
                break;
            }
            self.state().rewrapped += n as u64;
            if !self.pause.is_zero() {
                std::thread::sleep(self.pause);
            }
        }
        while {
            self.stopped()?;
            reseal_rows(self.store.as_ref(), self.batch)? > 0
        } {
            if !self.pause.is_zero() {
                std::thread::sleep(self.pause);
            }
        }
        self.finish()
    }

    fn finish(&self) -> Result<(), Error> {
        let keys = self.keys.get();
        let Some(previous) = &keys.previous else {
            return Ok(());
        };
        let new = keys.current.master();
        let to = keys.current.epoch();
        // Every retired audit key, sealed under the new key: the older
        // ones as the store kept them, and the old epoch's own.
        let mut sealed: Vec<(String, Vec<u8>)> = Vec::new();
        for epoch in 1..previous.epoch() {
            if let Some(bytes) = open_retired(self.store.as_ref(), &keys, epoch)? {
                sealed.push((
                    audit_key_meta(epoch),
                    flat(&new.seal(audit_key_binding(epoch), bytes.as_bytes())?),
                ));
            }
        }
        sealed.push((
            audit_key_meta(previous.epoch()),
            flat(&new.seal(
                audit_key_binding(previous.epoch()),
                &previous.audit_bytes()[..],
            )?),
        ));
        let check = key_check(new)?;
        let to_bytes = to.to_be_bytes();
        let mut entries: Vec<(&str, Option<&[u8]>)> = vec![
            (META_KEY_CHECK, Some(&check)),
            (META_EPOCH, Some(&to_bytes)),
            (META_REKEY_TO, None),
            (META_REKEY_CHECK, None),
            (META_CURSOR, None),
        ];
        entries.extend(sealed.iter().map(|(k, v)| (k.as_str(), Some(v.as_slice()))));
        self.store.put_metas(&entries)?;
        let mut retired = load_retired(self.store.as_ref(), &keys)?;
        retired.insert(
            previous.epoch(),
            MacKey::from_bytes(&previous.audit_bytes()[..]),
        );
        self.keys.replace(Keys {
            current: KeySet::new(to, new.clone_key()),
            previous: None,
            retired_audit: retired,
        });
        {
            let mut source = self.source.lock().unwrap_or_else(|e| e.into_inner());
            source.commit_next(&self.dir)?;
        }
        let rewrapped = self.state().rewrapped;
        self.audit(
            "server",
            format!(
                "completed: master key epoch {} to {to} ({rewrapped} versions looked at by this run); the old key is no longer needed",
                previous.epoch()
            ),
        );
        tracing::info!(epoch = to, "master key rekey completed");
        Ok(())
    }

    fn audit(&self, actor: &str, detail: String) {
        let entry = crate::store::AuditEntry {
            detail,
            ..crate::domain::Action::ServerRekey.by(actor)
        };
        if let Err(e) = self.store.append_audit(&[entry]) {
            tracing::error!(error = %e, "cannot audit the rekey");
        }
    }
}

/// Re-signs up to `limit` rows under the current row key; 0 when every
/// row is (and then the row set has moved to the new key too).
fn reseal_rows(store: &dyn Store, limit: usize) -> Result<usize, Error> {
    Ok(store.reseal_rows(limit)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[test]
    fn start_repairs_what_an_interrupted_rekey_left() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let mut source = KeySource::File;
        let k1 = source.create(&dir).unwrap();
        let store = SqliteStore::open_in_memory().unwrap();
        store
            .put_meta(META_KEY_CHECK, &key_check(&k1).unwrap())
            .unwrap();
        let next_file = tmp.path().join("master.key.next");
        let load = |s: &KeySource| s.load(&dir).unwrap();
        let start = |source: &mut KeySource, repair: bool| {
            let current = load(source);
            keys_at_start(&dir, source, &store, current, repair)
        };

        // Killed before the store recorded the rekey: the next key is
        // discarded, but only by the server (repair).
        source.create_next(&dir, None).unwrap();
        let (keys, going) = start(&mut source, false).unwrap();
        assert!(!going && keys.previous.is_none() && next_file.exists());
        let (keys, going) = start(&mut source, true).unwrap();
        assert!(!going && keys.current.epoch() == 1 && !next_file.exists());

        // Recorded: both keys, the new one current.
        let k2 = source.create_next(&dir, None).unwrap();
        let check2 = key_check(&k2).unwrap();
        store
            .put_metas(&[
                (META_REKEY_TO, Some(&2u32.to_be_bytes())),
                (META_REKEY_CHECK, Some(&check2)),
            ])
            .unwrap();
        let (keys, going) = start(&mut source, true).unwrap();
        assert!(going);
        assert_eq!(keys.current.epoch(), 2);
        assert_eq!(keys.previous.as_ref().map(|p| p.epoch()), Some(1));

        // Finished in the store, killed before the rename: completed.
        store
            .put_metas(&[
                (META_KEY_CHECK, Some(&check2)),
                (META_EPOCH, Some(&2u32.to_be_bytes())),
                (META_REKEY_TO, None),
                (META_REKEY_CHECK, None),
            ])
            .unwrap();
        let (keys, going) = start(&mut source, true).unwrap();
        assert!(!going && keys.previous.is_none() && keys.current.epoch() == 2);
        assert!(!next_file.exists());
        assert!(
            key_matches(&check2, &load(&source)),
            "master.key is the new key"
        );

        // Any other key is refused.
        let err = keys_at_start(
            &dir,
            &mut source,
            &store,
            MasterKey::generate().unwrap(),
            true,
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }
}
