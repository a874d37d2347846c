//! The position logic on its own, then the listener against a real
//! PostgreSQL (pgtest) with changes made by hand as a store would make them:
//! the next revision under the revision row's lock and the notification in
//! the same transaction.

use super::*;
use secretfs_pgtest::PgCluster;

fn secret(id: u64, revision: u64) -> Change {
    Change::Secret { id, revision }
}

#[test]
fn a_local_publish_is_delivered_once_and_can_overtake_another_replicas_change() {
    let mut p = Position::new(8);
    // This replica's 10 is published before 9 from elsewhere is heard.
    assert_eq!(p.published(secret(1, 10)), Some(secret(1, 10)));
    assert_eq!(p.published(secret(1, 10)), None, "published twice");
    assert_eq!(p.heard("9 secret 2"), Some(secret(2, 9)));
    // The notification of its own 10: already delivered.
    assert_eq!(p.heard("10 secret 1"), None);
    assert!(p.local.is_empty(), "{p:?}");
    assert_eq!(p.heard("11 access"), Some(Change::Access { revision: 11 }));
    // Heard before it was published: the publish is the duplicate.
    assert_eq!(
        p.heard("12 client_added"),
        Some(Change::ClientAdded { revision: 12 })
    );
    assert_eq!(p.published(Change::ClientAdded { revision: 12 }), None);
    // A repeated notification is dropped.
    assert_eq!(p.heard("12 client_added"), None);
}

#[test]
fn a_gap_or_an_unknown_payload_resyncs() {
    let mut p = Position::new(3);
    assert_eq!(p.heard("5 secret 1"), Some(Change::Resync { revision: 5 }));
    assert_eq!(p.heard("6 secret 1"), Some(secret(1, 6)));
    assert_eq!(p.heard("7 nova 3"), Some(Change::Resync { revision: 7 }));
    assert_eq!(p.heard("8 secret 1"), Some(secret(1, 8)));
    assert_eq!(p.heard("junk"), Some(Change::Resync { revision: 8 }));
    assert_eq!(p.heard("9 secret 1"), Some(secret(1, 9)));
    // A resync covers what was published here below it.
    p.published(secret(1, 11));
    assert_eq!(
        p.heard("12 secret 2"),
        Some(Change::Resync { revision: 12 })
    );
    assert!(p.local.is_empty(), "{p:?}");
}

#[test]
fn a_reconnection_resyncs_and_a_first_connection_only_if_the_database_moved() {
    let mut p = Position::new(4);
    assert_eq!(p.connected(4, false), None);
    assert_eq!(p.connected(6, false), Some(Change::Resync { revision: 6 }));
    assert_eq!(p.connected(6, true), Some(Change::Resync { revision: 6 }));
    p.published(secret(1, 7));
    p.published(secret(1, 9));
    assert_eq!(p.connected(8, true), Some(Change::Resync { revision: 8 }));
    assert_eq!(p.local, BTreeSet::from([9]));
    assert_eq!(p.heard("9 secret 1"), None);
    assert_eq!(p.heard("10 secret 1"), Some(secret(1, 10)));
}

/// A database with the revision row, as the store makes it.
struct Db {
    url: String,
    name: String,
}

fn db(pg: &PgCluster) -> Db {
    let url = pg.database();
    let name = url.rsplit('/').next().unwrap().to_string();
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute(
        "CREATE TABLE revision (id INTEGER PRIMARY KEY, value BIGINT NOT NULL);
         INSERT INTO revision VALUES (1, 0);",
    )
    .unwrap();
    Db { url, name }
}

impl Db {
    fn source(&self) -> Source {
        let url = self.url.clone();
        Source {
            connect: Box::new(move || {
                postgres::Client::connect(&url, postgres::NoTls).map_err(|e| {
                    StoreError::Unavailable(crate::store::postgres::conn::describe(&e))
                })
            }),
            describe: "test database".into(),
        }
    }

    /// One change as a replica commits it; returns its revision.
    fn commit(&self, kind: &str) -> u64 {
        let mut c = postgres::Client::connect(&self.url, postgres::NoTls).unwrap();
        let mut tx = c.transaction().unwrap();
        let revision: i64 = tx
            .query_one(
                "UPDATE revision SET value = value + 1 WHERE id = 1 RETURNING value",
                &[],
            )
            .unwrap()
            .get(0);
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&notify::CHANNEL, &format!("{revision} {kind}")],
        )
        .unwrap();
        tx.commit().unwrap();
        revision as u64
    }
}

/// The next change on `rx` (bounded wait). Also the replica tests'.
pub(super) fn next(rx: &mut broadcast::Receiver<Change>) -> Change {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match rx.try_recv() {
            Ok(change) => return change,
            Err(broadcast::error::TryRecvError::Empty) => {}
            Err(e) => panic!("the feed failed: {e}"),
        }
        assert!(Instant::now() < deadline, "no change within 30 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (bounded) until `ok`. Also the replica tests'.
pub(super) fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "not {what} within 30 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn another_replicas_change_is_heard_and_this_ones_is_not_repeated() {
    let pg = PgCluster::shared();
    let db = db(pg);
    let feed = PgFeed::start(db.source(), 0).unwrap();
    assert!(feed.connected());
    let mut rx = feed.subscribe();
    let r = db.commit("secret 7");
    assert_eq!(next(&mut rx), secret(7, r));
    // This replica's own change: published at once, then its notification
    // (dropped), then another replica's next one.
    let own = db.commit("client_removed");
    feed.publish(Change::ClientRemoved { revision: own });
    let other = db.commit("access");
    assert_eq!(next(&mut rx), Change::ClientRemoved { revision: own });
    assert_eq!(next(&mut rx), Change::Access { revision: other });
    assert!(rx.try_recv().is_err(), "a change was delivered twice");
}

#[test]
fn a_dropped_listener_catches_up_with_a_resync_and_reconnects_by_itself() {
    let pg = PgCluster::shared();
    let db = db(pg);
    let feed = PgFeed::start(db.source(), 0).unwrap();
    let mut rx = feed.subscribe();
    let mut admin = pg.superuser();
    // Kill the listener's connection, then commit before it is back. The
    // commits hold the revision row's lock while the listener reads it, so
    // some may land while it is away: all of them must be covered.
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = $2",
            &[&db.name, &APPLICATION_NAME],
        )
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    let mut last = 0;
    for i in 0..5 {
        last = db.commit(&format!("secret {i}"));
    }
    // Every change up to `last` arrives, or a Resync covering it.
    let mut covered = 0;
    let mut resynced = false;
    while covered < last {
        match next(&mut rx) {
            Change::Resync { revision } => {
                resynced = true;
                covered = covered.max(revision);
            }
            c => {
                assert_eq!(c.revision(), covered + 1, "out of order: {c:?}");
                covered = c.revision();
            }
        }
    }
    assert!(resynced, "a reconnection must resync");
    until("connected again", || feed.connected());
    // And it hears again.
    let r = db.commit("secret 9");
    loop {
        match next(&mut rx) {
            c if c == secret(9, r) => break,
            Change::Resync { revision } if revision >= r => break,
            _ => {}
        }
    }
}

#[test]
fn dropping_the_feed_ends_its_subscribers_and_its_connection() {
    let pg = PgCluster::shared();
    let db = db(pg);
    let feed = PgFeed::start(db.source(), 0).unwrap();
    let mut rx = feed.subscribe();
    let mut admin = pg.superuser();
    let listeners = |admin: &mut postgres::Client| -> i64 {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = $2",
                &[&db.name, &APPLICATION_NAME],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(listeners(&mut admin), 1);
    drop(feed);
    assert!(matches!(
        rx.try_recv(),
        Err(broadcast::error::TryRecvError::Closed)
    ));
    until("the listener's connection closed", || {
        listeners(&mut admin) == 0
    });
}

#[test]
fn a_database_that_moved_before_the_listener_started_resyncs() {
    let pg = PgCluster::shared();
    let db = db(pg);
    db.commit("secret 1");
    let r = db.commit("secret 1");
    // The store opened at revision 1; the listener starts after 2.
    let feed = PgFeed::start(db.source(), 1).unwrap();
    let mut rx = feed.subscribe();
    let next_r = db.commit("secret 1");
    assert_eq!(next(&mut rx), secret(1, next_r), "heard from {r} on");
}

#[test]
fn a_database_restart_is_ridden_out_and_caught_up() {
    let pg = PgCluster::start(Default::default());
    let db = db(&pg);
    let feed = PgFeed::start(db.source(), 0).unwrap();
    let mut rx = feed.subscribe();
    pg.stop();
    until("disconnected", || !feed.connected());
    pg.start_again();
    // A change committed as soon as the database is back, perhaps before
    // the listener is: heard, or covered by the reconnection's Resync.
    let r = db.commit("secret 3");
    let mut resynced = false;
    loop {
        match next(&mut rx) {
            Change::Resync { revision } => {
                resynced = true;
                if revision >= r {
                    break;
                }
            }
            c if c == secret(3, r) => break,
            c => panic!("unexpected {c:?}"),
        }
    }
    until("connected again", || feed.connected());
    if !resynced {
        assert_eq!(next(&mut rx), Change::Resync { revision: r });
    }
}
