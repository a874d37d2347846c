//! Authenticated (client, certificate) pairs, so a busy client does not hit
//! the store on every call.
//!
//! The cache must never outlive a change to clients: `invalidate` clears it
//! and bumps a generation. A lookup that started before the change carries
//! the old generation, and its result is not cached, so a client removed
//! while its lookup was in flight cannot slip back in.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::identity::Issuer;
use crate::store::ClientAuth;

/// How many pairs are kept; beyond it the cache starts over (cheap, rare).
const MAX_ENTRIES: usize = 10_000;

/// The certificate a client authenticated with.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CertKey {
    pub name: String,
    pub serial: String,
    pub issuer: Issuer,
}

/// Which change to clients a lookup saw; see [`AuthCache::generation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generation(u64);

#[derive(Default)]
pub struct AuthCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    generation: u64,
    entries: HashMap<CertKey, ClientAuth>,
}

impl AuthCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: &CertKey) -> Option<ClientAuth> {
        self.lock().entries.get(key).cloned()
    }

    /// Taken before a lookup in the store, handed back to `insert`.
    pub fn generation(&self) -> Generation {
        Generation(self.lock().generation)
    }

    /// Caches a lookup's result, unless clients changed since `seen` was
    /// taken (then the result may already be stale, and is dropped).
    pub fn insert(&self, seen: Generation, key: CertKey, client: ClientAuth) {
        let mut inner = self.lock();
        if inner.generation != seen.0 {
            return;
        }
        if inner.entries.len() >= MAX_ENTRIES {
            inner.entries.clear();
        }
        inner.entries.insert(key, client);
    }

    /// Clients changed: forget everything, and refuse lookups in flight.
    pub fn invalidate(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CertKey {
        CertKey {
            name: "web".into(),
            serial: "01".into(),
            issuer: Issuer::BuiltIn,
        }
    }

    fn record() -> ClientAuth {
        ClientAuth {
            id: 1,
            name: "web".into(),
            admin: false,
            enabled: true,
            pinned: true,
        }
    }

    #[test]
    fn a_lookup_that_raced_a_removal_is_not_cached() {
        let cache = AuthCache::default();
        let seen = cache.generation();
        // The client is removed while its lookup is in flight...
        cache.invalidate();
        // ...and the lookup's (stale) result comes back.
        cache.insert(seen, key(), record());
        assert_eq!(cache.get(&key()), None);
    }

    #[test]
    fn lookups_are_cached_until_clients_change() {
        let cache = AuthCache::default();
        cache.insert(cache.generation(), key(), record());
        assert_eq!(cache.get(&key()), Some(record()));
        let other_ca = CertKey {
            issuer: Issuer::External,
            ..key()
        };
        assert_eq!(cache.get(&other_ca), None, "the issuer is part of the key");
        cache.invalidate();
        assert_eq!(cache.get(&key()), None);
    }
}
