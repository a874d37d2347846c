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
//! both keys while a rekey is recorded, and the server resumes it;
//! [`repair_at_start`] puts aside (never deletes) a next key no rekey
//! recorded, and completes a finished rekey whose provider step did not
//! happen only once every version opens under the new key. Neither repair
//! is done unless the row set agrees. A version neither key opens stops
//! the rekey before it finishes: the old key stays.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::envelope::Binding;
#[cfg(test)]
use crate::envelope::MasterKey;
use crate::error::Error;
use crate::key_provider::KeySource;
use crate::keys::{join_sealed, key_check_opens, seal_key_check, split_sealed};
use crate::keys::{KeyRing, KeySet, Keys, MacKey};
use crate::state_dir::{StateDir, META_KEY_CHECK};
use crate::store::Store;

/// The epoch of the current master key (absent: 1, never rekeyed).
pub const META_EPOCH: &str = "key_epoch";
/// The epoch a rekey in progress moves to (absent: no rekey).
pub const META_REKEY_TO: &str = "rekey_to";
/// The key check of the key a rekey in progress moves to.
pub const META_REKEY_CHECK: &str = "rekey_key_check";
/// Where the re-wrap batches stand (the store's cursor).
pub const META_CURSOR: &str = "rekey_cursor";

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

fn epoch_of(store: &dyn Store, key: &str) -> Result<Option<u32>, Error> {
    match store.get_meta(key)? {
        None => Ok(None),
        Some(v) => Ok(Some(u32::from_be_bytes(v.as_slice().try_into().map_err(
            |_| Error::Config(format!("the database's {key} entry is damaged")),
        )?))),
    }
}

/// What the provider needs after a crash between the store and the
/// provider; [`repair_at_start`] does it, once the keys are in the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    None,
    /// A next key no recorded rekey uses: put it aside (never deleted).
    SetAsideNext,
    /// The store finished a rekey the provider did not: the next key
    /// becomes the key, once the store proves it no longer needs the old.
    CommitNext,
}

/// The keys to start with, from the provider's current (and next) key and
/// what the store records; `true` when a rekey is in progress (resume it),
/// and what a crash between the store and the provider left to repair.
/// Changes nothing. `current` and `next` are the provider's keys as
/// loaded (any epoch): the keys returned share them, never rebuilt.
pub fn keys_at_start(
    dir: &StateDir,
    source: &KeySource,
    store: &dyn Store,
    current: &KeySet,
    next: Option<&KeySet>,
) -> Result<(Keys, bool, Repair), Error> {
    let check = store.get_meta(META_KEY_CHECK)?.ok_or_else(|| {
        Error::Config(
            "the database has no master key check; it was not made by `secretfs server init`"
                .into(),
        )
    })?;
    let epoch = epoch_of(store, META_EPOCH)?.unwrap_or(1);
    let mismatch = || crate::state_dir::key_mismatch(source, dir);
    let (mut keys, in_progress, repair) = if let Some(to) = epoch_of(store, META_REKEY_TO)? {
        if !key_check_opens(current.master(), &check) {
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
        if !key_check_opens(next.master(), &next_check) {
            return Err(Error::Config(format!(
                "a rekey to master key epoch {to} is in progress but the new key found does not match it; restore the right one from backup"
            )));
        }
        (
            Keys::of(
                Arc::new(next.at_epoch(to)),
                Some(Arc::new(current.at_epoch(epoch))),
            ),
            true,
            Repair::None,
        )
    } else if key_check_opens(current.master(), &check) {
        let repair = if next.is_some() {
            Repair::SetAsideNext
        } else {
            Repair::None
        };
        (
            Keys::of(Arc::new(current.at_epoch(epoch)), None),
            false,
            repair,
        )
    } else {
        // A rekey that completed in the store but not in the provider.
        match next {
            Some(next) if key_check_opens(next.master(), &check) => (
                Keys::of(Arc::new(next.at_epoch(epoch)), None),
                false,
                Repair::CommitNext,
            ),
            _ => return Err(mismatch()),
        }
    };
    keys.retired_audit = load_retired(store, &keys)?;
    Ok((keys, in_progress, repair))
}

/// Does `repair` ([`keys_at_start`]'s); the store's ring must hold the
/// keys it returned. Only the server (holding the state lock) repairs.
/// Nothing is done on the word of database rows alone: the row set must
/// agree, a next key is put aside rather than deleted, and the old key is
/// given up only when every version opens under the new one. Otherwise
/// the start is refused with nothing changed.
pub fn repair_at_start(
    dir: &StateDir,
    source: &mut KeySource,
    store: &dyn Store,
    keys: &Keys,
    repair: Repair,
) -> Result<(), Error> {
    let verify = format!(
        "Nothing was changed; run `secretfs server verify --state-dir {}` and undo the edit (or restore the database from backup), then start again",
        dir.path.display()
    );
    let row_set_agrees = |doing: &str| -> Result<(), Error> {
        match store.check_row_set()? {
            None => Ok(()),
            Some(finding) => Err(Error::Config(format!(
                "{doing}, but the database failed its row set check ({}): its rekey entries may have been edited. {verify}",
                finding.what
            ))),
        }
    };
    match repair {
        Repair::None => Ok(()),
        Repair::SetAsideNext => {
            row_set_agrees(
                "the database records no rekey, yet a new master key from one is in the state directory",
            )?;
            // Versions a rekey already moved need the next key: its records
            // were removed from the database, and putting the key aside
            // would lose them (an accepted row set cannot tell).
            let stuck = store.versions_not_opening(keys.current.master())?;
            if !stuck.is_empty() {
                return Err(Error::Config(format!(
                    "the database records no rekey, yet {} secret version(s) ({}) do not open under the current key: \
                     a rekey was in progress and its records were removed from the database. The new key in the state \
                     directory was kept. Restore the database from a backup (accepting the rows does not bring the \
                     records back). {verify}",
                    stuck.len(),
                    name_versions(&stuck)
                )));
            }
            if let Some(aside) = source.set_aside_next(dir)? {
                audit_or_log(
                    store,
                    "server",
                    format!("set aside at start: a new master key no recorded rekey uses, kept as {aside}"),
                );
                tracing::warn!(
                    "a new master key no recorded rekey uses (a rekey stopped before it began) was put aside as {aside}; \
                     remove it once you are sure no backup of the database needs it"
                );
            }
            Ok(())
        }
        Repair::CommitNext => {
            let stuck = store.versions_not_opening(keys.current.master())?;
            if !stuck.is_empty() {
                return Err(Error::Config(format!(
                    "the database says the last rekey finished (its key check is the new key's), but {} secret \
                     version(s) ({}) do not open under the new key, so the old key is still needed and was kept. {verify}",
                    stuck.len(),
                    name_versions(&stuck)
                )));
            }
            row_set_agrees("the database says the last rekey finished")?;
            source.commit_next(dir)?;
            audit_or_log(
                store,
                "server",
                format!(
                    "completed at start: the new master key (epoch {}) is now the key in {}",
                    keys.current.epoch(),
                    source.describe(dir)
                ),
            );
            tracing::info!(
                "completed the last step of a finished rekey: the new master key is now the key"
            );
            Ok(())
        }
    }
}

/// `a v1, b v3, ...` (at most ten), for messages.
fn name_versions(list: &[(String, u64)]) -> String {
    let mut out: Vec<String> = list
        .iter()
        .take(10)
        .map(|(n, v)| format!("{n} v{v}"))
        .collect();
    if list.len() > 10 {
        out.push(format!("and {} more", list.len() - 10));
    }
    out.join(", ")
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
    let sealed = split_sealed(&blob).ok_or_else(|| {
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
        // Each replica holds its own copy of the master key: one that kept
        // the old key would go on sealing under it while this one moves
        // the data away from it.
        let others = self.store.other_replicas()?;
        if !others.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "{} other replica(s) serve this database (from {}): a rekey runs with one replica \
                 only; nothing was changed. Stop the others, rekey here, then copy the new master \
                 key to each replica's state directory and start them (README: \
                 \"Running several replicas\")",
                others.len(),
                others.join(", ")
            )));
        }
        let from = keys.current.epoch();
        let to = from + 1;
        let next = {
            let mut source = self.source.lock().unwrap_or_else(|e| e.into_inner());
            // The provider's key must be the one the store names, and no
            // next key may be there: an earlier rekey whose last step
            // failed must be finished, never overwritten.
            if source.has_next(&self.dir) {
                return Err(Error::FailedPrecondition(format!(
                    "a new master key from an earlier rekey is still kept beside {}; nothing was changed. \
                     Restart the server: it finishes that rekey or puts the unused key aside",
                    source.describe(&self.dir)
                )));
            }
            if let Some(check) = self.store.get_meta(META_KEY_CHECK)? {
                if !key_check_opens(&source.load(&self.dir)?, &check) {
                    return Err(Error::FailedPrecondition(format!(
                        "the master key in {} is not the one the database names (the last rekey's final step did not happen); \
                         nothing was changed. Restart the server to complete it, then ask again",
                        source.describe(&self.dir)
                    )));
                }
            }
            source.create_next(&self.dir, new_credential)?
        };
        let check = seal_key_check(&next)?;
        let to_bytes = to.to_be_bytes();
        self.store.put_metas_audited(
            &[
                (META_REKEY_TO, Some(&to_bytes)),
                (META_REKEY_CHECK, Some(&check)),
                (META_CURSOR, None),
            ],
            &rekey_entry(actor, format!("started: master key epoch {from} to {to}")),
        )?;
        // The ring's sets and retired audit keys carry over as they are.
        self.keys.replace(Keys {
            current: Arc::new(KeySet::new(to, next)),
            previous: Some(keys.current.clone()),
            retired_audit: keys.retired_audit.clone(),
        });
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
        // A version neither key opened stays under the old key: finishing
        // would lose it for good, so the rekey stops and keeps the old key.
        let stuck = self
            .store
            .versions_not_opening(self.keys.get().current.master())?;
        if !stuck.is_empty() {
            let why = format!(
                "{} secret version(s) could not be moved to the new master key (their data key opens under neither key: {}); \
                 the rekey is not finished and the old key is kept. Restore those versions from a backup of the database \
                 (or delete those secrets), then ask again (`secretfs server rekey`)",
                stuck.len(),
                name_versions(&stuck)
            );
            self.audit("server", format!("stopped: {why}"));
            return Err(Error::FailedPrecondition(why));
        }
        while {
            self.stopped()?;
            // Re-signs a batch under the current row key; 0 when every
            // row is (and then the row set has moved to the new key too).
            self.store.reseal_rows(self.batch)? > 0
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
                    join_sealed(new.seal(audit_key_binding(epoch), bytes.as_bytes())?),
                ));
            }
        }
        sealed.push((
            audit_key_meta(previous.epoch()),
            join_sealed(new.seal(
                audit_key_binding(previous.epoch()),
                &previous.audit_bytes()[..],
            )?),
        ));
        let check = seal_key_check(new)?;
        let to_bytes = to.to_be_bytes();
        let mut entries: Vec<(&str, Option<&[u8]>)> = vec![
            (META_KEY_CHECK, Some(&check)),
            (META_EPOCH, Some(&to_bytes)),
            (META_REKEY_TO, None),
            (META_REKEY_CHECK, None),
            (META_CURSOR, None),
        ];
        entries.extend(sealed.iter().map(|(k, v)| (k.as_str(), Some(v.as_slice()))));
        let rewrapped = self.state().rewrapped;
        self.store.put_metas_audited(
            &entries,
            &rekey_entry(
                "server",
                format!(
                    "completed: master key epoch {} to {to} ({rewrapped} versions looked at by this run); \
                     the old key is no longer needed",
                    previous.epoch()
                ),
            ),
        )?;
        // The provider's step before the ring lets the old key go: if it
        // fails, the rekey stays in progress (status says so, with the
        // error) and asking again retries this finish; a restart completes
        // it ([`Repair::CommitNext`]).
        {
            let mut source = self.source.lock().unwrap_or_else(|e| e.into_inner());
            source.commit_next(&self.dir)?;
        }
        let mut retired = keys.retired_audit.clone();
        retired.insert(previous.epoch(), previous.audit().clone());
        self.keys.replace(Keys {
            current: keys.current.clone(),
            previous: None,
            retired_audit: retired,
        });
        tracing::info!(epoch = to, "master key rekey completed");
        Ok(())
    }

    fn audit(&self, actor: &str, detail: String) {
        audit_or_log(self.store.as_ref(), actor, detail);
    }
}

fn rekey_entry(actor: &str, detail: String) -> crate::store::AuditEntry {
    crate::store::AuditEntry {
        detail,
        ..crate::domain::Action::ServerRekey.by(actor)
    }
}

fn audit_or_log(store: &dyn Store, actor: &str, detail: String) {
    if let Err(e) = store.append_audit(&[rekey_entry(actor, detail)]) {
        tracing::error!(error = %e, "cannot audit the rekey");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AuditEntry, NewSecret, SqliteStore};

    fn add(store: &dyn Store, ring: &KeyRing, name: &str, under: Option<&MasterKey>) {
        let new = NewSecret {
            name: name.into(),
            size: 2,
            ..NewSecret::default()
        };
        let audit = AuditEntry {
            actor: "t".into(),
            action: "secret.create".into(),
            allowed: true,
            ..Default::default()
        };
        store
            .create_secret(&new, &audit, &mut |id, version| {
                let binding = Binding {
                    secret_id: id,
                    name,
                    version,
                };
                let keys = ring.get();
                Ok(under
                    .unwrap_or(keys.current.master())
                    .seal(binding, b"hi")
                    .unwrap())
            })
            .unwrap();
    }

    /// A state directory with the file provider, its store and ring.
    struct Fix {
        tmp: tempfile::TempDir,
        dir: StateDir,
        ring: Arc<KeyRing>,
        store: Arc<dyn Store>,
    }

    fn fix() -> Fix {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let k1 = KeySource::File.create(&dir).unwrap();
        let check = seal_key_check(&k1).unwrap();
        let ring = KeyRing::new(k1);
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open_in_memory_with(ring.clone()).unwrap());
        store.put_meta(META_KEY_CHECK, &check).unwrap();
        Fix {
            tmp,
            dir,
            ring,
            store,
        }
    }

    fn rekeyer(f: &Fix) -> Arc<Rekeyer> {
        Rekeyer::new(
            f.dir.clone(),
            KeySource::File,
            f.store.clone(),
            f.ring.clone(),
            1,
            Duration::ZERO,
        )
    }

    /// Waits (bounded) until the rekey thread has stopped.
    fn settled(r: &Rekeyer) -> RekeyStatus {
        for _ in 0..6000 {
            if !r.state().running {
                return r.status();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the rekey thread did not stop");
    }

    /// The provider's keys as a start loads them (epochs fixed later).
    fn sets(source: &KeySource, dir: &StateDir) -> (KeySet, Option<KeySet>) {
        let current = KeySet::new(1, source.load(dir).unwrap());
        let next = source.load_next(dir).unwrap().map(|k| KeySet::new(2, k));
        (current, next)
    }

    /// What a restart does: keys from the provider and the store, the
    /// repair, the ring replaced.
    fn restart(f: &Fix) -> Result<bool, Error> {
        let mut source = KeySource::File;
        let (current, next) = sets(&source, &f.dir);
        let (keys, going, repair) =
            keys_at_start(&f.dir, &source, f.store.as_ref(), &current, next.as_ref())?;
        f.ring.replace(keys);
        repair_at_start(&f.dir, &mut source, f.store.as_ref(), &f.ring.get(), repair)?;
        Ok(going)
    }

    #[test]
    fn a_failed_final_rename_keeps_the_rekey_in_progress_and_asking_again_retries_it() {
        let f = fix();
        add(f.store.as_ref(), &f.ring, "a", None);
        let key_file = f.dir.master_key();
        let next_file = f.tmp.path().join("master.key.next");
        let old_key = std::fs::read(&key_file).unwrap();
        // A rekey as start() leaves it (the provider's next key, the
        // store's record, both keys in the ring) ...
        let mut source = KeySource::File;
        let k2 = source.create_next(&f.dir, None).unwrap();
        f.store
            .put_metas(&[
                (META_REKEY_TO, Some(&2u32.to_be_bytes())),
                (META_REKEY_CHECK, Some(&seal_key_check(&k2).unwrap())),
            ])
            .unwrap();
        let k1 = f.ring.get().current.clone();
        f.ring
            .replace(Keys::of(Arc::new(KeySet::new(2, k2)), Some(k1)));
        // ... whose final rename cannot happen: a non-empty directory is
        // in the way of master.key.next.
        std::fs::remove_file(&key_file).unwrap();
        std::fs::create_dir(&key_file).unwrap();
        std::fs::write(key_file.join("x"), b"x").unwrap();
        let r = rekeyer(&f);
        r.resume();
        let status = settled(&r);
        assert!(status.in_progress, "{status:?}");
        assert!(status.error.is_some(), "{status:?}");
        let next = std::fs::read(&next_file).unwrap();
        // Asking again retries the finish: the next key is not replaced.
        assert_eq!(r.start("admin", None).unwrap(), 2);
        let status = settled(&r);
        assert!(status.in_progress && status.error.is_some(), "{status:?}");
        assert_eq!(std::fs::read(&next_file).unwrap(), next);

        // Killed now, the obstruction gone: the restart completes it.
        std::fs::remove_dir_all(&key_file).unwrap();
        crate::state_dir::write_new(&key_file, &old_key, 0o600).unwrap();
        assert!(!restart(&f).unwrap());
        assert!(!next_file.exists());
        assert_eq!(std::fs::read(&key_file).unwrap(), next);
        let keys = f.ring.get();
        assert_eq!(keys.current.epoch(), 2);
        assert!(f
            .store
            .versions_not_opening(keys.current.master())
            .unwrap()
            .is_empty());

        let audited: Vec<String> = f
            .store
            .query_audit(&crate::store::AuditFilter {
                action: Some("server.rekey".into()),
                limit: 100,
                ..Default::default()
            })
            .unwrap()
            .into_iter()
            .map(|e| e.detail)
            .collect();
        assert!(
            audited.iter().any(|d| d.starts_with("completed at start")),
            "{audited:?}"
        );

        // A stray next key is never overwritten by a new rekey.
        std::fs::write(&next_file, b"keep me").unwrap();
        let err = rekeyer(&f).start("admin", None).unwrap_err().to_string();
        assert!(err.contains("Restart the server"), "{err}");
        assert_eq!(std::fs::read(&next_file).unwrap(), b"keep me");
    }

    #[test]
    fn a_version_neither_key_opens_stops_the_rekey_before_it_finishes() {
        let f = fix();
        add(f.store.as_ref(), &f.ring, "good", None);
        let stranger = MasterKey::generate().unwrap();
        add(f.store.as_ref(), &f.ring, "damaged", Some(&stranger));
        let key_file = f.dir.master_key();
        let old_key = std::fs::read(&key_file).unwrap();
        let r = rekeyer(&f);
        r.start("admin", None).unwrap();
        let status = settled(&r);
        assert!(status.in_progress, "{status:?}");
        let err = status.error.unwrap_or_default();
        assert!(
            err.contains("1 secret version") && err.contains("damaged v1"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&key_file).unwrap(),
            old_key,
            "the old key stays"
        );
        assert!(f.tmp.path().join("master.key.next").exists());
        assert!(f.ring.get().previous.is_some());
        let audited: Vec<String> = f
            .store
            .query_audit(&crate::store::AuditFilter {
                action: Some("server.rekey".into()),
                limit: 100,
                ..Default::default()
            })
            .unwrap()
            .into_iter()
            .map(|e| e.detail)
            .collect();
        assert!(
            audited
                .iter()
                .any(|d| d.starts_with("started: master key epoch 1 to 2"))
                && audited
                    .iter()
                    .any(|d| d.starts_with("stopped: 1 secret version")),
            "{audited:?}"
        );
    }

    #[test]
    fn start_repairs_what_an_interrupted_rekey_left() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        let mut source = KeySource::File;
        let k1 = source.create(&dir).unwrap();
        let check = seal_key_check(&k1).unwrap();
        let ring = KeyRing::new(k1);
        let store = SqliteStore::open_in_memory_with(ring.clone()).unwrap();
        store.put_meta(META_KEY_CHECK, &check).unwrap();
        let next_file = tmp.path().join("master.key.next");
        let load = |s: &KeySource| s.load(&dir).unwrap();
        let start = |source: &mut KeySource, repair: bool| -> Result<(Keys, bool), Error> {
            let (current, next) = sets(source, &dir);
            let (keys, going, fix) = keys_at_start(&dir, source, &store, &current, next.as_ref())?;
            ring.replace(keys);
            if repair {
                repair_at_start(&dir, source, &store, &ring.get(), fix)?;
            }
            let keys = ring.get();
            Ok((Keys::of(keys.current.clone(), keys.previous.clone()), going))
        };
        let set_aside = || {
            std::fs::read_dir(tmp.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("master.key.next.unused-")
                })
                .map(|e| e.path())
                .collect::<Vec<_>>()
        };

        // Killed before the store recorded the rekey: the next key is put
        // aside (never deleted), but only by the server (repair).
        let stray = source.create_next(&dir, None).unwrap();
        let (keys, going) = start(&mut source, false).unwrap();
        assert!(!going && keys.previous.is_none() && next_file.exists());
        let (keys, going) = start(&mut source, true).unwrap();
        assert!(!going && keys.current.epoch() == 1 && !next_file.exists());
        let aside = set_aside();
        assert_eq!(aside.len(), 1);
        assert!(key_check_opens(
            &crate::state_dir::load_master_key(&aside[0]).unwrap(),
            &seal_key_check(&stray).unwrap(),
        ));

        // Recorded: both keys, the new one current.
        let k2 = source.create_next(&dir, None).unwrap();
        let check2 = seal_key_check(&k2).unwrap();
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
        while store.reseal_rows(100).unwrap() > 0 {}

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
            key_check_opens(&load(&source), &check2),
            "master.key is the new key"
        );

        // Any other key is refused.
        let stranger = KeySet::new(1, MasterKey::generate().unwrap());
        let err = keys_at_start(&dir, &source, &store, &stranger, None).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn a_next_key_versions_need_is_kept_when_the_rekey_records_are_gone() {
        let f = fix();
        add(f.store.as_ref(), &f.ring, "old", None);
        // A rekey moved one version to the new key, then its records were
        // deleted from the database (and the row set accepted): the next
        // key must not be put aside, or "moved" is lost.
        let mut source = KeySource::File;
        let k2 = source.create_next(&f.dir, None).unwrap();
        add(f.store.as_ref(), &f.ring, "moved", Some(&k2));
        let next_file = f.tmp.path().join("master.key.next");
        let err = restart(&f).unwrap_err().to_string();
        assert!(
            err.contains("1 secret version")
                && err.contains("moved v1")
                && err.contains("records were removed"),
            "{err}"
        );
        assert!(next_file.exists(), "the next key was kept");
        // Without such a version, a stray next key is put aside as before.
        let g = fix();
        add(g.store.as_ref(), &g.ring, "old", None);
        KeySource::File.create_next(&g.dir, None).unwrap();
        restart(&g).unwrap();
        assert!(!g.tmp.path().join("master.key.next").exists());
    }

    #[test]
    fn a_finished_rekey_is_not_completed_while_versions_need_the_old_key() {
        let f = fix();
        add(f.store.as_ref(), &f.ring, "a", None);
        let key_file = f.dir.master_key();
        let old_key = std::fs::read(&key_file).unwrap();
        // A rekey recorded, nothing re-wrapped yet; then the store's key
        // check is made the new key's and the rekey rows deleted (the
        // unsigned key check copied, as someone editing the database
        // would).
        let mut source = KeySource::File;
        let k2 = source.create_next(&f.dir, None).unwrap();
        let check2 = seal_key_check(&k2).unwrap();
        f.store
            .put_metas(&[
                (META_KEY_CHECK, Some(&check2)),
                (META_REKEY_TO, None),
                (META_REKEY_CHECK, None),
            ])
            .unwrap();
        let err = restart(&f).unwrap_err().to_string();
        assert!(
            err.contains("1 secret version") && err.contains("secretfs server verify"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&key_file).unwrap(),
            old_key,
            "nothing changed"
        );
        assert!(f.tmp.path().join("master.key.next").exists());
    }
}
