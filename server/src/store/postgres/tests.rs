//! The PostgreSQL store against a real PostgreSQL (`secretfs-pgtest`):
//! the conformance suite, the integrity tests that are about behaviour
//! (rows edited behind the store's back), opening, and two stores on one
//! database (two replicas).

use std::sync::Arc;

use secretfs_pgtest::PgCluster;
use zeroize::Zeroizing;

use super::*;
use crate::store::conformance;

fn config(url: &str) -> PgConfig {
    PgConfig::parse(url, None).unwrap()
}

/// A new store in a fresh database; its URL.
fn fresh(keys: Arc<KeyRing>) -> (PgStore, String) {
    let url = PgCluster::shared().database();
    (PgStore::open(&config(&url), true, keys).unwrap(), url)
}

fn db_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

/// Runs SQL on the store's database as the superuser, behind the store's
/// back (as someone without the master key would). SQLite's `X'..'` blob
/// literals (the shared tests') are PostgreSQL's `'\x..'::bytea`. The
/// session has a pending table of its own (else the row set's triggers
/// refuse its writes) that nothing ever folds in.
fn raw_on(url: &str) -> impl Fn(&str) {
    let client = std::sync::Mutex::new(PgCluster::shared().superuser_on(db_name(url)));
    client
        .lock()
        .unwrap()
        .batch_execute("CREATE TEMP TABLE row_set_pending (kind TEXT NOT NULL, mac BYTEA)")
        .unwrap();
    move |sql: &str| {
        let mut out = String::new();
        let mut rest = sql;
        while let Some(i) = rest.find("X'") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let end = after.find('\'').unwrap();
            out.push_str(&format!("'\\x{}'::bytea", &after[..end]));
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        client
            .lock()
            .unwrap()
            .batch_execute(&out)
            .unwrap_or_else(|e| panic!("{out}: {}", conn::describe(&e)));
    }
}

#[test]
fn conforms() {
    conformance::run(&|| Box::new(fresh(KeyRing::generate().unwrap()).0));
}

#[test]
fn tampered_rows_are_absent() {
    let (s, url) = fresh(KeyRing::generate().unwrap());
    conformance::tampered_rows_are_absent(&s, &raw_on(&url));
}

#[test]
fn replayed_rows_are_detected() {
    let (s, url) = fresh(KeyRing::generate().unwrap());
    conformance::replayed_rows_are_detected(&s, &raw_on(&url));
}

#[test]
fn concurrent_writes() {
    let (s, _) = fresh(KeyRing::generate().unwrap());
    conformance::concurrent_writes(Arc::new(s));
}
